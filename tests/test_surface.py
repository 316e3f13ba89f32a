"""Surfaces: marching cubes in LPS mm, outward winding, largest component, decimation, crop."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.surface import (
    SurfaceError,
    bone_surface,
    decimate,
    face_region_crop,
    iso_surface,
    largest_component,
    skin_surface,
    smooth_mesh,
)
from pipeline.volume import Volume


def _smooth_inside(d_mm: np.ndarray, width_mm: float = 0.8) -> np.ndarray:
    """Partial-volume weight (0..1) of 'inside' for a signed distance (negative inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(d_mm / width_mm, -50, 50)))


def _ellipsoid_distance(q: np.ndarray, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (negative inside)."""
    axes = np.asarray(axes, float)
    rel = (q - np.asarray(centre, float)) / axes
    r = np.sqrt((rel**2).sum(-1))
    return (r - 1.0) * axes.min()


def make_head_volume(
    shape: tuple[int, int, int] = (72, 80, 72),
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0),
    pose: np.ndarray | None = None,
    *,
    deface: bool = False,
    scale: float = 1.0,
    nose_mm: float = 22.0,
    normal: tuple[float, float, float] | None = None,
) -> Volume:
    """Toy head (ellipsoid skull + face bone + skin with a nose) in a standard axial volume.

    Head frame: x Left, y Posterior, z Superior, centred in the volume. ``pose`` is
    the rotation of the head in the scanner (LPS). ``deface`` replaces the facial
    soft tissue (anterior to the face bone, below the brow) by air; bone unchanged.
    """
    nk, nj, ni = shape
    dk, dj, di = spacing_mm
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    centre = np.array([(ni - 1) * di / 2, (nj - 1) * dj / 2, (nk - 1) * dk / 2])
    lps = np.stack([i * di, j * dj, k * dk], axis=-1) - centre
    g = np.eye(3) if pose is None else np.asarray(pose)
    q = lps @ g / scale  # head coordinates (row-vector form of g.T @ p)
    skull_out = _ellipsoid_distance(q, (0, 8, 20), (70, 88, 78))
    skull_in = _ellipsoid_distance(q, (0, 8, 20), (63, 81, 71))
    skull = np.maximum(skull_out, -skull_in)
    face_bone = _ellipsoid_distance(q, (0, -45, -30), (42, 38, 48))
    bone_d = np.minimum(skull, face_bone)
    skin_d = np.minimum(
        _ellipsoid_distance(q, (0, 5, 5), (78, 98, 100)),
        _ellipsoid_distance(q, (0, -92, -10), (9, nose_mm, 16)),  # nose
    )
    skin_d = np.minimum(skin_d, _ellipsoid_distance(q, (0, -30, -70), (40, 40, 30)))  # chin
    bone_w = _smooth_inside(bone_d)
    tissue_w = _smooth_inside(skin_d)
    hu = -1000.0 + tissue_w * 1040.0 + bone_w * 660.0
    if deface:
        face_tissue = (q[..., 1] < -30) & (q[..., 2] < 45) & (bone_d > 1.5)
        hu = np.where(face_tissue, -1000.0, hu)
    return Volume(hu=hu.astype(np.float32), spacing_mm=spacing_mm,
                  normal=None if normal is None else np.asarray(normal, float))


def _smooth_sphere_volume(radius_mm: float, spacing_mm=(1.0, 1.0, 1.0), n=48) -> Volume:
    k, j, i = np.meshgrid(*(np.arange(n) * s for s in spacing_mm), indexing="ij")
    c = (n - 1) / 2.0
    r = np.sqrt((i - c * spacing_mm[2]) ** 2 + (j - c * spacing_mm[1]) ** 2
                + (k - c * spacing_mm[0]) ** 2)
    # linear ramp of 600 HU/mm through -300 HU at r = radius: iso-surface is exact sphere
    hu = np.clip(-300.0 + (radius_mm - r) * 600.0, -1000.0, 100.0)
    return Volume(hu=hu.astype(np.float32), spacing_mm=spacing_mm)


def test_sphere_area_volume_and_position_in_lps():
    vol = _smooth_sphere_volume(15.0, spacing_mm=(1.0, 1.0, 1.0))
    mesh = skin_surface(vol, target_faces=None)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 15.0**3, rel=0.02)
    assert mesh.area == pytest.approx(4 * np.pi * 15.0**2, rel=0.02)
    r = np.linalg.norm(mesh.vertices - 23.5, axis=1)
    assert np.abs(r - 15.0).max() < 0.3


@pytest.mark.parametrize("normal", [None, (0.0, 0.0, -1.0)])
def test_coordinates_follow_affine_and_normals_point_out(normal):
    vol = make_head_volume(shape=(40, 44, 40), spacing_mm=(4.0, 3.0, 3.5), normal=normal)
    vol.origin_lps_mm = np.array([-70.0, -66.0, 100.0])
    mesh = skin_surface(vol, target_faces=None)
    # independent check: the voxel with the largest HU along a ray → mesh bounds agree with mask
    mask = vol.hu > -300
    ijk = np.argwhere(mask)[:, ::-1]
    lps = np.column_stack([ijk, np.ones(len(ijk))]) @ vol.affine().T
    lo, hi = lps[:, :3].min(0), lps[:, :3].max(0)
    step = np.array([3.5, 3.0, 4.0])
    assert np.all(mesh.bounds[0] > lo - step) and np.all(mesh.bounds[0] < lo + 1e-6)
    assert np.all(mesh.bounds[1] < hi + step) and np.all(mesh.bounds[1] > hi - 1e-6)
    assert mesh.volume > 0  # outward winding ⇒ positive signed volume
    centre = mesh.vertices.mean(0)
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - centre)
    assert (outward > 0).mean() > 0.95


def test_largest_component_drops_small_blob():
    vol = _smooth_sphere_volume(12.0, n=56)
    blob = np.zeros_like(vol.hu, dtype=bool)
    blob[2:6, 2:6, 2:6] = True
    vol.hu[blob] = 100.0
    whole = iso_surface(vol, -300.0, keep_largest=False)
    kept = largest_component(whole)
    assert len(kept.faces) < len(whole.faces)
    assert kept.volume == pytest.approx(4 / 3 * np.pi * 12.0**3, rel=0.03)
    assert skin_surface(vol, target_faces=None).volume == pytest.approx(kept.volume)


def test_decimation_reaches_target_and_keeps_shape():
    vol = _smooth_sphere_volume(15.0)
    full = skin_surface(vol, target_faces=None)
    small = decimate(full, 800)
    assert len(small.faces) <= 800 * 1.02
    assert small.volume == pytest.approx(full.volume, rel=0.03)
    centre = small.vertices.mean(0)
    outward = np.einsum("ij,ij->i", small.face_normals, small.triangles_center - centre)
    assert (outward > 0).all()


def test_step_size_is_coarser_but_close():
    vol = _smooth_sphere_volume(15.0)
    fine = skin_surface(vol, target_faces=None)
    coarse = skin_surface(vol, target_faces=None, step_size=2)
    assert len(coarse.faces) < len(fine.faces) / 3
    assert coarse.volume == pytest.approx(fine.volume, rel=0.05)


def test_bone_surface_is_inside_skin():
    vol = make_head_volume()
    skin = skin_surface(vol, target_faces=None)
    bone = bone_surface(vol, target_faces=None)
    assert bone.volume > 0
    assert np.all(bone.bounds[0] > skin.bounds[0]) and np.all(bone.bounds[1] < skin.bounds[1])


def test_face_region_crop_is_anterior_and_identical_after_deface():
    vol = make_head_volume()
    crop = face_region_crop(vol, keep_fraction=0.5)
    defaced = make_head_volume(deface=True)
    assert crop == face_region_crop(defaced, keep_fraction=0.5)
    j = crop[1]
    # anterior = small j for a standard axial volume; the crop starts at or near 0
    bone_j = np.flatnonzero((vol.hu >= 300).any(axis=(0, 2)))
    assert j.start <= max(0, bone_j[0] - 6)
    assert j.stop < vol.shape[1] - 5
    mesh = skin_surface(vol, crop_ijk=crop, target_faces=None)
    nose_tip_y = mesh.vertices[:, 1].min()
    assert nose_tip_y == pytest.approx(skin_surface(vol, target_faces=None).vertices[:, 1].min())


def test_bad_input_raises_clear_errors():
    vol = _smooth_sphere_volume(10.0, n=24)
    with pytest.raises(SurfaceError, match="outside the data range"):
        iso_surface(vol, 5000.0)
    with pytest.raises(SurfaceError, match="step_size"):
        iso_surface(vol, -300.0, step_size=0)
    with pytest.raises(SurfaceError, match="no voxel"):
        face_region_crop(Volume(hu=np.full((8, 8, 8), -1000.0), spacing_mm=(1, 1, 1)))
    with pytest.raises(SurfaceError, match="empty"):
        iso_surface(vol, -300.0, crop_ijk=(slice(3, 3), slice(None), slice(None)))
    assert issubclass(SurfaceError, ValueError)


def test_smoothing_removes_slice_terraces_without_shrinking():
    """A sphere scanned with 6 mm slices (sharp in-plane edges) shows terraces: the radius
    of its marching-cubes vertices wobbles; Taubin smoothing flattens the wobble and
    keeps the size."""
    n_k, n_ij = 24, 96
    dk, dij = 6.0, 1.0
    k, j, i = np.meshgrid(np.arange(n_k) * dk, np.arange(n_ij) * dij, np.arange(n_ij) * dij,
                          indexing="ij")
    c = np.array([(n_ij - 1) * dij / 2, (n_ij - 1) * dij / 2, (n_k - 1) * dk / 2])
    r = np.sqrt((i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2)
    hu = np.where(r < 40.0, 40.0, -1000.0).astype(np.float32)  # no partial volume
    vol = Volume(hu=hu, spacing_mm=(dk, dij, dij))
    mesh = skin_surface(vol, target_faces=None)
    smooth = smooth_mesh(mesh, 20)
    assert np.array_equal(smooth.faces, mesh.faces) and smooth is not mesh
    assert smooth_mesh(mesh, 0) is mesh

    def wobble(m):
        rad = np.linalg.norm(np.asarray(m.vertices) - c, axis=1)
        band = np.abs(np.asarray(m.vertices)[:, 2] - c[2]) < 25.0  # away from the poles
        return rad[band].std(), rad[band].mean()

    (w0, r0), (w1, r1) = wobble(mesh), wobble(smooth)
    assert w1 < 0.6 * w0
    assert abs(r1 - r0) < 1.0
    with pytest.raises(SurfaceError):
        smooth_mesh(mesh, -1)
