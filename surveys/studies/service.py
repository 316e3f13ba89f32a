"""Database side of a study: eligible subjects, enrolling raters, answers, exports.

Everything that writes runs in ``transaction.atomic`` (SQLite: IMMEDIATE
transactions), so an answer, an invitation use or a rater's trial plan is stored
whole or not at all and survives a server restart.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from datetime import timedelta
from functools import lru_cache

from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from pipeline.atomic import atomic_write_bytes

from ..models import Answer, Invitation, Rater, RenderImage, Study, Subject, Trial, TrialImage
from ..storage.mirror import ensure_local
from ..storage.paths import data_path, study_snapshot
from .design import DesignError, check_design, plan_trials, reserve_practice_subjects
from .flow import advance
from .participation import exclusions

__all__ = [
    "EXPORT_COLUMNS",
    "PANEL_PARAMS",
    "RT_SLACK_MS",
    "InvitationError",
    "StudyClosed",
    "available_views",
    "begin_trials",
    "clean_png",
    "current_trial",
    "eligible_subjects",
    "enroll",
    "freeze",
    "panel_params",
    "practice_reservation",
    "record_answer",
    "response_rows",
    "start_preview",
    "validate_study",
]

#: Browser response time may exceed the server's (shown → answered) by at most this.
RT_SLACK_MS = 1500.0
#: Grace on the server for a time limit (network, rendering).
TIME_LIMIT_GRACE_S = 3.0

EXPORT_COLUMNS = ("rater_id", "rater_group", "subject_id", "condition", "correct", "n_choices",
                  "response_time_ms", "confidence", "server_rt_ms", "rt_suspect", "timed_out",
                  "choice", "correct_choice", "trial_kind", "trial_position", "target_view",
                  "candidate_view", "self_reported_profession", "group_mismatch",
                  "years_experience", "rater_excluded", "exclusion_reason", "answered_at",
                  "enlarged", "design_sha256")

#: URL parameters of recruitment panels, read on the invitation page: parameter → Rater field.
#: Prolific's names first; ``panel_pid`` / ``panel_study`` / ``panel_session`` for other panels.
PANEL_PARAMS = {"PROLIFIC_PID": "panel_pid", "STUDY_ID": "panel_study_id",
                "SESSION_ID": "panel_session_id", "panel_pid": "panel_pid",
                "panel_study": "panel_study_id", "panel_session": "panel_session_id"}
_PANEL_VALUE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class InvitationError(ValueError):
    """An invitation that cannot be used: ``reason`` is invalid / revoked / expired /
    exhausted / closed / duplicate (a panel id that already took part)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invitation {reason}")
        self.reason = reason


class StudyClosed(Exception):
    """The study is closed: no enrolment, no trial start, no answer is accepted."""


def panel_params(query) -> dict[str, str]:
    """Recruitment-panel ids in a query dict (``request.GET``) → Rater field values.

    Values must be 1–64 characters of ``A-Z a-z 0-9 _ . -`` (a Prolific id is 24 hex
    digits); anything else is ignored rather than stored.
    """
    out: dict[str, str] = {}
    for param, field in PANEL_PARAMS.items():
        value = (query.get(param) or "").strip()
        if value and _PANEL_VALUE.match(value) and field not in out:
            out[field] = value
    return out


def available_views(cohort) -> list[str]:
    """Render views (e.g. ``yaw+0``) that have an original render in ``cohort``."""
    return sorted(set(RenderImage.objects.filter(subject__cohort=cohort, kind="render",
                                                 variant="original")
                      .values_list("view", flat=True)))


def _render_index(cohort) -> dict[tuple[int, str, str], int]:
    """(subject id, variant, view) → RenderImage id of the cohort's renders."""
    return {(s, var, v): pk for pk, s, var, v in RenderImage.objects.filter(
        subject__cohort=cohort, kind="render").values_list("pk", "subject_id", "variant", "view")}


def eligible_subjects(study: Study, idx: dict | None = None) -> list[int]:
    """Subject ids having an original render at every study view (and a de-identified
    one at every view when the study has the ``deidentified`` condition). ``idx`` is an
    already read render index of the cohort (optional)."""
    idx = _render_index(study.cohort) if idx is None else idx
    variants = ["original"] + (["deid"] if "deidentified" in study.conditions else [])
    subs = {s for s, _, _ in idx}
    return sorted(s for s in subs
                  if all((s, var, v) in idx for var in variants for v in study.views))


def validate_study(study: Study) -> None:
    """Raise :class:`DesignError` when the design is impossible on the cohort's renders."""
    if not study.groups:
        raise DesignError("define at least one rater group")
    check_design(len(eligible_subjects(study)), study.conditions, study.views,
                 study.n_choices, study.trials_per_rater, n_practice=study.n_practice,
                 n_catch=study.n_catch, design=study.design)
    bad = [g for g in (study.lay_groups or []) if g not in study.groups]
    if bad:
        raise DesignError("every group of the general public must be one of the rater groups")


def practice_reservation(study: Study) -> dict:
    """The subjects reserved for practice, for the researcher's pages and the report.

    ``{"pseudonyms": [...], "reserved": bool, "error": str | None}``: ``reserved`` is True
    once stored (when the first rater started); before that ``pseudonyms`` are the ones
    that would be reserved now (the reservation depends only on the seed and the subjects
    with renders), or empty with ``error`` when the design is impossible.
    """
    if study.practice_subjects is not None:
        ids, reserved, error = list(study.practice_subjects), True, None
    else:
        reserved, error = False, None
        try:
            validate_study(study)
            ids = reserve_practice_subjects(eligible_subjects(study), study.n_choices,
                                            study.n_practice, study.seed)
        except DesignError as exc:
            ids, error = [], str(exc)
    names = sorted(Subject.objects.filter(pk__in=ids).values_list("pseudonym", flat=True))
    return {"pseudonyms": names, "reserved": reserved, "error": error}


def _snapshot_study(study: Study, idx: dict, subjects: list[int]) -> None:
    """Freeze the images of ``subjects`` (idempotent; done before the first rater)."""
    variants = ("original", "deid")
    snapshot_renders(study, [idx[(s, var, v)] for s in subjects for var in variants
                             for v in study.views if (s, var, v) in idx])


def _freeze_locked(study: Study, subjects: list[int]) -> None:
    """Freeze ``study`` (row locked by the caller): reserve the practice subjects, store the
    pre-registration (design + analysis plan) and its hash. No-op when frozen."""
    # loaded on first use: pulls in scipy
    from .prereg import prereg_digest, preregistration

    if study.frozen_at is not None and study.practice_subjects is not None and study.prereg_hash:
        return
    if study.practice_subjects is None:
        check_design(len(subjects), study.conditions, study.views, study.n_choices,
                     study.trials_per_rater, n_practice=study.n_practice,
                     n_catch=study.n_catch, design=study.design)
        study.practice_subjects = reserve_practice_subjects(subjects, study.n_choices,
                                                            study.n_practice, study.seed)
    study.frozen_at = study.frozen_at or timezone.now()
    if not study.prereg_hash:
        study.prereg_json = preregistration(study, subjects)
        study.prereg_hash = prereg_digest(study.prereg_json)
    study.save(update_fields=["frozen_at", "practice_subjects", "prereg_json", "prereg_hash"])


def freeze(study: Study) -> Study:
    """Freeze the design now (before inviting anyone, e.g. to register its hash).

    Raises :class:`DesignError` when the design is impossible; idempotent."""
    validate_study(study)
    idx = _render_index(study.cohort)
    subjects = eligible_subjects(study, idx)
    _snapshot_study(study, idx, subjects)
    with transaction.atomic():
        locked = Study.objects.select_for_update().get(pk=study.pk)
        _freeze_locked(locked, subjects)
    study.refresh_from_db()
    return study


def enroll(token: str, panel: dict[str, str] | None = None) -> Rater:
    """Use an invitation: create a rater of the invitation's group (locked), freeze the study.

    The first enrolment freezes the study (:func:`freeze`: practice subjects, the
    pre-registration hash). The rater's trials are planned when they start them
    (:func:`begin_trials`), so people who decline consent take no counterbalancing slot.
    ``panel`` holds recruitment-panel ids (:func:`panel_params`); a panel participant id
    that already took part in the study is refused (``duplicate``). Raises
    :class:`InvitationError` (invalid / revoked / expired / exhausted / closed / duplicate)
    or :class:`DesignError`. Atomic: a failure leaves no rater, no use counted and nothing
    frozen.
    """
    panel = dict(panel or {})
    # reads first, outside the (write-locking) transaction: keeps the lock short
    pre = Invitation.objects.select_related("study", "study__cohort").filter(token=token).first()
    if pre is None:
        raise InvitationError("invalid")
    if pre.study.closed:
        raise InvitationError("closed")
    idx = _render_index(pre.study.cohort)
    subjects = eligible_subjects(pre.study, idx)
    if pre.problem() is None:
        _snapshot_study(pre.study, idx, subjects)
    try:
        with transaction.atomic():
            inv = Invitation.objects.select_for_update().filter(pk=pre.pk).first()
            if inv is None:
                raise InvitationError("invalid")
            problem = inv.problem()
            if problem:
                raise InvitationError(problem)
            study = Study.objects.select_for_update().get(pk=inv.study_id)
            if study.closed:
                raise InvitationError("closed")
            if panel.get("panel_pid") and Rater.objects.filter(
                    study=study, panel_pid=panel["panel_pid"]).exists():
                raise InvitationError("duplicate")
            if study.views != pre.study.views or study.conditions != pre.study.conditions:
                idx = _render_index(study.cohort)  # design edited in between: read again
                subjects = eligible_subjects(study, idx)
            _freeze_locked(study, subjects)
            index = _next_index(study)
            Invitation.objects.filter(pk=inv.pk).update(uses=F("uses") + 1)
            rater = Rater.objects.create(study=study, invitation=inv, index=index,
                                         code=f"R-{index + 1:04d}", group=inv.group,
                                         **{k: v for k, v in panel.items()
                                            if k in ("panel_pid", "panel_study_id",
                                                     "panel_session_id")})
    except IntegrityError:
        # a concurrent enrolment with the same panel id won the race
        if panel.get("panel_pid"):
            raise InvitationError("duplicate") from None
        raise
    return rater


def _next_index(study: Study) -> int:
    last = (Rater.objects.filter(study=study, is_preview=False, index__isnull=False)
            .order_by("-index").values_list("index", flat=True).first())
    return 0 if last is None else last + 1


def _plan_for(study: Study, rater: Rater, idx: dict, subjects: list[int], practice: list[int],
              rater_index: int, slot: int) -> None:
    """Create the rater's trials and their images from :func:`plan_trials`."""
    plan = plan_trials(subjects, study.conditions, study.views, n_choices=study.n_choices,
                       trials_per_rater=study.trials_per_rater, n_practice=study.n_practice,
                       n_catch=study.n_catch, seed=study.seed, rater_index=rater_index,
                       practice_subjects=practice, design=study.design, slot=slot,
                       view_assignment=study.view_assignment)
    trials = Trial.objects.bulk_create([
        Trial(rater=rater, position=p.position, kind=p.kind, condition=p.condition,
              subject_id=p.subject, target_view=p.target_view,
              candidate_view=p.candidate_view, candidates=list(p.candidates),
              correct_index=p.correct_index) for p in plan])
    images = []
    for t, p in zip(trials, plan):
        tvar = "deid" if p.condition == "deidentified" else "original"
        images.append(TrialImage(trial=t, slot=0, image_id=idx[(p.subject, tvar,
                                                                 p.target_view)]))
        for n, c in enumerate(p.candidates, start=1):
            images.append(TrialImage(trial=t, slot=n,
                                     image_id=idx[(c, "original", p.candidate_view)]))
    TrialImage.objects.bulk_create(images)


def begin_trials(rater: Rater) -> Rater:
    """The rater starts the trials: take the next counterbalancing slot of its group and plan
    the whole session (:func:`~surveys.studies.design.plan_trials` with the study's design).

    Idempotent (a rater whose trials exist keeps them). Raises :class:`StudyClosed` when
    the study is closed (a preview ignores that). A preview rater gets the plan the next
    rater of its group would get, without taking the slot.
    """
    if rater.trials.exists():
        advance(rater.pk, Rater.Step.INSTRUCTIONS, Rater.Step.TRIALS)
        rater.refresh_from_db()
        return rater
    study = rater.study
    idx = _render_index(study.cohort)
    subjects = eligible_subjects(study, idx)
    with transaction.atomic():
        study = Study.objects.select_for_update().get(pk=study.pk)
        locked = Rater.objects.select_for_update().get(pk=rater.pk)
        if study.closed and not locked.is_preview:
            raise StudyClosed()
        if locked.trials.exists():
            pass
        elif locked.is_preview:
            practice = (study.practice_subjects if study.practice_subjects is not None else
                        reserve_practice_subjects(subjects, study.n_choices, study.n_practice,
                                                  study.seed))
            slot = Rater.objects.filter(study=study, group=locked.group, is_preview=False,
                                        group_index__isnull=False).count()
            _plan_for(study, locked, idx, subjects, practice, _next_index(study), slot)
        else:
            slot = Rater.objects.filter(study=study, group=locked.group, is_preview=False,
                                        group_index__isnull=False).count()
            _plan_for(study, locked, idx, subjects, list(study.practice_subjects or []),
                      locked.index, slot)
            locked.group_index = slot
        locked.step = Rater.Step.TRIALS  # also from a test's or preview's earlier step
        locked.trials_started = locked.trials_started or timezone.now()
        locked.save(update_fields=["group_index", "step", "trials_started"])
    rater.refresh_from_db()
    return rater


def start_preview(study: Study, group: str) -> Rater:
    """A researcher's preview rater of ``group``: walks the rater pages like a participant,
    never freezes the study, takes no slot and is left out of every count, analysis and
    export. Earlier previews of the study are deleted."""
    if group not in study.groups:
        raise DesignError("preview: choose one of the study's groups")
    validate_study(study)
    idx = _render_index(study.cohort)
    _snapshot_study(study, idx, eligible_subjects(study, idx))
    with transaction.atomic():
        Rater.objects.filter(study=study, is_preview=True).delete()
        return Rater.objects.create(study=study, index=None, code="PREVIEW", group=group,
                                    is_preview=True)


def current_trial(rater: Rater) -> Trial | None:
    """The rater's first unanswered trial (None when all are answered)."""
    return rater.trials.filter(answer__isnull=True).order_by("position").first()


def record_answer(rater: Rater, trial_token: str, choice: int | None,
                  client_rt_ms: float | None, confidence: int | None,
                  enlarged: list[int] | None = None) -> tuple[Answer, bool]:
    """Store the answer to the rater's current trial; return (answer, created).

    Only the current trial can be answered, once: a replay, a double submit or a
    form re-posted after the back button returns the stored answer unchanged with
    ``created=False``. ``choice`` is 1-based; None (no answer) is accepted only when the
    study has a time limit (the page submits it when time is up). The
    server's response time (trial first shown → now, ms) is stored next to the
    browser's; they disagree by more than :data:`RT_SLACK_MS` → ``rt_suspect``.
    ``enlarged`` lists the images the rater enlarged (0 = target, 1..k = candidates;
    other values are dropped).
    Raises ``ValueError`` for a trial of someone else or a choice out of range, and
    :class:`StudyClosed` once the researcher has closed the study (even for raters who
    started before).
    """
    now = timezone.now()
    with transaction.atomic():
        trial = (Trial.objects.select_for_update().select_related("rater__study")
                 .filter(token=trial_token, rater=rater).first())
        if trial is None:
            raise ValueError("no such trial for this rater")
        existing = Answer.objects.filter(trial=trial).first()
        if existing is not None:
            return existing, False
        cur = current_trial(rater)
        if cur is None or cur.pk != trial.pk:
            raise ValueError("this trial is not the current one")
        study = trial.rater.study
        if study.closed and not trial.rater.is_preview:
            raise StudyClosed()
        if choice is None and not study.time_limit_s:
            raise ValueError("choose a candidate (no time limit: an empty answer is refused)")
        if choice is not None and not 1 <= choice <= study.n_choices:
            raise ValueError(f"choice must be between 1 and {study.n_choices}")
        if confidence is not None and not 1 <= confidence <= 5:
            raise ValueError("confidence must be between 1 and 5")
        server_rt = ((now - trial.shown_at).total_seconds() * 1000.0
                     if trial.shown_at else None)
        suspect = (client_rt_ms is None or client_rt_ms < 0 or server_rt is None
                   or client_rt_ms > server_rt + RT_SLACK_MS)
        timed_out = choice is None
        if study.time_limit_s and server_rt is not None and \
                server_rt > (study.time_limit_s + TIME_LIMIT_GRACE_S) * 1000.0:
            timed_out, choice = True, None
        try:
            answer = Answer.objects.create(
                trial=trial, choice=choice,
                correct=choice is not None and choice - 1 == trial.correct_index,
                confidence=confidence, client_rt_ms=client_rt_ms, server_rt_ms=server_rt,
                rt_suspect=suspect, timed_out=timed_out, answered_at=now,
                enlarged=sorted({int(x) for x in (enlarged or [])
                                 if 0 <= int(x) <= study.n_choices}))
        except IntegrityError:  # pragma: no cover - concurrent duplicate on another DB
            return Answer.objects.get(trial=trial), False
        if current_trial(rater) is None:
            advance(rater.pk, Rater.Step.TRIALS, Rater.Step.DONE, finished=now)
    return answer, True


def current_image_path(image_token: str, rater_token: str) -> tuple[str, str] | None:
    """(render path, study snapshot path), both ``DATA_DIR``-relative, of the image behind
    ``image_token`` if it belongs to the current trial (unanswered, no earlier unanswered
    trial) of the rater whose resume token is ``rater_token``; else None. One SQL
    statement (the hottest request of a study)."""
    ti, t, r = TrialImage._meta.db_table, Trial._meta.db_table, Rater._meta.db_table
    ri, a = RenderImage._meta.db_table, Answer._meta.db_table
    sql = (f"SELECT ri.path, ri.id, r.study_id FROM {ti} ti JOIN {t} t ON t.id = ti.trial_id "
           f"JOIN {r} r ON r.id = t.rater_id JOIN {ri} ri ON ri.id = ti.image_id "
           f"WHERE ti.token = %s AND r.resume_token = %s "
           f"AND NOT EXISTS (SELECT 1 FROM {a} a WHERE a.trial_id = t.id) "
           f"AND NOT EXISTS (SELECT 1 FROM {t} t2 WHERE t2.rater_id = t.rater_id "
           f"AND t2.position < t.position "
           f"AND NOT EXISTS (SELECT 1 FROM {a} a2 WHERE a2.trial_id = t2.id))")
    with connection.cursor() as cur:
        cur.execute(sql, [image_token, rater_token])
        row = cur.fetchone()
    return (row[0], study_snapshot(row[2], row[1])) if row else None


def snapshot_renders(study: Study, render_ids) -> int:
    """Freeze the study's images: write a metadata-free copy of every render in
    ``render_ids`` below ``DATA_DIR/studies/`` unless it exists; returns files written.

    Raters are then shown these copies, so re-running the pipeline on the cohort does not
    change a running study's images.
    """
    written = 0
    for ri in RenderImage.objects.filter(pk__in=list(render_ids)).only("pk", "path"):
        dest = data_path(study_snapshot(study.pk, ri.pk))
        if dest.is_file():
            continue
        atomic_write_bytes(dest, clean_png(ensure_local(ri.path)))
        written += 1
    return written


def mark_shown(trial: Trial) -> None:
    """Record the server time the trial was first shown (kept when the page is reloaded)."""
    if trial.shown_at is None:
        now = timezone.now()
        if Trial.objects.filter(pk=trial.pk, shown_at__isnull=True).update(shown_at=now):
            trial.shown_at = now
        else:  # shown concurrently by another request: keep the first time
            trial.refresh_from_db(fields=["shown_at"])


def time_left_s(trial: Trial, study: Study) -> float | None:
    """Seconds left of the time limit (None without a limit)."""
    if not study.time_limit_s:
        return None
    if trial.shown_at is None:
        return float(study.time_limit_s)
    used = (timezone.now() - trial.shown_at) / timedelta(seconds=1)
    return max(0.0, study.time_limit_s - used)


@lru_cache(maxsize=512)
def _clean_png_cached(path: str, mtime_ns: int) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode if im.mode in ("L", "RGB", "RGBA") else "RGB"
        clean = Image.frombytes(mode, im.size, im.convert(mode).tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", optimize=False)  # no text/exif/time chunks
    return buf.getvalue()


def clean_png(path) -> bytes:
    """PNG bytes of the image at ``path`` re-encoded from pixels only (no metadata)."""
    import os

    return _clean_png_cached(str(path), os.stat(path).st_mtime_ns)


def response_rows(study: Study, kinds: Iterable[str] = ("main",),
                  exclude_excluded: bool = False) -> list[dict]:
    """One row per answer (columns :data:`EXPORT_COLUMNS`), pseudonyms only.

    ``rater_id`` is the rater's code, ``rater_group`` the group of the rater's invitation
    (locked; the questionnaire's answer is ``self_reported_profession``, contradictions are
    ``group_mismatch = 1``), ``subject_id`` the subject's pseudonym; ``response_time_ms``
    is the browser's time. ``trial_kind`` is practice / main / catch; ``condition`` is
    ``practice`` for practice trials and ``catch`` for catch trials, so no unscored row
    looks like a scored condition. ``rater_excluded`` / ``exclusion_reason`` apply the
    study's pre-registered rule and the researcher's exclusions
    (:func:`surveys.studies.participation.exclusions`); ``exclude_excluded`` drops those
    raters' rows. Only trials of ``kinds``; never a preview's answers.
    """
    excluded = exclusions(study)
    qs = (Answer.objects.filter(trial__rater__study=study, trial__kind__in=list(kinds),
                                trial__rater__is_preview=False)
          .select_related("trial__rater", "trial__subject", "trial__rater__study")
          .order_by("trial__rater__index", "trial__position"))
    rows = []
    for a in qs:
        t = a.trial
        ex = excluded.get(t.rater.code)
        if exclude_excluded and ex:
            continue
        rows.append({
            "rater_id": t.rater.code, "rater_group": t.rater.group,
            "subject_id": t.subject.pseudonym,
            "condition": "practice" if t.kind == "practice" else t.condition,
            "correct": int(a.correct), "n_choices": len(t.candidates),
            "response_time_ms": "" if a.client_rt_ms is None else round(a.client_rt_ms, 1),
            "confidence": "" if a.confidence is None else a.confidence,
            "server_rt_ms": "" if a.server_rt_ms is None else round(a.server_rt_ms, 1),
            "rt_suspect": int(a.rt_suspect), "timed_out": int(a.timed_out),
            "choice": "" if a.choice is None else a.choice,
            "correct_choice": t.correct_index + 1, "trial_kind": t.kind,
            "trial_position": t.position,
            "target_view": t.target_view, "candidate_view": t.candidate_view,
            "self_reported_profession": t.rater.self_reported_profession,
            "group_mismatch": int(t.rater.group_mismatch),
            "years_experience": ("" if t.rater.years_experience is None
                                 else t.rater.years_experience),
            "rater_excluded": int(bool(ex)),
            "exclusion_reason": "; ".join(ex["reasons"]) if ex else "",
            "answered_at": a.answered_at.isoformat(),
            "enlarged": ";".join(str(x) for x in (a.enlarged or [])),
            "design_sha256": study.prereg_hash,
        })
    return rows
