"""A YOLO dataset of a group's own CT with pre-labels, to correct in a labelling tool (CVAT).

The detector reaches the seed paper's setting only when trained on labelled real
CT (``manage.py train_detector --data DATA.yaml``). Labelling from nothing is
slow; :func:`export_series` writes every slice through the face of each CT
series below a folder as an image *as the detector sees it* (axial, face at the
top, patient left on the right of the image; the model's three HU windows as
RGB) with **pre-labels** in YOLO format:

* ``face``: per slice, the detector's ``face`` box where it gives one (its class is
  trained on the label's definition, :data:`MODEL_FIRST`); elsewhere, or without a
  detector, the box of the anatomical method's removable region — the face zone of
  :func:`pipeline.envelope.find_envelope` ∩ the patient's body ∩ outside the facial
  skeleton's hull, the auricles' flaps excluded (a wider definition: forehead to cheeks);
* ``ears``: the same region's ear parts (the auricles' thin flaps), per side;
* ``eyes``: the globes found by the envelope (a 24 mm sphere each), cut by the
  slice plane, 2 mm of lids around them;
* ``eyes``, ``nose``, ``lips``, ``ears`` from the detector (default the shipped
  model, score ≥ ``conf`` after linking its boxes across neighbouring slices as the
  model method does, :mod:`pipeline.slice_linking`) where the anatomy gave none of
  that class nearby.

Every pre-label is a proposal: a person must check and correct each box (nose
and lips come from the model only).

Layout of ``OUT``::

    images/train/series-NN_slice-KKK.png    labels/train/series-NN_slice-KKK.txt
    data.yaml  classes.txt  export.json  README.txt
    cvat-yolo.zip    (obj.names, obj.data, train.txt, obj_train_data/*.txt: CVAT's "YOLO 1.1")

File names number series (in :func:`pipeline.dicom_io.scan_folder` order) and
slices; nothing else of the input (paths, UIDs, names, dates) is written. The
images show the faces: keep the export where the source CT may be kept.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .detector_data import CLASSES, HU_WINDOWS, hu_to_rgb8
from .dicom_io import load_series, scan_folder
from .real_labels import box_iou
from .slice_linking import detect_linked
from .volume import Volume

__all__ = ["ExportSummary", "canonical_image", "export_folder", "series_prelabels"]

#: Classes whose detector boxes, on a slice where the detector gives one, replace the anatomy's.
MODEL_FIRST: frozenset[str] = frozenset({"face"})
GLOBE_RADIUS_MM = 12.0
LID_MM = 2.0


@dataclass
class ExportSummary:
    """What :func:`export_folder` wrote (no identifiers)."""

    series: int = 0
    failed: list[str] = field(default_factory=list)
    no_face: list[int] = field(default_factory=list)  # series (by index) with nothing to label
    not_exported: list[str] = field(default_factory=list)  # why other series and files were left out
    images: int = 0
    boxes: dict[str, int] = field(default_factory=lambda: {c: 0 for c in CLASSES})
    sources: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"series": self.series, "failed": self.failed, "no_face": self.no_face,
                "not_exported": self.not_exported, "images": self.images,
                "boxes": self.boxes, "pre_label_sources": self.sources}


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    if not mask.any():
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2D mask (the auricle's flap, not scalp slivers)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def series_prelabels(volume: Volume, *, detector: Any = None, conf: float = 0.25
                     ) -> tuple[dict[int, list[tuple[str, int, int, int, int, str]]], dict[str, Any]]:
    """Pre-labels of one series in **native** pixels: ``{k: [(class, i0, j0, i1, j1, source)]}``
    (source ``"anatomical"`` or ``"model"``) and notes (whether a face was found)."""
    # loaded on first use: pulls in scipy
    from .envelope import FaceZone, SliceStack, find_envelope

    hu = volume.hu
    env = find_envelope(volume)
    out: dict[int, list] = {}
    notes: dict[str, Any] = {"face_found": bool(env.face_found)}
    if env.face_found and env.zone is not None:
        parts = list(zip(env.zone.parts, env.zone.names))
        face_env = replace(env, zone=FaceZone([p for p, n in parts if not n.endswith("ear")],
                                              [n for p, n in parts if not n.endswith("ear")]))
        ear_envs = [(n, replace(env, zone=FaceZone([p], [n]))) for p, n in parts if n.endswith("ear")]
        for k in sorted(env.native_boxes_of_zone()):
            zone, outside, body = face_env.slice_masks(k, hu[k])
            b = _bbox(zone & outside & body)
            if b is not None:
                out.setdefault(k, []).append(("face", *b, "anatomical"))
            for _, e in ear_envs:
                zone, outside, body = e.slice_masks(k, hu[k])
                b = _bbox(_largest(zone & outside & body))
                if b is not None and (b[2] - b[0]) * (b[3] - b[1]) >= 16:
                    out.setdefault(k, []).append(("ears", *b, "anatomical"))
    st = SliceStack.of(volume)
    dj, di = st.pixel_mm
    for g in (env.landmarks.globe_right, env.landmarks.globe_left):
        if g is None:
            continue
        for k in range(hu.shape[0]):
            rel = np.asarray(g, float) - st.origins[k]
            d = float(rel @ st.normal)
            if abs(d) >= GLOBE_RADIUS_MM * 0.9:
                continue
            r = float(np.sqrt(GLOBE_RADIUS_MM ** 2 - d * d)) + LID_MM
            u, v = float(rel @ st.row) / di, float(rel @ st.col) / dj
            b = (int(max(0, np.floor(u - r / di))), int(max(0, np.floor(v - r / dj))),
                 int(min(hu.shape[2], np.ceil(u + r / di))), int(min(hu.shape[1], np.ceil(v + r / dj))))
            if b[0] < b[2] and b[1] < b[3]:
                out.setdefault(k, []).append(("eyes", *b, "anatomical"))
    if detector is not None:
        # loaded on first use: pulls in scipy
        from .face_model import _canonical, _from_view, _to_view

        axes, flips = _canonical(volume)
        view = _to_view(hu, axes, flips)
        f = max(1, int(np.floor(max(view.shape[1:]) / detector.meta.imgsz)))
        dets = detect_linked(detector, np.ascontiguousarray(view[:, ::f, ::f]), conf=conf)
        model_first: dict[tuple[int, str], list] = {}
        canon = [detector.meta.canonical(c) for c in range(len(detector.meta.classes))]
        for s, det in enumerate(dets):
            for box, cid in zip(det.boxes, det.class_ids):
                name = canon[int(cid)]
                if name is None:
                    continue
                m = np.zeros(view.shape[1:], bool)
                i0, j0, i1, j1 = (int(round(float(x) * f)) for x in box)
                m[max(0, j0):j1, max(0, i0):i1] = True
                # the box back in the native array (the view may transpose or flip axes)
                vol_m = np.zeros(view.shape, bool)
                vol_m[s] = m
                nat = _from_view(vol_m, axes, flips)
                ks = np.flatnonzero(nat.reshape(nat.shape[0], -1).any(axis=1))
                if ks.size != 1:
                    continue
                k = int(ks[0])
                b = _bbox(nat[k])
                if b is None:
                    continue
                if name in MODEL_FIRST:
                    model_first.setdefault((k, name), []).append((name, *b, "model"))
                    continue
                same = [q for q in out.get(k, []) if q[0] == name and box_iou(q[1:5], b) >= 0.3]
                if not same:
                    out.setdefault(k, []).append((name, *b, "model"))
        for (k, name), boxes in model_first.items():  # the model's boxes replace the anatomy's there
            out[k] = [q for q in out.get(k, []) if q[0] != name] + boxes
        if not env.face_found:  # no face for the anatomy: the model's boxes only where it found a
            # face by the model method's own rule (a nose, and eyes or lips; a skull phantom's
            # "nose" alone is not one)
            found = {q[0] for v in out.values() for q in v}
            seen = "nose" in found and bool(found & {"eyes", "lips"})
            notes["face_found_by_model"] = seen
            if not seen:
                out = {}
    return out, notes


def canonical_image(volume: Volume, k: int) -> tuple[np.ndarray, Any]:
    """Native slice ``k`` as the detector sees it (face at the top, patient left on the
    right) and the function mapping a native box to that image."""
    # loaded on first use: pulls in scipy
    from .face_model import _canonical

    axes, flips = _canonical(volume)
    sl = volume.hu[k]
    if axes[0] != 0:  # not an axial stack (export_folder leaves those out): the native slice
        return sl, lambda b: b
    flip_r, flip_c = flips[1], flips[2]
    transpose = axes[1] == 2  # rows of the view are the native columns
    img = sl.T if transpose else sl
    img = img[::-1 if flip_r else 1, ::-1 if flip_c else 1]
    h, w = img.shape

    def box(b):
        i0, j0, i1, j1 = b
        if transpose:
            i0, j0, i1, j1 = j0, i0, j1, i1
        if flip_c:
            i0, i1 = w - i1, w - i0
        if flip_r:
            j0, j1 = h - j1, h - j0
        return i0, j0, i1, j1

    return img, box


def export_folder(input_dir: Path, out_dir: Path, *, detector: Any = None, conf: float = 0.25,
                  context: int = 2, progress: Any = None) -> ExportSummary:
    """Export every CT series below ``input_dir`` (see the module docstring) into ``out_dir``.

    ``detector``: a loaded detector for model pre-labels (None: anatomy only).
    ``context``: slices exported beyond the first and last pre-labelled one.
    A series that cannot be loaded is listed by index in ``summary.failed``; one with no face
    (no pre-label: neither the anatomy nor the detector found one) in ``summary.no_face``; a
    series that is not CT or not axial (the detector reads axial slices), and damaged image
    files, in ``summary.not_exported`` (by index or count: paths may hold identifiers).
    """
    from PIL import Image


    out_dir = Path(out_dir)
    img_dir, lab_dir = out_dir / "images" / "train", out_dir / "labels" / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary()
    # loaded on first use: pulls in scipy
    from .face_model import _canonical

    scan = scan_folder(Path(input_dir))
    refs = [r for r in scan.series if r.modality in ("CT", "")]
    for r in scan.series:
        if r.modality not in ("CT", ""):
            summary.not_exported.append(f"input series #{r.index}: {r.modality}, not CT")
    image_problems = sum(1 for p in scan.problems if p.lost_data)
    if image_problems:
        summary.not_exported.append(f"{image_problems} damaged or unreadable DICOM image file(s)")
    it = progress(refs, len(refs)) if progress is not None else refs
    names: list[str] = []
    for ref in it:
        tag = f"series-{ref.index:02d}"
        try:
            vol = load_series(ref).volume
            if _canonical(vol)[0][0] != 0:  # the detector reads axial slices: a reformat's
                # coronal or sagittal images would teach it another view
                summary.not_exported.append(f"input series #{ref.index}: not axial slices (a coronal or "
                                            f"sagittal series)")
                continue
            pre, _ = series_prelabels(vol, detector=detector, conf=conf)
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the export
            summary.failed.append(f"input series #{ref.index}: {exc.__class__.__name__}")
            continue
        summary.series += 1
        if not pre:
            summary.no_face.append(ref.index)
            continue
        ks = sorted(pre)
        lo, hi = max(0, ks[0] - context), min(vol.hu.shape[0], ks[-1] + 1 + context)
        for k in range(lo, hi):
            img, to_img = canonical_image(vol, k)
            rgb = hu_to_rgb8(img, HU_WINDOWS)
            stem = f"{tag}_slice-{k:03d}"
            Image.fromarray(rgb).save(img_dir / f"{stem}.png")
            h, w = rgb.shape[:2]
            lines = []
            for name, i0, j0, i1, j1, src in pre.get(k, []):
                a, b, c, d = to_img((i0, j0, i1, j1))
                lines.append(f"{CLASSES.index(name)} {(a + c) / 2 / w:.6f} {(b + d) / 2 / h:.6f} "
                             f"{(c - a) / w:.6f} {(d - b) / h:.6f}")
                summary.boxes[name] += 1
                summary.sources[f"{name}:{src}"] = summary.sources.get(f"{name}:{src}", 0) + 1
            (lab_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            names.append(stem)
            summary.images += 1
    _write_meta(out_dir, names, summary)
    return summary


def _write_meta(out_dir: Path, names: list[str], summary: ExportSummary) -> None:
    cls = "\n".join(CLASSES) + "\n"
    (out_dir / "classes.txt").write_text(cls)
    # no 'path': Ultralytics takes the yaml's folder, so the export can be moved (or renamed into place)
    yaml = ["train: images/train", "val: images/train", "test: images/train",
            "names:"] + [f"  {i}: {n}" for i, n in enumerate(CLASSES)]
    (out_dir / "data.yaml").write_text("\n".join(yaml) + "\n")
    (out_dir / "export.json").write_text(json.dumps({
        **summary.as_dict(), "classes": list(CLASSES), "hu_windows": [list(w) for w in HU_WINDOWS],
        "image": "axial slice, face at the top, patient left on the right; RGB = the detector's HU windows",
    }, indent=1) + "\n")
    with zipfile.ZipFile(out_dir / "cvat-yolo.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("obj.names", cls)
        z.writestr("obj.data", f"classes = {len(CLASSES)}\nnames = obj.names\ntrain = train.txt\n")
        z.writestr("train.txt", "".join(f"obj_train_data/{n}.png\n" for n in names))
        for n in names:
            z.write(out_dir / "labels" / "train" / f"{n}.txt", f"obj_train_data/{n}.txt")
    (out_dir / "README.txt").write_text(
        "Pre-labelled CT slices for the facial-feature detector (deidstudy manage.py label_export).\n\n"
        "The images show faces: keep this folder where the source CT may be kept.\n\n"
        "Every box is a proposal (face: the detector's face box, else the anatomical method's removable\n"
        "region; ears: that region's auricle flaps; eyes: the globes it found; nose, lips and further\n"
        "boxes: the detector). Check and correct every box.\n\n"
        "CVAT: create a task with the images of images/train (labels: " + ", ".join(CLASSES) + "),\n"
        "then Actions > Upload annotations > 'YOLO 1.1' with cvat-yolo.zip. Export the corrected\n"
        "annotations as 'YOLO 1.1' (a zip), then write the training dataset, its series split into\n"
        "train and val (by series, never by slice), and train:\n"
        "  .venv/bin/python manage.py label_import THIS-FOLDER CVAT-EXPORT.zip DATASET [--val-series 2]\n"
        "  .venv/bin/python manage.py train_detector --data DATASET/data.yaml\n")
