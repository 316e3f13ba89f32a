"""Domain-randomised synthetic heads (pipeline.synth_domain): exact labels, variety, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detector_data import domain_acquisition
from pipeline.synth import LABELS, SOFT_TISSUE_LABELS, SubjectParams, generate_head
from pipeline.synth_domain import DomainParams

KW = {"shape": (40, 112, 112), "spacing_mm": (4.0, 2.0, 2.0), "pose_deg": (0.0, 0.0, 0.0), "couch": False}


def _head(seed: int, **over):
    dom = DomainParams.random(seed, fov_mm=224.0)
    dom.fov_shift_mm = (0.0, 0.0)
    for k, v in over.items():
        setattr(dom, k, v)
    params = dom.adjust_params(SubjectParams.random(seed))
    return generate_head(params, noise_seed=seed, domain=dom, **KW), dom


@pytest.fixture(scope="module")
def head():
    h, _ = _head(3, nose_hollow=True, holder="cradle", foam=True, edentulous=False, pathology=[])
    return h


def test_draws_are_deterministic_and_vary():
    a, b = DomainParams.random(5), DomainParams.random(5)
    assert a.to_dict() == b.to_dict()
    draws = [DomainParams.random(s) for s in range(60)]
    assert {d.age for d in draws} == {"child", "adult", "elderly"}
    assert {d.kernel for d in draws} == {"soft", "bone"}
    assert {d.holder for d in draws} == {"cradle", "couch", "none"}
    assert any(d.edentulous for d in draws) and any(d.pathology for d in draws)
    assert min(d.fat_mm for d in draws) < 3 and max(d.fat_mm for d in draws) > 10
    for s, d in enumerate(draws):  # age, sex and habitus keep every subject valid
        d.adjust_params(SubjectParams.random(s)).validate()


def test_same_arguments_same_domain_head():
    a, _ = _head(11)
    b, _ = _head(11)
    assert np.array_equal(a.volume.hu, b.volume.hu) and np.array_equal(a.labels, b.labels)
    assert a.feature_boxes == b.feature_boxes


def test_hollow_nose_is_labelled_and_holds_air(head):
    nose = head.feature_masks["nose"]
    assert nose.sum() > 50
    assert np.isin(head.labels[nose], SOFT_TISSUE_LABELS).all()
    # the nasal airway inside the nose: air between the nose's walls on its slices
    air_inside = 0
    for k in np.flatnonzero(nose.reshape(nose.shape[0], -1).any(1)):
        jj, ii = np.nonzero(nose[k])
        box = head.labels[k, jj.min():jj.max() + 1, ii.min():ii.max() + 1]
        air_inside += int((box == LABELS["internal_air"]).sum())
    assert air_inside > 5
    # nasal bones in its upper part: bone inside the nose's box on some slice
    bone_in_box = 0
    for k in np.flatnonzero(nose.reshape(nose.shape[0], -1).any(1)):
        jj, ii = np.nonzero(nose[k])
        box = head.labels[k, jj.min():jj.max() + 1, ii.min():ii.max() + 1]
        bone_in_box += int((box == LABELS["cortical_bone"]).sum())
    assert bone_in_box > 0


def test_ears_are_thin_flaps_attached_to_the_head(head):
    from scipy import ndimage as ndi

    ears = head.feature_masks["ears"]
    assert ears.sum() > 30
    body = head.labels != 0
    for k in np.flatnonzero(ears.reshape(ears.shape[0], -1).any(1)):
        lab, n = ndi.label(body[k])
        # every ear pixel belongs to the head's connected body (no floating auricle)
        main = lab == np.bincount(lab[lab > 0]).argmax()
        assert (ears[k] & ~main).sum() <= 0.1 * ears[k].sum() + 2


def _ear_protrusion_mm(h) -> float:
    """How far the auricles stand out of the head: the largest distance (mm, in-plane) of an
    ear voxel from the body without the ears, over the slices."""
    from scipy import ndimage as ndi

    ears, body = h.feature_masks["ears"], h.labels != 0
    sp = h.volume.spacing_mm
    out = 0.0
    for k in np.flatnonzero(ears.reshape(ears.shape[0], -1).any(1)):
        rest = ndi.binary_opening(ndi.binary_fill_holes(body[k] & ~ears[k]), iterations=2)
        dist = ndi.distance_transform_edt(~rest, sampling=sp[1:])
        out = max(out, float(dist[ears[k] & body[k]].max()))
    return out


def _without_ears(monkeypatch):
    """Make the following heads without auricles (nothing else changes)."""
    from pipeline import synth

    far = lambda: synth._Group("ear", [synth._u(synth._Sphere((0.0, 0.0, 1.0e5), 0.5))])
    layout, extend = synth._HeadModel._layout_ears, DomainParams.extend_model

    def no_ears(self, lm):
        layout(self, lm)
        self.g_ear = [far(), far()]

    def extend_no_ears(self, model):
        extend(self, model)
        model.g_ear = [far(), far()]

    monkeypatch.setattr(synth._HeadModel, "_layout_ears", no_ears)
    monkeypatch.setattr(DomainParams, "extend_model", extend_no_ears)


@pytest.mark.parametrize("domain", [True, False])
def test_ear_label_begins_at_the_skin_of_the_head_without_ears(monkeypatch, domain):
    """The ear label is what a person labelling a slice draws: the auricle from the skin out, as in
    tests/data/realct_labels/ge-head-ct.json, not the ear primitives' root inside the head. Checked
    against the same head generated again without its ears; the removal ground truth keeps the
    whole ear."""

    def make():
        if domain:
            return _head(5, holder="none", foam=False, pathology=[])[0]
        return generate_head(SubjectParams.random(5), noise_seed=5, **KW)

    h = make()
    _without_ears(monkeypatch)
    bare = make()
    assert not bare.feature_masks["ears"].any()
    body = bare.labels != 0
    ears = h.feature_masks["ears"]
    assert ears.sum() > 200
    assert not (ears & body).any()  # nothing of the label lies inside the head without ears
    # the ear's root inside that head is ear tissue to remove, but not labelled
    root = h.ear_soft_tissue_mask & body & ~ears
    assert root.sum() > 0.1 * ears.sum(), (root.sum(), ears.sum())


def test_auricles_stand_off_the_head_as_real_ones_do():
    """The concha's back wall carries the pinna: free auricles stand 15-35 mm out of the head
    (adults: the helix 15-20 mm off the mastoid skin; ge-head-ct's labelled auricles 10-27 mm wide), about
    the wall's width more than the pinna alone at the same angle; pressed ones less."""
    def protrusion(seed, deg, concha):
        return _ear_protrusion_mm(_head(seed, ear_protrusion_deg=deg, ear_concha_mm=concha, holder="none",
                                        foam=False, pathology=[])[0])

    for seed, concha in ((3, 8.0), (8, 12.0)):
        free, alone = protrusion(seed, 12.0, concha), protrusion(seed, 12.0, 0.0)
        assert 15.0 <= free <= 35.0 and free - alone >= 0.6 * concha, (seed, free, alone)
    assert protrusion(3, 4.0, 3.0) < 15.0
    draws = [DomainParams.random(s) for s in range(40)]
    assert all(2.0 <= d.ear_concha_mm <= 14.0 for d in draws)
    assert sum(d.ear_concha_mm >= 6.0 for d in draws) > 20


def test_the_holder_presses_the_ear_it_would_cut(monkeypatch):
    """A head resting near one side of a U-shaped holder (as ge-head-ct's does): that ear lies
    pressed against the head, not through the holder's wall; the other ear keeps its drawn angle."""
    over = {"holder": "cradle", "foam": False, "holder_gap_mm": 6.0, "holder_front_mm": -50.0, "pathology": [],
            "ear_protrusion_deg": 30.0, "ear_concha_mm": 12.0, "ear_fold": False}
    holder = LABELS["holder"]
    results = {}
    for shift in (10.0, -10.0):  # the holder moved to the head's left (+x): the head rests on its right side
        h, _ = _head(3, holder_shift_mm=shift, **over)
        with monkeypatch.context() as mp:
            _without_ears(mp)
            bare, _ = _head(3, holder_shift_mm=shift, **over)
        # the holder is painted where air is: every voxel of its wall is there, with ears or without
        assert (h.labels == holder).sum() == (bare.labels == holder).sum() > 1000
        results[shift] = h
    # the near ear was pressed (angle first), the far one kept its 30 degrees
    fit = {shift: _fit(shift, over) for shift in results}
    assert fit[10.0][0][0] < 30.0 and fit[10.0][1] == (30.0, 12.0), fit
    assert fit[-10.0][1][0] < 30.0 and fit[-10.0][0] == (30.0, 12.0), fit
    # and it lies flatter: less of the right auricle (patient right: columns < mid) stands out of the head
    ears = results[10.0].feature_masks["ears"]
    mid = ears.shape[2] // 2
    right_near = ears[:, :, :mid].sum()
    right_far = results[-10.0].feature_masks["ears"][:, :, :mid].sum()
    assert right_near < right_far, (right_near, right_far)


def _fit(shift: float, over: dict, folded: bool = False) -> list:
    """The ear fit (angle in degrees, concha wall in mm; right, left) of seed 3 drawn with ``over``;
    ``folded``: whether each ear was folded along the holder instead."""
    from pipeline import synth

    dom = DomainParams.random(3, fov_mm=224.0)
    for k, v in {**over, "holder_shift_mm": shift}.items():
        setattr(dom, k, v)
    model = synth._HeadModel(dom.adjust_params(SubjectParams.random(3)))
    dom.extend_model(model)
    return list(model.ear_folded) if folded else [(round(a, 3), round(c, 3)) for a, c in model.ear_fit]


def _right_gap_px(h) -> tuple[int, int]:
    """(columns between the right ear's most lateral voxel and the holder's inner wall, ear voxels)
    over the slices where both are, in the right half (patient right: low columns)."""
    ears = h.feature_masks["ears"]
    mid = ears.shape[2] // 2
    holder = h.labels == LABELS["holder"]
    gaps = []
    for k in range(ears.shape[0]):
        for j in range(ears.shape[1]):
            e, w = np.flatnonzero(ears[k, j, :mid]), np.flatnonzero(holder[k, j, :mid])
            if e.size and w.size and w.max() < e.min():
                gaps.append(e.min() - w.max() - 1)
    return min(gaps), int(ears[:, :, :mid].sum())


def test_an_ear_that_reaches_the_holder_can_fold_along_it():
    """The other way an ear gives way to the holder (ge-head-ct's right ear: its lower part stands
    out to the wall, the edge and lobule lying against it): it keeps its angle and folds back along
    the wall. Drawn as often as the pressed ear; the far ear and the holder are as before."""
    over = {"holder": "cradle", "foam": False, "holder_gap_mm": 6.0, "holder_front_mm": -50.0, "pathology": [],
            "ear_protrusion_deg": 30.0, "ear_concha_mm": 12.0, "holder_shift_mm": 10.0}
    folded, _ = _head(3, ear_fold=True, **over)
    pressed, _ = _head(3, ear_fold=False, **over)
    assert _fit(10.0, {**over, "ear_fold": True}, folded=True) == [True, False]
    assert _fit(10.0, {**over, "ear_fold": True})[0] == (30.0, 12.0)  # it keeps its angle and wall
    holder = LABELS["holder"]
    assert (folded.labels == holder).sum() == (pressed.labels == holder).sum() > 1000
    gap_f, n_f = _right_gap_px(folded)
    gap_p, n_p = _right_gap_px(pressed)
    # folded: the auricle lies against the wall (within a 2 mm pixel); pressed: it keeps off it
    assert gap_f <= 1 < gap_p, (gap_f, gap_p)
    # and it stands further out from the head than the pressed one, with its tissue
    assert n_f > n_p, (n_f, n_p)
    # the left ear (free) is the same voxel for voxel
    mid = folded.labels.shape[2] // 2
    assert np.array_equal(folded.feature_masks["ears"][:, :, mid:], pressed.feature_masks["ears"][:, :, mid:])
    # both ways are drawn
    draws = [DomainParams.random(s) for s in range(200)]
    assert 60 < sum(d.ear_fold for d in draws) < 140
    assert all(1.0 <= d.ear_helix_mm <= 3.0 for d in draws)


def test_ground_truth_stays_consistent(head):
    face = head.face_soft_tissue_mask
    assert face.any()
    assert not (face & np.isin(head.labels, (5, 6, 7, 16))).any()
    assert not (face & (head.structures > 0)).any()
    holder = np.isin(head.labels, (LABELS["holder"], LABELS["foam"]))
    assert holder.any() and not (holder & (head.feature_ids > 0)).any()
    assert not (holder & face).any()


def test_edentulous_and_trauma():
    h, dom = _head(21, edentulous=True, metal=False, pathology=[
        {"kind": "fracture", "site": "nasal", "side": 1, "scale": 1.2, "normal": [0.0, 0.3, 1.0],
         "gap_mm": 2.5, "emphysema": True},
        {"kind": "haematoma", "site": "periorbital", "side": -1, "scale": 1.0, "hu": 40.0, "oedema_hu": 10.0},
    ])
    assert not (h.labels == LABELS["teeth"]).any()
    ref, _ = _head(21, edentulous=False, pathology=[])
    assert (ref.labels == LABELS["teeth"]).any()
    assert (h.labels != ref.labels).any()


def test_domain_acquisition_is_routine_head_ct():
    accs = [domain_acquisition(s) for s in range(40)]
    tilts = [a["tilt_deg"] for a in accs]
    assert any(t == 0 for t in tilts) and max(tilts) > 15
    for a in accs:
        pos = a["positions_mm"]
        assert np.all(np.diff(pos) > 0) and 0.6 <= a["thickness_mm"].min() and a["thickness_mm"].max() <= 10
        assert 150 <= a["shape"][1] <= 200 and 200 <= a["fov_mm"] <= 310
    assert any(len(np.unique(np.round(np.diff(a["positions_mm"]), 3))) > 1 for a in accs)
    a, b = domain_acquisition(7), domain_acquisition(7)
    assert np.array_equal(a.pop("positions_mm"), b.pop("positions_mm"))
    assert np.array_equal(a.pop("thickness_mm"), b.pop("thickness_mm")) and a == b


def test_finer_pixels_keep_the_acquisition_and_the_head(tmp_path):
    """``px_scale`` (DatasetSpec.domain_px_scale) draws the same field of view, tilt, pose and
    slices on that many times more pixels; the head drawn is the same in millimetres."""
    import json

    from PIL import Image

    from pipeline import detector_data as dd

    for s in range(30):
        a, b = domain_acquisition(s), domain_acquisition(s, px_scale=1.6)
        n = b["shape"][1]
        assert n == round(a["shape"][1] * 1.6) and 240 <= n <= 320 and b["shape"][2] == n
        assert b["spacing_mm"][1] == pytest.approx(b["fov_mm"] / n) and b["spacing_mm"][1] < a["spacing_mm"][1]
        for key in ("positions_mm", "thickness_mm"):
            assert np.array_equal(a.pop(key), b.pop(key))
        assert (a["tilt_deg"], a["pose_deg"], a["fov_mm"], a["shape"][0]) == (b["tilt_deg"], b["pose_deg"], b["fov_mm"], b["shape"][0])
    for bad in (0.0, -1.0, 100.0):
        with pytest.raises(dd.DatasetError, match="px_scale"):
            domain_acquisition(3, px_scale=bad)
    seed = 7003
    coarse, fine = dd.domain_head(seed), dd.domain_head(seed, px_scale=1.6)
    vox = [np.prod(h.volume.spacing_mm) for h in (coarse, fine)]
    for code in (1, 3, 7):  # an eye, the nose, an ear: the same in mL, within partial-volume differences
        ml = [(h.feature_ids == code).sum() * v for h, v in zip((coarse, fine), vox)]
        assert ml[0] > 0 and ml[1] == pytest.approx(ml[0], rel=0.05), (code, ml)
    spec = dd.DatasetSpec(domain=True, n_train=1, n_val=0, n_test=0, max_slices=2, seed_base=seed,
                          domain_px_scale=1.6)
    dd.build_dataset(tmp_path / "ds", spec, splits=("train",), workers=1)
    imgs = sorted((tmp_path / "ds" / "images" / "train").glob("*.png"))
    assert len(imgs) >= 2 and all(Image.open(p).size == fine.volume.hu.shape[1:][::-1] for p in imgs)
    meta = json.loads((tmp_path / "ds" / "spec.json").read_text())
    assert dd.spec_from_metadata({"data": meta}).domain_px_scale == 1.6


# Plain heads (domain=None). "tissue": sha1 of (labels, face/ear removal masks, structures) and
# "hu": sha1 of the int16 HU, recorded with the generator before pipeline.synth_domain existed
# (main, 7c2e8e9^): unchanged. "det": sha1 of the detection labels (feature_ids, face_label_mask,
# feature_boxes), recorded when the ear label came to begin at the skin of the head without ears
# (synth.EAR_LABEL_MIN_MM = 0; "tissue" and "hu" unchanged by it). Before that, with the whole ear
# as its label, it was 70b3b271… (seed 4) and 7e7b1faf… (27001); with the nose label's first
# version (the nose standing out of the face by any amount) c6c9d6ef… and 20278c70…, and before
# plain heads took that label the whole set hashed to 08e74f2b… and 5a8712fc….
_BASELINE = {
    4: {"tissue": "361f0278662231e72396b2995f26b9c28dcdd0b6", "hu": "677a4b20aa70c4473e99352e4e9769de771ceb43",
        "det": "df7ea969b5af2b955f43fa186a96bce8be1f43e9"},
    27001: {"tissue": "e4c6f6e606e4e4cbdef0cd92cb7dc69d2e246d9d", "hu": "91eece46fd309b88997e9c9a5ea110f2a9e49c79",
            "det": "0a2ae0115edac7f12de5b5f3d3cefe6b1cd5446b"},
}


@pytest.mark.parametrize("seed", sorted(_BASELINE))
def test_plain_heads_bit_identical_to_the_baseline(seed):
    """domain=None: the generator's old heads, voxel for voxel (other tests' ground truth); only
    the derived detection labels (the nose, the ears) follow the domain heads' definition."""
    import hashlib

    kw = {4: dict(shape=(40, 72, 72), spacing_mm=(4.0, 3.2, 3.2)),
          27001: dict(shape=(24, 80, 80), spacing_mm=(6.0, 2.8, 2.8), tilt_deg=15, thickness_mm=6.0, metal=True)}
    h = generate_head(SubjectParams.random(seed), noise_seed=seed, **kw[seed])
    assert h.domain is None
    assert not np.isin(h.labels, (LABELS["holder"], LABELS["foam"])).any()

    def sha1(arrays, extra=b""):
        m = hashlib.sha1()
        for a in arrays:
            m.update(np.ascontiguousarray(a).tobytes())
        m.update(extra)
        return m.hexdigest()

    assert h.volume.hu.dtype == np.int16
    got = {"tissue": sha1([h.labels, h.face_soft_tissue_mask, h.structures, h.ear_soft_tissue_mask]),
           "hu": sha1([h.volume.hu]),
           "det": sha1([h.feature_ids, h.face_label_mask], repr(h.feature_boxes).encode())}
    assert got == _BASELINE[seed]


@pytest.mark.parametrize("plain", [False, True], ids=["domain", "plain"])
@pytest.mark.parametrize("seed", [3, 8, 14])
def test_nose_label_is_the_pyramid_standing_out_of_the_face(seed, plain):
    """What a labeller draws: on the nose's main slices the tip (the most anterior point of the
    head) is nose, and the label reaches back over the nasal pyramid, not only the tip's cap;
    plain heads (domain=None) share the definition."""
    if plain:
        h = generate_head(SubjectParams.random(seed), noise_seed=seed, **KW)
    else:
        h, _ = _head(seed, nose_hollow=True, holder="none", foam=False, pathology=[])
    nose, lab = h.feature_masks["nose"], h.labels
    body = lab != 0
    area = nose.reshape(nose.shape[0], -1).sum(1)
    main = np.flatnonzero(area >= 0.5 * area.max())
    assert main.size >= 2
    depth_px = []
    for k in main:
        j0 = np.flatnonzero(body[k].any(1)).min()  # row = posterior: the most anterior row
        assert nose[k, j0].any() and not (body[k, j0] & ~nose[k, j0]).all()
        jj, _ = np.nonzero(nose[k])
        depth_px.append(jj.max() - jj.min() + 1)
        # only soft tissue is nose; the hollow's air and the nasal bones are not
        assert np.isin(lab[k][nose[k]], SOFT_TISSUE_LABELS).all()
    # the pyramid: at least 60 % of the nose's projection (the tip's cap alone is ~ 1/3)
    projection_px = h.params.nose_projection_mm / KW["spacing_mm"][1]
    assert max(depth_px) >= 0.6 * projection_px, (max(depth_px), projection_px)


@pytest.mark.parametrize("seed", [3, 14, 33])
def test_nose_label_ends_at_the_nasofacial_junction(seed, monkeypatch):
    """The nose label leaves out the smooth blend's skirt (tissue standing out of the face by
    less than synth.NOSE_LABEL_MIN_MM): a subset of the label without the rule, never wider on
    any slice, narrower overall, and the HU are the same either way."""
    from pipeline import synth

    assert synth.NOSE_LABEL_MIN_MM == 2.0
    kw = dict(nose_hollow=True, holder="none", foam=False, pathology=[])
    h2, _ = _head(seed, **kw)
    monkeypatch.setattr(synth, "NOSE_LABEL_MIN_MM", 0.0)
    h0, _ = _head(seed, **kw)
    assert np.array_equal(h0.volume.hu, h2.volume.hu)
    n0, n2 = h0.feature_masks["nose"], h2.feature_masks["nose"]
    assert n2.any() and not (n2 & ~n0).any()

    def widths(m):
        return np.array([np.ptp(np.flatnonzero(m[k].any(0))) + 1 if m[k].any() else 0 for k in range(m.shape[0])])

    w0, w2 = widths(n0), widths(n2)
    assert (w2 <= w0).all() and w2.sum() < w0.sum()
    assert n2.sum() < 0.95 * n0.sum()


def _valid_boxes(head):
    """Every detector box is the exact bounding box of its class's pixels on that slice, inside
    the image, and on the body (not on the holder or foam)."""
    from pipeline.detector_data import CLASSES, slice_labels
    from pipeline.synth import _FEATURE_CODES

    n_k, n_j, n_i = head.labels.shape
    body = ~np.isin(head.labels, (0, LABELS["holder"], LABELS["foam"]))
    found = set()
    for k in range(n_k):
        for c, i0, j0, i1, j1 in slice_labels(head.feature_ids[k], head.face_label_mask[k], _FEATURE_CODES):
            name = CLASSES[c]
            found.add(name)
            assert 0 <= i0 < i1 <= n_i and 0 <= j0 < j1 <= n_j
            if name == "face":
                mask = head.face_label_mask[k]
            else:
                mask = np.isin(head.feature_ids[k], [v for v, n in _FEATURE_CODES.items() if n == name])
            sub = mask[j0:j1, i0:i1]
            # tight: the box's border rows/columns hold the class's pixels
            assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any(), (k, name)
            assert body[k][j0:j1, i0:i1][sub].all(), (k, name)
    return found


def test_tilt_fov_and_holder_variants_give_valid_boxes():
    """Routine acquisitions (gantry tilt, a field of view cutting the face, a head holder):
    exact, valid boxes for the classes that are in the image."""
    from pipeline.detector_data import domain_acquisition, domain_head

    def pick(cond):
        return next(s for s in range(7000, 7400) if cond(a := domain_acquisition(s), DomainParams.random(s, fov_mm=a["fov_mm"])))

    tilted = pick(lambda a, d: a["tilt_deg"] > 15 and d.holder == "cradle")
    cut = pick(lambda a, d: abs(d.fov_shift_mm[1]) > 20 or abs(d.fov_shift_mm[0]) > 20)
    for seed in (tilted, cut):
        head = domain_head(seed)
        assert np.isin(head.labels, (LABELS["holder"], LABELS["foam"])).any() or head.domain.holder != "cradle"
        found = _valid_boxes(head)
        assert {"face", "nose"} <= found, (seed, found)


def test_the_lower_pinna_can_stand_further_out():
    """The lower part of the auricle (concha floor, antitragus, lobule) stands out further than the
    upper part in most people, as on ge-head-ct's lower ear slices, where the flap runs straight
    out from the head: ``ear_low_deg`` turns it out, the upper part stays as it was."""
    over = {"holder": "none", "pathology": [], "ear_protrusion_deg": 15.0, "ear_concha_mm": 8.0, "ear_low_frac": 0.6}
    one, _ = _head(3, ear_low_deg=0.0, **over)
    out, _ = _head(3, ear_low_deg=60.0, **over)
    a, b = one.feature_masks["ears"], out.feature_masks["ears"]
    ks = np.flatnonzero(a.any((1, 2)) | b.any((1, 2)))
    assert ks.size >= 6
    mid = a.shape[2] // 2

    def reach(m, k):  # columns from the midline to the right ear's most lateral voxel (patient right: low columns)
        cols = np.flatnonzero(m[k, :, :mid].any(0))
        return mid - cols.min() if cols.size else 0

    low, high = ks[: ks.size // 3], ks[-(ks.size // 3):]
    assert sum(reach(b, k) for k in low) > sum(reach(a, k) for k in low) + 2 * low.size
    assert all(np.array_equal(a[k], b[k]) for k in high)
    draws = [DomainParams.random(s) for s in range(200)]
    assert 80 < sum(d.ear_low_deg > 0 for d in draws) < 160
    assert all(d.ear_low_deg == 0 for d in draws if d.ear_protrusion_deg < 10.0 and d.ear_concha_mm < 6.0)


def test_the_helix_is_a_thicker_rolled_rim():
    """The free edge of the auricle, the helix, is a rolled rim thicker than the flap: more ear
    tissue with a thicker rim (``ear_helix_mm``), the same ear where the rim is not."""
    over = {"holder": "none", "pathology": [], "ear_low_deg": 0.0}
    thin, _ = _head(3, ear_helix_mm=0.9, **over)
    thick, _ = _head(3, ear_helix_mm=3.0, **over)
    a, b = thin.feature_masks["ears"], thick.feature_masks["ears"]
    assert b.sum() > 1.15 * a.sum(), (a.sum(), b.sum())
    assert not (a & ~b).any()  # the thicker rim only adds to the ear


@pytest.mark.slow
def test_ground_truth_holds_only_what_the_image_holds():
    """Outside the reconstruction circle the image is −1024 HU: the face there is not in the
    removal ground truth (domain head 27015's nose tip stands beyond its circle; counted, it
    read as 43 % of its nose left in place by `auto`)."""
    from pipeline.detector_data import domain_head

    h = domain_head(27015)
    _, nj, ni = h.volume.hu.shape
    out = h.domain.outside_reconstruction(nj, ni)
    assert out is not None and (h.volume.hu[:, out] == -1024).all()
    assert (h.feature_masks["nose"] & out).any()  # the labels still draw the whole nose
    assert not (h.face_soft_tissue_mask & out).any() and not (h.ear_soft_tissue_mask & out).any()
    assert h.face_soft_tissue_mask[h.feature_masks["nose"]].any()
    d = DomainParams.random(3)
    d.recon_circle = False
    assert d.outside_reconstruction(nj, ni) is None
