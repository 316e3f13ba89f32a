"""RQ worker class for deidstudy: recovers stages abandoned by dead workers.

Start workers with::

    python manage.py rqworker pipeline --worker-class deidstudy.rq.RecoveringWorker

At start-up, at every maintenance pass (``--maintenance-interval`` seconds, rq's
default 600) and as soon as one of its work horses dies mid-job the worker calls
:func:`surveys.processing.jobs.recover_stale_stages`, which
re-enqueues stages whose worker process died (same host) or whose heartbeat is
stale (any host), and stages left ``queued`` for longer than
``PIPELINE_QUEUED_GRACE_SECONDS`` without their job in Redis; and
:func:`surveys.cohorts.uploads.recover_uploads`, which does the same for upload imports and
deletes received upload files that are no longer needed.
Database connections are closed before the worker forks a work horse, so parent and
child never share a connection.
"""

from __future__ import annotations

import logging

from rq.worker import Worker

log = logging.getLogger(__name__)


class RecoveringWorker(Worker):
    """An :class:`rq.Worker` that re-queues abandoned pipeline stages and uploads: at every
    maintenance pass, and at once when its own work horse dies mid-job."""

    def run_maintenance_tasks(self) -> None:
        """rq's maintenance, then the recovery of stages and uploads."""
        super().run_maintenance_tasks()
        self.recover()

    def recover(self) -> None:
        """:func:`surveys.processing.jobs.recover_stale_stages` and
        :func:`surveys.cohorts.uploads.recover_uploads`."""
        from django.db import connections

        # late: rq loads this worker class by name, possibly before Django's apps are ready
        from surveys.cohorts.uploads import recover_uploads
        from surveys.processing.jobs import recover_stale_stages

        try:
            recover_stale_stages()
        except Exception:
            log.exception("stage recovery failed")
        try:
            recover_uploads()
        except Exception:
            log.exception("upload recovery failed")
        finally:
            connections.close_all()

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage) -> None:
        """The work horse died (killed, out of memory…) while running ``job``: its row is
        still ``running`` with the dead horse's pid, so recover now instead of at the next
        maintenance pass (up to ``--maintenance-interval`` later). The horse has been reaped,
        so the recovery sees its process gone."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        log.warning("work horse of job %s died; recovering its row now", job.id)
        self.recover()

    def fork_work_horse(self, job, queue) -> None:  # type: ignore[override]
        """Close Django DB connections before forking (each process opens its own)."""
        from django.db import connections

        connections.close_all()
        super().fork_work_horse(job, queue)
