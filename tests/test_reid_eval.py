"""``manage.py reid_eval``: deidentify → reid_eval --mapping end to end, pairing, privacy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from surveys.management.commands.reid_eval import _pairs_from_mapping

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """3 synthetic subjects (identifying folder names), de-identified with --mapping."""
    base = tmp_path_factory.mktemp("reid")
    call_command("synth_cohort", str(base / "cohort"), subjects=3, seed=60, size="small",
                 verbosity=0)
    phi = json.loads((base / "cohort" / "phi.json").read_text())
    env = dict(os.environ, DEIDSTUDY_VAR_DIR=str(base / "var"),
               DJANGO_SETTINGS_MODULE="deidstudy.settings")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "deidentify", str(base / "cohort" / "dicom"),
         str(base / "deid"), "--mapping", str(base / "mapping.json")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return base, phi


@pytest.mark.slow
def test_deidentify_then_reid_eval_with_the_mapping_just_works(chain, capsys):
    base, phi = chain
    out = base / "out"
    call_command("reid_eval", str(base / "cohort" / "dicom"), str(base / "deid"), str(out),
                 "--mapping", str(base / "mapping.json"), "--bootstrap", "100")
    metrics = json.loads((out / "metrics.json").read_text())
    study = metrics["study"]
    assert metrics["n_subjects"] == 3 and metrics["failures"] == []
    assert study["small_cohort"] is True and study["chance"]["rank1"] == pytest.approx(1 / 3)
    assert list(study["matchers"]) == ["appearance", "surface", "fused"]
    assert metrics["primary_matcher"] == "fused"
    for name, entry in study["matchers"].items():
        for cond in ("control", "deidentified"):
            for key in ("rank1", "rank5", "auc"):
                lo, hi = entry[cond][f"{key}_ci95"]
                assert 0.0 <= lo <= entry[cond][key] <= hi <= 1.0
    assert metrics["rank1_control"] == study["matchers"]["fused"]["control"]["rank1"]
    assert metrics["protocol"]["probe_yaw_deg"] == 30.0 and metrics["protocol"]["rescan"] is True
    assert set(metrics["face_detected_fraction"]) == {"gallery", "control", "deidentified"}
    # independent recomputation of the appearance matcher from the saved descriptors
    feats = np.load(out / "features.npz")
    conds = list(feats["conditions"])
    emb = feats["embeddings"]  # (subject, condition, view, 128)
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    fused = unit.mean(axis=2)
    g = fused[:, conds.index("gallery")]
    p = fused[:, conds.index("control")]
    g, p = g - g.mean(0), p - p.mean(0)
    sim = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1,
                                                                             keepdims=True)).T
    rank1 = np.mean(sim.argmax(axis=1) == np.arange(3))  # no ties in float scores
    assert study["matchers"]["appearance"]["control"]["rank1"] == pytest.approx(rank1)
    labels = [str(x) for x in feats["labels"]]
    assert labels == ["SUBJ-0001_S01", "SUBJ-0002_S01", "SUBJ-0003_S01"]
    for label in labels:
        names = sorted(x.name for x in (out / "renders" / label).iterdir())
        assert names == ["all_views.png", "control.png", "deidentified.png", "gallery.png"]
    for stem in ("cmc", "cmc_appearance", "cmc_surface", "roc_appearance", "scores_surface"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    # privacy: nothing from the identities or original folder names reaches outputs or messages
    captured = capsys.readouterr()
    assert "WARNING: fewer than 10 subjects" in captured.out
    written = " ".join(str(x.relative_to(out)) for x in out.rglob("*"))
    blob = captured.out + captured.err + (out / "metrics.json").read_text() + written
    for s in phi["subjects"]:
        for ident in s["identifiers"]:
            if len(ident) >= 5:
                assert ident not in blob
        assert Path(s["dicom_folder"]).name not in blob


def _mapping(tmp_path, rows):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"series": rows, "skipped_files": []}))
    return m


def test_mapping_pairs_input_folders_with_outputs_and_never_names_them(tmp_path):
    orig, deid = tmp_path / "in", tmp_path / "out"
    for d in ("DOE_JANE_123/ct", "ROE_RICHARD_456", "SUBJ-0001/S01", "SUBJ-0002/S01"):
        (orig if not d.startswith("SUBJ") else deid).joinpath(d).mkdir(parents=True)
    rows = [{"pseudonym": "SUBJ-0001", "output": "SUBJ-0001/S01", "input_folder": "DOE_JANE_123/ct",
             "n_files": 64, "PatientName": "DOE^JANE"},
            {"pseudonym": "SUBJ-0002", "output": "SUBJ-0002/S01",
             "input_folder": "ROE_RICHARD_456"},
            {"input_series": 3, "input_folder": "BROKEN_999", "error": "failed"}]  # not written
    pairs = _pairs_from_mapping(_mapping(tmp_path, rows), orig, deid)
    assert [(p.label, p.original.name, p.deidentified.parent.name, p.n_files) for p in pairs] == [
        ("SUBJ-0001_S01", "ct", "SUBJ-0001", 64), ("SUBJ-0002_S01", "ROE_RICHARD_456",
                                                   "SUBJ-0002", None)]
    bad = [
        ([{**rows[0], "input_folder": "../../etc"}], "inside"),
        ([{**rows[0], "input_folder": "GONE_JOHN_777"}], "original folder does not exist"),
        ([{**rows[0], "output": "SUBJ-0009/S01"}], "does not exist"),
        ([rows[0], rows[0]], "more than once"),
        ([rows[2]], "no written series"),
    ]
    for bad_rows, message in bad:
        with pytest.raises(CommandError, match=message) as err:
            _pairs_from_mapping(_mapping(tmp_path, bad_rows), orig, deid)
        for secret in ("DOE", "JANE", "GONE", "JOHN", "777"):
            assert secret not in str(err.value)
    not_json = tmp_path / "x.json"
    not_json.write_text("no")
    with pytest.raises(CommandError, match="not a mapping file"):
        _pairs_from_mapping(not_json, orig, deid)
    with pytest.raises(CommandError, match="does not exist"):
        _pairs_from_mapping(tmp_path / "missing.json", orig, deid)


def test_reid_eval_rejects_bad_input(chain, tmp_path):
    base, _phi = chain
    orig, deid = str(base / "cohort" / "dicom"), str(base / "deid")
    with pytest.raises(CommandError, match="ORIGINAL_DIR"):
        call_command("reid_eval", str(tmp_path / "missing"), deid, str(tmp_path / "o"))
    with pytest.raises(CommandError, match="--mapping"):  # no shared sub-folder names
        call_command("reid_eval", orig, deid, str(tmp_path / "o"))
    with pytest.raises(CommandError, match="views"):
        call_command("reid_eval", orig, deid, str(tmp_path / "o"), "--mapping",
                     str(base / "mapping.json"), "--views", "0,95")
    with pytest.raises(CommandError, match="views"):
        call_command("reid_eval", orig, deid, str(tmp_path / "o"), "--views", "0,10,20")
    with pytest.raises(CommandError):  # one pairing only
        call_command("reid_eval", orig, deid, str(tmp_path / "o"), "--mapping",
                     str(base / "mapping.json"), "--pairs", str(tmp_path / "p.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(CommandError, match="columns"):
        call_command("reid_eval", orig, deid, str(tmp_path / "o"), "--pairs", str(bad))
    escape = tmp_path / "escape.csv"
    escape.write_text("original,deidentified\n../../etc,SUBJ-0001/S01\n")
    with pytest.raises(CommandError, match="inside"):
        call_command("reid_eval", orig, deid, str(tmp_path / "o"), "--pairs", str(escape))
