"""The ``DATA_DIR`` layout: the one module that spells folder names.

Paths stored in the database and used as shared-storage keys are ``DATA_DIR``-relative
strings with ``/`` separators; they carry cohort numbers and pseudonyms only, never a
patient identifier::

    cohorts/cNNNNN/                          a cohort (:func:`cohort_dir`)
        orig/<pseudonym>/<Snn>/              imported original series (DICOM)
        deid/<pseudonym>/<Snn>/              de-identified series (DICOM)
        derived/<pseudonym>/<stage>/         a stage's outputs (PNGs, meshes, JSON)
        derived/<file>                       cohort-wide outputs (e.g. ``reid-cmc.png``)
    uploads/                                 staging folders of browser uploads
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings

SUBJECT_PARTS = ("orig", "deid", "derived")


class StorageError(ValueError):
    """A stored path is not acceptable (e.g. it leaves ``DATA_DIR``); no identifiers."""


def data_root() -> Path:
    """The resolved ``settings.DATA_DIR``."""
    return Path(settings.DATA_DIR).resolve()


def data_path(rel: str) -> Path:
    """Absolute path of a ``DATA_DIR``-relative path (refuses escaping it)."""
    root = data_root()
    p = (root / rel).resolve()
    if root != p and root not in p.parents:
        raise StorageError("stored path lies outside the data folder")
    return p


def cohort_dir(cohort_id: int) -> str:
    """``DATA_DIR``-relative folder of cohort ``cohort_id``: ``cohorts/cNNNNN``."""
    return f"cohorts/c{int(cohort_id):05d}"


def cohort_part(cohort_id: int, part: str, pseudonym: str = "") -> str:
    """``cohorts/cNNNNN/<part>[/<pseudonym>]`` for ``part`` in orig, deid, derived."""
    if part not in SUBJECT_PARTS or "/" in pseudonym or pseudonym.startswith("."):
        raise ValueError(f"not a cohort folder: {part!r}")
    rel = f"{cohort_dir(cohort_id)}/{part}"
    return f"{rel}/{pseudonym}" if pseudonym else rel


def cohort_derived_file(cohort_id: int, name: str) -> str:
    """A cohort-wide output file: ``cohorts/cNNNNN/derived/<name>``."""
    if "/" in name or name.startswith("."):
        raise ValueError(f"not a cohort output file: {name!r}")
    return f"{cohort_part(cohort_id, 'derived')}/{name}"


def subject_folder(subject: Any, name: str) -> str:
    """``DATA_DIR``-relative folder ``name`` of ``subject``: ``orig``, ``deid`` or
    ``derived/<stage>`` → ``cohorts/cNNNNN/<orig|deid|derived>/<pseudonym>[/<stage>]``.

    ``subject`` is a :class:`surveys.models.Subject` (``cohort_id`` and ``pseudonym``).
    """
    part, _, sub = name.partition("/")
    if part not in SUBJECT_PARTS or (part == "derived") != bool(sub) \
            or "/" in sub or sub.startswith("."):
        raise ValueError(f"not a subject folder: {name!r}")
    rel = cohort_part(subject.cohort_id, part, subject.pseudonym)
    return f"{rel}/{sub}" if sub else rel
