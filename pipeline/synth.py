"""Synthetic head CT with ground truth: anatomy from smooth implicit shapes.

Every structure is a signed-distance-like field (negative inside, roughly in
millimetres) built from ellipsoids and capsules combined with smooth unions
(``smin``) and smooth subtractions, in *head-local* patient coordinates
(LPS axes, mm): ``x`` → patient Left, ``y`` → Posterior, ``z`` → Superior,
origin midway between the pupils. The head is then rotated by a small pose
and voxelised onto a standard axial grid, so the same subject can be produced
at any size and spacing.

Array conventions follow :mod:`pipeline.volume`: ``hu[k, j, i]`` = [slice,
row, column]; ImageOrientationPatient ``1,0,0,0,1,0`` so column ``i`` runs to
patient Left, row ``j`` to Posterior (the face is at small ``j``) and slice
``k`` to Superior.

Tissue labels (``SynthHead.labels``, uint8) — nominal HU in brackets:

====  ==================  ===============================================
code  name                meaning
====  ==================  ===============================================
0     air                 outside the body (−1000)
1     skin                outer 2 mm of the body (+45)
2     fat                 subcutaneous / orbital / buccal fat (−100)
3     muscle              muscle and deep soft tissue, tongue, neck (+50)
4     soft_tissue         sclera, turbinates, cartilage, cord, discs (+35)
5     cortical_bone       outer/inner tables, facial bone walls (+1450)
6     cancellous_bone     diploe, bone marrow spaces (+450)
7     teeth               tooth crowns (+2300)
8     grey_matter         cortex, 3 mm rim of the brain (+40)
9     white_matter        (+30)
10    csf                 subarachnoid space, ventricles, falx gap (+6)
11    vitreous            eye vitreous (+10)
12    lens                eye lens (+80)
13    internal_air        sinuses, nasal airway, pharynx, ear canal (−990)
14    couch               scanner head-rest (+150); not part of the patient
15    fluid               blood / fluid level in a sinus (+50)
16    metal               dental fillings (+3071)
17    holder              plastic head holder (+350); only with ``domain``
18    foam                foam pad / pillow (−850); only with ``domain``
====  ==================  ===============================================

Facial-feature ground truth: ``SynthHead.feature_masks`` has soft-tissue
masks ``"eyes"`` (eyeballs and lids), ``"nose"``, ``"lips"``, ``"brow"``,
``"chin"`` and ``"ears"``; they are disjoint (priority in that order).
The ``"nose"`` mask is what a person labelling a slice draws: the soft tissue
of the nose standing out of the face (inside the skin with the nose, outside
the skin the face would have without it by at least :data:`NOSE_LABEL_MIN_MM`,
the lips included), so it reaches back over the nasal pyramid above the tip to
the nasofacial junction; plain and domain-randomised heads
(:mod:`pipeline.synth_domain`) share this definition. The ``"ears"`` mask is
likewise the auricle from the skin out: ear soft tissue outside the skin the
head would have without its ears (:data:`EAR_LABEL_MIN_MM`), not the ear's
root inside the head (``ear_soft_tissue_mask`` keeps the whole ear). (Until issue 16 a plain
head's nose was the nose primitive's soft tissue with no bone in front of it;
the change touches only ``feature_ids``, ``feature_boxes`` and
``face_label_mask``, never the HU or the tissue labels.)
``SynthHead.feature_boxes[k]`` lists ``(class_name, i0, j0, i1, j1)`` pixel
boxes (column/row, inclusive–exclusive) of the features present on slice
``k``; eyes and ears get one box per side.

``SynthHead.face_soft_tissue_mask`` is the ground truth a defacer should
remove: (a) every soft-tissue voxel (skin, fat, muscle, soft tissue, eye)
with no bone or tooth anterior to it along the row direction (−j), within
25 mm of the skin surface, between 30 mm above the brow centre and 3 mm below
the menton, within the bizygomatic width and anterior to a coronal plane
25 mm in front of the ear canals (head-local), excluding the ears and the
nasal-cavity lining; plus (b) all voxels of the eyes, nose, lips, brow and
chin feature masks. It is disjoint from bone, teeth and brain; the ears and
the submental/neck tissue are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import numpy as np

from .volume import Volume

__all__ = [
    "FEATURE_CLASSES",
    "FEATURE_CODES",
    "LABELS",
    "LABEL_HU",
    "LABEL_HU_RANGE",
    "SOFT_TISSUE_LABELS",
    "STRUCTURES",
    "SubjectParams",
    "SynthError",
    "SynthHead",
    "face_shell",
    "generate_head",
    "head_local_to_lps",
    "render_skin_frontal",
]


class SynthError(ValueError):
    """Invalid input to the synthetic-head generator."""


# ----------------------------------------------------------------------------- labels

LABELS: dict[str, int] = {
    "air": 0,
    "skin": 1,
    "fat": 2,
    "muscle": 3,
    "soft_tissue": 4,
    "cortical_bone": 5,
    "cancellous_bone": 6,
    "teeth": 7,
    "grey_matter": 8,
    "white_matter": 9,
    "csf": 10,
    "vitreous": 11,
    "lens": 12,
    "internal_air": 13,
    "couch": 14,
    "fluid": 15,
    "metal": 16,
    "holder": 17,
    "foam": 18,
}
_L = LABELS

#: Nominal (noise-free, blur-free) HU per label code.
LABEL_HU: dict[int, float] = {
    0: -1000.0, 1: 45.0, 2: -100.0, 3: 50.0, 4: 35.0, 5: 1450.0, 6: 450.0,
    7: 2300.0, 8: 40.0, 9: 30.0, 10: 6.0, 11: 10.0, 12: 80.0, 13: -990.0, 14: 150.0,
    15: 50.0, 16: 3071.0, 17: 350.0, 18: -850.0,
}

#: Documented plausible HU range per label (what a radiologist would accept).
LABEL_HU_RANGE: dict[int, tuple[float, float]] = {
    0: (-1024.0, -950.0), 1: (10.0, 80.0), 2: (-130.0, -70.0), 3: (20.0, 80.0),
    4: (10.0, 70.0), 5: (1000.0, 1800.0), 6: (300.0, 600.0), 7: (2000.0, 2500.0),
    8: (32.0, 48.0), 9: (22.0, 38.0), 10: (-5.0, 15.0), 11: (0.0, 20.0), 12: (60.0, 100.0),
    13: (-1024.0, -900.0), 14: (50.0, 250.0), 15: (30.0, 70.0), 16: (2500.0, 3071.0),
    17: (150.0, 500.0), 18: (-950.0, -550.0),
}

#: Label codes counted as (non-bone, non-brain) soft tissue of the patient.
SOFT_TISSUE_LABELS = (1, 2, 3, 4, 11, 12)
_BONE_LABELS = (5, 6, 7)
_BONE_OR_METAL = (5, 6, 7, 16)
_BRAIN_LABELS = (8, 9)

#: What the facial skeleton encloses, as ``SynthHead.structures`` codes: removal must keep them.
STRUCTURES: dict[str, int] = {
    "globe": 1, "orbital_fat": 2, "eye_muscles": 3, "nasal_cavity": 4, "sinuses": 5,
    "oral_cavity": 6, "pharynx": 7, "masticator": 8, "brain": 9,
}

FEATURE_CLASSES: tuple[str, ...] = ("eyes", "nose", "lips", "brow", "chin", "ears")
#: ``SynthHead.feature_ids`` code → feature class (0 = none; 1/7 patient-right eye/ear, 2/8 left).
FEATURE_CODES: dict[int, str] = {
    1: "eyes", 2: "eyes", 3: "nose", 4: "lips", 5: "brow", 6: "chin", 7: "ears", 8: "ears",
}
_FEATURE_CODES = FEATURE_CODES  # old name, used by other modules
# How far (mm) a voxel must stand out of the face without the nose to be labelled nose: the
# nasofacial junction, where a person labelling a slice ends the nose's box. At 0 the label took
# the smooth blend's skirt over the cheeks and between the eyes too: on three domain heads its
# boxes were 45-88 mm wide and 25-57 mm deep, where the real nose labelled in
# tests/data/realct_labels/ge-head-ct.json is 29-35 mm by 16-18 mm. At 2 mm the skirt goes, but
# on some domain heads the label still spans the recess between the eyes (up to 2.2x the alar
# width on one slice): the generator's face there, not the rule, is the next thing to fix.
NOSE_LABEL_MIN_MM = 2.0
# How far (mm) a voxel must stand out of the head without the ears to be labelled ear: the skin
# where the auricle's root meets the head, where the real labels in
# tests/data/realct_labels/ge-head-ct.json begin. The ear primitives reach 3-8 mm into the head
# (17 % of the ear voxels of seed 7007); with that root labelled as ear, the model shipped before
# (J2) drew its real ear boxes 4-7 mm too far into the head on slices 9-14. The root keeps its own codes (:data:`_EAR_ROOT_CODES`)
# while a head is generated, so that the ears' removal ground truth (``ear_soft_tissue_mask``)
# and the face zone, which exclude the whole ear, are what they were.
EAR_LABEL_MIN_MM = 0.0
# feature codes of the ear roots (right, left) during generation only; 0 in ``feature_ids``
_EAR_ROOT_CODES = (9, 10)

_BIG = np.float32(1.0e4)
_LUT = np.full(256, -1000.0, np.float32)
for _code, _v in LABEL_HU.items():
    _LUT[_code] = _v


# ----------------------------------------------------------------------------- params

def _p(lo: float, hi: float, doc: str) -> Any:
    """A SubjectParams field with its sampling range in metadata; default = midpoint."""
    return field(default=(lo + hi) / 2.0, metadata={"range": (lo, hi), "doc": doc})


@dataclass
class SubjectParams:
    """Identity of a synthetic subject. Lengths in mm, angles in degrees.

    Every field has a sampling range (``SubjectParams.ranges()``);
    :meth:`random` draws each uniformly from its range, so two seeds give
    visibly different faces. The default instance is the mid-range "average"
    head.
    """

    skull_length_mm: float = _p(174.0, 194.0, "glabella–opisthocranion skin length")
    skull_width_mm: float = _p(138.0, 158.0, "maximum head breadth (skin)")
    vertex_height_mm: float = _p(110.0, 126.0, "vertex above the pupils")
    forehead_slope: float = _p(0.0, 0.28, "recession of the forehead (tan of angle)")
    face_width_mm: float = _p(116.0, 150.0, "bizygomatic width (skin)")
    chin_height_mm: float = _p(38.0, 56.0, "stomion–menton height")
    jaw_width_mm: float = _p(86.0, 126.0, "bigonial width (skin)")
    chin_projection_mm: float = _p(-10.0, 10.0, "forward projection of the chin")
    chin_width_mm: float = _p(26.0, 46.0, "width of the chin pad")
    nose_length_mm: float = _p(40.0, 62.0, "nasion–subnasale height")
    nose_projection_mm: float = _p(13.0, 30.0, "subnasale–pronasale depth")
    nose_width_mm: float = _p(27.0, 44.0, "alar width")
    nose_bridge_mm: float = _p(2.0, 13.0, "height of the nasal bridge in front of the eyes")
    nose_tip_radius_mm: float = _p(6.5, 11.0, "radius of the nasal tip")
    eye_spacing_mm: float = _p(54.0, 72.0, "inter-pupillary distance")
    eye_opening_mm: float = _p(7.0, 12.0, "palpebral fissure height")
    orbit_depth_mm: float = _p(4.0, 13.0, "depth of the cornea behind the brow")
    brow_prominence_mm: float = _p(0.0, 9.0, "forward projection of the brow ridge")
    brow_height_mm: float = _p(14.0, 25.0, "brow ridge above the pupils")
    lip_fullness_mm: float = _p(2.0, 12.0, "lip thickness/projection")
    mouth_width_mm: float = _p(40.0, 62.0, "mouth width")
    philtrum_mm: float = _p(16.0, 24.0, "subnasale–stomion height")
    cheek_fullness_mm: float = _p(0.0, 18.0, "cheek subcutaneous fat")
    cheekbone_mm: float = _p(0.0, 10.0, "zygoma prominence")
    ear_length_mm: float = _p(54.0, 70.0, "ear length")
    ear_height_mm: float = _p(-8.0, 6.0, "vertical offset of the ears")
    ear_protrusion_deg: float = _p(10.0, 35.0, "angle of the pinna from the head")
    neck_radius_mm: float = _p(50.0, 62.0, "neck radius")
    scalp_mm: float = _p(4.0, 7.0, "scalp soft-tissue thickness")
    canthal_tilt_deg: float = _p(-5.0, 9.0, "upward tilt of the lateral eye corners")
    nose_hump_mm: float = _p(-3.0, 4.0, "convexity (+) or concavity (−) of the nasal dorsum")
    nose_tip_lift_mm: float = _p(-4.0, 5.0, "upturn of the nasal tip")
    lower_lip_ratio: float = _p(0.7, 1.35, "lower/upper lip thickness")
    brow_arch_deg: float = _p(0.0, 16.0, "arch of the brows (lateral ends lower)")
    detail_seed: int = field(default=-1, metadata={
        "doc": "seed of small idiosyncratic shape jitter (±1–2 mm) of soft-tissue shapes; -1: none"})
    seed: int | None = field(default=None, metadata={"doc": "seed used by random(), if any"})

    @classmethod
    def ranges(cls) -> dict[str, tuple[float, float]]:
        """Sampling range ``(lo, hi)`` of every numeric field."""
        return {f.name: f.metadata["range"] for f in fields(cls) if "range" in f.metadata}

    @classmethod
    def random(cls, seed: int) -> SubjectParams:
        """Draw every parameter uniformly from its range with ``numpy.random.default_rng(seed)``."""
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise SynthError(f"seed must be an int, got {type(seed).__name__}")
        rng = np.random.default_rng([int(seed), 0x5E1F])
        values = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in cls.ranges().items()}
        return cls(**values, detail_seed=int(rng.integers(0, 2**31 - 1)), seed=int(seed))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    def validate(self) -> None:
        """Raise :class:`SynthError` if a value is outside 1.5× its sampling range."""
        for name, (lo, hi) in self.ranges().items():
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise SynthError(f"parameter {name} must be a finite number")
            pad = 0.25 * (hi - lo)
            if not (lo - pad <= v <= hi + pad):
                raise SynthError(
                    f"parameter {name}={v:.3g} outside the supported range "
                    f"[{lo - pad:.3g}, {hi + pad:.3g}]"
                )


# ----------------------------------------------------------------------------- primitives

def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (smooth union) of two fields, blend width ``k`` mm."""
    if k <= 0:
        return np.minimum(a, b)
    h = (b - a) * (0.5 / k)
    h += 0.5
    np.clip(h, 0.0, 1.0, out=h)
    out = a - b
    out *= h
    out += b  # b + (a-b) h  = mix(b, a, h)
    h *= 1.0 - h
    h *= k
    out -= h
    return out


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (smooth intersection)."""
    return -_smin(-a, -b, k)


class _Prim:
    """A signed-distance-like field with a local-coordinate bounding box (lo, hi)."""

    lo: np.ndarray
    hi: np.ndarray

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class _Ellipsoid(_Prim):
    """Ellipsoid (Quilez' distance bound), optional rotation, x-taper along z and y-shear."""

    def __init__(self, c, r, rot=None, taper=0.0, shear=0.0, margin=0.0) -> None:
        self.c = np.asarray(c, float)
        self.r = np.asarray(r, float)
        if np.any(self.r <= 0):
            raise SynthError("ellipsoid radii must be positive")
        self.rot = None if rot is None else np.asarray(rot, float)  # rows: ellipsoid axes in local
        self.taper = float(taper)
        self.shear = float(shear)
        ext = self.r.copy()
        ext[0] *= 1.0 + abs(self.taper)
        if self.rot is not None:
            ext = np.sqrt((self.rot.T ** 2) @ (ext ** 2))
        ext[1] += abs(self.shear) * self.r[2]
        ext += margin
        self.lo, self.hi = self.c - ext, self.c + ext

    def sdf(self, x, y, z):
        cx, cy, cz = self.c
        dx = x - np.float32(cx - 1e-4)
        dy = y - np.float32(cy)
        dz = z - np.float32(cz)
        if self.shear:
            dy -= np.float32(self.shear) * dz
        if self.rot is not None:
            m = self.rot.astype(np.float32)
            dx, dy, dz = (m[0, 0] * dx + m[0, 1] * dy + m[0, 2] * dz,
                          m[1, 0] * dx + m[1, 1] * dy + m[1, 2] * dz,
                          m[2, 0] * dx + m[2, 1] * dy + m[2, 2] * dz)
        rx, ry, rz = (np.float32(v) for v in self.r)
        if self.taper:
            sx = 1.0 + np.float32(self.taper / self.r[2]) * dz
            np.maximum(sx, np.float32(0.2), out=sx)
            dx = dx / sx
        u = dx * (1.0 / rx)
        v = dy * (1.0 / ry)
        w = dz * (1.0 / rz)
        k0 = u * u
        k0 += v * v
        k0 += w * w
        np.sqrt(k0, out=k0)
        u *= 1.0 / rx
        v *= 1.0 / ry
        w *= 1.0 / rz
        k1 = u * u
        k1 += v * v
        k1 += w * w
        np.sqrt(k1, out=k1)
        k1 += np.float32(1e-9)
        out = k0 - 1.0
        out *= k0
        out /= k1
        return out


class _Box(_Prim):
    """Only a bounding box (used to locate work regions; no field)."""

    def __init__(self, lo, hi) -> None:
        self.lo, self.hi = np.asarray(lo, float), np.asarray(hi, float)


class _Sphere(_Prim):
    def __init__(self, c, r, margin=0.0) -> None:
        self.c = np.asarray(c, float)
        self.r = float(r)
        self.lo, self.hi = self.c - r - margin, self.c + r + margin

    def sdf(self, x, y, z):
        cx, cy, cz = (np.float32(v) for v in self.c)
        d = (x - cx) ** 2
        d += (y - cy) ** 2
        d += (z - cz) ** 2
        np.sqrt(d, out=d)
        d -= np.float32(self.r)
        return d


class _Capsule(_Prim):
    """Segment a→b with radius linearly varying ra→rb; optional scale of the z axis."""

    def __init__(self, a, b, ra, rb=None, margin=0.0) -> None:
        self.a = np.asarray(a, float)
        self.b = np.asarray(b, float)
        self.ra = float(ra)
        self.rb = float(ra if rb is None else rb)
        r = max(self.ra, self.rb) + margin
        self.lo = np.minimum(self.a, self.b) - r
        self.hi = np.maximum(self.a, self.b) + r

    def sdf(self, x, y, z):
        ax, ay, az = (np.float32(v) for v in self.a)
        ba = (self.b - self.a)
        bb = float(ba @ ba) or 1e-9
        bx, by, bz = (np.float32(v / bb) for v in ba)
        px = x - ax
        py = y - ay
        pz = z - az
        h = px * bx
        h += py * by
        h += pz * bz
        np.clip(h, 0.0, 1.0, out=h)
        px -= h * np.float32(ba[0])
        py -= h * np.float32(ba[1])
        pz -= h * np.float32(ba[2])
        d = px * px
        d += py * py
        d += pz * pz
        np.sqrt(d, out=d)
        h *= np.float32(self.rb - self.ra)
        d -= h
        d -= np.float32(self.ra)
        return d


class _Offset(_Prim):
    """``prim`` grown (t < 0) or shrunk (t > 0) by ``t`` mm."""

    def __init__(self, prim: _Prim, t: float) -> None:
        self.prim = prim
        self.t = float(t)
        grow = max(0.0, -self.t)
        self.lo, self.hi = prim.lo - grow, prim.hi + grow

    def sdf(self, x, y, z):
        d = self.prim.sdf(x, y, z)
        d += np.float32(self.t)
        return d


class _Lid(_Prim):
    """Eyelid: spherical shell of radius r around an eye, outside an almond-shaped opening."""

    def __init__(self, c, r, half_w, half_h, margin=0.0, tilt_deg=0.0) -> None:
        self.c = np.asarray(c, float)
        self.r, self.half_w, self.half_h = float(r), float(half_w), float(half_h)
        self.tilt = math.radians(tilt_deg)
        self.lo, self.hi = self.c - r - margin, self.c + r + margin

    def sdf(self, x, y, z):
        cx, cy, cz = (np.float32(v) for v in self.c)
        dx = x - cx
        dz = z - cz
        d = dx * dx
        d += (y - cy) ** 2
        d += dz * dz
        np.sqrt(d, out=d)
        d -= np.float32(self.r)
        # almond opening: ellipse in (x, z), pointed at the canthi
        if self.tilt:
            ct, st = np.float32(math.cos(self.tilt)), np.float32(math.sin(self.tilt))
            dx, dz = ct * dx + st * dz, ct * dz - st * dx
        u = dx * np.float32(1.0 / self.half_w)
        w = dz * np.float32(1.0 / self.half_h)
        e = u * u
        e = np.sqrt(e, out=e)  # |u|
        e = 1.0 - e
        np.maximum(e, np.float32(0.0), out=e)
        # opening test: |w| < (1-|u|)^0.8  ->  field  = |w| - (1-|u|)^0.8  (scaled to mm)
        np.power(e, np.float32(0.8), out=e)
        np.abs(w, out=w)
        w -= e
        w *= np.float32(self.half_h)
        return np.maximum(d, w, out=d)


# ----------------------------------------------------------------------------- model

def _rotmat(yaw_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rows = ellipsoid axes in head-local coordinates: the ellipsoid turned by ``yaw_deg``
    about +z (its +x axis towards +y) and then tilted by ``roll_deg`` about +y."""
    a, b = math.radians(yaw_deg), math.radians(roll_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[math.cos(b), 0.0, math.sin(b)], [0.0, 1.0, 0.0], [-math.sin(b), 0.0, math.cos(b)]])
    return (rz @ ry).T


@dataclass
class _Op:
    kind: str  # "u" union, "s" subtract, "i" intersect
    prim: _Prim
    k: float


class _Group(_Prim):
    """A list of operations applied left to right, starting from 'empty' (+BIG)."""

    def __init__(self, name: str, ops: list[_Op], margin: float = 0.0) -> None:
        self.name = name
        self.ops = ops
        unions = [o for o in ops if o.kind == "u"]
        if not unions:
            raise SynthError("a group needs at least one union")
        kmax = max(o.k for o in ops)
        if margin:
            # members must be evaluated far enough out for offsets/blends of the whole group
            for o in ops:
                _grow(o.prim, margin)
        self.lo = np.min([o.prim.lo for o in unions], axis=0) - kmax
        self.hi = np.max([o.prim.hi for o in unions], axis=0) + kmax


def _grow(prim: _Prim, margin: float) -> None:
    """Enlarge the evaluation box of a primitive (and of a group's members) by ``margin`` mm."""
    prim.lo = prim.lo - margin
    prim.hi = prim.hi + margin
    if isinstance(prim, _Group):
        for o in prim.ops:
            _grow(o.prim, margin)


def _chain(name: str, points, radius: float, margin: float = 0.0) -> _Group:
    """Capsules along a polyline, hard union (smooth joints without smooth-min bulges)."""
    return _Group(name, [_u(_Capsule(a, b, radius, margin=margin)) for a, b in pairwise(points)])


def _u(prim: _Prim, k: float = 0.0) -> _Op:
    return _Op("u", prim, k)


def _s(prim: _Prim, k: float = 0.0) -> _Op:
    return _Op("s", prim, k)


class _HeadModel:
    """All groups of one subject, in head-local coordinates."""

    def __init__(self, p: SubjectParams) -> None:
        self.p = p
        self._build()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        """Lay out every shape of the head (head-local mm) in steps; ``lm`` carries the
        landmarks and the values one step hands on to the next. The steps run in the order
        of the random draws of the idiosyncratic jitter (``jc``/``jr``): reordering them
        changes every seed's head (``tests/test_synth.py`` pins them)."""
        p = self.p
        m = 3.0  # bbox margin (mm)
        xe = p.eye_spacing_mm / 2.0
        fw = p.face_width_mm / 2.0
        jw = p.jaw_width_mm / 2.0
        t_soft = 6.0  # facial soft tissue over bone
        self.t_soft = t_soft
        rng = np.random.default_rng([int(p.detail_seed), 0xD7A1]) if p.detail_seed >= 0 else None

        def jc(c, amt: float = 2.0):
            """Idiosyncratic jitter of a centre (mm) — none without a detail seed."""
            return c if rng is None else tuple(np.asarray(c, float) + rng.normal(0.0, amt, 3))

        def jr(r, rel: float = 0.09):
            """Idiosyncratic relative jitter of radii."""
            return r if rng is None else tuple(np.asarray(r, float) * np.clip(1 + rng.normal(0.0, rel, 3),
                                                                              0.8, 1.2))
        lm = SimpleNamespace(fw=fw, jc=jc, jr=jr, jw=jw, m=m, t_soft=t_soft, xe=xe)
        self._layout_landmarks(lm)
        self._layout_cranium_neck(lm)
        self._layout_facial_skeleton(lm)
        self._layout_mandible(lm)
        self._layout_cavities(lm)
        self._layout_inner_structures(lm)
        self._layout_soft_tissue(lm)
        self._layout_eyes(lm)
        self._layout_nose(lm)
        self._layout_lips(lm)
        self._layout_ears(lm)
        self._layout_face_region(lm)

    def _layout_landmarks(self, lm: SimpleNamespace) -> None:
        """Landmarks (head-local mm): cranium, brow, eyes, nose, mouth, chin, ears."""
        p = self.p
        t_soft, xe = lm.t_soft, lm.xe
        a_cr, b_cr = p.skull_width_mm / 2.0, p.skull_length_mm / 2.0
        zc_cr = 30.0
        c_cr = p.vertex_height_mm - zc_cr
        yc_cr = -86.0 + b_cr
        self.yc_cr, self.zc_cr = yc_cr, zc_cr
        brow_front = -89.0 - p.brow_prominence_mm  # skin over the glabella
        zb = p.brow_height_mm
        brow_r = (50.0, 24.0, 10.0)
        y_bb = brow_front + t_soft  # front of the brow-ridge bone
        brow_at_eye = y_bb + brow_r[1] * (1 - math.sqrt(1 - (xe / brow_r[0]) ** 2)) - t_soft
        y_cornea = brow_at_eye + p.orbit_depth_mm
        ye = y_cornea + 13.5
        self.eye_c = [(-xe, ye, 0.0), (xe, ye, 0.0)]
        self.ye, self.xe = ye, xe
        zn = zb - 11.0
        yn = y_cornea - 5.0 - p.nose_bridge_mm
        z_sn = zn - p.nose_length_mm
        y_sn = y_cornea - 13.0
        y_tip = y_sn - p.nose_projection_mm
        rt = p.nose_tip_radius_mm
        z_tip = z_sn + 4.0 + 0.25 * p.nose_projection_mm + p.nose_tip_lift_mm
        z_st = z_sn - p.philtrum_mm
        z_occ = z_st - 1.5
        z_me = z_st - p.chin_height_mm
        y_pog = y_sn + 5.0 - p.chin_projection_mm
        lf = p.lip_fullness_mm
        mw = p.mouth_width_mm / 2.0
        y_lip = y_sn - 1.0 - 0.5 * lf
        y_inc = y_lip + 13.0
        self.z_sn, self.y_sn, self.zn, self.yn, self.y_tip, self.z_tip = z_sn, y_sn, zn, yn, y_tip, z_tip
        self.z_st, self.z_me, self.y_pog, self.z_brow, self.z_occ = z_st, z_me, y_pog, zb, z_occ
        ear_z = -10.0 + p.ear_height_mm
        ear_y = yc_cr - 2.0
        zr = (ear_z - zc_cr) / c_cr
        head_half = a_cr * math.sqrt(max(0.05, 1 - zr ** 2))
        self.head_half_at_ear = head_half
        vars(lm).update(a_cr=a_cr, b_cr=b_cr, brow_at_eye=brow_at_eye, brow_front=brow_front,
                        c_cr=c_cr, ear_y=ear_y, ear_z=ear_z, head_half=head_half, lf=lf, mw=mw,
                        rt=rt, y_bb=y_bb, y_inc=y_inc, y_lip=y_lip, y_pog=y_pog, y_sn=y_sn,
                        y_tip=y_tip, yc_cr=yc_cr, ye=ye, yn=yn, z_me=z_me, z_occ=z_occ, z_sn=z_sn,
                        z_st=z_st, z_tip=z_tip, zb=zb, zc_cr=zc_cr, zn=zn)

    def _layout_cranium_neck(self, lm: SimpleNamespace) -> None:
        """Cranium and neck."""
        p = self.p
        yc_cr, zc_cr, a_cr, b_cr, c_cr, m = lm.yc_cr, lm.zc_cr, lm.a_cr, lm.b_cr, lm.c_cr, lm.m
        self.cranium = _Ellipsoid((0, yc_cr, zc_cr), (a_cr, b_cr, c_cr),
                                  shear=p.forehead_slope, margin=m + 14)
        neck = _Ellipsoid((0, 16.0, -215.0), (p.neck_radius_mm, p.neck_radius_mm + 10, 175.0),
                          margin=m + 14)
        self.g_neck = _Group("neck", [_u(neck)])

    def _layout_facial_skeleton(self, lm: SimpleNamespace) -> None:
        """Facial bones (brow ridges, zygomas, orbital rims, maxilla, nasal bones), dental arch, palate."""
        p = self.p
        y_bb, zb, jc, xe, jr, fw, ye = lm.y_bb, lm.zb, lm.jc, lm.xe, lm.jr, lm.fw, lm.ye
        head_half, ear_y, y_sn, z_occ, z_sn = lm.head_half, lm.ear_y, lm.y_sn, lm.z_occ, lm.z_sn
        yn, zn, y_inc, t_soft, m = lm.yn, lm.zn, lm.y_inc, lm.t_soft, lm.m
        brow_bone = _Ellipsoid((0, y_bb + 10.0, zb - 4.0), (14.0, 10.0, 10.0))
        ridges = [_Ellipsoid(jc((s * (xe + 1.0), y_bb + 9.0 + 2.5, zb - 1.0), 1.0), jr((25.0, 9.0, 7.5)),
                             rot=_rotmat(yaw_deg=s * 18.0, roll_deg=-s * (2.0 + 0.5 * p.brow_arch_deg)))
                  for s in (-1, 1)]
        cb = p.cheekbone_mm
        zyg_b = [_Ellipsoid(jc((s * (fw - 18.0 + 0.5 * cb), ye + 13.0, -17.0)), jr((9.0 + 0.3 * cb, 14.0, 9.0)),
                            rot=_rotmat(yaw_deg=s * 30.0)) for s in (-1, 1)]
        infra_rim = [_Capsule((s * (fw - 20.0), ye + 7.0, -16.0), (s * (xe - 6.0), ye + 3.0, -17.0), 4.5)
                     for s in (-1, 1)]
        lat_rim = [_Capsule((s * (xe + 17.0), ye + 3.0, -12.0), (s * (xe + 17.0), ye + 5.0, zb - 2.0), 5.0)
                   for s in (-1, 1)]
        arch = [_Capsule((s * (fw - 14.0), ye + 18.0, -15.0), (s * (head_half - 8.0), ear_y - 12.0, -13.0),
                         4.0) for s in (-1, 1)]
        y_mx = y_sn + 13.0
        z_mx_top, z_mx_bot = -15.0, z_occ + 10.0
        mx_r = (fw - 34.0, 30.0, (z_mx_top - z_mx_bot) / 2.0 + 2.0)
        maxilla = _Ellipsoid((0, y_mx + mx_r[1], (z_mx_top + z_mx_bot) / 2.0), mx_r)
        self.maxilla = maxilla
        frontal_proc = [_Capsule((s * 12.0, y_sn + 15.0, z_sn + 10.0), (s * 9.0, yn + 11.0, zn + 2.0), 5.0)
                        for s in (-1, 1)]
        nasal_bone = _Capsule((0, yn + 10.0, zn + 2.0),
                              (0, yn + 9.0 - 0.3 * p.nose_projection_mm, zn - 0.4 * p.nose_length_mm),
                              4.5, 3.5)

        # dental arch (t in [0, 1] from the midline to the last molar)
        aw = 24.0 + 0.15 * (fw - 66.0)

        def arch_pt(t: float, s: int, dz: float, inset: float = 0.0) -> tuple[float, float, float]:
            return (s * (3.5 + (aw - 3.5) * t ** 0.85) * (1 - inset), y_inc + 4.0 + 36.0 * t ** 1.7 + 30 * inset,
                    dz)

        up_pts = [arch_pt(t, s, z_occ + 11.0) for s, ts in ((-1, np.linspace(1.0, 0.0, 6)),
                                                            (1, np.linspace(0.0, 1.0, 6))) for t in ts]
        up_chain = [_chain("upper_alveolus", up_pts, 5.5)]
        palate = _Ellipsoid((0, y_inc + 26.0, z_occ + 14.0), (aw - 6.0, 24.0, 3.5))
        facebone_ops = [_u(brow_bone), _u(ridges[0], 6), _u(ridges[1], 6), _u(zyg_b[0], 6),
                        _u(zyg_b[1], 6), _u(infra_rim[0], 5), _u(infra_rim[1], 5), _u(arch[0], 4),
                        _u(arch[1], 4),
                        _u(lat_rim[0], 5), _u(lat_rim[1], 5), _u(maxilla, 8), _u(frontal_proc[0], 5),
                        _u(frontal_proc[1], 5), _u(nasal_bone, 4)]
        grow = t_soft + 4.0 + 8.0 + m
        self.g_facebone = _Group("facebone", facebone_ops, margin=grow)
        # upper alveolus and palate: bone only (the lips and perioral pad shape that skin)
        self.g_upper_jaw = _Group("upper_jaw", [_u(palate), *[_u(c, 4) for c in up_chain]], margin=m)
        vars(lm).update(arch_pt=arch_pt, aw=aw, grow=grow, maxilla=maxilla, mx_r=mx_r)

    def _layout_mandible(self, lm: SimpleNamespace) -> None:
        """Mandible and the smooth skin envelope of the jaw."""
        jw, ear_y, z_me, y_pog, arch_pt = lm.jw, lm.ear_y, lm.z_me, lm.y_pog, lm.arch_pt
        z_occ, head_half, ear_z, jc, jr = lm.z_occ, lm.head_half, lm.ear_z, lm.jc, lm.jr
        grow, t_soft, m = lm.grow, lm.t_soft, lm.m
        # mandible
        jb = jw - 14.0
        y_gon = ear_y - 20.0
        z_gon = z_me + 28.0
        y_pog_b = y_pog + 16.5  # centre of the lower-border chain: bone surface 11 mm behind the skin
        n_pts = 13
        low, alv = [], []
        for t in np.linspace(-1.0, 1.0, n_pts):
            at = abs(t)
            low.append((jb * t, y_pog_b + (y_gon - y_pog_b) * at ** 1.8,
                        z_me + 5.0 + (z_gon - z_me - 5.0) * at ** 2.2))
        for s in (-1, 1):
            alv.append([arch_pt(t, s, z_occ - 11.0, inset=0.02) for t in np.linspace(0.0, 1.0, 6)])
        alv_pts = alv[0][::-1] + alv[1]
        md_ops = [_u(_chain("mandible_border", low, 5.5)), _u(_chain("mandible_alveolus", alv_pts, 5.0), 9)]
        mid = n_pts // 2
        for s_idx, s in ((0, -1), (1, 1)):
            chain = alv[s_idx]
            for q, t_low in enumerate(range(mid, n_pts) if s > 0 else range(mid, -1, -1)):
                if q >= len(chain):
                    break
                md_ops.append(_u(_Capsule(low[t_low], chain[q], 4.5), 9))
            # last molar → anterior border of the ramus
            md_ops.append(_u(_Capsule(chain[-1], (s * (jb - 2.0), y_gon + 2.0, z_occ - 2.0), 5.0), 6))
        rami = [_Capsule((s * jb, y_gon, z_gon - 2.0), (s * (head_half - 14.0), ear_y - 6.0, ear_z - 4.0),
                         6.5, 5.0) for s in (-1, 1)]
        chin_b = _Ellipsoid(jc((0, y_pog_b + 3.0, z_me + 12.0), 1.0), jr((14.0, 8.0, 11.0)))
        md_ops += [_u(rami[0], 6), _u(rami[1], 6), _u(chin_b, 6)]
        self.g_mandible = _Group("mandible", md_ops, margin=grow)
        # smooth skin envelope of the jaw: the mandible's border and alveolar arcs, thickened
        tj = t_soft + 4.0
        js_ops = [_u(_chain("jaw_border_skin", low, 5.5 + tj, margin=m)),
                  _u(_chain("jaw_alveolus_skin", alv_pts, 5.0 + tj, margin=m), 12)]
        js_ops += [_u(_Offset(q, -tj), 12) for q in (rami[0], rami[1], chin_b)]
        self.g_jawskin = _Group("jawskin", js_ops, margin=m)
        vars(lm).update(jb=jb, y_gon=y_gon, y_pog_b=y_pog_b, z_gon=z_gon)

    def _layout_cavities(self, lm: SimpleNamespace) -> None:
        """Orbits, the air cavities inside bone, the inner anatomy's own draws (mucosa, fluid level, fillings), vestibule, turbinates."""
        p = self.p
        xe, ye, m, grow, z_sn, y_sn, mx_r = lm.xe, lm.ye, lm.m, lm.grow, lm.z_sn, lm.y_sn, lm.mx_r
        maxilla, y_bb, zb = lm.maxilla, lm.y_bb, lm.zb
        self.orbits = [_Ellipsoid((s * (xe + 1.0), ye + 14.0, 0.5), (17.5, 26.0, 16.5), margin=m)
                       for s in (-1, 1)]
        self.g_orbits = _Group("orbits", [_u(o) for o in self.orbits], margin=grow)
        # air cavities inside bone
        nc_lo, nc_hi = z_sn - 3.0, 12.0
        nasal_cav = _Ellipsoid((0, y_sn + 45.0, (nc_lo + nc_hi) / 2), (11.0, 38.0, (nc_hi - nc_lo) / 2),
                               margin=m)
        sx = 0.45 * mx_r[0] + 8.0
        max_sinus = [_Ellipsoid((s * sx, y_sn + 41.0, maxilla.c[2] + 3.0),
                                (min(9.0, mx_r[0] - sx - 2.0), 15.0, mx_r[2] - 6.0), margin=m)
                     for s in (-1, 1)]
        frontal_sinus = _Ellipsoid((0, y_bb + 12.0, zb + 2.0), (12.0, 5.0, 8.0), margin=m)
        sphenoid = _Ellipsoid((0, y_sn + 74.0, -5.0), (11.0, 10.0, 9.0), margin=m)
        self.nasal_cav = nasal_cav
        self.g_aircav = _Group("aircav", [_u(nasal_cav), _u(max_sinus[0]), _u(max_sinus[1]),
                                          _u(frontal_sinus), _u(sphenoid)])
        self.sinuses = [max_sinus[0], max_sinus[1], frontal_sinus, sphenoid]
        # inner anatomy drawn from its own generator, so face shapes of every seed stay as
        # they were: mucosa thickness, a fluid level (hemosinus) in one maxillary sinus
        irng = np.random.default_rng([int(p.detail_seed) if p.detail_seed >= 0 else 7, 0x1A7E])
        self.mucosa_mm = float(irng.uniform(1.0, 3.0))
        self.fluid_side = int(irng.integers(-1, 2))  # -1 right, 0 none, +1 left sinus
        self.fluid_level_mm = float(irng.uniform(-6.0, 4.0))  # above the sinus centre
        self.n_fillings = int(irng.integers(1, 4))
        self.filling_teeth = [int(x) for x in irng.choice(32, self.n_fillings, replace=False)]
        self.g_vestibule = _Group("vestibule", [
            _u(_Capsule((s * 5.0, y_sn - 2.0 - 0.2 * p.nose_projection_mm, z_sn + 2.0),
                        (s * 6.0, y_sn + 14.0, z_sn + 6.0), 3.0, margin=m)) for s in (-1, 1)])
        self.turbinates = [_Ellipsoid((s * 8.5, y_sn + 50.0, zz), (3.5, 26.0, 4.0), margin=m)
                           for s in (-1, 1) for zz in (z_sn + 5.0, z_sn + 16.0)]

    def _layout_inner_structures(self, lm: SimpleNamespace) -> None:
        """Eye muscles, tongue and oral air, pterygoids, pharynx, teeth and fillings, cervical spine, globes, ventricles."""
        ye, m, y_inc, z_occ, aw, jw, y_gon = lm.ye, lm.m, lm.y_inc, lm.z_occ, lm.aw, lm.jw, lm.y_gon
        y_sn, z_sn, z_st, arch_pt, yc_cr = lm.y_sn, lm.z_sn, lm.z_st, lm.arch_pt, lm.yc_cr
        zc_cr = lm.zc_cr
        # orbits: four recti from the apex to the globe (inside the orbital fat)
        self.eye_muscles = []
        for c in self.eye_c:
            apex = (c[0] * 0.55, ye + 38.0, 0.0)
            for dx, dz in ((0.0, 9.5), (0.0, -9.5), (9.5, 0.0), (-9.5, 0.0)):
                self.eye_muscles.append(_Capsule(apex, (c[0] + dx, ye + 5.0, dz), 1.4, 2.4, margin=m))
        self.g_eye_muscles = _Group("eye_muscles", [_u(q) for q in self.eye_muscles])
        # oral cavity: the tongue in the lower arch, a thin air space under the palate
        self.tongue = _Ellipsoid((0, y_inc + 24.0, z_occ - 7.0), (max(aw - 9.0, 12.0), 27.0, 10.0),
                                 margin=m)
        self.oral_air = _Ellipsoid((0, y_inc + 22.0, z_occ + 4.5), (max(aw - 10.0, 10.0), 22.0, 1.6),
                                   margin=m)
        # medial and lateral pterygoids: between the pterygoid plates and the rami
        self.pterygoids = [_Ellipsoid((s * (jw - 27.0), y_gon - 12.0, z_occ + 6.0), (6.5, 11.0, 16.0),
                                      margin=m) for s in (-1, 1)]
        self.g_pharynx = _Group("pharynx", [
            _u(_Capsule((0, y_sn + 80.0, z_sn + 8.0), (0, y_sn + 90.0, z_st - 20.0), 8.0, margin=m)),
            _u(_Capsule((0, y_sn + 90.0, z_st - 20.0), (0, y_sn + 94.0, -400.0), 7.5, margin=m), 3.0)])
        # teeth (crowns)
        self.teeth = []
        for s in (-1, 1):
            for n in range(8):
                t = (n + 0.5) / 8.0
                size = 3.0 + 2.2 * t
                for up in (1, -1):
                    q = arch_pt(t, s, z_occ + up * 4.6, inset=0.0 if up > 0 else 0.03)
                    self.teeth.append(_Ellipsoid(q, (size * 0.8, size, 4.6), margin=m))
        self.g_teeth = _Group("teeth", [_u(t) for t in self.teeth])
        self.fillings = [_Ellipsoid(self.teeth[n].c, self.teeth[n].r * np.array([0.45, 0.45, 0.4]),
                                    margin=m) for n in self.filling_teeth]
        self.g_fillings = _Group("fillings", [_u(q) for q in self.fillings])
        # cervical spine
        y_spine = y_sn + 110.0
        self.spine_body = _Capsule((0, y_spine, z_st - 20.0), (0, y_spine + 2.0, -400.0), 9.0, margin=m)
        self.spine_canal = _Capsule((0, y_spine + 17.0, z_st - 10.0), (0, y_spine + 19.0, -400.0), 7.0,
                                    margin=m)
        self.spine_cord = _Offset(self.spine_canal, 3.5)
        self.eye_parts = [(_Sphere(c, 12.0), _Sphere(c, 11.0), _Ellipsoid((c[0], c[1] - 7.5, c[2]), (4.5, 2.0, 4.5)))
                          for c in self.eye_c]
        self.spine_arch = _Capsule((0, y_spine + 17.0, z_st - 10.0), (0, y_spine + 19.0, -400.0), 10.5,
                                   margin=m)
        self.ventricles = [_Ellipsoid((s * 7.0, yc_cr - 8.0, zc_cr + 10.0), (4.5, 26.0, 8.0), margin=m)
                           for s in (-1, 1)]

    def _layout_soft_tissue(self, lm: SimpleNamespace) -> None:
        """Soft-tissue pads (malar, buccal, masseter, temporalis, submental, perioral), brows, sockets, chin."""
        p = self.p
        jc, xe, ye, jr, m, z_st, fw, jb = lm.jc, lm.xe, lm.ye, lm.jr, lm.m, lm.z_st, lm.fw, lm.jb
        y_gon, z_gon, y_pog_b, z_me, y_lip = lm.y_gon, lm.z_gon, lm.y_pog_b, lm.z_me, lm.y_lip
        mw, brow_at_eye, zb, brow_front = lm.mw, lm.brow_at_eye, lm.zb, lm.brow_front
        y_pog = lm.y_pog
        f = p.cheek_fullness_mm
        malar = [_Ellipsoid(jc((s * (xe + 6.0), ye + 14.0, -20.0), 2.0), jr((15.0, 14.0 + 0.4 * f, 12.0)),
                            margin=m)
                 for s in (-1, 1)]
        ck_top, ck_bot = -10.0, z_st - 8.0
        buccal = [_Ellipsoid(jc((s * (xe + 7.0), ye + 17.0, (ck_top + ck_bot) / 2), 2.0),
                             jr((16.0 + 0.25 * f, 18.0 + 0.35 * f, (ck_top - ck_bot) / 2)),
                             margin=m) for s in (-1, 1)]
        masseter = [_Capsule(jc((s * (fw - 16.0), ye + 24.0, -18.0), 2.0),
                             jc((s * (jb + 2.0), y_gon + 2.0, z_gon + 2.0), 2.0),
                             8.0 + 0.2 * f, margin=m) for s in (-1, 1)]
        temporalis = [_Ellipsoid((s * (fw - 12.0), ye + 32.0, 2.0), (10.0, 24.0, 24.0), margin=m)
                      for s in (-1, 1)]
        # floor of the mouth / submental soft tissue, joining the chin to the neck
        floor = _Ellipsoid((0, (y_pog_b + y_gon) / 2 + 14.0, z_me + 4.0),
                           (max(jb - 6.0, 20.0), (y_gon - y_pog_b) / 2 + 12.0, 16.0), margin=m)
        perioral = _Ellipsoid(jc((0, y_lip + 24.0, z_st + 2.0), 1.0), (0.75 * mw + 4.0, 19.0, 18.0), margin=m)
        self.masticator = [*masseter, *temporalis, *self.pterygoids]
        self.g_pads = _Group("pads", [_u(q, 6.0) for q in malar + buccal + masseter + temporalis]
                             + [_u(floor, 6.0), _u(perioral, 6.0)], margin=16)
        self.g_brow = _Group("brow", [
            _u(_Ellipsoid(jc((s * (xe + 1.0), brow_at_eye + 9.0 - 1.5, zb), 1.0), jr((22.0, 9.0, 5.5)),
                          rot=_rotmat(yaw_deg=s * 18.0, roll_deg=-s * p.brow_arch_deg), margin=m), 4)
            for s in (-1, 1)] + [
            _u(_Ellipsoid((0, brow_front + 9.0 - 1.0, zb - 3.0), (12.0, 9.0, 8.0), margin=m), 4)])
        self.g_sockets = _Group("sockets", [
            _u(_Ellipsoid((s * (xe + 1.0), ye - 12.0, 1.0), (17.5, 12.0, 12.0), margin=m)) for s in (-1, 1)])
        chin = _Ellipsoid(jc((0, y_pog + 13.0, z_me + 16.0), 1.0), jr((p.chin_width_mm / 2, 13.0, 15.0)),
                          margin=m)
        self.g_chin = _Group("chin", [_u(chin)])

    def _layout_eyes(self, lm: SimpleNamespace) -> None:
        """Eyes and lids (one group per side for left/right feature ids)."""
        p = self.p
        m = lm.m
        # eyes and lids (one group per side for left/right feature ids)
        half_open = p.eye_opening_mm / 2.0
        self.g_eye = []
        for c in self.eye_c:
            ball = _Sphere(c, 12.0, margin=m)
            cornea = _Sphere((c[0], c[1] - 5.5, c[2]), 8.0, margin=m)
            side = 1.0 if c[0] > 0 else -1.0  # lateral corner up: +tilt for the left eye
            lid = _Lid(c, 14.0, 15.0, half_open, margin=m, tilt_deg=side * p.canthal_tilt_deg)
            self.g_eye.append(_Group("eye", [_u(ball), _u(cornea, 1.0), _u(lid, 1.0)]))

    def _layout_nose(self, lm: SimpleNamespace) -> None:
        """Nose: dorsum, tip, alae, base, columella, nostrils."""
        p = self.p
        y_tip, rt, z_tip, yn, zn, m, jc = lm.y_tip, lm.rt, lm.z_tip, lm.yn, lm.zn, lm.m, lm.jc
        y_sn, z_sn, jr = lm.y_sn, lm.z_sn, lm.jr
        # nose
        ra = 5.5
        d_end = np.array((0, y_tip + rt + 0.5, z_tip + 0.7 * rt))
        d_start = np.array((0, yn + ra, zn))
        d_mid = 0.55 * d_start + 0.45 * d_end
        d_mid[1] -= p.nose_hump_mm
        r_mid = 0.5 * (ra + 0.8 * rt)
        dorsum = _Group("dorsum", [_u(_Capsule(d_start, d_mid, ra, r_mid, margin=m)),
                                   _u(_Capsule(d_mid, d_end, r_mid, 0.8 * rt, margin=m), 3.0)])
        tip = _Sphere((0, y_tip + rt, z_tip), rt, margin=m)
        alae = [_Ellipsoid(jc((s * (p.nose_width_mm / 2 - 6.5), y_sn - 4.0, z_sn + 5.0), 0.8), jr((6.5, 8.5, 6.5)),
                           margin=m) for s in (-1, 1)]
        nbase = _Ellipsoid((0, y_sn - 0.45 * p.nose_projection_mm, z_sn + 6.0),
                           (p.nose_width_mm / 2 - 6.0, 0.45 * p.nose_projection_mm + 5.0, 7.0), margin=m)
        columella = _Capsule((0, y_tip + rt, z_tip - 0.5 * rt), (0, y_sn - 1.0, z_sn + 2.0), 3.5, margin=m)
        nostrils = [_Ellipsoid((s * 5.5, y_sn - 4.0 - 0.25 * p.nose_projection_mm, z_sn + 1.0),
                               (3.2, 5.5, 2.5), margin=m) for s in (-1, 1)]
        self.g_nose = _Group("nose", [*dorsum.ops, _u(tip, 4), _u(nbase, 4), _u(alae[0], 3),
                                      _u(alae[1], 3), _u(columella, 2)])
        self.g_nostrils = _Group("nostrils", [_u(nostrils[0]), _u(nostrils[1])])

    def _layout_lips(self, lm: SimpleNamespace) -> None:
        """Lips and mouth."""
        p = self.p
        jc, y_lip, z_st, jr, mw, lf, m = lm.jc, lm.y_lip, lm.z_st, lm.jr, lm.mw, lm.lf, lm.m
        # lips
        upper = _Ellipsoid(jc((0, y_lip + 12.0, z_st + 4.0), 0.7), jr((mw, 12.0, 3.5 + 0.35 * lf), 0.05),
                           margin=m)
        lz = (4.0 + 0.35 * lf) * p.lower_lip_ratio
        lower = _Ellipsoid((0, y_lip + 12.0 + 1.5 / p.lower_lip_ratio, z_st - lz - 0.5),
                           (mw - 4.0, 12.0, lz), margin=m)
        self.g_lips = _Group("lips", [_u(upper), _u(lower, 1.5)])
        self.g_mouth = _Group("mouth", [_u(_Ellipsoid((0, y_lip + 4.0, z_st), (mw - 3.0, 6.0, 0.8),
                                                       margin=m))])

    def _layout_ears(self, lm: SimpleNamespace) -> None:
        """Ears and ear canals."""
        p = self.p
        head_half, ear_y, ear_z, m = lm.head_half, lm.ear_y, lm.ear_z, lm.m
        # ears
        self.g_ear = []
        for s in (-1, 1):
            ang = math.radians(p.ear_protrusion_deg)
            ca, sa = math.cos(ang), math.sin(ang)
            tilt = math.radians(15.0)
            ct, st = math.cos(tilt), math.sin(tilt)
            rz_ = np.array([[ca, s * sa, 0.0], [-s * sa, ca, 0.0], [0, 0, 1.0]])
            rx_ = np.array([[1.0, 0, 0], [0, ct, -st], [0, st, ct]])
            rot = rx_ @ rz_
            cx = s * (head_half + 3.0)
            pinna = _Ellipsoid((cx, ear_y + 6.0, ear_z), (4.5, 17.0, p.ear_length_mm / 2), rot=rot, margin=m)
            lobe_root = _Ellipsoid((cx - s * 3.0, ear_y, ear_z), (6.0, 10.0, 14.0), margin=m)
            concha = _Ellipsoid((cx + s * 4.5, ear_y + 2.0, ear_z - 2.0), (4.5, 8.0, 11.0), rot=rot, margin=m)
            self.g_ear.append(_Group("ear", [_u(pinna), _u(lobe_root, 4), _s(concha, 2.0)]))
        self.ear_canal = [_Capsule((s * (head_half + 4.0), ear_y + 2.0, ear_z - 2.0),
                                   (s * (head_half - 18.0), ear_y + 2.0, ear_z - 2.0), 3.0, margin=m)
                          for s in (-1, 1)]

    def _layout_face_region(self, lm: SimpleNamespace) -> None:
        """Box holding the facial skeleton, cavities, features and ear canals; face soft-tissue limits."""
        zb, z_me, fw, ear_y = lm.zb, lm.z_me, lm.fw, lm.ear_y
        # box holding the facial skeleton, its cavities, the facial features and ear canals
        boxes = [self.g_facebone, self.g_mandible, self.g_upper_jaw, self.g_orbits, self.g_aircav, *self.ear_canal,
                 self.g_nose, self.g_lips, self.g_chin, self.g_brow, *self.g_eye]
        self.face_box = _Box(np.min([b.lo for b in boxes], axis=0), np.max([b.hi for b in boxes], axis=0))
        # face soft-tissue region limits (head-local)
        self.face_z_top = zb + 30.0
        self.face_z_bottom = z_me - 3.0
        self.face_half_width = fw
        self.y_back_face = ear_y - 25.0

    # ------------------------------------------------------------------ extents
    def head_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Approximate local bbox (lo, hi) of the head above the neck (mm)."""
        p = self.p
        lo = np.array([-p.skull_width_mm / 2 - 18, self.y_tip - 2.0, self.z_me - 4.0])
        hi = np.array([p.skull_width_mm / 2 + 18, self.yc_cr + p.skull_length_mm / 2 + 6,
                       p.vertex_height_mm + 2.0])
        return lo, hi


# ----------------------------------------------------------------------------- grid/slabs

def _rotation(pose_deg: tuple[float, float, float]) -> np.ndarray:
    """Local→LPS rotation: yaw about +z (S), pitch about +x (L), roll about +y (P); R = Rz Rx Ry."""
    yaw, pitch, roll = (math.radians(float(v)) for v in pose_deg)
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1.0, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


class _Grid:
    """Voxel planes of a synthetic acquisition in the generator's world frame W (mm).

    Plane ``p`` holds pixels ``(j, i)`` at W = ``(ox + i·di, oy + j·dj + yshift[p], z[p])``;
    ``z`` is increasing. A regular axial stack has ``z = oz + k·dk`` and no shift; a
    gantry-tilted stack shifts each plane's rows, thick slices sample several planes.
    """

    def __init__(self, shape, spacing, origin, rot, centre, plane_z=None, plane_yshift=None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, float)  # (dk, dj, di)
        self.origin = np.asarray(origin, float)  # W of voxel 0
        self.rot = np.asarray(rot, float)
        self.centre = np.asarray(centre, float)
        nk = self.shape[0]
        self.plane_z = (self.origin[2] + self.spacing[0] * np.arange(nk) if plane_z is None
                        else np.asarray(plane_z, float))
        self.plane_yshift = (np.zeros(nk) if plane_yshift is None
                             else np.asarray(plane_yshift, float))
        self._cache: dict[int, tuple[_Prim, tuple[int, ...] | None]] = {}

    def index_box(self, prim: _Prim) -> tuple[int, ...] | None:
        key = id(prim)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is prim:  # the cache keeps prim alive: ids are not reused
            return hit[1]
        lo, hi = prim.lo, prim.hi
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
        world = corners @ self.rot.T + self.centre
        wlo, whi = world.min(axis=0), world.max(axis=0)
        _, dj, di = self.spacing
        _, nj, ni = self.shape
        ox, oy, _ = self.origin
        a_k = int(np.searchsorted(self.plane_z, wlo[2], side="left"))
        b_k = int(np.searchsorted(self.plane_z, whi[2], side="right"))
        a_k, b_k = max(0, a_k - 1), min(self.shape[0], b_k + 1)
        box = [a_k, b_k]
        if a_k < b_k:
            sh = self.plane_yshift[a_k:b_k]
            s_lo, s_hi = float(sh.min()), float(sh.max())
        else:
            s_lo = s_hi = 0.0
        for (lo_w, hi_w, o, d, n) in ((wlo[1] - s_hi, whi[1] - s_lo, oy, dj, nj),
                                      (wlo[0], whi[0], ox, di, ni)):
            a = max(0, math.floor((lo_w - o) / d))
            b = min(n, math.ceil((hi_w - o) / d) + 1)
            box += [a, b]
        res = tuple(box) if box[0] < box[1] and box[2] < box[3] and box[4] < box[5] else None
        self._cache[key] = (prim, res)
        return res


class _Slab:
    """Local coordinates of planes k0..k1 of the grid."""

    def __init__(self, grid: _Grid, k0: int, k1: int) -> None:
        self.grid, self.k0, self.k1 = grid, k0, k1
        _, nj, ni = grid.shape
        dk, dj, di = grid.spacing
        ox, oy, oz = grid.origin
        cx, cy, cz = grid.centre
        wx = (ox + di * np.arange(ni) - cx).astype(np.float32)[None, None, :]
        wy = (oy + dj * np.arange(nj) - cy).astype(np.float32)[None, :, None]
        shift = grid.plane_yshift[k0:k1]
        if np.any(shift != 0):
            wy = wy + shift.astype(np.float32)[:, None, None]
        wz = (grid.plane_z[k0:k1] - cz).astype(np.float32)[:, None, None]
        r = grid.rot.astype(np.float32)
        # local = R^T (world - centre)
        self.x = r[0, 0] * wx + r[1, 0] * wy + r[2, 0] * wz
        self.y = r[0, 1] * wx + r[1, 1] * wy + r[2, 1] * wz
        self.z = r[0, 2] * wx + r[1, 2] * wy + r[2, 2] * wz
        shape = np.broadcast_shapes(self.x.shape, self.y.shape, self.z.shape, (k1 - k0, nj, ni))
        self.x, self.y, self.z = (np.broadcast_to(a, shape) for a in (self.x, self.y, self.z))
        self.shape = shape
        self.world_x = wx + np.float32(cx)
        self.world_y = wy + np.float32(cy)

    def slices(self, prim: _Prim, within: tuple[slice, ...] | None = None):
        box = self.grid.index_box(prim)
        if box is None:
            return None
        k0, k1 = max(box[0], self.k0) - self.k0, min(box[1], self.k1) - self.k0
        j0, j1, i0, i1 = box[2:]
        if within is not None:
            k0, k1 = max(k0, within[0].start), min(k1, within[0].stop)
            j0, j1 = max(j0, within[1].start), min(j1, within[1].stop)
            i0, i1 = max(i0, within[2].start), min(i1, within[2].stop)
        if k0 >= k1 or j0 >= j1 or i0 >= i1:
            return None
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1))

    def coords(self, sl):
        return self.x[sl], self.y[sl], self.z[sl]

    def eval(self, prim: _Prim) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Evaluate a primitive or group inside its box; None when it misses the slab."""
        sl = self.slices(prim)
        if sl is None:
            return None
        if isinstance(prim, _Group):
            shape = tuple(s.stop - s.start for s in sl)
            out = np.full(shape, _BIG, np.float32)
            for op in prim.ops:
                if isinstance(op.prim, _Group):  # nested group: evaluate, then clip to this box
                    sub = self.eval(op.prim)
                    if sub is None:
                        continue
                    ssl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sub[0], sl))
                    if any(s.start >= s.stop for s in ssl):
                        continue
                    d = sub[1][tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, sub[0]))]
                else:
                    ssl = self.slices(op.prim, within=sl)
                    if ssl is None:
                        continue
                    d = op.prim.sdf(*self.coords(ssl))
                rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, sl))
                cur = out[rel]
                if op.kind == "u":
                    out[rel] = _smin(cur, d, op.k)
                elif op.kind == "s":
                    out[rel] = _smax(cur, -d, op.k)
                else:
                    out[rel] = _smax(cur, d, op.k)
            return sl, out
        return sl, prim.sdf(*self.coords(sl))


def _combine(field_arr: np.ndarray, res, kind: str, k: float, base: tuple[slice, ...] | None = None) -> None:
    """In-place smooth union ('u') or subtraction ('s') of an evaluated (sl, values) into a field.

    ``base``: the slab-relative box that ``field_arr`` covers (default: the whole slab)."""
    if res is None:
        return
    sl, d = res
    if base is not None:
        ssl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, base))
        if any(s.start >= s.stop for s in ssl):
            return
        d = d[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, sl))]
        sl = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, base))
    cur = field_arr[sl]
    if kind == "u":
        field_arr[sl] = _smin(cur, d, k)
    else:
        field_arr[sl] = _smax(cur, -d, k)


def _paint(labels: np.ndarray, res, label: int, where: Callable[[np.ndarray], np.ndarray] | None = None,
           thr: float = 0.0) -> None:
    """Set ``labels`` to ``label`` where the evaluated field < thr (and ``where`` holds)."""
    if res is None:
        return
    sl, d = res
    m = d < thr
    if where is not None:
        m &= where(sl)
    labels[sl][m] = label


# ----------------------------------------------------------------------------- result

@dataclass
class SynthHead:
    """Output of :func:`generate_head`.

    ``volume.hu`` is int16 HU, ``labels`` uint8 tissue codes (see module
    docstring), ``feature_ids`` uint8 per-voxel feature codes (0 none,
    1/2 right/left eye, 3 nose, 4 lips, 5 brow, 6 chin, 7/8 right/left ear from the
    skin of the head without ears out, :data:`EAR_LABEL_MIN_MM`),
    ``structures`` uint8 codes of what the facial skeleton encloses
    (:data:`STRUCTURES`). All arrays are ``[k, j, i]`` like ``volume.hu``; for
    thick slices they describe the slice's centre plane.
    ``feature_boxes[k]`` is a list of ``(class_name, i0, j0, i1, j1)``
    (column/row pixel indices, inclusive–exclusive).

    Ground truth of face removal (from the generator's exact geometry):

    * ``skeleton_hull`` — convex hull (LPS mm) of the noise-free bone, teeth and
      dental metal of every sampled plane;
    * ``face_soft_tissue_mask`` — what must be removed: patient soft tissue
      (skin, fat, muscle, soft tissue, eye) more than 2 mm plus half the slice
      thickness or spacing (a slice places bone only to within it) outside
      that hull,
      within the face (head-local: 30 mm above the brow to 3 mm below the
      menton, within the bizygomatic width, 25 mm in front of the ear canals),
      not the ears; only voxels that are more tissue than air (noise-free HU
      > −400), inside the reconstruction circle of a domain head (outside it the
      image holds −1024 HU: no tissue to remove) and, with thick slices, whose
      whole slab holds no bone and no inner structure;
    * ``ear_soft_tissue_mask`` — the auricles' soft tissue outside the hull
      (the whole ear, its root in the head included);
    * :meth:`inside_masks` — what must stay: every structure of
      :data:`STRUCTURES` inside the hull shrunk by 3 mm.

    ``face_label_mask`` is the detector's ``face`` class (its training labels):
    soft tissue with no bone in front of it along −j, within 25 mm of the skin,
    in the face's limits, plus the eye, nose, lip, brow and chin features.
    """

    volume: Volume
    labels: np.ndarray
    feature_ids: np.ndarray
    face_soft_tissue_mask: np.ndarray
    feature_boxes: list[list[tuple[str, int, int, int, int]]]
    params: SubjectParams
    pose_deg: tuple[float, float, float]
    head_centre_lps_mm: np.ndarray
    structures: np.ndarray | None = None
    ear_soft_tissue_mask: np.ndarray | None = None
    skeleton_hull: Any = None
    inside_hull_3mm: np.ndarray | None = None
    rotation_lps: np.ndarray | None = None
    tilt_deg: float = 0.0
    face_label_mask: np.ndarray | None = None
    domain: Any = None

    @property
    def bone_mask(self) -> np.ndarray:
        """Cortical bone, cancellous bone and teeth."""
        return np.isin(self.labels, _BONE_LABELS)

    @property
    def brain_mask(self) -> np.ndarray:
        """Grey and white matter (not CSF)."""
        return np.isin(self.labels, _BRAIN_LABELS)

    @cached_property
    def feature_masks(self) -> dict[str, np.ndarray]:
        """Soft-tissue mask per feature class (``FEATURE_CLASSES``); disjoint."""
        out = {}
        for name in FEATURE_CLASSES:
            codes = [c for c, n in _FEATURE_CODES.items() if n == name]
            out[name] = np.isin(self.feature_ids, codes)
        return out

    def inside_masks(self) -> dict[str, np.ndarray]:
        """Per :data:`STRUCTURES` name: its voxels inside the skeleton hull shrunk by 3 mm."""
        if self.structures is None or self.inside_hull_3mm is None:
            return {}
        return {name: (self.structures == code) & self.inside_hull_3mm
                for name, code in STRUCTURES.items()}

    def label_mask(self, name: str) -> np.ndarray:
        """Boolean mask of one tissue label by name (see ``LABELS``)."""
        if name not in LABELS:
            raise SynthError(f"unknown label {name!r}; known: {', '.join(LABELS)}")
        return self.labels == LABELS[name]


def head_local_to_lps(head: SynthHead, points_mm: np.ndarray) -> np.ndarray:
    """Map head-local points (N×3, mm; x Left, y Posterior, z Superior, origin between the
    pupils) to patient LPS mm using the head's pose and centre."""
    pts = np.asarray(points_mm, float).reshape(-1, 3)
    rot = head.rotation_lps if head.rotation_lps is not None else _rotation(head.pose_deg)
    return pts @ rot.T + head.head_centre_lps_mm


def face_shell(head: SynthHead, shell_hu: float = 350.0, gap_mm: float = 0.0,
               thick_mm: float = 3.5, reach_mm: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """``head``'s HU with a dense shell over its face (a mask, splint, cast or dressing) and
    the shell's mask (both shaped like ``head.volume.hu``).

    The shell is ``thick_mm`` thick, ``gap_mm`` off the skin (0: pressed onto it), over the
    nose, the lips and the face within ``reach_mm`` of them; with a gap, a cushion along its
    rim (its outer 3 mm) reaches down to the skin. It lies in the air around the head, not in
    the nostrils' or the mouth's air (labelled ``internal_air``). Flat ``shell_hu``, no noise (a
    test object). The ground truth of ``head`` still holds outside the shell's voxels.
    """
    from scipy import ndimage as ndi

    v = head.volume
    sp = np.asarray(v.spacing_mm, float)
    hu = v.hu.copy()
    off = ndi.distance_transform_edt(~(hu > -500), sampling=sp)  # mm outside the body
    fm = head.feature_masks
    near = ndi.distance_transform_edt(~(fm["nose"] | fm["lips"]), sampling=sp)
    shell = (off > gap_mm) & (off <= gap_mm + thick_mm) & (near <= reach_mm)
    if gap_mm > 0:
        rim = (near <= reach_mm) & (near > reach_mm - 3.0)
        shell |= (off > 0) & (off <= gap_mm + thick_mm) & rim
    shell &= head.labels == LABELS["air"]
    hu[shell] = np.asarray(shell_hu).astype(hu.dtype)
    return hu, shell


# ----------------------------------------------------------------------------- generator

def _check_inputs(shape, spacing_mm, noise_hu, blur_sigma_mm, pose_deg) -> None:
    if len(shape) != 3 or any(int(s) != s or s < 4 for s in shape):
        raise SynthError(f"shape must be three integers ≥ 4, got {shape}")
    if int(np.prod(shape)) > 200_000_000:
        raise SynthError(f"shape {shape} is too large (over 2e8 voxels)")
    if len(spacing_mm) != 3 or any(not (0.05 <= float(s) <= 20.0) for s in spacing_mm):
        raise SynthError(f"spacing_mm must be three values in [0.05, 20] mm, got {spacing_mm}")
    if not (0.0 <= float(noise_hu) <= 500.0):
        raise SynthError(f"noise_hu must be in [0, 500], got {noise_hu}")
    if not (0.0 <= float(blur_sigma_mm) <= 10.0):
        raise SynthError(f"blur_sigma_mm must be in [0, 10], got {blur_sigma_mm}")
    if pose_deg is not None and (
            len(pose_deg) != 3 or any(not math.isfinite(float(a)) or abs(float(a)) > 45 for a in pose_deg)):
        raise SynthError(f"pose_deg must be three angles within ±45°, got {pose_deg}")


def _acquisition(shape, spacing_mm, tilt_deg, positions_mm, thickness_mm
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Slice table positions, per-slice thickness, and the planes to sample.

    Returns ``(z_table, thickness, plane_offset, plane_slice)``: each slice's table
    position (mm, increasing), its slab thickness along the plane normal (0: one
    plane), and for every sampled plane its offset along the normal from its
    slice's centre and the slice it belongs to. Thick slabs are sampled every
    ≤ 1 mm (partial volume across the slab).
    """
    if positions_mm is None:
        z = float(spacing_mm[0]) * np.arange(shape[0], dtype=float)
    else:
        z = np.asarray(positions_mm, float)
        if z.ndim != 1 or z.size < 2 or np.any(np.diff(z) <= 0) or not np.all(np.isfinite(z)):
            raise SynthError("positions_mm must be at least two increasing finite table positions")
    if thickness_mm is None:
        th = np.zeros(z.size)
    else:
        th = np.broadcast_to(np.asarray(thickness_mm, float), z.shape).astype(float)
        if np.any(th < 0) or np.any(th > 10.0):
            raise SynthError("thickness_mm must be in [0, 10] mm")
    if not -30.0 <= float(tilt_deg) <= 30.0:
        raise SynthError(f"tilt_deg must be within ±30°, got {tilt_deg}")
    offs, owner = [], []
    for k, t in enumerate(th):
        m = max(1, int(np.ceil(t / 1.0))) if t > 1.0 else 1
        o = (np.arange(m) + 0.5) / m * t - t / 2.0 if m > 1 else np.zeros(1)
        offs.append(o)
        owner.append(np.full(m, k))
    return z, th, np.concatenate(offs), np.concatenate(owner)


def generate_head(
    params: SubjectParams | None = None,
    *,
    shape: tuple[int, int, int] = (80, 96, 96),
    spacing_mm: tuple[float, float, float] = (3.0, 2.5, 2.5),
    pose_deg: tuple[float, float, float] | None = None,
    noise_hu: float = 12.0,
    noise_seed: int = 0,
    blur_sigma_mm: float = 0.5,
    couch: bool = True,
    tilt_deg: float = 0.0,
    positions_mm: Any = None,
    thickness_mm: Any = None,
    metal: bool = False,
    domain: Any = None,
) -> SynthHead:
    """Voxelise a synthetic head CT.

    ``shape`` = ``(n_slices, rows, cols)``, ``spacing_mm`` = ``(dk, dj, di)``
    in mm. Standard axial orientation (ImageOrientationPatient 1,0,0,0,1,0,
    slices increasing to Superior); the origin is chosen so that the head
    (chin to vertex, nose tip to occiput, ear to ear) is centred in the
    field of view. ``pose_deg`` = ``(yaw, pitch, roll)`` in degrees:
    right-handed rotations of the head about the patient S, L and P axes
    (applied roll, then pitch, then yaw). ``None`` draws a small random pose
    (each angle uniform in ±4°) from ``noise_seed``. ``noise_hu`` is the
    standard deviation of white Gaussian noise (HU) added after a Gaussian
    partial-volume blur of ``blur_sigma_mm`` (mm). ``couch`` adds a curved
    head-rest posterior to the head (label 14, outside the patient).

    Acquisitions as routine head CT has them:

    * ``tilt_deg``: gantry tilt (±30°): slice planes tilted about the patient's
      left–right axis (ImageOrientationPatient ``1,0,0, 0,cos,−sin``), stacked
      along the table (a sheared stack);
    * ``positions_mm``: table position of every slice (increasing; overrides
      ``shape[0]`` and ``dk``), e.g. 4 mm slices then 7 mm slices;
    * ``thickness_mm``: slab thickness per slice (scalar or per slice): each
      slice averages planes ≤ 1 mm apart across its slab (partial volume);
    * ``metal``: dental fillings (3071 HU) with streak artefacts.

    ``domain``: a :class:`pipeline.synth_domain.DomainParams` (domain
    randomisation for detector training: body habitus, age, a hollow nose and
    thin auricles, skull base, head holders, pathology, HU and kernel
    variety; see that module). ``None`` (default) gives exactly the heads of
    earlier versions.

    Deterministic for equal arguments. Raises :class:`SynthError` for invalid
    input.
    """
    params = SubjectParams() if params is None else params
    if not isinstance(params, SubjectParams):
        raise SynthError("params must be a SubjectParams")
    params.validate()
    shape = tuple(int(s) if float(s).is_integer() else s for s in shape)  # type: ignore[assignment]
    _check_inputs(shape, spacing_mm, noise_hu, blur_sigma_mm, pose_deg)
    if pose_deg is None:
        prng = np.random.default_rng([int(noise_seed), 0x9053])
        pose_deg = tuple(float(a) for a in prng.uniform(-4.0, 4.0, size=3))
    pose = tuple(float(a) for a in pose_deg)
    z_tab, thick, plane_off, plane_owner = _acquisition(shape, spacing_mm, tilt_deg, positions_mm,
                                                        thickness_mm)
    nk = z_tab.size
    shape = (nk, shape[1], shape[2])

    model = _HeadModel(params)
    if domain is not None:  # domain randomisation: extra anatomy, see pipeline.synth_domain
        domain.extend_model(model)
    # patient frame of the slices: row, column, plane normal (tilted about L)
    t = math.radians(float(tilt_deg))
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(t), -math.sin(t)])
    nrm = np.cross(row, col)
    frame = np.column_stack([row, col, nrm])  # W (generator world) → patient LPS
    rot_lps = _rotation(pose)
    rot = frame.T @ rot_lps  # the head's pose in W
    _, nj, ni = shape
    dk, dj, di = (float(s) for s in spacing_mm)
    lo, hi = model.head_extent()
    mid_local = (lo + hi) / 2.0
    z_mid = (z_tab[0] + z_tab[-1]) / 2.0
    # the FOV centred on LPS (0, 0, 0): slice k's centre plane sits at table z_k − z_mid
    zc = z_tab - z_mid
    plane_z = zc[plane_owner] * math.cos(t) + plane_off
    plane_y = -zc[plane_owner] * math.sin(t)
    order = np.argsort(plane_z, kind="stable")
    origin = np.array([-(ni - 1) * di / 2.0, -(nj - 1) * dj / 2.0, 0.0])
    if domain is not None:  # the head off the centre of the field of view
        origin[:2] -= np.asarray(domain.fov_shift_mm, float)
    centre = frame.T @ -(rot_lps @ mid_local)  # W of the head-local origin; local mid → LPS 0
    n_planes = plane_z.size
    grid = _Grid((n_planes, nj, ni), (dk, dj, di), origin, rot, centre,
                 plane_z=plane_z[order], plane_yshift=plane_y[order])

    labels_p = np.zeros((n_planes, nj, ni), np.uint8)
    feat_p = np.zeros((n_planes, nj, ni), np.uint8)
    face_p = np.zeros((n_planes, nj, ni), np.uint8)  # bit 1: face zone, bit 2: detector label
    struct_p = np.zeros((n_planes, nj, ni), np.uint8)
    hu_p = np.empty((n_planes, nj, ni), np.float32)
    aa_mm = float(np.mean([dk if thick.max() == 0 else 1.0, dj, di]))
    slab_k = max(1, int(1_500_000 // (nj * ni)))
    for k0 in range(0, n_planes, slab_k):
        k1 = min(n_planes, k0 + slab_k)
        slab = _Slab(grid, k0, k1)
        _fill_slab(model, slab, labels_p[k0:k1], feat_p[k0:k1], face_p[k0:k1], hu_p[k0:k1],
                   struct_p[k0:k1], couch=couch, aa_mm=aa_mm, metal=metal)

    # ground-truth skeleton hull from the bone of every plane (LPS mm)
    hull_pts = _bone_extremes(labels_p, grid)
    # loaded on first use: pulls in scipy
    from .envelope import SkeletonHull

    hull = SkeletonHull.of_points(hull_pts @ frame.T, 0.0) if len(hull_pts) >= 4 else None

    # planes → slices: centre plane for labels; slab mean for HU
    inv = np.empty(n_planes, int)
    inv[order] = np.arange(n_planes)
    centre_plane = np.empty(nk, int)
    for k in range(nk):
        ps = np.flatnonzero(plane_owner == k)
        centre_plane[k] = inv[ps[np.argmin(np.abs(plane_off[ps]))]]
    labels, feat = labels_p[centre_plane], feat_p[centre_plane]
    face_zone, struct = (face_p[centre_plane] & 1) > 0, struct_p[centre_plane]
    face_label = (face_p[centre_plane] & 2) > 0
    ears_all = np.isin(feat, (7, 8) + _EAR_ROOT_CODES)  # the whole ear, for its ground truth
    feat[np.isin(feat, _EAR_ROOT_CODES)] = 0  # the label: the auricle from the skin out
    if n_planes == nk:
        hu_f = hu_p[centre_plane].copy()
        slab_any_bone = np.isin(labels, _BONE_OR_METAL)
        slab_any_struct = struct > 0
    else:
        hu_f = np.empty((nk, nj, ni), np.float32)
        slab_any_bone = np.zeros((nk, nj, ni), bool)
        slab_any_struct = np.zeros((nk, nj, ni), bool)
        for k in range(nk):
            ps = inv[np.flatnonzero(plane_owner == k)]
            hu_f[k] = hu_p[ps].mean(axis=0)
            slab_any_bone[k] = np.isin(labels_p[ps], _BONE_OR_METAL).any(axis=0)
            slab_any_struct[k] = (struct_p[ps] > 0).any(axis=0)
    del hu_p, labels_p, feat_p, face_p, struct_p
    tissue = hu_f > -400.0  # noise-free: more tissue than air in the voxel (or its slab)
    outside = domain.outside_reconstruction(nj, ni) if domain is not None else None
    if outside is not None:  # the image holds nothing there: nothing to remove
        tissue &= ~outside
    if metal:
        _add_streaks(hu_f, labels, (dj, di), noise_seed)
    if domain is not None:
        hu = domain.finish_hu(hu_f, labels, (float(np.median(np.diff(z_tab))) if nk > 1 else dk, dj, di),
                              blur_sigma_mm, noise_hu, noise_seed, blur_slices=n_planes == nk)
    else:
        hu = _finish_hu(hu_f, (float(np.median(np.diff(z_tab))) if nk > 1 else dk, dj, di),
                        blur_sigma_mm, noise_hu, noise_seed, blur_slices=n_planes == nk)
    del hu_f
    boxes = _feature_boxes(feat)
    # slice k's first pixel: W (ox, oy + plane_y, plane_z) for its centre plane
    positions = np.array([frame @ np.array([origin[0], origin[1] - zc[k] * math.sin(t),
                                            zc[k] * math.cos(t)]) for k in range(nk)])
    step = positions[-1] - positions[0]
    along = step @ nrm
    stack_dir = step / along if abs(along) > 1e-9 else nrm
    spacing_k = float(along / (nk - 1)) if nk > 1 else dk
    vol = Volume(hu=hu, spacing_mm=(spacing_k, dj, di), origin_lps_mm=positions[0],
                 row_cosine=row, col_cosine=col, normal=stack_dir, slice_positions_lps_mm=positions)
    head = SynthHead(volume=vol, labels=labels, feature_ids=feat, face_soft_tissue_mask=face_zone,
                     feature_boxes=boxes, params=params, pose_deg=pose,
                     head_centre_lps_mm=frame @ np.asarray(centre, float), structures=struct,
                     skeleton_hull=hull, rotation_lps=rot_lps, tilt_deg=float(tilt_deg),
                     face_label_mask=face_label, domain=domain)
    _ground_truth(head, slab_any_bone, slab_any_struct, tissue, thick, ears_all)
    return head


def _bone_extremes(labels: np.ndarray, grid: _Grid) -> np.ndarray:
    """W coordinates (mm) of the outermost bone/teeth/metal pixels of every plane, ± half a pixel."""
    _, dj, di = grid.spacing
    ox, oy, _ = grid.origin
    # loaded on first use: pulls in scipy
    from .envelope import outline_pixels

    pts = []
    for p in range(labels.shape[0]):
        idx = outline_pixels(np.isin(labels[p], _BONE_OR_METAL))
        if not idx.size:
            continue
        jj, ii = idx[:, 0].astype(float), idx[:, 1].astype(float)
        for sj in (-0.5, 0.5):
            for si in (-0.5, 0.5):
                pts.append(np.column_stack([ox + (ii + si) * di,
                                            oy + (jj + sj) * dj + grid.plane_yshift[p],
                                            np.full(ii.size, grid.plane_z[p])]))
    return np.concatenate(pts) if pts else np.zeros((0, 3))


def _ground_truth(head: SynthHead, slab_bone: np.ndarray, slab_struct: np.ndarray,
                  tissue: np.ndarray, thickness: np.ndarray, ears_all: np.ndarray) -> None:
    """Fill the face / ear / inside ground truth of ``head`` from its skeleton hull
    (``ears_all``: every ear voxel, its root inside the head included)."""
    # loaded on first use: pulls in scipy
    from .envelope import SliceStack, halfspace_row_spans, polygon_row_spans

    vol, hull = head.volume, head.skeleton_hull
    nk, nj, ni = vol.hu.shape
    face_zone = head.face_soft_tissue_mask
    soft = np.isin(head.labels, SOFT_TISSUE_LABELS)
    ears = ears_all & soft
    if hull is None:
        head.face_soft_tissue_mask = face_zone & ~slab_bone & ~slab_struct & tissue
        head.ear_soft_tissue_mask = ears & tissue
        head.inside_hull_3mm = np.zeros(vol.hu.shape, bool)
        return
    st = SliceStack.of(vol)
    # a slice of thickness (or spacing) T places bone only to within T/2 along its normal
    extent = np.round(np.maximum(thickness, st.cells_mm), 1)
    grown = {float(t): hull.grown(2.0 + float(t) / 2.0) for t in np.unique(extent)}
    rows = np.arange(nj)
    cols = np.arange(ni)[None, :]
    outside2 = np.zeros(vol.hu.shape, bool)
    inside3 = np.zeros(vol.hu.shape, bool)
    dj, di = st.pixel_mm
    for k in range(nk):
        o = st.origins[k]
        poly = grown[float(extent[k])].plane_polygon(o, st.row, st.col, st.normal)
        lo, hi = polygon_row_spans(poly, rows, dj, di)
        outside2[k] = ~((cols >= lo[:, None]) & (cols <= hi[:, None]))
        lo3, hi3 = halfspace_row_spans(hull.equations, o, st.row, st.col, rows, dj, di, ni, 3.0)
        inside3[k] = (cols >= lo3[:, None]) & (cols <= hi3[:, None])
    head.face_soft_tissue_mask = face_zone & outside2 & ~slab_bone & ~slab_struct & tissue
    head.ear_soft_tissue_mask = ears & outside2 & ~slab_bone & tissue
    head.inside_hull_3mm = inside3


def _add_streaks(hu: np.ndarray, labels: np.ndarray, pixel_mm: tuple[float, float],
                 seed: int) -> None:
    """Metal streak artefacts around dental metal (label ``metal``), in place (noise-free HU).

    Per slice holding metal: 12 lines through the metal's centroid at random
    angles, alternating bright and dark (±250…900 HU), ≈ 1 mm wide, fading
    over ≈ 50 mm — into the lips, the cheeks and the air in front of the face.
    """
    rng = np.random.default_rng([int(seed), 0x57EA])
    dj, di = pixel_mm
    nk, nj, ni = hu.shape
    yy = np.arange(nj)[:, None] * dj
    xx = np.arange(ni)[None, :] * di
    for k in range(nk):
        m = labels[k] == _L["metal"]
        if not m.any():
            continue
        jj, ii = np.nonzero(m)
        cy, cx = jj.mean() * dj, ii.mean() * di
        r = np.hypot(yy - cy, xx - cx)
        fade = np.exp(-r / 50.0) * (r > 2.0)
        acc = np.zeros((nj, ni), np.float32)
        for n in range(12):
            a = rng.uniform(0.0, np.pi)
            amp = rng.uniform(250.0, 900.0) * (1 if n % 2 else -1)
            dist = np.abs((yy - cy) * np.cos(a) - (xx - cx) * np.sin(a))
            acc += (amp * np.exp(-(dist ** 2) / (2 * 0.6 ** 2)) * fade).astype(np.float32)
        hu[k] += acc


def _fill_slab(model: _HeadModel, slab: _Slab, labels: np.ndarray, feat: np.ndarray,
               face: np.ndarray, hu: np.ndarray, struct: np.ndarray, *, couch: bool, aa_mm: float,
               metal: bool = False) -> None:
    """Label one slab and write its noise-free HU (all arrays are views into the full ones).

    The skin/air boundary is anti-aliased from the skin distance field (partial
    volume: a linear ramp over one voxel, ``aa_mm``), so that iso-surfaces of the
    HU volume are smooth at sub-voxel level. Work on the facial skeleton, features
    and face mask is confined to the box ``model.face_box``.
    """
    L = _L
    shape = slab.shape
    fb = slab.slices(model.face_box)  # slab-relative box of the face; None if the slab misses it
    if fb is not None:
        fb = (fb[0], slice(0, fb[1].stop), fb[2])  # from the anterior edge (for "bone in front")
    # the steps run in this order and hand their results on in ``st``
    st = SimpleNamespace(L=L, aa_mm=aa_mm, couch=couch, face=face, fb=fb, feat=feat, hu=hu,
                         labels=labels, metal=metal, model=model, shape=shape, slab=slab,
                         struct=struct)
    _slab_bone_field(st)
    _slab_skin_field(st)
    _slab_soft_layers(st)
    _slab_cranium(st)
    _slab_face_bone_and_eyes(st)
    _slab_air_and_sinuses(st)
    _slab_mouth_teeth_spine(st)
    _slab_features(st)
    _slab_structures(st)
    _slab_couch(st)
    _slab_hu(st)


def _slab_bone_field(st: SimpleNamespace) -> None:
    """Bone distance field E of the facial skeleton and orbits (face box only)."""
    fb, slab, model = st.fb, st.slab, st.model
    E = None
    if fb is not None:
        E = np.full(tuple(s.stop - s.start for s in fb), _BIG, np.float32)
        _combine(E, slab.eval(model.g_facebone), "u", 0.0, base=fb)
        _combine(E, slab.eval(model.g_orbits), "s", 2.0, base=fb)
    vars(st).update(E=E)


def _slab_skin_field(st: SimpleNamespace) -> None:
    """Skin distance field S: cranium, neck, face over bone, pads, features, cavities."""
    shape, slab, model, E, fb = st.shape, st.slab, st.model, st.E, st.fb
    S = np.full(shape, _BIG, np.float32)
    r_cr = slab.eval(model.cranium)
    _combine(S, r_cr, "u", 0.0)
    _combine(S, slab.eval(model.g_neck), "u", 14.0)
    if E is not None:  # facial skin follows the mid/upper facial skeleton (orbits open)
        S[fb] = _smin(S[fb], E - np.float32(model.t_soft), 8.0)
        _combine(E, slab.eval(model.g_mandible), "u", 6.0, base=fb)
        _combine(E, slab.eval(model.g_upper_jaw), "u", 5.0, base=fb)
    _combine(S, slab.eval(model.g_jawskin), "u", 10.0)
    _combine(S, slab.eval(model.g_pads), "u", 16.0)
    dom = getattr(model, "domain", None)  # domain randomisation (pipeline.synth_domain) or None
    if dom is not None:
        dom.skin_unions(model, slab, S)
    r_brow = slab.eval(model.g_brow)
    r_chin = slab.eval(model.g_chin)
    _combine(S, r_brow, "u", 6.0)
    _combine(S, r_chin, "u", 8.0)
    _combine(S, slab.eval(model.g_sockets), "s", 7.0)
    r_eyes = [slab.eval(g) for g in model.g_eye]
    for r in r_eyes:
        _combine(S, r, "u", 1.5)
    r_nose = slab.eval(model.g_nose)
    r_lips = slab.eval(model.g_lips)
    nose_s0 = None
    if dom is None:
        # the face without the nose (lips united as below), for the nose label only: the
        # skin field S itself, hence HU and tissue labels, is the generator's old one
        if r_nose is not None:
            nose_s0 = S[r_nose[0]].copy()
            _combine(nose_s0, r_lips, "u", 5.0, base=r_nose[0])
        _combine(S, r_nose, "u", 5.0)
        _combine(S, r_lips, "u", 5.0)
    else:  # domain heads: the lips first, so that the nose is what stands out of the face
        _combine(S, r_lips, "u", 5.0)
        nose_s0 = None if r_nose is None else S[r_nose[0]].copy()
        _combine(S, r_nose, "u", 4.0)
    r_ears = [slab.eval(g) for g in model.g_ear]
    # the head without the ears, for the ear label only (the skin field S itself is unchanged)
    ear_s0 = [None if r is None else S[r[0]].copy() for r in r_ears]
    for r in r_ears:
        _combine(S, r, "u", 3.0)
    _combine(S, slab.eval(model.g_mouth), "s", 1.0)
    _combine(S, slab.eval(model.g_nostrils), "s", 1.5)
    r_air = slab.eval(model.g_aircav)
    if E is not None:
        _combine(E, r_air, "s", 1.0, base=fb)
        # bone is always covered by ≥ 3 mm of soft tissue
        np.minimum(S[fb], E - np.float32(3.0), out=S[fb])

    def E_at(s):  # E on a slab-relative box inside the face box
        return E[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(s, fb))]
    vars(st).update(E_at=E_at, S=S, dom=dom, ear_s0=ear_s0, nose_s0=nose_s0, r_air=r_air, r_brow=r_brow,
                    r_chin=r_chin, r_cr=r_cr, r_ears=r_ears, r_eyes=r_eyes, r_lips=r_lips,
                    r_nose=r_nose)


def _slab_soft_layers(st: SimpleNamespace) -> None:
    """Soft-tissue layers by skin depth: muscle, fat, skin."""
    S, dom, labels = st.S, st.dom, st.labels
    layer = np.digitize(S, _SKIN_DEPTHS if dom is None else dom.skin_depths)  # 0 deep, 1 fat, 2 skin, 3 out
    inside = layer < 3
    labels[inside] = _SKIN_LAYER_LABELS[layer[inside]]
    del layer, inside


def _slab_cranium(st: SimpleNamespace) -> None:
    """Cranium: tables, diploe, CSF, cortex and white matter, fissure, ventricles."""
    r_cr, model, slab, labels, L = st.r_cr, st.model, st.slab, st.labels, st.L
    if r_cr is not None:
        sl, C = r_cr
        C = C + np.float32(model.p.scalp_mm)  # skull outer surface: C < 0
        x, y, z = slab.coords(sl)
        zrel = z - _skull_base_z(x, y)  # height above the cranial-cavity floor
        # depth class (C) × height class (zrel) → label (255: keep); see _CRANIUM_TABLE
        code = np.digitize(C, _CRANIUM_C_EDGES).astype(np.uint8)
        code *= np.uint8(len(_CRANIUM_Z_EDGES) + 1)
        code += np.digitize(zrel, _CRANIUM_Z_EDGES).astype(np.uint8)
        new = _CRANIUM_TABLE[code]
        del code
        lab = labels[sl]
        keep = new == 255
        np.copyto(lab, new, where=~keep)
        # interhemispheric fissure (upper brain, midline)
        fis = (new == L["white_matter"]) | (new == L["grey_matter"])
        fis &= zrel > 25.0
        fis &= np.abs(x) < 1.2
        lab[fis] = L["csf"]
        for v in model.ventricles:
            _paint(labels, slab.eval(v), L["csf"], where=lambda s: labels[s] == L["white_matter"])


def _slab_face_bone_and_eyes(st: SimpleNamespace) -> None:
    """Facial bone, orbital fat, globes (sclera, vitreous, lens) and recti."""
    E, labels, fb, L, S, E_at, model = st.E, st.labels, st.fb, st.L, st.S, st.E_at, st.model
    slab = st.slab
    if E is not None:
        lab = labels[fb]
        lab[E < 0] = L["cancellous_bone"]
        lab[(E < 0) & (E > -1.8)] = L["cortical_bone"]
        # orbit contents: fat (not replacing the skin layers)
        deep = lambda s: (S[s] < -4.0) & (E_at(s) >= 0) & np.isin(labels[s], (1, 2, 3, 4))
        for o in model.orbits:
            _paint(labels, slab.eval(o), L["fat"], where=deep)
    # eyes: sclera, vitreous, lens; the recti in the orbital fat
    for sclera, vitreous, lens in model.eye_parts:
        _paint(labels, slab.eval(sclera), L["soft_tissue"])
        _paint(labels, slab.eval(vitreous), L["vitreous"])
        _paint(labels, slab.eval(lens), L["lens"])
    r_em = slab.eval(model.g_eye_muscles)
    _paint(labels, r_em, L["muscle"], where=lambda s: labels[s] == L["fat"])
    vars(st).update(r_em=r_em)


def _slab_air_and_sinuses(st: SimpleNamespace) -> None:
    """Air cavities inside the body, turbinates, sinus mucosa and a fluid level."""
    labels, L, r_air, S, slab, model = st.labels, st.L, st.r_air, st.S, st.slab, st.model
    # air cavities (inside the body)
    is_body = lambda s: labels[s] != L["air"]
    # cavities replace bone and soft tissue only (never brain, CSF or eyes)
    carvable = lambda s: np.isin(labels[s], (1, 2, 3, 4, 5, 6))
    _paint(labels, r_air, L["internal_air"], where=lambda s: carvable(s) & (S[s] < -2.5))
    _paint(labels, slab.eval(model.g_vestibule), L["internal_air"],
           where=lambda s: is_body(s) & (S[s] < -1.5))
    _paint(labels, slab.eval(model.g_pharynx), L["internal_air"], where=is_body)
    for tb in model.turbinates:
        _paint(labels, slab.eval(tb), L["soft_tissue"], where=lambda s: labels[s] == L["internal_air"])
    # sinus mucosa lining the cavities, and a fluid level (hemosinus) in one maxillary sinus
    r_sinus = [slab.eval(q) for q in model.sinuses]
    for n, res in enumerate(r_sinus):
        if res is None:
            continue
        sl, d = res
        lab = labels[sl]
        air = lab == L["internal_air"]
        lab[air & (d < 0) & (d > -np.float32(model.mucosa_mm))] = L["soft_tissue"]
        if n < 2 and model.fluid_side == (1 if n == 1 else -1):
            level = np.float32(model.sinuses[n].c[2] + model.fluid_level_mm)
            lab[(lab == L["internal_air"]) & (d < 0) & (slab.z[sl] < level)] = L["fluid"]
    vars(st).update(is_body=is_body, r_sinus=r_sinus)


def _slab_mouth_teeth_spine(st: SimpleNamespace) -> None:
    """Tongue, oral air, pterygoids, nasal septum, ear canals, teeth and fillings, spine."""
    labels, S, slab, model, L, r_air, E = st.labels, st.S, st.slab, st.model, st.L, st.r_air, st.E
    is_body, E_at, dom, r_nose, nose_s0 = st.is_body, st.E_at, st.dom, st.r_nose, st.nose_s0
    metal = st.metal
    # oral cavity: the tongue, a thin air space under the palate; pterygoid muscles
    mouth_soft = lambda s: np.isin(labels[s], (1, 2, 3, 4)) & (S[s] < -4.0)
    r_tongue = slab.eval(model.tongue)
    _paint(labels, r_tongue, L["muscle"], where=mouth_soft)
    r_oral = slab.eval(model.oral_air)
    _paint(labels, r_oral, L["internal_air"], where=mouth_soft)
    r_pter = [slab.eval(q) for q in model.pterygoids]
    for res in r_pter:
        _paint(labels, res, L["muscle"], where=lambda s: np.isin(labels[s], (2, 3, 4)))
    r_nc = slab.eval(model.nasal_cav) if r_air is not None else None
    if r_nc is not None:  # nasal septum
        sl, d = r_nc
        lab = labels[sl]
        ax = np.abs(slab.x[sl])
        sept = (d < -1.5) & (ax < 1.1) & (lab == L["internal_air"])
        lab[sept] = L["soft_tissue"]  # cartilage and mucosa in front, thin bone behind
        lab[sept & (slab.y[sl] > np.float32(model.y_sn + 40.0)) & (ax < 0.6)] = L["cortical_bone"]
    if E is not None:
        for ec in model.ear_canal:
            _paint(labels, slab.eval(ec), L["internal_air"], where=lambda s: is_body(s) & (E_at(s) >= 0))
    # teeth, and fillings of dental metal when asked for
    if dom is not None:
        dom.paint_inner(model, slab, labels, S, r_nose, nose_s0)
    if dom is None or not dom.edentulous:
        _paint(labels, slab.eval(model.g_teeth), L["teeth"])
    if metal and (dom is None or not dom.edentulous):
        _paint(labels, slab.eval(model.g_fillings), L["metal"], where=lambda s: labels[s] == L["teeth"])
    # spine
    _paint(labels, slab.eval(model.spine_arch), L["cortical_bone"], where=is_body)
    _paint(labels, slab.eval(model.spine_canal), L["csf"], where=is_body)
    _paint(labels, slab.eval(model.spine_cord), L["soft_tissue"], where=is_body)
    r_sp = slab.eval(model.spine_body)
    if r_sp is not None:
        sl, d = r_sp
        z = slab.z[sl]
        disc = np.mod(z, np.float32(17.0)) < 4.0
        lab = labels[sl]
        m = (d < 0) & (lab != 0)
        lab[m] = L["cancellous_bone"]
        lab[m & (d > -1.5)] = L["cortical_bone"]
        lab[m & disc] = L["soft_tissue"]
    vars(st).update(r_nc=r_nc, r_oral=r_oral, r_tongue=r_tongue)


def _slab_features(st: SimpleNamespace) -> None:
    """Facial-feature ids and the face soft-tissue mask."""
    r_ears, feat, labels, fb, r_eyes = st.r_ears, st.feat, st.labels, st.fb, st.r_eyes
    r_nose, r_lips, r_brow, r_chin, nose_s0 = st.r_nose, st.r_lips, st.r_brow, st.r_chin, st.nose_s0
    slab, model, S, r_nc, face = st.slab, st.model, st.S, st.r_nc, st.face
    for res, s0, code, root in zip(r_ears, st.ear_s0, (7, 8), _EAR_ROOT_CODES):
        if res is not None:
            sl, d = res
            fsl = feat[sl]
            ear = (d < 0.0) & np.isin(labels[sl], SOFT_TISSUE_LABELS)
            out = s0 >= EAR_LABEL_MIN_MM
            fsl[ear & out] = code
            fsl[ear & ~out] = root
    if fb is not None:
        lab = labels[fb]
        soft = np.isin(lab, SOFT_TISSUE_LABELS)
        bone_any = np.isin(lab, _BONE_LABELS)
        np.logical_or.accumulate(bone_any, axis=1, out=bone_any)  # any bone at smaller j (anterior)
        ffb = feat[fb]
        order = [(r_eyes[0], 1), (r_eyes[1], 2), (r_nose, 3), (r_lips, 4), (r_brow, 5), (r_chin, 6)]
        for res, code in order:
            if res is None:
                continue
            sl, d = res
            ssl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, fb))
            if any(s.start >= s.stop for s in ssl):
                continue
            rel_d = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, sl))
            rel_f = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, fb))
            fsl = ffb[rel_f]
            m = (d[rel_d] < 0.0) & soft[rel_f] & (fsl == 0)
            if code == 3 and nose_s0 is not None:  # the nose standing out of the face (all heads)
                m = (nose_s0[rel_d] >= NOSE_LABEL_MIN_MM) & soft[rel_f] & (fsl == 0)
            elif code >= 3:  # nose, lips, brow, chin: only the soft tissue in front of the skeleton
                m &= ~bone_any[rel_f]
            fsl[m] = code
        # ------------------------------------------------------------- face soft tissue
        x, y, z = slab.coords(fb)
        # the face zone (head-local limits); generate_head keeps what lies outside the skeleton
        fm = soft.copy()
        fm &= z < model.face_z_top
        fm &= z > model.face_z_bottom
        fm &= np.abs(x) < model.face_half_width
        fm &= y < model.y_back_face
        fm &= ~np.isin(ffb, (7, 8) + _EAR_ROOT_CODES)
        # the detector's "face" class (unchanged since it was trained): soft tissue with no
        # bone in front of it along −j within 25 mm of the skin, plus the feature masks
        lab_face = fm & ~bone_any & (S[fb] > -25.0)
        if r_nc is not None:
            sl, d = r_nc
            ssl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, fb))
            if all(s.start < s.stop for s in ssl):
                rel_d = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, sl))
                rel_f = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(ssl, fb))
                lab_face[rel_f] &= d[rel_d] > 0
        lab_face |= (ffb >= 1) & (ffb <= 6)
        face[fb] = fm.astype(np.uint8) | (lab_face.astype(np.uint8) << 1)


def _slab_structures(st: SimpleNamespace) -> None:
    """Inner-structure ids (globes, orbits, sinuses, oral cavity, …, brain)."""
    struct, labels, model, slab, r_em, L = st.struct, st.labels, st.model, st.slab, st.r_em, st.L
    r_nc, r_sinus, r_tongue, r_oral = st.r_nc, st.r_sinus, st.r_tongue, st.r_oral
    def mark(res, code: int, where: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if res is None:
            return
        sl, d = res
        m = (d < 0) & (struct[sl] == 0) & (labels[sl] != 0)
        if where is not None:
            m &= where(sl)
        struct[sl][m] = code

    soft_or_air = lambda s: np.isin(labels[s], (1, 2, 3, 4, 11, 12, 13, 15))
    for sclera, _, _ in model.eye_parts:
        mark(slab.eval(sclera), STRUCTURES["globe"])
    mark(r_em, STRUCTURES["eye_muscles"], lambda s: labels[s] == L["muscle"])
    for o in model.orbits:
        mark(slab.eval(o), STRUCTURES["orbital_fat"], lambda s: labels[s] == L["fat"])
    mark(r_nc, STRUCTURES["nasal_cavity"])
    for res in r_sinus:
        mark(res, STRUCTURES["sinuses"], soft_or_air)
    mark(r_tongue, STRUCTURES["oral_cavity"], soft_or_air)
    mark(r_oral, STRUCTURES["oral_cavity"], soft_or_air)
    mark(slab.eval(model.g_pharynx), STRUCTURES["pharynx"], soft_or_air)
    for q in model.masticator:
        mark(slab.eval(q), STRUCTURES["masticator"], lambda s: np.isin(labels[s], (2, 3, 4)))
    brain = np.isin(labels, (8, 9, 10)) & (struct == 0)
    struct[brain] = STRUCTURES["brain"]


def _slab_couch(st: SimpleNamespace) -> None:
    """The scanner's head rest (and, on domain heads, holders and pads)."""
    couch, model, slab, labels, dom = st.couch, st.model, st.slab, st.labels, st.dom
    if couch:
        _couch(model, slab, labels)
    if dom is not None:
        dom.paint_holder(model, slab, labels)


def _slab_hu(st: SimpleNamespace) -> None:
    """Noise-free HU from the labels, with a partial-volume skin edge."""
    hu, dom, labels, model, slab, S = st.hu, st.dom, st.labels, st.model, st.slab, st.S
    aa_mm = st.aa_mm
    hu[...] = _LUT[labels] if dom is None else dom.lut[labels]
    if dom is not None:
        dom.texture(model, slab, labels, hu)
    edge = np.abs(S) < np.float32(0.5 * aa_mm)
    if edge.any():
        s_e = S[edge]
        inner = np.where(labels[edge] == 0, np.float32(LABEL_HU[1]), hu[edge])
        frac = np.float32(0.5) - s_e * np.float32(1.0 / aa_mm)  # partial volume: ramp over one voxel
        hu[edge] = np.float32(-1000.0) + frac * (inner + np.float32(1000.0))


# skin layers by skin depth S (mm): deep (muscle) | fat | skin | outside
_SKIN_DEPTHS = np.array([-6.0, -2.0, 0.0], np.float32)
_SKIN_LAYER_LABELS = np.array([_L["muscle"], _L["fat"], _L["skin"], 0], np.uint8)
# cranium: skull thickness 7 mm (outer/inner tables 1.8 mm), CSF 1.5 mm, cortex 3 mm; C < 0 inside
# the skull's outer surface. Skull-base plate 6 mm below the cranial-cavity floor.
_T_SKULL = 7.0
_CRANIUM_C_EDGES = np.array([-(_T_SKULL + 4.5), -(_T_SKULL + 1.5), -_T_SKULL, -(_T_SKULL - 1.8), -1.8, 0.0],
                            np.float32)
_CRANIUM_Z_EDGES = np.array([-6.0, -4.5, -1.5, 0.0, 1.0], np.float32)


def _cranium_table() -> np.ndarray:
    """Label for (C class, z class); 255 = leave the label unchanged."""
    keep = 255
    nz = len(_CRANIUM_Z_EDGES) + 1
    t = np.full(256, keep, np.uint8)
    for ci in range(len(_CRANIUM_C_EDGES) + 1):
        for zi in range(nz):
            above_floor = zi >= 4  # zrel >= 0
            in_base = 1 <= zi <= 3  # -6 <= zrel < 0
            if ci == 6:  # outside the skull
                lab = keep
            elif ci >= 3:  # skull shell: tables and diploe, only above the base plate's bottom
                lab = keep if zi == 0 else (_L["cancellous_bone"] if ci == 4 else _L["cortical_bone"])
            elif above_floor:  # cranial cavity
                if zi == 4 or ci == 2:
                    lab = _L["csf"]
                else:
                    lab = _L["grey_matter"] if ci == 1 else _L["white_matter"]
            elif in_base:  # skull-base plate: cortical, cancellous core
                lab = _L["cancellous_bone"] if zi == 2 else _L["cortical_bone"]
            else:
                lab = keep
            t[ci * nz + zi] = lab
    return t


_CRANIUM_TABLE = _cranium_table()


def _skull_base_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Head-local height (mm) of the cranial-cavity floor: anterior fossa over the orbits,
    sloping down posteriorly, with the middle fossae dipping laterally."""
    zb = np.maximum(y + np.float32(35.0), np.float32(0.0))
    zb *= np.float32(-0.6)
    zb += np.float32(20.0)
    lat = np.clip((np.abs(x) - np.float32(18.0)) * np.float32(1 / 18.0), 0.0, 1.0)
    bump = (y + np.float32(5.0)) * np.float32(1 / 30.0)
    bump = np.exp(-(bump * bump))
    zb -= np.float32(14.0) * lat * bump
    np.maximum(zb, np.float32(-40.0), out=zb)
    return zb


def _couch(model: _HeadModel, slab: _Slab, labels: np.ndarray) -> None:
    """Curved carbon-fibre head-rest below (posterior to) the head, in world coordinates."""
    grid = slab.grid
    _, hi = model.head_extent()
    # posterior-most point of the head in world y (ignoring small pose effects)
    back_y = float(grid.centre[1] + (grid.rot @ np.array([0.0, hi[1] - 6.0, 0.0]))[1])
    R = 150.0
    cy = back_y + 5.0 - R
    wx = (slab.world_x[0, 0, :] - grid.centre[0])[None, None, :]
    wy = slab.world_y[:, :, :1]  # (planes or 1, rows, 1): tilted stacks shift rows per plane
    r = np.sqrt(wx ** 2 + (wy - cy) ** 2)
    plate = (r > R) & (r < R + 6.0) & (wy > cy + 0.55 * R) & (np.abs(wx) < 105.0)
    if plate.any():
        lab = labels
        sel = np.broadcast_to(plate, lab.shape) & (lab == 0)
        lab[sel] = _L["couch"]


def _finish_hu(hu: np.ndarray, spacing_mm, blur_sigma_mm: float, noise_hu: float,
               noise_seed: int, blur_slices: bool = True) -> np.ndarray:
    """Noise-free float32 HU (modified in place) → int16 HU: Gaussian partial-volume blur
    (sigma in mm; across slices only when ``blur_slices``, thick slabs average already),
    white Gaussian noise (sd in HU), clipped to [-1024, 3071], rounded."""
    from scipy import ndimage

    if blur_sigma_mm > 0:
        for axis, sp in enumerate(spacing_mm):
            if axis == 0 and not blur_slices:
                continue
            s = blur_sigma_mm / sp
            if s > 0.15:
                ndimage.gaussian_filter1d(hu, s, axis=axis, output=hu, mode="nearest", truncate=3.0)
    out = np.empty(hu.shape, np.int16)
    rng = np.random.default_rng([int(noise_seed), 0x401E])
    n_slab = max(1, 2_000_000 // (hu.shape[1] * hu.shape[2]))
    for k0 in range(0, hu.shape[0], n_slab):
        blk = hu[k0:k0 + n_slab]
        if noise_hu > 0:
            blk += rng.standard_normal(blk.shape, dtype=np.float32) * np.float32(noise_hu)
        np.clip(blk, -1024.0, 3071.0, out=blk)
        blk += np.float32(1024.5)  # round half up via truncation of a positive number
        o = out[k0:k0 + n_slab]
        o[...] = blk
        o -= 1024
    return out


def _feature_boxes(feat: np.ndarray) -> list[list[tuple[str, int, int, int, int]]]:
    """Per-slice bounding boxes ``(class, i0, j0, i1, j1)`` of every feature code present."""
    nk = feat.shape[0]
    boxes: list[list[tuple[str, int, int, int, int]]] = [[] for _ in range(nk)]
    ks = np.flatnonzero(feat.reshape(nk, -1).any(axis=1))
    for k in ks:
        sl = feat[k]
        for code in np.unique(sl):
            if code == 0:
                continue
            m = sl == code
            rows = np.flatnonzero(m.any(axis=1))
            cols = np.flatnonzero(m.any(axis=0))
            boxes[k].append((_FEATURE_CODES[int(code)], int(cols[0]), int(rows[0]),
                             int(cols[-1]) + 1, int(rows[-1]) + 1))
    return boxes


# ----------------------------------------------------------------------------- render

def render_skin_frontal(volume: Volume, *, threshold_hu: float = -300.0, size_px: int = 256,
                        light: tuple[float, float, float] = (0.0, -1.0, 0.6),
                        max_depth_mm: float = 150.0) -> np.ndarray:
    """Quick frontal render of the skin surface (orthographic, Lambertian), uint8 ``size_px²``.

    Depth map: for each (slice k, column i), the first row ``j`` (from the
    anterior side, j = 0) where HU > ``threshold_hu``, refined to sub-voxel
    precision by linear interpolation; normals from its gradient; Lambertian
    shading with a light coming from ``light`` (LPS direction towards the
    light: default anterior and superior) plus 10 % ambient. Pixels with no
    surface within ``max_depth_mm`` of the most anterior point are black.
    Image is upright (superior at the top) with patient right on the image
    left (as when facing the patient). Assumes standard axial orientation.
    """
    from skimage.transform import resize

    hu = volume.hu
    dk, dj, di = volume.spacing_mm
    above = hu > threshold_hu
    hit = above.any(axis=1)  # (k, i)
    j0 = np.argmax(above, axis=1)  # first anterior hit
    jm = np.clip(j0 - 1, 0, None)
    kk, ii = np.indices(j0.shape)
    v1 = hu[kk, j0, ii].astype(np.float32)
    v0 = hu[kk, jm, ii].astype(np.float32)
    denom = np.where(np.abs(v1 - v0) < 1e-3, 1.0, v1 - v0)
    frac = np.clip((threshold_hu - v0) / denom, 0.0, 1.0)
    depth = (jm + np.where(j0 > 0, frac, 0.0)) * dj  # mm from the anterior edge
    front = depth[hit].min() if hit.any() else 0.0
    valid = hit & (depth < front + max_depth_mm)
    depth = np.where(valid, depth, front + max_depth_mm)
    from scipy import ndimage
    depth = ndimage.gaussian_filter(depth, (0.6 / dk, 0.6 / di))
    gz = np.gradient(depth, dk, axis=0)  # d(depth)/dz (z increases with k)
    gx = np.gradient(depth, di, axis=1)
    # surface y = D(x, z); outward (anterior) normal ∝ (dD/dx, -1, dD/dz)
    n = np.stack([gx, -np.ones_like(gx), gz], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    lv = np.asarray(light, float)
    lv = lv / np.linalg.norm(lv)
    shade = np.clip(n @ lv, 0.0, 1.0) * 0.9 + 0.1
    shade = np.where(valid, shade, 0.0)
    img = shade[::-1, :]  # superior at the top; column i (patient right→left) left→right
    h_mm, w_mm = img.shape[0] * dk, img.shape[1] * di
    scale = size_px / max(h_mm, w_mm)
    out_h, out_w = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
    img = resize(img, (out_h, out_w), order=1, anti_aliasing=True)
    canvas = np.zeros((size_px, size_px), np.float32)
    oy, ox = (size_px - out_h) // 2, (size_px - out_w) // 2
    canvas[oy:oy + out_h, ox:ox + out_w] = img
    return (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
