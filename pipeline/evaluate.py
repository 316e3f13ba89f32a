"""Independent figures of a face removal: what changed inside and outside the skeleton.

These are the measures a reviewer would take on a defaced CT, computed from the
input and the output alone and on the native voxels, without the defacer's own
envelope (:mod:`pipeline.envelope`), so that they can catch it out:

* the **facial skeleton** is the convex hull of the patient's bone (≥ 300 HU)
  at native resolution: the connected bone pieces of at least ``min_piece_ml``
  that lie mostly ≥ 3 mm inside the patient, and every smaller piece within
  ``near_mm`` of them (not the head holder's rails a patient's ear rests on,
  which are bright too);
* **inside changed** = of the soft tissue (−200…200 HU) inside that hull shrunk
  by 3 mm, the percentage whose value changed (overall and on the worst slice);
* **outside removed** = of the patient's soft tissue more than 3 mm outside the
  hull, in a region the caller names (the face's slices, anterior to a coronal
  plane), the percentage changed;
* **outside the body changed** = voxels changed that were at or below −500 HU
  (air, pads) or do not belong to the patient (the largest connected component
  above −500 HU);
* **bone Dice** at 300 and 150 HU.

Array conventions as :class:`pipeline.volume.Volume` (``hu[k, j, i]``, LPS mm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .envelope import (
    SkeletonHull,
    SliceStack,
    halfspace_row_spans,
    outline_pixels,
    polygon_row_spans,
)
from .volume import Volume

__all__ = ["REALCT_FACE_REGIONS", "LabelledRemoval", "RemovalFigures", "face_region_mask",
           "labelled_removal", "native_skeleton_hull", "removal_figures"]

#: Where "outside removed" is counted on the shared real CT (``../shared/realct/``): the
#: ``ge-head-ct`` face's slices are its 14 slices of 4 mm (nose, orbits, ears; the 7 mm slices
#: above hold the vault), anterior to a coronal plane 12 mm behind the ear canals (LPS
#: y ≤ 0 mm; the canals lie at y ≈ −12 mm, measured on the images), so the auricles count
#: and the scalp behind them does not.
REALCT_FACE_REGIONS: dict[str, dict[str, Any]] = {
    "ge-head-ct": {"slices": (0, 14), "max_y_mm": 0.0},
}

SOFT_HU = (-200.0, 200.0)


@dataclass
class RemovalFigures:
    """See the module docstring; percentages 0–100, voxels, mL."""

    inside_soft_voxels: int
    inside_soft_changed_pct: float
    inside_soft_changed_pct_worst_slice: float
    outside_soft_voxels: int
    outside_soft_removed_pct: float
    outside_body_changed_voxels: int
    bone_dice_300: float
    bone_dice_150: float
    changed_voxels: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def face_region_mask(volume: Volume, slices: tuple[int, int], max_y_mm: float) -> np.ndarray:
    """Bool mask: native slices ``slices`` (start, stop), pixels with LPS y ≤ ``max_y_mm``."""
    st = SliceStack.of(volume)
    nk, nj, ni = volume.hu.shape
    dj, di = st.pixel_mm
    region = np.zeros(volume.hu.shape, bool)
    jj, ii = np.arange(nj)[:, None], np.arange(ni)[None, :]
    for k in range(slices[0], min(slices[1], nk)):
        y = st.origins[k][1] + jj * dj * st.col[1] + ii * di * st.row[1]
        region[k] = y <= max_y_mm
    return region


def _patient(hu: np.ndarray) -> np.ndarray:
    """Largest 26-connected component above −500 HU."""
    lab, n = ndi.label(hu > -500, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def native_skeleton_hull(volume: Volume, *, bone_hu: float = 300.0, min_piece_ml: float = 2.0,
                         near_mm: float = 10.0) -> SkeletonHull | None:
    """Convex hull (LPS mm) of the patient's bone at native resolution (see module docstring)."""
    st = SliceStack.of(volume)
    bone = volume.hu >= bone_hu
    lab, n = ndi.label(bone, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return None
    vox_ml = volume.slice_voxel_volumes_ml()
    sizes = ndi.sum_labels(np.broadcast_to(vox_ml[:, None, None], bone.shape), lab,
                           np.arange(n + 1))
    dj, di = st.pixel_mm
    # bone lies inside the patient: a piece mostly outside or at its surface is a device
    patient = _patient(volume.hu)
    r3 = max(1, int(round(3.0 / min(dj, di))))
    deep = np.stack([ndi.binary_erosion(p, iterations=r3) for p in patient])
    frac = ndi.sum_labels(deep, lab, np.arange(n + 1)) / np.maximum(
        np.bincount(lab.ravel(), minlength=n + 1), 1)
    big = (sizes >= min_piece_ml) & (frac >= 0.5)
    big[0] = False
    if not big.any():
        return None
    reach = max(1, int(round(near_mm / min(dj, di))))
    # proximity in-plane (by slices): cheap and enough to tell rails from fragments
    near = np.zeros(bone.shape, bool)
    big_mask = big[lab]
    for k in range(bone.shape[0]):
        if big_mask[max(0, k - 1):k + 2].any():
            near[k] = ndi.binary_dilation(big_mask[max(0, k - 1):k + 2].any(axis=0),
                                          iterations=reach)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(lab[near & bone])] = True
    keep &= sizes >= 0.01
    keep[0] = False
    mask = keep[lab]
    pts = []
    for k in range(mask.shape[0]):
        idx = outline_pixels(mask[k])
        if not idx.size:
            continue
        jj, ii = idx[:, 0].astype(float), idx[:, 1].astype(float)
        p = st.origins[k] + np.outer(ii * di, st.row) + np.outer(jj * dj, st.col)
        pts.append(p)
    return SkeletonHull.of_points(np.concatenate(pts), 0.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _hull_masks(volume: Volume, hull: SkeletonHull | None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (shape of ``volume.hu``): inside ``hull`` shrunk by 3 mm, and more than
    3 mm outside it (with no hull: nothing inside, everything outside)."""
    st = SliceStack.of(volume)
    nk, nj, ni = volume.hu.shape
    dj, di = st.pixel_mm
    rows = np.arange(nj)
    cols = np.arange(ni)[None, :]
    inside3 = np.zeros(volume.hu.shape, bool)
    outside3 = np.ones(volume.hu.shape, bool)
    if hull is not None:
        grown = hull.grown(3.0)
        for k in range(nk):
            o = st.origins[k]
            lo, hi = halfspace_row_spans(hull.equations, o, st.row, st.col, rows, dj, di, ni, 3.0)
            inside3[k] = (cols >= lo[:, None]) & (cols <= hi[:, None])
            lo, hi = polygon_row_spans(grown.plane_polygon(o, st.row, st.col, st.normal),
                                       rows, dj, di)
            outside3[k] = ~((cols >= lo[:, None]) & (cols <= hi[:, None]))
    return inside3, outside3


def removal_figures(volume: Volume, out_hu: np.ndarray, *, hull: SkeletonHull | None = None,
                    region: np.ndarray | None = None) -> RemovalFigures:
    """Figures of the change from ``volume.hu`` to ``out_hu`` (see module docstring).

    ``hull``: the skeleton (default :func:`native_skeleton_hull`); ``region``:
    bool mask (shape of ``hu``) where "outside removed" is counted (default:
    every voxel).
    """
    hu = volume.hu
    hull = hull or native_skeleton_hull(volume)
    changed = out_hu != hu
    patient = _patient(hu)
    soft = (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1])
    nk = hu.shape[0]
    inside3, outside3 = _hull_masks(volume, hull)
    ins = soft & inside3
    n_in = int(ins.sum())
    in_pct = 100.0 * int((ins & changed).sum()) / n_in if n_in else 0.0
    worst = 0.0
    for k in range(nk):
        d = int(ins[k].sum())
        if d:
            worst = max(worst, 100.0 * int((ins[k] & changed[k]).sum()) / d)
    outs = soft & outside3 & patient
    if region is not None:
        outs &= region
    n_out = int(outs.sum())
    out_pct = 100.0 * int((outs & changed).sum()) / n_out if n_out else 0.0
    bad = changed & ((hu <= -500) | ~patient)
    return RemovalFigures(
        inside_soft_voxels=n_in, inside_soft_changed_pct=round(in_pct, 4),
        inside_soft_changed_pct_worst_slice=round(worst, 4), outside_soft_voxels=n_out,
        outside_soft_removed_pct=round(out_pct, 3), outside_body_changed_voxels=int(bad.sum()),
        bone_dice_300=_dice(hu >= 300, out_hu >= 300), bone_dice_150=_dice(hu >= 150, out_hu >= 150),
        changed_voxels=int(changed.sum()))


@dataclass
class LabelledRemoval:
    """What a face removal did to the soft tissue of one class's labelled boxes (see
    :func:`labelled_removal`): voxels, percentages 0–100."""

    boxes: int
    soft_voxels: int
    removed_pct: float | None
    boxes_counted: int
    boxes_removed_90: int
    worst_box_removed_pct: float | None
    per_box: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def labelled_removal(volume: Volume, out_hu: np.ndarray,
                     boxes: dict[int, list[tuple[str, int, int, int, int]]], *,
                     hull: SkeletonHull | None = None, min_voxels: int = 50) -> dict[str, LabelledRemoval]:
    """Per labelled class: how much of the patient's soft tissue (−200…200 HU) more than 3 mm
    outside the facial skeleton (:func:`native_skeleton_hull`) *inside that class's labelled
    boxes* the change from ``volume.hu`` to ``out_hu`` removed — i.e. whether the auricles, the
    external nose and the lids a labeller drew are gone, whatever boxes a detector drew.

    ``boxes``: ``{k: [(class, i0, j0, i1, j1), …]}``, native pixel boxes (column ``i``, row
    ``j``, exclusive ends) on slice ``k`` of ``volume.hu[k, j, i]`` (the format of
    :class:`pipeline.real_labels.RealLabels.slices`). Per box: slice, class, soft voxels there
    and the percentage changed; a box counts towards ``boxes_removed_90`` and
    ``worst_box_removed_pct`` when it holds at least ``min_voxels`` such voxels (a globe's box
    holds almost none outside the skeleton: its lids are thin). Raises ``ValueError`` on a box
    outside the volume.
    """
    hu = volume.hu
    if out_hu.shape != hu.shape:
        raise ValueError(f"output shape {out_hu.shape} is not the input's {hu.shape}")
    hull = hull or native_skeleton_hull(volume)
    _, outside3 = _hull_masks(volume, hull)
    tissue = (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1]) & outside3 & _patient(hu)
    changed = out_hu != hu
    nk, nj, ni = hu.shape
    per_class: dict[str, list[dict[str, Any]]] = {}
    for k in sorted(boxes):
        for cls, i0, j0, i1, j1 in boxes[k]:
            if not (0 <= k < nk and 0 <= i0 < i1 <= ni and 0 <= j0 < j1 <= nj):
                raise ValueError(f"box {[cls, i0, j0, i1, j1]} on slice {k} is outside the "
                                 f"volume ({nk} slices of {nj}×{ni})")
            t = tissue[k, j0:j1, i0:i1]
            n = int(t.sum())
            gone = int((t & changed[k, j0:j1, i0:i1]).sum())
            per_class.setdefault(cls, []).append(
                {"slice": int(k), "box": [int(i0), int(j0), int(i1), int(j1)], "soft_voxels": n,
                 "removed_voxels": gone, "removed_pct": round(100.0 * gone / n, 2) if n else None})
    out: dict[str, LabelledRemoval] = {}
    for cls, rows in per_class.items():
        n = sum(r["soft_voxels"] for r in rows)
        gone = sum(r["removed_voxels"] for r in rows)
        counted = [r["removed_pct"] for r in rows if r["soft_voxels"] >= min_voxels]
        out[cls] = LabelledRemoval(
            boxes=len(rows), soft_voxels=n, removed_pct=round(100.0 * gone / n, 2) if n else None,
            boxes_counted=len(counted), boxes_removed_90=sum(p >= 90.0 for p in counted),
            worst_box_removed_pct=min(counted) if counted else None, per_box=rows)
    return out
