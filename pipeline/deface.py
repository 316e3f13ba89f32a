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


def _bbox_of(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
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
) -> int:
    """Set soft-range voxels of ``region_sub`` to air in place; return the number changed."""
    lo, hi = soft_range_hu
    remove = (out_sub >= lo)
    remove &= out_sub <= hi
    remove &= region_sub
    out_sub[remove] = air_hu
    return int(np.count_nonzero(remove))


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
        bbox = _bbox_of(region_mask)
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


def _max_pool(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block maximum with block size ``factors`` (array order); partial edge blocks kept."""
    a = hu
    for axis, f in enumerate(factors):
        if f <= 1:
            continue
        n = a.shape[axis]
        m = n // f

        def take(start: int, stop: int | None, step: int | None, ax: int = axis) -> np.ndarray:
            sl = [slice(None)] * 3
            sl[ax] = slice(start, stop, step)
            return a[tuple(sl)]

        parts = []
        if m:
            red = take(0, m * f, f).copy()
            for b in range(1, f):
                np.maximum(red, take(b, m * f, f), out=red)
            parts.append(red)
        if n - m * f:
            parts.append(take(m * f, None, None).max(axis=axis, keepdims=True))
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
    2. per antero-posterior (AP) ray: skin entry ``e`` and first bone ``b``
       (``hu >= bone_threshold_hu``; isolated early bone hits from noise are
       removed by a small grey closing of the depth map);
    3. nose tip = strongest narrow anterior protrusion of the skin surface
       (minimum of the white top-hats of the anteriority map along and across
       the face, line footprints ``nose_footprint_mm`` long,
       at least ``min_nose_protrusion_mm`` high and at most ``nose_max_behind_mm``
       behind the most anterior skin point);
    4. orbits = deep holes of the bone-depth map (depth − opening >
       ``orbit_hole_mm``, bone behind, largest blob ≥ ``min_orbit_area_mm2``)
       above the nose tip, 12–65 mm lateral of it;
       superior limit = top of the orbits + ``superior_margin_mm`` (brow);
       lateral limits = orbit lateral edges ± ``lateral_margin_mm``;
    5. menton = lowest slice (at most ``chin_search_mm``, at least
       ``min_chin_below_mm`` below the nose tip) with midline bone within
       ``chin_bone_max_mm`` (AP) of the nose tip; inferior limit = menton −
       ``inferior_margin_mm``. If neither orbits nor mandible are found the
       protrusion is not taken for a nose and nothing is removed;
    6. depth limit per ray = min(grey opening of the bone depth map with
       footprint ``hole_footprint_mm`` — bridges the nasal aperture, orbits and
       mouth so the nose, eyelids/eye surface and lips are included, but is
       never deeper than the bone itself —, skin + ``max_soft_depth_mm``,
       nose tip + ``face_depth_mm``);
    7. the region (from the anterior edge of the field of view to the depth
       limit, one grid cell of margin) is upsampled and trimmed at full
       resolution so it stops at the first bone voxel of every ray.

    All distances are in millimetres, thresholds in HU.
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
    superior_margin_mm: float = 20.0
    superior_fallback_mm: float = 75.0
    inferior_margin_mm: float = 5.0
    inferior_fallback_mm: float = 75.0
    chin_bone_max_mm: float = 55.0
    chin_search_mm: float = 120.0
    min_chin_below_mm: float = 25.0
    lateral_margin_mm: float = 25.0
    lateral_fallback_mm: float = 70.0
    max_soft_depth_mm: float = 35.0
    face_depth_mm: float = 80.0

    def face_region(self, volume: Volume) -> RegionResult:
        """Facial soft-tissue region of ``volume`` (see class docstring).

        Returns a :class:`RegionResult` whose ``mask`` has the shape of
        ``volume.hu`` and whose ``details`` hold landmarks in LPS mm
        (``nose_tip_lps_mm``, ``superior_limit_z_mm``, ``inferior_limit_z_mm``)
        and the canonical grid used. An empty mask plus a warning is returned
        when no face is found (e.g. brain-only field of view).
        """
        t0 = time.perf_counter()
        hu = volume.hu
        frame = _Frame.of(volume)
        spacing = np.asarray(volume.spacing_mm, dtype=float)
        if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
            raise DefaceError(f"spacing_mm must be positive, got {volume.spacing_mm}")
        factors = tuple(max(1, int(round(self.grid_mm / s))) for s in spacing)
        pooled = _max_pool(hu, factors)  # type: ignore[arg-type]
        low_spacing = spacing * np.asarray(factors)
        c = frame.to_canonical(pooled)
        ds, da, dl = (float(low_spacing[a]) for a in frame.axes)
        warnings: list[str] = []
        details: dict[str, Any] = {"grid_factors_kji": factors}

        empty = np.zeros(hu.shape, dtype=bool)

        def give_up(msg: str) -> RegionResult:
            warnings.append(msg)
            details["seconds"] = time.perf_counter() - t0
            return RegionResult(empty, warnings, details, None)

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
        del bone
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
        s_t, l_t = np.unravel_index(int(np.argmax(tophat)), tophat.shape)
        protrusion_mm = float(tophat[s_t, l_t])
        details["nose_protrusion_mm"] = round(protrusion_mm, 1)
        if protrusion_mm < self.min_nose_protrusion_mm:
            return give_up(
                f"no nose-like protrusion found (max {protrusion_mm:.1f} mm < "
                f"{self.min_nose_protrusion_mm} mm); face not in field of view? nothing removed"
            )
        a_t = float(e[s_t, l_t])
        if a_t <= 0:
            warnings.append("the face touches the anterior edge of the field of view (face cut?)")

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
        if not (right.any() or left.any() or chin.any()):
            return give_up(
                "neither orbits nor mandible found near the most nose-like protrusion; "
                "face not in the field of view? nothing removed"
            )

        if right.any() and left.any():
            s_orbit = int(max(np.flatnonzero(right.any(1))[-1], np.flatnonzero(left.any(1))[-1]))
            s_sup = s_orbit + self.superior_margin_mm / ds
            l_lo = np.flatnonzero(right.any(0))[0] - self.lateral_margin_mm / dl
            l_hi = np.flatnonzero(left.any(0))[-1] + self.lateral_margin_mm / dl
        else:
            found = "one orbit" if (right.any() or left.any()) else "no orbits"
            warnings.append(
                f"{found} found above the nose; superior/lateral limits from typical "
                "distances to the nose tip"
            )
            s_sup = s_t + self.superior_fallback_mm / ds
            l_lo = l_t - self.lateral_fallback_mm / dl
            l_hi = l_t + self.lateral_fallback_mm / dl
        if s_sup > ns - 1:
            warnings.append("the forehead reaches the superior edge of the field of view")
        if chin.any():
            s_inf = np.flatnonzero(chin.any(1))[0] - self.inferior_margin_mm / ds
        else:
            warnings.append("mandible not found below the nose; inferior limit from typical distance")
            s_inf = s_t - self.inferior_fallback_mm / ds
        if s_inf < 0:
            warnings.append("the chin reaches the inferior edge of the field of view (face cut?)")

        # --- depth limit per ray and the low-resolution region
        post = a_t + self.face_depth_mm / da
        limit = np.minimum(b_open, e + self.max_soft_depth_mm / da)
        limit = np.minimum(limit, post)
        rays = has_body & (e <= post)
        rays &= (s_idx >= s_inf) & (s_idx <= s_sup)
        rays &= (l_idx >= l_lo) & (l_idx <= l_hi)
        limit_i = np.where(rays, np.floor(limit).astype(np.int64) + 1, -1)
        region_c = np.arange(na)[None, :, None] <= limit_i[:, None, :]
        region_low = frame.from_canonical(region_c)

        # --- upsample inside the bounding box and trim at the first full-res bone voxel
        box_low = _bbox_of(region_low)
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
        ap_axis = frame.axes[1]
        sub = trim_behind_bone(
            hu[box], sub, anterior_axis=ap_axis, anterior_is_low_index=not frame.flips[1],
            bone_threshold_hu=self.bone_threshold_hu,
        )
        mask = empty
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
    k = max(1, int(round(n)))
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
    box = region.bbox if region.bbox is not None else _bbox_of(mask)
    out = hu.copy()
    removed = 0
    region_voxels = 0
    inside_before = inside_after = inside_both = 0
    if box is not None:
        before = hu[box]
        out_sub = out[box]
        region_sub = mask[box]
        region_voxels = int(np.count_nonzero(region_sub))
        removed = _apply_in_box(out_sub, region_sub, air_hu, soft_range_hu)
        bb = before > bone_threshold_hu
        ba = out_sub > bone_threshold_hu
        inside_before = int(np.count_nonzero(bb))
        inside_after = int(np.count_nonzero(ba))
        inside_both = int(np.count_nonzero(bb & ba))
    # outside the box, out == hu (copy), so bone there counts in both
    total_before = int(np.count_nonzero(hu > bone_threshold_hu))
    outside = total_before - inside_before
    denom = total_before + outside + inside_after
    dice = 1.0 if denom == 0 else 2.0 * (outside + inside_both) / denom
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
) -> np.ndarray:
    """RGB uint8 QA picture: mid-face sagittal and axial slices, before | after.

    Slices are shown in the canonical view (sagittal: superior up, anterior
    left; axial: anterior up, patient left on the image right) and pass through
    the centre of the region (or of the volume if the region is empty). The
    region outline is drawn in red on the "before" panels. Intensities are
    windowed linearly to ``window_hu``. Returns an array ``(rows, cols, 3)``;
    saving it is left to the caller (no file names derived from the data).
    """
    frame = _Frame.of(volume)
    before = frame.to_canonical(volume.hu)
    after = frame.to_canonical(result.hu)
    region = frame.to_canonical(result.region.mask)
    box = _bbox_of(region)
    centre = [n // 2 for n in before.shape] if box is None else [
        (s.start + s.stop) // 2 for s in box
    ]
    lo, hi = window_hu

    def grey(a: np.ndarray) -> np.ndarray:
        g = np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
        return np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)

    def outline(rgb: np.ndarray, m: np.ndarray) -> np.ndarray:
        edge = m & ~ndi.binary_erosion(m)
        rgb = rgb.copy()
        rgb[edge] = (255, 0, 0)
        return rgb

    sag = lambda v: v[::-1, :, centre[2]]  # noqa: E731  (superior up, anterior left)
    axi = lambda v: v[centre[0], :, :]  # noqa: E731  (anterior up, patient left on the right)
    panels_top = [outline(grey(sag(before)), sag(region)), grey(sag(after))]
    panels_bot = [outline(grey(axi(before)), axi(region)), grey(axi(after))]
    top = np.concatenate(panels_top, axis=1)
    bot = np.concatenate(panels_bot, axis=1)
    width = max(top.shape[1], bot.shape[1])
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)))  # noqa: E731
    return np.concatenate([pad(top), pad(bot)], axis=0)
