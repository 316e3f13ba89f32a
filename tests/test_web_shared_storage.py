"""Shared storage between machines: a folder-backed Django storage stands in for S3.

Machine A imports and runs the first stages; machine B (an empty DATA_DIR) runs the
remaining stages from the shared copy; machine C (empty again) serves the pages,
images and the de-identified download."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from surveys import jobs
from surveys.importing import ImportRejected, import_folder
from surveys.models import Cohort
from surveys.synthetic import write_synthetic_cohort

pytestmark = pytest.mark.slow


@pytest.fixture()
def shared(settings, tmp_path):
    remote = tmp_path / "remote"
    settings.STORAGES = {
        **settings.STORAGES,
        "cohortdata": {"BACKEND": "django.core.files.storage.FileSystemStorage",
                       "OPTIONS": {"location": str(remote)}},
    }
    settings.PIPELINE_FACE_METHOD = "anatomical"
    settings.PIPELINE_RENDER_BACKEND = "raycast"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return remote


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _run(run) -> None:
    run.refresh_from_db()
    job_id = "manual-" + str(run.pk)
    type(run).objects.filter(pk=run.pk).update(status="queued", rq_job_id=job_id)
    assert jobs.run_stage(run.pk, job_id) == "done", type(run).objects.get(pk=run.pk).error


def test_stages_run_on_machines_that_share_only_the_storage(db, settings, tmp_path, shared,
                                                             client, monkeypatch):
    monkeypatch.setattr(jobs, "enqueue_stage", lambda run, queue=None: "")  # run by hand
    user = User.objects.create_user("r", password="pw", is_staff=True)
    cohort = Cohort.objects.create(name="c", owner=user)
    cohort.researchers.add(user)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 2, size="tiny", seed=51)

    settings.DATA_DIR = tmp_path / "machineA"
    import_folder(cohort, src, move=False)
    assert _files(shared) == _files(tmp_path / "machineA")  # originals mirrored at import
    for subject in cohort.subjects.all():
        for stage in ("import", "deidentify"):
            _run(subject.stages.get(stage=stage))

    settings.DATA_DIR = tmp_path / "machineB"
    for subject in cohort.subjects.all():
        for stage in ("surfaces", "embeddings"):
            _run(subject.stages.get(stage=stage))
    assert cohort.reid.n_subjects == 2
    remote = _files(shared)
    assert any("/deid/" in f for f in remote) and any("render-yaw+0-deid.png" in f for f in remote)
    assert "cohorts/c{:05d}/derived/reid-cmc.png".format(cohort.pk) in remote

    settings.DATA_DIR = tmp_path / "machineC"
    client.force_login(user)
    subject = cohort.subjects.first()
    for img in subject.images.all():
        r = client.get(f"/cohorts/{cohort.pk}/images/{img.pk}.png")
        assert r.status_code == 200 and b"".join(r.streaming_content)[:4] == b"\x89PNG"
    assert client.get(f"/cohorts/{cohort.pk}/reid-cmc.png").status_code == 200
    r = client.get(f"/cohorts/{cohort.pk}/download/deidentified.zip")
    names = zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content))).namelist()
    assert sum(n.endswith(".dcm") for n in names) == 80


def test_failed_import_leaves_nothing_in_the_shared_storage(db, settings, tmp_path, shared,
                                                             monkeypatch):
    from surveys import importing

    user = User.objects.create_user("r", password="pw")
    cohort = Cohort.objects.create(name="c", owner=user)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 3, size="tiny", seed=52)
    settings.DATA_DIR = tmp_path / "machineA"
    real = importing.push_tree
    calls = {"n": 0}

    def flaky(rel, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second subject's upload fails half-way
            raise OSError(5, "Input/output error")
        return real(rel, **kw)

    monkeypatch.setattr(importing, "push_tree", flaky)
    with pytest.raises(OSError):
        import_folder(cohort, src, move=False)
    assert _files(shared) == set()  # the first subject's upload was removed again
    assert _files(tmp_path / "machineA") == set() and cohort.subjects.count() == 0
