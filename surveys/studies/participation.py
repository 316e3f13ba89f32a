"""Who took part, who dropped out where, and who is excluded from the analysis.

Recruitment funnel per group (:func:`progress`): a rater who opened an invitation and
pressed *Start* is *enrolled*; then *consented* or *declined*; *started* = answered at
least one trial; *finished* = answered every trial. Raters who stopped at the
questionnaire or the instructions are enrolled and consented but not started.

Exclusions (:func:`exclusions`) come from two sources, reported separately:

* the study's rule, declared with the design and frozen with it (part of the
  pre-registration hash): fewer than ``exclusion_min_catch`` of the rater's answered catch
  trials passed, and, when ``exclude_incomplete`` is set, not finished;
* raters the researcher excluded by hand on the study page, with a reason (after the
  freeze, so *not* pre-registered: the report says so).

A researcher's preview (``is_preview``) is never counted anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db.models import Count

from ..models import Answer, Rater, Study

__all__ = ["attention", "exclusion_rule_text", "exclusions", "funnel_totals", "progress"]


def exclusion_rule_text(study: Study) -> str:
    """The pre-registered exclusion rule in words."""
    parts = []
    if study.exclusion_min_catch is not None and study.n_catch:
        parts.append(f"raters who pass fewer than {100 * study.exclusion_min_catch:.0f} % of "
                     f"their answered attention-check (catch) trials")
    if study.exclude_incomplete:
        parts.append("raters who did not answer every trial")
    if not parts:
        return "No exclusion rule: every rater is analysed."
    return "Excluded: " + "; ".join(parts) + "."


def attention(study: Study) -> list[dict[str, Any]]:
    """Per rater (code, group): catch trials answered and passed, timed-out and
    response-time-suspect answers; ``flag`` when a catch trial was failed."""
    out: dict[str, dict[str, Any]] = {}
    qs = (Answer.objects.filter(trial__rater__study=study, trial__rater__is_preview=False)
          .select_related("trial__rater").order_by("trial__rater__index"))
    for a in qs:
        r = a.trial.rater
        d = out.setdefault(r.code, {"rater_id": r.code, "rater_group": r.group, "catch_n": 0,
                                    "catch_correct": 0, "timed_out": 0, "rt_suspect": 0,
                                    "finished": r.finished is not None})
        if a.trial.kind == "catch":
            d["catch_n"] += 1
            d["catch_correct"] += int(a.correct)
        d["timed_out"] += int(a.timed_out)
        d["rt_suspect"] += int(a.rt_suspect)
    for d in out.values():
        d["flag"] = d["catch_correct"] < d["catch_n"]
    return list(out.values())


def exclusions(study: Study) -> dict[str, dict[str, Any]]:
    """Rater code → ``{rule: bool, manual: bool, reasons: [...], group}`` for every excluded
    rater (raters not excluded are absent)."""
    out: dict[str, dict[str, Any]] = {}
    att = {a["rater_id"]: a for a in attention(study)}
    for r in Rater.objects.filter(study=study, is_preview=False).order_by("index"):
        reasons, rule, manual = [], False, False
        a = att.get(r.code)
        if (study.exclusion_min_catch is not None and a and a["catch_n"]
                and a["catch_correct"] / a["catch_n"] < study.exclusion_min_catch):
            rule = True
            reasons.append(f"passed {a['catch_correct']} of {a['catch_n']} catch trials "
                           f"(rule: at least {100 * study.exclusion_min_catch:.0f} %)")
        if study.exclude_incomplete and r.trials_started and r.finished is None:
            rule = True
            reasons.append("did not finish (rule)")
        if r.excluded_at is not None:
            manual = True
            reasons.append("excluded by the researcher (not pre-registered): "
                           + (r.excluded_reason or "no reason given"))
        if reasons:
            out[r.code] = {"rater_id": r.code, "group": r.group, "rule": rule,
                           "manual": manual, "reasons": reasons}
    return out


def progress(study: Study) -> list[dict[str, Any]]:
    """Per group: the recruitment funnel (enrolled, consented, declined, started, finished,
    stopped early, excluded), group mismatches, and answered / planned trials of the raters
    who started."""
    raters = Rater.objects.filter(study=study, is_preview=False)
    groups = study.groups + sorted(set(raters.values_list("group", flat=True)) - set(study.groups))
    excluded = exclusions(study)
    answered = dict(raters.annotate(n=Count("trials__answer")).values_list("pk", "n"))
    planned = dict(raters.annotate(n=Count("trials")).values_list("pk", "n"))
    by_group: dict[str, list[Rater]] = defaultdict(list)
    for r in raters.select_related("study"):
        by_group[r.group].append(r)
    out = []
    for g in groups:
        rs = by_group.get(g, [])
        started = [r for r in rs if answered.get(r.pk)]
        n_ans = sum(answered.get(r.pk, 0) for r in started)
        n_plan = sum(planned.get(r.pk, 0) for r in started)
        finished = sum(1 for r in rs if r.finished is not None)
        out.append({
            "group": g, "enrolled": len(rs),
            "consented": sum(1 for r in rs if r.consented_at is not None),
            "declined": sum(1 for r in rs if r.declined_at is not None),
            "started": len(started), "finished": finished,
            "stopped": len(started) - finished,
            "excluded": sum(1 for r in rs if r.code in excluded),
            "mismatch": sum(1 for r in rs if r.group_mismatch),
            "answered": n_ans, "planned": n_plan,
            "percent": round(100.0 * n_ans / n_plan, 1) if n_plan else 0.0,
            # kept for older templates/tests: raters = enrolled
            "raters": len(rs),
        })
    return out


def funnel_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Sum of the :func:`progress` counts over the groups."""
    keys = ("enrolled", "consented", "declined", "started", "finished", "stopped", "excluded",
            "mismatch", "answered", "planned")
    return {k: sum(r[k] for r in rows) for k in keys}

