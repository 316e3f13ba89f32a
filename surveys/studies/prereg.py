"""Pre-registration: the design and analysis plan of a study, frozen with a SHA-256 hash.

When the design freezes (the first rater starts, or the researcher presses *Freeze*),
:func:`preregistration` writes the plan as canonical JSON (sorted keys, no spaces,
UTF-8) and :func:`prereg_digest` hashes it. Both are stored on the study; every report
page, PDF and export prints the hash, and the design JSON sidecar carries the plan, so a
reader recomputes ``sha256(plan)`` and checks that nothing (design, exclusion rule,
primary analysis) changed after data came in.

The plan names subjects by pseudonym only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.stats import MIXED_MODEL_METHOD, Z_95

from ..models import Study, Subject
from .participation import exclusion_rule_text

__all__ = ["PLAN_FORMAT", "analysis_plan", "prereg_digest", "preregistration", "verify"]

PLAN_FORMAT = "deidstudy-preregistration/1"
ALPHA = 0.05


def canonical(obj: Any) -> str:
    """Canonical JSON text: sorted keys, ``,``/``:`` separators, non-ASCII kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prereg_digest(text: str) -> str:
    """SHA-256 (hex) of the UTF-8 bytes of a canonical plan."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def reference_group(study: Study) -> str | None:
    """Reference group of the mixed model: the first group of the design."""
    return study.groups[0] if study.groups else None


def paired_conditions(study: Study) -> tuple[str, str] | None:
    """The McNemar pair: both conditions of a within (paired) design, else None."""
    if study.design == "within" and len(study.conditions) == 2:
        ref = "control" if "control" in study.conditions else study.conditions[0]
        other = [c for c in study.conditions if c != ref][0]
        return ref, other
    return None


def analysis_plan(study: Study) -> dict[str, Any]:
    """The analysis the report runs, in words and parameters."""
    ref_c = "control" if "control" in study.conditions else (study.conditions or [None])[0]
    pair = paired_conditions(study)
    return {
        "primary": {
            "model": "mixed-effects logistic regression",
            "formula": "correct ~ condition * group + (1 | rater) + (1 | subject)",
            "fit": MIXED_MODEL_METHOD,
            "coding": "simple (level indicator - 1/L)",
            "reference_condition": ref_c,
            "reference_group": reference_group(study),
            "population": study.primary_analysis,
            "tests": "Wald z, two-sided, alpha = 0.05",
        },
        "secondary": {
            "accuracy": f"per group x condition, Wilson 95 % interval (z = {Z_95:.6f})",
            "chance": "exact one-sided binomial (Poisson-binomial) test of accuracy > 1/k",
            "between_groups": "Fisher exact (2 groups) or chi-square, two-sided, per condition",
            "mcnemar": ({"pair": list(pair), "sided": "two-sided exact"} if pair else
                        "not applicable: a rater sees each subject in one condition only "
                        "(between-rater design), so there are no pairs"),
            "agreement": "Fleiss' kappa of correct / incorrect per condition",
        },
        "sensitivity": ("all raters" if study.primary_analysis == "excluded" else
                        "without the raters excluded by the rule"),
        "alpha": ALPHA,
    }


def preregistration(study: Study, subjects: list[int]) -> str:
    """Canonical JSON of the design and analysis plan of ``study`` (see the module doc).

    ``subjects`` are the ids of the subjects with every render
    (:func:`surveys.studies.service.eligible_subjects`)."""
    ids = list(subjects)
    names = dict(Subject.objects.filter(pk__in=ids).values_list("pk", "pseudonym"))
    practice = set(study.practice_subjects or [])
    plan = {
        "format": PLAN_FORMAT,
        "design": {
            "design": study.design,
            "counterbalancing": ("Latin square of conditions across the raters of each group"
                                 if study.design == "between" else
                                 "rounds over (subject, condition) pairs across raters"),
            "n_choices": study.n_choices, "conditions": list(study.conditions),
            "views": list(study.views), "trials_per_rater": study.trials_per_rater,
            "n_practice": study.n_practice, "n_catch": study.n_catch,
            "groups": list(study.groups), "lay_groups": list(study.lay_groups or []),
            "group_from": "invitation (locked); questionnaire answer recorded separately",
            "ask_confidence": study.ask_confidence, "time_limit_s": study.time_limit_s,
            "seed": study.seed,
            "consent_text_sha256": prereg_digest(study.consent_text or ""),
            # (absent for studies created before views were balanced: their plans unchanged)
            **({"view_assignment": "the same (target view, candidate view) pairs in every "
                                   "condition, rotated per rater"}
               if study.view_assignment == "balanced" else {}),
        },
        "subjects": {
            "practice": sorted(names[i] for i in ids if i in practice),
            "scored": sorted(names[i] for i in ids if i not in practice),
        },
        "exclusion_rule": {
            "min_catch_fraction": study.exclusion_min_catch,
            "exclude_incomplete": study.exclude_incomplete,
            "text": exclusion_rule_text(study),
        },
        "analysis": analysis_plan(study),
    }
    return canonical(plan)


def verify(plan_text_or_obj: str | dict, expected_hash: str) -> bool:
    """True when the plan (text or parsed object) hashes to ``expected_hash``."""
    text = (plan_text_or_obj if isinstance(plan_text_or_obj, str)
            else canonical(plan_text_or_obj))
    if isinstance(plan_text_or_obj, str):
        text = canonical(json.loads(plan_text_or_obj))
    return prereg_digest(text) == expected_hash
