"""Tests of pipeline.deid_header (PS3.15 Annex E basic profile on DICOM headers).

Expected values are computed here independently (HMAC with hashlib, date arithmetic
with datetime, actions re-derived from the table rows), never copied from the code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import json
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.deid_header import (
    DeidentificationError,
    HeaderDeidentifier,
    date_offset_days_for,
    load_profile_table,
    pseudonym_key,
)

SECRET = b"test-project-secret-0123456789"
PSEUDONYM = "SUBJ-0007"
OFFSET = -1234
REFERENCE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    / "dicom-ps3.15-confidentiality-profile.json"
)
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")

# ---------------------------------------------------------------------------
# independent helpers


def expected_uid(uid: str, secret: bytes = SECRET) -> str:
    digest = hmac.new(secret, uid.encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def shifted(da: str, days: int = OFFSET) -> str:
    d = dt.datetime.strptime(da, "%Y%m%d").date() + dt.timedelta(days=days)
    return d.strftime("%Y%m%d")


def serialise(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def encoded_forms(identifier: str) -> set[str]:
    """Lower-case forms in which an identifier could survive in a file."""
    forms = {identifier.lower()}
    if "^" in identifier:
        parts = [p for p in identifier.split("^") if p]
        forms |= {p.lower() for p in parts}
        forms.add(" ".join(reversed(parts[:2])).lower())
        forms.add(" ".join(parts).lower())
    if re.fullmatch(r"\d{8}", identifier):
        y, m, d = identifier[:4], identifier[4:6], identifier[6:]
        forms |= {f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{y}.{m}.{d}", f"{d}.{m}.{y}"}
    return forms


# ---------------------------------------------------------------------------
# a PHI-laden CT header

NAME = "Doe^John^Quincy"
IDENTIFIERS = [
    NAME, "Roe^Jane", "Smith^Maryanne", "Moriarty^Jim", "House^Gregory", "Wilson^James",
    "Cuddy^Lisa", "Foreman^Eric", "Chase^Robert", "Kutner^Lawrence", "Taub^Chris",
    "MRN00123456", "OLD-4455", "GENHOSPX", "ACC998877", "STU5566", "CTROOM7", "SN445566",
    "RP7788", "SPS6655", "PPS3344", "St Elsewhere General Hospital", "Hospital Road 1",
    "42 Wallaby Way", "555-0199", "HOSPAE01", "19610412", "20190312", "20190313",
    "PlainsboroCT", "Cardiology West",
]
UIDS = {
    "study": "1.2.826.0.1.3680043.9.7433.1.1",
    "series": "1.2.826.0.1.3680043.9.7433.1.2",
    "frame": "1.2.826.0.1.3680043.9.7433.1.3",
    "sop1": "1.2.826.0.1.3680043.9.7433.1.11",
    "sop2": "1.2.826.0.1.3680043.9.7433.1.12",
    "creator": "1.2.826.0.1.3680043.9.7433.1.4",
}


def code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def make_phi_dataset(sop_key: str = "sop1", instance: int = 1) -> Dataset:
    """A small CT slice whose header is full of identifiers (see IDENTIFIERS)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = UIDS[sop_key]
    ds.InstanceCreatorUID = UIDS["creator"]
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate = (
        "20190312", "20190312", "20190313", "20190313")
    ds.InstanceCreationDate = "20190313"
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101530", "101600.25", "101700"
    ds.AcquisitionDateTime = "20190313101530.250000+0100"
    ds.AccessionNumber = "ACC998877"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "St Elsewhere General Hospital"
    ds.InstitutionAddress = "Hospital Road 1"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StationName = "CTROOM7"
    ds.StudyDescription = "CT HEAD for Doe^John 12/03/2019"
    ds.SeriesDescription = "AXIAL MRN00123456"
    ds.InstitutionalDepartmentName = "Cardiology West"
    ds.PhysiciansOfRecord = "Wilson^James"
    ds.PerformingPhysicianName = ["Cuddy^Lisa", "Foreman^Eric"]
    ds.NameOfPhysiciansReadingStudy = "Chase^Robert"
    ds.OperatorsName = "Taub^Chris"
    ds.StationAETitle = "HOSPAE01"
    ds.PatientName = NAME
    ds.PatientID = "MRN00123456"
    ds.IssuerOfPatientID = "GENHOSPX"
    ds.PatientBirthDate = "19610412"
    ds.PatientSex = "M"
    ds.PatientAge = "057Y"
    ds.OtherPatientNames = "Roe^Jane"
    ds.PatientMotherBirthName = "Smith^Maryanne"
    ds.PatientAddress = "42 Wallaby Way"
    ds.PatientTelephoneNumbers = "555-0199"
    other = Dataset()
    other.PatientID = "OLD-4455"
    other.IssuerOfPatientID = "GENHOSPX"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.DeviceSerialNumber = "SN445566"
    ds.ProtocolName = "HEAD ROUTINE"
    ds.SliceThickness = "0.6"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = UIDS["study"]
    ds.SeriesInstanceUID = UIDS["series"]
    ds.FrameOfReferenceUID = UIDS["frame"]
    ds.StudyID = "STU5566"
    ds.SeriesNumber = 3
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = ["-125.0", "-130.5", f"{-40.0 + 0.6 * instance:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.488", "0.488"]
    ds.ImageComments = "Patient John Doe seen 2019-03-12"
    ds.PerformedProcedureStepID = "PPS3344"
    # references to other instances of the series (UIDs must stay consistent)
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = UIDS["sop2" if sop_key == "sop1" else "sop1"]
    ds.ReferencedImageSequence = Sequence([ref])
    src = Dataset()
    src.ReferencedSOPClassUID = CTImageStorage
    src.ReferencedSOPInstanceUID = UIDS["sop1"]
    src.PurposeOfReferenceCodeSequence = Sequence([code_item("121320", "Uncompressed predecessor")])
    ds.SourceImageSequence = Sequence([src])
    # request attributes with identifiers and a description
    req = Dataset()
    req.RequestedProcedureID = "RP7788"
    req.ScheduledProcedureStepID = "SPS6655"
    req.RequestedProcedureDescription = "CT head for Doe"
    req.ScheduledProcedureStepDescription = "Head CT John Doe 20190312"
    ds.RequestAttributesSequence = Sequence([req])
    # depth 2-3: identifiers and private tags inside nested sequences not in the table
    deep = Dataset()
    deep.InstitutionName = "St Elsewhere General Hospital"
    deep.SecondaryReviewerName = "Kutner^Lawrence"  # PN not in the table
    deep.ExpiryDate = "20190313"  # DA not in the table
    deep.add_new(0x00311010, "LO", "PlainsboroCT")  # private without creator, depth 3
    mid = code_item("T-D1100", "Head")
    mid.OperatorsName = "Moriarty^Jim"
    mid.AnatomicRegionModifierSequence = Sequence([deep])
    blk = mid.private_block(0x0033, "ACME DEEP", create=True)
    blk.add_new(0x01, "LO", "PlainsboroCT")
    ds.AnatomicRegionSequence = Sequence([mid])
    # private tags at top level, including a private sequence
    top = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    top.add_new(0x10, "LO", "Doe^John")
    inner = Dataset()
    inner.PatientName = NAME
    top.add_new(0x11, "SQ", Sequence([inner]))
    # overlays and curves
    ds.add_new(0x60000010, "US", 16)
    ds.add_new(0x60000011, "US", 16)
    ds.add_new(0x60000022, "LO", "Doe overlay")
    ds.add_new(0x60003000, "OW", b"\x00" * 32)
    ds.add_new(0x50000010, "US", 2)
    ds.add_new(0x50003000, "OB", b"\x00" * 8)
    # pixels
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = bytes(range(256)) * 2
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.0.9"
    meta.ImplementationVersionName = "SCANNER_V1"
    meta.SourceApplicationEntityTitle = "HOSPAE01"
    ds.file_meta = meta
    return ds


@pytest.fixture(scope="module")
def shifter() -> HeaderDeidentifier:
    return HeaderDeidentifier(SECRET, dates="shift")


@pytest.fixture(scope="module")
def remover() -> HeaderDeidentifier:
    return HeaderDeidentifier(SECRET, dates="remove")


def deidentified(deid: HeaderDeidentifier, **kw) -> Dataset:
    ds = make_phi_dataset(**kw)
    deid.deidentify(ds, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    return ds


def iter_elements(ds: Dataset, depth: int = 1):
    for elem in ds:
        yield elem, depth
        if elem.VR == "SQ":
            for item in elem.value:
                yield from iter_elements(item, depth + 1)


# ---------------------------------------------------------------------------
# the table


@pytest.mark.skipif(not REFERENCE.is_file(), reason="shared/reference (PS3.15 JSON) not present")
def test_table_covers_every_reference_attribute():
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    rows, private = load_profile_table()
    ours = {r.key: r for r in rows}
    option_columns = [
        "rtnSafePrivOpt", "rtnUIDsOpt", "rtnDevIdOpt", "rtnInstIdOpt", "rtnPatCharsOpt",
        "rtnLongFullDatesOpt", "rtnLongModifDatesOpt", "cleanDescOpt", "cleanStructContOpt",
        "cleanGraphOpt",
    ]
    assert len(reference) == len(rows) + 1
    for ref in reference:
        opts = {c: ref[c] for c in option_columns if ref.get(c)}
        if ref["tag"].startswith("(GGGG,EEEE)"):
            row = private
        else:
            key = ref["tag"].strip("()").replace(",", "").lower()
            assert key in ours, ref["tag"]
            row = ours[key]
        assert (row.basic, row.options) == (ref["basicProfile"], opts), ref["tag"]


def test_masked_repeating_groups_match():
    deid = HeaderDeidentifier(SECRET)
    assert deid.action_for(0x60003000) == "X"  # Overlay Data, group 6000
    assert deid.action_for(0x601E3000) == "X"  # last overlay group
    assert deid.action_for(0x60024000) == "X"  # Overlay Comments, group 6002
    assert deid.action_for(0x50100010) == "X"  # any curve element
    assert deid.action_for(0x00100010) == "Z"  # Patient's Name (pseudonym override apart)
    assert deid.action_for(0x00280010) is None  # Rows: not in the table
    assert deid.action_for(0x00091001) == "X"  # private


# ---------------------------------------------------------------------------
# every table row, both date modes


def expected_action(row, dates: str) -> str:
    enabled = ["cleanDescOpt"] + (["rtnLongModifDatesOpt"] if dates == "shift" else [])
    chosen = [row.options[c] for c in enabled if c in row.options]
    combos = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
    basic = combos.get(row.basic, row.basic)
    return "K" if "K" in chosen else "C" if "C" in chosen else basic


def row_tag(key: str) -> int:
    return {"50xxxxxx": 0x50003000, "60xx3000": 0x60003000, "60xx4000": 0x60024000}.get(
        key, int(key.replace("x", "0"), 16))


def synth_value(vr: str):
    return {
        "AE": "ZORBAE", "AS": "042Y", "CS": "ZORBLAT DOE", "DA": "20190312",
        "DT": "20190312101530.250000+0100", "TM": "101530", "DS": "12.5", "IS": "42",
        "LO": "Zorblat Doe", "SH": "Zorblat Doe", "UC": "Zorblat Doe", "LT": "Zorblat Doe",
        "ST": "Zorblat Doe", "UT": "Zorblat Doe", "PN": "Zorblat^Quux",
        "UI": "1.2.826.0.1.3680043.9.7433.99", "UR": "http://example.org/zorblat",
        "US": 7, "SS": 7, "UL": 7, "SL": 7, "UV": 7, "SV": 7, "FL": 1.5, "FD": 1.5,
        "AT": 0x00100010,
    }.get(vr, b"\x01\x02\x03\x04")


ROWS, _PRIVATE = load_profile_table()


@pytest.mark.parametrize("dates", ["shift", "remove"])
@pytest.mark.parametrize("row", ROWS, ids=[r.key for r in ROWS])
def test_every_table_row_is_honoured(row, dates, shifter, remover):
    deid = shifter if dates == "shift" else remover
    tag = row_tag(row.key)
    vr = dictionary_VR(tag).split(" or ")[0]
    ds = Dataset()
    ds.PatientName = "Doe^John"  # gives "Doe" as an identifier to clean out of text
    if vr == "SQ":
        item = code_item("ZQX1", "Zorblat Quux")
        item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.98"
        original = Sequence([item])
    else:
        original = synth_value(vr)
    if tag != 0x00100010:
        ds.add_new(tag, vr, original)
    else:
        original = "Doe^John"
    deid.deidentify(ds, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    action = expected_action(row, dates)
    if tag in (0x00100010, 0x00100020):
        assert ds[tag].value == PSEUDONYM
        return
    if action == "C":  # what "clean" can mean for this VR, else the basic action
        if vr in ("LO", "SH", "UC", "LT", "ST", "UT", "CS"):
            value = str(ds[tag].value)
            assert "zorblat" in value.lower() and "doe" not in value.lower()
            return
        if vr == "SQ" or (vr in ("DA", "DT", "TM") and dates == "shift"):
            action = "K"
        elif vr in ("PN", "AE", "UR"):
            action = "D"
        else:
            action = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D"}.get(row.basic, row.basic)
    if action == "X":
        assert tag not in ds
        return
    assert tag in ds
    value = ds[tag].value
    if vr in ("DA", "DT") and dates == "shift":
        expect = shifted(original[:8]) + original[8:]
        assert value == expect
    elif vr == "SQ":
        if action == "Z":
            assert len(value) == 0
        else:
            assert len(value) == 1
            item = value[0]
            new_ref = "1.2.826.0.1.3680043.9.7433.98"
            assert item.ReferencedSOPInstanceUID == expected_uid(new_ref)
            if action == "D":  # dummy content
                assert "zorblat" not in str(item.CodeMeaning).lower()
                assert item.CodeValue != "ZQX1"
            else:
                assert item.CodeValue == "ZQX1"
    elif action == "K":
        assert value == original
    elif action == "Z":
        assert value in ("", b"", None)
    elif action == "U" or (action == "D" and vr == "UI"):
        assert value == expected_uid(original)
    elif action == "D":
        assert value not in ("", b"", None)
        assert value != original
        if vr in ("DA", "DT"):
            assert value == "19000101"
        if isinstance(value, str):
            assert "zorblat" not in str(value).lower()
    else:  # pragma: no cover
        pytest.fail(f"unexpected action {action}")


# ---------------------------------------------------------------------------
# no identifier survives


@pytest.mark.parametrize("dates", ["shift", "remove"])
def test_no_injected_identifier_survives_in_the_file(dates, shifter, remover):
    deid = shifter if dates == "shift" else remover
    before = serialise(make_phi_dataset()).decode("latin-1").lower()
    after = serialise(deidentified(deid)).decode("latin-1").lower()
    forms = set().union(*(encoded_forms(s) for s in IDENTIFIERS)) | {
        u.lower() for u in UIDS.values()} | {"acme private", "acme deep", "scanner_v1"}
    present_before = {f for f in forms if f in before}
    assert len(present_before) > 40  # the fixture does contain them
    leaked = sorted(f for f in forms if f in after)
    assert leaked == []


def test_pn_dates_private_removed_at_every_depth(shifter):
    ds = deidentified(shifter)
    depths = []
    for elem, depth in iter_elements(ds):
        depths.append(depth)
        assert not elem.tag.is_private
        if elem.VR == "PN" and elem.value:
            assert str(elem.value) in (PSEUDONYM, "ANONYMOUS")
    assert max(depths) >= 3
    deep = ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
    assert deep.SecondaryReviewerName == "ANONYMOUS"  # PN not in the table
    assert deep.ExpiryDate == shifted("20190313")  # DA not in the table: shifted
    assert "InstitutionName" in deep and deep.InstitutionName != "St Elsewhere General Hospital"
    assert ds.AnatomicRegionSequence[0].OperatorsName == "ANONYMOUS"  # X/Z/D -> D
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Head"  # untabled safe text kept
    for group in (0x5000, 0x6000):
        assert not [e for e in ds if e.tag.group == group]


def test_sequences_with_identifiers_removed_or_cleaned(shifter):
    ds = deidentified(shifter)
    assert "OtherPatientIDsSequence" not in ds
    req = ds.RequestAttributesSequence[0]  # X, but C with Clean Descriptors
    assert "RequestedProcedureID" not in req and "ScheduledProcedureStepID" not in req
    assert req.RequestedProcedureDescription == "CT head for"
    assert req.ScheduledProcedureStepDescription == "Head CT"
    plain = HeaderDeidentifier(SECRET, dates="shift", clean_descriptors=False)
    ds2 = deidentified(plain)
    assert "RequestAttributesSequence" not in ds2
    assert "StudyDescription" not in ds2 and "ImageComments" not in ds2
    assert "ProtocolName" in ds2 and ds2.ProtocolName == "ANONYMIZED"  # X/D -> D


def test_clean_descriptors_keeps_safe_words(shifter):
    ds = deidentified(shifter)
    assert ds.StudyDescription == "CT HEAD for"
    assert ds.SeriesDescription == "AXIAL"
    assert ds.ImageComments == "Patient seen"
    assert ds.ProtocolName == "HEAD ROUTINE"
    assert ds.Manufacturer == "ACME Medical"  # not in the table, nothing to clean


# ---------------------------------------------------------------------------
# UIDs


def test_uids_consistent_across_files_and_runs(shifter):
    a = deidentified(shifter, sop_key="sop1", instance=1)
    b = deidentified(shifter, sop_key="sop2", instance=2)
    for ds in (a, b):
        assert ds.StudyInstanceUID == expected_uid(UIDS["study"])
        assert ds.SeriesInstanceUID == expected_uid(UIDS["series"])
        assert ds.FrameOfReferenceUID == expected_uid(UIDS["frame"])
        assert ds.SOPClassUID == CTImageStorage  # well-known: not mapped
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        for elem, _ in iter_elements(ds):
            if elem.VR == "UI":
                assert len(str(elem.value)) <= 64 and UID_RE.match(str(elem.value))
    assert a.SOPInstanceUID != b.SOPInstanceUID
    # cross references point at the other file's new UID
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert a.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    # a re-run with a new instance gives the same bytes; another secret other UIDs
    again = deidentified(HeaderDeidentifier(SECRET, dates="shift"), sop_key="sop1")
    assert serialise(again) == serialise(a)
    other = deidentified(HeaderDeidentifier(b"another-secret", dates="shift"))
    assert other.StudyInstanceUID != a.StudyInstanceUID
    assert other.StudyInstanceUID == expected_uid(UIDS["study"], b"another-secret")


def test_retain_uids_option():
    deid = HeaderDeidentifier(SECRET, dates="shift", retain_uids=True)
    ds = deidentified(deid)
    assert ds.StudyInstanceUID == UIDS["study"] and ds.SOPInstanceUID == UIDS["sop1"]
    assert ds.file_meta.MediaStorageSOPInstanceUID == UIDS["sop1"]
    assert "113110" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


# ---------------------------------------------------------------------------
# dates


def test_date_shift_keeps_intervals(shifter):
    ds = deidentified(shifter)
    assert ds.StudyDate == shifted("20190312")
    assert ds.PatientBirthDate == shifted("19610412")
    assert ds.AcquisitionDate == shifted("20190313")
    assert ds.AcquisitionDateTime == shifted("20190313") + "101530.250000+0100"
    assert ds.StudyTime == "101530"  # whole-day shift keeps times

    def days(a: str, b: str) -> int:
        f = "%Y%m%d"
        return (dt.datetime.strptime(a, f) - dt.datetime.strptime(b, f)).days

    assert days(ds.StudyDate, ds.PatientBirthDate) == days("20190312", "19610412")
    assert days(ds.AcquisitionDate, ds.StudyDate) == 1
    assert "PatientAge" not in ds  # X in the table


def test_dates_removed(remover):
    ds = deidentified(remover)
    assert "StudyDate" in ds and ds.StudyDate == ""  # Z (Type 2 stays present)
    assert ds.PatientBirthDate == ""
    assert ds.ContentDate == "19000101"  # Z/D -> D: dummy
    assert ds.InstanceCreationDate == "19000101"  # X/D -> D
    assert ds.AcquisitionDate == ""  # X/Z -> Z
    assert ds.StudyTime == ""
    deep = ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
    assert deep.ExpiryDate == ""  # not in the table: emptied
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_offset_helpers():
    key = pseudonym_key("MRN00123456", SECRET)
    assert re.fullmatch(r"[0-9a-f]{64}", key) and "123456" not in key
    assert key == pseudonym_key("MRN00123456", SECRET.decode())
    assert key != pseudonym_key("MRN00123456", b"other-secret")
    offsets = [date_offset_days_for(pseudonym_key(f"P{i}", SECRET), SECRET) for i in range(300)]
    assert all(-3650 <= o <= -1 for o in offsets)
    assert len(set(offsets)) > 250  # spread, not constant
    assert date_offset_days_for(key, SECRET) == date_offset_days_for(key, SECRET)
    assert all(-10 <= date_offset_days_for(str(i), SECRET, max_days=10) <= -1 for i in range(50))


# ---------------------------------------------------------------------------
# stamps and validity


def test_deidentification_method_codes_match_cid_7050():
    from pydicom.sr.codedict import codes

    meanings = {
        "113100": codes.DCM.BasicApplicationConfidentialityProfile,
        "113102": codes.DCM.CleanRecognizableVisualFeaturesOption,
        "113105": codes.DCM.CleanDescriptorsOption,
        "113107": codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
    }
    ds = make_phi_dataset()
    HeaderDeidentifier(SECRET, dates="shift").deidentify(
        ds, pseudonym=PSEUDONYM, date_offset_days=OFFSET, face_removed=True)
    got = {i.CodeValue: (i.CodingSchemeDesignator, i.CodeMeaning)
           for i in ds.DeidentificationMethodCodeSequence}
    assert got == {v: ("DCM", c.meaning) for v, c in meanings.items()}
    assert ds.PatientIdentityRemoved == "YES"
    assert set(ds.DeidentificationMethod) == {c.meaning for c in meanings.values()}
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    ds2 = make_phi_dataset()
    HeaderDeidentifier(SECRET, dates="remove").deidentify(ds2, pseudonym=PSEUDONYM)
    assert {i.CodeValue for i in ds2.DeidentificationMethodCodeSequence} == {"113100", "113105"}


def test_output_is_valid_and_geometry_kept(shifter):
    original = make_phi_dataset()
    ds = deidentified(shifter)
    back = pydicom.dcmread(io.BytesIO(serialise(ds)))
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "SliceThickness", "Rows", "Columns", "RescaleIntercept", "RescaleSlope",
               "SOPClassUID", "Modality", "PatientPosition", "BitsAllocated"):
        assert back[kw].value == original[kw].value, kw
    assert back.PixelData == original.PixelData
    assert back.PatientName == PSEUDONYM and back.PatientID == PSEUDONYM
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert back.file_meta.ImplementationVersionName != "SCANNER_V1"
    assert back.ReferringPhysicianName == ""  # Z, Type 2 kept present


def test_implicit_vr_input_is_handled(shifter):
    ds = make_phi_dataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    raw = pydicom.dcmread(io.BytesIO(serialise(ds)))
    assert raw.get_item(0x00100010).VR is None  # raw, VR from the dictionary
    shifter.deidentify(raw, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    out = serialise(raw).decode("latin-1").lower()
    assert not [f for s in IDENTIFIERS for f in encoded_forms(s) if f in out]
    assert raw.StudyDate == shifted("20190312")


def test_no_file_meta_and_untouched_extras(shifter):
    ds = make_phi_dataset()
    del ds.file_meta
    shifter.deidentify(ds, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    assert ds.SOPInstanceUID == expected_uid(UIDS["sop1"])


# ---------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors_without_identifiers(shifter):
    ds = make_phi_dataset()
    with pytest.raises(DeidentificationError, match="pseudonym"):
        shifter.deidentify(ds, pseudonym="Doe^John", date_offset_days=OFFSET)
    try:
        shifter.deidentify(ds, pseudonym="MRN00123456 Doe", date_offset_days=OFFSET)
    except DeidentificationError as exc:
        assert "Doe" not in str(exc) and "MRN" not in str(exc)
    else:
        pytest.fail("a pseudonym with a space must be refused")
    with pytest.raises(DeidentificationError, match="non-zero date_offset_days"):
        shifter.deidentify(ds, pseudonym=PSEUDONYM)
    with pytest.raises(DeidentificationError, match="int"):
        shifter.deidentify(ds, pseudonym=PSEUDONYM, date_offset_days=1.5)
    with pytest.raises(DeidentificationError, match="Dataset"):
        shifter.deidentify({"PatientName": "x"}, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    with pytest.raises(DeidentificationError, match="project_secret"):
        HeaderDeidentifier(b"")
    with pytest.raises(DeidentificationError, match="dates"):
        HeaderDeidentifier(SECRET, dates="keep")
    with pytest.raises(DeidentificationError, match="not implemented"):
        HeaderDeidentifier(SECRET, retain_safe_private=True)
    with pytest.raises(DeidentificationError, match="max_days"):
        date_offset_days_for("k", SECRET, max_days=0)
    assert issubclass(DeidentificationError, ValueError)
    assert ds.PatientName == NAME  # refused calls did not modify anything


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_unshiftable_date_is_not_kept(shifter):
    ds = Dataset()
    ds.StudyDate = "2019"  # not a full date: cannot be shifted
    ds.SeriesDate = "2019.03.12"  # legacy ACR-NEMA form: shifted and normalised
    shifter.deidentify(ds, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    assert ds.StudyDate == ""
    assert ds.SeriesDate == shifted("20190312")
    assert keyword_for_tag(0x00080020) == "StudyDate"


def test_invalid_values_are_not_logged_or_warned(shifter, caplog, recwarn):
    ds = make_phi_dataset()
    with pytest.warns(UserWarning):  # pydicom itself complains while we build the input
        ds.StudyDescription = "CT HEAD " + "x" * 70 + " Doe"  # LO longer than 64
        ds.OtherPatientNames = "Doe^John^Quincy^Jr^Extra^TooMany"
        ds.InstanceCreatorUID = "1.2.840.99.Doe"  # pydicom quotes invalid UIDs
    raw = pydicom.dcmread(io.BytesIO(serialise(ds)))
    recwarn.clear()
    caplog.clear()
    with caplog.at_level("DEBUG"):
        shifter.deidentify(raw, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    said = " ".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn])
    assert "doe" not in said.lower()
    assert pydicom.config.settings.reading_validation_mode != pydicom.config.IGNORE  # restored
    assert "doe" not in str(raw.StudyDescription).lower()


def test_retain_patient_characteristics_option():
    deid = HeaderDeidentifier(SECRET, dates="shift", retain_patient_characteristics=True)
    ds = make_phi_dataset()
    ds.PatientWeight = "81.5"
    ds.Allergies = "Penicillin, reported by Doe"  # C: cleaned
    deid.deidentify(ds, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    assert (ds.PatientAge, ds.PatientSex, ds.PatientWeight) == ("057Y", "M", 81.5)
    assert ds.Allergies == "Penicillin, reported by"
    assert "113108" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    default = deidentified(HeaderDeidentifier(SECRET, dates="shift"))
    assert "PatientAge" not in default and default.PatientSex == ""


def test_unknown_elements_removed_and_preamble_zeroed(shifter):
    ds = make_phi_dataset()
    ds.add_new(0x00431234, "UN", b"Doe^John")  # odd group: private
    ds.add_new(0x00441234, "UN", b"Doe^John")  # even group, unknown to the dictionary
    raw = pydicom.dcmread(io.BytesIO(serialise(ds)))
    raw.preamble = b"Doe^John".ljust(128, b"\x00")
    shifter.deidentify(raw, pseudonym=PSEUDONYM, date_offset_days=OFFSET)
    assert 0x00441234 not in raw and 0x00431234 not in raw
    buf = io.BytesIO()
    raw.save_as(buf)
    assert b"doe" not in buf.getvalue().lower()
