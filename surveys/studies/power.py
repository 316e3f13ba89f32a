"""Simulation-based power and precision of a study design, for the pre-registered analysis.

Before recruiting, a researcher wants to know whether the planned raters suffice. For
the study's own design (subjects, k, conditions, views, trials per rater, practice and
catch trials, between/within design with its counterbalancing — the very
:func:`~surveys.studies.design.plan_trials` the raters will get) this module simulates
whole studies and analyses each exactly as the report does
(:func:`pipeline.stats.fit_mixed_model`, Wilson intervals):

* each simulated answer is correct with probability
  ``logistic(logit(p[group, condition]) + u_rater + v_subject)``, with random intercepts
  ``u ~ N(0, rater_sd²)`` and ``v ~ N(0, subject_sd²)`` (log-odds);
* ``p`` comes from the expected accuracies: by default the paper's 84 % (control) and
  55 % (de-identified) for the reference group, and ``group_difference`` (accuracy
  points, default +0.10) added to both conditions for every other group;
* outputs: the expected Wilson 95 % half-width of every group × condition cell, the power
  of the condition effect, of the group effect and of the interaction (Wald p < alpha,
  two-sided, in the mixed model), each with its Monte-Carlo standard error, and — by
  re-running the simulation with more raters — the raters per group needed to reach the
  target power for the group effect and for the condition effect.

Runs as an RQ job (:func:`run_estimate`) because hundreds of model fits take a minute;
the number of simulations and a time budget bound it. Nothing here stores identifiers.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from pipeline.stats import fit_mixed_model, wilson_ci

from ..models import JobStatus, PowerEstimate
from .design import plan_trials, reserve_practice_subjects
from .service import eligible_subjects

log = logging.getLogger(__name__)

__all__ = ["DEFAULTS", "design_of", "estimate", "raters_needed", "run_estimate",
           "simulate_power"]

#: Expected rates and settings used when the researcher gives none (paper: 84 % → 55 %).
DEFAULTS: dict[str, Any] = {
    "p_control": 0.84, "p_deidentified": 0.55, "group_difference": 0.10,
    "rater_sd": 0.5, "subject_sd": 0.5, "alpha": 0.05, "target_power": 0.8,
    "n_sim": 200, "n_sim_search": 60, "max_seconds": 300.0, "raters_per_group": 20,
}
_SEARCH_GRID = (4, 6, 8, 10, 12, 16, 20, 24, 30, 40, 50, 60, 80, 100, 120, 160, 200)


def design_of(study) -> dict[str, Any]:
    """The design parameters of a :class:`~surveys.models.Study` that the simulation uses."""
    subjects = eligible_subjects(study)
    return {"n_subjects": len(subjects), "conditions": list(study.conditions),
            "views": list(study.views), "n_choices": study.n_choices,
            "trials_per_rater": study.trials_per_rater, "n_practice": study.n_practice,
            "n_catch": study.n_catch, "design": study.design, "seed": int(study.seed),
            "groups": list(study.groups)}


def _probabilities(design: dict, params: dict) -> dict[tuple[str, str], float]:
    groups = design["groups"]
    base = {"control": params["p_control"], "deidentified": params["p_deidentified"]}
    out = {}
    for gi, g in enumerate(groups):
        for c in design["conditions"]:
            p = base.get(c, params["p_deidentified"]) + (params["group_difference"] if gi else 0)
            out[(g, c)] = min(0.999, max(1e-3, p))
    return out


def _simulate_rows(design: dict, params: dict, raters_per_group: int,
                   rng: np.random.Generator, plans: dict) -> list[dict[str, Any]]:
    probs = _probabilities(design, params)
    subj_effect = rng.normal(0.0, params["subject_sd"], design["n_subjects"])
    rows = []
    index = 0
    for g in design["groups"]:
        for slot in range(raters_per_group):
            plan = plans.get((index, slot))
            if plan is None:
                plan = plans[(index, slot)] = [
                    (t.subject, t.condition) for t in plan_trials(
                        range(design["n_subjects"]), design["conditions"], design["views"],
                        n_choices=design["n_choices"],
                        trials_per_rater=design["trials_per_rater"],
                        n_practice=design["n_practice"], n_catch=design["n_catch"],
                        seed=design["seed"], rater_index=index,
                        practice_subjects=design["practice"], design=design["design"],
                        slot=slot) if t.kind == "main"]
            u = rng.normal(0.0, params["rater_sd"])
            for s, c in plan:
                eta = math.log(probs[(g, c)] / (1 - probs[(g, c)])) + u + subj_effect[s]
                correct = bool(rng.random() < 1 / (1 + math.exp(-eta)))
                rows.append({"rater_id": f"r{index}", "rater_group": g, "subject_id": f"s{s}",
                             "condition": c, "correct": correct,
                             "n_choices": design["n_choices"]})
            index += 1
    return rows


def simulate_power(design: dict, params: dict | None = None, raters_per_group: int = 20,
                   n_sim: int = 200, seed: int = 0, deadline: float | None = None
                   ) -> dict[str, Any]:
    """Power and precision of ``design`` with ``raters_per_group`` raters in every group.

    ``design`` as from :func:`design_of`; ``params`` override :data:`DEFAULTS`. Stops
    early at ``deadline`` (``time.monotonic()``), reporting the simulations done.
    """
    params = {**DEFAULTS, **(params or {})}
    design = dict(design)
    design.setdefault("practice", reserve_practice_subjects(
        range(design["n_subjects"]), design["n_choices"], design["n_practice"],
        design["seed"]))
    rng = np.random.default_rng(seed)
    ref_c = "control" if "control" in design["conditions"] else design["conditions"][0]
    ref_g = design["groups"][0]
    hits = {"condition": 0, "group": 0, "interaction": 0}
    fitted = 0
    half: dict[str, list[float]] = {}
    plans: dict = {}
    done = 0
    for _ in range(int(n_sim)):
        if deadline is not None and time.monotonic() > deadline and done >= 5:
            break
        rows = _simulate_rows(design, params, raters_per_group, rng, plans)
        done += 1
        cells: dict[tuple[str, str], list[int]] = {}
        for r in rows:
            cells.setdefault((r["rater_group"], r["condition"]), []).append(int(r["correct"]))
        for (g, c), v in cells.items():
            lo, hi = wilson_ci(sum(v), len(v))
            half.setdefault(f"{g} / {c}", []).append((hi - lo) / 2)
        m = fit_mixed_model(rows, ref_c, ref_g)
        if "error" in m:
            continue
        fitted += 1
        for name, t in m["terms"].items():
            kind = ("interaction" if ":" in name else "condition" if name.startswith("condition")
                    else "group" if name.startswith("group") else None)
            if kind and t["p_value"] is not None and t["p_value"] < params["alpha"]:
                hits[kind] += 1
    n_cells = {k: len(v) for k, v in half.items()}
    out: dict[str, Any] = {
        "raters_per_group": raters_per_group, "n_sim": done, "n_fitted": fitted,
        "answers_per_rater": design["trials_per_rater"],
        "ci_half_width": {k: float(np.mean(v)) for k, v in half.items()},
        "answers_per_cell": {k: int(round(raters_per_group * design["trials_per_rater"]
                                          / len(design["conditions"]))) for k in n_cells},
    }
    for kind in ("condition", "group", "interaction"):
        p = hits[kind] / fitted if fitted else None
        out[f"power_{kind}"] = p
        out[f"power_{kind}_mcse"] = (math.sqrt(p * (1 - p) / fitted) if fitted else None)
    if len(design["groups"]) < 2:
        out["power_group"] = out["power_interaction"] = None
        out["power_group_mcse"] = out["power_interaction_mcse"] = None
    if len(design["conditions"]) < 2:
        out["power_condition"] = out["power_interaction"] = None
        out["power_condition_mcse"] = out["power_interaction_mcse"] = None
    return out


def raters_needed(design: dict, params: dict | None = None, effect: str = "group",
                  n_sim: int = 60, seed: int = 1, deadline: float | None = None,
                  grid: tuple[int, ...] = _SEARCH_GRID, start: int | None = None
                  ) -> dict[str, Any]:
    """Smallest raters per group on ``grid`` (rounded up to whole Latin squares) whose
    simulated power for ``effect`` (condition / group) reaches ``target_power``.

    Searches like a bisection, assuming power grows with raters: from ``start`` (default:
    the planned raters per group) up by doubling until the target is met, then halving the
    bracket, so about log2(len(grid)) + 2 sizes are simulated. ``raters_per_group`` is None
    (with a note) when the grid's largest size misses the target or time runs out."""
    params = {**DEFAULTS, **(params or {})}
    n_cond = len(design["conditions"])
    sizes = sorted({int(math.ceil(n / n_cond) * n_cond) for n in grid})
    start = int(params["raters_per_group"]) if start is None else start
    i = min(range(len(sizes)), key=lambda j: abs(sizes[j] - start))
    tried: dict[int, dict] = {}
    lo, hi = -1, None
    while True:
        if deadline is not None and time.monotonic() > deadline:
            return {"effect": effect, "raters_per_group": None,
                    "tried": [tried[k] for k in sorted(tried)],
                    "note": "time budget used up before the search ended"}
        n = sizes[i]
        res = simulate_power(design, params, n, n_sim=n_sim, seed=seed + n, deadline=deadline)
        power = res[f"power_{effect}"]
        tried[n] = {"raters_per_group": n, "power": power, "n_sim": res["n_fitted"]}
        if power is None:
            return {"effect": effect, "raters_per_group": None, "tried": list(tried.values()),
                    "note": f"the design has no {effect} effect to test"}
        if power >= params["target_power"]:
            hi = i
        else:
            lo = i
        if hi is None:
            if i == len(sizes) - 1:
                return {"effect": effect, "raters_per_group": None,
                        "tried": [tried[k] for k in sorted(tried)],
                        "note": f"not reached with {sizes[-1]} raters per group"}
            i = min(len(sizes) - 1, max(i + 1, 2 * i + 1))
        elif hi - lo <= 1:
            return {"effect": effect, "raters_per_group": sizes[hi],
                    "tried": [tried[k] for k in sorted(tried)], "note": ""}
        else:
            i = (lo + hi) // 2


def estimate(design: dict, params: dict | None = None) -> dict[str, Any]:
    """The whole estimate: power/precision at the planned raters per group, and raters
    needed for the target power (group and condition effects), within ``max_seconds``."""
    params = {**DEFAULTS, **(params or {})}
    t0 = time.monotonic()
    deadline = t0 + float(params["max_seconds"])
    main = simulate_power(design, params, int(params["raters_per_group"]),
                          n_sim=int(params["n_sim"]), seed=0, deadline=deadline)
    needed = {}
    for effect in ("condition", "group"):  # the condition search is short: first
        if main.get(f"power_{effect}") is None:
            continue
        needed[effect] = raters_needed(design, params, effect, n_sim=int(params["n_sim_search"]),
                                       deadline=deadline)
    return {"params": params, "design": {k: v for k, v in design.items() if k != "practice"},
            "at_planned": main, "raters_needed": needed,
            "seconds": round(time.monotonic() - t0, 1),
            "model": "correct ~ condition * group + (1 | rater) + (1 | subject), Wald p < alpha"}


def run_estimate(estimate_id: int) -> str:
    """RQ job: compute a :class:`~surveys.models.PowerEstimate` and store the result."""
    from django.utils import timezone

    claimed = PowerEstimate.objects.filter(pk=estimate_id, status=JobStatus.QUEUED).update(
        status=JobStatus.RUNNING)
    if not claimed:
        return "not queued"
    pe = PowerEstimate.objects.select_related("study").get(pk=estimate_id)
    try:
        result = estimate(pe.params["design"], pe.params["inputs"])
    except Exception as exc:  # noqa: BLE001 - recorded for the page, job not retried
        log.exception("power estimate %s failed", estimate_id)
        PowerEstimate.objects.filter(pk=estimate_id).update(
            status=JobStatus.FAILED, error=f"{exc.__class__.__name__}: {str(exc)[:300]}",
            finished=timezone.now())
        return "failed"
    PowerEstimate.objects.filter(pk=estimate_id).update(status=JobStatus.DONE, result=result,
                                                        finished=timezone.now())
    return "done"


def request_estimate(study, inputs: dict | None = None, run_now: bool = False):
    """Create a :class:`~surveys.models.PowerEstimate` for the study's current design and
    enqueue it (pipeline queue); ``run_now`` computes it in this process instead. When
    Redis is unreachable the estimate is marked failed with what to do."""
    from django.db import transaction

    inputs = {**DEFAULTS, **(inputs or {})}
    pe = PowerEstimate.objects.create(study=study, params={"design": design_of(study),
                                                           "inputs": inputs})
    if run_now:
        run_estimate(pe.pk)
        pe.refresh_from_db()
        return pe

    def push() -> None:
        try:
            # loaded on first use: pulls in redis
            from ..processing.jobs import get_pipeline_queue

            job = get_pipeline_queue().enqueue(run_estimate, pe.pk, job_timeout=900)
            PowerEstimate.objects.filter(pk=pe.pk).update(rq_job_id=job.id)
        except Exception as exc:  # noqa: BLE001 - Redis down: say so on the page
            PowerEstimate.objects.filter(pk=pe.pk, status=JobStatus.QUEUED).update(
                status=JobStatus.FAILED, error="the job queue is unavailable "
                f"({exc.__class__.__name__}); run: manage.py study_power {study.pk}")

    transaction.on_commit(push)
    return pe
