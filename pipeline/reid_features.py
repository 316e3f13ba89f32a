"""Per-subject re-identification features: the one chain from CT volumes to matcher inputs.

Used by ``manage.py reid_eval``, the web platform's surfaces/embeddings stages
and ``benchmarks/bench_reid.py``; :mod:`pipeline.reid` turns the features of
a cohort into metrics.

For one subject (:func:`subject_features`):

1. **Gallery** — the subject's known face. With ``protocol.rescan`` (default)
   it is a *simulated second acquisition* of the original
   (:func:`pipeline.rescan.simulate_rescan`: a small seeded head motion and a
   new, sub-voxel shifted sampling grid), aligned on its own bone; so
   gallery and probes never share a surface, its terraces or its alignment.
   Rendered at ``gallery_yaw_deg``.
2. **Probes**, rendered at ``probe_yaw_deg`` (default 30°) with the same
   settings: *control* = the original volume, *deidentified* = the
   de-identified volume. Both use the alignment and crop computed once from
   the original's bone (the bone is identical), so they differ only by the
   removed soft tissue.
3. Surfaces: skin iso-surface (−300 HU) of the canonical face box at about
   ``resolution_mm``, decimated, then Taubin-smoothed
   (:func:`pipeline.surface.smooth_mesh`) so slice terraces do not dominate.
4. Views: every combination of the camera elevations ``elevations_deg`` and
   the head-fixed lights ``light_azimuths_deg`` (the light does not turn with
   the camera, so a surface looks the same from every view up to projection).
5. Reconstruction attacks (``attacks``, :mod:`pipeline.reconstruct`): from the
   de-identified volume alone, a face is rebuilt on the kept skull (tissue-depth
   landmarks, a learned skull-to-face model); each reconstruction is a probe condition
   ``attack_<name>`` rendered, meshed and embedded exactly like the de-identified probe
   (same alignment — the attacker's, from the de-identified bone —, crop, smoothing,
   views).
6. Matchers (:data:`MATCHERS`):

   * ``appearance`` — dlib's ResNet face descriptor (``face-recognition-models``)
     of every view (face box: HOG detector, else the canonical face box);
     the views of a condition are fused by averaging unit-length descriptors;
   * ``surface`` — the frontal depth map (:mod:`pipeline.shape`) of all the
     views' depth buffers: geometry only, no shading, no learned model.

Units: degrees, mm (canonical units ≈ mm), HU.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .embed import get_embedder
from .reid import ReidError, embedding_similarity
from .render import RenderResult, RenderSettings
from .shape import DepthGrid, depth_points, depth_similarity, frontal_depth_map

__all__ = [
    "ATTACK_PREFIX",
    "CONDITIONS_WITH_GALLERY",
    "MATCHERS",
    "ReidProtocol",
    "SubjectFeatures",
    "attack_condition",
    "features_from_json",
    "features_to_json",
    "is_attack_condition",
    "study_similarities",
    "subject_features",
]

#: Matcher name → one-line description (shown in reports).
MATCHERS: dict[str, str] = {
    "appearance": "dlib ResNet face descriptor of the shaded renders, views averaged, "
                  "cohort-centred cosine similarity",
    "surface": "frontal depth map from the renders' depth buffers, robust (median) depth "
               "distance of cohort-centred maps",
}
#: Feature sets of a subject: the gallery and the two probe conditions (plus one
#: ``attack_<name>`` condition per reconstruction attack that was run, see
#: :func:`attack_condition`).
CONDITIONS_WITH_GALLERY = ("gallery", "control", "deidentified")
#: Prefix of the probe conditions of reconstruction attacks.
ATTACK_PREFIX = "attack_"
_FORMAT = 1


def attack_condition(attack: str) -> str:
    """Probe condition name of a reconstruction attack (``tissue_depth`` → ``attack_tissue_depth``)."""
    return ATTACK_PREFIX + attack


def is_attack_condition(condition: str) -> bool:
    """Whether ``condition`` is the probe condition of a reconstruction attack."""
    return condition.startswith(ATTACK_PREFIX)


@dataclass(frozen=True)
class ReidProtocol:
    """Everything that defines the study's views, surfaces and gallery (see module docstring)."""

    gallery_yaw_deg: float = 0.0
    probe_yaw_deg: float = 30.0
    elevations_deg: tuple[float, ...] = (-10.0, 10.0)
    #: head-fixed key lights: azimuth from straight ahead towards the subject's left (degrees)
    light_azimuths_deg: tuple[float, ...] = (0.0, 40.0, -40.0)
    light_elevation_deg: float = 32.0
    rescan: bool = True
    rescan_max_rotation_deg: float = 4.0
    rescan_max_shift_mm: float = 3.0
    resolution_mm: float = 2.0
    target_faces: int = 80_000
    smoothing_iterations: int = 20
    skin_level_hu: float = -300.0
    render: RenderSettings = field(default_factory=RenderSettings)
    depth_grid: DepthGrid = field(default_factory=DepthGrid)

    def __post_init__(self) -> None:
        if not self.elevations_deg or not self.light_azimuths_deg:
            raise ValueError("a protocol needs at least one elevation and one light")
        for y in (self.gallery_yaw_deg, self.probe_yaw_deg):
            if abs(y) >= 90:
                raise ValueError("yaw angles must lie strictly between -90 and 90 degrees")
        if self.smoothing_iterations < 0 or self.resolution_mm <= 0:
            raise ValueError("smoothing_iterations must be >= 0 and resolution_mm > 0")

    def view_settings(self) -> list[RenderSettings]:
        """The render settings of every view (elevation × light), in a fixed order."""
        return [replace(self.render, elevation_deg=float(e), light_azimuth_deg=float(a),
                        light_elevation_deg=self.light_elevation_deg)
                for e in self.elevations_deg for a in self.light_azimuths_deg]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (for metrics files and reports)."""
        d = asdict(self)
        d["n_views_per_condition"] = len(self.view_settings())
        return d


@dataclass
class SubjectFeatures:
    """Matcher inputs of one subject for the gallery and both probe conditions.

    ``embeddings[c]`` (n_views, 128) dlib descriptors, ``detected[c]``
    (n_views,) whether the HOG detector found the face (else the canonical
    box was used), ``depth_maps[c]`` (n_z, n_x) frontal depth map (NaN =
    unseen), for ``c`` in :data:`CONDITIONS_WITH_GALLERY` (``deidentified``
    missing when no de-identified volume was given) and the ``attack_<name>``
    conditions of the attacks that were run. ``renders[c]`` holds the views
    when asked for; ``attacks[name]`` what each attack found (landmarks found
    and missing, voxels added; no image).
    """

    label: str
    embeddings: dict[str, np.ndarray]
    detected: dict[str, np.ndarray]
    depth_maps: dict[str, np.ndarray]
    alignment: Any = None
    gallery_alignment: Any = None
    renders: dict[str, list[RenderResult]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    faces: dict[str, int] = field(default_factory=dict)
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fused_embedding(self, condition: str) -> np.ndarray:
        """Mean of the unit-length descriptors of a condition's views (128-d)."""
        e = np.asarray(self.embeddings[condition], dtype=float)
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(axis=0)


def _uniform(volume: Any) -> Any:
    as_uniform = getattr(volume, "as_uniform", None)
    return as_uniform() if callable(as_uniform) else volume


def subject_features(
    original: Any,
    deidentified: Any | None = None,
    *,
    label: str = "",
    seed: int = 0,
    protocol: ReidProtocol | None = None,
    backend: str = "auto",
    keep_renders: bool = False,
    template: Any = None,
    timeout_s: float = 120.0,
    attacks: Sequence[str] = (),
    attack_model: Any = None,
) -> SubjectFeatures:
    """Gallery, control and de-identified features of one subject (see the module docstring).

    ``original`` / ``deidentified`` are :class:`pipeline.volume.Volume` (HU,
    LPS); ``seed`` fixes the simulated re-scan of the gallery (use
    :func:`pipeline.rescan.volume_seed` of the original). ``attacks`` names
    reconstruction attacks (:data:`pipeline.reconstruct.ATTACKS`) to run on the
    de-identified volume (``attack_model``: another learned model than the
    shipped one).
    Raises :class:`pipeline.align.AlignmentError`,
    :class:`pipeline.surface.SurfaceError`, :class:`pipeline.render.RenderError`,
    :class:`pipeline.embed.EmbedError` or
    :class:`pipeline.reconstruct.ReconstructionError` when a step fails.
    """
    # loaded on first use: pulls in trimesh
    from . import render as R
    from .align import alignment_from_volume
    from .rescan import simulate_rescan
    from .surface import skin_surface, smooth_mesh, strides_for_resolution

    protocol = protocol or ReidProtocol()
    # a series whose slice spacing changes is meshed on a regular resampling (when the
    # Volume class offers one)
    original = _uniform(original)
    deidentified = None if deidentified is None else _uniform(deidentified)
    views = protocol.view_settings()
    box = protocol.render.mesh_box
    t: dict[str, float] = {}

    def tick(key: str, t0: float) -> float:
        now = time.perf_counter()
        t[key] = t.get(key, 0.0) + now - t0
        return now

    def mesh_of(volume: Any, crop: Any, al: Any) -> Any:
        m = skin_surface(volume, level_hu=protocol.skin_level_hu, crop_ijk=crop,
                         stride=strides_for_resolution(volume, protocol.resolution_mm),
                         target_faces=protocol.target_faces)
        return smooth_mesh(al.apply_mesh(m), protocol.smoothing_iterations)

    t0 = time.perf_counter()
    alignment = alignment_from_volume(original, template)
    crop = R.canonical_crop(original, alignment, box)
    t0 = tick("alignment", t0)
    if protocol.rescan:
        gallery_volume, _motion = simulate_rescan(
            original, seed=seed, max_rotation_deg=protocol.rescan_max_rotation_deg,
            max_shift_mm=protocol.rescan_max_shift_mm, min_spacing_mm=protocol.resolution_mm)
        t0 = tick("rescan", t0)
        gallery_alignment = alignment_from_volume(gallery_volume, template)
        gallery_crop = R.canonical_crop(gallery_volume, gallery_alignment, box)
        t0 = tick("alignment", t0)
    else:
        gallery_volume, gallery_alignment, gallery_crop = original, alignment, crop

    sources: list[tuple[str, Any, Any, Any, float]] = [
        ("gallery", gallery_volume, gallery_crop, gallery_alignment, protocol.gallery_yaw_deg),
        ("control", original, crop, alignment, protocol.probe_yaw_deg),
    ]
    attack_info: dict[str, dict[str, Any]] = {}
    if deidentified is not None:
        if original.same_grid(deidentified):
            al_d = alignment
            sources.append(("deidentified", deidentified, crop, alignment, protocol.probe_yaw_deg))
        else:  # another grid: align its own (identical) bone
            al_d = alignment_from_volume(deidentified, template)
            sources.append(("deidentified", deidentified, R.canonical_crop(deidentified, al_d, box),
                            al_d, protocol.probe_yaw_deg))
            t0 = tick("alignment", t0)
        if attacks:
            # loaded on first use: pulls in scipy
            from .reconstruct import reconstruct

            # the attacker aligns the de-identified bone; the alignment depends on the bone
            # mask and grid alone, so the original's is the attacker's when both are equal
            if al_d is alignment and not np.array_equal(original.hu >= 300, deidentified.hu >= 300):
                al_d = alignment_from_volume(deidentified, template)
                t0 = tick("alignment", t0)
            for name in attacks:
                rec = reconstruct(deidentified, name, alignment=al_d, model=attack_model,
                                  stride=strides_for_resolution(deidentified,
                                                                protocol.resolution_mm))
                sources.append((attack_condition(name), rec.volume,
                                R.canonical_crop(rec.volume, al_d, box), al_d,
                                protocol.probe_yaw_deg))
                attack_info[name] = {"voxels_added": rec.voxels_added,
                                     "landmarks_found": sorted(rec.landmarks),
                                     "landmarks_missing": list(rec.missing)}
                t0 = tick("reconstruction", t0)

    embedder = get_embedder(upsample=0)  # faces fill the renders: no upsampling needed
    emb: dict[str, np.ndarray] = {}
    det: dict[str, np.ndarray] = {}
    depth: dict[str, np.ndarray] = {}
    renders: dict[str, list[RenderResult]] = {}
    faces: dict[str, int] = {}
    for name, volume, cr, al, yaw in sources:
        t0 = time.perf_counter()
        mesh = mesh_of(volume, cr, al)
        faces[name] = len(mesh.faces)
        t0 = tick("surfaces", t0)
        rs = R.render_view_set(mesh, [(yaw, st) for st in views], backend=backend,
                               timeout_s=timeout_s)
        t0 = tick("renders", t0)
        vecs, found = [], []
        for r in rs:
            e = embedder.embed(r.image, R.canonical_face_box(r.yaw_deg, r.settings))
            vecs.append(e.vector)
            found.append(e.detected)
        emb[name] = np.asarray(vecs)
        det[name] = np.asarray(found, dtype=bool)
        t0 = tick("embeddings", t0)
        pts = np.concatenate([depth_points(r.depth, R.camera_pose(r.yaw_deg, r.settings),
                                           r.settings.yfov_deg) for r in rs])
        depth[name] = frontal_depth_map(pts, protocol.depth_grid).astype(np.float32)
        t0 = tick("depth_maps", t0)
        if keep_renders:
            renders[name] = rs
    return SubjectFeatures(label=label, embeddings=emb, detected=det, depth_maps=depth,
                           alignment=alignment, gallery_alignment=gallery_alignment,
                           renders=renders, timings_s=t, faces=faces, attacks=attack_info)


def study_similarities(features: Sequence[SubjectFeatures]) -> dict[str, dict[str, np.ndarray]]:
    """``{matcher: {condition: (n, n) similarity}}`` of a cohort, probes × gallery, in list order.

    Conditions are ``control`` and, when every subject has them, ``deidentified``
    and the ``attack_<name>`` conditions (sorted by name).
    Matchers: ``appearance`` (:func:`pipeline.reid.embedding_similarity` of the
    fused descriptors) and ``surface`` (:func:`pipeline.shape.depth_similarity`).
    """
    if len(features) < 2:
        raise ReidError("re-identification needs at least two subjects")
    conditions = ["control"]
    if all("deidentified" in f.embeddings for f in features):
        conditions.append("deidentified")
    conditions += sorted(c for c in features[0].embeddings if is_attack_condition(c)
                         and all(c in f.embeddings for f in features))
    gallery_e = np.array([f.fused_embedding("gallery") for f in features])
    gallery_d = np.array([f.depth_maps["gallery"] for f in features])
    out: dict[str, dict[str, np.ndarray]] = {"appearance": {}, "surface": {}}
    for c in conditions:
        out["appearance"][c] = embedding_similarity(
            np.array([f.fused_embedding(c) for f in features]), gallery_e)
        out["surface"][c] = depth_similarity(np.array([f.depth_maps[c] for f in features]),
                                             gallery_d)
    return out


# --------------------------------------------------------------------------- storage


def _encode(a: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    return {"dtype": dtype, "shape": list(arr.shape),
            "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def _decode(d: Mapping[str, Any]) -> np.ndarray:
    if d.get("dtype") not in ("float16", "float32", "float64", "bool"):
        raise ReidError("stored features have an unknown dtype")
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=d["dtype"]).reshape(d["shape"]).copy()


def features_to_json(f: SubjectFeatures) -> dict[str, Any]:
    """Compact JSON-ready form (descriptors float32, depth maps float16, base64)."""
    return {
        "format": _FORMAT,
        "embeddings": {c: _encode(v, "float32") for c, v in f.embeddings.items()},
        "detected": {c: [bool(x) for x in v] for c, v in f.detected.items()},
        "depth_maps": {c: _encode(v, "float16") for c, v in f.depth_maps.items()},
        "faces": dict(f.faces),
        "attacks": dict(f.attacks),
    }


def features_from_json(d: Mapping[str, Any], label: str = "") -> SubjectFeatures:
    """Inverse of :func:`features_to_json` (no renders, alignment or timings)."""
    if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
        raise ReidError("stored re-identification features are missing or of another format")
    return SubjectFeatures(
        label=label,
        embeddings={c: _decode(v).astype(float) for c, v in d["embeddings"].items()},
        detected={c: np.asarray(v, dtype=bool) for c, v in d["detected"].items()},
        depth_maps={c: _decode(v).astype(float) for c, v in d["depth_maps"].items()},
        faces=dict(d.get("faces", {})),
        attacks=dict(d.get("attacks", {})),
    )
