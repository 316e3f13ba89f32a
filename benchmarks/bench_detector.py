"""Benchmark + quality figures of the YOLOv8 facial-feature detector.

1. ``speed``: ms/slice of ONNX Runtime (our letterbox + numpy NMS; the INT8
   default and the float model, with the default data-parallel sessions and
   with one session) vs Ultralytics/PyTorch predict on the same batch of axial
   slices (ratio; target ONNX ≥ 2× PyTorch).
2. ``e2e``: ``deidentify_folder(method="auto")`` slices/s on a 512×512×300
   series (target ≥ 40 slices/s on 2 cores).
3. ``quality``: anatomical / model / auto defacing on held-out synthetic
   subjects (seeds never used in training): bone Dice, facial soft tissue
   removed %, nose / lips removed %, brain voxels changed, soft tissue removed
   outside the ground-truth face (mL).
4. ``link``: seconds of :func:`pipeline.slice_linking.link_slices` on stacks of
   random clutter boxes (the worst case: many short chains) and of parallel
   objects seen on every slice (target: under 1 s for 600 slices × 20 boxes, a
   small part of a series' detection time).

    .venv/bin/python benchmarks/bench_detector.py [speed] [e2e] [quality] [link] [--subjects 6]
    .venv/bin/python benchmarks/bench_detector.py speed --models /path/to/candidate

``--models DIR``: ``speed`` of a candidate before it is shipped (a folder holding
``face_yolov8n.int8.onnx``, ``face_yolov8n.onnx`` and ``face_yolov8n.pt`` with
their ``.json`` metadata, as ``pipeline/models``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import deface
from pipeline import detector as det
from pipeline.face_model import make_model_method
from pipeline.synth import SubjectParams, generate_head
from pipeline.volume import Volume


def _head(seed: int, shape=(64, 160, 160), spacing=(4.0, 1.6, 1.6)):
    return generate_head(SubjectParams.random(seed), shape=shape, spacing_mm=spacing, noise_seed=seed)


def bench_speed(batch: int = 32, rounds: int = 9, models: Path | None = None) -> None:
    """ms/slice of the same batch through each backend: whole ``detect()`` calls (HU windowing,
    letterbox, inference, decoding, NMS). After a warm-up call each, the backends run in turn
    for ``rounds`` rounds, so a slow spell of a shared machine hits all of them, with a pause
    before each call so that no backend's idle threads still spin during the next one's; the
    ratio is the median of the per-round ratios."""
    head = _head(999_001)
    ks = [k for k, b in enumerate(head.feature_boxes) if b]
    hu = head.volume.hu[ks[0]:ks[0] + batch]
    if hu.shape[0] < batch:
        hu = np.concatenate([hu] * (batch // hu.shape[0] + 1))[:batch]
    int8_w, float_w = det.INT8_WEIGHTS, det.DEFAULT_WEIGHTS
    if models is not None:
        int8_w, float_w = Path(models) / int8_w.name, Path(models) / float_w.name
    pt = float_w.with_suffix(".pt")
    print(f"speed: batch of {batch} slices {hu.shape[1]}×{hu.shape[2]}, {det._cpu_cores()} cores, "
          f"{'weights in ' + str(models) if models is not None else 'default ONNX weights ' + det.default_weights().name}"
          f", {rounds} rounds")
    backends = {}
    for name, weights, sessions in [("ONNX INT8 (default)", int8_w, None),
                                    ("ONNX INT8, 1 session", int8_w, 1),
                                    ("ONNX float", float_w, None),
                                    ("ONNX float, 1 session", float_w, 1)]:
        if weights.is_file():
            backends[name] = det.load_detector(weights, sessions=sessions)
    if pt.is_file():
        det.configure_ultralytics()
        backends["Ultralytics/PyTorch"] = det.load_detector(pt)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for d in backends.values():
        d.detect(hu, batch=batch)
    for _ in range(rounds):
        for name, d in backends.items():
            time.sleep(0.3)  # let the previous backend's spinning worker threads go idle
            t = time.perf_counter()
            d.detect(hu, batch=batch)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"  {name:22s} {1000 * min(ts) / batch:6.2f} ms/slice best, {1000 * np.median(ts) / batch:6.2f} "
              f"median  ({batch / np.median(ts):6.1f} slices/s)")
    ref = times.get("Ultralytics/PyTorch")
    if ref:
        for name in ("ONNX INT8 (default)", "ONNX float"):
            if name in times:
                ratios = np.asarray(ref) / np.asarray(times[name])
                med = float(np.median(ratios))
                target = f" (target ≥ 2: {'met' if med >= 2 else 'NOT met'})" if "default" in name else ""
                print(f"  ratio {name} vs PyTorch: median {med:.2f}× (rounds {ratios.min():.2f}–"
                      f"{ratios.max():.2f}×){target}")


def bench_e2e(slices: int = 300, size: int = 512) -> None:
    from pipeline import dicom_io
    from pipeline.deidentify import DeidOptions, deidentify_folder

    # generate at half resolution and upsample (nearest): same anatomy, much faster to build
    half = generate_head(SubjectParams.random(999_002), shape=(slices // 2, size // 2, size // 2),
                         spacing_mm=(1.6, 1.0, 1.0), noise_seed=2)
    hu = np.repeat(np.repeat(np.repeat(half.volume.hu, 2, 0), 2, 1), 2, 2)
    vol = Volume(hu, (0.8, 0.5, 0.5), half.volume.origin_lps_mm)
    del half
    with tempfile.TemporaryDirectory(prefix="bench-detector-") as tmp:
        src = Path(tmp) / "in" / "series"
        dicom_io.write_datasets(dicom_io.volume_to_datasets(vol), src)
        t = time.perf_counter()
        res = deface.deface(vol, make_model_method(auto=True))
        t_deface = time.perf_counter() - t
        d = res.region.details
        print(f"e2e: {slices} slices {size}×{size}; auto defacing alone {t_deface:.2f} s "
              f"(model ran on {d['model'].get('slices_run')} slices, detect "
              f"{d['model'].get('seconds_detect')} s, source {d.get('source')})")
        for method in ("anatomical", "auto"):
            t = time.perf_counter()
            summary = deidentify_folder(src.parent, Path(tmp) / f"out-{method}",
                                        DeidOptions(project_secret="bench", method=method))
            sec = time.perf_counter() - t
            assert summary.ok, [s.error for s in summary.series]
            rate = slices / sec
            target = "" if method != "auto" else f" (target ≥ 40: {'met' if rate >= 40 else 'NOT met'})"
            print(f"  deidentify --method {method:10s} {sec:6.2f} s → {rate:5.1f} slices/s{target}")


def bench_quality(n_subjects: int = 6) -> None:
    from pipeline.detector_data import DatasetSpec, subject_geometry

    spec = DatasetSpec()
    seeds = [spec.seed_base + 30000 + s for s in range(n_subjects)]  # never used for training/eval
    methods = {"anatomical": deface.AnatomicalFaceRegion(), "model": make_model_method(),
               "auto": make_model_method(auto=True)}
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for seed in seeds:
        geo = subject_geometry(spec, seed)
        head = generate_head(SubjectParams.random(seed), shape=geo["shape"], spacing_mm=geo["spacing_mm"],
                             noise_hu=geo["noise_hu"], noise_seed=seed)
        hu = head.volume.hu
        soft = (hu >= -800) & (hu <= 200)
        face = head.face_soft_tissue_mask
        for name, m in methods.items():
            t = time.perf_counter()
            r = deface.deface(head.volume, m)
            sec = time.perf_counter() - t
            changed = r.hu != hu

            def frac(mask: np.ndarray, soft=soft, changed=changed) -> float:
                s = mask & soft
                return 100.0 * np.count_nonzero(s & changed) / max(1, np.count_nonzero(s))

            rows[name].append({
                "bone_dice": r.qa.bone_dice, "face_%": frac(face),
                "nose_%": frac(head.feature_masks["nose"]), "lips_%": frac(head.feature_masks["lips"]),
                "eyes_%": frac(head.feature_masks["eyes"]),
                "brain_vox": float(np.count_nonzero(changed & head.brain_mask)),
                "outside_ml": float(np.count_nonzero(changed & ~face) * head.volume.voxel_volume_ml),
                "warn": float(len(r.qa.warnings)), "s": sec,
            })
    keys = list(rows["anatomical"][0])
    print(f"quality on {n_subjects} held-out synthetic subjects (mean; min for bone Dice / face %):")
    print(f"  {'method':<11}" + "".join(f"{k:>11}" for k in keys))
    for name, rs in rows.items():
        vals = []
        for k in keys:
            col = np.array([r[k] for r in rs])
            vals.append(col.min() if k in ("bone_dice",) else col.mean())
        print(f"  {name:<11}" + "".join(f"{v:>11.4f}" if k == "bone_dice" else f"{v:>11.1f}"
                                         for k, v in zip(keys, vals)))
        print(f"  {'  min':<11}" + "".join(f"{np.min([r[k] for r in rs]):>11.1f}" if k.endswith("%") else
                                           f"{'':>11}" for k in keys))


def bench_link() -> None:
    from pipeline.slice_linking import link_slices

    rng = np.random.default_rng(0)
    print("linking boxes across slices (pipeline.slice_linking), best of 3:")
    for n, m in ((300, 10), (600, 20)):
        clutter, parallel = [], []
        for _ in range(n):
            xy, wh = rng.uniform(0, 140, (m, 2)), rng.uniform(10, 40, (m, 2))
            clutter.append(det.Detection(np.c_[xy, xy + wh].astype(np.float32),
                                         rng.uniform(0.1, 0.9, m).astype(np.float32), rng.integers(0, 5, m)))
            x0 = np.arange(m, dtype=np.float32)[:, None] * 50.0 + rng.uniform(-1, 1, (m, 1)).astype(np.float32)
            parallel.append(det.Detection(np.c_[x0, np.full_like(x0, 10), x0 + 30, np.full_like(x0, 40)],
                                          rng.uniform(0.1, 0.9, m).astype(np.float32), np.zeros(m, np.int64)))
        for name, stack in (("random clutter", clutter), ("parallel objects", parallel)):
            best = np.inf
            for _ in range(3):
                t = time.perf_counter()
                link_slices(stack)
                best = min(best, time.perf_counter() - t)
            print(f"  {n} slices x {m} boxes, {name:<16} {best:6.2f} s  ({1e3 * best / n:.2f} ms/slice)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["speed", "e2e", "quality", "link"])
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--models", type=Path, default=None,
                    help="folder with a candidate's face_yolov8n.{int8.onnx,onnx,pt} (speed only)")
    args = ap.parse_args(argv)
    if not det.DEFAULT_WEIGHTS.is_file():
        print("the shipped model is missing (pipeline/models/face_yolov8n.onnx)")
        return 1
    if "speed" in args.parts:
        bench_speed(models=args.models)
    if "quality" in args.parts:
        bench_quality(args.subjects)
    if "e2e" in args.parts:
        bench_e2e(args.slices, args.size)
    if "link" in args.parts:
        bench_link()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
