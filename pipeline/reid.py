"""Re-identification metrics: one implementation for ``reid_eval``, the web and the study report.

Closed-set identification. The GALLERY holds one sample per subject (the
subject's known face); a PROBE set holds one sample per subject from another
condition — the untouched original (CONTROL: can the instrument re-identify a
face at all?) or the de-identified scan (the risk that remains). A matcher
turns probes × gallery into a SIMILARITY matrix ``S[p, g]`` (larger = more
alike); everything below works on such matrices, whatever the matcher.

Tie rule (:data:`TIE_RULE`): ties are broken uniformly at random and the
EXPECTED value is reported. A probe whose own subject is beaten by ``b``
other gallery entries and tied with ``t`` others lands on each of the ranks
``b+1 … b+t+1`` with probability ``1/(t+1)``, so it counts as identified at
rank ``k`` with probability ``clip((k − b) / (t + 1), 0, 1)`` and its
expected rank is ``1 + b + t/2``. The AUC counts a tied genuine/impostor
pair as ½ — the same rule (Mann–Whitney U / (n_genuine · n_impostor)).

* rank-k accuracy = mean over probes of that probability; the CMC curve is
  rank-k accuracy for k = 1..n_gallery;
* genuine scores = ``S[p, own subject]``; impostor scores = the rest of the row;
* chance: rank-k = k / n_gallery, AUC = 0.5;
* 95 % confidence intervals: seeded percentile bootstrap over SUBJECTS (a
  resampled subject brings its rank, its genuine score and its row of
  impostor scores; the gallery and the similarity matrix stay fixed).

Matchers' similarities: :func:`embedding_similarity` (cosine similarity of
cohort-centred embeddings, see there), and any other ``(n, n)`` score
matrix; :func:`fuse_similarities` z-scores each matcher's matrix and averages
them. :func:`evaluate_study` evaluates every matcher and the fusion for every
condition and returns a JSON-ready dict (the format stored by the web
platform and written by ``reid_eval``); the plots take that dict.

All fractions are in 0..1. Pure numpy; plots with matplotlib's object API (no pyplot).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CONDITIONS",
    "FUSED",
    "MIN_SUBJECTS",
    "TIE_RULE",
    "ConditionMetrics",
    "ReidError",
    "bootstrap_weights",
    "cmc_curve",
    "cmc_figure",
    "condition_label",
    "cosine_similarity_matrix",
    "embedding_similarity",
    "evaluate_condition",
    "evaluate_similarity",
    "evaluate_study",
    "expected_ranks",
    "figure_png_bytes",
    "fuse_similarities",
    "genuine_impostor_scores",
    "hit_probability",
    "k_choice_accuracy",
    "match_ranks",
    "plot_cmc",
    "plot_roc",
    "plot_similarity_distributions",
    "rank_counts",
    "rank_k_accuracy",
    "roc_auc",
    "roc_curve",
    "summarise",
]

#: How ties are counted, in words (shown in reports next to the numbers).
TIE_RULE = ("Ties are broken at random and the expected value is reported: a probe whose own "
            "subject is tied with t others counts as identified at each tied rank with "
            "probability 1/(t+1); a tied genuine/impostor pair counts ½ in the AUC.")
#: Probe conditions of a study, in display order (reconstruction attacks add
#: ``attack_<name>`` conditions after them, see :func:`condition_label`).
CONDITIONS = ("control", "deidentified")
#: Name of the score-level fusion of all matchers in :func:`evaluate_study`.
FUSED = "fused"
#: Below this many subjects a study is flagged as too small to conclude anything.
MIN_SUBJECTS = 10


class ReidError(ValueError):
    """Inconsistent embeddings, scores or identities (shapes, missing or duplicate subjects)."""


# --------------------------------------------------------------------------- similarities


def cosine_similarity_matrix(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``(n_probes, n_gallery)`` cosine similarities between embedding rows."""
    p = np.atleast_2d(np.asarray(probes, dtype=float))
    g = np.atleast_2d(np.asarray(gallery, dtype=float))
    if p.shape[1] != g.shape[1]:
        raise ReidError(f"embedding sizes differ: probes {p.shape[1]}, gallery {g.shape[1]}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(g))):
        raise ReidError("embeddings must be finite and non-zero")
    pn, gn = np.linalg.norm(p, axis=1), np.linalg.norm(g, axis=1)
    if np.any(pn == 0) or np.any(gn == 0):
        raise ReidError("embeddings must be finite and non-zero")
    return (p / pn[:, None]) @ (g / gn[:, None]).T


def embedding_similarity(probes: np.ndarray, gallery: np.ndarray, *,
                         centre: bool = True) -> np.ndarray:
    """Cosine similarity of cohort-centred embeddings, ``(n_probes, n_gallery)``.

    Rows are first scaled to unit length. With ``centre`` (default), the mean
    of the probe set is subtracted from every probe and the mean of the
    gallery from every gallery entry before the cosine: what every face of a
    condition shares (the view, the lighting, the texture-less skin, or the
    missing soft tissue of every de-identified face) cancels, and only how a
    face differs from the others of its condition is compared. This uses the
    other subjects of the same set (as score normalisation does) and needs at
    least two probes and two gallery entries.
    """
    p = np.atleast_2d(np.asarray(probes, dtype=float))
    g = np.atleast_2d(np.asarray(gallery, dtype=float))
    p = p / _row_norms(p)
    g = g / _row_norms(g)
    if centre:
        if len(p) < 2 or len(g) < 2:
            raise ReidError("cohort centring needs at least two probes and two gallery entries")
        p = p - p.mean(axis=0)
        g = g - g.mean(axis=0)
        if np.any(np.linalg.norm(p, axis=1) < 1e-12) or np.any(np.linalg.norm(g, axis=1) < 1e-12):
            # a subject equal to the mean of its set (e.g. all identical): no information
            p = p + 1e-9
            g = g + 1e-9
    return cosine_similarity_matrix(p, g)


def _row_norms(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ReidError("embeddings must be a finite (n, d) array")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(n == 0):
        raise ReidError("embeddings must be finite and non-zero")
    return n


def fuse_similarities(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Score-level fusion: mean of the matrices after z-scoring each over all its entries.

    Each matcher's scores are put on a common scale (mean 0, standard
    deviation 1 over the probes × gallery matrix) so no matcher dominates by
    its units; a constant matrix contributes zeros.
    """
    if not matrices:
        raise ReidError("nothing to fuse")
    shape = np.shape(matrices[0])
    out = np.zeros(shape, dtype=float)
    for m in matrices:
        m = np.asarray(m, dtype=float)
        if m.shape != shape or not np.all(np.isfinite(m)):
            raise ReidError("fused similarity matrices must be finite and of one shape")
        sd = m.std()
        out += (m - m.mean()) / sd if sd > 0 else 0.0
    return out / len(matrices)


# --------------------------------------------------------------------------- ranks


def _genuine_index(probe_ids: Sequence[str], gallery_ids: Sequence[str]) -> np.ndarray:
    gallery_ids = [str(g) for g in gallery_ids]
    if len(set(gallery_ids)) != len(gallery_ids):
        raise ReidError("gallery identities must be unique (one entry per subject)")
    where = {g: i for i, g in enumerate(gallery_ids)}
    missing = [p for p in probe_ids if str(p) not in where]
    if missing:
        raise ReidError(f"{len(missing)} probe(s) have no gallery entry for their subject")
    return np.array([where[str(p)] for p in probe_ids], dtype=int)


def _check_similarity(similarity: np.ndarray, probe_ids: Sequence[str],
                      gallery_ids: Sequence[str]) -> np.ndarray:
    s = np.asarray(similarity, dtype=float)
    if s.shape != (len(probe_ids), len(gallery_ids)):
        raise ReidError(f"similarity shape {s.shape} does not match "
                        f"{len(probe_ids)} probes × {len(gallery_ids)} gallery entries")
    if not np.all(np.isfinite(s)):
        raise ReidError("similarities must be finite")
    return s


def rank_counts(similarity: np.ndarray, probe_ids: Sequence[str],
                gallery_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per probe: ``(better, ties)`` = other gallery entries strictly more / exactly as similar."""
    s = _check_similarity(similarity, probe_ids, gallery_ids)
    gi = _genuine_index(probe_ids, gallery_ids)
    rows = np.arange(len(gi))
    genuine = s[rows, gi]
    better = (s > genuine[:, None]).sum(axis=1)
    ties = (s == genuine[:, None]).sum(axis=1) - 1  # minus the genuine entry itself
    return better.astype(int), ties.astype(int)


def hit_probability(better: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """Per probe: probability that its own subject is within the top ``k`` (random tie-breaking)."""
    b = np.asarray(better, dtype=float)
    t = np.asarray(ties, dtype=float)
    return np.clip((k - b) / (t + 1.0), 0.0, 1.0)


def expected_ranks(better: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Expected 1-based rank of each probe's own subject: ``1 + better + ties / 2``."""
    return 1.0 + np.asarray(better, dtype=float) + 0.5 * np.asarray(ties, dtype=float)


def match_ranks(similarity: np.ndarray, probe_ids: Sequence[str],
                gallery_ids: Sequence[str]) -> np.ndarray:
    """Expected 1-based rank of each probe's own subject (:data:`TIE_RULE`)."""
    return expected_ranks(*rank_counts(similarity, probe_ids, gallery_ids))


def rank_k_accuracy(better: np.ndarray, ties: np.ndarray, k: int) -> float:
    """Fraction of probes identified within the top ``k`` (expected value, :data:`TIE_RULE`)."""
    if np.size(better) == 0:
        raise ReidError("no probes")
    return float(np.mean(hit_probability(better, ties, k)))


def k_choice_accuracy(better: Sequence[int], ties: Sequence[int], n_gallery: int, k: int) -> float:
    """Expected accuracy in a k-alternative forced choice (the human raters' task).

    For each probe: the probability that its own subject scores highest
    among itself and ``k − 1`` other gallery subjects drawn at random without
    replacement (ties broken at random, :data:`TIE_RULE`); averaged over
    probes. Chance is ``1 / k``. Needs ``2 <= k <= n_gallery``.
    """
    from math import comb

    if not 2 <= k <= n_gallery:
        raise ReidError(f"k must lie in 2..{n_gallery}, got {k}")
    m = n_gallery - 1
    draws = k - 1
    total = comb(m, draws)
    acc = []
    for b, t in zip(better, ties):
        b, t = int(b), int(t)
        w = m - b - t
        if w < 0:
            raise ReidError("rank counts exceed the gallery size")
        acc.append(sum(comb(t, j) * comb(w, draws - j) / (j + 1)
                       for j in range(0, min(t, draws) + 1)) / total)
    if not acc:
        raise ReidError("no probes")
    return float(np.mean(acc))


def cmc_curve(better: np.ndarray, ties: np.ndarray, n_gallery: int) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[k-1]`` = rank-k accuracy, k = 1..n_gallery."""
    b = np.asarray(better)
    if b.size == 0:
        raise ReidError("no probes")
    if b.min() < 0 or (b + np.asarray(ties)).max() > n_gallery - 1:
        raise ReidError("rank counts must lie in 0..n_gallery-1")
    return np.array([rank_k_accuracy(better, ties, k) for k in range(1, n_gallery + 1)])


def genuine_impostor_scores(similarity: np.ndarray, probe_ids: Sequence[str],
                            gallery_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(genuine (n_probes,), impostor (n_probes, n_gallery − 1))`` scores."""
    s = _check_similarity(similarity, probe_ids, gallery_ids)
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


def roc_curve(genuine: np.ndarray,
              impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` for "same subject if score ≥ threshold", descending thresholds.

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


# --------------------------------------------------------------------------- one condition


@dataclass
class ConditionMetrics:
    """Identification metrics of one probe condition against the gallery (fractions 0..1)."""

    n_probes: int
    n_gallery: int
    better: np.ndarray
    ties: np.ndarray
    cmc: np.ndarray
    rank1: float
    rank5: float
    auc: float
    genuine: np.ndarray
    impostor: np.ndarray
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def ranks(self) -> np.ndarray:
        """Expected rank of each probe (:data:`TIE_RULE`)."""
        return expected_ranks(self.better, self.ties)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: rank1/rank5/auc with ``*_ci95`` pairs, cmc, chance levels, score means."""
        out: dict[str, Any] = {
            "n_probes": self.n_probes,
            "n_gallery": self.n_gallery,
            "rank1": self.rank1,
            "rank5": self.rank5,
            "auc": self.auc,
            "chance_rank1": 1.0 / self.n_gallery,
            "chance_rank5": min(5, self.n_gallery) / self.n_gallery,
            "chance_auc": 0.5,
            "cmc": [float(v) for v in self.cmc],
            "genuine_mean": float(np.mean(self.genuine)),
            "impostor_mean": float(np.mean(self.impostor)),
            "expected_ranks": [float(r) for r in self.ranks],
            "better": [int(b) for b in self.better],
            "ties": [int(t) for t in self.ties],
        }
        for key, (lo, hi) in self.ci95.items():
            out[f"{key}_ci95"] = [lo, hi]
        return out

    def to_dict(self, name: str) -> dict[str, object]:
        """Flat dict: ``rank1_<name>``, ``rank1_<name>_ci95``, ... (the older flat format)."""
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


def evaluate_similarity(
    similarity: np.ndarray,
    probe_ids: Sequence[str],
    gallery_ids: Sequence[str],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> ConditionMetrics:
    """Rank-1/5, CMC, genuine/impostor scores, AUC and bootstrap CIs from a similarity matrix.

    ``similarity[p, g]`` compares probe ``p`` (subject ``probe_ids[p]``) with
    gallery entry ``g``; every probe's subject must be in the gallery once.
    CIs are percentile intervals over ``n_bootstrap`` resamples of the probe
    subjects with ``numpy.random.default_rng(seed)`` (``n_bootstrap=0``: none).
    """
    n_g = len(gallery_ids)
    if n_g < 2:
        raise ReidError("need at least two gallery subjects")
    if len(probe_ids) == 0:
        raise ReidError("no probes")
    better, ties = rank_counts(similarity, probe_ids, gallery_ids)
    genuine, impostor = genuine_impostor_scores(similarity, probe_ids, gallery_ids)
    wins = _pair_wins(genuine, impostor)  # (n, n)
    m = impostor.shape[1]
    n = len(better)
    hit1 = hit_probability(better, ties, 1)
    hit5 = hit_probability(better, ties, 5)
    metrics = ConditionMetrics(
        n_probes=n, n_gallery=n_g, better=better, ties=ties, cmc=cmc_curve(better, ties, n_g),
        rank1=float(hit1.mean()), rank5=float(hit5.mean()), auc=float(wins.sum() / (n * n * m)),
        genuine=genuine, impostor=impostor,
    )
    if n_bootstrap > 0:
        w = bootstrap_weights(n, n_bootstrap, seed)  # (B, n)
        r1 = w @ hit1 / n
        r5 = w @ hit5 / n
        # AUC of a resample: Σ_a Σ_b w_a w_b U[a, b] / (Σ w_a · Σ w_b · m)
        aucs = ((w @ wins) * w).sum(axis=1) / (n * n * m)
        alpha = (1.0 - confidence) / 2.0

        def pct(x: np.ndarray) -> tuple[float, float]:
            lo, hi = np.quantile(x, [alpha, 1.0 - alpha])
            return float(lo), float(hi)

        metrics.ci95 = {"rank1": pct(r1), "rank5": pct(r5), "auc": pct(aucs)}
    return metrics


def evaluate_condition(
    probes: np.ndarray,
    gallery: np.ndarray,
    probe_ids: Sequence[str],
    gallery_ids: Sequence[str],
    *,
    centre: bool = False,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> ConditionMetrics:
    """:func:`evaluate_similarity` of embeddings compared by cosine similarity.

    ``centre=True`` uses :func:`embedding_similarity` (cohort-centred cosine).
    """
    if len(probes) != len(probe_ids) or len(gallery) != len(gallery_ids):
        raise ReidError("each embedding needs exactly one subject id")
    sim = (embedding_similarity(probes, gallery) if centre
           else cosine_similarity_matrix(probes, gallery))
    return evaluate_similarity(sim, probe_ids, gallery_ids, n_bootstrap=n_bootstrap, seed=seed,
                               confidence=confidence)


def bootstrap_weights(n_subjects: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """``(n_bootstrap, n_subjects)`` multiplicities of each subject in each resample (seeded).

    Row ``b`` counts how often each subject is drawn in resample ``b`` of
    ``n_subjects`` draws with replacement (``numpy.random.default_rng(seed)``).
    """
    rng = np.random.default_rng(seed)
    p = np.full(n_subjects, 1.0 / n_subjects)
    return rng.multinomial(n_subjects, p, size=n_bootstrap).astype(float)


def summarise(conditions: Mapping[str, ConditionMetrics]) -> dict[str, object]:
    """Merge :meth:`ConditionMetrics.to_dict` of every named condition into one flat dict."""
    out: dict[str, object] = {}
    for name, met in conditions.items():
        out.update(met.to_dict(name))
    return out


# --------------------------------------------------------------------------- a whole study


def evaluate_study(
    similarities: Mapping[str, Mapping[str, np.ndarray]],
    subject_ids: Sequence[str],
    *,
    labels: Mapping[str, str] | None = None,
    fuse: bool = True,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every matcher (and their fusion) under every condition, as one JSON-ready dict.

    ``similarities[matcher][condition]`` is the ``(n, n)`` matrix of probes ×
    gallery, both in ``subject_ids`` order. With two or more matchers and
    ``fuse``, a ``"fused"`` matcher (:func:`fuse_similarities`) is added and is
    the ``primary`` one; otherwise the first matcher is. Returns::

        {"n_subjects", "subjects", "tie_rule", "min_subjects", "small_cohort",
         "chance": {"rank1", "rank5", "auc"}, "conditions", "primary",
         "matchers": {name: {"label", "<condition>": ConditionMetrics.as_dict()}}}
    """
    ids = [str(s) for s in subject_ids]
    n = len(ids)
    if n < 2:
        raise ReidError("re-identification needs at least two subjects")
    if not similarities:
        raise ReidError("no matcher")
    conditions = [c for c in CONDITIONS if all(c in m for m in similarities.values())]
    conditions += sorted({c for m in similarities.values() for c in m} - set(conditions)
                         - {c for c in CONDITIONS})
    if not conditions or any(set(m) != set(conditions) for m in similarities.values()):
        raise ReidError("every matcher needs the same probe conditions")
    mats = {name: dict(conds) for name, conds in similarities.items()}
    labels = dict(labels or {})
    if fuse and len(mats) > 1:
        if FUSED in mats:
            raise ReidError(f"{FUSED!r} is reserved for the fusion")
        mats[FUSED] = {c: fuse_similarities([m[c] for m in similarities.values()])
                       for c in conditions}
        labels.setdefault(FUSED, "fused (mean of z-scored " + " + ".join(similarities) + ")")
        primary = FUSED
    else:
        primary = next(iter(mats))
    out_matchers: dict[str, Any] = {}
    for name, conds in mats.items():
        entry: dict[str, Any] = {"label": labels.get(name, name)}
        for c in conditions:
            entry[c] = evaluate_similarity(conds[c], ids, ids, n_bootstrap=n_bootstrap,
                                           seed=seed).as_dict()
        out_matchers[name] = entry
    return {
        "n_subjects": n,
        "subjects": ids,
        "tie_rule": TIE_RULE,
        "min_subjects": MIN_SUBJECTS,
        "small_cohort": n < MIN_SUBJECTS,
        "chance": {"rank1": 1.0 / n, "rank5": min(5, n) / n, "auc": 0.5},
        "conditions": conditions,
        "primary": primary,
        "bootstrap_resamples": n_bootstrap,
        "bootstrap_seed": seed,
        "matchers": out_matchers,
    }


# --------------------------------------------------------------------------- plots

_CONDITION_STYLE = {"control": ("C0", "-", "control (original)"),
                    "deidentified": ("C3", "-", "de-identified"),
                    "attack_tissue_depth": ("C2", "--", "de-identified + tissue-depth reconstruction"),
                    "attack_learned": ("C1", "-.", "de-identified + learned reconstruction")}


def condition_label(condition: str) -> str:
    """Words for a probe condition (plots, reports): ``attack_<name>`` conditions are
    "de-identified + <name> reconstruction"."""
    if condition in _CONDITION_STYLE:
        return _CONDITION_STYLE[condition][2]
    if condition.startswith("attack_"):
        return f"de-identified + {condition[len('attack_'):].replace('_', '-')} reconstruction"
    return condition


def _figure(width_in: float = 5.0, height_in: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    return paths


def figure_png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _integer_rank_axis(ax: Any, n: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0.8, n + 0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n, 10), min_n_ticks=1))


def cmc_figure(study: Mapping[str, Any], matcher: str | None = None, *, width_in: float = 5.0,
               height_in: float = 3.6) -> Any:
    """CMC of one matcher (default: the study's primary) for every condition, with chance.

    ``study`` is an :func:`evaluate_study` dict. Ranks on the x axis are
    integers 1..n; the legend gives rank-1 with its 95 % CI.
    """
    name = matcher or study["primary"]
    entry = study["matchers"][name]
    fig, ax = _figure(width_in, height_in)
    n = int(study["n_subjects"])
    k = np.arange(1, n + 1)
    for i, cond in enumerate(study["conditions"]):
        met = entry[cond]
        colour, style, label = _CONDITION_STYLE.get(cond, (f"C{i + 4}", "-", condition_label(cond)))
        ci = met.get("rank1_ci95")
        ci_txt = f", 95% CI {ci[0]:.2f}–{ci[1]:.2f}" if ci else ""
        ax.step(k, met["cmc"], where="post", color=colour, linestyle=style, marker="o",
                markersize=3, label=f"{label}: rank-1 {met['rank1']:.2f}{ci_txt}")
    ax.plot(k, k / n, color="grey", linestyle=":", linewidth=1.0, label="chance (k/n)")
    _integer_rank_axis(ax, n)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank k")
    ax.set_ylabel("identified within the top k")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"CMC — {entry.get('label', name)} (n = {n})", fontsize=9)
    return fig


def plot_cmc(study: Mapping[str, Any], stem: str | Path, matcher: str | None = None) -> list[Path]:
    """:func:`cmc_figure` written as ``stem.png`` and ``stem.svg``."""
    return _save(cmc_figure(study, matcher), Path(stem))


def plot_similarity_distributions(conditions: Mapping[str, ConditionMetrics],
                                  stem: str | Path, xlabel: str = "similarity to gallery"
                                  ) -> list[Path]:
    """Histograms of genuine and impostor scores per condition (PNG + SVG)."""
    fig, ax = _figure(5.5, 3.6)
    all_scores = np.concatenate([np.concatenate([m.genuine, m.impostor.ravel()])
                                 for m in conditions.values()])
    lo, hi = float(all_scores.min()), float(all_scores.max())
    pad = max(1e-3, 0.02 * (hi - lo))
    bins = np.linspace(lo - pad, hi + pad, 50)
    for idx, (name, met) in enumerate(conditions.items()):
        colour = _CONDITION_STYLE.get(name, (f"C{idx + 4}",))[0]
        ax.hist(met.genuine, bins=bins, density=True, histtype="stepfilled", alpha=0.35,
                color=colour, label=f"{condition_label(name)}: genuine")
        ax.hist(met.impostor.ravel(), bins=bins, density=True, histtype="step", color=colour,
                linestyle="--", label=f"{condition_label(name)}: impostor")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("Genuine vs impostor scores")
    return _save(fig, Path(stem))


def plot_roc(conditions: Mapping[str, ConditionMetrics], stem: str | Path) -> list[Path]:
    """ROC curves (genuine vs impostor scores) per condition (PNG + SVG)."""
    fig, ax = _figure(4.2, 4.0)
    for idx, (name, met) in enumerate(conditions.items()):
        fpr, tpr, _t = roc_curve(met.genuine, met.impostor)
        colour, style = _CONDITION_STYLE.get(name, (f"C{idx + 4}", "-"))[:2]
        ax.plot(fpr, tpr, color=colour, linestyle=style,
                label=f"{condition_label(name)} (AUC {met.auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xlabel("false match rate")
    ax.set_ylabel("true match rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("ROC: same subject vs different subject")
    return _save(fig, Path(stem))
