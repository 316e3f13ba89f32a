"""A learned skull → face model (the "learned" reconstruction attack).

What it learns: from the BONE of a de-identified head CT, the radial map of the skin
(:class:`RadialGrid`: from a centre in the canonical head frame behind the face, the
distance to the outermost skin along rays over the face, forehead, cheeks and jaw); what
it sees: the same radial map of the outermost bone (gaps — the orbits, the aperture, the
cheek between zygoma and jaw — bridged by a harmonic fill) and where the bone is. Both are
taken in the canonical frame of :mod:`pipeline.align`, computed from the bone alone.

Model: principal components of the bone maps (``k`` of them), ridge regression of the skin
map on the component scores (one regularisation ``lam``); ``k`` and ``lam`` are chosen on
validation heads that are not in the training set. Inference is a few matrix products in
numpy; the fitted model ships as ``pipeline/models/skull_to_face.npz`` with a JSON card
beside it (training seeds, acquisitions, validation error), like the detector. Trained by
``manage.py train_skull_to_face`` on synthetic heads (:mod:`pipeline.synth`, de-identified
by :func:`pipeline.deface.deface`) — it learns the generator's own skull-to-face rule, which
is why its figures on synthetic heads are an upper bound for what such a model does on
real heads.

Units: canonical mm (≈ mm), degrees.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates

from .canonical_face import (
    CanonicalGrid,
    ReconstructionError,
    bone_mask,
    harmonic_fill,
    outermost_crossing,
    resample_canonical,
)
from .synth import SubjectParams, generate_head

__all__ = [
    "ACQUISITIONS",
    "DEFAULT_MODEL",
    "RadialGrid",
    "SkullToFaceModel",
    "check_held_out",
    "fit_model",
    "load_model",
    "radial_features",
    "radial_map",
    "seen_seeds",
    "training_pair",
]

#: The shipped model (fitted by ``manage.py train_skull_to_face``).
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "skull_to_face.npz"
_FORMAT = 1
#: Training acquisitions: ``(slices, rows, columns)``, spacing ``(dk, dj, di)`` mm — the
#: ``small`` and ``medium`` sizes of ``manage.py synth_cohort`` (the study cohorts' sizes).
ACQUISITIONS: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "small": ((64, 80, 80), (3.75, 3.0, 3.0)),
    "medium": ((80, 96, 96), (3.0, 2.5, 2.5)),
}


@dataclass(frozen=True)
class RadialGrid:
    """Rays from ``centre`` (canonical frame): azimuth ``theta`` (degrees from straight ahead,
    −y, towards the subject's Left, +x), elevation ``phi`` (degrees above horizontal);
    maps are ``(n_phi, n_theta)``, row 0 the lowest elevation."""

    centre: tuple[float, float, float] = (0.0, 0.0, -35.0)
    theta0: float = -100.0
    theta1: float = 100.0
    phi0: float = -70.0
    phi1: float = 66.0
    step_deg: float = 2.0
    r0: float = 20.0
    r1: float = 170.0
    r_step: float = 0.75

    def _axis(self, lo: float, hi: float) -> np.ndarray:
        return lo + self.step_deg * np.arange(round((hi - lo) / self.step_deg) + 1)

    @property
    def thetas(self) -> np.ndarray:
        return self._axis(self.theta0, self.theta1)

    @property
    def phis(self) -> np.ndarray:
        return self._axis(self.phi0, self.phi1)

    @property
    def radii(self) -> np.ndarray:
        return self.r0 + self.r_step * np.arange(round((self.r1 - self.r0) / self.r_step) + 1)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.phis), len(self.thetas))

    def directions(self) -> np.ndarray:
        """``(n_phi, n_theta, 3)`` unit ray directions."""
        t, p = np.meshgrid(np.deg2rad(self.thetas), np.deg2rad(self.phis))
        return np.stack([np.sin(t) * np.cos(p), -np.cos(t) * np.cos(p), np.sin(p)], axis=-1)


def _sample_along_rays(values: np.ndarray, grid: CanonicalGrid, rg: RadialGrid,
                       cval: float) -> np.ndarray:
    """``values`` (canonical grid, ``[z, y, x]``) trilinearly along every ray:
    ``(n_phi, n_theta, n_r)``."""
    dirs = rg.directions()
    radii = rg.radii
    pts = np.asarray(rg.centre) + dirs[:, :, None, :] * radii[None, None, :, None]
    gi = grid.to_index(pts)
    return map_coordinates(np.asarray(values, dtype=np.float32),
                           [gi[..., 0], gi[..., 1], gi[..., 2]], order=1, mode="constant",
                           cval=cval, prefilter=False)


def radial_map(mask: np.ndarray, grid: CanonicalGrid, rg: RadialGrid,
               fov: np.ndarray | None = None) -> np.ndarray:
    """Radius of the outermost boundary of ``mask`` along every ray (NaN: none, or the ray
    leaves the field of view ``fov`` right outside it — the boundary is the scan's edge)."""
    samples = _sample_along_rays(mask.astype(np.float32), grid, rg, 0.0)
    r = outermost_crossing(samples, rg.radii, 0.5)
    if fov is not None:
        inside = _sample_along_rays(fov.astype(np.float32), grid, rg, 0.0)
        # the sample just outside the boundary must lie in the field of view
        idx = np.round((np.nan_to_num(r, nan=rg.r0) - rg.r0) / rg.r_step).astype(int) + 2
        nxt = np.clip(idx, 0, len(rg.radii) - 1)
        ok = np.take_along_axis(inside, nxt[..., None], -1)[..., 0] > 0.5
        r = np.where(np.isfinite(r) & ok, r, np.nan)
    return r


def radial_features(hu: np.ndarray, grid: CanonicalGrid, rg: RadialGrid) -> np.ndarray:
    """The model's input: ``(2, n_phi, n_theta)`` — the outermost bone radius with its gaps
    filled harmonically, and 10 × (is there bone along the ray)."""
    fov = np.isfinite(hu)
    bone = bone_mask(np.where(fov, hu, -1000.0))
    r = radial_map(bone, grid, rg)
    has = np.isfinite(r)
    if not has.any():
        raise ReconstructionError("no bone along any ray of the face")
    filled = harmonic_fill(r, ~has, iterations=300)
    return np.stack([filled, 10.0 * has.astype(float)])


def skin_target(hu: np.ndarray, grid: CanonicalGrid, rg: RadialGrid) -> np.ndarray:
    """The training target: radius of the outermost skin (−300 HU) along every ray."""
    fov = np.isfinite(hu)
    return radial_map(np.where(fov, hu, -1000.0) > -300.0, grid, rg, fov=fov)


@dataclass
class SkullToFaceModel:
    """PCA of the bone maps → ridge regression → skin map (see the module docstring)."""

    radial: RadialGrid
    mean_x: np.ndarray
    components: np.ndarray  # (k, d_in)
    weights: np.ndarray  # (k, d_out)
    mean_y: np.ndarray
    card: dict[str, Any] = field(default_factory=dict)

    def predict_map(self, features: np.ndarray) -> np.ndarray:
        """Skin radius map ``(n_phi, n_theta)`` from :func:`radial_features`."""
        x = np.asarray(features, dtype=float).ravel()
        if x.shape != self.mean_x.shape:
            raise ReconstructionError("bone features do not fit the model's radial grid")
        z = self.components @ (x - self.mean_x)
        return (self.mean_y + z @ self.weights).reshape(self.radial.shape)

    def skin_field(self, hu: np.ndarray, grid: CanonicalGrid) -> np.ndarray:
        """Predicted skin on ``grid``: radial distance (canonical mm) inside the predicted
        skin radius along each voxel's ray (positive inside), −50 outside the rays' range."""
        r_pred = self.predict_map(radial_features(hu, grid, self.radial))
        rg = self.radial
        zs, ys, xs = np.meshgrid(grid.zs, grid.ys, grid.xs, indexing="ij")
        d = np.stack([xs, ys, zs], axis=-1) - np.asarray(rg.centre)
        r = np.linalg.norm(d, axis=-1)
        phi = np.degrees(np.arcsin(np.clip(d[..., 2] / np.maximum(r, 1e-9), -1.0, 1.0)))
        theta = np.degrees(np.arctan2(d[..., 0], -d[..., 1]))
        fi = (phi - rg.phi0) / rg.step_deg
        ti = (theta - rg.theta0) / rg.step_deg
        rp = map_coordinates(r_pred, [fi, ti], order=1, mode="constant", cval=np.nan,
                             prefilter=False)
        out = np.where(np.isfinite(rp), rp - r, -50.0)
        return out.astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write the model (``.npz``, float32) and its card (``.json`` beside it)."""
        path = Path(path)
        np.savez_compressed(
            path, format=np.array(_FORMAT), radial=np.array(json.dumps(asdict(self.radial))),
            mean_x=self.mean_x.astype(np.float32), components=self.components.astype(np.float32),
            weights=self.weights.astype(np.float32), mean_y=self.mean_y.astype(np.float32))
        path.with_suffix(".json").write_text(json.dumps(self.card, indent=1) + "\n")


def _load(path: Path) -> SkullToFaceModel:
    if not path.is_file():
        raise ReconstructionError("the learned skull-to-face model is missing (train it with "
                                  "`manage.py train_skull_to_face`)")
    with np.load(path) as d:
        if int(d["format"]) != _FORMAT:
            raise ReconstructionError("the skull-to-face model file has another format")
        rg = RadialGrid(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in json.loads(str(d["radial"])).items()})
        model = SkullToFaceModel(radial=rg, mean_x=d["mean_x"].astype(float),
                                 components=d["components"].astype(float),
                                 weights=d["weights"].astype(float),
                                 mean_y=d["mean_y"].astype(float))
    card = path.with_suffix(".json")
    if card.is_file():
        model.card = json.loads(card.read_text())
    return model


@lru_cache(maxsize=4)
def _cached(path: str) -> SkullToFaceModel:
    return _load(Path(path))


def load_model(path: str | Path | None = None) -> SkullToFaceModel:
    """The shipped model (default) or the one at ``path`` (cached per process)."""
    return _cached(str(Path(path) if path else DEFAULT_MODEL))


def seen_seeds(model: SkullToFaceModel) -> set[int]:
    """Synthetic seeds whose heads the model has seen: its training heads and the validation
    heads its ``k`` and ``lam`` were chosen on (``[first, stop)`` ranges of its card)."""
    seen: set[int] = set()
    for key in ("train_seeds", "validation_seeds"):
        first_stop = model.card.get(key)
        if not first_stop:
            raise ReconstructionError(f"the skull-to-face model's card has no {key}: "
                                      "cannot show that it is evaluated on unseen heads")
        seen |= set(range(int(first_stop[0]), int(first_stop[1])))
    return seen


def check_held_out(model: SkullToFaceModel, seeds: list[int] | set[int]) -> dict[str, Any]:
    """Refuse to evaluate the learned attack on synthetic subjects the model has seen.

    ``seeds`` are the evaluated subjects' synthetic seeds (``phi.json`` of
    ``manage.py synth_cohort``). Raises :class:`ReconstructionError` when any of them is a
    training or validation head of ``model``; returns what was checked.
    """
    seen = seen_seeds(model)
    overlap = sorted({int(s) for s in seeds} & seen)
    if overlap:
        raise ReconstructionError(
            f"the learned skull-to-face model was trained or validated on {len(overlap)} of the "
            f"evaluated subjects (synthetic seeds {overlap[:5]}{'…' if len(overlap) > 5 else ''})"
            ": its figures would not be those of an attack on unseen heads")
    return {"subject_seeds": sorted(int(s) for s in seeds),
            "train_seeds": model.card["train_seeds"],
            "validation_seeds": model.card["validation_seeds"], "disjoint": True}


# --------------------------------------------------------------------------- training


def training_pair(seed: int, size: str = "small", rg: RadialGrid | None = None,
                  grid: CanonicalGrid | None = None) -> dict[str, Any]:
    """One synthetic training example: features of the de-identified head, skin target of
    the original (both in the canonical frame of the de-identified head's bone).

    The head is ``SubjectParams.random(seed)`` at an :data:`ACQUISITIONS` size with its
    default random pose; de-identified by :func:`pipeline.deface.deface`.
    """
    # loaded on first use: pulls in trimesh
    from .align import alignment_from_volume
    from .deface import deface

    rg = rg or RadialGrid()
    grid = grid or CanonicalGrid()
    shape, spacing = ACQUISITIONS[size]
    head = generate_head(SubjectParams.random(int(seed)), shape=shape, spacing_mm=spacing,
                         noise_seed=int(seed))
    deid = head.volume.with_hu(deface(head.volume).hu)
    al = alignment_from_volume(deid)
    hu_d = resample_canonical(deid, al, grid)
    hu_o = resample_canonical(head.volume, al, grid)
    return {"seed": int(seed), "size": size, "x": radial_features(hu_d, grid, rg),
            "y": skin_target(hu_o, grid, rg), "scale": float(al.scale)}


def fit_model(x: np.ndarray, y: np.ndarray, k: int, lam: float, rg: RadialGrid,
              card: dict[str, Any] | None = None) -> SkullToFaceModel:
    """Fit on ``x`` (n, d_in) features and ``y`` (n, d_out) skin maps.

    NaN in ``y`` are unknown cells (a ray that leaves the field of view): each cell's
    mean and regression use only the heads that know it (cells are grouped by the set of
    heads that know them, one ridge solve per group). A cell no head knows predicts the
    mean of all cells.
    """
    x = np.asarray(x, dtype=float)
    y = np.array(y, dtype=float)
    known = np.isfinite(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_y = np.where(known, y, 0.0).sum(axis=0) / known.sum(axis=0)
    mean_y = np.where(np.isfinite(mean_y), mean_y, np.nanmean(mean_y))
    mean_x = x.mean(axis=0)
    xc = x - mean_x
    _u, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = int(min(k, len(s)))
    comps = vt[:k]
    z = xc @ comps.T
    yc = np.where(known, y - mean_y, 0.0)
    w = np.zeros((k, y.shape[1]))
    patterns, inverse = np.unique(known.T, axis=0, return_inverse=True)
    for g, rows in enumerate(patterns):
        cols = np.flatnonzero(inverse.ravel() == g)
        if rows.sum() == 0:
            continue
        # centred on the heads that know these cells; the intercept absorbs the offset
        zbar = z[rows].mean(axis=0)
        zk = z[rows] - zbar
        w[:, cols] = np.linalg.solve(zk.T @ zk + lam * np.eye(k), zk.T @ yc[rows][:, cols])
        mean_y[cols] -= zbar @ w[:, cols]
    return SkullToFaceModel(radial=rg, mean_x=mean_x, components=comps, weights=w, mean_y=mean_y,
                            card=dict(card or {}))
