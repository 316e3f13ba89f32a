"""Alignment: canonical pose/scale from bone, equivariance to small head rotations."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.align import (
    Alignment,
    AlignmentError,
    BoneCloud,
    alignment_from_volume,
    bone_cloud,
    default_template,
    make_template,
    rotation_angle_deg,
    rotation_from_euler_deg,
    symmetry_plane,
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
def toy() -> tuple[Volume, object]:
    """Untilted toy head and a template made from its own bone (head frame = LPS - centre)."""
    vol = make_head_volume(SHAPE, SPACING)
    cloud = bone_cloud(vol)
    local = BoneCloud(cloud.points_lps_mm - _volume_centre_lps(), cloud.normals, cloud.weights_mm2)
    return vol, make_template(local)


def test_euler_helper_is_a_rotation_about_the_named_axes():
    r = rotation_from_euler_deg(yaw_deg=30)
    assert np.allclose(r @ [1, 0, 0], [np.cos(np.pi / 6), np.sin(np.pi / 6), 0])
    r = rotation_from_euler_deg(4, -3, 2)
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
    assert rotation_angle_deg(rotation_from_euler_deg(pitch_deg=7)) == pytest.approx(7.0)


@pytest.mark.parametrize("angles", [(0, 0, 0), (5, -4, 3), (-6, 5, -4), (0, 6, 0), (4, 0, -5)])
def test_recovered_transform_undoes_known_rotation(toy, angles):
    _vol, template = toy
    g = rotation_from_euler_deg(*angles)
    vol = make_head_volume(SHAPE, SPACING, pose=g)
    a = alignment_from_volume(vol, template)
    assert np.allclose(a.rotation @ a.rotation.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(a.rotation) == pytest.approx(1.0)
    # the head frame is LPS rotated by g: the alignment must be g⁻¹
    assert rotation_angle_deg(a.rotation @ g) < 2.0
    # the head centre (template origin) maps to the canonical origin
    assert np.linalg.norm(a.apply(_volume_centre_lps()[None, :])) < 2.0
    assert a.scale == pytest.approx(1.0, rel=0.01)
    # a skin point (the nose tip) lands where it belongs in the head frame
    tip_head = np.array([0.0, -114.0, -10.0])
    tip_lps = g @ tip_head + _volume_centre_lps()
    assert np.linalg.norm(a.apply(tip_lps[None, :])[0] - tip_head) < 3.0


def test_symmetry_plane_of_rotated_head(toy):
    g = rotation_from_euler_deg(6, 0, -4)
    vol = make_head_volume(SHAPE, SPACING, pose=g)
    normal, point, rms = symmetry_plane(bone_cloud(vol))
    assert np.degrees(np.arccos(normal @ g[:, 0])) < 0.5
    assert abs((point - _volume_centre_lps()) @ normal) < 0.5
    assert rms < 1.0


def test_original_and_defaced_get_identical_transform(toy):
    vol, template = toy
    defaced = make_head_volume(SHAPE, SPACING, deface=True)
    assert not np.array_equal(defaced.hu, vol.hu)
    a0, a = alignment_from_volume(vol, template), alignment_from_volume(defaced, template)
    assert np.array_equal(a.rotation, a0.rotation)
    assert np.array_equal(a.centre_lps_mm, a0.centre_lps_mm)
    assert a.scale == a0.scale


def test_scale_normalises_head_size(toy):
    _vol, template = toy
    big = make_head_volume((90, 100, 90), SPACING, scale=1.1)
    a = alignment_from_volume(big, template)
    assert a.scale == pytest.approx(1 / 1.1, rel=0.02)
    assert rotation_angle_deg(a.rotation) < 1.0


def test_canonical_frame_and_mesh_mapping(toy):
    vol, template = toy
    a = alignment_from_volume(vol, template)
    skin = a.apply_mesh(skin_surface(vol, target_faces=20_000))
    assert skin.volume > 0  # winding preserved by a proper similarity
    nose_tip = skin.vertices[np.argmin(skin.vertices[:, 1])]
    assert abs(nose_tip[0]) < 3.0 and nose_tip[1] < -100  # anterior = negative canonical y
    p = np.array([[10.0, -20.0, 30.0]])
    hom = np.column_stack([p, [[1.0]]])
    assert np.allclose((a.matrix() @ hom.T).T[:, :3], a.apply(p))


def test_bone_cloud_normals_point_outwards(toy):
    vol, _t = toy
    cloud = bone_cloud(vol)
    c = np.average(cloud.points_lps_mm, axis=0, weights=cloud.weights_mm2)
    r = cloud.points_lps_mm - c
    far = np.linalg.norm(r, axis=1) > 85  # outer table of the skull vault
    assert far.sum() > 100
    assert (np.einsum("ij,ij->i", cloud.normals[far], r[far]) > 0).mean() > 0.95


@pytest.mark.slow
def test_synthetic_head_pose_is_recovered_with_default_template():
    """Same synthetic subject at two poses: the relative rotation is undone (< 2°)."""
    from pipeline import synth

    params = synth.SubjectParams.random(11)
    kw = {"shape": (84, 100, 100), "spacing_mm": (3.0, 2.5, 2.5)}
    poses = [(0.0, 0.0, 0.0), (4.0, -3.0, 3.0)]
    heads = [synth.generate_head(params, pose_deg=p, noise_seed=i, **kw)
             for i, p in enumerate(poses)]
    al = [alignment_from_volume(h.volume) for h in heads]
    g = [rotation_from_euler_deg(*p) for p in poses]  # head-local → LPS
    # both recover the same head-fixed frame: a_i.R @ g_i is the same matrix
    assert rotation_angle_deg((al[1].rotation @ g[1]) @ (al[0].rotation @ g[0]).T) < 2.0
    # yaw and roll are anatomical (symmetry plane): canonical x = head-local x
    for a, gi in zip(al, g):
        assert np.degrees(np.arccos(np.clip(a.rotation[0] @ gi[:, 0], -1, 1))) < 1.0
    # the default template's origin sits between the pupils: within 15 mm of it
    for a, h in zip(al, heads):
        assert np.linalg.norm(a.apply(h.head_centre_lps_mm[None, :])) < 15.0
    assert default_template() is default_template()


def test_bad_input_raises():
    empty = Volume(hu=np.full((10, 10, 10), -1000.0, dtype=np.float32), spacing_mm=(2, 2, 2))
    with pytest.raises(AlignmentError, match="no voxel"):
        alignment_from_volume(empty)
    # a bone slab far from any head: symmetric plane fine, template fit impossible
    hu = np.full((30, 30, 30), -1000.0, dtype=np.float32)
    hu[10:12, 5:25, 5:25] = 700.0
    with pytest.raises(AlignmentError):
        alignment_from_volume(Volume(hu=hu, spacing_mm=(3, 3, 3)))
    with pytest.raises(AlignmentError, match="at least 50"):
        symmetry_plane(BoneCloud(np.zeros((10, 3)), np.ones((10, 3)), np.ones(10)))
    assert issubclass(AlignmentError, ValueError)
    _ = Alignment(np.eye(3), np.zeros(3), 1.0)


# --------------------------------------------------------------------------- robustness


def _synthetic(pose, crop_mm=None, seed=1):
    """A small synthetic head (default template's generator) at a known pose, optionally
    cut to head-local z in [lo, hi] mm."""
    from pipeline.synth import SubjectParams, generate_head

    head = generate_head(SubjectParams.random(seed), shape=(64, 80, 80),
                         spacing_mm=(3.75, 3.0, 3.0), pose_deg=pose, noise_seed=seed)
    vol = head.volume
    if crop_mm is not None:
        z = vol.origin_lps_mm[2] + np.arange(vol.shape[0]) * vol.spacing_mm[0]
        z = z - head.head_centre_lps_mm[2]
        k = np.flatnonzero((z >= crop_mm[0]) & (z <= crop_mm[1]))
        vol = Volume(hu=vol.hu[k[0]:k[-1] + 1], spacing_mm=vol.spacing_mm,
                     origin_lps_mm=vol.origin_lps_mm + [0.0, 0.0, k[0] * vol.spacing_mm[0]])
    return head, vol


@pytest.mark.parametrize("pose, crop", [
    ((0.0, 20.0, 0.0), None),        # strongly flexed: single-start ICP stopped 14° short
    ((0.0, -15.0, 0.0), None),       # extended
    ((8.0, 12.0, -5.0), None),
    ((0.0, 0.0, 0.0), (-200, 60)),   # no vertex (facial CT)
    ((0.0, 0.0, 0.0), (-200, 35)),   # face only
    ((0.0, 0.0, 0.0), (-55, 200)),   # no chin
])
def test_synthetic_heads_align_whatever_the_pitch_and_field_of_view(pose, crop):
    from pipeline.synth import _rotation

    head, vol = _synthetic(pose, crop)
    a = alignment_from_volume(vol)
    # canonical axes = the head's own axes: rotation ≈ inverse of the head's pose
    assert rotation_angle_deg(a.rotation @ _rotation(head.pose_deg)) < 6.0
    assert np.linalg.norm(a.centre_lps_mm - head.head_centre_lps_mm) < 8.0
    assert 0.85 < a.scale < 1.15 and a.template_match_fraction > 0.8


def test_alignment_follows_a_simulated_rescan():
    from pipeline.rescan import simulate_rescan

    _head, vol = _synthetic((0.0, 5.0, 0.0))
    a = alignment_from_volume(vol)
    for seed in (1, 2):
        moved, motion = simulate_rescan(vol, seed=seed)
        b = alignment_from_volume(moved)
        assert rotation_angle_deg(b.rotation @ (a.rotation @ motion.rotation.T).T) < 3.0
        expected = (motion.rotation @ (a.centre_lps_mm - motion.centre_lps_mm)
                    + motion.centre_lps_mm + motion.shift_lps_mm)
        assert np.linalg.norm(b.centre_lps_mm - expected) < 3.0


REAL = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "realct"


@pytest.mark.skipif(not (REAL / "ge-head-ct").is_dir(), reason="../shared/realct not present")
def test_real_head_ct_aligns_face_forwards(tmp_path):
    """The GE head's first 14 slices (4 mm, skull base to orbits, gantry tilt 18.5°) align;
    its nose ends up in front of the canonical origin and near the mid-sagittal plane."""
    import shutil

    from pipeline.dicom_io import load_series, scan_folder

    for n in range(1, 15):
        shutil.copy(REAL / "ge-head-ct" / f"{n:02d}.dcm", tmp_path / f"{n:02d}.dcm")
    vol = load_series(scan_folder(tmp_path).series[0]).volume
    a = alignment_from_volume(vol)
    skin = a.apply_mesh(skin_surface(vol, stride=(1, 4, 4), target_faces=40_000))
    v = np.asarray(skin.vertices)
    face = v[np.abs(v[:, 0]) < 60]
    tip = face[np.argmin(face[:, 1])]  # most anterior skin point: the nose
    assert tip[1] < -60 and abs(tip[0]) < 10 and -70 < tip[2] < 10
    assert a.template_match_fraction > 0.45
