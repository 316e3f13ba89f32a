"""An upload during a Redis outage (issue 11, item 5): no 500, the researcher is told, the
files are kept with the upload row, and the import runs once Redis answers again — from
the cohort page's status poll or from a worker's recovery. Retrying a stage or running
the pipeline during an outage is no 500 either."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import fakeredis
import pytest
import redis
from django.contrib.auth.models import Group, User
from django.utils import timezone
from rq import Queue

from surveys.cohorts import uploads
from surveys.models import Cohort, CohortUpload, StageRun, Subject
from surveys.processing import jobs
from tests.e2e.procs import free_port
from tests.factories.dicom_cohorts import write_synthetic_cohort, zip_folder

# real commits: the pushes to Redis happen on commit, inside the request as in production
pytestmark = pytest.mark.django_db(transaction=True)


class Switch:
    """The queue the platform sees: a Redis nobody listens on, then a working one."""

    def __init__(self) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # no connection retries: redis-py's default back-off only makes the test slower
        self.down = Queue("pipeline", connection=redis.Redis(
            port=free_port(), socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)))
        self.up = Queue("pipeline", connection=fakeredis.FakeStrictRedis())
        self.current = self.down

    def __call__(self) -> Queue:
        return self.current


@pytest.fixture()
def world(settings, tmp_path, monkeypatch):
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.PIPELINE_FACE_METHOD = "anatomical"
    settings.PIPELINE_RENDER_BACKEND = "raycast"  # no OpenGL in the test process
    user = User.objects.create_user("r", password="pw")
    user.groups.add(Group.objects.create(name="researcher"))
    cohort = Cohort.objects.create(name="c", owner=user)
    cohort.researchers.add(user)
    switch = Switch()
    monkeypatch.setattr(jobs, "get_pipeline_queue", switch)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 1, size="tiny", seed=5)
    return {"user": user, "cohort": cohort, "queue": switch,
            "zip": zip_folder(src, tmp_path / "up.zip")}


def staging_files(up: CohortUpload, settings) -> list[Path]:
    return list((Path(settings.DATA_DIR) / up.staging_dir / "received").iterdir())


def test_upload_during_outage_is_kept_and_imported_when_redis_is_back(
        client, world, settings):
    c = world["cohort"]
    client.force_login(world["user"])
    with open(world["zip"], "rb") as fh:
        r = client.post(f"/cohorts/{c.pk}/upload/", {"files": fh},
                        HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] and body["queue_unavailable"]
    assert "job queue is not reachable" in body["message"]
    up = CohortUpload.objects.get(pk=body["upload"]["id"])
    assert up.status == "queued" and up.message == uploads.QUEUE_DOWN_MESSAGE
    assert len(staging_files(up, settings)) == 1  # the files are kept
    # the page says so too, and polling while Redis is still down changes nothing
    page = client.get(f"/cohorts/{c.pk}/").content.decode()
    assert "job queue is not reachable" in page
    CohortUpload.objects.filter(pk=up.pk).update(queued_at=timezone.now() - timedelta(minutes=1))
    status = client.get(f"/cohorts/{c.pk}/status.json").json()
    assert status["uploads"][0]["message"] == uploads.QUEUE_DOWN_MESSAGE
    # Redis is back: the next poll (15 s after the last attempt) queues the import
    world["queue"].current = world["queue"].up
    CohortUpload.objects.filter(pk=up.pk).update(queued_at=timezone.now() - timedelta(minutes=1))
    client.get(f"/cohorts/{c.pk}/status.json")
    up.refresh_from_db()
    assert up.message == uploads.RECEIVED_MESSAGE and world["queue"].up.job_ids == [up.rq_job_id]
    # the import job itself (not the pipeline it then queues)
    assert uploads.run_upload(up.pk, up.rq_job_id) == "done"
    up.refresh_from_db()
    assert up.status == "done" and up.n_subjects == 1 and c.subjects.count() == 1


def test_recovery_queues_a_waiting_upload_too(client, world, settings):
    client.force_login(world["user"])
    with open(world["zip"], "rb") as fh:
        r = client.post(f"/cohorts/{world['cohort'].pk}/upload/", {"files": fh})
    assert r.status_code == 302  # a plain form post: back to the cohort page with the warning
    follow = client.get(r["Location"]).content.decode()
    assert "job queue is not reachable" in follow
    up = CohortUpload.objects.get()
    world["queue"].current = world["queue"].up
    CohortUpload.objects.filter(pk=up.pk).update(queued_at=timezone.now() - timedelta(hours=1))
    assert uploads.recover_uploads(queue=world["queue"].up) == [up.pk]
    up.refresh_from_db()
    assert up.status == "queued" and len(staging_files(up, settings)) == 1
    assert world["queue"].up.job_ids == [up.rq_job_id]


def test_stage_retry_and_run_during_outage_say_so(client, world):
    c = world["cohort"]
    subject = Subject.objects.create(cohort=c, pseudonym="SUBJ-0001", patient_key="k")
    run = StageRun.objects.create(subject=subject, stage="import", status="failed", order=0)
    StageRun.objects.create(subject=subject, stage="deidentify", order=1)
    client.force_login(world["user"])
    r = client.post(f"/cohorts/{c.pk}/stages/{run.pk}/retry/", follow=True)
    assert r.status_code == 200 and "job queue is not reachable" in r.content.decode()
    run.refresh_from_db()
    assert run.status == "queued"  # recorded; the recovery enqueues it when Redis is back
    StageRun.objects.filter(pk=run.pk).update(status="pending")
    r = client.post(f"/cohorts/{c.pk}/run/", follow=True)
    assert r.status_code == 200 and "job queue is not reachable" in r.content.decode()
