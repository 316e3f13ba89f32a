"""manage.py label_import: corrected labels (CVAT YOLO 1.1 / Ultralytics YOLO) into a dataset split by series."""

from __future__ import annotations

import json
import zipfile
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from pipeline import label_import as li
from pipeline.detector_data import CLASSES
from pipeline.synth import SubjectParams, generate_head
from pipeline.synth_phi import FakePHI, write_synthetic_series

FACE, EYES, NOSE, EARS = (CLASSES.index(c) for c in ("face", "eyes", "nose", "ears"))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """label_export (anatomy only) of three synthetic heads written as DICOM with fake identifiers."""
    root = tmp_path_factory.mktemp("in")
    phis = []
    for n, seed in enumerate((414141, 424242, 434343)):
        phi = FakePHI.random(40 + n)
        head = generate_head(SubjectParams.random(seed), shape=(30, 96, 96), spacing_mm=(5.0, 2.5, 2.5),
                             noise_seed=n)
        write_synthetic_series(head, phi, root / f"{phi.patient_last}_{phi.patient_id}")
        phis.append(phi)
    out = tmp_path_factory.mktemp("exp") / "export"
    call_command("label_export", str(root), str(out), "--no-model", stdout=StringIO())
    return out, phis


def _pre(export_dir: Path) -> dict[str, list]:
    rows = {}
    for p in sorted((export_dir / "labels" / "train").glob("*.txt")):
        rows[p.stem] = [(int(v[0]), *map(float, v[1:])) for v in (ln.split() for ln in p.read_text().splitlines())]
    return rows


def _corrected(export_dir: Path) -> dict[str, list]:
    """What a labeller might return: every pre-label, one face box moved, one eye box deleted,
    a nose box added."""
    rows = _pre(export_dir)
    face_stem = next(s for s, r in rows.items() if any(c == FACE for c, *_ in r))
    rows[face_stem] = [(c, x + 0.2 * w, y, w, h) if c == FACE else (c, x, y, w, h)
                       for c, x, y, w, h in rows[face_stem]]
    eye_stem = next(s for s, r in rows.items() if any(c == EYES for c, *_ in r))
    i = next(i for i, r in enumerate(rows[eye_stem]) if r[0] == EYES)
    rows[eye_stem] = rows[eye_stem][:i] + rows[eye_stem][i + 1:]
    rows[face_stem] = rows[face_stem] + [(NOSE, 0.5, 0.1, 0.08, 0.06)]
    return rows


def _rows_of(path: Path) -> list:
    return [(int(v[0]), *map(float, v[1:])) for v in (ln.split() for ln in path.read_text().splitlines())]


def test_cvat_export_in_another_label_order_becomes_a_dataset_split_by_series(export, tmp_path, settings):
    exp, phis = export
    rows = _corrected(exp)
    # CVAT numbers labels in the task's order, not ours: reversed here
    (tmp_path / "cvat.zip").write_bytes(li.yolo11_zip(rows, names=list(reversed(CLASSES))))
    with zipfile.ZipFile(tmp_path / "cvat.zip") as z:
        assert z.read("obj.names").decode().split()[0] == CLASSES[-1]
    out = tmp_path / "dataset"
    stdout = StringIO()
    call_command("label_import", str(exp), str(tmp_path / "cvat.zip"), str(out), "--val-series", "2",
                 stdout=stdout)
    text = stdout.getvalue()
    assert "val: series 2" in text and "train: series 1, 3" in text
    assert "face 1 adjusted" in text and "nose 0 adjusted, 1 added" in text
    assert "eyes 0 adjusted, 0 added, 1 removed" in text
    # labels back in our class numbers, images split by series, nothing lost
    for stem, want in rows.items():
        sp = "val" if stem.startswith("series-02_") else "train"
        got = _rows_of(out / "labels" / sp / f"{stem}.txt")
        assert [r[0] for r in got] == [r[0] for r in want], stem
        for a, b in zip(got, want):
            assert a[1:] == pytest.approx(b[1:], abs=2e-6)
        assert (out / "images" / sp / f"{stem}.png").read_bytes() == \
            (exp / "images" / "train" / f"{stem}.png").read_bytes()
    assert len(list((out / "images" / "val").glob("*.png"))) == sum(s.startswith("series-02_") for s in rows)
    assert not [p for p in (out / "images" / "train").glob("series-02_*")]
    split = json.loads((out / "split.json").read_text())
    assert split["train_series"] == [1, 3] and split["val_series"] == [2] and split["validation_held_out"]
    ch = split["changes_from_pre_labels"]
    assert ch["face"]["adjusted"] == 1 and ch["nose"]["added"] == 1 and ch["eyes"]["removed"] == 1
    assert ch["ears"]["adjusted"] == ch["ears"]["added"] == ch["ears"]["removed"] == 0
    # each series' labels also as a real-label file (pipeline.real_labels), for eval_detector
    from pipeline.real_labels import load_labels

    for n in (1, 2, 3):
        lab = load_labels(out / "real-labels" / f"series-{n:02d}.json")
        stems = [st for st in rows if st.startswith(f"series-{n:02d}_")]
        assert lab.info["frame"] == "detector view" and len(lab.slices) == len(stems)
        assert sum(len(v) for v in lab.slices.values()) == sum(len(rows[st]) for st in stems)
    settings.VAR_DIR = tmp_path / "var"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="'series-02' not found under --real-root"):
        call_command("eval_detector", "--real-labels", str(out / "real-labels" / "series-02.json"),
                     "--real-root", str(tmp_path / "nowhere"), "--no-synthetic", stdout=StringIO())
    with pytest.raises(CommandError, match="no series #2 below --real-root"):
        call_command("eval_detector", "--real-labels", str(out / "real-labels" / "series-02.json"),
                     "--real-root", str(tmp_path / "empty"), "--no-synthetic", stdout=StringIO())
    data = (out / "data.yaml").read_text()
    assert "val: images/val" in data and "path:" not in data.replace("'path'", "")
    # nothing of the patients in any name or text written
    for p in out.rglob("*"):
        for phi in phis:
            for ident in phi.identifiers():
                assert ident not in p.name
                if p.suffix in (".txt", ".json", ".yaml"):
                    assert ident not in p.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_ultralytics_layout_folder_and_a_drawn_split(export, tmp_path):
    exp, _ = export
    rows = _pre(exp)
    src = tmp_path / "ul"
    (src / "labels" / "train").mkdir(parents=True)
    (src / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n" +
                                   "".join(f"  {i}: {n.upper()}\n" for i, n in enumerate(CLASSES)))
    for stem, rr in rows.items():
        (src / "labels" / "train" / f"{stem}.txt").write_text(
            "".join(f"{c} {x} {y} {w} {h}\n" for c, x, y, w, h in rr))
    ann = li.read_annotations(src)
    assert ann.layout == "Ultralytics YOLO" and set(ann.rows) == set(rows)
    s1 = li.import_labels(exp, ann, tmp_path / "a", val_fraction=0.34, seed=3)
    s2 = li.import_labels(exp, ann, tmp_path / "b", val_fraction=0.34, seed=3)
    assert s1.val_series == s2.val_series and len(s1.val_series) == 1 and len(s1.train_series) == 2
    # unchanged pre-labels: every box kept
    assert all(v["adjusted"] == v["added"] == v["removed"] == 0 for v in s1.changes.values())
    assert sum(v["kept"] for v in s1.changes.values()) == sum(len(r) for r in rows.values())


def test_the_export_corrected_in_place_and_a_classes_txt_export(export, tmp_path):
    """A labeller may correct the export's own labels/ (labelImg) or export from Label Studio
    (classes.txt + labels/); both read as the export's labels."""
    exp, _ = export
    ann = li.read_annotations(exp)
    pre = _pre(exp)
    assert ann.layout == "Ultralytics YOLO" and set(ann.rows) == set(pre)
    for k, rows in pre.items():
        assert [r[0] for r in ann.rows[k]] == [r[0] for r in rows]
        for a, b in zip(ann.rows[k], rows):
            assert a[1:] == pytest.approx(b[1:], abs=1e-9)
    ls = tmp_path / "ls"
    (ls / "labels").mkdir(parents=True)
    (ls / "classes.txt").write_text("nose\nface\n")
    (ls / "labels" / "series-01_slice-004.txt").write_text("1 0.5 0.5 0.2 0.2\n0 0.5 0.2 0.1 0.1\n")
    ann = li.read_annotations(ls)
    assert ann.layout == "YOLO with classes.txt"
    gap = tmp_path / "gap"  # Ultralytics names numbered with a gap: numbers, not positions
    (gap / "labels" / "train").mkdir(parents=True)
    (gap / "data.yaml").write_text("names:\n  0: eyes\n  3: ears\n")
    (gap / "labels" / "train" / "series-01_slice-004.txt").write_text("3 0.5 0.5 0.2 0.2\n")
    assert [r[0] for r in li.read_annotations(gap).rows["series-01_slice-004"]] == [EARS]
    assert [r[0] for r in ann.rows["series-01_slice-004"]] == [FACE, NOSE]
    assert sorted(ann.unused_names) == []


def test_split_series_rules():
    assert li.split_series([1, 2, 3, 4], val_series=[4]) == ([1, 2, 3], [4])
    train, val = li.split_series(range(1, 9), val_fraction=0.25, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(1, 9))
    assert li.split_series([1, 2], val_fraction=0.9)[1].__len__() == 1  # never every series
    for kw, msg in (({"val_series": [5]}, "no exported series 5"), ({"val_series": [1, 2]}, "at least one"),
                    ({"val_fraction": 1.0}, "between 0 and 1")):
        with pytest.raises(li.LabelImportError, match=msg):
            li.split_series([1, 2], **kw)
    with pytest.raises(li.LabelImportError, match="one series only"):
        li.split_series([3])


def _zip(tmp_path: Path, files: dict[str, str]) -> Path:
    p = tmp_path / "bad.zip"
    with zipfile.ZipFile(p, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return p


NAMES = "".join(f"{c}\n" for c in CLASSES)


@pytest.mark.parametrize("files, msg", [
    ({"readme.txt": "x"}, "found none of obj.names"),
    ({"obj.names": NAMES}, "no annotation files"),
    ({"obj.names": NAMES + "chin\n", "obj_train_data/series-01_slice-003.txt": "5 0.5 0.5 0.1 0.1\n"},
     r"'series-01_slice-003', line 1: label 'chin' is not a detector class"),
    ({"obj.names": NAMES, "obj_train_data/series-01_slice-003.txt": "0 0.5 0.5 0.1\n"}, "4 values"),
    ({"obj.names": NAMES, "obj_train_data/series-01_slice-003.txt": "\n0 0.5 0.5 0.1 x\n"}, "line 2: not a class"),
    ({"obj.names": NAMES, "obj_train_data/series-01_slice-003.txt": "9 0.5 0.5 0.1 0.1\n"}, "names 5 classes"),
    ({"obj.names": NAMES, "obj_train_data/series-01_slice-003.txt": "0 0.95 0.5 0.2 0.1\n"}, "outside the image"),
    ({"obj.names": NAMES, "obj_train_data/series-01_slice-003.txt": "0 0.5 0.5 0 0.1\n"}, "positive width"),
    ({"obj.names": NAMES, "obj_train_data/Doe_John.txt": "0 0.5 0.5 nan 0.1\n"},
     "a file not named as the export's slices"),
    ({"obj.names": NAMES, "obj_train_data/series-01_slice-003.txt": "",
      "obj_valid_data/series-01_slice-003.txt": ""}, "annotated twice"),
    ({"data.yaml": "names: 3\n", "labels/train/series-01_slice-003.txt": ""}, "no class names"),
])
def test_bad_annotations_are_refused_with_file_and_line(tmp_path, files, msg):
    with pytest.raises(li.LabelImportError, match=msg):
        li.read_annotations(_zip(tmp_path, files))


def test_a_damaged_zip_is_refused_plainly(tmp_path):
    good = li.yolo11_zip({"series-01_slice-003": [(FACE, 0.5, 0.5, 0.2, 0.2)] * 50})
    member = b"obj_train_data/series-01_slice-003.txt"
    at = good.index(member) + len(member)  # the member's data follows its local header's name
    bad = good[:at + 20] + bytes(b ^ 0xFF for b in good[at + 20:at + 40]) + good[at + 40:]
    (tmp_path / "d.zip").write_bytes(bad)
    with pytest.raises(li.LabelImportError, match="'series-01_slice-003': damaged in the zip"):
        li.read_annotations(tmp_path / "d.zip")
    with zipfile.ZipFile(tmp_path / "u.zip", "w") as z:  # a foreign file name is never echoed
        z.writestr("obj.names", NAMES)
        z.writestr("obj_train_data/Doe_John.txt", b"0 0.5 0.5 0.1 0.1 \xff\n")
    with pytest.raises(li.LabelImportError, match="a file not named as the export's slices: not UTF-8") as e:
        li.read_annotations(tmp_path / "u.zip")
    assert "Doe" not in str(e.value)
    (tmp_path / "n.zip").write_bytes(b"PK not a zip")
    with pytest.raises(li.LabelImportError, match="neither a folder nor a zip"):
        li.read_annotations(tmp_path / "n.zip")
    with pytest.raises(li.LabelImportError, match="not found"):
        li.read_annotations(tmp_path / "missing.zip")


def test_unused_tool_labels_are_reported_and_edges_clipped(tmp_path):
    ann = li.read_annotations(_zip(tmp_path, {
        "obj.names": "Ears\nchin\nFace\n",
        "obj_train_data/series-01_slice-003.txt": "0 0.5 0.5 0.2 0.2\n2 0.0004 0.5 0.001 0.1\n"}))
    assert ann.unused_names == ["chin"]
    (a, b) = ann.rows["series-01_slice-003"]
    assert a[0] == EARS and b[0] == FACE and b[1] - b[3] / 2 == pytest.approx(0.0)


def test_import_refuses_what_does_not_fit_the_export_and_writes_nothing(export, tmp_path):
    exp, _ = export
    rows = _pre(exp)
    partial = dict(list(rows.items())[:-3])
    (tmp_path / "part.zip").write_bytes(li.yolo11_zip(partial))
    out = tmp_path / "ds"
    with pytest.raises(CommandError, match="3 of .* exported slices have no annotation file"):
        call_command("label_import", str(exp), str(tmp_path / "part.zip"), str(out), stdout=StringIO())
    assert not out.exists()
    stdout = StringIO()
    call_command("label_import", str(exp), str(tmp_path / "part.zip"), str(out), "--allow-missing",
                 stdout=stdout)
    assert "3 slices without an annotation file taken as empty" in stdout.getvalue()
    other = dict(rows, **{"series-09_slice-001": []})
    (tmp_path / "other.zip").write_bytes(li.yolo11_zip(other))
    with pytest.raises(CommandError, match="1 annotation file.* name no slice of EXPORT"):
        call_command("label_import", str(exp), str(tmp_path / "other.zip"), str(tmp_path / "ds2"))
    for args, msg in (([str(out)], "not an empty folder"), ([str(exp / "inside")], "inside EXPORT"),
                      ([str(tmp_path / "ds3"), "--no-val", "--val-series", "1"], "exclude each other"),
                      ([str(tmp_path / "ds3"), "--val-series", "a"], "series numbers")):
        with pytest.raises(CommandError, match=msg):
            call_command("label_import", str(exp), str(tmp_path / "part.zip"), *args)
    (tmp_path / "notexp").mkdir()
    with pytest.raises(CommandError, match="not a label_export folder"):
        call_command("label_import", str(tmp_path / "notexp"), str(tmp_path / "part.zip"), str(tmp_path / "ds4"))


def test_a_failure_while_writing_leaves_no_output(export, tmp_path, monkeypatch):
    exp, _ = export
    (tmp_path / "a.zip").write_bytes(li.yolo11_zip(_pre(exp)))
    ann = li.read_annotations(tmp_path / "a.zip")
    calls = []

    def place(src, dst):
        calls.append(dst)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(li, "_place", place)
    with pytest.raises(OSError):
        li.import_labels(exp, ann, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_label_export_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from pipeline import label_export

    src = tmp_path / "in"
    src.mkdir()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(label_export, "_write_meta", boom)
    with pytest.raises(CommandError, match="cannot write OUTPUT .*nothing was written"):
        call_command("label_export", str(src), str(tmp_path / "out"), "--no-model", stdout=StringIO())
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


@pytest.mark.slow
def test_exported_corrected_imported_and_trained_on(export, tmp_path, settings):
    """The whole path a group takes: export → correct → import → train_detector --data, which
    reports the figure on the held-out series."""
    exp, _ = export
    (tmp_path / "cvat.zip").write_bytes(li.yolo11_zip(_corrected(exp)))
    call_command("label_import", str(exp), str(tmp_path / "cvat.zip"), str(tmp_path / "ds"),
                 "--val-series", "3", stdout=StringIO())
    settings.VAR_DIR = tmp_path / "var"
    stdout = StringIO()
    call_command("train_detector", "--data", str(tmp_path / "ds" / "data.yaml"), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--imgsz", "64", "--batch", "8", stdout=stdout)
    text = stdout.getvalue()
    assert (tmp_path / "run" / "face_yolov8n.onnx").is_file()
    assert "validation (held-out images of your val split) mAP50" in text
    from pipeline.detector import MODELS_DIR

    if (MODELS_DIR / "face_yolov8n.pt").is_file():
        assert "fine-tuning the shipped model" in text
    meta = json.loads((tmp_path / "run" / "face_yolov8n.json").read_text())
    assert meta["metrics"]["split"] == "val"


REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"
LABELS = Path(__file__).resolve().parent / "data" / "realct_labels" / "ge-head-ct.json"


@pytest.mark.skipif(not (REALCT / "ge-head-ct").is_dir(), reason="../shared/realct not beside the checkout")
def test_real_series_hand_labels_round_trip_and_the_face_pre_labels_fit(tmp_path, monkeypatch):
    """ge-head-ct exported with the shipped detector; our hand labels (tests/data/realct_labels)
    play the corrected CVAT export. They come back unchanged, in native pixels, and the
    correction record says how far the pre-labels were from them: the face pre-labels are
    the detector's face boxes (trained on the label's definition), which fit 13 of the 16
    hand-drawn face boxes; the anatomical removable region's box fits none."""
    from pipeline import dicom_io
    from pipeline import label_export as le
    from pipeline.real_labels import load_labels

    labels = load_labels(LABELS)
    vol = dicom_io.load_series(dicom_io.scan_folder(REALCT / "ge-head-ct").series[0]).volume
    from pipeline.detector import load_detector

    det = load_detector(None)
    figures = {}
    for name, first in (("model face", le.MODEL_FIRST), ("anatomical face", frozenset())):
        monkeypatch.setattr(le, "MODEL_FIRST", first)
        exp = tmp_path / name.replace(" ", "-")
        le.export_folder(REALCT / "ge-head-ct", exp, detector=det)
        stems = sorted(p.stem for p in (exp / "images" / "train").glob("*.png"))
        rows, back = {}, {}
        for stem in stems:
            k = int(stem.rsplit("-", 1)[1])
            img, to_img = le.canonical_image(vol, k)
            h, w = img.shape
            rows[stem] = []
            for c, i0, j0, i1, j1 in labels.slices.get(k, []):
                a, b, cc, d = to_img((i0, j0, i1, j1))
                rows[stem].append((CLASSES.index(c), (a + cc) / 2 / w, (b + d) / 2 / h, (cc - a) / w, (d - b) / h))
                back.setdefault(stem, []).append((CLASSES.index(c), a, b, cc, d))
        # every hand-labelled box lies on an exported slice
        assert sum(len(v) for v in back.values()) == sum(len(v) for v in labels.slices.values())
        (tmp_path / "hand.zip").write_bytes(li.yolo11_zip(rows, names=list(reversed(CLASSES))))
        s = li.import_labels(exp, li.read_annotations(tmp_path / "hand.zip"), tmp_path / f"ds-{len(figures)}",
                             no_val=True)
        assert not s.held_out and s.boxes["train"]["ears"] == 32 and s.boxes["train"]["nose"] == 7
        for stem, want in back.items():
            got = _rows_of(tmp_path / f"ds-{len(figures)}" / "labels" / "train" / f"{stem}.txt")
            h, w = vol.hu.shape[1:]
            for (c, x, y, bw, bh), (c2, a, b, cc, d) in zip(got, want):
                assert c == c2 and abs((x - bw / 2) * w - a) < 0.01 and abs((y + bh / 2) * h - d) < 0.01
        figures[name] = s.changes
    # the import's label file of the series is the hand labels again (on this series the
    # detector's view is the native slice), and eval_detector reads it against the CT folder
    # the export read, giving the figures it gives with the hand-label file
    mine = load_labels(tmp_path / "ds-0" / "real-labels" / "series-01.json")
    assert mine.series == "series-01" and mine.info["frame"] == "detector view"
    for k in mine.slices:
        assert sorted(mine.slices[k]) == sorted(labels.slices.get(k, [])), k
    assert {c: sorted(v) for c, v in mine.visible.items() if v} == \
        {c: sorted(v) for c, v in labels.visible.items() if v}
    import shutil

    from django.conf import settings

    from pipeline.detector import DEFAULT_WEIGHTS

    settings.VAR_DIR = tmp_path / "var"
    w = tmp_path / "w" / "m.onnx"
    w.parent.mkdir()
    shutil.copyfile(DEFAULT_WEIGHTS, w)
    shutil.copyfile(DEFAULT_WEIGHTS.with_suffix(".json"), w.with_suffix(".json"))
    call_command("eval_detector", "--weights", str(w), "--real-labels",
                 str(tmp_path / "ds-0" / "real-labels" / "series-01.json"), "--real-root",
                 str(REALCT / "ge-head-ct"), "--no-synthetic", stdout=StringIO())
    real = json.loads(w.with_name("m.eval.json").read_text())["real"]["series-01"]["at_threshold"]
    from pipeline.face_model import ModelFaceRegion
    from pipeline.real_labels import detection_report

    hand = detection_report(load_detector(w), vol.hu, labels, conf=ModelFaceRegion.conf)["per_class"]
    assert real["per_class"] == hand and hand["ears"]["instances"] == 32
    face = figures["model face"]["face"]
    assert face["kept"] + face["adjusted"] >= 12, face
    anat = figures["anatomical face"]["face"]
    assert anat["kept"] + anat["adjusted"] == 0, anat
    # the other classes' pre-labels do not depend on it
    for c in ("eyes", "nose", "ears"):
        assert figures["model face"][c] == figures["anatomical face"][c]
