"""Face removal of a face-region method on held-out synthetic heads, measured independently.

For each held-out subject (plain heads of :func:`pipeline.synth.generate_head`, or
``--domain`` heads of :func:`pipeline.detector_data.domain_head`: hollow noses,
trauma, holders, tilted and thick slices) the volume is defaced and measured with
:func:`pipeline.evaluate.removal_figures` — the same independent figures as
``bench_realct.py``: soft tissue changed inside the facial skeleton (bone hull shrunk
by 3 mm), and of the soft tissue more than 3 mm outside it in the face's slices
(those holding ground-truth facial soft tissue) anterior to a coronal plane 12 mm
behind the ear canals, the share removed — plus, from the generator's ground truth,
the facial soft tissue removed and any inner structure (globes, sinuses, …, brain)
changed.

    .venv/bin/python benchmarks/bench_model_removal.py --method model --seeds 27000-27009 [--domain]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.deface import deface  # noqa: E402
from pipeline.deidentify import make_face_method  # noqa: E402
from pipeline.evaluate import removal_figures  # noqa: E402
from pipeline.synth import SubjectParams, generate_head, head_local_to_lps  # noqa: E402


def face_region(head) -> np.ndarray:
    """Slices with ground-truth facial soft tissue, LPS y ≤ the ear canals' + 12 mm."""
    from pipeline.envelope import SliceStack

    p = head.params
    ear = head_local_to_lps(head, np.array([[0.0, p.skull_length_mm / 2.0 - 88.0, 0.0]]))[0]  # canals
    y_max = float(ear[1]) + 12.0
    vol = head.volume
    st = SliceStack.of(vol)
    nk, nj, ni = vol.hu.shape
    dj, di = st.pixel_mm
    jj, ii = np.arange(nj)[:, None], np.arange(ni)[None, :]
    ks = np.flatnonzero(head.face_soft_tissue_mask.reshape(nk, -1).any(axis=1))
    region = np.zeros(vol.hu.shape, bool)
    for k in ks:
        y = st.origins[k][1] + jj * dj * st.col[1] + ii * di * st.row[1]
        region[k] = y <= y_max
    return region


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["anatomical", "auto", "model"], default="model")
    ap.add_argument("--seeds", default="27000-27009", help="range A-B (inclusive) of held-out seeds")
    ap.add_argument("--domain", action="store_true", help="domain-randomised heads and acquisitions")
    ap.add_argument("--shape", default="64,160,160", help="plain heads: slices,rows,cols")
    ap.add_argument("--spacing", default="4.0,1.6,1.6", help="plain heads: dk,dj,di in mm")
    args = ap.parse_args(argv)
    a, b = (int(x) for x in args.seeds.split("-"))
    method, _ = make_face_method(args.method)
    shape = tuple(int(x) for x in args.shape.split(","))
    spacing = tuple(float(x) for x in args.spacing.split(","))
    rows = []
    for seed in range(a, b + 1):
        if args.domain:
            from pipeline.detector_data import domain_head

            head = domain_head(seed)
        else:
            head = generate_head(SubjectParams.random(seed), shape=shape, spacing_mm=spacing, noise_seed=seed)
        t = time.perf_counter()
        res = deface(head.volume, method)
        sec = time.perf_counter() - t
        fig = removal_figures(head.volume, res.hu, region=face_region(head))
        changed = res.hu != head.volume.hu
        gt = head.face_soft_tissue_mask
        gt_removed = float(changed[gt].mean()) if gt.any() else float("nan")
        inner = sum(int((changed & m).sum()) for m in head.inside_masks().values())
        src = res.region.details.get("source", "")
        rows.append((fig.outside_soft_removed_pct, fig.inside_soft_changed_pct,
                     fig.inside_soft_changed_pct_worst_slice, 100 * gt_removed, inner, sec))
        print(f"seed {seed}: outside removed {fig.outside_soft_removed_pct:.1f} %, inside changed "
              f"{fig.inside_soft_changed_pct:.3f} % (worst slice {fig.inside_soft_changed_pct_worst_slice:.2f} %), "
              f"ground-truth face removed {100 * gt_removed:.1f} %, inner-structure voxels changed {inner}"
              f"{', ' + src if src else ''}, {sec:.1f} s", flush=True)
    arr = np.array(rows, float)
    names = ["outside soft tissue removed %", "inside soft tissue changed %", "inside, worst slice %",
             "ground-truth face removed %", "inner-structure voxels changed"]
    print(f"method {args.method}, {len(arr)} {'domain' if args.domain else 'plain'} heads (seeds {a}-{b}):")
    for name, col in zip(names, arr.T):
        print(f"  {name:32s} min {np.nanmin(col):.3f}  mean {np.nanmean(col):.3f}  max {np.nanmax(col):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
