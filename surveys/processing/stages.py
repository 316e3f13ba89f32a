"""Per-subject pipeline stages: thin adapters from database rows to :mod:`pipeline`.

The stage list :data:`STAGES` is data: each :class:`Stage` names a function
``fn(subject, ctx)`` that reads its ``inputs`` (subject folders, see
:func:`subject_folder`) below ``settings.DATA_DIR``, rebuilds the output folders it
owns and updates the database. Outputs are replaced as whole folders
(:func:`surveys.storage.atomic.output_folders`: written into hidden temporary siblings, renamed over the
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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db.models import ProtectedError

from pipeline.deid_header import date_offset_days_for
from pipeline.deidentify import (
    FaceNotFoundError,
    HeadersAhead,
    deidentify_series,
    make_face_method,
)
from pipeline.dicom_io import load_series
from pipeline.preview import mid_slices, png_bytes

from ..models import RenderImage, Subject
from ..storage.atomic import output_folders
from ..storage.mirror import delete_file
from ..storage.paths import cohort_part, data_path, subject_folder
from ..storage.series import load_stored, stored_series_ref
from .reid import update_cohort_reid


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
    # loaded on first use: pulls in scipy
    from pipeline.deface import qa_picture

    ref = stored_series_ref(data_path(s.original_dir))
    # the headers are encoded in a child while the series loads and the face is removed
    ahead = None if method is None else HeadersAhead.start(
        ref.files, project_secret=settings.PROJECT_SECRET, dates="shift",
        pseudonym=subject.pseudonym, date_offset_days=offset)
    try:
        res = deidentify_series(
            load_series(ref), out["deid"] / s.label, method=method,
            method_warnings=method_warnings, project_secret=settings.PROJECT_SECRET,
            pseudonym=subject.pseudonym, date_offset_days=offset, dates="shift",
            headers_ahead=ahead)
    except FaceNotFoundError as exc:
        raise StageError(str(exc)) from None
    finally:
        if ahead is not None:
            ahead.cancel()
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


def human_render_settings():
    """Renders people look at (raters, the subject page): ``settings.RENDER_SIZE_PX`` square
    (768 by default: large on a large screen) and a field of view that holds the whole
    head at 30° yaw (18° cut it off). The re-identification features render their own."""
    # loaded on first use: pulls in trimesh
    from pipeline import render

    px = int(getattr(settings, "RENDER_SIZE_PX", 768))
    return render.RenderSettings(width_px=px, height_px=px, yfov_deg=22.0)


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
                                   backend=settings.PIPELINE_RENDER_BACKEND,
                                   settings=human_render_settings())
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
    # loaded on first use: pulls in trimesh
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
        d = data_path(cohort_part(subject.cohort_id, part, subject.pseudonym))
        shutil.rmtree(d, ignore_errors=True)
