"""YOLO-format dataset of axial CT slices built from the synthetic head generator.

Each axial slice ``hu[k]`` (rows ``j`` → patient Posterior, columns ``i`` →
patient Left; the face is at the top of the image) becomes one 3-channel 8-bit
PNG, each channel a linear HU window (:data:`HU_WINDOWS`, stored in the model
metadata and re-applied by :mod:`pipeline.detector` at inference):

* channel 0 "wide"  −1000 … +1000 HU (air, soft tissue and bone together);
* channel 1 "soft"   −250 … +250 HU (skin / fat / muscle / eye contrast);
* channel 2 "bone"   +150 … +1650 HU (orbits, nasal bones, mandible).

Labels are YOLO text files (``class x_centre y_centre width height``, all
normalised to the image size) from the generator's ground truth
(:attr:`pipeline.synth.SynthHead.feature_boxes`) plus one ``face`` box per
slice: the bounding box of ``face_label_mask`` on that slice (the soft
tissue a defacer should remove). Classes are :data:`CLASSES`.

Subjects are split into train / val / test **by subject** (disjoint seed
ranges), never by slice, so evaluation is on held-out faces.

``DatasetSpec(domain=True)`` draws *domain-randomised* heads
(:mod:`pipeline.synth_domain`: hollow noses, thin auricles, skull base, head
holders, trauma, kernels, noise) acquired as routine head CT is
(:func:`domain_acquisition`: gantry tilt, head pose, 0.6–7 mm slices, fields of
view 200–310 mm, variable slice spacing, the head off the centre). The nose
label of plain and domain heads alike is the nose standing out of the face
(what a person draws on a real slice; see :mod:`pipeline.synth`), so held-out
figures on either kind of head measure the same class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .synth import _FEATURE_CODES, SubjectParams, generate_head
from .synth_domain import DomainParams

__all__ = [
    "CLASSES",
    "HU_WINDOWS",
    "DatasetError",
    "DatasetSpec",
    "build_dataset",
    "domain_acquisition",
    "hu_to_rgb8",
    "slice_labels",
    "spec_from_metadata",
    "subject_geometry",
    "volume_labels",
]

#: Detector classes, index = YOLO class id. ``face`` = per-slice box of the facial
#: soft tissue to remove; the others are generator feature classes. Two generator
#: features are deliberately not classes, because on an axial slice their extent
#: is a matter of definition, not of image content, and the ``face`` box covers
#: them on every slice (removal loses nothing):
#:
#: * ``brow``: a thin band of forehead skin in front of the supraorbital ridge
#:   with no visible boundary to the forehead above or the lids below (a detector
#:   trained on it reached mAP50 0.54 while every other class was ≥ 0.89);
#: * ``chin``: the chin pad is the soft tissue in front of the mandibular
#:   symphysis, continuous with the cheeks and the lower lip; its width is a
#:   hidden random parameter of the generator with no edge in the image (held-out
#:   mAP50 0.70, mAP50-95 0.36; predicted widths correlated 0.58 with the labels).
#:
#: Users' own models with such classes map them to ``face`` (removed) or ``null``.
CLASSES: tuple[str, ...] = ("face", "eyes", "nose", "lips", "ears")

#: (low, high) HU of each image channel, in channel (RGB) order.
HU_WINDOWS: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-250.0, 250.0), (150.0, 1650.0))

_MIN_PIXELS = 6  # smaller ground-truth fragments on a slice are not labelled


class DatasetError(ValueError):
    """Invalid dataset specification or input."""


def hu_to_rgb8(
    hu: np.ndarray, windows: Sequence[Sequence[float]] = HU_WINDOWS
) -> np.ndarray:
    """Window HU slices to 8-bit multi-channel images.

    ``hu``: ``(..., rows, cols)`` array in Hounsfield units (one slice ``[j, i]``
    or a stack ``[k, j, i]``). ``windows``: per output channel ``(low, high)`` HU,
    mapped linearly to 0 … 255 with clipping. Returns uint8 ``(..., rows, cols,
    n_channels)``; image row = ``j`` (anterior at the top), column = ``i``.
    """
    hu = np.asarray(hu)
    if hu.ndim < 2:
        raise DatasetError(f"need at least a 2D slice, got shape {hu.shape}")
    out = np.empty(hu.shape + (len(windows),), np.uint8)
    src = hu.astype(np.float32, copy=False)
    for c, (lo, hi) in enumerate(windows):
        if not hi > lo:
            raise DatasetError(f"HU window must have high > low, got {(lo, hi)}")
        scale = np.float32(255.0 / (hi - lo))
        tmp = (src - np.float32(lo)) * scale
        np.clip(tmp, 0, 255, out=tmp)
        out[..., c] = tmp + np.float32(0.5)  # round half up; float→uint8 cast truncates
    return out


def slice_labels(
    feature_ids_slice: np.ndarray,
    face_mask_slice: np.ndarray,
    feature_codes: dict[int, str],
    min_pixels: Mapping[int, int] | None = None,
) -> list[tuple[int, int, int, int, int]]:
    """Ground-truth boxes of one axial slice as ``(class_id, i0, j0, i1, j1)``.

    Pixel boxes (column ``i`` / row ``j``, inclusive–exclusive) of every
    feature code present (left/right eyes and ears get one box each) and of the
    face soft-tissue mask; features that are not in :data:`CLASSES` are skipped.
    Fragments under ``6`` pixels are skipped (not
    detectable, and labelling them would teach the model noise).
    ``min_pixels`` optionally raises that floor per feature code (key ``0`` =
    the face mask); see :func:`volume_labels`.
    """
    out: list[tuple[int, int, int, int, int]] = []
    floors = min_pixels or {}

    def add(cls_id: int, m: np.ndarray, key: int) -> None:
        if int(np.count_nonzero(m)) < max(_MIN_PIXELS, floors.get(key, 0)):
            return
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        out.append((cls_id, int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))

    add(CLASSES.index("face"), face_mask_slice, 0)
    for code in np.unique(feature_ids_slice):
        if code == 0:
            continue
        name = feature_codes[int(code)]
        if name not in CLASSES:  # "brow", "chin": covered by the face box, not classes
            continue
        add(CLASSES.index(name), feature_ids_slice == code, int(code))
    return out


def volume_labels(
    feature_ids: np.ndarray,
    face_mask: np.ndarray,
    feature_codes: dict[int, str],
    min_visible_fraction: float | Mapping[str, float] = 0.0,
) -> list[list[tuple[int, int, int, int, int]]]:
    """Ground-truth boxes of every axial slice ``k`` of a volume (see :func:`slice_labels`).

    ``feature_ids`` / ``face_mask``: ``[k, j, i]`` label volumes.
    ``min_visible_fraction``: a feature's cross-section on a slice is labelled
    only when its area is at least this fraction of that feature's largest
    cross-section in the volume (per feature code; code ``0`` = face mask). The
    first and last slices through a feature show a sliver whose class cannot be
    told from its neighbours (where does the brow end and the forehead begin?);
    labelling them adds label noise, not information. Removal does not depend
    on them: the defacing region is smoothed across slices and, in ``auto``,
    joined with the anatomical region. A mapping gives the fraction per class name
    (``{"nose": 0.05, "eyes": 0.2, ...}``; classes it leaves out: 0), as a person labels a
    real series: the globe only where its cross-section is clear, but the nose and the
    auricle on every slice where they are seen.
    """
    fractions = _class_fractions(min_visible_fraction)
    floors: dict[int, int] = {}
    n_k = feature_ids.shape[0]
    flat = feature_ids.reshape(n_k, -1)
    for code in np.unique(feature_ids):
        frac = fractions.get(feature_codes.get(int(code), ""), 0.0)
        if code == 0 or frac <= 0:
            continue
        per_slice = np.count_nonzero(flat == code, axis=1)
        floors[int(code)] = int(np.ceil(frac * per_slice.max()))
    if fractions.get("face", 0.0) > 0:
        face_area = np.count_nonzero(face_mask.reshape(n_k, -1), axis=1)
        floors[0] = int(np.ceil(fractions["face"] * face_area.max()))
    return [slice_labels(feature_ids[k], face_mask[k], feature_codes, floors)
            for k in range(feature_ids.shape[0])]


def _class_fractions(min_visible_fraction: float | Mapping[str, float]) -> dict[str, float]:
    """``min_visible_fraction`` as a fraction per class name (a float applies to all)."""
    if isinstance(min_visible_fraction, Mapping):
        unknown = set(min_visible_fraction) - set(CLASSES)
        if unknown:
            raise DatasetError(f"min_visible_fraction: unknown classes {sorted(unknown)} (classes: {', '.join(CLASSES)})")
        fractions = {str(k): float(v) for k, v in min_visible_fraction.items()}
    else:
        fractions = dict.fromkeys(CLASSES, float(min_visible_fraction))
    if not all(0.0 <= v < 1.0 for v in fractions.values()):
        raise DatasetError("min_visible_fraction must be in [0, 1)")
    return fractions


#: The visible-fraction rule of the shipped model's labels: the globe only where its
#: cross-section is clear (as the real labels are drawn), the nose and the auricle on every
#: slice where they are seen (all but their last slivers).
VISIBLE_FRACTIONS: dict[str, float] = {"face": 0.2, "eyes": 0.2, "lips": 0.2, "nose": 0.05, "ears": 0.05}


def parse_visible_fraction(text: str) -> float | dict[str, float]:
    """``"0.2"`` → 0.2 (every class); ``"0.2,nose=0.05,ears=0.05"`` → a fraction per class
    (the bare number for the classes not named; without one they take 0). Raises
    :class:`DatasetError` with the reason."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    default: float | None = None
    per: dict[str, float] = {}
    try:
        for p in parts:
            if "=" in p:
                k, v = p.split("=", 1)
                per[k.strip()] = float(v)
            elif default is None:
                default = float(p)
            else:
                raise ValueError
    except ValueError:
        raise DatasetError(f"min_visible_fraction: expected a number or 'N,class=N,...', got {text!r}") from None
    if not per:
        if default is None:
            raise DatasetError("min_visible_fraction: empty")
        _class_fractions(default)  # range check
        return default
    out = {c: (default or 0.0) for c in CLASSES} | per
    _class_fractions(out)
    return out


@dataclass
class DatasetSpec:
    """How to build a synthetic dataset (all lengths in mm).

    Subject seeds: ``train`` = ``seed_base + 0 … n_train−1``, ``val`` =
    ``seed_base + 10000 + …``, ``test`` = ``seed_base + 20000 + …`` — disjoint
    subjects. Each subject is voxelised at ``size_px``² pixels with a pixel
    spacing drawn from ``pixel_mm`` and a slice spacing from ``slice_mm``
    (uniform, per subject), a random pose and noise. All slices with a labelled
    box are written plus ``negatives_fraction`` × that number of empty slices.
    ``min_visible_fraction``: see :func:`volume_labels` (0 labels every
    fragment of ≥ 6 pixels; a dict gives it per class). ``domain``: domain-randomised heads and
    acquisitions (:func:`domain_acquisition`; ``size_px``, ``pixel_mm``,
    ``slice_mm`` and ``noise_hu`` are then not used; ``domain_px_scale``: its
    ``px_scale``, finer pixels for a detector run at a larger ``imgsz``). ``max_slices``: at most
    this many labelled slices per subject (0: all), drawn at random.
    """

    n_train: int = 30
    n_val: int = 5
    n_test: int = 6
    size_px: int = 160
    pixel_mm: tuple[float, float] = (1.35, 1.9)
    slice_mm: tuple[float, float] = (2.5, 5.0)
    noise_hu: tuple[float, float] = (5.0, 25.0)
    negatives_fraction: float = 0.15
    min_visible_fraction: float | dict[str, float] = 0.0
    seed_base: int = 7000
    classes: tuple[str, ...] = field(default=CLASSES)
    domain: bool = False
    max_slices: int = 0
    domain_px_scale: float = 1.0

    def seeds(self, split: str) -> list[int]:
        """Subject seeds of a split (``train``, ``val`` or ``test``)."""
        off = {"train": 0, "val": 10000, "test": 20000}
        n = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        if split not in off:
            raise DatasetError(f"unknown split {split!r}")
        return [self.seed_base + off[split] + s for s in range(n[split])]


def spec_from_metadata(meta: dict) -> DatasetSpec:
    """The :class:`DatasetSpec` recorded in a model's metadata (``meta["data"]["spec"]``).

    Unknown keys are ignored and missing ones take their defaults, so metadata
    written by older versions still gives the same held-out seeds.
    """
    from dataclasses import fields

    spec_d = dict((meta.get("data") or {}).get("spec") or {})
    known = {f.name for f in fields(DatasetSpec)}
    return DatasetSpec(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in spec_d.items() if k in known})


def subject_geometry(spec: DatasetSpec, seed: int) -> dict[str, object]:
    """Per-subject acquisition geometry drawn from ``spec`` (deterministic in ``seed``).

    Returns ``shape`` ``(n_slices, rows, cols)``, ``spacing_mm`` ``(dk, dj, di)``
    covering the head from below the chin to the vertex (≈ 260 mm), ``noise_hu``.
    """
    rng = np.random.default_rng([seed, 0xDE7])
    px = float(rng.uniform(*spec.pixel_mm))
    dk = float(rng.uniform(*spec.slice_mm))
    nk = int(np.ceil(260.0 / dk))
    return {
        "shape": (nk, spec.size_px, spec.size_px),
        "spacing_mm": (dk, px, px),
        "noise_hu": float(rng.uniform(*spec.noise_hu)),
    }


def domain_acquisition(seed: int, *, px_scale: float = 1.0) -> dict[str, Any]:
    """A routine head-CT acquisition for a domain-randomised subject (deterministic in ``seed``).

    Field of view 200–310 mm on 150–200 pixels (1.0–2.1 mm, as a detector run at
    ``imgsz`` 160 sees 512² slices after its in-plane stride of 3); ``px_scale``: that
    many times more pixels across the same field of view (1.6: 240–320 pixels, 0.6–1.3 mm,
    as a detector at ``imgsz`` 256 sees them after its stride of 2), every other draw the
    same; gantry tilt 0° (35 %) or −8…+27°; head
    pose yaw ±12°, pitch ±15°, roll ±7°; slices 2.5–6 mm apart, 0.6–7 mm thick, or
    (30 %) 4–5 mm slices through the face then 7–10 mm above, as many routine
    protocols have. Returns keyword arguments of
    :func:`pipeline.synth.generate_head` (without ``params`` / ``domain``) plus
    ``"fov_mm"``.
    """
    if not 0.25 <= px_scale <= 8.0:
        raise DatasetError(f"px_scale must be between 0.25 and 8 (got {px_scale!r})")
    rng = np.random.default_rng([int(seed), 0xDA7A])
    fov = float(rng.uniform(200.0, 310.0))
    n = int(round(int(rng.integers(150, 201)) * px_scale))
    px = fov / n
    tilt = 0.0 if rng.random() < 0.35 else float(rng.uniform(-8.0, 27.0))
    pose = (float(rng.uniform(-12, 12)), float(rng.uniform(-15, 15)), float(rng.uniform(-7, 7)))
    extent = 270.0
    if rng.random() < 0.3:
        d1, d2 = float(rng.uniform(4.0, 5.0)), float(rng.uniform(7.0, 10.0))
        z1 = float(rng.uniform(80.0, 130.0))
        pos = np.concatenate([np.arange(0.0, z1, d1), z1 + np.arange(0.0, extent - z1, d2)])
        thick = np.where(pos < z1, d1, d2)
    else:
        dk = float(rng.uniform(2.5, 6.0))
        pos = np.arange(0.0, extent, dk)
        thick = np.full(pos.size, float(np.clip(dk * rng.uniform(0.3, 1.2), 0.6, 7.0)))
    return {"shape": (int(pos.size), n, n), "spacing_mm": (float(np.median(np.diff(pos))), px, px),
            "positions_mm": pos, "thickness_mm": thick, "tilt_deg": tilt, "pose_deg": pose, "fov_mm": fov}


def domain_subject(seed: int, *, px_scale: float = 1.0) -> tuple[SubjectParams, DomainParams, dict[str, Any]]:
    """What :func:`domain_head` draws for subject ``seed`` before generating it: the subject's
    parameters (adjusted by its domain draw), the :class:`DomainParams` and the acquisition
    (:func:`domain_acquisition` with ``px_scale``, without ``fov_mm``, which the draw took)."""
    acq = domain_acquisition(seed, px_scale=px_scale)
    dom = DomainParams.random(seed, fov_mm=acq.pop("fov_mm"))
    return dom.adjust_params(SubjectParams.random(seed)), dom, acq


def domain_head(seed: int, *, px_scale: float = 1.0) -> Any:
    """The domain-randomised head of subject ``seed`` with its acquisition (see
    :func:`domain_acquisition`, also for ``px_scale``); a :class:`pipeline.synth.SynthHead`."""
    params, dom, acq = domain_subject(seed, px_scale=px_scale)
    sc = dom.size_scale  # a child's head: drawn smaller by sampling it more coarsely
    dk, dj, di = acq["spacing_mm"]
    return generate_head(params, shape=acq["shape"], spacing_mm=(dk / sc, dj / sc, di / sc),
                         positions_mm=acq["positions_mm"] / sc, thickness_mm=np.minimum(acq["thickness_mm"] / sc, 10.0),
                         tilt_deg=acq["tilt_deg"], pose_deg=acq["pose_deg"], noise_seed=seed,
                         couch=False, metal=dom.metal, domain=dom)


def _subject_images(spec: DatasetSpec, seed: int) -> Iterable[tuple[int, np.ndarray, list]]:
    if spec.domain:
        head = domain_head(seed, px_scale=spec.domain_px_scale)
    else:
        geo = subject_geometry(spec, seed)
        head = generate_head(
            SubjectParams.random(seed), shape=geo["shape"], spacing_mm=geo["spacing_mm"],
            noise_hu=geo["noise_hu"], noise_seed=seed,
        )
    rgb = hu_to_rgb8(head.volume.hu)
    labels = volume_labels(head.feature_ids, head.face_label_mask, _FEATURE_CODES,
                           spec.min_visible_fraction)
    pos = [k for k, b in enumerate(labels) if b]
    if spec.max_slices and len(pos) > spec.max_slices:
        pick = np.random.default_rng([seed, 0x5E1]).choice(len(pos), spec.max_slices, replace=False)
        pos = [pos[i] for i in sorted(pick)]
    neg = [k for k, b in enumerate(labels) if not b and head.volume.hu[k].max() > -300]
    rng = np.random.default_rng([seed, 0x4E6])
    n_neg = min(len(neg), int(round(spec.negatives_fraction * len(pos))))
    chosen = sorted(pos + list(rng.choice(neg, size=n_neg, replace=False)) if n_neg else pos)
    for k in chosen:
        yield int(k), rgb[k], labels[k]


def _write_subject(args: tuple[DatasetSpec, int, str, str]) -> tuple[int, int]:
    """Write one subject's slices (images + labels); returns (images, boxes)."""
    from PIL import Image

    spec, seed, img_dir, lab_dir = args
    n_img = n_box = 0
    for k, img, boxes in _subject_images(spec, seed):
        stem = f"s{seed:05d}_k{k:03d}"
        Image.fromarray(img).save(Path(img_dir) / f"{stem}.png")
        h, w = img.shape[:2]
        lines = [
            f"{c} {(i0 + i1) / 2 / w:.6f} {(j0 + j1) / 2 / h:.6f} "
            f"{(i1 - i0) / w:.6f} {(j1 - j0) / h:.6f}"
            for c, i0, j0, i1, j1 in boxes
        ]
        (Path(lab_dir) / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        n_img += 1
        n_box += len(boxes)
    return n_img, n_box


def build_dataset(
    out_dir: Path,
    spec: DatasetSpec | None = None,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    progress: bool = False,
    workers: int = 1,
) -> Path:
    """Write a YOLO dataset (PNG images + label txt + ``data.yaml``) to ``out_dir``.

    Layout: ``images/<split>/sNNNNN_kNNN.png``, ``labels/<split>/…txt``,
    ``data.yaml`` (Ultralytics format; ``path`` absolute) and ``spec.json``
    (the :class:`DatasetSpec` plus window and class list). File names contain
    only the synthetic subject seed and slice index. ``workers`` > 1 generates
    subjects in that many processes (same files). Returns the path of
    ``data.yaml``.
    """
    spec = spec or DatasetSpec()
    out_dir = Path(out_dir).resolve()
    counts: dict[str, dict[str, int]] = {}
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
    try:
        for split in splits:
            img_dir = out_dir / "images" / split
            lab_dir = out_dir / "labels" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            lab_dir.mkdir(parents=True, exist_ok=True)
            seeds = spec.seeds(split)
            jobs = [(spec, seed, str(img_dir), str(lab_dir)) for seed in seeds]
            results = pool.imap(_write_subject, jobs) if pool is not None else map(_write_subject, jobs)
            n_img = n_box = 0
            for si, (ni, nb) in enumerate(results):
                if progress:
                    print(f"[dataset] {split} subject {si + 1}/{len(seeds)}", flush=True)
                n_img += ni
                n_box += nb
            counts[split] = {"subjects": len(seeds), "images": n_img, "boxes": n_box}
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(spec.classes))
    yaml_lines = [f"path: {out_dir}"]
    for split in ("train", "val", "test"):
        # Ultralytics requires train and val keys: point missing ones at a built split
        use = split if split in splits else splits[0]
        yaml_lines.append(f"{split}: images/{use}")
    (out_dir / "data.yaml").write_text("\n".join(yaml_lines) + f"\nnames:\n{names}\n")
    meta = {"spec": asdict(spec), "hu_windows": HU_WINDOWS, "counts": counts,
            "seeds": {s: spec.seeds(s) for s in splits}}
    (out_dir / "spec.json").write_text(json.dumps(meta, indent=1))
    return out_dir / "data.yaml"
