"""Study design and seeded, counterbalanced randomisation of the raters' trials.

:func:`plan_trials` is pure (ids in, plan out): everything random comes from
``numpy.random.default_rng([seed, rater_index])``, so a study's seed and a rater's
order of arrival reproduce the rater's whole session (trial order, candidate
positions, distractors, views).

Counterbalancing. The main trials of a study are drawn from the *pool* of
(subject, condition) pairs, each subject once per condition, laid out in rounds:
round ``r`` lists every subject (in a seeded order) with condition
``conditions[(i + r) % C]``. Rater ``n`` takes the window of
``trials_per_rater`` consecutive pool entries starting at ``n * trials_per_rater``
(wrapping), so successive raters cover the pool, every subject is shown in every
condition across raters, and conditions alternate within a window (balanced
within a rater). A rater sees a subject at most once per condition, and never the
same subject in two adjacent trials (so never its original and de-identified
target back to back).

Conditions: ``control`` = original target vs original candidates, ``deidentified``
= de-identified target vs original candidates; in both the candidates are shown
in another view than the target when the study has ≥ 2 views (required for
``control``, where the same view would make the target identical to a candidate).
Catch trials show the target identical to one candidate (same view, original).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DesignError", "PlannedTrial", "check_design", "plan_trials"]


class DesignError(ValueError):
    """The study design cannot be realised (message names counts, never subjects)."""


@dataclass(frozen=True)
class PlannedTrial:
    """One planned trial: ids are the caller's subject ids (opaque to this module)."""

    position: int
    kind: str  # practice / main / catch
    condition: str  # control / deidentified / catch
    subject: int
    target_view: str
    candidate_view: str
    candidates: tuple[int, ...]
    correct_index: int


def check_design(n_subjects: int, conditions: Sequence[str], views: Sequence[str],
                 n_choices: int, trials_per_rater: int) -> None:
    """Raise :class:`DesignError` if the design is impossible with ``n_subjects`` subjects."""
    if n_choices < 2:
        raise DesignError("a trial needs at least 2 candidates")
    if not conditions:
        raise DesignError("choose at least one condition")
    bad = [c for c in conditions if c not in ("control", "deidentified")]
    if bad or len(set(conditions)) != len(conditions):
        raise DesignError("conditions must be distinct values of control / deidentified")
    if not views:
        raise DesignError("choose at least one view")
    if "control" in conditions and len(set(views)) < 2:
        raise DesignError("the control condition needs two views (target and candidates "
                          "would otherwise be identical)")
    if n_subjects < n_choices:
        raise DesignError(f"{n_choices} candidates per trial need at least {n_choices} subjects "
                          f"with renders; the cohort has {n_subjects}")
    if trials_per_rater < 1:
        raise DesignError("trials per rater must be at least 1")
    if trials_per_rater > n_subjects * len(conditions):
        raise DesignError(f"at most {n_subjects * len(conditions)} trials per rater "
                          f"({n_subjects} subjects × {len(conditions)} conditions, each at most "
                          "once per rater)")


def _pool(subjects: Sequence[int], conditions: Sequence[str], seed: int) -> list[tuple[int, str]]:
    order = list(np.random.default_rng([seed, 2**31 - 1]).permutation(len(subjects)))
    subs = [subjects[i] for i in order]
    return [(s, conditions[(i + r) % len(conditions)])
            for r in range(len(conditions)) for i, s in enumerate(subs)]


def _order_no_adjacent(items: list[tuple[int, str]], rng: np.random.Generator,
                       tries: int = 200) -> list[tuple[int, str]]:
    """Random order of ``items`` in which no two neighbours share a subject."""
    for _ in range(tries):
        left = list(items)
        out: list[tuple[int, str]] = []
        while left:
            counts = Counter(s for s, _ in left)
            allowed = [n for n, (s, _) in enumerate(left) if not out or s != out[-1][0]]
            if not allowed:
                break
            w = np.array([counts[left[n][0]] for n in allowed], float)
            pick = allowed[int(rng.choice(len(allowed), p=w / w.sum()))]
            out.append(left.pop(pick))
        if not left:
            return out
    raise DesignError("cannot order the trials without repeating a subject in adjacent trials "
                      "(too few subjects for this many trials)")


def _views(rng: np.random.Generator, views: Sequence[str], same: bool) -> tuple[str, str]:
    tv = views[int(rng.integers(len(views)))]
    if same or len(views) < 2:
        return tv, tv
    others = [v for v in views if v != tv]
    return tv, others[int(rng.integers(len(others)))]


def _candidates(rng: np.random.Generator, subjects: Sequence[int], target: int,
                k: int) -> tuple[tuple[int, ...], int]:
    others = [s for s in subjects if s != target]
    distract = [others[i] for i in rng.choice(len(others), size=k - 1, replace=False)]
    correct = int(rng.integers(k))
    cands = distract[:correct] + [target] + distract[correct:]
    return tuple(int(c) for c in cands), correct


def plan_trials(subjects: Sequence[int], conditions: Sequence[str], views: Sequence[str], *,
                n_choices: int, trials_per_rater: int, n_practice: int, n_catch: int,
                seed: int, rater_index: int) -> list[PlannedTrial]:
    """Plan the whole session of rater number ``rater_index`` (0-based order of arrival).

    Returns ``n_practice`` practice trials (control condition when available, else the
    first condition), then ``trials_per_rater`` main trials with ``n_catch`` catch trials
    inserted at random places; ``position`` runs 0..N-1 in that order. ``subjects`` are
    ids of subjects that have every needed render; ``views`` are render view names.
    """
    subjects = sorted(int(s) for s in subjects)
    check_design(len(subjects), conditions, views, n_choices, trials_per_rater)
    if n_practice < 0 or n_catch < 0:
        raise DesignError("practice and catch counts must be ≥ 0")
    rng = np.random.default_rng([int(seed), int(rater_index)])
    pool = _pool(subjects, conditions, int(seed))
    start = (rater_index * trials_per_rater) % len(pool)
    window = [pool[(start + n) % len(pool)] for n in range(trials_per_rater)]
    main = _order_no_adjacent(window, rng)

    # catch trials: random gaps, subject different from both neighbours
    slots = sorted(int(x) for x in rng.integers(0, len(main) + 1, size=n_catch))
    seq: list[tuple[int, str]] = []
    for gap in range(len(main) + 1):
        for _ in range(slots.count(gap)):
            seq.append((-1, "catch"))
        if gap < len(main):
            seq.append(main[gap])
    for n, (s, c) in enumerate(seq):
        if c == "catch":
            near = {seq[m][0] for m in (n - 1, n + 1) if 0 <= m < len(seq)}
            choices = [x for x in subjects if x not in near]
            seq[n] = (choices[int(rng.integers(len(choices)))], "catch")

    practice_cond = "control" if "control" in conditions else conditions[0]
    out: list[PlannedTrial] = []
    prev = None
    first_main = seq[0][0] if seq else None
    for n in range(n_practice):
        # the last practice trial must not show the first scored trial's subject
        avoid = {prev, first_main} if n == n_practice - 1 else {prev}
        choices = [x for x in subjects if x not in avoid]
        s = choices[int(rng.integers(len(choices)))]
        tv, cv = _views(rng, views, same=False)
        cands, correct = _candidates(rng, subjects, s, n_choices)
        out.append(PlannedTrial(len(out), "practice", practice_cond, s, tv, cv, cands, correct))
        prev = s
    for s, c in seq:
        kind = "catch" if c == "catch" else "main"
        tv, cv = _views(rng, views, same=kind == "catch")
        cands, correct = _candidates(rng, subjects, s, n_choices)
        out.append(PlannedTrial(len(out), kind, c, s, tv, cv, cands, correct))
    return out
