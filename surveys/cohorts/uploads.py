"""Web uploads of DICOM, imported by a background RQ job.

The request (:func:`receive_upload`) only stores the streamed files in a private
folder ``DATA_DIR/tmp/upload-<random>/received/`` (:func:`surveys.cohorts.importing.receive_uploaded_files`),
creates a :class:`~surveys.models.CohortUpload` row (``queued``) and enqueues
:func:`run_upload` after the transaction commits. The job

1. claims the row with a conditional UPDATE (``queued`` and its current job id), so a
   duplicate or superseded job does nothing;
2. runs :func:`surveys.cohorts.importing.import_received` (all the safety checks, all or
   nothing); the row becomes ``done`` with its counts *in the import's transaction*,
   and the new subjects' first stages are enqueued in that transaction too;
3. on :class:`~surveys.cohorts.importing.ImportRejected` marks the row ``failed`` with the
   rejection's message (it never holds a path or a header value); on any other error
   with a generic message (the log gets the exception class and the code locations,
   not the message, which may carry paths or header values);
4. deletes the received files, except after an unexpected error: then they are kept
   for :data:`KEEP_FAILED_SECONDS` so the researcher can press *Retry*.

An import killed mid-way leaves the row ``running`` and nothing committed (the
received files are never modified); :func:`recover_uploads` (run by
:class:`deidstudy.rq.RecoveringWorker`) queues it again, or marks it failed when
its files are gone — a failed upload without files cannot be retried, it has to be
uploaded again. It also enqueues again an upload left ``queued`` without a job in
Redis (request killed between the commit and the enqueue, Redis down or flushed).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from pipeline.errors import safe_message

from ..models import Cohort, CohortUpload, JobStatus
from ..processing import jobs, rowjobs
from ..storage.paths import data_path, data_root, tmp_root
from .importing import (
    ImportRejected,
    ImportResult,
    import_received,
    receive_uploaded_files,
)
from .overlap import matches

log = logging.getLogger(__name__)

#: Received files of an upload that failed unexpectedly are kept this long (seconds) for a retry.
KEEP_FAILED_SECONDS = int(getattr(settings, "UPLOAD_KEEP_FAILED_SECONDS", 86400))
#: Shown while the import is queued or running.
RECEIVED_MESSAGE = "upload received, importing in the background"
GONE_MESSAGE = "the uploaded files are no longer available; upload them again"
#: Shown for an import whose worker died ``n`` times in a row (files kept: Retry).
CRASH_MESSAGE = ("the worker process importing this upload stopped {n} times in a row (killed, "
                 "out of memory?); nothing was imported; see the worker log, then Retry")
#: Shown while the import waits for the job queue (Redis unreachable when it was queued).
QUEUE_DOWN_MESSAGE = ("upload received and kept; the job queue is not reachable at the moment, "
                      "the import starts by itself when it is back")
#: A waiting upload is pushed again by the status poll at most this often (seconds).
PUSH_RETRY_SECONDS = 15
#: Name prefix of the staging folders in ``DATA_DIR/tmp`` (see :func:`recover_uploads`).
STAGING_PREFIX = "web-upload-"


class _Superseded(Exception):
    """The row was re-queued for another job while this one ran: roll back."""


def get_import_queue():
    """The RQ queue of import jobs (``settings.IMPORT_QUEUE``, by default the pipeline queue)."""
    name = getattr(settings, "IMPORT_QUEUE", settings.PIPELINE_QUEUE)
    if name == settings.PIPELINE_QUEUE:
        return jobs.get_pipeline_queue()
    import django_rq

    return django_rq.get_queue(name)


def _staging_path(rel: str) -> Path:
    return data_path(rel)


def receive_upload(cohort: Cohort, user, files: list) -> CohortUpload:
    """Store the uploaded files, record the upload and queue its import; returns the row.

    Raises :class:`ImportRejected` (nothing stored, no row) for an empty or too large
    upload; everything else is checked by the job. When Redis cannot be reached the row
    is recorded all the same, with its files kept and :data:`QUEUE_DOWN_MESSAGE` (it is
    enqueued when Redis is back); the received files are deleted only if no row was
    committed.
    """
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=tmp_root()))  # mode 0700
    committed: list[bool] = []
    try:
        n, size = receive_uploaded_files(files, staging)
        with transaction.atomic():
            transaction.on_commit(lambda: committed.append(True))  # runs before the push
            upload = CohortUpload.objects.create(
                cohort=cohort, uploaded_by=user if getattr(user, "pk", None) else None,
                n_received=n, bytes_received=size, message=RECEIVED_MESSAGE,
                staging_dir=staging.relative_to(data_root()).as_posix(),
                staging_host=socket.gethostname()[:255])
            enqueue_upload(upload)
    except BaseException:
        if not committed:  # a recorded upload keeps its files (the recovery handles it)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("cohort %s: upload #%s received (%d files), import queued", cohort.pk, upload.pk, n)
    return upload


def enqueue_upload(upload: CohortUpload, queue=None, *,
                   expect: tuple[str, str] | None = None) -> str | None:
    """Mark ``upload`` queued with a fresh job id and enqueue its import after the commit.

    Returns the job id. With ``expect=(status, job_id)`` the row is changed only if it
    still has that status and job id (conditional UPDATE); otherwise None, nothing queued.
    """
    job_id = f"upload-{upload.pk}-{secrets.token_hex(6)}"
    if not rowjobs.mark_queued(upload, job_id, expect=expect, message=RECEIVED_MESSAGE):
        return None

    def push() -> None:
        # ahead of queued stages: the researcher is watching "importing…"
        if not rowjobs.push_job(lambda: queue if queue is not None else get_import_queue(),
                        "surveys.cohorts.uploads.run_upload", upload.pk, job_id, job_id=job_id,
                        at_front=True,
                        job_timeout=int(getattr(settings, "PIPELINE_JOB_TIMEOUT", 3600)),
                        result_ttl=3600, failure_ttl=7 * 86400):
            # Redis is unreachable: the row stays queued, its files are kept, and the
            # status poll (push_waiting) or the recovery enqueues it when Redis is back
            CohortUpload.objects.filter(pk=upload.pk, rq_job_id=job_id,
                                        status=JobStatus.QUEUED).update(message=QUEUE_DOWN_MESSAGE)
            upload.message = QUEUE_DOWN_MESSAGE

    transaction.on_commit(push)
    return job_id


def push_waiting(cohort: Cohort, queue=None) -> list[int]:
    """Enqueue again the cohort's uploads that wait for the job queue (their push failed),
    at most every :data:`PUSH_RETRY_SECONDS`; returns the ids pushed successfully.

    Called by the cohort's status poll, so an import starts as soon as Redis is back
    while somebody watches; the recovery of the workers does it otherwise.
    """
    cutoff = timezone.now() - timedelta(seconds=PUSH_RETRY_SECONDS)
    pushed = []
    for up in cohort.uploads.filter(status=JobStatus.QUEUED, message=QUEUE_DOWN_MESSAGE,
                                    queued_at__lt=cutoff):
        with transaction.atomic():
            if enqueue_upload(up, queue, expect=(JobStatus.QUEUED, up.rq_job_id)) is None:
                continue  # somebody else pushed it meanwhile
        up.refresh_from_db(fields=["message"])
        if up.message != QUEUE_DOWN_MESSAGE:
            pushed.append(up.pk)
    return pushed


def retry_upload(upload: CohortUpload, queue=None) -> bool:
    """Queue a failed upload again if its received files are still there.

    Returns False (and forgets the files) when they are gone: the upload has to be
    repeated.
    """
    if upload.status != JobStatus.FAILED:
        return False
    if _received_dir(upload) is None:
        if upload.staging_dir:  # gone from disk: no Retry button any more
            CohortUpload.objects.filter(pk=upload.pk).update(staging_dir="")
            upload.staging_dir = ""
        return False
    with transaction.atomic():
        CohortUpload.objects.filter(pk=upload.pk).update(crashes=0)
        enqueue_upload(upload, queue)
    return True


def _received_dir(upload: CohortUpload) -> Path | None:
    """The folder of the upload's received files, or None when it does not exist (here)."""
    if not upload.staging_dir:
        return None
    try:
        staging = _staging_path(upload.staging_dir)
    except ValueError:  # never follow a stored path out of DATA_DIR
        return None
    return staging if (staging / "received").is_dir() else None


def _elsewhere(upload: CohortUpload) -> bool:
    """True when the upload's files were received on another machine and are not visible here."""
    if upload.staging_host in ("", socket.gethostname()[:255]):
        return False
    try:
        return not (upload.staging_dir and _staging_path(upload.staging_dir).is_dir())
    except ValueError:
        return False


def _remove_staging(upload: CohortUpload) -> None:
    if upload.staging_dir:
        try:
            shutil.rmtree(_staging_path(upload.staging_dir), ignore_errors=True)
        except ValueError:  # a stored path outside DATA_DIR: never delete it
            log.warning("upload #%s: staging folder outside the data folder not removed", upload.pk)
    CohortUpload.objects.filter(pk=upload.pk).update(staging_dir="")
    upload.staging_dir = ""


def _unexpected_message(exc: BaseException) -> str:
    """An identifier-free reason for an error that is not a rejection
    (:func:`pipeline.errors.safe_message`; library texts are not trusted here)."""
    reason = safe_message(exc, trust_value_errors=False, internal="see the worker log")
    return f"the import failed: {reason}; nothing was imported"


def _done_message(result: ImportResult, already_elsewhere: int = 0) -> str:
    msg = (f"imported {len(result.subjects)} subject(s), {result.n_series} series, "
           f"{result.n_files} files; processing started")
    if already_elsewhere:
        verb = "is" if already_elsewhere == 1 else "are"
        msg += (f"; {already_elsewhere} of these patients {verb} already in another of your "
                "cohorts under another pseudonym (pseudonyms are per cohort): see “Patients "
                "also in your other cohorts” below")
    return msg


def run_upload(upload_id: int, job_id: str) -> str:
    """RQ entry point: import upload ``upload_id`` for ``job_id`` and queue its subjects.

    Returns ``"done"``, ``"failed"`` or ``"skipped"`` (the row was not waiting for
    this job).
    """
    rowjobs.start_job()
    if not rowjobs.claim(CohortUpload, upload_id, job_id):
        log.info("upload #%s: job is stale, skipped", upload_id)
        return "skipped"
    upload = CohortUpload.objects.select_related("cohort").get(pk=upload_id)
    cohort = upload.cohort
    staging = _received_dir(upload)
    if staging is None:
        if _elsewhere(upload):  # keep staging_dir: a worker on that machine deletes the files
            msg = ("the uploaded files are not on this worker's machine; run a worker of the "
                   "import queue on the web server (see the README) and upload them again")
            rowjobs.finish(CohortUpload, upload_id, job_id, JobStatus.FAILED, message=msg)
        else:
            rowjobs.finish(CohortUpload, upload_id, job_id, JobStatus.FAILED,
                           message=GONE_MESSAGE, staging_dir="")
        log.warning("upload #%s of cohort %s: received files missing", upload_id, cohort.pk)
        return "failed"

    def commit_with_import(result: ImportResult) -> None:
        new = list(cohort.subjects.filter(pseudonym__in=result.subjects))
        known = len({m.pseudonym for m in matches(upload.uploaded_by, cohort, new)}) \
            if upload.uploaded_by is not None else 0
        if not rowjobs.finish(CohortUpload, upload_id, job_id, JobStatus.DONE,
                              message=_done_message(result, known),
                              n_subjects=len(result.subjects), n_series=result.n_series,
                              n_files=result.n_files):
            raise _Superseded()
        for subject in cohort.subjects.filter(pseudonym__in=result.subjects):
            jobs.enqueue_subject(subject)

    beat = rowjobs.Heartbeat.for_job(CohortUpload, upload_id, job_id)
    try:
        result = import_received(cohort, staging, before_commit=commit_with_import)
    except _Superseded:  # the files belong to the newer job
        log.info("upload #%s: re-queued by another job while importing; rolled back", upload_id)
        return "skipped"
    except ImportRejected as exc:  # deterministic: a retry would fail the same way
        if _fail(upload_id, job_id, str(exc)):
            _remove_staging(upload)
        log.info("upload #%s of cohort %s refused: %s", upload_id, cohort.pk, exc)
        return "failed"
    except Exception as exc:  # noqa: BLE001 — reported as a status, never as a traceback
        _fail(upload_id, job_id, _unexpected_message(exc))  # files kept for a retry
        log.error("upload #%s of cohort %s failed with %s (message omitted: it may hold paths or "
                  "header values)\n%s", upload_id, cohort.pk, exc.__class__.__name__,
                  "".join(traceback.format_tb(exc.__traceback__)).rstrip())
        return "failed"
    finally:
        if beat is not None:
            beat.stop()
    _remove_staging(upload)
    log.info("upload #%s of cohort %s: imported %d subject(s)", upload_id, cohort.pk,
             len(result.subjects))
    return "done"


def _fail(upload_id: int, job_id: str, message: str) -> bool:
    """Mark the upload failed if this job still owns it; returns whether it did."""
    return rowjobs.finish(CohortUpload, upload_id, job_id, JobStatus.FAILED,
                          message=message[:1000])


def recover_uploads(stale_seconds: int | None = None, keep_failed_seconds: int | None = None,
                    queue=None, grace_seconds: int | None = None) -> list[int]:
    """Re-queue imports whose worker died or whose job is lost; clean up received files.

    * ``running`` uploads whose worker ran on this host and is gone, or whose heartbeat
      is older than ``stale_seconds`` (default ``PIPELINE_STALE_SECONDS``): queued again
      when their received files are still there, otherwise failed (upload again); failed
      (files kept, Retry) when their worker died ``MAX_CRASHES`` times in a row;
    * ``queued`` uploads older than ``grace_seconds`` (default
      ``PIPELINE_QUEUED_GRACE_SECONDS``) whose job Redis does not hold: queued again
      (the job itself decides about missing files);
    * ``done`` uploads whose received files were not deleted (worker killed after the
      commit): the files are deleted;
    * ``failed`` uploads older than ``keep_failed_seconds`` (default
      :data:`KEEP_FAILED_SECONDS`): the received files are deleted (no retry any more).

    Returns the ids of the re-queued uploads.
    """
    keep_failed_seconds = KEEP_FAILED_SECONDS if keep_failed_seconds is None else keep_failed_seconds
    now = timezone.now()
    requeued: list[int] = []
    for up in rowjobs.abandoned(CohortUpload.objects.all(), stale_seconds):
        if _elsewhere(up):
            continue  # only a worker that sees the received files decides about them
        # conditional on the status and job id read above: a row somebody touched
        # meanwhile is left alone
        crashes = up.crashes + 1
        with transaction.atomic():
            if _received_dir(up) is not None and crashes >= rowjobs.MAX_CRASHES:
                if rowjobs.fail_if_owned(up, crashes=crashes,
                                         message=CRASH_MESSAGE.format(n=crashes)):  # files kept
                    log.warning("upload #%s: its worker died %d times; failed", up.pk, crashes)
            elif _received_dir(up) is not None:
                if enqueue_upload(up, queue, expect=(JobStatus.RUNNING, up.rq_job_id)) is not None:
                    CohortUpload.objects.filter(pk=up.pk).update(crashes=crashes)
                    requeued.append(up.pk)
                    log.warning("upload #%s was abandoned by its worker; re-queued", up.pk)
            elif rowjobs.fail_if_owned(
                    up, message="the import was interrupted and " + GONE_MESSAGE, staging_dir=""):
                log.warning("upload #%s was abandoned by its worker; its files are gone", up.pk)
    q, lost = rowjobs.orphaned(CohortUpload.objects.all(),
                               lambda: queue if queue is not None else get_import_queue(),
                               grace_seconds, created_field="created")
    for up in lost:
        with transaction.atomic():
            if enqueue_upload(up, q, expect=(JobStatus.QUEUED, up.rq_job_id)) is not None:
                requeued.append(up.pk)
                log.warning("upload #%s was queued but its job is lost; enqueued again", up.pk)
    old_failed = Q(status=JobStatus.FAILED,
                   finished__lt=now - timedelta(seconds=keep_failed_seconds))
    for up in CohortUpload.objects.exclude(staging_dir="").filter(Q(status=JobStatus.DONE)
                                                                  | old_failed):
        if not _elsewhere(up):
            _remove_staging(up)
    _remove_unrecorded_staging(max(keep_failed_seconds, 3600))  # never a request's in progress
    return requeued


def _remove_unrecorded_staging(older_than_seconds: int) -> None:
    """Delete staging folders older than ``older_than_seconds`` that no upload row refers to
    (a web request killed between storing the files and recording the upload)."""
    root = tmp_root()
    known = set(CohortUpload.objects.exclude(staging_dir="").values_list("staging_dir", flat=True))
    limit = time.time() - older_than_seconds
    for d in root.glob(f"{STAGING_PREFIX}*"):
        rel = d.relative_to(data_root()).as_posix()
        if d.is_dir() and rel not in known and d.stat().st_mtime < limit:
            log.warning("removing received upload files that no upload refers to")
            shutil.rmtree(d, ignore_errors=True)


def recent_uploads(cohort: Cohort, limit: int = 10) -> list[CohortUpload]:
    """The cohort's ``limit`` most recent uploads, newest first."""
    return list(cohort.uploads.select_related("uploaded_by")[:limit])


def upload_rows(cohort: Cohort, limit: int = 10) -> list[dict[str, object]]:
    """The cohort's most recent uploads as JSON-ready rows (no identifier, no path)."""
    rows = []
    for up in recent_uploads(cohort, limit):
        rows.append({
            "id": up.pk, "status": up.status, "message": up.message,
            "received": up.created.isoformat(), "n_received": up.n_received,
            "n_subjects": up.n_subjects, "n_series": up.n_series, "n_files": up.n_files,
            "by": up.uploaded_by.get_username() if up.uploaded_by else "",
            "retryable": up.retryable, "active": up.active,
        })
    return rows
