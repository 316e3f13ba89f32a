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


@pytest.mark.slow
def test_reid_eval_with_the_reconstruction_attacks(chain, capsys):
    """--attack all: faces rebuilt on the de-identified skulls are probes like the others,
    in metrics.json (flat keys and the study table), the plots and the renders."""
    base, _phi = chain
    out = base / "out-attacks"
    call_command("reid_eval", str(base / "cohort" / "dicom"), str(base / "deid"), str(out),
                 "--mapping", str(base / "mapping.json"), "--bootstrap", "100",
                 "--attack", "all")
    metrics = json.loads((out / "metrics.json").read_text())
    study = metrics["study"]
    assert study["conditions"] == ["control", "deidentified", "attack_learned",
                                   "attack_tissue_depth"]
    fused = study["matchers"]["fused"]
    for name in ("tissue_depth", "learned"):
        cond = f"attack_{name}"
        for key in ("rank1", "rank5", "auc"):
            assert metrics[f"{key}_{cond}"] == fused[cond][key]
            lo, hi = metrics[f"{key}_{cond}_ci95"]
            assert 0.0 <= lo <= fused[cond][key] <= hi <= 1.0
        for m in ("appearance", "surface"):
            assert study["matchers"][m][cond]["n_probes"] == 3
        assert metrics["attacks"][name]["condition"] == cond
        assert metrics["attacks"][name]["voxels_added_mean"] > 100
    assert metrics["attacks"]["tissue_depth"]["landmarks_found_mean"] >= 15
    assert metrics["attacks"]["learned"]["model"]["train_seeds"][0] >= 300000
    held_out = metrics["attacks"]["learned"]["held_out"]
    assert held_out["disjoint"] is True and held_out["subject_seeds"] == [60, 61, 62]
    assert set(metrics["face_detected_fraction"]) == {
        "gallery", "control", "deidentified", "attack_tissue_depth", "attack_learned"}
    feats = np.load(out / "features.npz")
    assert {"attack_tissue_depth", "attack_learned"} <= set(feats["conditions"])
    for label in ("SUBJ-0001_S01", "SUBJ-0002_S01", "SUBJ-0003_S01"):
        names = {x.name for x in (out / "renders" / label).iterdir()}
        assert {"attack_tissue_depth.png", "attack_learned.png", "deidentified.png"} <= names
    # the rebuilt face differs from the de-identified surface it was built on
    d = feats["depth_maps"]
    conds = list(feats["conditions"])
    de, td = d[:, conds.index("deidentified")], d[:, conds.index("attack_tissue_depth")]
    both = np.isfinite(de) & np.isfinite(td)
    assert np.median(np.abs(de - td)[both]) > 1.0
    assert "attack_tissue_depth" in capsys.readouterr().out  # the printed table
    from pipeline.reid import cmc_figure

    legend = [t.get_text() for t in cmc_figure(study).axes[0].get_legend().get_texts()]
    assert any(t.startswith("de-identified + tissue-depth reconstruction: rank-1") for t in legend)
    assert any(t.startswith("de-identified + learned reconstruction: rank-1") for t in legend)
    assert (out / "roc_surface.png").stat().st_size > 0


@pytest.mark.slow
def test_reid_eval_refuses_a_learned_model_that_saw_the_cohort(chain, tmp_path):
    """The learned attack is only evaluated on heads it was neither trained nor validated on:
    a model whose card lists the cohort's seeds (60–62) is refused before anything runs."""
    from pipeline import skull_to_face as SF

    base, _phi = chain
    rg = SF.RadialGrid(theta0=-4.0, theta1=4.0, phi0=-2.0, phi1=2.0)
    rng = np.random.default_rng(0)
    for card in ({"train_seeds": [0, 61], "validation_seeds": [900, 910]},  # trained on 60
                 {"train_seeds": [0, 50], "validation_seeds": [62, 70]},  # validated on 62
                 {"train_seeds": [0, 50]}):  # the card does not say
        path = tmp_path / f"m{len(card)}{card['train_seeds'][1]}.npz"
        SF.fit_model(rng.normal(size=(8, 30)), rng.normal(size=(8, 15)), k=2, lam=1.0, rg=rg,
                     card=card).save(path)
        with pytest.raises(CommandError, match="trained or validated on|no validation_seeds"):
            call_command("reid_eval", str(base / "cohort" / "dicom"), str(base / "deid"),
                         str(tmp_path / "out"), "--mapping", str(base / "mapping.json"),
                         "--attack", "learned", "--learned-model", str(path))
    assert not (tmp_path / "out" / "metrics.json").exists()


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
