"""De-identify every CT series below a folder: header (PS3.15 basic profile) and face.

This module orchestrates the pieces of :mod:`pipeline`:

1. :func:`pipeline.dicom_io.scan_folder` finds every series below ``input_dir``;
2. each patient gets a pseudonym (``SUBJ-0001`` …) from a registry keyed by an
   HMAC of the patient ID (never the ID itself);
3. per series: :func:`pipeline.dicom_io.load_series` → :func:`pipeline.deface.deface`
   (facial soft tissue → air, bone kept) → header de-identification
   (:class:`pipeline.deid_header.HeaderDeidentifier`) →
   :func:`pipeline.dicom_io.write_datasets` into ``output_dir/<pseudonym>/<Snn>``,
   written to a temporary folder and renamed, so a failing series leaves nothing (for
   speed the headers are de-identified and encoded in a forked child while the series
   loads and the face is removed, :class:`HeadersAhead`; the files are the same bytes);
4. a summary JSON without identifiers (``deid-summary.json``) in ``output_dir``
   and, only when asked for, a mapping file pseudonym → identity that must lie
   outside ``output_dir``.

Messages and log lines never contain patient identifiers or input paths (input
folder names often hold patient names): a failing input series is named by its
index (``input series #3``); its location is written only to the mapping file.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from pipeline import dicom_io
from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.deid_header import HeaderDeidentifier, date_offset_days_for, pseudonym_key
from pipeline.errors import safe_message
from pipeline.forked import ForkedCall, ForkedCallError
from pipeline.preview import png_bytes

log = logging.getLogger(__name__)

SUMMARY_NAME = "deid-summary.json"
#: QA pictures (original beside de-identified: they show the original face) below OUTPUT.
QA_DIR = "qa-pictures"
METHODS = ("auto", "anatomical", "model", "none")
DATE_MODES = ("shift", "remove")
#: processes (threads) that write a series' files (:func:`pipeline.dicom_io.write_datasets`,
#: :func:`pipeline.dicom_io.write_prefixed`)
WRITE_PROCESSES = 2
#: the least time (s) a series waits for its headers encoded ahead (:class:`HeadersAhead`)
AHEAD_MIN_WAIT_S = 10.0


class DeidentifyError(ValueError):
    """A problem with the arguments of a run (not with one series)."""


class FaceNotFoundError(ValueError):
    """Facial soft tissue lies in front of the skeleton but no face could be located:
    the series is not written (it might hold a face that nothing removed)."""


@dataclass
class DeidOptions:
    """Options of a de-identification run.

    ``method``: how the face region is found — ``auto`` (best available),
    ``anatomical`` (no trained model), ``model`` (YOLOv8 detector, needs
    ``weights`` or the bundled model) or ``none`` (header only, face kept).
    ``dates``: ``shift`` (per-patient offset, keeps intervals) or ``remove``.
    """

    project_secret: str
    method: str = "auto"
    weights: Path | None = None
    class_map: Path | None = None
    dates: str = "shift"
    pseudonym_prefix: str = "SUBJ"
    workers: int = 1
    qa_pictures: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DeidentifyError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dates not in DATE_MODES:
            raise DeidentifyError(f"unknown dates mode {self.dates!r}; choose shift or remove")
        if not self.project_secret:
            raise DeidentifyError("a project secret is required for consistent UIDs")
        if self.workers < 1:
            raise DeidentifyError("--workers must be at least 1")


@dataclass
class SeriesOutcome:
    """What happened to one input series. Contains no identifier."""

    index: int
    n_files: int
    status: str  # "written" | "failed"
    pseudonym: str | None = None
    output: str | None = None  # relative to output_dir
    slices: int = 0
    method: str | None = None
    removed_ml: float | None = None
    bone_dice: float | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    face_found: bool | None = None
    qa_picture: str | None = None  # relative to output_dir; shows the original face
    qa: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Result of :func:`deidentify_folder`."""

    series: list[SeriesOutcome]
    skipped_files: list[dict[str, str]]  # {"reason": ...}; paths only in the mapping file
    summary_path: Path

    @property
    def ok(self) -> bool:
        """True when every series was written and no DICOM data was lost."""
        return all(s.status == "written" for s in self.series) and not any(
            f.get("lost_data") for f in self.skipped_files
        )

    @property
    def failures(self) -> list[SeriesOutcome]:
        return [s for s in self.series if s.status != "written"]


# ---------------------------------------------------------------- pseudonyms


class PseudonymRegistry:
    """Stable pseudonyms: HMAC(patient key) → ``PREFIX-0001``.

    Stored as JSON ``{"<hmac hex>": "SUBJ-0001"}``; the HMAC is keyed with the
    project secret, so the file holds no identifier. Keep it outside the output.
    """

    def __init__(self, path: Path | None, prefix: str = "SUBJ") -> None:
        self.path = path
        self.prefix = prefix
        self._map: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                self._map = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DeidentifyError(f"pseudonym registry is unreadable: {exc.__class__.__name__}") from None

    def get(self, key: str) -> str:
        """Return the pseudonym of a patient key, allocating the next free one."""
        if key not in self._map:
            used = {v for v in self._map.values() if v.startswith(self.prefix + "-")}
            n = len(used) + 1
            while f"{self.prefix}-{n:04d}" in used:
                n += 1
            self._map[key] = f"{self.prefix}-{n:04d}"
        return self._map[key]

    def save(self) -> None:
        if self.path is None:
            return
        atomic_write_text(self.path, json.dumps(self._map, indent=1, sort_keys=True))


def _patient_identity(first_file: Path) -> dict[str, str]:
    """PatientID/PatientName/BirthDate of a series (for pseudonymisation only)."""
    ds = pydicom.dcmread(
        first_file,
        stop_before_pixels=True,
        specific_tags=["PatientID", "PatientName", "PatientBirthDate", "SeriesNumber"],
    )
    return {
        "PatientID": str(ds.get("PatientID", "") or ""),
        "PatientName": str(ds.get("PatientName", "") or ""),
        "PatientBirthDate": str(ds.get("PatientBirthDate", "") or ""),
        "SeriesNumber": str(ds.get("SeriesNumber", "") or ""),
    }


# ---------------------------------------------------------------- face methods


def make_face_method(
    method: str, weights: Path | None = None, class_map: Path | None = None
) -> tuple[Any | None, list[str]]:
    """Return ``(FaceRegionMethod or None, warnings)`` for a method name.

    ``none`` returns ``None`` (header-only). ``auto`` uses the detector when a
    model is available and falls back to the anatomical method otherwise.
    """
    # loaded on first use: pulls in scipy
    from pipeline import deface

    if method == "none":
        return None, []
    if method == "anatomical":
        return deface.AnatomicalFaceRegion(), []
    try:  # the detector needs onnxruntime (or ultralytics for .pt weights)
        # loaded on first use: pulls in scipy
        from pipeline.face_model import make_model_method as model_factory
    except ImportError:
        model_factory = None
    if method == "model":
        if model_factory is None:
            raise DeidentifyError(
                "the detector method is not available in this installation; use --method anatomical"
            )
        return model_factory(weights, class_map=class_map), []
    # auto
    if model_factory is not None:
        try:
            return model_factory(weights, auto=True, class_map=class_map), []
        except (OSError, ValueError) as exc:
            return deface.AnatomicalFaceRegion(), [f"detector unavailable ({exc}); used anatomical method"]
    return deface.AnatomicalFaceRegion(), []


# ---------------------------------------------------------------- one series


@dataclass
class SeriesDeid:
    """Result of :func:`deidentify_series` (no identifier anywhere).

    ``method``: the region method that ran (or ``none``); ``face_removed``: the
    face was found and removed (the header says so with code 113102);
    ``qa``: :class:`pipeline.deface.DefaceQA` as a dict (empty for ``none``);
    ``warnings``; ``slices``: number written; ``volume`` / ``hu``: the input
    volume and the de-identified HU (for QA pictures); ``defaced``: the
    :class:`pipeline.deface.DefaceResult` or None.
    """

    method: str
    face_removed: bool
    qa: dict[str, Any]
    warnings: list[str]
    slices: int
    volume: Any = field(repr=False, default=None)
    hu: Any = field(repr=False, default=None)
    defaced: Any = field(repr=False, default=None)

    @property
    def removed_ml(self) -> float | None:
        return _round(self.qa.get("removed_ml")) if self.qa else None

    @property
    def bone_dice(self) -> float | None:
        return _round(self.qa.get("bone_dice"), 5) if self.qa else None


def deidentify_series(
    loaded: Any, out_dir: Path, *, method: Any, method_warnings: list[str] | None = None,
    project_secret: str, pseudonym: str, date_offset_days: int, dates: str = "shift",
    qa_picture: Path | None = None, headers_ahead: HeadersAhead | None = None,
) -> SeriesDeid:
    """De-identify one loaded series (face + PS3.15 header) into ``out_dir``, atomically.

    The one path for the command line, the web stage and the benchmarks:

    * ``method`` (a :class:`pipeline.deface.FaceRegionMethod`, or None for the
      header-only ``none``) runs :func:`pipeline.deface.deface`;
    * **no face, no change**: when there is no facial soft tissue (bare skull,
      phantom, brain-only field of view) the pixels are written unchanged, the
      QA says "no face found" with the reason and the header does not claim
      113102 "clean recognizable visual features";
    * when soft tissue stands in front of the skeleton but no face could be
      located, nothing is written (:class:`FaceNotFoundError`);
    * Enhanced (multi-frame) CT is written as classic single-frame slices;
    * ``dates``: ``shift`` by ``date_offset_days`` or ``remove``;
    * the series is written to a temporary folder and renamed
      (:func:`pipeline.dicom_io.write_datasets`), slice for slice in the input's
      geometry; ``qa_picture``: also write the QA picture there (PNG).

    While the face is removed, a child process reads the files again, de-identifies
    their headers (stamped 113102, the usual outcome) and encodes them
    (:class:`HeadersAhead`; started before the series was loaded when the caller
    passes ``headers_ahead``); the files are then written from those prefixes and
    the defaced pixels by two threads while a third draws the QA picture (two
    cores). When that cannot be used (no face removed, multi-frame input, an
    unusual dataset, no child process) the headers are de-identified here and
    written with :func:`pipeline.dicom_io.write_datasets`: the files are the same
    byte for byte.
    Raises ``ValueError`` subclasses (without identifiers) for unusable input.
    """
    volume = loaded.volume
    warnings = list(method_warnings or [])
    qa: dict[str, Any] = {}
    result = None
    face_removed = False
    hu = volume.hu
    name = "none"
    deid = HeaderDeidentifier(project_secret, dates=dates)
    datasets = _single_frame_datasets(loaded)

    def headers() -> None:
        for ds in datasets:
            deid.deidentify(ds, pseudonym=pseudonym, date_offset_days=date_offset_days,
                            face_removed=False)

    early = headers_ahead
    if early is None and method is not None:
        early = HeadersAhead.start(loaded.files, project_secret=project_secret, dates=dates,
                                   pseudonym=pseudonym, date_offset_days=date_offset_days)
    encoded = None
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            header_job = pool.submit(headers) if early is None else None
            if method is not None:
                # loaded on first use: pulls in scipy
                from pipeline.deface import deface

                result = deface(volume, method)
            if header_job is not None:
                header_job.result()
        if result is not None:
            qa = {k: v for k, v in result.qa.as_dict().items() if _jsonable(v)}
            name = str(qa.get("method", getattr(method, "name", "")))
            warnings += [w for w in qa.get("warnings", []) if w not in warnings]
            env = result.region.envelope
            if not result.qa.face_found and env is not None and env.doubtful:
                raise FaceNotFoundError(
                    f"face not removed ({result.qa.no_face_reason}); nothing written — check the "
                    "series, or use --method none to de-identify the header only")
            face_removed = bool(result.qa.face_found and result.qa.removed_voxels > 0)
            hu = result.hu
        if early is not None and face_removed and datasets is loaded.datasets:
            encoded = early.result(loaded.files)
    finally:
        if early is not None:
            early.cancel()
    if early is not None and encoded is None:
        headers()  # not done here yet: the child did them (with a 113102 stamp)
    res = SeriesDeid(method=name, face_removed=face_removed, qa=qa, warnings=warnings,
                     slices=len(datasets), volume=volume, hu=hu, defaced=result)
    with ThreadPoolExecutor(max_workers=1) as pool:
        picture = pool.submit(write_qa_picture, res, qa_picture) if qa_picture else None
        if encoded is not None:
            dicom_io.write_prefixed([p for p, _ in encoded], [f for _, f in encoded], hu, out_dir,
                                    threads=WRITE_PROCESSES)
        else:
            if face_removed:
                for ds in datasets:
                    deid.stamp(ds, face_removed=True)
            dicom_io.write_datasets(datasets, out_dir, pixels_hu=hu, processes=WRITE_PROCESSES)
        if picture is not None:
            picture.result()
    return res


class HeadersAhead:
    """The de-identified headers of a series' files, encoded in a child process
    (:func:`pipeline.dicom_io.encode_files`) while this one loads and defaces it.

    The child reads the files itself, so it can start before the series is loaded
    (a fork of a small process: few copy-on-write faults for this one, see
    :class:`pipeline.forked.ForkedCall`). Headers are stamped as a series whose face
    was removed (code 113102).
    """

    def __init__(self, call: ForkedCall, files: list[Path]) -> None:
        self._call = call
        self._index = {Path(f): i for i, f in enumerate(files)}

    @classmethod
    def start(cls, files: Sequence[Path], *, project_secret: str, dates: str, pseudonym: str,
              date_offset_days: int) -> HeadersAhead | None:
        """Start encoding ``files`` (one slice each); None when no child can be started."""
        files = [Path(f) for f in files]
        if len(set(files)) != len(files):
            return None  # multi-frame input: the slices are not the files
        call = ForkedCall.start(_encode_files, files, project_secret, dates, pseudonym,
                                date_offset_days)
        return None if call is None else cls(call, files)

    def result(self, files: Sequence[Path]) -> list[tuple[bytes, dicom_io.PixelFormat]] | None:
        """The encoded headers in the order of ``files`` (the loaded slices); None when the
        child failed, is still not done after a generous wait (≈ 30× its usual time: a
        stuck child must not stall the series) or a file is not one it encoded (the caller
        writes them itself)."""
        try:
            encoded = self._call.result(
                timeout_s=max(AHEAD_MIN_WAIT_S, 0.05 * len(self._index)))
        except ForkedCallError as exc:
            log.warning("encoding the headers ahead failed (%s); writing them here", exc)
            return None
        if encoded is None:
            return None
        try:
            return [encoded[self._index[Path(f)]] for f in files]
        except KeyError:
            return None

    def cancel(self) -> None:
        """Stop the child if it still runs."""
        self._call.cancel()


def _encode_files(files: list[Path], project_secret: str, dates: str, pseudonym: str,
                  date_offset_days: int) -> list[tuple[bytes, dicom_io.PixelFormat]] | None:
    """In the child: read, de-identify (stamped 113102) and encode ``files``."""
    deid = HeaderDeidentifier(project_secret, dates=dates)

    def prepare(ds: pydicom.Dataset) -> None:
        deid.deidentify(ds, pseudonym=pseudonym, date_offset_days=date_offset_days,
                        face_removed=True)

    return dicom_io.encode_files(files, prepare)


def write_qa_picture(series: SeriesDeid, path: Path) -> bool:
    """Write the QA picture of a de-identified series (PNG, atomically); False if none."""
    if series.defaced is None:
        return False
    # loaded on first use: pulls in scipy
    from pipeline.deface import qa_picture

    atomic_write_bytes(path, png_bytes(qa_picture(series.volume, series.defaced)))
    return True


@dataclass
class _SeriesJob:
    index: int
    ref: Any  # dicom_io.SeriesRef
    pseudonym: str
    date_offset_days: int
    out_dir: Path
    output_rel: str
    options: DeidOptions
    qa_path: Path | None = None
    qa_rel: str | None = None


def _process_series(job: _SeriesJob) -> SeriesOutcome:
    """Load, deface, de-identify and write one series, and its QA picture. Never raises."""
    outcome = SeriesOutcome(index=job.index, n_files=len(job.ref.files), status="failed",
                            pseudonym=job.pseudonym)
    ahead = None
    try:
        method, warnings = make_face_method(job.options.method, job.options.weights,
                                            job.options.class_map)
        if method is not None:  # the headers are encoded while the series loads
            ahead = HeadersAhead.start(job.ref.files, project_secret=job.options.project_secret,
                                       dates=job.options.dates, pseudonym=job.pseudonym,
                                       date_offset_days=job.date_offset_days)
        loaded = dicom_io.load_series(job.ref)
        res = deidentify_series(
            loaded, job.out_dir, method=method, method_warnings=warnings,
            project_secret=job.options.project_secret, pseudonym=job.pseudonym,
            date_offset_days=job.date_offset_days, dates=job.options.dates,
            qa_picture=job.qa_path, headers_ahead=ahead)
        outcome.status = "written"
        outcome.output = job.output_rel
        outcome.slices = res.slices
        outcome.method = res.method
        outcome.removed_ml = res.removed_ml
        outcome.bone_dice = res.bone_dice
        outcome.warnings = res.warnings
        outcome.qa = res.qa
        outcome.face_found = bool(res.qa.get("face_found", False)) if res.qa else None
        if job.qa_path is not None and res.defaced is None:
            job.qa_path.unlink(missing_ok=True)  # header only: no picture (nor an old one)
        elif job.qa_path is not None:
            outcome.qa_picture = job.qa_rel
    except (ValueError, OSError, pydicom.errors.InvalidDicomError) as exc:
        outcome.error = _safe_message(exc)
    except Exception as exc:  # noqa: BLE001 — one bad series must not stop the others
        # No traceback: exception texts from deep inside libraries may carry input paths.
        log.error("unexpected %s in input series #%d", exc.__class__.__name__, job.index)
        outcome.error = f"internal error ({exc.__class__.__name__}); please report it"
    finally:
        if ahead is not None:
            ahead.cancel()
    return outcome


# Attributes of an Enhanced (multi-frame) CT header that do not carry over to
# classic single-frame slices: geometry and pixel description come from the Volume.
_MULTIFRAME_ONLY = {
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "NumberOfFrames",
    "PixelData", "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "DimensionIndexSequence",
    "DimensionOrganizationSequence", "FrameIncrementPointer", "ImageType", "ContentQualification",
}


def _single_frame_datasets(loaded: Any) -> list[pydicom.Dataset]:
    """One header per slice. Single-frame input: the loaded headers as they are.

    Enhanced (multi-frame) CT input is converted to classic CT Image Storage
    slices: geometry and pixel attributes from the volume
    (:func:`pipeline.dicom_io.volume_to_datasets`), the remaining top-level
    attributes (patient, study, series, equipment …) copied from the
    multi-frame header so that header de-identification treats them alike.
    SOPInstanceUIDs derive from the source instance and frame number, so re-runs
    are reproducible after UID hashing.
    """
    if all(n == 1 for n in loaded.frame_numbers) and len({id(d) for d in loaded.datasets}) == len(
        loaded.datasets
    ):
        return loaded.datasets
    classic = dicom_io.volume_to_datasets(loaded.volume)
    for ds, src, frame in zip(classic, loaded.datasets, loaded.frame_numbers):
        for elem in src:
            if elem.keyword in _MULTIFRAME_ONLY or elem.tag.group == 0x0002:
                continue
            ds[elem.tag] = copy.deepcopy(elem)
        for keyword in ("StudyDate", "StudyTime"):  # not today's, when the source has none
            if keyword not in src:
                setattr(ds, keyword, "")
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        # (pydicom's default root: with ``prefix=None`` the entropy would be ignored and
        # the UID random)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=[str(src.get("SOPInstanceUID", "")), str(frame)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return classic


def _safe_message(exc: BaseException) -> str:
    """:func:`pipeline.errors.safe_message` without the series prefix a
    :class:`~pipeline.dicom_io.SeriesError` carries (the caller names the series)."""
    return re.sub(r"^series \d+ \(\d+ files?\): ", "", safe_message(exc))


def _round(x: Any, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------- whole folder


def _check_paths(input_dir: Path, output_dir: Path, mapping_path: Path | None) -> None:
    if not input_dir.is_dir():
        raise DeidentifyError("the input folder does not exist or is not a folder")
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise DeidentifyError("the output folder must not lie inside the input folder")
    if out in inp.parents:
        raise DeidentifyError("the input folder must not lie inside the output folder")
    if mapping_path is not None:
        m = mapping_path.resolve()
        if m == out or out in m.parents:
            raise DeidentifyError("the mapping file must not be written inside the output folder")


def deidentify_folder(
    input_dir: Path,
    output_dir: Path,
    options: DeidOptions,
    *,
    mapping_path: Path | None = None,
    registry_path: Path | None = None,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> RunSummary:
    """De-identify every CT series below ``input_dir`` into ``output_dir``.

    Returns a :class:`RunSummary`; a failing series is reported in it (never
    raised), and leaves nothing in ``output_dir``. Raises :class:`DeidentifyError`
    for unusable arguments. ``progress(iterable, total)`` may wrap the per-series
    loop (e.g. tqdm).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_paths(input_dir, output_dir, mapping_path)
    try:  # fail fast on unusable detector weights or class maps, before any series
        make_face_method(options.method, options.weights, options.class_map)
    except ValueError as exc:
        raise DeidentifyError(str(exc)) from None
    output_dir.mkdir(parents=True, exist_ok=True)

    scan = dicom_io.scan_folder(input_dir)
    registry = PseudonymRegistry(registry_path, options.pseudonym_prefix)
    secret = options.project_secret

    jobs: list[_SeriesJob] = []
    mapping_rows: list[dict[str, Any]] = []
    per_patient_count: dict[str, int] = {}
    outcomes: list[SeriesOutcome] = []
    # Order by hashed series UID so labels are stable and leak nothing about order.
    refs = sorted(scan.series, key=lambda r: pseudonym_key(str(r.series_uid), secret))
    for ref in refs:
        index = ref.index
        try:
            ident = _patient_identity(ref.files[0])
        except Exception as exc:  # noqa: BLE001
            outcomes.append(SeriesOutcome(index=index, n_files=len(ref.files), status="failed",
                                          error=f"cannot read the header ({exc.__class__.__name__})"))
            mapping_rows.append({"input_series": index, "input_folder": _rel(ref.files[0].parent, input_dir),
                                 "error": outcomes[-1].error})
            continue
        patient = ident["PatientID"] or f"{ident['PatientName']}|{ident['PatientBirthDate']}"
        key = pseudonym_key(patient, secret)
        pseudonym = registry.get(key)
        per_patient_count[pseudonym] = per_patient_count.get(pseudonym, 0) + 1
        label = f"S{per_patient_count[pseudonym]:02d}"
        out_dir = output_dir / pseudonym / label
        qa_rel = f"{QA_DIR}/{pseudonym}-{label}.png"
        jobs.append(_SeriesJob(index, ref, pseudonym, date_offset_days_for(key, secret), out_dir,
                               f"{pseudonym}/{label}", options,
                               qa_path=output_dir / qa_rel if options.qa_pictures else None,
                               qa_rel=qa_rel))
        mapping_rows.append({
            "pseudonym": pseudonym, "output": f"{pseudonym}/{label}", "input_series": index,
            "input_folder": _rel(ref.files[0].parent, input_dir), "n_files": len(ref.files),
            "PatientID": ident["PatientID"], "PatientName": ident["PatientName"],
            "PatientBirthDate": ident["PatientBirthDate"],
            "date_offset_days": date_offset_days_for(key, secret) if options.dates == "shift" else None,
        })

    wrap = progress or (lambda it, total: it)
    if options.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(options.workers, len(jobs))) as pool:
            results = list(wrap(pool.map(_process_series, jobs), len(jobs)))
    else:
        results = [_process_series(j) for j in wrap(jobs, len(jobs))]
    outcomes.extend(results)
    outcomes.sort(key=lambda o: o.index)

    skipped = [
        {"reason": p.reason, "lost_data": bool(getattr(p, "lost_data", False))} for p in scan.problems
    ]
    registry.save()
    summary_path = output_dir / SUMMARY_NAME
    doc = {
        "tool": "deidstudy",
        "options": {"method": options.method, "dates": options.dates},
        "series": [asdict(o) for o in outcomes],
        "skipped_files": skipped,
        "n_written": sum(o.status == "written" for o in outcomes),
        "n_failed": sum(o.status != "written" for o in outcomes),
        "n_no_face": sum(o.status == "written" and o.face_found is False for o in outcomes),
    }
    if any(o.qa_picture for o in outcomes):
        doc["qa_pictures"] = (f"{QA_DIR}/ shows original faces beside the de-identified images: "
                              "keep it with the mapping file, do not share it with the data")
    atomic_write_text(summary_path, json.dumps(doc, indent=2))
    if mapping_path is not None:
        by_index = {o.index: o for o in outcomes}
        for row in mapping_rows:
            o = by_index.get(row["input_series"])
            if o is not None and o.status != "written":
                row["error"] = o.error
                row.pop("output", None)
        problems = [{"path": str(p.path), "reason": p.reason} for p in scan.problems]
        atomic_write_text(Path(mapping_path), json.dumps(
            {"series": mapping_rows, "skipped_files": problems}, indent=2, ensure_ascii=False))
    return RunSummary(series=outcomes, skipped_files=skipped, summary_path=summary_path)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
