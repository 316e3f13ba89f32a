"""Iso-surfaces of a CT volume: skin (≈ −300 HU) and bone (≈ +300 HU).

Every mesh returned here is a :class:`trimesh.Trimesh` whose vertices are in
DICOM patient coordinates (LPS, millimetres), computed with
:meth:`pipeline.volume.Volume.affine`, and whose faces are wound so that face
normals point *outwards* (from high HU towards low HU, i.e. from tissue into
air for the skin).

Pipeline of :func:`iso_surface`: optional crop (``crop_ijk`` in array order
``(k, j, i)``) → optional integer ``stride`` per axis → pad with air so the
surface is closed → marching cubes (scikit-image, ``step_size`` voxels per
cube) → LPS mm → largest connected component → decimation
(fast-simplification) to ``target_faces``.

:func:`face_region_crop` chooses a crop around the anterior part of the head
from the *bone* only, so an original and its de-identified version (same
bone, different soft tissue) are cropped identically. (The rendering chain
uses :func:`pipeline.render.canonical_crop` instead, which is derived from
the bone alignment.)
"""

from __future__ import annotations

import numpy as np
import trimesh
import trimesh.smoothing
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import marching_cubes

from .volume import Volume

__all__ = [
    "BONE_LEVEL_HU",
    "SKIN_LEVEL_HU",
    "SurfaceError",
    "bone_surface",
    "decimate",
    "face_region_crop",
    "iso_surface",
    "largest_component",
    "skin_surface",
    "smooth_mesh",
    "strides_for_resolution",
]

SKIN_LEVEL_HU = -300.0
BONE_LEVEL_HU = 300.0


class SurfaceError(ValueError):
    """A surface could not be extracted (empty volume, level out of range, bad crop...)."""


def _index_to_lps_linear(volume: Volume) -> np.ndarray:
    """3×3 matrix mapping array-order index offsets ``(dk, dj, di)`` to LPS mm."""
    a = volume.affine()
    # affine columns are (i, j, k); marching cubes returns (k, j, i)
    return a[:3, [2, 1, 0]]


def iso_surface(
    volume: Volume,
    level_hu: float,
    *,
    step_size: int = 1,
    target_faces: int | None = None,
    crop_ijk: tuple[slice, slice, slice] | None = None,
    keep_largest: bool = True,
    stride: tuple[int, int, int] = (1, 1, 1),
) -> trimesh.Trimesh:
    """Iso-surface of ``volume.hu`` at ``level_hu`` as a closed, outward-wound LPS-mm mesh.

    Parameters
    ----------
    volume:
        CT volume in HU, ``hu[k, j, i]``.
    level_hu:
        Iso-level in HU; the enclosed region is ``hu > level_hu``.
    step_size:
        Marching-cubes step in voxels (1 = full resolution; 2 is ~4× faster).
    target_faces:
        Decimate to about this many triangles (``None`` = no decimation).
    crop_ijk:
        Optional sub-volume in array order ``(k_slice, j_slice, i_slice)``;
        slices must have step ``None`` or 1. Coordinates stay in the full
        volume's LPS frame.
    keep_largest:
        Keep only the largest connected component (drops table, noise, cavities
        that are not connected to the outer surface).
    stride:
        Sub-sample the (cropped) volume by these integer strides along
        ``(k, j, i)`` before meshing (cheaper than ``step_size`` on big
        volumes, and can differ per axis for anisotropic voxels).

    Returns
    -------
    trimesh.Trimesh with vertices in LPS mm, normals pointing from ``hu > level``
    towards ``hu < level``.
    """
    if step_size < 1:
        raise SurfaceError(f"step_size must be >= 1, got {step_size}")
    if len(stride) != 3 or any(int(st) != st or st < 1 for st in stride):
        raise SurfaceError(f"stride must be three integers >= 1, got {stride}")
    stride_arr = np.asarray(stride, dtype=int)
    if target_faces is not None and target_faces < 4:
        raise SurfaceError(f"target_faces must be >= 4, got {target_faces}")
    start = np.zeros(3, dtype=int)
    sub = volume.hu
    if crop_ijk is not None:
        if len(crop_ijk) != 3:
            raise SurfaceError("crop_ijk must hold three slices in (k, j, i) order")
        idx = []
        for axis, s in enumerate(crop_ijk):
            lo, hi, step = s.indices(volume.hu.shape[axis])
            if step != 1 or hi - lo < 2:
                raise SurfaceError(f"crop along array axis {axis} is empty or strided")
            idx.append(slice(lo, hi))
            start[axis] = lo
        sub = volume.hu[tuple(idx)]
    sub = sub[:: stride_arr[0], :: stride_arr[1], :: stride_arr[2]]
    if min(sub.shape) < 2:
        raise SurfaceError(f"volume too small to mesh after striding: {sub.shape}")
    hu_min, hu_max = float(sub.min()), float(sub.max())
    if not hu_min < level_hu < hu_max:
        raise SurfaceError(
            f"level {level_hu:g} HU is outside the data range [{hu_min:g}, {hu_max:g}] HU: "
            "no surface to extract"
        )
    pad_value = min(-1024.0, level_hu - 1000.0)
    padded = np.full(tuple(n + 2 for n in sub.shape), pad_value, dtype=np.float32)
    padded[1:-1, 1:-1, 1:-1] = sub
    verts, faces, _normals, _values = marching_cubes(
        padded, level=float(level_hu), step_size=int(step_size), allow_degenerate=False
    )
    if len(faces) == 0:
        raise SurfaceError("marching cubes produced no triangles")
    linear = _index_to_lps_linear(volume)
    verts_idx = (verts - 1.0) * stride_arr + start  # undo padding/stride: full-volume (k, j, i)
    origin = np.asarray(volume.origin_lps_mm, dtype=float)
    verts_lps = verts_idx @ linear.T + origin
    faces = faces.astype(np.int64)
    # In its own (k, j, i) index space scikit-image winds faces so that the
    # right-hand-rule normal points into the region above ``level``; a proper
    # (det > 0) index→LPS map keeps that, so flip to point outwards. An
    # improper map (det < 0, e.g. the usual (k, j, i) → (x, y, z) axis swap)
    # mirrors the winding, which already makes it outward.
    if np.linalg.det(linear) > 0:
        faces = faces[:, ::-1]
    mesh = trimesh.Trimesh(vertices=verts_lps, faces=faces, process=False)
    if keep_largest:
        mesh = largest_component(mesh)
    if target_faces is not None and len(mesh.faces) > target_faces:
        mesh = decimate(mesh, target_faces)
    return mesh


def largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Keep the connected component (by shared vertices) with the most faces.

    Vertex coordinates and face winding are unchanged; unused vertices are dropped.
    """
    faces = np.asarray(mesh.faces)
    n_vertices = len(mesh.vertices)
    if len(faces) == 0:
        raise SurfaceError("mesh has no faces")
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)),
                       shape=(n_vertices, n_vertices))
    n_comp, labels = connected_components(graph, directed=False)
    if n_comp == 1:
        return _compact(mesh.vertices, faces)
    face_labels = labels[faces[:, 0]]
    best = int(np.argmax(np.bincount(face_labels, minlength=n_comp)))
    return _compact(mesh.vertices, faces[face_labels == best])


def _compact(vertices: np.ndarray, faces: np.ndarray) -> trimesh.Trimesh:
    used, inverse = np.unique(faces.ravel(), return_inverse=True)
    return trimesh.Trimesh(vertices=np.asarray(vertices)[used],
                           faces=inverse.reshape(-1, 3), process=False)


def decimate(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast-simplification) to about ``target_faces`` triangles.

    Units and winding are preserved (vertices stay in the input frame, LPS mm
    for meshes of this module).
    """
    import fast_simplification

    n = len(mesh.faces)
    if target_faces >= n:
        return mesh
    verts, faces = fast_simplification.simplify(
        np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64),
        target_count=int(target_faces),
    )
    if len(faces) == 0:
        raise SurfaceError("decimation removed every face")
    return _compact(np.asarray(verts, dtype=float), np.asarray(faces, dtype=np.int64))


def smooth_mesh(mesh: trimesh.Trimesh, iterations: int, *, lamb: float = 0.5,
                nu: float = -0.53) -> trimesh.Trimesh:
    """Taubin λ|μ smoothing (trimesh): removes slice terraces and voxel steps without shrinking.

    Returns a smoothed copy (vertices move, faces and units unchanged);
    ``iterations = 0`` returns the mesh unchanged. Each iteration is one
    shrink (``lamb``) and one inflate (``nu``) step of umbrella Laplacian
    smoothing, so the filtered length grows with ``sqrt(iterations)`` times
    the edge length.
    """
    if iterations < 0:
        raise SurfaceError("iterations must be >= 0")
    if iterations == 0:
        return mesh
    out = trimesh.Trimesh(vertices=np.array(mesh.vertices, dtype=float),
                          faces=np.array(mesh.faces), process=False)
    trimesh.smoothing.filter_taubin(out, lamb=lamb, nu=nu, iterations=int(iterations))
    return out


def skin_surface(
    volume: Volume,
    *,
    level_hu: float = SKIN_LEVEL_HU,
    step_size: int = 1,
    target_faces: int | None = 100_000,
    crop_ijk: tuple[slice, slice, slice] | None = None,
    stride: tuple[int, int, int] = (1, 1, 1),
) -> trimesh.Trimesh:
    """Outer skin surface (air/soft-tissue boundary, default −300 HU), LPS mm, outward normals.

    See :func:`iso_surface` for the parameters; the largest component is kept.
    """
    return iso_surface(volume, level_hu, step_size=step_size, target_faces=target_faces,
                       crop_ijk=crop_ijk, keep_largest=True, stride=stride)


def bone_surface(
    volume: Volume,
    *,
    level_hu: float = BONE_LEVEL_HU,
    step_size: int = 1,
    target_faces: int | None = 100_000,
    crop_ijk: tuple[slice, slice, slice] | None = None,
    keep_largest: bool = False,
    stride: tuple[int, int, int] = (1, 1, 1),
) -> trimesh.Trimesh:
    """Bone surface (default +300 HU), LPS mm, outward normals.

    By default every component is kept (mandible, vertebrae and skull are
    separate pieces). See :func:`iso_surface` for the parameters.
    """
    return iso_surface(volume, level_hu, step_size=step_size, target_faces=target_faces,
                       crop_ijk=crop_ijk, keep_largest=keep_largest, stride=stride)


def strides_for_resolution(volume: Volume, resolution_mm: float = 1.0) -> tuple[int, int, int]:
    """Integer ``(k, j, i)`` strides that bring each voxel axis to about ``resolution_mm``."""
    if resolution_mm <= 0:
        raise SurfaceError("resolution_mm must be positive")
    return tuple(max(1, round(resolution_mm / s)) for s in volume.spacing_mm)  # type: ignore[return-value]


def face_region_crop(
    volume: Volume,
    *,
    bone_threshold_hu: float = BONE_LEVEL_HU,
    keep_fraction: float = 0.7,
    margin_mm: float = 45.0,
) -> tuple[slice, slice, slice]:
    """Array-order crop ``(k, j, i)`` around the anterior part of the head, from the bone only.

    The bone bounding box (``hu >= bone_threshold_hu``) is grown by
    ``margin_mm`` on every side (room for soft tissue, nose, ears) and, along
    the array axis closest to patient Anterior, only the anterior
    ``keep_fraction`` of the bone extent is kept (plus the margin in front).
    Because only bone is used, an original and its de-identified copy (same
    bone) get the same crop.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise SurfaceError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    mask = volume.hu >= bone_threshold_hu
    shape = volume.hu.shape
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present.size == 0:
            raise SurfaceError(f"no voxel at or above {bone_threshold_hu:g} HU: cannot find the head")
        bounds.append([int(present[0]), int(present[-1])])
    ap_axis, ap_sign = volume.axis_towards("A")
    lo, hi = bounds[ap_axis]
    extent = hi - lo
    keep = int(np.ceil(keep_fraction * extent))
    if ap_sign > 0:  # anterior = high index
        bounds[ap_axis] = [hi - keep, hi]
    else:
        bounds[ap_axis] = [lo, lo + keep]
    crop = []
    for axis in range(3):
        m = int(np.ceil(margin_mm / volume.spacing_mm[axis]))
        m_lo = m_hi = m
        if axis == ap_axis and keep_fraction < 1.0:  # no margin behind the cut
            m_lo, m_hi = (0, m) if ap_sign > 0 else (m, 0)
        a = max(0, bounds[axis][0] - m_lo)
        b = min(shape[axis], bounds[axis][1] + m_hi + 1)
        crop.append(slice(a, b))
    return tuple(crop)  # type: ignore[return-value]
