"""The ``DATA_DIR`` layout: the one module that spells folder names.

Paths stored in the database and used as shared-storage keys are ``DATA_DIR``-relative
strings with ``/`` separators; they carry cohort numbers and pseudonyms only, never a
patient identifier::

    cohorts/cNNNNN/                          a cohort (:func:`cohort_dir`)
        orig/<pseudonym>/<Snn>/              imported original series (DICOM)
        deid/<pseudonym>/<Snn>/              de-identified series (DICOM)
        derived/<pseudonym>/<stage>/         a stage's outputs (PNGs, meshes, JSON)
        derived/<file>                       cohort-wide outputs (e.g. ``reid-cmc.png``)
    studies/sNNNNN/r<render id>.png          a study's frozen, metadata-free render copies
    tmp/                                     scratch: upload staging, import work folders
    cache/viewer/cNNNNN/…                    viewer data (rebuilt on demand, evictable)
    cache/thumbs/cNNNNN/                     QA grid thumbnails (rebuilt on demand)
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


def study_snapshot(study_id: int, render_id: int) -> str:
    """A study's frozen copy of a render: ``studies/sNNNNN/r<render id>.png``."""
    return f"studies/s{int(study_id):05d}/r{int(render_id)}.png"


def tmp_root() -> Path:
    """Private scratch folder ``DATA_DIR/tmp`` (same file system as the cohort store:
    moving from it into a cohort is a rename), created if missing."""
    root = data_root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def viewer_cache_root() -> Path:
    """``DATA_DIR/cache/viewer``: the viewers' cached series data."""
    return data_root() / "cache" / "viewer"


def thumbs_root() -> Path:
    """``DATA_DIR/cache/thumbs``: the QA grids' cached thumbnails, one folder per cohort."""
    return data_root() / "cache" / "thumbs"


def thumbs_dir(cohort_id: int) -> Path:
    """``DATA_DIR/cache/thumbs/cNNNNN``: a cohort's cached QA thumbnails."""
    return thumbs_root() / f"c{int(cohort_id):05d}"


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
