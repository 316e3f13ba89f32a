"""RQ jobs of the per-subject pipeline: enqueue, claim, run, chain, retry and recover.

State lives in :class:`surveys.models.StageRun` (one row per subject and stage);
Redis only carries "run stage row #N with token T". A job first *claims* its row
with a conditional UPDATE (``status=queued`` and the row's current job id), so a
duplicate or stale job — e.g. re-delivered after a worker died — does nothing, and
two workers on one queue never process the same stage twice. On success the next
stage of the subject is enqueued; on failure the row gets a readable error and the
other subjects carry on. :func:`recover_stale_stages` puts stages whose worker
died back in the queue, and stages left ``queued`` without a job in Redis (the
process died between the commit and the enqueue, or Redis lost the job) — run by
:class:`deidstudy.rq.RecoveringWorker` at start-up and at every maintenance pass.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from redis.exceptions import RedisError

from .models import Cohort, StageRun, Subject
from .shared import pull_tree, shared_storage
from .stages import STAGE_BY_NAME, StageContext, subject_folder

log = logging.getLogger(__name__)

#: A running stage whose heartbeat is older than this (seconds) counts as abandoned.
STALE_SECONDS = int(getattr(settings, "PIPELINE_STALE_SECONDS", 1800))
#: Interval of the heartbeat of a running stage (seconds); must be well below STALE_SECONDS.
HEARTBEAT_SECONDS = 30.0
#: A stage (or upload) whose worker died this many times in a row is failed, not re-queued
#: (a job that kills its worker, e.g. out of memory, must not loop forever).
MAX_CRASHES = int(getattr(settings, "PIPELINE_MAX_CRASHES", 3))
#: The reason shown for such a stage.
CRASH_MESSAGE = ("the worker process running this stage stopped {n} times in a row (killed, out "
                 "of memory?); see the worker log, then Retry")
#: A row queued longer than this (seconds) whose job Redis does not hold is enqueued again.
QUEUED_GRACE_SECONDS = int(getattr(settings, "PIPELINE_QUEUED_GRACE_SECONDS", 120))


#: Failed pushes of the current request/command, when it collects them (:func:`push_failures`).
_push_failures: ContextVar[list[str] | None] = ContextVar("push_failures", default=None)
#: Why a push to Redis can fail (server down, refused, timed out, DNS).
QUEUE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


@contextmanager
def push_failures():
    """Collect the job ids whose push to Redis failed inside the block (after commit)::

        with jobs.push_failures() as failed:
            with transaction.atomic():
                jobs.retry_stage(run)
        if failed: …  # tell the user the queue is unreachable

    A failed push never raises: the row stays ``queued`` and is enqueued again by the
    recovery (``RecoveringWorker``) once Redis answers and the grace period has passed.
    """
    failed: list[str] = []
    token = _push_failures.set(failed)
    try:
        yield failed
    finally:
        _push_failures.reset(token)


def push_job(queue_getter, func: str, *args, job_id: str, **options) -> bool:
    """Enqueue ``func(*args)`` as ``job_id`` on the queue ``queue_getter()`` returns;
    returns False (logged, recorded for :func:`push_failures`) when Redis cannot be reached.

    Inside a :func:`push_failures` block, once a push failed the following ones are not
    tried (each attempt waits for redis-py's connection retries)."""
    failed = _push_failures.get()
    if failed:
        failed.append(job_id)
        return False
    try:
        queue_getter().enqueue(func, *args, job_id=job_id, **options)
        return True
    except QUEUE_ERRORS as exc:
        log.warning("job %s could not be queued (%s: Redis unreachable?); the row stays queued "
                    "and is enqueued again by the recovery", job_id, type(exc).__name__)
        if failed is not None:
            failed.append(job_id)
        return False


def get_pipeline_queue():
    """The RQ queue of the pipeline (``settings.PIPELINE_QUEUE`` via django-rq)."""
    import django_rq

    return django_rq.get_queue(settings.PIPELINE_QUEUE)


def _safe_error(exc: BaseException) -> str:
    """A one-line reason for the dashboard; OS errors lose their paths."""
    if isinstance(exc, OSError):
        return f"file system error: {exc.strerror or exc.__class__.__name__}"
    if isinstance(exc, ValueError) and str(exc):
        return str(exc).splitlines()[0][:500]
    return f"internal error ({exc.__class__.__name__}); see the worker log"


def jobs_in_redis(queue) -> set[str]:
    """Ids of the jobs ``queue`` still holds: deferred, scheduled, ready, queued, being
    dequeued or started (not finished, failed or cancelled ones).

    Read in the order a job moves through these places, so a job that moves on while
    we look is seen in the next one.
    """
    ids: set[str] = set()
    for registry in (queue.deferred_job_registry, queue.scheduled_job_registry,
                     queue.ready_job_registry):
        ids.update(registry.get_job_ids(cleanup=False))
    ids.update(queue.get_job_ids())
    ids.update(queue.intermediate_queue.get_job_ids())
    ids.update(queue.started_job_registry.get_job_ids(cleanup=False))
    return ids


def enqueue_stage(run: StageRun, queue=None, *, expect: tuple[str, str] | None = None) -> str | None:
    """Mark ``run`` queued with a fresh job id and enqueue it after the transaction commits.

    Returns the job id. Any older job of this row becomes stale (its claim fails). When
    Redis cannot be reached the row stays queued (see :func:`push_job`).
    With ``expect=(status, job_id)`` the row is changed only if it still has that
    status and job id (a conditional UPDATE, for recovery); otherwise nothing is
    enqueued and None is returned.
    """
    job_id = f"stage-{run.pk}-{secrets.token_hex(6)}"
    rows = StageRun.objects.filter(pk=run.pk)
    if expect is not None:
        rows = rows.filter(status=expect[0], rq_job_id=expect[1])
    n = rows.update(
        status="queued", rq_job_id=job_id, progress=0.0, error="", queued_at=timezone.now(),
        started=None, finished=None, worker_pid=None, worker_host="")
    if expect is not None and n != 1:
        return None
    run.status, run.rq_job_id = "queued", job_id

    def push() -> None:
        push_job(lambda: queue if queue is not None else get_pipeline_queue(),
                 "surveys.jobs.run_stage", run.pk, job_id, job_id=job_id,
                 job_timeout=int(getattr(settings, "PIPELINE_JOB_TIMEOUT", 3600)),
                 result_ttl=3600, failure_ttl=7 * 86400)

    transaction.on_commit(push)
    return job_id


def next_stage(subject: Subject) -> StageRun | None:
    """The first stage of ``subject`` that is not done (None when all are done)."""
    return subject.stages.exclude(status="done").order_by("order").first()


def enqueue_subject(subject: Subject, queue=None) -> StageRun | None:
    """Enqueue the subject's first unfinished stage unless one is already queued/running."""
    if subject.stages.filter(status__in=("queued", "running")).exists():
        return None
    run = next_stage(subject)
    if run is not None:
        enqueue_stage(run, queue)
    return run


def enqueue_cohort(cohort: Cohort, queue=None) -> int:
    """Enqueue every subject of ``cohort`` that has pending work; returns how many."""
    n = 0
    for subject in cohort.subjects.all():
        if subject.stages.filter(status="failed").exists():
            continue  # failed subjects wait for an explicit retry
        if enqueue_subject(subject, queue) is not None:
            n += 1
    return n


def retry_stage(run: StageRun, queue=None) -> None:
    """Reset ``run`` and every later stage of its subject to pending, then enqueue ``run``."""
    with transaction.atomic():
        StageRun.objects.filter(subject=run.subject, order__gt=run.order).update(
            status="pending", progress=0.0, error="", rq_job_id="", crashes=0)
        StageRun.objects.filter(pk=run.pk).update(crashes=0)
        enqueue_stage(run, queue)


def _claim(run_id: int, job_id: str) -> bool:
    now = timezone.now()
    n = StageRun.objects.filter(pk=run_id, status="queued", rq_job_id=job_id).update(
        status="running", attempts=F("attempts") + 1, started=now, heartbeat=now,
        finished=None, progress=0.0, worker_pid=os.getpid(), worker_host=socket.gethostname()[:255])
    return n == 1


def run_stage(run_id: int, job_id: str) -> str:
    """RQ entry point: claim stage row ``run_id`` for ``job_id``, run it, chain the next.

    Returns ``"done"``, ``"failed"`` or ``"skipped"`` (the row was not waiting for
    this job: duplicate delivery, superseded by a retry or already recovered).
    """
    from django.db import close_old_connections, connection

    if not connection.in_atomic_block:  # (tests run jobs inside a transaction)
        close_old_connections()
    if not _claim(run_id, job_id):
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

    from django.db import connection

    beat = None if connection.in_atomic_block else _Heartbeat(run_id, job_id)
    try:
        if stage is None:
            raise ValueError(f"unknown stage {run.stage!r}")
        if shared_storage() is not None:  # the stage uploads its outputs itself
            for name in stage.inputs:
                pull_tree(subject_folder(run.subject, name))
        stage.fn(run.subject, StageContext(progress=progress))
    except Exception as exc:  # noqa: BLE001 — a failing subject must not stop the others
        msg = _safe_error(exc)
        log.warning("subject %s stage %s failed: %s", run.subject.pseudonym, run.stage, msg)
        StageRun.objects.filter(pk=run_id, rq_job_id=job_id).update(
            status="failed", error=msg, finished=timezone.now())
        return "failed"
    finally:
        if beat is not None:
            beat.stop()
    with transaction.atomic():
        n = StageRun.objects.filter(pk=run_id, rq_job_id=job_id, status="running").update(
            status="done", progress=1.0, finished=timezone.now(), error="")
        if n == 1:
            nxt = next_stage(run.subject)
            if nxt is not None and nxt.status in ("pending", "failed"):
                enqueue_stage(nxt)
    if n == 1 and run.stage == "deidentify" and getattr(settings, "VIEWER_PREWARM", True) \
            and shared_storage() is None:
        # the subject page's viewer data (read once, cached), so its first view is fast; with
        # a shared storage the web server's DATA_DIR is not ours: it builds them itself
        from .viewer import prewarm

        try:
            prewarm(run.subject)
        except Exception as exc:  # noqa: BLE001 — the stage is done; the page builds it lazily
            log.warning("viewer data of subject row %s not prewarmed (%s)", run.subject_id,
                        type(exc).__name__)
    return "done"


class _Heartbeat:
    """Background thread refreshing ``heartbeat`` of a running row every ``HEARTBEAT_SECONDS``,
    so a long stage (or upload import, ``model=CohortUpload``) on another host is not
    mistaken for an abandoned one."""

    def __init__(self, run_id: int, job_id: str, model=StageRun) -> None:
        import threading

        self._model = model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(run_id, job_id), daemon=True)
        self._thread.start()

    def _loop(self, run_id: int, job_id: str) -> None:
        from django.db import connection

        failures = 0
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    self._model.objects.filter(pk=run_id, rq_job_id=job_id, status="running").update(
                        heartbeat=timezone.now())
                    failures = 0
                except Exception as exc:  # noqa: BLE001 — a missed beat is not fatal: try again
                    # (one failure, e.g. a briefly locked SQLite file, used to end the beats
                    # for the rest of the job, so recovery could take a long job for abandoned)
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        log.warning("heartbeat of %s row %s failed (%s, %d in a row); retrying",
                                    self._model.__name__, run_id, type(exc).__name__, failures)
                    connection.close()  # reconnect on the next beat
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed work horse may linger as a zombie until someone reaps it
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def recover_stale_stages(stale_seconds: int | None = None, queue=None,
                         grace_seconds: int | None = None) -> list[int]:
    """Re-enqueue stages whose worker is gone or whose job is lost; returns the row ids.

    * ``running`` and abandoned: its worker ran on this host and its process no longer
      exists, or (any host) its heartbeat is older than ``stale_seconds`` (default
      :data:`STALE_SECONDS`); after :data:`MAX_CRASHES` such ends in a row it is failed
      with :data:`CRASH_MESSAGE` instead;
    * ``queued`` for longer than ``grace_seconds`` (default :data:`QUEUED_GRACE_SECONDS`)
      while Redis holds no job with the row's job id (see :func:`jobs_in_redis`).

    Each row is re-queued with a conditional UPDATE on the status and job id read here,
    so a row somebody changed meanwhile is left alone, and a late delivery of the old
    job finds its claim refused.
    """
    stale_seconds = STALE_SECONDS if stale_seconds is None else stale_seconds
    host = socket.gethostname()[:255]
    cutoff = timezone.now() - timedelta(seconds=stale_seconds)
    recovered = []
    for run in StageRun.objects.filter(status="running").filter(
            Q(worker_host=host) | Q(heartbeat__lt=cutoff)).select_related("subject"):
        dead = run.worker_host == host and run.worker_pid and not _pid_alive(run.worker_pid)
        if dead or (run.heartbeat is not None and run.heartbeat < cutoff):
            crashes = run.crashes + 1
            with transaction.atomic():
                if crashes >= MAX_CRASHES:
                    if StageRun.objects.filter(pk=run.pk, status="running",
                                               rq_job_id=run.rq_job_id).update(
                            status="failed", crashes=crashes, finished=timezone.now(),
                            error=CRASH_MESSAGE.format(n=crashes)):
                        log.warning("stage row %s (%s of %s): its worker died %d times; failed",
                                    run.pk, run.stage, run.subject.pseudonym, crashes)
                elif enqueue_stage(run, queue, expect=("running", run.rq_job_id)) is not None:
                    StageRun.objects.filter(pk=run.pk).update(crashes=crashes)
                    recovered.append(run.pk)
                    log.warning("stage row %s (%s of %s) was abandoned by its worker; re-queued",
                                run.pk, run.stage, run.subject.pseudonym)
    recovered += _recover_orphaned_queued(queue, grace_seconds)
    return recovered


def _recover_orphaned_queued(queue, grace_seconds: int | None) -> list[int]:
    """Re-enqueue ``queued`` stage rows older than the grace period whose job Redis lacks."""
    grace_seconds = QUEUED_GRACE_SECONDS if grace_seconds is None else grace_seconds
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    rows = list(StageRun.objects.filter(status="queued").filter(
        Q(queued_at__lt=cutoff) | Q(queued_at__isnull=True)).select_related("subject"))
    if not rows:
        return []  # no Redis round trip in the common case
    q = queue if queue is not None else get_pipeline_queue()
    present = jobs_in_redis(q)  # read after the rows: a job enqueued since is seen
    recovered = []
    for run in rows:
        if run.rq_job_id and run.rq_job_id in present:
            continue
        with transaction.atomic():
            if enqueue_stage(run, q, expect=("queued", run.rq_job_id)) is not None:
                recovered.append(run.pk)
                log.warning("stage row %s (%s of %s) was queued without a job in Redis; "
                            "enqueued again", run.pk, run.stage, run.subject.pseudonym)
    return recovered


def cohort_progress(cohort: Cohort) -> dict[str, object]:
    """Counts of stage statuses and per-subject rows for the dashboard / terminal."""
    rows = []
    counts = {s: 0 for s in ("pending", "queued", "running", "done", "failed")}
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
            "complete": total > 0 and counts["done"] == total,
            "settled": counts["queued"] == 0 and counts["running"] == 0}
