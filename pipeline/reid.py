"""Re-identification metrics on face embeddings (pure numpy; plots with matplotlib Agg).

Closed-set identification: the GALLERY holds one embedding per subject (the
original scan's standardised frontal render); a PROBE set holds one embedding
per subject from another condition — a second view/scan of the original
(control) or the de-identified render (test). Each probe is compared with
every gallery entry by cosine similarity.

* rank of a probe = 1 + number of OTHER subjects' gallery entries that are
  strictly more similar than its own (ties favour the attacker, so rates
  are not understated);
* rank-k accuracy = fraction of probes with rank ≤ k; the CMC curve is the
  rank-k accuracy for k = 1..n_gallery;
* genuine scores = similarity of a probe with its own gallery entry;
  impostor scores = with every other gallery entry;
* ROC AUC = P(genuine > impostor) + ½ P(tie) over all genuine × impostor
  pairs (the Mann–Whitney U statistic divided by n_gen·n_imp);
* 95 % confidence intervals by a seeded percentile bootstrap over SUBJECTS
  (a resampled subject brings its rank, its genuine score and its row of
  impostor scores; the gallery stays fixed).

All fractions are in 0..1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ConditionMetrics",
    "ReidError",
    "bootstrap_weights",
    "cmc_curve",
    "cosine_similarity_matrix",
    "evaluate_condition",
    "genuine_impostor_scores",
    "match_ranks",
    "plot_cmc",
    "plot_roc",
    "plot_similarity_distributions",
    "rank_k_accuracy",
    "roc_auc",
    "roc_curve",
    "summarise",
]


class ReidError(ValueError):
    """Inconsistent embeddings or identities (shapes, missing or duplicate gallery subjects)."""


def cosine_similarity_matrix(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``(n_probes, n_gallery)`` cosine similarities between embedding rows."""
    p = np.atleast_2d(np.asarray(probes, dtype=float))
    g = np.atleast_2d(np.asarray(gallery, dtype=float))
    if p.shape[1] != g.shape[1]:
        raise ReidError(f"embedding sizes differ: probes {p.shape[1]}, gallery {g.shape[1]}")
    pn, gn = np.linalg.norm(p, axis=1), np.linalg.norm(g, axis=1)
    if np.any(pn == 0) or np.any(gn == 0) or not (np.all(np.isfinite(p)) and np.all(np.isfinite(g))):
        raise ReidError("embeddings must be finite and non-zero")
    return (p / pn[:, None]) @ (g / gn[:, None]).T


def _genuine_index(probe_ids: Sequence[str], gallery_ids: Sequence[str]) -> np.ndarray:
    gallery_ids = [str(g) for g in gallery_ids]
    if len(set(gallery_ids)) != len(gallery_ids):
        raise ReidError("gallery identities must be unique (one entry per subject)")
    where = {g: i for i, g in enumerate(gallery_ids)}
    missing = [p for p in probe_ids if str(p) not in where]
    if missing:
        raise ReidError(f"{len(missing)} probe(s) have no gallery entry for their subject")
    return np.array([where[str(p)] for p in probe_ids], dtype=int)


def match_ranks(similarity: np.ndarray, probe_ids: Sequence[str],
                gallery_ids: Sequence[str]) -> np.ndarray:
    """1-based rank of each probe's own subject in its gallery ordering (ties favour the match)."""
    s = np.asarray(similarity, dtype=float)
    if s.shape != (len(probe_ids), len(gallery_ids)):
        raise ReidError(f"similarity shape {s.shape} does not match "
                        f"{len(probe_ids)} probes × {len(gallery_ids)} gallery entries")
    gi = _genuine_index(probe_ids, gallery_ids)
    genuine = s[np.arange(len(gi)), gi]
    return 1 + (s > genuine[:, None]).sum(axis=1)


def cmc_curve(ranks: np.ndarray, n_gallery: int) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[k-1]`` = fraction of ranks ≤ k, k = 1..n_gallery."""
    r = np.asarray(ranks, dtype=int)
    if r.size == 0:
        raise ReidError("no probes")
    if r.min() < 1 or r.max() > n_gallery:
        raise ReidError("ranks must lie in 1..n_gallery")
    counts = np.bincount(r, minlength=n_gallery + 1)[1:]
    return np.cumsum(counts) / r.size


def rank_k_accuracy(ranks: np.ndarray, k: int) -> float:
    """Fraction of probes whose own subject is among the top ``k`` gallery entries."""
    r = np.asarray(ranks)
    if r.size == 0:
        raise ReidError("no probes")
    return float(np.mean(r <= k))


def genuine_impostor_scores(similarity: np.ndarray, probe_ids: Sequence[str],
                            gallery_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(genuine (n_probes,), impostor (n_probes, n_gallery − 1))`` similarity scores."""
    s = np.asarray(similarity, dtype=float)
    gi = _genuine_index(probe_ids, gallery_ids)
    rows = np.arange(len(gi))
    genuine = s[rows, gi]
    mask = np.ones_like(s, dtype=bool)
    mask[rows, gi] = False
    return genuine, s[mask].reshape(len(gi), s.shape[1] - 1)


def _pair_wins(genuine: np.ndarray, impostor_rows: np.ndarray) -> np.ndarray:
    """``U[a, b]`` = Σ over impostors i of probe b of [g_a > i] + ½[g_a = i]."""
    n = len(genuine)
    u = np.empty((n, len(impostor_rows)), dtype=float)
    for b, row in enumerate(impostor_rows):
        srt = np.sort(np.asarray(row, dtype=float))
        lo = np.searchsorted(srt, genuine, side="left")
        hi = np.searchsorted(srt, genuine, side="right")
        u[:, b] = lo + 0.5 * (hi - lo)
    return u


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC curve of genuine vs impostor scores: P(g > i) + ½ P(g = i)."""
    g = np.asarray(genuine, dtype=float).ravel()
    i = np.sort(np.asarray(impostor, dtype=float).ravel())
    if g.size == 0 or i.size == 0:
        raise ReidError("AUC needs at least one genuine and one impostor score")
    lo = np.searchsorted(i, g, side="left")
    hi = np.searchsorted(i, g, side="right")
    return float((lo + 0.5 * (hi - lo)).sum() / (g.size * i.size))


def roc_curve(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` for "same subject if similarity ≥ threshold", descending thresholds.

    Starts at (0, 0) with threshold +inf and ends at (1, 1).
    """
    g = np.asarray(genuine, dtype=float).ravel()
    i = np.asarray(impostor, dtype=float).ravel()
    if g.size == 0 or i.size == 0:
        raise ReidError("ROC needs at least one genuine and one impostor score")
    thr = np.unique(np.concatenate([g, i]))[::-1]
    gs, is_ = np.sort(g), np.sort(i)
    tpr = (g.size - np.searchsorted(gs, thr, side="left")) / g.size
    fpr = (i.size - np.searchsorted(is_, thr, side="left")) / i.size
    return (np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]),
            np.concatenate([[np.inf], thr]))


@dataclass
class ConditionMetrics:
    """Identification metrics of one probe condition against the gallery (fractions 0..1)."""

    n_probes: int
    n_gallery: int
    ranks: np.ndarray
    cmc: np.ndarray
    rank1: float
    rank5: float
    auc: float
    genuine: np.ndarray
    impostor: np.ndarray
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self, name: str) -> dict[str, object]:
        """Flat JSON-ready dict with keys ``rank1_<name>``, ``rank1_<name>_ci95``, ... ."""
        out: dict[str, object] = {
            f"rank1_{name}": self.rank1,
            f"rank5_{name}": self.rank5,
            f"auc_{name}": self.auc,
            f"genuine_similarity_mean_{name}": float(np.mean(self.genuine)),
            f"impostor_similarity_mean_{name}": float(np.mean(self.impostor)),
            f"cmc_{name}": [float(v) for v in self.cmc],
            f"n_probes_{name}": self.n_probes,
        }
        for key, (lo, hi) in self.ci95.items():
            out[f"{key}_{name}_ci95"] = [lo, hi]
        return out


def evaluate_condition(
    probes: np.ndarray,
    gallery: np.ndarray,
    probe_ids: Sequence[str],
    gallery_ids: Sequence[str],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> ConditionMetrics:
    """Rank-1/5, CMC, genuine/impostor scores, AUC and bootstrap CIs for one probe condition.

    ``probes`` (n_probes, d) and ``gallery`` (n_gallery, d) are embeddings;
    ids are subject labels (every probe's subject must be in the gallery once).
    CIs are percentile intervals over ``n_bootstrap`` resamples of the probe
    subjects with ``numpy.random.default_rng(seed)`` (``n_bootstrap=0``: none).
    """
    if len(probes) != len(probe_ids) or len(gallery) != len(gallery_ids):
        raise ReidError("each embedding needs exactly one subject id")
    sim = cosine_similarity_matrix(probes, gallery)
    ranks = match_ranks(sim, probe_ids, gallery_ids)
    genuine, impostor = genuine_impostor_scores(sim, probe_ids, gallery_ids)
    n_g = len(gallery_ids)
    if n_g < 2:
        raise ReidError("need at least two gallery subjects")
    wins = _pair_wins(genuine, impostor)  # (n, n)
    m = impostor.shape[1]
    n = len(ranks)
    auc = float(wins.sum() / (n * n * m))
    metrics = ConditionMetrics(
        n_probes=n, n_gallery=n_g, ranks=ranks, cmc=cmc_curve(ranks, n_g),
        rank1=rank_k_accuracy(ranks, 1), rank5=rank_k_accuracy(ranks, 5), auc=auc,
        genuine=genuine, impostor=impostor,
    )
    if n_bootstrap > 0:
        w = bootstrap_weights(n, n_bootstrap, seed)  # (B, n)
        r1 = w @ (ranks <= 1) / n
        r5 = w @ (ranks <= 5) / n
        # AUC of a resample: Σ_a Σ_b w_a w_b U[a, b] / (Σ w_a · Σ w_b · m)
        aucs = ((w @ wins) * w).sum(axis=1) / (n * n * m)
        alpha = (1.0 - confidence) / 2.0

        def pct(x: np.ndarray) -> tuple[float, float]:
            lo, hi = np.quantile(x, [alpha, 1.0 - alpha])
            return float(lo), float(hi)

        metrics.ci95 = {"rank1": pct(r1), "rank5": pct(r5), "auc": pct(aucs)}
    return metrics


def bootstrap_weights(n_subjects: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """``(n_bootstrap, n_subjects)`` multiplicities of each subject in each resample (seeded).

    Row ``b`` counts how often each subject is drawn in resample ``b`` of
    ``n_subjects`` draws with replacement (``numpy.random.default_rng(seed)``).
    """
    rng = np.random.default_rng(seed)
    p = np.full(n_subjects, 1.0 / n_subjects)
    return rng.multinomial(n_subjects, p, size=n_bootstrap).astype(float)


def summarise(conditions: Mapping[str, ConditionMetrics]) -> dict[str, object]:
    """Merge :meth:`ConditionMetrics.to_dict` of every named condition into one dict."""
    out: dict[str, object] = {}
    for name, met in conditions.items():
        out.update(met.to_dict(name))
    return out


# --------------------------------------------------------------------------- plots


def _save(fig: object, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
    return paths


def _figure(width_in: float = 5.0, height_in: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_cmc(conditions: Mapping[str, ConditionMetrics], stem: str | Path) -> list[Path]:
    """CMC curves of every condition; writes ``stem.png`` and ``stem.svg``."""
    fig, ax = _figure()
    for name, met in conditions.items():
        k = np.arange(1, len(met.cmc) + 1)
        ax.step(k, met.cmc, where="post", label=f"{name} (rank-1 {met.rank1:.0%})")
    ax.set_xlabel("rank k")
    ax.set_ylabel("identification rate (rank ≤ k)")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, max(len(m.cmc) for m in conditions.values()))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Cumulative match characteristic")
    return _save(fig, Path(stem))


def plot_similarity_distributions(conditions: Mapping[str, ConditionMetrics],
                                  stem: str | Path) -> list[Path]:
    """Histograms of genuine and impostor cosine similarities per condition (PNG + SVG)."""
    fig, ax = _figure(5.5, 3.6)
    all_scores = np.concatenate([np.concatenate([m.genuine, m.impostor.ravel()])
                                 for m in conditions.values()])
    lo, hi = float(all_scores.min()), float(all_scores.max())
    pad = max(1e-3, 0.02 * (hi - lo))
    bins = np.linspace(lo - pad, hi + pad, 50)
    for idx, (name, met) in enumerate(conditions.items()):
        colour = f"C{idx}"
        ax.hist(met.genuine, bins=bins, density=True, histtype="stepfilled", alpha=0.35,
                color=colour, label=f"{name}: genuine")
        ax.hist(met.impostor.ravel(), bins=bins, density=True, histtype="step", color=colour,
                linestyle="--", label=f"{name}: impostor")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("cosine similarity to gallery")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("Genuine vs impostor similarity")
    return _save(fig, Path(stem))


def plot_roc(conditions: Mapping[str, ConditionMetrics], stem: str | Path) -> list[Path]:
    """ROC curves (genuine vs impostor similarity) per condition (PNG + SVG)."""
    fig, ax = _figure(4.2, 4.0)
    for name, met in conditions.items():
        fpr, tpr, _t = roc_curve(met.genuine, met.impostor)
        ax.plot(fpr, tpr, label=f"{name} (AUC {met.auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("false match rate")
    ax.set_ylabel("true match rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("ROC: same subject vs different subject")
    return _save(fig, Path(stem))
