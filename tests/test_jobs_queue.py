"""Pipeline jobs on fakeredis: enqueue, claim (no double processing), chain, failure, retry,
recovery of stages whose worker died. Jobs run in-process with rq's SimpleWorker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from rq import Queue, SimpleWorker

from surveys.cohorts.importing import import_folder
from surveys.models import Cohort, StageRun
from surveys.processing import jobs, rowjobs, stages


@pytest.fixture(scope="module")
def synth_src(synthetic_cohort) -> Path:
    return synthetic_cohort(2, seed=5)


@pytest.fixture()
def queue(fake_queue):
    return fake_queue


@pytest.fixture()
def cohort(db, settings, tmp_path, synth_src) -> Cohort:
    settings.DATA_DIR = tmp_path / "data"
    settings.PIPELINE_FACE_METHOD = "anatomical"
    settings.PIPELINE_RENDER_BACKEND = "raycast"
    owner = User.objects.create_user("owner", password="pw")
    c = Cohort.objects.create(name="c", owner=owner)
    src = tmp_path / "src"
    shutil.copytree(synth_src, src)
    import_folder(c, src, move=True)
    return c


def drain(queue: Queue, capture) -> None:
    """Run queued jobs until the queue is empty (on_commit enqueues fire between rounds)."""
    for _ in range(50):
        if not len(queue):
            return
        with capture(execute=True):
            SimpleWorker([queue], connection=queue.connection).work(burst=True)
    raise AssertionError("queue did not drain")


def test_enqueue_subject_pushes_first_stage_once(cohort, queue, django_capture_on_commit_callbacks):
    subject = cohort.subjects.first()
    with django_capture_on_commit_callbacks(execute=True):
        run = jobs.enqueue_subject(subject)
        again = jobs.enqueue_subject(subject)  # already queued: no second job
    assert run.stage == stages.STAGES[0].name and again is None
    run.refresh_from_db()
    assert run.status == "queued" and queue.job_ids == [run.rq_job_id]
    job = queue.fetch_job(run.rq_job_id)
    assert job.func_name == "surveys.processing.jobs.run_stage" and job.args == (run.pk, run.rq_job_id)
    assert "FAKE" not in repr(job.args)


def test_claim_makes_duplicate_and_stale_jobs_no_ops(cohort, queue, django_capture_on_commit_callbacks,
                                                     monkeypatch):
    calls = []
    monkeypatch.setitem(stages.STAGE_BY_NAME, "import",
                        stages.Stage("import", "Import", lambda s, ctx: calls.append(s.pk)))
    monkeypatch.setattr(jobs, "STAGE_BY_NAME", stages.STAGE_BY_NAME)
    subject = cohort.subjects.first()
    run = subject.stages.get(stage="import")
    with django_capture_on_commit_callbacks(execute=False):
        old = jobs.enqueue_stage(run)
        new = jobs.enqueue_stage(run)  # e.g. a retry: supersedes the first job
    assert jobs.run_stage(run.pk, old) == "skipped"
    assert jobs.run_stage(run.pk, new) == "done"
    assert jobs.run_stage(run.pk, new) == "skipped"  # delivered twice: runs once
    run.refresh_from_db()
    assert calls == [subject.pk] and run.attempts == 1 and run.status == "done"


@pytest.mark.slow
def test_whole_pipeline_runs_through_the_queue(cohort, queue, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.enqueue_cohort(cohort) == 2
    drain(queue, django_capture_on_commit_callbacks)
    runs = StageRun.objects.filter(subject__cohort=cohort)
    assert {r.status for r in runs} == {"done"}, [(r.stage, r.error) for r in runs]
    assert all(r.attempts == 1 and r.progress == 1.0 for r in runs)
    for subject in cohort.subjects.all():
        s = subject.series.get()
        assert s.method == "anatomical" and s.removed_ml > 0 and 0.99 < s.bone_dice <= 1.0
        kinds = sorted(subject.images.values_list("kind", "variant", "view"))
        assert ("render", "deid", "yaw+0") in kinds and ("slice", "original", "axial") in kinds
        assert len(subject.embedding_original) == len(subject.embedding_deid) == 128
    reid = cohort.reid
    assert reid.n_subjects == 2 and len(reid.cmc) == 2 and reid.cmc[-1] == 1.0


@pytest.mark.slow
def test_failure_does_not_block_other_subjects_and_retry_recovers(
        cohort, queue, django_capture_on_commit_callbacks, settings):
    bad, good = list(cohort.subjects.order_by("pseudonym"))
    series = bad.series.get()
    moved = Path(settings.DATA_DIR) / (series.original_dir + ".away")
    (Path(settings.DATA_DIR) / series.original_dir).rename(moved)
    with django_capture_on_commit_callbacks(execute=True):
        jobs.enqueue_cohort(cohort)
    drain(queue, django_capture_on_commit_callbacks)
    bad_import = bad.stages.get(stage="import")
    assert bad_import.status == "failed" and bad_import.error
    assert str(settings.DATA_DIR) not in bad_import.error  # no path in the message
    assert set(bad.stages.exclude(stage="import").values_list("status", flat=True)) == {"pending"}
    assert set(good.stages.values_list("status", flat=True)) == {"done"}
    # a failed subject is not re-queued by "run pending" but by an explicit retry
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.enqueue_cohort(cohort) == 0
    moved.rename(Path(settings.DATA_DIR) / series.original_dir)
    with django_capture_on_commit_callbacks(execute=True):
        jobs.retry_stage(bad_import)
    drain(queue, django_capture_on_commit_callbacks)
    assert set(bad.stages.values_list("status", flat=True)) == {"done"}
    assert bad.stages.get(stage="import").attempts == 2


@pytest.mark.slow
def test_retry_of_a_done_stage_replaces_outputs_and_resets_later_stages(
        cohort, queue, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        jobs.enqueue_cohort(cohort)
    drain(queue, django_capture_on_commit_callbacks)
    subject = cohort.subjects.first()
    deid = subject.stages.get(stage="deidentify")
    n_images = subject.images.count()
    with django_capture_on_commit_callbacks(execute=True):
        jobs.retry_stage(deid)
    later = subject.stages.filter(order__gt=deid.order)
    assert set(later.values_list("status", flat=True)) == {"pending"}
    drain(queue, django_capture_on_commit_callbacks)
    assert set(subject.stages.values_list("status", flat=True)) == {"done"}
    assert subject.images.count() == n_images  # replaced, not duplicated


def test_recover_stale_stages(cohort, queue, django_capture_on_commit_callbacks):
    import socket
    import subprocess
    import sys

    from django.utils import timezone

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    a, b = [s.stages.get(stage="import") for s in cohort.subjects.order_by("pseudonym")]
    host = socket.gethostname()
    StageRun.objects.filter(pk=a.pk).update(status="running", rq_job_id="old-a", worker_host=host,
                                            worker_pid=int(dead), heartbeat=timezone.now())
    import os
    StageRun.objects.filter(pk=b.pk).update(status="running", rq_job_id="old-b", worker_host=host,
                                            worker_pid=os.getpid(), heartbeat=timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        recovered = jobs.recover_stale_stages(stale_seconds=3600)
    assert recovered == [a.pk]  # the live one (this process) is left alone
    a.refresh_from_db()
    assert a.status == "queued" and a.rq_job_id != "old-a" and queue.job_ids == [a.rq_job_id]
    # a remote worker with an old heartbeat counts as dead too
    StageRun.objects.filter(pk=b.pk).update(worker_host="elsewhere",
                                            heartbeat=timezone.now() - timezone.timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.recover_stale_stages(stale_seconds=3600) == [b.pk]


@pytest.mark.django_db(transaction=True)
def test_heartbeat_is_refreshed_while_a_stage_runs(settings, tmp_path, monkeypatch):
    import time

    from surveys.models import Subject

    settings.DATA_DIR = tmp_path / "data"
    owner = User.objects.create_user("o", password="pw")
    c = Cohort.objects.create(name="c", owner=owner)
    subject = Subject.objects.create(cohort=c, pseudonym="SUBJ-0001", patient_key="k" * 64)
    run = StageRun.objects.create(subject=subject, stage="import", order=0)
    seen = []

    def slow(subject, ctx):  # busy until three beats were seen (no fixed sleep: load-proof)
        deadline = time.monotonic() + 20
        while len(set(seen)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
            seen.append(StageRun.objects.get(pk=run.pk).heartbeat)

    monkeypatch.setattr(rowjobs, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setitem(stages.STAGE_BY_NAME, "import", stages.Stage("import", "Import", slow))
    monkeypatch.setattr(jobs, "enqueue_stage", lambda r, queue=None: "")
    StageRun.objects.filter(pk=run.pk).update(status="queued", rq_job_id="j1")
    assert jobs.run_stage(run.pk, "j1") == "done"
    assert len(set(seen)) >= 3  # the heartbeat moved while the stage function was busy
    assert seen == sorted(seen)


def test_zombie_worker_counts_as_dead():
    import os
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until it exited, not reaped: a zombie
        with open(f"/proc/{p.pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.01)
    else:
        pytest.fail("the child did not exit")
    try:
        assert not rowjobs.pid_alive(p.pid)
    finally:
        p.wait()
    assert rowjobs.pid_alive(os.getpid())


# ------------------------------------------------------------------ queued rows without a job


def _age_queued(run: StageRun, seconds: float) -> None:
    from datetime import timedelta

    from django.utils import timezone

    StageRun.objects.filter(pk=run.pk).update(queued_at=timezone.now() - timedelta(seconds=seconds))


def test_queued_stage_without_a_job_is_enqueued_again_once_after_the_grace(
        cohort, queue, django_capture_on_commit_callbacks, monkeypatch):
    calls = []
    monkeypatch.setitem(stages.STAGE_BY_NAME, "import",
                        stages.Stage("import", "Import", lambda s, ctx: calls.append(s.pk)))
    monkeypatch.setattr(jobs, "STAGE_BY_NAME", stages.STAGE_BY_NAME)
    run = cohort.subjects.order_by("pseudonym").first().stages.get(stage="import")
    with django_capture_on_commit_callbacks(execute=False):  # committed, never enqueued
        lost = jobs.enqueue_stage(run)
    assert queue.job_ids == []
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.recover_stale_stages(grace_seconds=120) == []  # fresh: within the grace
    assert queue.job_ids == []
    _age_queued(run, 180)
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.recover_stale_stages(grace_seconds=120) == [run.pk]
    run.refresh_from_db()
    assert run.status == "queued" and run.rq_job_id != lost and queue.job_ids == [run.rq_job_id]
    _age_queued(run, 180)  # its job is in the queue now: never a second one
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.recover_stale_stages(grace_seconds=0) == []
    assert queue.job_ids == [run.rq_job_id]
    with django_capture_on_commit_callbacks(execute=False):  # (the next stage is not run)
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    assert jobs.run_stage(run.pk, lost) == "skipped"  # the lost job, delivered late after all
    run.refresh_from_db()
    assert run.status == "done" and run.attempts == 1 and calls == [run.subject_id]


@pytest.mark.parametrize("where", ["queued", "scheduled", "started"])
def test_queued_stage_whose_job_redis_holds_is_left_alone(
        cohort, queue, django_capture_on_commit_callbacks, where):
    from datetime import UTC, datetime, timedelta

    from rq.executions import Execution

    run = cohort.subjects.order_by("pseudonym").first().stages.get(stage="import")
    with django_capture_on_commit_callbacks(execute=True):
        job_id = jobs.enqueue_stage(run)
    job = queue.fetch_job(job_id)
    if where == "scheduled":
        queue.remove(job)
        queue.scheduled_job_registry.schedule(job, datetime.now(UTC) + timedelta(hours=1))
    elif where == "started":  # a worker took it and has not claimed the row yet
        queue.remove(job)
        with queue.connection.pipeline() as pipe:
            Execution.create(job, ttl=600, pipeline=pipe)
            pipe.execute()
        assert job_id in queue.started_job_registry.get_job_ids(cleanup=False)
    assert job_id in rowjobs.jobs_in_redis(queue)
    _age_queued(run, 3600)
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.recover_stale_stages(grace_seconds=120) == []
    run.refresh_from_db()
    assert run.status == "queued" and run.rq_job_id == job_id
    assert queue.job_ids == ([job_id] if where == "queued" else [])


@pytest.mark.parametrize("worker_state", ["dead", "alive", "unregistered"])
def test_queued_stage_taken_by_a_worker_that_died_is_enqueued_again_at_once(
        cohort, queue, django_capture_on_commit_callbacks, worker_state):
    """A worker killed between RQ's dequeue and the row's claim leaves the row ``queued``
    with a job in the started registry: recovery (e.g. the restarted worker's start) must
    not wait for the grace period or RQ's clean-up, unless that worker is alive."""
    import os
    import subprocess
    import sys

    from rq.executions import Execution
    from rq.worker import Worker

    run = cohort.subjects.order_by("pseudonym").first().stages.get(stage="import")
    with django_capture_on_commit_callbacks(execute=True):
        job_id = jobs.enqueue_stage(run)
    job = queue.fetch_job(job_id)
    queue.remove(job)  # dequeued ...
    with queue.connection.pipeline() as pipe:  # ... and started by worker "w1"
        Execution.create(job, ttl=600, pipeline=pipe, worker_name="w1")
        pipe.execute()
    if worker_state != "unregistered":
        w = Worker([queue], name="w1", connection=queue.connection)
        w.register_birth()
        pid = os.getpid()
        if worker_state == "dead":
            child = subprocess.Popen([sys.executable, "-c", "pass"])
            child.wait()  # reaped: its pid no longer exists
            pid = child.pid
        queue.connection.hset(w.key, "pid", pid)
    expect_lost = worker_state != "alive"
    assert (job_id in rowjobs.jobs_held_by_dead_workers(queue)) == expect_lost
    with django_capture_on_commit_callbacks(execute=True):  # the row is seconds old
        recovered = jobs.recover_stale_stages(grace_seconds=120)
    run.refresh_from_db()
    if expect_lost:
        assert recovered == [run.pk] and run.status == "queued" and run.rq_job_id != job_id
        assert queue.job_ids == [run.rq_job_id]
    else:
        assert recovered == [] and run.rq_job_id == job_id and queue.job_ids == []


def test_heartbeat_survives_a_failed_beat(monkeypatch, caplog):
    """One failing beat (e.g. a briefly locked database) must not end the heartbeats of a
    long job: recovery would then take it for abandoned and run it a second time."""
    import threading
    import time

    beats: list[float] = []
    calls = {"n": 0}
    lock = threading.Lock()

    class _Rows:
        def update(self, **kw):
            with lock:
                calls["n"] += 1
                if calls["n"] <= 2:
                    raise RuntimeError("database is locked")
                beats.append(time.monotonic())
            return 1

    class _Model:
        __name__ = "FakeRun"

        class objects:  # mimics a Django manager
            @staticmethod
            def filter(**kw):
                return _Rows()

    monkeypatch.setattr(rowjobs, "HEARTBEAT_SECONDS", 0.02)
    beat = rowjobs.Heartbeat(_Model, 1, "job")
    deadline = time.monotonic() + 5
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    beat.stop()
    assert len(beats) >= 3 and calls["n"] >= 5
    assert "retrying" in caplog.text
