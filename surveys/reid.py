"""Cohort-level automated re-identification summary (de-identified probes vs original gallery).

Each subject contributes the embedding of its original frontal render (gallery) and of
its de-identified frontal render (probe). With the cosine-similarity matrix
``S[p, g]``, the rank of a probe is ``1 + #{g ≠ p : S[p, g] > S[p, p]}`` (ties count half);
``cmc[r]`` is the fraction of probes with rank ≤ r + 1 and ``rank1 = cmc[0]``. The AUC
is the probability that a genuine score ``S[p, p]`` exceeds an impostor score
``S[p, g≠p]`` (Mann–Whitney, ties ½). Chance level: rank-1 = 1/n, AUC = 0.5.
"""

from __future__ import annotations

import io

import numpy as np
from django.utils import timezone

from .models import Cohort, ReidSummary
from .shared import push_file


def reid_metrics(probes: np.ndarray, gallery: np.ndarray) -> dict[str, object]:
    """Rank-1, CMC and AUC of probe ``p`` against gallery row ``p`` (same subject order).

    ``probes`` and ``gallery`` are ``(n, d)`` embedding matrices (unitless); needs n ≥ 2.
    """
    from pipeline.embed import cosine_similarity_matrix

    p, g = np.asarray(probes, float), np.asarray(gallery, float)
    if p.shape != g.shape or p.ndim != 2 or p.shape[0] < 2:
        raise ValueError("need two (n, d) embedding matrices of the same shape with n >= 2")
    s = cosine_similarity_matrix(p, g)
    n = s.shape[0]
    genuine = np.diag(s)
    off = ~np.eye(n, dtype=bool)
    greater = ((s > genuine[:, None]) & off).sum(axis=1)
    ties = ((s == genuine[:, None]) & off).sum(axis=1)
    ranks = 1 + greater + 0.5 * ties
    cmc = [float(np.mean(ranks <= r)) for r in range(1, n + 1)]
    impostor = s[off]
    gt = (genuine[:, None] > impostor[None, :]).mean()
    eq = (genuine[:, None] == impostor[None, :]).mean()
    return {"n": n, "rank1": cmc[0], "cmc": cmc, "auc": float(gt + 0.5 * eq),
            "ranks": ranks.tolist()}


def cmc_plot_png(cmc: list[float]) -> bytes:
    """PNG of a CMC curve (rank on x, identification rate on y) with the chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cmc)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ranks = np.arange(1, n + 1)
    ax.step(ranks, cmc, where="post", label="de-identified vs original")
    ax.plot(ranks, ranks / n, "--", color="grey", label="chance")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def update_cohort_reid(cohort: Cohort) -> ReidSummary | None:
    """Recompute the cohort summary when every subject has both embeddings (else None)."""
    from .stages import atomic_write_bytes, data_path

    subjects = list(cohort.subjects.order_by("pseudonym"))
    if len(subjects) < 2 or any(s.embedding_original is None or s.embedding_deid is None
                                for s in subjects):
        return None
    m = reid_metrics(np.array([s.embedding_deid for s in subjects]),
                     np.array([s.embedding_original for s in subjects]))
    rel = f"{cohort.storage_dir()}/derived/reid-cmc.png"
    atomic_write_bytes(data_path(rel), cmc_plot_png(m["cmc"]))
    push_file(rel)
    summary, _ = ReidSummary.objects.update_or_create(cohort=cohort, defaults={
        "n_subjects": m["n"], "rank1": m["rank1"], "auc": m["auc"], "cmc": m["cmc"],
        "plot_path": rel, "computed": timezone.now()})
    return summary
