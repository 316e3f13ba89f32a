"""Standardised offscreen renders of canonical head surfaces (pyrender/OSMesa, embree fallback).

OpenGL platform: :mod:`pipeline` (the package) sets ``PYOPENGL_PLATFORM=osmesa`` and
``LP_NUM_THREADS=0`` when it loads (unless already set), so the import order of
this module does not matter.

Coordinates: meshes are in the canonical head frame of
:mod:`pipeline.align` (x → subject Left, y → Posterior, z → Superior,
canonical mm). The camera looks at ``RenderSettings.target`` from
``camera_distance`` away; ``yaw_deg = 0`` is the frontal view (camera on the
anterior side, subject's left on the image's right, superior up); positive
yaw moves the camera towards the subject's LEFT (showing the left cheek);
``elevation_deg`` raises the camera. Light: one directional light plus ambient
light; material is a matte grey. By default the light sits behind the camera
raised by ``light_elevation_deg`` (so brows and nose shade the surface below
them) and turns with the camera; with ``light_azimuth_deg`` set it is fixed
in the HEAD frame instead (azimuth from straight ahead towards the subject's
left, elevation ``light_elevation_deg``), so every view of a surface shows the
same shading and views differ only by projection.
The same :class:`RenderSettings` are used for original and de-identified
surfaces, so differences between their renders come from the surfaces only.

Backends:

* ``"pyrender"`` — OpenGL through OSMesa. One renderer per process, owned by
  a dedicated daemon thread; each call waits for it with a deadline
  (``timeout_s``) so a GL hang raises :class:`RenderTimeout` instead of
  stalling. After a fork (e.g. an RQ work horse) the child starts its own
  thread and context; the parent's are never touched in the child.
* ``"raycast"`` — no OpenGL: embree ray casting through trimesh
  (``trimesh.ray.ray_pyembree``), same camera, Lambert shading with the same
  key light. Depth masks agree with pyrender's (see tests).
* ``"auto"`` — pyrender if an OSMesa context can be made, else raycast.

Images are 8-bit greyscale ``(H, W)`` arrays; depth is the distance along the
camera axis in canonical units, 0 where no surface was hit.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

__all__ = [
    "BACKENDS",
    "RenderError",
    "RenderResult",
    "RenderSettings",
    "RenderTimeout",
    "SubjectRenders",
    "camera_pose",
    "canonical_crop",
    "canonical_face_box",
    "light_direction",
    "opengl_available",
    "project_points",
    "raycast_view",
    "render_subject",
    "render_view",
    "render_view_set",
    "render_views",
    "save_png",
]

BACKENDS = ("auto", "pyrender", "raycast")


class RenderError(ValueError):
    """A render could not be produced (bad mesh or settings, no backend)."""


class RenderTimeout(RenderError, TimeoutError):
    """The OpenGL renderer did not answer before the deadline."""


@dataclass(frozen=True)
class RenderSettings:
    """Fixed camera, intrinsics, light and material (canonical units ≈ mm).

    ``target`` is the look-at point in canonical coordinates; ``face_box`` is
    the canonical-space box ``(x_half_width, y_front, y_back, z_bottom,
    z_top)`` where a face is expected (used for the fallback face box);
    ``mesh_box`` bounds the part of the head that is meshed (everything the
    views can show for |yaw| ≤ 60°).
    """

    width_px: int = 256
    height_px: int = 256
    yfov_deg: float = 18.0
    camera_distance: float = 600.0
    target: tuple[float, float, float] = (0.0, -80.0, -30.0)
    elevation_deg: float = 0.0
    light_intensity: float = 3.5
    light_elevation_deg: float = 35.0
    #: None: the light follows the camera; a number: light fixed in the head frame at this
    #: azimuth (degrees from straight ahead towards the subject's left)
    light_azimuth_deg: float | None = None
    ambient: float = 0.12
    grey: float = 0.75
    background: int = 0
    z_near: float = 100.0
    z_far: float = 2000.0
    face_box: tuple[float, float, float, float, float] = (55.0, -110.0, -60.0, -95.0, 25.0)
    #: canonical box ``(x0, x1, y0, y1, z0, z1)`` of the surface that is meshed and rendered
    mesh_box: tuple[float, float, float, float, float, float] = (
        -95.0, 95.0, -150.0, 35.0, -135.0, 75.0)

    def __post_init__(self) -> None:
        if self.width_px < 16 or self.height_px < 16:
            raise RenderError("renders must be at least 16×16 pixels")
        if not 1.0 < self.yfov_deg < 120.0:
            raise RenderError(f"yfov_deg must be in (1, 120), got {self.yfov_deg}")
        if not 0 < self.z_near < self.camera_distance < self.z_far:
            raise RenderError("need 0 < z_near < camera_distance < z_far")
        if not 0 <= self.background <= 255:
            raise RenderError("background must be an 8-bit grey level")


@dataclass(frozen=True)
class RenderResult:
    """One view: ``image`` uint8 (H, W) grey, ``depth`` float32 (H, W) (0 = background)."""

    image: np.ndarray
    depth: np.ndarray
    yaw_deg: float
    backend: str
    #: the settings the view was rendered with (camera elevation, light, intrinsics)
    settings: RenderSettings | None = None

    @property
    def mask(self) -> np.ndarray:
        """Boolean (H, W): pixels that show the surface."""
        return self.depth > 0


def camera_pose(yaw_deg: float, settings: RenderSettings) -> np.ndarray:
    """4×4 camera-to-canonical pose (OpenGL convention: camera looks down its −z, +y up)."""
    yaw, el = np.deg2rad(yaw_deg), np.deg2rad(settings.elevation_deg)
    target = np.asarray(settings.target, dtype=float)
    offset = np.array([np.sin(yaw) * np.cos(el), -np.cos(yaw) * np.cos(el), np.sin(el)])
    pos = target + settings.camera_distance * offset
    z_cam = offset
    x_cam = np.cross([0.0, 0.0, 1.0], z_cam)
    x_cam /= np.linalg.norm(x_cam)
    y_cam = np.cross(z_cam, x_cam)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x_cam, y_cam, z_cam, pos
    return pose


def light_direction(yaw_deg: float, settings: RenderSettings) -> np.ndarray:
    """Unit vector (canonical frame) pointing from the head TOWARDS the directional light.

    With ``settings.light_azimuth_deg`` None the light sits behind the camera,
    raised by ``light_elevation_deg`` about the camera's horizontal axis, so
    brows, nose and lips cast shading below. Otherwise it is fixed in the
    head frame (independent of ``yaw_deg`` and the camera elevation).
    """
    e = np.deg2rad(settings.light_elevation_deg)
    if settings.light_azimuth_deg is not None:
        a = np.deg2rad(settings.light_azimuth_deg)
        return np.array([np.sin(a) * np.cos(e), -np.cos(a) * np.cos(e), np.sin(e)])
    pose = camera_pose(yaw_deg, settings)
    return np.cos(e) * pose[:3, 2] + np.sin(e) * pose[:3, 1]


def _light_pose(yaw_deg: float, settings: RenderSettings) -> np.ndarray:
    pose = camera_pose(yaw_deg, settings)
    z = light_direction(yaw_deg, settings)
    x = pose[:3, 0] - (pose[:3, 0] @ z) * z  # orthonormal frame around the light direction
    n = np.linalg.norm(x)
    if n < 1e-9:  # light along the camera's x axis: any perpendicular will do
        x, n = np.cross([0.0, 0.0, 1.0], z), np.linalg.norm(np.cross([0.0, 0.0, 1.0], z))
    x = x / n
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = x, np.cross(z, x), z, pose[:3, 3]
    return out


def project_points(points: np.ndarray, yaw_deg: float, settings: RenderSettings) -> np.ndarray:
    """Pixel coordinates ``(N, 2)`` = (column, row), origin top-left, of canonical points."""
    pose = camera_pose(yaw_deg, settings)
    cam = (np.asarray(points, float) - pose[:3, 3]) @ pose[:3, :3]
    f = 0.5 * settings.height_px / np.tan(np.deg2rad(settings.yfov_deg) / 2)
    u = settings.width_px / 2 + f * cam[:, 0] / -cam[:, 2]
    v = settings.height_px / 2 - f * cam[:, 1] / -cam[:, 2]
    return np.column_stack([u, v])


def canonical_face_box(yaw_deg: float, settings: RenderSettings) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` pixel box where the canonical face projects in a view."""
    hx, y0, y1, z0, z1 = settings.face_box
    corners = np.array([[x, y, z] for x in (-hx, hx) for y in (y0, y1) for z in (z0, z1)])
    uv = project_points(corners, yaw_deg, settings)
    left, top = np.floor(uv.min(axis=0)).astype(int)
    right, bottom = np.ceil(uv.max(axis=0)).astype(int)
    left, top = max(0, int(left)), max(0, int(top))
    right, bottom = min(settings.width_px - 1, int(right)), min(settings.height_px - 1, int(bottom))
    return left, top, right, bottom


def _check_mesh(mesh: trimesh.Trimesh) -> None:
    if mesh is None or len(mesh.faces) == 0:
        raise RenderError("cannot render an empty mesh")
    if not np.all(np.isfinite(mesh.vertices)):
        raise RenderError("mesh has NaN or infinite vertex coordinates")


# --------------------------------------------------------------------------- pyrender


class _GLWorker:
    """A daemon thread that owns this process's OSMesa renderer(s)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.broken = False
        self.renderers: dict[tuple[int, int], Any] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="deidstudy-gl", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, args, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self, *args))
            except BaseException as exc:  # noqa: BLE001 — handed to the caller
                fut.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._queue.put((fn, args, fut))
        return fut

    def renderer(self, width: int, height: int) -> Any:
        key = (width, height)
        if key not in self.renderers:
            import pyrender

            self.renderers[key] = pyrender.OffscreenRenderer(width, height)
        return self.renderers[key]


_WORKER: _GLWorker | None = None
_WORKER_LOCK = threading.Lock()
_GL_STATUS: dict[int, str | None] = {}  # pid → None if OK, else the failure reason


def _worker() -> _GLWorker:
    global _WORKER, _WORKER_LOCK
    if _WORKER is not None and _WORKER.pid != os.getpid():
        # forked child: never touch the parent's thread/context; fresh lock too
        _WORKER, _WORKER_LOCK = None, threading.Lock()
    with _WORKER_LOCK:
        if _WORKER is None or _WORKER.broken:
            _WORKER = _GLWorker()
        return _WORKER


def _run_in_gl_thread(fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
    """Run ``fn(worker, *args)`` in the GL thread; :class:`RenderTimeout` after ``timeout_s``."""
    w = _worker()
    fut = w.submit(fn, *args)
    try:
        return fut.result(timeout=timeout_s)
    except FutureTimeout:
        w.broken = True  # abandon the hung thread; the next call starts a new one
        raise RenderTimeout(f"OpenGL render did not finish within {timeout_s:g} s") from None


def opengl_available(timeout_s: float = 30.0) -> bool:
    """True when an OSMesa OpenGL context can be created in this process (cached per process)."""
    pid = os.getpid()
    if pid not in _GL_STATUS:
        try:
            _run_in_gl_thread(lambda w: w.renderer(16, 16), timeout_s=timeout_s)
            _GL_STATUS[pid] = None
        except RenderTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 — any GL/import failure means "not available"
            _GL_STATUS[pid] = f"{type(exc).__name__}: {exc}"
    return _GL_STATUS[pid] is None


def _pyrender_views(worker: _GLWorker, mesh: trimesh.Trimesh,
                    views: Sequence[tuple[float, RenderSettings]]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render ``(yaw, settings)`` views of one mesh in one scene (mesh uploaded once).

    The scene (material, ambient, camera intrinsics, light intensity, image
    size) comes from the first view's settings; each view sets its own camera
    pose (yaw, elevation) and light direction.
    """
    import pyrender

    settings = views[0][1]
    g = settings.grey
    material = pyrender.MetallicRoughnessMaterial(
        baseColorFactor=(g, g, g, 1.0), metallicFactor=0.0, roughnessFactor=0.9,
        doubleSided=False,
    )
    bg = settings.background / 255.0
    amb = settings.ambient
    scene = pyrender.Scene(bg_color=(bg, bg, bg, 1.0), ambient_light=(amb, amb, amb))
    scene.add(pyrender.Mesh.from_trimesh(mesh, material=material, smooth=True))
    camera = pyrender.PerspectiveCamera(
        yfov=np.deg2rad(settings.yfov_deg), aspectRatio=settings.width_px / settings.height_px,
        znear=settings.z_near, zfar=settings.z_far,
    )
    cam_node = scene.add(camera, pose=np.eye(4))
    light_node = scene.add(pyrender.DirectionalLight(color=np.ones(3),
                                                     intensity=settings.light_intensity),
                           pose=np.eye(4))
    r = worker.renderer(settings.width_px, settings.height_px)
    out = []
    try:
        for yaw, st in views:
            scene.set_pose(cam_node, camera_pose(yaw, st))
            scene.set_pose(light_node, _light_pose(yaw, st))
            color, depth = r.render(scene)
            out.append((np.asarray(color)[..., :3].mean(axis=2).round().astype(np.uint8),
                        np.asarray(depth, dtype=np.float32).copy()))
    finally:
        # release GPU-side buffers of this scene's mesh in the cached renderer
        for node in list(scene.mesh_nodes):
            scene.remove_node(node)
        r.render(scene, flags=pyrender.RenderFlags.DEPTH_ONLY)
    return out


# --------------------------------------------------------------------------- ray casting


def _ray_intersector(mesh: trimesh.Trimesh) -> Any:
    try:
        from trimesh.ray.ray_pyembree import RayMeshIntersector

        return RayMeshIntersector(mesh)
    except Exception:  # noqa: BLE001 — embreex missing: slow pure-numpy fallback
        from trimesh.ray.ray_triangle import RayMeshIntersector

        return RayMeshIntersector(mesh)


def raycast_view(mesh: trimesh.Trimesh, yaw_deg: float = 0.0,
                 settings: RenderSettings | None = None,
                 intersector: Any = None) -> RenderResult:
    """Render one view by ray casting (no OpenGL); same camera as :func:`render_view`.

    Shading: ``(grey · (ambient + 0.96 · light_intensity/π · max(0, n·l)))^(1/2.2)``
    (pyrender's diffuse term and display gamma, without its small specular
    lobe) with smooth (barycentric vertex-normal) normals ``n`` and ``l`` from
    :func:`light_direction`, clipped to [0, 1] and scaled to 8 bits.
    """
    settings = settings or RenderSettings()
    _check_mesh(mesh)
    h, w = settings.height_px, settings.width_px
    pose = camera_pose(yaw_deg, settings)
    t = np.tan(np.deg2rad(settings.yfov_deg) / 2)
    u = (2 * (np.arange(w) + 0.5) / w - 1) * t * (w / h)
    v = (1 - 2 * (np.arange(h) + 0.5) / h) * t
    uu, vv = np.meshgrid(u, v)
    dirs_cam = np.stack([uu, vv, -np.ones_like(uu)], axis=-1).reshape(-1, 3)
    dirs = dirs_cam @ pose[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(pose[:3, 3], dirs.shape)
    inter = intersector if intersector is not None else _ray_intersector(mesh)
    locs, ray_idx, tri_idx = inter.intersects_location(origins, dirs, multiple_hits=False)
    depth = np.zeros(h * w, dtype=np.float32)
    image = np.full(h * w, settings.background, dtype=np.float32)
    if len(ray_idx):
        z = (locs - pose[:3, 3]) @ -pose[:3, 2]
        keep = (z >= settings.z_near) & (z <= settings.z_far)
        locs, ray_idx, tri_idx, z = locs[keep], ray_idx[keep], tri_idx[keep], z[keep]
        depth[ray_idx] = z
        tris = mesh.triangles[tri_idx]
        bary = trimesh.triangles.points_to_barycentric(tris, locs)
        vn = mesh.vertex_normals[mesh.faces[tri_idx]]
        n = np.einsum("ij,ijk->ik", bary, vn)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        lam = np.clip(n @ light_direction(yaw_deg, settings), 0.0, 1.0)
        # pyrender's metallic-roughness shader without the specular lobe: diffuse colour
        # grey·(1 − 0.04), Lambert/π, plus ambient, then its 1/2.2 display gamma
        linear = settings.grey * (settings.ambient
                                  + 0.96 * settings.light_intensity / np.pi * lam)
        image[ray_idx] = np.clip(linear, 0.0, 1.0) ** (1.0 / 2.2) * 255.0
    return RenderResult(image=image.reshape(h, w).round().astype(np.uint8),
                        depth=depth.reshape(h, w), yaw_deg=float(yaw_deg), backend="raycast",
                        settings=settings)


# --------------------------------------------------------------------------- public API


def render_views(
    mesh: trimesh.Trimesh,
    yaw_degs: Sequence[float] = (0.0, 30.0, -30.0),
    settings: RenderSettings | None = None,
    *,
    backend: str = "auto",
    timeout_s: float = 120.0,
) -> list[RenderResult]:
    """Render a canonical-frame mesh from each yaw angle (degrees) with fixed settings.

    ``backend`` is ``"auto"``, ``"pyrender"`` or ``"raycast"`` (see module
    docstring). Raises :class:`RenderTimeout` when OpenGL does not answer
    within ``timeout_s`` seconds, :class:`RenderError` on bad input or when
    ``backend="pyrender"`` and OpenGL is unavailable.
    """
    settings = settings or RenderSettings()
    return render_view_set(mesh, [(y, settings) for y in yaw_degs], backend=backend,
                           timeout_s=timeout_s)


_SCENE_FIELDS = ("width_px", "height_px", "yfov_deg", "z_near", "z_far", "grey", "ambient",
                 "background", "light_intensity", "camera_distance", "target")


def render_view_set(
    mesh: trimesh.Trimesh,
    views: Sequence[tuple[float, RenderSettings]],
    *,
    backend: str = "auto",
    timeout_s: float = 120.0,
) -> list[RenderResult]:
    """Render ``(yaw_deg, settings)`` views of one mesh (e.g. several elevations and lights).

    The views may differ in ``elevation_deg``, ``light_azimuth_deg`` and
    ``light_elevation_deg`` only (one scene, one upload of the mesh); each
    :class:`RenderResult` keeps its settings. See :func:`render_views`.
    """
    if backend not in BACKENDS:
        raise RenderError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _check_mesh(mesh)
    views = [(float(y), st) for y, st in views]
    if not views:
        raise RenderError("no view angle given")
    if any(abs(y) >= 90 for y, _st in views):
        raise RenderError("yaw angles must lie in (-90, 90) degrees")
    first = views[0][1]
    if any(getattr(st, f) != getattr(first, f) for _y, st in views for f in _SCENE_FIELDS):
        raise RenderError("views of one set may differ only by elevation and light direction")
    use_gl = backend == "pyrender" or (backend == "auto" and opengl_available(timeout_s))
    if use_gl:
        if backend == "pyrender" and not opengl_available(timeout_s):
            raise RenderError("OpenGL (OSMesa) is not available: "
                              f"{_GL_STATUS.get(os.getpid())}; use backend='raycast'")
        pairs = _run_in_gl_thread(_pyrender_views, mesh, views, timeout_s=timeout_s)
        return [RenderResult(image=img, depth=dep, yaw_deg=y, backend="pyrender", settings=st)
                for (img, dep), (y, st) in zip(pairs, views)]
    inter = _ray_intersector(mesh)
    return [raycast_view(mesh, y, st, intersector=inter) for y, st in views]


def render_view(mesh: trimesh.Trimesh, yaw_deg: float = 0.0,
                settings: RenderSettings | None = None, *, backend: str = "auto",
                timeout_s: float = 120.0) -> RenderResult:
    """Render one view; see :func:`render_views`."""
    return render_views(mesh, [yaw_deg], settings, backend=backend, timeout_s=timeout_s)[0]


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an 8-bit grey (H, W) or RGB (H, W, 3) image as PNG; returns the path."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise RenderError("save_png needs a uint8 (H, W) or (H, W, 3) array")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


# --------------------------------------------------------------------------- whole subject


@dataclass
class SubjectRenders:
    """Standardised renders of one subject's original (and de-identified) skin surface.

    ``alignment`` was computed from the ORIGINAL's bone and applied to both
    surfaces when the two volumes share their geometry (``shared_alignment``);
    otherwise the de-identified volume got its own bone alignment.
    ``timings_s`` splits the wall time by stage.
    """

    alignment: Any
    original: list[RenderResult]
    deidentified: list[RenderResult] | None
    shared_alignment: bool
    faces: dict[str, int]
    timings_s: dict[str, float]


def canonical_crop(volume: Any, alignment: Any,
                   box: tuple[float, float, float, float, float, float],
                   margin_voxels: int = 2) -> tuple[slice, slice, slice]:
    """Array-order ``(k, j, i)`` crop of ``volume`` that contains a canonical-frame box.

    The 8 corners of ``box`` = ``(x0, x1, y0, y1, z0, z1)`` (canonical units)
    are mapped back to LPS and to voxel indices; the crop is their bounding
    box plus ``margin_voxels``, clipped to the volume.
    """
    x0, x1, y0, y1, z0, z1 = box
    corners = np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    lps = corners @ alignment.rotation / alignment.scale + alignment.centre_lps_mm
    ijk = (np.column_stack([lps, np.ones(8)]) @ np.linalg.inv(volume.affine()).T)[:, :3]
    kji = ijk[:, ::-1]
    out = []
    for axis in range(3):
        lo = int(np.floor(kji[:, axis].min())) - margin_voxels
        hi = int(np.ceil(kji[:, axis].max())) + margin_voxels + 1
        lo, hi = max(0, lo), min(volume.shape[axis], hi)
        if hi - lo < 2:
            raise RenderError("the head's face region lies outside the volume")
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def render_subject(
    original: Any,
    deidentified: Any | None = None,
    *,
    yaw_degs: Sequence[float] = (0.0, 30.0, -30.0),
    settings: RenderSettings | None = None,
    backend: str = "auto",
    skin_level_hu: float = -300.0,
    resolution_mm: float = 1.5,
    target_faces: int = 60_000,
    template: Any = None,
    timeout_s: float = 120.0,
    smoothing_iterations: int = 20,
) -> SubjectRenders:
    """Bone alignment → skin surfaces (face region) → canonical frame → standard views.

    ``original`` / ``deidentified`` are :class:`pipeline.volume.Volume` (HU,
    LPS). The alignment (:func:`pipeline.align.alignment_from_volume`) and
    the crop (:func:`canonical_crop` of ``settings.mesh_box``) come from the
    original's bone and are reused for the de-identified volume when both
    share their geometry, so differences between their renders come from the
    soft tissue only. Surfaces are meshed at about ``resolution_mm``,
    decimated to ``target_faces`` and Taubin-smoothed
    (:func:`pipeline.surface.smooth_mesh`, ``smoothing_iterations``) so the
    slice terraces of thick-slice scans do not show.
    """
    import time

    # loaded on first use: pulls in trimesh
    from .align import alignment_from_volume
    from .surface import skin_surface, smooth_mesh, strides_for_resolution

    settings = settings or RenderSettings()
    # series whose slice spacing changes are meshed on a regular resampling
    original = original.as_uniform()
    deidentified = None if deidentified is None else deidentified.as_uniform()
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    alignment = alignment_from_volume(original, template)
    t["alignment"] = time.perf_counter() - t0

    def mesh_of(volume: Any, crop: Any, al: Any) -> trimesh.Trimesh:
        m = skin_surface(volume, level_hu=skin_level_hu, crop_ijk=crop,
                         stride=strides_for_resolution(volume, resolution_mm),
                         target_faces=target_faces)
        return smooth_mesh(al.apply_mesh(m), smoothing_iterations)

    t0 = time.perf_counter()
    crop = canonical_crop(original, alignment, settings.mesh_box)
    mesh_o = mesh_of(original, crop, alignment)
    t["surface_original"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    views_o = render_views(mesh_o, yaw_degs, settings, backend=backend, timeout_s=timeout_s)
    t["render_original"] = time.perf_counter() - t0
    faces = {"original": len(mesh_o.faces)}
    views_d = None
    shared = True
    if deidentified is not None:
        t0 = time.perf_counter()
        shared = original.same_grid(deidentified)
        al_d = alignment if shared else alignment_from_volume(deidentified, template)
        crop_d = crop if shared else canonical_crop(deidentified, al_d, settings.mesh_box)
        mesh_d = mesh_of(deidentified, crop_d, al_d)
        faces["deidentified"] = len(mesh_d.faces)
        t["surface_deidentified"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        views_d = render_views(mesh_d, yaw_degs, settings, backend=backend, timeout_s=timeout_s)
        t["render_deidentified"] = time.perf_counter() - t0
    return SubjectRenders(alignment=alignment, original=views_o, deidentified=views_d,
                          shared_alignment=shared, faces=faces, timings_s=t)
