"""Safe import of uploaded DICOM (zip archives or loose files) into a cohort.

The order of work guarantees that a rejected upload leaves nothing behind:

1. :func:`safe_extract_zip` unpacks an archive into a private temporary folder
   below ``DATA_DIR/tmp`` (same file system as the cohort store), refusing
   zip-slip names (``../``), absolute paths, symbolic links, zip bombs (per-member
   compression ratio, total unpacked size, member count; sizes are re-checked
   while streaming, so lying headers do not help) and too many members;
2. :func:`import_folder` scans the folder (:func:`pipeline.dicom_io.scan_folder`),
   refuses non-DICOM content and duplicate series (the same SOP instance twice), then
   in one transaction that holds the cohort's lock refuses subjects or series already
   in the cohort, moves the files into ``DATA_DIR/cohorts/c<id>/orig/<pseudonym>/<Snn>/``
   and creates the database rows. If anything fails after the first move, the moved
   folders are deleted again; folders left by an import whose process was killed
   before it committed are removed by the next import into that cohort.

Web uploads are split in two (:mod:`surveys.cohorts.uploads` runs the second half as an RQ
job): :func:`receive_uploaded_files` only moves the streamed files into a private
folder, :func:`import_received` unpacks and imports them. The received files are
never modified, so an interrupted import can simply run again.

Messages never contain paths or header values from the upload (folder names often
are patient names): files are named by their 1-based position in the upload.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pydicom
from django.conf import settings
from django.db import transaction

from pipeline import dicom_io
from pipeline.deid_header import pseudonym_key

from ..models import Cohort, IdentityLink, Series, StageRun, Subject
from ..processing.stages import STAGES
from ..storage.mirror import push_tree
from ..storage.paths import cohort_part, data_path, tmp_root

log = logging.getLogger(__name__)

#: Files commonly added by desktop archivers; silently ignored.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
IGNORED_DIRS = frozenset({"__MACOSX"})


class ImportRejected(ValueError):
    """An upload was refused; the message is safe to show (no path, no identifier)."""


@dataclass(frozen=True)
class ZipLimits:
    """Limits applied to an archive: total unpacked bytes, compression ratio, member count.

    ``max_ratio`` applies to each member of at least ``ratio_min_bytes`` and to the whole
    archive (declared unpacked total / archive size) once the total reaches
    ``total_ratio_min_bytes`` (small files legitimately compress very well; CT compresses
    about 2–10×).
    """

    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0
    max_members: int = 200_000
    ratio_min_bytes: int = 64 * 1024
    total_ratio_min_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls) -> ZipLimits:
        """Limits from ``settings.UPLOAD_MAX_BYTES``, ``ZIP_MAX_RATIO``, ``ZIP_MAX_MEMBERS``."""
        return cls(
            max_total_bytes=int(getattr(settings, "UPLOAD_MAX_BYTES", cls.max_total_bytes)),
            max_ratio=float(getattr(settings, "ZIP_MAX_RATIO", cls.max_ratio)),
            max_members=int(getattr(settings, "ZIP_MAX_MEMBERS", cls.max_members)),
        )


@dataclass
class ImportResult:
    """What an import created (pseudonyms and series labels only)."""

    cohort_id: int
    subjects: list[str] = field(default_factory=list)
    n_series: int = 0
    n_files: int = 0
    ignored_files: int = 0


#: Longest name part most file systems accept (bytes, UTF-8).
MAX_NAME_BYTES = 255
#: Longest relative member path accepted (bytes, UTF-8), well below PATH_MAX.
MAX_PATH_BYTES = 1024
#: Free space left on the disk after unpacking an archive.
DISK_RESERVE_BYTES = 256 * 1024 * 1024


def _member_path(name: str, index: int) -> PurePosixPath:
    """Validate one archive member name and return it as a relative POSIX path.

    Names the file system could not store (a part over 255 bytes, a path over 1024) are
    refused here, so they are a plain refusal instead of an error at unpacking time."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ImportRejected(f"archive member #{index} has an absolute path; refused")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ImportRejected(f"archive member #{index} points outside the archive ('..'); refused")
    if not parts:
        raise ImportRejected(f"archive member #{index} has an empty name; refused")
    if any("\x00" in p for p in parts):
        raise ImportRejected(f"archive member #{index} has an invalid name; refused")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for p in parts):
        raise ImportRejected(f"archive member #{index} has a file or folder name longer than "
                             f"{MAX_NAME_BYTES} bytes, which the file system cannot store; refused "
                             "(shorten the names and upload it again)")
    if len("/".join(parts).encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ImportRejected(f"archive member #{index} has a path longer than {MAX_PATH_BYTES} "
                             "bytes; refused (shorten the folder names and upload it again)")
    return PurePosixPath(*parts)


def safe_extract_zip(zip_path: Path, dest: Path, limits: ZipLimits | None = None) -> int:
    """Unpack ``zip_path`` into the empty folder ``dest``, refusing anything unsafe.

    Raises :class:`ImportRejected` (naming members by their 1-based index) for an
    archive without files, absolute names, ``..`` components, names the file system cannot
    store, a name used for a file and a folder, symbolic links or other special files,
    encrypted members, more than ``limits.max_members`` members, a declared or actual
    unpacked total above ``limits.max_total_bytes``, a member or a whole archive whose
    compression ratio exceeds ``limits.max_ratio`` (many members of 1 MiB of zeros) and a
    member that unpacks to more bytes than it declares — all but the last before anything
    is written. Raises ``OSError(ENOSPC)`` (an error a retry may overcome) when the
    declared total would not fit on the disk. ``dest`` may be left partly filled on
    error — callers unpack into a temporary folder. Returns the number of files written.
    """
    limits = limits or ZipLimits.from_settings()
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise ImportRejected("the upload is not a readable zip archive") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise ImportRejected(
                f"the archive has {len(infos)} members; at most {limits.max_members} are accepted")
        declared = 0
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        files: set[PurePosixPath] = set()
        folders: set[PurePosixPath] = set()
        for index, info in enumerate(infos, start=1):
            rel = _member_path(info.filename, index)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ImportRejected(f"archive member #{index} is a symbolic link; refused")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
                raise ImportRejected(f"archive member #{index} is a special file; refused")
            if info.flag_bits & 0x1:
                raise ImportRejected(f"archive member #{index} is encrypted; refused")
            if info.is_dir():
                folders.add(rel)
                continue
            folders.update(rel.parents)
            if rel in files:
                raise ImportRejected(
                    f"archive member #{index} appears twice in the archive; refused")
            files.add(rel)
            declared += info.file_size
            if declared > limits.max_total_bytes:
                raise ImportRejected(
                    f"the archive unpacks to more than {limits.max_total_bytes} bytes; refused "
                    "(zip bomb or upload too large)")
            if (info.file_size >= limits.ratio_min_bytes
                    and info.file_size > limits.max_ratio * max(info.compress_size, 1)):
                raise ImportRejected(
                    f"archive member #{index} has a compression ratio above {limits.max_ratio:g}; "
                    "refused as a possible zip bomb")
            plan.append((info, rel))
        if not plan:
            raise ImportRejected("the zip archive is empty (it holds no file)")
        if files & folders:
            raise ImportRejected("the archive uses a name for a file and for a folder; refused")
        # the whole archive: many members just under the per-member threshold (or members
        # sharing their compressed data) must not add up to a bomb
        archive_bytes = max(os.path.getsize(zip_path), 1)
        if (declared >= limits.total_ratio_min_bytes
                and declared > limits.max_ratio * archive_bytes):
            raise ImportRejected(
                f"the archive unpacks to {declared / archive_bytes:.0f} times its size (more than "
                f"{limits.max_ratio:g}); refused as a possible zip bomb")
        dest.mkdir(parents=True, exist_ok=True)
        if declared > shutil.disk_usage(dest).free - DISK_RESERVE_BYTES:
            raise OSError(errno.ENOSPC, "not enough free disk space to unpack the archive")
        dest_resolved = dest.resolve()
        written = 0
        total = 0
        for n, (info, rel) in enumerate(plan, start=1):
            target = dest.joinpath(*rel.parts)
            if dest_resolved not in target.resolve().parents:
                raise ImportRejected(f"archive member #{n} points outside the archive; refused")
            member_bytes = 0
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    raise ImportRejected(
                        f"archive member #{n} appears twice in the archive; refused")
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(1024 * 1024):
                        member_bytes += len(chunk)
                        total += len(chunk)
                        if member_bytes > info.file_size or total > limits.max_total_bytes:
                            raise ImportRejected(
                                f"archive member #{n} unpacks to more bytes than declared; refused "
                                "as a possible zip bomb")
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, zlib_error()):
                raise ImportRejected(f"archive member #{n} is corrupt") from None
            except OSError as exc:
                if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ):  # deterministic: refuse
                    raise ImportRejected(f"archive member #{n} has a name the file system cannot "
                                         "store; refused") from None
                raise
            written += 1
    return written


def zlib_error() -> type[Exception]:
    """The zlib error class (members with broken deflate streams raise it)."""
    import zlib

    return zlib.error


def _is_ignored(rel: Path) -> bool:
    return rel.name in IGNORED_NAMES or any(p in IGNORED_DIRS for p in rel.parts)


@dataclass
class _PlannedSeries:
    ref: dicom_io.SeriesRef
    series_key: str
    patient: dict[str, str]


def _identity(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["PatientID", "PatientName", "PatientBirthDate"])
    return {
        "PatientID": str(ds.get("PatientID", "") or ""),
        "PatientName": str(ds.get("PatientName", "") or ""),
        "PatientBirthDate": str(ds.get("PatientBirthDate", "") or ""),
    }


def _sop_uids(files: tuple[Path, ...]) -> list[str]:
    uids = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uids.append(str(ds.get("SOPInstanceUID", "")))
    return uids


def _next_pseudonyms(cohort: Cohort, n: int, prefix: str = "SUBJ") -> list[str]:
    used = set(cohort.subjects.values_list("pseudonym", flat=True))
    out: list[str] = []
    k = 1
    while len(out) < n:
        name = f"{prefix}-{k:04d}"
        if name not in used:
            out.append(name)
        k += 1
    return out


def import_folder(
    cohort: Cohort,
    folder: Path,
    *,
    move: bool = True,
    progress: Callable[[str], None] | None = None,
    before_commit: Callable[[ImportResult], None] | None = None,
) -> ImportResult:
    """Import every CT series below ``folder`` into ``cohort``; all or nothing.

    Series are grouped into subjects by a keyed hash of PatientID (or of name and
    birth date when the ID is empty); any folder layout is accepted. Refuses
    (:class:`ImportRejected`, nothing imported) non-DICOM files (other than
    archiver litter such as ``.DS_Store``), unreadable DICOM, non-CT series,
    a series whose SOP instances appear twice (duplicate series), a series or a
    subject already in the cohort. With ``move`` the files are moved (``folder``
    must be on the ``DATA_DIR`` file system for this to be cheap), else copied.
    Creates the :class:`Subject`, :class:`Series` and pending :class:`StageRun`
    rows (stages from :data:`surveys.processing.stages.STAGES`). ``before_commit(result)`` runs
    inside the import's transaction after the rows are created: what it writes commits
    together with the import, and if it raises nothing is imported.

    The checks against the cohort, the choice of pseudonyms and the moves run while
    the cohort row is locked (``SELECT … FOR UPDATE``; SQLite's immediate transactions
    lock the whole database), so concurrent imports into one cohort are serialised.
    """
    say = progress or (lambda msg: None)
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportRejected("the import folder does not exist")
    secret = settings.PROJECT_SECRET
    scan = dicom_io.scan_folder(folder)
    problems = [p for p in scan.problems if not _is_ignored(Path(p.path))]
    ignored = len(scan.problems) - len(problems)
    if problems:
        reasons: dict[str, int] = {}
        for p in problems:
            reasons[p.reason] = reasons.get(p.reason, 0) + 1
        detail = "; ".join(f"{n} × {r}" for r, n in sorted(reasons.items()))
        raise ImportRejected(f"the upload holds files that are not usable DICOM images ({detail}); "
                             "nothing was imported")
    if not scan.series:
        raise ImportRejected("no DICOM series found in the upload")
    say(f"found {len(scan.series)} series")

    planned: list[_PlannedSeries] = []
    for ref in scan.series:
        if ref.modality and ref.modality != "CT":
            raise ImportRejected(f"series #{ref.index} is {ref.modality}, not CT; nothing was imported")
        sops = _sop_uids(ref.files)
        if len(set(sops)) != len(sops):
            raise ImportRejected(
                f"series #{ref.index} appears more than once in the upload (duplicate series: "
                "the same images twice); nothing was imported")
        ident = _identity(ref.files[0])
        planned.append(_PlannedSeries(ref, pseudonym_key(str(ref.series_uid), secret), ident))

    by_patient: dict[str, list[_PlannedSeries]] = {}
    for p in planned:
        ident = p.patient
        patient = ident["PatientID"] or f"{ident['PatientName']}|{ident['PatientBirthDate']}"
        by_patient.setdefault(pseudonym_key(patient, secret), []).append(p)
    # order subjects by their key so pseudonyms do not follow the upload's (name) order
    keys = sorted(by_patient)
    orig_dir = data_path(cohort_part(cohort.pk, "orig"))
    moved: list[Path] = []
    names: list[str] = []
    result = ImportResult(cohort_id=cohort.pk, ignored_files=ignored)
    try:
        with transaction.atomic():
            Cohort.objects.select_for_update().filter(pk=cohort.pk).first()
            _refuse_known(cohort, by_patient, planned)
            names = _next_pseudonyms(cohort, len(keys))
            for key, pseudonym in zip(keys, names):
                _remove_orphan(orig_dir / pseudonym)
                subject = Subject.objects.create(cohort=cohort, pseudonym=pseudonym, patient_key=key)
                if cohort.keep_mapping:
                    ident = by_patient[key][0].patient
                    IdentityLink.objects.create(subject=subject, patient_id=ident["PatientID"][:128],
                                                patient_name=ident["PatientName"][:256],
                                                birth_date=ident["PatientBirthDate"][:16])
                series_sorted = sorted(by_patient[key], key=lambda p: p.series_key)
                for n, p in enumerate(series_sorted, start=1):
                    label = f"S{n:02d}"
                    rel = f"{cohort_part(cohort.pk, 'orig', pseudonym)}/{label}"
                    target = data_path(rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.parent / f".{label}.incoming"
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                    moved.append(tmp)
                    for i, f in enumerate(p.ref.files, start=1):
                        dst = tmp / f"{i:05d}.dcm"
                        if move:
                            shutil.move(f, dst)
                        else:
                            shutil.copyfile(f, dst)
                    if target.exists():
                        raise ImportRejected(f"storage folder for {pseudonym}/{label} exists already")
                    os.replace(tmp, target)
                    moved[-1] = target
                    Series.objects.create(subject=subject, label=label, series_key=p.series_key,
                                          n_files=len(p.ref.files), original_dir=rel)
                    result.n_series += 1
                    result.n_files += len(p.ref.files)
                for order, stage in enumerate(STAGES):
                    StageRun.objects.create(subject=subject, stage=stage.name, order=order)
                result.subjects.append(pseudonym)
                say(f"imported {pseudonym} ({len(series_sorted)} series)")
            for pseudonym in result.subjects:  # shared storage (if any) before the commit
                push_tree(cohort_part(cohort.pk, "orig", pseudonym))
            if before_commit is not None:
                before_commit(result)
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        for sub in names:
            d = orig_dir / sub
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
            try:
                push_tree(cohort_part(cohort.pk, "orig", sub))  # nothing local: clears remote
            except Exception:  # noqa: BLE001 — the original error matters more
                log.exception("could not clean the shared storage after a failed import")
        raise
    log.info("cohort %s: imported %d subjects, %d series", cohort.pk, len(result.subjects),
             result.n_series)
    return result


def _refuse_known(cohort: Cohort, by_patient: dict[str, list[_PlannedSeries]],
                  planned: list[_PlannedSeries]) -> None:
    """Refuse subjects or series that the cohort already holds (call under the cohort lock)."""
    existing_subjects = dict(cohort.subjects.values_list("patient_key", "pseudonym"))
    for key in by_patient:
        if key in existing_subjects:
            raise ImportRejected(
                f"a subject in this upload is already in the cohort as {existing_subjects[key]}; "
                "a second upload of the same subject is refused; nothing was imported")
    existing_series = set(Series.objects.filter(subject__cohort=cohort)
                          .values_list("series_key", flat=True))
    for p in planned:
        if p.series_key in existing_series:
            raise ImportRejected(f"series #{p.ref.index} is already in this cohort; nothing was imported")


def _remove_orphan(subject_dir: Path) -> None:
    """Delete the originals folder of a pseudonym that has no subject row.

    Called under the cohort lock for pseudonyms not in the database: such a folder
    can only be left by an import that was killed before it committed (or by a
    subject deleted in the admin), never by a running import.
    """
    if subject_dir.exists():
        log.warning("removing originals left by an interrupted import (%s)", subject_dir.name)
        shutil.rmtree(subject_dir)


def import_zip(cohort: Cohort, zip_path: Path, *, limits: ZipLimits | None = None) -> ImportResult:
    """Safely unpack ``zip_path`` into a temporary folder and :func:`import_folder` it."""
    with tempfile.TemporaryDirectory(prefix="upload-", dir=tmp_root()) as tmp:
        safe_extract_zip(Path(zip_path), Path(tmp) / "x", limits)
        return import_folder(cohort, Path(tmp) / "x", move=True)


#: First bytes of a zip archive: a local file header, or the end record of an empty archive.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
RECEIVED = "received"  # sub-folder of an upload's staging folder: the files as received
WORK = "work"  # sub-folder rebuilt by every import attempt (unpacked archives, linked files)


def check_upload_size(files: list) -> None:
    """Refuse an empty upload or one whose files add up to more than the upload limit."""
    if not files:
        raise ImportRejected("no file was uploaded")
    limit = ZipLimits.from_settings().max_total_bytes
    total = sum(int(getattr(f, "size", 0) or 0) for f in files)
    if total > limit:
        raise ImportRejected(f"the upload is larger than {limit} bytes")


def receive_uploaded_files(files: list, staging: Path) -> tuple[int, int]:
    """Store Django ``UploadedFile`` objects in ``staging/received/`` under numbered names.

    This is all the web request does (:func:`import_received` does the rest in a
    job). Streamed temporary files are moved (a rename when ``FILE_UPLOAD_TEMP_DIR``
    is below ``DATA_DIR``), in-memory ones written in chunks; client-side names are
    not kept. Returns ``(number of files, bytes)``.
    """
    from django.core.files.move import file_move_safe

    check_upload_size(files)
    dest = Path(staging) / RECEIVED
    dest.mkdir(parents=True)
    total = 0
    for n, f in enumerate(files, start=1):
        dst = dest / f"{n:06d}"
        path = getattr(f, "temporary_file_path", None)
        if path is not None:
            file_move_safe(path(), str(dst))
        else:
            _save_upload(f, dst)
        total += dst.stat().st_size
    return len(files), total


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def import_received(
    cohort: Cohort,
    staging: Path,
    *,
    before_commit: Callable[[ImportResult], None] | None = None,
) -> ImportResult:
    """Unpack and import the files that :func:`receive_uploaded_files` stored; all or nothing.

    Zip archives (recognised by their signature, an empty archive too) are unpacked safely
    (:func:`safe_extract_zip`) into ``staging/work/archiveNNNN``; other files are
    hard-linked (or copied) as ``staging/work/files/NNNNNN.dcm``. The work folder is
    rebuilt on every call and removed afterwards, the received files are left
    untouched: an import that was interrupted can run again from the same folder.
    """
    staging = Path(staging)
    received = staging / RECEIVED
    if not received.is_dir():
        raise ImportRejected("the uploaded files are no longer available; upload them again")
    inputs = sorted(p for p in received.iterdir() if p.is_file())
    if not inputs:
        raise ImportRejected("no file was uploaded")
    limits = ZipLimits.from_settings()
    work = staging / WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        for n, src in enumerate(inputs, start=1):
            with open(src, "rb") as fh:
                head = fh.read(4)
            if head in ZIP_SIGNATURES:
                safe_extract_zip(src, work / f"archive{n:04d}", limits)
            else:
                loose = work / "files"
                loose.mkdir(exist_ok=True)
                _link_or_copy(src, loose / f"{n:06d}.dcm")
        return import_folder(cohort, work, move=True, before_commit=before_commit)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_upload(f, dst: Path) -> None:
    with open(dst, "wb") as out:
        out.writelines(f.chunks())
