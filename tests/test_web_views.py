"""Dashboard views and permissions: anonymous users, raters (non-researchers) and
researchers of another cohort never reach a cohort page, file or download."""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from pathlib import Path

import fakeredis
import numpy as np
import pydicom
import pytest
from django.contrib.auth.models import Group, User
from rq import SimpleWorker

from pipeline.atomic import atomic_write_bytes
from pipeline.preview import png_bytes
from surveys.access import RESEARCHER_GROUP
from surveys.cohorts.importing import import_folder
from surveys.models import Cohort, CohortUpload, ReidSummary, RenderImage, StageRun
from surveys.storage.paths import data_path
from tests.factories.dicom_cohorts import FAKE_MARKER, write_synthetic_cohort, zip_folder


@pytest.fixture(scope="module")
def synth_src(synthetic_cohort) -> Path:
    return synthetic_cohort(2, seed=11)


@pytest.fixture()
def queue(fake_queue):
    return fake_queue


@pytest.fixture()
def env(db, settings, tmp_path, synth_src, queue):
    settings.DATA_DIR = tmp_path / "data"
    settings.PIPELINE_FACE_METHOD = "anatomical"
    settings.PIPELINE_RENDER_BACKEND = "raycast"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast tests
    group = Group.objects.create(name=RESEARCHER_GROUP)
    owner = User.objects.create_user("owner", password="pw")
    other = User.objects.create_user("other", password="pw")
    rater = User.objects.create_user("rater", password="pw")
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    owner.groups.add(group)
    other.groups.add(group)
    cohort = Cohort.objects.create(name="mine", owner=owner, keep_mapping=True)
    cohort.researchers.add(owner)
    other_cohort = Cohort.objects.create(name="theirs", owner=other)
    other_cohort.researchers.add(other)
    src = tmp_path / "src"
    shutil.copytree(synth_src, src)
    import_folder(cohort, src, move=True)
    subject = cohort.subjects.order_by("pseudonym").first()
    rel = "cohorts/x/derived/img.png"
    atomic_write_bytes(data_path(rel), png_bytes(np.zeros((8, 8), np.uint8)))
    img = RenderImage.objects.create(subject=subject, kind="render", variant="deid", view="yaw+0",
                                     path=rel)
    ReidSummary.objects.create(cohort=cohort, n_subjects=2, rank1=0.5, auc=0.5, cmc=[0.5, 1.0],
                               plot_path=rel)
    run = subject.stages.first()
    StageRun.objects.filter(pk=run.pk).update(status="failed", error="x")
    # a failed upload whose received files are still kept (retryable)
    staging = Path(settings.DATA_DIR) / "tmp" / "upload-test"
    (staging / "received").mkdir(parents=True)
    (staging / "received" / "000001").write_bytes(b"x")
    upload = CohortUpload.objects.create(cohort=cohort, uploaded_by=owner, status="failed",
                                         message="the import failed because of an internal error",
                                         staging_dir="tmp/upload-test", n_received=1)
    theirs = CohortUpload.objects.create(cohort=other_cohort, uploaded_by=other, status="failed",
                                         message="their upload failed", staging_dir="tmp/upload-test")
    return {"cohort": cohort, "subject": subject, "image": img, "run": run, "owner": owner,
            "other": other, "rater": rater, "staff": staff, "queue": queue, "upload": upload,
            "their_upload": theirs}


def cohort_urls(env) -> list[tuple[str, str, str]]:
    """(method, url, kind) of every cohort-scoped endpoint; kind page/file."""
    c, s, img, run = env["cohort"].pk, env["subject"].pseudonym, env["image"].pk, env["run"].pk
    up = env["upload"].pk
    return [
        ("get", f"/cohorts/{c}/", "page"),
        ("get", f"/cohorts/{c}/status.json", "file"),
        ("post", f"/cohorts/{c}/upload/", "file"),
        ("post", f"/cohorts/{c}/uploads/{up}/retry/", "file"),
        ("post", f"/cohorts/{c}/run/", "file"),
        ("post", f"/cohorts/{c}/stages/{run}/retry/", "file"),
        ("get", f"/cohorts/{c}/subjects/{s}/", "page"),
        ("get", f"/cohorts/{c}/images/{img}.png", "file"),
        ("get", f"/cohorts/{c}/reid-cmc.png", "file"),
        ("get", f"/cohorts/{c}/download/qa.csv", "file"),
        ("get", f"/cohorts/{c}/download/deidentified.zip", "file"),
        ("get", f"/cohorts/{c}/mapping/", "page"),
        ("post", f"/cohorts/{c}/mapping/", "page"),
    ]


def test_anonymous_is_refused_everywhere(client, env):
    for method, url, kind in cohort_urls(env):
        r = getattr(client, method)(url)
        assert r.status_code == 403, url
        if kind == "page":  # a page that says why, with a sign-in link back here
            assert b"Sign in required" in r.content and b"/accounts/login/?next=" in r.content, url
        else:
            assert b"Sign in required" not in r.content, url
    r = client.get("/cohorts/")
    assert r.status_code == 403 and b"/accounts/login/?next=%2Fcohorts%2F" in r.content


@pytest.mark.parametrize("who", ["rater", "other", "staff"])
def test_other_users_get_404_on_every_cohort_url(client, env, who):
    client.force_login(env[who])
    for method, url, _ in cohort_urls(env):
        r = getattr(client, method)(url)
        assert r.status_code == 404, (who, url, r.status_code)
        assert FAKE_MARKER.encode() not in r.content
    # nothing was changed by the refused POSTs
    assert StageRun.objects.get(pk=env["run"].pk).status == "failed"
    assert CohortUpload.objects.get(pk=env["upload"].pk).status == "failed"
    assert env["cohort"].uploads.count() == 1
    assert env["queue"].count == 0


def test_uploads_are_shown_only_to_researchers_of_their_cohort(client, env,
                                                               django_capture_on_commit_callbacks):
    c = env["cohort"].pk
    client.force_login(env["other"])
    # their own cohort's page and status list only their upload
    theirs = env["their_upload"].cohort_id
    status = client.get(f"/cohorts/{theirs}/status.json").json()
    assert [u["id"] for u in status["uploads"]] == [env["their_upload"].pk]
    # another cohort's upload cannot be retried through one's own cohort either
    r = client.post(f"/cohorts/{theirs}/uploads/{env['upload'].pk}/retry/")
    assert r.status_code == 404
    client.force_login(env["owner"])
    status = client.get(f"/cohorts/{c}/status.json").json()
    assert [u["id"] for u in status["uploads"]] == [env["upload"].pk]
    assert status["uploads"][0]["by"] == "owner" and status["uploads"][0]["retryable"]
    page = client.get(f"/cohorts/{c}/").content.decode()
    assert "their upload failed" not in page and "Retry import" in page
    r = client.post(f"/cohorts/{c}/uploads/{env['their_upload'].pk}/retry/")
    assert r.status_code == 404
    assert CohortUpload.objects.get(pk=env["their_upload"].pk).status == "failed"
    # the owner's retry queues the import
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/cohorts/{c}/uploads/{env['upload'].pk}/retry/",
                        HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 200 and r.json()["ok"]
    up = CohortUpload.objects.get(pk=env["upload"].pk)
    assert up.status == "queued" and env["queue"].job_ids == [up.rq_job_id]


def test_rater_cannot_list_or_create_cohorts(client, env):
    client.force_login(env["rater"])
    assert client.get("/cohorts/").status_code == 403
    assert client.post("/cohorts/", {"name": "x"}).status_code == 403
    assert Cohort.objects.count() == 2


def test_cohort_list_shows_only_own_cohorts_and_creates(client, env):
    client.force_login(env["other"])
    r = client.get("/cohorts/")
    assert b"theirs" in r.content and b"mine" not in r.content
    r = client.post("/cohorts/", {"name": "new one", "description": ""})
    new = Cohort.objects.get(name="new one")
    assert r.status_code == 302 and r["Location"] == f"/cohorts/{new.pk}/"
    assert new.owner == env["other"] and list(new.researchers.all()) == [env["other"]]


def test_owner_sees_every_page(client, env, django_capture_on_commit_callbacks):
    client.force_login(env["owner"])
    for method, url, kind in cohort_urls(env):
        if method == "get":
            r = client.get(url)
            assert r.status_code == 200, url
            if url.endswith((".png",)):
                assert r["Content-Type"] == "image/png"
    page = client.get(f"/cohorts/{env['cohort'].pk}/").content.decode()
    assert env["subject"].pseudonym in page and FAKE_MARKER not in page
    # the identity mapping is shown only on an explicit POST
    confirm = client.get(f"/cohorts/{env['cohort'].pk}/mapping/")
    assert FAKE_MARKER.encode() not in confirm.content
    mapping = client.post(f"/cohorts/{env['cohort'].pk}/mapping/")
    assert FAKE_MARKER.encode() in mapping.content
    # retry of the failed stage queues it
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(f"/cohorts/{env['cohort'].pk}/stages/{env['run'].pk}/retry/")
    assert r.status_code == 302
    run = StageRun.objects.get(pk=env["run"].pk)
    assert run.status == "queued" and env["queue"].job_ids == [run.rq_job_id]


def test_mapping_absent_unless_cohort_keeps_it(client, env):
    client.force_login(env["other"])
    theirs = Cohort.objects.get(name="theirs")
    assert client.post(f"/cohorts/{theirs.pk}/mapping/").status_code == 404


def test_rq_dashboard_is_staff_only(client, env, monkeypatch):
    import redis

    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, *a, **k: fake))
    client.force_login(env["owner"])
    assert client.get("/django-rq/").status_code == 302  # to the admin login
    client.force_login(env["staff"])
    assert client.get("/django-rq/").status_code == 200


def test_admin_registers_every_model(admin_client, env):
    from django.apps import apps
    from django.contrib import admin

    models = list(apps.get_app_config("surveys").get_models())
    # 8 cohort-side + 7 study models (incl. PowerEstimate) + login throttle, identity audit
    assert len(models) == 17
    for model in models:
        assert admin.site.is_registered(model), model.__name__
        url = f"/admin/surveys/{model._meta.model_name}/"
        assert admin_client.get(url).status_code == 200, url
    listing = admin_client.get("/admin/surveys/identitylink/").content
    assert FAKE_MARKER.encode() not in listing


def test_upload_rejections_are_clear_json(client, env, tmp_path, settings,
                                          django_capture_on_commit_callbacks):
    """Request-level refusals answer 400 at once; content refusals come from the import job."""
    client.force_login(env["owner"])
    url = f"/cohorts/{env['cohort'].pk}/upload/"
    r = client.post(url, {}, HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 400 and "no file" in r.json()["error"]
    settings.UPLOAD_MAX_BYTES = 10
    with open(__file__, "rb") as fh:
        r = client.post(url, {"files": fh}, HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 400 and "larger than 10 bytes" in r.json()["error"]
    assert env["cohort"].uploads.count() == 1  # only the fixture's: nothing recorded
    settings.UPLOAD_MAX_BYTES = 8 * 1024**3
    z = tmp_path / "slip.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../x.dcm", b"x")
    with django_capture_on_commit_callbacks(execute=True), open(z, "rb") as fh:
        r = client.post(url, {"files": fh}, HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["ok"] and body["upload"]["status"] == "queued"
    assert body["status_url"] == f"/cohorts/{env['cohort'].pk}/status.json"
    with django_capture_on_commit_callbacks(execute=True):
        SimpleWorker([env["queue"]], connection=env["queue"].connection).work(burst=True)
    upload = CohortUpload.objects.get(pk=body["upload"]["id"])
    assert upload.status == "failed" and "outside the archive" in upload.message
    row = client.get(f"/cohorts/{env['cohort'].pk}/status.json").json()["uploads"][0]
    assert row["id"] == upload.pk and row["status"] == "failed" and not row["retryable"]


@pytest.mark.slow
def test_upload_process_and_download(client, db, settings, tmp_path, queue,
                                     django_capture_on_commit_callbacks):
    """Upload a zip, run the queued pipeline, check pages, QA CSV and the de-identified zip."""
    settings.DATA_DIR = tmp_path / "data"
    settings.PIPELINE_FACE_METHOD = "anatomical"
    settings.PIPELINE_RENDER_BACKEND = "raycast"
    user = User.objects.create_user("r", password="pw")
    user.groups.add(Group.objects.create(name=RESEARCHER_GROUP))
    client.force_login(user)
    cohort = Cohort.objects.create(name="up", owner=user)
    cohort.researchers.add(user)
    src = tmp_path / "src"
    idents = write_synthetic_cohort(src, 2, size="tiny", seed=21)
    z = zip_folder(src, tmp_path / "upload.zip")
    with django_capture_on_commit_callbacks(execute=True), open(z, "rb") as fh:
        r = client.post(f"/cohorts/{cohort.pk}/upload/", {"files": fh},
                        HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 200 and r.json()["ok"], r.content
    assert len(queue) == 1 and cohort.subjects.count() == 0  # the import job only
    for _ in range(20):
        if not len(queue):
            break
        with django_capture_on_commit_callbacks(execute=True):
            SimpleWorker([queue], connection=queue.connection).work(burst=True)
    status = client.get(f"/cohorts/{cohort.pk}/status.json").json()
    assert status["complete"] and status["counts"]["done"] == 8
    assert status["uploads"][0]["status"] == "done" and status["uploads"][0]["n_subjects"] == 2
    assert not status["importing"]
    subject = cohort.subjects.order_by("pseudonym").first()
    page = client.get(f"/cohorts/{cohort.pk}/subjects/{subject.pseudonym}/").content.decode()
    # QA picture + 2 render pairs as images; slices in the viewer (its manifest below)
    assert "anatomical" in page and page.count("/images/") >= 5 and 'id="viewer"' in page
    m = client.get(f"/cohorts/{cohort.pk}/subjects/{subject.pseudonym}/viewer.json").json()
    assert m["selected"]["label"] == "S01" and m["selected"]["removed_voxels"] > 0
    for img in subject.images.all():
        r = client.get(f"/cohorts/{cohort.pk}/images/{img.pk}.png")
        assert r.status_code == 200 and b"".join(r.streaming_content)[:4] == b"\x89PNG"
    rows = list(csv.DictReader(io.StringIO(client.get(f"/cohorts/{cohort.pk}/download/qa.csv")
                                           .content.decode())))
    assert [r["subject"] for r in rows] == ["SUBJ-0001", "SUBJ-0002"]
    assert all(float(r["removed_ml"]) > 0 for r in rows)
    assert all("nose_check_removed_pct" in r for r in rows)
    r = client.get(f"/cohorts/{cohort.pk}/download/deidentified.zip")
    data = b"".join(r.streaming_content)
    secrets = [s for i in idents for s in (i.patient_id, i.patient_name.split("^")[0],
                                           i.birth_date)] + [FAKE_MARKER, "FAKE GENERAL"]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert "qa.csv" in names and sum(n.endswith(".dcm") for n in names) == 80
        for name in names:
            assert not any(s in name for s in secrets)
            blob = zf.read(name)
            assert not any(s.encode() in blob for s in secrets), name
        ds = pydicom.dcmread(io.BytesIO(zf.read(names[0])))
        assert str(ds.PatientName).startswith("SUBJ-") and ds.PatientIdentityRemoved == "YES"
    assert b"rank-1" in client.get(f"/cohorts/{cohort.pk}/").content


def test_upload_of_loose_dicom_files(client, db, settings, tmp_path, queue,
                                     django_capture_on_commit_callbacks):
    """Many files (no zip) in one request: stored under numbered names, one subject."""
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = User.objects.create_user("r", password="pw", is_staff=True)
    client.force_login(user)
    cohort = Cohort.objects.create(name="loose", owner=user)
    cohort.researchers.add(user)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 1, size="tiny", seed=41)
    files = sorted(src.rglob("*.dcm"))
    handles = [open(f, "rb") for f in files]
    try:
        with django_capture_on_commit_callbacks(execute=True):
            r = client.post(f"/cohorts/{cohort.pk}/upload/", {"files": handles},
                            HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    finally:
        for h in handles:
            h.close()
    assert r.status_code == 200, r.content
    assert len(queue) == 1 and cohort.subjects.count() == 0
    job = queue.jobs[0]
    queue.remove(job)
    with django_capture_on_commit_callbacks(execute=True):
        assert job.func(*job.args) == "done"
    upload = CohortUpload.objects.get(pk=r.json()["upload"]["id"])
    assert (upload.n_received, upload.n_subjects, upload.n_files) == (len(files), 1, len(files))
    assert [s.pseudonym for s in cohort.subjects.all()] == ["SUBJ-0001"]
    series = cohort.subjects.get().series.get()
    stored = sorted(p.name for p in (Path(settings.DATA_DIR) / series.original_dir).iterdir())
    assert len(stored) == len(files) == series.n_files
    assert queue.count == 1
