"""DICOM CT series: build, write (atomically), scan, load and validate.

Writing: :func:`volume_to_datasets` (Volume → CT Image Storage datasets),
:func:`set_pixel_hu` (put modified HU back into an existing header, output
uncompressed) and :func:`write_datasets` (atomic folder write).

Reading: :func:`scan_folder` (headers only; every file is either in a
:class:`SeriesRef` or a :class:`FileProblem`) then :func:`load_series`
(one full read per file, validation, HU volume; raises :class:`SeriesError`).

Conventions (see :mod:`pipeline.volume`): volumes are ``hu[k, j, i]`` =
``[slice, row, column]``; patient coordinates are DICOM LPS in millimetres;
intensities are Hounsfield units (HU) after RescaleSlope/RescaleIntercept.

Privacy: nothing in this module logs, and no exception message contains a
header value or a path that could carry a patient identifier. File names of
written series are ``IM00001.dcm``, ... and are never derived from header
content.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from .atomic import atomic_dir
from .forked import ForkedCall, ForkedCallError
from .volume import Volume

__all__ = [
    "CT_IMAGE_STORAGE",
    "DicomWriteError",
    "FileProblem",
    "LoadedSeries",
    "ScanResult",
    "SeriesError",
    "SeriesRef",
    "load_series",
    "scan_folder",
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


def volume_to_datasets(
    volume: Volume, *, series_meta: dict[str, Any] | None = None
) -> list[Dataset]:
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


@dataclass(frozen=True)
class PixelFormat:
    """How a single-frame dataset stores its pixels (:func:`set_pixel_hu`'s rules).

    Stored values are ``round((hu - intercept) / slope)`` clipped to what
    ``bits_stored`` and ``signed`` can hold, little endian in a container of
    ``bits_allocated`` bits.
    """

    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float

    @classmethod
    def of(cls, ds: Dataset) -> PixelFormat:
        """The format of ``ds``; :class:`DicomWriteError` for what cannot be written."""
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise DicomWriteError("only single-sample (greyscale) images are supported")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomWriteError("set_pixel_hu needs a single-frame dataset")
        bits_allocated = int(ds.get("BitsAllocated", 16))
        if bits_allocated not in (8, 16, 32):
            raise DicomWriteError(f"BitsAllocated {bits_allocated} is not supported")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        if slope == 0:
            raise DicomWriteError("RescaleSlope is 0")
        return cls(rows=int(ds.Rows), cols=int(ds.Columns), bits_allocated=bits_allocated,
                   bits_stored=int(ds.get("BitsStored", bits_allocated)),
                   signed=int(ds.get("PixelRepresentation", 0)) == 1, slope=slope,
                   intercept=float(ds.get("RescaleIntercept", 0) or 0))

    @property
    def vr(self) -> str:
        """The Pixel Data's value representation."""
        return "OB" if self.bits_allocated == 8 else "OW"

    @property
    def n_bytes(self) -> int:
        """Length of the Pixel Data value (padded to even)."""
        n = self.rows * self.cols * self.bits_allocated // 8
        return n + n % 2

    def stored_bytes(self, hu_slice: np.ndarray) -> bytes:
        """The Pixel Data value of ``hu_slice`` (HU, ``[row, column]``), padded to even length."""
        hu_slice = np.asarray(hu_slice)
        if hu_slice.shape != (self.rows, self.cols):
            raise DicomWriteError(
                f"slice shape {hu_slice.shape} does not match the dataset's Rows×Columns "
                f"{(self.rows, self.cols)}"
            )
        lo, hi = _stored_range(self.bits_stored, self.signed)
        dtype = np.dtype(f"<{'i' if self.signed else 'u'}{self.bits_allocated // 8}")
        slope, intercept = self.slope, self.intercept
        if hu_slice.dtype.kind in "iu" and slope == 1 and intercept == int(intercept):
            # integer HU, slope 1 (the usual CT case): exact integer arithmetic, no rounding
            stored = hu_slice.astype(np.int64 if self.bits_allocated == 32 else np.int32)
            if intercept:
                stored -= int(intercept)
            s_lo, s_hi = int(stored.min()), int(stored.max())
            if s_lo < lo or s_hi > hi:
                np.clip(stored, lo, hi, out=stored)
        else:
            if not np.all(np.isfinite(hu_slice)):
                raise DicomWriteError("the HU slice contains NaN or infinite values")
            stored = np.rint((hu_slice.astype(np.float64) - intercept) / slope)
            stored = np.clip(stored, lo, hi)
        pixel_bytes = stored.astype(dtype, copy=False).tobytes()
        if len(pixel_bytes) % 2:  # 8-bit, odd number of pixels: pad to even length
            pixel_bytes += b"\x00"
        return pixel_bytes


def set_pixel_hu(ds: Dataset, hu_slice: np.ndarray) -> None:
    """Replace the pixel data of a single-frame ``ds`` with ``hu_slice`` (HU, ``[row, column]``).

    Stored values are ``round((hu - RescaleIntercept) / RescaleSlope)``
    (slope 1 / intercept 0 when absent), clipped to the range representable
    with the dataset's BitsStored and PixelRepresentation, in a container of
    BitsAllocated bits (:class:`PixelFormat`). The transfer syntax becomes
    Explicit VR Little Endian (uncompressed), whatever it was before; all other
    attributes, including UIDs, are kept. The dataset is modified in place.

    Raises :class:`DicomWriteError` for shape mismatch, non-grey images,
    multi-frame datasets or unsupported bit depths.
    """
    fmt = PixelFormat.of(ds)
    pixel_bytes = fmt.stored_bytes(hu_slice)
    if "PixelData" in ds:
        del ds["PixelData"]
    ds.PixelData = pixel_bytes
    ds["PixelData"].VR = fmt.vr
    _set_pixel_header(ds)


def _set_pixel_header(ds: Dataset) -> None:
    """What :func:`set_pixel_hu` changes in the header besides the Pixel Data."""
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "PhotometricInterpretation" not in ds or str(ds.PhotometricInterpretation).startswith("YBR"):
        ds.PhotometricInterpretation = "MONOCHROME2"


def encode_prefix(ds: Dataset) -> tuple[bytes, PixelFormat] | None:
    """The bytes :func:`write_datasets` (``pixels_hu`` given) writes for ``ds`` before
    the Pixel Data value, and the format of that value.

    ``prefix + fmt.stored_bytes(hu_slice)`` is byte for byte the file that
    ``set_pixel_hu(ds, hu_slice)`` and :func:`write_datasets` would write, so the
    header can be encoded before the pixels are known (:func:`write_prefixed`).
    ``ds`` is modified in place as :func:`set_pixel_hu` would (the transfer syntax,
    the file meta) and loses its Pixel Data. None when the shortcut does not apply
    (multi-frame, an element after the Pixel Data, float pixel data): write such a dataset with
    :func:`write_datasets`. Raises :class:`DicomWriteError` as :func:`set_pixel_hu`.
    """
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    fmt = PixelFormat.of(ds)
    if any(int(tag) > _PIXEL_DATA_TAG or int(tag) in _FLOAT_PIXEL_TAGS for tag in ds.keys()):
        return None
    if "PixelData" in ds:
        del ds["PixelData"]
    _set_pixel_header(ds)
    _ensure_file_meta(ds)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    # the Pixel Data element's header in Explicit VR Little Endian: tag, VR, 2 reserved
    # bytes, 4-byte length
    head = struct.pack("<HH2sHI", _PIXEL_DATA_TAG >> 16, _PIXEL_DATA_TAG & 0xFFFF,
                       fmt.vr.encode(), 0, fmt.n_bytes)
    return buffer.getvalue() + head, fmt


def encode_files(
    paths: Sequence[Path], prepare: Callable[[Dataset], None],
) -> list[tuple[bytes, PixelFormat]] | None:
    """:func:`encode_prefix` of each file of ``paths`` after ``prepare(dataset)`` (e.g. the
    header de-identification), reading the files as :func:`load_series` does
    (:func:`read_dataset`); pydicom's warnings are captured (they may quote values).
    None when a file does not allow the shortcut (see :func:`encode_prefix`)."""
    encoded = []
    with _quiet_pydicom():
        for path in paths:
            ds = read_dataset(Path(path))
            if "PixelData" in ds:
                del ds["PixelData"]
            prepare(ds)
            one = encode_prefix(ds)
            if one is None:
                return None
            encoded.append(one)
    return encoded


def write_prefixed(
    prefixes: Sequence[bytes], formats: Sequence[PixelFormat], pixels_hu: np.ndarray,
    out_dir: Path, *, filenames: Sequence[str] | None = None, threads: int = 2,
) -> list[Path]:
    """Write one file per slice of ``pixels_hu`` (HU ``[k, row, column]``) from headers
    encoded beforehand (:func:`encode_prefix`), atomically as :func:`write_datasets`
    (temporary sibling folder, renamed; nothing left behind on failure).

    File ``k`` is ``prefixes[k]`` followed by ``formats[k].stored_bytes(pixels_hu[k])``;
    names as in :func:`write_datasets`. ``threads`` convert and write slices side by
    side (numpy and file writes release the GIL). Returns the final file paths.
    """
    out_dir = Path(out_dir)
    n = len(prefixes)
    if len(formats) != n or len(pixels_hu) != n:
        raise DicomWriteError(f"got {len(pixels_hu)} pixel slices and {len(formats)} formats "
                              f"for {n} headers")
    names = [f"IM{i + 1:05d}.dcm" for i in range(n)] if filenames is None else \
        _validate_filenames(filenames, n)
    def write_part(folder: Path, ks: range) -> None:
        for k in ks:
            pixel_bytes = formats[k].stored_bytes(pixels_hu[k])
            with open(folder / names[k], "wb") as f:
                f.write(prefixes[k])
                f.write(pixel_bytes)

    threads = max(1, min(int(threads), n // 16 or 1))
    bounds = np.linspace(0, n, threads + 1).round().astype(int)
    with atomic_dir(out_dir) as tmp_dir, ThreadPoolExecutor(max_workers=threads) as pool:
        jobs = [pool.submit(write_part, tmp_dir, range(a, b)) for a, b in zip(bounds, bounds[1:])]
        for job in jobs:
            job.result()
    return [out_dir / name for name in names]


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
    datasets: Sequence[Dataset], out_dir: Path, *, filenames: Sequence[str] | None = None,
    pixels_hu: np.ndarray | None = None, processes: int = 1,
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
    set). Image datasets without pixel data (e.g. :attr:`LoadedSeries.datasets`
    before :func:`set_pixel_hu`) are rejected with :class:`DicomWriteError`
    before anything is written, unless ``pixels_hu`` (HU ``[k, row, column]``, one
    slice per dataset) is given: then each dataset gets :func:`set_pixel_hu` of its
    slice just before it is written. ``processes`` > 1 writes the files in that many
    forked processes (POSIX; the datasets are not copied, the children write
    disjoint parts of the temporary folder); a failing child fails the whole write.
    Returns the final file paths, in the order of ``datasets``.
    """
    out_dir = Path(out_dir)
    n = len(datasets)
    if pixels_hu is not None and len(pixels_hu) != n:
        raise DicomWriteError(f"got {len(pixels_hu)} pixel slices for {n} datasets")
    for k, ds in enumerate(datasets):
        if pixels_hu is not None:
            continue
        if "Rows" in ds and not any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009)):
            raise DicomWriteError(
                f"dataset {k} is an image without pixel data (headers from load_series need "
                "set_pixel_hu before writing)"
            )
    if filenames is None:
        names = [f"IM{i + 1:05d}.dcm" for i in range(n)]
    else:
        names = _validate_filenames(filenames, n)
    with atomic_dir(out_dir) as tmp_dir:
        _write_files(datasets, names, tmp_dir, pixels_hu, processes)
    return [out_dir / name for name in names]


def _write_part(datasets: Sequence[Dataset], names: Sequence[str], folder: Path,
                pixels_hu: np.ndarray | None, ks: range) -> None:
    for k in ks:
        ds = datasets[k]
        if pixels_hu is not None:
            set_pixel_hu(ds, pixels_hu[k])
        _ensure_file_meta(ds)
        pydicom.dcmwrite(folder / names[k], ds, enforce_file_format=True)


def _write_files(datasets: Sequence[Dataset], names: Sequence[str], folder: Path,
                 pixels_hu: np.ndarray | None, processes: int) -> None:
    """Write the files, the last ``processes - 1`` parts in forked children (which see
    the parent's datasets without copies). A child's failure is raised here as a
    :class:`DicomWriteError` with our own message only (others may quote header values)."""
    n = len(datasets)
    processes = max(1, min(int(processes), n // 16 or 1))
    bounds = np.linspace(0, n, processes + 1).round().astype(int)
    children = []
    try:
        for a, b in zip(bounds[1:-1], bounds[2:]):
            child = ForkedCall.start(_write_part, datasets, names, folder, pixels_hu, range(a, b),
                                     safe_errors=(DicomWriteError,))
            if child is None:  # cannot fork here: this process writes everything
                bounds = np.array([0, n])
                break
            children.append(child)
        _write_part(datasets, names, folder, pixels_hu, range(bounds[0], bounds[1]))
        for child in children:
            try:
                child.result()
            except ForkedCallError as exc:
                raise DicomWriteError(str(exc)) from None
    finally:
        for child in children:
            child.cancel()


# =========================================================================== reading

_MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # DICOMDIR's SOP Class
#: FileProblem reasons for files that hold no image (so no image data is lost).
_NO_IMAGE_REASONS = frozenset(
    {
        "not a DICOM file",
        "empty file (0 bytes)",
        "no pixel data",
        "DICOMDIR (media directory, not an image)",
        "broken symbolic link",
        "not a regular file",
    }
)
_LONG_LENGTH_VRS = frozenset(
    (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV")
)  # explicit-VR elements with a 4-byte length after 2 reserved bytes
_PIXEL_DATA_TAG = 0x7FE00010
_FLOAT_PIXEL_TAGS = (0x7FE00008, 0x7FE00009)
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF

# Tolerances used by load_series' validation.
_ORIENTATION_TOLERANCE = 1e-3  # absolute, per direction-cosine component
_SPACING_RTOL = 1e-3  # relative, PixelSpacing
_DUPLICATE_MM = 0.01  # slices closer than this along the normal are duplicates
_GAP_FACTOR = 1.5  # a step > 1.5 × median step means missing slices
_OFF_LINE_MM = 0.5  # slice positions further than this from the stack line: mixed stacks


class SeriesError(ValueError):
    """A series cannot be loaded as a CT volume.

    Messages name the series by its scan index and number of files only; they
    never contain paths or header values that may identify a patient.
    """


@dataclass(frozen=True)
class FileProblem:
    """A file below the scanned root that is not part of any loadable series.

    ``path`` is relative to the scanned root; ``reason`` is a short,
    non-identifying explanation such as ``"not a DICOM file"``.
    ``lost_data`` is True when the file is (or looks like) a DICOM image whose
    pixels will therefore be missing from the output (truncated, corrupt,
    unreadable, no SeriesInstanceUID, unsupported pixel format), and False for
    files that hold no image: non-DICOM files, empty files, DICOMDIR, DICOM
    objects without pixel data.
    """

    path: Path
    reason: str
    lost_data: bool = False


@dataclass(frozen=True)
class SeriesRef:
    """The files of one DICOM series found by :func:`scan_folder` (headers only).

    ``files`` are the paths (below ``root``) sorted by name; slice order is
    established by :func:`load_series`. ``index`` is the 1-based position of
    the series in its :class:`ScanResult` (0 if constructed by hand) and is
    what error messages use to name the series.
    """

    root: Path = field(repr=False)  # paths may contain patient names: keep out of repr
    files: tuple[Path, ...] = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str
    index: int = 0
    series_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    sop_class_uid: str = ""

    @property
    def n_files(self) -> int:
        """Number of files in the series."""
        return len(self.files)

    @property
    def description(self) -> str:
        """A non-identifying summary, e.g. ``"series 2: CT, 300 files, 512×512, #3"``.

        Built only from modality, file count, matrix size and SeriesNumber —
        never from free-text fields that may contain names.
        """
        parts = [self.modality or "unknown modality", f"{self.n_files} files"]
        if self.rows and self.columns:
            parts.append(f"{self.rows}×{self.columns}")
        if self.series_number is not None:
            parts.append(f"#{self.series_number}")
        prefix = f"series {self.index}" if self.index else "series"
        return f"{prefix}: " + ", ".join(parts)


@dataclass
class ScanResult:
    """Everything found below a root folder: series and problem files.

    Every regular file below the root appears exactly once, either in one
    ``series[i].files`` or in ``problems``.
    """

    root: Path = field(repr=False)
    series: list[SeriesRef]
    problems: list[FileProblem]


@dataclass
class LoadedSeries:
    """A CT series loaded by :func:`load_series`.

    * ``volume`` — HU volume ``[k, j, i]`` with LPS geometry. ``hu`` is int16
      when every slice has an integral RescaleSlope and RescaleIntercept and
      the HU range fits int16 (the usual case for CT), otherwise float32.
    * ``datasets`` — one header per slice, in slice order (k = 0 first), with
      the PixelData element removed to save memory; use :func:`set_pixel_hu`
      to put (modified) pixels back before writing. For multi-frame (Enhanced
      CT) files the same header object appears once per frame it holds.
    * ``files`` — the file of each slice, in slice order (repeated for
      multi-frame files).
    * ``frame_numbers`` — 1-based frame number of each slice in its file
      (all 1 for single-frame files).
    * ``gantry_tilt_deg`` — angle between the slice stack direction and the
      slice-plane normal; 0 for an ordinary stack. For tilted (sheared) stacks
      ``volume.normal`` is the exact slice-to-slice step divided by
      ``spacing_mm[0]`` (the spacing measured along the true plane normal),
      so it has length ``1 / cos(tilt)``: ``affine()``,
      ``slice_position_lps_mm`` and ``voxel_volume_ml`` stay exact. When the
      slice spacing changes inside the series, ``volume.slice_positions_lps_mm``
      holds every slice's position (see :class:`pipeline.volume.Volume`).
    """

    volume: Volume = field(repr=False)
    datasets: list[Dataset] = field(repr=False)  # headers hold patient data: keep out of repr
    files: list[Path] = field(repr=False)
    frame_numbers: list[int] = field(repr=False)
    gantry_tilt_deg: float = 0.0


class _NamelessFile:
    """File wrapper without ``.name``, so pydicom warnings cannot contain the path."""

    def __init__(self, fileobj: Any) -> None:
        self._f = fileobj
        self.read = fileobj.read
        self.seek = fileobj.seek
        self.tell = fileobj.tell


_QUIET = threading.local()


class _QuietPydicomLog(logging.Filter):
    """Drop pydicom log records emitted while this thread is inside :func:`_quiet_pydicom`.

    pydicom's reading warnings quote header values (e.g. "Invalid value for VR
    PN: '...'") and file names, which may identify a patient.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "depth", 0)


if not any(isinstance(f, _QuietPydicomLog) for f in logging.getLogger("pydicom").filters):
    logging.getLogger("pydicom").addFilter(_QuietPydicomLog())


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Capture pydicom warnings and silence its log in this thread; yields the warnings."""
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        _QUIET.depth -= 1


def _read_quietly(fileobj: Any, **kwargs: Any) -> tuple[Dataset, list[str]]:
    """``dcmread`` without a file name, with warnings captured (they may quote values)."""
    with _quiet_pydicom() as caught:
        ds = pydicom.dcmread(_NamelessFile(fileobj), **kwargs)
    return ds, [str(w.message) for w in caught]


def _looks_like_dicom_without_preamble(head: bytes) -> bool:
    """True if a file without the 128-byte preamble + "DICM" starts like a dataset."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x0100


def _element_header(
    fileobj: Any, implicit_vr: bool, little_endian: bool
) -> tuple[int, int, int] | None:
    """Read a data element header at the current position: (tag, length, header bytes)."""
    order = "little" if little_endian else "big"
    raw = fileobj.read(8)
    if len(raw) < 8:
        return None
    tag = (int.from_bytes(raw[0:2], order) << 16) | int.from_bytes(raw[2:4], order)
    if implicit_vr or tag >> 16 == 0xFFFE:
        return tag, int.from_bytes(raw[4:8], order), 8
    vr = raw[4:6]
    if vr in _LONG_LENGTH_VRS:
        extra = fileobj.read(4)
        if len(extra) < 4:
            return None
        return tag, int.from_bytes(extra, order), 12
    return tag, int.from_bytes(raw[6:8], order), 8


def _pixel_data_problem(ds: Dataset, fileobj: Any, size: int) -> str | None:
    """Check the PixelData element at the current position against the file size.

    Returns a problem reason or ``None`` if the element is complete. The file
    position must be at the start of the pixel data element (where
    ``dcmread(stop_before_pixels=True)`` leaves it).
    """
    implicit_vr, little_endian = getattr(ds, "original_encoding", (False, True))
    if implicit_vr is None:
        implicit_vr, little_endian = False, True
    header = _element_header(fileobj, bool(implicit_vr), bool(little_endian))
    if header is None:
        return "truncated DICOM file"
    tag, length, _ = header
    if tag in _FLOAT_PIXEL_TAGS:
        return "float pixel data is not supported"
    if tag != _PIXEL_DATA_TAG:
        return "no pixel data"
    value_start = fileobj.tell()
    if length != _UNDEFINED_LENGTH:
        if value_start + length > size:
            return "truncated DICOM file"
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected_bits = (
                int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.BitsAllocated) * frames
            )
        except (AttributeError, TypeError, ValueError):
            return "image attributes (Rows, Columns, BitsAllocated) missing or invalid"
        if length * 8 < expected_bits:
            return "pixel data shorter than Rows×Columns×BitsAllocated require"
        return None
    # Encapsulated (compressed): walk the items to the sequence delimiter.
    while True:
        item = _element_header(fileobj, True, little_endian)
        if item is None:
            return "truncated DICOM file"
        item_tag, item_length, _ = item
        if item_tag == _SEQUENCE_DELIMITER_TAG:
            return None
        if item_tag != _ITEM_TAG or item_length == _UNDEFINED_LENGTH:
            return "corrupt encapsulated pixel data"
        end = fileobj.tell() + item_length
        if end > size:
            return "truncated DICOM file"
        fileobj.seek(end)


def _header_truncated(ds: Dataset, has_preamble: bool, size: int) -> bool:
    """True if a header read to the end of the file stops inside the file meta or an element.

    pydicom silently stops at a partial element; we compare the end of the last
    element it read with the file size.
    """
    meta = ds.file_meta
    if has_preamble and "FileMetaInformationGroupLength" in meta:
        try:
            meta_end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        except (TypeError, ValueError):
            return True  # the file ends inside the group length element
        if meta_end >= size:
            return True  # the file ends inside (or right after) the file meta
    elements = [e for e in ds._dict.values() if getattr(e, "value_tell", None) is not None]
    if not elements:
        return not ds._dict
    for elem in elements:  # any raw value shorter than its declared length
        if (
            isinstance(elem.value, bytes)
            and elem.length != _UNDEFINED_LENGTH
            and len(elem.value) < elem.length
        ):
            return True
    last = max(elements, key=lambda e: e.value_tell)
    if last.length == _UNDEFINED_LENGTH:
        return False  # sequences: truncation raises EOFError inside pydicom
    return last.value_tell + last.length != size


def _scan_file(path: Path) -> tuple[Dataset | None, str | None]:
    """Read the header of one file. Returns (header, None) or (None, problem reason)."""
    with _quiet_pydicom():
        return _scan_file_unquiet(path)


def _scan_file_unquiet(path: Path) -> tuple[Dataset | None, str | None]:
    try:
        size = path.stat().st_size
    except OSError:
        return None, "cannot be read"
    if size == 0:
        return None, "empty file (0 bytes)"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
            if not has_preamble and not _looks_like_dicom_without_preamble(head):
                return None, "not a DICOM file"
            f.seek(0)
            try:
                ds, messages = _read_quietly(f, stop_before_pixels=True, force=not has_preamble)
            except (EOFError, struct.error, pydicom.errors.BytesLengthException):
                return None, "truncated DICOM file"
            except pydicom.errors.InvalidDicomError:
                return None, "not a DICOM file"
            except Exception as exc:  # noqa: BLE001 - any parser failure is a problem
                return None, f"unreadable DICOM header ({type(exc).__name__})"
            if any("end of file" in m.lower() or "eof" in m.lower() for m in messages):
                return None, "truncated DICOM file"
            if not has_preamble and "SOPClassUID" not in ds:
                return None, "not a DICOM file"
            sop_class = str(
                ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")
            )
            if sop_class == _MEDIA_DIRECTORY_STORAGE or "DirectoryRecordSequence" in ds:
                return None, "DICOMDIR (media directory, not an image)"
            tsu = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
            if tsu == pydicom.uid.DeflatedExplicitVRLittleEndian:
                # The stream position is inside inflated data: check with a full read.
                f.seek(0)
                full, _ = _read_quietly(f, force=not has_preamble)
                if "PixelData" not in full:
                    return None, "no pixel data"
            elif f.tell() >= size:  # no pixel data element before the end of the file
                if _header_truncated(ds, has_preamble, size):
                    return None, "truncated DICOM file"
                return None, "no pixel data"
            else:
                problem = _pixel_data_problem(ds, f, size)
                if problem is not None:
                    return None, problem
    except OSError:
        return None, "cannot be read"
    if not ds.get("SeriesInstanceUID"):
        return None, "no SeriesInstanceUID"
    return ds, None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def scan_folder(root: Path) -> ScanResult:
    """Find every DICOM image file below ``root`` (any depth, any names) and group by series.

    Only headers are read (``stop_before_pixels``), but the pixel data element
    is checked against the file size so truncated files are reported. Every
    regular file ends up either in a :class:`SeriesRef` or in
    :class:`ScanResult.problems` with a reason (``"not a DICOM file"``,
    ``"empty file (0 bytes)"``, ``"truncated DICOM file"``, ``"no pixel
    data"``, ``"DICOMDIR (media directory, not an image)"``, ...); problem
    paths are relative to ``root``. Symbolic links to directories are not
    followed. Series are ordered by the path of their first file.
    """
    with _quiet_pydicom():
        return _scan_folder(Path(root))


def _scan_folder(root: Path) -> ScanResult:
    if not root.is_dir():
        raise ValueError("scan root is not a directory")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    problems: list[FileProblem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            reason: str | None
            if path.is_symlink() and not path.exists():
                ds, reason = None, "broken symbolic link"
            elif not path.is_file():
                ds, reason = None, "not a regular file"
            else:
                ds, reason = _scan_file(path)
            if ds is None:
                reason = reason or "unreadable file"
                problems.append(
                    FileProblem(path.relative_to(root), reason, reason not in _NO_IMAGE_REASONS)
                )
            else:
                groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))

    ordered = sorted(groups.items(), key=lambda item: str(min(p for p, _ in item[1])))
    series: list[SeriesRef] = []
    for index, (uid, members) in enumerate(ordered, start=1):
        members.sort(key=lambda m: str(m[0]))
        first = members[0][1]
        series.append(
            SeriesRef(
                root=root,
                files=tuple(p for p, _ in members),
                series_uid=uid,
                modality=str(first.get("Modality", "") or ""),
                index=index,
                series_number=_int_or_none(first.get("SeriesNumber")),
                rows=_int_or_none(first.get("Rows")),
                columns=_int_or_none(first.get("Columns")),
                sop_class_uid=str(first.get("SOPClassUID", "") or ""),
            )
        )
    problems.sort(key=lambda p: str(p.path))
    return ScanResult(root=root, series=series, problems=problems)


@dataclass
class _Frame:
    """One 2D image of a series: where it came from and its geometry."""

    file_index: int
    frame_number: int  # 1-based
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: np.ndarray  # (row spacing, column spacing) mm
    slope: float
    intercept: float
    stored: np.ndarray | None  # stored pixel values [row, column]
    thickness: float | None = None  # SliceThickness (mm), when given and positive


def _series_label(ref: SeriesRef) -> str:
    if ref.index:
        return f"series {ref.index} ({ref.n_files} files)"
    return f"series of {ref.n_files} files"


def _functional_group_value(ds: Dataset, frame_index: int, sequence: str, keyword: str) -> Any:
    """Look ``sequence[0].keyword`` up in the per-frame, then the shared functional groups."""
    for groups, index in (
        (ds.get("PerFrameFunctionalGroupsSequence"), frame_index),
        (ds.get("SharedFunctionalGroupsSequence"), 0),
    ):
        if groups is None or len(groups) <= index:
            continue
        inner = groups[index].get(sequence)
        if inner and keyword in inner[0]:
            return inner[0][keyword].value
    return None


def _frame_attributes(ds: Dataset, frame_index: int, enhanced: bool) -> dict[str, Any]:
    if not enhanced:
        return {
            "position": ds.get("ImagePositionPatient"),
            "orientation": ds.get("ImageOrientationPatient"),
            "pixel_spacing": ds.get("PixelSpacing"),
            "slope": ds.get("RescaleSlope"),
            "intercept": ds.get("RescaleIntercept"),
            "thickness": ds.get("SliceThickness"),
        }
    fg = _functional_group_value
    return {
        "position": fg(ds, frame_index, "PlanePositionSequence", "ImagePositionPatient"),
        "orientation": fg(ds, frame_index, "PlaneOrientationSequence", "ImageOrientationPatient"),
        "pixel_spacing": fg(ds, frame_index, "PixelMeasuresSequence", "PixelSpacing"),
        "slope": fg(ds, frame_index, "PixelValueTransformationSequence", "RescaleSlope")
        or ds.get("RescaleSlope"),
        "intercept": fg(ds, frame_index, "PixelValueTransformationSequence", "RescaleIntercept")
        or ds.get("RescaleIntercept"),
        "thickness": fg(ds, frame_index, "PixelMeasuresSequence", "SliceThickness")
        or ds.get("SliceThickness"),
    }


def _as_floats(value: Any, n: int, what: str, label: str) -> np.ndarray:
    if value is None:
        raise SeriesError(f"{label}: a slice has no {what}")
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise SeriesError(f"{label}: a slice has an invalid {what}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{label}: a slice has an invalid {what}")
    return arr


def read_dataset(path: Path, label: str = "the series") -> Dataset:
    """Read one file fully (single read) as :func:`load_series` does, Pixel Data included;
    a legacy file without File Meta gets the TransferSyntaxUID its encoding implies.
    Raises :class:`SeriesError` (naming only ``label``) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            ds, _ = _read_quietly(f, force=True)
    except Exception as exc:  # noqa: BLE001
        raise SeriesError(f"{label}: a file could not be read ({type(exc).__name__})") from exc
    if "TransferSyntaxUID" not in ds.file_meta:  # legacy file without file meta
        implicit_vr, little_endian = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit_vr
            else ExplicitVRLittleEndian if little_endian is not False
            else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _read_file_frames(path: Path, file_index: int, label: str) -> tuple[Dataset, list[_Frame]]:
    """Read one file fully (single read), decode its pixels and return its frames."""
    ds = read_dataset(path, label)
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        shown = modality if modality.isalnum() and len(modality) <= 4 else "missing/invalid"
        raise SeriesError(f"{label}: modality is {shown}, only CT is supported")
    if "PixelData" not in ds:
        raise SeriesError(f"{label}: a file has no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(f"{label}: only greyscale (SamplesPerPixel = 1) images are supported")
    tsu = ds.file_meta.get("TransferSyntaxUID")
    tsu_name = tsu.name if tsu is not None and tsu.is_transfer_syntax else "unknown"
    if tsu is not None and not tsu.is_transfer_syntax:
        raise SeriesError(f"{label}: unsupported transfer syntax ({tsu_name})")
    try:
        pixels = _native_pixels(ds)
        if pixels is None:
            pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise SeriesError(
            f"{label}: pixel data could not be decoded (transfer syntax {tsu_name}; "
            f"{type(exc).__name__})"
        ) from exc
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and not enhanced:
        raise SeriesError(f"{label}: multi-frame file without functional groups is not supported")
    pixels = pixels.reshape((n_frames, *pixels.shape[-2:]))
    del ds.PixelData  # keep only headers in LoadedSeries.datasets
    frames = []
    for fi in range(n_frames):
        attrs = _frame_attributes(ds, fi, enhanced)
        slope = float(attrs["slope"]) if attrs["slope"] not in (None, "") else 1.0
        intercept = float(attrs["intercept"]) if attrs["intercept"] not in (None, "") else 0.0
        if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
            raise SeriesError(f"{label}: a slice has an invalid RescaleSlope/RescaleIntercept")
        frames.append(
            _Frame(
                file_index=file_index,
                frame_number=fi + 1,
                position=_as_floats(attrs["position"], 3, "ImagePositionPatient", label),
                orientation=_as_floats(attrs["orientation"], 6, "ImageOrientationPatient", label),
                pixel_spacing=_as_floats(attrs["pixel_spacing"], 2, "PixelSpacing", label),
                slope=slope,
                intercept=intercept,
                stored=pixels[fi],
                thickness=_thickness_or_none(attrs["thickness"]),
            )
        )
    return ds, frames


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian single-frame greyscale image,
    read straight from its bytes (what ``ds.pixel_array`` returns, without pydicom's
    per-call decoder set-up); None for anything else (the caller asks pydicom)."""
    tsu = ds.file_meta.get("TransferSyntaxUID")
    if tsu not in (ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or "PixelData" not in ds:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = rows * cols * bits // 8
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < n or rows <= 0 or cols <= 0:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    pixels = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    unused = bits - int(ds.get("BitsStored", bits) or bits)
    if unused > 0:  # as pydicom: ignore the unused high bits (sign-extend signed values)
        pixels = np.right_shift(np.left_shift(pixels, unused), unused)
    return pixels


def _thickness_or_none(value: Any) -> float | None:
    """SliceThickness in mm, or None when absent or not a positive number."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None
    return t if np.isfinite(t) and t > 0 else None


def _expected_steps(steps: np.ndarray, thickness: list[float | None]) -> np.ndarray:
    """Largest plausible distance (mm) between each pair of neighbouring slices.

    With SliceThickness on every slice: the half-sum of the two thicknesses
    (slabs that touch), or the smallest step between neighbours of the same
    thickness when larger (sparse protocols: thin slices far apart, regularly). A series may
    change its slice thickness (e.g. 4 mm through the skull base, 7 mm above);
    each segment is judged by its own thickness. Without thickness: the median
    step of the series.
    """
    if any(t is None for t in thickness):
        return np.full(steps.shape, float(np.median(steps)))
    th = np.asarray(thickness, dtype=float)
    same = np.isclose(th[:-1], th[1:], rtol=0.02)
    typical: dict[float, float] = {}
    for value in np.unique(np.round(th, 2)):
        in_group = same & np.isclose(th[:-1], value, rtol=0.02)
        # the smallest step between neighbours of that thickness: a gap cannot hide in it
        typical[float(value)] = float(np.min(steps[in_group])) if in_group.any() else value
    seg = np.array([typical[float(v)] for v in np.round(th, 2)])
    return np.maximum((th[:-1] + th[1:]) / 2.0, np.minimum(seg[:-1], seg[1:]))


def _format_positions(values: Sequence[float], limit: int = 5) -> str:
    shown = ", ".join(f"{v:.2f}" for v in values[:limit])
    if len(values) > limit:
        shown += f" and {len(values) - limit} more"
    return shown


def _validate_geometry(frames: list[_Frame], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Check consistency; return (sort order, positions along the plane normal in mm)."""
    if len(frames) < 2:
        raise SeriesError(f"{label}: a single slice is not a volume (need at least 2 slices)")
    shapes = {f.stored.shape for f in frames if f.stored is not None}
    if len(shapes) != 1:
        raise SeriesError(f"{label}: slices have different Rows×Columns ({len(shapes)} sizes)")
    orientations = np.array([f.orientation for f in frames])
    if np.max(np.abs(orientations - orientations[0])) > _ORIENTATION_TOLERANCE:
        raise SeriesError(f"{label}: slices have different ImageOrientationPatient")
    row, col = orientations[0, :3], orientations[0, 3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-2
        or abs(np.linalg.norm(col) - 1) > 1e-2
        or abs(np.dot(row, col)) > 1e-2
    ):
        raise SeriesError(f"{label}: ImageOrientationPatient is not two orthogonal unit vectors")
    spacings = np.array([f.pixel_spacing for f in frames])
    if np.any(spacings <= 0):
        raise SeriesError(f"{label}: PixelSpacing must be positive")
    if np.max(np.abs(spacings / spacings[0] - 1)) > _SPACING_RTOL:
        raise SeriesError(f"{label}: slices have different PixelSpacing")

    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = np.array([f.position for f in frames]) @ normal
    order = np.argsort(along, kind="stable")
    along_sorted = along[order]
    steps = np.diff(along_sorted)
    duplicates = np.flatnonzero(steps < _DUPLICATE_MM)
    if duplicates.size:
        where = sorted({float(along_sorted[i]) for i in duplicates})
        raise SeriesError(
            f"{label}: duplicate slice positions at {_format_positions(where)} mm "
            "along the slice normal"
        )
    expected = _expected_steps(steps, [frames[i].thickness for i in order])
    gaps = np.flatnonzero(steps > _GAP_FACTOR * expected)
    if gaps.size:
        where = [
            f"{along_sorted[i]:.2f}–{along_sorted[i + 1]:.2f}" for i in gaps[:5]
        ]
        more = f" and {gaps.size - 5} more" if gaps.size > 5 else ""
        raise SeriesError(
            f"{label}: missing slices: gaps between positions {', '.join(where)}{more} mm "
            f"along the slice normal (expected spacing {float(expected[gaps[0]]):.2f} mm, "
            f"from SliceThickness and the series' steps)"
        )
    return order, along_sorted


def load_series(ref: SeriesRef) -> LoadedSeries:
    """Read, validate and convert a series found by :func:`scan_folder` into HU.

    Each file is read once, fully. Slices are sorted by their position along
    the slice-plane normal ``cross(row_cosine, col_cosine)`` (ImagePositionPatient
    · normal), never by InstanceNumber or file name. HU = stored ×
    RescaleSlope + RescaleIntercept, per slice. ``volume.spacing_mm[0]`` is the
    mean distance between neighbouring slices measured along that normal
    (from positions, not SliceThickness); in-plane spacing from PixelSpacing.
    ``volume.origin_lps_mm`` is the position of slice 0 (most inferior for a
    standard axial stack). Enhanced / Legacy Converted Enhanced CT
    multi-frame files are supported through their functional groups.
    Compressed transfer syntaxes decode through pydicom's pixel handlers
    (RLE, JPEG Lossless, JPEG-LS, JPEG 2000 via pylibjpeg plugins).

    Raises :class:`SeriesError` (a ``ValueError``) for: non-CT modality,
    unreadable or undecodable files, missing geometry, inconsistent
    orientation / PixelSpacing / Rows×Columns, a single slice, duplicate
    positions, missing slices and slices off the stack's line (mixed stacks).
    A step counts as missing slices when it exceeds 1.5 × the expected step:
    half the sum of the two slices' SliceThickness, or the typical step of the
    segment of that thickness when larger (:func:`_expected_steps`); without
    SliceThickness, the median step. Series whose spacing changes (segments of
    4 mm and 7 mm slices, as routine head CT protocols have) load with their
    exact slice positions in ``volume.slice_positions_lps_mm``. Messages name
    the series only by index and file count.

    See :class:`LoadedSeries` for the result's fields and dtype rule.
    """
    with _quiet_pydicom():
        return _load_series(ref)


def _load_series(ref: SeriesRef) -> LoadedSeries:
    label = _series_label(ref)
    if ref.n_files == 0:
        raise SeriesError(f"{label}: no files")
    datasets: list[Dataset] = []
    frames: list[_Frame] = []
    for file_index, path in enumerate(ref.files):
        ds, file_frames = _read_file_frames(Path(path), file_index, label)
        datasets.append(ds)
        frames.extend(file_frames)
    order, along_sorted = _validate_geometry(frames, label)

    n = len(frames)
    positions = np.array([frames[i].position for i in order])
    mean_step = (positions[-1] - positions[0]) / (n - 1)
    # Every slice must lie on one line through the stack (a regular or a sheared,
    # gantry-tilted stack), whatever the distances between slices.
    off_line = positions - positions[0] - np.outer(
        (along_sorted - along_sorted[0]) / max(along_sorted[-1] - along_sorted[0], 1e-9),
        positions[-1] - positions[0])
    if np.max(np.linalg.norm(off_line, axis=1)) > _OFF_LINE_MM:
        raise SeriesError(
            f"{label}: slice positions do not lie on one line through the stack "
            "(several stacks mixed in one series?)"
        )
    orientation = frames[order[0]].orientation
    row_cosine = orientation[:3] / np.linalg.norm(orientation[:3])
    col_cosine = orientation[3:] / np.linalg.norm(orientation[3:])
    plane_normal = np.cross(row_cosine, col_cosine)
    plane_normal /= np.linalg.norm(plane_normal)
    dk = float(along_sorted[-1] - along_sorted[0]) / (n - 1)
    cos_tilt = float(np.clip(np.dot(mean_step, plane_normal) / np.linalg.norm(mean_step), -1, 1))
    tilt_deg = float(np.degrees(np.arccos(cos_tilt)))
    normal = plane_normal if tilt_deg < 0.01 else mean_step / dk
    if tilt_deg < 0.01:
        tilt_deg = 0.0
    dj, di = (float(v) for v in frames[order[0]].pixel_spacing)

    # HU dtype: int16 when exact and in range, else float32.
    slopes = np.array([f.slope for f in frames])
    intercepts = np.array([f.intercept for f in frames])
    integral = bool(
        np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    )
    if integral:
        lo = hi = 0.0
        for f in frames:
            smin, smax = float(f.stored.min()), float(f.stored.max())
            ends = (smin * f.slope + f.intercept, smax * f.slope + f.intercept)
            lo, hi = min(lo, *ends), max(hi, *ends)
        integral = lo >= -32768 and hi <= 32767
    rows, cols = frames[0].stored.shape
    hu = np.empty((n, rows, cols), dtype=np.int16 if integral else np.float32)
    for k, i in enumerate(order):
        f = frames[i]
        if integral:
            if f.slope == 1 and f.intercept == 0:
                hu[k] = f.stored
            else:
                hu[k] = f.stored.astype(np.int32) * int(f.slope) + int(f.intercept)
        else:
            hu[k] = f.stored.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
        f.stored = None  # free decoded pixels as we go

    volume = Volume(
        hu=hu,
        spacing_mm=(dk, dj, di),
        origin_lps_mm=positions[0],
        row_cosine=row_cosine,
        col_cosine=col_cosine,
        normal=normal,
        slice_positions_lps_mm=positions,  # kept only when the spacing is irregular
    )
    sorted_frames = [frames[i] for i in order]
    return LoadedSeries(
        volume=volume,
        datasets=[datasets[f.file_index] for f in sorted_frames],
        files=[Path(ref.files[f.file_index]) for f in sorted_frames],
        frame_numbers=[f.frame_number for f in sorted_frames],
        gantry_tilt_deg=tilt_deg,
    )
