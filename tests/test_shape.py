"""Surface-geometry matcher: depth back-projection, frontal depth maps, robust distances."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from pipeline import render as R
from pipeline.shape import (
    DepthGrid,
    ShapeError,
    depth_distance_matrix,
    depth_points,
    depth_similarity,
    frontal_depth_map,
)


def test_depth_points_lie_on_the_rendered_surface():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=60.0)
    sphere.apply_translation([0.0, -80.0, -30.0])
    for yaw, elevation in ((0.0, 0.0), (30.0, 10.0), (-20.0, -10.0)):
        st = R.RenderSettings(width_px=96, height_px=96, elevation_deg=elevation)
        view = R.raycast_view(sphere, yaw, st)
        pts = depth_points(view.depth, R.camera_pose(yaw, st), st.yfov_deg)
        assert len(pts) == int(view.mask.sum()) > 500
        radius = np.linalg.norm(pts - [0.0, -80.0, -30.0], axis=1)
        assert np.abs(radius - 60.0).max() < 0.5  # on the (faceted) sphere
        # only the half facing the camera is seen
        towards_camera = R.camera_pose(yaw, st)[:3, 2]
        assert np.all((pts - [0.0, -80.0, -30.0]) @ towards_camera > -1.0)


def test_frontal_depth_map_keeps_the_most_anterior_point_per_cell():
    grid = DepthGrid(x0=0.0, x1=4.0, z0=0.0, z1=2.0, cell_mm=2.0)
    assert grid.shape == (2, 3)
    pts = np.array([[0.1, 5.0, 0.0], [0.2, -3.0, 0.1], [4.0, 7.0, 2.0], [50.0, 0.0, 0.0]])
    m = frontal_depth_map(pts, grid)
    assert m[0, 0] == -3.0 and m[1, 2] == 7.0
    assert np.isnan(m[0, 1]) and np.isnan(m[1, 0])


def _faces(n=6, seed=0):
    rng = np.random.default_rng(seed)
    z, x = np.mgrid[0:30, 0:30]
    base = -(0.02 * (x - 15.0) ** 2 + 0.01 * (z - 15.0) ** 2)
    return np.array([base + 3.0 * rng.normal(size=(1, 1)) * np.sin(x / (3 + i)) for i in range(n)])


def test_depth_distance_ignores_a_front_back_shift_and_unseen_cells():
    maps = _faces()
    probe = maps + 12.5  # every probe moved 12.5 mm back
    probe[:, :, :10] = np.nan  # and seen only partly
    d = depth_distance_matrix(probe, maps, centre=False)
    assert np.allclose(np.diag(d), 0.0, atol=1e-9)
    assert np.all(d[~np.eye(6, dtype=bool)] > 0.1)
    s = depth_similarity(probe, maps, centre=False)
    assert np.array_equal(s, -d)


def test_depth_distance_is_a_quantile_of_absolute_differences():
    a = np.zeros((1, 10, 10))
    b = np.zeros((1, 10, 10))
    b[0, :4] = 4.0  # 40 cells 4 mm in front, 30 cells 1 mm, 30 cells equal
    b[0, 4:7] = 1.0
    # differences a − b: 40 × −4, 30 × −1, 30 × 0; their median is −1, so the deviations
    # are 40 × 3, 30 × 0, 30 × 1: median 1, maximum 3
    assert depth_distance_matrix(a, b, centre=False, quantile=0.5)[0, 0] == pytest.approx(1.0)
    assert depth_distance_matrix(a, b, centre=False, quantile=1.0)[0, 0] == pytest.approx(3.0)


def test_centring_subtracts_each_sets_mean_map():
    maps = _faces(5)
    probes = maps[::-1] * 1.3 + 2.0
    manual = depth_distance_matrix(probes - probes.mean(0), maps - maps.mean(0), centre=False)
    assert np.allclose(depth_distance_matrix(probes, maps, centre=True), manual)


def test_pairs_without_enough_common_cells_get_the_worst_distance():
    maps = _faces(3)
    probes = maps.copy()
    probes[0, :, :] = np.nan
    probes[0, 0, :10] = 1.0  # 10 seen cells only
    d = depth_distance_matrix(probes, maps, centre=False, min_cells=50)
    assert np.all(d[0] == d[1:].max())
    with pytest.raises(ShapeError):
        depth_distance_matrix(np.full((2, 5, 5), np.nan), maps[:2, :5, :5], centre=False)
    with pytest.raises(ShapeError, match="grids differ"):
        depth_distance_matrix(maps, maps[:, :5], centre=False)
    with pytest.raises(ShapeError, match="quantile"):
        depth_distance_matrix(maps, maps, quantile=0.0)
