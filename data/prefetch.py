"""Reading the next batches in a background thread while the training step computes.

The trainer knows which reads its coming steps make (for each step, `(start, count)` of each micro-batch), so
`Prefetcher(read, planned, depth)` runs `read(start, count)` for each planned request in order, in one thread,
at most `depth` batches ahead (a bounded queue: it holds `depth` batches, the thread one more that waits for
room). A thread is enough: a read's time goes into copying windows out of memory-mapped shards and the page
faults that bring them from disk, which numpy does without holding the GIL (for arrays of more than a few
hundred elements: a row of seq_len + 1 tokens at any seq_len a real run uses).

Calling the prefetcher as `prefetcher(start, count)` returns exactly what `read(start, count)` returns; the
plan only decides whether it is already there. A request that is not the plan's next one (the caller left the
plan: a rollback, a step beyond it) stops the thread and reads synchronously from then on, so a wrong plan
costs speed, never data. An exception in a planned read (or in the plan itself) is raised in the caller when
it asks for that batch, with the reader's traceback; the thread stops there. `close()` stops and joins the
thread. `read` is only ever called by one thread at a time (the loader's caches need no lock): the caller
reads itself only once the thread has ended.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

T = TypeVar("T")
Request = tuple[int, int]  # (first sample, count)
_POLL_S = 0.1  # how often a blocked put or get looks whether it should give up


@dataclass
class _Read(Generic[T]):
    """What the thread hands over: a planned request and its batch, or the error that stopped it (request None:
    the plan itself failed). The queue's None: the plan is exhausted."""

    request: Request | None
    batch: T | None = None
    error: BaseException | None = None


class Prefetcher(Generic[T]):
    """`read(start, count)` of each planned request, done ahead in a thread (module docstring); depth 0 reads
    synchronously."""

    def __init__(self, read: Callable[[int, int], T], planned: Iterable[Request], depth: int) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth {depth} must be >= 0")
        self._read = read
        self.hits = 0  # requests served from the thread's reads
        self.misses = 0  # requests read synchronously while a plan was running (it did not foresee them)
        self._queue: queue.Queue[_Read[T] | None] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(
                target=self._produce, args=(iter(planned),), name="unroll-prefetch", daemon=True
            )
            self._thread.start()

    def __call__(self, start: int, count: int) -> T:
        if self._thread is None:
            return self._read(start, count)
        item = self._next()
        if item is None:  # the plan is exhausted
            self._join()
            self.misses += 1
            return self._read(start, count)
        if item.error is not None:  # the read (or the plan) failed: the thread has ended
            self._join()
            raise item.error
        if item.request != (start, count):
            self.close()
            self.misses += 1
            return self._read(start, count)
        self.hits += 1
        return cast(T, item.batch)  # a read without an error holds its batch

    def close(self) -> None:
        """Stops the thread (a read under way finishes first) and drops what it read ahead; idempotent."""
        self._stop.set()
        self._drain()  # unblocks a put waiting on a full queue
        self._join()
        self._drain()  # what that put queued

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _next(self) -> _Read[T] | None:
        """The thread's next item; never waits on a thread that has ended without one."""
        assert self._thread is not None
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a batch or an error") from None

    def _produce(self, planned: Iterable[Request]) -> None:
        try:
            for request in planned:
                if self._stop.is_set():
                    return
                try:
                    item = _Read(request, self._read(*request))
                except BaseException as e:  # handed to the caller, which raises it when it asks for this batch
                    self._put(_Read(request, error=e))
                    return
                if not self._put(item):
                    return
        except BaseException as e:  # the plan itself failed
            self._put(_Read(None, error=e))
            return
        self._put(None)

    def _put(self, item: _Read[T] | None) -> bool:
        """Queues `item`, waiting while the queue is full; False once asked to stop."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
