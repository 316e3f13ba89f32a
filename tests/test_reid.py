"""Re-identification metrics against independent computations (brute force, scipy)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from pipeline.reid import (
    ReidError,
    bootstrap_weights,
    cmc_curve,
    cosine_similarity_matrix,
    evaluate_condition,
    genuine_impostor_scores,
    match_ranks,
    plot_cmc,
    plot_roc,
    plot_similarity_distributions,
    rank_k_accuracy,
    roc_auc,
    roc_curve,
    summarise,
)


def _brute_ranks(sim, probe_ids, gallery_ids):
    out = []
    for r, pid in enumerate(probe_ids):
        own = sim[r, list(gallery_ids).index(pid)]
        others = [sim[r, c] for c, g in enumerate(gallery_ids) if g != pid]
        out.append(1 + sum(o > own for o in others))
    return np.array(out)


def _mw_auc(genuine, impostor):
    g, i = np.ravel(genuine), np.ravel(impostor)
    return mannwhitneyu(g, i, alternative="two-sided").statistic / (g.size * i.size)


@pytest.fixture()
def study():
    """12 subjects; probes = gallery + noise of increasing size (known difficulty)."""
    rng = np.random.default_rng(7)
    gallery = rng.normal(size=(12, 16))
    ids = [f"S{i:02d}" for i in range(12)]
    easy = gallery + 0.05 * rng.normal(size=gallery.shape)
    hard = gallery + 2.0 * rng.normal(size=gallery.shape)
    return gallery, ids, easy, hard


def test_ranks_and_cmc_match_brute_force(study):
    gallery, ids, _easy, hard = study
    order = np.random.default_rng(1).permutation(12)
    probe_ids = [ids[o] for o in order]
    sim = cosine_similarity_matrix(hard[order], gallery)
    ranks = match_ranks(sim, probe_ids, ids)
    assert np.array_equal(ranks, _brute_ranks(sim, probe_ids, ids))
    cmc = cmc_curve(ranks, 12)
    assert cmc[-1] == 1.0 and np.all(np.diff(cmc) >= 0)
    for k in (1, 3, 5, 12):
        assert cmc[k - 1] == rank_k_accuracy(ranks, k) == np.mean(ranks <= k)


def test_known_answers(study):
    gallery, ids, easy, _hard = study
    m = evaluate_condition(easy, gallery, ids, ids, n_bootstrap=200)
    assert m.rank1 == 1.0 and m.rank5 == 1.0 and m.auc == 1.0
    assert m.ci95["rank1"] == (1.0, 1.0)
    # orthogonal gallery; probe 0 leans towards subject 1, so its own subject ranks 2nd
    ortho = np.eye(12, 16)
    probes = ortho.copy()
    probes[0] = 0.3 * ortho[0] + 0.9 * ortho[1]
    ranks = match_ranks(cosine_similarity_matrix(probes, ortho), ids, ids)
    assert ranks[0] == 2 and np.all(ranks[1:] == 1)
    # ties favour the match: an exact tie still counts as rank 1
    assert match_ranks(np.array([[0.5, 0.5], [0.1, 0.9]]), ["a", "b"], ["a", "b"]).tolist() == [1, 1]


def test_auc_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(3)
    g = np.round(rng.normal(0.6, 0.2, 40), 1)  # rounding creates many ties
    i = np.round(rng.normal(0.3, 0.2, 300), 1)
    assert roc_auc(g, i) == pytest.approx(_mw_auc(g, i), abs=1e-12)
    fpr, tpr, thr = roc_curve(g, i)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(thr) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(g, i), abs=1e-12)


def test_condition_auc_and_scores_match_independent_computation(study):
    gallery, ids, _easy, hard = study
    m = evaluate_condition(hard, gallery, ids, ids, n_bootstrap=0)
    sim = cosine_similarity_matrix(hard, gallery)
    assert np.allclose(m.genuine, np.diag(sim))
    off = sim[~np.eye(12, dtype=bool)]
    assert np.allclose(np.sort(m.impostor.ravel()), np.sort(off))
    assert m.auc == pytest.approx(_mw_auc(np.diag(sim), off), abs=1e-12)
    assert m.ci95 == {}


def test_bootstrap_cis_match_brute_force_resampling(study):
    gallery, ids, _easy, hard = study
    n_boot, seed = 300, 11
    m = evaluate_condition(hard, gallery, ids, ids, n_bootstrap=n_boot, seed=seed)
    sim = cosine_similarity_matrix(hard, gallery)
    ranks = _brute_ranks(sim, ids, ids)
    genuine, impostor = genuine_impostor_scores(sim, ids, ids)
    w = bootstrap_weights(12, n_boot, seed)
    assert np.all(w.sum(axis=1) == 12)
    r1, aucs = [], []
    for row in w.astype(int):
        idx = np.repeat(np.arange(12), row)  # the resampled subjects, with repeats
        r1.append(np.mean(ranks[idx] <= 1))
        aucs.append(_mw_auc(genuine[idx], impostor[idx]))
    assert m.ci95["rank1"] == pytest.approx(tuple(np.quantile(r1, [0.025, 0.975])))
    assert m.ci95["auc"] == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])), abs=1e-12)
    lo, hi = m.ci95["auc"]
    assert lo <= m.auc <= hi
    again = evaluate_condition(hard, gallery, ids, ids, n_bootstrap=n_boot, seed=seed)
    assert again.ci95 == m.ci95


def test_summary_keys_and_plots(tmp_path, study):
    from PIL import Image

    gallery, ids, easy, hard = study
    conds = {"control": evaluate_condition(easy, gallery, ids, ids, n_bootstrap=50),
             "deidentified": evaluate_condition(hard, gallery, ids, ids, n_bootstrap=50)}
    summary = summarise(conds)
    for key in ("rank1_control", "rank5_deidentified", "auc_control", "rank1_deidentified_ci95",
                "auc_deidentified_ci95", "cmc_control"):
        assert key in summary
    assert 0 <= summary["rank1_deidentified"] <= 1
    for fn, name in ((plot_cmc, "cmc"), (plot_roc, "roc"), (plot_similarity_distributions, "sim")):
        paths = fn(conds, tmp_path / "plots" / name)
        assert [p.suffix for p in paths] == [".png", ".svg"]
        assert Image.open(paths[0]).size[0] > 100
        assert paths[1].read_text().lstrip().startswith("<?xml")


def test_bad_input():
    g = np.eye(3)
    with pytest.raises(ReidError, match="no gallery entry"):
        match_ranks(np.eye(3), ["a", "b", "x"], ["a", "b", "c"])
    with pytest.raises(ReidError, match="unique"):
        match_ranks(np.eye(3), ["a", "b", "c"], ["a", "a", "c"])
    with pytest.raises(ReidError, match="shape"):
        match_ranks(np.eye(3), ["a", "b"], ["a", "b", "c"])
    with pytest.raises(ReidError, match="sizes differ"):
        cosine_similarity_matrix(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ReidError, match="non-zero"):
        cosine_similarity_matrix(np.zeros((1, 3)), g)
    with pytest.raises(ReidError, match="one subject id"):
        evaluate_condition(g, g, ["a", "b"], ["a", "b", "c"])
    with pytest.raises(ReidError):
        roc_auc([], [0.1])
    assert issubclass(ReidError, ValueError)


# --------------------------------------------------------------------------- reid_eval command


def _write_series(volume, folder):
    from pipeline.dicom_io import volume_to_datasets, write_datasets

    folder.parent.mkdir(parents=True, exist_ok=True)
    write_datasets(volume_to_datasets(volume), folder)


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory):
    """3 synthetic subjects; originals under identifying folder names, de-identified by pseudonym."""
    from pipeline.synth import SubjectParams, generate_head
    from pipeline.volume import Volume

    root = tmp_path_factory.mktemp("reid")
    pairs = []
    for s in range(3):
        head = generate_head(SubjectParams.random(50 + s), shape=(72, 84, 84),
                             spacing_mm=(3.0, 2.7, 2.7), noise_seed=s)
        hu = head.volume.hu.copy()
        hu[head.face_soft_tissue_mask] = -1000
        deid = Volume(hu=hu, spacing_mm=head.volume.spacing_mm,
                      origin_lps_mm=head.volume.origin_lps_mm)
        orig_rel, deid_rel = f"DOE^JANE_{s}_MRN12345/ct", f"SUBJ-{s + 1:04d}/S01"
        _write_series(head.volume, root / "orig" / orig_rel)
        _write_series(deid, root / "deid" / deid_rel)
        pairs.append((orig_rel, deid_rel))
    csv_path = root / "pairs.csv"
    csv_path.write_text("original,deidentified\n" + "".join(f"{o},{d}\n" for o, d in pairs))
    return root, csv_path


@pytest.mark.slow
def test_reid_eval_command_end_to_end(dicom_study, capsys):
    from django.core.management import call_command

    root, csv_path = dicom_study
    out = root / "out"
    call_command("reid_eval", str(root / "orig"), str(root / "deid"), str(out),
                 "--pairs", str(csv_path), "--views", "0,20", "--bootstrap", "100")
    metrics = __import__("json").loads((out / "metrics.json").read_text())
    for key in ("n_subjects", "face_detected_fraction", "rank1_control", "rank1_deidentified",
                "rank5_control", "rank5_deidentified", "auc_control", "auc_deidentified",
                "rank1_control_ci95", "auc_deidentified_ci95"):
        assert key in metrics
    assert metrics["n_subjects"] == 3 and metrics["failures"] == []
    for key in ("face_detected_fraction", "rank1_control", "rank1_deidentified", "auc_control"):
        assert 0.0 <= metrics[key] <= 1.0
    # independent recomputation of rank-1 from the saved embeddings
    emb = np.load(out / "embeddings.npz")
    g, probe = emb["original"][:, 0], emb["original"][:, 1]
    sim = (probe / np.linalg.norm(probe, axis=1, keepdims=True)) @ (
        g / np.linalg.norm(g, axis=1, keepdims=True)).T
    assert metrics["rank1_control"] == pytest.approx(np.mean(sim.argmax(axis=1) == np.arange(3)))
    assert sorted(p.name for p in (out / "renders" / "SUBJ-0001_S01").iterdir()) == [
        "deidentified_yaw+000.png", "deidentified_yaw+020.png",
        "original_yaw+000.png", "original_yaw+020.png"]
    for stem in ("cmc", "roc", "similarity"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    # privacy: nothing from the original folder names reaches outputs or messages
    captured = capsys.readouterr()
    written = [str(p.relative_to(out)) for p in out.rglob("*")]
    blob = captured.out + captured.err + (out / "metrics.json").read_text() + " ".join(written)
    assert "DOE" not in blob and "MRN" not in blob


def test_reid_eval_command_rejects_bad_input(dicom_study, tmp_path):
    from django.core.management import CommandError, call_command

    root, csv_path = dicom_study
    with pytest.raises(CommandError, match="ORIGINAL_DIR"):
        call_command("reid_eval", str(tmp_path / "missing"), str(root / "deid"), str(tmp_path / "o"))
    with pytest.raises(CommandError, match="--pairs"):  # no shared sub-folder names
        call_command("reid_eval", str(root / "orig"), str(root / "deid"), str(tmp_path / "o"))
    with pytest.raises(CommandError, match="views"):
        call_command("reid_eval", str(root / "orig"), str(root / "deid"), str(tmp_path / "o"),
                     "--pairs", str(csv_path), "--views", "0,95")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(CommandError, match="columns"):
        call_command("reid_eval", str(root / "orig"), str(root / "deid"), str(tmp_path / "o"),
                     "--pairs", str(bad))
    escape = tmp_path / "escape.csv"
    escape.write_text("original,deidentified\n../../etc,SUBJ-0001/S01\n")
    with pytest.raises(CommandError, match="inside"):
        call_command("reid_eval", str(root / "orig"), str(root / "deid"), str(tmp_path / "o"),
                     "--pairs", str(escape))
