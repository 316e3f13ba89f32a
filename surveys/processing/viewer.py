"""Viewer data of a series, cached on the first request: slices, removed region, meshes.

The subject page's slice viewer and 3D viewer (``static/surveys/viewer.js``,
``viewer3d.js``) read a series through the permission-checked views of
:mod:`surveys.cohorts.viewer_views`; this module builds and caches what they serve
(:mod:`pipeline.viewer` does the geometry):

* **volumes** — the original and de-identified series as int16 arrays
  (``original.npy``, ``deid.npy``, memory-mapped: a slice request reads only the
  pages it needs and the operating system's page cache is shared by every web worker)
  and ``meta.json`` (geometry, the three views, removed voxels per image, where to
  start). Built by the first request for the series (≈ 2–4 s for 512×512×300, most of
  it reading the DICOM files);
* **meshes** — skin and bone surfaces of both series, decimated, gzip-compressed
  (``meshes/*.bin.gz``). Built by the first mesh request (a few seconds).

The de-identification stage's worker builds both right after the stage (see
:func:`prewarm`), so on one machine or a shared ``DATA_DIR`` the first page view is
already served from the cache.

Cache folder: ``DATA_DIR/cache/viewer/c<cohort>/s<subject id>/<series label>-<version>/``
(no pseudonym, no identifier). ``version`` is a hash of the series row and its last
de-identification run, so a re-run gets a new folder and the old one is deleted;
folders of deleted subjects are deleted with them. The cache is local to each machine,
never copied to the shared storage (with one, the workers do not prewarm: their
``DATA_DIR`` is not the web server's), and kept below ``VIEWER_CACHE_MAX_BYTES`` (least
recently used series first). Builds are serialised by ``flock`` on the subject's cache
folder (meshes: on the series folder), so two requests never build the same data twice,
and no lock file is left behind.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from pipeline import viewer as pv
from pipeline.atomic import replace_dir, temp_sibling
from pipeline.volume import Volume

from ..models import RenderImage, Series, StageRun, Subject
from ..storage.mirror import pull_tree
from ..storage.paths import thumbs_dir, thumbs_root, viewer_cache_root
from ..storage.series import load_stored

log = logging.getLogger(__name__)

#: Bump when the cached files change their layout (old folders are then rebuilt).
FORMAT = 1
#: Window presets (label, width, level in HU) offered by the slice viewer.
WINDOWS = [
    {"key": "soft", "label": "Soft tissue", "width": 400, "level": 40},
    {"key": "bone", "label": "Bone", "width": 2000, "level": 500},
    {"key": "brain", "label": "Brain", "width": 80, "level": 40},
    {"key": "skin", "label": "Skin / air", "width": 1000, "level": -400},
]
MESH_NAMES = ("skin-original", "skin-deid", "bone-original", "bone-deid")


class ViewerUnavailable(Exception):
    """The series has no viewer data (yet); the message is shown to researchers."""


def subject_cache_dir(subject: Subject) -> Path:
    return viewer_cache_root() / f"c{subject.cohort_id:05d}" / f"s{subject.pk}"


def deid_run(subject: Subject) -> StageRun | None:
    return next((r for r in subject.stages.all() if r.stage == "deidentify"), None)


def series_version(series: Series, run: StageRun | None) -> str:
    """Opaque version of a series' viewer data: changes when it is de-identified again."""
    finished = run.finished.isoformat() if run is not None and run.finished else ""
    attempts = run.attempts if run is not None else 0
    key = f"{FORMAT}|{series.pk}|{series.original_dir}|{series.deid_dir}|{finished}|{attempts}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def series_ready(series: Series, run: StageRun | None) -> bool:
    """Both the original and the de-identified series exist."""
    return bool(series.deid_dir) and run is not None and run.status == "done"


@contextmanager
def _locked(folder: Path):
    """Exclusive lock on ``folder`` (created if missing) for this block: ``flock`` on the
    folder itself, so no lock file is left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class SeriesData:
    """The cached viewer data of one series (version ``version``) in ``folder``."""

    folder: Path
    version: str
    meta: dict[str, Any]
    geom: pv.SliceGeometry
    views: dict[str, pv.ViewGeometry]

    _arrays: tuple[np.ndarray, np.ndarray] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.load(self.folder / "original.npy", mmap_mode="r"),
                            np.load(self.folder / "deid.npy", mmap_mode="r"))
        return self._arrays

    def slice_pair(self, view: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        vg = self.views[view]
        a, b = vg.sample(self.geom, list(self.arrays()), n)
        return a, b

    def slice_bytes(self, view: str, n: int) -> bytes:
        a, b = self.slice_pair(view, n)
        return pv.encode_slice(a, b, self.views[view].pixel_mm)

    def volumes(self):
        """The two series as :class:`pipeline.volume.Volume` (memory-mapped voxels)."""
        g = self.meta["volume"]
        a, b = self.arrays()
        kw = dict(spacing_mm=tuple(g["spacing_mm"]), origin_lps_mm=np.array(g["origin_lps_mm"]),
                  row_cosine=np.array(g["row_cosine"]), col_cosine=np.array(g["col_cosine"]),
                  normal=np.array(g["normal"]),
                  slice_positions_lps_mm=(None if g["slice_positions_lps_mm"] is None
                                          else np.array(g["slice_positions_lps_mm"])))
        return Volume(hu=np.asarray(a), **kw), Volume(hu=np.asarray(b), **kw)

    # ---------------------------------------------------------------- meshes

    def meshes_info(self) -> dict[str, Any] | None:
        p = self.folder / "meshes" / "meshes.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def ensure_meshes(self) -> dict[str, Any]:
        """Build the meshes once (under the series lock); returns ``meshes.json``."""
        info = self.meshes_info()
        if info is not None:
            return info
        with _locked(self.folder):
            info = self.meshes_info()
            if info is not None:
                return info
            t0 = time.perf_counter()
            orig, deid = self.volumes()
            meshes = pv.surface_meshes(orig, deid)
            dst = self.folder / "meshes"
            tmp = temp_sibling(dst)
            tmp.mkdir()
            try:
                info = {"meshes": {}}
                for name, m in meshes.items():
                    (tmp / f"{name}.bin.gz").write_bytes(pv.encode_mesh(m))
                    info["meshes"][name] = {"faces": m.n_faces,
                                            "vertices": int(len(m.vertices_ras)),
                                            "flagged": int(m.flags.sum())}
                info["seconds"] = round(time.perf_counter() - t0, 2)
                (tmp / "meshes.json").write_text(json.dumps(info))
                replace_dir(tmp, dst)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return info

    def mesh_bytes(self, name: str) -> bytes:
        """The gzip-compressed mesh ``name`` (see :func:`pipeline.viewer.encode_mesh`)."""
        if name not in MESH_NAMES:
            raise KeyError(name)
        info = self.ensure_meshes()
        if name not in info["meshes"]:
            raise KeyError(name)
        return (self.folder / "meshes" / f"{name}.bin.gz").read_bytes()

    def touch(self) -> None:
        """Mark as recently used (at most once a minute) for the size limit."""
        stamp = self.folder / "last-used"
        try:
            if time.time() - stamp.stat().st_mtime < 60:
                return
        except OSError:
            pass
        try:
            stamp.touch()
        except OSError:
            pass


#: Parsed meta of recently used series (per process): folder → SeriesData.
_OPEN: OrderedDict[str, SeriesData] = OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 16


def _geometry_from_meta(meta: dict[str, Any]
                        ) -> tuple[pv.SliceGeometry, dict[str, pv.ViewGeometry]]:
    g = meta["geometry"]
    geom = pv.SliceGeometry(origins=np.array(g["origins"], float), row=np.array(g["row"]),
                            col=np.array(g["col"]), normal=np.array(g["normal"]),
                            pixel_mm=tuple(g["pixel_mm"]), offsets_mm=np.array(g["offsets_mm"]),
                            cells_mm=np.array(g["cells_mm"]), shape=tuple(g["shape"]))
    return geom, pv.view_geometries(geom)


def _open_folder(folder: Path, version: str) -> SeriesData | None:
    key = str(folder)
    with _OPEN_LOCK:
        hit = _OPEN.get(key)
        if hit is not None:
            _OPEN.move_to_end(key)
            return hit
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT:
        return None
    geom, views = _geometry_from_meta(meta)
    data = SeriesData(folder, version, meta, geom, views)
    with _OPEN_LOCK:
        _OPEN[key] = data
        while len(_OPEN) > _OPEN_MAX:
            _OPEN.popitem(last=False)
    return data


def _int16(hu: np.ndarray) -> np.ndarray:
    if hu.dtype == np.int16:
        return hu
    return np.clip(np.rint(hu), -32767, 32767).astype(np.int16)


def _start_images(counts: dict[str, list[int]],
                  views: dict[str, pv.ViewGeometry]) -> dict[str, int]:
    """Where each view opens: the image with the most removed voxels, else the middle."""
    out = {}
    for name, c in counts.items():
        arr = np.asarray(c)
        out[name] = int(arr.argmax()) if arr.size and arr.max() > 0 else views[name].n // 2
    return out


def _build(series: Series, folder: Path, version: str) -> None:
    t0 = time.perf_counter()
    pull_tree(series.original_dir)  # no-op without a shared storage
    pull_tree(series.deid_dir)
    orig = load_stored(series.original_dir).volume
    deid = load_stored(series.deid_dir).volume
    if orig.shape != deid.shape or not np.allclose(orig.positions_lps_mm(),
                                                   deid.positions_lps_mm(), atol=0.01):
        raise ViewerUnavailable("the original and de-identified series do not have the same "
                                "geometry")
    a, b = _int16(orig.hu), _int16(deid.hu)
    t_load = time.perf_counter() - t0
    geom = pv.SliceGeometry.of(orig)
    views = pv.view_geometries(geom)
    removed = a != b
    counts = pv.removed_counts(geom, views, removed)
    removed_ml = float((removed.sum(axis=(1, 2)) * orig.slice_voxel_volumes_ml()).sum())
    meta = {
        "format": FORMAT, "version": version,
        "volume": {"spacing_mm": list(orig.spacing_mm),
                   "origin_lps_mm": orig.origin_lps_mm.tolist(),
                   "row_cosine": orig.row_cosine.tolist(), "col_cosine": orig.col_cosine.tolist(),
                   "normal": np.asarray(orig.normal).tolist(),
                   "slice_positions_lps_mm": (
                       None if orig.slice_positions_lps_mm is None
                       else np.asarray(orig.slice_positions_lps_mm).tolist())},
        "geometry": {"origins": geom.origins.tolist(), "row": geom.row.tolist(),
                     "col": geom.col.tolist(), "normal": geom.normal.tolist(),
                     "pixel_mm": list(geom.pixel_mm), "offsets_mm": geom.offsets_mm.tolist(),
                     "cells_mm": geom.cells_mm.tolist(), "shape": list(geom.shape)},
        "removed": {"voxels": int(removed.sum()), "ml": round(removed_ml, 3), "per_image": counts},
        "start": _start_images(counts, views),
        "regular": bool(orig.is_regular),
        "seconds": {"load": round(t_load, 2)},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    tmp.mkdir()
    try:
        np.save(tmp / "original.npy", a)
        np.save(tmp / "deid.npy", b)
        meta["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_versions(folder: Path, label: str) -> None:
    for old in folder.parent.glob(f"{label}-*"):
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            with _OPEN_LOCK:
                _OPEN.pop(str(old), None)


def _enforce_limit(keep: Path) -> None:
    limit = int(getattr(settings, "VIEWER_CACHE_MAX_BYTES", 0) or 0)
    root = viewer_cache_root()
    if limit <= 0 or not root.is_dir():
        return
    folders = [p for p in root.glob("c*/s*/*") if p.is_dir() and not p.name.startswith(".")]

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    def used(p: Path) -> float:
        try:
            return (p / "last-used").stat().st_mtime
        except OSError:
            return p.stat().st_mtime

    sizes = {p: size(p) for p in folders}
    total = sum(sizes.values())
    for p in sorted(folders, key=used):
        if total <= limit:
            break
        if p == keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        with _OPEN_LOCK:
            _OPEN.pop(str(p), None)
        total -= sizes[p]


def open_series(series: Series, run: StageRun | None, *, build: bool = True) -> SeriesData:
    """The cached viewer data of ``series``, built now if missing (``build``)."""
    if not series_ready(series, run):
        raise ViewerUnavailable("available once de-identification is done")
    version = series_version(series, run)
    folder = subject_cache_dir(series.subject) / f"{series.label}-{version}"
    data = _open_folder(folder, version)
    if data is not None:
        return data
    if not build:
        raise ViewerUnavailable("not built yet")
    with _locked(folder.parent):  # one build at a time per subject
        data = _open_folder(folder, version)
        if data is None:
            _build(series, folder, version)
            _prune_versions(folder, series.label)
            _enforce_limit(folder)
            data = _open_folder(folder, version)
    if data is None:  # pragma: no cover — the folder was just written
        raise ViewerUnavailable("the viewer data could not be stored")
    return data


def prewarm(subject: Subject) -> None:
    """Build the viewer data (volumes and meshes) of every de-identified series of
    ``subject`` (called by the worker after the de-identification stage). Failures are
    logged by class only and leave the lazy build to the first request."""
    subject = (Subject.objects.select_related("cohort").prefetch_related("stages", "series")
               .filter(pk=subject.pk).first())
    if subject is None:
        return
    run = deid_run(subject)
    for s in subject.series.all():
        if not series_ready(s, run):
            continue
        try:
            open_series(s, run).ensure_meshes()
        except Exception as exc:  # noqa: BLE001 — best effort; the page builds it lazily
            log.warning("viewer cache of subject row %s series %s not built (%s)", subject.pk,
                        s.label, type(exc).__name__)


def delete_subject_cache(subject: Subject) -> None:
    """Delete the cached viewer data of ``subject`` (its subject was deleted)."""
    d = subject_cache_dir(subject)
    if d.is_dir():
        shutil.rmtree(d, ignore_errors=True)
    with _OPEN_LOCK:
        for key in [k for k in _OPEN if k.startswith(str(d) + os.sep)]:
            _OPEN.pop(key, None)


def thumb_dir(cohort_id: int) -> Path:
    """Folder of the QA grid's cached thumbnails of a cohort (``<image id>-<hash>.png``)."""
    return thumbs_dir(cohort_id)


def _subject_deleted(sender, instance: Subject, **kwargs) -> None:
    delete_subject_cache(instance)


def _image_deleted(sender, instance, **kwargs) -> None:
    cohort_id = Subject.objects.filter(pk=instance.subject_id).values_list(
        "cohort_id", flat=True).first()
    folders = [thumb_dir(cohort_id)] if cohort_id is not None else \
        list(thumbs_root().glob("c*"))
    for folder in folders:
        for f in folder.glob(f"{instance.pk}-*.png"):
            f.unlink(missing_ok=True)

def connect_signals() -> None:
    """Delete cached copies of identifiable images with what they show: a subject's viewer
    data with the subject, a QA thumbnail with its image."""
    from django.db.models.signals import post_delete


    post_delete.connect(_subject_deleted, sender=Subject, dispatch_uid="viewer-cache-delete")
    post_delete.connect(_image_deleted, sender=RenderImage, dispatch_uid="thumb-cache-delete")


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)
