"""Checkpoint shards at disk speed, every byte checksummed: DCP's file writer and reader, extended.

DCP writes each rank's share of the model and optimizer state into `__{rank}_{n}.distcp` files as a row of
*items*, each a self-contained torch.save record of one tensor chunk or one small object, and records every
item's (file, offset, length) in `.metadata`. Its reader reads every item it needs whole. So the checksums
here are per item:

  writing   ChecksummingWriter hashes every byte on its way to a shard file (xxh3-128; the position DCP asks
            for before and after each item starts the next digest): the data is hashed once, in memory, as
            it is written. The coordinator checks that the items tile every shard file from its first byte
            to its last and writes `checksums.json`, {file: [[offset, length, digest], ...]}, before DCP's
            `.metadata`; the manifest (integrity.py) covers `checksums.json` like every other small file.
  reading   VerifyingReader maps each shard file and, per item, hashes the item's bytes in place and
            compares the digest before they become a tensor: the bytes the load reads anyway are the bytes
            verified, with no extra I/O and no extra copy, and a corrupted item never reaches the model.
            CorruptItem names the file, the byte range and the tensor. The tensor's bytes are then copied
            from the mapped file straight into the model's (or optimizer's) tensor, where torch.load would
            first allocate one of its own. A pool of threads reads items at once; hashing, page-ins and the
            copy release the GIL.

The format stays plain DCP (`dcp.load` reads it without this module); the checksums are a sidecar.

Measured on the 2-core test machine (shared, so noisy; `unroll bench checkpoint` prints the end-to-end
figures): xxh3 hashes 15-18 GB/s on one core, sha256 1.8 GB/s, which is the disk's own write speed (dd with
fdatasync: 1.5-2.2 GB/s), so sha256 would have doubled a save's time; xxh3 adds about a tenth. It detects
corruption (flipped bits, torn or misplaced writes), its job here; it is no defence against someone who
rewrites the checksums too. Reading an item into a buffer and then handing the buffer to torch.load cost
twice DCP's CPU time per byte (0.75-1.1 s vs 0.52 s for 1.24 GB, warm cache); hashing the mapped file in
place brought it to DCP's own (0.57 s), and copying into the target without torch.load's allocation to
0.36 s. Asking the kernel to read each item ahead (MADV_WILLNEED) before touching it made a cold read of the
mapped file 2.5x slower than letting page faults drive the kernel's own read-ahead. torch.save also computes a CRC-32 of every record (1.3 GB/s on one
core), which torch.load never checks; it cost a third of the save (0.96 vs 1.47 GB/s for 1.24 GB), so the
writer switches it off while it writes (torch's switch is process-wide; nothing reads those CRCs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import mmap
import os
import struct
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch
import xxhash
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from unroll.train.checkpoint.dcp_writer import ErrnoKeepingWriter, _keeping_os_error
from unroll.train.checkpoint.safe_load import SafeReader

CHECKSUMS = "checksums.json"
SHARD_SUFFIX = ".distcp"
IO_THREADS = 4  # the default of checkpoint.io_threads
BACKGROUND_NICE = 19  # an async save's threads: they use the CPU time training leaves
_MAIN = threading.main_thread()


class CorruptItem(Exception):
    """An item whose bytes are not the ones saved; the message names the file, the bytes and the tensor."""


def digest(data) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _no_record_crc32():
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class _HashingStream:
    """A shard file being written, its bytes hashed as they pass. DCP asks for the position before and after
    each item; a position asked for after bytes were written ends the current item's digest."""

    def __init__(self, raw):
        self.raw, self.pos = raw, raw.tell()
        self.start, self.hasher = self.pos, xxhash.xxh3_128()
        self.items: dict[int, tuple[int, str]] = {}  # offset → (length, digest)

    def write(self, data) -> int:
        self.hasher.update(data)
        n = self.raw.write(data)  # a buffered file writes everything or raises
        self.pos += n
        return n

    def end_item(self) -> None:
        if self.pos != self.start:
            self.items[self.start] = (self.pos - self.start, self.hasher.hexdigest())
            self.start = self.pos
            self.hasher.reset()

    def tell(self) -> int:
        self.end_item()
        return self.pos

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.end_item()
        self.raw.close()


class _HashingFileSystem(FileSystem):
    def __init__(self):
        self.items: dict[str, dict[int, tuple[int, str]]] = {}  # file name → {offset: (length, digest)}
        self.errors: list[BaseException] = []  # failures while writing a file, whichever thread wrote it

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            try:
                yield stream
            except BaseException as e:
                self.errors.append(e)
                raise
            finally:
                stream.end_item()
                self.items[Path(path).name] = stream.items


@dataclass
class _HashedInfo(_StorageInfo):
    """An item's place and digest, on its way from the rank that wrote it to the coordinator."""

    xxh3_128: str = ""


class ChecksummingWriter(ErrnoKeepingWriter):
    """DCP's FileSystemWriter (`thread_count` files per rank written at once, each fsynced; a failed write
    raised as the OSError behind it: dcp_writer.py) that hashes every
    item as it writes it; the coordinator writes the digests to `checksums.json` before `.metadata`. For
    async saves (`background`) it keeps the staged CPU copy between saves (no new allocation each time) and
    writes at the lowest CPU priority."""

    def __init__(self, path: str | os.PathLike, *, thread_count: int = IO_THREADS, background: bool = False):
        super().__init__(path, thread_count=thread_count, cache_staged_state_dict=background)
        self.fs = _HashingFileSystem()
        self.background = background

    def stage(self, state_dict):
        """The async save's CPU copy. DCP's cached copy is always pinned, which needs a GPU; pinned memory
        only speeds copies from one, so here it is pinned where there is one."""
        if not self.cache_staged_state_dict:
            return super().stage(state_dict)
        self.per_thread_copy_ahead = 0  # already on the CPU (as DCP's own stage sets it)
        if self.state_dict_cache is None:
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self.state_dict_cache)

    def write_data(self, plan, planner):
        if self.background and sys.platform.startswith("linux") and threading.current_thread() is not _MAIN:
            # Linux keeps a nice value per thread: this one (DCP's async thread, made for this save) and the
            # writer threads it starts give way to training's threads (never the main thread's own)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        self.fs.items, self.fs.errors = {}, []
        with _no_record_crc32(), _keeping_os_error(self.path):
            results = super().write_data(plan, planner).wait()
            if self.fs.errors:  # DCP reports only its calling thread's failure, not its other writer threads'
                raise self.fs.errors[0]
        if len(results) != len(plan.items):
            raise RuntimeError(
                f"{self.path}: {len(plan.items) - len(results)} of the {len(plan.items)} items of "
                f"this rank were not written"
            )
        hashed = []
        for result in results:
            info = result.storage_data
            length, item_digest = self.fs.items.get(info.relative_path, {}).get(info.offset, (None, ""))
            if length != info.length:  # DCP wrote an item in a way this writer does not know: do not guess
                raise RuntimeError(
                    f"{info.relative_path}: the item {result.index.fqn} at byte {info.offset} "
                    f"({info.length} bytes) was not hashed as one item"
                )
            hashed.append(
                dataclasses.replace(
                    result,
                    storage_data=_HashedInfo(
                        info.relative_path, info.offset, info.length, info.transform_descriptors, item_digest
                    ),
                )
            )
        future: Future = Future()
        future.set_result(hashed)
        return future

    def finish(self, metadata, results) -> None:
        sums: dict[str, dict[int, tuple[int, str]]] = {}
        plain: list = []
        for rank_results in results:
            plain.append([])
            for result in rank_results:
                info = result.storage_data
                sums.setdefault(info.relative_path, {})[info.offset] = (info.length, info.xxh3_128)
                plain[-1].append(
                    dataclasses.replace(
                        result,
                        storage_data=_StorageInfo(
                            info.relative_path, info.offset, info.length, info.transform_descriptors
                        ),
                    )
                )
        root = Path(self.path)
        gap = untiled(sums, {name: (root / name).stat().st_size for name in sums})
        if gap:
            raise RuntimeError(f"{root}: {gap}")
        with open(root / CHECKSUMS, "w") as f:
            json.dump({name: [[off, *sums[name][off]] for off in sorted(sums[name])] for name in sorted(sums)}, f)
            f.flush()
            os.fsync(f.fileno())
        super().finish(metadata, plain)


def read_checksums(path: Path) -> dict[str, dict[int, tuple[int, str]]]:
    """`checksums.json` of the checkpoint at `path` as {file: {offset: (length, digest)}}."""
    with open(path / CHECKSUMS) as f:
        return {name: {off: (length, d) for off, length, d in items} for name, items in json.load(f).items()}


def untiled(sums: dict[str, dict[int, tuple[int, str]]], sizes: dict[str, int]) -> str | None:
    """Where the items of `sums` fail to cover every byte of each file of `sizes` exactly once, or None."""
    for name, size in sorted(sizes.items()):
        end = 0
        for offset, (length, _) in sorted(sums.get(name, {}).items()):
            if offset != end:
                return (
                    f"{name}: bytes {end}..{offset} have no checksum"
                    if offset > end
                    else f"{name}: items overlap at byte {offset}"
                )
            end = offset + length
        if end != size:
            return f"{name}: bytes {end}..{size} have no checksum"
    return None


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over bytes already mapped (what torch.load needs). Large reads copy with
    numpy, which releases the GIL, so that several reader threads copy at once."""

    def __init__(self, data: memoryview):
        super().__init__()
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self.data) - self.pos))
        if n >= 1 << 16:
            np.copyto(np.frombuffer(b, np.uint8, n), np.frombuffer(self.data[self.pos : self.pos + n], np.uint8))
        else:
            b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.data)}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def _memory_file(data: memoryview) -> IO[bytes]:
    """`data` as the binary file torch.load and DCP's transforms read (a RawIOBase, which typing's IO[bytes]
    does not list among its bases)."""
    return cast(IO[bytes], _MemoryFile(data))


def _copy_checked(req, tensor: torch.Tensor, target: torch.Tensor) -> None:
    tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
    if target.size() != tensor.size():
        raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
    target.copy_(tensor)


def _copy_in_place(item: memoryview, req, target: torch.Tensor) -> bool:
    """Copies the tensor saved in `item` (one torch.save record) into `target` straight from the mapped bytes;
    False, having copied nothing, where the record's form asks for torch.load. torch.load would allocate a new
    tensor and copy into it first: fresh memory faults in at ~2 GB/s on the test machine (against ~12 for a
    copy), which made it three quarters of a warm load's time. Loaded to the meta device, the record yields
    the tensor's dtype, shape and strides and, per storage, where its bytes start in the record."""
    if _byte_order(item) != sys.byteorder:  # first: torch.load to meta crashes on a record it would byte-swap
        return False
    meta = torch.load(_memory_file(item), map_location="meta", weights_only=True)
    storage = meta.untyped_storage()
    offset, nbytes = storage._checkpoint_offset, storage.nbytes()
    if offset is None or not nbytes or nbytes % meta.element_size():
        return False
    raw = torch.frombuffer(item, dtype=torch.uint8, count=nbytes, offset=offset)
    saved = raw.view(meta.dtype).as_strided(meta.size(), meta.stride(), meta.storage_offset())
    _copy_checked(req, saved, target)
    return True


def _byte_order(item: memoryview) -> str:
    """The byte order a torch.save record declares ("little" where it has no `byteorder` entry, as torch.load
    assumes). The entry's bytes are taken from behind its local header: torch.save stores entries
    uncompressed, and zipfile's own reader would refuse them for the CRC-32 the writer leaves out."""
    with zipfile.ZipFile(_MemoryFile(item)) as record:
        for entry in record.infolist():
            if entry.filename.rsplit("/", 1)[-1] == "byteorder":
                name_length, extra_length = struct.unpack_from("<HH", item, entry.header_offset + 26)
                start = entry.header_offset + 30 + name_length + extra_length
                return bytes(item[start : start + entry.file_size]).decode("ascii", "replace")
    return "little"


class VerifyingReader(SafeReader):
    """DCP's FileSystemReader (`.metadata` unpickled through an allowlist: safe_load.py) with every item
    verified against `checksums` ({file: {offset: (length, digest)}}; None for a checkpoint saved before
    checksums, read unverified) and `thread_count` items read at once. Pair it with SafePlanner, which reads
    the non-tensor values without running code."""

    def __init__(self, path: str | os.PathLike, checksums: dict | None, *, thread_count: int = IO_THREADS):
        super().__init__(path)
        self.checksums, self.thread_count = checksums, max(1, thread_count)

    def _verify(self, info, data: memoryview, what: str) -> None:
        if self.checksums is None:
            return
        length, expected = self.checksums.get(info.relative_path, {}).get(info.offset, (None, None))
        where = f"{info.relative_path} bytes {info.offset}..{info.offset + info.length} ({what})"
        if length != info.length:
            raise CorruptItem(f"{where} have no checksum in {CHECKSUMS}")
        if digest(data) != expected:
            raise CorruptItem(f"{where} do not match their checksum (corrupted)")

    def _load_tensor(self, mapped: mmap.mmap, info, req, planner) -> None:
        view = self._verified(mapped, info, f"tensor {req.storage_index.fqn}")
        try:
            target = planner.resolve_tensor(req).detach()
            if info.transform_descriptors or not _copy_in_place(view, req, target):
                stream = self.transforms.transform_load_stream(
                    req, info.transform_descriptors or (), _memory_file(view)
                )
                _copy_checked(req, torch.load(stream, map_location="cpu", weights_only=True), target)
        finally:
            with contextlib.suppress(BufferError):  # a tensor on the mapped bytes still held by a traceback
                view.release()
        planner.commit_tensor(req, target)

    def _verified(self, mapped: mmap.mmap, info, what: str) -> memoryview:
        """The item's bytes, a view of the mapped file, once they match their checksum (release it after use)."""
        if info.offset + info.length > len(mapped):
            raise CorruptItem(
                f"{info.relative_path} bytes {info.offset}..{info.offset + info.length} ({what}) "
                f"lie past its end at byte {len(mapped)} (truncated)"
            )
        view = memoryview(mapped)[info.offset : info.offset + info.length]
        try:
            self._verify(info, view, what)
        except BaseException:
            view.release()
            raise
        return view

    def read_data(self, plan, planner):
        places = sorted(
            ((self.storage_data[r.storage_index], r) for r in plan.items),
            key=lambda p: (p[0].relative_path, p[0].offset),
        )
        maps: dict[str, mmap.mmap] = {}
        try:
            for name in sorted({info.relative_path for info, _ in places}):
                with open(self.fs.concat_path(self.path, name), "rb") as f:
                    if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files; items never are
                        raise CorruptItem(f"{name} is empty (truncated)")
                    # copy-on-write, as torch.load(mmap=True) maps: a writable view that torch.frombuffer
                    # takes without a warning; nothing writes to it, so no page is ever copied
                    maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            for info, req in places:  # small pickled objects, in this thread: the planner files them into dicts
                if req.type == LoadItemType.BYTE_IO:
                    view = self._verified(maps[info.relative_path], info, f"object {req.storage_index.fqn}")
                    try:
                        stream = self.transforms.transform_load_stream(
                            req, info.transform_descriptors or (), _MemoryFile(view)
                        )
                        planner.load_bytes(req, io.BytesIO(stream.read()))
                    finally:
                        view.release()
            pool = ThreadPoolExecutor(self.thread_count, thread_name_prefix="unroll-checkpoint-read")
            try:
                for done in [
                    pool.submit(self._load_tensor, maps[info.relative_path], info, req, planner)
                    for info, req in places
                    if req.type != LoadItemType.BYTE_IO
                ]:
                    done.result()  # the first failure; the items not yet started are cancelled
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for mapped in maps.values():
                with contextlib.suppress(BufferError):  # a view still held by a traceback: unmapped when freed
                    mapped.close()
        future: Future = Future()
        future.set_result(None)
        return future


def corruption(e: CheckpointException) -> str | None:
    """The lowest rank's CorruptItem inside DCP's collective failure (the same on every rank), or None."""
    for rank, (exc, _) in sorted(e.failures.items()):
        if isinstance(exc, CorruptItem):
            return f"rank {rank} read {exc}"
    return None
