"""Per-subject pipeline stages: thin adapters from database rows to :mod:`pipeline`.

The stage list :data:`STAGES` is data: each :class:`Stage` names a function
``fn(subject, ctx)`` that reads its ``inputs`` (subject folders, see
:func:`subject_folder`) below ``settings.DATA_DIR``, rebuilds the output folders it
owns and updates the database. Outputs are replaced as whole folders
(:func:`output_folders`: written into hidden temporary siblings, renamed over the
old folders when complete), so a re-run leaves no file of an earlier run behind and
a killed run leaves the previous state; with a shared storage the replaced folders
are uploaded as the reference copy. Database rows are updated after the files are
in place. Adding a stage = appending to :data:`STAGES`.

Stages (per subject; folders below ``cohorts/cNNNNN/``):

``import``        load every original series (geometry validation), store shape
                  and spacing. Reads ``orig/<pseudonym>/``, writes no file;
``deidentify``    face removal (:func:`pipeline.deface.deface`) + PS3.15 header
                  de-identification. Reads ``orig``; owns ``deid/<pseudonym>/``
                  (one ``<Snn>/`` per series) and ``derived/<pseudonym>/deidentify/``
                  (windowed mid-slice PNGs, QA figure);
``surfaces``      skin surfaces of original and de-identified primary series,
                  bone-based canonical alignment, standardised renders. Reads
                  ``orig`` and ``deid``; owns ``derived/<pseudonym>/surfaces/``;
``embeddings``    dlib face embeddings and depth maps of the renders (gallery, control,
                  de-identified, and faces rebuilt on the de-identified skull by the
                  reconstruction attacks); when every subject
                  of the cohort has them, the cohort re-identification summary
                  (``derived/reid-cmc.png``). Reads ``derived/<pseudonym>/surfaces``.

Image conventions: slice PNGs are windowed linearly (default −1000..1000 HU);
axial panels show anterior up and patient left on the image right; sagittal
panels superior up and anterior left. No PNG carries text or header data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db.models import ProtectedError

from .models import RenderImage, Subject
from .shared import delete_file, ensure_local, push_tree

WINDOW_HU = (-1000.0, 1000.0)


class StageError(ValueError):
    """A stage could not run; the message is shown to researchers (no identifiers)."""


@dataclass
class StageContext:
    """Passed to stage functions: ``progress(fraction 0..1)`` updates the dashboard."""

    progress: Callable[[float], None]


@dataclass(frozen=True)
class Stage:
    """A named step; ``fn(subject, ctx)`` does the work; ``label`` is shown in the UI.

    ``inputs`` names the subject folders the stage reads (:func:`subject_folder`); with
    a shared storage they are mirrored from it before the stage runs.
    """

    name: str
    label: str
    fn: Callable[[Subject, StageContext], None]
    inputs: tuple[str, ...] = ()


# ------------------------------------------------------------------ helpers


def data_path(rel: str) -> Path:
    """Absolute path of a ``DATA_DIR``-relative path (refuses escaping it)."""
    root = Path(settings.DATA_DIR).resolve()
    p = (root / rel).resolve()
    if root != p and root not in p.parents:
        raise StageError("stored path lies outside the data folder")
    return p


def subject_folder(subject: Subject, name: str) -> str:
    """``DATA_DIR``-relative folder ``name`` of ``subject``: ``orig``, ``deid`` or
    ``derived/<stage>`` → ``cohorts/cNNNNN/<orig|deid|derived>/<pseudonym>[/<stage>]``."""
    part, _, sub = name.partition("/")
    if part not in ("orig", "deid", "derived") or (part == "derived") != bool(sub) \
            or "/" in sub or sub.startswith("."):
        raise ValueError(f"not a subject folder: {name!r}")
    rel = f"{subject.cohort.storage_dir()}/{part}/{subject.pseudonym}"
    return f"{rel}/{sub}" if sub else rel


def replace_dir(new: Path, dst: Path) -> None:
    """Put folder ``new`` in place of ``dst`` (which may not exist) and delete the old one.

    Two renames on one file system (``dst`` away, ``new`` in): readers see the old or
    the new folder, except for the instant between the renames; on an error the old
    folder is put back.
    """
    if not (dst.exists() or dst.is_symlink()):
        os.replace(new, dst)
        return
    old = dst.parent / f".{dst.name}.old-{secrets.token_hex(6)}"
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
def output_folders(subject: Subject, *names: str) -> Iterator[dict[str, Path]]:
    """Rebuild the subject folders ``names`` (see :func:`subject_folder`) as a whole.

    Yields ``{name: temporary folder}`` to write into (hidden siblings of the final
    folders). When the block completes, each temporary folder replaces its folder
    (:func:`replace_dir`) and, with a shared storage, the folder is uploaded as the
    reference copy (:func:`surveys.shared.push_tree`: remote files it no longer holds
    are deleted). On an error the temporary folders are deleted and the old outputs
    stay. Leftovers of a killed earlier run are deleted first.
    """
    finals = {n: data_path(subject_folder(subject, n)) for n in names}
    tmps: dict[str, Path] = {}
    try:
        for n, final in finals.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            for left in (*final.parent.glob(f".{final.name}.tmp-*"),
                         *final.parent.glob(f".{final.name}.old-*")):
                shutil.rmtree(left, ignore_errors=True)
            tmps[n] = final.parent / f".{final.name}.tmp-{secrets.token_hex(6)}"
            tmps[n].mkdir()
        yield dict(tmps)
        for n, final in finals.items():
            replace_dir(tmps[n], final)
        for n in names:
            push_tree(subject_folder(subject, n))
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 grey ``(H, W)`` or RGB ``(H, W, 3)`` image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def window(hu: np.ndarray, window_hu: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """Linear window of HU values to uint8 (``window_hu`` = (low, high) HU)."""
    lo, hi = window_hu
    x = (np.asarray(hu, np.float32) - lo) / (hi - lo)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mid_slices(hu: np.ndarray, spacing_mm: tuple[float, float, float],
               k: int | None = None, i: int | None = None) -> dict[str, np.ndarray]:
    """Windowed axial (slice ``k``) and sagittal (column ``i``) images of ``hu[k, j, i]``.

    Axial: rows j (anterior at the top), columns i (patient left on the right).
    Sagittal: flipped so superior is up, rows j become columns (anterior on the
    left), resampled along k to square pixels using ``spacing_mm`` (dk, dj, di).
    """
    nk, _, ni = hu.shape
    k = nk // 2 if k is None else k
    i = ni // 2 if i is None else i
    axial = window(hu[k])
    sag = window(hu[::-1, :, i])  # rows: superior → inferior, cols: anterior → posterior
    dk, dj, _ = spacing_mm
    rows = max(1, round(nk * dk / dj))
    idx = np.clip((np.arange(rows) * nk / rows).astype(int), 0, nk - 1)
    return {"axial": axial, "sagittal": sag[idx]}


@dataclass(frozen=True)
class MadeImage:
    """A PNG written by a stage into its output folder, recorded by :func:`record_images`."""

    kind: str
    variant: str
    view: str
    rel: str  # final DATA_DIR-relative path


def _write_image(subject: Subject, folder: str, out: Path, kind: str, variant: str, view: str,
                 image: np.ndarray) -> MadeImage:
    """Write ``image`` into the temporary output folder ``out`` of subject folder ``folder``."""
    name = f"{kind}-{view}-{variant}.png"
    (out / name).write_bytes(png_bytes(image))
    return MadeImage(kind, variant, view, f"{subject_folder(subject, folder)}/{name}")


def record_images(subject: Subject, kinds: tuple[str, ...], made: list[MadeImage]) -> None:
    """Make the subject's :class:`RenderImage` rows of ``kinds`` describe exactly ``made``.

    Rows are created or pointed at the new files; rows of images no longer made are
    deleted (unless a study's trial refers to one: kept, the study shows its frozen
    copy), and a file an updated or deleted row pointed to outside the new output
    folders (layout of an earlier version) is deleted locally and remotely.
    """
    before = {(r.kind, r.view, r.variant): r for r in subject.images.filter(kind__in=kinds)}
    new_paths = {m.rel for m in made}
    old_paths = {r.path for r in before.values()}
    for m in made:
        RenderImage.objects.update_or_create(subject=subject, kind=m.kind, view=m.view,
                                             variant=m.variant, defaults={"path": m.rel})
    kept = {(m.kind, m.view, m.variant) for m in made}
    for key, row in before.items():
        if key not in kept:
            try:
                row.delete()
            except ProtectedError:
                new_paths.add(row.path)  # a trial needs it: keep the row and its file
    folders = {m.rel.rsplit("/", 1)[0] + "/" for m in made}
    for rel in sorted(old_paths - new_paths):
        if not any(rel.startswith(f) for f in folders):  # else gone with the old folder
            delete_file(rel)


def _series_ref(folder: Path):
    from pipeline import dicom_io

    scan = dicom_io.scan_folder(folder)
    if len(scan.series) != 1 or scan.problems:
        raise StageError("stored series folder does not hold exactly one readable series")
    return scan.series[0]


def load_stored(rel_dir: str):
    """Load a stored series (``DATA_DIR``-relative folder) with :func:`pipeline.dicom_io.load_series`."""
    from pipeline import dicom_io

    return dicom_io.load_series(_series_ref(data_path(rel_dir)))


# ------------------------------------------------------------------ stages


def stage_import(subject: Subject, ctx: StageContext) -> None:
    """Validate every original series and make windowed slice PNGs of the primary one."""
    series = list(subject.series.all())
    if not series:
        raise StageError("subject has no series")
    for n, s in enumerate(series, start=1):
        loaded = load_stored(s.original_dir)
        vol = loaded.volume
        s.n_slices = int(vol.hu.shape[0])
        s.shape = [int(x) for x in vol.hu.shape]
        s.spacing_mm = [round(float(x), 4) for x in vol.spacing_mm]
        s.save(update_fields=["n_slices", "shape", "spacing_mm"])
        ctx.progress(n / len(series))


def stage_deidentify(subject: Subject, ctx: StageContext) -> None:
    """Face + header de-identification of every series; QA figures and PNGs."""
    from pipeline.deid_header import date_offset_days_for
    from pipeline.deidentify import make_face_method

    secret = settings.PROJECT_SECRET
    method, method_warnings = make_face_method(settings.PIPELINE_FACE_METHOD)
    offset = date_offset_days_for(subject.patient_key, secret)
    series = list(subject.series.all())
    primary = subject.primary_series()
    made: list[MadeImage] = []
    with output_folders(subject, "deid", "derived/deidentify") as out:
        for n, s in enumerate(series, start=1):
            _deidentify_series(subject, s, primary, method, method_warnings, offset, out, made)
            ctx.progress(n / len(series))
    fields = ["method", "removed_ml", "bone_dice", "warnings", "qa", "deid_dir"]
    for s in series:  # the files are in place: the rows may describe them now
        s.deid_dir = f"{subject_folder(subject, 'deid')}/{s.label}"
        s.save(update_fields=fields)
    record_images(subject, ("slice", "qa"), made)


def _deidentify_series(subject: Subject, s, primary, method, method_warnings: list[str],
                       offset: int, out: dict[str, Path], made: list[MadeImage]) -> None:
    """De-identify series ``s`` into ``out["deid"]/<label>`` with the pipeline's one series
    path (:func:`pipeline.deidentify.deidentify_series`); slice PNGs and the QA picture of
    the primary series into ``out["derived/deidentify"]``. Sets the QA fields of ``s``
    (not saved)."""
    from pipeline.deface import qa_picture
    from pipeline.deidentify import FaceNotFoundError, deidentify_series

    loaded = load_stored(s.original_dir)
    try:
        res = deidentify_series(
            loaded, out["deid"] / s.label, method=method, method_warnings=method_warnings,
            project_secret=settings.PROJECT_SECRET, pseudonym=subject.pseudonym,
            date_offset_days=offset, dates="shift")
    except FaceNotFoundError as exc:
        raise StageError(str(exc)) from None
    s.method = res.method
    s.removed_ml = res.removed_ml
    s.bone_dice = res.bone_dice
    s.warnings = res.warnings
    s.qa = json.loads(json.dumps(res.qa, default=_json_default))
    if primary is not None and s.pk == primary.pk:
        folder, dst = "derived/deidentify", out["derived/deidentify"]
        # irregular slice spacing: both copies on the same regular grid for the mid slices
        vol = res.volume.as_uniform()
        new = res.volume.with_hu(res.hu).as_uniform().hu
        sp = tuple(float(x) for x in vol.spacing_mm)
        for variant, arr in (("original", vol.hu), ("deid", new)):
            for view, img in mid_slices(arr, sp, i=_face_column(vol.hu)).items():
                made.append(_write_image(subject, folder, dst, "slice", variant, view, img))
        if res.defaced is not None:
            made.append(_write_image(subject, folder, dst, "qa", "both", "deface",
                                     qa_picture(res.volume, res.defaced)))


def _face_column(hu: np.ndarray) -> int:
    """Mid-sagittal column: centre of the columns that hold tissue (> −300 HU)."""
    cols = np.flatnonzero((hu > -300).any(axis=(0, 1)))
    return int((cols[0] + cols[-1]) // 2) if cols.size else hu.shape[2] // 2


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


RENDER_YAWS = (0.0, 30.0)


def stage_surfaces(subject: Subject, ctx: StageContext) -> None:
    """Skin surfaces of original and de-identified primary series, aligned and rendered.

    Uses :func:`pipeline.render.render_subject`: the canonical alignment comes from
    the original's bone and is shared with the de-identified copy (same geometry),
    so the two renders differ only by the removed soft tissue.
    """
    from pipeline import render  # first: sets the OpenGL platform before pyrender loads

    s = subject.primary_series()
    if s is None or not s.deid_dir:
        raise StageError("the de-identified series is missing; run de-identification first")
    orig = load_stored(s.original_dir).volume
    ctx.progress(0.1)
    deid = load_stored(s.deid_dir).volume
    ctx.progress(0.2)
    result = render.render_subject(orig, deid, yaw_degs=RENDER_YAWS,
                                   backend=settings.PIPELINE_RENDER_BACKEND)
    ctx.progress(0.9)
    made: list[MadeImage] = []
    with output_folders(subject, "derived/surfaces") as out:
        for variant, views in (("original", result.original),
                               ("deid", result.deidentified or [])):
            for v in views:
                made.append(_write_image(subject, "derived/surfaces", out["derived/surfaces"],
                                         "render", variant, f"yaw{v.yaw_deg:+.0f}", v.image))
    record_images(subject, ("render",), made)


def stage_embeddings(subject: Subject, ctx: StageContext) -> None:
    """Re-identification features of the primary series (:mod:`pipeline.reid_features`:
    re-scanned gallery, original and de-identified probes, the reconstruction attacks of
    ``settings.PIPELINE_REID_ATTACKS`` on the de-identified scan, dlib descriptors and depth
    maps); the cohort summary is recomputed when every subject has them."""
    from pipeline import render  # noqa: F401 — first: sets the OpenGL platform
    from pipeline.reid_features import features_to_json, subject_features
    from pipeline.rescan import volume_seed

    s = subject.primary_series()
    if s is None or not s.deid_dir:
        raise StageError("the de-identified series is missing; run de-identification first")
    orig = load_stored(s.original_dir).volume
    deid = load_stored(s.deid_dir).volume
    ctx.progress(0.2)
    f = subject_features(orig, deid, label=subject.pseudonym, seed=volume_seed(orig),
                         backend=settings.PIPELINE_RENDER_BACKEND,
                         attacks=settings.PIPELINE_REID_ATTACKS)
    ctx.progress(0.8)
    subject.reid_features = features_to_json(f)
    subject.embedding_original = [float(x) for x in f.fused_embedding("control")]
    subject.embedding_deid = [float(x) for x in f.fused_embedding("deidentified")]
    subject.embedding_detected = {"original": bool(f.detected["control"].any()),
                                  "deid": bool(f.detected["deidentified"].any())}
    subject.save(update_fields=["reid_features", "embedding_original", "embedding_deid",
                                "embedding_detected"])
    from .reid import update_cohort_reid

    update_cohort_reid(subject.cohort)


STAGES: tuple[Stage, ...] = (
    Stage("import", "Import", stage_import, inputs=("orig",)),
    Stage("deidentify", "De-identification", stage_deidentify, inputs=("orig",)),
    Stage("surfaces", "Surfaces & renders", stage_surfaces, inputs=("orig", "deid")),
    Stage("embeddings", "Embeddings", stage_embeddings, inputs=("orig", "deid")),
)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def remove_subject_outputs(subject: Subject) -> None:
    """Delete the derived and de-identified folders of a subject (not the originals)."""
    for part in ("deid", "derived"):
        d = data_path(f"{subject.cohort.storage_dir()}/{part}/{subject.pseudonym}")
        shutil.rmtree(d, ignore_errors=True)
