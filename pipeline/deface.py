"""Selective defacing: remove facial soft tissue from CT, keep bone, touch nothing else.

Two steps, deliberately separated so that different region finders plug in:

1. A :class:`FaceRegionMethod` (e.g. :class:`AnatomicalFaceRegion`, later a
   detector-based method) returns a boolean *region* mask: the voxels where
   soft tissue **may** be removed.
2. :func:`apply_region` (pure, arrays in / array out) sets the voxels of that
   region whose HU lies in the soft-tissue range to air. Voxels at or above the
   bone threshold, voxels outside the soft-tissue range and every voxel outside
   the region keep their exact original value (bit-identical).

:func:`deface` runs both and returns the new array plus QA figures
(removed volume in ml, bone Dice, region extent, warnings).

HU choices (defaults)
---------------------
* ``bone_threshold_hu = 300``: cancellous bone is ≳ 300 HU, cortical bone ≳ 1000 HU,
  enamel ≳ 2000 HU. Voxels ``>= 300`` are never modified, so bone Dice at 300 HU
  is 1 by construction.
* ``soft_range_hu = (-800, 200)``: fat ≈ −100, skin/muscle ≈ +40, eye ≈ +10,
  cartilage ≈ +100. The lower bound −800 removes partial-volume skin-edge voxels
  (≥ 20 % tissue), which an iso-surface renderer at −300…−700 HU would
  otherwise turn back into a face, while staying > 6 σ above typical air noise
  (−1000 ± 30) so air is not "removed". The upper bound 200 lies above soft
  tissue + noise and below the bone threshold; voxels in 200…300 HU (partial
  volume at the bone surface, calcifications) are kept.
* ``air_hu = -1000``: the value written.

Array conventions: ``hu[k, j, i]`` (slice, row, column), DICOM LPS geometry
from :class:`pipeline.volume.Volume`. Region finding is done in a *canonical
view* (axes = inferior→superior, anterior→posterior, right→left) obtained by
transposing/flipping according to the volume's direction cosines, so flipped
rows, reversed slice order and sagittal/coronal acquisitions work.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage as ndi

from .volume import Volume

__all__ = [
    "DEFAULT_AIR_HU",
    "DEFAULT_BONE_THRESHOLD_HU",
    "DEFAULT_SOFT_RANGE_HU",
    "AnatomicalFaceRegion",
    "DefaceError",
    "DefaceQA",
    "DefaceResult",
    "FaceRegionMethod",
    "RegionResult",
    "apply_region",
    "deface",
    "qa_image",
    "trim_behind_bone",
]

DEFAULT_BONE_THRESHOLD_HU = 300.0
DEFAULT_AIR_HU = -1000
DEFAULT_SOFT_RANGE_HU = (-800.0, 200.0)


class DefaceError(ValueError):
    """Bad input to defacing (shape/dtype mismatch, inconsistent HU thresholds, geometry)."""


# --------------------------------------------------------------------------- interface


@dataclass
class RegionResult:
    """Output of a :class:`FaceRegionMethod`.

    ``mask``: bool array, same shape as ``volume.hu`` (``[k, j, i]``); True = soft
    tissue may be removed there. ``warnings``: human-readable anatomy warnings
    (never patient identifiers). ``details``: method-specific numbers (landmarks
    in LPS mm, extents, timings). ``bbox``: optional tight bounding box of
    ``mask`` in array order ``(k, j, i)`` — a speed hint for :func:`apply_region`;
    when given, the mask must be False outside it.
    """

    mask: np.ndarray
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    bbox: tuple[slice, slice, slice] | None = None


@runtime_checkable
class FaceRegionMethod(Protocol):
    """Anything that finds the facial soft-tissue region of a CT volume."""

    name: str

    def face_region(self, volume: Volume) -> RegionResult:
        """Return the region (same shape as ``volume.hu``) where soft tissue may be removed."""
        ...


# --------------------------------------------------------------------------- apply


def _check_hu_params(
    dtype: np.dtype, bone_threshold_hu: float, air_hu: float, soft_range_hu: tuple[float, float]
) -> None:
    lo, hi = soft_range_hu
    if not lo < hi:
        raise DefaceError(f"soft_range_hu must be (low, high) with low < high, got {soft_range_hu}")
    if not hi < bone_threshold_hu:
        raise DefaceError(
            f"soft-tissue upper bound ({hi} HU) must be below bone_threshold_hu "
            f"({bone_threshold_hu} HU), otherwise bone could be removed"
        )
    if not air_hu < lo:
        raise DefaceError(
            f"air_hu ({air_hu}) must be below the soft-tissue range lower bound ({lo} HU)"
        )
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if info.min >= 0:
            raise DefaceError(f"hu must be a signed array of Hounsfield units, got dtype {dtype}")
        if not info.min <= air_hu <= info.max:
            raise DefaceError(f"air_hu={air_hu} is not representable in dtype {dtype}")
    elif not np.issubdtype(dtype, np.floating):
        raise DefaceError(f"hu must be an integer or floating array, got dtype {dtype}")


def bbox_of(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight bounding box of a 3D bool mask in array order, or None if empty."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)  # type: ignore[return-value]


def _apply_in_box(
    out_sub: np.ndarray, region_sub: np.ndarray, air_hu: float, soft_range_hu: tuple[float, float]
) -> np.ndarray:
    """Set soft-range voxels of ``region_sub`` to air in place; return the bool mask changed."""
    lo, hi = soft_range_hu
    remove = out_sub >= lo
    remove &= out_sub <= hi
    remove &= region_sub
    out_sub[remove] = air_hu
    return remove


def apply_region(
    hu: np.ndarray,
    region_mask: np.ndarray,
    *,
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU,
    air_hu: int = DEFAULT_AIR_HU,
    soft_range_hu: tuple[float, float] = DEFAULT_SOFT_RANGE_HU,
    bbox: tuple[slice, slice, slice] | None = None,
) -> np.ndarray:
    """Return a copy of ``hu`` with soft tissue inside ``region_mask`` set to air.

    Parameters
    ----------
    hu:
        3D array of Hounsfield units (any layout; signed integer or float dtype).
    region_mask:
        Bool array of the same shape; True where soft tissue may be removed.
    bone_threshold_hu:
        Voxels ``>= bone_threshold_hu`` are never modified. Must exceed the upper
        bound of ``soft_range_hu``.
    air_hu:
        Value written to removed voxels (must be below ``soft_range_hu[0]``, so the
        operation is idempotent).
    soft_range_hu:
        Inclusive ``(low, high)`` HU range treated as removable soft tissue
        (fat, skin, muscle, eye, cartilage and partial-volume skin edge).
    bbox:
        Optional bounding box (array order) outside which ``region_mask`` is
        known to be False; only a speed hint.

    Returns
    -------
    numpy.ndarray
        New array, same shape and dtype. Inside the region, voxels with
        ``low <= hu <= high`` become ``air_hu``; every other voxel (bone, values
        between ``high`` and the bone threshold, air, everything outside the
        region) is bit-identical to the input.
    """
    hu = np.asarray(hu)
    region_mask = np.asarray(region_mask)
    if hu.ndim != 3:
        raise DefaceError(f"hu must be 3D, got shape {hu.shape}")
    if region_mask.shape != hu.shape:
        raise DefaceError(
            f"region mask shape {region_mask.shape} does not match volume shape {hu.shape}"
        )
    if region_mask.dtype != bool:
        raise DefaceError(f"region mask must be bool, got dtype {region_mask.dtype}")
    _check_hu_params(hu.dtype, bone_threshold_hu, air_hu, soft_range_hu)
    out = hu.copy()
    if bbox is None:
        bbox = bbox_of(region_mask)
    if bbox is not None:
        _apply_in_box(out[bbox], region_mask[bbox], air_hu, soft_range_hu)
    return out


def trim_behind_bone(
    hu: np.ndarray,
    region_mask: np.ndarray,
    *,
    anterior_axis: int,
    anterior_is_low_index: bool,
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU,
) -> np.ndarray:
    """Remove from ``region_mask`` every voxel at or behind the first bone voxel of its AP ray.

    Rays run along array axis ``anterior_axis`` starting from the anterior side
    of the array (index 0 if ``anterior_is_low_index`` else the last index).
    A voxel is bone if ``hu >= bone_threshold_hu``. Works on any sub-box of a
    volume (``hu`` and ``region_mask`` same shape); returns a new bool array.
    Useful for any region method: it guarantees the region never reaches past
    the first bone (e.g. into the brain behind the frontal bone).
    """
    if hu.shape != region_mask.shape:
        raise DefaceError(f"shape mismatch: hu {hu.shape} vs region {region_mask.shape}")
    bone = hu >= bone_threshold_hu
    if not anterior_is_low_index:
        bone = np.flip(bone, axis=anterior_axis)
    n = bone.shape[anterior_axis]
    has_bone = bone.any(axis=anterior_axis, keepdims=True)
    first = np.where(has_bone, bone.argmax(axis=anterior_axis, keepdims=True), n)
    shape = [1, 1, 1]
    shape[anterior_axis] = n
    pos = np.arange(n, dtype=first.dtype).reshape(shape)
    in_front = pos < first
    if not anterior_is_low_index:
        in_front = np.flip(in_front, axis=anterior_axis)
    return region_mask & in_front


# --------------------------------------------------------------------------- canonical frame


@dataclass(frozen=True)
class _Frame:
    """Transpose + flips mapping array axes (k, j, i) to canonical (S↑, P↑, L↑)."""

    axes: tuple[int, int, int]  # original axis for canonical axis 0 (S), 1 (P), 2 (L)
    flips: tuple[bool, bool, bool]  # flip canonical axis after transposing

    @classmethod
    def of(cls, volume: Volume) -> _Frame:
        axes, flips = [], []
        for direction in ("S", "P", "L"):
            axis, sign = volume.axis_towards(direction)
            axes.append(axis)
            flips.append(sign < 0)
        if sorted(axes) != [0, 1, 2]:
            raise DefaceError(
                "cannot map the volume's direction cosines to distinct S/P/L array axes "
                "(strongly oblique orientation)"
            )
        return cls(tuple(axes), tuple(flips))  # type: ignore[arg-type]

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """A view of ``arr`` (array order) in canonical order."""
        v = np.transpose(arr, self.axes)
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return v[sl]

    def from_canonical(self, arr: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical` (a view)."""
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return np.transpose(arr[sl], np.argsort(self.axes))


def _take(a: np.ndarray, axis: int, sl: slice) -> np.ndarray:
    """View of ``a`` sliced by ``sl`` along ``axis``."""
    index = [slice(None)] * a.ndim
    index[axis] = sl
    return a[tuple(index)]


def _max_pool(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block maximum with block size ``factors`` (array order); partial edge blocks kept."""
    a = hu
    for axis, f in enumerate(factors):
        if f <= 1:
            continue
        n = a.shape[axis]
        m = n // f
        parts = []
        if m:
            red = _take(a, axis, slice(0, m * f, f)).copy()
            for b in range(1, f):
                np.maximum(red, _take(a, axis, slice(b, m * f, f)), out=red)
            parts.append(red)
        if n - m * f:
            parts.append(_take(a, axis, slice(m * f, None)).max(axis=axis, keepdims=True))
        a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
    return a


# --------------------------------------------------------------------------- anatomical method


@dataclass
class AnatomicalFaceRegion:
    """Facial soft-tissue region from anatomy alone (no trained model).

    Works on a max-pooled grid of about ``grid_mm`` (max pooling keeps thin
    bone and the skin edge) in the canonical view (S, P, L):

    1. body = largest connected component of ``hu > body_threshold_hu``
       (excludes the couch/table, positioning devices);
    2. per antero-posterior (AP) ray: skin entry and first bone
       (``hu >= bone_threshold_hu``; isolated early bone hits from noise are
       removed by a small grey closing of the bone-depth map);
    3. nose tip = strongest narrow anterior protrusion of the skin surface
       (minimum of the white top-hats of the anteriority map along and across
       the face, line footprints ``nose_footprint_mm`` long): the most anterior
       skin point whose protrusion is ≥ half the strongest one and ≥
       ``min_nose_protrusion_mm`` (and at most ``nose_max_behind_mm`` behind the
       most anterior skin point);
    4. orbits = deep holes of the bone-depth map (depth − grey opening with
       footprint ``hole_footprint_mm`` ≥ ``orbit_hole_mm``, bone behind, largest
       blob ≥ ``min_orbit_area_mm2`` per side) 12–65 mm lateral of and above the
       nose tip. Superior limit = top of the orbits + ``superior_margin_mm``
       (brow and lower forehead); lateral limits = lateral orbit edges ±
       ``lateral_margin_mm`` (≈ bizygomatic width);
    5. menton = lowest slice (``min_chin_below_mm``…``chin_search_mm`` below the
       nose tip) with midline bone within ``chin_bone_max_mm`` (AP) of the nose
       tip; inferior limit = menton − ``inferior_margin_mm`` (under the chin).
       Without enough anatomy (both orbits, or one orbit or the mandible with a
       nose not cut by the field of view) nothing is removed, with a warning;
    6. posterior limit = AP midpoint of the skull (≈ ear canals, at the level
       of the largest skull length above the orbits) − ``ear_margin_mm``, on a
       vertical plane turned with the head's yaw (principal axis of the skull's
       axial cross-section; tangent clipped to ± ``max_tilt``) and with the
       head's pitch: the nasion–pogonion line (deepest midline bone between
       the orbits' upper halves → most anterior midline bone ≤ 20 mm above the
       menton) is nearly perpendicular to the Frankfurt horizontal (facial
       angle ≈ 87.5°), so its tilt minus ``profile_baseline_deg`` estimates the
       flexion (+, chin down) or extension (−) of the head (``details
       ["pitch_deg"]``; clipped to ± ``max_pitch_deg``; none without a
       mandible, ``correct_pitch=False`` turns it off). On synthetic heads the
       estimate is within ±7° of the true pitch for ±18°;
    7. region = voxels within these limits that lie (a) in front of the first
       bone of their AP ray — exactly, at full resolution; on the coarse grid a
       ray may go at most ``bone_guard_mm`` past the pooled first bone (bounds
       the damage where a ray slips through a gap in thin bone), and across the
       nasal aperture (midline holes within ``aperture_half_width_mm``, from
       ``aperture_below_tip_mm`` below the nose tip up to the orbits) the bone
       depth is bridged by the grey opening so the nasal cavity is kept;
       (b) in front of the first enclosed air cavity (sinus) of the ray, so a
       wall too thin to reach the bone threshold does not open the way to the
       brain; (c) within ``skin_depth_mm`` of air (3D distance, ≈ 4 mm grid).
       So the nose, eyelids and eyes, lips, cheeks, chin pad and submental skin
       are included; brain (behind bone) and the deep neck never. The region
       also covers the air in front of the face, so devices moulded to the face
       (thermoplastic masks, in the soft-tissue HU range) are removed too.

    All distances are in millimetres, thresholds in HU. Implausible anatomy
    (landmark not found, face cut by the field of view) is reported in
    ``RegionResult.warnings``; fallbacks use typical distances to the nose tip.
    """

    name: str = "anatomical"
    body_threshold_hu: float = -500.0
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU
    grid_mm: float = 2.0
    nose_footprint_mm: float = 60.0
    min_nose_protrusion_mm: float = 8.0
    nose_max_behind_mm: float = 40.0
    hole_footprint_mm: float = 45.0
    orbit_hole_mm: float = 12.0
    min_orbit_area_mm2: float = 200.0
    bone_noise_closing_mm: float = 5.0
    superior_margin_mm: float = 40.0
    superior_fallback_mm: float = 95.0
    inferior_margin_mm: float = 20.0
    inferior_fallback_mm: float = 90.0
    chin_bone_max_mm: float = 55.0
    chin_search_mm: float = 120.0
    min_chin_below_mm: float = 25.0
    lateral_margin_mm: float = 30.0
    lateral_fallback_mm: float = 72.0
    ear_margin_mm: float = 7.0
    aperture_half_width_mm: float = 20.0
    aperture_below_tip_mm: float = 12.0
    posterior_fallback_mm: float = 100.0
    max_tilt: float = 0.5
    bone_guard_mm: float = 6.0
    skin_depth_mm: float = 40.0
    min_face_depth_mm: float = 0.0
    correct_pitch: bool = True
    profile_baseline_deg: float = 2.5
    max_pitch_deg: float = 30.0

    def face_region(self, volume: Volume) -> RegionResult:
        """Facial soft-tissue region of ``volume`` (see class docstring).

        Returns a :class:`RegionResult` whose ``mask`` has the shape of
        ``volume.hu`` and whose ``details`` hold landmarks in LPS mm
        (``nose_tip_lps_mm``, ``superior_limit_z_mm``, ``inferior_limit_z_mm``),
        the skull length (mm) and the grid used. An empty mask plus a warning is
        returned when no face is found (e.g. brain-only field of view).
        """
        t0 = time.perf_counter()
        hu = volume.hu
        frame = _Frame.of(volume)
        spacing = np.asarray(volume.spacing_mm, dtype=float)
        if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
            raise DefaceError(f"spacing_mm must be positive, got {volume.spacing_mm}")
        factors = tuple(max(1, round(self.grid_mm / s)) for s in spacing)
        pooled = _max_pool(hu, factors)  # type: ignore[arg-type]
        low_spacing = spacing * np.asarray(factors)
        c = frame.to_canonical(pooled)
        ds, da, dl = (float(low_spacing[a]) for a in frame.axes)
        warnings: list[str] = []
        details: dict[str, Any] = {"grid_factors_kji": factors}

        def give_up(msg: str) -> RegionResult:
            warnings.append(msg)
            details["seconds"] = round(time.perf_counter() - t0, 3)
            return RegionResult(np.zeros(hu.shape, dtype=bool), warnings, details, None)

        ns, na, nl = c.shape
        body = c > self.body_threshold_hu
        lab, n = ndi.label(body)
        if n == 0:
            return give_up("no body found (nothing above the body threshold); nothing removed")
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body = lab == int(np.argmax(sizes))
        del lab

        has_body = body.any(axis=1)
        e = np.where(has_body, body.argmax(axis=1), na).astype(np.float32)
        bone = c >= self.bone_threshold_hu
        bone &= body
        has_bone = bone.any(axis=1)
        if not has_bone.any():
            return give_up("no bone found in the body; face region not determined, nothing removed")
        b = np.where(has_bone, bone.argmax(axis=1), na).astype(np.float32)
        back = np.where(has_bone, na - 1 - bone[:, ::-1, :].argmax(axis=1), -1)
        close = (_odd(self.bone_noise_closing_mm / ds), _odd(self.bone_noise_closing_mm / dl))
        b = ndi.grey_closing(b, size=close)  # drops isolated early "bone" hits (noise)

        # --- nose tip: strongest narrow anterior protrusion of the skin surface
        ant = _fill_rows(((na - e) * da).astype(np.float32), has_body)
        # a spot-like protrusion stands out both across (l) and along (s) the face
        tophat = np.minimum(
            ant - ndi.grey_opening(ant, size=(1, _odd(self.nose_footprint_mm / dl))),
            ant - ndi.grey_opening(ant, size=(_odd(self.nose_footprint_mm / ds), 1)),
        )
        # the nose tip is among the most anterior skin points
        tophat[~has_body | (ant < ant[has_body].max() - self.nose_max_behind_mm)] = 0
        # the most anterior of the strong protrusions (eyelids, lips, chin are behind it)
        strong = tophat >= max(self.min_nose_protrusion_mm, 0.5 * float(tophat.max()))
        s_t, l_t = np.unravel_index(int(np.argmax(np.where(strong, ant, -np.inf))), ant.shape)
        protrusion_mm = float(tophat[s_t, l_t])
        details["nose_protrusion_mm"] = round(protrusion_mm, 1)
        if protrusion_mm < self.min_nose_protrusion_mm:
            return give_up(
                f"no nose-like protrusion found (max {protrusion_mm:.1f} mm < "
                f"{self.min_nose_protrusion_mm} mm); face not in field of view? nothing removed"
            )
        a_t = float(e[s_t, l_t])

        s_idx = np.arange(ns)[:, None]
        l_idx = np.arange(nl)[None, :]

        # --- orbits: deep holes of the bone-depth map above the nose tip
        hfp = (_odd(self.hole_footprint_mm / ds), _odd(self.hole_footprint_mm / dl))
        b_open = ndi.grey_opening(b, size=hfp)
        hole_mm = (b - b_open) * da
        above = (s_idx > s_t) & (s_idx <= s_t + 90.0 / ds)
        side = (l_idx - l_t) * dl
        cand = (hole_mm >= self.orbit_hole_mm) & has_bone & above & (np.abs(side) >= 12.0)
        cand &= np.abs(side) <= 65.0
        min_cells = self.min_orbit_area_mm2 / (ds * dl)
        right = _largest_blob(cand & (side < 0), min_cells)
        left = _largest_blob(cand & (side > 0), min_cells)
        # --- menton: lowest midline bone close (in AP) to the nose tip
        mid = np.abs(side) <= 10.0
        below = (s_idx < s_t) & (s_idx >= s_t - self.chin_search_mm / ds)
        chin = has_bone & mid & below & ((b - a_t) * da <= self.chin_bone_max_mm)
        if chin.any() and (s_t - np.flatnonzero(chin.any(1))[0]) * ds < self.min_chin_below_mm:
            chin[:] = False  # bone just below the protrusion only: not a mandible
        # enough anatomy to call it a face: both orbits, or one of orbit / mandible with a
        # nose that is not cut by the field of view, or one orbit and the mandible
        margin = 10.0 / ds
        nose_inside = margin <= s_t <= ns - 1 - margin
        n_orbits = int(right.any()) + int(left.any())
        evidence = n_orbits == 2 or (n_orbits == 1 and chin.any())
        evidence = evidence or ((n_orbits == 1 or chin.any()) and nose_inside)
        if not evidence:
            return give_up(
                "no face found: orbits/mandible missing around the most nose-like "
                "protrusion (face not in the field of view?); nothing removed"
            )
        if a_t <= 0:
            warnings.append("the face touches the anterior edge of the field of view (face cut?)")

        if right.any() or left.any():
            both = right | left
            rows_o = np.flatnonzero(both.any(1))
            cols_o = np.flatnonzero(both.any(0))
            s_orbit, s_orbit_low = int(rows_o[-1]), int(rows_o[0])
            s_sup = s_orbit + self.superior_margin_mm / ds
            # lateral edges; a missing side is mirrored about the nose tip
            reach_r = l_t - cols_o[0] if right.any() else cols_o[-1] - l_t
            reach_l = cols_o[-1] - l_t if left.any() else l_t - cols_o[0]
            l_lo = l_t - reach_r - self.lateral_margin_mm / dl
            l_hi = l_t + reach_l + self.lateral_margin_mm / dl
            if not (right.any() and left.any()):
                warnings.append("only one orbit found; the other side mirrored about the nose")
        else:
            warnings.append(
                "no orbits found above the nose; superior/lateral limits from typical "
                "distances to the nose tip"
            )
            s_orbit = int(s_t + 50.0 / ds)
            s_orbit_low = int(s_t + 20.0 / ds)
            s_sup = s_t + self.superior_fallback_mm / ds
            l_lo = l_t - self.lateral_fallback_mm / dl
            l_hi = l_t + self.lateral_fallback_mm / dl
        if s_sup > ns - 1:
            warnings.append("the forehead reaches the superior edge of the field of view")
        if chin.any():
            s_menton = int(np.flatnonzero(chin.any(1))[0])
        else:
            warnings.append("mandible not found below the nose; inferior limit from typical distance")
            s_menton = int(s_t - (self.inferior_fallback_mm - self.inferior_margin_mm) / ds)
        s_inf = s_menton - self.inferior_margin_mm / ds
        pitch = _pitch_from_profile(b, has_bone, l_t, s_t, s_orbit, s_orbit_low,
                                    s_menton if chin.any() else None, ds, da, dl)
        if pitch is not None:
            details["profile_angle_deg"] = round(float(np.degrees(np.arctan(pitch))), 1)
        if s_inf < 0:
            warnings.append("the chin reaches the inferior edge of the field of view (face cut?)")

        # --- posterior limit: in front of the ears ≈ AP middle of the skull
        rows = slice(max(0, s_orbit), min(ns, int(s_orbit + 60.0 / ds) + 1))
        front = np.where(has_bone[rows], b[rows], np.inf).min(axis=1)
        rear = back[rows].max(axis=1)
        length = np.where(np.isfinite(front), rear - front, -1.0)
        best = int(np.argmax(length)) if length.size else 0
        skull_mm = float(length[best]) * da if length.size else 0.0
        details["skull_length_mm"] = round(skull_mm, 1)
        if 120.0 <= skull_mm <= 260.0:
            post = (front[best] + rear[best]) / 2.0 - self.ear_margin_mm / da
            if rear[best] >= na - 1:
                warnings.append("the skull touches the posterior edge of the field of view")
        else:
            warnings.append(
                f"implausible skull length ({skull_mm:.0f} mm) above the orbits; posterior "
                "limit from typical distance to the nose tip"
            )
            post = a_t + self.posterior_fallback_mm / da

        # the posterior limit is a head-coronal plane: turn it with the head's yaw, the
        # principal axis of the skull's axial cross-section (bone hull) above the orbits
        hull_rows = slice(
            max(0, int(s_orbit + 10.0 / ds)), min(ns, int(s_orbit + 60.0 / ds) + 1)
        )
        tan_yaw, centre_l = _yaw_from_hull(
            b[hull_rows], back[hull_rows], has_bone[hull_rows], da, dl
        )
        tan_yaw = float(np.clip(tan_yaw, -self.max_tilt, self.max_tilt))
        details["yaw_deg"] = round(float(np.degrees(np.arctan(tan_yaw))), 1)
        if centre_l is None:
            centre_l = float(l_t)
        post_l = post + tan_yaw * (l_idx - centre_l) * dl / da  # (1, l)
        # ... and with the head's pitch: the nasion–pogonion line is close to perpendicular
        # to the Frankfurt horizontal (facial angle ≈ 87.5°), so its tilt beyond
        # profile_baseline_deg is the head's flexion (+) or extension (−)
        tan_pitch = 0.0
        if pitch is not None and self.correct_pitch:
            pitch_deg = float(np.degrees(np.arctan(pitch))) - self.profile_baseline_deg
            if abs(pitch_deg) > self.max_pitch_deg:
                warnings.append(f"head pitch estimate {pitch_deg:+.0f}° beyond ±{self.max_pitch_deg:.0f}°; "
                                f"clipped (check the region)")
                pitch_deg = float(np.clip(pitch_deg, -self.max_pitch_deg, self.max_pitch_deg))
            details["pitch_deg"] = round(pitch_deg, 1)
            tan_pitch = float(np.tan(np.radians(pitch_deg)))
        s_ref = rows.start + best
        post_l = post_l - tan_pitch * (s_idx - s_ref) * ds / da  # (s, l)

        # --- low-resolution region: limits ∩ in front of first bone ∩ near skin/air
        s0, s1 = max(0, int(np.ceil(s_inf))), min(ns, int(np.floor(s_sup)) + 1)
        l0, l1 = max(0, int(np.ceil(l_lo))), min(nl, int(np.floor(l_hi)) + 1)
        post_l = post_l[s0:s1, l0:l1]
        if self.min_face_depth_mm > 0 and s0 < s1 and l0 < l1:
            # per row, never closer than min_face_depth_mm behind the row's most anterior
            # skin: a pitched head tilts the face against the vertical plane above, which
            # would otherwise cut the jaw/cheeks (flexion) or the forehead (extension)
            e_rows = np.where(has_body[s0:s1, l0:l1], e[s0:s1, l0:l1], np.inf).min(axis=1)
            floor_a = np.where(np.isfinite(e_rows), e_rows + self.min_face_depth_mm / da, -np.inf)
            post_l = np.maximum(post_l, floor_a[:, None])
        a1 = min(na, int(np.floor(post_l.max())) + 1) if post_l.size else 0
        if s0 >= s1 or l0 >= l1 or a1 <= 0:
            return give_up("face region is empty after anatomical limits; nothing removed")
        # bone depth bridged across the midline holes (nasal aperture, open mouth) so the
        # nasal cavity and the oral cavity are not emptied; elsewhere the first bone
        midhole = (hole_mm >= self.orbit_hole_mm) & (np.abs(side) < self.aperture_half_width_mm)
        midhole &= (s_idx <= s_orbit_low) & (s_idx >= s_t - self.aperture_below_tip_mm / ds)
        # the aperture is closed laterally by the maxillae: drop holes reaching the band's
        # sides (e.g. the cheeks lateral to the maxilla, which are facial soft tissue)
        lab2, n2 = ndi.label(midhole)
        if n2:
            edge = np.abs(np.abs(side) - self.aperture_half_width_mm) < 1.5 * dl
            open_side = np.zeros(n2 + 1, dtype=bool)
            open_side[np.unique(lab2[edge & (lab2 > 0)])] = True
            midhole = (lab2 > 0) & ~open_side[lab2]
        grow = np.ones((_odd(8.0 / ds), _odd(8.0 / dl)), bool)
        midhole = ndi.binary_dilation(midhole, structure=grow)
        midhole &= ~ndi.binary_dilation(right | left, structure=grow)
        near, cavity = self._air_maps(body, bone, (s0, s1, a1, l0, l1), (ds, da, dl))
        del bone
        guard = max(1, int(np.ceil(self.bone_guard_mm / da)))
        limit = np.where(midhole, b_open + 1, b + guard)
        stop = np.minimum(np.minimum(limit[s0:s1, l0:l1], cavity), np.floor(post_l))
        in_front = np.arange(a1)[None, :, None] <= stop[:, None, :]
        region_c = np.zeros((ns, na, nl), dtype=bool)
        region_c[s0:s1, :a1, l0:l1] = in_front & near
        region_low = frame.from_canonical(region_c)

        # --- upsample inside the bounding box and trim at the first full-res bone voxel
        box_low = bbox_of(region_low)
        if box_low is None:
            return give_up("face region is empty after anatomical limits; nothing removed")
        box = tuple(
            slice(sl.start * f, min(sl.stop * f, n_full))
            for sl, f, n_full in zip(box_low, factors, hu.shape)
        )
        sub = np.ascontiguousarray(region_low[box_low])
        for axis, f in enumerate(factors):
            if f > 1:
                sub = np.repeat(sub, f, axis=axis)
        sub = sub[tuple(slice(0, s.stop - s.start) for s in box)]
        sub = trim_behind_bone(
            hu[box], sub, anterior_axis=frame.axes[1], anterior_is_low_index=not frame.flips[1],
            bone_threshold_hu=self.bone_threshold_hu,
        )
        mask = np.zeros(hu.shape, dtype=bool)
        mask[box] = sub

        # --- landmarks for QA (LPS mm)
        def lps(s: float, a: float, l_: float) -> list[float]:
            canon = np.array([s, a, l_], dtype=float)
            low = np.empty(3)
            shape_c = (ns, na, nl)
            for ci, (ax, fl) in enumerate(zip(frame.axes, frame.flips)):
                low[ax] = (shape_c[ci] - 1 - canon[ci]) if fl else canon[ci]
            full = low * np.asarray(factors) + (np.asarray(factors) - 1) / 2.0
            ijk1 = np.array([full[2], full[1], full[0], 1.0])
            return [round(float(x), 1) for x in (volume.affine() @ ijk1)[:3]]

        details.update(
            nose_tip_lps_mm=lps(s_t, a_t, l_t),
            superior_limit_z_mm=lps(min(s_sup, ns - 1), a_t, l_t)[2],
            inferior_limit_z_mm=lps(max(s_inf, 0), a_t, l_t)[2],
            seconds=round(time.perf_counter() - t0, 3),
        )
        return RegionResult(mask, warnings, details, box)  # type: ignore[arg-type]

    def _air_maps(
        self, body: np.ndarray, bone: np.ndarray, lims: tuple[int, int, int, int, int],
        spacing: tuple[float, float, float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distance-to-air mask and first enclosed air cavity per ray, canonical low-res grid.

        Works on the sub-box ``[s0:s1, :a1, l0:l1]`` padded by ``skin_depth_mm``.
        Returns ``near`` (bool, sub-box shape): within ``skin_depth_mm`` of any
        non-body voxel — 3D Euclidean distance on a grid coarsened to ≈ 4 mm
        (max-pooled body, so distances are under- rather than over-estimated);
        and ``cavity`` (int, ``(s1 - s0, l1 - l0)``): AP index of the first voxel
        of an enclosed air cavity touching bone (sinus, closed airway: air not
        connected to the outside within the padded box), ``a1`` if none — the
        region stops there so that a bone wall missing from the image (thin,
        partial volume) does not open a path to the brain behind a sinus. Air
        enclosed by soft tissue only (e.g. between the face and a thermoplastic
        mask) does not stop the region.
        """
        s0, s1, a1, l0, l1 = lims
        ns, na, nl = body.shape
        pads = [int(np.ceil(self.skin_depth_mm / d)) for d in spacing]
        ps0, ps1 = max(0, s0 - pads[0]), min(ns, s1 + pads[0])
        pa1 = min(na, a1 + pads[1])
        pl0, pl1 = max(0, l0 - pads[2]), min(nl, l1 + pads[2])
        crop = body[ps0:ps1, :pa1, pl0:pl1]
        inner = (slice(s0 - ps0, s1 - ps0), slice(0, a1), slice(l0 - pl0, l1 - pl0))

        cf = tuple(max(1, int(4.0 // d)) for d in spacing)
        coarse = _max_pool(crop, cf)  # type: ignore[arg-type]
        dist = ndi.distance_transform_edt(
            coarse, sampling=tuple(d * f for d, f in zip(spacing, cf))
        )
        near = dist <= self.skin_depth_mm
        for axis, f in enumerate(cf):
            if f > 1:
                near = np.repeat(near, f, axis=axis)
        near = near[inner]

        lab, n = ndi.label(~crop)
        if n:
            faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
            outside = np.zeros(n + 1, dtype=bool)
            for f_ in faces:
                outside[np.unique(f_)] = True
            outside[0] = True
            bony = np.zeros(n + 1, dtype=bool)
            bony[np.unique(lab[ndi.binary_dilation(bone[ps0:ps1, :pa1, pl0:pl1])])] = True
            enclosed = (~outside & bony)[lab[inner]]
            cavity = np.where(enclosed.any(axis=1), enclosed.argmax(axis=1), a1)
        else:
            cavity = np.full((s1 - s0, l1 - l0), a1)
        return near, cavity


def _pitch_from_profile(
    b: np.ndarray, has_bone: np.ndarray, l_t: int, s_t: int, s_orbit: int, s_orbit_low: int,
    s_menton: int | None, ds: float, da: float, dl: float,
) -> float | None:
    """Tangent of the nasion–pogonion line against the vertical, in the midsagittal plane.

    ``b[s, l]``: first-bone depth map (canonical rows s → superior, columns l);
    nasion = deepest midline bone point in the upper half of the orbits' height
    (below it the thin nasal bones may be missed by the bone threshold);
    pogonion = most anterior midline bone point within 20 mm above the menton
    (higher up the alveolus and incisors lie further forward).
    Positive when the pogonion lies posterior to the nasion (head flexed, chin
    down). ``None`` without a mandible or with an implausible profile.
    """
    if s_menton is None:
        return None
    half = max(1, int(round(6.0 / dl)))
    cols = slice(max(0, l_t - half), l_t + half + 1)
    mid = np.where(has_bone[:, cols], b[:, cols], np.inf).min(axis=1)
    n_rows = np.arange(max(0, (s_orbit_low + s_orbit) // 2), min(b.shape[0], s_orbit + 1))
    p_rows = np.arange(max(0, s_menton), min(b.shape[0], int(s_menton + 20.0 / ds) + 1))
    n_rows = n_rows[np.isfinite(mid[n_rows])]
    p_rows = p_rows[np.isfinite(mid[p_rows])]
    if n_rows.size == 0 or p_rows.size == 0:
        return None
    s_n = int(n_rows[np.argmax(mid[n_rows])])
    s_p = int(p_rows[np.argmin(mid[p_rows])])
    height = (s_n - s_p) * ds
    if height < 60.0:
        return None
    return float((mid[s_p] - mid[s_n]) * da / height)


def _yaw_from_hull(
    front: np.ndarray, rear: np.ndarray, valid: np.ndarray, da: float, dl: float
) -> tuple[float, float | None]:
    """Tangent of the head's yaw from the skull's axial cross-sections (canonical grid).

    ``front``/``rear``: first/last bone index along each AP ray of some rows
    (shape ``(rows, l)``), ``valid``: rays with bone. Each ray contributes the
    AP segment [front, rear] (the bone hull); the principal (long, AP) axis of
    the hull's second moments in mm gives d(AP)/d(L), i.e. how much further
    posterior the left side is per mm to the left, and the hull's centroid
    column (grid units); ``(0, None)`` if undetermined.
    """
    if valid.sum() < 10:
        return 0.0, None
    l_mm = np.nonzero(valid)[1].astype(float) * dl
    f = front[valid].astype(float) * da
    r = rear[valid].astype(float) * da
    w = np.maximum(r - f, 0.0)  # segment length (mass)
    if w.sum() <= 0:
        return 0.0, None
    m_a = (f + r) / 2.0
    var_a_seg = w ** 2 / 12.0
    tot = w.sum()
    ca, cl = (w * m_a).sum() / tot, (w * l_mm).sum() / tot
    s_aa = (w * ((m_a - ca) ** 2 + var_a_seg)).sum() / tot
    s_ll = (w * (l_mm - cl) ** 2).sum() / tot
    s_al = (w * (m_a - ca) * (l_mm - cl)).sum() / tot
    # long (AP) axis at angle θ from the AP direction towards L: tan(2θ) = 2 s_al / (s_aa - s_ll);
    # the head's coronal plane is perpendicular to it: d(AP)/d(L) = −tan θ
    theta = 0.5 * np.arctan2(2.0 * s_al, s_aa - s_ll)
    return float(-np.tan(theta)), float(cl / dl)


def _fill_rows(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill invalid entries of a 2D map row by row by linear interpolation / flat extension.

    Rows without any valid entry get the minimum of the valid values.
    """
    out = values.copy()
    fill = float(values[valid].min()) if valid.any() else 0.0
    pos = np.arange(values.shape[1])
    for r in range(values.shape[0]):
        ok = valid[r]
        if ok.all():
            continue
        out[r] = np.interp(pos, pos[ok], values[r, ok]) if ok.any() else fill
    return out


def _largest_blob(mask: np.ndarray, min_cells: float) -> np.ndarray:
    """Largest 8-connected component of a 2D mask, or all False if smaller than ``min_cells``."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask & False
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    best = int(np.argmax(sizes))
    return lab == best if sizes[best] >= min_cells else mask & False


def _odd(n: float) -> int:
    """Nearest odd integer ≥ 1 (footprint size in grid cells)."""
    k = max(1, round(n))
    return k if k % 2 else k + 1


# --------------------------------------------------------------------------- deface + QA


@dataclass
class DefaceQA:
    """QA figures of one defacing run (no patient identifiers).

    ``removed_ml``: volume of voxels changed to air (ml); ``region_ml``: volume of the
    region; ``bone_dice``: Dice of ``hu > bone_threshold_hu`` before vs after (1.0 =
    bone untouched); ``region_extent``: array index ranges ``{"k": [start, stop], ...}``
    and their sizes in mm; ``method``: region method name; ``warnings``: anatomy
    warnings; ``seconds``: wall time of region finding and application.
    """

    method: str
    removed_voxels: int
    removed_ml: float
    region_voxels: int
    region_ml: float
    bone_dice: float
    region_extent: dict[str, Any]
    warnings: list[str]
    bone_threshold_hu: float
    soft_range_hu: tuple[float, float]
    air_hu: float
    seconds: dict[str, float]
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON-serialisable dict."""
        return asdict(self)


@dataclass
class DefaceResult:
    """Result of :func:`deface`: new HU array (same shape/dtype), QA figures, region."""

    hu: np.ndarray
    qa: DefaceQA
    region: RegionResult


def deface(
    volume: Volume,
    method: FaceRegionMethod | None = None,
    *,
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU,
    air_hu: int = DEFAULT_AIR_HU,
    soft_range_hu: tuple[float, float] = DEFAULT_SOFT_RANGE_HU,
) -> DefaceResult:
    """Remove facial soft tissue of ``volume`` (HU, ``hu[k, j, i]``) found by ``method``.

    ``method`` defaults to :class:`AnatomicalFaceRegion`. HU parameters are those
    of :func:`apply_region`. Bone (``>= bone_threshold_hu``) and everything outside
    the region are bit-identical in the output; ``volume`` is not modified.
    Returns a :class:`DefaceResult` with QA figures (volumes in ml).
    """
    method = AnatomicalFaceRegion() if method is None else method
    if not isinstance(method, FaceRegionMethod):
        raise DefaceError("method must provide .name and .face_region(volume)")
    hu = volume.hu
    _check_hu_params(hu.dtype, bone_threshold_hu, air_hu, soft_range_hu)
    t0 = time.perf_counter()
    region = method.face_region(volume)
    t1 = time.perf_counter()
    mask = np.asarray(region.mask)
    if mask.shape != hu.shape or mask.dtype != bool:
        raise DefaceError(
            f"method {method.name!r} returned a region of shape {mask.shape} / dtype "
            f"{mask.dtype}, expected bool {hu.shape}"
        )
    box = region.bbox if region.bbox is not None else bbox_of(mask)
    out = hu.copy()
    removed = region_voxels = bone_lost = 0
    if box is not None:
        region_sub = mask[box]
        region_voxels = int(np.count_nonzero(region_sub))
        remove = _apply_in_box(out[box], region_sub, air_hu, soft_range_hu)
        removed = int(np.count_nonzero(remove))
        bone_lost = int(np.count_nonzero(hu[box][remove] > bone_threshold_hu))
    # Dice of (hu > bone threshold) before vs after, exactly, from the changed voxels only:
    # A = bone before, B = bone after; only changed voxels can differ between them
    bone_before = sum(  # in slabs: no full-volume temporary
        int(np.count_nonzero(hu[k:k + 16] > bone_threshold_hu)) for k in range(0, hu.shape[0], 16)
    )
    bone_gained = removed if air_hu > bone_threshold_hu else 0
    inter = bone_before - bone_lost
    denom = 2 * bone_before - bone_lost + bone_gained
    dice = 1.0 if denom == 0 else 2.0 * inter / denom
    t2 = time.perf_counter()

    voxel_ml = volume.voxel_volume_ml
    extent: dict[str, Any] = {}
    if box is not None:
        for name, sl, sp in zip("kji", box, volume.spacing_mm):
            extent[name] = [sl.start, sl.stop]
            extent[f"{name}_mm"] = round((sl.stop - sl.start) * sp, 1)
    qa = DefaceQA(
        method=method.name,
        removed_voxels=removed,
        removed_ml=round(removed * voxel_ml, 3),
        region_voxels=region_voxels,
        region_ml=round(region_voxels * voxel_ml, 3),
        bone_dice=dice,
        region_extent=extent,
        warnings=list(region.warnings),
        bone_threshold_hu=float(bone_threshold_hu),
        soft_range_hu=(float(soft_range_hu[0]), float(soft_range_hu[1])),
        air_hu=float(air_hu),
        seconds={"region": round(t1 - t0, 3), "apply": round(t2 - t1, 3)},
        details=dict(region.details),
    )
    return DefaceResult(out, qa, region)


# --------------------------------------------------------------------------- QA image


def qa_image(
    volume: Volume,
    result: DefaceResult,
    *,
    window_hu: tuple[float, float] = (-1000.0, 1000.0),
    pixel_mm: float | None = None,
) -> np.ndarray:
    """RGB uint8 QA picture: mid-face sagittal and axial slices, before | after.

    Slices are shown in the canonical view (sagittal: superior up, anterior
    left; axial: anterior up, patient left on the image right), pass through
    the centre of the region (or of the volume if the region is empty) and are
    resampled (nearest neighbour) to square pixels of ``pixel_mm`` (default:
    the finest spacing). The region outline is drawn in red on the "before"
    panels. Intensities are windowed linearly to ``window_hu``. Returns an
    array ``(rows, cols, 3)``; saving it is left to the caller (no file names
    derived from the data).
    """
    frame = _Frame.of(volume)
    before = frame.to_canonical(volume.hu)
    after = frame.to_canonical(result.hu)
    region = frame.to_canonical(result.region.mask)
    ds, da, dl = (float(volume.spacing_mm[a]) for a in frame.axes)
    px = min(ds, da, dl) if pixel_mm is None else float(pixel_mm)
    if not px > 0:
        raise DefaceError(f"pixel_mm must be positive, got {pixel_mm}")
    box = bbox_of(region)
    centre = [n // 2 for n in before.shape] if box is None else [
        (s.start + s.stop) // 2 for s in box
    ]
    lo, hi = window_hu

    def square(img: np.ndarray, d_row: float, d_col: float) -> np.ndarray:
        rows = (np.arange(max(1, round(img.shape[0] * d_row / px))) * px / d_row).astype(int)
        cols = (np.arange(max(1, round(img.shape[1] * d_col / px))) * px / d_col).astype(int)
        return img[np.minimum(rows, img.shape[0] - 1)][:, np.minimum(cols, img.shape[1] - 1)]

    def panel(v: np.ndarray, m: np.ndarray | None, d_row: float, d_col: float) -> np.ndarray:
        g = np.clip((square(v, d_row, d_col).astype(np.float32) - lo) / (hi - lo), 0, 1)
        rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)
        if m is not None:
            m = square(m, d_row, d_col)
            rgb[m & ~ndi.binary_erosion(m)] = (255, 0, 0)
        return rgb

    def sag(v: np.ndarray) -> np.ndarray:  # superior up, anterior left
        return v[::-1, :, centre[2]]

    def axi(v: np.ndarray) -> np.ndarray:  # anterior up, patient left on the image right
        return v[centre[0], :, :]

    top = np.concatenate(
        [panel(sag(before), sag(region), ds, da), panel(sag(after), None, ds, da)], axis=1
    )
    bot = np.concatenate(
        [panel(axi(before), axi(region), da, dl), panel(axi(after), None, da, dl)], axis=1
    )
    width = max(top.shape[1], bot.shape[1])

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)))

    return np.concatenate([pad(top), pad(bot)], axis=0)
