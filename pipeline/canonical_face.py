"""The canonical face grid shared by the reconstruction attacks.

A de-identified head is resampled into the canonical frame of :mod:`pipeline.align`
(computed from its bone alone) on a :class:`CanonicalGrid`; both attacks
(:mod:`pipeline.reconstruct`: tissue depths; :mod:`pipeline.skull_to_face`: the learned
model) read the bone there and return a skin field on the same grid.

Units: canonical mm (≈ mm), HU. Arrays on the grid are ``[z, y, x]``; x → subject Left,
y → Posterior, z → Superior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

__all__ = [
    "CanonicalGrid",
    "ReconstructionError",
    "bone_mask",
    "canonical_to_index",
    "frontal_map",
    "harmonic_fill",
    "outermost_crossing",
    "resample_canonical",
]


def canonical_to_index(volume, alignment, points: np.ndarray) -> np.ndarray:
    """Fractional ``(k, j, i)`` array indices (leading shape kept, last axis 3) of canonical
    points in ``volume`` (regular stack)."""
    p = np.asarray(points, dtype=float)
    lps = p @ alignment.rotation / alignment.scale + alignment.centre_lps_mm
    inv = np.linalg.inv(volume.affine())
    ijk = lps @ inv[:3, :3].T + inv[:3, 3]
    return ijk[..., ::-1]


def outermost_crossing(samples: np.ndarray, radii: np.ndarray, level: float) -> np.ndarray:
    """Per ray, the largest radius where ``samples`` crosses ``level`` going outwards
    (linear interpolation between samples); NaN where no sample reaches ``level``."""
    above = samples >= level
    any_above = above.any(axis=-1)
    n = samples.shape[-1]
    last = n - 1 - np.argmax(above[..., ::-1], axis=-1)  # last index at or above level
    nxt = np.minimum(last + 1, n - 1)
    a = np.take_along_axis(samples, last[..., None], -1)[..., 0]
    b = np.take_along_axis(samples, nxt[..., None], -1)[..., 0]
    frac = np.where(nxt > last, (a - level) / np.maximum(a - b, 1e-6), 0.0)
    r = radii[last] + np.clip(frac, 0.0, 1.0) * (radii[1] - radii[0])
    return np.where(any_above, r, np.nan)


@dataclass(frozen=True)
class CanonicalGrid:
    """A regular grid in the canonical head frame: ``box = (x0, x1, y0, y1, z0, z1)``, ``step``.

    Arrays on it are indexed ``[z, y, x]`` (like CT: slice, row, column).
    """

    box: tuple[float, float, float, float, float, float] = (-96.0, 96.0, -150.0, 40.0,
                                                           -150.0, 76.0)
    step: float = 2.0

    def axis(self, n: int) -> np.ndarray:
        lo, hi = self.box[2 * n], self.box[2 * n + 1]
        return lo + self.step * np.arange(int(round((hi - lo) / self.step)) + 1)

    @property
    def xs(self) -> np.ndarray:
        return self.axis(0)

    @property
    def ys(self) -> np.ndarray:
        return self.axis(1)

    @property
    def zs(self) -> np.ndarray:
        return self.axis(2)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.zs), len(self.ys), len(self.xs))

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Fractional ``(z, y, x)`` indices of canonical points."""
        p = np.asarray(points, dtype=float)
        lo = np.array([self.box[4], self.box[2], self.box[0]])
        return (p[..., ::-1] - lo) / self.step


def resample_canonical(volume, alignment, grid: CanonicalGrid) -> np.ndarray:
    """HU of ``volume`` on ``grid`` (float32 ``[z, y, x]``; NaN outside the field of view)."""
    src = np.asarray(volume.hu, dtype=np.float32)
    out = np.empty(grid.shape, dtype=np.float32)
    yy, xx = np.meshgrid(grid.ys, grid.xs, indexing="ij")
    for n, z in enumerate(grid.zs):
        pts = np.stack([xx, yy, np.full_like(xx, z)], axis=-1)
        kji = canonical_to_index(volume, alignment, pts)
        out[n] = map_coordinates(src, [kji[..., 0], kji[..., 1], kji[..., 2]], order=1,
                                 mode="constant", cval=np.nan, prefilter=False)
    return out


def bone_mask(hu: np.ndarray, threshold_hu: float = 200.0, min_voxels: int = 30) -> np.ndarray:
    """Bone (``hu >= threshold_hu``) without specks of fewer than ``min_voxels`` voxels."""
    from scipy import ndimage as ndi

    m = hu >= threshold_hu
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def frontal_map(mask: np.ndarray, grid: CanonicalGrid) -> np.ndarray:
    """``[z, x]`` canonical y of the most anterior voxel of ``mask`` in each column (NaN: none)."""
    has = mask.any(axis=1)
    return np.where(has, grid.ys[np.argmax(mask, axis=1)], np.nan)


def harmonic_fill(values: np.ndarray, hole: np.ndarray, iterations: int = 400) -> np.ndarray:
    """Fill ``hole`` cells of a 2-D map by the discrete Laplace equation (boundary values from
    the finite cells around it; NaN cells outside the hole are free boundaries)."""
    out = np.array(values, dtype=float)
    known = np.isfinite(out) & ~hole
    if not hole.any() or not known.any():
        return out
    from scipy import ndimage as ndi

    # start from the mean of the nearest known values
    idx = ndi.distance_transform_edt(~known, return_distances=False, return_indices=True)
    out[hole] = out[tuple(i[hole] for i in idx)]
    active = hole.copy()
    for _ in range(iterations):
        acc = np.zeros_like(out)
        cnt = np.zeros_like(out)
        for sh in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            v = np.roll(out, sh, axis=(0, 1))
            ok = np.roll(known | active, sh, axis=(0, 1))
            acc += np.where(ok, np.nan_to_num(v), 0.0)
            cnt += ok
        upd = active & (cnt > 0)
        out[upd] = acc[upd] / cnt[upd]
    return out


class ReconstructionError(ValueError):
    """A face could not be reconstructed (no bone, unknown attack, missing model)."""
