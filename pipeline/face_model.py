"""Face-region methods driven by the YOLOv8 facial-feature detector.

:class:`ModelFaceRegion` (``--method model``)
    Runs the detector (:mod:`pipeline.detector`) on axial slices in a
    canonical view (slice axis → Superior, rows → Posterior so the face is at
    the top, columns → patient Left), only on slices that contain the body and
    at a slice stride of about ``detect_every_mm``. Per detected slice the boxes
    of the removal classes (``face``, ``eyes``, ``nose``, ``lips``; never
    ``ears``) enlarged by ``box_margin_mm`` form a 2D mask.
    The masks are **smoothed across neighbouring slices**: a detection on a
    single slice whose neighbours have none is dropped (isolated false box), a
    one-slice gap between two detected slices is filled, and slices between
    two detected slices get the union of both. The 3D region is then cut at the
    first bone voxel of each antero-posterior ray
    (:func:`pipeline.deface.trim_behind_bone`), so it can never reach the
    brain behind the frontal bone, and :func:`pipeline.deface.apply_region`
    only turns soft-tissue HU into air inside it: bone and everything outside
    stay bit-identical.

:class:`AutoFaceRegion` (``--method auto``)
    Runs the anatomical method first (:class:`pipeline.deface.AnatomicalFaceRegion`),
    then the detector on the slices of the anatomical face range ± a margin.
    The model is *plausible* when it finds a nose and at least one of
    eyes/lips, on slices inside the anatomical range. Then the region is the
    **union** of the anatomical region and the (depth-limited) model region:
    a missed box cannot leave a nose behind (the anatomical region is always
    kept), boxes outside the anatomical face range are discarded and model
    regions stop at bone / enclosed air (a false box cannot cut the brain).
    When the model is not plausible the anatomical region is used with a
    warning in the QA summary; when the anatomy finds no face but the model
    does, the model region is used with a warning.

Array conventions: ``volume.hu[k, j, i]`` in HU with DICOM LPS geometry
(:class:`pipeline.volume.Volume`); distances in mm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .deface import (
    DEFAULT_BONE_THRESHOLD_HU,
    AnatomicalFaceRegion,
    FaceRegionMethod,
    RegionResult,
    bbox_of,
    trim_behind_bone,
)
from .detector import DetectorError, load_detector
from .volume import Volume

__all__ = ["REMOVAL_CLASSES", "AutoFaceRegion", "ModelFaceRegion", "make_model_method"]

#: canonical classes whose boxes define removable soft tissue (ears are kept)
REMOVAL_CLASSES: tuple[str, ...] = ("face", "eyes", "nose", "lips")


def _canonical(volume: Volume) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Array axes and flips that map ``hu[k, j, i]`` to the view (S, P, L) with all indices
    increasing towards Superior / Posterior / Left."""
    axes, flips = [], []
    for d in ("S", "P", "L"):
        ax, sign = volume.axis_towards(d)
        axes.append(ax)
        flips.append(sign < 0)
    if sorted(axes) != [0, 1, 2]:
        raise DetectorError("cannot map the volume's direction cosines to distinct S/P/L axes")
    return tuple(axes), tuple(flips)  # type: ignore[return-value]


def _to_view(arr: np.ndarray, axes, flips) -> np.ndarray:
    v = np.transpose(arr, axes)
    return v[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _from_view(arr: np.ndarray, axes, flips) -> np.ndarray:
    v = arr[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(v, np.argsort(axes))


@dataclass
class ModelFaceRegion:
    """Face region from detector boxes (see module docstring). Distances in mm.

    ``weights``/``class_map``: see :func:`pipeline.detector.load_detector`
    (default: the shipped ONNX model); ``loaded_detector``: an already loaded
    detector (anything with ``.meta`` and ``.detect(hu_slices, conf=)``), used
    instead. ``conf``: box score threshold.
    ``detect_every_mm``: slice stride for running the detector (boxes are
    carried to the slices in between). ``box_margin_mm``: in-plane enlargement
    of each box. ``bone_hole_mm`` / ``max_depth_mm``: depth limits, see
    :meth:`_finish`.
    """

    weights: Path | None = None
    class_map: Path | None = None
    conf: float = 0.3
    detect_every_mm: float = 3.0
    box_margin_mm: float = 3.0
    body_threshold_hu: float = -500.0
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU
    bone_hole_mm: float = 10.0
    max_depth_mm: float = 40.0
    removal_classes: tuple[str, ...] = REMOVAL_CLASSES
    name: str = "model"
    loaded_detector: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.loaded_detector is None:
            self.loaded_detector = load_detector(self.weights, class_map=self.class_map)

    @property
    def detector(self) -> Any:
        """The loaded detector (:class:`pipeline.detector.OnnxDetector` or Ultralytics)."""
        return self.loaded_detector

    # -- core: per-slice masks in the canonical view
    def detect_masks(
        self, volume: Volume, s_range: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Smoothed 2D removal masks per canonical slice.

        Returns ``(masks, details)`` where ``masks`` is bool ``(n_S, n_P, n_L)``
        in the canonical view (S, P, L) and ``details`` holds counts per class
        (``found``), the canonical slices run, and timings. ``s_range``
        restricts the slices run to ``[start, stop)`` in canonical S order.
        """
        t0 = time.perf_counter()
        axes, flips = _canonical(volume)
        view = _to_view(volume.hu, axes, flips)
        sp = np.asarray(volume.spacing_mm, float)
        ds, dp, dl = (float(sp[a]) for a in axes)
        ns, npp, nl = view.shape
        lo, hi = (0, ns) if s_range is None else (max(0, s_range[0]), min(ns, s_range[1]))
        # body presence per slice on a coarse grid (cheap)
        step_in = max(1, min(npp, nl) // 64)
        coarse = view[lo:hi, ::step_in, ::step_in]
        has_body = (coarse > self.body_threshold_hu).reshape(hi - lo, -1).sum(1) >= 4
        stride = max(1, int(round(self.detect_every_mm / ds)))
        cand = np.flatnonzero(has_body) + lo
        run = cand[::stride] if cand.size else cand
        if cand.size and run[-1] != cand[-1]:
            run = np.append(run, cand[-1])
        masks = np.zeros(view.shape, bool)
        details: dict[str, Any] = {"slices_run": int(run.size), "detect_stride": stride,
                                   "found": {}}
        if run.size == 0:
            details["seconds_detect"] = round(time.perf_counter() - t0, 3)
            return masks, details
        # in-plane downsampling before windowing: the model input is imgsz pixels anyway
        imgsz = self.loaded_detector.meta.imgsz
        f = max(1, int(np.floor(max(npp, nl) / imgsz)))
        slices = np.ascontiguousarray(view[run, ::f, ::f])
        t1 = time.perf_counter()
        dets = self.loaded_detector.detect(slices, conf=self.conf)
        t2 = time.perf_counter()
        meta = self.loaded_detector.meta
        canon = [meta.canonical(c) for c in range(len(meta.classes))]
        mp, ml = self.box_margin_mm / dp, self.box_margin_mm / dl
        slice_masks = np.zeros((run.size, npp, nl), bool)
        found: dict[str, int] = {}
        for r, det in enumerate(dets):
            for box, cid in zip(det.boxes, det.class_ids):
                name = canon[int(cid)]
                if name is None:
                    continue
                found[name] = found.get(name, 0) + 1
                if name not in self.removal_classes:
                    continue
                i0, j0, i1, j1 = (float(v) * f for v in box)
                a0, a1 = int(max(0, np.floor(j0 - mp))), int(min(npp, np.ceil(j1 + mp)))
                b0, b1 = int(max(0, np.floor(i0 - ml))), int(min(nl, np.ceil(i1 + ml)))
                slice_masks[r, a0:a1, b0:b1] = True
        # smoothing across neighbouring detected slices
        anyr = slice_masks.reshape(run.size, -1).any(1)
        keep = anyr.copy()
        for r in range(run.size):
            if anyr[r]:
                left = r > 0 and anyr[r - 1]
                right = r + 1 < run.size and anyr[r + 1]
                keep[r] = left or right or run.size == 1
        slice_masks[~keep] = False
        filled = slice_masks.copy()
        for r in range(1, run.size - 1):
            if not keep[r] and keep[r - 1] and keep[r + 1]:
                filled[r] = slice_masks[r - 1] | slice_masks[r + 1]
        for r in range(run.size):
            masks[run[r]] = filled[r]
            if r + 1 < run.size and run[r + 1] - run[r] > 1 and filled[r].any() and filled[r + 1].any():
                masks[run[r] + 1:run[r + 1]] = filled[r] | filled[r + 1]
        details["found"] = found
        details["isolated_dropped"] = int(np.count_nonzero(anyr & ~keep))
        details["seconds_prepare"] = round(t1 - t0, 3)
        details["seconds_detect"] = round(t2 - t1, 3)
        details["model_slices_with_region"] = int(np.count_nonzero(masks.reshape(ns, -1).any(1)))
        return masks, details

    def _finish(self, volume: Volume, masks_view: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """Canonical per-slice masks → full-volume region limited in depth, plus its bbox.

        Along every antero-posterior ray the region keeps only voxels in front of
        the first bone voxel (``hu >= bone_threshold_hu``; holes in the bone
        narrower than ``bone_hole_mm`` — thin walls lost to partial volume,
        sinus walls — are bridged with a grey opening of the bone-depth map) and
        at most ``max_depth_mm`` behind the skin (first voxel above
        ``body_threshold_hu``).
        """
        axes, flips = _canonical(volume)
        box = bbox_of(masks_view)
        if box is None:
            return np.zeros(volume.hu.shape, bool), None
        sp = np.asarray(volume.spacing_mm, float)
        ds, dp, dl = (float(sp[a]) for a in axes)
        view = _to_view(volume.hu, axes, flips)
        sl_s, sl_p, sl_l = box
        sub_hu = view[sl_s, :sl_p.stop, sl_l]  # rays from the anterior edge of the field of view
        n_p = sub_hu.shape[1]
        bone = sub_hu >= self.bone_threshold_hu
        first_bone = np.where(bone.any(1), bone.argmax(1), n_p).astype(np.float32)
        del bone
        fp = (1, _span(self.bone_hole_mm, dl))  # per slice: slices may be thick
        limit = np.minimum(first_bone, ndi.grey_opening(first_bone, size=fp))
        body = sub_hu > self.body_threshold_hu
        skin = np.where(body.any(1), body.argmax(1), n_p).astype(np.float32)
        limit = np.minimum(limit, skin + self.max_depth_mm / dp)
        # enclosed air (sinuses, airway) ends a ray too: a sinus can touch the brain where
        # its bony wall is thinner than a voxel
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[1] = ndi.generate_binary_structure(2, 1)
        enclosed = ndi.binary_fill_holes(body, structure=in_plane)
        enclosed &= ~body
        del body
        first_air = np.where(enclosed.any(1), enclosed.argmax(1), n_p).astype(np.float32)
        limit = np.minimum(limit, first_air)
        pos = np.arange(n_p, dtype=np.float32)[None, :, None]
        keep = pos < limit[:, None, :]
        region_view = np.zeros(view.shape, bool)
        region_view[sl_s, :sl_p.stop, sl_l] = masks_view[sl_s, :sl_p.stop, sl_l] & keep
        region = np.ascontiguousarray(_from_view(region_view, axes, flips))
        # belt and braces: the public helper of pipeline.deface, at full resolution
        full_box = bbox_of(region)
        if full_box is None:
            return region, None
        ap_axis = axes[1]
        region[full_box] = trim_behind_bone(
            volume.hu[full_box], region[full_box], anterior_axis=ap_axis,
            anterior_is_low_index=not flips[1], bone_threshold_hu=self.bone_threshold_hu,
        )
        return region, bbox_of(region)

    def face_region(self, volume: Volume) -> RegionResult:
        """Region where soft tissue may be removed, from smoothed detector boxes.

        Returns a :class:`pipeline.deface.RegionResult` (mask shaped like
        ``volume.hu``); an empty mask plus a warning when the detector finds no
        facial feature.
        """
        t0 = time.perf_counter()
        masks, details = self.detect_masks(volume)
        region, box = self._finish(volume, masks)
        warnings = []
        if box is None:
            warnings.append("the detector found no facial feature; nothing removed")
        details["backend"] = getattr(self.loaded_detector, "backend", "")
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return RegionResult(region, warnings, details, box)


def _span(width_mm: float, spacing_mm: float) -> int:
    """Odd footprint (voxels) no wider than ``width_mm``: 1 + 2·floor(width / 2 / spacing)."""
    return 1 + 2 * int(np.floor(width_mm / 2.0 / spacing_mm))


@dataclass
class AutoFaceRegion:
    """Model checked against anatomy, anatomical fallback (see module docstring).

    ``margin_mm``: how far beyond the anatomical superior/inferior limits
    model boxes are accepted.
    """

    model: ModelFaceRegion = field(default_factory=ModelFaceRegion)
    anatomical: AnatomicalFaceRegion = field(default_factory=AnatomicalFaceRegion)
    margin_mm: float = 15.0
    name: str = "auto"

    def face_region(self, volume: Volume) -> RegionResult:
        """Combined region (mask shaped like ``volume.hu``) with QA warnings/details."""
        t0 = time.perf_counter()
        anat = self.anatomical.face_region(volume)
        axes, flips = _canonical(volume)
        ds = float(volume.spacing_mm[axes[0]])
        anat_view = _to_view(anat.mask, axes, flips)
        s_any = anat_view.any(axis=(1, 2))
        warnings: list[str] = []
        details: dict[str, Any] = {"anatomical": dict(anat.details)}
        ns = anat_view.shape[0]
        if s_any.any():
            s_idx = np.flatnonzero(s_any)
            m = int(np.ceil(self.margin_mm / ds))
            s_range = (int(s_idx[0]) - m, int(s_idx[-1]) + 1 + m)
        else:
            s_range = (0, ns)
        masks, mdet = self.model.detect_masks(volume, s_range)
        details["model"] = mdet
        found = mdet.get("found", {})
        plausible = found.get("nose", 0) > 0 and (found.get("eyes", 0) + found.get("lips", 0)) > 0
        if plausible and s_any.any():
            lo, hi = max(0, s_range[0]), min(ns, s_range[1])
            inside = masks[lo:hi].reshape(hi - lo, -1).any(1).sum()
            plausible = inside > 0
            masks[:lo] = False
            masks[hi:] = False
        if not plausible:
            warnings.append("the detector found no plausible face (nose + eyes/lips); "
                            "used the anatomical method")
            warnings.extend(anat.warnings)
            details["source"] = "anatomical"
            details["seconds"] = round(time.perf_counter() - t0, 3)
            return RegionResult(anat.mask, warnings, details, anat.bbox)
        if not s_any.any():
            warnings.append("anatomical method found no face; used the detector alone")
            warnings.extend(anat.warnings)
            region, box = self.model._finish(volume, masks)
            details["source"] = "model"
        else:
            # union: never less than the anatomical region (privacy first); the model adds
            # depth-limited soft tissue around the features it found inside the face range
            region_m, _ = self.model._finish(volume, masks)
            details["model_only_voxels"] = int(np.count_nonzero(region_m & ~anat.mask))
            region = region_m | anat.mask
            box = bbox_of(region)
            details["source"] = "anatomical+model"
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return RegionResult(region, warnings, details, box)


def make_model_method(
    weights: Path | None = None, *, auto: bool = False, class_map: Path | None = None
) -> FaceRegionMethod:
    """Build the ``model`` (``auto=False``) or ``auto`` face-region method.

    ``weights``: ``.onnx`` (ONNX Runtime) or ``.pt`` (Ultralytics) detector;
    default the shipped model. ``class_map``: JSON mapping the model's class
    names to :data:`pipeline.detector_data.CLASSES`. Raises
    :class:`pipeline.detector.DetectorError` (a ``ValueError``) when the
    weights cannot be used.
    """
    model = ModelFaceRegion(weights=weights, class_map=class_map)
    if auto:
        return AutoFaceRegion(model=model)
    return model

