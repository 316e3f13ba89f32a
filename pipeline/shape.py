"""Surface-geometry matcher: frontal depth maps of the face seen in the renders.

Independent of shading and of any learned model: only the DEPTH BUFFER of the
standardised renders (:mod:`pipeline.render`) is used. Each rendered pixel
that shows the surface is lifted back to a 3-D point in the canonical head
frame (x → subject Left, y → Posterior, z → Superior, canonical mm; see
:mod:`pipeline.align`); the points of all views of one condition are binned
on a regular ``(z, x)`` grid (``cell_mm``) over the face and forehead, and
each cell keeps its most anterior point (smallest ``y``). Cells that no view
saw are NaN — a probe rendered at 30° sees less of the far cheek than the
frontal gallery, and only cells seen in both are compared.

Distance of a probe map to a gallery map (:func:`depth_distance_matrix`):
the depth differences over the cells both saw, minus their median (a
residual front–back shift), summarised by the ``quantile`` of their absolute
values (default the median: robust to the half of the surface that differs
most, e.g. where tissue was removed). With ``centre`` (default) each map is
first expressed relative to the mean map of its own set (probes / gallery),
as :func:`pipeline.reid.embedding_similarity` does for embeddings. The
similarity used for ranking is the negative distance (mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DepthGrid",
    "ShapeError",
    "depth_distance_matrix",
    "depth_points",
    "depth_similarity",
    "frontal_depth_map",
]


class ShapeError(ValueError):
    """Bad depth maps or grid."""


@dataclass(frozen=True)
class DepthGrid:
    """Canonical ``(x, z)`` grid of a frontal depth map (mm): ``x0..x1`` × ``z0..z1``, ``cell_mm``."""

    x0: float = -72.0
    x1: float = 72.0
    z0: float = -108.0
    z1: float = 44.0
    cell_mm: float = 2.0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_z, n_x)``."""
        return (int(round((self.z1 - self.z0) / self.cell_mm)) + 1,
                int(round((self.x1 - self.x0) / self.cell_mm)) + 1)


def depth_points(depth: np.ndarray, camera_pose: np.ndarray, yfov_deg: float) -> np.ndarray:
    """``(N, 3)`` canonical points of the pixels with depth > 0 of one render.

    ``depth`` (H, W) is the distance along the camera axis (as
    :class:`pipeline.render.RenderResult` holds it), ``camera_pose`` the 4×4
    camera-to-canonical pose of :func:`pipeline.render.camera_pose` (OpenGL:
    the camera looks down its −z), ``yfov_deg`` the vertical field of view.
    """
    d = np.asarray(depth, dtype=float)
    if d.ndim != 2:
        raise ShapeError("depth must be an (H, W) array")
    h, w = d.shape
    f = 0.5 * h / np.tan(np.deg2rad(yfov_deg) / 2.0)
    rows, cols = np.nonzero(d > 0)
    z = d[rows, cols]
    cam = np.column_stack([(cols + 0.5 - w / 2.0) / f * z, -(rows + 0.5 - h / 2.0) / f * z, -z])
    pose = np.asarray(camera_pose, dtype=float)
    return cam @ pose[:3, :3].T + pose[:3, 3]


def frontal_depth_map(points: np.ndarray, grid: DepthGrid | None = None) -> np.ndarray:
    """``(n_z, n_x)`` most anterior canonical ``y`` (mm) per grid cell; NaN where no point fell."""
    grid = grid or DepthGrid()
    p = np.asarray(points, dtype=float).reshape(-1, 3)
    nz, nx = grid.shape
    out = np.full(nz * nx, np.inf)
    ix = np.round((p[:, 0] - grid.x0) / grid.cell_mm).astype(np.int64)
    iz = np.round((p[:, 2] - grid.z0) / grid.cell_mm).astype(np.int64)
    ok = (ix >= 0) & (ix < nx) & (iz >= 0) & (iz < nz) & np.isfinite(p[:, 1])
    np.minimum.at(out, iz[ok] * nx + ix[ok], p[ok, 1])
    out[np.isinf(out)] = np.nan
    return out.reshape(nz, nx)


def _stack(maps: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    a = np.asarray(maps, dtype=float)
    if a.ndim != 3 or len(a) < 1:
        raise ShapeError("depth maps must be an (n, n_z, n_x) stack")
    return a


def depth_distance_matrix(probes: Sequence[np.ndarray] | np.ndarray,
                          gallery: Sequence[np.ndarray] | np.ndarray, *,
                          quantile: float = 0.5, centre: bool = True,
                          min_cells: int = 50) -> np.ndarray:
    """``(n_probes, n_gallery)`` robust depth distances (mm); see the module docstring.

    A pair that shares fewer than ``min_cells`` seen cells gets the largest
    finite distance of the matrix (it cannot be compared).
    """
    if not 0.0 < quantile <= 1.0:
        raise ShapeError("quantile must be in (0, 1]")
    p, g = _stack(probes), _stack(gallery)
    if p.shape[1:] != g.shape[1:]:
        raise ShapeError(f"depth map grids differ: {p.shape[1:]} vs {g.shape[1:]}")
    if centre:
        if len(p) < 2 or len(g) < 2:
            raise ShapeError("centring needs at least two probes and two gallery maps")
        with np.errstate(invalid="ignore"):
            mp = _nanmean0(p)
            mg = _nanmean0(g)
        p = p - mp
        g = g - mg
    n_p, n_g = len(p), len(g)
    out = np.full((n_p, n_g), np.nan)
    gf = g.reshape(n_g, -1)
    for i in range(n_p):
        diff = p[i].reshape(1, -1) - gf  # (n_g, cells)
        valid = np.isfinite(diff)
        counts = valid.sum(axis=1)
        # subtract each row's median over its valid cells, then take the quantile of |d|
        masked = np.where(valid, diff, np.nan)
        med = np.nanmedian(masked, axis=1, keepdims=True) if counts.max() else 0
        dev = np.abs(diff - med)
        q = np.nanquantile(np.where(valid, dev, np.nan), quantile, axis=1) if counts.max() else 0
        out[i] = np.where(counts >= min_cells, q, np.nan)
    if np.all(np.isnan(out)):
        raise ShapeError("no probe/gallery pair shares enough seen cells to be compared")
    worst = np.nanmax(out)
    return np.where(np.isnan(out), worst, out)


def _nanmean0(a: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; 0 where every map is NaN (those cells stay NaN anyway)."""
    valid = np.isfinite(a)
    s = np.where(valid, a, 0.0).sum(axis=0)
    c = valid.sum(axis=0)
    return np.where(c > 0, s / np.maximum(c, 1), 0.0)


def depth_similarity(probes: Sequence[np.ndarray] | np.ndarray,
                     gallery: Sequence[np.ndarray] | np.ndarray,
                     **kwargs: float | bool) -> np.ndarray:
    """Negative :func:`depth_distance_matrix` (larger = more alike), for :mod:`pipeline.reid`."""
    return -depth_distance_matrix(probes, gallery, **kwargs)  # type: ignore[arg-type]
