"""Alignment: canonical pose/scale from bone, equivariance to small head rotations."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.align import (
    Alignment,
    AlignmentError,
    alignment_from_volume,
    bone_cloud,
    canonical_alignment,
    rotation_angle_deg,
    rotation_from_euler_deg,
)
from pipeline.surface import skin_surface
from pipeline.volume import Volume
from tests.test_surface import make_head_volume

SHAPE = (80, 90, 80)
SPACING = (3.0, 3.0, 3.0)


def _volume_centre_lps(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    nk, nj, ni = shape
    dk, dj, di = spacing
    return np.array([(ni - 1) * di / 2, (nj - 1) * dj / 2, (nk - 1) * dk / 2])


@pytest.fixture(scope="module")
def reference() -> tuple[Volume, Alignment]:
    vol = make_head_volume(SHAPE, SPACING)
    return vol, alignment_from_volume(vol)


def test_euler_helper_is_a_rotation_about_the_named_axes():
    r = rotation_from_euler_deg(yaw_deg=30)
    assert np.allclose(r @ [1, 0, 0], [np.cos(np.pi / 6), np.sin(np.pi / 6), 0])
    r = rotation_from_euler_deg(4, -3, 2)
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
    assert rotation_angle_deg(rotation_from_euler_deg(pitch_deg=7)) == pytest.approx(7.0)


def test_untilted_head_frame_is_anatomical(reference):
    vol, a = reference
    assert np.allclose(a.rotation @ a.rotation.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(a.rotation) == pytest.approx(1.0)
    # the toy head is exactly symmetric about the scanner's sagittal plane through its centre
    assert np.degrees(np.arccos(a.rotation[0, 0])) < 0.5
    assert abs(a.centre_lps_mm[0] - _volume_centre_lps()[0]) < 0.5
    assert a.rotation[1, 1] > 0.7 and a.rotation[2, 2] > 0.7  # y posterior, z superior
    skin = a.apply_mesh(skin_surface(vol, target_faces=20_000))
    nose_tip = skin.vertices[np.argmin(skin.vertices[:, 1])]
    assert abs(nose_tip[0]) < 3.0  # on the mid-sagittal plane
    assert nose_tip[1] < -80  # anterior = negative canonical y
    hom = np.column_stack([vol.affine()[:3, 3][None, :], [[1.0]]])
    assert np.allclose((a.matrix() @ hom.T).T[:, :3], a.apply(vol.affine()[:3, 3][None, :]))


@pytest.mark.parametrize("angles", [(5, -4, 3), (-6, 5, -4), (0, 6, 0), (4, 0, -5)])
def test_recovered_transform_undoes_known_rotation(reference, angles):
    _vol, a0 = reference
    g = rotation_from_euler_deg(*angles)
    vol = make_head_volume(SHAPE, SPACING, pose=g)
    a = alignment_from_volume(vol)
    # a maps the rotated head onto the same canonical frame: a.R @ g == a0.R
    assert rotation_angle_deg(a.rotation @ g @ a0.rotation.T) < 2.0
    c = _volume_centre_lps()
    assert np.linalg.norm(a.centre_lps_mm - (g @ (a0.centre_lps_mm - c) + c)) < 2.0
    assert a.scale == pytest.approx(a0.scale, rel=0.01)
    # and the same skin point lands at the same canonical position (≤ 2 mm-ish)
    tip0 = a0.apply(np.array([[c[0], c[1] - 114.0, c[2] - 10.0]]))
    tip = a.apply((g @ (np.array([c[0], c[1] - 114.0, c[2] - 10.0]) - c) + c)[None, :])
    assert np.linalg.norm(tip - tip0) < 2.5


def test_original_and_defaced_get_identical_transform(reference):
    vol, a0 = reference
    defaced = make_head_volume(SHAPE, SPACING, deface=True)
    assert not np.array_equal(defaced.hu, vol.hu)
    a = alignment_from_volume(defaced)
    assert np.array_equal(a.rotation, a0.rotation)
    assert np.array_equal(a.centre_lps_mm, a0.centre_lps_mm)
    assert a.scale == a0.scale


def test_scale_normalises_head_size(reference):
    _vol, a0 = reference
    big = make_head_volume((90, 100, 90), SPACING, scale=1.1)
    a = alignment_from_volume(big)
    assert a.scale == pytest.approx(a0.scale / 1.1, rel=0.01)


def test_bone_cloud_normals_point_outwards(reference):
    vol, _a = reference
    cloud = bone_cloud(vol)
    c = np.average(cloud.points_lps_mm, axis=0, weights=cloud.weights_mm2)
    r = cloud.points_lps_mm - c
    far = np.linalg.norm(r, axis=1) > 85  # outer table of the skull vault
    assert far.sum() > 100
    assert (np.einsum("ij,ij->i", cloud.normals[far], r[far]) > 0).mean() > 0.95


def test_bad_input_raises():
    empty = Volume(hu=np.full((10, 10, 10), -1000.0, dtype=np.float32), spacing_mm=(2, 2, 2))
    with pytest.raises(AlignmentError, match="no voxel"):
        alignment_from_volume(empty)
    # a bone sphere: symmetric but its pitch is undefined
    k, j, i = np.meshgrid(*(np.arange(40) * 3.0,) * 3, indexing="ij")
    r = np.sqrt((i - 58.5) ** 2 + (j - 58.5) ** 2 + (k - 58.5) ** 2)
    sphere = Volume(hu=np.where((r < 50) & (r > 42), 700.0, 0.0).astype(np.float32),
                    spacing_mm=(3, 3, 3))
    with pytest.raises(AlignmentError, match="pitch is ill-defined"):
        alignment_from_volume(sphere)
    assert issubclass(AlignmentError, ValueError)
