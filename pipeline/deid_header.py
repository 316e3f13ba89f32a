"""DICOM header de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile.

:class:`HeaderDeidentifier` applies, in one walk over a :class:`pydicom.Dataset`
(every sequence item at any depth included), the action that DICOM PS3.15
Table E.1-1 gives each attribute. The table is the project's own copy,
``pipeline/data/confidentiality_profile.json``, built from the standard by
``scripts/build_profile_table.py``. Pixel data are not touched (the face is
removed by :mod:`pipeline.deface`; the caller says so with ``face_removed``).

Actions (PS3.15 E.1) and how they are carried out
-------------------------------------------------
* ``X`` – the element is removed.
* ``Z`` – the element is kept with a zero-length value (a sequence with no items).
* ``D`` – the value is replaced by a dummy of the same VR: PN ``ANONYMOUS``; LO, SH,
  UC, LT, ST, UT, CS, AE, UR ``ANONYMIZED``; UI the HMAC UID of the old value
  (:meth:`HeaderDeidentifier.uid_map`); DA/DT ``19000101`` and TM ``000000`` when
  ``dates="remove"`` (shifted when ``dates="shift"``, see below); AS ``000Y``;
  IS/DS ``0``; binary VRs two zero bytes. A sequence with ``D`` keeps its items, whose
  content is de-identified by the table and whose free text (LO, SH, UC, LT, ST, UT, PN,
  AE, UR) not in the table is replaced by dummies too.
* ``U`` – a UID is replaced by ``2.25.<int of HMAC-SHA256(secret, uid)[:16]>``:
  consistent across files and runs of one project, so references between files
  stay intact. Well-known UIDs (``1.2.840.10008.*``) are never mapped.
* ``K`` – kept (only through an option, e.g. ``retain_uids``); a kept sequence still
  has its items de-identified.
* ``C`` – cleaned (see *Options*).
* Combinations choose the least destructive action that keeps the file valid for its
  IOD (Type 1/2 are not in the table): ``X/Z`` → ``Z``, ``X/D`` → ``D``, ``Z/D`` → ``D``,
  ``X/Z/D`` → ``D``, ``X/Z/U*`` → ``U`` (the sequence is kept and the UIDs of its items
  are mapped by their own rows).

Overrides and extensions of the table
-------------------------------------
* PatientName and PatientID (at any depth) become the caller's pseudonym.
* Private attributes (odd groups) are removed everywhere, private creators included
  (the Retain Safe Private Option is not implemented).
* Group length elements ``(gggg,0000)`` are removed (retired; they would be stale).
* Curve groups ``50xx`` are removed (table row ``(50xx,xxxx)``); overlay groups ``60xx``
  are removed as a whole, not only Overlay Data/Comments as the table says, because an
  Overlay Plane without its data is invalid and Overlay Description/Label are free text.
* Safety net for attributes *not* in the table (and not private): PN → ``ANONYMOUS``;
  DA/DT → shifted (``dates="shift"``) or emptied (``dates="remove"``); LO, SH, UC, LT,
  ST, UT → cleaned like descriptors (below); elements whose VR is unknown (implicit VR
  or UN, and not in the data dictionary) → removed; everything else (CS, numbers, geometry,
  UIDs such as SOP Class UIDs, pixel data) is kept.
* File meta: MediaStorageSOPInstanceUID follows the new SOPInstanceUID;
  ImplementationClassUID/ImplementationVersionName name this writer; source/sending/
  receiving AE titles, presentation addresses and private information are removed.
  A file preamble is zeroed.
* Set: PatientIdentityRemoved ``YES``, DeidentificationMethod (one value per profile/
  option applied), DeidentificationMethodCodeSequence (CID 7050, scheme DCM) and
  LongitudinalTemporalInformationModified (``MODIFIED``/``REMOVED``).
* pydicom's value validation is switched off during :meth:`HeaderDeidentifier.deidentify`
  (and restored after), because pydicom logs the offending *value* of an invalid element;
  the setting is process-wide, so do not read DICOM in other threads meanwhile.
* Left as they are: BurnedInAnnotation and RecognizableVisualFeatures (the caller knows
  whether the pixels still show text or a face); ``FileDataset.filename`` (needed for
  deferred reads — never log it).

Options (PS3.15 E.3)
--------------------
* ``dates="shift"`` – Retain Longitudinal Temporal Information with Modified Dates
  (113107): every DA and DT value that survives the profile (including those with ``Z``
  or ``D``, e.g. PatientBirthDate, and those not in the table) is shifted by the
  per-patient ``date_offset_days``, which keeps every interval; times (TM) and the time
  part of DT are kept. Attributes whose action stays ``X`` are removed. A value that is
  not a valid date is emptied (it cannot be shifted).
* ``dates="remove"`` – no date option: ``X`` removes, ``Z`` empties, ``D`` writes the
  dummy; DA/DT not in the table are emptied (stay present, zero length).
* ``clean_descriptors=True`` (default) – Clean Descriptors Option (113105): rows with
  ``C`` in that column (StudyDescription, SeriesDescription, ProtocolName, comments …)
  are kept but cleaned: every value that the profile removes or replaces in the same
  dataset (names and their components, IDs, institution, station …) is deleted from the
  text, as are date-like strings, runs of ≥ 6 digits and e-mail addresses; a text that
  becomes empty gets the dummy. This is a heuristic: it cannot catch an identifier that
  appears only in free text.
* ``retain_uids=True`` – Retain UIDs Option (113110): UIDs are kept.
* ``retain_patient_characteristics=True`` – Retain Patient Characteristics Option
  (113108): age, sex, size, weight … kept; its ``C`` rows are cleaned as text.
* Not implemented (the basic profile applies): Retain Safe Private, Retain Device
  Identity, Retain Institution Identity, Retain Full Dates, Clean Structured Content,
  Clean Graphics. With several options the most retentive action wins (K > C > basic);
  ``C`` that cannot be carried out for a VR (e.g. binary) falls back to the basic action.

Nothing identifying is ever put in an exception message or a log line.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

__all__ = [
    "DEID_CODES",
    "DeidentificationError",
    "HeaderDeidentifier",
    "ProfileRow",
    "date_offset_days_for",
    "hmac_uid",
    "load_profile_table",
    "pseudonym_key",
    "shift_date",
    "shift_datetime",
]

#: CID 7050 "De-identification Method" codes (scheme DCM) used here, with their meanings.
DEID_CODES: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113102": "Clean Recognizable Visual Features Option",
    "113105": "Clean Descriptors Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113110": "Retain UIDs Option",
}
IMPLEMENTATION_VERSION_NAME = "DEIDSTUDY_0_1"
PSEUDONYM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WELL_KNOWN_UID_ROOT = "1.2.840.10008."
DUMMY_TEXT = "ANONYMIZED"
DUMMY_PN = "ANONYMOUS"
DUMMY_DATE = "19000101"
DUMMY_TIME = "000000"

_COMBINATIONS = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
_OPTION_COLUMNS = {
    "clean_descriptors": "cleanDescOpt",
    "retain_uids": "rtnUIDsOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
}
_TEXT_VRS = frozenset({"LO", "SH", "UC", "LT", "ST", "UT"})  # cleaned / safety net
_CLEANABLE_VRS = _TEXT_VRS | {"CS"}
_DUMMY_IN_D_SEQUENCE = _TEXT_VRS | {"PN", "AE", "UR"}
_TOKEN_VRS = frozenset({"PN", "LO", "SH", "UC", "AE"})  # values that become clean tokens
_DATE_VRS = frozenset({"DA", "DT"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
_FILE_META_REMOVED = (
    0x00020016,  # SourceApplicationEntityTitle
    0x00020017,  # SendingApplicationEntityTitle
    0x00020018,  # ReceivingApplicationEntityTitle
    0x00020026,  # SourcePresentationAddress
    0x00020027,  # SendingPresentationAddress
    0x00020028,  # ReceivingPresentationAddress
    0x00020100,  # PrivateInformationCreatorUID
    0x00020102,  # PrivateInformation
)
_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_GENERIC_PHI = re.compile(
    "|".join(
        [
            r"(?<!\d)(?:1[89]|20)\d\d[-./]?(?:0[1-9]|1[0-2])[-./]?(?:0[1-9]|[12]\d|3[01])(?!\d)",
            r"(?<!\d)\d{1,2}[-./]\d{1,2}[-./](?:\d{4}|\d\d)(?!\d)",
            rf"(?<![a-z0-9])\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS},?\s+\d{{2,4}}(?!\d)",
            rf"(?<![a-z]){_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}(?!\d)",
            r"(?<!\d)\d{6,}(?!\d)",
            r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
        ]
    ),
    re.IGNORECASE,
)
_SPACES = re.compile(r"\s{2,}")
# separators orphaned by a removal (the "^" of "Doe^John", an empty "()", a dangling ",")
_ORPHANS = re.compile(r"(?<![0-9A-Za-z])[\^=]+|[\^=]+(?![0-9A-Za-z])|\(\s*\)|\[\s*\]|\s+(?=[,;:.])")


class DeidentificationError(ValueError):
    """Bad input to header de-identification. Messages never contain identifiers."""


# ---------------------------------------------------------------------------
# keys, UIDs, dates


def _secret_bytes(project_secret: bytes | str) -> bytes:
    if isinstance(project_secret, str):
        project_secret = project_secret.encode("utf-8")
    if not isinstance(project_secret, bytes) or not project_secret:
        raise DeidentificationError("project_secret must be a non-empty str or bytes")
    return project_secret


def _hmac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def hmac_uid(uid: str, project_secret: bytes | str) -> str:
    """Map an instance UID to ``"2.25." + int(HMAC-SHA256(secret, uid)[:16])`` (≤ 44 chars).

    Deterministic for one secret, so that every reference to the same UID (in any
    file, at any sequence depth) maps to the same new UID. Surrounding spaces and NULs
    of the DICOM value are ignored.
    """
    digest = _hmac(_secret_bytes(project_secret), uid.strip(" \x00").encode("ascii", "replace"))
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def pseudonym_key(patient_id: str, project_secret: bytes | str) -> str:
    """Hex HMAC-SHA256 key of a patient identifier: stable within a project, not reversible.

    Use it (never the identifier) to look up a patient's pseudonym and date offset.
    """
    if not isinstance(patient_id, str):
        raise DeidentificationError("patient_id must be a str")
    return _hmac(_secret_bytes(project_secret), b"pseudonym-key\x00" + patient_id.encode()).hex()


def date_offset_days_for(patient_key: str, project_secret: bytes | str, max_days: int = 3650) -> int:
    """Per-patient date shift in days, deterministic, in ``[-max_days, -1]`` (never zero).

    ``patient_key`` should be :func:`pseudonym_key` of the patient, so that all of a
    patient's studies shift by the same number of days (intervals are kept).
    """
    if not isinstance(max_days, int) or isinstance(max_days, bool) or max_days < 1:
        raise DeidentificationError("max_days must be a positive int")
    digest = _hmac(_secret_bytes(project_secret), b"date-offset\x00" + str(patient_key).encode())
    return -(1 + int.from_bytes(digest[:8], "big") % max_days)


def shift_date(value: str, days: int) -> str | None:
    """Shift a DICOM DA value (``YYYYMMDD``, or legacy ``YYYY.MM.DD``) by ``days``.

    A range ``A-B`` (either side may be empty) is shifted side by side. Returns the new
    value, ``""`` for an empty value, or ``None`` if it is not a valid date.
    """
    value = value.strip()
    if "-" in value:
        parts = value.split("-")
        if len(parts) != 2:
            return None
        out = [shift_date(p, days) if p else "" for p in parts]
        return None if None in out else f"{out[0]}-{out[1]}"
    if not value:
        return ""
    digits = value.replace(".", "") if len(value) == 10 else value
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        d = _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        return (d + _dt.timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return None


def shift_datetime(value: str, days: int) -> str | None:
    """Shift the date part of a DICOM DT value (``YYYYMMDD[HHMMSS[.F]][&ZZXX]``) by ``days``.

    The time, fraction and UTC offset are kept. Returns ``""`` for an empty value and
    ``None`` if the value has no full date (e.g. year only) or is invalid.
    """
    value = value.strip()
    if not value:
        return ""
    head, rest = value[:8], value[8:]
    if rest and not (rest[0].isdigit() or rest[0] in "+-"):
        return None
    shifted = shift_date(head, days) if head.isdigit() else None
    return None if not shifted else shifted + rest


# ---------------------------------------------------------------------------
# the profile table


@dataclass(frozen=True)
class ProfileRow:
    """One row of PS3.15 Table E.1-1: ``key`` is ``ggggeeee`` (``x`` = masked hex digit)."""

    key: str
    keyword: str
    name: str
    basic: str
    options: dict[str, str]

    @property
    def is_masked(self) -> bool:
        """True for repeating-group rows such as ``(60xx,3000)``."""
        return "x" in self.key

    def mask_value(self) -> tuple[int, int]:
        """``(mask, value)`` such that a tag matches iff ``tag & mask == value``."""
        mask = int("".join("0" if c == "x" else "f" for c in self.key), 16)
        return mask, int(self.key.replace("x", "0"), 16)


def _table_path() -> Any:
    try:
        return resources.files("pipeline.data").joinpath("confidentiality_profile.json")
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual installs
        return Path(__file__).resolve().parent / "data" / "confidentiality_profile.json"


@functools.lru_cache(maxsize=4)
def _load_table_json(path: str | None) -> dict:
    src = Path(path) if path else _table_path()
    return json.loads(src.read_text(encoding="utf-8"))


def load_profile_table(path: str | Path | None = None) -> tuple[list[ProfileRow], ProfileRow]:
    """Load the project's confidentiality profile table.

    Returns ``(rows, private_row)``: the attribute rows (including masked repeating-group
    rows) and the row for private attributes (odd groups).
    """
    data = _load_table_json(str(path) if path else None)
    rows = [
        ProfileRow(key, e.get("keyword", ""), e["name"], e["basic"], dict(e.get("options", {})))
        for key, e in data["attributes"].items()
    ]
    p = data["private_attributes"]
    return rows, ProfileRow("private", "", p["name"], p["basic"], dict(p.get("options", {})))


# ---------------------------------------------------------------------------
# the de-identifier


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@functools.lru_cache(maxsize=512)
def _token_regex(tokens: frozenset[str]) -> re.Pattern[str] | None:
    if not tokens:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])", re.IGNORECASE)


class _Run:
    """State of one :meth:`HeaderDeidentifier.deidentify` call."""

    __slots__ = ("pseudonym", "offset", "tokens", "to_clean")

    def __init__(self, pseudonym: str, offset: int) -> None:
        self.pseudonym = pseudonym
        self.offset = offset
        self.tokens: set[str] = set()
        self.to_clean: list[DataElement] = []


class HeaderDeidentifier:
    """De-identify DICOM headers with the PS3.15 basic profile (see the module docstring).

    Parameters
    ----------
    project_secret
        Key of all HMACs (UIDs); the same secret gives the same UIDs across runs.
    dates
        ``"shift"`` (Retain Longitudinal Temporal Information with Modified Dates: shift
        every date by the per-patient offset) or ``"remove"``.
    clean_descriptors
        Clean Descriptors Option (default on).
    retain_uids
        Retain UIDs Option (default off).
    retain_patient_characteristics
        Retain Patient Characteristics Option (default off).
    retain_safe_private
        Must be False: private attributes are always removed.
    """

    def __init__(
        self,
        project_secret: bytes | str,
        *,
        dates: Literal["shift", "remove"] = "shift",
        clean_descriptors: bool = True,
        retain_uids: bool = False,
        retain_patient_characteristics: bool = False,
        retain_safe_private: bool = False,
        table_path: str | Path | None = None,
    ) -> None:
        self._secret = _secret_bytes(project_secret)
        if dates not in ("shift", "remove"):
            raise DeidentificationError('dates must be "shift" or "remove"')
        if retain_safe_private:
            raise DeidentificationError("the Retain Safe Private Option is not implemented")
        self.dates = dates
        self.clean_descriptors = bool(clean_descriptors)
        self.retain_uids = bool(retain_uids)
        self.retain_patient_characteristics = bool(retain_patient_characteristics)
        enabled = [col for opt, col in _OPTION_COLUMNS.items() if getattr(self, opt)]
        if dates == "shift":
            enabled.append("rtnLongModifDatesOpt")
        self._enabled_columns = tuple(enabled)

        rows, _private = load_profile_table(table_path)
        self.rows = rows
        self._actions: dict[int, str] = {}
        self._fallback: dict[int, str] = {}
        self._masked: list[tuple[int, int, str, str]] = []
        for row in rows:
            action, fallback = self._resolve(row)
            if row.is_masked:
                mask, value = row.mask_value()
                self._masked.append((mask, value, action, fallback))
            else:
                tag = int(row.key, 16)
                self._actions[tag] = action
                self._fallback[tag] = fallback
        # Extension: everything else in an overlay group goes with its Overlay Data.
        self._masked.append((0xFF000000, 0x60000000, "X", "X"))
        self._mask_cache: dict[int, tuple[str, str] | None] = {}
        self._uid_cache: dict[str, str] = {}

    # -- configuration -----------------------------------------------------

    def _resolve(self, row: ProfileRow) -> tuple[str, str]:
        basic = _COMBINATIONS.get(row.basic, row.basic)
        chosen = [row.options[c] for c in self._enabled_columns if c in row.options]
        if "K" in chosen:
            return "K", basic
        if "C" in chosen:
            return "C", basic
        return basic, basic

    def action_for(self, tag: int) -> str | None:
        """Resolved action (``X Z D U K C``) for a public tag, or None if not in the table.

        Combinations are already resolved and enabled options applied; see the module
        docstring. Private tags (odd groups) are always removed and return ``"X"``.
        """
        if (tag >> 16) & 1:
            return "X"
        found = self._lookup(tag)
        return None if found is None else found[0]

    def _lookup(self, tag: int) -> tuple[str, str] | None:
        action = self._actions.get(tag)
        if action is not None:
            return action, self._fallback[tag]
        if (tag >> 24) not in (0x50, 0x60):
            return None
        if tag in self._mask_cache:
            return self._mask_cache[tag]
        found = None
        for mask, value, act, fallback in self._masked:
            if tag & mask == value:
                found = (act, fallback)
                break
        self._mask_cache[tag] = found
        return found

    @property
    def method_codes(self) -> list[str]:
        """CID 7050 code values this configuration applies (without ``face_removed``)."""
        codes = ["113100"]
        if self.clean_descriptors:
            codes.append("113105")
        if self.dates == "shift":
            codes.append("113107")
        if self.retain_patient_characteristics:
            codes.append("113108")
        if self.retain_uids:
            codes.append("113110")
        return codes

    # -- mapping helpers ---------------------------------------------------

    def uid_map(self, uid: str) -> str:
        """The project's replacement for an instance UID (see :func:`hmac_uid`); cached.

        Well-known DICOM UIDs (``1.2.840.10008.*``) and empty values are returned as they are.
        """
        uid = str(uid).strip(" \x00")
        if not uid or uid.startswith(WELL_KNOWN_UID_ROOT):
            return uid
        new = self._uid_cache.get(uid)
        if new is None:
            if len(self._uid_cache) > 100_000:
                self._uid_cache.clear()
            new = self._uid_cache[uid] = hmac_uid(uid, self._secret)
        return new

    # -- the walk ----------------------------------------------------------

    def deidentify(
        self,
        ds: Dataset,
        *,
        pseudonym: str,
        date_offset_days: int = 0,
        face_removed: bool = False,
    ) -> None:
        """De-identify ``ds`` in place (file meta included).

        ``pseudonym`` becomes PatientName and PatientID (letters, digits, ``_ . -``; at
        most 64 characters). ``date_offset_days`` (days, non-zero, from
        :func:`date_offset_days_for`) shifts every date when ``dates="shift"`` and is
        ignored otherwise. ``face_removed`` says that the facial features were removed
        from the pixel data (adds code 113102).
        """
        if not isinstance(ds, Dataset):
            raise DeidentificationError("deidentify() needs a pydicom Dataset")
        if not isinstance(pseudonym, str) or not PSEUDONYM_RE.match(pseudonym):
            raise DeidentificationError(
                "pseudonym must be 1-64 characters of letters, digits, '_', '.', '-' "
                "starting with a letter or digit"
            )
        if isinstance(date_offset_days, bool) or not isinstance(date_offset_days, int):
            raise DeidentificationError("date_offset_days must be an int")
        if self.dates == "shift" and date_offset_days == 0:
            raise DeidentificationError(
                'dates="shift" needs a non-zero date_offset_days (see date_offset_days_for)'
            )
        run = _Run(pseudonym, date_offset_days)
        # pydicom logs and warns with the *value* of an invalid element when it converts
        # or sets it; values here are identifiers, so validation is off during the walk.
        settings = pydicom.config.settings
        saved = settings.reading_validation_mode, settings.writing_validation_mode
        settings.reading_validation_mode = pydicom.config.IGNORE
        settings.writing_validation_mode = pydicom.config.IGNORE
        try:
            old_sop_uid = self._top_level_uid(ds, 0x00080018)
            self._walk(ds, run, dummify=False)
            self._clean_texts(run)
            self._file_meta(ds, old_sop_uid)
            self._stamp(ds, face_removed)
        finally:
            settings.reading_validation_mode, settings.writing_validation_mode = saved
        if getattr(ds, "preamble", None):
            ds.preamble = b"\x00" * 128

    @staticmethod
    def _top_level_uid(ds: Dataset, tag: int) -> str | None:
        if tag not in ds._dict:
            return None
        value = ds[tag].value
        return str(value) if value else None

    def _walk(self, ds: Dataset, run: _Run, dummify: bool) -> None:
        store = ds._dict
        for tag in list(store):
            if tag & 0x10000 or not tag & 0xFFFF:  # private, or group length
                del ds[tag]
                continue
            found = self._lookup(tag)
            try:
                if found is None:
                    self._untabled(ds, tag, run, dummify)
                else:
                    self._apply(ds, tag, found[0], found[1], run, dummify)
            except DeidentificationError:
                raise
            except Exception as exc:  # conversion errors quote the value: do not chain it
                raise DeidentificationError(
                    f"cannot de-identify element ({tag >> 16:04X},{tag & 0xFFFF:04X}): "
                    f"{exc.__class__.__name__}"
                ) from None

    def _vr(self, tag: int, elem: DataElement | RawDataElement) -> str | None:
        """VR of an element; None when unknown (implicit or UN, and not in the dictionary)."""
        vr = elem.VR
        if vr is None or vr == "UN":
            return _dictionary_vr(tag)
        return vr

    def _collect(self, elem: DataElement, run: _Run) -> None:
        """Remember a value that the profile removes, to clean it out of free text."""
        value = elem.value
        if value is None or value == "":
            return
        values = value if isinstance(value, (MultiValue, list)) else (value,)
        for v in values:
            text = str(v).strip()
            if len(text) >= 3:
                run.tokens.add(text)
            if elem.VR == "PN":
                for word in re.split(r"[\^=\s,]+", text):
                    if len(word) >= 2:
                        run.tokens.add(word)

    def _apply(
        self, ds: Dataset, tag: int, action: str, fallback: str, run: _Run, dummify: bool
    ) -> None:
        raw = ds._dict[tag]
        vr = self._vr(tag, raw)
        if vr == "SQ":
            self._sequence(ds, tag, action, run, dummify)
            return
        if action == "X" or vr is None:  # vr None: implicit VR, unknown tag
            if vr in _TOKEN_VRS:
                self._collect(ds[tag], run)
            del ds[tag]
            return
        elem = ds[tag]
        vr = elem.VR
        if tag == _PATIENT_NAME or tag == _PATIENT_ID:
            self._collect(elem, run)
            elem.value = run.pseudonym
            return
        if vr in _DATE_VRS and self.dates == "shift":
            self._shift(elem, run)
            return
        if action == "C":
            if vr in _CLEANABLE_VRS:
                run.to_clean.append(elem)
                return
            if vr == "TM" and self.dates == "shift":
                return  # whole-day shifts keep times
            action = "D" if vr in ("PN", "AE", "UR") else fallback
            if action == "X":
                if vr in _TOKEN_VRS:
                    self._collect(elem, run)
                del ds[tag]
                return
        if action == "K":
            return
        if vr in _TOKEN_VRS:
            self._collect(elem, run)
        if action == "U" and vr == "UI":
            self._map_uids(elem)
        elif action == "Z":
            elem.value = _empty(vr)
        else:  # D, or U on something that is not a UI
            self._dummy(elem, vr)

    def _sequence(self, ds: Dataset, tag: int, action: str, run: _Run, dummify: bool) -> None:
        if action in ("X", "Z"):
            for item in ds[tag].value:
                self._collect_tree(item, run)
            if action == "X":
                del ds[tag]
            else:
                ds[tag].value = []
            return
        # D: keep the items with dummy content; U, K, C: keep and de-identify the items
        for item in ds[tag].value:
            self._walk(item, run, dummify or action == "D")

    def _collect_tree(self, ds: Dataset, run: _Run) -> None:
        """Collect clean tokens from a dataset that is about to be dropped (not private)."""
        for tag, raw in list(ds._dict.items()):
            if tag & 0x10000:
                continue
            vr = self._vr(tag, raw)
            if vr in _TOKEN_VRS:
                self._collect(ds[tag], run)
            elif vr == "SQ":
                for item in ds[tag].value:
                    self._collect_tree(item, run)

    def _untabled(self, ds: Dataset, tag: int, run: _Run, dummify: bool) -> None:
        raw = ds._dict[tag]
        vr = self._vr(tag, raw)
        if vr is None:  # implicit VR, unknown tag: cannot judge, remove
            del ds[tag]
            return
        if vr == "SQ":
            for item in ds[tag].value:
                self._walk(item, run, dummify)
            return
        if vr == "PN":
            elem = ds[tag]
            if elem.value:
                self._collect(elem, run)
                elem.value = DUMMY_PN
            return
        if vr in _DATE_VRS:
            elem = ds[tag]
            if self.dates == "shift":
                self._shift(elem, run)
            else:
                elem.value = ""
            return
        if vr in _TEXT_VRS:
            elem = ds[tag]
            if dummify:
                if elem.value:
                    self._dummy(elem, vr)
            else:
                run.to_clean.append(elem)
            return
        if dummify and vr in _DUMMY_IN_D_SEQUENCE:
            elem = ds[tag]
            if elem.value:
                self._dummy(elem, vr)

    # -- value changes -----------------------------------------------------

    def _shift(self, elem: DataElement, run: _Run) -> None:
        value = elem.value
        if value is None or value == "":
            return
        shift = shift_date if elem.VR == "DA" else shift_datetime
        values = list(value) if isinstance(value, MultiValue) else [value]
        out = [shift(str(v), run.offset) for v in values]
        if any(v is None for v in out):
            elem.value = ""  # cannot shift an invalid date: do not keep it
        else:
            elem.value = out if len(out) > 1 else out[0]

    def _map_uids(self, elem: DataElement) -> None:
        value = elem.value
        if isinstance(value, MultiValue):
            elem.value = [self.uid_map(v) for v in value]
        elif value:
            elem.value = self.uid_map(value)

    def _dummy(self, elem: DataElement, vr: str) -> None:
        if vr == "UI":
            old = elem.value
            elem.value = self.uid_map(old) if old else self.uid_map("deidstudy-dummy-uid")
        elif vr == "PN":
            elem.value = DUMMY_PN
        elif vr in ("DA", "DT"):
            elem.value = DUMMY_DATE
        elif vr == "TM":
            elem.value = DUMMY_TIME
        elif vr == "AS":
            elem.value = "000Y"
        elif vr in ("IS", "DS"):
            elem.value = "0"
        elif vr in _BINARY_VRS:
            elem.value = b"\x00\x00"
        elif vr in _NUMBER_VRS:
            elem.value = 0
        else:  # LO SH UC LT ST UT CS AE UR
            elem.value = DUMMY_TEXT

    def _clean_texts(self, run: _Run) -> None:
        if not run.to_clean:
            return
        tokens = _token_regex(frozenset(run.tokens))
        for elem in run.to_clean:
            value = elem.value
            if value is None or value == "":
                continue
            if isinstance(value, MultiValue):
                new = [_clean_text(str(v), tokens) for v in value]
                if new != list(value):
                    elem.value = [v if v else DUMMY_TEXT for v in new]
            else:
                new_text = _clean_text(str(value), tokens)
                if new_text != value:
                    elem.value = new_text if new_text else DUMMY_TEXT

    # -- file meta and stamps ----------------------------------------------

    def _file_meta(self, ds: Dataset, old_sop_uid: str | None) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        for tag in list(meta._dict):
            if tag in _FILE_META_REMOVED or (tag >> 16) != 0x0002:
                del meta[tag]
        media = meta.get("MediaStorageSOPInstanceUID")
        if "SOPInstanceUID" in ds and (media is None or str(media) == old_sop_uid):
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif media and not self.retain_uids:
            meta.MediaStorageSOPInstanceUID = self.uid_map(str(media))
        if len(meta):
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    def stamp(self, ds: Dataset, *, face_removed: bool) -> None:
        """(Re)write the de-identification method attributes of an already de-identified
        ``ds`` (e.g. once it is known whether the face was removed: code 113102)."""
        self._stamp(ds, face_removed)

    def _stamp(self, ds: Dataset, face_removed: bool) -> None:
        codes = self.method_codes
        if face_removed:
            codes.insert(1, "113102")
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [DEID_CODES[c] for c in codes]
        items = []
        for code in codes:
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = DEID_CODES[code]
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.dates == "shift" else "REMOVED"
        )


def _empty(vr: str) -> Any:
    if vr in _BINARY_VRS:
        return b""
    if vr in _NUMBER_VRS:
        return None
    return ""


def _clean_text(text: str, tokens: re.Pattern[str] | None) -> str:
    """Remove identifiers (collected ``tokens``) and date/ID/e-mail-like strings from text."""
    if tokens is not None:
        text = tokens.sub("", text)
    text = _GENERIC_PHI.sub("", text)
    text = _ORPHANS.sub("", text)
    return _SPACES.sub(" ", text).strip(" ,;:-")
