"""Benchmark: end-to-end de-identification of one 512×512×300 CT series.

Prints slices/s of ``deidentify_folder`` (read → anatomical defacing → header
de-identification → write → QA picture) with a per-stage split of the one series path
(:func:`pipeline.deidentify.deidentify_series`), then runs the header-only comparison
against dicognito (``benchmarks/bench_header.py``) and prints the ratio. Targets (2-core
machine): ≥ 150 slices/s end to end; header-only ≥ 2× dicognito.

    .venv/bin/python benchmarks/bench_deidentify.py [--slices 300] [--size 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dicom_io  # noqa: E402
from pipeline.deface import AnatomicalFaceRegion  # noqa: E402
from pipeline.deidentify import (  # noqa: E402
    DeidOptions,
    deidentify_folder,
    deidentify_series,
    write_qa_picture,
)
from pipeline.synth import SubjectParams, generate_head  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-header", action="store_true", help="skip the dicognito comparison")
    args = ap.parse_args(argv)

    fov_mm = 230.0
    spacing = (300.0 / args.slices, fov_mm / args.size, fov_mm / args.size)
    t = time.perf_counter()
    head = generate_head(SubjectParams.random(7), shape=(args.slices, args.size, args.size),
                         spacing_mm=spacing, noise_seed=7)
    t_gen = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench-deid-") as tmp:
        src = Path(tmp) / "in" / "series"
        dicom_io.write_datasets(dicom_io.volume_to_datasets(head.volume), src)
        del head
        print(f"series: {args.slices} slices of {args.size}×{args.size} (generated in {t_gen:.1f} s)")

        # Per-stage split (single process), through the one series path the command line
        # and the web use (pipeline.deidentify.deidentify_series)
        stages: dict[str, float] = {}
        t = time.perf_counter()
        scan = dicom_io.scan_folder(src.parent)
        stages["scan headers"] = time.perf_counter() - t
        t = time.perf_counter()
        loaded = dicom_io.load_series(scan.series[0])
        stages["load + decode"] = time.perf_counter() - t
        t = time.perf_counter()
        res = deidentify_series(loaded, Path(tmp) / "stage-out", method=AnatomicalFaceRegion(),
                                project_secret="bench-secret", pseudonym="SUBJ-0001",
                                date_offset_days=-100, qa_picture=Path(tmp) / "qa.png")
        total_series = time.perf_counter() - t
        sec = res.defaced.qa.seconds
        deface_s = sum(sec.values())
        stages["deface: region + envelope"] = sec["region"] + sec["envelope"]
        stages["deface: removal + fill"] = sec["apply"]
        stages["deface: QA figures"] = sec["qa"]
        # the headers are de-identified while the face is removed, the QA picture is drawn
        # while the files are written: what remains after the defacing
        stages["pixels + write ∥ QA picture"] = total_series - deface_s
        t = time.perf_counter()
        write_qa_picture(res, Path(tmp) / "qa2.png")
        qa_alone = time.perf_counter() - t
        total = sum(stages.values())
        print("per-stage split (one process):")
        for name, sec_ in stages.items():
            print(f"  {name:30s} {sec_:6.2f} s  ({100 * sec_ / total:4.1f} %)")
        print(f"  {'sum':30s} {total:6.2f} s  → {args.slices / total:.1f} slices/s")
        print(f"  (the QA picture alone: {qa_alone:.2f} s)")
        print(f"  removed {res.qa['removed_ml']:.1f} mL, bone Dice {res.qa['bone_dice']:.5f}, "
              f"inside the skeleton changed {res.qa['inside_soft_changed_pct']:.2f} %")
        del loaded, res

        best = float("inf")
        for r in range(args.repeats):
            out = Path(tmp) / f"out{r}"
            t = time.perf_counter()
            summary = deidentify_folder(src.parent, out, DeidOptions(project_secret="bench",
                                                                     method="anatomical"))
            best = min(best, time.perf_counter() - t)
            assert summary.ok, [s.error for s in summary.series]
        rate = args.slices / best
        print(f"end to end (deidentify_folder, best of {args.repeats}): {best:.2f} s → "
              f"{rate:.1f} slices/s (target ≥ 150: {'met' if rate >= 150 else 'NOT met'})")

    if not args.skip_header:
        print("\nheader-only de-identification vs dicognito:")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_header

        return bench_header.main(["--files", str(args.slices)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
