"""Throughput of pipeline.dicom_io on 512×512 CT slices (prints slices/s).

Usage: .venv/bin/python benchmarks/bench_dicom_io.py [n_slices] [--rle]

Stages timed: build datasets (volume_to_datasets), atomic write, scan
(headers only), load (full read + decode + validate), and the de-identification
write path (set_pixel_hu on loaded headers + write). Files go to a temporary
folder that is removed afterwards. Reading runs from the page cache, so disk
speed is not measured. Target for the whole pipeline: ≥ 60 slices/s for
512×512×300 (read + deface + write) on 2 cores.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dicom_io import (  # noqa: E402
    load_series,
    scan_folder,
    set_pixel_hu,
    volume_to_datasets,
    write_datasets,
)
from pipeline.volume import Volume  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 100
    rle = "--rle" in sys.argv
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(n, 512, 512), dtype=np.int16)
    hu[:, :100] = -1000  # some air, like real CT (helps RLE a little)
    volume = Volume(hu=hu, spacing_mm=(1.0, 0.5, 0.5))
    rows = []

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        rows.append((name, dt))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datasets = timed("volume_to_datasets", lambda: volume_to_datasets(volume))
        if rle:
            from pydicom.uid import RLELossless

            timed("compress RLE (setup)", lambda: [d.compress(RLELossless) for d in datasets])
        timed("write_datasets", lambda: write_datasets(datasets, root / "in"))
        datasets.clear()  # free memory before reading
        scan = timed("scan_folder", lambda: scan_folder(root / "in"))
        loaded = timed("load_series", lambda: load_series(scan.series[0]))
        assert np.array_equal(loaded.volume.hu, hu)

        def deface_write() -> None:
            for k, ds in enumerate(loaded.datasets):
                set_pixel_hu(ds, loaded.volume.hu[k])
            write_datasets(loaded.datasets, root / "out")

        timed("set_pixel_hu + write", deface_write)

    kind = "RLE" if rle else "uncompressed"
    print(f"dicom_io throughput, {n} slices of 512×512 int16 ({kind} input)")
    for name, dt in rows:
        print(f"  {name:<24s} {dt:7.2f} s  {n / dt:8.1f} slices/s")
    io_stages = ("scan_folder", "load_series", "set_pixel_hu + write")
    io_total = sum(dt for name, dt in rows if name in io_stages)
    print(f"  {'read + write total':<24s} {io_total:7.2f} s  {n / io_total:8.1f} slices/s")


if __name__ == "__main__":
    main()
