"""Tests for pipeline.dicom_io: building, atomic writing, scanning, loading, validating."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipeline import dicom_io
from pipeline.dicom_io import (
    DicomWriteError,
    FileProblem,
    SeriesError,
    SeriesRef,
    load_series,
    scan_folder,
    set_pixel_hu,
    volume_to_datasets,
    write_datasets,
)
from pipeline.volume import Volume
from tests.dicom_factory import enhanced_ct_dataset, jpeg_lossless_sv1, synthetic_volume

#: Real CT beside the checkout (see ../shared/realct/README.md); CI has it.
REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"

PATIENT_NAME = "DOE^JOHN"
PATIENT_FOLDER = "DOE_JOHN_1970"  # folder names often carry patient names


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


@pytest.mark.parametrize(
    ("signed", "bits_stored", "intercept"),
    [(1, 16, "0"), (0, 12, "-1024"), (0, 16, "-1024"), (1, 12, "-1024"), (1, 16, "-32000")],
)
def test_set_pixel_hu_integer_path_matches_rounding(tmp_path: Path, signed: int,
                                                    bits_stored: int, intercept: str) -> None:
    """Integer HU (int16, slope 1) take an exact integer path: the same stored values as
    rounding the float formula, clipped to BitsStored."""
    ds = volume_to_datasets(synthetic_volume(shape=(1, 8, 8)))[0]
    ds.PixelRepresentation = signed
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = "1"
    hu = np.random.default_rng(3).integers(-32768, 32767, size=(8, 8)).astype(np.int16)
    hu[0, :4] = [-32768, 32767, -1024, 0]
    set_pixel_hu(ds, hu)
    back = _saved_and_reread(ds, tmp_path / "c.dcm")
    lo, hi = ((-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed
              else (0, 2 ** bits_stored - 1))
    expected = np.clip(np.rint(hu.astype(np.float64) - float(intercept)), lo, hi)
    np.testing.assert_array_equal(back.pixel_array.astype(np.int64), expected)


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


def test_write_in_two_processes_gives_the_same_files(tmp_path: Path) -> None:
    """pixels_hu + processes=2: a forked child writes part of the files; byte for byte
    what one process writes, read back by SimpleITK."""
    volume = synthetic_volume(shape=(40, 16, 16))
    new_hu = volume.hu.copy()
    new_hu[20:, 4:8, 4:8] = -1000
    one = tmp_path / "one"
    two = tmp_path / "two"
    datasets = volume_to_datasets(volume)
    copies = [copy.deepcopy(ds) for ds in datasets]
    write_datasets(datasets, one, pixels_hu=new_hu, processes=1)
    write_datasets(copies, two, pixels_hu=new_hu, processes=2)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 40
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(two / n) for n in names])
    back = sitk.GetArrayFromImage(reader.Execute())
    np.testing.assert_array_equal(back, new_hu)


def test_write_failure_in_the_forked_writer_leaves_nothing(tmp_path: Path) -> None:
    """A slice that cannot be written in the child's part: the parent raises the child's
    clear message, and neither the temporary nor the output folder is left."""
    volume = synthetic_volume(shape=(40, 8, 8))
    datasets = volume_to_datasets(volume)
    datasets[35].Rows = 9  # shape mismatch, found in the forked writer's half
    with pytest.raises(DicomWriteError, match="does not match the dataset's Rows"):
        write_datasets(datasets, tmp_path / "out", pixels_hu=volume.hu, processes=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DicomWriteError, match="3 pixel slices for 40 datasets"):
        write_datasets(datasets, tmp_path / "out", pixels_hu=volume.hu[:3])


def test_write_rejects_bad_filenames(tmp_path: Path) -> None:
    datasets = volume_to_datasets(synthetic_volume(shape=(2, 4, 4)))
    with pytest.raises(DicomWriteError, match="unique"):
        write_datasets(datasets, tmp_path / "o", filenames=["a", "a"])
    with pytest.raises(DicomWriteError, match="plain"):
        write_datasets(datasets, tmp_path / "o", filenames=["a", "../b"])
    with pytest.raises(DicomWriteError, match="2 datasets"):
        write_datasets(datasets, tmp_path / "o", filenames=["a"])
    del datasets[1].PixelData
    with pytest.raises(DicomWriteError, match="dataset 1 .* without pixel data"):
        write_datasets(datasets, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- scanning and loading


def write_scattered(
    datasets: list[pydicom.Dataset], root: Path, rng: np.random.Generator
) -> list[Path]:
    """Write datasets under ``root`` with shuffled names in nested folders, any extension.

    File name order, folder and InstanceNumber are all unrelated to slice order.
    """
    n = len(datasets)
    styles = [
        lambda i: f"IM{i:04d}",
        lambda i: f"1.2.3.{i}",
        lambda i: f"slice_{i}.dcm",
    ]
    perm = rng.permutation(n)
    paths = []
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = int(rng.integers(1, 1000))
        ds.PatientName = PATIENT_NAME
        sub = root / PATIENT_FOLDER / ("a" if perm[k] % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / styles[k % 3](int(perm[k]))
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.parametrize("tilt_deg", [0.0, 23.0])
def test_scattered_series_loads_like_simpleitk(tmp_path: Path, tilt_deg: float) -> None:
    rng = np.random.default_rng(5)
    volume = synthetic_volume(tilt_deg=tilt_deg)
    write_scattered(volume_to_datasets(volume), tmp_path, rng)

    scan = scan_folder(tmp_path)
    assert scan.problems == []
    assert len(scan.series) == 1
    ref = scan.series[0]
    assert ref.n_files == 20 and ref.modality == "CT" and (ref.rows, ref.columns) == (64, 64)
    assert PATIENT_NAME not in ref.description and PATIENT_FOLDER not in repr(ref)
    loaded = load_series(ref)

    # independent reader: GDCM via SimpleITK
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(tmp_path), "", False, True)
    reader.SetFileNames(files)
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image)
    assert_matches_sitk(loaded.volume, image, array)
    # ... and ground truth
    assert loaded.volume.hu.dtype == np.int16
    np.testing.assert_array_equal(loaded.volume.hu, volume.hu)
    np.testing.assert_allclose(loaded.volume.affine(), volume.affine(), atol=1e-5)
    assert loaded.gantry_tilt_deg == 0.0
    # headers in slice order, pixel data dropped
    assert len(loaded.datasets) == len(loaded.files) == 20
    for k, ds in enumerate(loaded.datasets):
        assert "PixelData" not in ds
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], volume.slice_position_lps_mm(k), atol=1e-4
        )


def test_scan_reports_every_non_image_file(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(4, 16, 16))
    datasets = volume_to_datasets(volume)
    paths = write_datasets(datasets, tmp_path / "series")
    # a valid second series of another modality
    mr = volume_to_datasets(synthetic_volume(shape=(3, 8, 8)), series_meta={"Modality": "MR"})
    write_datasets(mr, tmp_path / "mr")

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not dicom, but long enough to have a preamble" * 5)
    (junk / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 200)
    (junk / "empty.dcm").write_bytes(b"")
    data = paths[0].read_bytes()
    (junk / "truncated.dcm").write_bytes(data[: len(data) - 100])
    (junk / "truncated_header").write_bytes(data[:300])
    no_pixels = pydicom.dcmread(paths[1])
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.save_as(junk / "no_pixels", enforce_file_format=True)
    rle = pydicom.dcmread(paths[2])
    rle.compress(RLELossless)
    rle.SeriesInstanceUID = generate_uid()
    rle_bytes = rle.save_as(junk / "rle_ok.dcm", enforce_file_format=True) or (
        junk / "rle_ok.dcm"
    ).read_bytes()
    (junk / "rle_truncated.dcm").write_bytes(rle_bytes[:-40])
    # a DICOMDIR written by pydicom's FileSet (with its own copy of one image)
    from pydicom.fileset import FileSet

    fs = FileSet()
    member = pydicom.dcmread(paths[3])
    member.PatientID = "P1"
    member.StudyID = "S1"
    fs.add(member)
    fs.write(tmp_path / "media")
    fs._stage["t"].cleanup()  # pydicom leaves its staging TemporaryDirectory to the GC

    scan = scan_folder(tmp_path)
    reasons = {str(p.path): p.reason for p in scan.problems}
    lost = {str(p.path) for p in scan.problems if p.lost_data}
    assert lost == {"junk/truncated.dcm", "junk/truncated_header", "junk/rle_truncated.dcm"}
    assert reasons == {
        "junk/notes.txt": "not a DICOM file",
        "junk/.DS_Store": "not a DICOM file",
        "junk/empty.dcm": "empty file (0 bytes)",
        "junk/truncated.dcm": "truncated DICOM file",
        "junk/truncated_header": "truncated DICOM file",
        "junk/no_pixels": "no pixel data",
        "junk/rle_truncated.dcm": "truncated DICOM file",
        "media/DICOMDIR": "DICOMDIR (media directory, not an image)",
    }
    # nothing silently skipped: every file is in a series or a problem
    all_files = {p for p in tmp_path.rglob("*") if p.is_file()}
    in_series = {p for s in scan.series for p in s.files}
    assert in_series | {tmp_path / p.path for p in scan.problems} == all_files
    assert not in_series & {tmp_path / p.path for p in scan.problems}
    by_uid = {s.series_uid: s for s in scan.series}
    # the FileSet copy shares the CT series UID: 4 + 1 files
    assert by_uid[datasets[0].SeriesInstanceUID].n_files == 5
    assert by_uid[mr[0].SeriesInstanceUID].modality == "MR"
    assert by_uid[rle.SeriesInstanceUID].n_files == 1
    assert sorted(s.index for s in scan.series) == [1, 2, 3]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_every_truncation_is_reported(tmp_path: Path, syntax: str) -> None:
    ds = volume_to_datasets(synthetic_volume(shape=(1, 6, 6)))[0]
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    full = tmp_path / "full.dcm"
    ds.save_as(full, enforce_file_format=True)
    data = full.read_bytes()
    pixel_start = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag
    meta_end = 132 + 12 + int(pydicom.dcmread(full).file_meta.FileMetaInformationGroupLength)
    cut_file = tmp_path / "cut" / "f"
    cut_file.parent.mkdir()
    # every byte in the file meta and the pixel data element, every 4th in between
    cuts = sorted({*range(1, meta_end + 16), *range(meta_end + 16, pixel_start, 4),
                   *range(pixel_start - 16, len(data))})
    for cut in cuts:
        cut_file.write_bytes(data[:cut])
        scan = scan_folder(cut_file.parent)
        assert scan.series == [], cut
        (problem,) = scan.problems
        if cut < 132:
            assert problem.reason == "not a DICOM file", cut
        elif cut <= meta_end or cut > pixel_start:
            assert problem.reason == "truncated DICOM file", cut
        else:  # inside the dataset: truncated, or "no pixel data" at an element boundary
            assert problem.reason in ("truncated DICOM file", "no pixel data"), cut
    assert scan_folder(tmp_path).series[0].n_files == 1  # the complete file is fine


def test_scan_accepts_files_without_preamble(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(3, 8, 8))
    for k, ds in enumerate(volume_to_datasets(volume)):
        # legacy files: no 128-byte preamble, no "DICM", no file meta, implicit VR
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.save_as(tmp_path / f"raw{k}", implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw0").read_bytes()[128:132] != b"DICM"
    scan = scan_folder(tmp_path)
    assert scan.problems == []
    np.testing.assert_array_equal(load_series(scan.series[0]).volume.hu, volume.hu)


def _compress(ds: pydicom.Dataset, syntax: str, tmp_path: Path) -> None:
    if syntax == JPEGLosslessSV1:
        jpeg_lossless_sv1(ds, tmp_path)
    else:
        ds.compress(syntax, generate_instance_uid=False)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_round_trip(tmp_path: Path, syntax: str) -> None:
    volume = synthetic_volume(shape=(5, 32, 32), tilt_deg=10)
    datasets = volume_to_datasets(volume)
    for ds in datasets:
        _compress(ds, syntax, tmp_path)
    write_datasets(datasets, tmp_path / "in")
    assert pydicom.dcmread(tmp_path / "in" / "IM00001.dcm").file_meta.TransferSyntaxUID == syntax

    loaded = load_series(scan_folder(tmp_path / "in").series[0])
    np.testing.assert_array_equal(loaded.volume.hu, volume.hu)
    np.testing.assert_allclose(loaded.volume.affine(), volume.affine(), atol=1e-5)

    # the de-identification write path: modified pixels go back, uncompressed
    defaced = loaded.volume.hu.copy()
    defaced[:, :8, :] = -1000
    for k, ds in enumerate(loaded.datasets):
        set_pixel_hu(ds, defaced[k])
    write_datasets(loaded.datasets, tmp_path / "out")
    again = load_series(scan_folder(tmp_path / "out").series[0])
    np.testing.assert_array_equal(again.volume.hu, defaced)
    assert all(ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for ds in again.datasets)


def test_non_integral_slope_gives_float32(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(3, 8, 8))
    datasets = volume_to_datasets(volume)
    for ds in datasets:
        ds.RescaleSlope = "0.5"
        ds.RescaleIntercept = "-1024.25"
    write_datasets(datasets, tmp_path / "s")
    hu = load_series(scan_folder(tmp_path / "s").series[0]).volume.hu
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, volume.hu * 0.5 - 1024.25, rtol=0, atol=1e-3)


def test_enhanced_ct_multiframe(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(6, 16, 20), tilt_deg=30)
    order = [3, 0, 5, 1, 4, 2]
    ds = enhanced_ct_dataset(volume, frame_order=order)
    (tmp_path / "e").mkdir()
    ds.save_as(tmp_path / "e" / "enhanced", enforce_file_format=True)
    scan = scan_folder(tmp_path)
    assert scan.problems == [] and scan.series[0].n_files == 1
    loaded = load_series(scan.series[0])
    np.testing.assert_array_equal(loaded.volume.hu, volume.hu)
    np.testing.assert_allclose(loaded.volume.affine(), volume.affine(), atol=1e-6)
    assert loaded.frame_numbers == [order.index(k) + 1 for k in range(6)]


def test_gantry_tilt_sheared_stack(tmp_path: Path) -> None:
    # Axial slices, but each slice shifted posteriorly: a tilted gantry.
    volume = synthetic_volume(shape=(8, 16, 16), spacing_mm=(3.0, 0.5, 0.5))
    tilt = np.deg2rad(20.0)
    datasets = volume_to_datasets(volume)
    for k, ds in enumerate(datasets):
        x, y, z = volume.slice_position_lps_mm(k)
        ds.ImagePositionPatient = [x, y + k * 3.0 * np.tan(tilt), z]
    write_datasets(datasets, tmp_path / "t")
    loaded = load_series(scan_folder(tmp_path / "t").series[0])
    assert loaded.gantry_tilt_deg == pytest.approx(20.0, abs=1e-3)
    assert loaded.volume.spacing_mm[0] == pytest.approx(3.0)
    affine = loaded.volume.affine()
    for k, ds in enumerate(datasets):
        position = [float(v) for v in ds.ImagePositionPatient]
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*position, 1], atol=1e-4)
    assert loaded.volume.voxel_volume_ml == pytest.approx(abs(np.linalg.det(affine[:3, :3])) / 1000)


# --------------------------------------------------------------------------- validation errors


def _bad_series(tmp_path: Path, mutate) -> SeriesRef:
    """Write a 6-slice series, let ``mutate(datasets)`` break it, scan it."""
    volume = synthetic_volume(shape=(6, 16, 16), spacing_mm=(2.0, 0.8, 0.8))
    datasets = volume_to_datasets(volume, series_meta={"PatientName": PATIENT_NAME})
    datasets = mutate(datasets) or datasets
    root = tmp_path / PATIENT_FOLDER
    write_datasets(datasets, root)
    scan = scan_folder(root)
    assert scan.problems == []
    assert len(scan.series) == 1
    return scan.series[0]


def _set(keyword: str, value, index: int = 2):
    def mutate(datasets):
        setattr(datasets[index], keyword, value)
    return mutate


def _set_all(keyword: str, value):
    def mutate(datasets):
        for ds in datasets:
            setattr(ds, keyword, value)
    return mutate


def _duplicate(datasets):
    copy = pydicom.Dataset(datasets[3])
    copy.file_meta = pydicom.dataset.FileMetaDataset(datasets[3].file_meta)
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return [*datasets, copy]


def _other_size(datasets):
    other = volume_to_datasets(
        synthetic_volume(shape=(1, 12, 16)),
        series_meta={"SeriesInstanceUID": datasets[0].SeriesInstanceUID},
    )[0]
    other.ImagePositionPatient = [0, 0, 100]
    return [*datasets, other]


def _undecodable(datasets):
    ds = datasets[1]
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb this is not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _irregular(datasets):
    z = float(datasets[4].ImagePositionPatient[2])
    datasets[4].ImagePositionPatient = [*datasets[4].ImagePositionPatient[:2], z - 0.6]


def _off_line(datasets):
    x, y, z = (float(v) for v in datasets[4].ImagePositionPatient)
    datasets[4].ImagePositionPatient = [x + 3.0, y, z]  # a slice of another stack


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("Modality", "MR", 0), r"modality is MR, only CT"),
        (_set("ImageOrientationPatient", [1, 0, 0, 0, 0.9, 0.43589]), "different ImageOrientation"),
        (_set("PixelSpacing", [0.8, 0.9]), "different PixelSpacing"),
        (_other_size, r"different Rows×Columns"),
        (lambda d: [d[0], d[1], d[4], d[5]], r"missing slices: gaps between .*2\.00–8\.00"),
        (_duplicate, r"duplicate slice positions at .*6\.00 mm"),
        (lambda d: [d[0]], "single slice"),
        (_undecodable, r"could not be decoded \(transfer syntax JPEG Baseline"),
        (_off_line, "do not lie on one line"),
        (_set_all("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "not two orthogonal"),
    ],
    ids=["mr", "orientation", "spacing", "size", "gap", "duplicate", "single", "undecodable",
         "off-line", "degenerate-orientation"],
)
def test_bad_series_raise_clear_errors(tmp_path: Path, mutate, message: str) -> None:
    def shift_origin(datasets):
        for ds in datasets:  # positions 0, 2, 4, ... mm along z
            x, y, _ = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, 2.0 * (ds.InstanceNumber - 1)]
        return mutate(datasets)

    ref = _bad_series(tmp_path, shift_origin)
    with pytest.raises(SeriesError, match=message) as info:
        load_series(ref)
    text = str(info.value)
    assert text.startswith(f"series 1 ({ref.n_files} files): ")
    assert PATIENT_NAME not in text and "DOE" not in text and str(tmp_path) not in text
    assert isinstance(info.value, ValueError)


def test_file_that_disappears_after_scan(tmp_path: Path) -> None:
    ref = _bad_series(tmp_path, lambda d: None)
    ref.files[2].write_bytes(b"garbage" * 10)
    with pytest.raises(SeriesError, match="could not be read|no pixel data|modality") as info:
        load_series(ref)
    assert PATIENT_FOLDER not in str(info.value)


def test_problem_paths_are_relative(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y.txt").write_text("hi")
    assert scan_folder(tmp_path).problems == [FileProblem(Path("x/y.txt"), "not a DICOM file")]
    with pytest.raises(ValueError, match="not a directory"):
        scan_folder(tmp_path / "missing")


def test_reading_logs_and_warns_nothing_identifying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    datasets = volume_to_datasets(synthetic_volume(shape=(3, 8, 8)))
    with pytest.warns(UserWarning):  # pydicom complains while we build the bad headers
        for ds in datasets:
            ds.AccessionNumber = "DOE^JOHN_" * 3  # too long for SH: pydicom warns on read
            ds.PatientName = "DOE^JOHN^" + "X" * 70  # too long for PN
            ds.SeriesInstanceUID = "1.2.840.DOE.1"  # invalid UI, read by scan_folder itself
    write_datasets(datasets, tmp_path / PATIENT_FOLDER)
    caplog.set_level("DEBUG")
    caplog.clear()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = scan_folder(tmp_path)
        loaded = load_series(scan.series[0])
    assert loaded.volume.shape == (3, 8, 8)
    texts = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [t for t in texts if "DOE" in t or PATIENT_FOLDER in t]
    assert "DOE" not in repr(scan) + repr(loaded)


# --------------------------------------------------------------------------- variable slice spacing

def _stack(tmp_path: Path, z: list[float], thickness: list[float] | None, *, tilt_deg: float = 0.0,
           name: str = "var") -> SeriesRef:
    """A series with slices at table positions ``z`` (mm), SliceThickness per slice."""
    n = len(z)
    volume = synthetic_volume(shape=(n, 16, 16), spacing_mm=(2.0, 0.8, 0.8))
    datasets = volume_to_datasets(volume, series_meta={"PatientName": PATIENT_NAME})
    t = np.radians(tilt_deg)
    for ds, zk, k in zip(datasets, z, range(n)):
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(float(np.cos(t)), 7), round(float(-np.sin(t)), 7)]
        ds.ImagePositionPatient = [-6.0, -6.0, float(zk)]
        if thickness is None:
            del ds.SliceThickness
        else:
            ds.SliceThickness = thickness[k]
    root = tmp_path / name
    write_datasets(datasets, root)
    return scan_folder(root).series[0]


def test_variable_spacing_loads_with_exact_positions(tmp_path: Path) -> None:
    """4 mm slices then 7 mm slices (routine head CT), with a gantry tilt: loaded, not refused."""
    z = [0.0, 4.22, 8.44, 12.66, 13.8, 21.18, 28.56]  # 4 mm slab ends, 7 mm slabs overlap it
    th = [4.0, 4.0, 4.0, 4.0, 7.0, 7.0, 7.0]
    loaded = load_series(_stack(tmp_path, z, th, tilt_deg=18.5))
    vol = loaded.volume
    assert not vol.is_regular
    np.testing.assert_allclose(vol.positions_lps_mm()[:, 2], z, atol=1e-6)
    assert loaded.gantry_tilt_deg == pytest.approx(18.5, abs=0.01)
    cells = vol.slice_cells_mm()
    assert cells.sum() == pytest.approx((z[-1] - z[0]) * np.cos(np.radians(18.5))
                                        + cells[0] / 2 + cells[-1] / 2, rel=1e-6)
    with pytest.raises(ValueError, match="not regular"):
        vol.affine()
    uni = vol.as_uniform()
    assert uni.is_regular and uni.hu.shape[1:] == vol.hu.shape[1:]
    np.testing.assert_allclose(uni.slice_position_lps_mm(0), vol.slice_position_lps_mm(0))


def test_genuinely_missing_slice_in_a_variable_series_is_refused(tmp_path: Path) -> None:
    z = [0.0, 4.0, 8.0, 16.0, 20.0, 27.0, 34.0]  # one 4 mm slice missing at 12
    th = [4.0, 4.0, 4.0, 4.0, 4.0, 7.0, 7.0]
    with pytest.raises(SeriesError, match=r"missing slices: gaps between positions 8\.00–16\.00"):
        load_series(_stack(tmp_path, z, th))
    z7 = [0.0, 4.0, 8.0, 12.0, 13.0, 20.0, 34.0]  # one 7 mm slice missing at 27
    th7 = [4.0, 4.0, 4.0, 4.0, 7.0, 7.0, 7.0]
    with pytest.raises(SeriesError, match=r"missing slices: gaps between positions 20\.00–34\.00"):
        load_series(_stack(tmp_path, z7, th7, name="var7"))


def test_sparse_regular_protocol_is_not_missing_slices(tmp_path: Path) -> None:
    """1 mm slices every 10 mm (a sparse protocol) are a regular series, not a gap."""
    loaded = load_series(_stack(tmp_path, [0.0, 10.0, 20.0, 30.0], [1.0] * 4))
    assert loaded.volume.is_regular and loaded.volume.spacing_mm[0] == pytest.approx(10.0)


def test_irregular_step_without_thickness_uses_median(tmp_path: Path) -> None:
    loaded = load_series(_stack(tmp_path, [0.0, 2.0, 4.0, 5.4, 8.0, 10.0], None))
    assert not loaded.volume.is_regular
    with pytest.raises(SeriesError, match="missing slices"):
        load_series(_stack(tmp_path, [0.0, 2.0, 4.0, 10.0, 12.0], None, name="gap"))


@pytest.mark.skipif(not REALCT.is_dir(), reason="../shared/realct not beside the checkout")
def test_real_ge_head_ct_loads_whole(tmp_path: Path) -> None:
    """The shared GE head CT: 14 slices of 4 mm, 14 of 7 mm, gantry tilt +18.5°."""
    scan = scan_folder(REALCT / "ge-head-ct")
    loaded = load_series(scan.series[0])
    vol = loaded.volume
    assert vol.hu.shape == (28, 512, 512) and not vol.is_regular
    assert loaded.gantry_tilt_deg == pytest.approx(18.5, abs=0.1)
    cells = vol.slice_cells_mm()
    assert cells[:13] == pytest.approx(4.0, abs=0.05) and cells[-13:] == pytest.approx(7.0, abs=0.05)
    # written back slice for slice and read by an independent reader (SimpleITK)
    out = tmp_path / "ge"
    write_datasets(_with_pixels(loaded), out)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(out))
    assert len(files) == 28
    for f, k in zip(sorted(files), range(28)):
        img = sitk.ReadImage(f)
        assert np.allclose(img.GetOrigin(), vol.slice_position_lps_mm(k), atol=1e-3)


def _with_pixels(loaded):
    for k, ds in enumerate(loaded.datasets):
        set_pixel_hu(ds, loaded.volume.hu[k])
    return loaded.datasets
