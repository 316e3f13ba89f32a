"""Slice and surface viewer data (issue 15): reformats respect the geometry, the removed
region is exact, payloads round-trip, the cache is built once and invalidated by a re-run,
and every viewer URL goes through the cohort permission checks."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from django.contrib.auth.models import Group, User

from pipeline import viewer as pv
from pipeline.deface import sample_plane
from pipeline.volume import Volume
from tests.viewer_fixture import head_phantom, make_subject, phantom_volume

# ------------------------------------------------------------------ pure geometry


def _reference(vol: Volume, vg: pv.ViewGeometry, n: int, arr: np.ndarray) -> np.ndarray:
    """The same reformat through pipeline.deface.sample_plane (independent code)."""
    origin = vg.origin + n * vg.step_w * vg.w
    img, = sample_plane(vol, origin, vg.u, vg.v, vg.width, vg.height, vg.pixel_mm[0],
                        [arr.astype(np.int32)])
    inside, = sample_plane(vol, origin, vg.u, vg.v, vg.width, vg.height, vg.pixel_mm[0],
                           [np.ones(arr.shape, bool)])
    return np.where(inside, img, pv.OUTSIDE)


@pytest.mark.parametrize("kind", ["regular", "irregular", "tilted"])
def test_reformats_match_an_independent_sampler(kind):
    ph = head_phantom((24, 40, 36), (4.0, 5.0, 5.5), tilt_deg=15.0 if kind == "tilted" else 0.0,
                      irregular=kind == "irregular")
    vol = phantom_volume(ph)
    assert vol.is_regular == (kind == "regular")
    geom = pv.SliceGeometry.of(vol)
    views = pv.view_geometries(geom)
    assert views["axial"].native and not views["coronal"].native
    assert views["coronal"].pixel_mm == views["sagittal"].pixel_mm == (5.0, 5.0)
    for name in ("coronal", "sagittal"):
        vg = views[name]
        for n in (0, vg.n // 3, vg.n // 2, vg.n - 1):
            got, = vg.sample(geom, [ph.original], n)
            np.testing.assert_array_equal(got, _reference(vol, vg, n, ph.original))
    # axial = the native slices, untouched (full resolution)
    a, b = views["axial"].sample(geom, [ph.original, ph.deidentified], 7)
    np.testing.assert_array_equal(a, ph.original[7])
    np.testing.assert_array_equal(b, ph.deidentified[7])


def test_display_orientation_of_native_slices_and_reformats():
    hu = np.full((10, 20, 30), -1000, np.int16)
    hu[:, 0, :] = 100  # row 0: posterior after the flip below
    hu[:, :, 0] = 200  # column 0
    hu[9] = 300  # last slice
    # rows run anterior (col cosine −y), columns towards patient right (row cosine −x)
    vol = Volume(hu=hu, spacing_mm=(2.0, 1.0, 1.0), row_cosine=np.array([-1.0, 0, 0]),
                 col_cosine=np.array([0, -1.0, 0]), normal=np.array([0, 0, 1.0]))
    geom = pv.SliceGeometry.of(vol)
    views = pv.view_geometries(geom)
    ax = views["axial"]
    assert ax.native and ax.flip_rows and ax.flip_cols
    img, = ax.sample(geom, [hu], 3)
    np.testing.assert_array_equal(img, hu[3][::-1, ::-1])
    assert (img[-1, :-1] == 100).all()  # the posterior row is at the bottom
    # coronal: superior (the last slice) at the top, rows towards inferior
    cor = views["coronal"]
    img, = cor.sample(geom, [hu], cor.n // 2)
    assert (img[0] == 300).all() and (img[-1] != 300).all()
    assert cor.height == 19  # (10 − 1) slices × 2 mm / 1 mm + 1 rows
    # sagittal: columns from anterior to posterior
    sag = views["sagittal"]
    img, = sag.sample(geom, [hu], sag.n // 2)
    assert (img[1:-1, -1] == 100).all()  # hu row 0 (col cosine −y: most posterior) on the right


def test_reformat_shows_thick_slices_as_bands_and_nothing_outside():
    hu = np.zeros((4, 8, 8), np.int16)
    for k in range(4):
        hu[k] = 10 * k
    vol = Volume(hu=hu, spacing_mm=(5.0, 1.0, 1.0))
    geom = pv.SliceGeometry.of(vol)
    cor = pv.view_geometries(geom)["coronal"]
    img, = cor.sample(geom, [hu], 3)
    col = img[:, 4]
    assert set(np.unique(col)) == {0, 10, 20, 30}  # no invented (interpolated) values
    assert (np.diff(col.astype(int)) <= 0).all()  # superior slices at the top
    assert np.count_nonzero(col == 10) == 5  # a 5 mm slab = 5 rows of 1 mm
    with pytest.raises(IndexError):
        cor.sample(geom, [hu], cor.n)


def test_removed_counts_per_image():
    ph = head_phantom((20, 32, 32), (4.0, 6.0, 6.0))
    vol = phantom_volume(ph)
    geom = pv.SliceGeometry.of(vol)
    views = pv.view_geometries(geom)
    removed = ph.original != ph.deidentified
    counts = pv.removed_counts(geom, views, removed)
    assert counts["axial"] == removed.sum(axis=(1, 2)).tolist()
    assert sum(counts["coronal"]) == sum(counts["sagittal"]) == int(removed.sum())
    # the removed face lies anterior: in the first coronal images, none at the back
    cor = np.asarray(counts["coronal"])
    assert cor[: len(cor) // 2].sum() == removed.sum() and cor.sum() > 0


def test_slice_payload_round_trip():
    rng = np.random.default_rng(0)
    a = rng.integers(-1024, 3000, (7, 9)).astype(np.int16)
    b = a.copy()
    b[2:4, 3:6] = -1000
    a[0, 0] = pv.OUTSIDE
    b[0, 0] = pv.OUTSIDE
    data = pv.encode_slice(a, b, (0.45, 0.9))
    orig, deid, n, px = pv.decode_slice(data)
    np.testing.assert_array_equal(orig, a)
    np.testing.assert_array_equal(deid, b)
    assert n == int((a != b).sum()) and px == pytest.approx((0.45, 0.9))
    assert len(gzip.compress(data)) < len(data)
    with pytest.raises(ValueError):
        pv.decode_slice(b"XXXX" + data[4:])


def test_surface_meshes_of_the_phantom():
    ph = head_phantom((40, 64, 64), (4.0, 3.5, 3.5))
    orig, deid = phantom_volume(ph), phantom_volume(ph, "deid")
    meshes = pv.surface_meshes(orig, deid, resolution_mm=3.5, skin_faces=6000, bone_faces=8000)
    assert set(meshes) == {"skin-original", "skin-deid", "bone-original", "bone-deid"}
    for name, m in meshes.items():
        assert m.n_faces <= (6000 if name.startswith("skin") else 8000) * 1.05
        back = pv.decode_mesh(pv.encode_mesh(m))
        np.testing.assert_array_equal(back.vertices_ras, m.vertices_ras)
        np.testing.assert_array_equal(back.faces, m.faces)
        np.testing.assert_array_equal(back.flags, m.flags)
    so, sd = meshes["skin-original"], meshes["skin-deid"]
    # RAS: anterior is +y; the removed face is the front of the head
    flagged = so.vertices_ras[so.flags == 1]
    assert len(flagged) > 50
    assert flagged[:, 1].mean() > so.vertices_ras[:, 1].mean() + 30
    assert sd.vertices_ras[:, 1].max() < so.vertices_ras[:, 1].max() - 5  # the nose is gone
    assert (sd.flags == 1).sum() > 50  # the cut surface
    # bone is untouched: same extent, nearly no bone vertex next to removed voxels
    bo, bd = meshes["bone-original"], meshes["bone-deid"]
    np.testing.assert_allclose(bo.vertices_ras.min(0), bd.vertices_ras.min(0), atol=2.0)
    np.testing.assert_allclose(bo.vertices_ras.max(0), bd.vertices_ras.max(0), atol=2.0)


# ------------------------------------------------------------------ cache and views


@pytest.fixture()
def site(db, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    from surveys.models import Cohort

    group = Group.objects.create(name="researcher")
    owner = User.objects.create_user("owner", password="pw")
    other = User.objects.create_user("other", password="pw")
    owner.groups.add(group)
    other.groups.add(group)
    cohort = Cohort.objects.create(name="c", owner=owner)
    cohort.researchers.add(owner)
    ph = head_phantom((16, 28, 24), (5.0, 6.0, 6.5), tilt_deg=10.0)
    subject = make_subject(cohort, "SUBJ-0001", ph)
    return {"cohort": cohort, "subject": subject, "owner": owner, "other": other, "ph": ph}


def _manifest(client, site) -> dict:
    r = client.get(f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0001/viewer.json")
    assert r.status_code == 200 and r["Cache-Control"] == "private, no-store"
    return r.json()


def test_viewer_urls_need_the_cohort(client, site):
    client.force_login(site["owner"])
    m = _manifest(client, site)
    base = m["selected"]["base"]
    urls = [f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0001/viewer.json",
            f"{base}axial/3.bin", f"{base}coronal/3.bin", f"{base}mesh/skin-deid.bin",
            f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0001/status.json"]
    client.logout()
    for u in urls:
        r = client.get(u)
        assert r.status_code == 403 and b"Sign in" not in r.content, u
    client.force_login(site["other"])
    for u in urls:
        assert client.get(u).status_code == 404, u
    client.force_login(site["owner"])
    for u in urls:
        assert client.get(u).status_code == 200, u
    # no pseudonym of another cohort, no path, no header value in the manifest
    text = json.dumps(m)
    assert "cohorts/c0" not in text and "phantom" not in text and "FAKE" not in text
    assert set(m["selected"]["views"]) == {"axial", "coronal", "sagittal"}


def test_slices_served_from_the_cache_are_the_series(client, site, monkeypatch):
    from surveys.processing import viewer

    loads = []
    real = viewer.load_stored
    monkeypatch.setattr(viewer, "load_stored", lambda rel: loads.append(rel) or real(rel))
    client.force_login(site["owner"])
    m = _manifest(client, site)
    assert len(loads) == 2  # original + de-identified, read once
    sel = m["selected"]
    ph = site["ph"]
    for n in (0, 8, 15):
        r = client.get(f"{sel['base']}axial/{n}.bin")
        assert r["Content-Type"] == "application/octet-stream"
        orig, deid, n_removed, _ = pv.decode_slice(r.content)
        np.testing.assert_array_equal(orig, ph.original[n])
        np.testing.assert_array_equal(deid, ph.deidentified[n])
        assert n_removed == int((ph.original[n] != ph.deidentified[n]).sum())
    vol = phantom_volume(ph)
    geom = pv.SliceGeometry.of(vol)
    sag = pv.view_geometries(geom)["sagittal"]
    r = client.get(f"{sel['base']}sagittal/{sag.n // 2}.bin", HTTP_ACCEPT_ENCODING="gzip, br")
    assert r["Content-Encoding"] == "gzip"
    orig, _, _, px = pv.decode_slice(gzip.decompress(r.content))
    np.testing.assert_array_equal(orig, _reference(vol, sag, sag.n // 2, ph.original))
    assert sel["views"]["sagittal"]["removed"][sag.n // 2] >= 0
    assert sum(sel["views"]["axial"]["removed"]) == int((ph.original != ph.deidentified).sum())
    # second visit: nothing read again
    _manifest(client, site)
    client.get(f"{sel['base']}coronal/2.bin")
    assert len(loads) == 2
    # out of range, unknown view, bad label/version
    assert client.get(f"{sel['base']}axial/16.bin").status_code == 404
    assert client.get(f"{sel['base']}oblique/1.bin").status_code == 404
    assert client.get(sel["base"].replace("/S01/", "/S09/") + "axial/1.bin").status_code == 404
    assert client.get(sel["base"].replace(sel["version"], "0" * 16) + "axial/1.bin") \
        .status_code == 410


def test_meshes_are_made_once_and_decimated(client, site, monkeypatch):
    client.force_login(site["owner"])
    sel = _manifest(client, site)["selected"]
    calls = []
    real = pv.surface_meshes
    monkeypatch.setattr(pv, "surface_meshes", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("skin-original", "skin-deid", "bone-original", "bone-deid"):
        r = client.get(sel["meshes"][name], HTTP_ACCEPT_ENCODING="gzip")
        assert r.status_code == 200 and r["Content-Encoding"] == "gzip"
        m = pv.decode_mesh(r.content)
        assert m.n_faces > 100 and m.faces.max() < len(m.vertices_ras)
    plain = client.get(sel["meshes"]["skin-deid"])  # no gzip accepted: plain bytes
    assert plain.content[:4] == pv.MESH_MAGIC and "Content-Encoding" not in plain
    assert calls == [1]
    assert client.get(sel["base"] + "mesh/face.bin").status_code == 404


def test_a_rerun_gets_new_data_and_the_old_cache_is_deleted(client, site):
    from django.utils import timezone

    from surveys.processing import viewer

    client.force_login(site["owner"])
    first = _manifest(client, site)["selected"]
    folder = viewer.subject_cache_dir(site["subject"])
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == \
        [f"S01-{first['version']}"]
    run = site["subject"].stages.get(stage="deidentify")
    run.finished = timezone.now() + timezone.timedelta(seconds=5)
    run.attempts += 1
    run.save()
    second = _manifest(client, site)["selected"]
    assert second["version"] != first["version"]
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == \
        [f"S01-{second['version']}"]
    assert client.get(f"{first['base']}axial/1.bin").status_code == 410
    # while the stage runs again there is nothing to show (and no stale data)
    run.status = "running"
    run.save()
    m = _manifest(client, site)
    assert m["selected"] is None and "de-identification" in m["message"]
    assert client.get(f"{second['base']}axial/1.bin").status_code == 404


def test_cache_deleted_with_the_subject_and_kept_under_the_size_limit(client, site, settings):
    from surveys.models import Subject
    from surveys.processing import viewer

    client.force_login(site["owner"])
    _manifest(client, site)
    folder = viewer.subject_cache_dir(site["subject"])
    assert folder.is_dir()
    ph2 = head_phantom((16, 28, 24), (5.0, 6.0, 6.5), seed=9)
    second = make_subject(site["cohort"], "SUBJ-0002", ph2, patient_id="FAKE2")
    settings.VIEWER_CACHE_MAX_BYTES = 1  # anything but the series just built is evicted
    r = client.get(f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0002/viewer.json")
    assert r.status_code == 200
    assert not any(folder.glob("S01-*"))  # least recently used: evicted
    assert any(viewer.subject_cache_dir(second).glob("S01-*"))
    Subject.objects.filter(pk=second.pk).delete()
    assert not viewer.subject_cache_dir(second).exists()


def test_manifest_of_a_subject_without_deidentified_series(client, site):
    run = site["subject"].stages.get(stage="deidentify")
    run.status = "failed"
    run.save()
    client.force_login(site["owner"])
    m = _manifest(client, site)
    assert m["selected"] is None and m["deidentify_status"] == "failed"
    assert m["series"] == [{"label": "S01", "slices": 16, "ready": False, "primary": True}]
    r = client.get(f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0001/viewer.json?series=S07")
    assert r.status_code == 404


def test_prewarm_builds_volumes_and_meshes(site):
    from surveys.processing import viewer

    viewer.prewarm(site["subject"])
    (folder,) = [p for p in viewer.subject_cache_dir(site["subject"]).iterdir()
                 if not p.name.startswith(".")]
    assert (folder / "original.npy").is_file() and (folder / "deid.npy").is_file()
    info = json.loads((folder / "meshes" / "meshes.json").read_text())
    assert set(info["meshes"]) == {"skin-original", "skin-deid", "bone-original", "bone-deid"}
    # the cached arrays are the series
    a = np.load(folder / "deid.npy")
    np.testing.assert_array_equal(a, site["ph"].deidentified)


def test_a_series_that_cannot_be_read_gives_a_message_not_an_error(client, site):
    import shutil

    from surveys.storage.paths import data_path

    series = site["subject"].series.get()
    shutil.rmtree(data_path(series.deid_dir))
    client.force_login(site["owner"])
    m = _manifest(client, site)
    assert m["selected"] is None and m["message"].startswith("The viewers are not available")
    assert "cohorts/" not in m["message"] and "/data" not in m["message"]  # no path
