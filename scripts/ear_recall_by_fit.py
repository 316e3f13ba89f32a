"""Ear recall on a domain-randomised YOLO dataset, split by whether the head holder pressed the ear.

    .venv/bin/python scripts/ear_recall_by_fit.py DATASET_DIR WEIGHTS [WEIGHTS …] [--split test]
        [--conf 0.3] [--iou 0.5]

``DATASET_DIR`` is a dataset written by ``pipeline.detector_data.build_dataset`` with
``DatasetSpec(domain=True)`` (its ``spec.json`` says so). Each labelled ear box of the split
counts as found when the model draws an ear box scoring ≥ ``--conf`` with IoU ≥ ``--iou`` on the
same image. Ears are split by the generator's ear fit (``model.ear_fit`` of
:class:`pipeline.synth_domain.DomainParams`): *pressed* when the holder changed the ear (folded
it along its wall, ``model.ear_folded``, or changed its drawn angle or concha wall), else *free*.
The side of a box is taken from its centre: the image's left half is the patient's right (columns
run to patient left). Image names hold only the subject seed and slice (``sNNNNN_kNNN.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import synth
from pipeline.detector_data import domain_subject
from pipeline.real_labels import box_iou

_NAME = re.compile(r"^s(\d+)_k(\d+)$")


def pressed_ears(seed: int) -> tuple[bool, bool]:
    """Whether the holder pressed or folded the (patient right, left) ear of domain head ``seed``."""
    params, dom, _ = domain_subject(seed)
    model = synth._HeadModel(params)
    dom.extend_model(model)
    drawn = (dom.ear_protrusion_deg, dom.ear_concha_mm)
    return tuple(folded or fit != drawn  # type: ignore[return-value]
                 for fit, folded in zip(model.ear_fit, model.ear_folded))


def ear_recall_by_fit(data_dir: Path, detector: Any, *, split: str = "test", conf: float = 0.3,
                      iou: float = 0.5) -> dict[str, dict[str, float]]:
    """``{"pressed": {"found", "boxes", "recall"}, "free": {…}}`` of ``detector`` (a loaded
    :mod:`pipeline.detector` model) on the ear boxes of ``data_dir``'s ``split``."""
    from PIL import Image

    spec = json.loads((data_dir / "spec.json").read_text()).get("spec", {})
    if not spec.get("domain"):
        raise ValueError(f"{data_dir} was not built from domain-randomised heads (spec.json: domain)")
    ears_id = list(spec["classes"]).index("ears")
    model_ears = [c for c in range(len(detector.meta.classes)) if detector.meta.canonical(c) == "ears"]
    fits: dict[int, tuple[bool, bool]] = {}
    out = {"pressed": [0, 0], "free": [0, 0]}
    for img in sorted((data_dir / "images" / split).glob("*.png")):
        m = _NAME.match(img.stem)
        if m is None:
            raise ValueError(f"unexpected image name {img.name} (want sNNNNN_kNNN.png)")
        lab = data_dir / "labels" / split / f"{img.stem}.txt"
        rows = [r.split() for r in lab.read_text().splitlines() if r.strip()] if lab.exists() else []
        rows = [r for r in rows if int(r[0]) == ears_id]
        if not rows:
            continue
        seed = int(m.group(1))
        if seed not in fits:
            fits[seed] = pressed_ears(seed)
        rgb = np.asarray(Image.open(img).convert("RGB"))
        h, w = rgb.shape[:2]
        det = detector._detect_rgb(rgb[None], conf, 0.7)[0]
        pred = [tuple(float(v) for v in b) for b, c in zip(det.boxes, det.class_ids) if int(c) in model_ears]
        for r in rows:
            x, y, bw, bh = (float(v) for v in r[1:5])
            truth = ((x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h)
            key = "pressed" if fits[seed][0 if x < 0.5 else 1] else "free"
            out[key][1] += 1
            out[key][0] += any(box_iou(truth, p) >= iou for p in pred)
    return {k: {"found": f, "boxes": n, "recall": f / n if n else float("nan")} for k, (f, n) in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("weights", type=Path, nargs="+")
    ap.add_argument("--split", default="test")
    ap.add_argument("--conf", type=float, default=0.3)
    ap.add_argument("--iou", type=float, default=0.5)
    args = ap.parse_args(argv)
    from pipeline.detector import load_detector

    for w in args.weights:
        try:
            res = ear_recall_by_fit(args.data, load_detector(w), split=args.split, conf=args.conf, iou=args.iou)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{w}: " + "; ".join(f"{k} {v['found']}/{v['boxes']} = {v['recall']:.3f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
