"""``python manage.py label_import EXPORT ANNOTATIONS OUTPUT`` — corrected labels into a dataset.

After ``manage.py label_export`` and a correction in CVAT (or any tool that exports
"YOLO 1.1", "Ultralytics YOLO" or YOLO with ``classes.txt``; or the export folder itself,
corrected in place), this reads the tool's export (zip or folder), checks
it against the EXPORT folder, splits the series (never the slices of one series) into
train and val, and writes OUTPUT for ``manage.py train_detector --data OUTPUT/data.yaml``
(:mod:`pipeline.label_import`). OUTPUT appears whole or not at all.

Messages name series and slices by number only.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline.label_import import LabelImportError, import_labels, read_annotations


def _series_list(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError("--val-series takes series numbers, e.g. 2,5") from None
    if not out:
        raise CommandError("--val-series takes series numbers, e.g. 2,5")
    return out


class Command(BaseCommand):
    help = ("Import corrected labels (CVAT YOLO 1.1, Ultralytics YOLO, YOLO with classes.txt) into a "
            "training dataset split by series.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("export", type=Path, help="the label_export folder the labels were made on")
        parser.add_argument("annotations", type=Path, help="the labelling tool's export (zip or folder)")
        parser.add_argument("output", type=Path, help="dataset folder to write (new or empty)")
        parser.add_argument("--val-series", default=None,
                            help="series numbers held out for validation, e.g. 2,5 (default: drawn)")
        parser.add_argument("--val-fraction", type=float, default=0.25,
                            help="share of the series drawn for validation (default %(default)s)")
        parser.add_argument("--seed", type=int, default=0, help="seed of that draw")
        parser.add_argument("--no-val", action="store_true",
                            help="train on every series (one series only): no held-out figure")
        parser.add_argument("--allow-missing", action="store_true",
                            help="take exported slices without an annotation file as slices with nothing on them")

    def handle(self, *args, **o) -> None:
        export, src, out = Path(o["export"]), Path(o["annotations"]), Path(o["output"])
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CommandError("OUTPUT exists and is not an empty folder")
        for other in (export, src):
            try:
                out.resolve().relative_to(other.resolve())
            except ValueError:
                continue
            raise CommandError("OUTPUT must not lie inside EXPORT or ANNOTATIONS")
        if o["no_val"] and o["val_series"] is not None:
            raise CommandError("--no-val and --val-series exclude each other")
        val = _series_list(o["val_series"]) if o["val_series"] is not None else None
        try:
            ann = read_annotations(src)
            s = import_labels(export, ann, out, val_series=val, val_fraction=o["val_fraction"],
                              seed=o["seed"], allow_missing=o["allow_missing"], no_val=o["no_val"])
        except LabelImportError as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:  # writing OUTPUT (disk full, permissions); nothing is left behind
            raise CommandError(f"cannot write OUTPUT ({exc.__class__.__name__}: {exc.strerror}); "
                               f"nothing was written") from None
        w = self.stdout.write
        w(f"{ann.layout} annotations: {sum(s.images.values())} slices")
        for sp, series in (("train", s.train_series), ("val", s.val_series)):
            if series:
                n = ", ".join(f"{c} {k}" for c, k in s.boxes[sp].items() if k) or "no boxes"
                w(f"  {sp}: series {', '.join(map(str, series))}, {s.images[sp]} slices ({n})")
        if not s.held_out:
            w("  no series held out (--no-val): validation figures will be on the training slices")
        changed = [f"{c} {v['adjusted']} adjusted, {v['added']} added, {v['removed']} removed"
                   for c, v in s.changes.items() if v["adjusted"] or v["added"] or v["removed"]]
        w("corrections to the pre-labels: " + ("; ".join(changed) if changed else "none"))
        if s.missing_taken_as_empty:
            w(f"{s.missing_taken_as_empty} slices without an annotation file taken as empty (--allow-missing)")
        if s.unused_names:
            w(f"tool labels that are no detector class (unused): {', '.join(s.unused_names)}")
        w(f"written: {out / 'data.yaml'}; next: .venv/bin/python manage.py train_detector --data "
          f"{out / 'data.yaml'}")
