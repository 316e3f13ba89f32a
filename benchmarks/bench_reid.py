"""Re-identification chain benchmark and synthetic re-identification study.

Default (timing): one synthetic 512×512×300 subject (generated, not timed),
de-identified with :func:`pipeline.deface.deface`; times bone alignment, skin
surfaces, 3 views × 2 conditions and 6 face embeddings, prints the per-stage
split and the total against the 10 s target. One-time start-up (bone
template, OpenGL context, dlib models) is reported separately.

``--study N``: the full chain on N synthetic subjects (gallery = original
scan; control probe = a second scan of the same subject with another pose and
noise realisation; test probe = the de-identified original), frontal views.
Writes ``metrics.json``, CMC/ROC/similarity plots and a contact sheet to
``--out`` and prints the headline numbers.

    .venv/bin/python benchmarks/bench_reid.py
    .venv/bin/python benchmarks/bench_reid.py --study 24 --out var/reid-study
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import render as R
from pipeline.align import default_template
from pipeline.embed import get_embedder
from pipeline.synth import SubjectParams, generate_head
from pipeline.volume import Volume

TARGET_S = 10.0


def deidentify(volume: Volume, truth_mask: np.ndarray | None = None) -> tuple[Volume, str]:
    """De-identified copy: ``pipeline.deface.deface`` if present, else ground truth → air."""
    try:
        from pipeline.deface import deface

        hu = deface(volume).hu
        how = "pipeline.deface"
    except ImportError:
        if truth_mask is None:
            raise
        hu = volume.hu.copy()
        hu[truth_mask] = -1000
        how = "ground-truth face soft tissue set to air"
    return Volume(hu=hu, spacing_mm=volume.spacing_mm, origin_lps_mm=volume.origin_lps_mm,
                  row_cosine=volume.row_cosine, col_cosine=volume.col_cosine,
                  normal=volume.normal), how


def embed_views(views: list[R.RenderResult], settings: R.RenderSettings) -> list:
    emb = get_embedder()
    return [emb.embed(v.image, R.canonical_face_box(v.yaw_deg, settings)) for v in views]


def bench_one(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> None:
    t0 = time.perf_counter()
    head = generate_head(SubjectParams.random(seed), shape=shape, spacing_mm=spacing,
                         noise_seed=seed)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    deid, how = deidentify(head.volume, head.face_soft_tissue_mask)
    t_deid = time.perf_counter() - t0
    t0 = time.perf_counter()
    default_template()
    gl = R.opengl_available()
    get_embedder()
    t_init = time.perf_counter() - t0
    settings = R.RenderSettings()

    t0 = time.perf_counter()
    res = R.render_subject(head.volume, deid, yaw_degs=(0.0, 30.0, -30.0), settings=settings)
    t1 = time.perf_counter()
    emb = embed_views(res.original + res.deidentified, settings)
    t2 = time.perf_counter()
    total = t2 - t0
    split = dict(res.timings_s)
    split["embeddings (6)"] = t2 - t1
    print(f"subject {shape[2]}×{shape[1]}×{shape[0]} voxels, spacing {spacing} mm "
          f"(generated in {t_gen:.1f} s; de-identified by {how} in {t_deid:.1f} s, not timed)")
    print(f"one-time start-up (template, {'OSMesa' if gl else 'no OpenGL'}, dlib): {t_init:.2f} s")
    for k, v in split.items():
        print(f"  {k:<24s} {v:6.2f} s")
    print(f"  {'TOTAL':<24s} {total:6.2f} s   (target ≤ {TARGET_S:.0f} s: "
          f"{'OK' if total <= TARGET_S else 'OVER'})")
    print(f"mesh faces {res.faces}; backend {res.original[0].backend}; "
          f"faces detected orig {[e.detected for e in emb[:3]]} deid {[e.detected for e in emb[3:]]}")


def study(n: int, out: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float],
          n_bootstrap: int) -> dict:
    from pipeline.embed import cosine_similarity
    from pipeline.reid import (
        evaluate_condition,
        plot_cmc,
        plot_roc,
        plot_similarity_distributions,
        summarise,
    )

    settings = R.RenderSettings()
    out.mkdir(parents=True, exist_ok=True)
    ids, gallery, control, deidentified = [], [], [], []
    detected_orig, detected_ctrl, detected_deid = [], [], []
    sheet_rows = []
    how = ""
    t_start = time.perf_counter()
    for s in range(n):
        params = SubjectParams.random(1000 + s)
        orig = generate_head(params, shape=shape, spacing_mm=spacing, noise_seed=s)
        ctrl = generate_head(params, shape=shape, spacing_mm=spacing, noise_seed=10_000 + s)
        deid, how = deidentify(orig.volume, orig.face_soft_tissue_mask)
        r = R.render_subject(orig.volume, deid, yaw_degs=(0.0,), settings=settings)
        rc = R.render_subject(ctrl.volume, None, yaw_degs=(0.0,), settings=settings)
        eo, ed = embed_views(r.original + r.deidentified, settings)
        (ec,) = embed_views(rc.original, settings)
        ids.append(f"SYN-{s:03d}")
        gallery.append(eo.vector)
        control.append(ec.vector)
        deidentified.append(ed.vector)
        detected_orig.append(eo.detected)
        detected_ctrl.append(ec.detected)
        detected_deid.append(ed.detected)
        sheet_rows.append(np.concatenate([r.original[0].image, rc.original[0].image,
                                          r.deidentified[0].image], axis=1))
        print(f"  {ids[-1]}: face found orig={eo.detected} ctrl={ec.detected} deid={ed.detected}; "
              f"cos(orig, ctrl)={cosine_similarity(eo.vector, ec.vector):.3f} "
              f"cos(orig, deid)={cosine_similarity(eo.vector, ed.vector):.3f}", flush=True)
    g = np.array(gallery)
    conds = {
        "control": evaluate_condition(np.array(control), g, ids, ids, n_bootstrap=n_bootstrap),
        "deidentified": evaluate_condition(np.array(deidentified), g, ids, ids,
                                           n_bootstrap=n_bootstrap),
    }
    metrics = {
        "n_subjects": n,
        "face_detected_fraction": float(np.mean(detected_orig)),
        "face_detected_fraction_control": float(np.mean(detected_ctrl)),
        "face_detected_fraction_deidentified": float(np.mean(detected_deid)),
        "deidentification": how,
        "views_deg": [0.0],
        "render_backend": "pyrender" if R.opengl_available() else "raycast",
        "wall_time_s": time.perf_counter() - t_start,
        **summarise(conds),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_cmc(conds, out / "cmc")
    plot_roc(conds, out / "roc")
    plot_similarity_distributions(conds, out / "similarity")
    R.save_png(np.concatenate(sheet_rows, axis=0), out / "contact_sheet.png")
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=int, default=0, help="run the synthetic study on N subjects")
    ap.add_argument("--out", type=Path, default=Path("var/reid-study"))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()
    if args.study:
        m = study(args.study, args.out, shape=(120, 128, 128), spacing=(2.0, 1.9, 1.9),
                  n_bootstrap=args.bootstrap)
        print(json.dumps({k: v for k, v in m.items() if not k.startswith("cmc_")}, indent=1))
        print(f"contact sheet (original | control | de-identified): {args.out / 'contact_sheet.png'}")
    else:
        bench_one((300, 512, 512), (0.8, 0.49, 0.49), args.seed)


if __name__ == "__main__":
    main()
