"""Writing outputs so that a reader never sees them half-written: temporary path, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; it becomes ``path`` only if the block succeeds.

    ``durable``: the data reach the disk before the rename, and the rename before the return,
    so a machine that loses power keeps the old file or the new one (not an empty one)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            try:
                _fsync(path.parent)
            except OSError as err:  # some volume types cannot sync a folder (EINVAL)
                if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                    raise
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete what :func:`replacing` left of ``path`` in processes killed mid-write (their
    temporary siblings); returns them. Only for files this process alone writes."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.tmp-*"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling folder to fill; it replaces ``out`` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
