"""Reading a stored series back: one DICOM series per ``DATA_DIR``-relative folder."""

from __future__ import annotations

from pathlib import Path

from pipeline import dicom_io

from .paths import StorageError, data_path


def stored_series_ref(folder: Path) -> dicom_io.SeriesRef:
    """The one readable series in ``folder`` (a stored ``orig``/``deid`` series folder)."""
    scan = dicom_io.scan_folder(folder)
    if len(scan.series) != 1 or scan.problems:
        raise StorageError("stored series folder does not hold exactly one readable series")
    return scan.series[0]


def load_stored(rel_dir: str) -> dicom_io.LoadedSeries:
    """Load a stored series (``DATA_DIR``-relative folder) with
    :func:`pipeline.dicom_io.load_series` (volume in HU, DICOM LPS geometry)."""
    return dicom_io.load_series(stored_series_ref(data_path(rel_dir)))
