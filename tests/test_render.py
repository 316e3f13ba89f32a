"""Rendering: pyrender/OSMesa vs embree ray casting, camera geometry, timeout, fork safety."""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest
import trimesh

from pipeline import render as rmod
from pipeline.render import (
    RenderError,
    RenderSettings,
    RenderTimeout,
    camera_pose,
    canonical_face_box,
    project_points,
    raycast_view,
    render_view,
    render_views,
    save_png,
)

SMALL = RenderSettings(width_px=128, height_px=128, yfov_deg=28.0, target=(0.0, 0.0, 0.0))


def toy_head_mesh() -> trimesh.Trimesh:
    """Canonical-frame toy head: ellipsoid skull + nose (anterior, -y) + left ear (+x)."""
    head = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    head.apply_scale([75.0, 95.0, 105.0])
    nose = trimesh.creation.icosphere(subdivisions=3, radius=18.0)
    nose.apply_translation([0.0, -95.0, -20.0])
    ear = trimesh.creation.icosphere(subdivisions=3, radius=15.0)
    ear.apply_translation([75.0, 0.0, 0.0])
    return trimesh.util.concatenate([head, nose, ear])


@pytest.fixture(scope="module")
def gl_ok() -> bool:
    if not rmod.opengl_available():
        pytest.fail("OSMesa OpenGL is not available (install libosmesa6): "
                    f"{rmod._GL_STATUS}")
    return True


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_pyrender_mask_matches_raycast(gl_ok):
    mesh = toy_head_mesh()
    yaws = (0.0, 30.0, -60.0)
    gl = render_views(mesh, yaws, SMALL, backend="pyrender")
    rc = render_views(mesh, yaws, SMALL, backend="raycast")
    for g, r in zip(gl, rc):
        assert g.backend == "pyrender" and r.backend == "raycast"
        assert g.image.dtype == np.uint8 and g.image.shape == (128, 128)
        assert 0.05 < g.mask.mean() < 0.95
        assert _iou(g.mask, r.mask) >= 0.98
        both = g.mask & r.mask
        assert np.median(np.abs(g.depth[both] - r.depth[both])) < 0.5
        # both backends light the surface and leave the background at its grey level
        assert g.image[~g.mask].max() == SMALL.background == r.image[~r.mask].max()
        assert g.image[both].mean() > 60 and r.image[both].mean() > 60
        # same diffuse shading model and gamma: grey levels agree closely
        diff = np.abs(g.image[both].astype(int) - r.image[both].astype(int))
        assert np.median(diff) <= 3 and diff.mean() < 6


def test_sphere_silhouette_matches_pinhole_geometry():
    radius, dist = 80.0, 600.0
    s = RenderSettings(width_px=160, height_px=160, target=(0.0, 0.0, 0.0), camera_distance=dist)
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    res = raycast_view(sphere, 0.0, s)
    f = 0.5 * s.height_px / np.tan(np.deg2rad(s.yfov_deg) / 2)
    r_px = f * radius / np.sqrt(dist**2 - radius**2)  # tangent-cone silhouette radius
    assert res.mask.sum() == pytest.approx(np.pi * r_px**2, rel=0.03)
    # nearest depth is at the centre pixel: distance minus radius
    c = s.height_px // 2
    assert res.depth[c - 1:c + 1, c - 1:c + 1].min() == pytest.approx(dist - radius, abs=0.5)


def test_view_orientation_conventions():
    mesh = toy_head_mesh()
    front = raycast_view(mesh, 0.0, SMALL)
    # the subject's left ear (+x) is on the image's right; the nose projects where it is
    ear_uv = project_points(np.array([[82.0, 0.0, 0.0]]), 0.0, SMALL)[0]
    assert ear_uv[0] > SMALL.width_px / 2
    assert front.mask[int(ear_uv[1]), int(ear_uv[0])]
    nose_uv = project_points(np.array([[0.0, -113.0, -20.0]]), 0.0, SMALL)[0]
    r, c = round(nose_uv[1]), round(nose_uv[0])
    local = front.depth[r - 2:r + 3, c - 2:c + 3]
    assert local[local > 0].min() < front.depth[front.mask].mean() - 20  # nose is nearest
    # positive yaw moves the camera to the subject's left: the ear comes towards the camera
    pose = camera_pose(30.0, SMALL)
    assert pose[0, 3] > 0 and pose[1, 3] < 0
    left = raycast_view(mesh, 30.0, SMALL)
    right = raycast_view(mesh, -30.0, SMALL)
    assert left.mask.sum() > right.mask.sum()  # ear only visible from the left


def test_renders_are_deterministic_and_settings_checked(gl_ok):
    mesh = toy_head_mesh()
    a = render_view(mesh, 0.0, SMALL)
    b = render_view(mesh, 0.0, SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)
    with pytest.raises(RenderError, match="empty"):
        render_view(trimesh.Trimesh(), 0.0, SMALL)
    with pytest.raises(RenderError, match="yaw"):
        render_views(mesh, [95.0], SMALL)
    with pytest.raises(RenderError, match="backend"):
        render_views(mesh, [0.0], SMALL, backend="vulkan")
    with pytest.raises(RenderError, match="z_near"):
        RenderSettings(camera_distance=50.0)


def test_face_box_is_inside_the_image_and_on_the_face():
    box = canonical_face_box(0.0, RenderSettings())
    left, top, right, bottom = box
    s = RenderSettings()
    assert 0 <= left < right < s.width_px and 0 <= top < bottom < s.height_px
    _hx, y0, _y1, z0, z1 = s.face_box
    centre = project_points(np.array([[0.0, y0, (z0 + z1) / 2]]), 0.0, s)[0]
    assert left < centre[0] < right and top < centre[1] < bottom
    assert abs((left + right) / 2 - s.width_px / 2) <= 1  # frontal box is centred in x


def test_gl_hang_raises_timeout_then_recovers(gl_ok):
    t0 = time.monotonic()
    with pytest.raises(RenderTimeout):
        rmod._run_in_gl_thread(lambda w: time.sleep(3.0), timeout_s=0.2)
    assert time.monotonic() - t0 < 1.5
    res = render_view(toy_head_mesh(), 0.0, SMALL, backend="pyrender")
    assert res.mask.any()


def _render_in_child(q) -> None:
    try:
        res = render_view(toy_head_mesh(), 0.0, SMALL, backend="pyrender", timeout_s=60)
        q.put(res.image)
    except Exception as exc:  # noqa: BLE001 — reported to the parent
        q.put(repr(exc))


def test_render_in_forked_child_after_parent_rendered(gl_ok):
    parent = render_view(toy_head_mesh(), 0.0, SMALL, backend="pyrender")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_render_in_child, args=(q,))
    p.start()
    out = q.get(timeout=90)
    p.join(timeout=30)
    assert not isinstance(out, str), out
    assert np.array_equal(out, parent.image)


def test_save_png_roundtrip(tmp_path):
    from PIL import Image

    img = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    path = save_png(img, tmp_path / "sub" / "view.png")
    assert np.array_equal(np.asarray(Image.open(path)), img)
    with pytest.raises(RenderError):
        save_png(img.astype(float), tmp_path / "x.png")


def test_auto_backend_falls_back_to_raycast_without_opengl(monkeypatch):
    import os

    monkeypatch.setitem(rmod._GL_STATUS, os.getpid(), "simulated: no OSMesa")
    res = render_view(toy_head_mesh(), 0.0, SMALL, backend="auto")
    assert res.backend == "raycast" and res.mask.any()
    with pytest.raises(RenderError, match="not available"):
        render_view(toy_head_mesh(), 0.0, SMALL, backend="pyrender")


def test_render_subject_same_transform_for_original_and_defaced():
    from pipeline.align import BoneCloud, bone_cloud, make_template
    from tests.test_surface import make_head_volume

    shape, spacing = (80, 90, 80), (3.0, 3.0, 3.0)
    vol = make_head_volume(shape, spacing)
    defaced = make_head_volume(shape, spacing, deface=True)
    centre = np.array([(n - 1) * s / 2 for n, s in zip(shape[::-1], spacing[::-1])])
    cloud = bone_cloud(vol)
    template = make_template(BoneCloud(cloud.points_lps_mm - centre, cloud.normals,
                                       cloud.weights_mm2))
    settings = RenderSettings(width_px=128, height_px=128)
    # no smoothing: it would carry the removed nose a few mm into the vault of this toy head
    res = rmod.render_subject(vol, defaced, yaw_degs=(0.0, 30.0), settings=settings,
                              template=template, resolution_mm=3.0, backend="raycast",
                              smoothing_iterations=0)
    assert res.shared_alignment and set(res.timings_s) >= {"alignment", "render_deidentified"}
    assert len(res.original) == len(res.deidentified) == 2
    front_o, front_d = res.original[0], res.deidentified[0]
    changed = front_o.image != front_d.image
    assert changed.mean() > 0.01  # the face changed...
    top = slice(0, 20)  # ...the vault above the defaced region did not (up to decimation)
    mo, md = front_o.mask[top], front_d.mask[top]
    assert mo.sum() > 100 and (mo == md).mean() > 0.99
    assert np.median(np.abs(front_o.depth[top][mo & md] - front_d.depth[top][mo & md])) < 0.5
    # the nose (most anterior skin) is gone: de-identified surface is further from the camera
    assert front_d.depth[front_d.mask].min() > front_o.depth[front_o.mask].min() + 5


def test_opengl_imported_before_the_render_module_still_renders_offscreen(gl_ok):
    """The OSMesa platform is set by the ``pipeline`` package, so code that imports
    pyrender/OpenGL before :mod:`pipeline.render` (but after anything from ``pipeline``)
    renders offscreen all the same."""
    import os
    import subprocess
    import sys

    code = (
        "import pipeline.volume\n"          # any pipeline module first ...
        "import OpenGL.GL, pyrender\n"       # ... then OpenGL, before pipeline.render
        "import os, trimesh\n"
        "from pipeline.render import RenderSettings, render_view\n"
        "m = trimesh.creation.icosphere(subdivisions=3, radius=80.0)\n"
        "r = render_view(m, 0.0, RenderSettings(width_px=64, height_px=64, yfov_deg=28.0,"
        " target=(0.0, 0.0, 0.0)), backend='pyrender')\n"
        "print(os.environ['PYOPENGL_PLATFORM'], r.backend, round(float(r.mask.mean()), 2))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYOPENGL_PLATFORM", "DISPLAY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    platform, backend, covered = out.stdout.split()
    assert platform == "osmesa" and backend == "pyrender" and 0.1 < float(covered) < 0.95
