"""Synthetic head CT generator, PHI writer and synth_cohort command."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from scipy import ndimage

from pipeline.synth import (
    FEATURE_CLASSES,
    LABEL_HU,
    LABEL_HU_RANGE,
    LABELS,
    SubjectParams,
    SynthError,
    generate_head,
    head_local_to_lps,
    render_skin_frontal,
)
from pipeline.synth_phi import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    FakePHI,
    PHIWriteError,
    write_synthetic_series,
)

SMALL = {"shape": (64, 80, 80), "spacing_mm": (3.75, 3.0, 3.0)}


@pytest.fixture(scope="module")
def head():
    """Default (medium) size, frontal pose."""
    return generate_head(SubjectParams.random(7), pose_deg=(0.0, 0.0, 0.0), noise_seed=3)


# ----------------------------------------------------------------------------- determinism

def test_same_arguments_give_identical_output():
    a = generate_head(SubjectParams.random(4), noise_seed=9, **SMALL)
    b = generate_head(SubjectParams.random(4), noise_seed=9, **SMALL)
    assert np.array_equal(a.volume.hu, b.volume.hu)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.face_soft_tissue_mask, b.face_soft_tissue_mask)
    assert a.feature_boxes == b.feature_boxes
    assert a.pose_deg == b.pose_deg


def test_different_seeds_give_different_subjects():
    p1, p2 = SubjectParams.random(1), SubjectParams.random(2)
    assert p1 != p2
    assert SubjectParams.random(1) == p1
    kw = {"pose_deg": (0.0, 0.0, 0.0), "noise_seed": 0, **SMALL}
    a, b = generate_head(p1, **kw), generate_head(p2, **kw)
    body_a, body_b = a.labels > 0, b.labels > 0
    dice = 2 * (body_a & body_b).sum() / (body_a.sum() + body_b.sum())
    assert dice < 0.985  # shapes differ...
    fa, fb = a.face_soft_tissue_mask, b.face_soft_tissue_mask
    assert 2 * (fa & fb).sum() / (fa.sum() + fb.sum()) < 0.9  # ...and faces differ much more


def test_noise_seed_changes_only_the_noise():
    p = SubjectParams.random(3)
    a = generate_head(p, pose_deg=(0, 0, 0), noise_seed=1, noise_hu=15.0, **SMALL)
    b = generate_head(p, pose_deg=(0, 0, 0), noise_seed=2, noise_hu=15.0, **SMALL)
    assert np.array_equal(a.labels, b.labels)
    diff = a.volume.hu.astype(float) - b.volume.hu.astype(float)
    inside = ndimage.binary_erosion(a.labels == LABELS["white_matter"], iterations=2)
    # difference of two independent N(0, 15²) realisations: sd 15·√2
    assert 15 * np.sqrt(2) * 0.85 < diff[inside].std() < 15 * np.sqrt(2) * 1.15


def test_random_pose_is_small_and_seeded():
    p = SubjectParams.random(3)
    a = generate_head(p, noise_seed=5, shape=(16, 24, 24), spacing_mm=(15, 10, 10))
    b = generate_head(p, noise_seed=6, shape=(16, 24, 24), spacing_mm=(15, 10, 10))
    assert a.pose_deg != b.pose_deg
    assert max(abs(v) for v in a.pose_deg + b.pose_deg) <= 5.0


# ----------------------------------------------------------------------------- HU and labels

def test_hu_per_label_is_in_the_documented_range(head):
    hu = head.volume.hu
    assert hu.dtype == np.int16
    for code, v in LABEL_HU.items():
        lo, hi = LABEL_HU_RANGE[code]
        assert lo <= v <= hi
    near_air = ndimage.binary_dilation(head.labels == 0, iterations=2)  # skin partial volume
    checked = 0
    for code, (lo, hi) in LABEL_HU_RANGE.items():
        core = ndimage.binary_erosion(head.labels == code) & ~near_air
        if code == 0:
            core = ndimage.binary_erosion(head.labels == 0, iterations=3)
        if core.sum() < 20:  # thin structures: no voxel away from partial-volume edges
            continue
        med = float(np.median(hu[core]))
        assert lo <= med <= hi, (code, med)
        checked += 1
    assert checked >= 8


def test_noise_free_hu_equals_label_table_away_from_the_skin():
    h = generate_head(SubjectParams.random(5), noise_hu=0.0, blur_sigma_mm=0.0, **SMALL)
    lut = np.full(256, np.nan)
    for code, v in LABEL_HU.items():
        lut[code] = v
    expected = lut[h.labels]
    body = h.labels != 0
    surface = ndimage.binary_dilation(body) & ~ndimage.binary_erosion(body)  # skin anti-aliasing
    hu = h.volume.hu
    same = hu == np.rint(expected).astype(np.int16)
    # exact away from the body surface, except sub-voxel slits (mouth line, nostrils) that are
    # anti-aliased inside the body: those are air/tissue blends
    assert same[~surface].mean() > 0.995
    blends = hu[~same]
    assert blends.min() >= -1000 and blends.max() < max(LABEL_HU.values())
    assert np.all(hu[~same & (h.labels == 1)] < LABEL_HU[1])


def test_expected_tissues_are_present(head):
    counts = np.bincount(head.labels.ravel(), minlength=17)
    for name in ("skin", "fat", "muscle", "cortical_bone", "cancellous_bone", "teeth", "grey_matter",
                 "white_matter", "csf", "vitreous", "internal_air", "couch"):
        assert counts[LABELS[name]] > 0, name
    # soft-tissue volumes are plausible for an adult head (mL)
    ml = head.volume.voxel_volume_ml
    brain_ml = head.brain_mask.sum() * ml
    assert 900 < brain_ml < 1700


def test_masks_are_consistent(head):
    labels = head.labels
    assert np.array_equal(head.bone_mask, np.isin(labels, [5, 6, 7]))
    assert np.array_equal(head.brain_mask, np.isin(labels, [8, 9]))
    face = head.face_soft_tissue_mask
    assert face.any()
    assert not (face & head.bone_mask).any()
    assert not (face & head.brain_mask).any()
    assert set(np.unique(labels[face])) <= {1, 2, 3, 4, 11, 12}
    fm = head.feature_masks
    assert set(fm) == set(FEATURE_CLASSES)
    for name in ("nose", "lips", "eyes", "brow", "chin"):
        assert fm[name].sum() > 50, name
    # nose and lips stand in front of the skeleton; the globes mostly lie behind the rims
    assert (fm["nose"] & face).sum() > 0.5 * fm["nose"].sum()
    assert (fm["lips"] & face).sum() > 0.15 * fm["lips"].sum()
    globes = head.inside_masks()["globe"]
    assert globes.sum() > 100 and not (globes & face).any()
    assert fm["ears"].any() and not (fm["ears"] & face).any()  # the ears' own mask
    assert head.ear_soft_tissue_mask.any() and not (head.ear_soft_tissue_mask & face).any()
    names = list(fm)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not (fm[names[a]] & fm[names[b]]).any()


def test_bone_is_covered_by_soft_tissue_and_brain_by_skull(head):
    outside = head.labels == 0
    assert not (ndimage.binary_dilation(outside) & head.bone_mask).any()
    brain = head.brain_mask
    ring = ndimage.binary_dilation(brain) & ~brain
    neighbours = set(np.unique(head.labels[ring]).tolist())
    # bone, CSF, (sinus air or mucosa behind a thin wall)
    assert neighbours <= {4, 5, 6, 10, 13, 15}, neighbours


def test_anatomical_layout_in_array_coordinates(head):
    """Face anterior (small j), features in their cranio-caudal order, ears lateral."""
    fm = head.feature_masks

    def centroid(m):
        return np.argwhere(m).mean(axis=0)  # (k, j, i)

    body = (head.labels != 0) & (head.labels != LABELS["couch"])
    c_body = centroid(body)
    # the most anterior body voxels are nose
    jmin = np.argwhere(body)[:, 1].min()
    front = body & (np.arange(body.shape[1])[None, :, None] == jmin)
    assert np.all(head.feature_ids[front] == 3)
    k = {name: centroid(m)[0] for name, m in fm.items()}
    assert k["brow"] > k["eyes"] > k["nose"] > k["lips"] > k["chin"]
    for name in ("nose", "lips", "chin", "eyes"):
        assert centroid(fm[name])[1] < c_body[1]
    ears = np.argwhere(fm["ears"])[:, 2]
    face_i = np.argwhere(head.face_soft_tissue_mask)[:, 2]
    assert ears.min() < face_i.min() and ears.max() > face_i.max()
    # patient right (small i) / left: each side has one eye
    eyes_i = np.argwhere(fm["eyes"])[:, 2]
    mid = c_body[2]
    assert (eyes_i < mid).sum() > 20 and (eyes_i > mid).sum() > 20


def test_feature_boxes_match_the_masks(head):
    from pipeline.synth import FEATURE_CODES

    assert len(head.feature_boxes) == head.volume.shape[0]
    n = 0
    for k, boxes in enumerate(head.feature_boxes):
        expected = []
        for code, name in FEATURE_CODES.items():
            objs = ndimage.find_objects((head.feature_ids[k] == code).astype(int))
            if objs and objs[0] is not None:
                rows, cols = objs[0]
                expected.append((name, cols.start, rows.start, cols.stop, rows.stop))
        assert sorted(boxes) == sorted(expected)
        for name, i0, j0, i1, j1 in boxes:
            assert name in FEATURE_CLASSES and 0 <= i0 < i1 <= 96 and 0 <= j0 < j1 <= 96
        n += len(boxes)
    assert n > 20


# ----------------------------------------------------------------------------- geometry

def test_geometry_is_as_requested_and_centred():
    shape, spacing = (50, 70, 60), (4.0, 3.5, 3.2)
    h = generate_head(SubjectParams.random(2), shape=shape, spacing_mm=spacing, pose_deg=(0, 0, 0))
    v = h.volume
    assert v.shape == shape and v.spacing_mm == spacing
    assert np.allclose(v.row_cosine, [1, 0, 0]) and np.allclose(v.col_cosine, [0, 1, 0])
    assert np.allclose(v.normal, [0, 0, 1])
    # FOV centred on LPS (0, 0, 0)
    far = v.affine() @ np.array([shape[2] - 1, shape[1] - 1, shape[0] - 1, 1.0])
    assert np.allclose(far[:3], -v.origin_lps_mm)
    assert v.axis_towards("A") == (1, -1) and v.axis_towards("S") == (0, 1)
    # head (not the couch) roughly centred left-right
    body = (h.labels != 0) & (h.labels != LABELS["couch"])
    ci = np.argwhere(body)[:, 2].mean()
    assert abs(ci - (shape[2] - 1) / 2) < 2.0


def test_anatomy_is_placed_in_mm_independent_of_spacing():
    p = SubjectParams.random(6)
    pos = []
    for shape, spacing in (((64, 80, 80), (3.75, 3.0, 3.0)), ((100, 130, 130), (2.4, 1.85, 1.85))):
        h = generate_head(p, shape=shape, spacing_mm=spacing, pose_deg=(0, 0, 0))
        ijk = np.argwhere(h.feature_masks["nose"]).mean(axis=0)[::-1]  # (i, j, k)
        pos.append((h.volume.affine() @ np.append(ijk, 1.0))[:3])
    assert np.linalg.norm(pos[0] - pos[1]) < 3.0


def test_pose_rotates_the_head_about_the_superior_axis():
    p = SubjectParams.random(8)
    kw = {"noise_hu": 0.0, **SMALL}
    heads = {yaw: generate_head(p, pose_deg=(yaw, 0.0, 0.0), **kw) for yaw in (0.0, 20.0)}
    cents = {}
    for yaw, h in heads.items():
        ijk = np.argwhere(h.feature_masks["nose"]).mean(axis=0)[::-1]
        cents[yaw] = (h.volume.affine() @ np.append(ijk, 1.0))[:3]
    # predicted displacement of the nose from the model's own local → LPS mapping
    nose_local = np.array([0.0, -100.0, -25.0])
    pred = head_local_to_lps(heads[20.0], nose_local)[0] - head_local_to_lps(heads[0.0], nose_local)[0]
    got = cents[20.0] - cents[0.0]
    assert got[0] > 15.0  # +yaw turns the face towards patient left (+x)
    assert np.linalg.norm(got - pred) < 0.35 * np.linalg.norm(pred)


def test_full_size_geometry_is_accepted_without_generating():
    with pytest.raises(SynthError):
        generate_head(shape=(10, 10), spacing_mm=(1, 1, 1))
    with pytest.raises(SynthError):
        generate_head(shape=(10, 10, 10), spacing_mm=(0, 1, 1))
    with pytest.raises(SynthError):
        generate_head(shape=(10, 10, 10), spacing_mm=(1, 1, 1), pose_deg=(0, 90, 0))
    with pytest.raises(SynthError):
        generate_head(shape=(10, 10, 10), spacing_mm=(1, 1, 1), noise_hu=-1)
    with pytest.raises(SynthError, match="too large"):
        generate_head(shape=(2000, 2000, 2000), spacing_mm=(1, 1, 1))


def test_params_validation():
    with pytest.raises(SynthError, match="nose_length_mm"):
        generate_head(SubjectParams(nose_length_mm=500.0))
    with pytest.raises(SynthError):
        SubjectParams.random("seven")  # type: ignore[arg-type]
    ranges = SubjectParams.ranges()
    for seed in range(30):
        p = SubjectParams.random(seed)
        for name, (lo, hi) in ranges.items():
            assert lo <= getattr(p, name) <= hi


# ----------------------------------------------------------------------------- face

def test_frontal_render_shows_a_face_shape(head):
    img = render_skin_frontal(head.volume, size_px=128)
    assert img.shape == (128, 128) and img.dtype == np.uint8
    rows = np.flatnonzero((img > 0).any(axis=1))
    cols = np.flatnonzero((img > 0).any(axis=0))
    assert rows.size > 60 and cols.size > 40  # a head-sized silhouette
    # left-right symmetric within a few pixels at pose 0
    assert abs((cols[0] + cols[-1]) / 2 - 63.5) < 4


@pytest.mark.slow
def test_dlib_finds_faces_in_frontal_renders():
    dlib = pytest.importorskip("dlib")
    det = dlib.get_frontal_face_detector()
    found = 0
    for seed in (0, 1):
        h = generate_head(SubjectParams.random(seed), shape=(200, 192, 192), spacing_mm=(1.2, 1.2, 1.2),
                          pose_deg=(0, 0, 0), noise_seed=seed)
        img = render_skin_frontal(h.volume)
        found += len(det(np.repeat(img[:, :, None], 3, axis=2), 1)) > 0
        # after removing the facial soft tissue the skin surface lies on the skeleton
        hu = h.volume.hu.copy()
        hu[h.face_soft_tissue_mask] = -1000
        assert (hu > -300).sum() < (h.volume.hu > -300).sum()
    assert found == 2


# ----------------------------------------------------------------------------- PHI writer

@pytest.fixture(scope="module")
def tiny_head():
    return generate_head(SubjectParams.random(2), shape=(12, 24, 24), spacing_mm=(20.0, 10.0, 10.0))


def test_fake_phi_is_deterministic_and_distinct():
    a, b = FakePHI.random(1), FakePHI.random(2)
    assert a == FakePHI.random(1) and a != b
    assert a.patient_name == f"{a.patient_last}^{a.patient_first}"
    ids = a.identifiers()
    for v in (a.patient_name, a.patient_id, a.birth_date, a.accession_number, a.institution_name,
              a.other_patient_id, a.referring_physician):
        assert v in ids
    assert not set(ids) & set(b.identifiers())
    with pytest.raises(PHIWriteError):
        FakePHI.random(1.5)  # type: ignore[arg-type]


def test_written_series_carries_the_identity_everywhere(tmp_path, tiny_head):
    phi = FakePHI.random(11)
    paths = write_synthetic_series(tiny_head, phi, tmp_path / "s")
    assert len(paths) == tiny_head.volume.shape[0]
    assert all(p.parent == tmp_path / "s" for p in paths)
    ds = pydicom.dcmread(paths[3])
    assert str(ds.PatientName) == phi.patient_name
    assert ds.PatientID == phi.patient_id
    assert ds.PatientBirthDate == phi.birth_date
    assert phi.patient_last in ds.StudyDescription and phi.patient_last in ds.SeriesDescription
    assert str(ds.OperatorsName) == phi.operator
    assert ds.InstitutionName == phi.institution_name
    # depth-2 nested identifiers
    assert phi.patient_last in ds.RequestAttributesSequence[0].ScheduledProtocolCodeSequence[0].CodeMeaning
    assert (ds.OtherPatientIDsSequence[0].IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID
            == phi.institution_name)
    assert str(ds.ReferencedStudySequence[0].ReferencedPatientSequence[0].PatientName) == phi.patient_name
    # private block in an odd group with a private creator
    assert PRIVATE_GROUP % 2 == 1
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[0x01].value == phi.patient_name and block[0x02].value == phi.patient_id
    assert str(block[0x04].value[0].PatientName) == phi.patient_name
    # every listed identifier is in the raw bytes of every file
    for p in paths:
        raw = p.read_bytes()
        missing = [s for s in phi.identifiers() if s.encode() not in raw]
        assert not missing
    # pixels round-trip to the volume's HU
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert np.array_equal(hu, tiny_head.volume.hu[3])


def test_rle_and_shuffled_names(tmp_path, tiny_head):
    phi = FakePHI.random(12)
    paths = write_synthetic_series(tiny_head, phi, tmp_path / "rle", compress="rle", shuffle_names=True,
                                   seed=4)
    names = [p.name for p in paths]
    assert names != sorted(names) and not any(n.endswith(".dcm") for n in names)
    by_z = []
    for p in sorted(paths):  # directory order: geometry needed to recover the slices
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        by_z.append((float(ds.ImagePositionPatient[2]), ds.pixel_array.astype(np.int32)
                     + int(ds.RescaleIntercept)))
    vol = np.stack([a for _, a in sorted(by_z, key=lambda t: t[0])])
    assert np.array_equal(vol, tiny_head.volume.hu)
    with pytest.raises(PHIWriteError):
        write_synthetic_series(tiny_head, phi, tmp_path / "x", compress="zip")


# ----------------------------------------------------------------------------- command

def test_synth_cohort_command(tmp_path, capsys):
    out = tmp_path / "cohort"
    call_command("synth_cohort", str(out), subjects=2, seed=20, size="tiny", compress="rle")
    summary = capsys.readouterr().out
    meta = json.loads((out / "phi.json").read_text())
    assert [s["seed"] for s in meta["subjects"]] == [20, 21]
    for i, subj in enumerate(meta["subjects"]):
        phi = FakePHI.random(20 + i)
        assert subj["dicom_folder"] == f"dicom/{phi.folder_name}"
        assert phi.patient_last in phi.folder_name and phi.patient_id in phi.folder_name
        assert set(phi.identifiers()) <= set(subj["identifiers"])
        assert phi.patient_last not in summary and phi.patient_id not in summary
        files = sorted((out / subj["dicom_folder"]).iterdir())
        assert len(files) == 40
        truth = np.load(out / subj["truth"])
        ref = generate_head(SubjectParams.random(20 + i), shape=(40, 48, 48), spacing_mm=(6.0, 5.0, 5.0),
                            noise_seed=20 + i)
        assert np.array_equal(truth["labels"], ref.labels)
        assert np.array_equal(truth["face_soft_tissue_mask"], ref.face_soft_tissue_mask)
        boxes = json.loads(str(truth["feature_boxes"]))
        assert [[tuple(b) for b in s] for s in boxes] == ref.feature_boxes
        assert json.loads(str(truth["params"]))["seed"] == 20 + i
        ds = pydicom.dcmread(files[0])
        assert str(truth["series_instance_uid"]) == ds.SeriesInstanceUID
    assert not list((out / "dicom").rglob("*.npz"))  # truth is outside the DICOM tree
    with pytest.raises(CommandError, match="not empty"):
        call_command("synth_cohort", str(out), subjects=1, size="tiny")
    with pytest.raises(CommandError, match="--size"):
        call_command("synth_cohort", str(tmp_path / "other"), subjects=1, size="huge")


# --------------------------------------------------------------------------- inner anatomy, acquisitions

def test_inner_structures_have_ground_truth(head):
    """Everything the facial skeleton encloses is labelled and mostly inside the hull."""
    from pipeline.synth import STRUCTURES

    inside = head.inside_masks()
    assert set(inside) == set(STRUCTURES)
    for name, code in STRUCTURES.items():
        whole = head.structures == code
        assert whole.sum() > 30, name
        assert inside[name].sum() > 0.2 * whole.sum(), name
    # sinuses hold mucosa (soft tissue) as well as air; orbits hold muscles in fat
    sinus = head.structures == STRUCTURES["sinuses"]
    assert (head.labels[sinus] == LABELS["soft_tissue"]).any()
    assert (head.labels[sinus] == LABELS["internal_air"]).any()
    assert (head.labels[head.structures == STRUCTURES["eye_muscles"]] == LABELS["muscle"]).all()
    oral = head.structures == STRUCTURES["oral_cavity"]
    assert (head.labels[oral] == LABELS["muscle"]).sum() > (head.labels[oral] == LABELS["internal_air"]).sum() > 0


def test_dental_metal_and_streaks():
    p = SubjectParams.random(5)
    plain = generate_head(p, pose_deg=(0, 0, 0), noise_seed=1, **SMALL)
    metal = generate_head(p, pose_deg=(0, 0, 0), noise_seed=1, metal=True, **SMALL)
    assert not (plain.labels == LABELS["metal"]).any()
    m = metal.labels == LABELS["metal"]
    assert m.any() and (metal.volume.hu[m] > 2000).mean() > 0.5
    k = int(np.argmax(m.sum(axis=(1, 2))))
    diff = np.abs(metal.volume.hu[k].astype(int) - plain.volume.hu[k].astype(int))
    air = plain.labels[k] == 0
    assert (diff[air] > 150).sum() > 10  # streaks reach the air in front of the face


def test_tilted_thick_variable_acquisition_geometry():
    """4 mm then 7 mm slabs, gantry tilt 18.5°: positions, orientation and partial volume."""
    z = [*range(0, 60, 4), *range(61, 160, 7)]
    th = [4.0] * 15 + [7.0] * (len(z) - 15)
    h = generate_head(SubjectParams.random(3), shape=(len(z), 100, 90), spacing_mm=(4, 2.4, 2.4),
                      positions_mm=z, thickness_mm=th, tilt_deg=18.5, pose_deg=(0, 0, 0))
    v = h.volume
    assert v.hu.shape == (len(z), 100, 90) and not v.is_regular
    t = np.radians(18.5)
    np.testing.assert_allclose(v.col_cosine, [0, np.cos(t), -np.sin(t)], atol=1e-9)
    pos = v.positions_lps_mm()
    np.testing.assert_allclose(np.diff(pos[:, 2]), np.diff(np.asarray(z, float)), atol=1e-9)
    np.testing.assert_allclose(pos[:, :2], pos[:1, :2].repeat(len(z), 0), atol=1e-9)  # sheared
    # a thick slab averages: fewer distinct bone/air extremes than thin planes would show
    assert h.skeleton_hull is not None and h.face_soft_tissue_mask.sum() > 100
    # the same patient point lies in the same place: nose tip LPS from head-local
    from pipeline.synth import _HeadModel, head_local_to_lps

    m = _HeadModel(h.params)
    tip = head_local_to_lps(h, np.array([[0.0, m.y_tip, m.z_tip]]))[0]
    flat = generate_head(SubjectParams.random(3), shape=(60, 100, 90), spacing_mm=(2.7, 2.4, 2.4),
                         pose_deg=(0, 0, 0))
    tip_flat = head_local_to_lps(flat, np.array([[0.0, m.y_tip, m.z_tip]]))[0]
    assert np.linalg.norm(tip - tip_flat) < 1e-6


def test_acquisition_rejects_bad_input():
    with pytest.raises(SynthError, match="increasing"):
        generate_head(positions_mm=[0, 4, 4], **SMALL)
    with pytest.raises(SynthError, match="thickness"):
        generate_head(thickness_mm=20.0, **SMALL)
    with pytest.raises(SynthError, match="tilt"):
        generate_head(tilt_deg=40.0, **SMALL)


@pytest.mark.parametrize("seed,labels,face_voxels", [
    (7, [119847, 3315, 6112, 5971, 249, 3840, 4080, 99, 1668, 13036, 1450, 134, 4, 706, 3320, 9,
         0], 267),
    (4242, [117109, 3494, 5688, 6591, 244, 3976, 3803, 97, 1747, 15044, 1531, 135, 4, 953, 3400,
            24, 0], 251),
])
def test_heads_of_a_seed_do_not_change(seed, labels, face_voxels):
    """Pinned voxel counts per label: a refactoring of the head layout (its steps draw the
    idiosyncratic jitter in order) must give every seed exactly the head it gave before."""
    head = generate_head(SubjectParams.random(seed), shape=(40, 64, 64), spacing_mm=(5.0, 4.0, 4.0))
    counts = np.bincount(head.labels.ravel(), minlength=len(labels))[:len(labels)].tolist()
    assert counts == labels
    assert int(head.face_soft_tissue_mask.sum()) == face_voxels
