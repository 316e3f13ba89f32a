"""A deterministic head phantom, processed as if by the pipeline, for the viewer tests.

The viewers' screenshots are compared against stored references, so the data must not
change when the de-identification algorithm improves: the phantom (skin, skull, brain,
eyes, nose, ears, mandible) and its "de-identified" copy (soft tissue in front of a
plane, outside the skull, set to air) are made here, written as DICOM where the
pipeline keeps its series, and recorded as a subject whose stages are done.

``make_subject`` is used in-process by the unit tests; ``python -m tests.viewer_fixture
--var DIR`` (or :func:`build_site`) sets up a whole site for the browser tests and the
benchmark.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

#: (slices, rows, columns) and spacing (mm) of the default phantom.
SHAPE = (60, 100, 100)
SPACING = (3.0, 2.2, 2.2)


@dataclass
class Phantom:
    original: np.ndarray  # int16 [k, j, i]
    deidentified: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: np.ndarray
    slice_positions_lps_mm: np.ndarray | None = None


def head_phantom(shape=SHAPE, spacing=SPACING, *, seed: int = 5, tilt_deg: float = 0.0,
                 irregular: bool = False) -> Phantom:
    """Head phantom in HU with its de-identified copy (same geometry).

    ``tilt_deg`` shears the stack (gantry tilt: slice k is shifted along y by
    ``z·tan(tilt)``); ``irregular`` makes the upper half of the slices twice as far apart.
    """
    nk, nj, ni = shape
    dk, dj, di = spacing
    rng = np.random.default_rng(seed)
    z_off = np.arange(nk) * dk
    if irregular:
        half = nk // 2
        z_off = np.concatenate([np.arange(half) * dk, (half - 1) * dk + np.arange(1, nk - half + 1)
                                * 2 * dk])
    z_off = z_off - z_off.mean()
    y0 = -(nj - 1) * dj / 2
    x0 = -(ni - 1) * di / 2
    shear = np.tan(np.deg2rad(tilt_deg))
    positions = np.column_stack([np.full(nk, x0), y0 + z_off * shear, z_off])
    original = np.empty(shape, np.int16)
    deid = np.empty(shape, np.int16)
    xs = (x0 + np.arange(ni) * di)[None, :]
    for k in range(nk):  # slice by slice: bounded memory for 512×512×300
        z = np.full((nj, ni), z_off[k])
        y = np.broadcast_to((y0 + np.arange(nj) * dj)[:, None] + z_off[k] * shear, (nj, ni))
        x = np.broadcast_to(xs, (nj, ni))

        def ell(cx, cy, cz, rx, ry, rz, x=x, y=y, z=z):
            return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

        hu = np.full((nj, ni), -1000.0, np.float32)
        hu[ell(0, 5, 0, 72, 92, 84)] = 30
        skull_out = ell(0, 8, 6, 64, 82, 74)
        skull_in = ell(0, 8, 8, 58, 76, 68)
        hu[skull_out & ~skull_in] = 900
        hu[skull_in] = 38
        for sx in (-30, 30):  # eyes (in front of the skull, behind the eyelids)
            hu[ell(sx, -72, 18, 12, 11, 11)] = 12
            hu[ell(sx, -72, 18, 5, 4, 4)] = 60
        hu[ell(0, -93, -2, 9, 14, 22)] = 35  # nose
        jaw = ell(0, -40, -52, 50, 45, 22) & ~ell(0, -30, -50, 42, 40, 16) & (z < -40)
        hu[jaw] = 1100
        for sx in (-76, 76):  # ears
            hu[ell(sx, 10, 5, 8, 14, 22)] = 25
        hu += rng.normal(0, 6, (nj, ni)).astype(np.float32)
        original[k] = np.rint(hu)
        # "de-identified": facial soft tissue in front of the skull set to air
        face = (y < -60) & (original[k] > -800) & (original[k] < 200) & ~skull_out \
            & (z > -60) & (z < 45)
        deid[k] = original[k]
        deid[k][face] = -1000
    return Phantom(original, deid, spacing, positions[0],
                   positions if (irregular or tilt_deg) else None)


def phantom_volume(ph: Phantom, which: str = "original"):
    from pipeline.volume import Volume

    hu = ph.original if which == "original" else ph.deidentified
    kw = {}
    if ph.slice_positions_lps_mm is not None:
        kw["slice_positions_lps_mm"] = ph.slice_positions_lps_mm
    return Volume(hu=hu, spacing_mm=ph.spacing_mm, origin_lps_mm=ph.origin_lps_mm, **kw)


def qa_png(ph: Phantom) -> bytes:
    """A QA-style picture of the phantom (axial slices, removed voxels in red)."""
    from pipeline.preview import png_bytes, window

    ks = np.linspace(ph.original.shape[0] * 0.3, ph.original.shape[0] * 0.7, 3).astype(int)
    rows = []
    for k in ks:
        g = window(ph.original[k], (-250, 350))
        rgb = np.stack([g, g, g], -1)
        rem = ph.original[k] != ph.deidentified[k]
        rgb[rem] = (0.5 * rgb[rem] + np.array([127, 0, 0])).astype(np.uint8)
        d = window(ph.deidentified[k], (-250, 350))
        rows.append(np.concatenate([rgb, np.stack([d, d, d], -1)], axis=1))
    return png_bytes(np.concatenate(rows, axis=0))


def make_subject(cohort, pseudonym: str, ph: Phantom, *, patient_id: str = "FAKE-ID",
                 qa: dict | None = None, label: str = "S01"):
    """A subject of ``cohort`` whose series is ``ph``: DICOM files where the pipeline keeps
    them, every stage done, QA figures and a QA picture. Returns the Subject."""
    from django.conf import settings
    from django.utils import timezone

    from pipeline import dicom_io
    from pipeline.atomic import atomic_write_bytes
    from pipeline.deid_header import pseudonym_key
    from surveys.models import RenderImage, Series, StageRun, Subject
    from surveys.processing.stages import STAGES
    from surveys.storage.paths import data_path

    subject = Subject.objects.create(cohort=cohort, pseudonym=pseudonym,
                                     patient_key=pseudonym_key(patient_id,
                                                               settings.PROJECT_SECRET))
    base = cohort.storage_dir()
    orig_rel = f"{base}/orig/{pseudonym}/{label}"
    deid_rel = f"{base}/deid/{pseudonym}/{label}"
    for rel, which in ((orig_rel, "original"), (deid_rel, "deid")):
        vol = phantom_volume(ph, which)
        meta = {"Modality": "CT", "SeriesDescription": "phantom"}
        dicom_io.write_datasets(dicom_io.volume_to_datasets(vol, series_meta=meta), data_path(rel))
    removed = ph.original != ph.deidentified
    ml = float(removed.sum()) * float(np.prod(ph.spacing_mm)) / 1000.0
    figures = {"face_found": True, "removed_ml": round(ml, 1), "inside_soft_changed_pct": 0.0,
               "outside_body_changed_ml": 0.0, "bone_dice": 1.0, "bone_dice_150": 1.0,
               "removed_ml_by_region": {"nose": round(ml * 0.3, 1), "other": round(ml * 0.7, 1)},
               "warnings": []}
    figures.update(qa or {})
    Series.objects.create(subject=subject, label=label, series_key=hashlib.sha256(
        f"{pseudonym}{label}".encode()).hexdigest(), n_files=ph.original.shape[0],
        n_slices=ph.original.shape[0], original_dir=orig_rel, deid_dir=deid_rel,
        spacing_mm=list(ph.spacing_mm), shape=list(ph.original.shape), method="anatomical",
        removed_ml=figures["removed_ml"], bone_dice=figures["bone_dice"],
        warnings=list(figures.get("warnings") or []), qa=figures)
    now = timezone.now()
    for order, st in enumerate(STAGES):
        StageRun.objects.create(subject=subject, stage=st.name, order=order, status="done",
                                attempts=1, progress=1.0, started=now, finished=now)
    rel = f"{base}/derived/{pseudonym}/deidentify/qa-deface-both.png"
    atomic_write_bytes(data_path(rel), qa_png(ph))
    RenderImage.objects.create(subject=subject, kind="qa", variant="both", view="deface", path=rel)
    return subject


def build_site(owner_name: str = "alice", n_subjects: int = 1, shape=SHAPE, spacing=SPACING,
               cohort_name: str = "Viewer cohort") -> tuple[int, list[str]]:
    """A cohort of ``owner_name`` with ``n_subjects`` phantom subjects (the first one the
    default phantom, the next ones with other seeds and removed volumes). Returns the
    cohort id and the pseudonyms."""
    from django.contrib.auth.models import User

    from surveys.models import Cohort

    owner = User.objects.get(username=owner_name)
    cohort = Cohort.objects.create(name=cohort_name, owner=owner)
    cohort.researchers.add(owner)
    names = []
    for n in range(n_subjects):
        ph = head_phantom(shape, spacing, seed=5 + n)
        if n:  # vary the removed region so the QA figures differ
            keep = np.zeros_like(ph.original, bool)
            keep[:, : 8 + 4 * n] = True
            ph.deidentified[keep] = ph.original[keep]
        qa = {"inside_soft_changed_pct": round(0.1 * n, 2),
              "warnings": ["the detector found no eyes"] if n == 2 else []}
        names.append(make_subject(cohort, f"SUBJ-{n + 1:04d}", ph, patient_id=f"FAKE{n}",
                                  qa=qa).pseudonym)
    return cohort.pk, names


if __name__ == "__main__":  # pragma: no cover — used through `manage.py shell`
    raise SystemExit("use: manage.py shell -c 'from tests.viewer_fixture import build_site; "
                     "print(build_site())'")
