"""RQ jobs of the per-subject pipeline: enqueue, claim, run, chain, retry and recover.

State lives in :class:`surveys.models.StageRun` (one row per subject and stage);
the row + job protocol is :mod:`surveys.processing.rowjobs` (shared with the uploads). A job
first *claims* its row with a conditional UPDATE (``status=queued`` and the row's
current job id), so a duplicate or stale job — e.g. re-delivered after a worker
died — does nothing, and two workers on one queue never process the same stage twice. On success the next
stage of the subject is enqueued; on failure the row gets a readable error and the
other subjects carry on. :func:`recover_stale_stages` puts stages whose worker
died back in the queue, and stages left ``queued`` without a job in Redis (the
process died between the commit and the enqueue, or Redis lost the job) — run by
:class:`deidstudy.rq.RecoveringWorker` at start-up and at every maintenance pass.
"""

from __future__ import annotations

import logging
import secrets
import time

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from pipeline.errors import safe_message

from ..models import ACTIVE_STATUSES, Cohort, JobStatus, StageRun, Subject
from ..storage.mirror import pull_tree, shared_storage
from ..storage.paths import subject_folder
from . import rowjobs
from .stages import STAGE_BY_NAME, StageContext
from .viewer import prewarm

log = logging.getLogger(__name__)

#: The reason shown for a stage whose worker died ``MAX_CRASHES`` times in a row.
CRASH_MESSAGE = ("the worker process running this stage stopped {n} times in a row (killed, out "
                 "of memory?); see the worker log, then Retry")


def get_pipeline_queue():
    """The RQ queue of the pipeline (``settings.PIPELINE_QUEUE`` via django-rq)."""
    import django_rq

    return django_rq.get_queue(settings.PIPELINE_QUEUE)


def enqueue_stage(run: StageRun, queue=None, *, expect: tuple[str, str] | None = None) -> str | None:
    """Mark ``run`` queued with a fresh job id and enqueue it after the transaction commits.

    Returns the job id. Any older job of this row becomes stale (its claim fails). When
    Redis cannot be reached the row stays queued (see :func:`surveys.processing.rowjobs.push_job`).
    With ``expect=(status, job_id)`` the row is changed only if it still has that
    status and job id (a conditional UPDATE, for recovery); otherwise nothing is
    enqueued and None is returned.
    """
    job_id = f"stage-{run.pk}-{secrets.token_hex(6)}"
    if not rowjobs.mark_queued(run, job_id, expect=expect, progress=0.0, error=""):
        return None

    def push() -> None:
        rowjobs.push_job(lambda: queue if queue is not None else get_pipeline_queue(),
                 "surveys.processing.jobs.run_stage", run.pk, job_id, job_id=job_id,
                 job_timeout=int(getattr(settings, "PIPELINE_JOB_TIMEOUT", 3600)),
                 result_ttl=3600, failure_ttl=7 * 86400)

    transaction.on_commit(push)
    return job_id


def next_stage(subject: Subject) -> StageRun | None:
    """The first stage of ``subject`` that is not done (None when all are done)."""
    return subject.stages.exclude(status=JobStatus.DONE).order_by("order").first()


def enqueue_subject(subject: Subject, queue=None) -> StageRun | None:
    """Enqueue the subject's first unfinished stage unless one is already queued/running."""
    if subject.stages.filter(status__in=ACTIVE_STATUSES).exists():
        return None
    run = next_stage(subject)
    if run is not None:
        enqueue_stage(run, queue)
    return run


def enqueue_cohort(cohort: Cohort, queue=None) -> int:
    """Enqueue every subject of ``cohort`` that has pending work; returns how many."""
    n = 0
    for subject in cohort.subjects.all():
        if subject.stages.filter(status=JobStatus.FAILED).exists():
            continue  # failed subjects wait for an explicit retry
        if enqueue_subject(subject, queue) is not None:
            n += 1
    return n


def retry_stage(run: StageRun, queue=None) -> None:
    """Reset ``run`` and every later stage of its subject to pending, then enqueue ``run``."""
    with transaction.atomic():
        StageRun.objects.filter(subject=run.subject, order__gt=run.order).update(
            status=JobStatus.PENDING, progress=0.0, error="", rq_job_id="", crashes=0)
        StageRun.objects.filter(pk=run.pk).update(crashes=0)
        enqueue_stage(run, queue)


def run_stage(run_id: int, job_id: str) -> str:
    """RQ entry point: claim stage row ``run_id`` for ``job_id``, run it, chain the next.

    Returns ``"done"``, ``"failed"`` or ``"skipped"`` (the row was not waiting for
    this job: duplicate delivery, superseded by a retry or already recovered).
    """
    rowjobs.start_job()
    if not rowjobs.claim(StageRun, run_id, job_id, progress=0.0):
        log.info("stage row %s: job is stale, skipped", run_id)
        return "skipped"
    run = StageRun.objects.select_related("subject__cohort").get(pk=run_id)
    stage = STAGE_BY_NAME.get(run.stage)
    last = [0.0]

    def progress(fraction: float) -> None:
        t = time.monotonic()
        if t - last[0] < 0.5 and fraction < 1.0:
            return
        last[0] = t
        StageRun.objects.filter(pk=run_id, rq_job_id=job_id).update(
            progress=max(0.0, min(1.0, float(fraction))), heartbeat=timezone.now())

    beat = rowjobs.Heartbeat.for_job(StageRun, run_id, job_id)
    try:
        if stage is None:
            raise ValueError(f"unknown stage {run.stage!r}")
        if shared_storage() is not None:  # the stage uploads its outputs itself
            for name in stage.inputs:
                pull_tree(subject_folder(run.subject, name))
        stage.fn(run.subject, StageContext(progress=progress))
    except Exception as exc:  # noqa: BLE001 — a failing subject must not stop the others
        msg = safe_message(exc)
        log.warning("subject %s stage %s failed: %s", run.subject.pseudonym, run.stage, msg)
        rowjobs.finish(StageRun, run_id, job_id, JobStatus.FAILED, error=msg)
        return "failed"
    finally:
        if beat is not None:
            beat.stop()
    with transaction.atomic():
        ok = rowjobs.finish(StageRun, run_id, job_id, JobStatus.DONE, progress=1.0, error="")
        if ok:
            nxt = next_stage(run.subject)
            if nxt is not None and nxt.status in (JobStatus.PENDING, JobStatus.FAILED):
                enqueue_stage(nxt)
    if ok and run.stage == "deidentify" and getattr(settings, "VIEWER_PREWARM", True) \
            and shared_storage() is None:
        # the subject page's viewer data (read once, cached), so its first view is fast; with
        # a shared storage the web server's DATA_DIR is not ours: it builds them itself
        try:
            prewarm(run.subject)
        except Exception as exc:  # noqa: BLE001 — the stage is done; the page builds it lazily
            log.warning("viewer data of subject row %s not prewarmed (%s)", run.subject_id,
                        type(exc).__name__)
    return "done"


def recover_stale_stages(stale_seconds: int | None = None, queue=None,
                         grace_seconds: int | None = None) -> list[int]:
    """Re-enqueue stages whose worker is gone or whose job is lost; returns the row ids.

    * ``running`` and abandoned (:func:`surveys.processing.rowjobs.abandoned`; ``stale_seconds``
      default :data:`surveys.processing.rowjobs.STALE_SECONDS`): re-queued, or failed with
      :data:`CRASH_MESSAGE` after :data:`surveys.processing.rowjobs.MAX_CRASHES` such ends in a row;
    * ``queued`` for longer than ``grace_seconds`` while Redis holds no job with the
      row's job id, or (at any age) whose job a worker that died took before claiming the
      row (:func:`surveys.processing.rowjobs.orphaned`): enqueued again.

    Each row is changed with a conditional UPDATE on the status and job id read here,
    so a row somebody changed meanwhile is left alone, and a late delivery of the old
    job finds its claim refused.
    """
    recovered = []
    for run in rowjobs.abandoned(StageRun.objects.select_related("subject"), stale_seconds):
        crashes = run.crashes + 1
        with transaction.atomic():
            if crashes >= rowjobs.MAX_CRASHES:
                if rowjobs.fail_if_owned(run, crashes=crashes,
                                         error=CRASH_MESSAGE.format(n=crashes)):
                    log.warning("stage row %s (%s of %s): its worker died %d times; failed",
                                run.pk, run.stage, run.subject.pseudonym, crashes)
            elif enqueue_stage(run, queue, expect=(JobStatus.RUNNING, run.rq_job_id)) is not None:
                StageRun.objects.filter(pk=run.pk).update(crashes=crashes)
                recovered.append(run.pk)
                log.warning("stage row %s (%s of %s) was abandoned by its worker; re-queued",
                            run.pk, run.stage, run.subject.pseudonym)
    q, lost = rowjobs.orphaned(StageRun.objects.select_related("subject"),
                               lambda: queue if queue is not None else get_pipeline_queue(),
                               grace_seconds)
    for run in lost:
        with transaction.atomic():
            if enqueue_stage(run, q, expect=(JobStatus.QUEUED, run.rq_job_id)) is not None:
                recovered.append(run.pk)
                log.warning("stage row %s (%s of %s) was queued but its job is lost (not in "
                            "Redis, or taken by a dead worker); enqueued again", run.pk, run.stage,
                            run.subject.pseudonym)
    return recovered


def cohort_progress(cohort: Cohort) -> dict[str, object]:
    """Counts of stage statuses and per-subject rows for the dashboard / terminal."""
    rows = []
    counts = {s.value: 0 for s in JobStatus}
    for subject in cohort.subjects.prefetch_related("stages"):
        stages = sorted(subject.stages.all(), key=lambda r: r.order)
        for r in stages:
            counts[r.status] = counts.get(r.status, 0) + 1
        rows.append({
            "pseudonym": subject.pseudonym,
            "stages": [{"stage": r.stage, "status": r.status, "progress": round(r.progress, 2),
                        "attempts": r.attempts, "error": r.error, "id": r.pk} for r in stages],
        })
    total = sum(counts.values())
    return {"counts": counts, "total": total, "subjects": rows,
            "complete": total > 0 and counts[JobStatus.DONE] == total,
            "settled": counts[JobStatus.QUEUED] == 0 and counts[JobStatus.RUNNING] == 0}
