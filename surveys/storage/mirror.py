"""Optional shared storage: mirror cohort folders to S3 (django-storages) or another path.

Single machine (default): everything lives in ``settings.DATA_DIR`` and this module
does nothing. Several worker machines: either mount one shared POSIX folder as
``DEIDSTUDY_DATA_DIR`` on every machine (NFS, EFS, CephFS — nothing else needed), or
configure a *shared storage* (``DEIDSTUDY_SHARED_STORAGE=s3`` or ``path:/folder``,
see ``deidstudy/settings.py``). Then each machine keeps a local working copy in its
own ``DATA_DIR``, and:

* an import uploads the subject's originals (``orig/<pseudonym>/``) before it commits;
* a stage first mirrors the folders it reads (its ``inputs``, see
  :mod:`surveys.processing.stages`) from the storage (:func:`pull_tree`), runs, and when it
  replaces its output folders uploads each one as the reference copy
  (:func:`push_tree`): new and changed files first, then the remote files it no
  longer produced are deleted, so the remote folder ends up equal to the local one;
* the web server downloads a file on first request, and again when the remote copy
  changed (:func:`ensure_local`).

Keys in the storage are the ``DATA_DIR``-relative paths (pseudonyms only). A local
file is up to date when its size and modification time equal the remote one's: a
download and an upload both set the local file's modification time to the remote
one's, so a file changed elsewhere is downloaded again even when its size did not
change (a re-run de-identification writes files of the same size).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from django.conf import settings

from .paths import data_path

log = logging.getLogger(__name__)

SHARED_ALIAS = "cohortdata"


def shared_storage():
    """The configured shared storage (a Django ``Storage``) or None."""
    if SHARED_ALIAS not in getattr(settings, "STORAGES", {}):
        return None
    from django.core.files.storage import storages

    return storages[SHARED_ALIAS]


def _local(rel: str) -> Path:
    return data_path(rel)


def _hidden(rel: str) -> bool:
    """True for temporary files (any path part starting with a dot): never mirrored."""
    return any(part.startswith(".") for part in rel.split("/"))


def _is_s3(storage) -> bool:
    try:
        from storages.backends.s3 import S3Storage
    except ImportError:  # django-storages without boto3
        return False
    return isinstance(storage, S3Storage)


def _is_filesystem(storage) -> bool:
    from django.core.files.storage import FileSystemStorage

    return isinstance(storage, FileSystemStorage)


def _generic_stat(storage, key: str) -> tuple[int, int]:
    """``(size, mtime_ns)`` of an existing file through the plain Storage API (whole
    seconds; 0 when the storage has no modification times, so size alone decides)."""
    try:
        mtime = int(storage.get_modified_time(key).timestamp())
    except NotImplementedError:
        mtime = 0
    return storage.size(key), mtime * 1_000_000_000


def _listing(storage, prefix: str) -> dict[str, tuple[int, int]]:
    """``{key: (size, mtime_ns)}`` of every file below ``prefix`` (recursive), hidden
    files left out.

    S3: one ListObjectsV2 request per 1000 keys (sizes and times come with the listing);
    a folder storage: one ``stat`` per file; any other storage: ``listdir`` per folder
    and ``size``/``get_modified_time`` per file.
    """
    out: dict[str, tuple[int, int]] = {}
    if _is_s3(storage):
        from storages.utils import clean_name

        base = storage._normalize_name(clean_name(prefix)).rstrip("/") + "/"
        pages = storage.connection.meta.client.get_paginator("list_objects_v2").paginate(
            Bucket=storage.bucket_name, Prefix=base)
        for page in pages:
            for entry in page.get("Contents", ()):
                key = f"{prefix}/{entry['Key'][len(base):]}"
                if not key.endswith("/"):
                    out[key] = (int(entry["Size"]),
                                int(entry["LastModified"].timestamp()) * 1_000_000_000)
    elif _is_filesystem(storage):
        root = Path(storage.path(prefix))
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file():
                    st = p.stat()
                    out[f"{prefix}/{p.relative_to(root).as_posix()}"] = (st.st_size, st.st_mtime_ns)
    else:
        def walk(folder: str) -> None:
            try:
                dirs, files = storage.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                return
            for f in files:
                key = f"{folder}/{f}"
                out[key] = _generic_stat(storage, key)
            for d in dirs:
                walk(f"{folder}/{d}")

        walk(prefix)
    return {k: v for k, v in out.items() if not _hidden(k)}


def _put(storage, key: str, path: Path) -> None:
    """Upload ``path`` as ``key``, replacing the remote file so that a reader sees the old
    or the new content, never a missing or partial file (S3: one PUT; a folder storage:
    temporary file + rename; other storages: delete + save)."""
    if _is_filesystem(storage):
        dst = Path(storage.path(key))
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.part"
        try:
            shutil.copyfile(path, tmp)
            if storage.file_permissions_mode is not None:
                os.chmod(tmp, storage.file_permissions_mode)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return
    if not getattr(storage, "file_overwrite", False) and storage.exists(key):
        storage.delete(key)  # the storage would pick another name otherwise
    with open(path, "rb") as fh:
        saved = storage.save(key, fh)
    if saved != key:
        raise OSError(f"shared storage renamed {key.rsplit('/', 1)[0]!r} content; "
                      "enable overwriting")


def _stamp(path: Path, mtime_ns: int) -> None:
    """Give the local copy the remote file's modification time (see the module docstring)."""
    os.utime(path, ns=(mtime_ns, mtime_ns))


def push_tree(rel_dir: str, *, delete_extra: bool = True) -> int:
    """Make the remote copy of ``DATA_DIR/rel_dir`` equal to the local folder.

    Every local file is uploaded (replacing the remote one in place, see :func:`_put`),
    then, when ``delete_extra``, remote files under ``rel_dir`` that do not exist
    locally are deleted — in this order, so a file present before and after is never
    missing for a reader. Hidden temporary files (``.*``) are skipped. The local files
    get the remote modification times. Returns the number of files uploaded.
    """
    storage = shared_storage()
    if storage is None:
        return 0
    root = _local(rel_dir)
    local: dict[str, Path] = {}
    if root.is_dir():
        for p in root.rglob("*"):
            key = f"{rel_dir}/{p.relative_to(root).as_posix()}"
            if p.is_file() and not _hidden(key):
                local[key] = p
    for key, path in sorted(local.items()):
        _put(storage, key, path)
    remote = _listing(storage, rel_dir)
    for key, (_, mtime_ns) in remote.items():
        if key in local:
            _stamp(local[key], mtime_ns)
        elif delete_extra:
            storage.delete(key)
    return len(local)


def push_file(rel: str) -> None:
    """Upload one ``DATA_DIR``-relative file (replacing the remote copy)."""
    storage = shared_storage()
    if storage is None:
        return
    _put(storage, rel, _local(rel))


def delete_file(rel: str) -> None:
    """Delete one ``DATA_DIR``-relative file locally and from the shared storage."""
    _local(rel).unlink(missing_ok=True)
    storage = shared_storage()
    if storage is not None:
        storage.delete(rel)


def _download(storage, key: str, mtime_ns: int | None = None) -> None:
    dst = _local(key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.part"
    try:
        with storage.open(key, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1024 * 1024):
                out.write(chunk)
        if mtime_ns is not None:
            _stamp(tmp, mtime_ns)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def pull_tree(rel_dir: str) -> int:
    """Make the local folder ``DATA_DIR/rel_dir`` equal to the remote copy.

    Downloads the files that are missing locally or differ in size or modification
    time (one listing of the folder, no request per file), then removes local files
    the remote copy does not have (also when it has none). Hidden temporary files
    are left alone. Returns the number of files downloaded.
    """
    storage = shared_storage()
    if storage is None:
        return 0
    remote = _listing(storage, rel_dir)
    n = 0
    for key, (size, mtime_ns) in sorted(remote.items()):
        path = _local(key)
        try:
            st = path.stat()
            fresh = path.is_file() and st.st_size == size and st.st_mtime_ns == mtime_ns
        except FileNotFoundError:
            fresh = False
        if not fresh:
            _download(storage, key, mtime_ns)
            n += 1
    root = _local(rel_dir)
    if root.is_dir():
        for p in root.rglob("*"):
            key = f"{rel_dir}/{p.relative_to(root).as_posix()}"
            if p.is_file() and key not in remote and not _hidden(key):
                p.unlink()
    return n


def _remote_stat(storage, key: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of one remote file (one request), ``None`` when it does not exist.

    Times are whole seconds, as in :func:`_listing`, so they compare with local copies
    stamped from a listing."""
    if _is_s3(storage):
        from botocore.exceptions import ClientError
        from storages.utils import clean_name

        try:
            head = storage.connection.meta.client.head_object(
                Bucket=storage.bucket_name, Key=storage._normalize_name(clean_name(key)))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"]), int(head["LastModified"].timestamp()) * 1_000_000_000
    if _is_filesystem(storage):
        try:
            st = Path(storage.path(key)).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns
    return _generic_stat(storage, key) if storage.exists(key) else None


def ensure_local(rel: str) -> Path:
    """Local path of a ``DATA_DIR``-relative file, downloading it first when needed.

    With a shared storage the remote copy is the reference: the file is downloaded when
    it is missing locally or when its size or modification time differ from the remote
    one's (a stage re-run on another machine replaced it), at the cost of one metadata
    request per call. A file that exists only locally is served as it is.
    """
    path = _local(rel)
    storage = shared_storage()
    if storage is None:
        return path
    remote = _remote_stat(storage, rel)
    if remote is None:
        return path
    try:
        st = path.stat()
        fresh = path.is_file() and (st.st_size, st.st_mtime_ns) == remote
    except FileNotFoundError:
        fresh = False
    if not fresh:
        _download(storage, rel, remote[1])
    return path
