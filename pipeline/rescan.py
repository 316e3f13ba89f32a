"""A simulated second acquisition of a CT volume (the re-identification gallery).

The re-identification study needs, for every subject, a gallery sample that is
*not* the probe's own surface: comparing a surface with itself (even from
another view) measures the renderer, not the matcher. With one scan per
subject, :func:`simulate_rescan` makes a second "acquisition" of the same
head: the head is moved by a small rigid motion (seeded rotation up to
``max_rotation_deg`` about each axis through the volume centre, translation
up to ``max_shift_mm`` per axis) and sampled again on a new grid with the same
orientation, spacing ``max(spacing, min_spacing_mm)`` per axis and a seeded
sub-voxel offset, so slice positions, partial-volume edges and slice terraces
all differ from the original. Trilinear interpolation, air (−1000 HU)
outside the original field of view.

Units: mm, degrees, HU. Pure numpy/scipy; deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from .volume import Volume

__all__ = ["RescanMotion", "simulate_rescan", "volume_seed"]


@dataclass(frozen=True)
class RescanMotion:
    """The rigid motion and grid offset of a simulated re-scan.

    ``p_new = rotation @ (p_old - centre_lps_mm) + centre_lps_mm + shift_lps_mm``;
    ``grid_offset_voxels`` is the sub-voxel shift ``(k, j, i)`` of the new grid.
    """

    rotation: np.ndarray
    shift_lps_mm: np.ndarray
    centre_lps_mm: np.ndarray
    grid_offset_voxels: np.ndarray


def volume_seed(volume: Volume, salt: int = 0) -> int:
    """A stable 32-bit seed from a volume's voxels and grid (same scan → same re-scan).

    Hashes the shape, spacing and every 2nd/4th/4th voxel (k/j/i) with ``salt``;
    independent of file names, pseudonyms and processing order, so the command
    line and the web platform simulate the same second acquisition of a scan.
    """
    h = hashlib.sha256()
    h.update(np.asarray(volume.shape, dtype=np.int64).tobytes())
    h.update(np.asarray(volume.spacing_mm, dtype=np.float64).round(4).tobytes())
    h.update(np.ascontiguousarray(volume.hu[::2, ::4, ::4], dtype=np.float32).tobytes())
    h.update(int(salt).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest()[:4], "little")


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, a in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(a), np.sin(a)
        i, j = [(1, 2), (2, 0), (0, 1)][axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def simulate_rescan(
    volume: Volume,
    *,
    seed: int,
    max_rotation_deg: float = 4.0,
    max_shift_mm: float = 3.0,
    min_spacing_mm: float = 1.5,
) -> tuple[Volume, RescanMotion]:
    """The same head moved by a small seeded rigid motion and re-sampled on a shifted grid.

    Returns the new :class:`Volume` (float32 HU, same orientation as ``volume``,
    spacing ``max(spacing, min_spacing_mm)`` per axis, covering the same
    field of view) and the :class:`RescanMotion` used.
    """
    if max_rotation_deg < 0 or max_shift_mm < 0 or min_spacing_mm <= 0:
        raise ValueError("rescan motion limits must be >= 0 and min_spacing_mm > 0")
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    offset = rng.uniform(0.0, 1.0, 3)
    rot = _rotation(angles)

    a_old = volume.affine()
    shape_old = np.asarray(volume.shape)
    centre_idx = (shape_old[::-1] - 1) / 2.0  # (i, j, k)
    centre = (a_old @ np.append(centre_idx, 1.0))[:3]
    sp_old = np.asarray(volume.spacing_mm, dtype=float)  # (k, j, i)
    sp_new = np.maximum(sp_old, float(min_spacing_mm))
    n_new = np.maximum(2, np.floor((shape_old - 1) * sp_old / sp_new).astype(int) + 1)
    a_new = a_old.copy()
    # columns (i, j, k) of the linear part scale with the spacing ratio
    a_new[:3, 0] *= sp_new[2] / sp_old[2]
    a_new[:3, 1] *= sp_new[1] / sp_old[1]
    a_new[:3, 2] *= sp_new[0] / sp_old[0]
    # sub-voxel grid offset (fraction of the NEW spacing), kept inside the old field of view
    a_new[:3, 3] = a_old[:3, 3] + a_new[:3, :3] @ (offset[::-1] * 0.999)
    n_new = np.maximum(2, n_new - 1)

    # new voxel centre (i, j, k) → LPS → undo the motion → old (i, j, k)
    kk, jj, ii = (np.arange(n, dtype=np.float32) for n in n_new)
    inv_old = np.linalg.inv(a_old)
    # old_ijk = M @ new_ijk + b, with the motion folded in: p_old = R^T (p_new - c - s) + c
    lin = inv_old[:3, :3] @ rot.T @ a_new[:3, :3]
    b = inv_old[:3, :3] @ (rot.T @ (a_new[:3, 3] - centre - shift) + centre) + inv_old[:3, 3]
    out = np.empty(tuple(n_new), dtype=np.float32)
    src = np.asarray(volume.hu, dtype=np.float32)
    grid_j, grid_i = np.meshgrid(jj, ii, indexing="ij")
    for k in range(n_new[0]):  # slice by slice: bounded memory on large volumes
        ijk_i = lin[0, 0] * grid_i + lin[0, 1] * grid_j + (lin[0, 2] * k + b[0])
        ijk_j = lin[1, 0] * grid_i + lin[1, 1] * grid_j + (lin[1, 2] * k + b[1])
        ijk_k = lin[2, 0] * grid_i + lin[2, 1] * grid_j + (lin[2, 2] * k + b[2])
        out[k] = map_coordinates(src, [ijk_k, ijk_j, ijk_i], order=1, mode="constant",
                                 cval=-1000.0, prefilter=False)
    new = Volume(hu=out, spacing_mm=tuple(float(s) for s in sp_new),
                 origin_lps_mm=a_new[:3, 3].copy(), row_cosine=volume.row_cosine,
                 col_cosine=volume.col_cosine, normal=volume.normal)
    motion = RescanMotion(rotation=rot, shift_lps_mm=shift, centre_lps_mm=centre,
                          grid_offset_voxels=offset)
    return new, motion
