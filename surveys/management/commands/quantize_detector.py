"""``python manage.py quantize_detector`` — INT8 copy of the detector for fast CPU inference.

Quantizes a YOLOv8 ONNX model (default: the shipped one) with ONNX Runtime's
static INT8 quantization (:func:`pipeline.detector.quantize_onnx`), calibrated on
synthetic training-range slices, writes ``<stem>.int8.onnx`` beside it with its
own metadata ``<stem>.int8.json`` (the float model's, plus the precision, the
calibration and — unless ``--no-eval`` — the INT8 model's test figures next to
the float model's on the same held-out synthetic subjects).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline import detector, detector_data


class Command(BaseCommand):
    help = "Write an INT8-quantized copy of a YOLOv8 ONNX detector and evaluate it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--weights", type=Path, default=None,
                            help="float ONNX detector (default: the shipped model)")
        parser.add_argument("--calibration-subjects", type=int, default=6)
        parser.add_argument("--no-eval", action="store_true",
                            help="skip the test-set evaluation of both models")
        parser.add_argument("--make-default", action="store_true",
                            help="mark the INT8 copy as the default weights (only if its test mAP50 "
                                 "is within --max-drop of the float model's)")
        parser.add_argument("--max-drop", type=float, default=0.01,
                            help="largest accepted mAP50 drop for --make-default (default 0.01)")

    def handle(self, *args, **o) -> None:
        src = Path(o["weights"] or detector.DEFAULT_WEIGHTS).resolve()
        if not src.is_file() or src.suffix.lower() != ".onnx":
            raise CommandError("--weights must be an existing .onnx detector")
        meta_path = src.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        imgsz = int(meta.get("imgsz", 256))
        if o["make_default"] and (o["no_eval"] or not (meta.get("data") or {}).get("spec")):
            raise CommandError("--make-default needs the evaluation (metadata with a synthetic spec, "
                               "no --no-eval)")
        dst = src.with_name(src.stem + ".int8.onnx")
        self.stdout.write(f"calibrating on {o['calibration_subjects']} synthetic training subjects")
        domain = bool(((meta.get("data") or {}).get("spec") or {}).get("domain"))
        calib = detector.synthetic_calibration(imgsz, n_subjects=o["calibration_subjects"], domain=domain)
        try:
            detector.quantize_onnx(src, dst, calib)
        except detector.DetectorError as exc:
            raise CommandError(str(exc)) from None
        out_meta = dict(meta)
        out_meta["precision"] = "int8"
        out_meta["metrics"] = None  # the float model's figures do not describe this copy
        out_meta["default"] = False
        out_meta["quantization"] = {
            "source": src.name, "method": "onnxruntime static QDQ of "
            f"{', '.join(detector.QUANTIZED_OPS)} (box decoder in float, DFL softmax on the last axis), "
            "per-channel S8 weights, U8 activations, min/max calibration",
            "calibration": f"{calib.shape[0]} slices with facial features from "
                           f"{o['calibration_subjects']} synthetic training-range subjects"
                           + (" (domain-randomised)" if domain else ""),
        }
        if not o["no_eval"] and (meta.get("data") or {}).get("spec"):
            detector.configure_ultralytics(Path(settings.VAR_DIR) / "ultralytics")
            spec = detector_data.spec_from_metadata(meta)
            self.stdout.write(f"evaluating both on {spec.n_test} held-out synthetic subjects")
            with tempfile.TemporaryDirectory(prefix="quantize-eval-") as tmp:
                data_yaml = detector_data.build_dataset(Path(tmp) / "ds", spec, splits=("test",))
                m_float = detector.evaluate_yolo(src, data_yaml, split="test", imgsz=imgsz)
                m_int8 = detector.evaluate_yolo(dst, data_yaml, split="test", imgsz=imgsz)
            out_meta["metrics"] = m_int8
            out_meta["quantization"]["float_metrics_same_data"] = {
                "mAP50": m_float["mAP50"], "mAP50_95": m_float["mAP50_95"]}
            self.stdout.write(f"test mAP50 float {m_float['mAP50']:.3f} → int8 {m_int8['mAP50']:.3f}; "
                              f"mAP50-95 {m_float['mAP50_95']:.3f} → {m_int8['mAP50_95']:.3f}")
            if o["make_default"]:
                ok = m_int8["mAP50"] >= m_float["mAP50"] - o["max_drop"]
                out_meta["default"] = bool(ok)
                self.stdout.write("INT8 marked as the default weights" if ok else
                                  f"INT8 NOT made the default: mAP50 drop > {o['max_drop']}")
        dst.with_suffix(".json").write_text(json.dumps(out_meta, indent=1) + "\n")
        self.stdout.write(f"written: {dst}")
