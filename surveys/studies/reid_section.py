"""The "Automated re-identification" section of a study report (page and PDF).

:func:`automated_reid` is the one place the report reads automated re-identification
figures from. Today it reads the cohort's stored summary (:class:`surveys.models.
ReidSummary`, computed by :func:`surveys.reid.update_cohort_reid`: rank-1 and AUC of
de-identified probes against the original gallery, and the CMC curve). Richer figures
(rank-1/5 and AUC with confidence intervals per matcher, from ``pipeline/reid.py``) plug
in by returning more ``rows``: the page and the PDF print every row as given.
"""

from __future__ import annotations

from typing import Any

__all__ = ["automated_reid"]


def automated_reid(cohort) -> dict[str, Any]:
    """Automated re-identification figures of ``cohort`` for the report.

    Returns ``{"available": bool, "note": str, "n_subjects": int | None,
    "rows": [{"measure", "matcher", "value", "ci_low", "ci_high", "chance", "unit"}],
    "cmc": [float] | None}``. ``unit`` is ``"rate"`` (a proportion, printed as percent) or
    ``"auc"`` (printed as a number); ``value``/``ci_*``/``chance`` may be None; ``matcher``
    names the face matcher. Pseudonym-free by construction.
    """
    from ..models import ReidSummary

    summary = ReidSummary.objects.filter(cohort=cohort).first()
    if summary is None or summary.rank1 is None:
        return {"available": False, "n_subjects": None, "rows": [], "cmc": None,
                "note": "No automated re-identification yet: it is computed when every "
                        "subject of the cohort has its embeddings."}
    n = summary.n_subjects
    matcher = "dlib ResNet face descriptor (cosine similarity)"
    rows = [
        {"measure": "rank-1 identification rate (de-identified vs original)",
         "matcher": matcher, "value": summary.rank1, "ci_low": None, "ci_high": None,
         "chance": 1.0 / n if n else None},
    ]
    if summary.cmc and len(summary.cmc) >= 5:
        rows.append({"measure": "rank-5 identification rate (de-identified vs original)",
                     "matcher": matcher, "value": summary.cmc[4], "ci_low": None,
                     "ci_high": None, "chance": min(1.0, 5.0 / n) if n else None})
    if summary.auc is not None:
        rows.append({"measure": "AUC (genuine vs impostor similarity)", "matcher": matcher,
                     "value": summary.auc, "ci_low": None, "ci_high": None, "chance": 0.5,
                     "unit": "auc"})
    if summary.baseline_rank1 is not None:
        rows.append({"measure": "rank-1, original vs original (sanity check)",
                     "matcher": matcher, "value": summary.baseline_rank1, "ci_low": None,
                     "ci_high": None, "chance": 1.0 / n if n else None})
    return {"available": True, "n_subjects": n, "rows": rows, "cmc": list(summary.cmc or []),
            "note": f"{n} subjects; each de-identified frontal render is matched against the "
                    f"original renders of all {n} (computed "
                    f"{summary.computed:%Y-%m-%d %H:%M} UTC)."}
