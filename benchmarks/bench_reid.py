"""Re-identification chain benchmark and synthetic re-identification study.

Default (timing): one synthetic 512×512×300 subject (generated, not timed),
de-identified with :func:`pipeline.deface.deface` (not timed); times the whole
per-subject chain of ``reid_eval`` and the web platform
(:func:`pipeline.reid_features.subject_features`: two bone alignments, the
simulated re-scan of the gallery, three smoothed skin surfaces, 3 × 9 views,
27 face descriptors, 3 depth maps), prints the per-stage split and the total
against the 10 s target. One-time start-up (bone template, OpenGL context,
dlib models) is reported separately.

``--study N``: the same chain on N synthetic subjects (seeds ``--seed`` …),
then :func:`pipeline.reid.evaluate_study`; writes ``metrics.json`` and the
CMC plot to ``--out`` and prints the table.

    .venv/bin/python benchmarks/bench_reid.py
    .venv/bin/python benchmarks/bench_reid.py --study 20 --seed 4242 --out var/reid-study
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import render as R  # noqa: E402  (first: sets the OpenGL platform)
from pipeline.align import default_template  # noqa: E402
from pipeline.embed import get_embedder  # noqa: E402
from pipeline.reid_features import MATCHERS, study_similarities, subject_features  # noqa: E402
from pipeline.rescan import volume_seed  # noqa: E402
from pipeline.synth import SubjectParams, generate_head  # noqa: E402
from pipeline.volume import Volume  # noqa: E402

TARGET_S = 10.0
SIZES = {"full": ((300, 512, 512), (0.8, 0.49, 0.49)),
         "small": ((64, 80, 80), (3.75, 3.0, 3.0))}


def deidentify(volume: Volume) -> Volume:
    """De-identified copy by ``pipeline.deface.deface`` (default method)."""
    from pipeline.deface import deface

    hu = deface(volume).hu
    return Volume(hu=hu, spacing_mm=volume.spacing_mm, origin_lps_mm=volume.origin_lps_mm,
                  row_cosine=volume.row_cosine, col_cosine=volume.col_cosine,
                  normal=volume.normal)


def bench_one(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> float:
    t0 = time.perf_counter()
    head = generate_head(SubjectParams.random(seed), shape=shape, spacing_mm=spacing,
                         noise_seed=seed)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    deid = deidentify(head.volume)
    t_deid = time.perf_counter() - t0
    t0 = time.perf_counter()
    default_template()
    gl = R.opengl_available()
    get_embedder(upsample=0)
    t_init = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    f = subject_features(head.volume, deid, seed=volume_seed(head.volume))
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"subject {shape[2]}×{shape[1]}×{shape[0]} voxels, spacing {spacing} mm "
          f"(generated in {t_gen:.1f} s; de-identified in {t_deid:.1f} s, not timed)")
    print(f"one-time start-up (template, {'OSMesa' if gl else 'no OpenGL'}, dlib): {t_init:.2f} s")
    for k, v in f.timings_s.items():
        print(f"  {k:<24s} {v:6.2f} s")
    print(f"  {'TOTAL':<24s} {total:6.2f} s   (target ≤ {TARGET_S:.0f} s: "
          f"{'OK' if total <= TARGET_S else 'OVER'}); CPU time of this process {cpu:.2f} s "
          "(wall > CPU means other processes took the cores)")
    print(f"mesh faces {f.faces}; faces detected "
          + ", ".join(f"{c} {int(d.sum())}/{d.size}" for c, d in f.detected.items()))
    return total


def study(n: int, seed: int, out: Path, size: str, n_bootstrap: int) -> dict:
    from pipeline.reid import evaluate_study, plot_cmc
    from surveys.management.commands.reid_eval import format_study

    shape, spacing = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    feats, ids = [], []
    t_start = time.perf_counter()
    for s in range(seed, seed + n):
        head = generate_head(SubjectParams.random(s), shape=shape, spacing_mm=spacing,
                             noise_seed=s)
        label = f"SYN-{s}"
        feats.append(subject_features(head.volume, deidentify(head.volume), label=label,
                                      seed=volume_seed(head.volume)))
        ids.append(label)
        print(f"  {label} done", flush=True)
    result = evaluate_study(study_similarities(feats), ids, labels=MATCHERS,
                            n_bootstrap=n_bootstrap)
    result["wall_time_s"] = time.perf_counter() - t_start
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    plot_cmc(result, out / "cmc")
    print(format_study(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=int, default=0, help="run the synthetic study on N subjects")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="study volume size")
    ap.add_argument("--out", type=Path, default=Path("var/reid-study"))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="timing: subjects to time (seeds seed…)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()
    if args.study:
        study(args.study, args.seed, args.out, args.size, args.bootstrap)
    else:
        totals = [bench_one(*SIZES["full"], args.seed + i) for i in range(args.repeat)]
        if len(totals) > 1:
            print(f"per subject: median {np.median(totals):.2f} s, max {max(totals):.2f} s")


if __name__ == "__main__":
    main()
