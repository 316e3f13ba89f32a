"""Headers encoded ahead, files written from prefixes: the same bytes as the plain path.

:func:`pipeline.deidentify.deidentify_series` de-identifies and encodes the headers in a
forked child while the face is removed (:class:`pipeline.deidentify.HeadersAhead`), then
writes each file as prefix + pixel bytes (:func:`pipeline.dicom_io.write_prefixed`). These
tests pin that every file is byte for byte what :func:`pipeline.dicom_io.write_datasets`
writes after the in-process header de-identification, and that every way the shortcut can
fail falls back to that path without losing or leaving anything.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline import deidentify as deid_mod
from pipeline import dicom_io, forked
from pipeline.deidentify import DeidOptions, HeadersAhead, deidentify_folder
from pipeline.dicom_io import (
    DicomWriteError,
    PixelFormat,
    encode_prefix,
    volume_to_datasets,
    write_datasets,
    write_prefixed,
)
from pipeline.forked import ForkedCall, ForkedCallError
from tests.dicom_factory import enhanced_ct_dataset, synthetic_volume

REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.dcm"))}


# --------------------------------------------------------------------------- prefixes


@pytest.mark.parametrize(
    ("signed", "bits_allocated", "bits_stored", "intercept", "slope"),
    [(1, 16, 16, "-1024", "1"), (0, 16, 12, "-1024", "1"), (0, 16, 12, "-1024", "0.5"),
     (1, 32, 32, "0", "1"), (0, 8, 8, "-1000", "10")],
)
def test_prefix_plus_pixels_is_the_written_file(tmp_path: Path, signed: int, bits_allocated: int,
                                                bits_stored: int, intercept: str,
                                                slope: str) -> None:
    """encode_prefix + PixelFormat.stored_bytes = write_datasets(pixels_hu=…), byte for
    byte, for the pixel encodings CT uses (odd 8-bit lengths padded)."""
    volume = synthetic_volume(shape=(3, 15, 17))
    datasets = volume_to_datasets(volume)
    for ds in datasets:
        ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored = signed, bits_allocated, bits_stored
        ds.HighBit = bits_stored - 1
        ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    new_hu = volume.hu.astype(np.float32) + 0.25
    plain = [copy.deepcopy(ds) for ds in datasets]
    write_datasets(plain, tmp_path / "plain", pixels_hu=new_hu)
    encoded = [encode_prefix(copy.deepcopy(ds)) for ds in datasets]
    assert all(e is not None for e in encoded)
    write_prefixed([p for p, _ in encoded], [f for _, f in encoded], new_hu, tmp_path / "fast")
    assert _files(tmp_path / "fast") == _files(tmp_path / "plain")


def test_prefixed_series_reads_back_in_simpleitk(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(12, 20, 24), tilt_deg=15.0)
    encoded = [encode_prefix(ds) for ds in volume_to_datasets(volume)]
    new_hu = volume.hu.copy()
    new_hu[6:, :5] = -1000
    out = tmp_path / "series"
    write_prefixed([p for p, _ in encoded], [f for _, f in encoded], new_hu, out)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reader.Execute()), new_hu)


def test_element_after_the_pixel_data_refuses_the_shortcut() -> None:
    ds = volume_to_datasets(synthetic_volume(shape=(1, 8, 8)))[0]
    ds.add_new(0xFFFCFFFC, "OB", b"\x00\x00")  # Data Set Trailing Padding
    assert encode_prefix(ds) is None


def test_prefixed_write_failure_leaves_nothing(tmp_path: Path) -> None:
    volume = synthetic_volume(shape=(40, 8, 8))
    encoded = [encode_prefix(ds) for ds in volume_to_datasets(volume)]
    prefixes, formats = [p for p, _ in encoded], [f for _, f in encoded]
    formats[33] = PixelFormat(9, 8, 16, 16, True, 1.0, 0.0)  # a slice of the wrong shape
    with pytest.raises(DicomWriteError, match="does not match"):
        write_prefixed(prefixes, formats, volume.hu, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DicomWriteError, match="3 pixel slices"):
        write_prefixed(prefixes, formats, volume.hu[:3], tmp_path / "out")


@pytest.mark.parametrize("bits", [(1, 16, 16), (0, 16, 12), (0, 8, 8), (1, 32, 32)])
def test_native_pixels_are_what_pydicom_decodes(tmp_path: Path, bits) -> None:
    signed, allocated, stored = bits
    ds = volume_to_datasets(synthetic_volume(shape=(1, 7, 9)))[0]
    ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
        signed, allocated, stored, stored - 1)
    rng = np.random.default_rng(allocated)
    raw = rng.integers(0, 2 ** min(allocated, 16), size=(7, 9)).astype(
        f"<{'i' if signed else 'u'}{allocated // 8}")
    ds.PixelData = raw.tobytes() + (b"\x00" if raw.nbytes % 2 else b"")
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "x.dcm")
    mine = dicom_io._native_pixels(back)
    assert mine is not None and mine.dtype == back.pixel_array.dtype
    np.testing.assert_array_equal(mine, back.pixel_array)


# --------------------------------------------------------------------------- forked calls


def _boom(kind: str) -> None:
    if kind == "ours":
        raise DicomWriteError("slice 3 is broken")
    if kind == "theirs":
        raise RuntimeError("Invalid value for PN: 'DOE^JOHN'")
    os._exit(3)  # dies without answering


def test_forked_call_returns_the_value() -> None:
    call = ForkedCall.start(sum, [1, 2, 3])
    assert call is not None and call.result() == 6


@pytest.mark.parametrize(("kind", "message"), [
    ("ours", "slice 3 is broken"), ("theirs", r"failed \(RuntimeError\)"), ("dies", "died")])
def test_forked_call_failures_say_nothing_identifying(kind: str, message: str) -> None:
    call = ForkedCall.start(_boom, kind, safe_errors=(DicomWriteError,))
    with pytest.raises(ForkedCallError, match=message) as info:
        call.result()
    assert "DOE" not in str(info.value)


def test_forked_call_times_out_and_stops_the_child() -> None:
    import time

    call = ForkedCall.start(time.sleep, 30)
    with pytest.raises(ForkedCallError, match="did not answer"):
        call.result(timeout_s=0.2)
    assert not call._process.is_alive()


# --------------------------------------------------------------------------- the series path


def _both_paths(src: Path, tmp_path: Path, monkeypatch, **options) -> tuple[dict, dict]:
    """Files of deidentify_folder with the headers encoded ahead, and without a child."""
    opts = DeidOptions(project_secret="s3cret", method="anatomical", **options)
    fast = deidentify_folder(src, tmp_path / "fast", opts)
    with monkeypatch.context() as m:
        m.setattr(ForkedCall, "start", classmethod(lambda cls, *a, **k: None))
        plain = deidentify_folder(src, tmp_path / "plain", opts)
    assert fast.ok and plain.ok
    return _files(tmp_path / "fast"), _files(tmp_path / "plain")


@pytest.mark.parametrize("dates", ["shift", "remove"])
def test_series_written_from_prefixes_is_byte_identical(tmp_path: Path, monkeypatch,
                                                        synthetic_cohort, dates: str) -> None:
    fast, plain = _both_paths(synthetic_cohort(2, seed=5), tmp_path, monkeypatch, dates=dates)
    assert fast == plain and len(fast) > 20


@pytest.mark.skipif(not REALCT.is_dir(), reason="../shared/realct not beside the checkout")
@pytest.mark.parametrize("series", ["ge-head-ct", "philips-skull-phantom"])
def test_real_ct_written_from_prefixes_is_byte_identical(tmp_path: Path, monkeypatch,
                                                         series: str) -> None:
    """The real head (face removed: prefixes used) and the phantom (no face: the child's
    113102 stamp would be wrong, so the plain path writes it)."""
    fast, plain = _both_paths(REALCT / series, tmp_path, monkeypatch)
    assert fast == plain and len(fast) == 28


def test_enhanced_ct_takes_the_plain_path(tmp_path: Path, monkeypatch) -> None:
    """One multi-frame file: its slices are not its files, so the child's headers are not
    used; the classic slices written are those of the plain path."""
    from pipeline.synth import SubjectParams, generate_head

    volume = generate_head(SubjectParams.random(3), noise_seed=3).volume
    src = tmp_path / "in" / "enh"
    src.mkdir(parents=True)
    enhanced_ct_dataset(volume).save_as(src / "multi.dcm", enforce_file_format=True)
    asked = []
    monkeypatch.setattr(HeadersAhead, "result", lambda self, files: asked.append(files))
    fast, plain = _both_paths(src.parent, tmp_path, monkeypatch)
    assert fast == plain and len(fast) == volume.hu.shape[0]
    assert asked == []


@pytest.mark.parametrize("failure", ["raises", "returns_none", "dies", "hangs"])
def test_a_failing_child_falls_back_to_the_same_files(tmp_path: Path, monkeypatch,
                                                      synthetic_cohort, failure: str) -> None:
    src = synthetic_cohort(1, seed=9)
    opts = DeidOptions(project_secret="s", method="anatomical")
    reference = deidentify_folder(src, tmp_path / "ref", opts)

    def broken(*args):
        if failure == "raises":
            raise ValueError("PatientName DOE^JOHN is odd")
        if failure == "dies":
            os._exit(1)
        if failure == "hangs":
            import time

            time.sleep(120)
        return None

    monkeypatch.setattr(deid_mod, "_encode_files", broken)
    monkeypatch.setattr(deid_mod, "AHEAD_MIN_WAIT_S", 0.5)
    summary = deidentify_folder(src, tmp_path / "out", opts)
    assert reference.ok and summary.ok
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_headers_are_deidentified_in_the_written_files(tmp_path: Path, synthetic_cohort) -> None:
    """What the child encodes is the de-identified header: no source name or ID, 113102."""
    src = synthetic_cohort(1, seed=11)
    first = next(p for p in sorted(src.rglob("*")) if p.is_file())
    source = pydicom.dcmread(first, stop_before_pixels=True)
    deidentify_folder(src, tmp_path / "out", DeidOptions(project_secret="s", method="anatomical"))
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert written
    for path in written[:5]:
        raw = path.read_bytes()
        assert str(source.PatientName).encode() not in raw
        assert str(source.PatientID).encode() not in raw
        ds = pydicom.dcmread(path)
        assert "113102" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
