"""The "Automated re-identification" section of a study report (page and PDF).

:func:`automated_reid` is the one place the report reads automated re-identification
figures from: the cohort's stored :class:`surveys.models.ReidSummary` (computed by
:func:`surveys.processing.reid.update_cohort_reid` with :mod:`pipeline.reid`: rank-1/5 and AUC with
confidence intervals per matcher, control and de-identified probes), with the raters'
accuracy beside the matchers' in the same task. The page and the PDF print every row.
"""

from __future__ import annotations

from typing import Any

from ..models import ReidSummary
from ..processing.reid import human_vs_automated, reid_table

__all__ = ["automated_reid"]


def automated_reid(cohort, analysis: dict[str, Any] | None = None,
                   n_choices: int | None = None) -> dict[str, Any]:
    """Automated re-identification figures of ``cohort`` for the report.

    Returns ``{"available": bool, "note": str, "n_subjects": int | None,
    "rows": [{"measure", "matcher", "value", "ci_low", "ci_high", "chance", "unit"}],
    "cmc": [float] | None, "metrics": dict | None}`` plus, for the page,
    ``reid_table`` / ``reid_compare`` / ``reid_plot_url`` (:mod:`surveys.processing.reid`). Rows come
    from the cohort's :func:`pipeline.reid.evaluate_study` result (rank-1, rank-5 and AUC
    with 95 % CIs per matcher, control and de-identified probes) and, with the raters'
    ``analysis`` and the study's ``n_choices``, the raters' accuracy beside each matcher's
    in the same k-choice task. ``unit`` is ``"rate"`` (a proportion, printed as percent)
    or ``"auc"``; ``value``/``ci_*``/``chance`` may be None. Pseudonym-free by construction.
    """
    from django.urls import reverse

    summary = ReidSummary.objects.filter(cohort=cohort).first()
    metrics = getattr(summary, "metrics", None) if summary is not None else None
    table = reid_table(metrics) if metrics else None
    if table is None:
        return {"available": False, "n_subjects": None, "rows": [], "cmc": None, "metrics": None,
                "reid_table": None, "reid_compare": [], "reid_plot_url": None,
                "note": "No automated re-identification yet: it is computed when every "
                        "subject of the cohort has its features."}
    n = table["n"]
    rows: list[dict[str, Any]] = []
    compare = human_vs_automated(analysis, metrics, n_choices) if n_choices else []
    for c in compare:
        if c["human_accuracy"] is not None:
            rows.append({"measure": f"{n_choices}-choice accuracy, {c['condition_label']}",
                         "matcher": "raters", "value": c["human_accuracy"],
                         "ci_low": c["human_lo"], "ci_high": c["human_hi"], "chance": c["chance"]})
        for a in c["automated"]:
            if a["k_choice"] is not None:
                rows.append({"measure": f"{n_choices}-choice accuracy, {c['condition_label']}",
                             "matcher": a["matcher"], "value": a["k_choice"], "ci_low": None,
                             "ci_high": None, "chance": c["chance"]})
    for r in table["rows"]:
        for key, label, unit in (("rank1", "rank-1", "rate"), ("rank5", "rank-5", "rate"),
                                 ("auc", "AUC", "auc")):
            rows.append({"measure": f"{label}, {r['condition_label']} (n = {r['n']})",
                         "matcher": r["matcher"], "value": r[key], "ci_low": r[f"{key}_lo"],
                         "ci_high": r[f"{key}_hi"], "chance": table["chance"][key],
                         "unit": unit})
    note = (f"{n} subjects; gallery: a simulated second scan of each original; probes: the "
            "untouched original (control: can the instrument re-identify a face at all?) and the "
            f"de-identified scan. {table['tie_rule']}")
    if table["small_cohort"]:
        note += f" Fewer than {table['min_subjects']} subjects: these rates say little."
    return {"available": True, "n_subjects": n, "rows": rows, "cmc": list(summary.cmc or []),
            "metrics": metrics, "note": note, "reid_table": table, "reid_compare": compare,
            "reid_plot_url": reverse("surveys:reid_plot", args=[cohort.pk])}
