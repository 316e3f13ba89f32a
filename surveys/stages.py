"""Per-subject pipeline stages: thin adapters from database rows to :mod:`pipeline`.

The stage list :data:`STAGES` is data: each :class:`Stage` names a function
``fn(subject, ctx)`` that reads its inputs from ``settings.DATA_DIR``, writes its
outputs atomically (a temporary sibling renamed over the old output, so a
re-run replaces them and a killed run leaves the previous state) and updates
the database. Adding a stage = appending to :data:`STAGES`.

Stages (per subject):

``import``        load every original series (geometry validation), store shape
                  and spacing, windowed mid-slice PNGs of the originals;
``deidentify``    face removal (:func:`pipeline.deface.deface`) + PS3.15 header
                  de-identification → ``deid/<pseudonym>/<Snn>/``; QA figures;
``surfaces``      skin surfaces of original and de-identified primary series,
                  bone-based canonical alignment, standardised renders (PNGs);
``embeddings``    dlib face embeddings of the frontal renders; when every subject
                  of the cohort has them, the cohort re-identification summary.

Image conventions: slice PNGs are windowed linearly (default −1000..1000 HU);
axial panels show anterior up and patient left on the image right; sagittal
panels superior up and anterior left. No PNG carries text or header data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from .models import RenderImage, Subject

WINDOW_HU = (-1000.0, 1000.0)


class StageError(ValueError):
    """A stage could not run; the message is shown to researchers (no identifiers)."""


@dataclass
class StageContext:
    """Passed to stage functions: ``progress(fraction 0..1)`` updates the dashboard."""

    progress: Callable[[float], None]


@dataclass(frozen=True)
class Stage:
    """A named step; ``fn(subject, ctx)`` does the work; ``label`` is shown in the UI."""

    name: str
    label: str
    fn: Callable[[Subject, StageContext], None]


# ------------------------------------------------------------------ helpers


def data_path(rel: str) -> Path:
    """Absolute path of a ``DATA_DIR``-relative path (refuses escaping it)."""
    root = Path(settings.DATA_DIR).resolve()
    p = (root / rel).resolve()
    if root != p and root not in p.parents:
        raise StageError("stored path lies outside the data folder")
    return p


def derived_rel(subject: Subject, name: str) -> str:
    """``DATA_DIR``-relative path of a derived file of ``subject`` (pseudonym-named)."""
    return f"{subject.cohort.storage_dir()}/derived/{subject.pseudonym}/{name}"


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


def _save_image(subject: Subject, kind: str, variant: str, view: str, image: np.ndarray) -> None:
    rel = derived_rel(subject, f"{kind}-{view}-{variant}.png")
    atomic_write_bytes(data_path(rel), png_bytes(image))
    RenderImage.objects.update_or_create(subject=subject, kind=kind, view=view, variant=variant,
                                         defaults={"path": rel})


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
    from pipeline import dicom_io
    from pipeline.deface import deface, qa_image
    from pipeline.deid_header import HeaderDeidentifier, date_offset_days_for
    from pipeline.deidentify import make_face_method

    secret = settings.PROJECT_SECRET
    method, method_warnings = make_face_method(settings.PIPELINE_FACE_METHOD)
    offset = date_offset_days_for(subject.patient_key, secret)
    series = list(subject.series.all())
    primary = subject.primary_series()
    for n, s in enumerate(series, start=1):
        loaded = load_stored(s.original_dir)
        vol = loaded.volume
        if method is not None:
            result = deface(vol, method)
            hu = result.hu
            qa = result.qa.as_dict()
            s.method = qa["method"]
            s.removed_ml = round(float(qa["removed_ml"]), 3)
            s.bone_dice = round(float(qa["bone_dice"]), 5)
            s.warnings = list(method_warnings) + list(qa.get("warnings", []))
            s.qa = json.loads(json.dumps(qa, default=_json_default))
        else:
            hu, result = vol.hu, None
            s.method, s.removed_ml, s.bone_dice, s.warnings, s.qa = "none", None, None, [], {}
        deid = HeaderDeidentifier(secret, dates="shift")
        for k, ds in enumerate(loaded.datasets):
            dicom_io.set_pixel_hu(ds, hu[k])
            deid.deidentify(ds, pseudonym=subject.pseudonym, date_offset_days=offset,
                            face_removed=method is not None)
        rel = f"{subject.cohort.storage_dir()}/deid/{subject.pseudonym}/{s.label}"
        dicom_io.write_datasets(loaded.datasets, data_path(rel))  # atomic replace
        s.deid_dir = rel
        s.save(update_fields=["method", "removed_ml", "bone_dice", "warnings", "qa", "deid_dir"])
        if primary is not None and s.pk == primary.pk:
            sp = tuple(float(x) for x in vol.spacing_mm)
            for variant, arr in (("original", vol.hu), ("deid", hu)):
                for view, img in mid_slices(arr, sp, i=_face_column(vol.hu)).items():
                    _save_image(subject, "slice", variant, view, img)
            if result is not None:
                _save_image(subject, "qa", "both", "deface", qa_image(vol, result))
        ctx.progress(n / len(series))


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
    for variant, views in (("original", result.original), ("deid", result.deidentified or [])):
        for v in views:
            _save_image(subject, "render", variant, f"yaw{v.yaw_deg:+.0f}", v.image)


def stage_embeddings(subject: Subject, ctx: StageContext) -> None:
    """Face embeddings of the frontal renders; cohort re-id summary when all are in."""
    from PIL import Image

    from pipeline import render
    from pipeline.embed import embed_face

    box = render.canonical_face_box(0.0, render.RenderSettings())
    out: dict[str, Any] = {}
    detected: dict[str, bool] = {}
    for variant in ("original", "deid"):
        img = subject.images.filter(kind="render", variant=variant, view="yaw+0").first()
        if img is None:
            raise StageError("the frontal render is missing; run the surfaces stage first")
        arr = np.asarray(Image.open(data_path(img.path)).convert("L"))
        emb = embed_face(arr, fallback_box=box)
        out[variant] = [float(x) for x in emb.vector]
        detected[variant] = bool(emb.detected)
    subject.embedding_original = out["original"]
    subject.embedding_deid = out["deid"]
    subject.embedding_detected = detected
    subject.save(update_fields=["embedding_original", "embedding_deid", "embedding_detected"])
    ctx.progress(0.8)
    from .reid import update_cohort_reid

    update_cohort_reid(subject.cohort)


STAGES: tuple[Stage, ...] = (
    Stage("import", "Import", stage_import),
    Stage("deidentify", "De-identification", stage_deidentify),
    Stage("surfaces", "Surfaces & renders", stage_surfaces),
    Stage("embeddings", "Embeddings", stage_embeddings),
)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def remove_subject_outputs(subject: Subject) -> None:
    """Delete the derived and de-identified folders of a subject (not the originals)."""
    for part in ("deid", "derived"):
        d = data_path(f"{subject.cohort.storage_dir()}/{part}/{subject.pseudonym}")
        shutil.rmtree(d, ignore_errors=True)
