"""Small synthetic DICOM cohorts with fake identities, for the tests and the end-to-end runs.

Each subject is a :func:`pipeline.synth.generate_head` volume written with
:func:`pipeline.dicom_io.volume_to_datasets`, in ``<out>/<fake patient name>/CT/``
— folder and header names are fake identities, so the import and the
de-identification have something to remove. ``FAKE_MARKER`` appears in every fake
PatientName so a test can search for leaks.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import dicom_io
from pipeline.synth import SubjectParams, generate_head

FAKE_MARKER = "FAKEPATIENT"

#: Volume sizes (slices, rows, columns) and spacing (mm) by name.
SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "tiny": ((40, 48, 48), (6.0, 5.0, 5.0)),
    "small": ((64, 80, 80), (3.75, 3.0, 3.0)),
    "medium": ((80, 96, 96), (3.0, 2.5, 2.5)),
}


@dataclass(frozen=True)
class FakeIdentity:
    """Fake header identity of a synthetic subject."""

    patient_id: str
    patient_name: str
    birth_date: str


def fake_identity(n: int) -> FakeIdentity:
    """A deterministic fake identity for subject number ``n`` (contains :data:`FAKE_MARKER`)."""
    first = ["Anna", "Bert", "Carla", "Dirk", "Eva", "Frank", "Greta", "Hugo", "Iris", "Jonas",
             "Karin", "Lars", "Mona", "Nils", "Olga", "Paul"][n % 16]
    return FakeIdentity(patient_id=f"MRN{731200 + 17 * n:07d}",
                        patient_name=f"{FAKE_MARKER}{n:02d}^{first}",
                        birth_date=f"19{50 + n % 40:02d}0{1 + n % 9}1{n % 10}")


def write_synthetic_cohort(out: Path, n_subjects: int, *, size: str = "tiny", seed: int = 1,
                           ) -> list[FakeIdentity]:
    """Write ``n_subjects`` synthetic head CT series under ``out``; returns their identities."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    shape, spacing = SIZES[size]
    out = Path(out)
    idents = []
    for n in range(n_subjects):
        ident = fake_identity(n)
        head = generate_head(SubjectParams.random(seed * 1000 + n), shape=shape, spacing_mm=spacing,
                             noise_seed=seed * 1000 + n)
        meta = {"PatientName": ident.patient_name, "PatientID": ident.patient_id,
                "PatientBirthDate": ident.birth_date, "InstitutionName": "FAKE GENERAL HOSPITAL",
                "StudyDate": "20240102", "SeriesDescription": "HEAD CT", "SeriesNumber": 2,
                "Modality": "CT"}
        datasets = dicom_io.volume_to_datasets(head.volume, series_meta=meta)
        folder = out / ident.patient_name.replace("^", "_") / "CT"
        dicom_io.write_datasets(datasets, folder)
        idents.append(ident)
    return idents


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip every file below ``folder`` (relative names) into ``zip_path``."""
    folder, zip_path = Path(folder), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return zip_path
