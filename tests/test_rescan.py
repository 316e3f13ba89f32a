"""Simulated second acquisition: seeded, bounded motion, new grid, same anatomy."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.align import rotation_angle_deg
from pipeline.rescan import simulate_rescan, volume_seed
from pipeline.volume import Volume


def _ball(shape=(30, 40, 40), spacing=(4.0, 2.0, 2.0), centre=(40.0, 45.0, 60.0), r=20.0):
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    d = np.sqrt((i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2)
    hu = np.clip(-300.0 + (r - d) * 300.0, -1000.0, 700.0).astype(np.float32)
    return Volume(hu=hu, spacing_mm=spacing, origin_lps_mm=np.array([5.0, -3.0, 10.0]))


def _centroid_lps(vol: Volume) -> np.ndarray:
    w = np.clip(vol.hu + 1000.0, 0, None)
    k, j, i = np.nonzero(w > 0)
    ijk1 = np.column_stack([i, j, k, np.ones(len(i))])
    p = (ijk1 @ vol.affine().T)[:, :3]
    return np.average(p, axis=0, weights=w[k, j, i])


def test_rescan_is_seeded_bounded_and_moves_the_anatomy_as_reported():
    vol = _ball()
    a, ma = simulate_rescan(vol, seed=3, max_rotation_deg=4.0, max_shift_mm=3.0,
                            min_spacing_mm=3.0)
    b, mb = simulate_rescan(vol, seed=3, max_rotation_deg=4.0, max_shift_mm=3.0,
                            min_spacing_mm=3.0)
    assert np.array_equal(a.hu, b.hu) and np.allclose(ma.rotation, mb.rotation)
    c, mc = simulate_rescan(vol, seed=4, min_spacing_mm=3.0)
    assert not np.allclose(ma.rotation, mc.rotation)
    assert a.spacing_mm == (4.0, 3.0, 3.0)  # coarser axes kept, finer ones coarsened
    assert np.all(np.abs(ma.shift_lps_mm) <= 3.0)
    assert rotation_angle_deg(ma.rotation) <= 4.0 * np.sqrt(3) + 1e-9
    assert np.all((ma.grid_offset_voxels >= 0) & (ma.grid_offset_voxels < 1))
    # the ball's centre moved exactly by the reported motion
    before = _centroid_lps(vol)
    expected = ma.rotation @ (before - ma.centre_lps_mm) + ma.centre_lps_mm + ma.shift_lps_mm
    assert np.linalg.norm(_centroid_lps(a) - expected) < 0.5
    # same orientation, slices at new positions
    assert np.allclose(a.row_cosine, vol.row_cosine) and np.allclose(a.normal, vol.normal)
    assert not np.allclose(a.origin_lps_mm, vol.origin_lps_mm)
    assert a.hu.min() >= -1000.0 and a.hu.max() <= 700.0


def test_volume_seed_depends_on_the_scan_and_the_salt_only():
    a, b = _ball(), _ball()
    assert volume_seed(a) == volume_seed(b)  # same voxels and grid, another object
    assert volume_seed(a) != volume_seed(a, salt=1)
    moved = _ball(centre=(42.0, 45.0, 60.0))
    assert volume_seed(moved) != volume_seed(a)
    assert 0 <= volume_seed(a) < 2**32
    with pytest.raises(ValueError):
        simulate_rescan(_ball(), seed=0, min_spacing_mm=0.0)
