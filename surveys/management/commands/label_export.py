"""``python manage.py label_export INPUT OUTPUT`` — a pre-labelled YOLO dataset of your own CT.

Writes every slice through the face of each CT series below INPUT as the detector
sees it, with pre-labels (the detector's ``face`` boxes, else the anatomical method's
removable region; that region's auricle flaps as ``ears``; the globes it found as
``eyes``; the detector's other boxes), in
Ultralytics' layout plus ``cvat-yolo.zip`` for CVAT's "YOLO 1.1" import, so a group
corrects labels instead of drawing them from nothing
(:mod:`pipeline.label_export`). OUTPUT appears whole or not at all. After the correction,
``manage.py label_import OUTPUT CVAT-EXPORT.zip DATASET`` splits the series into train
and val, then ``manage.py train_detector --data DATASET/data.yaml``.

Messages name series by index only; file names hold series and slice numbers only.
The images show faces: OUTPUT must stay where the source CT may be kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline.atomic import atomic_dir
from pipeline.detector import DetectorError, load_detector
from pipeline.label_export import export_folder


class Command(BaseCommand):
    help = "Export CT series as a pre-labelled YOLO dataset (anatomical region + detector) for CVAT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("input", type=Path, help="folder with one or many CT series at any depth")
        parser.add_argument("output", type=Path, help="output folder (created; must be empty or new)")
        parser.add_argument("--weights", type=Path, default=None,
                            help="detector for the pre-labels (default: the shipped model)")
        parser.add_argument("--no-model", action="store_true", help="anatomical pre-labels only")
        parser.add_argument("--conf", type=float, default=0.25, help="detector score threshold")
        parser.add_argument("--context", type=int, default=2,
                            help="slices exported beyond the first and last pre-labelled one")

    def handle(self, *args, **o) -> None:
        from tqdm import tqdm


        src, out = Path(o["input"]), Path(o["output"])
        if not src.is_dir():
            raise CommandError("INPUT must be a folder")
        if out.exists() and any(out.iterdir()):
            raise CommandError("OUTPUT exists and is not empty")
        try:
            out.resolve().relative_to(src.resolve())
        except ValueError:
            pass
        else:
            raise CommandError("OUTPUT must not lie inside INPUT")
        detector = None
        if not o["no_model"]:
            try:
                detector = load_detector(o["weights"])
            except (DetectorError, ImportError) as exc:
                raise CommandError(f"detector unavailable ({exc}); use --no-model") from None
        show = sys.stderr.isatty() and o["verbosity"] > 0

        def progress(it, total):
            return tqdm(it, total=total, unit="series", disable=not show, file=sys.stderr)

        try:
            with atomic_dir(out) as tmp:  # written whole or not at all
                summary = export_folder(src, tmp, detector=detector, conf=o["conf"], context=o["context"],
                                        progress=progress)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:  # no file name: the input's paths may carry identifiers
            raise CommandError(f"cannot write OUTPUT ({exc.__class__.__name__}: {exc.strerror}); "
                               f"nothing was written") from None
        for line in summary.failed:
            self.stderr.write(f"{line} failed; not exported")
        for line in summary.not_exported:
            self.stdout.write(f"{line}; not exported")
        for index in summary.no_face:
            self.stdout.write(f"input series #{index}: no face found (by the anatomy or the detector); "
                              f"not exported")
        boxes = ", ".join(f"{c} {n}" for c, n in summary.boxes.items() if n)
        self.stdout.write(f"{summary.series} series, {summary.images} slices exported ({boxes or 'no boxes'})")
        self.stdout.write(f"written: {out / 'data.yaml'} and {out / 'cvat-yolo.zip'} (see {out / 'README.txt'})")
