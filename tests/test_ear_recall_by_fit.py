"""scripts/ear_recall_by_fit.py: ear recall on domain heads split by the holder's ear fit."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline import detector_data as dd

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ear_recall_by_fit", ROOT / "scripts" / "ear_recall_by_fit.py")
erf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(erf)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One held-out domain head whose holder pressed one ear (and not the other)."""
    seed = next(s for s in range(27000, 27040) if sum(erf.pressed_ears(s)) == 1)
    out = tmp_path_factory.mktemp("ds")
    dd.build_dataset(out, dd.DatasetSpec(domain=True, n_train=0, n_val=0, n_test=1, seed_base=seed - 20000,
                                         max_slices=36, min_visible_fraction={"ears": 0.05}), splits=("test",))
    return out, erf.pressed_ears(seed)


def _ear_rows(ds: Path) -> dict[str, list[tuple[float, ...]]]:
    """Labelled ear boxes (x0, y0, x1, y1 in pixels) by image hash."""
    ears = ["face", "eyes", "nose", "lips", "ears"].index("ears")
    out = {}
    for img in sorted((ds / "images" / "test").glob("*.png")):
        rgb = np.asarray(Image.open(img).convert("RGB"))
        h, w = rgb.shape[:2]
        rows = [r.split() for r in (ds / "labels" / "test" / f"{img.stem}.txt").read_text().splitlines() if r.strip()]
        boxes = []
        for r in rows:
            if int(r[0]) == ears:
                x, y, bw, bh = (float(v) for v in r[1:5])
                boxes.append(((x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h))
        out[hashlib.sha1(rgb.tobytes()).hexdigest()] = boxes
    return out


class _Oracle:
    """Returns the labelled ear boxes that ``keep`` accepts, as a detector would."""

    def __init__(self, truth, keep=lambda box, width: True):
        self.truth, self.keep = truth, keep
        self.meta = SimpleNamespace(classes=["ear"], canonical=lambda c: "ears")

    def _detect_rgb(self, rgb, conf, iou):
        boxes = [b for b in self.truth[hashlib.sha1(rgb[0].tobytes()).hexdigest()] if self.keep(b, rgb.shape[2])]
        n = len(boxes)
        return [SimpleNamespace(boxes=np.array(boxes, float).reshape(n, 4), scores=np.ones(n), class_ids=np.zeros(n))]


def test_counts_every_ear_box_once_and_splits_by_the_fit(dataset):
    ds, pressed = dataset
    truth = _ear_rows(ds)
    n_boxes = sum(len(v) for v in truth.values())
    res = erf.ear_recall_by_fit(ds, _Oracle(truth))
    assert res["pressed"]["boxes"] > 0 and res["free"]["boxes"] > 0
    assert res["pressed"]["boxes"] + res["free"]["boxes"] == n_boxes
    assert res["pressed"]["recall"] == res["free"]["recall"] == 1.0
    # a model that finds only the ear in the image's left half (patient right) finds exactly the
    # right ear's boxes: all pressed ones if the right ear was pressed, else none of them
    right_only = erf.ear_recall_by_fit(ds, _Oracle(truth, keep=lambda b, w: (b[0] + b[2]) / 2 < w / 2))
    if pressed[0]:
        assert right_only["pressed"]["recall"] == 1.0 and right_only["free"]["found"] == 0
    else:
        assert right_only["pressed"]["found"] == 0 and right_only["free"]["recall"] == 1.0
    nothing = erf.ear_recall_by_fit(ds, _Oracle(truth, keep=lambda b, w: False))
    assert nothing["pressed"]["found"] == nothing["free"]["found"] == 0


def test_refuses_a_dataset_of_plain_heads(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"spec": {"domain": False}}))
    with pytest.raises(ValueError, match="domain"):
        erf.ear_recall_by_fit(tmp_path, _Oracle({}))
    assert erf.main([str(tmp_path), str(ROOT / "pipeline" / "models" / "face_yolov8n.int8.onnx")]) == 1


def test_runs_the_shipped_model(dataset, capsys):
    ds, _ = dataset
    assert erf.main([str(ds), str(ROOT / "pipeline" / "models" / "face_yolov8n.int8.onnx")]) == 0
    line = capsys.readouterr().out
    assert "pressed " in line and "free " in line
