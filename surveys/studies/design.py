"""Study design and seeded, counterbalanced randomisation of the raters' trials.

:func:`plan_trials` is pure (ids in, plan out): everything random comes from
``numpy.random.default_rng([seed, rater_index])``, so a study's seed and a rater's
order of arrival reproduce the rater's whole session (trial order, candidate
positions, distractors, views).

Two designs (``design``):

* ``between`` (default): each rater sees every subject at most once, in one condition
  only, so no rater can carry what they saw of a subject in one condition over to the
  other (e.g. match a de-identified face by remembering the original from a control
  trial). Conditions are counterbalanced across raters with a Latin square: the scored
  subjects are put in a seeded order; the rater in counterbalancing slot ``n`` (its order
  within its group: every group gets the whole square) takes the window of
  ``trials_per_rater`` consecutive subjects starting at ``(n // C) * trials_per_rater``
  (wrapping), and the subject at window position ``j`` in condition
  ``conditions[(j + n) % C]``. Every block of ``C`` consecutive raters of a group shows
  each subject of its window once in every condition (a ``C × C`` Latin square of
  rows = raters, columns = condition blocks), conditions are balanced within a rater
  (±1), and successive windows tile all subjects. At most one trial per subject, so
  ``trials_per_rater`` ≤ scored subjects.
* ``within``: the pool design below; a rater sees subjects in both conditions (pairs for
  McNemar), at the price of carry-over.

Distractors avoid giving an answer away across trials (between design): a subject that
was the answer of an earlier trial of the rater (the rater may remember matching it) is
offered as a distractor only when too few other subjects are left, so "I already matched
that face" does not rule a candidate out. Catch trials prefer subjects that are not the target of
any scored trial of the rater, then ones shown as originals anyway (control targets).

Counterbalancing of the ``within`` design. The main trials of a study are drawn from the *pool* of
(subject, condition) pairs, each subject once per condition, laid out in rounds:
round ``r`` lists every subject (in a seeded order) with condition
``conditions[(i + r) % C]``. Rater ``n`` takes the window of
``trials_per_rater`` consecutive pool entries starting at ``n * trials_per_rater``
(wrapping), so successive raters cover the pool, every subject is shown in every
condition across raters, and conditions alternate within a window (balanced
within a rater). A rater sees a subject at most once per condition, and never the
same subject in two adjacent trials (so never its original and de-identified
target back to back).

Practice subjects. When a rater has practice trials (with feedback), ``n_choices``
subjects are *reserved for practice* (:func:`reserve_practice_subjects`, drawn from
the study seed only): their renders are shown only in practice trials, as target and
as candidates, and every main and catch trial (target, candidates, catch subject) uses
the other subjects. Feedback on a practice trial therefore never tells a rater the
answer to a scored trial. The counterbalancing above runs over the non-reserved
subjects. A study with practice needs at least ``2 * n_choices`` subjects
(:func:`check_design`).

Conditions: ``control`` = original target vs original candidates, ``deidentified``
= de-identified target vs original candidates; in both the candidates are shown
in another view than the target when the study has ≥ 2 views (required for
``control``, where the same view would make the target identical to a candidate).
Catch trials show the target identical to one candidate (same view, original).

Views (``view_assignment``). ``balanced`` (new studies): every condition gets the same
(target view, candidate view) pairs — the n-th scored trial of each condition of a rater
uses pair ``(offset + n) mod P`` of the P ordered pairs of distinct views, the offset
drawn per rater — so a condition is never shown from easier angles than the other, and
over raters every pair is used equally often. ``random`` (studies created before): each
trial draws its pair independently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DesignError", "PlannedTrial", "check_design", "plan_trials",
           "practice_subject_count", "reserve_practice_subjects"]

#: rng stream (second seed word) of the practice reservation; the pool uses 2**31 - 1,
#: rater ``n`` uses ``n``.
_PRACTICE_STREAM = 2**31 - 2


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


def practice_subject_count(n_choices: int, n_practice: int) -> int:
    """Subjects reserved for practice: one candidate set (``n_choices``) when the study has
    practice trials, else none."""
    return int(n_choices) if n_practice > 0 else 0


def check_design(n_subjects: int, conditions: Sequence[str], views: Sequence[str],
                 n_choices: int, trials_per_rater: int, n_practice: int = 0,
                 n_catch: int = 0, design: str = "within") -> None:
    """Raise :class:`DesignError` if the design is impossible with ``n_subjects`` subjects.

    ``n_subjects`` counts every subject with the needed renders, including the
    :func:`practice_subject_count` ones that practice trials reserve.
    """
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
    if n_practice < 0 or n_catch < 0:
        raise DesignError("practice and catch counts must be ≥ 0")
    reserved = practice_subject_count(n_choices, n_practice)
    n_main = n_subjects - reserved
    if n_main < n_choices:
        if reserved:
            raise DesignError(
                f"{n_choices} candidates per trial plus practice trials need at least "
                f"{n_choices + reserved} subjects with renders ({reserved} reserved for "
                f"practice, shown only in practice trials, and {n_choices} for the scored "
                f"trials); the cohort has {n_subjects}: set practice trials to 0 or add "
                "subjects")
        raise DesignError(f"{n_choices} candidates per trial need at least {n_choices} subjects "
                          f"with renders; the cohort has {n_subjects}")
    if design not in ("between", "within"):
        raise DesignError("the design is between (one condition per subject and rater) or "
                          "within (every condition)")
    if trials_per_rater < 1:
        raise DesignError("trials per rater must be at least 1")
    if design == "between" and trials_per_rater > n_main:
        msg = (f"at most {n_main} scored trials per rater in the between-rater design (each of "
               f"the {n_main} scored subjects is shown once per rater, in one condition")
        if reserved:
            msg += (f"; {reserved} of the {n_subjects} subjects with renders are reserved for "
                    "practice")
        raise DesignError(msg + "): lower the trials per rater, add subjects"
                          + (", set practice trials to 0" if reserved else "")
                          + " or choose the within (paired) design")
    if trials_per_rater > n_main * len(conditions):
        msg = (f"at most {n_main * len(conditions)} trials per rater "
               f"({n_main} subjects × {len(conditions)} conditions, each at most once per rater")
        if reserved:
            msg += (f"; {reserved} of the {n_subjects} subjects with renders are reserved for "
                    "practice): lower the trials per rater, set practice trials to 0 or add "
                    "subjects")
        else:
            msg += ")"
        raise DesignError(msg)
    if n_catch > 0 and n_main < 3:
        raise DesignError("catch trials need at least 3 subjects in the scored trials (a catch "
                          "trial's subject differs from both neighbours): set catch trials to 0 "
                          "or add subjects")


def reserve_practice_subjects(subjects: Sequence[int], n_choices: int, n_practice: int,
                              seed: int) -> list[int]:
    """The subjects reserved for practice (sorted ids), chosen from ``seed`` alone.

    Deterministic for a given seed and set of ``subjects`` (their order does not matter);
    empty when ``n_practice`` is 0. Raises :class:`DesignError` when fewer than
    ``n_choices`` subjects would be left for the scored trials.
    """
    subjects = sorted(int(s) for s in subjects)
    n = practice_subject_count(n_choices, n_practice)
    if n == 0:
        return []
    if len(subjects) - n < n_choices:
        raise DesignError(f"{n_choices} candidates per trial plus practice trials need at least "
                          f"{n_choices + n} subjects with renders; the cohort has "
                          f"{len(subjects)}: set practice trials to 0 or add subjects")
    order = np.random.default_rng([int(seed), _PRACTICE_STREAM]).permutation(len(subjects))
    return sorted(subjects[int(i)] for i in order[:n])


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
                k: int, avoid: Sequence[int] = ()) -> tuple[tuple[int, ...], int]:
    """``k`` candidates: the target and ``k - 1`` distractors at a random slot. Distractors
    are drawn from subjects not in ``avoid`` (earlier answers, most recent last) first;
    when too few are left, the least recent of ``avoid`` fill up."""
    avoid_set = set(avoid)
    fresh = [s for s in subjects if s != target and s not in avoid_set]
    if len(fresh) >= k - 1:
        distract = [fresh[i] for i in rng.choice(len(fresh), size=k - 1, replace=False)]
    else:
        old = [s for s in avoid if s != target and s in set(subjects)][: k - 1 - len(fresh)]
        distract = [fresh[i] for i in rng.permutation(len(fresh))] + old
        distract = [distract[i] for i in rng.permutation(len(distract))]
    correct = int(rng.integers(k))
    cands = distract[:correct] + [target] + distract[correct:]
    return tuple(int(c) for c in cands), correct


def _latin_square_window(scored: list[int], conditions: Sequence[str], seed: int,
                         trials_per_rater: int, slot: int) -> list[tuple[int, str]]:
    """The (subject, condition) pairs of counterbalancing slot ``slot`` (between design)."""
    order = list(np.random.default_rng([seed, 2**31 - 1]).permutation(len(scored)))
    subs = [scored[i] for i in order]
    n_cond = len(conditions)
    start = ((slot // n_cond) * trials_per_rater) % len(subs)
    return [(subs[(start + j) % len(subs)], conditions[(j + slot) % n_cond])
            for j in range(trials_per_rater)]


def plan_trials(subjects: Sequence[int], conditions: Sequence[str], views: Sequence[str], *,
                n_choices: int, trials_per_rater: int, n_practice: int, n_catch: int,
                seed: int, rater_index: int,
                practice_subjects: Sequence[int] | None = None, design: str = "within",
                slot: int | None = None, view_assignment: str = "random") -> list[PlannedTrial]:
    """Plan the whole session of rater number ``rater_index`` (0-based order of arrival).

    ``design`` is ``between`` or ``within`` (see the module docstring); ``slot`` is the
    rater's counterbalancing slot (its order within its group; default ``rater_index``).
    The random order, views, candidate positions and distractors come from
    ``rater_index``.

    Returns ``n_practice`` practice trials (control condition when available, else the
    first condition), then ``trials_per_rater`` main trials with ``n_catch`` catch trials
    inserted at random places; ``position`` runs 0..N-1 in that order. ``subjects`` are
    ids of subjects that have every needed render (practice subjects included);
    ``views`` are render view names; ``view_assignment`` is ``balanced`` or ``random`` (see
    the module docstring). ``practice_subjects`` are the subjects reserved for
    practice (as stored when the study was frozen); None reserves them here with
    :func:`reserve_practice_subjects`. Practice trials use only them, main and catch
    trials only the other subjects.
    """
    subjects = sorted(int(s) for s in subjects)
    check_design(len(subjects), conditions, views, n_choices, trials_per_rater,
                 n_practice=n_practice, n_catch=n_catch, design=design)
    slot = rater_index if slot is None else int(slot)
    if practice_subjects is None:
        practice = reserve_practice_subjects(subjects, n_choices, n_practice, seed)
    else:
        practice = sorted({int(s) for s in practice_subjects})
        if len(practice) != practice_subject_count(n_choices, n_practice):
            raise DesignError(f"the study needs {practice_subject_count(n_choices, n_practice)} "
                              f"subjects reserved for practice, {len(practice)} are")
        if not set(practice) <= set(subjects):
            raise DesignError("a subject reserved for practice no longer has every render")
    reserved = set(practice)
    scored = [s for s in subjects if s not in reserved]
    rng = np.random.default_rng([int(seed), int(rater_index)])
    if design == "between":
        window = _latin_square_window(scored, conditions, int(seed), trials_per_rater, slot)
    else:
        pool = _pool(scored, conditions, int(seed))
        start = (slot * trials_per_rater) % len(pool)
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
    targets = {s for s, _ in main}
    control_targets = {s for s, c in main if c == "control"}
    for n, (s, c) in enumerate(seq):
        if c == "catch":
            near = {seq[m][0] for m in (n - 1, n + 1) if 0 <= m < len(seq)}
            choices = [x for x in scored if x not in near]
            # prefer subjects this rater never sees as a scored target, then ones whose
            # original it sees anyway (control targets)
            best = ([x for x in choices if x not in targets]
                    or [x for x in choices if x in control_targets] or choices)
            seq[n] = (best[int(rng.integers(len(best)))], "catch")

    practice_cond = "control" if "control" in conditions else conditions[0]
    out: list[PlannedTrial] = []
    prev = None
    for _ in range(n_practice):
        # practice subjects are disjoint from the scored ones, so the last practice trial
        # cannot show the first scored trial's subject
        choices = [x for x in practice if x != prev]
        s = choices[int(rng.integers(len(choices)))]
        tv, cv = _views(rng, views, same=False)
        cands, correct = _candidates(rng, practice, s, n_choices)
        out.append(PlannedTrial(len(out), "practice", practice_cond, s, tv, cv, cands, correct))
        prev = s
    answered: list[int] = []  # answers of earlier trials, oldest first
    pairs = [(a, b) for a in views for b in views if a != b] or [(views[0], views[0])]
    offset = int(rng.integers(len(pairs))) if view_assignment == "balanced" else 0
    per_condition: Counter[str] = Counter()
    for s, c in seq:
        kind = "catch" if c == "catch" else "main"
        if kind == "main" and view_assignment == "balanced":
            tv, cv = pairs[(offset + per_condition[c]) % len(pairs)]
            per_condition[c] += 1
        else:
            tv, cv = _views(rng, views, same=kind == "catch")
        # between design only: there a subject is the answer at most once, so an earlier
        # answer is never the right one again and is kept out of the distractors; in the
        # within design it is the answer again in its other condition, and keeping it out of
        # the distractors would single it out
        avoid = [a for a in answered if a != s] if design == "between" else []
        cands, correct = _candidates(rng, scored, s, n_choices, avoid=avoid)
        out.append(PlannedTrial(len(out), kind, c, s, tv, cv, cands, correct))
        if s in answered:
            answered.remove(s)
        answered.append(s)
    return out
