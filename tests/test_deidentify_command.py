"""End to end: ``manage.py deidentify`` on PHI-laden synthetic CT.

Runs the real command in a subprocess (exit status, stdout/stderr as a user
sees them) on a synthetic cohort whose headers and folder names carry fake
identities, then checks every output byte and path for leaks, the image
quality figures against the generator's ground truth, reproducibility, and
the behaviour on bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from django.core.management import call_command

from pipeline import dicom_io
from pipeline.synth import LABELS
from pipeline.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
BONE_HU = 300


def run_deidentify(*args: str | Path, var_dir: Path) -> subprocess.CompletedProcess:
    # a project secret of its own, as a real project has (without one, deidentify warns
    # on stderr about the development value, and "secret" is a planted name here)
    env = dict(os.environ, DEIDSTUDY_VAR_DIR=str(var_dir), DJANGO_SETTINGS_MODULE="deidstudy.settings",
               DEIDSTUDY_PROJECT_SECRET="test-deidentify-command-project-key-0123456789")
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "deidentify", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False,
    )


def make_dicom_cohort(out: Path, *, subjects: int, seed: int, **kw) -> dict:
    call_command("synth_cohort", str(out), subjects=subjects, seed=seed, size="small", verbosity=0, **kw)
    return json.loads((out / "phi.json").read_text())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Three subjects: two plain, one RLE-compressed with shuffled file names."""
    base = tmp_path_factory.mktemp("cohort")
    plain = make_dicom_cohort(base / "plain", subjects=2, seed=11)
    rle = make_dicom_cohort(base / "rle", subjects=1, seed=21, compress="rle", shuffle=True)
    inp = base / "input with spaces é"
    inp.mkdir()
    subjects = []
    for src, doc in ((base / "plain", plain), (base / "rle", rle)):
        for s in doc["subjects"]:
            target = inp / Path(s["dicom_folder"]).name
            shutil.move(src / s["dicom_folder"], target)
            subjects.append({**s, "input": target, "truth_path": src / s["truth"]})
    out, var = base / "out", base / "var"
    mapping = base / "mapping.json"
    proc = run_deidentify(inp, out, "--mapping", mapping, var_dir=var)
    return {"input": inp, "out": out, "var": var, "mapping": mapping, "proc": proc,
            "subjects": subjects, "base": base}


def identifiers(cohort: dict) -> list[str]:
    ids: set[str] = set()
    for s in cohort["subjects"]:
        ids.update(i for i in s["identifiers"] if len(i) >= 4)
    return sorted(ids)


def test_every_series_written(cohort):
    proc = cohort["proc"]
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((cohort["out"] / "deid-summary.json").read_text())
    assert summary["n_written"] == 3 and summary["n_failed"] == 0
    assert sorted(p.name for p in cohort["out"].iterdir()) == [
        "SUBJ-0001", "SUBJ-0002", "SUBJ-0003", "deid-summary.json", "qa-pictures"]
    assert "do not share" in summary["qa_pictures"]
    for s in summary["series"]:
        assert s["method"] and s["removed_ml"] > 0 and s["bone_dice"] >= 0.99
        assert s["face_found"] is True
        assert (cohort["out"] / s["output"]).is_dir()
        assert (cohort["out"] / s["qa_picture"]).is_file()
        qa = s["qa"]
        assert qa["inside_soft_changed_pct"] == 0.0 and qa["outside_body_changed_ml"] == 0.0
        assert qa["bone_dice_150"] >= 0.99 and sum(qa["removed_ml_by_region"].values()) > 0
        assert qa["nose_check"]["removed_pct"] >= 90.0 and not qa["nose_check"]["nose_may_be_left"]
    assert proc.stdout.count("% removed") == 3 and "REVIEW" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_nose_that_may_be_left_asks_for_review():
    """The summary line carries the nose check; when the nose may be left, a REVIEW line
    (for stderr) repeats the warning."""
    from pipeline.deidentify import SeriesOutcome
    from surveys.management.commands.deidentify import series_lines

    warning = ("only 70 % of the soft tissue outside the facial skeleton in the detector's "
               "nose region (10.3 mL) was removed: the nose may be left; review this series")
    s = SeriesOutcome(index=0, n_files=140, status="written", output="SUBJ-0001/CT-1",
                      slices=140, method="auto", removed_ml=180.0, bone_dice=1.0,
                      face_found=True, warnings=[warning],
                      qa={"inside_soft_changed_pct": 0.0, "outside_body_changed_ml": 0.0,
                          "nose_check": {"outside_ml": 10.3, "inside_ml": 3.2, "removed_pct": 70.4,
                                         "nose_may_be_left": True, "source": "detector"}})
    line, review = series_lines(s)
    assert line.endswith("nose check 70 % removed, 1 warning(s)")
    assert review == f"REVIEW SUBJ-0001/CT-1: the nose may be left — {warning}"
    s.qa["nose_check"].update(removed_pct=99.6, nose_may_be_left=False)
    s.warnings = []
    assert series_lines(s) == (line.replace("70 %", "100 %").replace(", 1 warning(s)", ""), None)


def test_a_cast_on_the_face_asks_for_review():
    """A series on whose face the envelope found a mask, splint or cast: its QA warning comes
    back as a REVIEW line, after the nose check's when both apply."""
    from pipeline.deface import FACE_SHELL_NOTE
    from pipeline.deidentify import SeriesOutcome
    from surveys.management.commands.deidentify import series_lines

    shell = (f"{FACE_SHELL_NOTE} (24.0 mL, not counted as skeleton): it was removed with the face "
             "where it lies outside the skeleton's hull; where it meets the bone part of it may "
             "stay and keep the face under it; review this series")
    nose = ("only 70 % of the soft tissue outside the facial skeleton in the detector's "
            "nose region (10.3 mL) was removed: the nose may be left; review this series")
    check = {"outside_ml": 10.3, "inside_ml": 3.2, "removed_pct": 99.8,
             "nose_may_be_left": False, "source": "detector"}
    s = SeriesOutcome(index=0, n_files=140, status="written", output="SUBJ-0002/CT-1",
                      slices=140, method="auto", removed_ml=180.0, bone_dice=1.0,
                      face_found=True, warnings=[shell],
                      qa={"inside_soft_changed_pct": 0.0, "outside_body_changed_ml": 0.0,
                          "nose_check": check})
    assert series_lines(s)[1] == f"REVIEW SUBJ-0002/CT-1: {shell}"
    check.update(removed_pct=70.4, nose_may_be_left=True)
    s.warnings = [nose, shell]
    assert series_lines(s)[1] == (f"REVIEW SUBJ-0002/CT-1: the nose may be left — {nose} | "
                                  f"{shell}")


def test_no_identifier_in_any_output_byte_path_or_message(cohort):
    ids = identifiers(cohort)
    assert len(ids) > 20
    needles = set()
    for ident in ids:
        for form in (ident, ident.replace("^", " "), ident.replace("_", " ")):
            needles.add(form.encode("utf-8").lower())
    hits = []
    files = [p for p in cohort["out"].rglob("*")]
    assert len(files) > 100
    for p in files:
        rel = str(p.relative_to(cohort["out"])).encode().lower()
        hits += [(str(p.name), n) for n in needles if n in rel]
        if p.is_file():
            data = p.read_bytes().lower()
            hits += [(p.name, n) for n in needles if n in data]
    text = (cohort["proc"].stdout + cohort["proc"].stderr).encode().lower()
    hits += [("terminal", n) for n in needles if n in text]
    assert hits == []
    # Original UIDs do not survive either.
    for s in cohort["subjects"]:
        uid = s["series_instance_uid"].encode()
        assert all(uid not in p.read_bytes() for p in files if p.is_file())
    # ... while the mapping file (outside the output) holds the link.
    mapping = json.loads(cohort["mapping"].read_text())
    assert {r["PatientID"] for r in mapping["series"]} == {s["phi"]["patient_id"] for s in cohort["subjects"]}


def test_headers_are_deidentified(cohort):
    for path in cohort["out"].glob("SUBJ-*/S01/IM00001.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.PatientName == ds.PatientID == path.parent.parent.name
        assert ds.PatientIdentityRemoved == "YES"
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert {"113100", "113102"} <= codes
        assert ds.StudyInstanceUID.startswith("2.25.")
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def _read_sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _volume(folder: Path) -> Volume:
    scan = dicom_io.scan_folder(folder)
    assert len(scan.series) == 1 and not scan.problems
    return dicom_io.load_series(scan.series[0]).volume


def test_output_geometry_read_back_by_simpleitk(cohort):
    mapping = json.loads(cohort["mapping"].read_text())
    for row in mapping["series"]:
        src = cohort["input"] / row["input_folder"]
        out = cohort["out"] / row["output"]
        a, b = _read_sitk(src), _read_sitk(out)
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
        va, vb = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
        ours = _volume(out).hu
        np.testing.assert_array_equal(vb, ours)  # our reader and SimpleITK agree on the output
        bone = va >= BONE_HU
        np.testing.assert_array_equal(va[bone], vb[bone])  # bone bit-identical


def test_face_removed_bone_and_brain_kept(cohort):
    mapping = json.loads(cohort["mapping"].read_text())
    by_folder = {s["input"].name: s for s in cohort["subjects"]}
    for row in mapping["series"]:
        subject = by_folder[Path(row["input_folder"]).parts[0]]
        truth = np.load(subject["truth_path"])
        before = _volume(cohort["input"] / row["input_folder"]).hu
        after = _volume(cohort["out"] / row["output"]).hu
        assert before.shape == truth["labels"].shape
        bone_b, bone_a = before > BONE_HU, after > BONE_HU
        dice = 2 * np.sum(bone_b & bone_a) / (bone_b.sum() + bone_a.sum())
        assert dice >= 0.99
        face = truth["face_soft_tissue_mask"]
        assert np.mean(after[face] < -500) >= 0.99
        for code, name in ((3, "nose"), (4, "lips")):
            feature = (truth["feature_ids"] == code) & face
            assert feature.sum() > 10, name
            assert np.mean(after[feature] < -500) >= 0.99, name
        brain = np.isin(truth["labels"], [LABELS["grey_matter"], LABELS["white_matter"]])
        np.testing.assert_array_equal(before[brain], after[brain])
        inside = (truth["structures"] > 0) & truth["inside_hull_3mm"]
        assert inside.sum() > 1000
        np.testing.assert_array_equal(before[inside], after[inside])  # globes, sinuses, mouth …


def test_rerun_gives_the_same_uids_and_pseudonyms(cohort, tmp_path):
    out2 = tmp_path / "again"
    proc = run_deidentify(cohort["input"], out2, var_dir=cohort["var"])
    assert proc.returncode == 0, proc.stderr

    def uids(root: Path) -> dict[str, tuple[str, str]]:
        res = {}
        for p in sorted(root.glob("SUBJ-*/S*/*.dcm")):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            res[str(p.relative_to(root))] = (ds.SOPInstanceUID, ds.StudyDate)
        return res

    first, second = uids(cohort["out"]), uids(out2)
    assert first and first == second


def test_dates_remove(cohort, tmp_path):
    subject_dir = cohort["subjects"][0]["input"]
    proc = run_deidentify(subject_dir, tmp_path / "out", "--dates", "remove", var_dir=tmp_path / "var")
    assert proc.returncode == 0, proc.stderr
    ds = pydicom.dcmread(next((tmp_path / "out").glob("SUBJ-*/S01/IM00001.dcm")))
    assert ds.get("StudyDate", "") in ("", "19000101")
    assert ds.get("PatientBirthDate", "") in ("", "19000101")


# ------------------------------------------------------------------ bad input


@pytest.fixture()
def one_subject(cohort, tmp_path) -> Path:
    """A writable copy of one subject's series inside a folder named after the patient."""
    src = cohort["subjects"][0]["input"]
    dst = tmp_path / "in" / src.name
    shutil.copytree(src, dst)
    return dst


def _assert_clean(proc: subprocess.CompletedProcess, cohort: dict) -> None:
    text = (proc.stdout + proc.stderr).lower()
    assert "traceback" not in text
    for ident in identifiers(cohort):
        assert ident.lower() not in text, "identifier in a message"


def _no_partial_output(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_junk_and_empty_files_are_listed_not_fatal(cohort, one_subject, tmp_path):
    (one_subject / "notes.txt").write_text("not dicom at all")
    (one_subject / "empty").write_bytes(b"")
    out = tmp_path / "out"
    mapping = tmp_path / "map.json"
    proc = run_deidentify(one_subject.parent, out, "--mapping", mapping, var_dir=tmp_path / "var")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 file(s): not a DICOM file" in proc.stderr
    assert "empty" in proc.stderr
    skipped = json.loads(mapping.read_text())["skipped_files"]
    assert sorted(Path(s["path"]).name for s in skipped) == ["empty", "notes.txt"]
    _assert_clean(proc, cohort)


def test_truncated_file_fails_the_run_and_writes_nothing_half(cohort, one_subject, tmp_path):
    victim = sorted(one_subject.rglob("*.dcm"))[10]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = run_deidentify(one_subject.parent, out, var_dir=tmp_path / "var")
    assert proc.returncode != 0
    assert "truncated" in proc.stderr.lower()
    assert "missing slices" in proc.stderr.lower()
    assert list(out.glob("SUBJ-*")) == []
    _no_partial_output(out)
    _assert_clean(proc, cohort)


def test_missing_slice_and_mr_series(cohort, one_subject, tmp_path):
    # A second, good subject beside the bad ones must still be written.
    good = cohort["subjects"][1]["input"]
    shutil.copytree(good, one_subject.parent / good.name)
    files = sorted(one_subject.rglob("*.dcm"), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    files[len(files) // 2].unlink()
    hu = np.full((6, 32, 32), -1000, np.int16)
    mr = dicom_io.volume_to_datasets(Volume(hu=hu, spacing_mm=(2, 2, 2)),
                                     series_meta={"Modality": "MR", "PatientName": "Mrname^Secret"})
    dicom_io.write_datasets(mr, one_subject.parent / "Mrname Secret MR")
    out = tmp_path / "out"
    proc = run_deidentify(one_subject.parent, out, var_dir=tmp_path / "var")
    assert proc.returncode != 0
    assert "missing slice" in proc.stderr.lower()
    assert "modality is mr, only ct is supported" in proc.stderr.lower()
    assert "2 series failed" in proc.stderr
    assert "secret" not in (proc.stdout + proc.stderr).lower()
    written = list(out.glob("SUBJ-*/S*"))
    assert len(written) == 1 and len(list(written[0].iterdir())) == 64
    _no_partial_output(out)
    _assert_clean(proc, cohort)


def test_mixed_series_in_one_folder(cohort, tmp_path):
    mixed = tmp_path / "in" / "all in one"
    mixed.mkdir(parents=True)
    for n, s in enumerate(cohort["subjects"][:2]):
        for p in s["input"].rglob("*.dcm"):
            shutil.copy(p, mixed / f"{n}-{p.name}")
    proc = run_deidentify(mixed, tmp_path / "out", var_dir=tmp_path / "var")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out").glob("SUBJ-*/S01"))) == 2


def test_mapping_inside_output_is_refused(cohort, one_subject, tmp_path):
    out = tmp_path / "out"
    proc = run_deidentify(one_subject.parent, out, "--mapping", out / "map.json", var_dir=tmp_path / "v")
    assert proc.returncode != 0
    assert "mapping file must not be written inside the output folder" in proc.stderr
    assert not (out / "map.json").exists()


def test_empty_input_and_missing_input(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_deidentify(tmp_path / "empty", tmp_path / "out", var_dir=tmp_path / "v")
    assert proc.returncode != 0 and "no CT series found" in proc.stderr
    proc = run_deidentify(tmp_path / "nope", tmp_path / "out2", var_dir=tmp_path / "v")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_enhanced_ct_is_written_as_classic_slices(tmp_path):
    """A multi-frame (Enhanced CT) input, frames out of order, comes out as classic
    single-frame CT slices holding the same (defaced) volume and geometry."""
    from pipeline.deidentify import DeidOptions, deidentify_folder
    from pipeline.synth import SubjectParams, generate_head
    from tests.dicom_factory import enhanced_ct_dataset

    head = generate_head(SubjectParams.random(5), shape=(64, 80, 80), spacing_mm=(3.75, 3.0, 3.0),
                         noise_seed=5)
    order = [int(k) for k in np.random.default_rng(0).permutation(head.volume.shape[0])]
    ds = enhanced_ct_dataset(head.volume, frame_order=order)
    src = tmp_path / "in" / "DOE JANE enhanced"
    src.mkdir(parents=True)
    ds.save_as(src / "multiframe.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    summary = deidentify_folder(tmp_path / "in", out, DeidOptions(project_secret="s", method="anatomical"))
    assert summary.ok, [s.error for s in summary.series]
    files = sorted(out.glob("SUBJ-0001/S01/*.dcm"))
    assert len(files) == head.volume.shape[0]
    first = pydicom.dcmread(files[0])
    assert first.SOPClassUID == dicom_io.CT_IMAGE_STORAGE and "NumberOfFrames" not in first
    assert b"DOE" not in b"".join(p.read_bytes() for p in files)
    assert len({pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}) == len(files)
    after = _volume(out / "SUBJ-0001" / "S01")
    np.testing.assert_allclose(after.origin_lps_mm, head.volume.origin_lps_mm, atol=1e-3)
    np.testing.assert_allclose(after.spacing_mm, head.volume.spacing_mm, atol=1e-4)
    bone = head.volume.hu >= BONE_HU
    np.testing.assert_array_equal(after.hu[bone], head.volume.hu[bone])
    assert np.mean(after.hu[head.face_soft_tissue_mask] < -500) >= 0.95
    img = _read_sitk(out / "SUBJ-0001" / "S01")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), after.hu)


def test_unusable_detector_weights_fail_fast(cohort, one_subject, tmp_path):
    junk = tmp_path / "weights.onnx"
    junk.write_bytes(b"this is not an onnx model")
    out = tmp_path / "out"
    proc = run_deidentify(one_subject.parent, out, "--method", "model", "--weights", junk,
                          var_dir=tmp_path / "v")
    assert proc.returncode != 0
    assert "CommandError" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.glob("SUBJ-*"))
    _assert_clean(proc, cohort)
