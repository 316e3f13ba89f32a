"""Labelled real CT for the detector: label files, YOLO datasets and per-class detection figures.

A label file (JSON, e.g. ``tests/data/realct_labels/ge-head-ct.json``) holds, per
native slice ``k`` of a series (in :func:`pipeline.dicom_io.load_series` order),
boxes ``[class, i0, j0, i1, j1]`` in native pixels (column/row, exclusive end)
of the detector classes (:data:`pipeline.detector_data.CLASSES`), plus
``"visible"``: per class, the slices where it is visible. File names and JSON
hold no identifier: slices are numbered, series named by their folder.

* :func:`yolo_dataset` writes the series as a YOLO dataset *as the detector
  sees it* (in-plane stride ``floor(size / imgsz)`` as in
  :class:`pipeline.face_model.ModelFaceRegion`, HU windows of the model) for
  Ultralytics' mAP (:func:`pipeline.detector.evaluate_yolo`);
* :func:`detection_report` runs a loaded detector at a threshold, its boxes linked
  across neighbouring slices as the model method does (:mod:`pipeline.slice_linking`;
  ``link=False``: each slice alone), and reports per class the labelled instances,
  how many a box of that class matches (IoU ≥ 0.5, one to one), and on how many of
  the slices where the class is visible it is found (every labelled instance on the
  slice matched); with ``diagnose``, why each labelled box was not found
  (:func:`explain_misses`: no box, a box in the wrong place, or a box below the threshold).

Array conventions: ``hu[k, j, i]`` as in :class:`pipeline.volume.Volume`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .detector_data import CLASSES, HU_WINDOWS, hu_to_rgb8
from .slice_linking import detect_linked

__all__ = ["RealLabels", "detection_report", "explain_misses", "label_agreement", "load_labels", "match_boxes",
           "match_pairs", "yolo_dataset"]


@dataclass
class RealLabels:
    """Boxes per native slice: ``slices[k] = [(class, i0, j0, i1, j1), …]``."""

    series: str
    slices: dict[int, list[tuple[str, int, int, int, int]]]
    visible: dict[str, list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def boxes(self, k: int, cls: str) -> list[tuple[int, int, int, int]]:
        return [tuple(b[1:]) for b in self.slices.get(k, []) if b[0] == cls]  # type: ignore[misc]


def load_labels(path: Path) -> RealLabels:
    """Read a label file (see the module docstring); raises ``ValueError`` if malformed."""
    d = json.loads(Path(path).read_text())
    slices: dict[int, list] = {}
    for k, boxes in d["slices"].items():
        out = []
        for b in boxes:
            if len(b) != 5 or b[0] not in CLASSES or not (b[1] < b[3] and b[2] < b[4]):
                raise ValueError(f"bad box {b!r} on slice {k}")
            out.append((str(b[0]), int(b[1]), int(b[2]), int(b[3]), int(b[4])))
        slices[int(k)] = out
    vis = {c: [int(k) for k in ks] for c, ks in (d.get("visible") or {}).items()}
    info = {k: v for k, v in d.items() if k not in ("slices", "visible")}
    return RealLabels(str(d.get("series", "")), slices, vis, info)


def _stride(shape: tuple[int, ...], imgsz: int) -> int:
    return max(1, int(np.floor(max(shape[-2:]) / imgsz)))


def yolo_dataset(hu: np.ndarray, labels: RealLabels, out_dir: Path, *, imgsz: int = 160,
                 windows=HU_WINDOWS, split: str = "test") -> Path:
    """Write every slice of ``hu`` with its boxes as a YOLO dataset (split ``split``), at the
    detector's in-plane stride for ``imgsz``; returns ``data.yaml``. Images are
    ``slice-KKK.png``."""
    from PIL import Image

    out_dir = Path(out_dir).resolve()
    f = _stride(hu.shape, imgsz)
    img_dir, lab_dir = out_dir / "images" / split, out_dir / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for k in range(hu.shape[0]):
        img = hu_to_rgb8(hu[k, ::f, ::f], windows)
        Image.fromarray(img).save(img_dir / f"slice-{k:03d}.png")
        h, w = img.shape[:2]
        lines = []
        for c, i0, j0, i1, j1 in labels.slices.get(k, []):
            a, b, cc, dd = i0 / f, j0 / f, i1 / f, j1 / f
            lines.append(f"{CLASSES.index(c)} {(a + cc) / 2 / w:.6f} {(b + dd) / 2 / h:.6f} "
                         f"{(cc - a) / w:.6f} {(dd - b) / h:.6f}")
        (lab_dir / f"slice-{k:03d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    yaml = [f"path: {out_dir}"] + [f"{s}: images/{split}" for s in ("train", "val", "test")]
    (out_dir / "data.yaml").write_text("\n".join(yaml) + f"\nnames:\n{names}\n")
    return out_dir / "data.yaml"


def box_iou(a, b) -> float:
    """Intersection over union of two boxes ``(x0, y0, x1, y1)`` (any units, x1 ≥ x0)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def match_pairs(truth: list, pred: list, iou: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matches (highest IoU first) of predicted to true boxes at IoU ≥ ``iou``:
    ``(truth index, pred index, IoU)`` for each match (``iou=0`` pairs every overlapping box)."""
    pairs = sorted(((box_iou(t, p), a, b) for a, t in enumerate(truth) for b, p in enumerate(pred)), reverse=True)
    used_t, used_p, out = set(), set(), []
    for v, a, b in pairs:
        if v < iou or v <= 0.0:
            break
        if a in used_t or b in used_p:
            continue
        used_t.add(a)
        used_p.add(b)
        out.append((a, b, v))
    return out


def match_boxes(truth: list, pred: list, iou: float = 0.5) -> int:
    """Greedy one-to-one matches (highest IoU first) of predicted to true boxes at ≥ ``iou``."""
    return len(match_pairs(truth, pred, iou))


def label_agreement(first: RealLabels, second: RealLabels, cls: str, *, iou: float = 0.5) -> dict[str, Any]:
    """How two labellers' boxes of class ``cls`` on the same series agree.

    Per slice, boxes are paired one to one by IoU (greedy, highest first, any overlap). Returns
    the boxes of each (``first``, ``second``), the pairs, the pairs at IoU ≥ ``iou``
    (``agree``), the median and lowest IoU of the pairs, the slices either labeller shows the
    class on and those where every box of both is in a pair at ≥ ``iou`` (``slices_agree``), and
    per slice the pairs' IoUs and the boxes only one labeller drew (``per_slice``)."""
    ious: list[float] = []
    per: dict[int, dict[str, Any]] = {}
    n1 = n2 = slices = slices_agree = 0
    for k in sorted(set(first.slices) | set(second.slices)):
        a, b = first.boxes(k, cls), second.boxes(k, cls)
        if not a and not b:
            continue
        pairs = match_pairs(a, b, 0.0)
        v = [round(p[2], 3) for p in pairs]
        n1, n2, slices = n1 + len(a), n2 + len(b), slices + 1
        ious.extend(p[2] for p in pairs)
        slices_agree += int(len(a) == len(b) == sum(x >= iou for x in v))
        per[k] = {"iou": v, "only_first": len(a) - len(pairs), "only_second": len(b) - len(pairs)}
    arr = np.asarray(ious)
    return {"class": cls, "iou_threshold": iou, "first": n1, "second": n2, "pairs": len(ious),
            "agree": int((arr >= iou).sum()), "median_iou": round(float(np.median(arr)), 3) if len(arr) else None,
            "min_iou": round(float(arr.min()), 3) if len(arr) else None, "slices": slices,
            "slices_agree": slices_agree, "per_slice": per}


def explain_misses(labels: RealLabels, boxes: dict[int, list], weak_boxes: dict[int, list], *,
                   conf: float, iou: float = 0.5) -> list[dict[str, Any]]:
    """Why each labelled box that no box matches was missed (pure; native pixels).

    ``boxes`` / ``weak_boxes``: per slice ``k``, rows ``[class, i0, j0, i1, j1, score]``
    found at the threshold ``conf`` and at a lower one (the same detector run, as
    :func:`detection_report` returns them). A labelled box counts as found as in
    :func:`detection_report` (one-to-one matches at IoU ≥ ``iou``). For every other one
    returns ``{"slice", "class", "box", "why", "iou", "score"}``: ``why`` is
    ``"misplaced"`` when a box of its class scoring above ``conf`` overlaps it but is not
    matched to it (IoU < ``iou``, or the box went to another labelled box; ``iou``,
    ``score``: the best-overlapping such box); else ``"weak"`` when ``weak_boxes`` has a box
    at IoU ≥ ``iou`` (its best score and that box's IoU); else ``"none"`` (no box of its
    class overlaps it; ``iou`` / ``score`` are ``None``).
    Listed by slice, then class.
    """
    out: list[dict[str, Any]] = []
    for k in sorted(labels.slices):
        for c in CLASSES:
            truth = labels.boxes(k, c)
            if not truth:
                continue
            sure = [tuple(r[1:6]) for r in boxes.get(k, []) if r[0] == c]
            weak = [tuple(r[1:6]) for r in weak_boxes.get(k, []) if r[0] == c]
            matched = {a for a, _, _ in match_pairs(truth, [b[:4] for b in sure], iou)}
            for a, t in enumerate(truth):
                if a in matched:
                    continue
                over = max(((box_iou(t, b[:4]), b[4]) for b in sure), default=(0.0, 0.0))
                good = max(((b[4], v) for b in weak if (v := box_iou(t, b[:4])) >= iou), default=None)
                row: dict[str, Any] = {"slice": k, "class": c, "box": list(t)}
                if over[0] > 0.0:
                    row.update(why="misplaced", iou=round(over[0], 3), score=round(float(over[1]), 3))
                elif good is not None:
                    row.update(why="weak", iou=round(good[1], 3), score=round(float(good[0]), 3))
                else:
                    row.update(why="none", iou=None, score=None)
                out.append(row)
    return out


def detection_report(detector: Any, hu: np.ndarray, labels: RealLabels, *, conf: float,
                     iou: float = 0.5, link: bool = True, diagnose: float | None = None) -> dict[str, Any]:
    """Per class: labelled instances, matched instances (recall), visible slices and slices
    where every labelled instance is found, false boxes on slices without that class,
    at score threshold ``conf``; plus the boxes found per slice (native pixels).
    ``link``: boxes rescored across neighbouring slices first
    (:func:`pipeline.slice_linking.detect_linked`), as :class:`pipeline.face_model.ModelFaceRegion`
    does; ``False``: every slice scored alone. ``diagnose`` (a score below ``conf``): the
    detector is run a second time at that threshold and ``"misses"`` lists why each labelled
    box was not found (:func:`explain_misses`)."""
    if diagnose is not None and not 0.0 < diagnose < conf:
        raise ValueError("diagnose must be a score between 0 and conf")
    f = _stride(hu.shape, detector.meta.imgsz)
    slices = np.ascontiguousarray(hu[:, ::f, ::f])
    dets = detect_linked(detector, slices, conf=conf, link=link)
    canon = [detector.meta.canonical(c) for c in range(len(detector.meta.classes))]

    def rows_of(detections: list) -> dict[int, list]:  # native pixels, unrounded
        found: dict[int, list] = {}
        for k, d in enumerate(detections):
            rows = [[canon[int(cid)] or str(int(cid)), *[float(v) * f for v in b], float(s)]
                    for b, s, cid in zip(d.boxes, d.scores, d.class_ids)]
            if rows:
                found[k] = rows
        return found

    found = rows_of(dets)
    per: dict[str, dict[str, Any]] = {}
    for c in CLASSES:
        inst = hit = vis = vis_found = false_slices = 0
        for k in range(hu.shape[0]):
            truth = labels.boxes(k, c)
            pred = [tuple(r[1:5]) for r in found.get(k, []) if r[0] == c]
            n = match_boxes(truth, pred, iou) if truth and pred else 0
            inst += len(truth)
            hit += n
            if truth:
                vis += 1
                vis_found += int(n == len(truth))
            elif pred:
                false_slices += 1
        if inst or false_slices:
            per[c] = {"instances": inst, "found": hit, "recall": round(hit / inst, 3) if inst else None,
                      "slices_visible": vis, "slices_found": vis_found, "slices_with_false_boxes": false_slices}
    out = {"series": labels.series, "conf": conf, "iou": iou, "linked": link, "per_class": per,
           "boxes": {k: [[r[0], *(round(v, 1) for v in r[1:5]), round(r[5], 3)] for r in rows]
                     for k, rows in found.items()}}
    if diagnose is not None:
        weak = rows_of(detect_linked(detector, slices, conf=diagnose, link=link))
        out["misses"] = explain_misses(labels, found, weak, conf=conf, iou=iou)
    return out
