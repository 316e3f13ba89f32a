"""Domain randomisation of the synthetic head CT (:mod:`pipeline.synth`) for detector training.

A detector trained only on the plain generator finds little on real scans: on an
axial slice a real nose is a *hollow tent* (skin, cartilage and nasal bones
around the nasal airway, split by the septum) attached to the face, a real
auricle is a thin curled flap (often pressed against the head holder), a tilted
slice through the nose runs through C1, the upper neck and the posterior fossa,
soft tissue has fat planes and texture, and scanners differ in kernels, noise,
artefacts and holders. :class:`DomainParams` adds that variety to
:func:`pipeline.synth.generate_head` (``domain=``); every addition is part of
the generator's geometry, so the ground truth (tissue labels, feature masks and
boxes, the skeleton hull and the removal masks) stays exact.

What is randomised (all draws from generators seeded by :attr:`DomainParams.seed`,
none from :class:`pipeline.synth.SubjectParams`' stream, so a subject keeps its
face):

* **Age, sex, body habitus** (:meth:`DomainParams.adjust_params`): children
  (small face under a large cranium, drawn smaller as a whole through
  :attr:`size_scale`), adults, elderly (longer nose and ears, often
  edentulous: no teeth, no fillings); male/female shifts of brow, jaw and nose;
  subcutaneous fat 1.5–14 mm and fuller cheeks with a high body-mass index.
* **Anatomy the plain generator lacks**: a hollow nose (a triangular pyramid
  with a rounded dorsum, alae, columella, the airway inside it, nasal bones in
  its upper part; its apex angle and wall thickness vary), thin curled auricles
  (a curved shell 2–4.5 mm thick with a rolled helix rim 4–11 mm thick, lobe and
  concha, protruding 0–40°, in three of four free ears its lower part up to 60°
  further, carried 6–14 mm off the head by the concha's back
  wall, 2–6 mm when pressed by a holder), the skull base (petrous ridges, mastoid air cells, clivus), C1 and the
  dens, a wide upper neck, ethmoid air cells.
* **Facial trauma**: soft-tissue swelling, haematoma (denser soft tissue),
  fractures (gaps through nasal bones, orbital rims, zygoma, maxilla,
  mandible), emphysema (air bubbles), hemosinus (a fluid level or an
  opacified maxillary sinus).
* **Scanner**: a U-shaped plastic head holder and foam pads (or the curved
  couch, or nothing); the head rests nearer one side of the holder
  (:attr:`DomainParams.holder_shift_mm`), and an auricle that would reach the
  holder's wall either lies pressed against the head instead (flatter angle, then a
  shorter concha wall: ``model.ear_fit``) or, in half of the draws
  (:attr:`DomainParams.ear_fold`), keeps its angle and folds back along the wall,
  its edge and lobule against it (``model.ear_folded``); HU of every tissue, soft or bone kernel (blur or
  sharpening), white or correlated noise 3–80 HU, beam-hardening streaks between
  the petrous bones, a reconstruction circle, the head off the centre of the
  field of view (the face may be cut).

The **nose label** of a domain head is what a person labelling a slice draws:
the soft tissue of the nose standing out of the face (inside the skin with the
nose, outside the skin the face would have without it by at least
:data:`pipeline.synth.NOSE_LABEL_MIN_MM`, the nasofacial junction), including the
nasal pyramid over the nasal bones. Plain heads (``domain=None``) use the same
definition (with their own solid nose), so a held-out evaluation on plain and
domain heads measures one thing.

Head-local coordinates as in :mod:`pipeline.synth` (mm; x Left, y Posterior,
z Superior; origin between the pupils).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from . import synth as S_
from .synth import (
    SubjectParams,
    _Capsule,
    _combine,
    _Ellipsoid,
    _Group,
    _Prim,
    _s,
    _Sphere,
    _u,
)

__all__ = ["DomainParams"]

_L = S_.LABELS
_SOFT = (1, 2, 3, 4)
_F32 = np.float32


# ----------------------------------------------------------------------------- primitives


class _Wedge(_Prim):
    """The nasal pyramid: a wedge along the dorsum (nasion skin ``N`` → tip skin ``T``),
    apex half-angle ``theta``, bounded above by the nasion's height, in front by the tip, below by
    the nose base (``SN`` → ``TB``), laterally by a half-width growing from ``w_top`` at
    the nasion to ``w_base`` at the subnasale, and behind by a depth growing with the
    face (``y_back``, inside the face). Every face is offset by ``r_apex`` (a rounded
    dorsum of that radius whose front lies on the skin line)."""

    def __init__(self, N, T, SN, TB, theta_deg, w_top, w_base, zn, z_sn, y_back, r_apex,
                 margin=3.0) -> None:
        self.N, self.T, self.SN = (np.asarray(v, float) for v in (N, T, SN))
        d = self.T - self.N
        self.L = float(np.linalg.norm(d))
        self.d = d / self.L
        v = np.array([0.0, -1.0, 0.0])
        a = v - (v @ self.d) * self.d
        self.a = a / np.linalg.norm(a)
        e = np.asarray(TB, float) - self.SN
        e /= np.linalg.norm(e)
        b = np.array([0.0, -e[2], e[1]])
        if (self.N - self.SN) @ b < 0:
            b = -b
        self.b = b
        th = math.radians(theta_deg)
        self.ct, self.st = math.cos(th), math.sin(th)
        self.r = float(r_apex)
        self.w_top, self.w_base = float(w_top), float(w_base)
        self.zn, self.z_sn, self.y_back = float(zn), float(z_sn), float(y_back)
        pts = np.array([self.N, self.T, self.SN, TB])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        lo[0], hi[0] = -(self.w_base + self.r), self.w_base + self.r
        hi[1] = max(hi[1], self.y_back)
        self.lo, self.hi = lo - self.r - margin, hi + self.r + margin

    def coords(self, x, y, z):
        """(t, u): position along the dorsum from the nasion, and in front of it."""
        py = y - _F32(self.N[1])
        pz = z - _F32(self.N[2])
        t = py * _F32(self.d[1]) + pz * _F32(self.d[2])
        u = py * _F32(self.a[1]) + pz * _F32(self.a[2])
        return t, u

    def sdf(self, x, y, z):
        t, u = self.coords(x, y, z)
        ax = np.abs(x)
        r = _F32(self.r)
        f = ax * _F32(self.ct) + (u + r) * _F32(self.st)  # sharp apex r behind the skin line
        np.maximum(f, z - _F32(self.zn) + r, out=f)  # not above the nasion (behind it: the face)
        np.maximum(f, t - _F32(self.L), out=f)
        bot = -((y - _F32(self.SN[1])) * _F32(self.b[1]) + (z - _F32(self.SN[2])) * _F32(self.b[2]))
        np.maximum(f, bot + r, out=f)
        frac = np.clip((_F32(self.zn) - z) * _F32(1.0 / max(self.zn - self.z_sn, 1.0)), 0.0, 1.0)
        w = _F32(self.w_top) + _F32(self.w_base - self.w_top) * frac
        np.maximum(f, ax - w, out=f)
        np.maximum(f, y - _F32(self.y_back), out=f)
        f -= r  # rounded by r: the apex's front on the skin line
        return f


class _Shell(_Prim):
    """A cap of a cylindrical shell: axis through ``c`` along ``e2 = n × e1``, radius ``R``,
    half-thickness ``h``; the cap faces ``n`` (unit, from the axis), cut by an elliptic
    window of half-axes ``A`` along ``e1`` (the curved direction) and ``B`` along ``e2``.
    ``ring`` > 0 keeps only the outer band ``ring … 1`` of the window (a rim); ``z_band``
    (``(lo, hi)``, head-local z in mm) keeps only that band of heights."""

    def __init__(self, c, R, h, n, e1, A, B, ring=0.0, margin=3.0, z_band=None) -> None:
        self.c = np.asarray(c, float)
        self.R, self.h = float(R), float(h)
        self.n, self.e1 = np.asarray(n, float), np.asarray(e1, float)
        self.e2 = np.cross(self.n, self.e1)
        self.A, self.B, self.ring = float(A), float(B), float(ring)
        self.z_band = None if z_band is None else (float(z_band[0]), float(z_band[1]))
        p0 = self.c + self.R * self.n
        ext = max(self.A, self.B) + self.h + margin
        self.lo, self.hi = p0 - ext, p0 + ext

    def sdf(self, x, y, z):
        vx, vy, vz = x - _F32(self.c[0]), y - _F32(self.c[1]), z - _F32(self.c[2])
        q1 = vx * _F32(self.e1[0]) + vy * _F32(self.e1[1]) + vz * _F32(self.e1[2])
        q2 = vx * _F32(self.e2[0]) + vy * _F32(self.e2[1]) + vz * _F32(self.e2[2])
        r = np.sqrt(np.maximum(vx * vx + vy * vy + vz * vz - q2 * q2, 0.0))
        f = np.abs(r - _F32(self.R)) - _F32(self.h)
        ell = np.sqrt((q1 * _F32(1.0 / self.A)) ** 2 + (q2 * _F32(1.0 / self.B)) ** 2)
        s = _F32(min(self.A, self.B))
        np.maximum(f, (ell - 1.0) * s, out=f)
        if self.ring > 0:
            np.maximum(f, (_F32(self.ring) - ell) * s, out=f)
        side = -(vx * _F32(self.n[0]) + vy * _F32(self.n[1]) + vz * _F32(self.n[2]))
        np.maximum(f, side, out=f)
        if self.z_band is not None:
            f = np.maximum(f, np.maximum(z - _F32(self.z_band[1]), _F32(self.z_band[0]) - z))
        return f


def _waves(rng: np.random.Generator, n: int, lam: tuple[float, float]) -> list[tuple[np.ndarray, float]]:
    """``n`` random plane waves (wave vector in rad/mm, phase) with wavelengths in ``lam`` mm."""
    out = []
    for _ in range(n):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        out.append((v * (2 * math.pi / rng.uniform(*lam)), float(rng.uniform(0, 2 * math.pi))))
    return out


def _wave_field(waves, x, y, z) -> np.ndarray:
    """Sum of the plane waves at head-local points, scaled to unit variance."""
    acc = None
    for k, ph in waves:
        term = np.sin(x * _F32(k[0]) + y * _F32(k[1]) + z * _F32(k[2]) + _F32(ph))
        acc = term if acc is None else acc + term
    return acc * _F32(math.sqrt(2.0 / len(waves)))


def _value_noise(table: np.ndarray, x, y, z, cell_mm: float) -> np.ndarray:
    """Smooth random field in [0, 1] (trilinear value noise on a ``cell_mm`` lattice; lattice
    values from ``table``, a random ``n³`` array, wrapped) at head-local points."""
    n = table.shape[0]
    fx, fy, fz = (np.asarray(v, np.float32) * _F32(1.0 / cell_mm) for v in (x, y, z))
    ix, iy, iz = (np.floor(v).astype(np.int64) for v in (fx, fy, fz))
    tx, ty, tz = fx - ix, fy - iy, fz - iz
    tx, ty, tz = (t * t * (3 - 2 * t) for t in (tx, ty, tz))  # smoothstep: no lattice creases
    out = np.zeros(np.broadcast_shapes(fx.shape, fy.shape, fz.shape), np.float32)
    for dx in (0, 1):
        wx = tx if dx else 1 - tx
        for dy in (0, 1):
            wy = ty if dy else 1 - ty
            for dz in (0, 1):
                wz = tz if dz else 1 - tz
                out += wx * wy * wz * table[(ix + dx) % n, (iy + dy) % n, (iz + dz) % n]
    return out


class _MirrorX(_Prim):
    """``prim`` reflected in the plane x = ``x0`` (head-local mm): an auricle's part that folds
    back along a holder's wall."""

    def __init__(self, prim: _Prim, x0: float) -> None:
        self.prim, self.x0 = prim, float(x0)
        self.lo, self.hi = prim.lo.copy(), prim.hi.copy()
        self.lo[0], self.hi[0] = 2.0 * self.x0 - prim.hi[0], 2.0 * self.x0 - prim.lo[0]

    def sdf(self, x, y, z):
        return self.prim.sdf(_F32(2.0 * self.x0) - x, y, z)


class _HolderWall(_Prim):
    """The U-shaped holder's inner wall in head-local mm (the head's pose and the gantry tilt
    left out): half-width ``W``, arc centre ``yc``, midline at x = ``shift``, standing behind
    ``front_y`` (see :func:`_u_distance`). :meth:`at` gives the signed distance (< 0 inside)
    of points; as a primitive over the box ``lo``…``hi`` its field is < 0 where a point is at
    least ``clear_mm`` inside the wall (intersected with a group, it cuts what reaches the wall)."""

    def __init__(self, W: float, yc: float, shift: float, front_y: float, clear_mm: float = 0.0,
                 lo=(0.0, 0.0, 0.0), hi=(0.0, 0.0, 0.0)) -> None:
        self.W, self.yc, self.shift, self.front_y, self.clear = W, yc, shift, front_y, clear_mm
        self.lo, self.hi = np.asarray(lo, float), np.asarray(hi, float)

    def at(self, pts: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of points (n, 3) to the wall; -inf in front of the holder."""
        d = _u_distance(pts[:, 0] - self.shift, pts[:, 1], self.yc, self.W)
        return np.where(pts[:, 1] >= self.front_y, d, -np.inf)

    def sdf(self, x, y, z):
        d = _u_distance(x - _F32(self.shift), y, _F32(self.yc), _F32(self.W))
        d = d + _F32(self.clear)
        d = np.where(y >= _F32(self.front_y), d, _F32(-1e3))
        return np.broadcast_to(d, np.broadcast_shapes(x.shape, y.shape, z.shape)).astype(_F32)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0xD0A1, int(stream)])


#: How far (mm), beyond the helix rim's half-thickness, every sampled point of an auricle's
#: mid-surface stays inside the head holder's inner wall: an allowance for the head's pose.
EAR_HOLDER_POSE_MM = 1.0


def _auricle(s: int, head_root: np.ndarray, phi_rad: float, C: float, A: float, B: float, R: float,
             half_mm: float, concave: bool, m: float, helix_mm: float = 0.9,
             low_phi_rad: float | None = None, low_frac: float = 1.0) -> tuple[list, np.ndarray]:
    """One auricle (side ``s``: -1 patient right, +1 left; head-local mm) protruding ``phi_rad``
    from the head, carried ``C`` mm off it by the concha's back wall (``A``, ``B``: the pinna's
    half-width and half-length, ``R``: its curvature radius, ``half_mm``: its half-thickness,
    ``helix_mm``: how much thicker (half-thickness, mm) its rolled rim, the helix, is).
    ``low_phi_rad``: the lower part of the pinna (below 0.3 ``B`` under its middle: concha floor,
    antitragus, lobule) protrudes at this angle instead (it stands further out than the upper
    part in most people), ``low_frac`` × ``A`` wide; ``None``: the pinna is one cap.
    Returns the group's operations and points (n, 3) on the auricle's mid-surface, its wall and
    its lobe (for the fit against a head holder)."""
    tilt = math.radians(12.0)
    R = max(R, A + 2.0)
    root = head_root + np.array([s * C, 0.0, 0.0])
    # the wall: rungs from the head to the pinna's root, 5 mm thick, smooth-joined
    wall = [_Capsule(head_root + np.array([0.0, 3.0, zw]), root + np.array([0.0, 3.0, zw]), 2.5, margin=m)
            for zw in np.linspace(-0.8 * B, 0.8 * B, 7)]
    sign = 1.0 if concave else -1.0  # +1: the sphere's centre lateral (bowl facing out)

    def cap(phi: float, z_band, A: float):
        sag = R - math.sqrt(R * R - A * A)  # how far the cap's edge leaves its tangent plane
        e_p = np.array([s * math.sin(phi), math.cos(phi), 0.0])  # along the pinna, backwards
        n_out = np.array([s * math.cos(phi), -math.sin(phi), 0.0])  # the pinna's lateral normal
        e_z = np.array([0.0, math.sin(tilt), math.cos(tilt)])
        e_z -= (e_z @ e_p) * e_p
        e_z /= np.linalg.norm(e_z)
        p0 = root + e_p * A - sign * sag * n_out + e_z * 3.0
        centre = p0 + sign * R * n_out
        axis = -sign * n_out
        e1 = e_p - (e_p @ axis) * axis
        e1 /= np.linalg.norm(e1)
        shell = _Shell(centre, R, half_mm, axis, e1, A, B, margin=m, z_band=z_band)
        rim = _Shell(centre, R, half_mm + helix_mm, axis, e1, A, B, ring=0.8, margin=m, z_band=z_band)
        # mid-surface of the cap: q1 along e1, q2 along e2 inside the elliptic window
        q1, q2 = (g.ravel() for g in np.meshgrid(np.linspace(-A, A, 13), np.linspace(-B, B, 13)))
        keep = (q1 / A) ** 2 + (q2 / B) ** 2 <= 1.0
        q1, q2 = q1[keep], q2[keep]
        e2 = np.cross(axis, e1)
        pts = centre + np.outer(q1, e1) + np.outer(q2, e2) + np.outer(np.sqrt(R * R - q1 * q1), axis)
        if z_band is not None:
            pts = pts[(pts[:, 2] >= z_band[0]) & (pts[:, 2] <= z_band[1])]
        return [_u(shell, 2.0), _u(rim, 1.0)], pts, e_p, n_out, e_z

    if low_phi_rad is None:
        caps, pts, e_p, n_out, e_z = cap(phi_rad, None, A)
        e_pl, e_zl = e_p, e_z
    else:
        z_split = float(root[2]) + 3.0 - 0.3 * B
        caps, pts, e_p, n_out, e_z = cap(phi_rad, (z_split, np.inf), A)
        low, low_pts, e_pl, _, e_zl = cap(low_phi_rad, (-np.inf, z_split), low_frac * A)
        caps, pts = caps + low, np.vstack([pts, low_pts])
    rootb = _Ellipsoid(head_root + e_p * 4.0 + np.array([0.0, 0.0, -2.0]), (5.0, 8.0, 11.0), margin=m)
    lobe_c = root + e_pl * (0.35 * A) - e_zl * (0.72 * B)
    lobe = _Ellipsoid(lobe_c, (3.5, 7.0, 8.0), margin=m)
    concha = _Ellipsoid(root + n_out * 5.0 + e_p * 5.0 - e_z * 2.0, (4.0, 7.0, 9.0), margin=m)
    parts = [_u(rootb), *[_u(w, 3.0) for w in wall], *caps, _u(lobe, 2.0), _s(concha, 1.5)]
    lobe_pts = lobe_c + np.array([[s * 3.5, 0, 0], [0, 7.0, 0], [0, -7.0, 0], [0, 0, -8.0]])
    return parts, np.vstack([pts, root + np.array([s * 2.5, 0.0, 0.0]), lobe_pts])


def _u_distance(x: np.ndarray, y: np.ndarray, yc: float, W: float) -> np.ndarray:
    """Signed distance (mm; < 0 inside) to the inner wall of a U opening towards −y: the walls
    x = ±W below ``yc``, joined by a half circle of radius ``W`` about (0, ``yc``). Works in the
    dtype of ``x``, ``y`` (pass float32 scalars for float32 grids)."""
    return np.where(y < yc, np.abs(x) - W, np.sqrt(x * x + (y - yc) ** 2) - W)


# ----------------------------------------------------------------------------- parameters


@dataclass
class DomainParams:
    """One draw of the domain randomisation (see the module docstring).

    Build with :meth:`random`; pass to :func:`pipeline.synth.generate_head` as
    ``domain=`` after adjusting the subject with :meth:`adjust_params`. The
    kernel, noise and HU of the domain replace ``generate_head``'s
    ``noise_hu`` / ``blur_sigma_mm``.
    """

    seed: int
    age: str = "adult"  # child | adult | elderly
    sex: str = "f"
    size_scale: float = 1.0  # < 1 for children: the head drawn smaller as a whole
    fat_mm: float = 4.0
    bmi_high: bool = False
    edentulous: bool = False
    # nose
    nose_theta_deg: float = 38.0
    nose_wall_mm: float = 3.0
    nose_hollow: bool = True
    septum_half_mm: float = 0.9
    airway_mm: float = 6.0
    nasal_bone_frac: float = 0.4
    nasal_bone_mm: float = 1.8
    dorsum_r_mm: float = 3.0
    # ears
    ear_R_mm: float = 26.0
    ear_half_mm: float = 1.5
    ear_protrusion_deg: float = 20.0
    ear_A_mm: float = 16.0
    ear_concave: bool = True
    ear_concha_mm: float = 9.0
    ear_helix_mm: float = 0.9  # the helix rim's half-thickness beyond the shell's
    ear_fold: bool = False  # an ear reaching the holder's wall folds along it (else: pressed to the head)
    ear_low_deg: float = 0.0  # the lower pinna protrudes this much more than the upper (0: one cap)
    ear_low_frac: float = 0.6  # and is this fraction of the pinna's width
    # skull base and neck
    skull_base: bool = True
    mastoid_air: float = 0.4
    c1: bool = True
    neck_scale: float = 1.0
    ethmoid: bool = True
    # pathology: list of dicts {"kind": swelling|haematoma|fracture|emphysema, "site": ..., ...}
    pathology: list[dict[str, Any]] = field(default_factory=list)
    sinus_opacified: int = 0  # 0 none, -1 right, +1 left maxillary sinus full of fluid
    # scanner
    holder: str = "cradle"  # cradle | couch | none
    holder_gap_mm: float = 12.0
    holder_mm: float = 3.0
    holder_front_mm: float = 0.0
    holder_shift_mm: float = 0.0  # the holder's midline left (+x) of the head's: the head lies to one side
    foam: bool = True
    foam_mm: float = 20.0
    hu_jitter: dict[str, float] = field(default_factory=dict)
    kernel: str = "soft"  # soft | bone
    blur_mm: float = 0.6
    sharpen: float = 0.0
    noise_hu: float = 8.0
    noise_corr_px: float = 0.6
    texture_hu: float = 5.0
    fat_planes: float = 0.1
    beam_hardening_hu: float = 0.0
    recon_circle: bool = False
    fov_shift_mm: tuple[float, float] = (0.0, 0.0)
    metal: bool = False

    # ------------------------------------------------------------------ draws
    @classmethod
    def random(cls, seed: int, *, fov_mm: float = 250.0) -> DomainParams:
        """Draw every setting from generators seeded by ``seed`` (see the module docstring).
        ``fov_mm``: field of view of the acquisition (limits the shift of the head)."""
        r = _rng(seed, 1)
        age = str(r.choice(["child", "adult", "elderly"], p=[0.1, 0.65, 0.25]))
        sex = str(r.choice(["f", "m"]))
        bmi_high = bool(r.random() < 0.25)
        fat = float(r.uniform(6.0, 14.0) if bmi_high else r.uniform(1.5, 7.0))
        if age == "child":
            fat = float(r.uniform(3.0, 8.0))
        d = cls(seed=int(seed), age=age, sex=sex, bmi_high=bmi_high, fat_mm=fat,
                size_scale=float(r.uniform(0.8, 0.92)) if age == "child" else float(r.uniform(0.96, 1.06)),
                edentulous=bool(age == "elderly" and r.random() < 0.5))
        rn = _rng(seed, 2)
        d.nose_theta_deg = float(rn.uniform(34.0, 52.0))
        d.nose_wall_mm = float(rn.uniform(3.2, 5.5))
        d.nose_hollow = bool(rn.random() < 0.92)
        d.septum_half_mm = float(rn.uniform(0.6, 1.4))
        d.airway_mm = float(rn.uniform(3.0, 8.0))
        d.nasal_bone_frac = float(rn.uniform(0.25, 0.5))
        d.nasal_bone_mm = float(rn.uniform(1.0, 2.0))
        d.dorsum_r_mm = float(rn.uniform(2.0, 4.5))
        re = _rng(seed, 3)
        d.ear_R_mm = float(re.uniform(16.0, 40.0))
        d.ear_half_mm = float(re.uniform(1.1, 2.3))
        pressed = re.random() < 0.3  # pressed against the head by the holder or a pad
        d.ear_protrusion_deg = float(re.uniform(0.0, 10.0) if pressed else re.uniform(10.0, 42.0))
        d.ear_A_mm = float(re.uniform(13.0, 19.0))
        d.ear_concave = bool(re.random() < 0.75)
        # the concha's back wall carries the pinna away from the head: the helix stands
        # 15-20 mm off the mastoid skin in adults; a holder or pad presses it in
        d.ear_concha_mm = float(re.uniform(2.0, 6.0) if pressed else re.uniform(6.0, 14.0))
        # own stream, so the other draws are what they were: a rolled helix 4-11 mm thick at the
        # free edge (a knob in cross-section), and how an ear that reaches the holder gives way
        rf = _rng(seed, 1001)
        d.ear_helix_mm = float(rf.uniform(1.0, 3.0))
        d.ear_fold = bool(rf.random() < 0.5)
        # the lower pinna (concha floor, antitragus, lobule) stands out further than the upper
        # in three of four free ears; an ear pressed by a pad lies flat as a whole
        low = float(rf.uniform(0.0, 60.0))
        d.ear_low_deg = low if rf.random() < 0.75 and not pressed else 0.0
        d.ear_low_frac = float(rf.uniform(0.45, 0.8))
        rs = _rng(seed, 4)
        d.skull_base = bool(rs.random() < 0.92)
        d.mastoid_air = float(rs.uniform(0.1, 0.6))
        d.c1 = bool(rs.random() < 0.9)
        d.neck_scale = float(rs.uniform(0.85, 1.2) * (1.12 if bmi_high else 1.0))
        d.ethmoid = bool(rs.random() < 0.85)
        d.pathology = _draw_pathology(_rng(seed, 5))
        d.sinus_opacified = int(_rng(seed, 6).choice([-1, 0, 0, 0, 0, 0, 0, 1]))
        rh = _rng(seed, 7)
        d.holder = str(rh.choice(["cradle", "couch", "none"], p=[0.6, 0.25, 0.15]))
        d.holder_gap_mm = float(rh.uniform(4.0, 30.0))
        d.holder_mm = float(rh.uniform(2.0, 5.0))
        d.holder_front_mm = float(rh.uniform(-50.0, 30.0))
        # a head rarely lies in the middle of the holder: it rests nearer one side, whose ear the
        # holder then presses against the head (the ear fit in extend_model); own stream, so
        # the other draws are what they were
        d.holder_shift_mm = float(_rng(seed, 1000).uniform(-1.0, 1.0) * (d.holder_gap_mm + 5.0))
        d.foam = bool(rh.random() < 0.6)
        d.foam_mm = float(rh.uniform(5.0, 35.0))
        ru = _rng(seed, 8)
        d.hu_jitter = {
            "skin": float(ru.uniform(-15, 15)), "fat": float(ru.uniform(-25, 25)),
            "muscle": float(ru.uniform(-15, 15)), "soft_tissue": float(ru.uniform(-10, 15)),
            "cortical_bone": float(ru.uniform(-450, 450)), "cancellous_bone": float(ru.uniform(-200, 250)),
            "teeth": float(ru.uniform(-400, 300)), "grey_matter": float(ru.uniform(-6, 6)),
            "white_matter": float(ru.uniform(-6, 4)), "csf": float(ru.uniform(-5, 6)),
            "vitreous": float(ru.uniform(-5, 10)), "lens": float(ru.uniform(-20, 20)),
            "internal_air": float(ru.uniform(-30, 40)), "holder": float(ru.uniform(-150, 100)),
            "foam": float(ru.uniform(-100, 250)), "fluid": float(ru.uniform(-15, 15)),
        }
        rk = _rng(seed, 9)
        d.kernel = str(rk.choice(["soft", "bone"], p=[0.75, 0.25]))
        if d.kernel == "soft":
            d.blur_mm, d.sharpen = float(rk.uniform(0.3, 1.0)), 0.0
            d.noise_hu = float(rk.uniform(3.0, 20.0))
        else:
            d.blur_mm, d.sharpen = float(rk.uniform(0.15, 0.4)), float(rk.uniform(0.4, 1.5))
            d.noise_hu = float(rk.uniform(15.0, 60.0))
        d.noise_corr_px = float(rk.uniform(0.0, 1.1))
        d.texture_hu = float(rk.uniform(2.0, 9.0))
        d.fat_planes = float(rk.uniform(0.0, 0.16))
        d.beam_hardening_hu = float(rk.uniform(15.0, 60.0)) if rk.random() < 0.45 else 0.0
        d.recon_circle = bool(rk.random() < 0.5)
        shift = 0.12 * fov_mm
        d.fov_shift_mm = (float(rk.uniform(-shift, shift)), float(rk.uniform(-shift, shift * 1.2)))
        d.metal = bool(rk.random() < 0.3) and not d.edentulous
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ subject
    def adjust_params(self, params: SubjectParams) -> SubjectParams:
        """The subject with this draw's age, sex and body habitus (a new object; each
        value is remapped within the range :meth:`SubjectParams.validate` accepts, so two
        draws of the same subject still differ as their seeds did)."""
        rng = SubjectParams.ranges()
        new: dict[str, float] = {}

        def remap(name: str, lo_frac: float, hi_frac: float) -> None:
            lo, hi = rng[name]
            u = (getattr(params, name) - lo) / (hi - lo)
            new[name] = lo + (hi - lo) * (lo_frac + (hi_frac - lo_frac) * float(np.clip(u, 0, 1)))

        male = self.sex == "m"
        for name in ("brow_prominence_mm", "jaw_width_mm", "nose_length_mm", "nose_width_mm",
                     "chin_height_mm"):
            remap(name, 0.3, 1.0) if male else remap(name, 0.0, 0.7)
        if self.age == "child":
            for name, lo_f, hi_f in (("nose_length_mm", -0.24, 0.05), ("nose_projection_mm", -0.24, 0.1),
                                     ("nose_width_mm", -0.2, 0.2), ("face_width_mm", -0.24, 0.1),
                                     ("jaw_width_mm", -0.24, 0.1), ("chin_height_mm", -0.24, 0.1),
                                     ("eye_spacing_mm", -0.2, 0.15), ("brow_prominence_mm", 0.0, 0.2),
                                     ("ear_length_mm", -0.2, 0.2), ("philtrum_mm", -0.2, 0.2),
                                     ("skull_length_mm", 0.3, 1.0), ("vertex_height_mm", 0.4, 1.0)):
                remap(name, lo_f, hi_f)
        elif self.age == "elderly":
            remap("nose_length_mm", 0.4, 1.2)
            remap("ear_length_mm", 0.5, 1.2)
            remap("lip_fullness_mm", -0.2, 0.5)
            if self.edentulous:
                remap("chin_height_mm", -0.24, 0.3)
                remap("chin_projection_mm", 0.4, 1.2)
        if self.bmi_high:
            remap("cheek_fullness_mm", 0.5, 1.24)
            remap("neck_radius_mm", 0.5, 1.24)
        out = replace(params, **new)
        out.validate()
        return out

    # ------------------------------------------------------------------ model
    @property
    def skin_depths(self) -> np.ndarray:
        """Skin-depth edges (mm) muscle | fat | skin | outside (see ``synth._SKIN_DEPTHS``)."""
        return np.array([-(2.0 + self.fat_mm), -2.0, 0.0], np.float32)

    def extend_model(self, model: Any) -> None:
        """Add this draw's anatomy to a ``synth._HeadModel`` (called by ``generate_head``)."""
        p = model.p
        model.domain = self
        self.lut = S_._LUT.copy()
        for name, dv in self.hu_jitter.items():
            self.lut[_L[name]] += dv
        self.lut[_L["white_matter"]] = min(self.lut[_L["white_matter"]], self.lut[_L["grey_matter"]] - 4.0)
        m = 3.0
        # nasal bones and frontal processes leave the facial skeleton the skin follows: the
        # hollow nose below carries them (its upper walls), so the nose stands out of the face
        ops = list(model.g_facebone.ops)
        model.g_facebone = _Group("facebone", ops[:-3])
        # ---------------------------------------------------------- the nose
        rt = p.nose_tip_radius_mm
        N = (0.0, model.yn, model.zn)
        T = (0.0, model.y_tip, model.z_tip)
        SN = (0.0, model.y_sn, model.z_sn)
        TB = (0.0, model.y_tip + 0.8 * rt, model.z_tip - 0.75 * rt)
        w_base = max(14.0, p.nose_width_mm / 2.0 + 8.0)
        wedge = _Wedge(N, T, SN, TB, self.nose_theta_deg, 8.0 + 0.25 * p.nose_width_mm, w_base,
                       model.zn, model.z_sn, model.y_sn + 25.0, self.dorsum_r_mm, margin=m)
        self.wedge = wedge
        tip = _Sphere((0.0, model.y_tip + rt, model.z_tip), rt, margin=m)
        alae = [_Ellipsoid((s * (p.nose_width_mm / 2 - 6.5), model.y_sn - 4.0, model.z_sn + 5.0),
                           (6.5, 8.5, 6.5), margin=m) for s in (-1, 1)]
        columella = _Capsule((0, model.y_tip + rt, model.z_tip - 0.5 * rt), (0, model.y_sn - 1.0, model.z_sn + 2.0),
                             3.5, margin=m)
        model.g_nose = _Group("nose", [_u(wedge), _u(tip, 3.0), _u(alae[0], 3.0),
                                       _u(alae[1], 3.0), _u(columella, 2.0)])
        # ---------------------------------------------------------- maxillary sinuses
        # large, with thin walls (the plain generator's are small holes in a solid maxilla)
        mxc, mxr = model.maxilla.c, model.maxilla.r
        if mxr[0] > 16.0:
            wall = 1.6
            x_in, x_out = 11.0 + wall + 0.5, max(mxr[0] - wall, 11.0 + wall + 8.0)
            rx = (x_out - x_in) / 2.0
            ry = 0.8 * mxr[1]
            sinus = [_Ellipsoid((s * (x_in + rx), mxc[1] - 3.0, mxc[2] + 2.0), (rx, ry, max(mxr[2] - 2.5, 6.0)),
                                margin=m) for s in (-1, 1)]
            model.sinuses[0:2] = sinus
            model.g_aircav = _Group("aircav", [_u(model.nasal_cav), _u(sinus[0]), _u(sinus[1]),
                                               _u(model.sinuses[2]), _u(model.sinuses[3])])
        # ---------------------------------------------------------- the ears
        hh = model.head_half_at_ear
        ear_y = model.yc_cr - 2.0
        ear_z = -10.0 + p.ear_height_mm
        wall = self._holder_wall(model)
        rim_mm = self.ear_half_mm + self.ear_helix_mm
        clear = rim_mm + EAR_HOLDER_POSE_MM
        ears, model.ear_fit, model.ear_folded = [], [], []
        for s in (-1, 1):
            # the auricle leaves the head along its front edge (attached 3 mm inside the skin)
            head_root = np.array([s * (hh - 3.0), ear_y - 2.0, ear_z])
            deg, C = self.ear_protrusion_deg, self.ear_concha_mm

            def draw(deg: float, C: float) -> tuple[list, np.ndarray]:
                # the lower pinna stands out further by ear_low_deg (less as the ear is pressed
                # flatter; at most 85 degrees: straight out from the head)
                low = None
                if self.ear_low_deg > 0.0:
                    drawn = max(self.ear_protrusion_deg, 1e-6)
                    low = math.radians(min(deg + self.ear_low_deg * min(deg / drawn, 1.0), 85.0))
                return _auricle(s, head_root, math.radians(deg), C, self.ear_A_mm, p.ear_length_mm / 2.0,
                                self.ear_R_mm, self.ear_half_mm, self.ear_concave, m, self.ear_helix_mm, low,
                                self.ear_low_frac)

            parts, pts = draw(deg, C)
            reaches = wall is not None and wall.at(pts).max() > -clear
            if reaches and self.ear_fold:
                # it keeps its angle and folds back along the wall where it meets it, the lobule
                # and the free edge lying against the holder (as ge-head-ct's right ear does)
                ears.append(self._folded_ear(wall, parts, s, rim_mm))
                model.ear_fit.append((deg, C))
                model.ear_folded.append(True)
                continue
            while reaches:
                # an ear does not pass through the holder: one that would reach its wall lies
                # pressed against the head (its angle first, then the concha's wall, as a hand
                # folding it would; at most flat: 0 degrees, 2 mm)
                if deg <= 0.0 and C <= 2.0:
                    break
                deg, C = (max(deg - 2.0, 0.0), C) if deg > 0.0 else (deg, max(C - 1.0, 2.0))
                parts, pts = draw(deg, C)
                reaches = wall.at(pts).max() > -clear
            model.ear_fit.append((deg, C))
            model.ear_folded.append(False)
            ears.append(_Group("ear", parts))
        model.g_ear = ears
        # ---------------------------------------------------------- skull base, C1, neck, ethmoid
        rs = _rng(self.seed, 10)
        pa = [np.array([s * (hh - 13.0), ear_y + 6.0, 0.0]) for s in (-1, 1)]
        pb = [np.array([s * 15.0, ear_y - 20.0, 0.0]) for s in (-1, 1)]
        for q in pa + pb:  # along the floor of the middle cranial fossa, just below it
            q[2] = float(S_._skull_base_z(np.array([q[0]], np.float32), np.array([q[1]], np.float32))[0]) - 5.0
        self.petrous = [_Capsule(pa[n], pb[n], rs.uniform(5.0, 7.0), rs.uniform(3.0, 4.5), margin=m)
                        for n in range(2)]
        self.mastoids = [_Ellipsoid((s * (hh - 15.0), ear_y + 17.0, ear_z - 8.0),
                                    (rs.uniform(9, 13), rs.uniform(11, 16), rs.uniform(13, 19)), margin=m)
                         for s in (-1, 1)]
        self.clivus = _Capsule((0.0, ear_y - 20.0, ear_z + 12.0), (0.0, ear_y - 6.0, ear_z - 26.0), 6.0, margin=m)
        self.cells = rs.random((32, 32, 32)).astype(np.float32)
        y_spine = model.y_sn + 110.0
        zc1 = ear_z - rs.uniform(33.0, 42.0)
        self.zc1 = zc1
        ring = []
        for q in range(14):
            ang = 2 * math.pi * q / 14
            ring.append((22.0 * math.sin(ang), y_spine + 7.0 - 16.0 * math.cos(ang), zc1))
        ring.append(ring[0])
        self.c1_ring = S_._chain("c1", ring, 3.8, margin=m)
        self.c1_masses = [_Ellipsoid((s * 19.0, y_spine + 4.0, zc1), (6.5, 9.0, 8.0), margin=m) for s in (-1, 1)]
        self.dens = _Capsule((0.0, y_spine - 1.0, zc1 - 18.0), (0.0, y_spine - 1.0, zc1 + 9.0), 5.0, margin=m)
        self.canal = _Capsule((0.0, y_spine + 17.0, model.z_st - 12.0), (0.0, y_spine + 16.0, zc1 + 20.0), 7.5,
                              margin=m)
        self.cord = _Capsule((0.0, y_spine + 17.0, model.z_st - 12.0), (0.0, y_spine + 16.0, zc1 + 20.0), 4.0,
                             margin=m)
        ns = self.neck_scale
        self.upper_neck = _Ellipsoid((0.0, ear_y + 10.0, ear_z - 42.0),
                                     (rs.uniform(0.92, 1.05) * hh * ns, rs.uniform(60.0, 72.0) * min(ns, 1.1), 44.0),
                                     margin=m)
        self.ethmoid_waves = _waves(rs, 2, (5.0, 8.0))
        self.tex_waves = _waves(rs, 6, (5.0, 25.0))
        self.plane_waves = _waves(rs, 5, (18.0, 45.0))
        # ---------------------------------------------------------- pathology
        self._build_pathology(model)
        boxes = [model.face_box, model.g_nose]
        model.face_box = S_._Box(np.min([b.lo for b in boxes], axis=0), np.max([b.hi for b in boxes], axis=0))

    def _site(self, model: Any, site: str, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre (head-local mm) and radii of a facial site."""
        p = model.p
        xe, ye = model.xe, model.ye
        sites = {
            "periorbital": ((side * xe, ye - 15.0, -3.0), (16.0, 8.0, 14.0)),
            "cheek": ((side * (xe + 10.0), ye + 2.0, -28.0), (18.0, 10.0, 18.0)),
            "forehead": ((side * 15.0, -92.0 - p.brow_prominence_mm, model.z_brow + 18.0), (22.0, 8.0, 16.0)),
            "lip": ((0.0, model.y_sn + 4.0, model.z_st), (22.0, 8.0, 10.0)),
            "nose": ((0.0, model.y_tip + 9.0, model.z_sn + 12.0), (12.0, 8.0, 15.0)),
            "jaw": ((side * 24.0, model.y_pog + 14.0, model.z_me + 16.0), (18.0, 10.0, 16.0)),
        }
        c, r = sites[site]
        return np.asarray(c, float), np.asarray(r, float)

    def _build_pathology(self, model: Any) -> None:
        m = 3.0
        self.swell, self.hu_blobs, self.fractures, self.bubbles = [], [], [], []
        xe, ye = model.xe, model.ye
        fw = model.p.face_width_mm / 2.0
        for q in self.pathology:
            kind, side, sc = q["kind"], int(q["side"]), float(q["scale"])
            if kind in ("swelling", "haematoma"):
                c, r = self._site(model, q["site"], side)
                e = _Ellipsoid(c, r * sc, margin=m)
                self.swell.append(e)
                self.hu_blobs.append((_Ellipsoid(c, r * sc * 0.9, margin=m),
                                      float(q["hu"]) if kind == "haematoma" else float(q["oedema_hu"])))
            elif kind == "fracture":
                sites = {
                    "nasal": (0.0, model.yn + 6.0, model.zn - 18.0),
                    "zygoma": (side * (fw - 17.0), ye + 13.0, -17.0),
                    "orbit": (side * xe, ye + 5.0, -13.0),
                    "maxilla": (side * 16.0, model.y_sn + 18.0, model.z_sn + 12.0),
                    "mandible": (side * 26.0, model.y_pog + 24.0, model.z_me + 14.0),
                }
                c = np.asarray(sites[q["site"]], float)
                nrm = np.asarray(q["normal"], float)
                self.fractures.append((c, nrm / np.linalg.norm(nrm), 12.0 * sc, float(q["gap_mm"])))
                if q.get("emphysema"):
                    rb = _rng(self.seed, 11 + len(self.bubbles))
                    for _ in range(int(rb.integers(3, 9))):
                        bc = c + rb.normal(0.0, 8.0, 3) + np.array([0.0, -8.0, 0.0])
                        self.bubbles.append(_Sphere(bc, float(rb.uniform(0.8, 2.5)), margin=m))

    # ------------------------------------------------------------------ hooks of _fill_slab
    def skin_unions(self, model: Any, slab: Any, S: np.ndarray) -> None:
        """Extra body: the upper neck, swellings."""
        _combine(S, slab.eval(self.upper_neck), "u", 18.0)
        for e in self.swell:
            _combine(S, slab.eval(e), "u", 8.0)

    def paint_inner(self, model: Any, slab: Any, labels: np.ndarray, S: np.ndarray,
                    r_nose: Any = None, nose_s0: np.ndarray | None = None) -> None:
        """The hollow nose and nasal bones, skull base, C1, ethmoid cells, sinus fluid,
        fractures, emphysema (before the teeth and the spine are painted)."""
        L = _L
        # ---- nose: nasal bones in its upper walls, the airway inside, the septum
        res = slab.eval(self.wedge)
        if res is not None and r_nose is not None and nose_s0 is not None:
            # the wedge's box lies inside the nose group's box: align the face-without-nose field
            sl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(res[0], r_nose[0]))
            if all(q.start < q.stop for q in sl):
                d = res[1][tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, res[0]))]
                s0 = nose_s0[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, r_nose[0]))]
                x, y, z = slab.coords(sl)
                t, _ = self.wedge.coords(x, y, z)
                lab = labels[sl]
                s_ = S[sl]
                soft = np.isin(lab, _SOFT)
                tf = t * _F32(1.0 / self.wedge.L)
                skin = _F32(2.0)
                out_face = s0 > -2.0  # in the nose, not deep in the face behind it
                bone = soft & out_face & (d < 1.0) & (s_ < -skin) & \
                    (s_ > -(skin + _F32(self.nasal_bone_mm))) & (tf < _F32(self.nasal_bone_frac)) & (tf > 0.02)
                lab[bone] = L["cortical_bone"]
                if self.nose_hollow:
                    wall = _F32(self.nose_wall_mm)
                    aperture = (np.abs(x) < 10.0) & (y < _F32(model.y_sn + 14.0))  # into the nasal cavity
                    air = soft & (d < -wall) & (s_ < -wall) & (tf > 0.12) & (tf < 0.97) & \
                        (z > _F32(model.z_sn + 1.5)) & (np.abs(x) > _F32(self.septum_half_mm)) & \
                        (np.abs(x) < _F32(self.septum_half_mm + self.airway_mm)) & ((s0 > wall) | aperture)
                    lab[air] = L["internal_air"]
        # ---- ethmoid air cells: thin bony septa in the upper nasal cavity
        if self.ethmoid:
            res = slab.eval(model.nasal_cav)
            if res is not None:
                sl, d = res
                x, y, z = slab.coords(sl)
                lab = labels[sl]
                air = (lab == L["internal_air"]) & (d < 0) & (z > _F32(-6.0)) & (np.abs(x) > 2.0)
                if air.any():
                    g1 = np.abs(_wave_field(self.ethmoid_waves[:1], x, y, z))
                    g2 = np.abs(_wave_field(self.ethmoid_waves[1:], x, y, z))
                    lab[air & ((g1 < 0.18) | (g2 < 0.18))] = L["cancellous_bone"]
        # ---- sinus opacified with fluid
        if self.sinus_opacified:
            n = 0 if self.sinus_opacified < 0 else 1
            res = slab.eval(model.sinuses[n])
            if res is not None:
                sl, d = res
                lab = labels[sl]
                lab[(d < 0) & (lab == L["internal_air"])] = L["fluid"]
        # ---- skull base
        if self.skull_base:
            keep = (0, 11, 12, 13, 16)  # never air outside, eyes, air cavities, metal
            for q in self.petrous:
                res = slab.eval(q)
                if res is not None:
                    sl, d = res
                    lab = labels[sl]
                    w = (d < 0) & ~np.isin(lab, keep)
                    lab[w] = L["cortical_bone"]
            for q in self.mastoids:
                res = slab.eval(q)
                if res is not None:
                    sl, d = res
                    x, y, z = slab.coords(sl)
                    lab = labels[sl]
                    w = (d < 0) & ~np.isin(lab, keep + (8, 9, 10))
                    lab[w] = L["cancellous_bone"]
                    lab[w & (d > -1.5)] = L["cortical_bone"]
                    g = _value_noise(self.cells, x, y, z, 2.6)
                    thr = _F32(0.75 - 0.45 * self.mastoid_air)
                    lab[w & (d < -1.5) & (g > thr)] = L["internal_air"]
            res = slab.eval(self.clivus)
            if res is not None:
                sl, d = res
                lab = labels[sl]
                w = (d < 0) & ~np.isin(lab, keep + (8, 9, 10))
                lab[w] = L["cancellous_bone"]
                lab[w & (d > -1.5)] = L["cortical_bone"]
        if self.c1:
            body = lambda sl: labels[sl] != 0
            S_._paint(labels, slab.eval(self.canal), L["csf"], where=body)
            S_._paint(labels, slab.eval(self.cord), L["soft_tissue"], where=body)
            for q in (self.c1_ring, *self.c1_masses, self.dens):
                res = slab.eval(q)
                if res is not None:
                    sl, d = res
                    lab = labels[sl]
                    w = (d < 0) & (lab != 0) & (lab != L["internal_air"])
                    lab[w] = L["cancellous_bone"]
                    lab[w & (d > -1.5)] = L["cortical_bone"]
        # ---- fractures: gaps through the facial bones; emphysema
        for c, nrm, rad, gap in self.fractures:
            box = S_._Box(c - rad, c + rad)
            sl = slab.slices(box)
            if sl is None:
                continue
            x, y, z = slab.coords(sl)
            dx, dy, dz = x - _F32(c[0]), y - _F32(c[1]), z - _F32(c[2])
            dist = np.abs(dx * _F32(nrm[0]) + dy * _F32(nrm[1]) + dz * _F32(nrm[2]))
            near = dx * dx + dy * dy + dz * dz < _F32(rad * rad)
            lab = labels[sl]
            lab[near & (dist < _F32(gap / 2)) & np.isin(lab, (5, 6))] = L["soft_tissue"]
        for b in self.bubbles:
            S_._paint(labels, slab.eval(b), L["internal_air"], where=lambda sl: np.isin(labels[sl], _SOFT))

    def _folded_ear(self, wall: _HolderWall, parts: list, s: int, rim_mm: float) -> _Group:
        """Auricle ``parts`` (side ``s``) folded back where they meet the U-shaped holder's wall:
        reflected in the plane ``rim_mm`` + 0.5 mm inside the straight wall on that side, and
        both cut 0.5 mm inside the wall, so the sheet turns along the wall and lies against it
        (head-local mm; the head's pose left out, as in :meth:`_holder_wall`)."""
        x0 = wall.shift + s * (wall.W - 0.5 - rim_mm)
        own = _Group("ear", parts)
        mirrored = _Group("ear", [S_._Op(o.kind, _MirrorX(o.prim, x0), o.k) for o in parts])
        lo = np.minimum(own.lo, mirrored.lo)
        hi_box = np.maximum(own.hi, mirrored.hi)
        inside = _HolderWall(wall.W, wall.yc, wall.shift, wall.front_y, 0.5, lo, hi_box)
        return _Group("ear", [_u(own), _u(mirrored), S_._Op("i", inside, 0.0)])

    def _holder_wall(self, model: Any) -> _HolderWall | None:
        """The U-shaped holder's inner wall in head-local mm (:class:`_HolderWall`; its ``at``
        gives the signed distance of points, < 0 between the head and the wall), the head's pose
        and the gantry tilt left out; ``None`` without a U-shaped holder. The same shape as
        :meth:`paint_holder` draws."""
        if self.holder != "cradle":
            return None
        _, hi = model.head_extent()
        W, yc = self._holder_u(model, hi[1] - 4.0)
        return _HolderWall(W, yc, self.holder_shift_mm, self.holder_front_mm)

    def _holder_u(self, model: Any, back_y: float) -> tuple[float, float]:
        """The U-shaped holder's inner half-width ``W`` (mm) and the y (mm) of its arc's centre,
        for the back of the head at ``back_y`` (4 mm inside its extent; its foam pad behind it)."""
        W = model.p.skull_width_mm / 2.0 + 6.0 + self.holder_gap_mm
        return W, back_y + 2.0 + self.foam_mm * float(self.foam) - W

    def paint_holder(self, model: Any, slab: Any, labels: np.ndarray) -> None:
        """U-shaped plastic head holder and foam pads around the head, or the curved couch
        (``couch`` of ``generate_head`` is the plain generator's), in scanner coordinates."""
        if self.holder == "none":
            return
        grid = slab.grid
        if self.holder == "couch":
            S_._couch(model, slab, labels)
            return
        _, hi = model.head_extent()
        back_y = float(grid.centre[1] + (grid.rot @ np.array([0.0, hi[1] - 4.0, 0.0]))[1])
        W, yc = self._holder_u(model, back_y)
        wx = slab.world_x - _F32(grid.centre[0] + self.holder_shift_mm)
        wy = slab.world_y
        d = _u_distance(wx, wy, _F32(yc), _F32(W))
        front = _F32(grid.centre[1] + self.holder_front_mm)
        shell = (d >= 0) & (d <= _F32(self.holder_mm)) & (wy >= front)
        pad = (d < -0.5) & (wy > _F32(back_y + 2.0)) if self.foam else None
        lab = labels
        sh = np.broadcast_to(shell, lab.shape) & (lab == 0)
        lab[sh] = _L["holder"]
        if pad is not None:
            pd = np.broadcast_to(pad, lab.shape) & (lab == 0)
            lab[pd] = _L["foam"]

    def texture(self, model: Any, slab: Any, labels: np.ndarray, hu: np.ndarray) -> None:
        """Soft-tissue mottling, fat planes between muscles, haematoma / oedema density."""
        x, y, z = slab.x, slab.y, slab.z
        soft = np.isin(labels, (1, 2, 3, 4, 18))
        if soft.any():
            g = _wave_field(self.tex_waves, x, y, z)
            hu[soft] += g[soft] * _F32(self.texture_hu)
        if self.fat_planes > 0:
            mus = labels == _L["muscle"]
            if mus.any():
                g = np.abs(_wave_field(self.plane_waves, x, y, z))
                plane = mus & (g < _F32(self.fat_planes))
                hu[plane] = self.lut[_L["fat"]] + 20.0
        for e, dhu in self.hu_blobs:
            res = slab.eval(e)
            if res is not None:
                sl, d = res
                w = (d < 0) & np.isin(labels[sl], _SOFT)
                hu[sl][w] += _F32(dhu)

    def outside_reconstruction(self, nj: int, ni: int) -> np.ndarray | None:
        """Pixels (``nj × ni`` bool) outside the reconstruction circle, which the image fills
        with −1024 HU (it holds no data there), or None without a circle."""
        if not self.recon_circle:
            return None
        jj, ii = np.mgrid[:nj, :ni]
        r = min(nj, ni) / 2.0
        return (jj - (nj - 1) / 2) ** 2 + (ii - (ni - 1) / 2) ** 2 > r * r

    # ------------------------------------------------------------------ HU finish
    def finish_hu(self, hu: np.ndarray, labels: np.ndarray, spacing_mm, blur_sigma_mm: float,
                  noise_hu: float, noise_seed: int, blur_slices: bool = True) -> np.ndarray:
        """Noise-free float32 HU → int16: beam-hardening streaks, kernel (blur or
        sharpening), white or correlated noise, reconstruction circle (this draw's
        settings replace ``blur_sigma_mm`` / ``noise_hu``)."""
        from scipy import ndimage as ndi

        dk, dj, di = spacing_mm
        if self.beam_hardening_hu > 0:
            _beam_hardening(hu, (dj, di), self.beam_hardening_hu, self.seed)
        if self.blur_mm > 0:
            for axis, sp in enumerate((dk, dj, di)):
                if axis == 0 and not blur_slices:
                    continue
                s = self.blur_mm / sp
                if s > 0.15:
                    ndi.gaussian_filter1d(hu, s, axis=axis, output=hu, mode="nearest", truncate=3.0)
        if self.sharpen > 0:
            for k in range(hu.shape[0]):
                sm = ndi.gaussian_filter(hu[k], 0.8 / dj, mode="nearest")
                hu[k] += _F32(self.sharpen) * (hu[k] - sm)
        rng = np.random.default_rng([int(noise_seed), int(self.seed), 0x401F])
        out = np.empty(hu.shape, np.int16)
        nk, nj, ni = hu.shape
        circle = self.outside_reconstruction(nj, ni)
        for k in range(nk):
            sl = hu[k]
            if self.noise_hu > 0:
                n = rng.standard_normal((nj, ni), dtype=np.float32)
                if self.noise_corr_px > 0.2:
                    n = ndi.gaussian_filter(n, self.noise_corr_px)
                    n /= max(float(n.std()), 1e-6)
                sl += n * _F32(self.noise_hu)
            if circle is not None:
                sl[circle] = -1024.0
            np.clip(sl, -1024.0, 3071.0, out=sl)
            sl += _F32(1024.5)
            out[k] = sl
            out[k] -= 1024
        return out


def _draw_pathology(r: np.random.Generator) -> list[dict[str, Any]]:
    """0–3 lesions of a facial-trauma cohort (about half of the heads have none)."""
    out: list[dict[str, Any]] = []
    n = int(r.choice([0, 0, 0, 1, 1, 2, 3]))
    for _ in range(n):
        kind = str(r.choice(["swelling", "haematoma", "fracture", "fracture"]))
        side = int(r.choice([-1, 1]))
        q: dict[str, Any] = {"kind": kind, "side": side, "scale": float(r.uniform(0.7, 1.3))}
        if kind in ("swelling", "haematoma"):
            q["site"] = str(r.choice(["periorbital", "cheek", "forehead", "lip", "nose", "jaw"]))
            q["hu"] = float(r.uniform(25.0, 45.0))
            q["oedema_hu"] = float(r.uniform(0.0, 20.0))
        else:
            q["site"] = str(r.choice(["nasal", "zygoma", "orbit", "maxilla", "mandible"]))
            v = r.normal(size=3)
            q["normal"] = (v / np.linalg.norm(v)).tolist()
            q["gap_mm"] = float(r.uniform(0.8, 2.5))
            q["emphysema"] = bool(r.random() < 0.4)
        out.append(q)
    return out


def _beam_hardening(hu: np.ndarray, pixel_mm: tuple[float, float], amp: float, seed: int) -> None:
    """Dark streaks between the two largest dense-bone clusters of a slice (petrous bones,
    'Hounsfield bar'), in the soft tissue and brain between them; in place."""
    from scipy import ndimage as ndi

    dj, di = pixel_mm
    rng = np.random.default_rng([int(seed), 0xBEA3])
    width = float(rng.uniform(2.0, 5.0))
    nj, ni = hu.shape[1:]
    yy = np.arange(nj)[:, None] * dj
    xx = np.arange(ni)[None, :] * di
    min_px = 25.0 / (dj * di)
    for k in range(hu.shape[0]):
        dense = hu[k] > 900
        if dense.sum() < 2 * min_px:
            continue
        lab, n = ndi.label(dense)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes)[-2:]
        if sizes[a] < min_px:
            continue
        ca = np.array(ndi.center_of_mass(dense, lab, a)) * (dj, di)
        cb = np.array(ndi.center_of_mass(dense, lab, b)) * (dj, di)
        seg = cb - ca
        ln = float(np.linalg.norm(seg))
        if ln < 35.0:
            continue
        u = seg / ln
        ry, rx = yy - ca[0], xx - ca[1]
        along = ry * u[0] + rx * u[1]
        across = ry * u[1] - rx * u[0]
        band = np.exp(-(across ** 2) / (2 * width ** 2)) * ((along > 0) & (along < ln))
        soft = (hu[k] > -200) & (hu[k] < 200)
        hu[k] -= (amp * band * soft).astype(np.float32)
