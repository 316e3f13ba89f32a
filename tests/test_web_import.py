"""Safe import of uploaded DICOM: zip safety, non-DICOM, duplicates, all-or-nothing."""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from pathlib import Path

import pydicom
import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

from surveys.cohorts import importing
from surveys.cohorts.importing import (
    ImportRejected,
    ZipLimits,
    import_folder,
    import_zip,
    safe_extract_zip,
)
from surveys.models import Cohort, IdentityLink, Series, StageRun, Subject
from surveys.processing.stages import STAGES
from tests.factories.dicom_cohorts import FAKE_MARKER, zip_folder


@pytest.fixture(scope="module")
def synth_src(synthetic_cohort) -> Path:
    return synthetic_cohort(3, seed=3)


@pytest.fixture()
def src(synth_src, tmp_path) -> Path:
    dst = tmp_path / "upload"
    shutil.copytree(synth_src, dst)
    return dst


@pytest.fixture()
def data_dir(settings, tmp_path) -> Path:
    settings.DATA_DIR = tmp_path / "data"
    return settings.DATA_DIR


@pytest.fixture()
def cohort(db, data_dir) -> Cohort:
    owner = User.objects.create_user("owner", password="pw")
    return Cohort.objects.create(name="c", owner=owner)


def _zip(tmp_path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    path = tmp_path / "t.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# ------------------------------------------------------------------ zip safety (no DB)


@pytest.mark.parametrize("name, message", [
    ("../evil.dcm", "outside the archive"),
    ("a/../../evil.dcm", "outside the archive"),
    ("/etc/evil.dcm", "absolute path"),
    ("C:/evil.dcm", "absolute path"),
    ("..\\evil.dcm", "outside the archive"),
])
def test_zip_slip_and_absolute_names_are_refused(tmp_path, name, message):
    z = _zip(tmp_path, {"ok/a.dcm": b"x", name: b"evil"})
    dest = tmp_path / "out" / "x"
    dest.mkdir(parents=True)
    with pytest.raises(ImportRejected, match=message) as exc:
        safe_extract_zip(z, dest)
    assert "#2" in str(exc.value) and "evil" not in str(exc.value)  # named by index, not name
    assert not (tmp_path / "evil.dcm").exists() and not (tmp_path / "out" / "evil.dcm").exists()
    assert _all_files(dest) == []  # checks happen before anything is written


def test_symlink_member_is_refused(tmp_path):
    z = _zip(tmp_path, {"a.dcm": b"x"}, symlinks={"link": "/etc/passwd"})
    with pytest.raises(ImportRejected, match="symbolic link"):
        safe_extract_zip(z, tmp_path / "d")


def test_zip_bomb_ratio_and_total_size_are_refused(tmp_path):
    zeros = b"\0" * (8 * 1024 * 1024)
    z = _zip(tmp_path, {"bomb.dcm": zeros})
    info = zipfile.ZipFile(z).getinfo("bomb.dcm")
    assert info.file_size / info.compress_size > 200  # independent check of the premise
    with pytest.raises(ImportRejected, match="compression ratio"):
        safe_extract_zip(z, tmp_path / "d", ZipLimits(max_ratio=200))
    # the same archive passes with a permissive ratio but not with a small total limit
    assert safe_extract_zip(z, tmp_path / "d2", ZipLimits(max_ratio=1e9)) == 1
    with pytest.raises(ImportRejected, match="more than 1000000 bytes"):
        safe_extract_zip(z, tmp_path / "d3", ZipLimits(max_ratio=1e9, max_total_bytes=1_000_000))


def test_member_larger_than_declared_is_refused(tmp_path):
    """A lying size header (file_size patched smaller) is caught while streaming."""
    data = bytes(range(256)) * 4000
    z = _zip(tmp_path, {"a.dcm": data})
    raw = bytearray(z.read_bytes())
    info = zipfile.ZipFile(z).getinfo("a.dcm")
    # patch the central-directory uncompressed size (offset 24 in the CD header)
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24: cd + 28] = (1000).to_bytes(4, "little")
    lh = 0  # and the local header (offset 22)
    raw[lh + 22: lh + 26] = (1000).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    assert info.file_size == len(data)
    with pytest.raises(ImportRejected, match="more bytes than declared|corrupt"):
        safe_extract_zip(z, tmp_path / "d")


def test_not_a_zip_and_too_many_members(tmp_path):
    bad = tmp_path / "x.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ImportRejected, match="not a readable zip"):
        safe_extract_zip(bad, tmp_path / "d")
    z = _zip(tmp_path, {f"{i}.dcm": b"x" for i in range(5)})
    with pytest.raises(ImportRejected, match="at most 3"):
        safe_extract_zip(z, tmp_path / "d", ZipLimits(max_members=3))


# ------------------------------------------------------------------ import into a cohort


def _read_identity(folder: Path) -> set[str]:
    names = set()
    for f in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        names.add(str(ds.PatientName))
    return names


def test_import_folder_creates_pseudonymised_subjects(cohort, src, data_dir):
    n_files = len(_all_files(src))
    result = import_folder(cohort, src, move=False)
    assert len(result.subjects) == 3 and result.n_series == 3 and result.n_files == n_files
    subjects = list(cohort.subjects.order_by("pseudonym"))
    assert [s.pseudonym for s in subjects] == ["SUBJ-0001", "SUBJ-0002", "SUBJ-0003"]
    assert Series.objects.filter(subject__cohort=cohort).count() == 3
    assert StageRun.objects.filter(subject__cohort=cohort, status="pending").count() == 3 * len(STAGES)
    stored = _all_files(data_dir)
    assert len(stored) == n_files
    assert not any(FAKE_MARKER in str(p) for p in stored)  # no identity in any file name
    for s in subjects:
        assert FAKE_MARKER not in s.patient_key and len(s.patient_key) == 64
    # every subject's folder holds exactly one patient's originals
    for s in subjects:
        folder = data_dir / s.series.get().original_dir
        assert len(_read_identity(folder)) == 1
    assert not IdentityLink.objects.exists()  # mapping not asked for


def test_identity_mapping_is_kept_only_when_asked(cohort, src):
    cohort.keep_mapping = True
    cohort.save()
    import_folder(cohort, src, move=False)
    names = {link.patient_name for link in IdentityLink.objects.all()}
    assert len(names) == 3 and all(FAKE_MARKER in n for n in names)


def _assert_nothing_imported(cohort: Cohort, data_dir: Path) -> None:
    assert Subject.objects.filter(cohort=cohort).count() == 0
    assert Series.objects.count() == 0 and StageRun.objects.count() == 0
    assert _all_files(data_dir / cohort.storage_dir()) == []


def test_non_dicom_content_is_refused(cohort, src, data_dir):
    (next(src.iterdir()) / "notes.txt").write_text("scan report of patient")
    (src / ".DS_Store").write_bytes(b"\0\1")  # archiver litter is ignored, not an error
    with pytest.raises(ImportRejected, match="not usable DICOM") as exc:
        import_folder(cohort, src, move=False)
    assert "notes" not in str(exc.value) and FAKE_MARKER not in str(exc.value)
    _assert_nothing_imported(cohort, data_dir)


def test_duplicate_series_in_upload_is_refused(cohort, src, data_dir):
    first = sorted(src.iterdir())[0]
    shutil.copytree(first, src / "copy-of-first")
    with pytest.raises(ImportRejected, match="duplicate series"):
        import_folder(cohort, src, move=False)
    _assert_nothing_imported(cohort, data_dir)


def test_second_upload_of_same_subject_is_refused(cohort, src, data_dir, tmp_path):
    first = sorted(src.iterdir())[0]
    one = tmp_path / "one"
    shutil.copytree(first, one / first.name)
    import_folder(cohort, one, move=False)
    before = sorted(_all_files(data_dir))
    with pytest.raises(ImportRejected, match="already in this cohort|already in the cohort"):
        import_folder(cohort, src, move=False)
    assert cohort.subjects.count() == 1
    assert sorted(_all_files(data_dir)) == before


def test_import_that_commits_during_another_imports_scan(cohort, src, data_dir, tmp_path,
                                                        monkeypatch):
    """Another import (another worker) commits while this one scans: the checks against
    the cohort and the pseudonyms are decided afterwards, under the cohort lock, so this
    one neither reuses a pseudonym nor imports a subject twice. (One thread: this checks
    the order of the steps, not the database lock itself.)"""
    subjects = sorted(src.iterdir())
    first, rest = tmp_path / "first", tmp_path / "rest"
    shutil.copytree(subjects[0], first / subjects[0].name)
    for d in subjects[1:]:
        shutil.copytree(d, rest / d.name)
    real_scan = importing.dicom_io.scan_folder
    race = {"folder": first, "cohort": cohort}

    def scan_while_another_commits(folder):
        scan = real_scan(folder)
        if race["folder"] is not None:
            other, race["folder"] = race["folder"], None
            import_folder(race["cohort"], other, move=False)  # the other worker commits now
        return scan

    monkeypatch.setattr(importing.dicom_io, "scan_folder", scan_while_another_commits)
    result = import_folder(cohort, rest, move=False)
    assert sorted(cohort.subjects.values_list("pseudonym", flat=True)) == [
        "SUBJ-0001", "SUBJ-0002", "SUBJ-0003"]
    assert "SUBJ-0001" not in result.subjects and len(result.subjects) == 2
    assert len(_all_files(data_dir)) == len(_all_files(src))
    # the same subject committed by another import meanwhile: refused, nothing added
    before = sorted(_all_files(data_dir))
    c2 = Cohort.objects.create(name="c2", owner=cohort.owner)
    race.update(folder=src, cohort=c2)
    with pytest.raises(ImportRejected, match="already in the cohort"):
        import_folder(c2, rest, move=False)
    assert c2.subjects.count() == 3  # only the other import's
    assert len(_all_files(data_dir)) == len(before) + len(_all_files(src))


def test_failure_while_moving_leaves_nothing(cohort, src, data_dir, monkeypatch):
    real = importing.os.replace
    calls = {"n": 0}

    def flaky(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(importing.os, "replace", flaky)
    with pytest.raises(OSError):
        import_folder(cohort, src, move=False)
    _assert_nothing_imported(cohort, data_dir)
    assert len(_all_files(src)) == 120  # a copy-import never touches the source


def test_import_zip_and_command(cohort, src, data_dir, tmp_path):
    z = zip_folder(src, tmp_path / "c.zip")
    result = import_zip(cohort, z)
    assert len(result.subjects) == 3
    assert _all_files(data_dir / "tmp") == []  # the unpacked copy is gone
    out = io.StringIO()
    call_command("import_cohort", str(z), "--name", "second", "--owner", "owner", stdout=out)
    assert "imported 3 subject(s)" in out.getvalue() and FAKE_MARKER not in out.getvalue()
    with pytest.raises(CommandError, match="already in the cohort"):
        call_command("import_cohort", str(z), "--cohort", str(cohort.pk), stdout=out)


# ------------------------------------------------------------------ web upload → background job
#
# The request only stores the files and queues the import; every safety check runs in
# the job (surveys.cohorts.uploads.run_upload). These tests post through the view, run the
# queued import job, and check the upload's status row, the cohort and the data folder.


@pytest.fixture()
def web(db, settings, tmp_path, monkeypatch):
    import fakeredis
    from django.contrib.auth.models import Group
    from rq import Queue

    from surveys.access import RESEARCHER_GROUP
    from surveys.processing import jobs

    settings.DATA_DIR = tmp_path / "data"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "data" / "tmp")
    (tmp_path / "data" / "tmp").mkdir(parents=True)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    q = Queue("pipeline", connection=fakeredis.FakeStrictRedis())
    monkeypatch.setattr(jobs, "get_pipeline_queue", lambda: q)
    user = User.objects.create_user("researcher", password="pw")
    user.groups.add(Group.objects.create(name=RESEARCHER_GROUP))
    cohort = Cohort.objects.create(name="web", owner=user)
    cohort.researchers.add(user)
    return {"queue": q, "user": user, "cohort": cohort, "data": settings.DATA_DIR}


def _post_upload(client, web, paths: list[Path], capture, json: bool = True):
    client.force_login(web["user"])
    handles = [open(p, "rb") for p in paths]
    try:
        with capture(execute=True):
            extra = {"HTTP_X_REQUESTED_WITH": "XMLHttpRequest"} if json else {}
            return client.post(f"/cohorts/{web['cohort'].pk}/upload/", {"files": handles}, **extra)
    finally:
        for h in handles:
            h.close()


def _run_import_jobs(queue, capture) -> list[str]:
    """Run the queued import jobs (not the stage jobs they enqueue) as a worker would."""
    results = []
    for job in list(queue.jobs):
        if job.func_name == "surveys.cohorts.uploads.run_upload":
            queue.remove(job)
            with capture(execute=True):
                results.append(job.func(*job.args))
    return results


def _drop_jobs(queue) -> None:
    for job in list(queue.jobs):
        queue.remove(job)


def _stage_jobs(queue) -> list:
    return [j for j in queue.jobs if j.func_name == "surveys.processing.jobs.run_stage"]


def _upload_zip(client, web, tmp_path, capture, members: dict[str, bytes] | None = None,
                folder: Path | None = None, symlinks: dict[str, str] | None = None):
    """Post a zip (of ``folder`` or of ``members``), run its import job; returns the upload row."""
    from surveys.models import CohortUpload

    if folder is not None:
        z = zip_folder(folder, tmp_path / f"{folder.name}.zip")
    else:
        z = _zip(tmp_path, members or {}, symlinks)
    r = _post_upload(client, web, [z], capture)
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["ok"] and body["upload"]["status"] == "queued"
    assert "importing in the background" in body["message"]
    upload = CohortUpload.objects.get(pk=body["upload"]["id"])
    assert upload.status == "queued" and upload.staging_dir  # nothing imported yet
    assert web["cohort"].subjects.count() == 0 or folder is not None
    _run_import_jobs(web["queue"], capture)
    upload.refresh_from_db()
    return upload


def _assert_tmp_clean(data_dir: Path) -> None:
    tmp = data_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == [], list(tmp.iterdir())


def _assert_failed_cleanly(upload, web, message: str, before: list[Path] | None = None) -> None:
    assert upload.status == "failed", upload.message
    assert message in upload.message, upload.message
    assert FAKE_MARKER not in upload.message and "/" not in upload.message  # no identity, no path
    assert "evil" not in upload.message
    assert upload.staging_dir == "" and not upload.retryable
    _assert_tmp_clean(web["data"])
    assert _stage_jobs(web["queue"]) == []
    if before is None:
        _assert_nothing_imported(web["cohort"], web["data"])
    else:
        assert sorted(_all_files(web["data"] / web["cohort"].storage_dir())) == before


@pytest.mark.parametrize("name, message", [
    ("../evil.dcm", "outside the archive"),
    ("a/../../evil.dcm", "outside the archive"),
    ("/etc/evil.dcm", "absolute path"),
])
def test_web_zip_slip_and_absolute_names_fail_in_the_job(client, web, tmp_path, name, message,
                                                         django_capture_on_commit_callbacks):
    upload = _upload_zip(client, web, tmp_path, django_capture_on_commit_callbacks,
                         members={"ok/a.dcm": b"x", name: b"evil"})
    _assert_failed_cleanly(upload, web, message)
    assert not (tmp_path / "evil.dcm").exists() and not (web["data"] / "evil.dcm").exists()


def test_web_symlink_zip_bomb_and_broken_zip_fail_in_the_job(client, web, tmp_path,
                                                             django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    upload = _upload_zip(client, web, tmp_path, cap, {"a.dcm": b"x"}, symlinks={"l": "/etc/passwd"})
    _assert_failed_cleanly(upload, web, "symbolic link")
    upload = _upload_zip(client, web, tmp_path, cap, {"bomb.dcm": b"\0" * (8 * 1024 * 1024)})
    _assert_failed_cleanly(upload, web, "possible zip bomb")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # looks like a zip, is not one
    r = _post_upload(client, web, [broken], cap)
    _run_import_jobs(web["queue"], cap)
    from surveys.models import CohortUpload

    _assert_failed_cleanly(CohortUpload.objects.get(pk=r.json()["upload"]["id"]), web,
                           "not a readable zip")


def test_web_non_dicom_and_duplicate_series_fail_in_the_job(client, web, src, tmp_path,
                                                            django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    bad = tmp_path / "with-notes"
    shutil.copytree(src, bad)
    (next(bad.iterdir()) / "notes.txt").write_text("scan report of patient")
    upload = _upload_zip(client, web, tmp_path, cap, folder=bad)
    _assert_failed_cleanly(upload, web, "not usable DICOM")
    assert "notes" not in upload.message
    dup = tmp_path / "dup"
    shutil.copytree(src, dup)
    shutil.copytree(sorted(dup.iterdir())[0], dup / "copy-of-first")
    upload = _upload_zip(client, web, tmp_path, cap, folder=dup)
    _assert_failed_cleanly(upload, web, "duplicate series")


def test_web_upload_imports_in_the_job_and_queues_stages(client, web, src, tmp_path,
                                                         django_capture_on_commit_callbacks):
    """Success: the request stores and queues; the job imports, marks done and queues stages;
    the second upload of a subject then fails with a clear message and changes nothing."""
    cap = django_capture_on_commit_callbacks
    n_files = len(_all_files(src))
    first = sorted(src.iterdir())[0]
    one = tmp_path / "one"
    shutil.copytree(first, one / first.name)
    upload = _upload_zip(client, web, tmp_path, cap, folder=one)
    assert upload.status == "done", upload.message
    assert (upload.n_subjects, upload.n_series, upload.n_files) == (1, 1, n_files // 3)
    assert upload.message.startswith("imported 1 subject(s), 1 series")
    assert upload.uploaded_by == web["user"] and upload.attempts == 1 and upload.finished
    assert upload.staging_dir == "" and not upload.retryable
    _assert_tmp_clean(web["data"])
    subject = web["cohort"].subjects.get()
    stage_jobs = _stage_jobs(web["queue"])
    assert [j.args[0] for j in stage_jobs] == [subject.stages.get(stage="import").pk]
    assert subject.stages.get(stage="import").status == "queued"
    before = sorted(_all_files(web["data"] / web["cohort"].storage_dir()))
    assert len(before) == n_files // 3

    again = _upload_zip(client, web, tmp_path, cap, folder=src)  # holds the same subject again
    assert again.status == "failed" and "already in the cohort" in again.message
    assert "second upload of the same subject" in again.message
    assert FAKE_MARKER not in again.message and again.staging_dir == ""
    assert web["cohort"].subjects.count() == 1
    assert sorted(_all_files(web["data"] / web["cohort"].storage_dir())) == before
    assert len(_stage_jobs(web["queue"])) == 1  # nothing new queued
    _assert_tmp_clean(web["data"])
    # a duplicate delivery of a finished job does nothing
    from surveys.cohorts.uploads import run_upload

    assert run_upload(upload.pk, upload.rq_job_id) == "skipped"


def test_web_upload_form_post_redirects_with_message(client, web, src, tmp_path,
                                                     django_capture_on_commit_callbacks):
    cap = django_capture_on_commit_callbacks
    z = zip_folder(src, tmp_path / "c.zip")
    r = _post_upload(client, web, [z], cap, json=False)
    assert r.status_code == 302 and r["Location"] == f"/cohorts/{web['cohort'].pk}/"
    page = client.get(r["Location"]).content.decode()
    assert "upload received, importing in the background" in page
    assert 'id="uploads"' in page and "importing…" in page
    status = client.get(f"/cohorts/{web['cohort'].pk}/status.json").json()
    assert status["importing"] and status["uploads"][0]["status"] == "queued"
    assert _run_import_jobs(web["queue"], cap) == ["done"]
    status = client.get(f"/cohorts/{web['cohort'].pk}/status.json").json()
    assert not status["importing"] and status["uploads"][0]["n_subjects"] == 3
    assert len(status["subjects"]) == 3
    page = client.get(f"/cohorts/{web['cohort'].pk}/").content.decode()
    assert "imported 3 subject(s)" in page and FAKE_MARKER not in page
    # request-level refusals: nothing stored, no upload row
    r = client.post(f"/cohorts/{web['cohort'].pk}/upload/", {})
    assert r.status_code == 302
    assert "no file was uploaded" in client.get(r["Location"]).content.decode()
    assert web["cohort"].uploads.count() == 1


def test_web_unexpected_failure_keeps_files_for_a_retry(client, web, src, tmp_path, monkeypatch,
                                                        django_capture_on_commit_callbacks):
    """An error that is not a rejection: generic message without paths, nothing imported,
    the received files kept; Retry imports them."""
    cap = django_capture_on_commit_callbacks
    real = importing.os.replace
    calls = {"n": 0}

    def flaky(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(b))
        return real(a, b)

    monkeypatch.setattr(importing.os, "replace", flaky)
    upload = _upload_zip(client, web, tmp_path, cap, folder=src)
    assert upload.status == "failed"
    assert upload.message == ("the import failed: file system error: No space left on device; "
                              "nothing was imported")
    _assert_nothing_imported(web["cohort"], web["data"])
    assert upload.retryable and (web["data"] / upload.staging_dir / "received").is_dir()
    assert not (web["data"] / upload.staging_dir / "work").exists()
    page = client.get(f"/cohorts/{web['cohort'].pk}/").content.decode()
    assert "Retry import" in page
    monkeypatch.setattr(importing.os, "replace", real)
    with cap(execute=True):
        r = client.post(f"/cohorts/{web['cohort'].pk}/uploads/{upload.pk}/retry/")
    assert r.status_code == 302
    upload.refresh_from_db()
    assert upload.status == "queued"
    assert _run_import_jobs(web["queue"], cap) == ["done"]
    upload.refresh_from_db()
    assert upload.status == "done" and upload.attempts == 2 and upload.n_subjects == 3
    assert Series.objects.filter(subject__cohort=web["cohort"]).count() == 3
    assert len(_all_files(web["data"] / web["cohort"].storage_dir())) == len(_all_files(src))
    _assert_tmp_clean(web["data"])
    # done: nothing to retry
    r = client.post(f"/cohorts/{web['cohort'].pk}/uploads/{upload.pk}/retry/",
                    HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 409 and "nothing to retry" in r.json()["message"]


def test_web_retry_impossible_once_files_are_gone(client, web, src, tmp_path, monkeypatch,
                                                  django_capture_on_commit_callbacks):
    from surveys.cohorts.uploads import recover_uploads

    cap = django_capture_on_commit_callbacks
    monkeypatch.setattr(importing, "import_folder",
                        lambda *a, **k: (_ for _ in ()).throw(KeyError("PatientName")))
    upload = _upload_zip(client, web, tmp_path, cap, folder=src)
    assert upload.status == "failed" and "internal error (KeyError)" in upload.message
    assert "PatientName" not in upload.message and upload.retryable
    # failed uploads keep their files for a while, then the maintenance pass deletes them
    assert recover_uploads(keep_failed_seconds=3600) == [] and upload.retryable
    recover_uploads(keep_failed_seconds=0)
    upload.refresh_from_db()
    assert not upload.retryable and upload.status == "failed"
    _assert_tmp_clean(web["data"])
    page = client.get(f"/cohorts/{web['cohort'].pk}/").content.decode()
    assert "Retry import" not in page and "upload them again" in page
    with cap(execute=True):
        r = client.post(f"/cohorts/{web['cohort'].pk}/uploads/{upload.pk}/retry/",
                        HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 409 and "upload them again" in r.json()["message"]
    assert web["queue"].count == 0 and upload.status == "failed"


def test_web_upload_killed_mid_import_is_rerun_completely(client, web, src, tmp_path,
                                                          django_capture_on_commit_callbacks):
    """The state a SIGKILL mid-import leaves (row running with a dead worker pid, nothing
    committed, a half-moved series folder in the cohort store, a half-built work folder):
    the maintenance pass re-queues the upload, the re-run removes the leftovers and imports
    every file; with the received files gone it fails with "upload them again"."""
    import subprocess
    import sys

    from surveys.cohorts.uploads import recover_uploads

    cap = django_capture_on_commit_callbacks
    z = zip_folder(src, tmp_path / "c.zip")
    r = _post_upload(client, web, [z], cap)
    from surveys.models import CohortUpload

    upload = CohortUpload.objects.get(pk=r.json()["upload"]["id"])
    _drop_jobs(web["queue"])  # the worker took the job, then died
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    CohortUpload.objects.filter(pk=upload.pk).update(
        status="running", attempts=1, worker_pid=dead.pid, worker_host=socket.gethostname()[:255])
    orphan = web["data"] / web["cohort"].storage_dir() / "orig" / "SUBJ-0001"
    (orphan / "S01").mkdir(parents=True)
    (orphan / "S01" / "00001.dcm").write_bytes(b"half")
    (orphan / ".S02.incoming").mkdir()
    work = web["data"] / upload.staging_dir / "work" / "archive0001"
    work.mkdir(parents=True)
    (work / "partial.dcm").write_bytes(b"half")

    with cap(execute=True):
        assert recover_uploads() == [upload.pk]
    upload.refresh_from_db()
    assert upload.status == "queued"
    assert _run_import_jobs(web["queue"], cap) == ["done"]
    upload.refresh_from_db()
    assert upload.status == "done" and upload.attempts == 2 and upload.n_subjects == 3
    stored = _all_files(web["data"] / web["cohort"].storage_dir())
    assert len(stored) == len(_all_files(src))
    assert all(p.read_bytes() != b"half" for p in stored)
    for s in Series.objects.filter(subject__cohort=web["cohort"]):
        files = _all_files(web["data"] / s.original_dir)
        assert len(files) == s.n_files == 40
        assert len(_read_identity(web["data"] / s.original_dir)) == 1
    assert not (orphan / ".S02.incoming").exists()
    _assert_tmp_clean(web["data"])

    # killed again, but this time the received files are gone: failed, upload again
    r = _post_upload(client, web, [z], cap)
    second = CohortUpload.objects.get(pk=r.json()["upload"]["id"])
    _drop_jobs(web["queue"])  # the worker took the job, then died
    shutil.rmtree(web["data"] / second.staging_dir)
    CohortUpload.objects.filter(pk=second.pk).update(
        status="running", worker_pid=dead.pid, worker_host=socket.gethostname()[:255])
    assert recover_uploads() == []
    second.refresh_from_db()
    assert second.status == "failed" and "upload them again" in second.message
    assert not second.retryable and web["queue"].count == 0


def test_recovery_leaves_other_machines_files_and_removes_unrecorded_ones(web, tmp_path):
    """Workers that do not see the web server's folder (shared storage) never decide about an
    upload's files; staging folders without an upload row (request killed) go after an hour."""
    import os
    import time

    from surveys.cohorts.uploads import STAGING_PREFIX, recover_uploads, run_upload
    from surveys.models import CohortUpload

    elsewhere = CohortUpload.objects.create(
        cohort=web["cohort"], status="running", staging_dir=f"tmp/{STAGING_PREFIX}remote",
        staging_host="web-machine-that-is-not-this-one", worker_host="another-worker",
        worker_pid=1, heartbeat=None, rq_job_id="j1")
    CohortUpload.objects.filter(pk=elsewhere.pk).update(
        heartbeat="2000-01-01T00:00:00Z")  # stale
    done_elsewhere = CohortUpload.objects.create(
        cohort=web["cohort"], status="done", staging_dir=f"tmp/{STAGING_PREFIX}remote2",
        staging_host="web-machine-that-is-not-this-one")
    assert recover_uploads() == []
    for row in (elsewhere, done_elsewhere):
        before = row.status
        row.refresh_from_db()
        assert row.status == before and row.staging_dir  # untouched
    # a job for it on this machine fails with the reason and leaves the files to their machine
    CohortUpload.objects.filter(pk=elsewhere.pk).update(status="queued")
    assert run_upload(elsewhere.pk, "j1") == "failed"
    elsewhere.refresh_from_db()
    assert "not on this worker's machine" in elsewhere.message and elsewhere.staging_dir

    tmp = web["data"] / "tmp"
    old, young = tmp / f"{STAGING_PREFIX}old", tmp / f"{STAGING_PREFIX}young"
    for d in (old, young):
        (d / "received").mkdir(parents=True)
        (d / "received" / "000001").write_bytes(b"identifiable")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    # a done upload whose worker died before deleting its files (received on this machine)
    here = tmp / f"{STAGING_PREFIX}done-here"
    (here / "received").mkdir(parents=True)
    done_here = CohortUpload.objects.create(cohort=web["cohort"], status="done",
                                            staging_dir=f"tmp/{here.name}")
    recover_uploads(keep_failed_seconds=0)
    assert not old.exists() and young.exists() and not here.exists()
    done_here.refresh_from_db()
    assert done_here.staging_dir == ""


def test_queued_upload_without_a_job_is_enqueued_again_once_after_the_grace(
        client, web, src, tmp_path, django_capture_on_commit_callbacks):
    """The web request committed the upload row, then died before the enqueue (or Redis lost
    the job): the maintenance pass enqueues it again once the grace period is over."""
    from datetime import timedelta

    from django.utils import timezone

    from surveys.cohorts.uploads import recover_uploads
    from surveys.models import CohortUpload

    cap = django_capture_on_commit_callbacks
    z = zip_folder(src, tmp_path / "c.zip")
    r = _post_upload(client, web, [z], lambda execute: cap(execute=False))  # enqueue lost
    upload = CohortUpload.objects.get(pk=r.json()["upload"]["id"])
    lost = upload.rq_job_id
    assert upload.status == "queued" and web["queue"].count == 0
    with cap(execute=True):
        assert recover_uploads(grace_seconds=120) == []  # fresh: within the grace
    assert web["queue"].count == 0
    CohortUpload.objects.filter(pk=upload.pk).update(queued_at=timezone.now() - timedelta(minutes=3))
    with cap(execute=True):
        assert recover_uploads(grace_seconds=120) == [upload.pk]
    with cap(execute=True):  # its job is in the queue now: never a second one
        assert recover_uploads(grace_seconds=0) == []
    upload.refresh_from_db()
    assert upload.rq_job_id != lost and web["queue"].job_ids == [upload.rq_job_id]
    assert _run_import_jobs(web["queue"], cap) == ["done"]
    upload.refresh_from_db()
    assert upload.status == "done" and upload.attempts == 1 and upload.n_subjects == 3
    from surveys.cohorts.uploads import run_upload

    assert run_upload(upload.pk, lost) == "skipped"
