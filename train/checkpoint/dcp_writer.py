"""DCP's file writer, with the OS error of a failed write kept for every rank to report.

torch.save's zip writer, which DCP writes each shard with, turns a failed write of its file (ENOSPC on a
full disk) into a RuntimeError ("unexpected pos 704 vs 598") that holds the OSError only as its
__context__; DCP then sends each rank's failure to every rank by pickling it, which drops the context.
This writer re-raises such a failure as the OSError itself (errno, message, the file or the checkpoint
directory), which pickles whole, so that every rank can name the path and the error.
"""

from __future__ import annotations

import contextlib

from torch.distributed.checkpoint import FileSystemWriter


def os_error_in(e: BaseException | None) -> OSError | None:
    """The first OSError in an exception's chain (itself, then what it was raised from or during)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def _keeping_os_error(directory):
    try:
        yield
    except Exception as e:
        found = os_error_in(e)
        if found is None or found is e and found.filename:
            raise
        raise OSError(found.errno, found.strerror or str(found), found.filename or str(directory)) from e


class ErrnoKeepingWriter(FileSystemWriter):
    """FileSystemWriter (DCP's default, with its defaults) whose failures are the OSErrors behind them."""

    def write_data(self, plan, planner):
        with _keeping_os_error(self.path):
            return super().write_data(plan, planner)

    def finish(self, metadata, results) -> None:
        with _keeping_os_error(self.path):
            return super().finish(metadata, results)
