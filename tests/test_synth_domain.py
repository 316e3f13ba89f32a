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


def test_plain_heads_unchanged_by_the_domain_code():
    """domain=None: the generator's defaults (stable ground truth other tests depend on)."""
    a = generate_head(SubjectParams.random(4), noise_seed=9, shape=(30, 64, 64), spacing_mm=(6.0, 3.6, 3.6))
    assert a.domain is None
    assert not np.isin(a.labels, (LABELS["holder"], LABELS["foam"])).any()
