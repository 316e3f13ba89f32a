"""Optional shared storage: mirror cohort folders to S3 (django-storages) or another path.

Single machine (default): everything lives in ``settings.DATA_DIR`` and this module
does nothing. Several worker machines: either mount one shared POSIX folder as
``DEIDSTUDY_DATA_DIR`` on every machine (NFS, EFS, CephFS — nothing else needed), or
configure a *shared storage* (``DEIDSTUDY_SHARED_STORAGE=s3`` or ``path:/folder``,
see ``deidstudy/settings.py``). Then each machine keeps a local working copy in its
own ``DATA_DIR``, and:

* an import uploads the subject's originals (``orig/<pseudonym>/``) before it commits;
* a stage first downloads the subject's folders it does not have locally
  (``orig``, ``deid``, ``derived``), runs, then uploads ``deid`` and ``derived``
  (replacing the remote copy; remote files no longer produced are deleted);
* the web server downloads a file on first request.

Keys in the storage are the ``DATA_DIR``-relative paths (pseudonyms only). A file is
considered up to date locally when its size matches the remote one.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)

SHARED_ALIAS = "cohortdata"


def shared_storage():
    """The configured shared storage (a Django ``Storage``) or None."""
    if SHARED_ALIAS not in getattr(settings, "STORAGES", {}):
        return None
    from django.core.files.storage import storages

    return storages[SHARED_ALIAS]


def _local(rel: str) -> Path:
    from .stages import data_path

    return data_path(rel)


def _remote_files(storage, prefix: str) -> list[str]:
    """Every key below ``prefix`` (recursive)."""
    out: list[str] = []
    try:
        dirs, files = storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return out
    out.extend(f"{prefix}/{f}" for f in files)
    for d in dirs:
        out.extend(_remote_files(storage, f"{prefix}/{d}"))
    return out


def push_tree(rel_dir: str, *, delete_extra: bool = True) -> int:
    """Upload every file below ``DATA_DIR/rel_dir``; returns the number uploaded.

    Remote files under ``rel_dir`` that no longer exist locally are deleted when
    ``delete_extra``. Hidden temporary files (``.*``) are skipped.
    """
    storage = shared_storage()
    if storage is None:
        return 0
    root = _local(rel_dir)
    local = {}
    if root.is_dir():
        for p in root.rglob("*"):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
                local[f"{rel_dir}/{p.relative_to(root).as_posix()}"] = p
    for key, path in sorted(local.items()):
        if storage.exists(key):
            storage.delete(key)
        with open(path, "rb") as fh:
            saved = storage.save(key, fh)
        if saved != key:
            raise OSError(f"shared storage renamed {rel_dir!r} content; enable overwriting")
    if delete_extra:
        for key in _remote_files(storage, rel_dir):
            if key not in local:
                storage.delete(key)
    return len(local)


def push_file(rel: str) -> None:
    """Upload one ``DATA_DIR``-relative file (replacing the remote copy)."""
    storage = shared_storage()
    if storage is None:
        return
    if storage.exists(rel):
        storage.delete(rel)
    with open(_local(rel), "rb") as fh:
        storage.save(rel, fh)


def _download(storage, key: str) -> None:
    dst = _local(key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.part"
    try:
        with storage.open(key, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1024 * 1024):
                out.write(chunk)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def pull_tree(rel_dir: str) -> int:
    """Download files below ``rel_dir`` that are missing locally or differ in size.

    Local files that the remote copy does not have are removed, so the local
    folder mirrors the shared one. Returns the number of files downloaded.
    """
    storage = shared_storage()
    if storage is None:
        return 0
    keys = _remote_files(storage, rel_dir)
    if not keys:
        return 0
    n = 0
    for key in keys:
        path = _local(key)
        if not path.is_file() or path.stat().st_size != storage.size(key):
            _download(storage, key)
            n += 1
    root = _local(rel_dir)
    wanted = {_local(k) for k in keys}
    for p in root.rglob("*"):
        if p.is_file() and p not in wanted:
            p.unlink()
    return n


def ensure_local(rel: str) -> Path:
    """Local path of a ``DATA_DIR``-relative file, downloading it first if needed."""
    path = _local(rel)
    storage = shared_storage()
    if storage is not None and not path.is_file() and storage.exists(rel):
        _download(storage, rel)
    return path


def subject_dirs(subject) -> dict[str, str]:
    """``DATA_DIR``-relative folders of a subject: ``orig``, ``deid`` and ``derived``."""
    base = subject.cohort.storage_dir()
    return {part: f"{base}/{part}/{subject.pseudonym}" for part in ("orig", "deid", "derived")}
