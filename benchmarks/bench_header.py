#!/usr/bin/env python3
"""Benchmark: header de-identification speed, deidstudy vs dicognito, on the same CT files.

Writes ``--files`` synthetic CT slices (512×512 int16 pixel data, a realistic CT header
from pydicom's ``CT_small.dcm`` plus identifiers, private tags and nested sequences)
to a temporary folder, then for each tool and each file:

* *header only*: the file is read (not timed) and only the de-identification call is
  timed;
* *end to end*: read + de-identify + write to memory is timed.

Prints files/s for both tools and the ratio. Target: header-only files/s of
deidstudy ≥ 2× dicognito. dicognito is not a project dependency: install it into the
venv for this benchmark only (``.venv/bin/pip install dicognito``).

Usage: ``.venv/bin/python benchmarks/bench_header.py [--files 300] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.deid_header import HeaderDeidentifier, date_offset_days_for, pseudonym_key  # noqa: E402

SECRET = "benchmark-project-secret"


def make_files(folder: Path, n: int) -> list[Path]:
    """Write ``n`` CT slices (512×512 int16) of one series into ``folder``."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base.PatientName = "Doe^John^Q"
    base.PatientID = "MRN00123456"
    base.PatientBirthDate = "19610412"
    base.InstitutionName = "St. Elsewhere General Hospital"
    base.ReferringPhysicianName = "House^Gregory"
    base.OperatorsName = ["Smith^Anna", "Jones^Bob"]
    base.AccessionNumber = "ACC998877"
    base.StudyDescription = "CT HEAD for Doe^John 2019-03-12"
    base.SeriesDescription = "AXIAL 0.6 H30s"
    base.ProtocolName = "HEAD ROUTINE"
    base.OtherPatientIDsSequence = Sequence([Dataset()])
    base.OtherPatientIDsSequence[0].PatientID = "OLD-4455"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    base.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.RequestedProcedureID = "RP-1"
    req.ScheduledProcedureStepDescription = "CT head Doe"
    base.RequestAttributesSequence = Sequence([req])
    block = base.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x10, "OB", b"\x01" * 2000)
    block.add_new(0x11, "LO", "Doe^John")
    base.Rows = base.Columns = 512
    rng = np.random.default_rng(0)
    pixels = rng.integers(-1024, 2000, size=(512, 512), dtype=np.int16)
    base.PixelData = pixels.tobytes()
    paths = []
    for i in range(n):
        base.SOPInstanceUID = f"1.2.826.0.1.3680043.9.7433.1.{i + 1}"
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i + 1
        base.ImagePositionPatient = [-158.1, -179.0, -75.7 + 0.6 * i]
        path = folder / f"slice{i:04d}.dcm"
        base.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def time_tool(
    paths: list[Path], deidentify: Callable[[Dataset], None]
) -> tuple[float, float]:
    """Return (header-only files/s, end-to-end files/s) for one pass over ``paths``."""
    header_s = 0.0
    t0 = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        t1 = time.perf_counter()
        deidentify(ds)
        header_s += time.perf_counter() - t1
        ds.save_as(io.BytesIO())
    total_s = time.perf_counter() - t0
    return len(paths) / header_s, len(paths) / total_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        Anonymizer = None  # type: ignore[assignment]
        print("dicognito is not installed: only deidstudy is timed "
              "(.venv/bin/pip install dicognito to compare; not a project dependency)")

    ours = HeaderDeidentifier(SECRET, dates="shift")
    offset = date_offset_days_for(pseudonym_key("bench-patient", SECRET), SECRET)

    def deid_ours(ds: Dataset) -> None:
        ours.deidentify(ds, pseudonym="SUBJ-0001", date_offset_days=offset)

    tools: dict[str, Callable[[Dataset], None]] = {"deidstudy": deid_ours}
    if Anonymizer is not None:
        theirs = Anonymizer(seed="benchmark")
        tools["dicognito"] = theirs.anonymize

    with tempfile.TemporaryDirectory(prefix="bench-header-") as tmp:
        paths = make_files(Path(tmp), args.files)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} CT files, 512x512 int16, {size_mb:.0f} MB; "
              f"best and median of {args.repeats} passes")
        for deid in tools.values():  # warm up (imports, caches, page cache)
            time_tool(paths[:20], deid)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
        for _ in range(args.repeats):
            for name, deid in tools.items():
                results[name].append(time_tool(paths, deid))

    best: dict[str, tuple[float, float]] = {}
    for name, runs in results.items():
        header = [r[0] for r in runs]
        e2e = [r[1] for r in runs]
        best[name] = (max(header), max(e2e))
        print(f"{name:10s} header-only {max(header):8.1f} files/s (median "
              f"{statistics.median(header):.1f}); read+deid+write {max(e2e):7.1f} files/s "
              f"(median {statistics.median(e2e):.1f})")
    if "dicognito" in best:
        ratio = best["deidstudy"][0] / best["dicognito"][0]
        ratio_e2e = best["deidstudy"][1] / best["dicognito"][1]
        verdict = "meets" if ratio >= 2.0 else "MISSES"
        print(f"ratio deidstudy/dicognito: header-only {ratio:.2f}x ({verdict} the 2x target), "
              f"end to end {ratio_e2e:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
