"""Face-region methods driven by the YOLOv8 facial-feature detector.

:class:`ModelFaceRegion` (``--method model``)
    Runs the detector (:mod:`pipeline.detector`) on axial slices in a
    canonical view (slice axis → Superior, rows → Posterior so the face is at
    the top, columns → patient Left), only on slices that contain the body and
    at a slice stride of about ``detect_every_mm``, and links its boxes across
    those slices (:mod:`pipeline.slice_linking`). Per detected slice the boxes
    of the removal classes (``face``, ``eyes``, ``nose``, ``lips``, ``ears``)
    enlarged by ``box_margin_mm`` form a 2D mask; on a slice with ear boxes the
    rectangle spanning them and the face's boxes is added (the cheeks, temples
    and pre-auricular skin between the face and the auricles, which the
    ``face`` class — trained to stop 25 mm in front of the ear canals — leaves
    out).
    The masks are **smoothed across neighbouring slices**: a detection on a
    single slice whose neighbours have none is dropped (isolated false box), a
    one-slice gap between two detected slices is filled, and slices between
    two detected slices get the union of both. :func:`pipeline.deface.deface`
    then removes, inside those boxes, only the patient's tissue outside the
    facial skeleton's hull (:mod:`pipeline.envelope`): a box can never reach
    the globes, sinuses, oral cavity or brain, nor a head holder.

:class:`AutoFaceRegion` (``--method auto``)
    The anatomical face zone (:class:`pipeline.deface.AnatomicalFaceRegion`)
    **plus** the detector's boxes on the slices of the anatomical face range ±
    a margin, when the model is *plausible* (a nose and at least one of
    eyes/lips). A missed box cannot leave a nose behind (the anatomical zone is
    always used); a false box removes nothing inside the skeleton. The ``nose``
    boxes go to :func:`pipeline.deface.deface` separately (``RegionResult.nose``),
    which checks that the soft tissue outside the skeleton in them was removed
    (``DefaceQA.nose_check``) and warns when it was not. When the
    model is not plausible the anatomical zone is used with a warning in the
    QA summary; when the anatomy finds no face, nothing is removed — unless it is
    *doubtful* (soft tissue stands in front of the skeleton, but no eyes or nose were
    located: a child, a swollen face) and has a skeleton hull: then the detector runs
    on every slice and, if plausible, its boxes alone are removed (with a warning).

Array conventions: ``volume.hu[k, j, i]`` in HU with DICOM LPS geometry
(:class:`pipeline.volume.Volume`); distances in mm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .deface import (
    MODEL_NOSE_NOTE,
    AnatomicalFaceRegion,
    FaceRegionMethod,
    NoseBoxes,
    RegionResult,
    bbox_of,
)
from .detector import DetectorError, load_detector
from .envelope import NO_NOSE_NOTE
from .slice_linking import detect_linked
from .volume import Volume

__all__ = ["REMOVAL_CLASSES", "AutoFaceRegion", "ModelFaceRegion", "make_model_method"]

#: canonical classes whose boxes define removable soft tissue (the auricles too: they identify)
REMOVAL_CLASSES: tuple[str, ...] = ("face", "eyes", "nose", "lips", "ears")


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
    instead. ``conf``: box score threshold. ``link_slices``: rescore the boxes across the
    slices run (:mod:`pipeline.slice_linking`) before the threshold, so that a nose or
    globe found on one slice is kept on its neighbours where it scores lower; a chain
    never rises above its best box, so nothing appears that no slice found.
    ``detect_every_mm``: slice stride for running the detector (boxes are
    carried to the slices in between). ``box_margin_mm``: in-plane enlargement
    of each box. ``bridge_ears``: on slices with ear boxes, also the rectangle
    spanning the ear boxes and the other removal boxes.
    """

    weights: Path | None = None
    class_map: Path | None = None
    conf: float = 0.3
    link_slices: bool = True
    detect_every_mm: float = 3.0
    box_margin_mm: float = 3.0
    body_threshold_hu: float = -500.0
    removal_classes: tuple[str, ...] = REMOVAL_CLASSES
    bridge_ears: bool = True
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
        masks, _, details = self.detect_masks_and_nose(volume, s_range)
        return masks, details

    def detect_masks_and_nose(
        self, volume: Volume, s_range: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, ViewCrop, dict[str, Any]]:
        """:meth:`detect_masks` plus the ``nose`` boxes alone (enlarged and carried across
        slices as the removal masks are): ``(masks, nose, details)``; ``masks`` bool in the
        canonical view, ``nose`` a :class:`ViewCrop` of it (the nose boxes are small: a whole
        volume of them would add its size to the peak memory). :func:`pipeline.deface.deface`
        checks that the soft tissue outside the skeleton in the nose boxes was removed."""
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
        nose = ViewCrop(slice(0, 0), slice(0, 0), np.zeros((ns, 0, 0), bool))
        details: dict[str, Any] = {"slices_run": int(run.size), "detect_stride": stride,
                                   "found": {}}
        if run.size == 0:
            details["seconds_detect"] = round(time.perf_counter() - t0, 3)
            return masks, nose, details
        # in-plane downsampling before windowing: the model input is imgsz pixels anyway
        imgsz = self.loaded_detector.meta.imgsz
        f = max(1, int(np.floor(max(npp, nl) / imgsz)))
        slices = np.ascontiguousarray(view[run, ::f, ::f])
        t1 = time.perf_counter()
        dets = detect_linked(self.loaded_detector, slices, conf=self.conf, link=self.link_slices)
        t2 = time.perf_counter()
        meta = self.loaded_detector.meta
        canon = [meta.canonical(c) for c in range(len(meta.classes))]
        mp, ml = self.box_margin_mm / dp, self.box_margin_mm / dl
        slice_masks = np.zeros((run.size, npp, nl), bool)
        slice_nose = np.zeros((run.size, npp, nl), bool)
        nose_px = [npp, 0, nl, 0]  # the nose boxes' in-plane bounds (P, L)
        found: dict[str, int] = {}
        for r, det in enumerate(dets):
            spans: dict[str, list[tuple[int, int, int, int]]] = {}
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
                if name == "nose":
                    slice_nose[r, a0:a1, b0:b1] = True
                    nose_px = [min(nose_px[0], a0), max(nose_px[1], a1),
                               min(nose_px[2], b0), max(nose_px[3], b1)]
                spans.setdefault("ears" if name == "ears" else "face", []).append((a0, a1, b0, b1))
            if self.bridge_ears and len(spans) == 2:  # face to the auricles: the cheeks and temples
                allb = np.array(spans["ears"] + spans["face"])
                slice_masks[r, allb[:, 0].min():allb[:, 1].max(), allb[:, 2].min():allb[:, 3].max()] = True
        # smoothing across neighbouring detected slices
        anyr = slice_masks.reshape(run.size, -1).any(1)
        keep = anyr.copy()
        for r in range(run.size):
            if anyr[r]:
                left = r > 0 and anyr[r - 1]
                right = r + 1 < run.size and anyr[r + 1]
                keep[r] = left or right or run.size == 1
        _carry(slice_masks, keep, run, masks)
        if nose_px[1] > nose_px[0]:
            p, q = slice(nose_px[0], nose_px[1]), slice(nose_px[2], nose_px[3])
            nose = ViewCrop(p, q, np.zeros((ns, p.stop - p.start, q.stop - q.start), bool))
            _carry(slice_nose[:, p, q], keep, run, nose.mask)
        details["found"] = found
        details["isolated_dropped"] = int(np.count_nonzero(anyr & ~keep))
        details["seconds_prepare"] = round(t1 - t0, 3)
        details["seconds_detect"] = round(t2 - t1, 3)
        details["model_slices_with_region"] = int(np.count_nonzero(masks.reshape(ns, -1).any(1)))
        return masks, nose, details

    def _to_volume(self, volume: Volume, masks_view: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """Canonical per-slice masks → a mask shaped like ``volume.hu``, plus its bbox."""
        axes, flips = _canonical(volume)
        region = np.ascontiguousarray(_from_view(masks_view, axes, flips))
        return region, bbox_of(region)

    def face_region(self, volume: Volume) -> RegionResult:
        """Region where soft tissue may be removed, from smoothed detector boxes.

        Returns a :class:`pipeline.deface.RegionResult` (mask shaped like
        ``volume.hu``; :func:`pipeline.deface.deface` keeps only what lies
        outside the skeleton in the body); an empty mask plus a warning when the
        detector finds no facial feature.
        """
        t0 = time.perf_counter()
        masks, nose, details = self.detect_masks_and_nose(volume)
        region, box = self._to_volume(volume, masks)
        warnings = []
        if box is None:
            warnings.append("the detector found no facial feature; nothing removed")
        details["backend"] = getattr(self.loaded_detector, "backend", "")
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return RegionResult(region, warnings, details, box, nose=self._nose_volume(volume, nose))

    def _nose_volume(self, volume: Volume, nose: ViewCrop) -> NoseBoxes | None:
        """The nose boxes in array order: ``(bbox, mask within it)`` (None: no nose box)."""
        ks = np.flatnonzero(nose.mask.reshape(nose.mask.shape[0], -1).any(1))
        if ks.size == 0:
            return None
        axes, flips = _canonical(volume)
        crop = nose.mask[ks[0]:ks[-1] + 1]
        view_box = (slice(int(ks[0]), int(ks[-1]) + 1), nose.rows, nose.cols)
        box: list[slice] = [slice(0, 0)] * 3
        for d, (ax, flip) in enumerate(zip(axes, flips)):
            n, lo, hi = volume.hu.shape[ax], view_box[d].start, view_box[d].stop
            box[ax] = slice(n - hi, n - lo) if flip else slice(lo, hi)
        return (box[0], box[1], box[2]), np.ascontiguousarray(_from_view(crop, axes, flips))


@dataclass
class ViewCrop:
    """A bool mask in the canonical view (S, P, L) stored within in-plane bounds: ``mask`` is
    ``(n_S, rows, cols)`` of the view's ``[:, rows, cols]``."""

    rows: slice
    cols: slice
    mask: np.ndarray


def _carry(slice_masks: np.ndarray, keep: np.ndarray, run: np.ndarray, masks: np.ndarray) -> None:
    """Write the per-run-slice masks into ``masks`` (canonical view, in place): slices not
    kept are dropped, a one-slice gap between two kept slices gets the union of both, and the
    slices between two run slices with a mask get the union of both."""
    slice_masks[~keep] = False
    filled = slice_masks.copy()
    for r in range(1, run.size - 1):
        if not keep[r] and keep[r - 1] and keep[r + 1]:
            filled[r] = slice_masks[r - 1] | slice_masks[r + 1]
    for r in range(run.size):
        masks[run[r]] = filled[r]
        if r + 1 < run.size and run[r + 1] - run[r] > 1 and filled[r].any() and filled[r + 1].any():
            masks[run[r] + 1:run[r + 1]] = filled[r] | filled[r + 1]


@dataclass
class AutoFaceRegion:
    """Anatomical zone plus plausible detector boxes (see module docstring).

    ``margin_mm``: how far beyond the anatomical face range (along S) model
    boxes are accepted.
    """

    model: ModelFaceRegion = field(default_factory=ModelFaceRegion)
    anatomical: AnatomicalFaceRegion = field(default_factory=AnatomicalFaceRegion)
    margin_mm: float = 15.0
    name: str = "auto"

    def face_region(self, volume: Volume) -> RegionResult:
        """The anatomical zone (with its envelope) and, when plausible, the model's boxes."""
        t0 = time.perf_counter()
        anat = self.anatomical.face_region(volume)
        env = anat.envelope
        warnings: list[str] = list(anat.warnings)
        details: dict[str, Any] = {"anatomical": dict(anat.details)}
        if env is not None and not env.face_found and env.doubtful and env.hull is not None:
            # soft tissue stands in front of the skeleton but the anatomy located no eyes or
            # nose (a child, a swollen face): the detector's boxes alone, if it finds a face
            masks, nose, mdet = self.model.detect_masks_and_nose(
                volume, (0, volume.hu.shape[_canonical(volume)[0][0]]))
            details["model"] = mdet
            if _plausible(mdet) and masks.any():
                region, box = self.model._to_volume(volume, masks)
                details["source"] = "model"
                details["seconds"] = round(time.perf_counter() - t0, 3)
                warnings.append("the anatomical method located no face (eyes, nose); the detector's "
                                "boxes were removed instead")
                return RegionResult(region, warnings, details, box, envelope=env, use_zone=False,
                                    nose=self.model._nose_volume(volume, nose))
        if env is None or not env.face_found:
            details["source"] = "anatomical"
            details["seconds"] = round(time.perf_counter() - t0, 3)
            return RegionResult(None, warnings, details, None, envelope=env, use_zone=True)
        axes, flips = _canonical(volume)
        ns = volume.hu.shape[axes[0]]
        rows = env.native_boxes_of_zone()
        ks = np.array(sorted(rows)) if rows else np.arange(volume.hu.shape[0])
        s_idx = (ns - 1 - ks) if flips[0] else ks
        if axes[0] != 0:  # the zone's slices are not along the canonical S axis: run all
            s_idx = np.arange(ns)
        ds = float(np.mean(env.stack.cells_mm)) if axes[0] == 0 else float(volume.spacing_mm[axes[0]])
        m = int(np.ceil(self.margin_mm / max(ds, 1e-6)))
        s_range = (int(s_idx.min()) - m, int(s_idx.max()) + 1 + m)
        masks, nose, mdet = self.model.detect_masks_and_nose(volume, s_range)
        details["model"] = mdet
        if not _plausible(mdet) or not masks.any():
            warnings.append("the detector found no plausible face (nose + eyes/lips); "
                            "used the anatomical zone")
            details["source"] = "anatomical"
            details["seconds"] = round(time.perf_counter() - t0, 3)
            return RegionResult(None, warnings, details, None, envelope=env, use_zone=True)
        # the anatomical method's own nose finder missed, but the detector's nose is removed
        # (deface checks that it was, and says so when it was not)
        warnings = [f"{w} by the anatomical method; {MODEL_NOSE_NOTE}"
                    if w == NO_NOSE_NOTE else w for w in warnings]
        lo, hi = max(0, s_range[0]), min(ns, s_range[1])
        masks[:lo] = masks[hi:] = nose.mask[:lo] = nose.mask[hi:] = False
        region, box = self.model._to_volume(volume, masks)
        details["source"] = "anatomical+model"
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return RegionResult(region, warnings, details, box, envelope=env, use_zone=True,
                            nose=self.model._nose_volume(volume, nose))


def _plausible(details: dict[str, Any]) -> bool:
    """A detection run (``details`` of :meth:`ModelFaceRegion.detect_masks`) found a face:
    a nose and eyes or lips."""
    found = details.get("found", {})
    return found.get("nose", 0) > 0 and (found.get("eyes", 0) + found.get("lips", 0)) > 0


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

