"""``python manage.py eval_detector`` — mAP50 / mAP50-95 per class on held-out subjects.

By default the shipped model is evaluated on freshly generated *test* subjects
of the synthetic generator (seeds disjoint from training, same acquisition
ranges as recorded in the model's metadata). ``--data DATA.yaml`` evaluates on
a user's YOLO dataset instead. The figures are printed and written next to the
weights as ``<weights stem>.eval.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline import detector, detector_data


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

    def handle(self, *args, **o) -> None:
        weights = Path(o["weights"] or detector.DEFAULT_WEIGHTS).resolve()
        if not weights.is_file():
            raise CommandError("weights file not found")
        meta_path = weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        imgsz = o["imgsz"] or int(meta.get("imgsz", 256))
        detector.configure_ultralytics(Path(settings.VAR_DIR) / "ultralytics")
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
        out = weights.with_name(weights.stem + ".eval.json")
        out.write_text(json.dumps(m, indent=1) + "\n")
        w(f"written: {out}")
