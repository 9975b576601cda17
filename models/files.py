"""Files and directories on disk, for every writer (checkpoints, artifacts, rank artifacts): the output directory
that appears only when complete (``writing_dir``), the data runs and holes of a sparse file (``data_runs``), and
the free-space check made before a large write (``check_space``, docs/export.md "Disk space is checked")."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_destination(out: Path, overwrite: bool, what: str = "--out") -> None:
    """Refuse to replace a non-empty `out` unless asked to (an empty directory is fine)."""
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{what}: {out} exists and is not empty (pass overwrite / --force to replace it)")


# ---- disk space ----------------------------------------------------------------------------------------------------
RESERVE = 256 << 20  # bytes left free beyond what a writer plans: graphs, manifest, the filesystem's own needs
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskSpaceError(RuntimeError):
    """The destination's filesystem cannot hold what a writer is about to write, or filled up while it wrote."""


def data_runs(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """The [start, stop) runs of [offset, offset + length) of the open file `fd` that hold data; the gaps between
    them are holes (SEEK_DATA / SEEK_HOLE, nothing read; at the filesystem's block granularity). Without SEEK_DATA
    (any error but ENXIO, which means a hole up to the end of the file) the whole range is one run: an unknown
    range is data, never zeros."""
    pos, end = offset, offset + length
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                yield pos, end
            return
        if data >= end:
            return
        stop = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, stop
        pos = stop


def allocated_bytes(path: Path, offset: int, length: int) -> int:
    """How many of the bytes [offset, offset + length) of `path` hold data rather than a hole (data_runs)."""
    with open(path, "rb", buffering=0) as f:
        return sum(stop - start for start, stop in data_runs(f.fileno(), offset, length))


def check_space(directory: Path, need: int, what: str) -> None:
    """Raise DiskSpaceError, naming `what`, the directory and both sizes, when `directory`'s filesystem has less
    free than `need` bytes + RESERVE (checked before writing: a whole Flash export writes ~156 GB)."""
    free = shutil.disk_usage(directory).free
    if need + RESERVE > free:
        raise DiskSpaceError(f"{what}: needs {need / 1e9:.2f} GB of disk (+ {RESERVE / 1e9:.2f} GB kept free); "
                             f"the filesystem of {directory} has {free / 1e9:.2f} GB free; nothing was written")


@contextmanager
def writing_dir(out: Path, overwrite: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling directory of `out`; when the block succeeds, rename it to `out` (an existing
    `out` is moved aside first and removed only after that rename); when it fails, remove it. Either `out` is
    complete or it is what it was before: an interrupted write never leaves a half directory under that name.
    A full disk (ENOSPC, EDQUOT) while the block writes becomes a DiskSpaceError that says so."""
    out = Path(out)
    check_destination(out, overwrite, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():  # the final rename failed: the old one back
            os.rename(old, out)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise DiskSpaceError(f"{what}: the filesystem of {out.parent} filled up while writing {out} "
                                 f"({e.strerror}); the partial write was removed, {out} is as it was") from e
        raise
