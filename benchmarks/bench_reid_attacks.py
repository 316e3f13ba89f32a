"""Reconstruction attacks on a synthetic cohort: the README's figures, from the command line.

Runs exactly the commands a user runs —

    manage.py synth_cohort OUT/cohort --subjects N --seed S --size SIZE
    manage.py deidentify OUT/cohort/dicom OUT/deid --method auto --mapping OUT/mapping.json
    manage.py reid_eval OUT/cohort/dicom OUT/deid OUT/reid --mapping OUT/mapping.json --attack all

— then prints the identification table (control = original vs its simulated re-scan,
de-identified, and each reconstruction attack; rank-1, rank-5, AUC with 95 % CIs, per
matcher and fused) and, with ``--geometry``, how close each rebuilt face is to the original
(mean absolute difference of the frontal skin maps in the region the de-identification
removed, mm, per subject and its median).

    .venv/bin/python benchmarks/bench_reid_attacks.py --seed 4242 --subjects 20 --size small \\
        --out var/attacks-4242 [--geometry] [--workers 2]

An existing OUT is reused step by step (a finished step is not run again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(args: list[str]) -> None:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="deidstudy.settings")
    env.setdefault("DEIDSTUDY_PROJECT_SECRET", "bench-reid-attacks-secret-not-for-real-data-0000")
    print("$ manage.py " + " ".join(args[1:]), flush=True)
    subprocess.run([sys.executable, str(ROOT / "manage.py"), *args[1:]], check=True, env=env,
                   cwd=ROOT)


def table(metrics: dict) -> str:
    """Markdown rows: matcher × condition, rank-1 / rank-5 / AUC with CIs."""
    study = metrics["study"]

    def f(m: dict, key: str) -> str:
        lo, hi = m[f"{key}_ci95"]
        return f"{m[key]:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = ["| matcher | probes | rank-1 | rank-5 | AUC |", "| --- | --- | --- | --- | --- |"]
    for name, entry in study["matchers"].items():
        for cond in study["conditions"]:
            m = entry[cond]
            lines.append(f"| {name} | {cond} | {f(m, 'rank1')} | {f(m, 'rank5')} | {f(m, 'auc')} |")
    ch = study["chance"]
    lines.append(f"\nchance: rank-1 {ch['rank1']:.2f}, rank-5 {ch['rank5']:.2f}, AUC 0.50; "
                 f"n = {study['n_subjects']}")
    return "\n".join(lines)


def geometry(out: Path) -> dict[str, list[float]]:
    """Per subject: mean |frontal skin map − original's| (mm) over the removed region, for the
    de-identified scan and each reconstruction (all aligned on the de-identified bone)."""
    from pipeline.align import alignment_from_volume
    from pipeline.dicom_io import load_series, scan_folder
    from pipeline.reconstruct import CanonicalGrid, frontal_map, reconstruct, resample_canonical

    mapping = json.loads((out / "mapping.json").read_text())
    grid = CanonicalGrid()
    zz, xx = np.meshgrid(grid.zs, grid.xs, indexing="ij")
    res: dict[str, list[float]] = {"deidentified": [], "tissue_depth": [], "learned": []}
    for row in mapping["series"]:
        if not row.get("output"):
            continue
        orig = load_series(scan_folder(out / "cohort" / "dicom" / row["input_folder"]).series[0]
                           ).volume.as_uniform()
        deid = load_series(scan_folder(out / "deid" / row["output"]).series[0]).volume.as_uniform()
        al = alignment_from_volume(deid)

        def front(v, al=al):
            return frontal_map(np.nan_to_num(resample_canonical(v, al, grid), nan=-1000.0)
                               > -300.0, grid)

        f_o, f_d = front(orig), front(deid)
        removed = (np.abs(f_d - f_o) > 3.0) & (np.abs(xx) < 45) & (zz > -100) & (zz < 30)
        res["deidentified"].append(float(np.nanmean(np.abs(f_d - f_o)[removed])))
        for attack in ("tissue_depth", "learned"):
            f_r = front(reconstruct(deid, attack, alignment=al, stride=(1, 1, 1)).volume)
            res[attack].append(float(np.nanmean(np.abs(f_r - f_o)[removed])))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--geometry", action="store_true",
                    help="also measure how close each rebuilt face is to the original")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cohort" / "phi.json").is_file():
        run(["manage.py", "synth_cohort", str(out / "cohort"), "--subjects", str(a.subjects),
             "--seed", str(a.seed), "--size", a.size, "--force"])
    if not (out / "mapping.json").is_file():
        run(["manage.py", "deidentify", str(out / "cohort" / "dicom"), str(out / "deid"),
             "--method", "auto", "--mapping", str(out / "mapping.json"),
             "--registry", str(out / "registry.json"), "--no-qa-pictures",
             "--workers", str(a.workers)])
    if not (out / "reid" / "metrics.json").is_file():
        run(["manage.py", "reid_eval", str(out / "cohort" / "dicom"), str(out / "deid"),
             str(out / "reid"), "--mapping", str(out / "mapping.json"), "--attack", "all",
             "--workers", str(a.workers)])
    metrics = json.loads((out / "reid" / "metrics.json").read_text())
    print(table(metrics))
    if a.geometry:
        g = geometry(out)
        (out / "geometry.json").write_text(json.dumps(g, indent=1))
        for k, v in g.items():
            print(f"{k:>13s}: frontal skin map vs original, removed region: median "
                  f"{np.median(v):.2f} mm (range {min(v):.2f}–{max(v):.2f}, n = {len(v)})")


if __name__ == "__main__":
    main()
