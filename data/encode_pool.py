"""Batches of texts -> token ids, in worker processes, in input order, with a bounded amount of work in flight.

Every document's ids come back with the tokenizer's EOS appended, as one flat array per batch (cheap to send
between processes) and the documents' lengths. The results are the same for any number of workers, so what is
written from them is too: workers only change how fast it comes.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")

IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: one being encoded, one ready for when it finishes


class Encoded(NamedTuple):
    ids: np.ndarray  # int32 [sum(lengths)]: the batch's documents back to back, each ending in EOS
    lengths: np.ndarray  # int64 [documents]

    def documents(self) -> Iterator[np.ndarray]:
        start = 0
        for n in self.lengths.tolist():
            yield self.ids[start : start + n]
            start += n


def encode_texts(tokenizer, texts: list[str]) -> Encoded:
    """Each text's ids, then EOS."""
    ids = tokenizer.encode_batch(texts)
    eos = (tokenizer.eos_id,)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids), dtype=np.int32, count=int(lengths.sum())
    )
    return Encoded(flat, lengths)


_worker_tokenizer = None


def _start_worker(tokenizer, parent: int) -> None:
    global _worker_tokenizer
    _die_with(parent)
    tokenizer.batch_threads = 1  # one thread per worker: --workers N is N cores (Tokenizer.batch_threads)
    _worker_tokenizer = tokenizer


def _die_with(parent: int) -> None:
    """Have the kernel end this worker when its parent dies (Linux): a prepare killed by SIGKILL has no chance
    to stop its workers, which would otherwise wait for work forever."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def _encode_in_worker(texts: list[str]) -> Encoded:
    return encode_texts(_worker_tokenizer, texts)


def encode_in_order(tokenizer, items: Iterable[tuple[T, list[str]]], workers: int) -> Iterator[tuple[T, Encoded]]:
    """(tag, Encoded) for each (tag, texts) of `items`, in their order. With workers > 1, at most
    IN_FLIGHT_PER_WORKER * workers batches are read ahead of the one yielded, so memory is bounded by the batch
    size whatever the corpus; each worker gets the tokenizer once."""
    if workers <= 1:
        for tag, texts in items:
            yield tag, encode_texts(tokenizer, texts)
        return
    # fork where there is one: workers start at once, and a script that calls this without an
    # `if __name__ == "__main__"` guard is not run again in each worker (as spawn and forkserver would)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pending: collections.deque[tuple[T, Future[Encoded]]] = collections.deque()
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_start_worker,
        initargs=(tokenizer, os.getpid()),  # forked: the same object; spawned: reopened as it was opened
    ) as pool:
        try:
            for tag, texts in items:
                pending.append((tag, pool.submit(_encode_in_worker, texts)))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    tag0, done = pending.popleft()
                    yield tag0, done.result()
            while pending:
                tag0, done = pending.popleft()
                yield tag0, done.result()
        finally:
            for _, future in pending:  # an error or an early stop: what is queued is not wanted
                future.cancel()
