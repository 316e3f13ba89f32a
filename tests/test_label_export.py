"""manage.py label_export: a pre-labelled YOLO dataset of a group's own CT, for CVAT."""

from __future__ import annotations

import zipfile
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from pipeline.detector_data import CLASSES
from pipeline.synth import SubjectParams, generate_head
from pipeline.synth_phi import FakePHI, write_synthetic_series


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    """One synthetic head written as DICOM with fake identifiers in folder and headers."""
    root = tmp_path_factory.mktemp("in")
    phi = FakePHI.random(31)
    head = generate_head(SubjectParams.random(313131), shape=(44, 128, 128), spacing_mm=(4.0, 1.9, 1.9),
                         noise_seed=3)
    write_synthetic_series(head, phi, root / f"{phi.patient_last}_{phi.patient_id}")
    return root, phi, head


def _read_labels(path: Path) -> list[tuple[int, float, float, float, float]]:
    rows = []
    for line in path.read_text().splitlines():
        c, *v = line.split()
        rows.append((int(c), *map(float, v)))
    return rows


def test_export_writes_prelabelled_yolo_dataset_without_identifiers(ct_folder, tmp_path, settings):
    root, phi, head = ct_folder
    settings.VAR_DIR = tmp_path / "var"
    out = tmp_path / "export"
    stdout = StringIO()
    call_command("label_export", str(root), str(out), "--no-model", stdout=stdout)
    assert "1 series" in stdout.getvalue()
    imgs = sorted((out / "images" / "train").glob("*.png"))
    assert len(imgs) >= 10
    names = [p.name for p in imgs]
    assert all(n.startswith("series-01_slice-") for n in names)
    # no identifier anywhere in names or text files
    texts = [p.read_text() for p in out.rglob("*") if p.suffix in (".txt", ".json", ".yaml")]
    for ident in phi.identifiers():
        assert not any(ident in n for n in names)
        assert not any(ident in t for t in texts), ident
    # pre-labels: a face box on the face's slices, eyes where the globes are; normalised YOLO rows
    face_id, eye_id = CLASSES.index("face"), CLASSES.index("eyes")
    rows = {p.stem: _read_labels(out / "labels" / "train" / f"{p.stem}.txt") for p in imgs}
    assert sum(any(r[0] == face_id for r in v) for v in rows.values()) >= 8
    assert any(r[0] == eye_id for v in rows.values() for r in v)
    for v in rows.values():
        for c, x, y, w, h in v:
            assert 0 <= c < len(CLASSES) and 0 <= x - w / 2 and x + w / 2 <= 1.0001 and 0 < w and 0 < h
    # the eye pre-labels lie on the generator's eyes
    for p in imgs:
        k = int(p.stem.split("-")[-1])
        for c, x, y, w, h in rows[p.stem]:
            if c == eye_id:
                n = head.volume.hu.shape[1]
                j, i = int(y * n), int(x * n)
                assert head.feature_masks["eyes"][max(0, k - 1):k + 2, max(0, j - 8):j + 8, max(0, i - 8):i + 8].any()
    # CVAT "YOLO 1.1" bundle
    with zipfile.ZipFile(out / "cvat-yolo.zip") as z:
        members = set(z.namelist())
        assert {"obj.names", "obj.data", "train.txt"} <= members
        assert z.read("obj.names").decode().split() == list(CLASSES)
        assert len([m for m in members if m.startswith("obj_train_data/")]) == len(imgs)
        # readable as CVAT reads it: obj.data's class count, train.txt names every image, and each
        # image's annotation file is the dataset's label file
        data = dict(line.split(" = ") for line in z.read("obj.data").decode().splitlines())
        assert int(data["classes"]) == len(CLASSES) and data["train"] in members
        listed = z.read("train.txt").decode().split()
        assert sorted(Path(m).stem for m in listed) == sorted(p.stem for p in imgs)
        for m in listed:
            assert m.startswith("obj_train_data/") and m.endswith(".png")
            stem = Path(m).stem
            got = z.read(f"obj_train_data/{stem}.txt").decode()
            assert got == (out / "labels" / "train" / f"{stem}.txt").read_text()
        for m in members:
            for ident in phi.identifiers():
                assert ident not in m
    assert (out / "data.yaml").read_text().count("names:") == 1


def test_export_refuses_bad_output(ct_folder, tmp_path):
    root, _, _ = ct_folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CommandError, match="not empty"):
        call_command("label_export", str(root), str(tmp_path / "full"), "--no-model")
    with pytest.raises(CommandError, match="inside INPUT"):
        call_command("label_export", str(root), str(root / "out"), "--no-model")


def test_export_with_the_detector_adds_model_boxes(ct_folder, tmp_path):
    from pipeline.detector import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("shipped model missing")
    root, _, _ = ct_folder
    out = tmp_path / "export"
    call_command("label_export", str(root), str(out), stdout=StringIO())
    import json

    summary = json.loads((out / "export.json").read_text())
    assert summary["boxes"]["nose"] > 0
    assert any(k.endswith(":model") for k in summary["pre_label_sources"])
    # the face pre-labels are the detector's face boxes where it has one (the label's definition)
    assert summary["pre_label_sources"].get("face:model", 0) > 0
    assert np.isfinite(summary["images"])


REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"


@pytest.mark.skipif(not REALCT.is_dir(), reason="../shared/realct not beside the checkout")
def test_real_head_exported_and_the_skull_phantom_said_to_have_no_face(tmp_path):
    """The detector's lone 'nose' on the skull phantom is no face (the model method's rule: a
    nose and eyes or lips), so the phantom gets no proposals to delete, and the command says so."""
    from pipeline.detector import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("shipped model missing")
    stdout = StringIO()
    call_command("label_export", str(REALCT), str(tmp_path / "x"), stdout=stdout)
    import json

    summary = json.loads((tmp_path / "x" / "export.json").read_text())
    assert summary["series"] == 2 and len(summary["no_face"]) == 1
    phantom = f"series-{summary['no_face'][0]:02d}"
    names = [p.name for p in (tmp_path / "x" / "images" / "train").glob("*.png")]
    assert names and not [n for n in names if n.startswith(phantom)]
    assert f"input series #{summary['no_face'][0]}: no face found" in stdout.getvalue()
    assert summary["boxes"]["nose"] >= 6 and summary["boxes"]["face"] >= 16  # the real head's


def test_series_the_detector_cannot_learn_from_are_named_not_exported(ct_folder, tmp_path):
    """A sagittal series of the same head (the detector reads axial slices), an MR series and a
    damaged image file are each named in the output (by index or count) and left out; nothing
    of them reaches the dataset."""
    from pipeline import dicom_io
    from tests.dicom_factory import reorient_volume

    root, phi, head = ct_folder
    src = tmp_path / "in"
    src.mkdir()
    import shutil

    shutil.copytree(next(root.iterdir()), src / "axial")
    sag = reorient_volume(head.volume, (2, 0, 1), (False, True, False))
    dicom_io.write_datasets(dicom_io.volume_to_datasets(sag), src / "sagittal")
    mr = dicom_io.volume_to_datasets(head.volume)[:4]
    for ds in mr:
        ds.Modality = "MR"
    dicom_io.write_datasets(mr, src / "mr")
    whole = (src / "axial").iterdir().__next__().read_bytes()
    (src / "broken.dcm").write_bytes(whole[: len(whole) // 2])
    stdout = StringIO()
    call_command("label_export", str(src), str(tmp_path / "out"), "--no-model", stdout=stdout)
    text = stdout.getvalue()
    import json

    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    lines = summary["not_exported"]
    assert any("not axial slices" in x for x in lines) and any("MR, not CT" in x for x in lines)
    assert "1 damaged or unreadable DICOM image file(s)" in lines
    for x in lines:
        assert f"{x}; not exported" in text
    # only the axial series' slices, and the paths' names nowhere
    exported = {p.name.split("_")[0] for p in (tmp_path / "out" / "images" / "train").glob("*.png")}
    assert len(exported) == 1 and summary["series"] == 1
    for ident in phi.identifiers():
        assert ident not in text
