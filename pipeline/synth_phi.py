"""Fake patient identities (PHI) and a DICOM writer that plants them everywhere.

Test material for the de-identification pipeline: :class:`FakePHI` is a
deterministic, obviously fake identity (seeded), and
:func:`write_synthetic_series` writes a :class:`pipeline.synth.SynthHead` as a
CT series whose headers carry that identity in the places real exports do —
patient module, physicians and operators, institution, dates and times,
accession number, descriptions containing the patient name, station and device
serial, other patient IDs, a private block (odd group, private creator) and
nested sequences two levels deep. :meth:`FakePHI.identifiers` lists every
planted identifying string in the form it takes in the file bytes, so leak
scans downstream have something concrete to look for.

Names are built from random syllables (``ZORVAK^ILMETTE``), so they do not
collide with real words or other header content.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .dicom_io import volume_to_datasets, write_datasets
from .synth import SynthHead

__all__ = ["PRIVATE_CREATOR", "PRIVATE_GROUP", "FakePHI", "PHIWriteError", "write_synthetic_series"]

#: Private block used for planted identifiers: group 0x0011, creator below, block 0x10.
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "DEIDSTUDY SYNTH PHI"

COMPRESSIONS = (None, "rle", "jpeg-lossless", "jpeg2000-lossless")


class PHIWriteError(ValueError):
    """Invalid input to the PHI writer (messages never contain identifiers)."""


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "st", "tr", "vl", "zh", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ae", "ou"]
_CODAS = ["", "", "k", "n", "r", "s", "t", "x", "lt", "rd", "nd", "sk"]
_STREETS = ["Lindqvist", "Marrowgate", "Osterbrink", "Quellbrook", "Tannery", "Wexhollow"]
_CITIES = ["Fakeborough", "Nullhaven", "Testmoor", "Mockfield"]


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_CODAS)))
    return "".join(parts).upper()


def _person(rng: np.random.Generator) -> str:
    """A fake DICOM PN value ``LAST^FIRST`` (upper case)."""
    return f"{_word(rng, 3)}^{_word(rng, 2)}"


def _date(d: _dt.date) -> str:
    return d.strftime("%Y%m%d")


@dataclass(frozen=True)
class FakePHI:
    """A fake patient/study identity. Dates ``YYYYMMDD``, times ``HHMMSS``, names ``LAST^FIRST``."""

    patient_last: str
    patient_first: str
    patient_id: str
    other_patient_id: str
    birth_date: str
    sex: str
    age: str
    institution_name: str
    institution_address: str
    referring_physician: str
    performing_physician: str
    operator: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    series_date: str
    series_time: str
    acquisition_date: str
    acquisition_time: str
    content_date: str
    content_time: str
    station_name: str
    device_serial: str
    requested_procedure_id: str

    @property
    def patient_name(self) -> str:
        """DICOM PN value ``LAST^FIRST``."""
        return f"{self.patient_last}^{self.patient_first}"

    @property
    def folder_name(self) -> str:
        """``LAST_FIRST_ID`` — how a real export would name the patient folder (identifying!)."""
        return f"{self.patient_last}_{self.patient_first}_{self.patient_id}"

    @classmethod
    def random(cls, seed: int) -> FakePHI:
        """Deterministic fake identity for ``seed`` (an int)."""
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise PHIWriteError("seed must be an int")
        rng = np.random.default_rng([int(seed), 0x9A7])
        last, first = _person(rng).split("^")
        sex = str(rng.choice(["F", "M"]))
        study = _dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3500)))
        age_y = int(rng.integers(18, 90))
        birth = study - _dt.timedelta(days=int(age_y * 365.25 + rng.integers(1, 360)))
        t = int(rng.integers(7 * 3600, 19 * 3600))

        def hms(s: int) -> str:
            return f"{s // 3600:02d}{(s // 60) % 60:02d}{s % 60:02d}"

        inst_word = _word(rng, 2).title()
        return cls(
            patient_last=last,
            patient_first=first,
            patient_id=f"PID{int(rng.integers(10**7, 10**8))}",
            other_patient_id=f"OPID{int(rng.integers(10**7, 10**8))}",
            birth_date=_date(birth),
            sex=sex,
            age=f"{age_y:03d}Y",
            institution_name=f"{inst_word} Memorial Clinic",
            institution_address=(f"{int(rng.integers(1, 400))} {rng.choice(_STREETS)} Road, "
                                 f"{rng.choice(_CITIES)} {int(rng.integers(10000, 99999))}"),
            referring_physician=_person(rng),
            performing_physician=_person(rng),
            operator=_person(rng),
            accession_number=f"ACC{int(rng.integers(10**8, 10**9))}",
            study_id=f"S{int(rng.integers(10**5, 10**6))}",
            study_date=_date(study),
            study_time=hms(t),
            series_date=_date(study),
            series_time=hms(t + 120),
            acquisition_date=_date(study),
            acquisition_time=hms(t + 150),
            content_date=_date(study),
            content_time=hms(t + 180),
            station_name=f"CTST{int(rng.integers(100, 999))}{_word(rng, 1)[:3]}",
            device_serial=f"SN{int(rng.integers(10**6, 10**7))}",
            requested_procedure_id=f"RP{int(rng.integers(10**6, 10**7))}",
        )

    def to_dict(self) -> dict[str, str]:
        """Plain dict of all fields plus ``patient_name`` (JSON-serialisable)."""
        d = asdict(self)
        d["patient_name"] = self.patient_name
        return d

    def identifiers(self) -> list[str]:
        """Every planted identifying string, as it appears in the DICOM bytes.

        Includes the PN values (``LAST^FIRST``) and their parts, IDs, accession
        and procedure numbers, birth and study dates (``YYYYMMDD``), institution
        name/address, station name, device serial and physician/operator names.
        Times, sex and age are planted but *not* listed (too short/generic to
        scan for without false positives). Sorted, unique.
        """
        vals = {
            self.patient_name, self.patient_last, self.patient_first, self.patient_id,
            self.other_patient_id, self.birth_date, self.institution_name, self.institution_address,
            self.referring_physician, self.performing_physician, self.operator,
            self.accession_number, self.study_id, self.study_date, self.station_name,
            self.device_serial, self.requested_procedure_id,
        }
        for pn in (self.referring_physician, self.performing_physician, self.operator):
            vals.update(pn.split("^"))
        return sorted(vals)

    # ------------------------------------------------------------------ DICOM
    def series_meta(self) -> dict[str, Any]:
        """Top-level DICOM keywords carrying this identity (for ``volume_to_datasets``)."""
        return {
            "PatientName": self.patient_name,
            "PatientID": self.patient_id,
            "PatientBirthDate": self.birth_date,
            "PatientSex": self.sex,
            "PatientAge": self.age,
            "OtherPatientIDs": self.other_patient_id,
            "PatientComments": f"synthetic subject {self.patient_last} ({self.patient_id})",
            "InstitutionName": self.institution_name,
            "InstitutionAddress": self.institution_address,
            "ReferringPhysicianName": self.referring_physician,
            "PerformingPhysicianName": self.performing_physician,
            "OperatorsName": self.operator,
            "AccessionNumber": self.accession_number,
            "StudyID": self.study_id,
            "StudyDate": self.study_date,
            "StudyTime": self.study_time,
            "SeriesDate": self.series_date,
            "SeriesTime": self.series_time,
            "AcquisitionDate": self.acquisition_date,
            "AcquisitionTime": self.acquisition_time,
            "ContentDate": self.content_date,
            "ContentTime": self.content_time,
            "StudyDescription": f"CT HEAD {self.patient_last}^{self.patient_first}",
            "SeriesDescription": f"AXIAL 1MM {self.patient_last} {self.patient_id}",
            "StationName": self.station_name,
            "DeviceSerialNumber": self.device_serial,
            "Manufacturer": "SYNTHETIC",
            "ManufacturerModelName": "IMPLICIT HEAD v1",
            "SeriesNumber": 3,
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "KVP": "120",
            "ConvolutionKernel": "H30s",
        }

    def add_nested_and_private(self, ds: Dataset) -> None:
        """Add identifier-bearing sequences (depth 2) and a private block to ``ds`` in place."""
        # OtherPatientIDsSequence > item > IssuerOfPatientIDQualifiersSequence > item
        qual = Dataset()
        qual.UniversalEntityID = self.institution_name
        qual.UniversalEntityIDType = "DNS"
        opi = Dataset()
        opi.PatientID = self.other_patient_id
        opi.IssuerOfPatientID = self.institution_name
        opi.TypeOfPatientID = "TEXT"
        opi.IssuerOfPatientIDQualifiersSequence = Sequence([qual])
        ds.OtherPatientIDsSequence = Sequence([opi])
        # RequestAttributesSequence > item > ScheduledProtocolCodeSequence > item
        code = Dataset()
        code.CodeValue = "CTHEAD"
        code.CodingSchemeDesignator = "99SYNTH"
        code.CodeMeaning = f"Head CT for {self.patient_last}^{self.patient_first}"
        req = Dataset()
        req.RequestedProcedureID = self.requested_procedure_id
        req.ScheduledProcedureStepID = self.accession_number
        req.RequestedProcedureDescription = f"CT head {self.patient_name} {self.patient_id}"
        req.ScheduledProtocolCodeSequence = Sequence([code])
        ds.RequestAttributesSequence = Sequence([req])
        # ProcedureCodeSequence with free text
        proc = Dataset()
        proc.CodeValue = "CTHD"
        proc.CodingSchemeDesignator = "99SYNTH"
        proc.CodeMeaning = f"CT head ({self.patient_last})"
        ds.ProcedureCodeSequence = Sequence([proc])
        # ReferencedStudySequence > item > ReferencedPatientSequence-like private text at depth 2
        ref_inner = Dataset()
        ref_inner.PatientName = self.patient_name
        ref_inner.PatientID = self.patient_id
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
        ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ref.ReferencedPatientSequence = Sequence([ref_inner])
        ds.ReferencedStudySequence = Sequence([ref])
        ds.ImageComments = f"scanned for {self.referring_physician}; patient {self.patient_name}"
        # private block: group 0x0011, creator at (0011,0010), elements 0x10xx
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", self.patient_name)
        block.add_new(0x02, "LO", self.patient_id)
        block.add_new(0x03, "DA", self.birth_date)
        inner = Dataset()
        inner.add_new(0x00100010, "PN", self.patient_name)
        inner.add_new(0x00080050, "SH", self.accession_number)
        block.add_new(0x04, "SQ", Sequence([inner]))


def _compress_jpeg_lossless(ds: Dataset, tmp: Path) -> None:
    """Re-encode ``ds`` pixels as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) in place, via GDCM
    (SimpleITK's GDCMImageIO), verifying the round trip."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import JPEGLosslessSV1

    arr = ds.pixel_array.astype(np.int16)
    path = tmp / "slice.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(arr[None]))
    enc = pydicom.dcmread(path)
    if str(enc.file_meta.TransferSyntaxUID) != JPEGLosslessSV1:
        raise PHIWriteError("GDCM did not produce JPEG Lossless SV1")
    if not np.array_equal(enc.pixel_array.astype(np.int16), arr):
        raise PHIWriteError("JPEG Lossless round trip changed the pixel values")
    ds.PixelData = enc.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def write_synthetic_series(
    head: SynthHead,
    phi: FakePHI,
    out_dir: Path,
    *,
    compress: str | None = None,
    shuffle_names: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write ``head.volume`` as a CT series carrying ``phi`` into ``out_dir`` (atomically).

    Built with :func:`pipeline.dicom_io.volume_to_datasets` (geometry: LPS mm,
    one file per axial slice) plus :meth:`FakePHI.add_nested_and_private`, and
    written with :func:`pipeline.dicom_io.write_datasets`. ``compress``:
    ``None`` (Explicit VR Little Endian), ``"rle"`` (RLE Lossless),
    ``"jpeg2000-lossless"`` (pylibjpeg-openjpeg) or ``"jpeg-lossless"``
    (JPEG Lossless SV1 through SimpleITK/GDCM, slow). ``shuffle_names``: file
    names are random 12-hex-digit tokens without extension, in a random order
    (``seed``), so readers must sort by geometry. Returns the written paths in
    slice order (k = 0 first).
    """
    from pydicom.uid import JPEG2000Lossless, RLELossless

    if compress not in COMPRESSIONS:
        raise PHIWriteError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
    if not isinstance(head, SynthHead) or not isinstance(phi, FakePHI):
        raise PHIWriteError("write_synthetic_series needs a SynthHead and a FakePHI")
    datasets = volume_to_datasets(head.volume, series_meta=phi.series_meta())
    with tempfile.TemporaryDirectory(prefix="synthjpg-") as tmp:
        for ds in datasets:
            phi.add_nested_and_private(ds)
            if compress == "rle":
                ds.compress(RLELossless)
            elif compress == "jpeg2000-lossless":
                ds.compress(JPEG2000Lossless)
            elif compress == "jpeg-lossless":
                _compress_jpeg_lossless(ds, Path(tmp))
    n = len(datasets)
    if shuffle_names:
        rng = np.random.default_rng([int(seed), 0x5F1E])
        names: list[str] = []
        while len(names) < n:
            tok = rng.bytes(6).hex()
            if tok not in names:
                names.append(tok)
    else:
        names = [f"IM{k + 1:05d}.dcm" for k in range(n)]
    return write_datasets(datasets, Path(out_dir), filenames=names)
