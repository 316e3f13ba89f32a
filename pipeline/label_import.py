"""Corrected labels back from a labelling tool into a training dataset split by series.

:mod:`pipeline.label_export` writes a group's own CT as pre-labelled slices
(``series-NN_slice-KKK.png``) and a ``cvat-yolo.zip`` to correct in CVAT. This
module reads what the tool exports after the correction and writes the dataset
``manage.py train_detector --data`` trains on:

* :func:`read_annotations` reads a **YOLO 1.1** export (``obj.names`` +
  ``obj_<subset>_data/<image>.txt``, CVAT's "YOLO 1.1"), an **Ultralytics YOLO**
  export (``data.yaml`` + ``labels/<subset>/<image>.txt``; also the export folder
  itself, corrected in place) or a YOLO folder with ``classes.txt`` + ``labels/``
  (Label Studio, labelImg), as a zip or a folder.
  Classes are matched **by name** (a tool may order them differently; case and
  spaces do not matter); a label name that is not a detector class, a malformed
  row, a box outside the image or an image named twice is refused with the file
  and line, never skipped.
* :func:`import_labels` checks the annotations against the export folder (every
  annotation names an exported slice; every slice has an annotation file unless
  ``allow_missing``), splits the **series** (never the slices of one series) into
  ``train`` and ``val``, and writes, through a temporary folder renamed at the end::

      images/{train,val}/series-NN_slice-KKK.png   labels/{train,val}/series-NN_slice-KKK.txt
      data.yaml  split.json  README.txt  real-labels/series-NN.json

  ``data.yaml`` has no ``path`` (Ultralytics takes the folder it lies in, so the
  dataset can be moved). ``split.json`` lists the series of each split, the boxes
  per class, and how the correction changed the pre-labels per class: ``kept``
  (a corrected box at IoU ≥ 0.9 with a pre-label), ``adjusted`` (IoU 0.5–0.9),
  ``added`` and ``removed`` (no partner at IoU ≥ 0.5). ``real-labels/series-NN.json``
  holds each series' labels as :mod:`pipeline.real_labels` reads them (in the exported
  images' pixels, ``"frame": "detector view"``), for ``manage.py eval_detector
  --real-labels … --real-root INPUT``: the per-slice figures with boxes linked across
  slices, as the model method uses them.

Box rows are YOLO's ``class cx cy w h`` in image fractions (0…1). File names and
messages carry series and slice numbers only, as the export's.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .detector_data import CLASSES
from .real_labels import match_pairs

__all__ = ["Annotations", "ImportSummary", "LabelImportError", "import_labels", "read_annotations",
           "split_series", "yolo11_zip"]

#: The export's image names (:mod:`pipeline.label_export`).
STEM = re.compile(r"^series-(\d{2,})_slice-(\d{3,})$")
#: Coordinates may overshoot the image by this much (a tool's rounding); clipped.
EDGE_TOLERANCE = 1e-3
#: A zipped export larger than this (uncompressed label text) is refused.
MAX_TEXT_BYTES = 64 * 1024 * 1024
KEPT_IOU, MATCH_IOU = 0.9, 0.5

Row = tuple[int, float, float, float, float]  # class index in CLASSES, cx, cy, w, h


class LabelImportError(ValueError):
    """Annotations or export folder that cannot be imported (the message says why)."""


@dataclass
class Annotations:
    """Boxes per image stem (``rows[stem] = [(class index in CLASSES, cx, cy, w, h), …]``)."""

    layout: str  # "YOLO 1.1", "Ultralytics YOLO" or "YOLO with classes.txt"
    names: list[str]  # the tool's label names, in its order
    rows: dict[str, list[Row]]
    unused_names: list[str] = field(default_factory=list)


def _describe(stem: str) -> str:
    """A file's name in a message, only when it is one of the export's (no foreign names)."""
    return f"'{stem}'" if STEM.match(stem) else "a file not named as the export's slices"


def _member(member: str) -> str:
    """A member in a message: the layout's own file names, else as :func:`_describe`."""
    p = PurePosixPath(member)
    return p.name if p.name in ("obj.names", "data.yaml", "classes.txt") else _describe(p.stem)


class _Source:
    """The members of a zip or a folder, by relative POSIX path."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.zip: zipfile.ZipFile | None = None
        if src.is_file():
            try:
                self.zip = zipfile.ZipFile(src)
            except (zipfile.BadZipFile, OSError):
                raise LabelImportError("ANNOTATIONS is neither a folder nor a zip file") from None
            self.members = [i.filename for i in self.zip.infolist() if not i.is_dir()]
            big = sum(i.file_size for i in self.zip.infolist() if i.filename.endswith((".txt", ".names",
                                                                                      ".data", ".yaml")))
            if big > MAX_TEXT_BYTES:
                raise LabelImportError("the zip's label text is larger than 64 MB: not a label export")
        elif src.is_dir():
            self.members = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        else:
            raise LabelImportError("ANNOTATIONS not found")

    def read(self, member: str) -> str:
        try:
            data = self.zip.read(member) if self.zip is not None else (self.src / member).read_bytes()
        except (zipfile.BadZipFile, zlib.error, EOFError):
            raise LabelImportError(f"{_member(member)}: damaged in the zip (export it again)") from None
        except OSError as exc:
            raise LabelImportError(f"{_member(member)}: cannot be read ({exc.strerror})") from None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise LabelImportError(f"{_member(member)}: not UTF-8 text") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _root_of(members: Sequence[str], marker: str) -> str | None:
    """The folder (``""`` or ``"x/"``) holding ``marker`` at the shallowest depth."""
    hits = sorted((m for m in members if PurePosixPath(m).name == marker), key=lambda m: m.count("/"))
    return None if not hits else hits[0][: -len(marker)]


def _name_lines(text: str) -> list[str]:
    """One label name per line; line n is class n (a blank line keeps its number)."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _class_map(names: Sequence[str], classes: Sequence[str]) -> dict[int, int]:
    ours = {c.strip().lower(): i for i, c in enumerate(classes)}
    return {j: ours[n.strip().lower()] for j, n in enumerate(names) if n.strip().lower() in ours}


def _parse_rows(text: str, stem: str, n_names: int, cmap: dict[int, int], names: Sequence[str],
                ) -> list[Row]:
    rows: list[Row] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{_describe(stem)}, line {line_no}"
        if len(parts) != 5:
            raise LabelImportError(f"{where}: {len(parts)} values, a box row has 5 (class cx cy w h)")
        try:
            cid = int(parts[0])
            cx, cy, w, h = (float(v) for v in parts[1:])
        except ValueError:
            raise LabelImportError(f"{where}: not a class number and four numbers") from None
        if not 0 <= cid < n_names:
            raise LabelImportError(f"{where}: class {cid}, but the export names {n_names} classes")
        if cid not in cmap:
            raise LabelImportError(f"{where}: label {names[cid]!r} is not a detector class "
                                   f"({', '.join(CLASSES)}); rename it in the tool")
        if not all(math.isfinite(v) for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise LabelImportError(f"{where}: a box needs a finite centre and a positive width and height")
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if min(x0, y0) < -EDGE_TOLERANCE or max(x1, y1) > 1 + EDGE_TOLERANCE:
            raise LabelImportError(f"{where}: the box reaches outside the image (coordinates are "
                                   f"fractions of the image, 0 to 1)")
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)
        rows.append((cmap[cid], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    return rows


def read_annotations(src: Path, classes: Sequence[str] = CLASSES) -> Annotations:
    """Read a YOLO 1.1 or Ultralytics YOLO export (zip or folder); see the module docstring.

    Raises :class:`LabelImportError` with a message naming the file and line."""
    source = _Source(Path(src))
    try:
        m = source.members
        obj_names, data_yaml, classes_txt = (_root_of(m, f) for f in ("obj.names", "data.yaml", "classes.txt"))
        if obj_names is not None:
            root, layout = obj_names, "YOLO 1.1"
            names = _name_lines(source.read(root + "obj.names"))
            pattern = re.compile(re.escape(root) + r"obj_[^/]+_data/(?:.*/)?([^/]+)\.txt$")
        elif data_yaml is None and classes_txt is not None:
            root, layout = classes_txt, "YOLO with classes.txt"  # Label Studio's and labelImg's YOLO
            names = _name_lines(source.read(root + "classes.txt"))
            pattern = re.compile(re.escape(root) + r"labels/(?:.*/)?([^/]+)\.txt$")
        else:
            if data_yaml is None:
                raise LabelImportError("not a YOLO export: found none of obj.names (YOLO 1.1), "
                                       "data.yaml (Ultralytics YOLO) or classes.txt")
            root, layout = data_yaml, "Ultralytics YOLO"
            import yaml

            try:
                data = yaml.safe_load(source.read(root + "data.yaml"))
            except yaml.YAMLError:
                raise LabelImportError("data.yaml is not valid YAML") from None
            raw = data.get("names") if isinstance(data, dict) else None
            if isinstance(raw, dict):  # {number: name}; numbers need not be contiguous
                try:
                    numbered = {int(k): str(v) for k, v in raw.items()}
                except (TypeError, ValueError):
                    raise LabelImportError("data.yaml: names must be numbered 0, 1, …") from None
                if not numbered or min(numbered) < 0 or max(numbered) > 10_000:
                    raise LabelImportError("data.yaml: names must be numbered 0, 1, …")
                names = [numbered.get(j, "") for j in range(max(numbered) + 1)]
            elif isinstance(raw, list):
                names = [str(n) for n in raw]
            else:
                raise LabelImportError("data.yaml has no class names")
            pattern = re.compile(re.escape(root) + r"labels/(?:.*/)?([^/]+)\.txt$")
        if not any(n.strip() for n in names):
            raise LabelImportError(f"the {layout} export names no classes")
        cmap = _class_map(names, classes)
        rows: dict[str, list[Row]] = {}
        for member in m:
            hit = pattern.match(member)
            if hit is None:
                continue
            stem = hit.group(1)
            if stem in rows:
                raise LabelImportError(f"{_describe(stem)} is annotated twice (in two subsets?)")
            rows[stem] = _parse_rows(source.read(member), stem, len(names), cmap, names)
        if not rows:
            raise LabelImportError(f"the {layout} export holds no annotation files")
    finally:
        source.close()
    unused = [n for j, n in enumerate(names) if j not in cmap and n.strip()]
    return Annotations(layout=layout, names=names, rows=rows, unused_names=unused)


def split_series(series: Iterable[int], *, val_series: Iterable[int] | None = None,
                 val_fraction: float = 0.25, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, val)`` series numbers: ``val_series`` as given, or ``round(val_fraction ×
    n)`` series (at least one, never all) drawn with ``seed``. Needs two series or more."""
    every = sorted(set(series))
    if len(every) < 2:
        raise LabelImportError("one series only: a validation split needs a second series "
                               "(label another one, or use --no-val)")
    if val_series is not None:
        val = sorted(set(val_series))
        missing = [s for s in val if s not in every]
        if missing:
            raise LabelImportError(f"--val-series: no exported series {', '.join(map(str, missing))} "
                                   f"(the export has {', '.join(map(str, every))})")
        if not val or len(val) == len(every):
            raise LabelImportError("--val-series must leave at least one series for training")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise LabelImportError("--val-fraction must lie between 0 and 1")
        n = min(len(every) - 1, max(1, round(val_fraction * len(every))))
        order = np.random.default_rng(seed).permutation(len(every))
        val = sorted(every[i] for i in order[:n])
    return [s for s in every if s not in val], val


@dataclass
class ImportSummary:
    """What :func:`import_labels` wrote (series numbers and counts only)."""

    layout: str
    train_series: list[int]
    val_series: list[int]
    images: dict[str, int]
    boxes: dict[str, dict[str, int]]
    changes: dict[str, dict[str, int]]
    missing_taken_as_empty: int = 0
    unused_names: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> bool:
        """Whether some series are held out for validation (not ``--no-val``)."""
        return bool(self.val_series)

    def as_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "train_series": self.train_series, "val_series": self.val_series,
                "validation_held_out": self.held_out, "images": self.images, "boxes": self.boxes,
                "changes_from_pre_labels": self.changes,
                "images_without_annotation_file_taken_as_empty": self.missing_taken_as_empty,
                "tool_labels_not_detector_classes": self.unused_names}


def _corners(r: Row) -> tuple[float, float, float, float]:
    _, cx, cy, w, h = r
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _changes(pre: list[Row], new: list[Row], changes: dict[str, dict[str, int]]) -> None:
    for ci, c in enumerate(CLASSES):
        a = [_corners(r) for r in pre if r[0] == ci]
        b = [_corners(r) for r in new if r[0] == ci]
        pairs = match_pairs(a, b, MATCH_IOU) if a and b else []
        kept = sum(1 for *_, iou in pairs if iou >= KEPT_IOU)
        ch = changes[c]
        ch["kept"] += kept
        ch["adjusted"] += len(pairs) - kept
        ch["removed"] += len(a) - len(pairs)
        ch["added"] += len(b) - len(pairs)


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy of the images
    except OSError:
        shutil.copyfile(src, dst)


def import_labels(export_dir: Path, annotations: Annotations, out_dir: Path, *,
                  val_series: Iterable[int] | None = None, val_fraction: float = 0.25, seed: int = 0,
                  allow_missing: bool = False, no_val: bool = False) -> ImportSummary:
    """Write the training dataset (see the module docstring) from a :mod:`pipeline.label_export`
    folder and the corrected ``annotations``; ``out_dir`` appears whole or not at all.

    ``no_val``: every series is trained on and ``val`` is the training images (no held-out
    figure; for a single series). Raises :class:`LabelImportError`."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    img_dir, pre_dir = export_dir / "images" / "train", export_dir / "labels" / "train"
    if not (export_dir / "export.json").is_file() or not img_dir.is_dir():
        raise LabelImportError("EXPORT is not a label_export folder (no export.json and images/train)")
    images = {p.stem: p for p in img_dir.glob("*.png") if STEM.match(p.stem)}
    if not images:
        raise LabelImportError("EXPORT holds no exported slices")
    foreign = [s for s in annotations.rows if s not in images]
    if foreign:
        raise LabelImportError(f"{len(foreign)} annotation file(s) name no slice of EXPORT "
                               f"(e.g. {_describe(foreign[0])}): annotations of another export?")
    missing = sorted(s for s in images if s not in annotations.rows)
    if missing and not allow_missing:
        raise LabelImportError(f"{len(missing)} of {len(images)} exported slices have no annotation file "
                               f"(e.g. {_describe(missing[0])}): was only part of the task exported? "
                               f"--allow-missing takes them as slices with nothing on them")
    series_of = {s: int(STEM.match(s).group(1)) for s in images}  # type: ignore[union-attr]
    every = sorted(set(series_of.values()))
    if no_val:
        train, val = every, []
    else:
        train, val = split_series(every, val_series=val_series, val_fraction=val_fraction, seed=seed)
    splits = {"train": set(train), "val": set(val)}
    boxes = {sp: {c: 0 for c in CLASSES} for sp in splits}
    counts = {sp: 0 for sp in splits}
    changes = {c: {"kept": 0, "adjusted": 0, "added": 0, "removed": 0} for c in CLASSES}
    same = {i: i for i in range(len(CLASSES))}  # the export's class numbers are ours
    with atomic_dir(out_dir) as tmp:
        for sp in splits:
            (tmp / "images" / sp).mkdir(parents=True)
            (tmp / "labels" / sp).mkdir(parents=True)
        for stem in sorted(images):
            sp = "val" if series_of[stem] in splits["val"] else "train"
            rows = annotations.rows.get(stem, [])
            _place(images[stem], tmp / "images" / sp / f"{stem}.png")
            text = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows)
            (tmp / "labels" / sp / f"{stem}.txt").write_text(text)
            counts[sp] += 1
            for r in rows:
                boxes[sp][CLASSES[r[0]]] += 1
            pre = pre_dir / f"{stem}.txt"
            # the pre-labels are the export's own rows, in our class numbers
            ours = _parse_rows(pre.read_text(), stem, len(CLASSES), same, CLASSES) if pre.is_file() else []
            _changes(ours, rows, changes)
        _write_real_labels(tmp / "real-labels", images, annotations, series_of, annotations.layout)
        val_dir = "images/val" if val else "images/train"
        (tmp / "data.yaml").write_text("\n".join(
            ["# no 'path': Ultralytics takes this file's folder", "train: images/train", f"val: {val_dir}",
             f"test: {val_dir}", "names:"] + [f"  {i}: {n}" for i, n in enumerate(CLASSES)]) + "\n")
        summary = ImportSummary(layout=annotations.layout, train_series=train, val_series=val, images=counts,
                                boxes=boxes, changes=changes, missing_taken_as_empty=len(missing),
                                unused_names=annotations.unused_names)
        (tmp / "split.json").write_text(json.dumps(summary.as_dict(), indent=1) + "\n")
        (tmp / "README.txt").write_text(
            "Corrected CT slice labels for the facial-feature detector (deidstudy manage.py label_import).\n\n"
            "The images show faces: keep this folder where the source CT may be kept.\n\n"
            + (f"Series {', '.join(map(str, val))} are held out for validation (images/val); the others "
               "are trained on.\n" if val else
               "No series is held out (--no-val): validation figures are on the training images.\n")
            + "\nTrain:  .venv/bin/python manage.py train_detector --data data.yaml\n")
    return summary


def _write_real_labels(folder: Path, images: dict[str, Path], annotations: Annotations,
                       series_of: dict[str, int], layout: str) -> None:
    """Per series, a label file of :mod:`pipeline.real_labels` (``real-labels/series-NN.json``):
    boxes in pixels of the exported images (``"frame": "detector view"``: the axial slice as
    the detector sees it), keyed by the native slice number, every exported slice listed."""
    from PIL import Image

    folder.mkdir()
    per: dict[int, dict[str, Any]] = {}
    for stem in sorted(images):
        n = series_of[stem]
        k = int(STEM.match(stem).group(2))  # type: ignore[union-attr]
        with Image.open(images[stem]) as im:
            w, h = im.size
        d = per.setdefault(n, {"series": f"series-{n:02d}", "frame": "detector view",
                               "how": f"label_import of a {layout} export; boxes in pixels of the "
                                      f"exported images (axial, face at the top, patient left on the right)",
                               "slices": {}, "visible": {c: [] for c in CLASSES}})
        boxes = []
        for c, x, y, bw, bh in annotations.rows.get(stem, []):
            i0, j0 = round((x - bw / 2) * w), round((y - bh / 2) * h)
            i1, j1 = max(i0 + 1, round((x + bw / 2) * w)), max(j0 + 1, round((y + bh / 2) * h))
            boxes.append([CLASSES[c], i0, j0, i1, j1])
            if k not in d["visible"][CLASSES[c]]:
                d["visible"][CLASSES[c]].append(k)
        d["slices"][str(k)] = boxes
    for n, d in per.items():
        (folder / f"series-{n:02d}.json").write_text(json.dumps(d, indent=1) + "\n")


def yolo11_zip(rows: dict[str, list[Row]], names: Sequence[str] = CLASSES) -> bytes:
    """A YOLO 1.1 export (as CVAT writes it) of ``rows`` with the label ``names`` in the
    given order (``rows`` hold indices into :data:`CLASSES`). For tests and examples."""
    index = {c.lower(): j for j, c in enumerate(names)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("obj.names", "".join(f"{n}\n" for n in names))
        z.writestr("obj.data", f"classes = {len(names)}\nnames = obj.names\ntrain = train.txt\n")
        z.writestr("train.txt", "".join(f"obj_train_data/{s}.png\n" for s in sorted(rows)))
        for s, rr in sorted(rows.items()):
            z.writestr(f"obj_train_data/{s}.txt", "".join(
                f"{index[CLASSES[c].lower()]} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rr))
    return buf.getvalue()
