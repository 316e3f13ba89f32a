"""Data of the researcher's slice and surface viewers: reformats, removed region, meshes.

Pure numpy (no Django). :mod:`surveys.processing.viewer` caches what is built here and serves it.

**Slices.** Three views of a series, each a stack of 2D images in display orientation
(radiological convention):

* ``axial`` — the native slices when the series was acquired axially (the usual case;
  with a gantry tilt they are the tilted planes the scanner made, as a radiologist
  reads them): rows anterior → posterior, columns patient right → left, full
  resolution, flipped as needed for other row/column directions;
* ``coronal`` — planes of constant LPS *y* (anterior → posterior), rows superior →
  inferior, columns patient right → left;
* ``sagittal`` — planes of constant LPS *x* (patient right → left), rows superior →
  inferior, columns anterior → posterior (face on the left).

Reformats sample the native slices by nearest neighbour at the finest in-plane pixel
spacing, in square pixels: each point takes the voxel of the native slice whose slab
(Voronoi cell along the slice normal) contains it, so thick slices show as the bands
they are, slice spacing that changes inside the series and tilted (sheared) stacks are
exact, and no value is invented. Points outside the scanned volume get
:data:`OUTSIDE` (drawn as background). A series acquired coronally or sagittally is
reformatted in all three views.

**Removed region.** The voxels whose value differs between the original and the
de-identified series (the de-identification changes no other voxel).

**Meshes.** Skin (−300 HU) and bone (+300 HU) surfaces of both series
(:func:`pipeline.surface.skin_surface` / :func:`~pipeline.surface.bone_surface` on a
regular resampling), decimated, in RAS millimetres (NIfTI world, what the browser's
viewer expects), with a per-vertex flag: 1 where the vertex lies next to removed
voxels (within one voxel: the removed tissue on the original's skin, the cut on the
de-identified one).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .volume import Volume

__all__ = [
    "MESH_MAGIC",
    "OUTSIDE",
    "SLICE_MAGIC",
    "VIEWS",
    "MeshData",
    "SliceGeometry",
    "ViewGeometry",
    "decode_mesh",
    "decode_slice",
    "encode_mesh",
    "encode_slice",
    "removed_counts",
    "surface_meshes",
    "view_geometries",
]

VIEWS = ("axial", "coronal", "sagittal")
#: Value of reformat pixels outside the scanned volume (never a CT value).
OUTSIDE = np.int16(-32768)
SLICE_MAGIC = b"DSV1"
MESH_MAGIC = b"DSM1"


@dataclass(frozen=True)
class SliceGeometry:
    """The native slices of a series in LPS mm (cf. :class:`pipeline.volume.Volume`).

    ``origins[k]`` is the centre of voxel ``(k, 0, 0)``; ``row`` / ``col`` are unit
    vectors of increasing column ``i`` / row ``j``; ``pixel_mm`` = ``(dj, di)``;
    ``normal`` the unit plane normal pointing the way slices are stored,
    ``offsets_mm`` the slice positions along it (increasing), ``cells_mm`` the
    thickness each slice stands for.
    """

    origins: np.ndarray
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    pixel_mm: tuple[float, float]
    offsets_mm: np.ndarray
    cells_mm: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, volume: Volume) -> SliceGeometry:
        pos = volume.positions_lps_mm()
        normal = volume.plane_normal()
        if len(pos) > 1 and (pos[-1] - pos[0]) @ normal < 0:
            normal = -normal
        t = (pos - pos[0]) @ normal
        return cls(origins=pos, row=np.asarray(volume.row_cosine, float),
                   col=np.asarray(volume.col_cosine, float), normal=normal,
                   pixel_mm=(float(volume.spacing_mm[1]), float(volume.spacing_mm[2])),
                   offsets_mm=t, cells_mm=volume.slice_cells_mm(), shape=volume.shape)

    def corners(self) -> np.ndarray:
        """LPS of the 8 outermost voxel centres (first and last slice)."""
        nk, nj, ni = self.shape
        dj, di = self.pixel_mm
        out = []
        for k in (0, nk - 1):
            for j in (0, nj - 1):
                for i in (0, ni - 1):
                    out.append(self.origins[k] + i * di * self.row + j * dj * self.col)
        return np.array(out)

    def locate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Voxel ``(k, j, i)`` containing each LPS point (``(..., 3)``) and an inside mask.

        ``k`` is the slice whose slab along the normal holds the point; ``j``, ``i``
        the nearest pixel of that slice's plane.
        """
        t = (points - self.origins[0]) @ self.normal
        mids = (self.offsets_mm[:-1] + self.offsets_mm[1:]) / 2.0
        k = np.searchsorted(mids, t)
        ok = (t >= self.offsets_mm[0] - self.cells_mm[0] / 2) & \
             (t <= self.offsets_mm[-1] + self.cells_mm[-1] / 2)
        k = np.clip(k, 0, len(self.offsets_mm) - 1)
        q = points - self.origins[k]
        dj, di = self.pixel_mm
        j = np.rint(q @ self.col / dj).astype(np.int64)
        i = np.rint(q @ self.row / di).astype(np.int64)
        nj, ni = self.shape[1:]
        ok &= (j >= 0) & (j < nj) & (i >= 0) & (i < ni)
        return k, np.clip(j, 0, nj - 1), np.clip(i, 0, ni - 1), ok


@dataclass(frozen=True)
class ViewGeometry:
    """One view of a series: ``n`` images of ``height × width`` pixels.

    Native views show slice ``k = n`` with rows/columns flipped by ``flip_rows`` /
    ``flip_cols``. Reformats show, at pixel ``(r, c)`` of image ``n``, the LPS point
    ``origin + c·step_u·u + r·step_v·v + n·step_w·w``. ``pixel_mm`` = (width, height)
    of a pixel in mm; ``position_mm(n)`` is the image's position along the view's
    axis (LPS coordinate for reformats, offset along the normal for native slices).
    """

    name: str
    native: bool
    n: int
    height: int
    width: int
    pixel_mm: tuple[float, float]
    flip_rows: bool = False
    flip_cols: bool = False
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    u: np.ndarray = field(default_factory=lambda: np.zeros(3))
    v: np.ndarray = field(default_factory=lambda: np.zeros(3))
    w: np.ndarray = field(default_factory=lambda: np.zeros(3))
    step_w: float = 1.0

    def as_json(self) -> dict[str, Any]:
        """What the browser needs to draw and to map the cursor between views."""
        d: dict[str, Any] = {"name": self.name, "native": self.native, "n": self.n,
                             "width": self.width, "height": self.height,
                             "pixel_mm": [round(self.pixel_mm[0], 5), round(self.pixel_mm[1], 5)]}
        if self.native:
            d.update(flip_rows=self.flip_rows, flip_cols=self.flip_cols)
        else:
            d.update(origin=[round(float(x), 4) for x in self.origin],
                     u=[float(x) for x in self.u], v=[float(x) for x in self.v],
                     w=[float(x) for x in self.w], step_w=round(self.step_w, 5))
        return d

    def points(self, n: int) -> np.ndarray:
        """LPS of every pixel of reformatted image ``n`` (``(height, width, 3)``)."""
        r = np.arange(self.height, dtype=float)[:, None, None]
        c = np.arange(self.width, dtype=float)[None, :, None]
        base = self.origin + n * self.step_w * self.w
        return base + c * self.pixel_mm[0] * self.u + r * self.pixel_mm[1] * self.v

    def sample(self, geom: SliceGeometry, arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
        """Image ``n`` of each of ``arrays`` (shaped like the series, ``[k, j, i]``);
        pixels outside the volume are :data:`OUTSIDE`."""
        if not 0 <= n < self.n:
            raise IndexError(f"{self.name} image {n} out of range 0..{self.n - 1}")
        if self.native:
            out = []
            for a in arrays:
                img = np.asarray(a[n])
                if self.flip_rows:
                    img = img[::-1]
                if self.flip_cols:
                    img = img[:, ::-1]
                out.append(np.ascontiguousarray(img))
            return out
        flat, ok = self.indices(geom, n)
        res = []
        for a in arrays:
            vals = np.asarray(a).reshape(-1)[flat]
            res.append(np.where(ok, vals, OUTSIDE).astype(np.int16))
        return res

    def indices(self, geom: SliceGeometry, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat voxel index (into ``[k, j, i]`` C order) and inside mask of every pixel of
        reformatted image ``n``: :meth:`SliceGeometry.locate` computed separably (the
        LPS point is linear in row and column, so every projection is an outer sum)."""
        base = self.origin + n * self.step_w * self.w
        cu = np.arange(self.width) * self.pixel_mm[0]
        rv = np.arange(self.height) * self.pixel_mm[1]
        o0 = geom.origins[0]
        t = ((base - o0) @ geom.normal + rv[:, None] * (self.v @ geom.normal)
             + cu[None, :] * (self.u @ geom.normal))
        mids = (geom.offsets_mm[:-1] + geom.offsets_mm[1:]) / 2.0
        k = np.searchsorted(mids, t)
        ok = (t >= geom.offsets_mm[0] - geom.cells_mm[0] / 2) & \
             (t <= geom.offsets_mm[-1] + geom.cells_mm[-1] / 2)
        k = np.clip(k, 0, len(geom.offsets_mm) - 1)
        dj, di = geom.pixel_mm
        nk, nj, ni = geom.shape
        oc = geom.origins @ geom.col
        orow = geom.origins @ geom.row
        j = np.rint((base @ geom.col + rv[:, None] * (self.v @ geom.col)
                     + cu[None, :] * (self.u @ geom.col) - oc[k]) / dj).astype(np.int64)
        i = np.rint((base @ geom.row + rv[:, None] * (self.v @ geom.row)
                     + cu[None, :] * (self.u @ geom.row) - orow[k]) / di).astype(np.int64)
        ok &= (j >= 0) & (j < nj) & (i >= 0) & (i < ni)
        np.clip(j, 0, nj - 1, out=j)
        np.clip(i, 0, ni - 1, out=i)
        return (k * nj + j) * ni + i, ok


def _axis_of(vec: np.ndarray) -> int:
    return int(np.argmax(np.abs(vec)))


def view_geometries(geom: SliceGeometry) -> dict[str, ViewGeometry]:
    """The axial, coronal and sagittal :class:`ViewGeometry` of a series."""
    nk, nj, ni = geom.shape
    dj, di = geom.pixel_mm
    step = min(dj, di)
    lo, hi = geom.corners().min(axis=0), geom.corners().max(axis=0)
    views: dict[str, ViewGeometry] = {}
    # axes: view name → (LPS axis of the planes' normal, u, v)
    x, y, z = np.eye(3)
    defs = {
        "axial": (2, x, y),        # columns towards patient left, rows towards posterior
        "coronal": (1, x, -z),     # columns towards patient left, rows towards inferior
        "sagittal": (0, y, -z),    # columns towards posterior, rows towards inferior
    }
    native_axis = _axis_of(geom.normal)
    for name, (axis, u, v) in defs.items():
        if (axis == native_axis and _axis_of(geom.row) == _axis_of(u)
                and _axis_of(geom.col) == _axis_of(v)):
            # the native slices, flipped into display orientation
            views[name] = ViewGeometry(name, True, nk, nj, ni, (di, dj),
                                       flip_rows=float(geom.col @ v) < 0,
                                       flip_cols=float(geom.row @ u) < 0)
            continue
        au, av = _axis_of(u), _axis_of(v)
        origin = np.zeros(3)
        origin[au] = lo[au] if u[au] > 0 else hi[au]
        origin[av] = lo[av] if v[av] > 0 else hi[av]
        origin[axis] = lo[axis]  # images run towards +axis (anterior→posterior, right→left)
        width = int(np.floor((hi[au] - lo[au]) / step + 1e-6)) + 1
        height = int(np.floor((hi[av] - lo[av]) / step + 1e-6)) + 1
        n = int(np.floor((hi[axis] - lo[axis]) / step + 1e-6)) + 1
        views[name] = ViewGeometry(name, False, n, height, width, (step, step), origin=origin,
                                   u=u.copy(), v=v.copy(), w=np.eye(3)[axis], step_w=step)
    return views


def removed_counts(geom: SliceGeometry, views: dict[str, ViewGeometry],
                   removed: np.ndarray) -> dict[str, list[int]]:
    """Removed voxels per image of every view (a voxel counts in the image nearest to its
    centre; native views count exactly)."""
    kk, jj, ii = np.nonzero(removed)
    out: dict[str, list[int]] = {}
    if kk.size:
        dj, di = geom.pixel_mm
        pts = (geom.origins[kk] + (ii[:, None] * di) * geom.row[None, :]
               + (jj[:, None] * dj) * geom.col[None, :])
    for name, vg in views.items():
        counts = np.zeros(vg.n, np.int64)
        if kk.size:
            if vg.native:
                counts = np.bincount(kk, minlength=vg.n)[: vg.n]
            else:
                n = np.rint(((pts - vg.origin) @ vg.w) / vg.step_w).astype(np.int64)
                n = n[(n >= 0) & (n < vg.n)]
                counts = np.bincount(n, minlength=vg.n)[: vg.n]
        out[name] = [int(c) for c in counts]
    return out


# ------------------------------------------------------------------ slice payloads


def encode_slice(original: np.ndarray, deidentified: np.ndarray, pixel_mm: tuple[float, float]
                 ) -> bytes:
    """One image pair as bytes: ``DSV1``, uint32 width, height, removed pixel count,
    float32 pixel width and height (mm), then int16 original and int16 (de-identified −
    original) row by row, little-endian. The difference is 0 outside the removed region,
    so the pair compresses to little more than one image."""
    a = np.asarray(original)
    b = np.asarray(deidentified)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError("original and de-identified images must be 2D of the same shape")
    a16 = np.clip(a, -32768, 32767).astype("<i2")
    diff = (np.clip(b, -32768, 32767).astype(np.int32) - a16.astype(np.int32))
    diff16 = np.clip(diff, -32768, 32767).astype("<i2")
    h, w = a16.shape
    header = SLICE_MAGIC + struct.pack("<III2f", w, h, int(np.count_nonzero(diff16)),
                                       float(pixel_mm[0]), float(pixel_mm[1]))
    return header + a16.tobytes() + diff16.tobytes()


def decode_slice(data: bytes) -> tuple[np.ndarray, np.ndarray, int, tuple[float, float]]:
    """Inverse of :func:`encode_slice`: (original, de-identified, removed pixels, pixel mm)."""
    if data[:4] != SLICE_MAGIC:
        raise ValueError("not a slice payload")
    w, h, n_removed, pw, ph = struct.unpack("<III2f", data[4:24])
    body = np.frombuffer(data, "<i2", count=2 * w * h, offset=24)
    orig = body[: w * h].reshape(h, w).astype(np.int16)
    deid = (orig.astype(np.int32) + body[w * h:].reshape(h, w)).astype(np.int16)
    return orig, deid, n_removed, (pw, ph)


# ------------------------------------------------------------------ meshes


@dataclass
class MeshData:
    """A triangle mesh for the browser: RAS mm vertices, faces, per-vertex flag."""

    vertices_ras: np.ndarray  # (n, 3) float32
    faces: np.ndarray  # (m, 3) uint32
    flags: np.ndarray  # (n,) uint8

    @property
    def n_faces(self) -> int:
        return int(len(self.faces))


def encode_mesh(mesh: MeshData, compresslevel: int = 6) -> bytes:
    """Gzip of ``DSM1``, uint32 vertices, faces, flags-present; float32 RAS vertices,
    uint32 faces, uint8 flags (padded to 4 bytes), little-endian."""
    v = np.ascontiguousarray(mesh.vertices_ras, "<f4")
    f = np.ascontiguousarray(mesh.faces, "<u4")
    fl = np.ascontiguousarray(mesh.flags, np.uint8)
    pad = (-len(fl)) % 4
    raw = (MESH_MAGIC + struct.pack("<III", len(v), len(f), 1) + v.tobytes() + f.tobytes()
           + fl.tobytes() + b"\0" * pad)
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0)


def decode_mesh(data: bytes) -> MeshData:
    """Inverse of :func:`encode_mesh` (gzip or raw)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:4] != MESH_MAGIC:
        raise ValueError("not a mesh payload")
    nv, nf, _ = struct.unpack("<III", data[4:16])
    off = 16
    v = np.frombuffer(data, "<f4", count=3 * nv, offset=off).reshape(nv, 3)
    off += 12 * nv
    f = np.frombuffer(data, "<u4", count=3 * nf, offset=off).reshape(nf, 3)
    off += 12 * nf
    fl = np.frombuffer(data, np.uint8, count=nv, offset=off)
    return MeshData(v.copy(), f.copy(), fl.copy())


def _drop_small_components(mesh, min_faces: int):
    import trimesh
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces)
    if len(faces) == 0:
        return mesh
    n = len(mesh.vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    g = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    fl = labels[faces[:, 0]]
    sizes = np.bincount(fl)
    keep = faces[sizes[fl] >= min_faces]
    if len(keep) == 0:
        keep = faces
    used, inv = np.unique(keep.ravel(), return_inverse=True)
    return trimesh.Trimesh(vertices=np.asarray(mesh.vertices)[used], faces=inv.reshape(-1, 3),
                           process=False)


def _vertex_flags(vertices_lps: np.ndarray, uniform: Volume,
                  near_removed: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(uniform.affine())
    ijk = np.column_stack([vertices_lps, np.ones(len(vertices_lps))]) @ inv.T
    i, j, k = (np.rint(ijk[:, a]).astype(np.int64) for a in range(3))
    nk, nj, ni = near_removed.shape
    ok = (k >= 0) & (k < nk) & (j >= 0) & (j < nj) & (i >= 0) & (i < ni)
    flags = np.zeros(len(vertices_lps), np.uint8)
    flags[ok] = near_removed[k[ok], j[ok], i[ok]]
    return flags


def surface_meshes(original: Volume, deidentified: Volume, *, resolution_mm: float = 1.5,
                   skin_faces: int = 80_000, bone_faces: int = 120_000,
                   min_bone_component_faces: int = 200) -> dict[str, MeshData]:
    """Skin and bone meshes of both series (keys ``skin-original``, ``skin-deid``,
    ``bone-original``, ``bone-deid``), decimated, RAS mm, flagged near removed voxels.

    Both series are resampled to the same regular grid (:meth:`Volume.as_uniform`) and
    meshed with the same strides, so the two differ only where voxels differ. A series
    without bone or skin (level outside the data range) gets no mesh of that kind.
    """
    from scipy import ndimage as ndi

    # loaded on first use: pulls in trimesh
    from .surface import SurfaceError, bone_surface, skin_surface, strides_for_resolution

    uo = original.as_uniform()
    ud = deidentified.as_uniform()
    if uo.shape != ud.shape:
        raise ValueError("original and de-identified series differ in size")
    removed = uo.hu != ud.hu
    near = ndi.binary_dilation(removed, iterations=1).astype(np.uint8) if removed.any() \
        else np.zeros(removed.shape, np.uint8)
    stride = strides_for_resolution(uo, resolution_mm)
    flip = np.array([-1.0, -1.0, 1.0])  # LPS → RAS
    out: dict[str, MeshData] = {}
    for variant, vol in (("original", uo), ("deid", ud)):
        for kind in ("skin", "bone"):
            try:
                if kind == "skin":
                    m = skin_surface(vol, stride=stride, target_faces=skin_faces)
                else:
                    m = bone_surface(vol, stride=stride, target_faces=bone_faces)
                    m = _drop_small_components(m, min_bone_component_faces)
            except SurfaceError:
                continue
            v = np.asarray(m.vertices, float)
            out[f"{kind}-{variant}"] = MeshData(
                vertices_ras=(v * flip).astype(np.float32),
                faces=np.asarray(m.faces, np.uint32),
                flags=_vertex_flags(v, vol, near))
    return out
