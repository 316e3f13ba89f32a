"""One implementation of "a database row run by an RQ job" (stages and uploads).

State lives in the row (a :class:`surveys.models.RowJob`); Redis only carries "run
row #N with token T". The protocol:

* **enqueue** (:func:`mark_queued` + :func:`push_job` after the commit): the row gets
  ``queued`` and a fresh job id; any older job of the row becomes stale. With
  ``expect=(status, job_id)`` the row changes only if it still has that status and
  job id (a conditional UPDATE: recovery never overrides somebody else's change).
  When Redis cannot be reached the row stays ``queued`` and recovery pushes it again.
* **claim** (:func:`claim`): ``queued`` + the job's id → ``running`` with this
  process's host and pid; a duplicate or stale delivery claims nothing.
* **heartbeat** (:class:`Heartbeat`) while running, so a long job on another host is
  not taken for abandoned; **finish** (:func:`finish`) only while the job owns the row.
* **recovery**: :func:`abandoned` rows (``running``, and the worker process on this
  host is gone or the heartbeat is older than :data:`STALE_SECONDS`) and
  :func:`orphaned` rows (``queued`` longer than :data:`QUEUED_GRACE_SECONDS` without a
  job in Redis, or whose job a dead worker took before claiming the row); the caller decides what to do with each (re-queue, or fail after
  :data:`MAX_CRASHES` deaths in a row, see :func:`fail_if_owned`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import F, Q, QuerySet
from django.utils import timezone
from redis.exceptions import RedisError
from rq.executions import Execution
from rq.worker import Worker

from ..models import JobStatus, RowJob

log = logging.getLogger(__name__)

#: A running row whose heartbeat is older than this (seconds) counts as abandoned.
STALE_SECONDS = int(getattr(settings, "PIPELINE_STALE_SECONDS", 1800))
#: Interval of the heartbeat of a running row (seconds); must be well below STALE_SECONDS.
HEARTBEAT_SECONDS = 30.0
#: A row whose worker died this many times in a row is failed, not re-queued (a job
#: that kills its worker, e.g. out of memory, must not loop forever).
MAX_CRASHES = int(getattr(settings, "PIPELINE_MAX_CRASHES", 3))
#: A row queued longer than this (seconds) whose job Redis does not hold is enqueued again.
QUEUED_GRACE_SECONDS = int(getattr(settings, "PIPELINE_QUEUED_GRACE_SECONDS", 120))
#: Why a push to Redis can fail (server down, refused, timed out, DNS).
QUEUE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

#: Failed pushes of the current request/command, when it collects them (:func:`push_failures`).
_push_failures: ContextVar[list[str] | None] = ContextVar("push_failures", default=None)


def this_host() -> str:
    """The host name stored in ``worker_host`` (at most 255 characters)."""
    return socket.gethostname()[:255]


@contextmanager
def push_failures() -> Iterator[list[str]]:
    """Collect the job ids whose push to Redis failed inside the block (after commit)::

        with rowjobs.push_failures() as failed:
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


def push_job(queue_getter: Callable[[], Any], func: str, *args: Any, job_id: str,
             **options: Any) -> bool:
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


def jobs_in_redis(queue: Any) -> set[str]:
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


def jobs_held_by_dead_workers(queue: Any) -> set[str]:
    """Ids of jobs a worker took from ``queue`` (its started registry) and will never run
    to the end: the worker's process on this host no longer exists, the worker is no longer
    registered, or the entry's heartbeat expired (90 s without a beat by default).

    Such a job may never have claimed its row (killed between RQ's dequeue and the claim):
    the row still says ``queued`` with this job id, and only this check tells it is lost
    before RQ's own clean-up, which can take the job's whole timeout.
    """
    registry = queue.started_job_registry
    out = set(registry.get_expired_job_ids())
    host = this_host()
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        if job_id in out:
            continue
        try:
            name = Execution.fetch(execution_id, job_id, queue.connection).worker_name
        except ValueError:  # the execution record expired with its worker
            out.add(job_id)
            continue
        if not name:
            continue
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name,
                                    connection=queue.connection)
        if worker is None or ((worker.hostname or "")[:255] == host and worker.pid
                              and not pid_alive(worker.pid)):
            out.add(job_id)
    return out


def mark_queued(row: RowJob, job_id: str, *, expect: tuple[str, str] | None = None,
                **fields: Any) -> bool:
    """Set ``row`` ``queued`` with ``job_id`` (and ``fields``), clearing the last run's
    worker and times; with ``expect=(status, job_id)`` only if the row still has them.
    Returns whether the row changed (the in-memory ``row`` is updated too)."""
    rows = type(row).objects.filter(pk=row.pk)
    if expect is not None:
        rows = rows.filter(status=expect[0], rq_job_id=expect[1])
    n = rows.update(status=JobStatus.QUEUED, rq_job_id=job_id, queued_at=timezone.now(),
                    started=None, finished=None, worker_pid=None, worker_host="",
                    heartbeat=None, **fields)
    if n != 1:
        return False
    row.status, row.rq_job_id = JobStatus.QUEUED, job_id
    for name, value in fields.items():
        setattr(row, name, value)
    return True


def start_job() -> None:
    """At the start of a job: drop database connections a forked work horse inherited
    (not inside a transaction: tests run jobs inside one)."""
    if not connection.in_atomic_block:
        close_old_connections()


def claim(model: type[RowJob], row_id: int, job_id: str, **fields: Any) -> bool:
    """``queued`` with ``job_id`` → ``running`` on this host and process; False when the
    job is stale (duplicate delivery, superseded by a retry, already recovered)."""
    now = timezone.now()
    n = model.objects.filter(pk=row_id, status=JobStatus.QUEUED, rq_job_id=job_id).update(
        status=JobStatus.RUNNING, attempts=F("attempts") + 1, started=now, heartbeat=now,
        finished=None, worker_pid=os.getpid(), worker_host=this_host(), **fields)
    return n == 1


def owned(model: type[RowJob], row_id: int, job_id: str) -> QuerySet:
    """The row, if job ``job_id`` still runs it (``running`` with that job id)."""
    return model.objects.filter(pk=row_id, rq_job_id=job_id, status=JobStatus.RUNNING)


def finish(model: type[RowJob], row_id: int, job_id: str, status: JobStatus,
           **fields: Any) -> bool:
    """End the run of job ``job_id`` with ``status`` (``done``/``failed``) if it still owns
    the row; returns whether it did."""
    return owned(model, row_id, job_id).update(status=status, finished=timezone.now(),
                                               **fields) == 1


def fail_if_owned(row: RowJob, **fields: Any) -> bool:
    """Fail a ``running`` row seen by the recovery if nobody changed it since (status and
    job id as read); returns whether it did."""
    return owned(type(row), row.pk, row.rq_job_id).update(
        status=JobStatus.FAILED, finished=timezone.now(), **fields) == 1


class Heartbeat:
    """Background thread refreshing ``heartbeat`` of a running row every
    :data:`HEARTBEAT_SECONDS` while job ``job_id`` owns it. Use :meth:`for_job`."""

    def __init__(self, model: type[RowJob], row_id: int, job_id: str) -> None:
        self._model = model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(row_id, job_id), daemon=True)
        self._thread.start()

    @classmethod
    def for_job(cls, model: type[RowJob], row_id: int, job_id: str) -> Heartbeat | None:
        """A running heartbeat, or None inside a transaction (tests run jobs inside one:
        the thread's own connection would not see the row)."""
        return None if connection.in_atomic_block else cls(model, row_id, job_id)

    def _loop(self, row_id: int, job_id: str) -> None:
        failures = 0
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    owned(self._model, row_id, job_id).update(heartbeat=timezone.now())
                    failures = 0
                except Exception as exc:  # noqa: BLE001 — a missed beat is not fatal: try again
                    # (one failure, e.g. a briefly locked SQLite file, used to end the beats
                    # for the rest of the job, so recovery could take a long job for abandoned)
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        log.warning("heartbeat of %s row %s failed (%s, %d in a row); retrying",
                                    self._model.__name__, row_id, type(exc).__name__, failures)
                    connection.close()  # reconnect on the next beat
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def pid_alive(pid: int) -> bool:
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


def abandoned(rows: QuerySet, stale_seconds: int | None = None) -> Iterator[RowJob]:
    """The ``running`` rows of ``rows`` whose worker is gone: it ran on this host and its
    process no longer exists, or (any host) its heartbeat is older than ``stale_seconds``
    (default :data:`STALE_SECONDS`)."""
    stale_seconds = STALE_SECONDS if stale_seconds is None else stale_seconds
    host = this_host()
    cutoff = timezone.now() - timedelta(seconds=stale_seconds)
    for row in rows.filter(status=JobStatus.RUNNING).filter(
            Q(worker_host=host) | Q(heartbeat__lt=cutoff)):
        dead = row.worker_host == host and row.worker_pid and not pid_alive(row.worker_pid)
        if dead or (row.heartbeat is not None and row.heartbeat < cutoff):
            yield row


def orphaned(rows: QuerySet, queue_getter: Callable[[], Any],
             grace_seconds: int | None = None, *,
             created_field: str | None = None) -> tuple[Any, list[RowJob]]:
    """``(queue, rows)``: the ``queued`` rows of ``rows`` whose job will not run: older than
    ``grace_seconds`` (default :data:`QUEUED_GRACE_SECONDS`) with no job in Redis, or — at
    any age — whose job a dead worker took (:func:`jobs_held_by_dead_workers`).

    A row without ``queued_at`` counts as old, or, with ``created_field``, when that time
    is older. Redis is asked only when a row is queued (``queue`` is None otherwise).
    """
    grace_seconds = QUEUED_GRACE_SECONDS if grace_seconds is None else grace_seconds
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)

    def old(row: RowJob) -> bool:
        if row.queued_at is not None:
            return row.queued_at < cutoff
        return created_field is None or getattr(row, created_field) < cutoff

    queued = list(rows.filter(status=JobStatus.QUEUED))
    if not queued:
        return None, []  # no Redis round trip in the common case
    queue = queue_getter()
    present = jobs_in_redis(queue)  # read after the rows: a job enqueued since is seen
    dead = jobs_held_by_dead_workers(queue)
    lost = [r for r in queued
            if r.rq_job_id in dead or (old(r) and r.rq_job_id not in present)]
    return queue, lost
