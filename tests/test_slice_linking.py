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


def _reference_link(dets, link_iou=0.5, floor=LINK_FLOOR):
    """Seq-NMS as written in the module docstring, recomputing every chain sum after each
    chain (slow): the reference for link_slices' incremental update."""
    from pipeline.detector import _iou_one_to_many as iou

    scores = [d.scores.astype(np.float32).copy() for d in dets]
    for c in sorted({int(x) for d in dets for x in d.class_ids}):
        idx = [np.flatnonzero((d.class_ids == c) & (d.scores >= floor)) for d in dets]
        alive = [np.ones(len(i), bool) for i in idx]
        while True:
            best, back = [], []
            for k, d in enumerate(dets):
                total, prev = [], []
                for a, g in enumerate(idx[k]):
                    if not alive[k][a]:
                        total.append(-np.inf), prev.append(-1)
                        continue
                    links = [(best[k - 1][b], b) for b, h in enumerate(idx[k - 1])
                             if alive[k - 1][b] and iou(d.boxes[g], dets[k - 1].boxes[[h]])[0] >= link_iou] if k else []
                    v, b = max(links) if links else (0.0, -1)
                    total.append(float(d.scores[g]) + v), prev.append(b)
                best.append(np.array(total)), back.append(prev)
            ends = [(float(b.max()), k) for k, b in enumerate(best) if b.size and np.isfinite(b.max())]
            if not ends:
                break
            _, k = max(ends)
            a, chain = int(np.argmax(best[k])), []
            while a >= 0:
                chain.append((k, a))
                a, k = back[k][a], k - 1
            mean = np.mean([float(dets[kk].scores[idx[kk][aa]]) for kk, aa in chain])
            for kk, aa in chain:
                g = idx[kk][aa]
                scores[kk][g] = max(scores[kk][g], np.float32(mean))
                alive[kk] &= iou(dets[kk].boxes[g], dets[kk].boxes[idx[kk]]) <= 0.3
                alive[kk][aa] = False
    return scores


@pytest.mark.parametrize("seed", range(6))
def test_incremental_linking_equals_the_reference(seed):
    """Random boxes on 40 slices (objects that drift, appear and vanish, clutter): the
    incremental update gives the reference's scores exactly."""
    rng = np.random.default_rng(seed)
    objects = [(rng.uniform(0, 100, 2), rng.uniform(10, 40, 2), int(rng.integers(0, 3)),
                int(rng.integers(0, 30)), int(rng.integers(3, 15))) for _ in range(12)]
    dets = []
    for k in range(40):
        rows = []
        for xy, wh, c, k0, n in objects:
            if k0 <= k < k0 + n:
                p = xy + rng.normal(0, 2, 2) + 0.5 * (k - k0)
                rows.append((c, float(rng.uniform(0.05, 0.9)), (*p, *(p + wh))))
        for _ in range(int(rng.integers(0, 4))):  # clutter
            p = rng.uniform(0, 120, 2)
            rows.append((int(rng.integers(0, 3)), float(rng.uniform(0.02, 0.5)), (*p, *(p + rng.uniform(5, 30, 2)))))
        dets.append(_det(*rows))
    got = link_slices(dets)
    want = _reference_link(dets)
    assert any(not np.array_equal(g.scores, d.scores) for g, d in zip(got, dets))  # something was linked
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.scores, w)
