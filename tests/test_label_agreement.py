"""Label agreement of two labellers (pipeline.real_labels.label_agreement, scripts/label_agreement.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.real_labels import RealLabels, label_agreement, load_labels, match_pairs

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "tests" / "data" / "realct_labels"
_spec = importlib.util.spec_from_file_location("label_agreement", ROOT / "scripts" / "label_agreement.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def _labels(slices: dict[int, list], series: str = "s") -> RealLabels:
    return RealLabels(series, {k: [tuple(b) for b in v] for k, v in slices.items()})


def test_match_pairs_is_one_to_one_and_keeps_the_best_pairing():
    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    pred = [(21, 0, 31, 10), (0, 0, 10, 10), (0, 0, 10, 20)]
    pairs = sorted(match_pairs(truth, pred, 0.0))
    assert [(a, b) for a, b, _ in pairs] == [(0, 1), (1, 0)]
    assert pairs[0][2] == 1.0 and pairs[1][2] == pytest.approx(9 / 11)
    assert match_pairs(truth, [(50, 50, 60, 60)], 0.0) == []  # no overlap, no pair


def test_agreement_counts_pairs_thresholds_and_lone_boxes():
    first = _labels({0: [("ears", 0, 0, 10, 10), ("ears", 100, 0, 110, 10)],
                     1: [("ears", 0, 0, 10, 10)],
                     2: [("nose", 0, 0, 10, 10)]})
    second = _labels({0: [("ears", 100, 0, 110, 10), ("ears", 0, 0, 10, 10)],  # same boxes, other order
                      1: [("ears", 0, 0, 10, 10), ("ears", 100, 0, 110, 10)],  # one more ear
                      3: [("ears", 0, 0, 10, 19)]})  # 100/190: IoU 0.53; first has none here
    r = label_agreement(first, second, "ears")
    assert (r["first"], r["second"], r["pairs"], r["agree"]) == (3, 5, 3, 3)
    assert (r["slices"], r["slices_agree"]) == (3, 1)  # slice 1: a lone box; slice 3: only in second
    assert r["per_slice"][1] == {"iou": [1.0], "only_first": 0, "only_second": 1}
    assert r["per_slice"][3]["only_second"] == 1 and 2 not in r["per_slice"]
    shifted = _labels({0: [("ears", 0, 0, 10, 10), ("ears", 104, 0, 114, 10)], 1: [("ears", 0, 0, 10, 10)]})
    r = label_agreement(first, shifted, "ears")
    assert r["per_slice"][0]["iou"] == [1.0, 0.429] and r["agree"] == 2 and r["min_iou"] == 0.429
    assert label_agreement(first, shifted, "ears", iou=0.4)["agree"] == 3
    assert label_agreement(first, second, "lips")["pairs"] == 0


def test_the_two_labellers_of_the_real_ears_agree():
    """The second, independent pass over ge-head-ct's ears (README, "Do the ear labels hold?")
    pairs with the first on every auricle the first labels; all but one pair at IoU >= 0.5."""
    first = load_labels(LABELS / "ge-head-ct.json")
    second = load_labels(LABELS / "ge-head-ct.ears-second.json")
    assert second.series == first.series and set(second.visible["ears"]) == set(first.visible["ears"])
    r = label_agreement(first, second, "ears")
    assert r["pairs"] == r["first"] == 32 and r["second"] == 33
    assert r["agree"] >= 31 and r["median_iou"] >= 0.8, r


def test_cli_prints_the_summary_and_refuses_bad_input(tmp_path, capsys):
    assert cli.main([str(LABELS / "ge-head-ct.json"), str(LABELS / "ge-head-ct.ears-second.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ears on ge-head-ct: first 32 boxes, second 33; 31 of 32 pairs at IoU >= 0.5")
    assert "slice  15: IoU 0.84, 1 only in second" in out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"series": "another", "slices": {}}))
    assert cli.main([str(LABELS / "ge-head-ct.json"), str(other)]) == 1
    assert "different series" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"series": "ge-head-ct", "slices": {"0": [["ears", 5, 0, 1, 1]]}}))
    assert cli.main([str(LABELS / "ge-head-ct.json"), str(bad)]) == 1
    assert "cannot read" in capsys.readouterr().err
