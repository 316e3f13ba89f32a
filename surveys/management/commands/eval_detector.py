"""``python manage.py eval_detector`` — mAP50 / mAP50-95 per class on held-out subjects.

By default the shipped model is evaluated on freshly generated *test* subjects
of the synthetic generator (seeds disjoint from training, same acquisition
ranges as recorded in the model's metadata). ``--data DATA.yaml`` evaluates on
a user's YOLO dataset instead. The figures are printed and written next to the
weights as ``<weights stem>.eval.json``.

``--real-labels FILE`` (repeatable) adds a labelled real series
(:mod:`pipeline.real_labels`; the series folder is ``--real-root/<series>``,
default ``../shared/realct``; a group's own labels from ``manage.py label_import``,
``DATASET/real-labels/series-NN.json``, with ``--real-root`` the folder ``label_export``
read): Ultralytics mAP50 per class on its slices as the
detector sees them, and, at the method's score threshold ``--conf``, per class
the labelled boxes found (IoU ≥ 0.5) and the slices where the class is visible
and found, and why each labelled box that was not found was missed (no box, a
box in the wrong place, or one below the threshold: the detector run again at
:data:`MISS_FLOOR`). They go under ``"real"`` in the JSON. **The synthetic figures are
not real-world figures.**
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline import detector, detector_data, dicom_io
from pipeline.label_export import canonical_image
from pipeline.real_labels import detection_report, load_labels, yolo_dataset

#: score down to which boxes are looked for when explaining a missed labelled box ("weak")
MISS_FLOOR = 0.05


def _labelled_hu(root: Path, labels: Any) -> np.ndarray:
    """The HU slices ``[k, row, column]`` a label file describes, in the labels' frame: the
    series folder ``root/<series>``, or for ``series-NN`` (``manage.py label_import``) the NN-th series that
    :func:`pipeline.dicom_io.scan_folder` finds below ``root`` (the export's INPUT, numbered as
    ``label_export`` numbered it). Labels in the ``"detector view"`` frame get the slices as
    the export wrote them (axial, face at the top, patient left on the right)."""
    folder = root / labels.series
    number = re.fullmatch(r"series-(\d+)", labels.series)
    if folder.is_dir():
        ref = dicom_io.scan_folder(folder).series[0]
    elif number is not None and root.is_dir():
        refs = [r for r in dicom_io.scan_folder(root).series if r.index == int(number.group(1))]
        if not refs:
            raise CommandError(f"no series #{int(number.group(1))} below --real-root (give the folder "
                               f"label_export read)")
        ref = refs[0]
    else:
        raise CommandError(f"labelled series {labels.series!r} not found under --real-root")
    vol = dicom_io.load_series(ref).volume
    if labels.info.get("frame") != "detector view":
        return vol.hu
    return np.stack([canonical_image(vol, k)[0] for k in range(vol.hu.shape[0])])


class Command(BaseCommand):
    help = "Evaluate the facial-feature detector (mAP50, mAP50-95 per class) on held-out subjects."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--weights", type=Path, default=None,
                            help="detector .onnx or .pt (default: the shipped model)")
        parser.add_argument("--data", type=Path, default=None,
                            help="YOLO dataset yaml (default: synthetic held-out test subjects)")
        parser.add_argument("--split", default="test", help="dataset split to evaluate (default test)")
        parser.add_argument("--subjects", type=int, default=None,
                            help="number of synthetic test subjects (default: as in the metadata)")
        parser.add_argument("--imgsz", type=int, default=None)
        parser.add_argument("--real-labels", type=Path, action="append", default=[],
                            help="label file of a real series (e.g. tests/data/realct_labels/ge-head-ct.json)")
        parser.add_argument("--real-root", type=Path, default=None,
                            help="folder holding the labelled series (default ../shared/realct; for "
                                 "label_import's real-labels/series-NN.json the folder label_export read)")
        parser.add_argument("--conf", type=float, default=None,
                            help="score threshold of the real-series figures (default: the model "
                                 "method's, pipeline.face_model.ModelFaceRegion.conf)")
        parser.add_argument("--no-synthetic", action="store_true",
                            help="only the real series (keeps the synthetic figures of an earlier run)")

    def handle(self, *args, **o) -> None:
        weights = Path(o["weights"] or detector.DEFAULT_WEIGHTS).resolve()
        if not weights.is_file():
            raise CommandError("weights file not found")
        meta_path = weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        imgsz = o["imgsz"] or int(meta.get("imgsz", 256))
        detector.configure_ultralytics(Path(settings.VAR_DIR) / "ultralytics")
        out = weights.with_name(weights.stem + ".eval.json")
        real = self._real(weights, imgsz, o) if o["real_labels"] else None
        if o["no_synthetic"]:
            if real is None:
                raise CommandError("--no-synthetic needs --real-labels")
            old = json.loads(out.read_text()) if out.is_file() else {}
            old["real"] = real
            out.write_text(json.dumps(old, indent=1) + "\n")
            self.stdout.write(f"written: {out}")
            return
        with tempfile.TemporaryDirectory(prefix="eval-detector-") as tmp:
            if o["data"] is not None:
                data_yaml = Path(o["data"]).resolve()
                if not data_yaml.is_file():
                    raise CommandError("--data must be an existing Ultralytics dataset yaml")
                split = o["split"]
                described = {"source": "user dataset", "yaml_name": data_yaml.name, "split": split}
            else:
                spec = detector_data.spec_from_metadata(meta)
                if o["subjects"]:
                    spec.n_test = o["subjects"]
                self.stdout.write(f"generating {spec.n_test} held-out synthetic subjects")
                data_yaml = detector_data.build_dataset(Path(tmp) / "ds", spec, splits=("test",))
                split = "test"
                described = {"source": "synthetic held-out subjects", "seeds": spec.seeds("test"),
                             "split": split}
            try:
                m = detector.evaluate_yolo(weights, data_yaml, split=split, imgsz=imgsz)
            except (FileNotFoundError, SyntaxError, KeyError) as exc:
                raise CommandError(f"evaluation failed: {exc}") from None
        m["data"] = described
        w = self.stdout.write
        w(f"{'class':<8} {'mAP50':>7} {'mAP50-95':>9} {'inst.':>6}")
        for name, c in m["per_class"].items():
            w(f"{name:<8} {c['mAP50']:>7.3f} {c['mAP50_95']:>9.3f} {c['instances'] or 0:>6}")
        w(f"{'all':<8} {m['mAP50']:>7.3f} {m['mAP50_95']:>9.3f}")
        if real is not None:
            m["real"] = real
        out.write_text(json.dumps(m, indent=1) + "\n")
        w(f"written: {out}")

    def _real(self, weights: Path, imgsz: int, o: dict) -> dict:
        # loaded on first use: pulls in scipy
        from pipeline.face_model import ModelFaceRegion

        root = o["real_root"] or Path(settings.BASE_DIR).parent / "shared" / "realct"
        conf = o["conf"] if o["conf"] is not None else ModelFaceRegion.conf
        if not 0.0 <= conf < 1.0:
            raise CommandError("--conf must be a score from 0 up to 1")
        det = detector.load_detector(weights)
        res = {}
        w = self.stdout.write
        for path in o["real_labels"]:
            try:
                labels = load_labels(path)
            except (OSError, ValueError, KeyError) as exc:
                raise CommandError(f"cannot read the label file ({exc.__class__.__name__})") from None
            hu = _labelled_hu(root, labels)
            with tempfile.TemporaryDirectory(prefix="eval-real-") as tmp:
                y = yolo_dataset(hu, labels, Path(tmp), imgsz=imgsz, windows=det.meta.hu_windows)
                m = detector.evaluate_yolo(weights, y, split="test", imgsz=imgsz)
            rep = detection_report(det, hu, labels, conf=conf,
                                   diagnose=min(MISS_FLOOR, conf / 2) if conf > 0 else None)
            alone = detection_report(det, hu, labels, conf=conf, link=False)
            for r in (rep, alone):
                r.pop("boxes", None)
            res[labels.series] = {"mAP50": m["mAP50"], "mAP50_95": m["mAP50_95"],
                                  "per_class_map": {c: v["mAP50"] for c, v in m["per_class"].items()},
                                  "at_threshold": rep, "at_threshold_unlinked": alone}
            w(f"real series {labels.series}: mAP50 {m['mAP50']:.3f} (slices alone); at conf {conf}, "
              f"boxes linked across slices as the model method uses them (each slice alone):")
            for c, v in rep["per_class"].items():
                if v["instances"]:
                    a = alone["per_class"].get(c, {})
                    w(f"  {c:<6} {v['found']}/{v['instances']} boxes, {v['slices_found']}/{v['slices_visible']} "
                      f"slices ({a.get('found', 0)}/{a.get('instances', 0)}, "
                      f"{a.get('slices_found', 0)}/{a.get('slices_visible', 0)}); "
                      f"mAP50 {m['per_class'].get(c, {}).get('mAP50', 0.0):.3f}")
            misses = rep.get("misses", [])
            if misses:
                w(f"  not found (linked), why: 'misplaced' = a box above {conf} at IoU < 0.5, 'weak' = a box "
                  f"at IoU >= 0.5 below {conf}, 'none' = no box of the class on it:")
            for x in misses:
                i0, j0, i1, j1 = x["box"]
                how = "" if x["why"] == "none" else f" (IoU {x['iou']:.2f}, score {x['score']:.2f})"
                w(f"    slice {x['slice']:>3} {x['class']:<6} columns {i0}-{i1}, rows {j0}-{j1}: {x['why']}{how}")
        return res
