"""Defacing quality per face-region method on held-out synthetic heads, against ground truth.

For each seed a synthetic head is generated (:mod:`pipeline.synth`: the facial soft
tissue outside the skeleton's hull to remove; the inner structures — globes, orbital
fat and recti, nasal cavity, sinuses, oral cavity, pharynx, masticator muscles, brain —
inside the hull shrunk by 3 mm to keep) and defaced; printed per seed and summarised:
facial soft tissue / nose / lips / ears changed, voxels changed in every inner
structure, air (≤ −500 HU) changed, bone Dice at 300 and 150 HU, seconds.

    .venv/bin/python benchmarks/bench_deface_quality.py --method auto --seeds 100-119
    .venv/bin/python benchmarks/bench_deface_quality.py --acquisition tilted-4-7mm
    .venv/bin/python benchmarks/bench_deface_quality.py --pose 0,25,0 --metal

``--acquisition``: ``default`` (140×150×130 at 2.0 × 1.7 × 1.7 mm), ``thick-5mm-tilt18``
(5 mm slabs, gantry tilt 18.5°), ``tilted-4-7mm`` (4 mm then 7 mm slabs, tilt 15°, as
the shared real GE head CT), ``thick-7mm``, ``coarse-pixels`` (2.95 mm pixels).

``--shell HU[,GAP]``: a dense shell over the face of each plain head (a mask, splint or cast
pressed onto it, ``GAP`` mm off the skin with a cushion along its rim;
:func:`pipeline.synth.face_shell`, 3.5 mm thick); its voxels are left out of the figures.

    .venv/bin/python benchmarks/bench_deface_quality.py --method auto --shell 350
    .venv/bin/python benchmarks/bench_deface_quality.py --method auto --shell 350,4

``--domain``: the domain-randomised heads instead (:func:`pipeline.detector_data.domain_head`:
body habitus, thin auricles, head holders and pads, HU and kernel variety, each with its own
acquisition, so ``--acquisition``, ``--pose`` and ``--metal`` do not apply), e.g.
``--domain --seeds 27000-27019`` (the detector's held-out domain subjects); also counted:
voxels of the holder, pads and couch changed.

    .venv/bin/python benchmarks/bench_deface_quality.py --method auto --domain --seeds 27000-27019
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.deface import AnatomicalFaceRegion, deface  # noqa: E402
from pipeline.synth import LABELS, SubjectParams, face_shell, generate_head  # noqa: E402

ACQUISITIONS = {
    "default": dict(shape=(140, 150, 130), spacing_mm=(2.0, 1.7, 1.7)),
    "thick-5mm-tilt18": dict(shape=(56, 150, 130), spacing_mm=(5.0, 1.7, 1.7), thickness_mm=5.0,
                             tilt_deg=18.5),
    "tilted-4-7mm": dict(shape=(56, 150, 130), spacing_mm=(4.0, 1.7, 1.7), tilt_deg=15.0,
                         positions_mm=[*range(0, 120, 4), *range(121, 300, 7)],
                         thickness_mm=[4.0] * 30 + [7.0] * 26),
    "thick-7mm": dict(shape=(40, 150, 130), spacing_mm=(7.0, 1.7, 1.7), thickness_mm=7.0),
    "coarse-pixels": dict(shape=(140, 86, 75), spacing_mm=(2.0, 2.95, 2.95)),
}


#: what the patient is not: the scanner's couch, a head holder, pads
DEVICE_LABELS = [LABELS[n] for n in ("couch", "holder", "foam")]


def measure(head, res, hu: np.ndarray | None = None, skip: np.ndarray | None = None
            ) -> dict[str, float]:
    """Figures of ``res`` (a defacing of ``head``, or of ``hu``: its HU with an object added
    whose voxels ``skip`` are left out of the removal figures)."""
    before, after = (head.volume.hu if hu is None else hu), res.hu
    changed = after != before
    face = head.face_soft_tissue_mask
    fm = head.feature_masks
    bone = np.isin(head.labels, [LABELS[n] for n in ("cortical_bone", "cancellous_bone", "teeth")])
    shell_removed = None
    if skip is not None and skip.any():
        shell_removed = float((after != before)[skip].mean())
    if skip is not None:
        changed = changed & ~skip

    def frac(m):
        if skip is not None:
            m = m & ~skip
        return float(changed[m].mean()) if m.any() else float("nan")

    def dice(t):
        a, b = before >= t, after >= t
        return 2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))

    inside = {n: int((changed & m).sum()) for n, m in head.inside_masks().items()}
    return {"face": frac(face), "nose": frac(face & fm["nose"]), "lips": frac(face & fm["lips"]),
            "ears": frac(head.ear_soft_tissue_mask), "inside_changed": sum(inside.values()),
            "inside_detail": inside, "brain_changed": int((changed & head.brain_mask).sum()),
            "air_changed": int((changed & (before <= -500)).sum()),
            "bone_label_changed": int((changed & bone).sum()),
            "devices_changed": int((changed & np.isin(head.labels, DEVICE_LABELS)).sum()),
            "dice300": dice(300), "dice150": dice(150), "face_found": res.qa.face_found,
            "shell_removed": shell_removed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["anatomical", "auto", "model"], default="anatomical")
    ap.add_argument("--seeds", default="100-119", help="range A-B (inclusive) of held-out seeds")
    ap.add_argument("--acquisition", choices=sorted(ACQUISITIONS), default="default")
    ap.add_argument("--pose", default=None, help="yaw,pitch,roll in degrees (default: random ±4°)")
    ap.add_argument("--metal", action="store_true", help="dental fillings with streaks")
    ap.add_argument("--domain", action="store_true",
                    help="domain-randomised heads (own acquisitions)")
    ap.add_argument("--shell", default=None, metavar="HU[,GAP]",
                    help="a dense shell over the face (HU; GAP mm off the skin, default 0)")
    args = ap.parse_args(argv)
    if args.domain and (args.pose or args.metal or args.shell
                        or args.acquisition != "default"):
        ap.error("--domain heads draw their own acquisition, pose and metal (and no shell)")
    shell = None
    if args.shell:
        try:
            shell = tuple(float(x) for x in args.shell.split(","))
        except ValueError:
            ap.error("--shell takes HU[,GAP], e.g. 350 or 350,4")
        if not 1 <= len(shell) <= 2:
            ap.error("--shell takes HU[,GAP], e.g. 350 or 350,4")
    pose = tuple(float(x) for x in args.pose.split(",")) if args.pose else None
    a, b = (int(x) for x in args.seeds.split("-"))
    if args.method == "anatomical":
        method = AnatomicalFaceRegion()
    else:
        from pipeline.face_model import make_model_method

        method = make_model_method(None, auto=args.method == "auto")
    kw = dict(ACQUISITIONS[args.acquisition])
    rows, seconds = [], []
    for seed in range(a, b + 1):
        if args.domain:
            from pipeline.detector_data import domain_head

            head = domain_head(seed)
        else:
            head = generate_head(SubjectParams.random(seed), noise_seed=seed, pose_deg=pose,
                                 metal=args.metal, **kw)
        hu = skip = None
        volume = head.volume
        if shell is not None:
            hu, skip = face_shell(head, shell[0], shell[1] if len(shell) > 1 else 0.0)
            volume = volume.with_hu(hu)
        t = time.perf_counter()
        res = deface(volume, method)
        seconds.append(time.perf_counter() - t)
        m = measure(head, res, hu, skip)
        check = res.qa.nose_check
        m["nose_check"] = check.get("removed_pct") if check else None
        m["nose_flagged"] = bool(check.get("nose_may_be_left")) if check else False
        rows.append(m)
        print(f"seed {seed}: face {m['face']:.4f} nose {m['nose']:.4f} lips {m['lips']:.4f} "
              f"ears {m['ears']:.3f} | inside changed {m['inside_changed']} brain "
              f"{m['brain_changed']} air {m['air_changed']} bone {m['bone_label_changed']} "
              f"devices {m['devices_changed']} | "
              f"Dice300 {m['dice300']:.5f} Dice150 {m['dice150']:.5f} | {seconds[-1]:.2f} s"
              + (f" | shell removed {m['shell_removed']:.3f}" if shell else "")
              + f" | nose check {_pct(m['nose_check'])}"
              + (" FLAGGED" if m["nose_flagged"] else ""), flush=True)
    face = np.array([r["face"] for r in rows])
    what = "domain heads" if args.domain else (f"{args.acquisition}, pose {pose or 'random ±4°'}"
                                               f"{', metal' if args.metal else ''}"
                                               f"{f', shell {args.shell}' if shell else ''}")
    print(f"\n{args.method}, {what}, seeds {a}-{b}:")
    print(f"  facial soft tissue removed: mean {face.mean():.4f}, worst {face.min():.4f}, "
          f"seeds ≥ 0.99: {int((face >= 0.99).sum())}/{len(face)}")
    for key in ("nose", "lips", "ears"):
        v = np.array([r[key] for r in rows])
        print(f"  {key}: mean {np.nanmean(v):.4f}, worst {np.nanmin(v):.4f}")
    print(f"  inner structures changed (voxels, all seeds): {sum(r['inside_changed'] for r in rows)}; "
          f"brain {sum(r['brain_changed'] for r in rows)}; air {sum(r['air_changed'] for r in rows)}; "
          f"bone {sum(r['bone_label_changed'] for r in rows)}; holder, pads and couch "
          f"{sum(r['devices_changed'] for r in rows)}")
    print(f"  bone Dice 300 HU min {min(r['dice300'] for r in rows):.6f}, "
          f"150 HU min {min(r['dice150'] for r in rows):.6f}")
    if shell:
        print(f"  shell's voxels removed: mean {np.mean([r['shell_removed'] for r in rows]):.3f}")
    # the QA's nose check (DefaceQA.nose_check) against the ground truth: does it flag the
    # heads whose nose was not removed, and only those?
    low = [r for r in rows if r["nose"] < 0.9]  # (NaN: no nose in the image)
    flagged_low = sum(r["nose_flagged"] for r in low)
    print(f"  nose check: flagged {sum(r['nose_flagged'] for r in rows)}/{len(rows)} heads; "
          f"of the {len(low)} with < 90 % of the nose removed, {flagged_low} flagged; "
          f"checked {sum(r['nose_check'] is not None for r in rows)}")
    print(f"  face found {sum(r['face_found'] for r in rows)}/{len(rows)}; "
          f"deface {np.mean(seconds):.2f} s per head")
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
