"""Reconstruction attacks: rebuild a face on the skull that a de-identified CT keeps.

Threat model. De-identification (:mod:`pipeline.deface`) removes the face's soft tissue
outside the facial skeleton and keeps all bone — on purpose, for fracture research. An
attacker holding ONLY a de-identified scan (and photographs or scans of candidate people)
does not have to match the bare surface as it is: forensic facial approximation rebuilds a
face on a skull from mean soft-tissue depths at craniometric landmarks, and learned
skull-to-face models do the same from examples. The rebuilt face is then matched against
the candidates. This module implements two such attacks; :mod:`pipeline.reid_features`
renders, embeds and matches their faces exactly like the other probe conditions.

* ``tissue_depth`` (:func:`tissue_depth_field`): craniometric landmarks found on the bone
  (:func:`find_skeleton`: glabella, nasion, rhinion, the orbital rims, zygion, gonion, the
  lip and chin points of the midline profile, the cheeks over the second molars; 37 in all),
  the mean adult soft-tissue depth at each (:data:`TISSUE_DEPTHS_MM`, with its sources),
  spread over the bone surface and applied perpendicular to it (an offset surface by
  distance transform, the computational form of depth pegs and clay strips), the orbits and
  the piriform aperture bridged, and a generic nose placed by the two-tangent rule
  (:func:`nose_landmarks`). Nothing is learned: an attacker with a textbook.
* ``learned`` (:mod:`pipeline.skull_to_face`): a model fitted on synthetic heads that maps
  the bone's radial map to the skin's.

Both produce a skin field on a canonical grid (:class:`CanonicalGrid`, the frame of
:mod:`pipeline.align`, computed from the de-identified bone alone); :func:`paint_skin`
writes it into the de-identified volume as soft tissue with a partial-volume edge, only
where the scan holds air — the attacker's "re-faced" CT, which then goes through the same
skin surface, smoothing, rendering and matching chain as every other condition.

Units: canonical mm (≈ mm; depths in mm are scaled by the alignment's scale), HU. Arrays on
the canonical grid are ``[z, y, x]``; x → subject Left, y → Posterior, z → Superior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from .canonical_face import (
    CanonicalGrid,
    ReconstructionError,
    bone_mask,
    canonical_to_index,
    frontal_map,
    harmonic_fill,
    outermost_crossing,
    resample_canonical,
)
from .skull_to_face import load_model
from .volume import Volume

__all__ = [
    "ATTACKS",
    "LANDMARK_NAMES",
    "TISSUE_DEPTHS_MM",
    "CanonicalGrid",
    "Reconstruction",
    "ReconstructionError",
    "Skeleton",
    "bone_mask",
    "canonical_to_index",
    "find_skeleton",
    "frontal_map",
    "landmark_depth_mm",
    "nose_landmarks",
    "nose_sdf",
    "outermost_crossing",
    "paint_skin",
    "reconstruct",
    "resample_canonical",
    "tissue_depth_field",
]


# --------------------------------------------------------------------------- tissue depths

#: Mean adult facial soft-tissue depths (mm) at craniometric landmarks, perpendicular to the
#: bone. SOURCE, stated honestly: these are rounded (0.5 mm) values representative of the
#: pooled adult means in the published tables, typed from knowledge of the literature while
#: no download was possible — they were NOT transcribed from the papers and are not a
#: substitute for them:
#:
#: * midline and orbital/zygomatic/mandibular landmarks: the "T-Table" of tallied adult
#:   means, C. N. Stephan & E. K. Simpson, "Facial soft tissue depths in craniofacial
#:   identification (part I): an analytical review of the published adult data",
#:   J. Forensic Sci. 53(6):1257–1272 (2008), and its update, C. N. Stephan, "The application
#:   of the central limit theorem and the law of large numbers to facial soft tissue depths:
#:   T-Table robustness and trends since 2008", J. Forensic Sci. 59(2):454–462 (2014);
#: * the buccal points over the second molars (supra-M2, occlusal line, sub-M2), the
#:   supraglenoid and lateral-orbit points: the tables of J. S. Rhine & C. E. Moore,
#:   "Tables of facial tissue thickness of American Caucasoids in forensic anthropology",
#:   Maxwell Museum Technical Series 1 (1984) (normal build; continuing Rhine & Campbell 1980).
#:
#: The values that matter most for this study are the differences between subjects, which
#: come from the bone: a constant error in this table moves every reconstruction alike, and
#: the matchers compare cohort-centred faces.
TISSUE_DEPTHS_MM: dict[str, float] = {
    # midline
    "supraglabella": 4.5,
    "glabella": 5.5,
    "nasion": 6.5,
    "rhinion": 3.0,
    "subspinale": 12.0,  # subnasale region (A point)
    "mid_philtrum": 12.0,
    "labrale_superius": 12.5,
    "labrale_inferius": 13.5,
    "supramentale": 11.0,  # mentolabial sulcus (B point)
    "pogonion": 11.0,
    "gnathion": 8.0,
    "menton": 7.0,
    "prosthion": 12.0,
    # bilateral (suffix _r / _l)
    "frontal_eminence": 4.5,
    "supraorbital": 6.5,
    "infraorbital": 6.0,
    "lateral_orbit": 8.5,
    "inferior_malar": 10.0,
    "zygion": 6.5,
    "mid_masseter": 18.5,
    "gonion": 13.0,
    "mid_mandibular": 9.5,
    "supra_m2": 22.0,
    "occlusal": 19.5,
    "sub_m2": 17.5,
}
_BILATERAL = ("frontal_eminence", "supraorbital", "infraorbital", "lateral_orbit",
              "inferior_malar", "zygion", "mid_masseter", "gonion", "mid_mandibular",
              "supra_m2", "occlusal", "sub_m2")
#: Every landmark :func:`find_skeleton` looks for.
LANDMARK_NAMES: tuple[str, ...] = tuple(
    [n for n in TISSUE_DEPTHS_MM if n not in _BILATERAL]
    + [f"{n}_{side}" for n in _BILATERAL for side in ("r", "l")])


def landmark_depth_mm(name: str) -> float:
    """Tissue depth (mm) of a landmark name (bilateral names end in ``_r`` / ``_l``)."""
    base = name[:-2] if name[-2:] in ("_r", "_l") else name
    return TISSUE_DEPTHS_MM[base]


# --------------------------------------------------------------------------- landmarks


def _pit_mask(F: np.ndarray, grid: CanonicalGrid, depth_mm: float = 8.0,
              radius_mm: float = 24.0) -> np.ndarray:
    """Cells of the frontal bone map that lie more than ``depth_mm`` behind its grey closing
    with a disc of ``radius_mm``: holes in the anterior skeleton (orbits, piriform aperture)."""
    from scipy import ndimage as ndi

    sentinel = -(grid.box[3] + 100.0)
    a = np.where(np.isfinite(F), -F, sentinel)
    r = max(1, int(round(radius_mm / grid.step)))
    disc = np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r
    closed = ndi.grey_closing(a, footprint=disc, mode="constant", cval=sentinel)
    # a hole has bone at its back (columns without any bone are gaps, not holes)
    return (closed - a > depth_mm) & (closed > sentinel + 1.0) & np.isfinite(F)


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, float, float, int]]:
    """8-connected components of a 2-D ``[z, x]`` mask: (cells mask, mean row, mean col, n)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    out = []
    for c in range(1, n + 1):
        m = lab == c
        rows, cols = np.nonzero(m)
        out.append((m, float(rows.mean()), float(cols.mean()), int(m.sum())))
    return out


@dataclass
class Skeleton:
    """What the landmark finder saw: the bone on a canonical grid and its frontal map.

    ``bone`` ``[z, y, x]`` mask; ``teeth`` mask (≥ 1800 HU in the jaws); ``front`` ``[z, x]``
    most anterior bone y (NaN: no bone in that column); ``orbits`` (right, left) and
    ``aperture`` ``[z, x]`` masks of the holes of the anterior skeleton; ``front_filled`` the
    frontal map with those holes bridged (a membrane across the orbital rims and the
    piriform aperture); ``points`` the landmarks found (name → canonical point).
    """

    grid: CanonicalGrid
    bone: np.ndarray
    teeth: np.ndarray
    front: np.ndarray
    front_filled: np.ndarray
    orbits: list[np.ndarray]
    aperture: np.ndarray | None
    points: dict[str, np.ndarray]
    missing: list[str]


def _first(seq: np.ndarray) -> int | None:
    idx = np.flatnonzero(seq)
    return int(idx[0]) if idx.size else None


def find_skeleton(hu: np.ndarray, grid: CanonicalGrid, *, bone_hu: float = 200.0,
                  teeth_hu: float = 1800.0) -> Skeleton:
    """Craniometric landmarks on the bone of a canonical-grid volume ``hu`` (``[z, y, x]``).

    Rules (canonical frame: x Left, y Posterior, z Superior; the midline is x = 0):

    * holes of the anterior skeleton (:func:`_pit_mask` of the frontal bone map): the two
      largest lateral ones near the eyes' level are the orbits, the central one below them
      the piriform aperture;
    * midline profile (most anterior bone at |x| ≤ 2 mm): *glabella* its most anterior point
      10–45 mm above the eyes; *nasion* its most posterior point between glabella and the
      aperture; *rhinion* the lowest profile point above the aperture; *subspinale* (A) the
      first point below it; *prosthion* the most anterior point within 25 mm below A;
      *menton* the lowest midline bone below A; *pogonion* the most anterior point within
      25 mm above menton; *supramentale* (B) the most posterior point between pogonion and
      prosthion; the lip points lie at fixed fractions between A and B (mid-philtrum 0.2,
      upper lip 0.4, lower lip 0.75), *gnathion* a third of the way from menton to pogonion;
    * per orbit (at its centroid): *supraorbital*, *infraorbital* and *lateral orbit* are the
      rim cells just above, below and lateral to the hole; *frontal eminence* 28 mm above the
      supraorbital point; *inferior malar* 12 mm below the infraorbital point, 6 mm lateral;
    * *zygion* the most lateral bone 0–30 mm below the infraorbital rim, in front of the
      ear; *gonion* the most posterior-inferior mandibular bone lateral of 25 mm;
      *mid-mandibular* the lowest bone halfway between gonion and menton; *mid-masseter*
      the most lateral ramus bone halfway up from gonion to zygion;
    * the second molars: the posterior third of the teeth (≥ ``teeth_hu``) on each side;
      *supra-M2*, *occlusal* and *sub-M2* the most lateral bone 10 mm above, at and 12 mm
      below their mean level.

    A landmark whose anatomy is not in the field of view (or not found) is left out and
    listed in ``missing``.
    """
    s = grid.step
    xs, ys, zs = grid.xs, grid.ys, grid.zs
    fov = np.isfinite(hu)
    hu = np.where(fov, hu, -1000.0)
    bone = bone_mask(hu, bone_hu)
    front = frontal_map(bone, grid)
    pits = _pit_mask(front, grid)
    pts: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def zi(z: float) -> int:
        return int(np.clip(np.round((z - zs[0]) / s), 0, len(zs) - 1))

    def xi(x: float) -> int:
        return int(np.clip(np.round((x - xs[0]) / s), 0, len(xs) - 1))

    def put(name: str, x: float, y: float, z: float) -> None:
        if np.isfinite(x) and np.isfinite(y) and np.isfinite(z):
            pts[name] = np.array([x, y, z], dtype=float)

    # ---------------------------------------------------------------- orbits and aperture
    # the canonical frame puts the template's pupils at (±31, ·, 0): an orbit is the hole
    # around there, clipped to an ellipse of 24 × 20 mm semi-axes (a canine fossa or a thin
    # sinus wall below it can join the orbit's hole in the map)
    orbits: list[np.ndarray] = []
    orbit_info: list[tuple[float, float] | None] = []
    zz, xx = np.meshgrid(zs, xs, indexing="ij")
    comps = _components(pits)
    for side in (-1, 1):  # -1: subject's right (x < 0)
        ell = ((xx - side * 31.0) / 24.0) ** 2 + (zz / 20.0) ** 2 <= 1.0
        cands = [c[0] & ell for c in comps if (c[0] & ell).sum() * s * s >= 150.0]
        if cands:
            best = max(cands, key=lambda m: m.sum())
            rows, cols = np.nonzero(best)
            orbits.append(best)
            orbit_info.append((float(xs[int(round(cols.mean()))]), float(zs[int(round(rows.mean()))])))
        else:
            orbits.append(np.zeros_like(pits))
            orbit_info.append(None)
    z_eyes = (np.mean([o[1] for o in orbit_info if o is not None])
              if any(o is not None for o in orbit_info) else 0.0)
    central = [c for c in comps if abs(xs[int(round(c[2]))]) < 14.0
               and z_eyes - 80.0 < zs[int(round(c[1]))] < z_eyes + 5.0 and c[3] * s * s >= 60.0]
    aperture = None
    if central:
        aperture = np.zeros_like(pits)
        for c in central:
            aperture |= c[0] & (np.abs(xx) < 22.0)
    holes = np.zeros_like(pits)
    for o in orbits:
        holes |= o
    if aperture is not None:
        holes |= aperture
    front_filled = harmonic_fill(front, holes)
    # across an orbit the membrane is the line from the supraorbital to the infraorbital
    # margin in every column (the cornea lies about on it): the rims' most anterior bone
    # within 10 mm above and below the opening
    n10 = int(round(10.0 / s))
    for o in orbits:
        for c in np.flatnonzero(o.any(axis=0)):
            rows = np.flatnonzero(o[:, c])
            up = front[rows.max() + 1:rows.max() + 1 + n10, c]
            dn = front[max(0, rows.min() - n10):rows.min(), c]
            if not (np.isfinite(up).any() and np.isfinite(dn).any()):
                continue
            k_up = rows.max() + 1 + int(np.nanargmin(up))
            k_dn = max(0, rows.min() - n10) + int(np.nanargmin(dn))
            t = (np.arange(len(zs)) - k_dn) / max(k_up - k_dn, 1)
            line = front[k_dn, c] + t * (front[k_up, c] - front[k_dn, c])
            front_filled[rows, c] = line[rows]

    # ---------------------------------------------------------------- midline profile
    mid = np.abs(xs) <= 2.0 + 1e-6
    with np.errstate(all="ignore"):
        prof = np.where(np.isfinite(front[:, mid]).any(axis=1),
                        np.nanmin(np.where(np.isfinite(front[:, mid]), front[:, mid], np.inf),
                                  axis=1), np.nan)
    in_ap = aperture[:, mid].any(axis=1) if aperture is not None else np.zeros(len(zs), bool)

    def arg_in(z_lo: float, z_hi: float, most_anterior: bool) -> int | None:
        ks = np.flatnonzero((zs >= z_lo) & (zs <= z_hi) & np.isfinite(prof) & ~in_ap)
        if ks.size == 0:
            return None
        v = prof[ks]
        return int(ks[np.argmin(v) if most_anterior else np.argmax(v)])

    ap_rows = np.flatnonzero(in_ap)
    k_ap_top = int(ap_rows.max()) if ap_rows.size else None
    k_ap_bot = int(ap_rows.min()) if ap_rows.size else None
    def fov_near(k: int, y: float) -> bool:
        """Row ``k`` lies in the field of view around the midline profile at depth ``y``."""
        if k < 0:
            return False
        rows = np.abs(ys - y) <= 20.0
        return bool(fov[k][rows][:, mid].all())

    k_n = k_g = None
    if k_ap_top is not None and k_ap_top + 1 < len(zs) and np.isfinite(prof[k_ap_top + 1]):
        put("rhinion", 0.0, prof[k_ap_top + 1], zs[k_ap_top + 1])
    # glabella: the most anterior point of the brow, 8-40 mm above the eyes; nasion: the
    # deepest point of the profile behind its chord from the rhinion to the glabella
    k_g = arg_in(z_eyes + 8.0, z_eyes + 40.0, True)
    if k_g is not None and "rhinion" in pts:
        seg = np.arange(k_ap_top + 1, k_g + 1)
        seg = seg[np.isfinite(prof[seg])]
        if seg.size >= 3:
            z0, z1 = zs[seg[0]], zs[seg[-1]]
            chord = prof[seg[0]] + (prof[seg[-1]] - prof[seg[0]]) * (zs[seg] - z0) / (z1 - z0)
            k_n = int(seg[np.argmax(prof[seg] - chord)])
            put("nasion", 0.0, prof[k_n], zs[k_n])
    if k_g is not None:
        put("glabella", 0.0, prof[k_g], zs[k_g])
        k_sg = zi(zs[k_g] + 12.0)
        if np.isfinite(prof[k_sg]):
            put("supraglabella", 0.0, prof[k_sg], zs[k_sg])
    k_a = None
    y_front = pts["rhinion"][1] if "rhinion" in pts else None
    if k_ap_bot is not None and y_front is not None:
        below = np.flatnonzero(np.isfinite(prof[:k_ap_bot]))
        # the maxilla below the aperture: in the field of view, at most 35 mm behind the
        # nasal bones (else the field of view ends in the nose and this is the skull base)
        if (below.size and k_ap_bot - below[-1] <= 3 and prof[below[-1]] <= y_front + 35.0
                and fov_near(below[-1] - 3, prof[below[-1]])):
            k_a = int(below[-1])
            put("subspinale", 0.0, prof[k_a], zs[k_a])
    k_pr = k_low = k_pog = k_b = None
    if k_a is not None:
        k_pr = arg_in(zs[k_a] - 25.0, zs[k_a] - 2.0, True)
        if k_pr is not None:
            put("prosthion", 0.0, prof[k_pr], zs[k_pr])
        lower = np.flatnonzero(np.isfinite(prof[:k_a]))
        if lower.size and zs[k_a] - zs[int(lower[0])] >= 35.0:
            k_low = int(lower[0])
    if k_low is not None:
        # the lowest midline bone is the menton unless the field of view ends there
        if fov_near(k_low - 3, prof[k_low]):
            put("menton", 0.0, prof[k_low] + 4.0, zs[k_low])
        k_pog = arg_in(zs[k_low] + 4.0, zs[k_low] + 25.0, True)
        if k_pog is not None:
            put("pogonion", 0.0, prof[k_pog], zs[k_pog])
            k_gn = zi(zs[k_low] + (zs[k_pog] - zs[k_low]) / 3.0)
            if "menton" in pts and np.isfinite(prof[k_gn]):
                put("gnathion", 0.0, prof[k_gn] + 2.0, zs[k_gn])
    if k_pog is not None and k_pr is not None:
        k_b = arg_in(zs[k_pog] + 4.0, zs[k_pr] - 10.0, False)
        if k_b is not None:
            put("supramentale", 0.0, prof[k_b], zs[k_b])
    if k_a is not None and k_b is not None:
        for name, f in (("mid_philtrum", 0.2), ("labrale_superius", 0.4),
                        ("labrale_inferius", 0.75)):
            k = zi(zs[k_a] + f * (zs[k_b] - zs[k_a]))
            if np.isfinite(prof[k]):
                put(name, 0.0, prof[k], zs[k])

    # ---------------------------------------------------------------- orbits' rims, cheeks
    teeth = (hu >= teeth_hu) & bone
    for side, o, info in zip(("r", "l"), orbits, orbit_info):
        if o is None or info is None:
            continue
        sg = -1.0 if side == "r" else 1.0
        x_o, z_o = info
        c = xi(x_o)
        rows = np.flatnonzero(o[:, c])
        n10 = int(round(10.0 / s))

        def rim(cells: np.ndarray, along_rows: bool) -> int | None:
            vals = front[cells, c] if along_rows else front[r, cells]
            ok = np.isfinite(vals)
            return int(cells[ok][np.argmin(vals[ok])]) if ok.any() else None

        if rows.size:
            top = rim(np.arange(rows.max() + 1, min(len(zs), rows.max() + 1 + n10)), True)
            bot = rim(np.arange(max(0, rows.min() - n10), rows.min()), True)
            if top is not None:
                put(f"supraorbital_{side}", x_o, front[top, c], zs[top])
                k_fe = zi(zs[top] + 28.0)
                if np.isfinite(front[k_fe, c]):
                    put(f"frontal_eminence_{side}", x_o, front[k_fe, c], zs[k_fe])
            if bot is not None:
                put(f"infraorbital_{side}", x_o, front[bot, c], zs[bot])
                # inferior malar: the most anterior bone 6-18 mm below the rim, from the
                # orbit's centre to 12 mm lateral of it, at most 25 mm behind the rim
                win = ((zz >= zs[bot] - 18.0) & (zz <= zs[bot] - 6.0)
                       & (sg * (xx - x_o) >= -4.0) & (sg * (xx - x_o) <= 12.0)
                       & (front <= front[bot, c] + 25.0))
                if win.any():
                    kk, cc = np.nonzero(win)
                    j = int(np.argmin(front[kk, cc]))
                    put(f"inferior_malar_{side}", xs[cc[j]], front[kk[j], cc[j]], zs[kk[j]])
        r = zi(z_o)
        cols = np.flatnonzero(o[r])
        if cols.size:
            span = (np.arange(cols.max() + 1, min(len(xs), cols.max() + 1 + n10)) if sg > 0
                    else np.arange(max(0, cols.min() - n10), cols.min()))
            lat = rim(span, False) if span.size else None
            if lat is not None:
                put(f"lateral_orbit_{side}", xs[lat], front[r, lat], zs[r])
    # lateral and mandibular landmarks from the bone voxels
    kz, jy, ix = np.nonzero(bone)
    bx, by, bz = xs[ix], ys[jy], zs[kz]
    y_ref = pts["prosthion"][1] if "prosthion" in pts else np.nanmin(front)
    for side in ("r", "l"):
        sg = -1.0 if side == "r" else 1.0
        io = pts.get(f"infraorbital_{side}")
        lo = pts.get(f"lateral_orbit_{side}")
        if io is not None and lo is not None:
            sel = ((sg * bx > 30.0) & (sg * bx < sg * lo[0] + 25.0) & (bz < io[2])
                   & (bz > io[2] - 30.0) & (by > lo[1]) & (by < lo[1] + 40.0))
            if sel.any():
                j = np.argmax(sg * bx[sel])
                put(f"zygion_{side}", bx[sel][j], by[sel][j], bz[sel][j])
        # the mandible: below the upper teeth (without them, 25 mm below the orbit), in
        # front of the ear (at most 70 mm behind the lateral orbital rim)
        z_top = pts["prosthion"][2] if "prosthion" in pts else (
            io[2] - 25.0 if io is not None else None)
        if z_top is None or lo is None:
            continue
        sel = ((sg * bx > 25.0) & (bz < z_top - 5.0) & (by > y_ref + 25.0)
               & (by < lo[1] + 70.0))
        if "menton" in pts:
            sel &= bz >= pts["menton"][2] - 2.0
        if sel.any():
            j = np.argmax(by[sel] - bz[sel])
            go = np.array([bx[sel][j], by[sel][j], bz[sel][j]])
            put(f"gonion_{side}", *go)
            if "menton" in pts:
                xm = (go[0] + pts["menton"][0]) / 2.0
                sel2 = (np.abs(bx - xm) <= s) & (by < go[1]) & (bz < z_top - 5.0)
                if sel2.any():
                    j = np.argmin(bz[sel2])
                    put(f"mid_mandibular_{side}", bx[sel2][j], by[sel2][j], bz[sel2][j])
            zy = pts.get(f"zygion_{side}")
            if zy is not None:
                zm = (go[2] + zy[2]) / 2.0
                sel3 = ((np.abs(bz - zm) <= s) & (by > go[1] - 35.0) & (by < go[1] + 10.0)
                        & (sg * bx > 25.0))
                if sel3.any():
                    j = np.argmax(sg * bx[sel3])
                    put(f"mid_masseter_{side}", bx[sel3][j], by[sel3][j], bz[sel3][j])
        # second molars
        if "subspinale" in pts and "supramentale" in pts:
            tz, ty, tx = np.nonzero(teeth)
            tx, ty, tz = xs[tx], ys[ty], zs[tz]
            ok = ((sg * tx > 8.0) & (tz < pts["subspinale"][2] + 5.0)
                  & (tz > pts["supramentale"][2] - 5.0))
            if ok.sum() >= 5:
                y_lo, y_hi = ty[ok].min(), ty[ok].max()
                m2 = ok & (ty >= y_lo + 0.65 * (y_hi - y_lo))
                y_m2, z_m2 = float(np.mean(ty[m2])), float(np.mean(tz[m2]))
                for name, dz in (("supra_m2", 10.0), ("occlusal", 0.0), ("sub_m2", -12.0)):
                    sel4 = ((np.abs(by - y_m2) <= 3.0) & (np.abs(bz - (z_m2 + dz)) <= s)
                            & (sg * bx > 5.0))
                    if sel4.any():
                        j = np.argmax(sg * bx[sel4])
                        put(f"{name}_{side}", bx[sel4][j], by[sel4][j], bz[sel4][j])
    for name in LANDMARK_NAMES:
        if name not in pts:
            missing.append(name)
    return Skeleton(grid=grid, bone=bone, teeth=teeth, front=front, front_filled=front_filled,
                    orbits=orbits, aperture=aperture, points=pts, missing=missing)


# --------------------------------------------------------------------------- tissue-depth face

#: Kernel width (mm) with which landmark depths are spread over the bone surface.
DEPTH_KERNEL_MM = 14.0
#: Far from every landmark the depth falls back to this (scalp, forehead; mm) ...
DEFAULT_DEPTH_MM = 5.0
#: ... with the weight of a landmark this far away (mm).
DEFAULT_DEPTH_RANGE_MM = 35.0
#: Soft tissue in front of the bridged orbital opening (closed lids over a cornea that sits
#: about on the line between the supra- and infraorbital margins; mm).
EYELID_MM = 2.0
#: The predicted skin is smoothed with a Gaussian of this width (mm).
FIELD_SMOOTHING_MM = 2.5
#: Alar width = piriform aperture width + this (mm).
ALAR_EXCESS_MM = 10.0
#: Nasal tip projection in front of subnasale, mm: allowed range (two-tangent result clamped).
TIP_PROJECTION_MM = (16.0, 26.0)


def _sdf_capsule(p: np.ndarray, a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> np.ndarray:
    ba = b - a
    h = np.clip(((p - a) @ ba) / max(float(ba @ ba), 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - a - h[..., None] * ba, axis=-1) - (ra + (rb - ra) * h)


def _sdf_ellipsoid(p: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    q = (p - c) / r
    k = np.linalg.norm(q, axis=-1)
    return (k - 1.0) * np.min(r)


def nose_landmarks(sk: Skeleton, scale: float = 1.0) -> dict[str, np.ndarray] | None:
    """Subnasale, pronasale and alar width of a nose placed on the skull (canonical frame).

    The dorsum continues the line of the nasal bones (nasion → rhinion) — the upper tangent
    of Gerasimov's two-tangent method; without a measurable nasal spine the lower tangent is
    the horizontal 8 mm above subnasale, which sits 12 mm in front of, and 4 mm above, the
    subspinale point. The tip projection in front of subnasale is clamped to
    :data:`TIP_PROJECTION_MM`; the alar width is the aperture's width plus
    :data:`ALAR_EXCESS_MM` (Krogman's rule of thumb). None when the landmarks are missing.
    """
    p = sk.points
    if not all(k in p for k in ("nasion", "rhinion", "subspinale")) or sk.aperture is None:
        return None
    n, rh, a = p["nasion"], p["rhinion"], p["subspinale"]
    u = rh - n
    if np.linalg.norm(u) < 1e-6 or u[2] >= -1e-6:
        return None
    u = u / np.linalg.norm(u)
    rh_s = rh + np.array([0.0, -3.0 * scale, 0.0])
    sn = a + np.array([0.0, -12.0 * scale, 4.0 * scale])
    z_tip = sn[2] + 8.0 * scale
    t = (z_tip - rh_s[2]) / u[2]
    tip = rh_s + t * u
    lo, hi = TIP_PROJECTION_MM
    tip[1] = np.clip(tip[1], sn[1] - hi * scale, sn[1] - lo * scale)
    cols = sk.aperture.any(axis=0)
    width = (cols.sum() * sk.grid.step) if cols.any() else 25.0
    return {"nasion_skin": n + np.array([0.0, -6.5 * scale, 0.0]), "rhinion_skin": rh_s,
            "subnasale": sn, "pronasale": tip, "alar_width": np.array(width + ALAR_EXCESS_MM * scale)}


def nose_sdf(points: np.ndarray, nose: dict[str, np.ndarray], scale: float = 1.0) -> np.ndarray:
    """Signed distance (mm, negative inside) of a generic nose on :func:`nose_landmarks`."""
    ns, rs, sn, tip = (nose[k] for k in ("nasion_skin", "rhinion_skin", "subnasale", "pronasale"))
    half = float(nose["alar_width"]) / 2.0
    rt = 7.5 * scale
    tip_c = tip + np.array([0.0, rt, 0.0])
    d = _sdf_capsule(points, ns + np.array([0.0, 4.0 * scale, 0.0]), rs + np.array([0.0, 4.5 * scale, 0.0]),
                     4.5 * scale, 5.0 * scale)
    d = np.minimum(d, _sdf_capsule(points, rs + np.array([0.0, 4.5 * scale, 0.0]), tip_c,
                                   5.0 * scale, rt))
    proj = sn[1] - tip[1]
    base_c = np.array([0.0, sn[1] - 0.45 * proj + 4.0 * scale, sn[2] + 5.0 * scale])
    d = np.minimum(d, _sdf_ellipsoid(points, base_c, np.array(
        [max(half - 5.0 * scale, 6.0 * scale), 0.45 * proj + 5.0 * scale, 7.0 * scale])))
    for sg in (-1.0, 1.0):
        d = np.minimum(d, _sdf_ellipsoid(points, np.array(
            [sg * max(half - 6.0 * scale, 4.0 * scale), sn[1] - 2.0 * scale, sn[2] + 5.0 * scale]),
            np.array([6.5, 8.0, 6.5]) * scale))
    d = np.minimum(d, _sdf_capsule(points, tip_c, sn + np.array([0.0, -1.0 * scale, 1.0 * scale]),
                                   rt * 0.6, 3.5 * scale))
    return d


def tissue_depth_field(hu: np.ndarray, grid: CanonicalGrid, *, scale: float = 1.0,
                       skeleton: Skeleton | None = None) -> tuple[np.ndarray, Skeleton]:
    """Predicted skin of a de-identified head on a canonical grid: ``(s, skeleton)``.

    ``s`` (``[z, y, x]``, canonical mm) is positive inside the predicted skin and about the
    distance to it near the surface. Steps (the "American" method of forensic facial
    approximation, done with distance transforms instead of clay strips):

    1. landmarks on the bone (:func:`find_skeleton`); the orbital openings and the piriform
       aperture are bridged by a membrane (across an orbit, in every column, the straight
       line from the supraorbital to the infraorbital margin — the cornea lies about on
       it; across the aperture a harmonic surface spanning its rim);
    2. every point of the bone surface gets a soft-tissue depth: the landmarks' depths
       (:data:`TISSUE_DEPTHS_MM`) spread by a Gaussian kernel of :data:`DEPTH_KERNEL_MM`,
       falling back to :data:`DEFAULT_DEPTH_MM` far from every landmark; the membranes get
       :data:`EYELID_MM` (closed lids; over the aperture the nose of step 3 stands);
    3. the skin is the set of points within that depth of their nearest bone point (an
       offset surface perpendicular to the bone, like the depth pegs of a reconstruction),
       plus a generic nose placed by :func:`nose_landmarks`;
    4. only the face counts: in front of the ear canals (behind the gonia and zygia by at
       most 10 mm). (Inside the head the field is positive too — around the septum, in the
       sinuses —; :func:`paint_skin` fills only air, and air the skin encloses is not seen.)
    5. the field is smoothed (:data:`FIELD_SMOOTHING_MM`), as the clay between the depth
       pegs is.

    ``scale`` is the alignment's canonical units per mm (depths are in mm).
    """
    from scipy import ndimage as ndi

    sk = skeleton or find_skeleton(hu, grid)
    step = grid.step
    xs, ys, zs = grid.xs, grid.ys, grid.zs
    nz, ny, nx = grid.shape
    # 1. membranes across the orbits and the aperture
    env = sk.bone.copy()
    membrane = np.zeros_like(env)
    holes = list(sk.orbits) + ([sk.aperture] if sk.aperture is not None else [])
    yy = ys[None, :, None]
    for mask in holes:
        if mask is None or not mask.any():
            continue
        f = np.where(mask, sk.front_filled, np.nan)[:, None, :]
        with np.errstate(invalid="ignore"):
            plate = (yy >= f) & (yy <= f + 3.0)
        env |= plate
        membrane |= plate
    # 2. depths on the envelope's surface
    surf = env & ~ndi.binary_erosion(env)
    kz, jy, ix = np.nonzero(surf)
    sp = np.column_stack([xs[ix], ys[jy], zs[kz]])
    names = list(sk.points)
    if names:
        lp = np.array([sk.points[n] for n in names])
        ld = np.array([landmark_depth_mm(n) for n in names]) * scale
        d2 = ((sp[:, None, :] - lp[None, :, :]) ** 2).sum(axis=-1)
        w = np.exp(-d2 / (2.0 * (DEPTH_KERNEL_MM * scale) ** 2))
        w0 = np.exp(-(DEFAULT_DEPTH_RANGE_MM / DEPTH_KERNEL_MM) ** 2 / 2.0)
        depth = (w @ ld + w0 * DEFAULT_DEPTH_MM * scale) / (w.sum(axis=1) + w0)
    else:
        depth = np.full(len(sp), DEFAULT_DEPTH_MM * scale)
    # the bridged openings: closed lids over the orbits; the nose over the aperture is the
    # generic nose below, not a depth
    depth[membrane[kz, jy, ix]] = EYELID_MM * scale
    dimg = np.zeros(env.shape, dtype=np.float32)
    dimg[kz, jy, ix] = depth
    # 3. offset surface: within the depth of the nearest envelope point
    dist, idx = ndi.distance_transform_edt(~env, sampling=step, return_indices=True)
    s = dimg[idx[0], idx[1], idx[2]] - dist.astype(np.float32)
    del idx
    nose = nose_landmarks(sk, scale)
    if nose is not None:
        box = [np.min([nose[k] for k in ("nasion_skin", "subnasale", "pronasale")], axis=0) - 25,
               np.max([nose[k] for k in ("nasion_skin", "subnasale", "pronasale")], axis=0) + 25]
        sel = [np.flatnonzero((a >= lo) & (a <= hi)) for a, lo, hi in
               ((zs, box[0][2], box[1][2]), (ys, box[0][1], box[1][1]), (xs, box[0][0], box[1][0]))]
        if all(v.size for v in sel):
            sl = tuple(slice(v[0], v[-1] + 1) for v in sel)
            Z, Y, X = np.meshgrid(zs[sl[0]], ys[sl[1]], xs[sl[2]], indexing="ij")
            nd = nose_sdf(np.stack([X, Y, Z], axis=-1), nose, scale)
            s[sl] = np.maximum(s[sl], -nd)
    # 4. the face only
    back = [sk.points[k][1] for k in ("gonion_r", "gonion_l", "zygion_r", "zygion_l")
            if k in sk.points]
    y_lim = (max(back) + 10.0) if back else 0.0
    s[:, ys > y_lim, :] = np.minimum(s[:, ys > y_lim, :], -(ys[ys > y_lim] - y_lim)[None, :, None])
    # 5. smooth, as the strips between the depth pegs are smoothed
    s = ndi.gaussian_filter(s, FIELD_SMOOTHING_MM / step)
    return s.astype(np.float32), sk


def paint_skin(volume, alignment, grid: CanonicalGrid, field: np.ndarray, *,
               tissue_hu: float = 40.0, stride: tuple[int, int, int] = (1, 1, 1)
               ) -> tuple[object, int]:
    """``volume`` with soft tissue added where the canonical skin field ``field`` is inside.

    Only voxels at or below −500 HU (air, and the removed face's air fill) change; each gets
    ``max(hu, −300 + 700 · s / h)`` clipped to −1000…``tissue_hu``, where ``s`` is the field
    (trilinear) and ``h`` the voxel's largest spacing: a partial-volume edge whose −300 HU
    iso-surface lies on the field's zero level, as a scanned skin's does. With ``stride``
    the result is the volume sampled at every ``stride``-th voxel per axis ``(k, j, i)``
    (what the surface chain meshes anyway; :func:`pipeline.surface.strides_for_resolution`).
    ``volume`` must be a regular stack. Returns the new volume and the number of voxels
    changed.
    """
    # loaded on first use: pulls in trimesh
    from .render import canonical_crop

    st = tuple(int(v) for v in stride)
    hu = np.array(volume.hu[::st[0], ::st[1], ::st[2]], copy=True)
    sp = tuple(float(a) * b for a, b in zip(volume.spacing_mm, st))
    vol = Volume(hu=hu, spacing_mm=sp, origin_lps_mm=volume.origin_lps_mm,
                 row_cosine=volume.row_cosine, col_cosine=volume.col_cosine,
                 normal=volume.normal)
    crop = canonical_crop(vol, alignment, grid.box)
    h = float(max(sp))
    a = vol.affine()
    lin = alignment.scale * alignment.rotation
    changed = 0
    jg, ig = np.meshgrid(np.arange(crop[1].start, crop[1].stop),
                         np.arange(crop[2].start, crop[2].stop), indexing="ij")
    for k in range(crop[0].start, crop[0].stop):
        sl = hu[k, crop[1], crop[2]]  # a view
        air = sl <= -500
        if not air.any():
            continue
        ijk = np.stack([ig[air], jg[air], np.full(int(air.sum()), k)], axis=-1).astype(float)
        can = ((ijk @ a[:3, :3].T + a[:3, 3]) - alignment.centre_lps_mm) @ lin.T
        gi = grid.to_index(can)
        f = map_coordinates(field, [gi[:, 0], gi[:, 1], gi[:, 2]], order=1, mode="constant",
                            cval=-50.0, prefilter=False)
        new = np.clip(-300.0 + 700.0 * f / h, -1000.0, tissue_hu)
        old = sl[air].astype(np.float32)
        upd = (new > old) & (new > -990.0)
        if upd.any():
            old[upd] = new[upd]
            sl[air] = np.rint(old).astype(hu.dtype) if np.issubdtype(hu.dtype, np.integer) else old
            changed += int(upd.sum())
    return vol, changed


# --------------------------------------------------------------------------- the attacks

#: The reconstruction attacks, by name (``reid_eval --attack``, conditions ``attack_<name>``).
ATTACKS: dict[str, str] = {
    "tissue_depth": "landmarks on the bone + mean soft-tissue depths (forensic facial "
                    "approximation), generic nose by the two-tangent rule",
    "learned": "skull-to-face model learned from synthetic heads (PCA + ridge regression of "
               "the skin's radial map on the bone's)",
}


@dataclass
class Reconstruction:
    """The attacker's result: the de-identified volume with a predicted face added.

    ``volume`` is the de-identified CT (sampled at ``stride``) with soft tissue painted
    where the predicted skin lies and the scan holds air; ``field`` the predicted skin on
    ``grid`` (canonical, positive inside); ``landmarks`` what the tissue-depth attack found.
    """

    attack: str
    volume: object
    alignment: object
    grid: CanonicalGrid
    field: np.ndarray
    voxels_added: int
    landmarks: dict[str, np.ndarray]
    missing: list[str]
    timings_s: dict[str, float]


def reconstruct(volume, attack: str = "tissue_depth", *, alignment=None,
                stride: tuple[int, int, int] | None = None, resolution_mm: float = 2.0,
                model=None, grid: CanonicalGrid | None = None) -> Reconstruction:
    """Rebuild a face on the skull of a de-identified CT ``volume`` (HU, LPS).

    The attacker has only this volume: the canonical pose comes from its bone
    (``alignment``, computed here when not given — :func:`pipeline.align.alignment_from_volume`
    depends on the bone mask alone, so an alignment computed on the original of the same
    bone is the same), the face from ``attack`` (:data:`ATTACKS`; ``model`` overrides the
    shipped learned model). The result is sampled at ``stride`` (default: the strides that
    bring each axis to about ``resolution_mm``, what the surface chain meshes anyway).
    """
    import time

    # loaded on first use: pulls in trimesh
    from .align import alignment_from_volume
    from .surface import strides_for_resolution

    if attack not in ATTACKS:
        raise ReconstructionError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    vol = volume.as_uniform() if hasattr(volume, "as_uniform") else volume
    if alignment is None:
        alignment = alignment_from_volume(vol)
        t["alignment"] = time.perf_counter() - t0
    grid = grid or CanonicalGrid()
    t1 = time.perf_counter()
    hu = resample_canonical(vol, alignment, grid)
    if not np.any(np.nan_to_num(hu, nan=-1000.0) >= 200.0):
        raise ReconstructionError("no bone in the face region: nothing to reconstruct on")
    landmarks: dict[str, np.ndarray] = {}
    missing: list[str] = []
    if attack == "tissue_depth":
        field, sk = tissue_depth_field(hu, grid, scale=alignment.scale)
        landmarks, missing = dict(sk.points), list(sk.missing)
    else:
        field = (model or load_model()).skin_field(hu, grid)
    t["field"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    st = stride or strides_for_resolution(vol, resolution_mm)
    out, n = paint_skin(vol, alignment, grid, field, stride=st)
    t["paint"] = time.perf_counter() - t1
    return Reconstruction(attack=attack, volume=out, alignment=alignment, grid=grid, field=field,
                          voxels_added=n, landmarks=landmarks, missing=missing, timings_s=t)
