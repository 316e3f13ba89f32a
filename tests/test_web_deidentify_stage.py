"""The web's de-identification stage is the command line's series path (cases that drifted).

``surveys.processing.stages.stage_deidentify`` calls :func:`pipeline.deidentify.deidentify_series`:
a series without a face is written unchanged and not stamped 113102; an Enhanced
(multi-frame) CT series is written as classic single-frame slices; QA figures and the
QA picture are recorded.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from django.contrib.auth.models import User

from pipeline import dicom_io
from pipeline.synth import LABELS, SubjectParams, generate_head
from surveys.cohorts.importing import import_folder
from surveys.models import Cohort
from surveys.processing import stages
from tests.dicom_factory import enhanced_ct_dataset
from tests.factories.dicom_cohorts import fake_identity

SHAPE, SPACING = (48, 64, 60), (5.0, 4.0, 4.0)


def _meta(n: int) -> dict:
    ident = fake_identity(n)
    return {"PatientName": ident.patient_name, "PatientID": ident.patient_id,
            "PatientBirthDate": ident.birth_date, "StudyDate": "20240102", "Modality": "CT"}


@pytest.fixture()
def cohort(db, settings, tmp_path) -> Cohort:
    settings.DATA_DIR = tmp_path / "data"
    settings.PIPELINE_FACE_METHOD = "anatomical"
    head = generate_head(SubjectParams.random(11), shape=SHAPE, spacing_mm=SPACING, noise_seed=1)
    src = tmp_path / "src"
    # 1: an ordinary head
    dicom_io.write_datasets(dicom_io.volume_to_datasets(head.volume, series_meta=_meta(1)),
                            src / "p1" / "CT")
    # 2: a bare skull (a phantom without skin): no face
    hu = head.volume.hu.copy()
    bone = np.isin(head.labels, (LABELS["cortical_bone"], LABELS["cancellous_bone"], LABELS["teeth"]))
    hu[~bone] = -1000
    skull = head.volume.with_hu(hu)
    dicom_io.write_datasets(dicom_io.volume_to_datasets(skull, series_meta=_meta(2)), src / "p2" / "CT")
    # 3: the head as one Enhanced CT file
    ds = enhanced_ct_dataset(head.volume)
    for k, v in _meta(3).items():
        setattr(ds, k, v)
    (src / "p3" / "CT").mkdir(parents=True)
    pydicom.dcmwrite(src / "p3" / "CT" / "enhanced.dcm", ds, enforce_file_format=True)
    owner = User.objects.create_user("owner", password="pw")
    c = Cohort.objects.create(name="c", owner=owner)
    import_folder(c, src, move=True)
    return c


def _run(subject) -> None:
    stages.stage_deidentify(subject, stages.StageContext(progress=lambda f: None))


def _output(series):
    folder = stages.data_path(series.deid_dir)
    files = sorted(folder.glob("*.dcm"))
    return files, dicom_io.load_series(dicom_io.scan_folder(folder).series[0])


def _codes(path) -> list[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]


def test_web_stage_is_the_series_path(cohort) -> None:
    subjects = sorted(cohort.subjects.all(), key=lambda s: s.series.get().n_files)
    assert len(subjects) == 3
    by_kind = {}
    for subject in subjects:
        _run(subject)
        s = subject.series.get()
        s.refresh_from_db()
        original = stages.load_stored(s.original_dir)
        files, out = _output(s)
        by_kind[(s.n_files, s.face_found)] = (subject, s, original, files, out)

    assert set(by_kind) == {(1, True), (SHAPE[0], True), (SHAPE[0], False)}, [
        (k, v[1].no_face_reason, v[1].warnings) for k, v in by_kind.items()]
    # the Enhanced CT file (1 file) became 48 classic slices with the face removed
    subject, s, original, files, out = by_kind[(1, True)]
    assert len(files) == SHAPE[0]
    assert all(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == dicom_io.CT_IMAGE_STORAGE
               for f in files[:3])
    assert "113102" in _codes(files[0])
    assert s.removed_ml > 0 and s.qa["inside_soft_changed_pct"] == 0.0

    # the ordinary head: face removed, QA figures and picture recorded
    subject, s, original, files, out = by_kind[(SHAPE[0], True)]
    assert "113102" in _codes(files[0]) and s.removed_ml > 0
    assert s.qa["outside_body_changed_ml"] == 0.0 and s.bone_dice_150 == 1.0
    assert s.removed_by_region["nose"] > 0
    kinds = set(subject.images.values_list("kind", "view", "variant"))
    assert ("qa", "deface", "both") in kinds

    # the bare skull: written unchanged, "no face found", not stamped 113102
    subject, s, original, files, out = by_kind[(SHAPE[0], False)]
    assert s.face_found is False and "no face" in s.no_face_reason
    assert np.array_equal(out.volume.hu, original.volume.hu)
    assert "113102" not in _codes(files[0]) and "113100" in _codes(files[0])
    assert s.removed_ml == 0.0
    assert subject.images.filter(kind="qa").exists()  # to see for oneself that there is no face
    # no identifier in the written headers
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "FAKEPATIENT" not in str(ds.PatientName) and ds.PatientID == subject.pseudonym
