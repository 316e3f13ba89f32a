"""The facial-skeleton envelope: where face removal may act, and where it never may.

Face removal must take the soft tissue that makes a face recognisable (nose,
lips, cheeks, chin, eyelids, forehead skin, auricles) and nothing that the
facial skeleton encloses (globes and orbital fat behind the orbital rims, the
nasal cavity behind the piriform aperture, paranasal sinuses, oral cavity,
tongue, pharynx, masticator spaces, brain). This module finds the pieces that
decide it, on any CT series (thin or 7 mm slices, gantry tilt, slice spacing
that changes inside the series, rotated heads):

* :class:`SliceStack` — the native slices' geometry in DICOM LPS millimetres
  (one plane per slice; irregular spacing and sheared stacks are exact);
* :class:`CoarseGrid` — the volume mean-pooled to ≈ 2 mm in-plane and resampled
  along the stack by slab overlap (a 7 mm slice is never interpolated into
  detail it does not have);
* the **skeleton hull** (:class:`SkeletonHull`): the 3D convex hull of the
  patient's bone, grown by a small margin. Convexity is what makes it robust:
  thin bone that partial volume at 4–7 mm slices pushes below any threshold
  (orbital floor, lamina papyracea, sinus walls) does not matter, because the
  hull spans the orbital rims, the piriform aperture, the dental arches and the
  zygomatic arches. Everything inside it is kept;
* the **body** (the patient, not the table, head holder, pillows or air): the
  largest connected component above −500 HU (half-way between air and water);
* **landmarks** (:class:`Landmarks`): both globes (a bright 24 mm blob in
  orbital fat near the hull's surface), the most protruding facial soft tissue
  (nose), the lowest anterior midline bone (menton). They orient the head and
  bound the *face zone* (:class:`FaceZone`): anterior to a coronal plane behind
  the auricles, below the upper forehead, above the submental skin;
* the **no-face decision**: without facial landmarks, or with less than
  :attr:`EnvelopeSettings.min_face_ml` of soft tissue standing ≥ 4 mm proud of
  the skeleton, there is no face to remove (bare skull, phantom, brain-only
  field of view) and nothing is changed.

Array conventions: ``hu[k, j, i]`` (slice, row, column) as in
:class:`pipeline.volume.Volume`; LPS millimetres; HU. All functions are pure
(arrays in, arrays out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from .volume import Volume

__all__ = [
    "BODY_THRESHOLD_HU",
    "CoarseGrid",
    "Envelope",
    "EnvelopeSettings",
    "FaceZone",
    "Landmarks",
    "SkeletonHull",
    "SliceStack",
    "coarse_grid",
    "find_envelope",
]

#: Voxels above this are (more) tissue than air: the patient's body at the skin.
BODY_THRESHOLD_HU = -500.0
#: soft tissue (skin, auricles) lies below this; holders, rails and bone above it
SOFT_MAX_HU = 120.0
#: Landmark note when the anatomical method finds no nose tip in front of the skeleton (the
#: zone is then placed from the globes; ``auto`` says so when the detector's nose boxes are used).
NO_NOSE_NOTE = "no nose-like protrusion found in front of the skeleton"
#: native HU that a skeleton's cortex (cortical bone, teeth) reaches and plastics do not: bright
#: material at the body's surface without a pixel this dense is a mask, splint or shell on the skin
CORTEX_HU = 1000.0
#: ... when at least this fraction of such a piece's voxels lies beside the air around the patient
#: (pressed shells on synthetic heads: 0.70-0.79; the real head's thin bones: 0; domain heads'
#: bone: at most 0.57, but 0.78 for a 0.5-mL nasal bone under one 1.3-mm pixel of skin) ...
SHELL_EXPOSED = 0.6
#: ... and the piece holds at least this much (mL; pressed shells 4-20 mL). Of such a shell, a
#: piece not beside the air is taken only if no pixel of it reaches this (thin bone under the
#: skin: 700-1000 HU on the real head's 4-mm slices; a 350-HU shell's inner fragments: < 500)
SHELL_MIN_ML = 1.0
SHELL_MAX_HU = 600.0
#: a cast as dense as bone (plaster, a metal splint) pressed on the face: in a native slice, a
#: piece of pixels at the bone threshold or more at least this share of which lie next to the
#: air around the patient (a 3.5-mm cast on synthetic heads' 1.7-mm pixels: 0.6-0.9; bone lies
#: under skin and has none, except teeth between parted lips, whose pieces reach into the jaw)
CAST_EXPOSED = 0.25


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class SliceStack:
    """Geometry of a volume's native slices (DICOM LPS, mm).

    Slice ``k`` is the plane through ``origins[k]`` spanned by ``row`` (direction
    of increasing column ``i``) and ``col`` (increasing row ``j``); pixel ``(j, i)``
    lies at ``origins[k] + i·di·row + j·dj·col``. ``normal`` is the unit plane
    normal pointing the way the slices are stored, ``offsets_mm[k]`` the position
    of slice ``k`` along it (relative to slice 0, increasing), ``cells_mm[k]`` the thickness each slice stands for
    (Voronoi cell along the normal, see :meth:`Volume.slice_cells_mm`), and
    ``stack`` the direction in which slice origins advance per mm along the
    normal (``normal`` itself, or sheared for a gantry tilt).
    """

    origins: np.ndarray
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    pixel_mm: tuple[float, float]  # (dj, di)
    offsets_mm: np.ndarray
    cells_mm: np.ndarray
    stack: np.ndarray

    @classmethod
    def of(cls, volume: Volume) -> SliceStack:
        pos = volume.positions_lps_mm()
        normal = volume.plane_normal()
        if len(pos) > 1 and (pos[-1] - pos[0]) @ normal < 0:
            normal = -normal  # the normal points the way slices are stored
        t = (pos - pos[0]) @ normal
        if len(t) > 1 and t[-1] - t[0] > 1e-9:
            stack = (pos[-1] - pos[0]) / (t[-1] - t[0])
        else:
            stack = normal.copy()
        return cls(origins=pos, row=np.asarray(volume.row_cosine, float),
                   col=np.asarray(volume.col_cosine, float), normal=normal,
                   pixel_mm=(float(volume.spacing_mm[1]), float(volume.spacing_mm[2])),
                   offsets_mm=t, cells_mm=volume.slice_cells_mm(), stack=stack)

    @property
    def n(self) -> int:
        return len(self.offsets_mm)


@dataclass
class CoarseGrid:
    """A volume on a coarse grid parallel to its slices (see :func:`coarse_grid`).

    ``hu[k', j', i']`` float32: mean of ``f × f`` native pixels, slab-weighted
    along the stack. Voxel ``(k', j', i')`` is centred at ``lps(k', j', i')``;
    coarse slice ``k'`` lies ``offsets_mm[k']`` along the plane normal.
    ``native_k[k]`` is the coarse slice nearest to native slice ``k``;
    ``spacing_mm`` = (step along the normal, row, column) in mm (the shear of a
    tilted stack is ignored by morphology and distances, ≤ 5 % at 18°).
    """

    hu: np.ndarray
    f: int
    offsets_mm: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin: np.ndarray  # LPS of the centre of coarse voxel (0, 0, 0)
    steps: np.ndarray  # 3×3: rows = LPS step of k', j', i'
    native_k: np.ndarray
    native_shape: tuple[int, int]

    def lps(self, k: Any, j: Any, i: Any) -> np.ndarray:
        """LPS mm of coarse voxel centres (broadcast index arrays); shape ``(..., 3)``."""
        k, j, i = (np.asarray(a, float) for a in (k, j, i))
        return (self.origin + k[..., None] * self.steps[0] + j[..., None] * self.steps[1]
                + i[..., None] * self.steps[2])

    def all_lps(self) -> np.ndarray:
        """LPS mm of every coarse voxel centre, ``(nk', nj', ni', 3)`` float32."""
        nk, nj, ni = self.hu.shape
        out = np.empty((nk, nj, ni, 3), np.float32)
        out[...] = self.origin
        out += (np.arange(nk)[:, None, None, None] * self.steps[0]).astype(np.float32)
        out += (np.arange(nj)[None, :, None, None] * self.steps[1]).astype(np.float32)
        out += (np.arange(ni)[None, None, :, None] * self.steps[2]).astype(np.float32)
        return out


def _pool_inplane(hu: np.ndarray, f: int, fill: float = -1000.0) -> np.ndarray:
    """Mean of ``f × f`` pixel blocks of every slice (edges padded with ``fill``), float32.

    Integer HU are summed exactly (int32) in blocks of 16 slices, on two threads.
    """
    nk, nj, ni = hu.shape
    if f == 1:
        return hu.astype(np.float32)
    pj, pi = (-nj) % f, (-ni) % f
    mj, mi = (nj + pj) // f, (ni + pi) // f
    out = np.empty((nk, mj, mi), np.float32)
    integer = np.issubdtype(hu.dtype, np.integer)

    def pool(k0: int) -> None:
        s = hu[k0:k0 + 16]
        if pj or pi:  # no full-size temporary: 16 slices at a time
            s = np.pad(s, ((0, 0), (0, pj), (0, pi)), constant_values=fill)
        if not integer:
            rows = s.reshape(len(s), mj, f, mi * f).sum(axis=2, dtype=np.float32)
            out[k0:k0 + 16] = rows.reshape(len(s), mj, mi, f).sum(axis=3)
            return
        rows = s[:, 0::f].astype(np.int32)  # integer sums: exact, fast
        for a in range(1, f):
            rows += s[:, a::f]
        block = rows[:, :, 0::f].copy()
        for a in range(1, f):
            block += rows[:, :, a::f]
        out[k0:k0 + 16] = block

    with ThreadPoolExecutor(max_workers=2) as workers:  # numpy releases the GIL
        list(workers.map(pool, range(0, nk, 16)))
    out *= np.float32(1.0 / (f * f))
    return out


def coarse_grid(volume: Volume, grid_mm: float = 2.0) -> CoarseGrid:
    """Mean-pool ``volume`` to ≈ ``grid_mm`` in-plane and resample along the stack.

    In-plane: blocks of ``f = round(grid_mm / pixel)`` pixels (at least 1). Along
    the stack: coarse slices ``≈ grid_mm`` apart along the plane normal; each is
    the overlap-weighted mean of the native slices' Voronoi slabs (so thin
    slices are averaged and a thick slice is repeated, never interpolated).
    Works for irregular spacing and gantry tilt (see :class:`SliceStack`).
    """
    stack = SliceStack.of(volume)
    dj, di = stack.pixel_mm
    f = max(1, int(round(grid_mm / min(dj, di))))
    pooled = _pool_inplane(volume.hu, f)
    t = stack.offsets_mm
    if stack.n == 1 or t[-1] - t[0] < 1e-6:
        ct = t[:1].copy()
        weights = [[(0, 1.0)]]
    else:
        n_c = max(2, int(round((t[-1] - t[0]) / grid_mm)) + 1)
        ct = np.linspace(t[0], t[-1], n_c)
        step = ct[1] - ct[0]
        # native Voronoi cells [lo, hi] along the normal
        mids = (t[:-1] + t[1:]) / 2.0
        lo = np.concatenate([[t[0] - (t[1] - t[0]) / 2.0], mids])
        hi = np.concatenate([mids, [t[-1] + (t[-1] - t[-2]) / 2.0]])
        weights = []
        for c in ct:
            a, b = c - step / 2.0, c + step / 2.0
            ov = np.minimum(hi, b) - np.maximum(lo, a)
            idx = np.flatnonzero(ov > 1e-9)
            w = ov[idx] / ov[idx].sum()
            weights.append(list(zip(idx.tolist(), w.tolist())))
    hu = np.empty((len(ct), pooled.shape[1], pooled.shape[2]), np.float32)
    for kc, ws in enumerate(weights):
        if len(ws) == 1:
            hu[kc] = pooled[ws[0][0]]
        else:
            acc = pooled[ws[0][0]] * np.float32(ws[0][1])
            for k, w in ws[1:]:
                acc += pooled[k] * np.float32(w)
            hu[kc] = acc
    step_n = float(ct[1] - ct[0]) if len(ct) > 1 else float(stack.cells_mm[0])
    native_k = np.clip(np.rint((t - ct[0]) / max(step_n, 1e-9)), 0, len(ct) - 1).astype(int)
    origin = stack.origins[0] + ((f - 1) / 2.0) * (dj * stack.col + di * stack.row)
    steps = np.stack([stack.stack * step_n, stack.col * (dj * f), stack.row * (di * f)])
    return CoarseGrid(hu=hu, f=f, offsets_mm=ct - t[0], spacing_mm=(step_n, dj * f, di * f),
                      origin=origin, steps=steps, native_k=native_k,
                      native_shape=(volume.hu.shape[1], volume.hu.shape[2]))


# --------------------------------------------------------------------------- hull


#: unit directions of a cuboctahedron-ish polytope: Minkowski margin around the hull
_MARGIN_DIRS = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    + [[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
_MARGIN_DIRS /= np.linalg.norm(_MARGIN_DIRS, axis=1, keepdims=True)


@dataclass
class SkeletonHull:
    """A convex polytope in LPS mm (the bone's convex hull, grown by a margin).

    ``vertices`` (V×3) and ``edges`` (E×2 vertex indices) serve slicing by planes;
    ``equations`` (F×4, ``n·x + d ≤ 0`` inside, unit ``n``) serve point tests.
    """

    vertices: np.ndarray
    edges: np.ndarray
    equations: np.ndarray

    @classmethod
    def of_points(cls, points: np.ndarray, margin_mm: float = 0.0) -> SkeletonHull | None:
        """Convex hull of ``points`` (N×3 mm) grown by ``margin_mm``; None if degenerate."""
        pts = np.asarray(points, float)
        if len(pts) < 4:
            return None
        try:
            hull = ConvexHull(pts)
            if margin_mm > 0:
                v = pts[hull.vertices]
                grown = (v[:, None, :] + margin_mm * _MARGIN_DIRS[None, :, :]).reshape(-1, 3)
                pts = grown
                hull = ConvexHull(pts)
        except QhullError:
            return None
        verts = pts[hull.vertices]
        remap = -np.ones(len(pts), int)
        remap[hull.vertices] = np.arange(len(hull.vertices))
        tri = remap[hull.simplices]
        e = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
        e.sort(axis=1)
        edges = np.unique(e, axis=0)
        return cls(vertices=verts, edges=edges, equations=hull.equations.copy())

    def grown(self, margin_mm: float) -> SkeletonHull:
        """This hull grown by ``margin_mm`` (Minkowski sum with a 14-direction polytope)."""
        out = SkeletonHull.of_points(self.vertices, margin_mm)
        return self if out is None else out

    def distance_outside(self, points: np.ndarray) -> np.ndarray:
        """Largest signed facet distance (mm) per point: > 0 outside (a lower bound of the
        Euclidean distance to the hull), ≤ 0 inside."""
        p = np.asarray(points, float).reshape(-1, 3)
        out = np.empty(len(p))
        n, d = self.equations[:, :3], self.equations[:, 3]
        for a in range(0, len(p), 100_000):
            out[a:a + 100_000] = (p[a:a + 100_000] @ n.T + d).max(axis=1)
        return out.reshape(np.asarray(points).shape[:-1])

    def contains(self, points: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
        """Bool per point (…×3): inside the hull shrunk by ``inset_mm`` (negative: grown)."""
        p = np.asarray(points, float)
        flat = p.reshape(-1, 3)
        out = np.ones(len(flat), bool)
        n, d = self.equations[:, :3], self.equations[:, 3] + inset_mm
        for a in range(0, len(flat), 200_000):
            blk = flat[a:a + 200_000]
            out[a:a + 200_000] = np.all(blk @ n.T + d <= 1e-9, axis=1)
        return out.reshape(p.shape[:-1])

    def plane_polygon(self, origin: np.ndarray, u_dir: np.ndarray, v_dir: np.ndarray,
                      normal: np.ndarray) -> np.ndarray | None:
        """Cross-section with the plane through ``origin`` (unit ``normal``).

        Returns the convex polygon's vertices (M×2, counter-clockwise) in plane
        coordinates ``(u, v)`` mm along ``u_dir`` / ``v_dir``, or None when the
        plane misses the hull.
        """
        d = (self.vertices - origin) @ normal
        a, b = self.edges[:, 0], self.edges[:, 1]
        da, db = d[a], d[b]
        cross = (da * db < 0) | (da == 0) | (db == 0)
        if not cross.any():
            return None
        da, db = da[cross], db[cross]
        denom = np.where(da == db, 1.0, da - db)
        w = np.where(da == db, 0.0, da / denom)
        p = self.vertices[a[cross]] + w[:, None] * (self.vertices[b[cross]] - self.vertices[a[cross]])
        q = p - origin
        uv = np.column_stack([q @ u_dir, q @ v_dir])
        if len(uv) < 3:
            return None
        # the section of a convex polytope is convex: its points in angular order around
        # their centroid are the polygon (no 2D hull needed)
        ang = np.arctan2(uv[:, 1] - uv[:, 1].mean(), uv[:, 0] - uv[:, 0].mean())
        return uv[np.argsort(ang)]


def polygon_row_spans(poly: np.ndarray | None, rows: np.ndarray, row_mm: float,
                      col_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Column interval ``[lo, hi]`` (float column indices) of a convex polygon per image row.

    ``poly``: M×2 plane coordinates ``(u, v)`` in mm (u along columns, v along
    rows). Rows that miss the polygon get ``lo > hi``.
    """
    n = len(rows)
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    if poly is None:
        return lo, hi
    v = np.asarray(rows, float) * row_mm
    u0, v0 = poly[:, 0][:, None], poly[:, 1][:, None]
    q = np.roll(poly, -1, axis=0)
    u1, v1 = q[:, 0][:, None], q[:, 1][:, None]
    vmin, vmax = np.minimum(v0, v1), np.maximum(v0, v1)
    sel = (v[None, :] >= vmin) & (v[None, :] <= vmax)  # edges × rows
    flat = np.abs(v1 - v0) < 1e-12
    dv = np.where(flat, 1.0, v1 - v0)
    u = u0 + (v[None, :] - v0) * (u1 - u0) / dv
    u_lo = np.where(flat, np.minimum(u0, u1), u)
    u_hi = np.where(flat, np.maximum(u0, u1), u)
    lo = np.where(sel, u_lo, np.inf).min(axis=0)
    hi = np.where(sel, u_hi, -np.inf).max(axis=0)
    return lo / col_mm, hi / col_mm


def halfspace_row_spans(equations: np.ndarray, origin: np.ndarray, row_dir: np.ndarray,
                        col_dir: np.ndarray, rows: np.ndarray, row_mm: float, col_mm: float,
                        n_cols: int, inset_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Column interval per image row of a convex set ``equations`` (F×4, ``n·x + d ≤ 0``
    inside, unit ``n``) shrunk by ``inset_mm`` (every plane moved inwards: exact erosion of
    a convex polytope), on the slice plane through ``origin``. Rows outside: ``lo > hi``."""
    n, d = equations[:, :3], equations[:, 3] + inset_mm
    alpha = n @ row_dir
    v = np.asarray(rows, float) * row_mm
    beta = -d[:, None] - (n @ origin)[:, None] - (n @ col_dir)[:, None] * v[None, :]
    lo = np.zeros(len(v))
    hi = np.full(len(v), float(n_cols - 1))
    pos, neg, flat = alpha > 1e-12, alpha < -1e-12, np.abs(alpha) <= 1e-12
    if pos.any():
        hi = np.minimum(hi, (beta[pos] / alpha[pos, None]).min(axis=0) / col_mm)
    if neg.any():
        lo = np.maximum(lo, (beta[neg] / alpha[neg, None]).max(axis=0) / col_mm)
    if flat.any():
        lo[(beta[flat] < 0).any(axis=0)] = np.inf
    return lo, hi


# --------------------------------------------------------------------------- zone


@dataclass
class FaceZone:
    """Where facial soft tissue may be removed: a union of convex parts.

    Each part is a set of half-spaces ``planes`` (P×4): a point ``x`` (LPS mm)
    is in the part when ``planes[:, :3] @ x + planes[:, 3] <= 0`` for all of
    them. ``names`` say what each part is ("face", "right ear", "left ear").
    """

    parts: list[np.ndarray]
    names: list[str]

    def contains(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, float)
        out = np.zeros(p.shape[:-1], bool)
        for planes in self.parts:
            out |= np.all(p @ planes[:, :3].T + planes[:, 3] <= 0, axis=-1)
        return out

    def contains_coarse(self, points: np.ndarray, thin: np.ndarray | None) -> np.ndarray:
        """Like :meth:`contains`, with the ear parts limited to ``thin`` (same shape)."""
        p = np.asarray(points, float)
        out = np.zeros(p.shape[:-1], bool)
        for planes, name in zip(self.parts, self.names):
            part = np.all(p @ planes[:, :3].T + planes[:, 3] <= 0, axis=-1)
            if name.endswith("ear") and thin is not None:
                part &= thin
            out |= part
        return out

    def row_spans(self, origin: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
                  rows: np.ndarray, row_mm: float, col_mm: float, n_cols: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Column interval ``(lo, hi)`` of every part per image row of a slice."""
        v = np.asarray(rows, float) * row_mm
        spans = []
        for planes in self.parts:
            lo = np.zeros(len(rows))
            hi = np.full(len(rows), float(n_cols - 1))
            for a_x, d in zip(planes[:, :3], planes[:, 3]):
                # a·(origin + u row + v col) + d <= 0  →  (a·row) u <= -d - a·origin - (a·col) v
                alpha = float(a_x @ row_dir)
                beta = -d - float(a_x @ origin) - float(a_x @ col_dir) * v
                if abs(alpha) < 1e-12:
                    lo[beta < 0] = np.inf
                    continue
                bound = beta / alpha / col_mm
                if alpha > 0:
                    hi = np.minimum(hi, bound)
                else:
                    lo = np.maximum(lo, bound)
            spans.append((lo, hi))
        return spans


# --------------------------------------------------------------------------- settings


@dataclass
class EnvelopeSettings:
    """Parameters of :func:`find_envelope` (mm, HU, mL)."""

    grid_mm: float = 2.0
    body_threshold_hu: float = BODY_THRESHOLD_HU
    bone_threshold_hu: float = 250.0  # on the ≈ 2 mm mean-pooled grid
    min_bone_ml: float = 0.1  # smaller bright components: noise, piercings, debris
    big_bone_ml: float = 2.0  # skull, mandible, vertebrae
    near_bone_mm: float = 8.0  # smaller bone pieces this close to the big ones are bone
    hull_margin_mm: float = 1.0
    globe_sigma_mm: float = 6.0
    globe_pair_mm: tuple[float, float] = (44.0, 86.0)
    globe_max_depth_mm: float = 28.0  # globe centre at most this deep inside the hull
    zone_superior_mm: float = 70.0  # above the globes' centres: the upper forehead
    zone_posterior_mm: float = 95.0  # behind the globes' centres: the face (≈ ear canals)
    zone_posterior_slope: float = 0.31  # mm less per mm below 10 mm under the globes
    menton_angle_deg: float = -5.0  # globes → menton against the head's vertical (− forward)
    vertex_angle_deg: float = 38.0  # globes → skull top, leaning back (synthetic heads 32–49°)
    vertex_gain: float = 1.8  # pitch per degree of that lean's change
    max_pitch_deg: float = 35.0
    ear_posterior_mm: float = 125.0  # lateral parts: behind the auricles
    ear_lateral_mm: float = 50.0  # lateral of the midline: where the ear parts start
    ear_superior_mm: float = 40.0
    ear_inferior_mm: float = 75.0
    ear_flap_mm: float = 6.0  # ear parts remove only flaps thinner than twice this
    ear_min_ml: float = 1.0  # ... in pieces of at least this volume (an auricle: 5–15 mL)
    ear_max_ml: float = 20.0  # ... and, where the body's opening cut it off, at most this (0: never)
    device_pixel_hu: float = 300.0  # ... and not beside native pixels this dense outside the body
    device_hu: float = 100.0  # couches, holders: plastics and carbon fibre at least this dense
    device_reach_mm: float = 40.0  # ... in pieces reaching this far outside the skeleton
    device_depth_mm: float = 3.0  # bone lies under skin: a big bright piece mostly shallower is a device
    zone_below_menton_mm: float = 25.0  # submental skin
    zone_inferior_fallback_mm: float = 150.0  # below the globes when no mandible is seen
    min_protrusion_mm: float = 10.0  # nose-like: soft tissue this far outside the hull
    face_depth_mm: float = 4.0  # (on grids of ≤ 2.5 mm; coarser grids count from the hull)
    min_face_ml: float = 3.0  # soft tissue ≥ face_depth_mm proud of the skeleton
    doubtful_ml: float = 10.0  # no landmarks but this much proud tissue in front: refuse


# --------------------------------------------------------------------------- landmarks


@dataclass
class Landmarks:
    """Facial landmarks in LPS mm (None when not found) and the head's axes.

    ``axes`` rows: unit vectors towards patient Left, Posterior, Superior of
    the *head*: yaw and roll from the globes; pitch (``pitch_deg``, + = chin
    down) from the globes → menton line when the mandible is in the field of
    view, else from the globes → skull-top line when the vault's top is, else
    the scanner's.
    ``anchor``: the globes' midpoint, or an estimate of it from the nose.
    """

    globe_right: np.ndarray | None = None
    globe_left: np.ndarray | None = None
    nose_tip: np.ndarray | None = None
    menton: np.ndarray | None = None
    anchor: np.ndarray | None = None
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))
    pitch_deg: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def r(v: np.ndarray | None) -> list[float] | None:
            return None if v is None else [round(float(x), 1) for x in v]

        return {"globe_right_lps_mm": r(self.globe_right), "globe_left_lps_mm": r(self.globe_left),
                "nose_tip_lps_mm": r(self.nose_tip), "menton_lps_mm": r(self.menton),
                "anchor_lps_mm": r(self.anchor),
                "pitch_deg": None if self.pitch_deg is None else round(self.pitch_deg, 1),
                "head_axes_lps": [[round(float(x), 3) for x in a] for a in self.axes]}


@dataclass
class Envelope:
    """Everything :func:`find_envelope` found (see the module docstring).

    ``face_found`` is False with ``reason`` when there is no face to remove.
    Coarse bool masks (shape of ``grid.hu``): ``body`` the patient; ``devices``
    tissue that is not the patient (holders, rails, pads); ``inside`` the hull;
    ``thin`` the body's thin flaps (auricles: gone after a 6 mm opening), the
    only tissue the zone's ear parts remove. ``zone``: the face zone;
    ``face_ml``: soft tissue in the zone ≥ ``face_depth_mm`` proud of the hull.
    """

    grid: CoarseGrid
    stack: SliceStack
    body: np.ndarray
    devices: np.ndarray
    hull: SkeletonHull | None
    inside: np.ndarray
    landmarks: Landmarks
    zone: FaceZone | None
    face_found: bool
    reason: str = ""
    face_ml: float = 0.0
    seconds: float = 0.0
    settings: EnvelopeSettings = field(default_factory=EnvelopeSettings)
    thin: np.ndarray | None = None
    doubtful: bool = False  # no face located, yet soft tissue stands proud in front
    plastic: np.ndarray | None = None  # a shell on the face: neither bone nor device
    #: a shell as dense as bone (:func:`_dense_casts`): its native pixels by native slice,
    #: ``{k: (rows, cols, mask)}``, and the coarse voxels of ``plastic`` they stand for
    casts: dict[int, tuple[slice, slice, np.ndarray]] = field(default_factory=dict)
    cast_coarse: np.ndarray | None = None

    # ------------------------------------------------------------ per native slice
    def slice_masks(self, k: int, hu_slice: np.ndarray, rows: slice | None = None,
                    cols: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(zone, outside_hull, body)`` bool masks of native slice ``k`` on ``[rows, cols]``.

        ``zone``: in the face zone (ear parts: thin flaps only); ``outside_hull``:
        outside the grown skeleton hull (exact, from the polygon of the hull's
        cross-section with the slice plane); ``body``: the coarse patient mask
        grown by one coarse voxel (never into a device) ∩ native HU above the
        body threshold. ``hu_slice`` is the whole native slice.
        """
        st, g = self.stack, self.grid
        nj, ni = hu_slice.shape
        rows = rows or slice(0, nj)
        cols = cols or slice(0, ni)
        r = np.arange(rows.start, rows.stop)
        c = np.arange(cols.start, cols.stop)[None, :]
        dj, di = st.pixel_mm
        o = st.origins[k]
        kc = int(g.native_k[k])

        def native(coarse: np.ndarray) -> np.ndarray:
            return _on_native(coarse, g.f, rows, cols)

        zone = np.zeros((len(r), c.shape[1]), bool)
        if self.zone is not None:
            for (zlo, zhi), name in zip(self.zone.row_spans(o, st.row, st.col, r, dj, di, ni),
                                        self.zone.names):
                part = (c >= zlo[:, None]) & (c <= zhi[:, None])
                if name.endswith("ear") and self.thin is not None:
                    part &= native(self.thin[kc])
                zone |= part
        if self.hull is None:
            outside = np.ones(zone.shape, bool)
        else:
            poly = self.hull.plane_polygon(o, st.row, st.col, st.normal)
            hlo, hhi = polygon_row_spans(poly, r, dj, di)
            outside = (c < hlo[:, None]) | (c > hhi[:, None])
        body = native(self.body_grown[kc]) & (hu_slice[rows, cols] > self.settings.body_threshold_hu)
        return zone, outside, body

    def exterior_air(self, k: int, hu_slice: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Native pixels of slice ``k`` on ``[rows, cols]`` that are air outside the patient
        (≤ the body threshold, within one coarse voxel of air connected in-plane to the
        image's border), not an air cavity inside the head (sinus, nasal or oral airway)."""
        return _air_outside(self.exterior_coarse, self.grid, k, hu_slice[rows, cols], rows, cols,
                            self.settings.body_threshold_hu)

    @property
    def exterior_coarse(self) -> np.ndarray:
        """Coarse voxels within one voxel (in-plane) of the air around the patient (computed
        once): air connected in its slice to the border of the image through passages at
        least five voxels (≈ 10 mm) wide, grown back two voxels into the air it came from —
        not an ear canal with the mastoid cells behind it, a nostril or a mouth's slit."""
        ext = getattr(self, "_exterior_cache", None)
        if ext is None:
            ext = _exterior_coarse(self.grid, self.settings.body_threshold_hu)
            self._exterior_cache = ext
        return ext

    def plastic_pixels(self, k: int, rows: slice, cols: slice) -> np.ndarray:
        """Native pixels of slice ``k`` on ``[rows, cols]`` in :attr:`plastic` (a dense shell on
        the skin that is not bone; all False when there is none). Of a shell as dense as bone
        only its own pixels (:attr:`casts`), not the skin and bone its coarse voxels pool."""
        if self.plastic is None or not self.plastic.any():
            return np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
        kc = int(self.grid.native_k[k])
        coarse = self.plastic[kc]
        if self.cast_coarse is not None:
            coarse = coarse & ~self.cast_coarse[kc]
        out = _on_native(coarse, self.grid.f, rows, cols)
        if int(k) in self.casts:
            rs, cs, m = self.casts[int(k)]
            r0, r1 = max(rs.start, rows.start), min(rs.stop, rows.stop)
            c0, c1 = max(cs.start, cols.start), min(cs.stop, cols.stop)
            if r0 < r1 and c0 < c1:
                out[r0 - rows.start:r1 - rows.start, c0 - cols.start:c1 - cols.start] |= \
                    m[r0 - rs.start:r1 - rs.start, c0 - cs.start:c1 - cs.start]
        return out

    def devices_near(self, k: int, rows: slice, cols: slice) -> np.ndarray:
        """Native pixels of slice ``k`` on ``[rows, cols]`` within one coarse voxel (in-plane)
        of a device."""
        near = getattr(self, "_devices_near_cache", None)
        if near is None:  # once per volume, not per native slice
            near = in_slabs(ndi.binary_dilation, self.devices, 0, structure=np.ones((1, 3, 3), bool))
            self._devices_near_cache = near
        return _on_native(near[int(self.grid.native_k[k])], self.grid.f, rows, cols)

    @property
    def body_grown(self) -> np.ndarray:
        """The coarse body grown by one voxel of partial-volume skin, never into a device."""
        grown = getattr(self, "_body_grown_cache", None)
        if grown is None:
            grown = in_slabs(ndi.binary_dilation, self.body, 1, iterations=1) & ~self.devices
            self._body_grown_cache = grown
        return grown

    @property
    def zone_coarse(self) -> np.ndarray:
        """Coarse bool mask of the face zone (ear parts limited to ``thin``)."""
        z = getattr(self, "_zone_cache", None)
        if z is None:
            z = np.zeros(self.grid.hu.shape, bool)
            if self.zone is not None:
                z = _zone_coarse(self.grid, self.stack, self.zone, self.thin)
            self._zone_cache = z
        return z

    def native_boxes_of_zone(self) -> dict[int, tuple[slice, slice]]:
        """Native slices, with their row and column range, where the zone meets the body
        outside the hull (from the coarse masks, one coarse voxel wider)."""
        g = self.grid
        if self.zone is None:
            return {}
        cand = ~self.inside & self.body_grown & self.zone_coarse
        cand = in_slabs(ndi.binary_dilation, cand, 1, iterations=1)
        out: dict[int, tuple[slice, slice]] = {}
        nj, ni = g.native_shape
        any_rows, any_cols = cand.any(axis=2), cand.any(axis=1)
        for k, kc in enumerate(g.native_k):
            rows = np.flatnonzero(any_rows[kc])
            if rows.size:
                cols = np.flatnonzero(any_cols[kc])
                out[k] = (slice(int(rows[0]) * g.f, min(nj, (int(rows[-1]) + 1) * g.f)),
                          slice(int(cols[0]) * g.f, min(ni, (int(cols[-1]) + 1) * g.f)))
        return out


# --------------------------------------------------------------------------- finding


def _exterior_coarse(grid: CoarseGrid, body_threshold_hu: float) -> np.ndarray:
    """:attr:`Envelope.exterior_coarse` of ``grid``."""
    air = grid.hu <= body_threshold_hu
    square = np.ones((1, 3, 3), bool)
    wide = in_slabs(ndi.binary_opening, air, 0, structure=square, iterations=2)
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = True
    lab, _ = ndi.label(wide, structure=plane)
    edge = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(),
                                     lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    ext = np.isin(lab, edge[edge > 0])
    ext = ndi.binary_dilation(ext, structure=square, iterations=2, mask=air)
    return in_slabs(ndi.binary_dilation, ext, 0, structure=square)


def _air_outside(exterior: np.ndarray, grid: CoarseGrid, k: int, hu_block: np.ndarray,
                 rows: slice, cols: slice, threshold_hu: float) -> np.ndarray:
    """Native pixels of slice ``k`` on ``[rows, cols]`` (``hu_block``: their HU) that are air
    outside the patient: at or below ``threshold_hu`` in ``exterior``
    (:func:`_exterior_coarse`)."""
    near = _on_native(exterior[int(grid.native_k[k])], grid.f, rows, cols)
    return near & (hu_block <= threshold_hu)


def _on_native(coarse: np.ndarray, f: int, rows: slice, cols: slice) -> np.ndarray:
    """A coarse slice's values on the native pixels ``[rows, cols]`` (pixel ``(j, i)`` lies
    in coarse voxel ``(j // f, i // f)``)."""
    r0, c0 = rows.start // f, cols.start // f
    blk = coarse[r0:(rows.stop - 1) // f + 1, c0:(cols.stop - 1) // f + 1]
    if f > 1:
        blk = np.repeat(np.repeat(blk, f, axis=0), f, axis=1)
    a, b = rows.start - r0 * f, cols.start - c0 * f
    return blk[a:a + rows.stop - rows.start, b:b + cols.stop - cols.start]


def in_slabs(op: Callable[..., np.ndarray], mask: np.ndarray, halo: int,
             **kwargs: Any) -> np.ndarray:
    """``op(mask, **kwargs)`` for a local operation on a 3D bool mask, computed on the two
    halves of axis 0 in two threads (scipy.ndimage releases the GIL).

    ``halo``: how many slices away along axis 0 an output voxel's inputs may lie (the
    iterations of a dilation or erosion by a one-voxel structure, twice that for an
    opening). Each half is computed with that many neighbouring slices on either side,
    so the result is the same array as ``op(mask, **kwargs)``.
    """
    n = mask.shape[0]
    if n < 4 * halo + 16:
        return op(mask, **kwargs)
    mid = n // 2
    out = np.empty(mask.shape, bool)

    def part(a: int, b: int) -> None:
        lo, hi = max(0, a - halo), min(n, b + halo)
        out[a:b] = op(mask[lo:hi], **kwargs)[a - lo:b - lo]

    with ThreadPoolExecutor(max_workers=2) as workers:
        for job in [workers.submit(part, 0, mid), workers.submit(part, mid, n)]:
            job.result()
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask & False
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _body_mask(grid: CoarseGrid, threshold_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """The patient, and the devices touching it (coarse bool masks).

    Tissue = above ``threshold_hu``. A one-voxel opening (≈ 2 mm) cuts the thin
    contacts between the patient and head holders, rails or pads; its largest
    component is the patient's core. The core is grown back by two voxels into
    tissue below 120 HU only (skin and auricles, which the opening thinned),
    never into the 120–400 HU plastics of holders and rails. ``devices`` is the
    rest of the tissue mask: it is never changed.
    """
    tissue = grid.hu > threshold_hu
    opened = in_slabs(ndi.binary_opening, tissue, 2, iterations=1)
    core = _largest_component(opened if opened.any() else tissue)
    soft = tissue & (grid.hu < SOFT_MAX_HU)
    body = core | (in_slabs(ndi.binary_dilation, core, 2, iterations=2) & soft)
    body = _largest_component(body)
    return body, tissue & ~body


def _bone_and_rails(grid: CoarseGrid, body: np.ndarray, st: EnvelopeSettings, voxel_ml: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Bone of the patient, and bright material in the body that is not bone (coarse masks).

    Bright = ≥ ``bone_threshold_hu`` in the body, in 26-connected components.
    The skeleton's big pieces (≥ ``big_bone_ml``: skull, mandible, vertebrae)
    are bone, and so is every smaller piece ≥ ``min_bone_ml`` within
    ``near_bone_mm`` of them (nasal bones, teeth, displaced fragments, the
    hyoid). Bright pieces ≥ ``min_bone_ml`` further away are not bone: a head
    holder's rail pressed against an ear, a frame, a foreign body. Pieces
    smaller than ``min_bone_ml`` (noise, piercings) are neither.

    A big piece other than the largest is bone only if most of it lies at least
    ``device_depth_mm`` inside the body (in-plane): a skeleton lies under skin, while a
    dense head holder the head rests on joins the body where it is pressed to the skin
    (so the opening in :func:`_body_mask` cannot cut it off) yet lies at its surface
    (:func:`pipeline.evaluate.native_skeleton_hull` asks the same of every piece).
    Without this a holder's shell counted as skeleton: its hull then held the auricles
    and the cheeks beside it, and nothing there was removed.
    """
    bright = (grid.hu >= st.bone_threshold_hu) & body
    lab, n = ndi.label(bright, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return bright, bright
    sizes = np.bincount(lab.ravel()) * voxel_ml
    sizes[0] = 0.0
    big = sizes >= st.big_bone_ml
    if big.sum() > 1:
        deep = np.stack([ndi.distance_transform_edt(b, sampling=grid.spacing_mm[1:]) >= st.device_depth_mm
                         for b in body])
        frac = ndi.sum_labels(deep, lab, np.arange(n + 1)) / np.maximum(
            np.bincount(lab.ravel(), minlength=n + 1), 1)
        shallow = big & (frac < 0.5)
        shallow[int(np.argmax(sizes))] = False  # the largest piece is the skeleton (a bare skull too)
        big &= ~shallow
    else:
        shallow = np.zeros(n + 1, bool)
    if not big.any():
        big[int(np.argmax(sizes))] = sizes.max() >= st.min_bone_ml
    reach = max(1, int(round(st.near_bone_mm / min(grid.spacing_mm))))
    near = in_slabs(ndi.binary_dilation, big[lab], reach, iterations=reach)
    close = np.zeros(n + 1, bool)
    close[np.unique(lab[near & bright])] = True
    ok = sizes >= st.min_bone_ml
    bone_ok = big | (close & ok & ~shallow)
    bone_ok[0] = False
    other = ok & ~bone_ok
    other[0] = False
    return bone_ok[lab], other[lab]


def _dense_share(volume: Volume, grid: CoarseGrid, hu: float, st: EnvelopeSettings,
                 where: np.ndarray | None = None) -> np.ndarray:
    """Per coarse voxel, the share of its native pixels at ``hu`` or more (the coarse grid's
    pooling of a 0/1 copy of the volume). ``where``: count only where it has voxels (its
    native slices, in-plane its bounding box; 0 elsewhere)."""
    if where is None:
        hot = np.greater_equal(volume.hu, hu, out=np.empty(volume.hu.shape, np.int16),
                               casting="unsafe")
    else:
        hot = np.zeros(volume.hu.shape, np.int16)
        box = bbox_of(where)
        if box is not None:
            ks = np.flatnonzero(np.isin(grid.native_k, np.arange(box[0].start, box[0].stop)))
            f = grid.f
            rs = slice(box[1].start * f, min(volume.hu.shape[1], box[1].stop * f))
            cs = slice(box[2].start * f, min(volume.hu.shape[2], box[2].stop * f))
            hot[ks, rs, cs] = volume.hu[ks, rs, cs] >= hu
    return coarse_grid(volume.with_hu(hot), st.grid_mm).hu


def _surface_plastic(volume: Volume, grid: CoarseGrid, stack: SliceStack, bone: np.ndarray,
                     clean: np.ndarray, st: EnvelopeSettings
                     ) -> tuple[np.ndarray, np.ndarray | None,
                                dict[int, tuple[slice, slice, np.ndarray]], np.ndarray]:
    """Coarse voxels of ``bone`` that are a dense shell on the skin, not bone; the
    :func:`_exterior_coarse` mask when it was computed (None otherwise); the native pixels of
    a shell as dense as bone (:func:`_dense_casts`, by native slice) and the coarse voxels of
    the shell's pieces that hold them (which stand for those pixels only). ``clean``: ``bone``
    without metal streaks (:func:`_without_streaks`), for the hull.

    A mask, splint, cast or dressing pressed onto the face is as bright as bone on the
    coarse grid (a 350-HU shell: 250 HU and more) and, where the skin under it is thin,
    joins the skull's piece through the skin's partial volume; the skeleton's hull then
    spanned the shell, the whole face lay inside it and nothing was removed (synthetic
    heads: nose and lips 0 %, while the QA said the detector's nose was removed).

    Bone has a cortex (a native pixel of ``CORTEX_HU`` or more in its coarse voxels, in any
    native slice they pool), which plastics do not reach, and lies under skin. Candidates:
    bone voxels without such a pixel outside the hull of the bone with one (grown by
    ``hull_margin_mm``). A shell: candidates within a voxel of each other (the shell's
    voxels that pool a cortex pixel stay bone and split it) holding ``SHELL_MIN_ML`` or
    more, at least ``SHELL_EXPOSED`` of whose voxels lie beside a dense native pixel next to
    the air around the patient (:func:`_exposed_dense`). Of a shell, its 26-connected pieces
    beside such a pixel are taken, and those no pixel of which reaches ``SHELL_MAX_HU``
    (inner fragments), not a thin bone under the skin beneath it. On the real head CT of
    4-mm slices the nasal bones and the maxilla's front wall peak at 700-1000 HU and lie
    outside the cortical bone's hull, but none of them is beside such a pixel: skin covers
    bone.
    """
    empty = np.zeros(bone.shape, bool)
    if not bone.any():
        return empty, None, {}, empty
    voxel_ml = float(np.prod(grid.spacing_mm)) / 1000.0
    exterior = _exterior_coarse(grid, st.body_threshold_hu)
    # bone beside the air around the patient (a voxel beside an exposed pixel lies next to
    # that air's voxels): on most heads too little for a shell, and the search ends here
    near = bone & in_slabs(ndi.binary_dilation, exterior, 0, structure=np.ones((1, 3, 3), bool))
    exposed = _exposed_dense(volume, grid, near, exterior, st)
    if exposed.sum() * voxel_ml < SHELL_EXPOSED * SHELL_MIN_ML:  # no shell can qualify
        return empty, exterior, {}, empty
    soft = bone & (_dense_share(volume, grid, CORTEX_HU, st, bone) <= 0.0)
    casts: dict[int, tuple[slice, slice, np.ndarray]] = {}
    if (exposed & ~soft).sum() * voxel_ml >= SHELL_EXPOSED * SHELL_MIN_ML:
        # a cortex beside the air: a cast as dense as bone — or bone bare to the air (teeth
        # between parted lips), whose pieces in a slice reach into the skeleton, mostly away
        # from the air
        casts = _dense_casts(volume, grid, exposed & ~soft, exterior, st)
        if casts:
            pooled = _pooled_pixels(volume, grid, st, casts) & bone
            # and the bone voxels within two voxels of it: the cast where, in a slice, it met
            # the bone through skin thinner than a pixel (kept as bone, it held the hull open)
            soft |= ndi.binary_dilation(pooled, structure=np.ones((3, 3, 3), bool),
                                        iterations=2, mask=bone)
            # its pieces were chosen for lying beside the air, on every coarse slice they
            # fill (a thick native slice fills several; the test above marks one of them)
            exposed |= pooled
    exposed &= soft
    if exposed.sum() * voxel_ml < SHELL_EXPOSED * SHELL_MIN_ML or not (clean & ~soft).any():
        return empty, exterior, {}, empty
    hull = SkeletonHull.of_points(_hull_points(grid, clean & ~soft), st.hull_margin_mm)
    if hull is None:
        return empty, exterior, {}, empty
    out = soft & ~_inside_coarse(grid, stack, hull)
    exposed &= out
    if exposed.sum() * voxel_ml < SHELL_EXPOSED * SHELL_MIN_ML:
        return empty, exterior, {}, empty

    def exposure(lab: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        count = np.bincount(lab.ravel(), minlength=n + 1)
        return count, ndi.sum_labels(exposed, lab, np.arange(n + 1)) / np.maximum(count, 1)

    # a shell: pieces a voxel apart (its cortex-pooled voxels stay bone and split it), together
    # big enough and mostly beside the air; of them, the pieces that reach the air themselves
    # and those without a pixel of SHELL_MAX_HU (not a thin bone under the shell's skin)
    group, n = ndi.label(in_slabs(ndi.binary_dilation, out, 1, structure=np.ones((3, 3, 3), bool)))
    group[~out] = 0
    count, frac = exposure(group, n)
    shell = (frac >= SHELL_EXPOSED) & (count * voxel_ml >= SHELL_MIN_ML)
    shell[0] = False
    piece, m = ndi.label(out, structure=np.ones((3, 3, 3), bool))
    _, own = exposure(piece, m)
    in_shell = np.zeros(m + 1, bool)
    in_shell[np.unique(piece[shell[group]])] = True
    if in_shell.any():  # a piece under the skin is bone unless no pixel of it reaches bone's HU
        dense = _dense_share(volume, grid, SHELL_MAX_HU, st, piece > 0)
        dense = ndi.maximum(dense, piece, np.arange(m + 1)) > 0
        in_shell &= (own > 0.0) | ~dense
    in_shell[0] = False
    plastic = in_shell[piece]
    cast_coarse = empty
    if casts and (plastic & pooled).any():
        # the shell's pieces that hold a dense cast: on native pixels, the cast's pixels only
        # (their coarse voxels also pool the skin and bone under the cast)
        ids = np.unique(piece[plastic & pooled])
        cast_coarse = np.isin(piece, ids[ids > 0])
        casts = {k: (rs, cs, m & _on_native(cast_coarse[int(grid.native_k[k])], grid.f, rs, cs))
                 for k, (rs, cs, m) in casts.items()}
        casts = {k: c for k, c in casts.items() if c[2].any()}
    else:
        casts = {}
    return plastic, exterior, casts, cast_coarse


def _dense_casts(volume: Volume, grid: CoarseGrid, where: np.ndarray, exterior: np.ndarray,
                 st: EnvelopeSettings) -> dict[int, tuple[slice, slice, np.ndarray]]:
    """Native pixels of a cast as dense as bone (plaster, a metal splint) on the skin, per
    native slice whose coarse slice holds voxels of ``where``: ``{k: (rows, cols, mask)}``,
    ``mask`` on ``[rows, cols]``.

    In the slice, the 8-connected pieces of pixels at ``bone_threshold_hu`` or more that hold
    a pixel of ``CORTEX_HU`` and at least ``CAST_EXPOSED`` of whose pixels lie next to the air
    around the patient (:func:`_dense_beside_air`). A cast on the skin is such a piece; bone is
    not, for skin covers it — where the skin under the cast is thinner than a pixel the two are
    one piece, mostly not beside the air, and that slice's cast stays (as bone) rather than
    the bone going with it. On the coarse grid (2 mm) the skin's partial volume joins the cast
    to the skull, which is why this is asked of native pixels."""
    out: dict[int, tuple[slice, slice, np.ndarray]] = {}
    full = slice(0, volume.hu.shape[1]), slice(0, volume.hu.shape[2])
    for k in np.flatnonzero(np.isin(grid.native_k, np.flatnonzero(where.any(axis=(1, 2))))):
        sl = volume.hu[k]
        dense, beside = _dense_beside_air(volume, grid, exterior, st, int(k), *full)
        lab, n = ndi.label(dense, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        count = np.bincount(lab.ravel(), minlength=n + 1)
        share = np.bincount(lab[beside], minlength=n + 1) / np.maximum(count, 1)
        ok = share >= CAST_EXPOSED
        ok[0] = False
        if not ok.any():
            continue
        ok[1:] &= ndi.maximum(sl, lab, np.arange(1, n + 1)) >= CORTEX_HU
        if not ok.any():
            continue
        mask = ok[lab]
        box = bbox_of(mask)
        out[int(k)] = (box[0], box[1], mask[box])
    return out


def _pooled_pixels(volume: Volume, grid: CoarseGrid, st: EnvelopeSettings,
                   pixels: dict[int, tuple[slice, slice, np.ndarray]]) -> np.ndarray:
    """Coarse voxels holding a native pixel of ``pixels`` (``{k: (rows, cols, mask)}``),
    pooled as the grid pools the volume (a thick slice fills every coarse slice it spans)."""
    hot = np.zeros(volume.hu.shape, np.int16)
    for k, (rs, cs, m) in pixels.items():
        hot[k, rs, cs] = m
    return coarse_grid(volume.with_hu(hot), st.grid_mm).hu > 0.0


def _exposed_dense(volume: Volume, grid: CoarseGrid, where: np.ndarray, exterior: np.ndarray,
                   st: EnvelopeSettings, between: bool = False) -> np.ndarray:
    """Coarse voxels of ``where`` within one voxel (in-plane) of a native pixel of
    ``bone_threshold_hu`` or more next to (8-neighbourhood) air outside the patient
    (``exterior``: :func:`_exterior_coarse`; not a sinus, the nasal cavity or a nostril). Only
    pixels at least 5 mm inside the image's inscribed circle count: where the field of view
    cuts a face, its bone meets the padding or the image's border. A native slice marks its
    own coarse slice (``grid.native_k``); with ``between``, also the coarse slices between
    native slices thicker than the grid (:func:`_between_natives`)."""
    out = np.zeros(where.shape, bool)
    nj, ni = volume.hu.shape[1:]
    f = grid.f
    for k in np.flatnonzero(np.isin(grid.native_k, np.flatnonzero(where.any(axis=(1, 2))))):
        kc = int(grid.native_k[k])
        box = bbox_of(where[kc])
        if box is None:
            continue
        rs = slice(max(0, (box[0].start - 2) * f), min(nj, (box[0].stop + 2) * f))
        cs = slice(max(0, (box[1].start - 2) * f), min(ni, (box[1].stop + 2) * f))
        jj, ii = np.nonzero(_dense_beside_air(volume, grid, exterior, st, k, rs, cs)[1])
        if jj.size:
            out[kc, np.minimum((jj + rs.start) // f, out.shape[1] - 1),
                np.minimum((ii + cs.start) // f, out.shape[2] - 1)] = True
    if between:
        out = _between_natives(grid, out)
    return in_slabs(ndi.binary_dilation, out, 0, structure=np.ones((1, 3, 3), bool)) & where


def _dense_beside_air(volume: Volume, grid: CoarseGrid, exterior: np.ndarray,
                      st: EnvelopeSettings, k: int, rows: slice, cols: slice
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Native pixels of slice ``k`` on ``[rows, cols]`` at ``bone_threshold_hu`` or more, and
    those of them next to (8-neighbourhood) air outside the patient (``exterior``:
    :func:`_exterior_coarse`) at least 5 mm inside the image's inscribed circle (where the field
    of view cuts a face, its bone meets the padding or the image's border)."""
    nj, ni = volume.hu.shape[1:]
    dj, di = (float(x) for x in volume.spacing_mm[1:])
    radius = min(nj * dj, ni * di) / 2.0 - 5.0
    sl = volume.hu[k, rows, cols]
    y = (np.arange(rows.start, rows.stop) - (nj - 1) / 2.0)[:, None] * dj
    x = (np.arange(cols.start, cols.stop) - (ni - 1) / 2.0)[None, :] * di
    air = _air_outside(exterior, grid, k, sl, rows, cols, st.body_threshold_hu)
    dense = sl >= st.bone_threshold_hu
    inner = np.hypot(y, x) <= radius
    return dense, dense & ndi.binary_dilation(air, np.ones((3, 3), bool)) & inner


def _between_natives(grid: CoarseGrid, coarse: np.ndarray) -> np.ndarray:
    """``coarse`` (marked on the coarse slices of native slices, ``grid.native_k``) with each
    coarse slice that no native slice maps to copied from the nearest one that does: a native
    slice thicker than the grid fills several coarse slices (:func:`coarse_grid`)."""
    hit = np.unique(grid.native_k)
    if hit.size in (0, coarse.shape[0]):
        return coarse
    kc = np.arange(coarse.shape[0])
    return coarse[hit[np.abs(kc[:, None] - hit[None, :]).argmin(axis=1)]]


def _face_shells(volume: Volume, grid: CoarseGrid, stack: SliceStack, other: np.ndarray,
                 exterior: np.ndarray, face: FaceZone, lm: Landmarks, st: EnvelopeSettings
                 ) -> np.ndarray:
    """Pieces of ``other`` (bright material that is not bone, :func:`_bone_and_rails`) that
    are a shell on the face: ``SHELL_MIN_ML`` or more, at least half of their voxels in
    front of the globes' coronal plane and reaching within 15 mm of the midline there (over
    the nose or mouth; a holder's walls lie beside or behind the head), at least half in the
    ``face`` zone and at least ``SHELL_EXPOSED`` of their voxels beside the air around the
    patient (:func:`_exposed_dense`). Cheapest tests first. However dense: not being bone
    (:func:`_bone_and_rails`), such a piece is a plastic shell or a cast as dense as bone
    (plaster, a metal splint) alike; eyeglasses stand off the face and do not qualify."""
    none = np.zeros(other.shape, bool)
    if lm.anchor is None:
        return none
    lab, n = ndi.label(other, structure=np.ones((3, 3, 3), bool))
    count = np.bincount(lab.ravel(), minlength=n + 1)
    ok = count * (float(np.prod(grid.spacing_mm)) / 1000.0) >= SHELL_MIN_ML
    ok[0] = False
    if not ok.any():
        return none
    idx = np.argwhere(ok[lab])
    rel = grid.lps(*idx.T) - lm.anchor
    left, post, _ = lm.axes
    ids = lab[tuple(idx.T)]
    front = rel @ post < 0.0
    ok &= np.bincount(ids[front], minlength=n + 1) * 2 >= count
    ok &= np.bincount(ids[front & (np.abs(rel @ left) <= 15.0)], minlength=n + 1) > 0
    ok[0] = False
    if not ok.any():
        return none
    ok &= ndi.sum_labels(_zone_coarse(grid, stack, face, None), lab, np.arange(n + 1)) * 2 >= count
    ok[0] = False
    if not ok.any():
        return none
    cand = ok[lab]
    exposed = _exposed_dense(volume, grid, cand, exterior, st, between=True)
    ok &= ndi.sum_labels(exposed, lab, np.arange(n + 1)) >= SHELL_EXPOSED * count
    ok[0] = False
    return ok[lab]


def _chin_profile(post_mm: np.ndarray, sup_mm: np.ndarray, start_mm: float = 30.0,
                  bin_mm: float = 2.0, step_back_mm: float = 20.0, depth_mm: float = 20.0,
                  give_up_mm: float = 40.0) -> np.ndarray | None:
    """Which midline bone points belong to the face's front profile (bool mask), or None.

    ``post_mm``/``sup_mm``: the points' distance behind and above the globes (mm, head
    axes before the pitch is known). Walking down in ``bin_mm`` steps from ``start_mm``
    below the globes (below the nasal bones, whose tip stands far in front of the bony
    septum under it), the most anterior bone of each step is the profile (maxilla, teeth,
    mandible) while it stays within ``step_back_mm`` of the step above it (forward is
    always fine); a step whose front lies further back is the spine or the hyoid behind
    the chin and is skipped, and after ``give_up_mm`` of such steps (or of steps without
    bone) the profile has ended. The points within ``depth_mm`` behind the front of the
    profile's steps are returned; the lowest of them is the menton. A gap where the jaws
    are apart (edentulous, mouth open) is bridged when the mandible's front is back within
    ``step_back_mm`` before ``give_up_mm``.
    """
    below = sup_mm <= -start_mm
    if not below.any():
        return None
    level = np.floor((-start_mm - sup_mm) / bin_mm).astype(int)  # 0: start_mm below the globes
    n = int(level[below].max()) + 1
    front = np.full(n, np.inf)
    np.minimum.at(front, level[below], post_mm[below])
    keep = np.zeros(n, bool)
    running, missed = None, 0.0
    for i in range(n):
        f = front[i]
        if np.isfinite(f) and (running is None or f - running <= step_back_mm):
            keep[i], running, missed = True, f, 0.0
            continue
        missed += bin_mm
        if running is not None and missed > give_up_mm:
            break
    if not keep.any():
        return None
    ok = below.copy()
    ok[below] = keep[level[below]] & (post_mm[below] <= front[level[below]] + depth_mm)
    return ok if ok.any() else None


def _without_streaks(grid: CoarseGrid, bone: np.ndarray) -> np.ndarray:
    """``bone`` without the bright streaks dental metal throws across its slices.

    In a coarse slice that holds metal (≥ 1500 HU after pooling), only bone that
    survives a 3×3 in-plane opening counts: streaks are lines one or two voxels
    wide, jaws and teeth are not. Used for the hull only (a streak through the
    lips must not pull the skeleton's hull over them).
    """
    metal = np.flatnonzero((grid.hu >= 1500.0).any(axis=(1, 2)))
    if metal.size == 0:
        return bone
    out = bone.copy()
    square = np.ones((3, 3), bool)
    for k in metal:
        out[k] = ndi.binary_opening(bone[k], structure=square)
    return out


def outline_pixels(mask: np.ndarray) -> np.ndarray:
    """``(row, column)`` of the first and last True pixel of every row and every column of a
    2D mask (N×2 int, unique): the points that decide its convex hull."""
    if not mask.any():
        return np.zeros((0, 2), int)
    nj, ni = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = ni - 1 - mask[rows, ::-1].argmax(axis=1)
    cols = np.flatnonzero(mask.any(axis=0))
    top = mask[:, cols].argmax(axis=0)
    bot = nj - 1 - mask[::-1, cols].argmax(axis=0)
    idx = np.concatenate([np.column_stack([rows, first]), np.column_stack([rows, last]),
                          np.column_stack([top, cols]), np.column_stack([bot, cols])])
    return np.unique(idx, axis=0)


def _hull_points(grid: CoarseGrid, bone: np.ndarray) -> np.ndarray:
    """LPS corners of the outermost bone voxels per row and column of every coarse slice."""
    pts = []
    nk = bone.shape[0]
    # a bone voxel stands for bone anywhere in it (thick slabs are replicated over their cell)
    corners = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    for k in range(nk):
        idx = outline_pixels(bone[k])
        if not idx.size:
            continue
        kk = np.full(len(idx), k, float)
        base = np.column_stack([kk, idx[:, 0], idx[:, 1]])
        pts.append((base[:, None, :] + corners[None, :, :]).reshape(-1, 3))
    if not pts:
        return np.zeros((0, 3))
    kji = np.concatenate(pts)
    # the first and last coarse slices stand for half a step beyond their centres only
    kji[:, 0] = np.clip(kji[:, 0], -0.5, nk - 0.5)
    return grid.lps(kji[:, 0], kji[:, 1], kji[:, 2])


def _coarse_slices(grid: CoarseGrid, stack: SliceStack):
    """Yield ``(k', origin, rows, cols)`` per coarse slice, for row-span rasterising."""
    nk, nj, ni = grid.hu.shape
    rows = np.arange(nj)
    cols = np.arange(ni)[None, :]
    for k in range(nk):
        yield k, grid.lps(k, 0, 0), rows, cols


def _inside_coarse(grid: CoarseGrid, stack: SliceStack, hull: SkeletonHull | None) -> np.ndarray:
    """Coarse bool mask of the hull (per coarse slice, from the plane cross-section)."""
    inside = np.zeros(grid.hu.shape, bool)
    if hull is None:
        return inside
    for k, o, rows, cols in _coarse_slices(grid, stack):
        poly = hull.plane_polygon(o, stack.row, stack.col, stack.normal)
        lo, hi = polygon_row_spans(poly, rows, grid.spacing_mm[1], grid.spacing_mm[2])
        inside[k] = (cols >= np.floor(lo)[:, None]) & (cols <= np.ceil(hi)[:, None])
    return inside


def _grown_inside(inside: np.ndarray, grid: CoarseGrid, margin_mm: float) -> np.ndarray:
    """The coarse hull mask grown by ≈ ``margin_mm`` (±1 coarse voxel): dilations of the
    26-neighbourhood, for larger margins on a grid pooled 2× (any) and expanded back. Used
    for thresholds (nose protrusion, face volume), where a voxel's accuracy does not matter."""
    step = min(grid.spacing_mm)
    if margin_mm < 3.0 * step:  # a few voxels: dilate directly
        n = max(1, int(round(margin_mm / step)))
        return in_slabs(ndi.binary_dilation, inside, n, structure=np.ones((3, 3, 3), bool),
                        iterations=n)
    shape = inside.shape
    pad = [(0, (-n) % 2) for n in shape]
    pooled = np.pad(inside, pad).reshape(
        (shape[0] + pad[0][1]) // 2, 2, (shape[1] + pad[1][1]) // 2, 2,
        (shape[2] + pad[2][1]) // 2, 2).any(axis=(1, 3, 5))
    n = max(1, int(round(margin_mm / (2.0 * min(grid.spacing_mm)))))
    grown = in_slabs(ndi.binary_dilation, pooled, n, structure=np.ones((3, 3, 3), bool),
                     iterations=n)
    full = grown.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return full[:shape[0], :shape[1], :shape[2]] | inside


def _zone_coarse(grid: CoarseGrid, stack: SliceStack, zone: FaceZone,
                 thin: np.ndarray | None) -> np.ndarray:
    """Coarse bool mask of ``zone`` (ear parts limited to ``thin``), by row spans."""
    out = np.zeros(grid.hu.shape, bool)
    ni = grid.hu.shape[2]
    for k, o, rows, cols in _coarse_slices(grid, stack):
        spans = zone.row_spans(o, stack.row, stack.col, rows, grid.spacing_mm[1],
                               grid.spacing_mm[2], ni)
        for (lo, hi), name in zip(spans, zone.names):
            part = (cols >= np.floor(lo)[:, None]) & (cols <= np.ceil(hi)[:, None])
            if name.endswith("ear") and thin is not None:
                part &= thin[k]
            out[k] |= part
    return out


def _globe_candidates(grid: CoarseGrid, body: np.ndarray, st: EnvelopeSettings, n: int = 40
                      ) -> list[tuple[tuple[int, int, int], float]]:
    """Voxels that look like the centre of a globe, strongest first.

    Score: the scale-normalised −LoG (σ = ``globe_sigma_mm``) of HU clipped to
    −150…100 (a bright, ≈ 24 mm blob: vitreous ≈ 10 HU in orbital fat), times
    how water-like the 3 mm neighbourhood is (``exp(−((mean − 12)/20)²)``:
    1 for vitreous, 0.13 for muscle), where it is uniform (SD < 35 HU) and
    inside the body. Local maxima over 5³ voxels. Only the body's
    bounding box is searched.
    """
    box = bbox_of(body)
    if box is None:
        return []
    # the globes lie in the front of the head (scanner −y, any yaw within ±30°): with rows
    # running to posterior (axial slices), search the rows in front of the body's 60th
    # percentile of y (+ 20 mm) only
    if grid.steps[1][1] > 0.5 * np.linalg.norm(grid.steps[1]):
        b_idx = np.argwhere(body[:, ::4, ::4]) * np.array([1, 4, 4])
        y_cut = float(np.percentile(grid.lps(*b_idx.T)[:, 1], 60)) + 20.0
        row_y = grid.lps(0, np.arange(body.shape[1]), 0)[:, 1]
        rows = np.flatnonzero(row_y <= y_cut)
        if rows.size:
            box = (box[0], slice(box[1].start, min(box[1].stop, int(rows[-1]) + 1)), box[2])
    # ≈ 3–4 mm is fine enough to find 24 mm globes: halve finer grids in-plane
    step = 2 if max(grid.spacing_mm[1:]) < 2.5 else 1
    box = (box[0], slice(box[1].start, box[1].stop, step), slice(box[2].start, box[2].stop, step))
    hu = grid.hu[box]
    sp = (grid.spacing_mm[0], grid.spacing_mm[1] * step, grid.spacing_mm[2] * step)
    clipped = np.clip(hu, -150.0, 100.0)
    resp = -ndi.gaussian_laplace(clipped, tuple(st.globe_sigma_mm / s for s in sp))
    s3 = tuple(3.0 / s for s in sp)
    near = np.clip(hu, -300.0, 300.0)
    mean = ndi.gaussian_filter(near, s3)
    sd = np.sqrt(np.maximum(ndi.gaussian_filter(near * near, s3) - mean * mean, 0.0))
    # vitreous-like: water (≈ 10 HU), unlike muscle (≈ 50) or fat (≈ −100)
    water = np.exp(-(((mean - 12.0) / 20.0) ** 2))
    score = np.where((sd < 35.0) & body[box], resp * water, 0.0)
    peak = (score == ndi.maximum_filter(score, size=5)) & (score > 0)
    idx = np.argwhere(peak)
    if idx.size == 0:
        return []
    vals = score[tuple(idx.T)]
    order = np.argsort(vals)[::-1][:n]
    off = np.array([b.start for b in box])
    mul = np.array([1, step, step])
    return [(tuple(int(x) for x in idx[o] * mul + off), float(vals[o])) for o in order]


def bbox_of(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box (slices per axis) of a bool mask, or None if empty."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _find_globes(grid: CoarseGrid, body: np.ndarray, hull: SkeletonHull,
                 st: EnvelopeSettings, nose: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Both globes: a pair of globe-like blobs (:func:`_globe_candidates`) at the face.

    Each lies at most ``globe_max_depth_mm`` inside the hull (the globe sits
    behind the orbital rim, its front often proud of it); the two are
    ``globe_pair_mm`` apart with their axis within 35° of the scanner's
    left–right axis and of similar strength; with a ``nose`` tip, their midpoint
    lies 20–75 mm above it and at most 60 mm behind it (any head pose within
    ±30°). The strongest such pair wins. Returns ``(right, left)`` centres in
    LPS mm, or None.
    """
    found = _globe_candidates(grid, body, st)
    if not found:
        return None
    pts = np.array([grid.lps(*c) for c, _ in found])
    deep = hull.contains(pts, inset_mm=st.globe_max_depth_mm)
    cands = [(p, v) for p, (_, v), d in zip(pts, found, deep) if not d]
    best, best_v = None, 0.0
    lo, hi = st.globe_pair_mm
    for a in range(len(cands)):
        for b in range(a + 1, len(cands)):
            pa, va = cands[a]
            pb, vb = cands[b]
            d = pb - pa
            dist = float(np.linalg.norm(d))
            if not lo <= dist <= hi or abs(d[0]) < np.cos(np.radians(35.0)) * dist:
                continue
            if min(va, vb) < 0.4 * max(va, vb):
                continue
            if nose is not None:
                rel = (pa + pb) / 2.0 - nose
                if not (20.0 <= rel[2] <= 75.0 and -10.0 <= rel[1] <= 60.0):
                    continue
            if va + vb > best_v:
                best, best_v = ((pa, pb) if pa[0] < pb[0] else (pb, pa)), va + vb
    return best


def _nose_without_globes(grid: CoarseGrid, body: np.ndarray, hull: SkeletonHull,
                         proud: np.ndarray) -> np.ndarray | None:
    """Nose tip when no globes were found: the most protruding point of ``proud`` (soft
    tissue ≥ 10 mm outside the hull) in the body's front third (scanner −y), within
    25 mm of the body's left–right centre and above its lowest fifth (not the neck)."""
    if len(proud) == 0:
        return None
    b_idx = np.argwhere(body[:, ::2, ::2]) * np.array([1, 2, 2])
    pts = grid.lps(*b_idx.T)
    x_mid = float(np.median(pts[:, 0]))
    ok = proud[:, 1] <= float(np.percentile(pts[:, 1], 35))
    ok &= np.abs(proud[:, 0] - x_mid) <= 25.0
    ok &= proud[:, 2] >= float(np.percentile(pts[:, 2], 20))
    if not ok.any():
        return None
    cand = proud[ok]
    return cand[int(np.argmax(hull.distance_outside(cand)))]


def _plastic_devices(grid: CoarseGrid, stack: SliceStack, hull: SkeletonHull, inside: np.ndarray,
                     st: EnvelopeSettings, body: np.ndarray) -> np.ndarray:
    """Couches, head holders and frames: dense material (≥ ``device_hu``) outside the skeleton
    whose connected piece reaches ≥ ``device_reach_mm`` outside the hull (no patient tissue
    that dense lies that far from the skull: cartilage of the nose and ears is closer).

    The skin's own rim is no bridge between a device and the face: with a sharp (bone)
    kernel, edge enhancement and noise lift the body's outermost voxels above ``device_hu``
    all round the head, and a holder touching the skin anywhere then took that whole rim,
    face included, for itself (a domain head kept 38 % of its face so). The pieces are
    therefore found without the *skin rim*: voxels of ``body`` below the bone threshold
    next to air (≤ the body threshold) on the one side and to soft tissue lying deeper
    (−200 HU to ``device_hu``, not next to air) on the other — a holder's own edge faces
    air or the partial-volume gap, not soft tissue. The pieces found are grown back three
    voxels in-plane through dense material (a holder's rim, the contact with the skin).
    """
    dense = (grid.hu >= st.device_hu) & ~inside
    if not dense.any():
        return dense
    square = np.ones((1, 3, 3), bool)
    near_air = in_slabs(ndi.binary_dilation, grid.hu <= st.body_threshold_hu, 0, structure=square)
    deep_soft = (grid.hu > -200.0) & (grid.hu < st.device_hu) & ~near_air
    rim = (body & (grid.hu < st.bone_threshold_hu) & near_air
           & in_slabs(ndi.binary_dilation, deep_soft, 0, structure=square))
    lab, n = ndi.label(dense & ~rim, structure=np.ones((3, 3, 3), bool))
    # per piece, its voxels at the extremes of each axis: the farthest from the skull is one
    objs = ndi.find_objects(lab)
    ids = []
    for c, box in enumerate(objs, start=1):
        if box is None:
            continue
        sub = lab[box] == c
        idx = np.argwhere(sub)
        ext = np.concatenate([idx[np.argmin(idx, axis=0)], idx[np.argmax(idx, axis=0)]])
        ext += np.array([b.start for b in box])
        if hull.distance_outside(grid.lps(*ext.T)).max() >= st.device_reach_mm:
            ids.append(c)
    if not ids:
        return dense & False
    return ndi.binary_dilation(np.isin(lab, ids), structure=square, iterations=3, mask=dense)


def _thin_flaps(grid: CoarseGrid, stack: SliceStack, body: np.ndarray, ears: FaceZone,
                st: EnvelopeSettings, avoid: np.ndarray | None = None) -> np.ndarray:
    """The body's thin flaps (auricles): gone after an opening of ``ear_flap_mm``, grown
    back by one voxel; computed in the bounding box of each ear part only (one thread
    per ear: the distance transforms release the GIL).

    Also an auricle that :func:`_body_mask` left out (its thin root cut by the opening,
    so it stands apart from the body in the coarse grid): a connected piece of soft
    tissue (above the body threshold, below ``SOFT_MAX_HU``, not in ``avoid``: the rims of
    devices, :func:`_device_rims`) of ``ear_min_ml``–``ear_max_ml`` that touches the body,
    where it is part of a flap (a larger piece is a pad or a holder's shell of
    soft-tissue density, and stays). Such voxels are in the result but not in ``body``:
    the caller adds them to it.
    """
    loose = None
    if st.ear_max_ml > 0:
        # soft tissue next to the body but not in it, in pieces of at most ear_max_ml: a pad
        # or a holder's shell of soft-tissue density is one larger piece and stays
        soft = (grid.hu > st.body_threshold_hu) & (grid.hu < SOFT_MAX_HU) & ~body
        if avoid is not None:
            soft &= ~avoid
        lab, n = ndi.label(soft, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes = np.bincount(lab.ravel(), minlength=n + 1) * (float(np.prod(grid.spacing_mm)) / 1000.0)
            ok = np.zeros(n + 1, bool)
            ok[np.unique(lab[in_slabs(ndi.binary_dilation, body, 1, iterations=1) & soft])] = True
            ok &= (sizes >= st.ear_min_ml) & (sizes <= st.ear_max_ml)
            ok[0] = False
            loose = ok[lab] if ok.any() else None
    reach = body if loose is None else body | loose

    def flaps(planes: np.ndarray, name: str) -> np.ndarray | None:
        where = _zone_coarse(grid, stack, FaceZone([planes], [name]), None) & reach
        box = bbox_of(where)
        return None if box is None else _flaps_in_box(grid, body, box, st, loose)

    thin = np.zeros(body.shape, bool)
    with ThreadPoolExecutor(max_workers=2) as workers:
        for part in workers.map(flaps, ears.parts, ears.names):
            if part is not None:
                thin |= part
    return thin


def _device_rims(volume: Volume, grid: CoarseGrid, body: np.ndarray, st: EnvelopeSettings
                 ) -> np.ndarray:
    """Coarse voxels beside (one voxel) dense material outside the body: coarse voxels at
    ``SOFT_MAX_HU`` or more, and native pixels of a device (a rail's 300-400 HU core) that the
    coarse grid's mean smears to soft-tissue values (at least 1.5 pixels ≥ ``device_pixel_hu``
    in a coarse voxel, half of one where a coarse voxel is one pixel). A rail's partial-volume
    edge is as soft as skin: these voxels are never taken for an auricle."""
    px = _dense_share(volume, grid, st.device_pixel_hu, st)
    dense = (grid.hu >= SOFT_MAX_HU) | (px * (grid.f * grid.f) >= (1.5 if grid.f > 1 else 0.5))
    return in_slabs(ndi.binary_dilation, dense & ~body, 1, iterations=1)


def _flap_pieces(grid: CoarseGrid, mask: np.ndarray, st: EnvelopeSettings
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flaps of ``mask`` (gone after an opening by a ball of radius ``ear_flap_mm``):
    their labels, and every label's volume (mL)."""
    core = ndi.distance_transform_edt(mask, sampling=grid.spacing_mm) > st.ear_flap_mm
    opened = ndi.distance_transform_edt(~core, sampling=grid.spacing_mm) <= st.ear_flap_mm
    lab, n = ndi.label(mask & ~opened, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * (float(np.prod(grid.spacing_mm)) / 1000.0)
    sizes[0] = 0.0
    return lab, sizes, np.arange(n + 1)


def _flaps_in_box(grid: CoarseGrid, body: np.ndarray, box: tuple[slice, ...],
                  st: EnvelopeSettings, loose: np.ndarray | None = None) -> np.ndarray:
    """:func:`_thin_flaps` in ``box`` (padded so that the opening sees the box's
    surroundings); a full-size bool mask. ``loose``: pieces of soft tissue next to the
    body but not in it; a flap that holds some of them is taken whole."""
    thin = np.zeros(body.shape, bool)
    pad = int(np.ceil(2 * st.ear_flap_mm / min(grid.spacing_mm))) + 2
    box = tuple(slice(max(0, b.start - pad), min(n, b.stop + pad)) for b, n in zip(box, body.shape))
    sub = body[box]
    # an auricle is a flap of a few mL; slivers of skin along the head's outline are not
    lab, sizes, _ = _flap_pieces(grid, sub, st)
    flap = (sizes >= st.ear_min_ml)[lab]
    thin[box] = ndi.binary_dilation(flap, iterations=1) & sub
    if loose is not None and loose[box].any():
        extra = loose[box]
        lab, sizes, ids = _flap_pieces(grid, sub | extra, st)
        has_extra = np.bincount(lab[extra], minlength=ids.size) > 0
        ok = has_extra & (sizes >= st.ear_min_ml)
        ok[0] = False
        thin[box] |= ok[lab]
    return thin


def _head_axes(globes: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Rows: head Left, Posterior, Superior (LPS unit vectors)."""
    left = np.array([1.0, 0.0, 0.0]) if globes is None else globes[1] - globes[0]
    left /= np.linalg.norm(left)
    sup = np.array([0.0, 0.0, 1.0])
    sup = sup - (sup @ left) * left
    sup /= np.linalg.norm(sup)
    post = np.cross(sup, left)
    return np.stack([left, post, sup])


def find_envelope(volume: Volume, settings: EnvelopeSettings | None = None) -> Envelope:
    """Find the skeleton hull, the body, the facial landmarks and the face zone of ``volume``.

    See the module docstring. Never raises for unusual anatomy: the result says
    ``face_found=False`` with a reason instead.
    """
    st = settings or EnvelopeSettings()
    # a second thread grows the hull (for the protrusion and face-volume thresholds)
    # while this one looks for devices, globes and ears
    with ThreadPoolExecutor(max_workers=1) as side:
        return _find_envelope(volume, st, side)


def _find_envelope(volume: Volume, st: EnvelopeSettings, side: ThreadPoolExecutor) -> Envelope:
    t0 = time.perf_counter()
    grid = coarse_grid(volume, st.grid_mm)
    stack = SliceStack.of(volume)
    empty = np.zeros(grid.hu.shape, bool)
    lm = Landmarks()
    devices = empty
    plastic = exterior = cast_coarse = None
    casts: dict[int, tuple[slice, slice, np.ndarray]] = {}

    def result(body, hull, inside, zone, found, reason, face_ml=0.0, thin=None) -> Envelope:
        env = Envelope(grid=grid, stack=stack, body=body, devices=devices, hull=hull,
                       inside=inside, landmarks=lm, zone=zone, face_found=found,
                       reason=reason, face_ml=round(face_ml, 2),
                       seconds=round(time.perf_counter() - t0, 3), settings=st, thin=thin,
                       plastic=plastic, casts=casts, cast_coarse=cast_coarse)
        if exterior is not None:  # computed for the shell test: the same as the property's
            env._exterior_cache = exterior
        return env

    body, devices = _body_mask(grid, st.body_threshold_hu)
    hard = empty  # rims of bright devices (rails, holders): never the patient's
    if not body.any():
        return result(empty, None, empty, None, False,
                      "no body in the field of view (nothing above -500 HU)")
    voxel_ml = float(np.prod(grid.spacing_mm)) / 1000.0
    bone, other = _bone_and_rails(grid, body, st, voxel_ml)
    clean = _without_streaks(grid, bone)  # (the hull's points: not a metal streak's)
    plastic, exterior, casts, cast_coarse = _surface_plastic(volume, grid, stack, bone, clean,
                                                             st)
    bone &= ~plastic
    clean &= ~plastic
    devices_outside, body_with_other, device = devices, body.copy(), empty
    if other.any():  # bright material that is not bone (rails pressed to an ear): not body
        near_other = in_slabs(ndi.binary_dilation, other, 1, iterations=1)
        body &= ~near_other
        devices = devices | near_other
        hard = hard | near_other
    if not bone.any():
        return result(body, None, empty, None, False,
                      "no bone in the field of view: the facial skeleton cannot be found")
    hull = SkeletonHull.of_points(_hull_points(grid, clean), st.hull_margin_mm)
    if hull is None:
        return result(body, None, empty, None, False,
                      "the bone in the field of view is flat or tiny: no facial skeleton")
    inside = _inside_coarse(grid, stack, hull)
    # the depth below which soft tissue is the skeleton's partial-volume rim: the margin,
    # at coarse resolution (a voxel of 5 mm smears bone over its whole width)
    depth = st.face_depth_mm if min(grid.spacing_mm) <= 2.5 else 0.0
    grown_protrusion = side.submit(_grown_inside, inside, grid, st.min_protrusion_mm)
    grown_depth = side.submit(_grown_inside, inside, grid, depth) if depth > 0 else None
    device = _plastic_devices(grid, stack, hull, inside, st, body)
    if device.any():  # a couch, holder or frame the head lies in: neither body nor removable
        near_device = in_slabs(ndi.binary_dilation, device, 1, iterations=1)
        body &= ~near_device
        devices = devices | near_device
        hard = hard | near_device

    soft_out = body & ~inside & (grid.hu > -200.0) & (grid.hu < 200.0)
    proud_idx = np.argwhere(soft_out & ~grown_protrusion.result())
    proud = grid.lps(*proud_idx.T) if proud_idx.size else np.zeros((0, 3))
    globes = _find_globes(grid, body, hull, st)
    lm.axes = _head_axes(globes)
    left, post, sup = lm.axes
    if globes is not None:
        lm.globe_right, lm.globe_left = globes
        lm.anchor = (globes[0] + globes[1]) / 2.0
        # the nose tip: the most protruding point near the midline below the globes
        rel = proud - lm.anchor
        ok = (np.abs(rel @ left) <= 20.0) & (rel @ post <= 0.0)
        ok &= (rel @ sup <= 10.0) & (rel @ sup >= -90.0)
        lm.nose_tip = proud[ok][int(np.argmax(hull.distance_outside(proud[ok])))] if ok.any() else None
        if lm.nose_tip is None:
            lm.notes.append(NO_NOSE_NOTE)
    else:
        lm.nose_tip = _nose_without_globes(grid, body, hull, proud)
    if lm.anchor is None and lm.nose_tip is not None:
        # globe centres lie ≈ 45 mm above and ≈ 30 mm behind the nose tip
        lm.anchor = lm.nose_tip + 45.0 * sup + 30.0 * post
        lm.notes.append("globes not found; the face zone is placed from the nose")
    elif lm.anchor is None:
        env = result(body, hull, inside, None, False,
                     "no face in the field of view: no eyes and no nose-like soft tissue "
                     "in front of the facial skeleton (brain-only or bare-skull scan?)")
        # soft tissue standing ≥ 10 mm proud of the skeleton in the body's front third is
        # what a face is made of: without landmarks, say so rather than "no face"
        if len(proud):
            b_idx = np.argwhere(body[:, ::2, ::2]) * np.array([1, 2, 2])
            front = proud[:, 1] <= float(np.percentile(grid.lps(*b_idx.T)[:, 1], 35))
            front_ml = float(front.sum()) * voxel_ml
            if front_ml >= st.doubtful_ml:
                env.doubtful = True
                env.reason = (f"{front_ml:.0f} mL of soft tissue stands in front of the skeleton "
                              "but no face (eyes, nose) could be located")
        return env

    # menton: the lowest midline bone in front of the ears; with it, the head's pitch
    inferior = -st.zone_inferior_fallback_mm
    b_idx = np.argwhere(bone)
    b_rel = grid.lps(b_idx[:, 0], b_idx[:, 1], b_idx[:, 2]) - lm.anchor
    # (the chin lies within P −75 to 50 mm for any pitch within ±35°)
    mid = (np.abs(b_rel @ left) <= 15.0) & (b_rel @ post <= 50.0) & (b_rel @ post >= -75.0)
    if mid.any():
        # the face's front profile, not the spine or hyoid below and behind the chin
        chin = _chin_profile(b_rel[mid] @ post, b_rel[mid] @ sup)
        if chin is None:  # no bone 30 mm below the globes: the field of view ends above
            chin = np.ones(int(mid.sum()), bool)
        s_mid = b_rel[mid][chin] @ sup
        low = float(s_mid.min())
        body_idx = np.argwhere(body[:, ::2, ::2]) * np.array([1, 2, 2])
        below_fov = float(((grid.lps(*body_idx.T) - lm.anchor) @ sup).min())
        if low < -80.0 and low - below_fov > 5.0:
            lm.menton = lm.anchor + b_rel[mid][chin][int(np.argmin(s_mid))]
        elif low - below_fov <= 5.0:
            inferior = -np.inf  # the face continues below the field of view
            lm.notes.append("the face is cut by the lower edge of the field of view")
    pitch = None
    if lm.menton is not None and globes is not None:
        # globes → menton leans ``menton_angle_deg`` forward on an upright head; more
        # (chin back) is flexion, less is extension
        v = lm.menton - lm.anchor
        pitch = np.degrees(np.arctan2(v @ post, -(v @ sup))) - st.menton_angle_deg
    elif globes is not None:
        # no mandible: the skull's top (when in the field of view) leans back from the
        # globes by ``vertex_angle_deg``; on a round vault the top point slides as the
        # head turns, so the lean changes only by 1/``vertex_gain`` of the pitch
        top_s = hull.vertices @ sup
        fov_top = float(grid.lps(*np.array(grid.hu.shape) - 1) @ sup)
        fov_top = max(fov_top, float(grid.lps(0, 0, 0) @ sup))
        if fov_top - float(top_s.max()) > 5.0:
            crown = hull.vertices[top_s >= top_s.max() - 10.0].mean(axis=0) - lm.anchor
            lean = np.degrees(np.arctan2(crown @ post, crown @ sup))
            pitch = (st.vertex_angle_deg - lean) * st.vertex_gain
    if pitch is not None:
        # turn the head's axes with the pitch (+: chin down, flexion)
        lm.pitch_deg = float(np.clip(pitch, -st.max_pitch_deg, st.max_pitch_deg))
        c, s_ = np.cos(np.radians(lm.pitch_deg)), np.sin(np.radians(lm.pitch_deg))
        post, sup = c * post + s_ * sup, c * sup - s_ * post
        lm.axes = np.stack([left, post, sup])
    if lm.menton is not None:
        inferior = float((lm.menton - lm.anchor) @ sup) - st.zone_below_menton_mm

    def plane(normal: np.ndarray, limit: float) -> np.ndarray:
        """Half-space ``normal · (x − anchor) <= limit``."""
        return np.append(normal, -(normal @ lm.anchor) - limit)

    # behind the cheeks the face narrows downwards: in front of the tragus at the ear canals'
    # level, in front of the angle of the mandible 80 mm lower (not the neck behind them)
    slope = st.zone_posterior_slope
    jaw = post - slope * sup
    jaw /= np.linalg.norm(jaw)
    face = [plane(post, st.zone_posterior_mm), plane(sup, st.zone_superior_mm),
            plane(jaw, (st.zone_posterior_mm + slope * 10.0) / float(np.hypot(1.0, slope)))]
    if np.isfinite(inferior):
        face.append(plane(-sup, -inferior))
    ears = [np.array([plane(post, st.ear_posterior_mm), plane(sup, st.ear_superior_mm),
                      plane(-sup, st.ear_inferior_mm), plane(-side * left, -st.ear_lateral_mm)])
            for side in (-1.0, 1.0)]
    zone = FaceZone([np.array(face), *ears], ["face", "right ear", "left ear"])
    if other.any():
        # a shell on the face that the skin's partial volume did not join to the skull is no
        # device either: it and the skin under it are the face's (a cast of it)
        if exterior is None:
            exterior = _exterior_coarse(grid, st.body_threshold_hu)
        face_part = FaceZone([np.array(face)], ["face"])
        shells = _face_shells(volume, grid, stack, other, exterior, face_part, lm, st)
        if shells.any():
            # the shell's thin parts, which the body's opening left outside the body: the
            # tissue outside it connected to the shell, in the face zone
            lab, _ = ndi.label(devices_outside | shells, structure=np.ones((3, 3, 3), bool))
            ids = np.unique(lab[shells])
            cast = np.isin(lab, ids[ids > 0]) & _zone_coarse(grid, stack, face_part, None)
            kept = in_slabs(ndi.binary_dilation, (other | device) & ~cast, 1, iterations=1)
            released = in_slabs(ndi.binary_dilation, cast, 1, iterations=1) & ~kept
            body = body | (released & body_with_other) | cast
            devices = (devices_outside & ~cast) | kept
            hard = (hard & ~released) | kept
            plastic = plastic | cast
    if st.ear_max_ml > 0:
        hard = hard | _device_rims(volume, grid, body, st)
    thin = _thin_flaps(grid, stack, body, FaceZone(ears, ["right ear", "left ear"]), st, avoid=hard)
    cut_off = thin & ~body  # auricles the body's opening had cut off: the patient's after all
    if cut_off.any():
        body = body | cut_off
        devices = devices & ~cut_off
    env = result(body, hull, inside, zone, True, "", thin=thin)
    proud = soft_out & env.zone_coarse
    if grown_depth is not None:
        proud &= ~grown_depth.result()
    env.face_ml = round(float(proud.sum()) * voxel_ml, 2)
    if env.face_ml < st.min_face_ml and globes is not None:
        # eyes, and a face thinner than a few coarse voxels (a coarse series smears the skin
        # into air): count every voxel of the body outside the skeleton in the zone
        thin_face_ml = float((body & ~inside & env.zone_coarse).sum()) * voxel_ml
        if thin_face_ml >= st.min_face_ml:
            env.face_ml = round(thin_face_ml, 2)
    if env.face_ml < st.min_face_ml:
        env.face_found = False
        env.reason = (f"no facial soft tissue: only {env.face_ml:.1f} mL stands "
                      f"≥ {depth:g} mm proud of the skeleton (bare skull or phantom?)")
        if globes is not None:  # eyes, yet no face around them: do not call it "no face"
            env.doubtful = True
            env.reason = ("eyes were found but hardly any soft tissue in front of the skeleton "
                          f"({env.face_ml:.1f} mL): the face could not be delimited")
    env.seconds = round(time.perf_counter() - t0, 3)
    return env
