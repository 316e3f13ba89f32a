"""DICOM CT series: build, write (atomically), scan, load and validate.

Conventions (see :mod:`pipeline.volume`): volumes are ``hu[k, j, i]`` =
``[slice, row, column]``; patient coordinates are DICOM LPS in millimetres;
intensities are Hounsfield units (HU) after RescaleSlope/RescaleIntercept.

Privacy: nothing in this module logs, and no exception message contains a
header value or a path that could carry a patient identifier. File names of
written series are ``IM00001.dcm``, ... and are never derived from header
content.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import keyword_dict
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from .volume import Volume

__all__ = [
    "CT_IMAGE_STORAGE",
    "DicomWriteError",
    "set_pixel_hu",
    "volume_to_datasets",
    "write_datasets",
]

CT_IMAGE_STORAGE = str(CTImageStorage)  # 1.2.840.10008.5.1.4.1.1.2

#: Keywords that differ per slice or are derived from the Volume and therefore
#: cannot be given in ``series_meta``.
_PER_SLICE_KEYWORDS = frozenset(
    {
        "SOPInstanceUID",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceLocation",
        "PixelSpacing",
        "Rows",
        "Columns",
        "PixelData",
        "RescaleSlope",
        "RescaleIntercept",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "SOPClassUID",
    }
)


class DicomWriteError(ValueError):
    """Raised when a volume or dataset cannot be turned into valid DICOM."""


def _ds(value: float) -> str:
    """Format a float as a DICOM Decimal String (≤ 16 characters)."""
    value = float(value)
    if value == 0.0:  # avoids "-0.0"
        return "0"
    if value == round(value) and abs(value) < 1e15:
        return str(int(round(value)))
    return format_number_as_ds(value)


def _choose_intercept(hu: np.ndarray) -> int:
    """Return an integer RescaleIntercept so that ``round(hu) - intercept`` fits int16."""
    if hu.size == 0:
        return 0
    lo = float(np.floor(np.nanmin(hu)))
    hi = float(np.ceil(np.nanmax(hu)))
    if lo >= -32768 and hi <= 32767:
        return 0
    if hi - lo > 65535:
        raise DicomWriteError(
            f"HU range {lo:.0f}..{hi:.0f} is wider than 65536 values and cannot be stored "
            "as int16 with RescaleSlope 1"
        )
    return int(np.floor((lo + hi) / 2.0))


def _hu_to_int16(hu: np.ndarray, intercept: int) -> np.ndarray:
    """Round ``hu - intercept`` to the nearest integer and return little-endian int16."""
    if np.issubdtype(hu.dtype, np.integer):
        stored = hu.astype(np.int32) - intercept
    else:
        if not np.all(np.isfinite(hu)):
            raise DicomWriteError("the HU array contains NaN or infinite values")
        stored = np.rint(hu.astype(np.float64) - intercept)
    return np.clip(stored, -32768, 32767).astype("<i2")


def _file_meta(sop_instance_uid: str, sop_class_uid: str = CT_IMAGE_STORAGE) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def volume_to_datasets(volume: Volume, *, series_meta: dict[str, Any] | None = None) -> list[Dataset]:
    """Build one CT Image Storage dataset per slice of ``volume``.

    Geometry: slice ``k`` gets ImagePositionPatient
    ``volume.slice_position_lps_mm(k)`` (LPS, mm), ImageOrientationPatient
    ``row_cosine + col_cosine``, PixelSpacing ``[dj, di]`` (mm),
    SliceThickness and SpacingBetweenSlices ``dk`` (mm). InstanceNumber is
    ``k + 1``. Readers that sort by position along
    ``cross(row_cosine, col_cosine)`` recover the same slice order when
    ``volume.normal`` equals that cross product (the default).

    Pixels: ``volume.hu`` (any real dtype, HU) is rounded to the nearest
    integer and stored as signed 16-bit with RescaleSlope 1 and an integer
    RescaleIntercept (0 whenever the HU range fits int16, otherwise the middle
    of the range). Values are exact for integer HU input.

    UIDs: StudyInstanceUID, SeriesInstanceUID and FrameOfReferenceUID are new
    (``generate_uid()``) unless given in ``series_meta``; every slice gets a
    new SOPInstanceUID. Any other DICOM keyword in ``series_meta`` is set on
    every slice (e.g. ``{"SeriesDescription": "defaced", "SeriesNumber": 2}``);
    per-slice or geometry keywords (SOPInstanceUID, ImagePositionPatient,
    PixelSpacing, ...) are rejected with :class:`DicomWriteError`.

    Patient module attributes (PatientName, PatientID, ...) are present but
    empty unless given in ``series_meta``. File meta: Explicit VR Little
    Endian.
    """
    meta = dict(series_meta or {})
    for key in meta:
        if key not in keyword_dict:
            raise DicomWriteError(f"series_meta key {key!r} is not a DICOM keyword")
        if key in _PER_SLICE_KEYWORDS:
            raise DicomWriteError(
                f"series_meta key {key!r} is set per slice or from the Volume and cannot be given"
            )

    hu = np.asarray(volume.hu)
    n_slices, rows, cols = hu.shape
    if n_slices == 0 or rows == 0 or cols == 0:
        raise DicomWriteError(f"cannot write an empty volume of shape {hu.shape}")
    intercept = _choose_intercept(hu)
    dk, dj, di = volume.spacing_mm
    if min(dk, dj, di) <= 0:
        raise DicomWriteError(f"spacing_mm must be positive, got {volume.spacing_mm}")

    study_uid = meta.pop("StudyInstanceUID", None) or generate_uid()
    series_uid = meta.pop("SeriesInstanceUID", None) or generate_uid()
    frame_uid = meta.pop("FrameOfReferenceUID", None) or generate_uid()
    now = datetime.now()
    iop = [_ds(v) for v in (*volume.row_cosine, *volume.col_cosine)]
    normal_for_location = np.cross(volume.row_cosine, volume.col_cosine)

    datasets: list[Dataset] = []
    for k in range(n_slices):
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = ""
        ds.ReferringPhysicianName = ""
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.KVP = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        position = volume.slice_position_lps_mm(k)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(position, normal_for_location)))
        ds.SliceThickness = _ds(dk)
        ds.SpacingBetweenSlices = _ds(dk)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(dj), _ds(di)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        for key, value in meta.items():
            setattr(ds, key, value)
        ds.PixelData = _hu_to_int16(hu[k], intercept).tobytes()
        ds["PixelData"].VR = "OW"
        datasets.append(ds)
    return datasets


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def set_pixel_hu(ds: Dataset, hu_slice: np.ndarray) -> None:
    """Replace the pixel data of a single-frame ``ds`` with ``hu_slice`` (HU, ``[row, column]``).

    Stored values are ``round((hu - RescaleIntercept) / RescaleSlope)``
    (slope 1 / intercept 0 when absent), clipped to the range representable
    with the dataset's BitsStored and PixelRepresentation, in a container of
    BitsAllocated bits. The transfer syntax becomes Explicit VR Little Endian
    (uncompressed), whatever it was before; all other attributes, including
    UIDs, are kept. The dataset is modified in place.

    Raises :class:`DicomWriteError` for shape mismatch, non-grey images,
    multi-frame datasets or unsupported bit depths.
    """
    hu_slice = np.asarray(hu_slice)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if hu_slice.shape != (rows, cols):
        raise DicomWriteError(
            f"slice shape {hu_slice.shape} does not match the dataset's Rows×Columns {(rows, cols)}"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomWriteError("only single-sample (greyscale) images are supported")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomWriteError("set_pixel_hu needs a single-frame dataset")
    bits_allocated = int(ds.get("BitsAllocated", 16))
    if bits_allocated not in (8, 16, 32):
        raise DicomWriteError(f"BitsAllocated {bits_allocated} is not supported")
    bits_stored = int(ds.get("BitsStored", bits_allocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 0:
        raise DicomWriteError("RescaleSlope is 0")
    if not np.all(np.isfinite(hu_slice)):
        raise DicomWriteError("the HU slice contains NaN or infinite values")

    lo, hi = _stored_range(bits_stored, signed)
    stored = np.rint((hu_slice.astype(np.float64) - intercept) / slope)
    stored = np.clip(stored, lo, hi)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    pixel_bytes = stored.astype(dtype).tobytes()

    if len(pixel_bytes) % 2:  # 8-bit, odd number of pixels: pad to even length
        pixel_bytes += b"\x00"
    if "PixelData" in ds:
        del ds["PixelData"]
    ds.PixelData = pixel_bytes
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "PhotometricInterpretation" not in ds or str(ds.PhotometricInterpretation).startswith("YBR"):
        ds.PhotometricInterpretation = "MONOCHROME2"


def _validate_filenames(filenames: Sequence[str], n: int) -> list[str]:
    names = [str(f) for f in filenames]
    if len(names) != n:
        raise DicomWriteError(f"got {len(names)} file names for {n} datasets")
    if len(set(names)) != len(names):
        raise DicomWriteError("file names must be unique")
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise DicomWriteError("file names must be plain names without directory parts")
    return names


def _ensure_file_meta(ds: Dataset) -> None:
    """Add the File Meta Information that :func:`pydicom.dcmwrite` needs, if missing."""
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID


def write_datasets(
    datasets: Sequence[Dataset], out_dir: Path, *, filenames: Sequence[str] | None = None
) -> list[Path]:
    """Write ``datasets`` as DICOM Part 10 files into ``out_dir``, atomically.

    Files are first written into a hidden temporary sibling folder
    ``out_dir.parent / ".{out_dir.name}.tmp-<random>"`` which is then renamed
    to ``out_dir``. An existing ``out_dir`` is renamed away first, the new
    folder renamed in, and the old one deleted, so readers never see a
    half-written series. On any exception the temporary folder is removed (and
    a previous ``out_dir`` restored) before re-raising. No fsync is done.

    File names default to ``IM00001.dcm``, ``IM00002.dcm``, ... in the order
    of ``datasets``; never derived from header content. ``filenames`` must be
    plain, unique names. Datasets lacking File Meta Information get it added
    in place (Explicit VR Little Endian unless a TransferSyntaxUID is already
    set). Returns the final file paths, in the order of ``datasets``.
    """
    out_dir = Path(out_dir)
    n = len(datasets)
    if filenames is None:
        names = [f"IM{i + 1:05d}.dcm" for i in range(n)]
    else:
        names = _validate_filenames(filenames, n)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = parent / f".{out_dir.name}.tmp-{secrets.token_hex(8)}"
    tmp_dir.mkdir()
    try:
        for ds, name in zip(datasets, names):
            _ensure_file_meta(ds)
            pydicom.dcmwrite(tmp_dir / name, ds, enforce_file_format=True)
        if out_dir.exists() or out_dir.is_symlink():
            old_dir = parent / f".{out_dir.name}.old-{secrets.token_hex(8)}"
            os.replace(out_dir, old_dir)
            try:
                os.replace(tmp_dir, out_dir)
            except BaseException:
                os.replace(old_dir, out_dir)
                raise
            if old_dir.is_dir() and not old_dir.is_symlink():
                shutil.rmtree(old_dir, ignore_errors=True)
            else:
                old_dir.unlink(missing_ok=True)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
