"""Zip archives (issue 11, item 4 and the zip parts of item 7).

* a bomb of many members of exactly 1 MiB of zeros (each under the old per-member
  threshold) is refused before a byte is unpacked: the whole archive's ratio counts;
* a member name the file system cannot store is a plain refusal, not an "unexpected
  error, retry" that fails the same way forever;
* an empty zip is reported as an empty archive, not as "not a DICOM file";
* a real (synthetic) CT upload still passes.
"""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User
from rq import SimpleWorker

from surveys.cohorts.importing import ImportRejected, ZipLimits, safe_extract_zip
from surveys.models import Cohort, CohortUpload
from tests.factories.dicom_cohorts import write_synthetic_cohort, zip_folder

MiB = 1024 * 1024


def bomb(path: Path, members: int = 400, size: int = MiB) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for n in range(members):
            zf.writestr(f"scan/{n:04d}.dcm", b"\0" * size)
    return path


def files_below(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_many_one_mib_members_are_refused_before_unpacking(tmp_path, settings):
    z = bomb(tmp_path / "bomb.zip")
    assert z.stat().st_size < MiB  # ~0.4 MB on disk, 400 MiB unpacked
    with pytest.raises(ImportRejected, match="zip bomb"):
        safe_extract_zip(z, tmp_path / "out", ZipLimits.from_settings())
    assert files_below(tmp_path / "out") == []
    # the whole archive's ratio stops it even where no member is checked on its own
    with pytest.raises(ImportRejected, match="unpacks to 9\\d\\d times its size .* zip bomb"):
        safe_extract_zip(z, tmp_path / "out", ZipLimits(ratio_min_bytes=2 * MiB))
    assert files_below(tmp_path / "out") == []


def test_members_between_64_kib_and_1_mib_are_checked_one_by_one(tmp_path):
    z = tmp_path / "one.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (512 * 1024))
    with pytest.raises(ImportRejected, match="member #1 has a compression ratio"):
        safe_extract_zip(z, tmp_path / "out", ZipLimits())


def test_small_and_real_archives_pass(tmp_path):
    z = tmp_path / "small.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n in range(50):  # tiny files compress extremely well: below the total threshold
            zf.writestr(f"{n}.txt", b"\0" * 1000)
    assert safe_extract_zip(z, tmp_path / "out", ZipLimits()) == 50
    src = tmp_path / "src"
    write_synthetic_cohort(src, 2, size="tiny", seed=3)
    real = zip_folder(src, tmp_path / "real.zip")
    assert safe_extract_zip(real, tmp_path / "real", ZipLimits()) == 80


def test_not_enough_disk_is_an_error_a_retry_can_overcome(tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "src"
    write_synthetic_cohort(src, 1, size="tiny", seed=3)
    z = zip_folder(src, tmp_path / "real.zip")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100 * MiB))
    with pytest.raises(OSError) as err:
        safe_extract_zip(z, tmp_path / "out", ZipLimits())
    assert err.value.errno == errno.ENOSPC and files_below(tmp_path / "out") == []


def test_names_the_file_system_cannot_store_are_refused(tmp_path):
    for name, match in ((f"{'x' * 256}.dcm", "longer than 255 bytes"),
                        (f"{'é' * 128}/a.dcm", "longer than 255 bytes"),
                        ("/".join(["d" * 200] * 6) + "/a.dcm", "path longer than 1024")):
        z = tmp_path / "long.zip"
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr("ok.dcm", b"x")
            zf.writestr(name, b"x")
        with pytest.raises(ImportRejected, match=f"member #2 .*{match}"):
            safe_extract_zip(z, tmp_path / "out", ZipLimits())
    z = tmp_path / "clash.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/b", b"x")
        zf.writestr("a/b/c.dcm", b"x")
    with pytest.raises(ImportRejected, match="a file and for a folder"):
        safe_extract_zip(z, tmp_path / "out2", ZipLimits())
    assert files_below(tmp_path / "out2") == []


@pytest.fixture()
def researcher(db, settings, tmp_path, fake_queue):
    settings.DATA_DIR = tmp_path / "data"
    user = User.objects.create_user("r", password="pw")
    user.groups.add(Group.objects.create(name="researcher"))
    cohort = Cohort.objects.create(name="c", owner=user)
    cohort.researchers.add(user)
    return user, cohort, fake_queue


def upload_and_import(client, researcher, path: Path, capture) -> CohortUpload:
    user, cohort, q = researcher
    client.force_login(user)
    with capture(execute=True), open(path, "rb") as fh:
        r = client.post(f"/cohorts/{cohort.pk}/upload/", {"files": fh},
                        HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.status_code == 200, r.content
    with capture(execute=True):
        SimpleWorker([q], connection=q.connection).work(burst=True)
    return CohortUpload.objects.get(pk=r.json()["upload"]["id"])


@pytest.mark.parametrize("kind,message", [
    ("long-name", "longer than 255 bytes"),
    ("empty", "the zip archive is empty"),
    ("bomb", "zip bomb"),
])
def test_uploads_are_refused_plainly(client, researcher, tmp_path, kind, message,
                                     django_capture_on_commit_callbacks):
    z = tmp_path / f"{kind}.zip"
    if kind == "bomb":
        bomb(z)
    else:
        with zipfile.ZipFile(z, "w") as zf:
            if kind == "long-name":
                zf.writestr(f"{'n' * 300}/IM0001.dcm", b"x")
    up = upload_and_import(client, researcher, z, django_capture_on_commit_callbacks)
    assert up.status == "failed" and message in up.message, up.message
    assert "internal error" not in up.message and "not a DICOM" not in up.message
    assert not up.retryable  # a refusal: nothing is kept for a retry that would fail again
    tmp = Path(researcher[1].storage_dir())
    assert files_below(tmp_path / "data" / tmp) == []
