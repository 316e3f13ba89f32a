"""The nose check: was the soft tissue around the nose removed?
(pipeline.deface._nose_check, _landmark_nose, DefaceQA.nose_check)

``auto`` used to say "the detector's nose boxes are removed" whenever its anatomy found no nose
and the detector did, without looking at what was removed there. Under a cast or mask as dense
as cortical bone (1200 HU, 3.5 mm, pressed on the face of plain heads), the cast counted as
skeleton: head 112's hull spanned it (no soft tissue outside the hull in the nose boxes, nose
0 % removed) and on 101 the skin under it was kept (nose 63 %), all silently. The QA now
measures the soft tissue outside the skeleton's hull around the nose (the detector's nose
boxes, else the anatomy's nose region) and how much of it was removed, and says when the nose
may be left.

Such casts are now told from bone and removed (tests/test_dense_cast.py); the check is the net
under that rule, so the cases below switch the rule off (``cast_unseen``): a cast the envelope
does not recognise.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.deface import MODEL_NOSE_NOTE, RegionResult, deface
from pipeline.deidentify import make_face_method
from pipeline.synth import SubjectParams, face_shell, generate_head
from pipeline.volume import Volume

#: the acquisition of bench_deface_quality.py's default (where the figures above were measured)
ACQ = {"shape": (140, 150, 130), "spacing_mm": (2.0, 1.7, 1.7)}


@pytest.fixture(scope="module")
def auto():
    return make_face_method("auto")[0]


@pytest.fixture
def cast_unseen(monkeypatch):
    """The envelope without its rules for casts as dense as bone: such a cast stays skeleton
    (where it joins the skull) or a device (where it does not), as before those rules."""
    from pipeline import envelope

    monkeypatch.setattr(envelope, "_dense_casts", lambda *a, **k: {})
    monkeypatch.setattr(envelope, "_face_shells",
                        lambda _v, _g, _s, other, *a: np.zeros_like(other))


def _nose_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "the nose may be left" in w]


def test_a_plain_heads_nose_is_checked_and_removed(auto) -> None:
    """With the detector (auto) its nose boxes are checked; without (the anatomical method)
    the anatomy's nose region."""
    head = generate_head(SubjectParams.random(101), noise_seed=101, **ACQ)
    for method, source in ((auto, "detector"), (None, "anatomy")):
        qa = deface(head.volume, method).qa
        assert qa.nose_check["source"] == source
        assert qa.nose_check["outside_ml"] >= 5.0 and qa.nose_check["removed_pct"] >= 99.0
        assert not _nose_warnings(qa.warnings) and qa.nose_check["nose_may_be_left"] is False


def test_a_cast_as_dense_as_bone_that_swallows_the_nose_is_reported(auto, cast_unseen) -> None:
    """Head 112: the 1200-HU cast joins the skull; the hull spans the face and the detector's
    nose boxes hold no soft tissue outside it. auto no longer says the boxes were removed."""
    head = generate_head(SubjectParams.random(112), noise_seed=112, **ACQ)
    hu, _ = face_shell(head, 1200.0)
    res = deface(head.volume.with_hu(hu), auto)
    qa = res.qa
    assert (res.hu != hu)[head.face_soft_tissue_mask & head.feature_masks["nose"]].mean() < 0.05
    assert qa.nose_check["outside_ml"] < 0.5 and qa.nose_check["inside_ml"] >= 10.0
    assert qa.nose_check["removed_pct"] is None and qa.nose_check["nose_may_be_left"] is True
    assert qa.nose_check["dense_at_air_ml"] >= 3.0  # the cast over the nose
    (warning,) = _nose_warnings(qa.warnings)
    assert warning.startswith("the detector found a nose, but its boxes hold no soft tissue")
    assert not any(MODEL_NOSE_NOTE in w for w in qa.warnings)
    assert any("the detector's nose boxes were used" in w for w in qa.warnings)


def test_without_a_detector_the_anatomy_places_the_nose_from_the_globes(cast_unseen) -> None:
    """The anatomical method on head 112 under the cast: no nose tip stands out of the hull, so
    the nose region is placed 45 mm below the globes; the same finding, in the anatomy's
    words."""
    head = generate_head(SubjectParams.random(112), noise_seed=112, **ACQ)
    hu, _ = face_shell(head, 1200.0)
    qa = deface(head.volume.with_hu(hu)).qa
    assert qa.landmarks["nose_tip_lps_mm"] is None and qa.nose_check["source"] == "anatomy"
    assert qa.nose_check["outside_ml"] < 0.5 and qa.nose_check["nose_may_be_left"] is True
    (warning,) = _nose_warnings(qa.warnings)
    assert warning.startswith("where the anatomy places the nose there is no soft tissue")


def test_a_nose_the_field_of_view_cuts_off_is_no_alarm(auto) -> None:
    """Domain head 27019: the field of view's edge runs through the nasal root (its nose lies
    outside the image). The detector's nose boxes hold no soft tissue outside the skeleton, but
    nothing dense lies at the air there: no cast, so no warning."""
    from pipeline.detector_data import domain_head

    qa = deface(domain_head(27019).volume, auto).qa
    check = qa.nose_check
    assert check["source"] == "detector" and check["outside_ml"] < 0.5
    assert check["inside_ml"] >= 2.0 and check["dense_at_air_ml"] < 0.5
    assert check["nose_may_be_left"] is False and not _nose_warnings(qa.warnings)


def test_skin_kept_under_a_dense_cast_is_reported(auto, cast_unseen) -> None:
    """Head 101: the cast does not join the skull, but the skin under it is kept (nose ≈ 63 %
    removed): the check finds ≈ 74 % of the soft tissue outside the hull around the nose
    removed, in the detector's boxes (auto) and in the anatomy's nose region (anatomical)."""
    head = generate_head(SubjectParams.random(101), noise_seed=101, **ACQ)
    hu, _ = face_shell(head, 1200.0)
    for method, source in ((auto, "detector"), (None, "anatomy")):
        qa = deface(head.volume.with_hu(hu), method).qa
        assert qa.nose_check["source"] == source
        assert qa.nose_check["outside_ml"] >= 5.0 and qa.nose_check["removed_pct"] < 90.0
        assert qa.nose_check["nose_may_be_left"] is True
        (warning,) = _nose_warnings(qa.warnings)
        assert warning.startswith(f"only {qa.nose_check['removed_pct']:.0f} % of the soft tissue")
        assert f"in the {source}'s nose region" in warning


class _Boxes:
    """A method that removes ``mask`` (no anatomical zone) and says the nose is in ``nose``."""

    name = "boxes"

    def __init__(self, mask: np.ndarray, nose: np.ndarray) -> None:
        self.mask, self.nose = mask, nose

    def face_region(self, volume: Volume) -> RegionResult:
        return RegionResult(self.mask, [f"test; {MODEL_NOSE_NOTE}"], nose=self.nose)


def _nose_box(head) -> np.ndarray:
    nose = np.zeros(head.volume.hu.shape, bool)
    k, j, i = np.nonzero(head.feature_masks["nose"])
    nose[k.min():k.max() + 1, j.min():j.max() + 1, i.min():i.max() + 1] = True
    return nose


def test_a_nose_box_left_out_of_the_region_is_reported() -> None:
    """The region covers the lips but not the nose: 0 % of the nose box removed."""
    head = generate_head(SubjectParams.random(102), noise_seed=102, **ACQ)
    nose = _nose_box(head)
    lips = np.zeros_like(nose)
    k, j, i = np.nonzero(head.feature_masks["lips"])
    lips[k.min():k.max() + 1, j.min():j.max() + 1, i.min():i.max() + 1] = True
    qa = deface(head.volume, _Boxes(lips & ~nose, nose)).qa
    assert qa.removed_voxels > 0 and qa.nose_check["outside_ml"] >= 5.0
    assert qa.nose_check["removed_pct"] < 5.0
    assert len(_nose_warnings(qa.warnings)) == 1
    assert qa.warnings[0] == "test; the detector's nose boxes were used"
    # the same region taking the nose box too: removed, and the note stands
    qa = deface(head.volume, _Boxes(lips | nose, nose)).qa
    assert qa.nose_check["removed_pct"] >= 99.0 and not _nose_warnings(qa.warnings)
    assert qa.warnings[0] == f"test; {MODEL_NOSE_NOTE}"
