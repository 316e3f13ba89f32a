"""Re-identification metrics against independent computations (brute force, scipy)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from pipeline.reid import (
    FUSED,
    MIN_SUBJECTS,
    TIE_RULE,
    ReidError,
    bootstrap_weights,
    cmc_curve,
    cmc_figure,
    cosine_similarity_matrix,
    embedding_similarity,
    evaluate_condition,
    evaluate_similarity,
    evaluate_study,
    fuse_similarities,
    genuine_impostor_scores,
    k_choice_accuracy,
    match_ranks,
    plot_cmc,
    plot_roc,
    plot_similarity_distributions,
    rank_counts,
    rank_k_accuracy,
    roc_auc,
    roc_curve,
    summarise,
)


def _brute_hit_rates(sim, probe_ids, gallery_ids, k):
    """Rank-k rate by enumerating every tie-breaking order (exact expectation)."""
    rates = []
    for r, pid in enumerate(probe_ids):
        g = list(gallery_ids).index(pid)
        row = sim[r]
        tied = [c for c in range(len(row)) if row[c] == row[g]]
        better = sum(row[c] > row[g] for c in range(len(row)))
        hits = []
        for order in itertools.permutations(tied):
            rank = better + 1 + order.index(g)
            hits.append(rank <= k)
        rates.append(np.mean(hits))
    return float(np.mean(rates))


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


def test_tie_rule_is_the_expectation_over_random_tie_breaking():
    sim = np.array([[0.5, 0.5], [0.1, 0.9]])
    better, ties = rank_counts(sim, ["a", "b"], ["a", "b"])
    assert better.tolist() == [0, 0] and ties.tolist() == [1, 0]
    assert match_ranks(sim, ["a", "b"], ["a", "b"]).tolist() == [1.5, 1.0]
    m = evaluate_similarity(sim, ["a", "b"], ["a", "b"], n_bootstrap=0)
    assert m.rank1 == 0.75 and m.cmc.tolist() == [0.75, 1.0]
    # all genuine × impostor pairs: 0.5 vs 0.5 counts ½, the other three pairs 1 each
    assert m.auc == 0.875
    assert "random" in TIE_RULE and "½" in TIE_RULE
    # a 3-way tie behind one better entry, checked against every tie-breaking order
    sim = np.array([[0.2, 0.9, 0.2, 0.2, 0.1], [0.0, 1.0, 0.0, 0.0, 0.0],
                    [0.3, 0.3, 0.3, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5],
                    [0.5, 0.5, 0.5, 0.5, 0.1]])
    ids = list("abcde")
    better, ties = rank_counts(sim, ids, ids)
    for k in range(1, 6):
        assert rank_k_accuracy(better, ties, k) == pytest.approx(_brute_hit_rates(sim, ids, ids, k))
    assert evaluate_similarity(sim, ids, ids, n_bootstrap=0).cmc[-1] == 1.0


def test_k_choice_accuracy_matches_enumeration_of_every_choice_set():
    """The raters' k-alternative task: the own subject must beat k − 1 random others."""
    sim = np.array([[0.5, 0.9, 0.5, 0.1, 0.2], [0.3, 0.8, 0.8, 0.8, 0.1],
                    [0.1, 0.2, 0.7, 0.3, 0.4], [0.6, 0.6, 0.6, 0.6, 0.6],
                    [0.9, 0.8, 0.7, 0.6, 0.5]])
    ids = list("abcde")
    better, ties = rank_counts(sim, ids, ids)
    for k in (2, 3, 4, 5):
        expected = []
        for p in range(5):
            others = [g for g in range(5) if g != p]
            per_set = []
            for chosen in itertools.combinations(others, k - 1):
                scores = [sim[p, g] for g in chosen]
                b = sum(x > sim[p, p] for x in scores)
                t = sum(x == sim[p, p] for x in scores)
                per_set.append(0.0 if b else 1.0 / (t + 1))
            expected.append(np.mean(per_set))
        assert k_choice_accuracy(better, ties, 5, k) == pytest.approx(np.mean(expected))
    m = evaluate_similarity(sim, ids, ids, n_bootstrap=0)
    assert k_choice_accuracy(better, ties, 5, 5) == pytest.approx(m.rank1)
    with pytest.raises(ReidError):
        k_choice_accuracy(better, ties, 5, 6)


def test_ranks_and_cmc_match_brute_force(study):
    gallery, ids, _easy, hard = study
    order = np.random.default_rng(1).permutation(12)
    probe_ids = [ids[o] for o in order]
    sim = np.round(cosine_similarity_matrix(hard[order], gallery), 1)  # rounding makes ties
    better, ties = rank_counts(sim, probe_ids, ids)
    assert ties.sum() > 0
    cmc = cmc_curve(better, ties, 12)
    assert cmc[-1] == 1.0 and np.all(np.diff(cmc) >= 0)
    for k in (1, 3, 5, 12):
        assert cmc[k - 1] == pytest.approx(_brute_hit_rates(sim, probe_ids, ids, k))


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


def test_centring_removes_what_a_whole_condition_shares():
    """A common shift of every probe (a new view, a removed face) hides identity from the
    plain cosine; the cohort-centred similarity recovers it."""
    rng = np.random.default_rng(5)
    identity = rng.normal(size=(15, 32))
    gallery = 10.0 * np.ones(32) + identity
    probes = 10.0 * np.ones(32) + 25.0 * rng.normal(size=32) + identity + 0.1 * rng.normal(
        size=(15, 32))
    ids = [str(i) for i in range(15)]
    plain = evaluate_similarity(cosine_similarity_matrix(probes, gallery), ids, ids, n_bootstrap=0)
    centred = evaluate_similarity(embedding_similarity(probes, gallery), ids, ids, n_bootstrap=0)
    assert plain.rank1 < 0.5 and centred.rank1 == 1.0
    # same as centring by hand
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    assert np.allclose(embedding_similarity(probes, gallery),
                       cosine_similarity_matrix(p - p.mean(0), g - g.mean(0)))
    with pytest.raises(ReidError, match="two"):
        embedding_similarity(probes[:1], gallery)


def test_fusion_is_invariant_to_each_matchers_units(study):
    gallery, ids, easy, hard = study
    a = cosine_similarity_matrix(hard, gallery)
    b = cosine_similarity_matrix(easy, gallery)
    fused = fuse_similarities([a, b])
    assert np.allclose(fuse_similarities([3.0 * a - 7.0, 0.01 * b + 2.0]), fused)
    assert fused.mean() == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(fuse_similarities([a, np.ones_like(a)]), 0.5 * (a - a.mean()) / a.std())
    with pytest.raises(ReidError):
        fuse_similarities([a, b[:3]])


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
    better, ties = rank_counts(sim, ids, ids)
    genuine, impostor = genuine_impostor_scores(sim, ids, ids)
    w = bootstrap_weights(12, n_boot, seed)
    assert np.all(w.sum(axis=1) == 12)
    r1, aucs = [], []
    for row in w.astype(int):
        idx = np.repeat(np.arange(12), row)  # the resampled subjects, with repeats
        r1.append(rank_k_accuracy(better[idx], ties[idx], 1))
        aucs.append(_mw_auc(genuine[idx], impostor[idx]))
    assert m.ci95["rank1"] == pytest.approx(tuple(np.quantile(r1, [0.025, 0.975])))
    assert m.ci95["auc"] == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])), abs=1e-12)
    lo, hi = m.ci95["auc"]
    assert lo <= m.auc <= hi
    again = evaluate_condition(hard, gallery, ids, ids, n_bootstrap=n_boot, seed=seed)
    assert again.ci95 == m.ci95


def test_evaluate_study_reports_every_matcher_the_fusion_chance_and_small_cohorts(study):
    gallery, ids, easy, hard = study
    sims = {"a": {"control": cosine_similarity_matrix(easy, gallery),
                  "deidentified": cosine_similarity_matrix(hard, gallery)},
            "b": {"control": cosine_similarity_matrix(easy + 0.5, gallery),
                  "deidentified": cosine_similarity_matrix(hard, gallery + 1.0)}}
    res = evaluate_study(sims, ids, labels={"a": "matcher A"}, n_bootstrap=100)
    assert res["primary"] == FUSED and list(res["matchers"]) == ["a", "b", FUSED]
    assert res["conditions"] == ["control", "deidentified"]
    assert res["n_subjects"] == 12 and res["small_cohort"] is False
    assert res["chance"] == {"rank1": 1 / 12, "rank5": 5 / 12, "auc": 0.5}
    assert res["matchers"]["a"]["label"] == "matcher A"
    for name in ("a", "b", FUSED):
        for cond in ("control", "deidentified"):
            m = res["matchers"][name][cond]
            for key in ("rank1", "rank5", "auc"):
                lo, hi = m[f"{key}_ci95"]
                assert 0.0 <= lo <= m[key] <= hi <= 1.0
            assert len(m["cmc"]) == 12 and m["cmc"][0] == m["rank1"]
    fused = evaluate_similarity(fuse_similarities([sims["a"]["deidentified"],
                                                   sims["b"]["deidentified"]]), ids, ids,
                                n_bootstrap=0)
    assert res["matchers"][FUSED]["deidentified"]["rank1"] == fused.rank1
    assert res["matchers"]["a"]["control"]["rank1"] == 1.0
    small = evaluate_study({"a": {"control": np.eye(3)}}, ["x", "y", "z"], n_bootstrap=0)
    assert small["small_cohort"] is True and small["primary"] == "a"
    assert MIN_SUBJECTS == 10 and small["chance"]["rank5"] == 1.0
    with pytest.raises(ReidError, match="same probe conditions"):
        evaluate_study({"a": {"control": np.eye(3)}, "b": {"deidentified": np.eye(3)}},
                       ["x", "y", "z"])


def test_cmc_figure_has_both_curves_chance_and_integer_ranks(study):
    gallery, ids, easy, hard = study
    sims = {"a": {"control": cosine_similarity_matrix(easy, gallery),
                  "deidentified": cosine_similarity_matrix(hard, gallery)}}
    res = evaluate_study(sims, ids[:12], n_bootstrap=50)
    fig = cmc_figure(res)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(lbl.startswith("control") for lbl in labels)
    assert any(lbl.startswith("de-identified") for lbl in labels)
    assert any(lbl.startswith("chance") for lbl in labels)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    # three subjects: ticks exactly 1, 2, 3 (no 1.5 or 2.5)
    three = evaluate_study({"a": {"control": np.eye(3), "deidentified": np.eye(3)[::-1]}},
                           ["x", "y", "z"], n_bootstrap=0)
    ax3 = cmc_figure(three).axes[0]
    ax3.figure.canvas.draw()
    assert [t for t in ax3.get_xticks() if 0.8 <= t <= 3.2] == [1.0, 2.0, 3.0]


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
    res = evaluate_study({"m": {c: cosine_similarity_matrix(p, gallery)
                                for c, p in (("control", easy), ("deidentified", hard))}},
                         ids, n_bootstrap=0)
    for fn, arg, name in ((plot_cmc, res, "cmc"), (plot_roc, conds, "roc"),
                          (plot_similarity_distributions, conds, "sim")):
        paths = fn(arg, tmp_path / "plots" / name)
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
    with pytest.raises(ReidError, match="finite"):
        match_ranks(np.full((2, 2), np.nan), ["a", "b"], ["a", "b"])
    with pytest.raises(ReidError, match="sizes differ"):
        cosine_similarity_matrix(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ReidError, match="non-zero"):
        cosine_similarity_matrix(np.zeros((1, 3)), g)
    with pytest.raises(ReidError, match="one subject id"):
        evaluate_condition(g, g, ["a", "b"], ["a", "b", "c"])
    with pytest.raises(ReidError):
        roc_auc([], [0.1])
    with pytest.raises(ReidError, match="two subjects"):
        evaluate_study({"a": {"control": np.eye(1)}}, ["x"])
    assert issubclass(ReidError, ValueError)
