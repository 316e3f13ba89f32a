"""Shared storage between machines: a folder-backed Django storage stands in for S3.

Machine A imports and runs the first stages; machine B (an empty DATA_DIR) runs the
remaining stages from the shared copy; machine C (empty again) serves the pages,
images and the de-identified download. A stage's outputs are authoritative: after a
re-run the local and the remote copy of its folders hold exactly what it produced,
and other stages' folders are untouched. :func:`surveys.storage.mirror.push_tree` /
:func:`~surveys.storage.mirror.pull_tree` mirror folders in either direction."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from surveys.cohorts.importing import ImportRejected, import_folder
from surveys.models import Cohort
from surveys.processing import jobs
from tests.factories.dicom_cohorts import write_synthetic_cohort


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


@pytest.mark.slow
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
    # the stage rebuilds faces on the de-identified skulls by default (both attacks)
    assert cohort.reid.metrics["conditions"] == [
        "control", "deidentified", "attack_learned", "attack_tissue_depth"]
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


@pytest.mark.slow
def test_failed_import_leaves_nothing_in_the_shared_storage(db, settings, tmp_path, shared,
                                                             monkeypatch):
    from surveys.cohorts import importing

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


# ------------------------------------------------------------------ stage outputs are authoritative


def _snapshot(root: Path, under: str) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of every file below ``root/under``."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in (root / under).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_rerun_stage_removes_stale_outputs_locally_and_remotely(db, settings, tmp_path, shared,
                                                                monkeypatch):
    from surveys.models import RenderImage
    from surveys.storage.mirror import shared_storage

    monkeypatch.setattr(jobs, "enqueue_stage", lambda run, queue=None: "")  # run by hand
    user = User.objects.create_user("r", password="pw")
    cohort = Cohort.objects.create(name="c", owner=user)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 1, size="tiny", seed=51)
    settings.DATA_DIR = tmp_path / "machineA"
    import_folder(cohort, src, move=False)
    subject = cohort.subjects.get()
    for stage in ("import", "deidentify", "surfaces"):
        _run(subject.stages.get(stage=stage))
    base = f"{cohort.storage_dir()}"
    renders = f"{base}/derived/{subject.pseudonym}/surfaces"
    slices = f"{base}/derived/{subject.pseudonym}/deidentify"
    good = {f"{renders}/render-yaw{y}-{v}.png" for y in ("+0", "+30") for v in ("original", "deid")}
    assert {k for k in _files(shared) if k.startswith(renders)} == good
    assert set(subject.images.filter(kind="render").values_list("path", flat=True)) == good
    assert any(k.startswith(slices + "/slice-") for k in _files(shared))

    # stale outputs of an earlier configuration: a view that is no longer rendered (file
    # and row, on A and in the storage) and a file of the earlier flat layout (row moved)
    stale = f"{renders}/render-yaw+60-deid.png"
    flat = f"{base}/derived/{subject.pseudonym}/render-yaw+0-deid.png"
    for rel in (stale, flat):
        for root in (tmp_path / "machineA", shared):
            (root / rel).write_bytes(b"stale")
    RenderImage.objects.create(subject=subject, kind="render", variant="deid", view="yaw+60",
                               path=stale)
    RenderImage.objects.filter(subject=subject, kind="render", variant="deid",
                               view="yaw+0").update(path=flat)
    others = {under: _snapshot(shared, under) for under in (f"{base}/orig", f"{base}/deid", slices)}

    # machine B (a stale local file of its own) re-runs the surfaces stage
    settings.DATA_DIR = tmp_path / "machineB"
    (tmp_path / "machineB" / renders).mkdir(parents=True)
    (tmp_path / "machineB" / renders / "render-yaw-30-original.png").write_bytes(b"stale")
    _run(subject.stages.get(stage="surfaces"))
    remote = _files(shared)
    assert {k for k in remote if k.startswith(renders)} == good
    assert {k for k in _files(tmp_path / "machineB") if k.startswith(renders)} == good
    assert stale not in remote and flat not in remote
    assert set(subject.images.filter(kind="render").values_list("path", flat=True)) == good
    # outputs of other stages: untouched in the storage, and B pulled only its inputs
    for under, before in others.items():
        assert _snapshot(shared, under) == before, under
    assert not (tmp_path / "machineB" / slices).exists()
    assert shared_storage().exists(f"{slices}/slice-axial-deid.png")

    # machine A has a stale file in an input folder of the next stage (the embeddings stage
    # reads the original and de-identified series): that stage mirrors its input folders
    settings.DATA_DIR = tmp_path / "machineA"
    deid_dir = f"{base}/deid/{subject.pseudonym}"
    (tmp_path / "machineA" / deid_dir / "stale.dcm").write_bytes(b"stale")
    _run(subject.stages.get(stage="embeddings"))
    local = {k for k in _files(tmp_path / "machineA") if k.startswith(deid_dir)}
    assert local == {k for k in _files(shared) if k.startswith(deid_dir)} and local
    assert f"{deid_dir}/stale.dcm" not in local
    assert not list((tmp_path / "machineA").rglob(".*"))  # no temporary leftovers


def test_push_tree_uploads_before_it_deletes_and_pull_tree_mirrors(db, settings, tmp_path,
                                                                     shared, monkeypatch):
    import os

    from surveys.storage import mirror as sh

    settings.DATA_DIR = tmp_path / "local"
    folder = "cohorts/c00001/derived/SUBJ-0001/surfaces"
    local = tmp_path / "local" / folder
    local.mkdir(parents=True)
    (local / "a.png").write_bytes(b"aaaa")
    (local / "sub").mkdir()
    (local / "sub" / "b.png").write_bytes(b"bb")
    (local / ".c.png.part").write_bytes(b"temporary")
    (shared / folder).mkdir(parents=True)
    (shared / folder / "old.png").write_bytes(b"old")
    (shared / folder / "a.png").write_bytes(b"AAAA")  # same size, other content
    events: list[tuple[str, str]] = []
    storage = sh.shared_storage()
    real_put, real_delete = sh._put, type(storage).delete
    monkeypatch.setattr(sh, "_put", lambda st, key, path: (events.append(("put", key)),
                                                           real_put(st, key, path)))
    monkeypatch.setattr(type(storage), "delete", lambda st, key: (events.append(("delete", key)),
                                                                  real_delete(st, key)))
    assert sh.push_tree(folder) == 2
    assert [e for e, _ in events] == ["put", "put", "delete"]  # no file missing in between
    assert _files(shared / folder) == {"a.png", "sub/b.png"}
    assert (shared / folder / "a.png").read_bytes() == b"aaaa"

    # another machine: a stale local file, a same-size file with other content, and a
    # temporary file of a download in progress
    settings.DATA_DIR = tmp_path / "other"
    other = tmp_path / "other" / folder
    (other / "sub").mkdir(parents=True)
    (other / "a.png").write_bytes(b"xxxx")
    (other / "stale.png").write_bytes(b"s")
    (other / ".d.png.part").write_bytes(b"in progress")
    assert sh.pull_tree(folder) == 2
    assert _files(other) == {"a.png", "sub/b.png", ".d.png.part"}
    assert (other / "a.png").read_bytes() == b"aaaa"
    assert sh.pull_tree(folder) == 0  # up to date: nothing downloaded again
    (shared / folder / "a.png").write_bytes(b"AAAA")  # changed remotely, same size
    os.utime(shared / folder / "a.png", ns=(1, 1))
    assert sh.pull_tree(folder) == 1 and (other / "a.png").read_bytes() == b"AAAA"
    assert sh.pull_tree(folder) == 0
    # the remote folder is emptied: the local copy follows
    for p in list((shared / folder).rglob("*.png")):
        p.unlink()
    assert sh.pull_tree(folder) == 0
    assert _files(other) == {".d.png.part"}
    settings.DATA_DIR = tmp_path / "local"
    assert sh.pull_tree(folder) == 0 and _files(local) == {".c.png.part"}


def test_served_files_follow_the_remote_copy(settings, tmp_path, shared):
    """The web server's copy of a file is replaced when a stage re-run on another machine
    replaced the remote one (same size, new content), and is not downloaded again while
    the remote copy is unchanged."""
    import os

    from surveys.storage.mirror import ensure_local, push_file

    rel = "cohorts/c00001/derived/P0001/surfaces/render-yaw+0-deid.png"
    settings.DATA_DIR = tmp_path / "machineA"
    (tmp_path / "machineA" / rel).parent.mkdir(parents=True)
    (tmp_path / "machineA" / rel).write_bytes(b"first run")
    push_file(rel)

    settings.DATA_DIR = tmp_path / "machineC"
    served = ensure_local(rel)
    assert served == tmp_path / "machineC" / rel and served.read_bytes() == b"first run"
    inode = served.stat().st_ino
    assert ensure_local(rel).stat().st_ino == inode  # unchanged remote: no download

    settings.DATA_DIR = tmp_path / "machineB"  # the stage re-runs elsewhere
    (tmp_path / "machineB" / rel).parent.mkdir(parents=True)
    (tmp_path / "machineB" / rel).write_bytes(b"other run")  # same size
    push_file(rel)
    st = (shared / rel).stat()
    os.utime(shared / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))

    settings.DATA_DIR = tmp_path / "machineC"
    assert ensure_local(rel).read_bytes() == b"other run"
    assert [p.name for p in served.parent.iterdir()] == [served.name]  # no temp file left

    only_local = "cohorts/c00001/derived/P0001/surfaces/local-only.png"
    (tmp_path / "machineC" / only_local).write_bytes(b"x")
    assert ensure_local(only_local).read_bytes() == b"x"  # not in the storage: served as is
