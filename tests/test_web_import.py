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

from surveys import importing
from surveys.importing import ImportRejected, ZipLimits, import_folder, import_zip, safe_extract_zip
from surveys.models import Cohort, IdentityLink, Series, StageRun, Subject
from surveys.stages import STAGES
from surveys.synthetic import FAKE_MARKER, write_synthetic_cohort, zip_folder


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("synth") / "cohort"
    write_synthetic_cohort(src, 3, size="tiny", seed=3)
    return src


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
