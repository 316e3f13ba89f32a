"""``python manage.py train_detector`` — train the YOLOv8 facial-feature detector offline.

Without ``--data`` a YOLO dataset is built from the synthetic head generator
(:mod:`pipeline.detector_data`; subjects split train/val/test by subject). With
``--data DATA.yaml`` a user's own YOLO-format dataset is used (e.g. labelled
real CT slices windowed as in the shipped metadata). Training runs on CPU from
``yolov8n.yaml`` (no pretrained weights), fully offline; the best weights are
exported to ONNX with a metadata JSON next to them (classes, input size, HU
windows, seed, data description, metrics, Ultralytics version).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline import detector, detector_data


class Command(BaseCommand):
    help = "Train the YOLOv8 facial-feature detector (synthetic data by default) and export ONNX."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--data", type=Path, default=None,
                            help="your own YOLO dataset yaml (default: build a synthetic one)")
        parser.add_argument("--out", type=Path, default=None,
                            help="run folder (default VAR_DIR/detector/run)")
        parser.add_argument("--subjects", type=int, default=20, help="synthetic training subjects")
        parser.add_argument("--val-subjects", type=int, default=4)
        parser.add_argument("--test-subjects", type=int, default=6)
        parser.add_argument("--size-px", type=int, default=160, help="synthetic slice size (pixels)")
        parser.add_argument("--domain", action="store_true",
                            help="domain-randomised synthetic heads and acquisitions (pipeline.synth_domain): "
                                 "the shipped model's training data")
        parser.add_argument("--max-slices", type=int, default=0,
                            help="at most this many labelled slices per synthetic subject (0: all)")
        parser.add_argument("--workers", type=int, default=1,
                            help="processes generating the synthetic subjects")
        parser.add_argument("--min-visible-fraction",
                            default=",".join(f"{c}={v:g}" for c, v in detector_data.VISIBLE_FRACTIONS.items()),
                            help="label a feature on a slice only when its area is at least this "
                                 "fraction of its largest cross-section (synthetic data): a number, or "
                                 "per class as '0.2,nose=0.05,ears=0.05' (default: %(default)s)")
        parser.add_argument("--model", default=None,
                            help="Ultralytics model yaml (from scratch) or .pt weights to start from "
                                 "(default: with --data the shipped model's weights, fine-tuned; "
                                 "otherwise yolov8n.yaml)")
        parser.add_argument("--epochs", type=int, default=60)
        parser.add_argument("--time-hours", type=float, default=None,
                            help="wall-time cap; Ultralytics fits the schedule to it")
        parser.add_argument("--imgsz", type=int, default=None,
                            help="training image size (default: the shipped model's when fine-tuning "
                                 "it, otherwise 256)")
        parser.add_argument("--batch", type=int, default=32)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--install", action="store_true",
                            help="copy the ONNX + metadata into pipeline/models/ (the shipped model)")

    def handle(self, *args, **o) -> None:
        try:
            fraction = detector_data.parse_visible_fraction(o["min_visible_fraction"])
        except detector_data.DatasetError as exc:
            raise CommandError(str(exc)) from None
        shipped = detector.MODELS_DIR / "face_yolov8n.pt"
        if o["model"] is None:  # a group's own labels: fine-tune what already finds faces
            o["model"] = str(shipped) if o["data"] is not None and shipped.is_file() else "yolov8n.yaml"
        if o["imgsz"] is None:
            o["imgsz"] = _card_imgsz(shipped) if o["model"] == str(shipped) else 256
        out = (o["out"] or Path(settings.VAR_DIR) / "detector" / "run").resolve()
        out.mkdir(parents=True, exist_ok=True)
        detector.configure_ultralytics(Path(settings.VAR_DIR) / "ultralytics")
        t0 = time.perf_counter()
        if o["data"] is not None:
            data_yaml = Path(o["data"]).resolve()
            if not data_yaml.is_file():
                raise CommandError("--data must be an existing Ultralytics dataset yaml")
            data_info: dict = {"source": "user dataset", "yaml_name": data_yaml.name}
            classes = _yaml_names(data_yaml)
            windows = detector_data.HU_WINDOWS
        else:
            spec = detector_data.DatasetSpec(n_train=o["subjects"], n_val=o["val_subjects"],
                                             n_test=o["test_subjects"], size_px=o["size_px"],
                                             min_visible_fraction=fraction,
                                             domain=o["domain"], max_slices=o["max_slices"])
            self.stdout.write(f"building synthetic dataset ({spec.n_train}/{spec.n_val}/{spec.n_test} subjects)")
            data_yaml = detector_data.build_dataset(out / "dataset", spec, workers=o["workers"])
            counts = json.loads((out / "dataset" / "spec.json").read_text())["counts"]
            data_info = {"source": "pipeline.detector_data synthetic heads", "spec": asdict(spec),
                         "counts": counts}
            classes = list(spec.classes)
            windows = detector_data.HU_WINDOWS
        start = ("fine-tuning the shipped model" if o["model"] == str(shipped)
                 else f"starting from {Path(o['model']).name}")
        self.stdout.write(f"training (this takes a while on CPU): {start}, imgsz {o['imgsz']}")
        try:
            best = detector.train_yolo(data_yaml, out / "train", model_yaml=o["model"], epochs=o["epochs"],
                                       imgsz=o["imgsz"], batch=o["batch"], seed=o["seed"],
                                       time_hours=o["time_hours"], extra={"cache": "ram"})
        except (FileNotFoundError, SyntaxError, ValueError, KeyError) as exc:
            raise CommandError(f"training failed: {exc}") from None
        t_train = time.perf_counter() - t0
        onnx_path = detector.export_onnx(best, out / "face_yolov8n.onnx", imgsz=o["imgsz"])
        metrics = None
        if o["data"] is None:
            metrics = detector.evaluate_yolo(onnx_path, data_yaml, split="test", imgsz=o["imgsz"])
        elif _held_out_val(data_yaml):  # e.g. label_import's series split
            metrics = detector.evaluate_yolo(onnx_path, data_yaml, split="val", imgsz=o["imgsz"])
        meta = write_metadata(onnx_path, classes=classes, imgsz=o["imgsz"], windows=windows,
                              seed=o["seed"], data=data_info, metrics=metrics, train_seconds=t_train,
                              model_yaml=o["model"], results_csv=out / "train" / "results.csv")
        self.stdout.write(f"weights: {onnx_path}")
        if metrics:
            which = "test" if o["data"] is None else "validation (held-out images of your val split)"
            self.stdout.write(f"{which} mAP50 {metrics['mAP50']:.3f}  mAP50-95 {metrics['mAP50_95']:.3f}")
            for c, v in metrics["per_class"].items():
                self.stdout.write(f"  {c:<6} mAP50 {v['mAP50']:.3f} ({v['instances']} boxes)")
        if o["install"]:
            dest = detector.MODELS_DIR
            shutil.copyfile(onnx_path, dest / onnx_path.name)
            shutil.copyfile(best, dest / onnx_path.with_suffix(".pt").name)
            (dest / onnx_path.with_suffix(".json").name).write_text(json.dumps(meta, indent=1) + "\n")
            self.stdout.write(f"installed into {dest}")


def _card_imgsz(weights: Path) -> int:
    """The image size the weights were trained at (their card), 160 if unknown."""
    try:
        return int(json.loads(weights.with_suffix(".json").read_text())["imgsz"])
    except (OSError, ValueError, KeyError, TypeError):
        return 160


def _held_out_val(path: Path) -> bool:
    """Whether the dataset's ``val`` images differ from its ``train`` images."""
    import yaml

    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and bool(data.get("val")) and data.get("val") != data.get("train")


def _yaml_names(path: Path) -> list[str]:
    import yaml

    data = yaml.safe_load(path.read_text())
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise CommandError("the dataset yaml has no 'names' list")


def write_metadata(onnx_path: Path, *, classes, imgsz, windows, seed, data, metrics, train_seconds,
                   model_yaml, results_csv: Path | None = None) -> dict:
    """Write ``<onnx stem>.json`` next to the weights; return the dict."""
    import torch
    import ultralytics

    epochs = None
    if results_csv is not None and results_csv.is_file():
        epochs = max(0, len(results_csv.read_text().strip().splitlines()) - 1)
    meta = {
        "classes": list(classes), "imgsz": int(imgsz), "hu_windows": [list(w) for w in windows],
        "class_map": {},
        "model": (model_yaml + " from scratch (no pretrained weights)"
                  if str(model_yaml).endswith((".yaml", ".yml"))
                  else f"continued from {Path(model_yaml).name} (itself trained from scratch here)"),
        "image": "axial slice, row = posterior, column = patient left; channel c = "
                 "clip((HU - lo_c) / (hi_c - lo_c)) * 255 for hu_windows[c]; letterboxed (pad 114)",
        "training": {"seed": seed, "epochs_run": epochs, "seconds": round(train_seconds),
                     "device": "cpu", "ultralytics": ultralytics.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "data": data, "metrics": metrics,
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
