"""Small synthetic CT volumes and DICOM series for tests (no patient data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.volume import Volume

if TYPE_CHECKING:
    import pydicom


def rotation_matrix(axis: str, degrees: float) -> np.ndarray:
    """3×3 rotation about the LPS ``axis`` ("x", "y" or "z") by ``degrees``."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def synthetic_volume(
    shape: tuple[int, int, int] = (20, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.5, 0.7, 0.7),
    *,
    tilt_deg: float = 0.0,
    origin_lps_mm: tuple[float, float, float] = (-22.4, -30.1, 101.25),
    seed: int = 0,
) -> Volume:
    """A head-like phantom in HU: air outside, soft tissue ellipsoid, bone shell, noise.

    ``tilt_deg`` rotates the axial orientation about the patient x (L) axis,
    like a gantry tilt / oblique reconstruction, producing non-trivial
    ImageOrientationPatient.
    """
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    k, j, i = np.meshgrid(
        np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij"
    )
    r = np.sqrt((k / 1.1) ** 2 + (j / 0.85) ** 2 + (i / 0.75) ** 2)
    hu = np.full(shape, -1000.0)
    hu[r < 0.95] = 40.0
    hu[(r >= 0.8) & (r < 0.9)] = 1200.0
    hu += rng.normal(0.0, 15.0, size=shape)
    hu = np.rint(hu).astype(np.int16)
    rot = rotation_matrix("x", tilt_deg)
    return Volume(
        hu=hu,
        spacing_mm=spacing_mm,
        origin_lps_mm=np.array(origin_lps_mm),
        row_cosine=rot @ np.array([1.0, 0.0, 0.0]),
        col_cosine=rot @ np.array([0.0, 1.0, 0.0]),
    )


def jpeg_lossless_sv1(ds: pydicom.Dataset, tmp_dir: Path) -> None:
    """Re-encode ``ds``'s int16 pixels as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70), in place.

    pydicom and the pylibjpeg plugins cannot *encode* JPEG Lossless, so the
    codestream is produced by GDCM (through SimpleITK's GDCMImageIO with the
    "JPEG" compressor, which is Process 14 SV1) and transplanted into ``ds``.
    """
    import pydicom
    import SimpleITK as sitk

    arr = ds.pixel_array.astype(np.int16)[None]
    path = tmp_dir / f"jpegls-{ds.SOPInstanceUID[-12:]}.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(arr))
    encoded = pydicom.dcmread(path)
    path.unlink()
    if encoded.file_meta.TransferSyntaxUID != pydicom.uid.JPEGLosslessSV1:
        raise RuntimeError("GDCM did not produce JPEG Lossless SV1")
    if (encoded.BitsStored, encoded.PixelRepresentation) != (ds.BitsStored, ds.PixelRepresentation):
        raise RuntimeError("GDCM changed the pixel representation")
    ds["PixelData"] = encoded["PixelData"]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1


def enhanced_ct_dataset(volume: Volume, *, frame_order: Sequence[int] | None = None,
                        intercept: int = -1024) -> pydicom.Dataset:
    """One Enhanced CT Image Storage (multi-frame) dataset holding ``volume``.

    Geometry and rescale live in the functional groups: PixelMeasures,
    PlaneOrientation and PixelValueTransformation in the shared group,
    PlanePosition per frame. Frames are stored in ``frame_order`` (slice
    indices, default 0..n-1) so readers must sort by position.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    n = volume.shape[0]
    order = list(range(n)) if frame_order is None else list(frame_order)
    sop_class = "1.2.840.10008.5.1.4.1.1.2.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = "CT"
    ds.PatientName = "DOE^JANE"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    def item(**kwargs: object) -> Dataset:
        d = Dataset()
        for k, v in kwargs.items():
            setattr(d, k, v)
        return d

    dk, dj, di = volume.spacing_mm
    iop = [*volume.row_cosine.tolist(), *volume.col_cosine.tolist()]
    shared = item(
        PixelMeasuresSequence=Seq([item(PixelSpacing=[dj, di], SliceThickness=dk)]),
        PlaneOrientationSequence=Seq(
            [item(ImageOrientationPatient=iop)]
        ),
        PixelValueTransformationSequence=Seq(
            [item(RescaleIntercept=intercept, RescaleSlope=1, RescaleType="HU")]
        ),
    )
    ds.SharedFunctionalGroupsSequence = Seq([shared])
    ds.PerFrameFunctionalGroupsSequence = Seq(
        [
            item(
                PlanePositionSequence=Seq(
                    [item(ImagePositionPatient=[float(v) for v in volume.slice_position_lps_mm(k)])]
                ),
                FrameContentSequence=Seq([item(InStackPositionNumber=k + 1)]),
            )
            for k in order
        ]
    )
    stored = (volume.hu[order].astype(np.int32) - intercept).astype("<i2")
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def reorient_volume(vol: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """Same patient, other storage: array axes transposed by ``perm``, then flipped."""
    dirs = [vol.normal, vol.col_cosine, vol.row_cosine]  # array axes k, j, i
    sp = vol.spacing_mm
    hu = np.transpose(vol.hu, perm)
    new_dirs = [dirs[p] for p in perm]
    new_sp = [sp[p] for p in perm]
    origin = vol.origin_lps_mm.copy()
    for ax, f in enumerate(flips):
        if f:
            hu = np.flip(hu, axis=ax)
            origin = origin + (hu.shape[ax] - 1) * new_sp[ax] * new_dirs[ax]
            new_dirs[ax] = -new_dirs[ax]
    return Volume(hu=np.ascontiguousarray(hu), spacing_mm=tuple(new_sp), origin_lps_mm=origin,
                  row_cosine=new_dirs[2], col_cosine=new_dirs[1], normal=new_dirs[0])
