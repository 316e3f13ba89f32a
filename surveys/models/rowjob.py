"""Rows run by a background job: the status values and the fields of the protocol.

A :class:`RowJob` row (a subject's pipeline stage, a web upload's import) is queued
with a fresh RQ job id; only the job holding that id may claim it (``queued`` →
``running``), beat its heartbeat and finish it. The protocol itself — enqueue if
unchanged, claim, heartbeat, finish, recovery of abandoned and orphaned rows — is
implemented once, in :mod:`surveys.processing.rowjobs`.
"""

from __future__ import annotations

from django.db import models

__all__ = ["ACTIVE_STATUSES", "STATUS_CHOICES_NO_PENDING", "JobStatus", "RowJob"]


class JobStatus(models.TextChoices):
    """Status of a row run by a job (the stored value is shown as is)."""

    PENDING = "pending", "pending"  # waits for an earlier stage (stages only)
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    DONE = "done", "done"
    FAILED = "failed", "failed"


#: Choices of rows that are queued as soon as they exist (uploads, power estimates).
STATUS_CHOICES_NO_PENDING = [(s.value, s.label) for s in JobStatus if s != JobStatus.PENDING]

#: A row in one of these is waiting for or held by a job.
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


class RowJob(models.Model):
    """The job fields shared by every row a background job runs (abstract).

    Subclasses add ``status`` (a :class:`JobStatus`, with their own default and choices)
    and their message field.
    """

    attempts = models.PositiveIntegerField(default=0)
    crashes = models.PositiveSmallIntegerField(
        default=0, help_text="times in a row its worker died while running it (reset by Retry)")
    rq_job_id = models.CharField(max_length=64, blank=True)
    worker_host = models.CharField(max_length=255, blank=True)
    worker_pid = models.IntegerField(null=True, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @property
    def active(self) -> bool:
        """True while the row waits for its job or the job runs."""
        return self.status in ACTIVE_STATUSES
