"""Selective defacing: remove the face outside the facial skeleton, keep everything inside it.

Two steps, so that different region finders plug in:

1. A :class:`FaceRegionMethod` (:class:`AnatomicalFaceRegion`, or the detector
   methods of :mod:`pipeline.face_model`) says *where on the face* soft tissue
   may go: the anatomical face zone of the skeleton envelope
   (:mod:`pipeline.envelope`), detector boxes, or both.
2. :func:`deface` removes, in that zone, every voxel of the patient's body
   (above −500 HU: more tissue than air) that lies **outside the facial
   skeleton's hull** — and nothing else:

   * inside the hull (grown by 1 mm) nothing changes: globes and orbital fat
     behind the orbital rims, nasal cavity behind the piriform aperture,
     sinuses and their contents, oral cavity, tongue, pharynx, masticator
     spaces, brain. Thin bone does not need to close anything: the hull is
     convex and spans the rims, the aperture and the arches at any slice
     thickness;
   * outside the body nothing changes: table, head holder, pillows, air
     (voxels at or below −500 HU are never written);
   * bone outside the hull (a displaced fragment, a thin nasal tip lost to
     partial volume) is kept: in-plane clusters of ≥ 150 HU that reach 300 HU
     and cover ≥ 2 mm² stay, only the soft tissue around them goes (in slices
     with dental metal, line-like clusters are streaks and go);
   * removed voxels are **filled with this scan's own ambient air**: values
     drawn from the histogram of the air around the head (same mean, spread
     and −1024 clipping) with its pixel-to-pixel correlation, so the removed
     region is indistinguishable from the air in front of it at every window
     — no face-shaped hole of flat −1000 HU that invites "refacing".

   A scan without facial soft tissue (bare skull, phantom, brain-only field of
   view) is left unchanged and reported as "no face found" with the reason.

:func:`deface` returns the new array and QA figures (:class:`DefaceQA`): removed
mL per facial region, soft tissue changed inside the skeleton (%), mL changed
outside the body, bone Dice at 300 and at 150 HU, the landmarks, the fill, the
geometry that was assumed, and the nose check (of the soft tissue outside the
skeleton around the nose — the detector's nose boxes, else the anatomy's nose
region — the share removed; a warning when the nose may be left).
:func:`qa_picture` draws axial slices and a sagittal reformat, original beside
de-identified, with the removed region overlaid.

Array conventions: ``hu[k, j, i]`` (slice, row, column) in HU, DICOM LPS
geometry from :class:`pipeline.volume.Volume` (irregular slice spacing and
gantry tilt included); volumes in mL, distances in mm.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage as ndi

from .envelope import (
    BODY_THRESHOLD_HU,
    Envelope,
    EnvelopeSettings,
    FaceZone,
    bbox_of,
    find_envelope,
    in_slabs,
)
from .volume import Volume

__all__ = [
    "AirFill",
    "AnatomicalFaceRegion",
    "DefaceError",
    "DefaceQA",
    "DefaceResult",
    "FaceRegionMethod",
    "MODEL_NOSE_NOTE",
    "REGION_NAMES",
    "RegionResult",
    "bbox_of",
    "deface",
    "qa_picture",
]

#: QA thresholds (HU): bone for the Dice figures, soft tissue for the inside-change figure.
BONE_HU = (300.0, 150.0)
SOFT_RANGE_HU = (-200.0, 200.0)
#: In-plane clusters outside the hull kept as bone: ≥ 150 HU, reaching 300 HU, ≥ 2 mm².
KEEP_LOW_HU, KEEP_SEED_HU, KEEP_MIN_MM2 = 150.0, 300.0, 2.0
#: Dental metal and its streaks: slices holding voxels this dense.
METAL_HU = 2800.0
#: A bright cluster at the air around the patient is the skin's sharpened edge unless it reaches
#: this (cortical bone; the edge overshoot of bone kernels stays below 500 HU on domain heads).
SKIN_EDGE_MAX_HU = 1000.0
#: Facial regions of the removed-volume figures (assigned from the landmarks).
REGION_NAMES = ("nose", "lips", "chin", "cheeks", "eyelids", "forehead", "ears", "other")
#: What ``auto`` says when the detector's nose stands in for the anatomy's (kept only when the
#: nose check below finds the soft tissue outside the skeleton in the nose boxes removed).
MODEL_NOSE_NOTE = "the detector's nose boxes are removed"
#: QA warning (its start) when the envelope found a mask, splint or cast on the face
#: (:attr:`Envelope.plastic`): removed outside the hull, and worth a look where it meets bone.
FACE_SHELL_NOTE = "a mask, splint or cast lies on the face"
#: The nose check (the detector's nose boxes, else the anatomy's nose region): with less soft
#: tissue than ``NOSE_OUTSIDE_MIN_ML`` outside the skeleton's hull there, there is none; the nose
#: may be left (and the QA says so) when less than ``NOSE_REMOVED_PCT`` of it was removed, or
#: when there is none but at least ``NOSE_INSIDE_ML`` inside the hull under at least
#: ``NOSE_DENSE_AIR_ML`` of dense material (≥ ``KEEP_SEED_HU``) at the air around the patient.
NOSE_OUTSIDE_MIN_ML, NOSE_INSIDE_ML, NOSE_DENSE_AIR_ML, NOSE_REMOVED_PCT = 0.5, 2.0, 1.0, 90.0
#: Where a nose is: its bounding box in array order and the bool mask within it.
NoseBoxes = tuple[tuple[slice, slice, slice], np.ndarray]


class DefaceError(ValueError):
    """Bad input to defacing (shape/dtype mismatch, unusable geometry)."""


# --------------------------------------------------------------------------- interface


@dataclass
class RegionResult:
    """Output of a :class:`FaceRegionMethod`: where facial soft tissue may be removed.

    ``mask``: optional bool array shaped like ``volume.hu`` (e.g. detector
    boxes); ``use_zone``: also the envelope's anatomical face zone;
    ``envelope``: the :class:`pipeline.envelope.Envelope` when the method
    computed it (else :func:`deface` does). ``warnings``: human-readable
    (never patient identifiers); ``details``: method-specific numbers;
    ``bbox``: optional bounding box of ``mask`` in array order. ``nose``: optional, where
    the method found the nose (the detector's nose boxes) — a bool array shaped like
    ``volume.hu``, or :data:`NoseBoxes` (its bounding box and the mask within it):
    :func:`deface` checks that the soft tissue outside the skeleton there was removed
    (``DefaceQA.nose_check``).
    """

    mask: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    bbox: tuple[slice, slice, slice] | None = None
    envelope: Envelope | None = None
    use_zone: bool = False
    nose: np.ndarray | NoseBoxes | None = None


@runtime_checkable
class FaceRegionMethod(Protocol):
    """Anything that says where a CT volume's facial soft tissue may be removed."""

    name: str

    def face_region(self, volume: Volume) -> RegionResult:
        """Return the removable region (see :class:`RegionResult`)."""
        ...


@dataclass
class AnatomicalFaceRegion:
    """The face zone of the facial-skeleton envelope (no trained model).

    See :mod:`pipeline.envelope`: the skeleton's convex hull, the body, the
    globes / nose / menton and the zone they bound (anterior to a coronal plane
    ``zone_posterior_mm`` behind the globes, below the upper forehead, above the
    submental skin). ``settings`` tunes it.
    """

    settings: EnvelopeSettings = field(default_factory=EnvelopeSettings)
    name: str = "anatomical"

    def face_region(self, volume: Volume) -> RegionResult:
        env = find_envelope(volume, self.settings)
        warnings = list(env.landmarks.notes)
        details: dict[str, Any] = {"seconds": env.seconds}
        return RegionResult(None, warnings, details, None, envelope=env, use_zone=True)


# --------------------------------------------------------------------------- fill


@dataclass
class AirFill:
    """The scan's own ambient air, to fill removed voxels with.

    ``samples``: sorted HU values of air voxels around the head (outside the
    body, ≥ 6 mm from it, −1100…−850 HU: no padding outside the reconstruction
    circle, no pads); ``sigma_px``: Gaussian correlation length (pixels) that
    reproduces the air's lag-1 pixel correlation ``corr``. :meth:`tile` is a
    correlated noise field mapped onto the sample histogram.
    """

    samples: np.ndarray
    corr: float
    sigma_px: float
    tile_px: int = 256

    @classmethod
    def of(cls, volume: Volume, env: Envelope, slices: list[int], seed: int = 0) -> AirFill:
        rng = np.random.default_rng(seed)
        g = env.grid
        far = ~in_slabs(ndi.binary_dilation, env.body, 3, iterations=3)
        vals, pairs_a, pairs_b = [], [], []
        for k in slices[:: max(1, len(slices) // 6)]:
            sl = volume.hu[k]
            far_k = far[g.native_k[k]]
            m = far_k[(np.arange(sl.shape[0]) // g.f)[:, None], (np.arange(sl.shape[1]) // g.f)[None, :]]
            m &= (sl > -1100) & (sl < -850)
            if m.sum() < 50:
                continue
            v = sl[m].astype(np.float32)
            vals.append(v if v.size <= 20_000 else rng.choice(v, 20_000, replace=False))
            both = m[:, :-1] & m[:, 1:]
            pairs_a.append(sl[:, :-1][both].astype(np.float32))
            pairs_b.append(sl[:, 1:][both].astype(np.float32))
        if not vals:
            samples = np.clip(rng.normal(-1000.0, 10.0, 5000), -1024, None).astype(np.float32)
            return cls(np.sort(samples), 0.0, 0.0)
        samples = np.sort(np.concatenate(vals))
        a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
        if a.size > 100_000:
            pick = rng.choice(a.size, 100_000, replace=False)
            a, b = a[pick], b[pick]
        corr = 0.0
        if a.size > 100 and a.std() > 0 and b.std() > 0:
            corr = float(np.clip(np.corrcoef(a, b)[0, 1], 0.0, 0.95))
        sigma = float(np.sqrt(-1.0 / (4.0 * np.log(corr)))) if corr > 0.02 else 0.0
        return cls(samples, corr, sigma)

    def tile(self, seed: int = 0) -> np.ndarray:
        """A ``tile_px²`` float32 field of air values (histogram = samples, correlated)."""
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((self.tile_px, self.tile_px)).astype(np.float32)
        if self.sigma_px > 0:
            noise = ndi.gaussian_filter(noise, self.sigma_px, mode="wrap")
        ranks = np.argsort(np.argsort(noise, axis=None)).reshape(noise.shape)
        q = (ranks + 0.5) / ranks.size
        idx = np.minimum((q * len(self.samples)).astype(int), len(self.samples) - 1)
        return self.samples[idx].astype(np.float32)

    def summary(self) -> dict[str, float]:
        s = self.samples
        return {"mean_hu": round(float(s.mean()), 1), "sd_hu": round(float(s.std()), 1),
                "lag1_correlation": round(self.corr, 3), "n_samples": int(s.size)}


# --------------------------------------------------------------------------- QA


@dataclass
class DefaceQA:
    """QA figures of one defacing run (no patient identifiers; mL, %, mm, HU).

    ``face_found`` False (with ``no_face_reason``) means nothing was changed.
    ``removed_ml_by_region``: removed volume per facial region (landmark-based,
    approximate at the borders). ``inside_soft_changed_pct``: of the soft
    tissue (−200…200 HU) inside the skeleton hull shrunk by 3 mm and within the
    face zone, the percentage changed (``_worst_slice`` on the worst native
    slice). ``outside_body_changed_ml``: changed voxels that were at or below
    −500 HU or outside the patient. ``bone_dice`` / ``bone_dice_150``: Dice of
    voxels ≥ 300 / ≥ 150 HU before vs after. ``geometry``: what was assumed
    about the series (irregular spacing, tilt, slice thickness, pixel size).
    ``nose_check``: around the nose — the method's nose boxes (the detector's) or else the
    anatomy's nose region (:func:`_landmark_nose`) — the soft tissue (−200…200 HU) outside
    the skeleton hull (``outside_ml``), the share of it removed (``removed_pct``; None below
    :data:`NOSE_OUTSIDE_MIN_ML`), what lies inside the hull (``inside_ml``), the material
    ≥ 300 HU at the air around the patient there (``dense_at_air_ml``: a cast or mask),
    whether the nose may be left (``nose_may_be_left``, with a warning) and ``source``
    (``"detector"`` / ``"anatomy"``); empty when no face was found or neither located a nose.
    """

    method: str
    face_found: bool
    no_face_reason: str
    removed_voxels: int
    removed_ml: float
    removed_ml_by_region: dict[str, float]
    inside_soft_changed_pct: float
    inside_soft_changed_pct_worst_slice: float
    outside_body_changed_ml: float
    bone_dice: float
    bone_dice_150: float
    bone_voxels_replaced: int
    face_ml: float
    landmarks: dict[str, Any]
    zone: dict[str, Any]
    fill: dict[str, Any]
    geometry: dict[str, Any]
    warnings: list[str]
    seconds: dict[str, float]
    details: dict[str, Any]
    nose_check: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON-serialisable dict."""
        return asdict(self)


@dataclass
class DefaceResult:
    """Result of :func:`deface`: new HU array (same shape/dtype), QA figures, region."""

    hu: np.ndarray
    qa: DefaceQA
    region: RegionResult
    #: native slice indices where ``hu`` differs from the input (ascending)
    changed_slices: tuple[int, ...] = ()

    @property
    def envelope(self) -> Envelope | None:
        return self.region.envelope


def _geometry(volume: Volume, env: Envelope) -> dict[str, Any]:
    cells = env.stack.cells_mm
    tilt = float(np.degrees(np.arccos(np.clip(
        abs(env.stack.stack @ env.stack.normal) / np.linalg.norm(env.stack.stack), -1, 1))))
    return {"slices": int(volume.hu.shape[0]), "regular_spacing": bool(volume.is_regular),
            "slice_spacing_mm": [round(float(cells.min()), 2), round(float(cells.max()), 2)],
            "pixel_mm": [round(float(x), 3) for x in volume.spacing_mm[1:]],
            "gantry_tilt_deg": round(tilt, 1),
            "grid_mm": [round(float(x), 2) for x in env.grid.spacing_mm]}


def _region_labels(env: Envelope) -> np.ndarray:
    """Coarse uint8 map of :data:`REGION_NAMES` indices (landmark-based) where removal can act."""
    lm = env.landmarks
    g = env.grid
    lab = np.full(g.hu.shape, REGION_NAMES.index("other"), np.uint8)
    # every cell a removed voxel can fall in (coarse borders included)
    cand = in_slabs(ndi.binary_dilation, ~env.inside & env.zone_coarse, 1,
                    iterations=1) & env.body_grown
    if lm.anchor is None or not cand.any():
        return lab
    idx = np.nonzero(cand)
    pts = g.lps(*idx)
    rel = pts - lm.anchor
    left, post, sup = lm.axes
    x, y, z = rel @ left, rel @ post, rel @ sup
    tip = float((lm.nose_tip - lm.anchor) @ sup) if lm.nose_tip is not None else -48.0
    out = np.full(len(pts), REGION_NAMES.index("cheeks"), np.uint8)
    mid = np.abs(x) <= 32.0
    out[mid & (z < tip - 45.0)] = REGION_NAMES.index("chin")
    out[mid & (z >= tip - 45.0) & (z < tip - 10.0)] = REGION_NAMES.index("lips")
    out[(np.abs(x) <= 20.0) & (z >= tip - 10.0) & (z < -8.0)] = REGION_NAMES.index("nose")
    for globe in (lm.globe_right, lm.globe_left):
        if globe is not None:
            near = np.linalg.norm(pts - globe, axis=1) <= 22.0
            out[near & (z < 22.0)] = REGION_NAMES.index("eyelids")
    out[z >= 22.0] = REGION_NAMES.index("forehead")
    out[(np.abs(x) >= 55.0) & (y >= 40.0)] = REGION_NAMES.index("ears")
    if lm.menton is not None:
        out[z < float((lm.menton - lm.anchor) @ sup) - 3.0] = REGION_NAMES.index("other")
    lab[idx] = out
    return lab


def _keep_bright(sl: np.ndarray, cand: np.ndarray, min_px: float, metal: bool,
                 exterior: np.ndarray | None = None,
                 devices: np.ndarray | None = None,
                 plastic: np.ndarray | None = None) -> np.ndarray:
    """In-plane clusters of candidate voxels ≥ 150 HU that reach 300 HU and cover ≥ ``min_px``
    (bone outside the hull: a fragment, a thin nasal tip). In a slice with dental metal
    (``metal``) a line-like cluster (second-moment axes ratio > 6) is a streak, not bone.

    ``exterior``: air outside the patient (:meth:`Envelope.exterior_air`). A cluster with at
    least half its pixels next to it is the skin's own edge, not bone: a sharp (bone) kernel
    lifts the skin's outermost pixels to 150–450 HU all over the face, and kept, that
    bright line outlined the face it was meant to remove. Bone lies under skin; where the
    skin over a nasal bone is a pixel thin, the bone's cluster holds cortical bone
    (≥ ``SKIN_EDGE_MAX_HU``), which no skin edge reaches, and stays. A cluster
    touching ``devices`` (pixels near a holder, rail or couch) stays kept: a device's edge
    that reached the candidates is not written either. A cluster touching ``plastic``
    (:meth:`Envelope.plastic_pixels`: a dense shell on the skin, not bone) is not kept: a
    mask or splint pressed to the face is a cast of it."""
    bright = cand & (sl >= KEEP_LOW_HU)
    if not bright.any():
        return bright
    lab, n = ndi.label(bright, structure=np.ones((3, 3), bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    seeded = np.zeros(n + 1, bool)
    seeded[np.unique(lab[cand & (sl >= KEEP_SEED_HU)])] = True
    keep = seeded & (sizes >= min_px)
    keep[0] = False
    if exterior is not None and keep.any() and exterior.any():
        near = ndi.binary_dilation(exterior, structure=np.ones((3, 3), bool))
        at_edge = np.bincount(lab[near], minlength=n + 1)
        peak = np.zeros(n + 1)
        peak[1:] = ndi.maximum(sl, lab, np.arange(1, n + 1))
        skin = (2 * at_edge >= sizes) & (peak < SKIN_EDGE_MAX_HU)
        if devices is not None and devices.any():
            skin[np.unique(lab[devices])] = False
        keep &= ~skin
    if plastic is not None and keep.any() and plastic.any():
        keep[np.unique(lab[plastic & bright])] = False
        keep[0] = False
    if metal:
        for c in np.flatnonzero(keep & (sizes <= 5000)):  # streak pieces are small
            jj, ii = np.nonzero(lab == c)
            if jj.size < 3:
                continue
            ev = np.linalg.eigvalsh(np.cov(np.vstack([jj, ii])) + 0.25 * np.eye(2))
            if ev[1] > 36.0 * ev[0]:
                keep[c] = False
    return keep[lab]


def deface(volume: Volume, method: FaceRegionMethod | None = None, *,
           settings: EnvelopeSettings | None = None, fill_seed: int = 0) -> DefaceResult:
    """Remove the facial soft tissue of ``volume`` outside its facial skeleton.

    ``method`` says where on the face (default :class:`AnatomicalFaceRegion`);
    the envelope (hull, body, zone; :func:`pipeline.envelope.find_envelope`)
    is computed once and shared. See the module docstring for what changes
    and what never does. ``volume`` is not modified. Returns a
    :class:`DefaceResult` whose ``hu`` has ``volume.hu``'s shape and dtype.
    """
    method = AnatomicalFaceRegion(settings or EnvelopeSettings()) if method is None else method
    if not isinstance(method, FaceRegionMethod):
        raise DefaceError("method must provide .name and .face_region(volume)")
    hu = volume.hu
    if hu.ndim != 3:
        raise DefaceError(f"hu must be 3D, got shape {hu.shape}")
    if not (np.issubdtype(hu.dtype, np.floating) or
            (np.issubdtype(hu.dtype, np.integer) and np.iinfo(hu.dtype).min < 0)):
        raise DefaceError(f"hu must be a signed array of Hounsfield units, got dtype {hu.dtype}")
    # the copy to edit and the bone count before need only ``hu``: a second thread makes
    # them while the region and envelope are found (numpy releases the GIL)
    with ThreadPoolExecutor(max_workers=1) as side:
        return _deface(volume, method, settings, fill_seed, side)


def _copy_and_count_bone(hu: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """A copy of ``hu`` and its voxel counts ≥ each of :data:`BONE_HU`."""
    out = hu.copy()
    bone = [0] * len(BONE_HU)
    for k0 in range(0, hu.shape[0], 16):
        blk = hu[k0:k0 + 16]
        for t, thr in enumerate(BONE_HU):
            bone[t] += int(np.count_nonzero(blk >= thr))
    return out, bone


def _deface(volume: Volume, method: FaceRegionMethod, settings: EnvelopeSettings | None,
            fill_seed: int, side: ThreadPoolExecutor) -> DefaceResult:
    hu = volume.hu
    copy_job = side.submit(_copy_and_count_bone, hu)
    t0 = time.perf_counter()
    region = method.face_region(volume)
    mask = region.mask
    if mask is not None and (mask.shape != hu.shape or mask.dtype != bool):
        raise DefaceError(f"method {method.name!r} returned a region of shape {mask.shape} / "
                          f"dtype {mask.dtype}, expected bool {hu.shape}")
    t1 = time.perf_counter()
    env = region.envelope
    if env is None:
        env = find_envelope(volume, settings)
        region.envelope = env
    t2 = time.perf_counter()
    warnings = list(region.warnings)
    out, bone_before = copy_job.result()
    changed_k: list[int] = []
    voxel_ml = volume.slice_voxel_volumes_ml()
    by_region = np.zeros(len(REGION_NAMES))
    removed = 0
    bone_lost = [0, 0]
    inside_changed_ml = 0.0
    outside_body_ml = 0.0
    worst_pct = 0.0
    fill_doc: dict[str, Any] = {}

    # what the method allows: the envelope's zone and/or its own mask, never inside the hull
    face_found = env.face_found
    reason = env.reason
    if mask is not None and not region.use_zone:
        if not mask.any():
            face_found, reason = False, "; ".join(region.warnings) or "the method found no face"
        elif env.hull is None:
            face_found = False  # nothing protects the inside: refuse to cut
        elif not face_found and env.doubtful:
            # the anatomy located no eyes or nose, yet soft tissue stands in front of the
            # skeleton: the method's own boxes say where the face is (the hull still protects)
            face_found, reason = True, ""
    if face_found:
        env.body_grown  # noqa: B018 - computed once, before the threads share it
        env.zone_coarse  # noqa: B018 - (the same)
        env.exterior_coarse  # noqa: B018 - (the same)
        env.devices_near(0, slice(0, 1), slice(0, 1))  # (the same: its coarse mask)
        labels_job = side.submit(_region_labels, env)
        boxes = dict(env.native_boxes_of_zone()) if region.use_zone else {}
        if mask is not None:
            mb = region.bbox or bbox_of(mask)
            if mb is not None:
                for k in range(mb[0].start, mb[0].stop):
                    rs, cs = boxes.get(k, (mb[1], mb[2]))
                    boxes[k] = (slice(min(rs.start, mb[1].start), max(rs.stop, mb[1].stop)),
                                slice(min(cs.start, mb[2].start), max(cs.stop, mb[2].stop)))
        slices = sorted(boxes)
        fill = AirFill.of(volume, env, slices or [0], seed=fill_seed)
        tile = fill.tile(seed=fill_seed)
        fill_doc = {"kind": "ambient air of this scan (histogram and pixel correlation)",
                    **fill.summary()}
        tp = fill.tile_px
        g = env.grid
        inside3 = _inside_by(env, 3.0)
        den = inside3 & env.zone_coarse & env.body & (g.hu >= SOFT_RANGE_HU[0]) & (
            g.hu <= SOFT_RANGE_HU[1])
        den_px = den.sum(axis=(1, 2)) * g.f * g.f  # per coarse slice, in native pixels
        min_px = KEEP_MIN_MM2 / (env.stack.pixel_mm[0] * env.stack.pixel_mm[1])
        labels = labels_job.result()

        def apply_slice(k: int) -> tuple | None:
            """Remove and fill on native slice ``k``; its QA counts (None: nothing changed)."""
            rs, cs = boxes[k]
            sl = hu[k]
            zone, outside, body = env.slice_masks(k, sl, rs, cs)
            if not region.use_zone:
                zone[:] = False
            if mask is not None:
                zone |= mask[k, rs, cs]
            cand = zone & outside & body
            if not cand.any():
                return None
            sub = sl[rs, cs]
            keep = _keep_bright(sub, cand, min_px, bool((sl >= METAL_HU).any()),
                                env.exterior_air(k, sl, rs, cs), env.devices_near(k, rs, cs),
                                env.plastic_pixels(k, rs, cs))
            jj, ii = np.nonzero(cand & ~keep)
            if jj.size == 0:
                return None
            old = sub[jj, ii]
            a, b = np.random.default_rng([fill_seed, k]).integers(0, tp, 2)  # per slice: any order
            vals = tile[(jj + rs.start + a) % tp, (ii + cs.start + b) % tp]
            if np.issubdtype(out.dtype, np.integer):
                vals = np.rint(vals)
            vals = vals.astype(out.dtype)
            out[k, rs, cs][jj, ii] = vals
            changed = old != vals
            jj, ii, old = jj[changed], ii[changed], old[changed]
            kc = g.native_k[k]
            cj, ci = (jj + rs.start) // g.f, (ii + cs.start) // g.f
            soft = (old >= SOFT_RANGE_HU[0]) & (old <= SOFT_RANGE_HU[1])
            n_in = int(np.count_nonzero(inside3[kc][cj, ci] & soft))
            bad = (old <= BODY_THRESHOLD_HU) | ~env.body_grown[kc][cj, ci]
            return (jj.size, [int(np.count_nonzero(old >= thr)) for thr in BONE_HU],
                    np.bincount(labels[kc][cj, ci], minlength=len(REGION_NAMES)) * voxel_ml[k],
                    n_in * voxel_ml[k], (100.0 * n_in / den_px[kc]) if n_in and den_px[kc] else 0.0,
                    float(np.count_nonzero(bad)) * voxel_ml[k])

        # slices are independent (disjoint writes); numpy releases the GIL for the heavy parts
        with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
            for k, res in zip(slices, pool.map(apply_slice, slices)):
                if res is None or not res[0]:
                    continue
                changed_k.append(k)
                n, lost, regions, in_ml, pct, out_ml = res
                removed += n
                bone_lost = [x + y for x, y in zip(bone_lost, lost)]
                by_region += regions
                inside_changed_ml += in_ml
                worst_pct = max(worst_pct, pct)
                outside_body_ml += out_ml
    t3 = time.perf_counter()

    # ---- QA figures
    dice = [1.0 if b == 0 else 2.0 * (b - lost) / (2 * b - lost)
            for b, lost in zip(bone_before, bone_lost)]
    removed_ml = float(by_region.sum())
    inside_pct = 0.0
    if face_found and env.zone is not None and env.hull is not None:
        den_ml = float(den.sum()) * float(np.prod(env.grid.spacing_mm)) / 1000.0
        if den_ml > 0:
            inside_pct = 100.0 * inside_changed_ml / den_ml
    if not face_found:
        warnings.append(f"no face found: {reason}; nothing removed")
    nose_check: dict[str, Any] = {}
    nose, source = _nose_boxes(region.nose), "detector"
    if face_found and nose is None:
        nose, source = _landmark_nose(volume, env), "anatomy"
    if face_found and nose is not None:
        nose_check, nose_warning = _nose_check(volume, env, nose, out, source)
        if nose_warning:  # what auto promised of the detector's nose did not happen
            warnings = [w.replace(MODEL_NOSE_NOTE, "the detector's nose boxes were used")
                        for w in warnings] + [nose_warning]
    if face_found and env.plastic is not None and env.plastic.any():
        shell_ml = float(env.plastic.sum()) * float(np.prod(env.grid.spacing_mm)) / 1000.0
        warnings.append(
            f"{FACE_SHELL_NOTE} ({shell_ml:.1f} mL, not counted as skeleton): it was removed "
            "with the face where it lies outside the skeleton's hull; where it meets the bone "
            "part of it may stay and keep the face under it; review this series")
    lm = env.landmarks
    qa = DefaceQA(
        method=method.name,
        face_found=bool(face_found),
        no_face_reason="" if face_found else reason,
        removed_voxels=int(removed),
        removed_ml=round(removed_ml, 3),
        removed_ml_by_region={n: round(float(v), 3) for n, v in zip(REGION_NAMES, by_region)},
        inside_soft_changed_pct=round(inside_pct, 3),
        inside_soft_changed_pct_worst_slice=round(worst_pct, 3),
        outside_body_changed_ml=round(outside_body_ml, 3),
        bone_dice=float(dice[0]),
        bone_dice_150=float(dice[1]),
        bone_voxels_replaced=int(bone_lost[0]),
        face_ml=float(env.face_ml),
        landmarks=lm.as_dict(),
        zone={} if env.zone is None else {
            "parts": env.zone.names,
            "posterior_mm_behind_globes": env.settings.zone_posterior_mm,
            "superior_mm_above_globes": env.settings.zone_superior_mm},
        fill=fill_doc,
        geometry=_geometry(volume, env),
        warnings=warnings,
        # the envelope is found by the region method (anatomical, auto) or here (model)
        seconds={"region": round(t1 - t0 - (env.seconds if t2 - t1 < env.seconds else 0.0), 3),
                 "envelope": round(env.seconds, 3),
                 "apply": round(t3 - t2, 3), "qa": round(time.perf_counter() - t3, 3)},
        details=dict(region.details),
        nose_check=nose_check,
    )
    return DefaceResult(out, qa, region, tuple(changed_k))


def _nose_boxes(nose: np.ndarray | NoseBoxes | None) -> NoseBoxes | None:
    """``RegionResult.nose`` as :data:`NoseBoxes` (None when it holds no voxel)."""
    if nose is None:
        return None
    if isinstance(nose, tuple):
        box, sub = nose
    else:
        box = bbox_of(nose)
        if box is None:
            return None
        sub = nose[box]
    return (box, sub) if sub.any() else None


def _landmark_nose(volume: Volume, env: Envelope) -> NoseBoxes | None:
    """The anatomy's nose region as :data:`NoseBoxes` (None without the globes' centres):
    within 20 mm of the midline, in front of the globes' centres, from 10 mm below the nose tip
    to 8 mm below the globes' centres (the ``nose`` of the removed-volume figures), along the
    head's axes (:class:`pipeline.envelope.Landmarks`; LPS mm). Without a nose tip (none stood
    out of the hull: a nose may lie inside it), the tip is taken 45 mm below the globes."""
    lm, st = env.landmarks, env.stack
    if lm.anchor is None:
        return None
    left, post, sup = lm.axes
    tip_z = -45.0 if lm.nose_tip is None else float((lm.nose_tip - lm.anchor) @ sup)

    def plane(normal: np.ndarray, limit: float) -> np.ndarray:
        """Half-space ``normal · (x − anchor) <= limit``."""
        return np.append(normal, -(normal @ lm.anchor) - limit)

    region = FaceZone([np.array([plane(left, 20.0), plane(-left, 20.0), plane(post, 0.0),
                                 plane(-sup, 10.0 - tip_z), plane(sup, -8.0)])], ["nose"])
    nk, nj, ni = volume.hu.shape
    dj, di = st.pixel_mm
    rows = np.arange(nj)
    spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(nk):
        ((lo, hi),) = region.row_spans(st.origins[k], st.row, st.col, rows, dj, di, ni)
        if (np.ceil(lo) <= hi).any():
            spans[k] = (lo, hi)
    if not spans:
        return None
    ks = sorted(spans)
    lo_all = np.min([lo for lo, _ in spans.values()], axis=0)
    hi_all = np.max([hi for _, hi in spans.values()], axis=0)
    hit = np.flatnonzero(np.ceil(lo_all) <= hi_all)
    rs = slice(int(hit[0]), int(hit[-1]) + 1)
    cs = slice(int(np.ceil(lo_all[rs].min())), int(np.floor(hi_all[rs].max())) + 1)
    c = np.arange(cs.start, cs.stop)[None, :]
    sub = np.zeros((ks[-1] - ks[0] + 1, rs.stop - rs.start, cs.stop - cs.start), bool)
    for k, (lo, hi) in spans.items():  # the columns of each row within the region (as the zone)
        sub[k - ks[0]] = (c >= lo[rs, None]) & (c <= hi[rs, None])
    return (slice(ks[0], ks[-1] + 1), rs, cs), sub


def _nose_check(volume: Volume, env: Envelope, nose: NoseBoxes, new_hu: np.ndarray,
                source: str = "detector") -> tuple[dict[str, Any], str | None]:
    """Was the soft tissue around the nose (``nose``: the detector's nose boxes or the
    anatomy's nose region, says ``source``) removed where it
    lies outside the skeleton's hull? Returns the figures (mL, %) and a warning when the nose
    may be left: the boxes hold no soft tissue outside the hull but some inside it, under
    material as dense as bone at the air around the patient (a cast on the face joined the
    skeleton), or too little of what lies outside was removed (kept as a device's margin or
    as bone, outside the region; see :data:`NOSE_REMOVED_PCT` and the others).
    Soft tissue: :data:`SOFT_RANGE_HU` in the input, in or out of the body mask (a device's
    margin is counted); removed: changed in ``new_hu``."""
    (ks, rs, cs), where = nose
    voxel_ml = volume.slice_voxel_volumes_ml()
    outside_ml = removed_ml = inside_ml = dense_air_ml = 0.0
    for k in range(ks.start, ks.stop):
        m = where[k - ks.start]
        if not m.any():
            continue
        sl = volume.hu[k]
        outside = env.slice_masks(k, sl, rs, cs)[1]
        sub = sl[rs, cs]
        soft = m & (sub >= SOFT_RANGE_HU[0]) & (sub <= SOFT_RANGE_HU[1])
        out_soft = soft & outside
        outside_ml += np.count_nonzero(out_soft) * voxel_ml[k]
        removed_ml += np.count_nonzero(out_soft & (new_hu[k, rs, cs] != sub)) * voxel_ml[k]
        inside_ml += np.count_nonzero(soft & ~outside) * voxel_ml[k]
        # dense material at the air around the patient: a cast or mask on the face (skin,
        # even a sharpened skin edge, lies below it; bone lies under skin)
        air = ndi.binary_dilation(env.exterior_air(k, sl, rs, cs), np.ones((3, 3), bool))
        dense_air_ml += np.count_nonzero(air & m & (sub >= KEEP_SEED_HU)) * voxel_ml[k]
    pct = 100.0 * removed_ml / outside_ml if outside_ml > 0 else 0.0
    figures: dict[str, Any] = {
        "outside_ml": round(float(outside_ml), 2), "inside_ml": round(float(inside_ml), 2),
        "removed_pct": round(float(pct), 1) if outside_ml >= NOSE_OUTSIDE_MIN_ML else None,
        "dense_at_air_ml": round(float(dense_air_ml), 2),
        "nose_may_be_left": True, "source": source}
    if outside_ml < NOSE_OUTSIDE_MIN_ML:
        # none outside: a nose that is bone under thin skin (ge-head-ct's upper nose), one the
        # field of view cuts off — or one inside a hull that spans a cast lying on it
        if inside_ml < NOSE_INSIDE_ML or dense_air_ml < NOSE_DENSE_AIR_ML:
            figures["nose_may_be_left"] = False
            return figures, None
        lead = ("the detector found a nose, but its boxes hold" if source == "detector" else
                "where the anatomy places the nose there is")
        return figures, (
            f"{lead} no soft tissue outside the facial skeleton ({inside_ml:.1f} mL inside the "
            f"skeleton's hull is kept) and {dense_air_ml:.1f} mL of material as dense as bone at "
            "the air over it: a cast or mask on the face may count as skeleton and the nose may "
            "be left; review this series")
    if pct < NOSE_REMOVED_PCT:
        return figures, (
            f"only {pct:.0f} % of the soft tissue outside the facial skeleton in "
            f"{'the detector' if source == 'detector' else 'the anatomy'}'s nose region "
            f"({outside_ml:.1f} mL) was removed: the nose may be left; review this series")
    figures["nose_may_be_left"] = False
    return figures, None


def _inside_by(env: Envelope, depth_mm: float) -> np.ndarray:
    """Coarse mask of the hull shrunk by ≈ ``depth_mm`` (whole coarse voxels, rounded up)."""
    n = max(1, int(np.ceil(depth_mm / min(env.grid.spacing_mm))))
    return in_slabs(ndi.binary_erosion, env.inside, n, iterations=n)


# --------------------------------------------------------------------------- QA picture


def _window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def sample_plane(volume: Volume, origin: np.ndarray, u_dir: np.ndarray, v_dir: np.ndarray,
                 n_u: int, n_v: int, step_mm: float, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Nearest-neighbour reformat of ``arrays`` (shaped like ``volume.hu``) on a plane.

    Pixel ``(r, c)`` is the LPS point ``origin + c·step·u_dir + r·step·v_dir``;
    each takes the voxel of the native slice whose slab (Voronoi cell along the
    normal) contains it, so thick slices show as the bands they are. Points
    outside the volume read the first array's minimum.
    """
    # loaded on first use: pulls in scipy
    from .envelope import SliceStack

    st = SliceStack.of(volume)
    r, c = np.mgrid[0:n_v, 0:n_u]
    p = origin + (c[..., None] * u_dir + r[..., None] * v_dir) * step_mm
    t = (p - st.origins[0]) @ st.normal
    mids = (st.offsets_mm[:-1] + st.offsets_mm[1:]) / 2.0
    k = np.searchsorted(mids, t)
    ok = (t >= st.offsets_mm[0] - st.cells_mm[0] / 2) & (t <= st.offsets_mm[-1] + st.cells_mm[-1] / 2)
    k = np.clip(k, 0, st.n - 1)
    q = p - st.origins[k]
    dj, di = st.pixel_mm
    j = np.rint(q @ st.col / dj).astype(int)
    i = np.rint(q @ st.row / di).astype(int)
    nj, ni = volume.hu.shape[1:]
    ok &= (j >= 0) & (j < nj) & (i >= 0) & (i < ni)
    j, i = np.clip(j, 0, nj - 1), np.clip(i, 0, ni - 1)
    res = []
    for a in arrays:
        v = a[k, j, i]
        res.append(np.where(ok, v, np.asarray(a).min() if a.dtype != bool else False))
    return res


def qa_picture(volume: Volume, result: DefaceResult, *, n_axial: int = 4,
               window_hu: tuple[float, float] = (-250.0, 350.0)) -> np.ndarray:
    """RGB uint8 QA picture: original | de-identified, removed region in red.

    Rows: ``n_axial`` native axial slices spread over the removed region (full
    resolution, cropped to the head; anterior up, patient left on the image
    right) and a sagittal reformat through the midline between the globes
    (superior up, anterior left; 0.5 mm pixels, slabs of thick slices shown as
    they are). On the original the removed voxels are tinted red; on the
    de-identified image the skeleton hull's outline is drawn in yellow.
    Contains no text and no header data.
    """
    hu, new = volume.hu, result.hu
    env = result.region.envelope
    changed_k = list(result.changed_slices)
    if changed_k:
        pick = np.unique(np.linspace(changed_k[0], changed_k[-1], n_axial).round().astype(int))
    else:
        pick = np.unique(np.linspace(0, hu.shape[0] - 1, n_axial).round().astype(int))
    body_rows = np.flatnonzero((hu[pick] > -500).any(axis=(0, 2)))
    body_cols = np.flatnonzero((hu[pick] > -500).any(axis=(0, 1)))
    r0, r1 = (body_rows[0], body_rows[-1] + 1) if body_rows.size else (0, hu.shape[1])
    c0, c1 = (body_cols[0], body_cols[-1] + 1) if body_cols.size else (0, hu.shape[2])
    r0, c0 = max(0, r0 - 8), max(0, c0 - 8)
    r1, c1 = min(hu.shape[1], r1 + 8), min(hu.shape[2], c1 + 8)
    rows = []
    for k in pick:
        a, b = hu[k, r0:r1, c0:c1], new[k, r0:r1, c0:c1]
        rows.append(_pair(a, b, a != b, None, window_hu))
    # axial panels: anterior up needs the column direction to point to posterior
    if env is not None and env.stack.col @ np.array([0.0, 1.0, 0.0]) < 0:
        rows = [r[::-1] for r in rows]
    sag = _sagittal(volume, new, env, window_hu)
    if sag is not None:
        rows.append(sag)
    width = max(r.shape[1] for r in rows)
    gap = np.zeros((6, width, 3), np.uint8)
    out = []
    for r in rows:
        out += [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))), gap]
    return np.concatenate(out[:-1], axis=0)


def _pair(a: np.ndarray, b: np.ndarray, removed: np.ndarray, outline: np.ndarray | None,
          window_hu: tuple[float, float]) -> np.ndarray:
    ga, gb = _window(a, *window_hu), _window(b, *window_hu)
    left = np.repeat(ga[..., None], 3, axis=2)
    if removed.any():
        tint = left[removed].astype(np.float32)
        tint[:, 0] = 0.45 * tint[:, 0] + 140.0
        tint[:, 1:] *= 0.45
        left[removed] = tint.astype(np.uint8)
    right = np.repeat(gb[..., None], 3, axis=2)
    if outline is not None:
        edge = outline & ~ndi.binary_erosion(outline)
        right[edge] = (230, 200, 0)
    sep = np.full((a.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([left, sep, right], axis=1)


def _sagittal(volume: Volume, new: np.ndarray, env: Envelope | None,
              window_hu: tuple[float, float]) -> np.ndarray | None:
    if env is None:
        return None
    lm = env.landmarks
    left, post, sup = lm.axes
    centre = lm.anchor if lm.anchor is not None else env.grid.lps(*(np.array(env.grid.hu.shape) / 2))
    step = 0.5
    b_idx = np.nonzero(env.body[:, ::2, ::2])
    if b_idx[0].size == 0:
        return None
    body_pts = env.grid.lps(b_idx[0], 2 * b_idx[1], 2 * b_idx[2])
    rel = body_pts - centre
    ys, zs = rel @ post, rel @ sup
    y0, y1 = float(ys.min()) - 5, float(ys.max()) + 5
    z0, z1 = float(zs.min()) - 5, float(zs.max()) + 5
    origin = centre + y0 * post + z1 * sup
    n_u, n_v = int((y1 - y0) / step) + 1, int((z1 - z0) / step) + 1
    if n_u * n_v > 4_000_000:
        step = float(np.sqrt((y1 - y0) * (z1 - z0) / 4_000_000))
        n_u, n_v = int((y1 - y0) / step) + 1, int((z1 - z0) / step) + 1
    a, b = sample_plane(volume, origin, post, -sup, n_u, n_v, step, [volume.hu, new])
    outline = None
    if env.hull is not None:  # the hull's section with the reformat plane, row by row
        # loaded on first use: pulls in scipy
        from .envelope import polygon_row_spans

        poly = env.hull.plane_polygon(origin, post, -sup, left)
        lo, hi = polygon_row_spans(poly, np.arange(n_v), step, step)
        c = np.arange(n_u)[None, :]
        outline = (c >= lo[:, None]) & (c <= hi[:, None])
    return _pair(a, b, a != b, outline, window_hu)
