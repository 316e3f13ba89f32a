"""Tests for pipeline.dicom_io: building, atomic writing, scanning, loading, validating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from pipeline import dicom_io
from pipeline.dicom_io import (
    DicomWriteError,
    set_pixel_hu,
    volume_to_datasets,
    write_datasets,
)
from pipeline.volume import Volume
from tests.dicom_factory import synthetic_volume


def sitk_read_series(folder: Path) -> tuple[np.ndarray, sitk.Image]:
    """Independent reader: GDCM via SimpleITK. Array is [z, y, x], origin LPS."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), image


def assert_matches_sitk(volume: Volume, image: sitk.Image, array: np.ndarray) -> None:
    assert array.shape == volume.shape
    dk, dj, di = volume.spacing_mm
    np.testing.assert_allclose(image.GetSpacing(), (di, dj, dk), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_lps_mm, atol=1e-4)
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns = x, y, z axes
    np.testing.assert_allclose(direction[:, 0], volume.row_cosine, atol=1e-5)
    np.testing.assert_allclose(direction[:, 1], volume.col_cosine, atol=1e-5)
    np.testing.assert_allclose(direction[:, 2], volume.normal, atol=1e-5)
    np.testing.assert_array_equal(array, volume.hu)


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("tilt_deg", [0.0, 17.0])
def test_written_series_is_read_identically_by_simpleitk(tmp_path: Path, tilt_deg: float) -> None:
    volume = synthetic_volume(tilt_deg=tilt_deg)
    paths = write_datasets(volume_to_datasets(volume), tmp_path / "series")
    assert [p.name for p in paths] == [f"IM{i:05d}.dcm" for i in range(1, 21)]
    array, image = sitk_read_series(tmp_path / "series")
    assert_matches_sitk(volume, image, array)


def test_volume_to_datasets_headers(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(4, 8, 10))
    meta = {"StudyInstanceUID": "1.2.3.4", "SeriesDescription": "defaced", "SeriesNumber": 7}
    datasets = volume_to_datasets(volume, series_meta=meta)
    assert len(datasets) == 4
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == 4
    for k, ds in enumerate(datasets):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == "1.2.3.4"
        assert ds.SeriesDescription == "defaced" and ds.SeriesNumber == 7
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (8, 10)
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], volume.slice_position_lps_mm(k), atol=1e-6
        )
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    # default UIDs are fresh for every call
    again = volume_to_datasets(volume)
    assert again[0].SeriesInstanceUID != volume_to_datasets(volume)[0].SeriesInstanceUID


def test_volume_to_datasets_rejects_bad_meta() -> None:
    volume = synthetic_volume(shape=(2, 4, 4))
    with pytest.raises(DicomWriteError, match="not a DICOM keyword"):
        volume_to_datasets(volume, series_meta={"NotAKeyword": 1})
    with pytest.raises(DicomWriteError, match="per slice"):
        volume_to_datasets(volume, series_meta={"SOPInstanceUID": "1.2"})


def test_float_hu_is_rounded_and_wide_range_uses_intercept() -> None:
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1024, 40000, size=(2, 5, 6))  # does not fit int16 with intercept 0
    datasets = volume_to_datasets(Volume(hu=hu, spacing_mm=(1, 1, 1)))
    for k, ds in enumerate(datasets):
        restored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(restored, np.rint(hu[k]))
    with pytest.raises(DicomWriteError, match="65536"):
        volume_to_datasets(Volume(hu=np.array([[[-40000.0, 40000.0]]]), spacing_mm=(1, 1, 1)))


# --------------------------------------------------------------------------- set_pixel_hu


def _saved_and_reread(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_set_pixel_hu_on_compressed_dataset_decompresses(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(2, 16, 16))
    ds = volume_to_datasets(volume)[0]
    ds.compress(RLELossless, generate_instance_uid=False)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    uid = ds.SOPInstanceUID
    new_hu = volume.hu[1].astype(np.float64) + 0.3  # rounds back to volume.hu[1]
    set_pixel_hu(ds, new_hu)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == uid
    back = _saved_and_reread(ds, tmp_path / "a.dcm")
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(back.pixel_array, volume.hu[1])


def test_set_pixel_hu_uses_slope_intercept_and_clips(tmp_path: Path) -> None:
    ds = volume_to_datasets(synthetic_volume(shape=(1, 4, 4)))[0]
    # Typical scanner encoding: unsigned 12-bit, intercept -1024, slope 0.5
    ds.PixelRepresentation = 0
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "0.5"
    hu = np.array([[-5000.0, -1024.0, -1023.4, 0.0]] * 3 + [[1000.0, 1023.0, 1023.5, 5000.0]])
    set_pixel_hu(ds, hu)
    back = _saved_and_reread(ds, tmp_path / "b.dcm")
    stored = back.pixel_array.astype(np.int64)
    expected = np.clip(np.rint((hu + 1024.0) / 0.5), 0, 4095)
    np.testing.assert_array_equal(stored, expected)
    with pytest.raises(DicomWriteError, match="shape"):
        set_pixel_hu(ds, np.zeros((3, 4)))


# --------------------------------------------------------------------------- atomic writes


def test_write_replaces_existing_folder_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_datasets(volume_to_datasets(synthetic_volume(shape=(3, 8, 8))), out)
    paths = write_datasets(volume_to_datasets(synthetic_volume(shape=(2, 8, 8))), out)
    assert sorted(p.name for p in out.iterdir()) == ["IM00001.dcm", "IM00002.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp/old folders left
    assert all(p.exists() for p in paths)


def test_write_failure_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = volume_to_datasets(synthetic_volume(shape=(5, 8, 8)))
    real_write = pydicom.dcmwrite
    calls = {"n": 0}

    def failing_write(*args, **kwargs):  # fail on the third file
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(dicom_io.pydicom, "dcmwrite", failing_write)
    with pytest.raises(OSError, match="simulated"):
        write_datasets(datasets, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_write_failure_keeps_previous_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    write_datasets(volume_to_datasets(synthetic_volume(shape=(3, 8, 8))), out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())

    def failing_write(*args, **kwargs):
        raise OSError("simulated")

    monkeypatch.setattr(dicom_io.pydicom, "dcmwrite", failing_write)
    with pytest.raises(OSError):
        write_datasets(volume_to_datasets(synthetic_volume(shape=(2, 8, 8))), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_write_rejects_bad_filenames(tmp_path: Path) -> None:
    datasets = volume_to_datasets(synthetic_volume(shape=(2, 4, 4)))
    with pytest.raises(DicomWriteError, match="unique"):
        write_datasets(datasets, tmp_path / "o", filenames=["a", "a"])
    with pytest.raises(DicomWriteError, match="plain"):
        write_datasets(datasets, tmp_path / "o", filenames=["a", "../b"])
    with pytest.raises(DicomWriteError, match="2 datasets"):
        write_datasets(datasets, tmp_path / "o", filenames=["a"])
    assert list(tmp_path.iterdir()) == []
