"""The labelled real test series (tests/data/realct_labels) and the shipped model on it.

``ge-head-ct`` (../shared/realct, a real head CT: 4 mm then 7 mm slices, gantry tilt
+18.5°) was labelled by hand: eyes, nose, ears, and the ``face`` class by the rule of
scripts/realct_face_boxes.py. The targets of the shipped model at the model method's
threshold: the nose found on ≥ 6 of its 7 slices, eyes and ears on ≥ 80 % of the slices
where they are visible; ``auto`` uses the model there (no fallback).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.detector import DEFAULT_WEIGHTS, Detection, ModelMeta
from pipeline.detector_data import CLASSES
from pipeline.real_labels import (
    RealLabels,
    detection_report,
    explain_misses,
    load_labels,
    match_boxes,
    yolo_dataset,
)

LABELS = Path(__file__).resolve().parent / "data" / "realct_labels"
REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"
needs_real = pytest.mark.skipif(not (REALCT / "ge-head-ct").is_dir(), reason="../shared/realct not beside the checkout")
needs_model = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped model missing")


def test_label_file_is_complete_and_consistent():
    lab = load_labels(LABELS / "ge-head-ct.json")
    assert lab.series == "ge-head-ct"
    assert set(lab.slices) == set(range(28))
    assert lab.visible["nose"] == list(range(7))
    for cls, ks in lab.visible.items():
        assert sorted(k for k in lab.slices if lab.boxes(k, cls)) == ks, cls
    for k, boxes in lab.slices.items():
        for c, i0, j0, i1, j1 in boxes:
            assert c in CLASSES and 0 <= i0 < i1 <= 512 and 0 <= j0 < j1 <= 512
    # at most two eyes and two ears a slice, one nose, one face box
    for k in lab.slices:
        assert len(lab.boxes(k, "eyes")) <= 2 and len(lab.boxes(k, "ears")) <= 2
        assert len(lab.boxes(k, "nose")) <= 1 and len(lab.boxes(k, "face")) <= 1
    text = (LABELS / "ge-head-ct.json").read_text()
    assert "how" in json.loads(text)


def test_match_boxes_is_one_to_one():
    t = [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert match_boxes(t, [(0, 0, 10, 10)]) == 1
    assert match_boxes(t, [(0, 0, 10, 10), (1, 1, 10, 10)]) == 1  # a duplicate is not a second match
    assert match_boxes(t, [(0, 0, 10, 10), (20, 20, 30, 31)]) == 2
    assert match_boxes(t, [(5, 5, 15, 15)]) == 0  # IoU 0.14


class _Oracle:
    """Returns the labelled boxes (in the strided image) for every slice."""

    def __init__(self, lab, f):
        self.meta = ModelMeta(list(CLASSES), imgsz=160)
        self.lab, self.f = lab, f

    def detect(self, slices, *, conf=0.25, **_):
        out = []
        for k in range(slices.shape[0]):
            rows = self.lab.slices.get(k, [])
            b = np.array([[v / self.f for v in r[1:]] for r in rows], np.float32).reshape(-1, 4)
            out.append(Detection(b, np.full(len(rows), 0.9, np.float32),
                                 np.array([CLASSES.index(r[0]) for r in rows], np.int64)))
        return out


def test_detection_report_and_dataset_with_an_oracle(tmp_path):
    lab = load_labels(LABELS / "ge-head-ct.json")
    hu = np.full((28, 512, 512), -1000, np.int16)
    rep = detection_report(_Oracle(lab, 3), hu, lab, conf=0.3)
    for c in ("face", "eyes", "nose", "ears"):
        v = rep["per_class"][c]
        assert v["recall"] == 1.0 and v["slices_found"] == v["slices_visible"] > 0
    assert rep["per_class"]["nose"]["instances"] == 7
    y = yolo_dataset(hu[:3], lab, tmp_path / "ds", imgsz=160)
    assert "names" in y.read_text()
    line = (tmp_path / "ds" / "labels" / "test" / "slice-000.txt").read_text().split("\n")[0].split()
    c, x, yc, w, h = int(line[0]), *map(float, line[1:])
    i0, j0, i1, j1 = lab.slices[0][0][1:]
    assert CLASSES[c] == lab.slices[0][0][0]
    assert x == pytest.approx((i0 + i1) / 2 / 3 / 171, abs=1e-4) and w == pytest.approx((i1 - i0) / 3 / 171, abs=1e-4)
    assert yc == pytest.approx((j0 + j1) / 2 / 3 / 171, abs=1e-4) and h == pytest.approx((j1 - j0) / 3 / 171, abs=1e-4)


class _Partial(_Oracle):
    """The oracle with misses: no nose on slices 0-2, one eye on slice ``eye_k`` moved off its
    globe (IoU < 0.5), and a false ear box on slice 27 (no ear labelled there)."""

    def __init__(self, lab, f, eye_k):
        super().__init__(lab, f)
        self.eye_k = eye_k

    def detect(self, slices, *, conf=0.25, **_):
        out = super().detect(slices, conf=conf)
        for k, d in enumerate(out):
            keep = [i for i, c in enumerate(d.class_ids) if not (CLASSES[c] == "nose" and k < 3)]
            b, c = d.boxes[keep].copy(), d.class_ids[keep]
            if k == self.eye_k:
                i = int(np.flatnonzero(c == CLASSES.index("eyes"))[0])
                b[i] += np.array([1, 0, 1, 0], np.float32) * (b[i, 2] - b[i, 0])  # shifted by its width
            if k == 27:
                b = np.vstack([b, [[10, 10, 20, 20]]]).astype(np.float32)
                c = np.append(c, CLASSES.index("ears"))
            out[k] = Detection(b, np.full(len(c), 0.9, np.float32), c)
        return out


def test_detection_report_counts_misses_and_false_boxes():
    lab = load_labels(LABELS / "ge-head-ct.json")
    assert not lab.boxes(27, "ears")
    eye_k = lab.visible["eyes"][0]
    n_eyes = sum(len(lab.boxes(k, "eyes")) for k in lab.slices)
    hu = np.full((28, 512, 512), -1000, np.int16)
    rep = detection_report(_Partial(lab, 3, eye_k), hu, lab, conf=0.3)["per_class"]
    assert rep["nose"] == {"instances": 7, "found": 4, "recall": round(4 / 7, 3), "slices_visible": 7,
                           "slices_found": 4, "slices_with_false_boxes": 0}
    assert rep["eyes"]["found"] == n_eyes - 1 and rep["eyes"]["recall"] == round((n_eyes - 1) / n_eyes, 3)
    assert rep["eyes"]["slices_found"] == len(lab.visible["eyes"]) - 1
    assert rep["ears"]["slices_with_false_boxes"] == 1 and rep["ears"]["recall"] == 1.0


def test_explain_misses_names_why_each_labelled_box_was_not_found():
    lab = RealLabels("s", {0: [("ears", 0, 0, 10, 10), ("ears", 100, 0, 110, 10), ("nose", 50, 50, 60, 60)],
                           1: [("ears", 0, 0, 10, 10)], 2: [("eyes", 0, 0, 10, 10)]})
    found = {0: [["ears", 0, 0, 10, 10, 0.9],  # found
                 ["ears", 104, 0, 114, 10, 0.8],  # IoU 0.43: misplaced
                 ["eyes", 50, 50, 60, 60, 0.9]],  # another class on the nose: not the nose
             1: [["ears", 0, 0, 10, 10, 0.9], ["ears", 1, 0, 11, 10, 0.9]]}  # found once
    weak = {0: found[0] + [["nose", 50, 50, 60, 61, 0.12], ["nose", 50, 50, 60, 62, 0.2]],
            2: [["eyes", 3, 0, 13, 10, 0.25], ["eyes", 0, 0, 10, 10, 0.1]]}
    m = explain_misses(lab, found, weak, conf=0.3)
    assert m == [
        {"slice": 0, "class": "nose", "box": [50, 50, 60, 60], "why": "weak", "iou": round(100 / 120, 3), "score": 0.2},
        {"slice": 0, "class": "ears", "box": [100, 0, 110, 10], "why": "misplaced", "iou": 0.429, "score": 0.8},
        {"slice": 2, "class": "eyes", "box": [0, 0, 10, 10], "why": "weak", "iou": 0.538, "score": 0.25},
    ]
    # without the low-threshold boxes, the weak ones have no box at all
    assert [x["why"] for x in explain_misses(lab, found, {}, conf=0.3)] == ["none", "misplaced", "none"]
    # a box matched to one label does not also count for the second label it overlaps
    two = RealLabels("s", {0: [("ears", 0, 0, 10, 10), ("ears", 2, 0, 12, 10)]})
    assert [x["why"] for x in explain_misses(two, {0: [["ears", 0, 0, 10, 10, 0.9]]}, {}, conf=0.3)] == ["misplaced"]


def test_detection_report_diagnoses_the_oracle_misses():
    lab = load_labels(LABELS / "ge-head-ct.json")
    eye_k = lab.visible["eyes"][0]
    hu = np.full((28, 512, 512), -1000, np.int16)
    rep = detection_report(_Partial(lab, 3, eye_k), hu, lab, conf=0.3, diagnose=0.05)
    why = {(x["slice"], x["class"]): x["why"] for x in rep["misses"]}
    assert why == {(0, "nose"): "none", (1, "nose"): "none", (2, "nose"): "none", (eye_k, "eyes"): "none"}
    assert "misses" not in detection_report(_Partial(lab, 3, eye_k), hu, lab, conf=0.3)
    with pytest.raises(ValueError, match="diagnose"):
        detection_report(_Partial(lab, 3, eye_k), hu, lab, conf=0.3, diagnose=0.5)


@pytest.fixture(scope="module")
def ge_volume():
    """The real series ge-head-ct, read once for the tests of the shipped model."""
    from pipeline import dicom_io

    return dicom_io.load_series(dicom_io.scan_folder(REALCT / "ge-head-ct").series[0]).volume


def _shipped_report(vol, link: bool = True) -> dict:
    from pipeline.detector import load_detector
    from pipeline.face_model import ModelFaceRegion

    lab = load_labels(LABELS / "ge-head-ct.json")
    return detection_report(load_detector(), vol.hu, lab, conf=ModelFaceRegion.conf, link=link)["per_class"]


@needs_real
@needs_model
def test_shipped_model_finds_the_real_nose_and_eyes(ge_volume):
    """Issue 16's nose and eye targets at the model method's threshold, its boxes linked
    across slices as the model method uses them (pipeline.slice_linking)."""
    rep = _shipped_report(ge_volume)
    assert rep["nose"]["slices_found"] >= 6, rep["nose"]
    assert rep["eyes"]["found"] >= 0.8 * rep["eyes"]["instances"], rep["eyes"]
    assert rep["eyes"]["slices_found"] >= 0.8 * rep["eyes"]["slices_visible"], rep["eyes"]
    # linking only adds boxes on the objects' neighbouring slices: no nose box where there is none
    assert rep["nose"]["slices_with_false_boxes"] == 0, rep["nose"]
    # scored slice by slice, the same model misses the upper nose (3/7): what linking adds
    alone = _shipped_report(ge_volume, link=False)
    assert alone["nose"]["slices_found"] < rep["nose"]["slices_found"], alone["nose"]


@needs_real
@needs_model
@pytest.mark.xfail(strict=True, reason="issue 16 target not reached: the shipped model (K6, boxes linked "
                   "across slices) finds the ears on 8/17 slices (20/32 auricles) at conf 0.3 and IoU 0.5 (see README)")
def test_shipped_model_finds_the_real_ears(ge_volume):
    """Issue 16's ear target at the model method's threshold. (The ``face`` box is not a target:
    its IoU with the rule-drawn real face box sits around the 0.5 cut, see README.)"""
    rep = _shipped_report(ge_volume)
    assert rep["ears"]["found"] >= 0.8 * rep["ears"]["instances"], rep["ears"]
    assert rep["ears"]["slices_found"] >= 0.8 * rep["ears"]["slices_visible"], rep["ears"]


@needs_real
@needs_model
def test_auto_uses_the_shipped_model_on_the_real_head(ge_volume):
    """``auto`` takes the model's boxes on ge-head-ct (no fallback to the anatomical zone alone),
    and its warnings do not say "no nose" where the detector's nose is removed."""
    from pipeline.deface import deface
    from pipeline.envelope import NO_NOSE_NOTE
    from pipeline.face_model import AutoFaceRegion

    res = deface(ge_volume, AutoFaceRegion())
    details = res.region.details
    assert details["source"] == "anatomical+model", res.qa.warnings
    assert details["model"]["found"]["nose"] > 0 and details["model"]["found"]["eyes"] > 0
    assert not any("no plausible face" in w for w in res.qa.warnings), res.qa.warnings
    assert NO_NOSE_NOTE not in res.qa.warnings, res.qa.warnings
