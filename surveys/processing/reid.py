"""Cohort-level automated re-identification summary (thin layer over :mod:`pipeline.reid`).

Every subject's features come from the embeddings stage
(:func:`pipeline.reid_features.subject_features`, stored as JSON on the
subject); when every subject of a cohort has them, :func:`update_cohort_reid`
evaluates the cohort with :func:`pipeline.reid.evaluate_study` — the same
code as ``manage.py reid_eval`` — and stores the result and its CMC plot.
:func:`reid_table` turns a stored result into rows for the templates
(``surveys/_reid_summary.html``, used by the cohort page and the study report).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from django.utils import timezone

from pipeline.atomic import atomic_write_bytes
from pipeline.reid import cmc_figure, evaluate_study, figure_png_bytes, k_choice_accuracy
from pipeline.reid import condition_label as words

from ..models import Cohort, ReidSummary
from ..storage.mirror import push_file
from ..storage.paths import cohort_derived_file, data_path

CONDITION_LABELS = {"control": "control (original, other view)",
                    "deidentified": "de-identified"}


def condition_label(condition: str) -> str:
    """Words for a probe condition; reconstruction attacks are "de-identified + … reconstruction"."""
    return CONDITION_LABELS.get(condition) or words(condition)


def compute_cohort_study(cohort: Cohort, n_bootstrap: int = 2000) -> dict[str, Any] | None:
    """:func:`pipeline.reid.evaluate_study` of the cohort, or None until every subject
    (at least two) has its re-identification features."""
    # loaded on first use: pulls in trimesh
    from pipeline.reid_features import (
        MATCHERS,
        ReidProtocol,
        features_from_json,
        study_similarities,
    )

    subjects = list(cohort.subjects.order_by("pseudonym"))
    if len(subjects) < 2 or any(not s.reid_features for s in subjects):
        return None
    feats = [features_from_json(s.reid_features, s.pseudonym) for s in subjects]
    study = evaluate_study(study_similarities(feats), [s.pseudonym for s in subjects],
                           labels=MATCHERS, n_bootstrap=n_bootstrap)
    study["protocol"] = ReidProtocol().as_dict()  # the stages use the default protocol
    return study


def cmc_plot_png(study: dict[str, Any], matcher: str | None = None) -> bytes:
    """PNG of :func:`pipeline.reid.cmc_figure` (both conditions, chance, integer ranks)."""
    return figure_png_bytes(cmc_figure(study, matcher))


def update_cohort_reid(cohort: Cohort) -> ReidSummary | None:
    """Recompute the cohort summary when every subject has its features (else None)."""
    study = compute_cohort_study(cohort)
    if study is None:
        return None
    primary = study["matchers"][study["primary"]]
    rel = cohort_derived_file(cohort.pk, "reid-cmc.png")
    atomic_write_bytes(data_path(rel), cmc_plot_png(study))
    push_file(rel)
    summary, _ = ReidSummary.objects.update_or_create(cohort=cohort, defaults={
        "n_subjects": study["n_subjects"], "rank1": primary["deidentified"]["rank1"],
        "auc": primary["deidentified"]["auc"], "cmc": primary["deidentified"]["cmc"],
        "baseline_rank1": primary["control"]["rank1"], "metrics": _plain(study),
        "plot_path": rel, "computed": timezone.now()})
    return summary


def reid_table(study: dict[str, Any] | None) -> dict[str, Any] | None:
    """Template context of a stored :func:`pipeline.reid.evaluate_study` result.

    ``rows``: one per matcher and condition with the rates, their 95 % CIs
    and n; plus ``chance``, ``n``, ``small_cohort``, ``min_subjects``,
    ``tie_rule`` and the primary matcher's de-identified and control rank-1.
    With reconstruction attacks (conditions ``attack_<name>``), ``side_by_side``
    has one row per matcher with the de-identified probe's rank-1 and AUC (with
    CIs) beside each "de-identified + reconstruction" probe's
    (``side_by_side_labels`` are the column titles), and ``rank1_attacks`` the
    primary matcher's rank-1 of each attack.
    """
    if not study or "matchers" not in study:
        return None
    rows = []
    for name, entry in study["matchers"].items():
        for cond in study["conditions"]:
            m = entry[cond]
            row = {"matcher": name, "label": entry.get("label", name), "condition": cond,
                   "condition_label": condition_label(cond), "n": m["n_probes"],
                   "primary": name == study["primary"]}
            for key in ("rank1", "rank5", "auc"):
                lo, hi = m.get(f"{key}_ci95") or (None, None)
                row[key], row[f"{key}_lo"], row[f"{key}_hi"] = m[key], lo, hi
            rows.append(row)
    primary = study["matchers"][study["primary"]]
    protocol = study.get("protocol") or {}
    attacks = [c for c in study["conditions"] if c.startswith("attack_")]
    side = []
    if attacks and "deidentified" in study["conditions"]:
        for name, entry in study["matchers"].items():
            cells = []
            for cond in ["deidentified", *attacks]:
                m = entry[cond]
                lo, hi = m.get("rank1_ci95") or (None, None)
                alo, ahi = m.get("auc_ci95") or (None, None)
                cells.append({"condition": cond, "rank1": m["rank1"], "rank1_lo": lo,
                              "rank1_hi": hi, "auc": m["auc"], "auc_lo": alo, "auc_hi": ahi})
            side.append({"matcher": name, "label": entry.get("label", name),
                         "primary": name == study["primary"], "cells": cells})
    return {"rows": rows, "chance": study["chance"], "n": study["n_subjects"],
            "side_by_side": side,
            "side_by_side_labels": [condition_label(c) for c in ["deidentified", *attacks]]
            if side else [],
            "rank1_attacks": [{"condition": c, "label": condition_label(c),
                               "rank1": primary[c]["rank1"]} for c in attacks],
            "gallery_yaw": protocol.get("gallery_yaw_deg"),
            "probe_yaw": protocol.get("probe_yaw_deg"),
            "small_cohort": study["small_cohort"], "min_subjects": study["min_subjects"],
            "tie_rule": study["tie_rule"], "primary": study["primary"],
            "rank1_deidentified": primary.get("deidentified", {}).get("rank1"),
            "rank1_control": primary.get("control", {}).get("rank1")}


def human_vs_automated(analysis: dict[str, Any] | None, study: dict[str, Any] | None,
                       n_choices: int) -> list[dict[str, Any]]:
    """Per condition: the raters' pooled accuracy beside the automated matchers' accuracy in
    the same ``n_choices``-alternative task (:func:`pipeline.reid.k_choice_accuracy`) and
    their rank-1 among all subjects. Empty when there is no automated result."""
    if not study or "matchers" not in study:
        return []
    pooled = ((analysis or {}).get("groups") or {}).get("all") or {}
    rows = []
    for cond in study["conditions"]:
        human = pooled.get(cond) or {}
        row: dict[str, Any] = {
            "condition": cond, "condition_label": condition_label(cond),
            "human_n": human.get("n"), "human_accuracy": human.get("accuracy"),
            "human_lo": human.get("ci_low"), "human_hi": human.get("ci_high"),
            "chance": 1.0 / n_choices, "automated": []}
        for name, entry in study["matchers"].items():
            m = entry[cond]
            k_ok = 2 <= n_choices <= m["n_gallery"] and "better" in m
            row["automated"].append({
                "matcher": name, "primary": name == study["primary"],
                "k_choice": (k_choice_accuracy(m["better"], m["ties"], m["n_gallery"],
                                               n_choices) if k_ok else None),
                "rank1": m["rank1"], "n": m["n_probes"]})
        rows.append(row)
    return rows


def _plain(o: Any) -> Any:
    """JSON-safe copy (numpy scalars to Python numbers)."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o
