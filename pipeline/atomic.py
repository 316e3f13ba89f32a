"""Atomic file and folder writes: a reader sees the old content or the new, never a part.

Every writer in the project goes through these helpers: the data is written to a
hidden temporary sibling (files ``.<name>.<random>.tmp``, folders ``.<name>.tmp-<random>``) on the
same file system and renamed over the final path only when complete. On an error
the temporary file or folder is deleted and the old content stays. Hidden names
(leading dot) are never mirrored to a shared storage or shown to users.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of ``path``: ``.<name>.<kind>-<random>`` (not created)."""
    return path.parent / f".{path.name}.{kind}-{secrets.token_hex(6)}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file + rename (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file + rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(new: Path, dst: Path) -> None:
    """Put folder ``new`` in place of ``dst`` (which may not exist) and delete the old one.

    Two renames on one file system (``dst`` away, ``new`` in): readers see the old or
    the new folder, except for the instant between the renames; on an error the old
    folder is put back.
    """
    if not (dst.exists() or dst.is_symlink()):
        os.replace(new, dst)
        return
    old = temp_sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Fill a fresh hidden sibling folder of ``dst`` (yielded; parents created) that
    replaces ``dst`` (:func:`replace_dir`) when the block ends without an exception;
    on an exception it is deleted and ``dst`` stays as it was."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
