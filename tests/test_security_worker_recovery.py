"""A dead job is re-queued at once on the same host (issue 11, item 6, first part).

Integration: a real redis-server and a real ``RecoveringWorker``; the forked work horse
running a stage is killed (SIGKILL), the worker stays: the stage is re-queued within
seconds (before: it stayed ``running`` until the next maintenance pass, 10 minutes, and
Retry refused "already running") and the subject completes. Unit: a stage or upload whose
worker keeps dying is failed after ``MAX_CRASHES`` instead of looping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import fakeredis
import pytest
from django.contrib.auth.models import User
from rq import Queue

from tests.e2e.procs import start_platform


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_killed_work_horse_is_requeued_at_once(tmp_path):
    from tests.factories.dicom_cohorts import write_synthetic_cohort

    plat = start_platform(tmp_path / "var")
    try:
        src = tmp_path / "src"
        write_synthetic_cohort(src, 1, size="tiny", seed=1)
        plat.manage("import_cohort", str(src), "--name", "horse", "--owner", "alice", "--enqueue")
        cohort = plat.query("SELECT id FROM surveys_cohort WHERE name = 'horse'")[0][0]
        worker = plat.start_worker("w")
        t0 = time.monotonic()
        while True:
            running = plat.query("SELECT id, worker_pid FROM surveys_stagerun "
                                 "WHERE status = 'running' AND stage = 'surfaces'")
            if running:
                break
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        run_id, horse = running[0]
        assert horse != worker.pid  # the forked work horse, not the worker
        os.kill(horse, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            row = plat.query("SELECT status, attempts, worker_pid FROM surveys_stagerun "
                             "WHERE id = ?", (run_id,))[0]
            if row[0] in ("queued", "done") or (row[0] == "running" and row[2] != horse):
                break
            assert time.monotonic() - killed < 15, f"still {row} 15 s after the horse died"
            time.sleep(0.1)
        requeued_after = time.monotonic() - killed
        rows = plat.wait_settled(cohort, timeout_s=150)
        assert {r[2] for r in rows} == {"done"}
        assert {r[1]: r[3] for r in rows}["surfaces"] == 2
        assert worker.poll() is None  # the same worker carried on
        crashes = plat.query("SELECT crashes FROM surveys_stagerun WHERE id = ?", (run_id,))[0][0]
        assert crashes == 1
        print(f"re-queued {requeued_after:.2f} s after the work horse was killed")
    finally:
        plat.stop()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.django_db
def test_a_stage_whose_worker_keeps_dying_is_failed(settings, tmp_path,
                                                    django_capture_on_commit_callbacks):
    from surveys.models import Cohort, StageRun, Subject
    from surveys.processing import jobs, rowjobs

    settings.DATA_DIR = tmp_path / "data"
    q = Queue("pipeline", connection=fakeredis.FakeStrictRedis())
    owner = User.objects.create_user("o")
    subject = Subject.objects.create(cohort=Cohort.objects.create(name="c", owner=owner),
                                     pseudonym="SUBJ-0001", patient_key="k")
    run = StageRun.objects.create(subject=subject, stage="surfaces", order=2)
    host = socket.gethostname()[:255]
    for n in range(1, rowjobs.MAX_CRASHES + 1):
        StageRun.objects.filter(pk=run.pk).update(status="running", rq_job_id=f"j{n}",
                                                  worker_pid=_dead_pid(), worker_host=host,
                                                  attempts=n)
        with django_capture_on_commit_callbacks(execute=True):
            recovered = jobs.recover_stale_stages(queue=q)
        run.refresh_from_db()
        if n < rowjobs.MAX_CRASHES:
            assert recovered == [run.pk] and run.status == "queued" and run.crashes == n
        else:
            assert recovered == [] and run.status == "failed" and run.crashes == n
            assert "stopped 3 times in a row" in run.error
    # Retry starts counting again
    with django_capture_on_commit_callbacks(execute=True):
        jobs.retry_stage(run, queue=q)
    run.refresh_from_db()
    assert run.status == "queued" and run.crashes == 0


@pytest.mark.django_db
def test_an_upload_whose_worker_keeps_dying_is_failed_and_kept(settings, tmp_path,
                                                               django_capture_on_commit_callbacks):
    from surveys.cohorts import uploads
    from surveys.models import Cohort, CohortUpload
    from surveys.processing import rowjobs

    settings.DATA_DIR = tmp_path / "data"
    (tmp_path / "data" / "tmp" / "web-upload-x" / "received").mkdir(parents=True)
    (tmp_path / "data" / "tmp" / "web-upload-x" / "received" / "000001").write_bytes(b"x")
    q = Queue("pipeline", connection=fakeredis.FakeStrictRedis())
    owner = User.objects.create_user("o")
    up = CohortUpload.objects.create(cohort=Cohort.objects.create(name="c", owner=owner),
                                     staging_dir="tmp/web-upload-x", staging_host=socket.gethostname())
    for n in range(1, rowjobs.MAX_CRASHES + 1):
        CohortUpload.objects.filter(pk=up.pk).update(status="running", rq_job_id=f"j{n}",
                                                     worker_pid=_dead_pid(),
                                                     worker_host=socket.gethostname()[:255])
        with django_capture_on_commit_callbacks(execute=True):
            uploads.recover_uploads(queue=q)
        up.refresh_from_db()
        assert up.status == ("queued" if n < rowjobs.MAX_CRASHES else "failed")
    assert "stopped 3 times in a row" in up.message and up.retryable
    with django_capture_on_commit_callbacks(execute=True):
        assert uploads.retry_upload(up, queue=q)
    up.refresh_from_db()
    assert up.status == "queued" and up.crashes == 0
