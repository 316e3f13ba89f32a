"""Design and randomisation invariants of :func:`surveys.studies.design.plan_trials` and the
database side of enrolment (freeze, trial images match the plan)."""

from __future__ import annotations

from collections import Counter

import pytest

from surveys.studies.design import DesignError, check_design, plan_trials
from tests.test_study_fixtures import VIEWS, make_cohort, make_researcher, make_study

SUBJECTS = [11, 12, 13, 14, 15, 16, 17]
CONDS = ["control", "deidentified"]


def plan(index: int, **kw):
    args = dict(n_choices=4, trials_per_rater=10, n_practice=2, n_catch=2, seed=99,
                rater_index=index)
    args.update(kw)
    subjects = args.pop("subjects", SUBJECTS)
    return plan_trials(subjects, args.pop("conditions", CONDS), args.pop("views", VIEWS), **args)


@pytest.mark.parametrize("index", range(30))
def test_plan_invariants(index):
    trials = plan(index)
    assert [t.position for t in trials] == list(range(len(trials)))
    kinds = [t.kind for t in trials]
    assert kinds[:2] == ["practice", "practice"] and "practice" not in kinds[2:]
    assert kinds.count("catch") == 2 and kinds.count("main") == 10
    main = [t for t in trials if t.kind == "main"]
    # at most once per subject and condition; never the same subject in adjacent scored trials
    assert len({(t.subject, t.condition) for t in main}) == len(main)
    for a, b in zip(trials, trials[1:]):  # practice included
        assert a.subject != b.subject
    for t in trials:
        assert len(t.candidates) == 4 and len(set(t.candidates)) == 4
        assert t.candidates[t.correct_index] == t.subject
        assert set(t.candidates) <= set(SUBJECTS)
        if t.kind == "catch":
            assert t.condition == "catch" and t.target_view == t.candidate_view
        else:
            assert t.target_view != t.candidate_view and {t.target_view, t.candidate_view} <= \
                set(VIEWS)
    # conditions balanced within a rater
    c = Counter(t.condition for t in main)
    assert abs(c["control"] - c["deidentified"]) <= 1


def test_plan_is_seeded_and_rater_specific():
    assert plan(3) == plan(3)
    assert plan(3) != plan(4)
    assert plan(3, seed=100) != plan(3)


def test_counterbalancing_covers_every_subject_in_both_conditions():
    n_pool = len(SUBJECTS) * len(CONDS)
    seen = Counter()
    raters = -(-n_pool // 10)  # ceil: windows of 10 cover the pool
    for r in range(raters):
        seen.update((t.subject, t.condition) for t in plan(r) if t.kind == "main")
    assert set(seen) == {(s, c) for s in SUBJECTS for c in CONDS}
    # over many raters each (subject, condition) is shown about equally often
    seen = Counter()
    for r in range(n_pool):  # lcm-ish: 14 raters × 10 trials = 10 full pools
        seen.update((t.subject, t.condition) for t in plan(r) if t.kind == "main")
    assert set(seen.values()) == {10}


def test_correct_positions_and_distractors_vary():
    pos = Counter(t.correct_index for r in range(60) for t in plan(r))
    assert set(pos) == {0, 1, 2, 3}
    assert min(pos.values()) > 0.15 * sum(pos.values())  # ~uniform (expected 25 %)
    distract = Counter(c for r in range(20) for t in plan(r) for c in t.candidates
                       if c != t.subject)
    assert set(distract) == set(SUBJECTS)


def test_same_subject_in_both_conditions_not_adjacent_when_tight():
    # 4 subjects × 2 conditions = 8 trials: every subject twice, still never adjacent
    for r in range(20):
        trials = plan(r, subjects=[1, 2, 3, 4], trials_per_rater=8, n_catch=0, n_practice=0)
        subs = [t.subject for t in trials]
        assert all(a != b for a, b in zip(subs, subs[1:]))
        assert Counter(subs) == {1: 2, 2: 2, 3: 2, 4: 2}


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n_subjects=3, n_choices=4), "at least 4 subjects"),
    (dict(views=["yaw+0"]), "two views"),
    (dict(trials_per_rater=20), "at most 14 trials"),
    (dict(conditions=["control", "other"]), "conditions"),
    (dict(conditions=[]), "at least one condition"),
    (dict(n_choices=1), "at least 2 candidates"),
])
def test_check_design_errors(kwargs, msg):
    args = dict(n_subjects=7, conditions=CONDS, views=list(VIEWS), n_choices=4,
                trials_per_rater=10)
    args.update(kwargs)
    with pytest.raises(DesignError, match=msg):
        check_design(**args)


def test_deidentified_only_allows_single_view():
    trials = plan(0, conditions=["deidentified"], views=["yaw+0"], trials_per_rater=5, n_catch=0,
                  n_practice=1)
    assert all(t.target_view == t.candidate_view == "yaw+0" for t in trials)


@pytest.mark.django_db
def test_enroll_freezes_and_images_match_plan(tmp_path, settings):
    from surveys.models import Invitation, TrialImage
    from surveys.studies.service import enroll

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    cohort = make_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user)
    inv = Invitation.objects.create(study=study, group="general")
    assert not study.frozen
    r1 = enroll(inv.token)
    r2 = enroll(inv.token)
    study.refresh_from_db()
    inv.refresh_from_db()
    assert study.frozen and inv.uses == 2 and (r1.index, r2.index) == (0, 1)
    assert r1.code == "R-0001" and r2.code == "R-0002"
    expect = plan_trials([s.pk for s in cohort.subjects.all()], study.conditions, study.views,
                         n_choices=4, trials_per_rater=8, n_practice=1, n_catch=1,
                         seed=study.seed, rater_index=1)
    got = list(r2.trials.order_by("position"))
    assert [(t.subject_id, t.condition, t.correct_index, tuple(t.candidates)) for t in got] == \
        [(p.subject, p.condition, p.correct_index, p.candidates) for p in expect]
    for t in got:
        imgs = list(TrialImage.objects.filter(trial=t).order_by("slot").select_related("image"))
        assert len(imgs) == 5
        tgt = imgs[0].image
        assert tgt.subject_id == t.subject_id and tgt.view == t.target_view
        assert tgt.variant == ("deid" if t.condition == "deidentified" else "original")
        for slot, ti in enumerate(imgs[1:]):
            assert ti.image.subject_id == t.candidates[slot]
            assert ti.image.variant == "original" and ti.image.view == t.candidate_view
    tokens = [ti.token for ti in TrialImage.objects.all()] + [t.token for t in got]
    assert len(set(tokens)) == len(tokens) and min(len(x) for x in tokens) >= 32
