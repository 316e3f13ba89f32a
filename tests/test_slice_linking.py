"""Linking detector boxes across neighbouring slices (pipeline.slice_linking)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detector import Detection
from pipeline.slice_linking import LINK_FLOOR, detect_linked, link_slices

NOSE, EYES = 2, 1


def _det(*rows: tuple[int, float, tuple[float, float, float, float]]) -> Detection:
    """A slice's detections from ``(class_id, score, box)`` rows."""
    if not rows:
        return Detection(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    return Detection(np.array([r[2] for r in rows], np.float32), np.array([r[1] for r in rows], np.float32),
                     np.array([r[0] for r in rows], np.int64))


def _scores(dets: list[Detection]) -> list[list[float]]:
    return [[round(float(s), 4) for s in d.scores] for d in dets]


BOX = (10.0, 10.0, 40.0, 30.0)


def _shifted(box, dx):
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def test_a_chain_lifts_its_weak_slices_to_its_mean_and_never_lowers_a_score():
    own = [0.8, 0.5, 0.2, 0.12, 0.11]
    dets = [_det((NOSE, s, _shifted(BOX, k))) for k, s in enumerate(own)]  # IoU between neighbours > 0.9
    out = link_slices(dets)
    mean = float(np.mean(np.float32(own)))
    assert _scores(out) == [[0.8], [0.5], [round(mean, 4)], [round(mean, 4)], [round(mean, 4)]]
    # the input is left as it was; boxes and classes are the input's
    assert _scores(dets) == [[s] for s in own]
    for a, b in zip(dets, out):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.class_ids, b.class_ids)


def test_linking_never_creates_an_object_no_slice_found():
    """A chain's mean is at most its best box: below the threshold everywhere, it stays below."""
    dets = [_det((NOSE, s, BOX)) for s in (0.2, 0.29, 0.1, 0.25)]
    out = detect_linked(_Fixed(dets), np.zeros((4, 16, 16)), conf=0.3)
    assert all(len(d) == 0 for d in out)
    assert max(max(d.scores) for d in link_slices(dets)) == pytest.approx(0.29)


def test_boxes_that_do_not_overlap_enough_are_not_linked():
    # a box 25 px to the side has IoU 0.09 with the strong one: a different object
    dets = [_det((NOSE, 0.9, BOX)), _det((NOSE, 0.12, _shifted(BOX, 25)))]
    assert _scores(link_slices(dets)) == [[0.9], [0.12]]
    # with a looser link rule it joins (IoU 0.0909 ≥ 0.05)
    assert _scores(link_slices(dets, link_iou=0.05))[1] == [0.51]


def test_classes_gaps_and_the_floor_break_chains():
    # another class at the same place
    assert _scores(link_slices([_det((NOSE, 0.9, BOX)), _det((EYES, 0.1, BOX))])) == [[0.9], [0.1]]
    # a slice without a box between them: only neighbouring slices link
    assert _scores(link_slices([_det((NOSE, 0.9, BOX)), _det(), _det((NOSE, 0.1, BOX))])) == [[0.9], [], [0.1]]
    # a box below the floor is background noise: never lifted
    below = LINK_FLOOR / 2
    assert _scores(link_slices([_det((NOSE, 0.9, BOX)), _det((NOSE, below, BOX))])) == [[0.9], [round(below, 4)]]


def test_two_objects_form_two_chains():
    """Two eyes side by side: each chain keeps its own mean; a weak box does not borrow
    the other eye's score."""
    right, left = BOX, _shifted(BOX, 60)
    dets = [_det((EYES, 0.9, right), (EYES, 0.4, left)),
            _det((EYES, 0.7, right), (EYES, 0.2, left)),
            _det((EYES, 0.2, right), (EYES, 0.12, left))]
    out = _scores(link_slices(dets))
    m_right, m_left = np.mean([0.9, 0.7, 0.2]), np.mean([0.4, 0.2, 0.12])
    assert out == [[0.9, 0.4], [0.7, round(m_left, 4)], [round(m_right, 4), round(m_left, 4)]]


def test_a_duplicate_box_on_a_chain_slice_is_not_linked_again():
    """A second, overlapping box of the class on a chain's slice (IoU > 0.3 with the
    chain's box) cannot start a chain of its own through the same object."""
    dup = _shifted(BOX, 10)  # IoU 0.5 with BOX: kept by the detector's NMS (0.7)
    dets = [_det((NOSE, 0.9, BOX), (NOSE, 0.2, dup)), _det((NOSE, 0.5, BOX), (NOSE, 0.12, dup))]
    out = _scores(link_slices(dets))
    assert out == [[0.9, 0.2], [0.7, 0.12]]  # not 0.16, the duplicates' own chain


class _Fixed:
    """A detector double returning the given detections above ``conf``; records the calls."""

    def __init__(self, dets: list[Detection]) -> None:
        self.dets, self.calls = dets, []

    def detect(self, hu_slices, *, conf):
        self.calls.append(conf)
        return [Detection(d.boxes[d.scores > conf], d.scores[d.scores > conf], d.class_ids[d.scores > conf])
                for d in self.dets]


def test_detect_linked_runs_the_detector_low_enough_to_see_the_weak_slices():
    own = [0.8, 0.5, 0.12, 0.11, 0.03]
    fixed = _Fixed([_det((NOSE, s, BOX)) for s in own])
    out = detect_linked(fixed, np.zeros((5, 16, 16)), conf=0.3)
    assert fixed.calls == [LINK_FLOOR]
    # chain 0.8, 0.5, 0.12, 0.11 (0.03 is below the floor): mean 0.38 lifts slices 2 and 3
    assert [len(d) for d in out] == [1, 1, 1, 1, 0]
    assert float(out[3].scores[0]) == pytest.approx(np.mean([0.8, 0.5, 0.12, 0.11]), abs=1e-6)
    # each slice alone: the detector at the threshold itself
    alone = detect_linked(fixed, np.zeros((5, 16, 16)), conf=0.3, link=False)
    assert fixed.calls[-1] == 0.3 and [len(d) for d in alone] == [1, 1, 0, 0, 0]


def test_a_bad_link_rule_is_refused():
    with pytest.raises(ValueError, match="link_iou"):
        link_slices([_det((NOSE, 0.9, BOX))], link_iou=0.0)
