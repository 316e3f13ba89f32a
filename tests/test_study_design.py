"""Design and randomisation invariants of :func:`surveys.studies.design.plan_trials` and the
database side of enrolment (freeze, trial images match the plan)."""

from __future__ import annotations

from collections import Counter

import pytest

from surveys.studies.design import (
    DesignError,
    check_design,
    plan_trials,
    practice_subject_count,
    reserve_practice_subjects,
)
from tests.factories.studies import VIEWS, make_render_cohort, make_researcher, make_study

# 4 are reserved for practice (k = 4), 7 are left for the scored trials
SUBJECTS = list(range(11, 22))
CONDS = ["control", "deidentified"]
PRACTICE = reserve_practice_subjects(SUBJECTS, 4, 2, 99)
MAIN = [s for s in SUBJECTS if s not in PRACTICE]


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
    # practice shows only the reserved subjects, scored and catch trials only the others
    for t in trials:
        shown = {t.subject, *t.candidates}
        assert shown <= set(PRACTICE if t.kind == "practice" else MAIN), (t.kind, shown)


def test_plan_is_seeded_and_rater_specific():
    assert plan(3) == plan(3)
    assert plan(3) != plan(4)
    assert plan(3, seed=100) != plan(3)


def test_counterbalancing_covers_every_subject_in_both_conditions():
    assert len(PRACTICE) == 4 and len(MAIN) == 7
    n_pool = len(MAIN) * len(CONDS)
    seen = Counter()
    raters = -(-n_pool // 10)  # ceil: windows of 10 cover the pool
    for r in range(raters):
        seen.update((t.subject, t.condition) for t in plan(r) if t.kind == "main")
    assert set(seen) == {(s, c) for s in MAIN for c in CONDS}
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
    # practice reserves k = 4 subjects: 7 - 4 = 3 left, fewer than k
    (dict(n_practice=1), (r"at least 8 subjects with renders \(4 reserved for practice.*"
                          r"the cohort has 7: set practice trials to 0 or add subjects")),
    (dict(n_subjects=9, n_practice=2, trials_per_rater=11),
     (r"at most 10 trials per rater \(5 subjects × 2 conditions.*4 of the 9 subjects with "
      r"renders are reserved for practice.*set practice trials to 0")),
    # k = 2: 2 practice + 2 scored subjects; a catch trial between them has no subject left
    (dict(n_subjects=4, n_choices=2, n_practice=1, trials_per_rater=4, n_catch=1),
     "catch trials need at least 3 subjects"),
    (dict(n_practice=-1), "must be ≥ 0"),
])
def test_check_design_errors(kwargs, msg):
    args = dict(n_subjects=7, conditions=CONDS, views=list(VIEWS), n_choices=4,
                trials_per_rater=10)  # n_practice defaults to 0: nothing reserved
    args.update(kwargs)
    with pytest.raises(DesignError, match=msg):
        check_design(**args)


def test_check_design_accepts_exact_sizes():
    check_design(n_subjects=8, conditions=CONDS, views=list(VIEWS), n_choices=4,
                 trials_per_rater=8, n_practice=1, n_catch=1)  # 4 practice + 4 scored
    check_design(n_subjects=4, conditions=CONDS, views=list(VIEWS), n_choices=4,
                 trials_per_rater=8, n_practice=0, n_catch=1)  # no practice: nothing reserved
    assert practice_subject_count(4, 0) == 0 and practice_subject_count(4, 3) == 4


def test_too_small_cohort_for_practice_is_refused_by_plan_trials():
    with pytest.raises(DesignError, match="set practice trials to 0 or add subjects"):
        plan(0, subjects=SUBJECTS[:7])
    # the same cohort without practice trials is fine and uses every subject
    trials = plan(0, subjects=SUBJECTS[:7], n_practice=0)
    assert not [t for t in trials if t.kind == "practice"]
    assert len({t.subject for t in trials if t.kind == "main"}) == 7


@pytest.mark.parametrize("k,n_practice,n_subjects,trials", [
    (4, 2, 11, 10), (4, 1, 8, 8), (3, 5, 9, 12), (2, 3, 5, 6), (5, 2, 10, 5)])
def test_practice_subjects_never_in_scored_trials(k, n_practice, n_subjects, trials):
    subjects = [100 + 7 * n for n in range(n_subjects)]  # ids need not be contiguous
    for seed in range(40):
        practice = set(reserve_practice_subjects(subjects, k, n_practice, seed))
        assert len(practice) == k and practice <= set(subjects)
        for index in range(0, 60, 7):
            session = plan_trials(subjects, CONDS, VIEWS, n_choices=k, trials_per_rater=trials,
                                  n_practice=n_practice, n_catch=2, seed=seed,
                                  rater_index=index)
            prac = [t for t in session if t.kind == "practice"]
            scored = [t for t in session if t.kind != "practice"]
            assert len(prac) == n_practice and len(scored) == trials + 2
            assert {s for t in prac for s in (t.subject, *t.candidates)} <= practice
            assert not {s for t in scored for s in (t.subject, *t.candidates)} & practice
            for a, b in zip(session, session[1:]):
                assert a.subject != b.subject
            # the same reservation passed explicitly (as stored at freeze) gives the same plan
            assert session == plan_trials(subjects, CONDS, VIEWS, n_choices=k,
                                          trials_per_rater=trials, n_practice=n_practice,
                                          n_catch=2, seed=seed, rater_index=index,
                                          practice_subjects=sorted(practice))


def test_practice_reservation_is_seeded():
    a = reserve_practice_subjects(SUBJECTS, 4, 2, 99)
    assert a == reserve_practice_subjects(list(reversed(SUBJECTS)), 4, 1, 99)  # order, count
    assert a == sorted(a)
    assert len({tuple(reserve_practice_subjects(SUBJECTS, 4, 2, s)) for s in range(20)}) > 5
    assert reserve_practice_subjects(SUBJECTS, 4, 0, 99) == []
    # every subject gets reserved for some seed (no fixed bias towards low ids)
    assert set().union(*(reserve_practice_subjects(SUBJECTS, 4, 2, s) for s in range(60))) == \
        set(SUBJECTS)
    with pytest.raises(DesignError, match="at least 8 subjects"):
        reserve_practice_subjects(SUBJECTS[:7], 4, 2, 99)


def test_counterbalancing_over_the_non_reserved_subjects_for_many_seeds():
    for seed in (1, 7, 123456):
        practice = set(reserve_practice_subjects(SUBJECTS, 4, 2, seed))
        main = [s for s in SUBJECTS if s not in practice]
        seen = Counter()
        for r in range(len(main) * len(CONDS)):
            seen.update((t.subject, t.condition) for t in plan(r, seed=seed)
                        if t.kind == "main")
        assert set(seen) == {(s, c) for s in main for c in CONDS}
        assert set(seen.values()) == {10}


def test_explicit_practice_subjects_are_checked():
    with pytest.raises(DesignError, match="needs 4 subjects reserved for practice, 3 are"):
        plan(0, practice_subjects=PRACTICE[:3])
    with pytest.raises(DesignError, match="no longer has every render"):
        plan(0, practice_subjects=PRACTICE[:3] + [999])


def test_deidentified_only_allows_single_view():
    trials = plan(0, conditions=["deidentified"], views=["yaw+0"], trials_per_rater=5, n_catch=0,
                  n_practice=1)
    assert all(t.target_view == t.candidate_view == "yaw+0" for t in trials)


@pytest.mark.django_db
def test_enroll_freezes_and_images_match_plan(tmp_path, settings):
    from surveys.models import Invitation, TrialImage
    from surveys.studies.service import begin_trials, enroll

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user)
    inv = Invitation.objects.create(study=study, group="general")
    inv_p = Invitation.objects.create(study=study, group="plastic surgeon")
    assert not study.frozen
    r0 = enroll(inv_p.token)
    r1 = enroll(inv.token)
    r2 = enroll(inv.token)
    study.refresh_from_db()
    inv.refresh_from_db()
    assert study.frozen and inv.uses == 2 and (r0.index, r1.index, r2.index) == (0, 1, 2)
    assert r1.code == "R-0002" and r2.code == "R-0003"
    assert len(study.prereg_hash) == 64
    # trials are planned when a rater starts them; the slot is the order within the group
    assert not r2.trials.exists()
    for r in (r2, r0, r1):
        begin_trials(r)
        r.refresh_from_db()
    assert (r2.group_index, r0.group_index, r1.group_index) == (0, 0, 1)
    expect = plan_trials([s.pk for s in cohort.subjects.all()], study.conditions, study.views,
                         n_choices=4, trials_per_rater=8, n_practice=1, n_catch=1,
                         seed=study.seed, rater_index=2, design="between", slot=0,
                         view_assignment=study.view_assignment)
    assert study.view_assignment == "balanced"  # new studies
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
    # the reservation is stored with the freeze; both raters' practice uses only it, and no
    # main or catch trial of either rater shows a reserved subject
    practice = set(study.practice_subjects)
    assert practice == set(reserve_practice_subjects(
        [s.pk for s in cohort.subjects.all()], 4, 1, study.seed)) and len(practice) == 4
    for r in (r1, r2):
        for t in r.trials.all():
            shown = {t.subject_id, *t.candidates}
            assert shown <= practice if t.kind == "practice" else not shown & practice
    # between design: r1 and r2 (consecutive slots of one group) see the same subjects in
    # opposite conditions, and neither sees a subject in two conditions
    c1 = {t.subject_id: t.condition for t in r1.trials.filter(kind="main")}
    c2 = {t.subject_id: t.condition for t in r2.trials.filter(kind="main")}
    assert len(c1) == len(c2) == 8 and set(c1) == set(c2)
    assert all(c1[s] != c2[s] for s in c1)


@pytest.mark.django_db
def test_stored_practice_subjects_survive_a_cohort_change(tmp_path, settings):
    """Subjects that get renders after the freeze never turn a reserved subject into a scored
    one (or the reverse): later raters use the reservation stored at the first rater."""
    from surveys.models import Invitation
    from surveys.studies.service import begin_trials, enroll

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    big = make_render_cohort(settings.DATA_DIR, user, n_subjects=14, name="big")
    ids = sorted(big.subjects.values_list("pk", flat=True))
    # a seed whose reservation on 10 subjects differs from the one on all 14
    seed = next(s for s in range(1000) if reserve_practice_subjects(ids[:10], 4, 1, s)
                != reserve_practice_subjects(ids, 4, 1, s))
    # hide the last 4 subjects' renders until the first rater has started
    from surveys.models import RenderImage

    late = list(RenderImage.objects.filter(subject_id__in=ids[10:]).values_list("pk", flat=True))
    RenderImage.objects.filter(pk__in=late).update(kind="hidden")
    study = make_study(big, user, seed=seed, trials_per_rater=6)
    inv = Invitation.objects.create(study=study, group="general")
    enroll(inv.token)
    study.refresh_from_db()
    stored = list(study.practice_subjects)
    assert stored == reserve_practice_subjects(ids[:10], 4, 1, seed)
    RenderImage.objects.filter(pk__in=late).update(kind="render")
    for _ in range(6):
        r = begin_trials(enroll(inv.token))
        assert r.trials.exists()
        for t in r.trials.all():
            shown = {t.subject_id, *t.candidates}
            assert shown <= set(stored) if t.kind == "practice" else not shown & set(stored)
    study.refresh_from_db()
    assert study.practice_subjects == stored


@pytest.mark.django_db
def test_enroll_refuses_too_small_cohort_and_freezes_nothing(tmp_path, settings):
    from surveys.models import Invitation, Rater
    from surveys.studies.service import enroll

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user, n_subjects=7)
    study = make_study(cohort, user, trials_per_rater=4)  # k=4 + 4 practice subjects > 7
    inv = Invitation.objects.create(study=study, group="general")
    with pytest.raises(DesignError, match="set practice trials to 0 or add subjects"):
        enroll(inv.token)
    study.refresh_from_db()
    inv.refresh_from_db()
    assert not study.frozen and study.practice_subjects is None and inv.uses == 0
    assert not Rater.objects.exists()


# ------------------------------------------------------------------ between-rater design


def bplan(index: int, slot: int | None = None, **kw):
    return plan(index, design="between", slot=index if slot is None else slot,
                trials_per_rater=kw.pop("trials_per_rater", 6), **kw)


@pytest.mark.parametrize("index", range(24))
def test_between_design_shows_each_subject_once_per_rater(index):
    """No carry-over: a rater never sees a subject as the target of two trials (so never its
    original and its de-identified face), conditions are balanced within the rater."""
    trials = bplan(index)
    main = [t for t in trials if t.kind == "main"]
    assert len(main) == 6 and len({t.subject for t in main}) == 6
    c = Counter(t.condition for t in main)
    assert c["control"] == c["deidentified"] == 3
    # catch trials avoid the rater's scored targets when the window leaves other subjects
    # (that are not a neighbour), else take a control target (its original is shown anyway)
    targets = {t.subject for t in main}
    control = {t.subject for t in main if t.condition == "control"}
    for n, t in enumerate(trials):
        if t.kind == "catch":
            near = {trials[m].subject for m in (n - 1, n + 1) if 0 <= m < len(trials)}
            free = set(MAIN) - targets - near
            assert (t.subject in free) if free else (t.subject in control)
    for t in trials:
        assert t.candidates[t.correct_index] == t.subject


def test_between_design_is_a_latin_square_across_raters():
    """Consecutive pairs of slots see the same subjects in opposite conditions; over whole
    rounds every (subject, condition) is shown equally often."""
    for square in range(10):
        a = {t.subject: t.condition for t in bplan(2 * square) if t.kind == "main"}
        b = {t.subject: t.condition for t in bplan(2 * square + 1) if t.kind == "main"}
        assert set(a) == set(b) and all(a[s] != b[s] for s in a)
    seen = Counter()
    n_raters = 2 * 7  # 7 scored subjects, 6 per rater: 7 squares tile the subjects 6 times
    for r in range(n_raters):
        seen.update((t.subject, t.condition) for t in bplan(r) if t.kind == "main")
    assert set(seen) == {(s, c) for s in MAIN for c in CONDS}
    assert set(seen.values()) == {6}


def test_between_design_slot_not_arrival_order_drives_counterbalancing():
    """The slot (order within the group) picks the square row; the arrival index only the
    random order, so two groups arriving interleaved each get a balanced design."""
    a = {(t.subject, t.condition) for t in bplan(5, slot=0) if t.kind == "main"}
    b = {(t.subject, t.condition) for t in bplan(0, slot=0) if t.kind == "main"}
    assert a == b
    assert [t.subject for t in bplan(5, slot=0)] != [t.subject for t in bplan(0, slot=0)]


def test_between_design_keeps_earlier_answers_out_of_distractors():
    """A subject that was the answer of an earlier trial is not offered again as a
    distractor while other subjects are left (it could be ruled out from memory)."""
    subjects = list(range(100, 120))  # 16 scored: always enough fresh distractors
    for r in range(20):
        trials = plan_trials(subjects, CONDS, VIEWS, n_choices=4, trials_per_rater=10,
                             n_practice=1, n_catch=1, seed=3, rater_index=r,
                             design="between")
        answered = set()
        for t in trials:
            if t.kind != "practice":
                distractors = set(t.candidates) - {t.subject}
                assert not distractors & answered, (r, t.position)
                answered.add(t.subject)
    # tight: 8 scored subjects, 8 trials: later trials must reuse old answers, never the
    # most recent ones first
    trials = plan_trials(list(range(12)), CONDS, VIEWS, n_choices=4, trials_per_rater=8,
                         n_practice=1, n_catch=0, seed=3, rater_index=0, design="between")
    assert len([t for t in trials if t.kind == "main"]) == 8


def test_between_design_limits_trials_to_the_scored_subjects():
    with pytest.raises(DesignError, match="at most 7 scored trials per rater in the between"):
        bplan(0, trials_per_rater=8)
    check_design(n_subjects=11, conditions=CONDS, views=list(VIEWS), n_choices=4,
                 trials_per_rater=7, n_practice=1, n_catch=1, design="between")
    check_design(n_subjects=11, conditions=CONDS, views=list(VIEWS), n_choices=4,
                 trials_per_rater=14, n_practice=1, n_catch=1, design="within")


def test_within_design_repeats_subjects_as_documented():
    """The paired design (opt-in) shows subjects in both conditions: what McNemar needs."""
    trials = plan(0, design="within", trials_per_rater=14, n_catch=0)
    subs = Counter(t.subject for t in trials if t.kind == "main")
    assert set(subs.values()) == {2}
