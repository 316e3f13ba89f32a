"""A face the anatomy cannot locate, the detector can (pipeline.face_model.AutoFaceRegion).

Domain head 28001 (a child, one of the detector's held-out domain subjects): 56 mL of soft
tissue stands in front of the skeleton, but the anatomical method locates no eyes or nose, so
it refuses (nothing is written: better than a face left in). The detector finds nose, eyes and
lips there; ``auto`` then removes its boxes (outside the skeleton's hull, as always) instead of
refusing. Before: ``auto`` refused too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import dicom_io
from pipeline.deface import deface
from pipeline.deidentify import DeidOptions, deidentify_folder, make_face_method
from tests.factories.dicom_cohorts import fake_identity


@pytest.fixture(scope="module")
def head():
    from pipeline.detector_data import domain_head

    return domain_head(28001)


def test_anatomy_refuses_auto_takes_the_detectors_face(head) -> None:
    anat = deface(head.volume, make_face_method("anatomical")[0])
    assert not anat.qa.face_found and anat.region.envelope.doubtful
    assert "could be located" in anat.qa.no_face_reason
    res = deface(head.volume, make_face_method("auto")[0])
    assert res.qa.face_found
    assert any("detector's boxes were removed" in w for w in res.qa.warnings)
    changed = res.hu != head.volume.hu
    fm = head.feature_masks
    face = head.face_soft_tissue_mask
    assert changed[face].mean() >= 0.99 and changed[face & fm["nose"]].mean() >= 0.99
    assert sum(int((changed & m).sum()) for m in head.inside_masks().values()) == 0
    assert not (changed & head.brain_mask).any()


def test_deidentify_writes_it_with_auto_and_refuses_with_anatomical(head, tmp_path: Path) -> None:
    ident = fake_identity(5)
    meta = {"PatientName": ident.patient_name, "PatientID": ident.patient_id,
            "PatientBirthDate": ident.birth_date, "StudyDate": "20240102", "Modality": "CT"}
    src = tmp_path / "src"
    dicom_io.write_datasets(dicom_io.volume_to_datasets(head.volume, series_meta=meta), src / "CT")
    out = tmp_path / "anat"
    summary = deidentify_folder(src, out, DeidOptions(method="anatomical", project_secret="s"),
                                registry_path=tmp_path / "r1.json")
    (s,) = summary.series
    assert s.status == "failed" and "nothing written" in s.error
    assert not list(out.rglob("*.dcm"))
    out = tmp_path / "auto"
    summary = deidentify_folder(src, out, DeidOptions(method="auto", project_secret="s"),
                                registry_path=tmp_path / "r2.json")
    (s,) = summary.series
    assert s.status == "written" and s.face_found, s.error
    assert len(list(out.rglob("*.dcm"))) == head.volume.hu.shape[0]
