"""Detector inference: letterbox, NMS, ONNX Runtime vs Ultralytics parity, error handling, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline import detector as det
from pipeline.detector_data import CLASSES

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ONNX = det.DEFAULT_WEIGHTS
SHIPPED_PT = SHIPPED_ONNX.with_suffix(".pt")
needs_model = pytest.mark.skipif(not SHIPPED_ONNX.is_file(), reason="shipped model not committed yet")


@pytest.fixture(scope="module")
def yolo_env(tmp_path_factory):
    """Offline Ultralytics configuration in a temp folder (before importing ultralytics)."""
    cfg = tmp_path_factory.mktemp("ultralytics")
    det.configure_ultralytics(cfg)
    return cfg


@pytest.fixture(scope="module")
def head_slices():
    """Axial slices of a held-out synthetic subject (seed outside every training range)."""
    from pipeline.synth import SubjectParams, generate_head

    head = generate_head(SubjectParams.random(424242), shape=(64, 160, 160),
                         spacing_mm=(4.0, 1.6, 1.6), noise_seed=5)
    return head


# ----------------------------------------------------------------------------- geometry


def test_letterbox_matches_ultralytics(yolo_env):
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(1)
    for h, w in [(160, 160), (120, 200), (300, 170)]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ours, r, (px, py) = det.letterbox(img[None], 256)
        ref = LetterBox((256, 256), auto=False, stride=32)(image=img)
        np.testing.assert_array_equal(ours[0], ref)
        assert r == pytest.approx(min(256 / h, 256 / w))
        # a pixel centre maps to model coordinates as input * r + pad
        assert 0 <= px <= 256 - w * r + 1 and 0 <= py <= 256 - h * r + 1


def test_nms_matches_torchvision():
    import torch
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, size=(300, 2)).astype(np.float32)
    wh = rng.uniform(5, 60, size=(300, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, size=300).astype(np.float32)
    cls = rng.integers(0, 3, size=300)
    ours = det.nms(boxes, scores, cls, iou=0.5)
    ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cls), 0.5).numpy()
    assert ours.tolist() == ref.tolist()


# ----------------------------------------------------------------------------- loading / errors


@needs_model
def test_shipped_metadata_complete():
    meta = json.loads(SHIPPED_ONNX.with_suffix(".json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert meta["imgsz"] % 32 == 0 and len(meta["hu_windows"]) == 3
    assert meta["training"]["ultralytics"] == det.ULTRALYTICS_VERSION
    assert "seed" in meta["training"] and meta["data"]["spec"]["n_train"] > 0
    m = meta["metrics"]
    assert set(m["per_class"]) <= set(CLASSES) and "nose" in m["per_class"]
    # the target on held-out synthetic subjects (issue 16: ≥ 0.95; measured on 10: 0.972).
    # Every class ≥ 0.85: the nose, labelled as on the real series (the nose standing out of
    # the face, up to the nasofacial junction), is the hardest class (0.932; 0.876 for the model
    # shipped before on the label without the junction rule); the other classes are ≥ 0.95
    assert 0.95 <= m["mAP50"] <= 1.0 and m["mAP50_95"] <= m["mAP50"]
    assert set(m["per_class"]) == set(CLASSES)
    assert all(c["mAP50"] >= 0.85 for c in m["per_class"].values())
    assert all(c["mAP50"] >= 0.95 for name, c in m["per_class"].items() if name != "nose")
    # and it was measured on the hand-labelled real series (tests/data/realct_labels)
    assert 0.0 < m["real"]["ge-head-ct"]["mAP50"] <= 1.0
    # the INT8 copy used by default was validated on the same subjects
    i8 = json.loads(det.INT8_WEIGHTS.with_suffix(".json").read_text())
    assert i8["classes"] == meta["classes"] and i8["precision"] == "int8"
    if i8["default"]:
        assert i8["metrics"]["mAP50"] >= i8["quantization"]["float_metrics_same_data"]["mAP50"] - 0.01
    assert SHIPPED_ONNX.stat().st_size < 15_000_000


def test_missing_weights_file(tmp_path):
    with pytest.raises(det.DetectorError, match="not found"):
        det.load_detector(tmp_path / "nope.onnx")


def test_garbage_onnx_is_rejected(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model" * 10)
    with pytest.raises(det.DetectorError, match="not a valid ONNX|not a loadable"):
        det.load_detector(bad)


def test_non_yolo_onnx_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "identity.onnx"
    onnx.save(model, str(path))
    with pytest.raises(det.DetectorError, match="no class names"):
        det.load_detector(path)  # no metadata at all
    path.with_suffix(".json").write_text(json.dumps({"classes": ["face"], "imgsz": 64}))
    with pytest.raises(det.DetectorError, match="not a YOLOv8 detector"):
        det.load_detector(path)


def test_unknown_format_rejected(tmp_path):
    p = tmp_path / "weights.h5"
    p.write_bytes(b"\x89HDF")
    with pytest.raises(det.DetectorError, match="unsupported weights format"):
        det.load_detector(p)


@needs_model
def test_unmappable_classes(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    shutil.copyfile(SHIPPED_ONNX, onnx_path)
    meta = json.loads(SHIPPED_ONNX.with_suffix(".json").read_text())
    meta["classes"] = [f"thing{i}" for i in range(len(CLASSES))]
    onnx_path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(det.DetectorError, match="maps to a facial class"):
        det.load_detector(onnx_path)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"thing2": "nose", "thing0": "face"}))
    d = det.load_detector(onnx_path, class_map=cmap)  # mapped → usable
    assert d.meta.canonical(2) == "nose" and d.meta.canonical(1) is None
    cmap.write_text(json.dumps({"thing2": "beard"}))
    with pytest.raises(det.DetectorError, match="unknown classes"):
        det.load_detector(onnx_path, class_map=cmap)
    cmap.write_text(json.dumps({"not_in_model": "nose"}))
    with pytest.raises(det.DetectorError, match="does not have"):
        det.load_detector(onnx_path, class_map=cmap)


def test_bad_input_shape():
    class Dummy(det._BaseDetector):
        meta = det.ModelMeta(list(CLASSES))

    with pytest.raises(det.DetectorError, match="slices"):
        Dummy().detect(np.zeros((2, 3, 4, 5)))


# ----------------------------------------------------------------------------- inference


def _slices_with_face(head):
    ks = [k for k, b in enumerate(head.feature_boxes) if b]
    return head.volume.hu[ks[0]:ks[-1] + 1:2]


@needs_model
def test_onnx_finds_the_nose(head_slices):
    """Boxes of the shipped model on a held-out subject overlap the ground-truth nose boxes."""
    d = det.load_detector()
    hu = head_slices.volume.hu
    # the slice through the nasal tip (the nose box reaching furthest forward, to the smallest
    # row): the nose every model must find, whatever its label does over the pyramid above
    front = {k: (j0, k) for k, b in enumerate(head_slices.feature_boxes)
             for c, i0, j0, i1, j1 in b if c == "nose"}
    k = min(front, key=front.get)
    res = d.detect(hu[k:k + 1])[0]
    gt = [b[1:] for b in head_slices.feature_boxes[k] if b[0] == "nose"][0]
    nose = res.boxes[res.class_ids == CLASSES.index("nose")]
    assert len(nose) >= 1
    # the best nose box is centred on the true nose (within its ground-truth box)
    iou = det._iou_one_to_many(np.asarray(gt, float), nose.astype(float))
    cx, cy = (nose[iou.argmax(), 0] + nose[iou.argmax(), 2]) / 2, (nose[iou.argmax(), 1] + nose[iou.argmax(), 3]) / 2
    assert gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]
    assert iou.max() > 0.3


@needs_model
@pytest.mark.skipif(not SHIPPED_PT.is_file(), reason="no .pt next to the shipped ONNX")
def test_parity_onnxruntime_vs_ultralytics(yolo_env, head_slices):
    """Our ONNX Runtime path (letterbox + decode + numpy NMS) vs Ultralytics' own prediction
    with the .pt weights: every confident box matched with IoU ≥ 0.9, same class."""
    hu = _slices_with_face(head_slices)
    onnx_det = det.load_detector(SHIPPED_ONNX)
    ul_det = det.load_detector(SHIPPED_PT)
    a = onnx_det.detect(hu, conf=0.25)
    b = ul_det.detect(hu, conf=0.25)
    n_matched = 0
    for x, y in zip(a, b):
        for src, dst in ((y, x), (x, y)):
            for box, score, cls in zip(src.boxes, src.scores, src.class_ids):
                if score < 0.35:  # near the threshold a box may flip in or out
                    continue
                same = dst.boxes[dst.class_ids == cls]
                assert len(same), f"class {CLASSES[cls]} box (score {score:.2f}) unmatched"
                assert det._iou_one_to_many(box.astype(float), same.astype(float)).max() >= 0.9
                n_matched += 1
    assert n_matched >= 20


@needs_model
def test_drop_classes_leaves_the_other_classes_unchanged(yolo_env, tmp_path, head_slices):
    """Deleting a class's output channel: the remaining classes' boxes and scores are exactly
    those of the original model (same Ultralytics prediction), the class is gone."""
    import torch
    from ultralytics import YOLO

    src = tmp_path / "six.pt"
    shutil.copyfile(SHIPPED_PT, src)
    names = list(YOLO(str(src)).model.names.values())
    drop = names[1]
    kept = det.drop_classes(src, tmp_path / "out" / "five.pt", [drop])
    assert kept == [n for n in names if n != drop]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["five.pt"]  # no temp file left
    a = YOLO(str(src)).model.float().eval()
    b = YOLO(str(tmp_path / "out" / "five.pt")).model.float().eval()
    assert list(b.names.values()) == kept and b.model[-1].nc == len(kept)
    x = torch.from_numpy(det.letterbox(det.hu_to_rgb8(_slices_with_face(head_slices)), 160)[0])
    x = x.permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ya, yb = a(x)[0], b(x)[0]
    keep_idx = [4 + i for i, n in enumerate(names) if n != drop]
    assert torch.equal(ya[:, :4], yb[:, :4])
    assert torch.allclose(ya[:, keep_idx], yb[:, 4:], atol=1e-6, rtol=0)
    assert ya[:, 4 + names.index(drop)].max() > 0.5  # the dropped class did fire on these slices
    # the result is a working Ultralytics checkpoint (prediction through our wrapper)
    d = det.load_detector(tmp_path / "out" / "five.pt", class_map=None)
    assert sum(len(r) for r in d.detect(_slices_with_face(head_slices))) > 0


def test_drop_classes_rejects_bad_requests(yolo_env, tmp_path):
    with pytest.raises(det.DetectorError, match="not an Ultralytics YOLO detector"):
        (tmp_path / "bad.pt").write_bytes(b"junk" * 10)
        det.drop_classes(tmp_path / "bad.pt", tmp_path / "o.pt", ["chin"])
    if SHIPPED_PT.is_file():
        with pytest.raises(det.DetectorError, match="not in the model"):
            det.drop_classes(SHIPPED_PT, tmp_path / "o.pt", ["tail"])
        from ultralytics import YOLO

        every = list(YOLO(str(SHIPPED_PT)).model.names.values())
        with pytest.raises(det.DetectorError, match="at least one class"):
            det.drop_classes(SHIPPED_PT, tmp_path / "o.pt", every)
    assert not (tmp_path / "o.pt").exists()


# ----------------------------------------------------------------------------- INT8


@needs_model
def test_int8_quantization_keeps_the_boxes(tmp_path, head_slices, monkeypatch):
    """INT8 copy of the shipped model: loads like any ONNX detector, finds the same
    confident boxes as the float model, leaves no scratch files behind."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "m" / "face.onnx"
    src.parent.mkdir()
    src.write_bytes(SHIPPED_ONNX.read_bytes())
    calib = det.synthetic_calibration(det.load_detector().meta.imgsz, n_subjects=2, every=4)
    assert calib.dtype == np.float32 and calib.ndim == 4 and 0.0 <= calib.min() and calib.max() <= 1.0
    dst = det.quantize_onnx(Path("m/face.onnx"), Path("m/face.int8.onnx"), calib)  # relative to cwd
    assert dst == tmp_path / "m" / "face.int8.onnx"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["face.int8.onnx", "face.onnx", "m"]
    assert dst.stat().st_size < src.stat().st_size / 2  # 8-bit weights
    import onnx

    graph = onnx.load(str(dst)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    by_output = {o: n for n in graph.node for o in n.output}

    def fed_by_dq(n) -> bool:
        return any(getattr(by_output.get(i), "op_type", "") == "DequantizeLinear" for i in n.input)

    # SiLU (Sigmoid × x) runs in 8 bit too, the box decoder stays float
    backbone_sigmoids = [n for n in graph.node if n.op_type == "Sigmoid" and "/act/" in n.name]
    assert backbone_sigmoids and all(fed_by_dq(n) for n in backbone_sigmoids)
    decoder = [n for n in graph.node if n.name in set(det.decoder_nodes(onnx.load(str(src))))]
    assert decoder and not any(fed_by_dq(n) for n in decoder if n.op_type in ("Softmax", "MatMul", "Sigmoid"))
    assert any(n.op_type == "MatMul" and "/dfl/" in n.name for n in graph.node)  # rewritten decoder
    hu = _slices_with_face(head_slices)
    f32 = det.load_detector(src).detect(hu)
    i8 = det.load_detector(dst).detect(hu)  # class names from the embedded export metadata
    n_matched = n_conf = 0
    for x, y in zip(f32, i8):
        for box, score, cls in zip(x.boxes, x.scores, x.class_ids):
            if score < 0.5:
                continue
            n_conf += 1
            same = y.boxes[y.class_ids == cls]
            if len(same) and det._iou_one_to_many(box.astype(float), same.astype(float)).max() >= 0.8:
                n_matched += 1
    assert n_conf >= 20 and n_matched >= 0.9 * n_conf, (n_matched, n_conf)


def test_default_weights_prefer_a_validated_int8_copy(tmp_path, monkeypatch):
    f32, i8 = tmp_path / "face.onnx", tmp_path / "face.int8.onnx"
    monkeypatch.setattr(det, "DEFAULT_WEIGHTS", f32)
    monkeypatch.setattr(det, "INT8_WEIGHTS", i8)
    monkeypatch.delenv("DEIDSTUDY_DETECTOR_PRECISION", raising=False)
    assert det.default_weights() == f32  # no INT8 copy
    i8.write_bytes(b"x")
    i8.with_suffix(".json").write_text(json.dumps({"default": False}))
    assert det.default_weights() == f32  # not validated
    i8.with_suffix(".json").write_text(json.dumps({"default": True}))
    assert det.default_weights() == i8
    monkeypatch.setenv("DEIDSTUDY_DETECTOR_PRECISION", "float")
    assert det.default_weights() == f32
    monkeypatch.delenv("DEIDSTUDY_DETECTOR_PRECISION")
    i8.with_suffix(".json").write_text("{not json")
    assert det.default_weights() == f32


@needs_model
def test_quantize_detector_command(tmp_path, settings):
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.VAR_DIR = tmp_path
    w = tmp_path / "m.onnx"
    shutil.copyfile(SHIPPED_ONNX, w)
    shutil.copyfile(SHIPPED_ONNX.with_suffix(".json"), w.with_suffix(".json"))
    with pytest.raises(CommandError, match="make-default needs the evaluation"):
        call_command("quantize_detector", "--weights", str(w), "--no-eval", "--make-default")
    assert not (tmp_path / "m.int8.onnx").exists()
    out = StringIO()
    call_command("quantize_detector", "--weights", str(w), "--no-eval", "--calibration-subjects", "1",
                 stdout=out)
    meta = json.loads((tmp_path / "m.int8.json").read_text())
    assert meta["precision"] == "int8" and meta["default"] is False and meta["metrics"] is None
    assert meta["classes"] == json.loads(w.with_suffix(".json").read_text())["classes"]
    assert det.load_detector(tmp_path / "m.int8.onnx").meta.classes == meta["classes"]
    with pytest.raises(CommandError, match="existing .onnx"):
        call_command("quantize_detector", "--weights", str(tmp_path / "missing.onnx"))


@needs_model
def test_dfl_rewrite_gives_identical_outputs(tmp_path):
    """The cheaper softmax layout of the box decoder changes no output value."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(SHIPPED_ONNX))
    assert det.rewrite_dfl_softmax(model)
    assert not det.rewrite_dfl_softmax(model)  # already rewritten: pattern gone, nothing changed
    ops = {n.op_type for n in model.graph.node if "/dfl/" in n.name}
    assert "MatMul" in ops and "Conv" not in ops
    x = det.synthetic_calibration(160, n_subjects=1, every=6)
    a = ort.InferenceSession(str(SHIPPED_ONNX), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": x})[0]
    assert a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-4)
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Softmax", ["x"], ["y"], axis=1)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]))
    assert not det.rewrite_dfl_softmax(plain)


@needs_model
def test_sessions_split_the_batch_without_changing_results(head_slices):
    hu = _slices_with_face(head_slices)[:7]
    one = det.load_detector(SHIPPED_ONNX, threads=2, sessions=1)
    three = det.load_detector(SHIPPED_ONNX, threads=3, sessions=3)
    assert len(one.sessions) == 1 and len(three.sessions) == 3
    a, b = one.detect(hu, batch=7), three.detect(hu, batch=7)  # chunks of 3, 2, 2 slices
    assert sum(len(r) for r in a) > 0
    for x, y in zip(a, b):
        assert np.array_equal(x.class_ids, y.class_ids)
        assert np.allclose(x.boxes, y.boxes, atol=1e-3) and np.allclose(x.scores, y.scores, atol=1e-5)
    assert len(det.load_detector(SHIPPED_ONNX, threads=1, sessions=4).sessions) == 1  # ≤ threads


def test_quantize_rejects_bad_input(tmp_path):
    with pytest.raises(det.DetectorError, match="calibration"):
        det.quantize_onnx(tmp_path / "x.onnx", tmp_path / "y.onnx", np.zeros((0, 3, 8, 8), np.float32))
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(det.DetectorError, match="not a valid ONNX"):
        det.quantize_onnx(tmp_path / "x.onnx", tmp_path / "y.onnx", np.zeros((1, 3, 8, 8), np.float32))
    assert not (tmp_path / "y.onnx").exists()


# ----------------------------------------------------------------------------- offline training


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []
    def _block(*a, **k):
        attempts.append(repr(a[:2])[:120])
        raise OSError("network disabled in test")
    socket.socket.connect = _block
    socket.socket.connect_ex = _block
    socket.create_connection = _block
    socket.getaddrinfo = _block
    from pathlib import Path
    out = Path(sys.argv[1])
    from pipeline import detector, detector_data
    detector.configure_ultralytics(out / "cfg")
    spec = detector_data.DatasetSpec(n_train=1, n_val=0, n_test=0, size_px=64, slice_mm=(8.0, 9.0),
                                     pixel_mm=(3.8, 4.0))
    y = detector_data.build_dataset(out / "ds", spec, splits=("train",))
    best = detector.train_yolo(y, out / "run", epochs=1, imgsz=64, batch=8, workers=0)
    import numpy as np
    d = detector.UltralyticsDetector(best, None)
    d.meta.imgsz = 64
    r = d.detect(np.full((2, 64, 64), -1000, np.int16), conf=0.9)
    onnx_path = detector.export_onnx(best, out / "m.onnx", imgsz=64)
    o = detector.load_detector(onnx_path)
    o.detect(np.full((1, 64, 64), -1000, np.int16))
    print(json.dumps({"attempts": attempts, "best": str(best), "n": len(r)}))
    """
)


@pytest.mark.slow
def test_training_and_prediction_are_offline(tmp_path):
    """Tiny 1-epoch training, prediction and ONNX export with every socket connection blocked."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("YOLO_CONFIG_DIR", "YOLO_OFFLINE"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path)], env=env, check=False,
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert Path(result["best"]).is_file()
    assert (tmp_path / "m.onnx").is_file()
    assert (tmp_path / "cfg" / "Ultralytics" / "settings.json").is_file()  # settings live in our config dir


# ----------------------------------------------------------------------------- commands


def test_train_detector_rejects_missing_user_dataset(tmp_path, settings):
    from django.core.management import CommandError, call_command

    settings.VAR_DIR = tmp_path
    with pytest.raises(CommandError, match="existing Ultralytics dataset yaml"):
        call_command("train_detector", "--data", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r"))


def test_train_detector_domain_options_reach_the_dataset(tmp_path, settings, monkeypatch):
    """--domain / --max-slices / --workers build the domain-randomised dataset."""
    from io import StringIO

    from django.core.management import call_command

    from pipeline import detector_data

    seen = {}

    def fake_build(out_dir, spec, *, workers=1, **_):
        seen.update(spec=spec, workers=workers)
        raise RuntimeError("stop before training")

    settings.VAR_DIR = tmp_path
    monkeypatch.setattr(detector_data, "build_dataset", fake_build)
    with pytest.raises(RuntimeError, match="stop before training"):
        call_command("train_detector", "--domain", "--max-slices", "7", "--workers", "2", "--subjects", "3",
                     "--out", str(tmp_path / "r"), stdout=StringIO())
    assert seen["spec"].domain is True and seen["spec"].max_slices == 7 and seen["spec"].n_train == 3
    assert seen["workers"] == 2
    # the labels' visible-fraction rule: per class by default (the shipped model's), or as given
    assert seen["spec"].min_visible_fraction == detector_data.VISIBLE_FRACTIONS
    for arg, want in (("0.3", 0.3), ("0.1,eyes=0.25", {"face": 0.1, "eyes": 0.25, "nose": 0.1, "lips": 0.1,
                                                        "ears": 0.1})):
        with pytest.raises(RuntimeError, match="stop before training"):
            call_command("train_detector", "--min-visible-fraction", arg, "--out", str(tmp_path / "r"),
                         stdout=StringIO())
        assert seen["spec"].min_visible_fraction == want


def test_train_detector_fine_tunes_the_shipped_model_on_a_groups_own_data(tmp_path, settings, monkeypatch):
    """With --data (real labelled CT) the default start is the shipped weights at their image
    size; --model yolov8n.yaml trains from scratch; the synthetic default stays from scratch."""
    from io import StringIO

    from django.core.management import call_command

    from pipeline import detector, detector_data

    seen = {}

    def fake_train(data_yaml, out, *, model_yaml, imgsz, **_):
        seen.update(model=str(model_yaml), imgsz=imgsz)
        raise RuntimeError("stop before training")

    def fake_build(out_dir, spec, **_):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "spec.json").write_text(json.dumps({"counts": {}}))
        return out_dir / "data.yaml"

    settings.VAR_DIR = tmp_path
    monkeypatch.setattr(detector, "train_yolo", fake_train)
    monkeypatch.setattr(detector_data, "build_dataset", fake_build)
    data = tmp_path / "data.yaml"
    data.write_text("train: images/train\nval: images/val\nnames:\n  0: face\n")
    shipped = detector.MODELS_DIR / "face_yolov8n.pt"
    out = StringIO()
    with pytest.raises(RuntimeError, match="stop before training"):
        call_command("train_detector", "--data", str(data), "--out", str(tmp_path / "r"), stdout=out)
    if shipped.is_file():
        card = json.loads(shipped.with_suffix(".json").read_text())
        assert seen == {"model": str(shipped), "imgsz": card["imgsz"]}
        assert "fine-tuning the shipped model" in out.getvalue()
    with pytest.raises(RuntimeError, match="stop before training"):
        call_command("train_detector", "--data", str(data), "--model", "yolov8n.yaml", "--out",
                     str(tmp_path / "r"), stdout=StringIO())
    assert seen == {"model": "yolov8n.yaml", "imgsz": 256}
    with pytest.raises(RuntimeError, match="stop before training"):
        call_command("train_detector", "--out", str(tmp_path / "r"), stdout=StringIO())
    assert seen == {"model": "yolov8n.yaml", "imgsz": 256}  # synthetic heads: from scratch


@pytest.mark.parametrize("bad", ["x", "0.2,0.3", "nose=1.5", "0.2,noze=0.1", ""])
def test_train_detector_rejects_a_bad_visible_fraction(tmp_path, settings, bad):
    from django.core.management import CommandError, call_command

    settings.VAR_DIR = tmp_path
    with pytest.raises(CommandError, match="min_visible_fraction"):
        call_command("train_detector", "--min-visible-fraction", bad, "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@needs_model
@pytest.mark.slow
def test_eval_detector_writes_figures(tmp_path, settings):
    """eval_detector on one fresh held-out subject: per-class table + JSON next to the weights."""
    from io import StringIO

    from django.core.management import call_command

    settings.VAR_DIR = tmp_path
    w = tmp_path / "m.onnx"
    shutil.copyfile(SHIPPED_ONNX, w)
    shutil.copyfile(SHIPPED_ONNX.with_suffix(".json"), w.with_suffix(".json"))
    out = StringIO()
    call_command("eval_detector", "--weights", str(w), "--subjects", "1", stdout=out)
    text = out.getvalue()
    assert "nose" in text and "mAP50" in text
    figures = json.loads((tmp_path / "m.eval.json").read_text())
    assert 0.0 <= figures["mAP50"] <= 1.0 and "nose" in figures["per_class"]
    assert figures["data"]["seeds"] and figures["per_class"]["face"]["mAP50"] > 0.9


REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"
REAL_LABELS = Path(__file__).resolve().parent / "data" / "realct_labels" / "ge-head-ct.json"


@needs_model
@pytest.mark.slow
@pytest.mark.skipif(not (REALCT / "ge-head-ct").is_dir(), reason="../shared/realct not beside the checkout")
def test_eval_detector_real_labels(tmp_path, settings):
    """--real-labels: Ultralytics mAP50 on the labelled real slices and, at the model method's
    threshold, the per-class counts of the labelled series (those of pipeline.real_labels)."""
    from io import StringIO

    from django.core.management import CommandError, call_command

    from pipeline.face_model import ModelFaceRegion
    from pipeline.real_labels import load_labels

    settings.VAR_DIR = tmp_path
    w = tmp_path / "m.onnx"
    shutil.copyfile(SHIPPED_ONNX, w)
    shutil.copyfile(SHIPPED_ONNX.with_suffix(".json"), w.with_suffix(".json"))
    (tmp_path / "m.eval.json").write_text(json.dumps({"mAP50": 0.5, "per_class": {}}))
    out = StringIO()
    call_command("eval_detector", "--weights", str(w), "--real-labels", str(REAL_LABELS),
                 "--real-root", str(REALCT), "--no-synthetic", stdout=out)
    assert "real series ge-head-ct: mAP50" in out.getvalue()
    figures = json.loads((tmp_path / "m.eval.json").read_text())
    assert figures["mAP50"] == 0.5  # --no-synthetic keeps the earlier synthetic figures
    real = figures["real"]["ge-head-ct"]
    assert 0.0 <= real["mAP50"] <= 1.0 and set(real["per_class_map"]) <= set(CLASSES)
    rep = real["at_threshold"]
    assert rep["conf"] == ModelFaceRegion.conf and "boxes" not in rep
    lab = load_labels(REAL_LABELS)
    for c in ("face", "eyes", "nose", "ears"):
        v = rep["per_class"][c]
        assert v["instances"] == sum(len(lab.boxes(k, c)) for k in lab.slices)
        assert v["slices_visible"] == len(lab.visible[c])
        assert 0 <= v["slices_found"] <= v["slices_visible"] and 0 <= v["found"] <= v["instances"]
    # every labelled box not found is explained, once, in the JSON and the printout
    missed = sum(v["instances"] - v["found"] for v in rep["per_class"].values())
    assert len(rep["misses"]) == missed
    assert all(x["why"] in ("misplaced", "weak", "none") for x in rep["misses"])
    assert out.getvalue().count(": misplaced") + out.getvalue().count(": weak") + out.getvalue().count(": none") == missed
    with pytest.raises(CommandError, match="needs --real-labels"):
        call_command("eval_detector", "--weights", str(w), "--no-synthetic")
    with pytest.raises(CommandError, match="--conf must be"):
        call_command("eval_detector", "--weights", str(w), "--real-labels", str(REAL_LABELS),
                     "--real-root", str(REALCT), "--conf", "1.5", "--no-synthetic")
    with pytest.raises(CommandError, match="not found under --real-root"):
        call_command("eval_detector", "--weights", str(w), "--real-labels", str(REAL_LABELS),
                     "--real-root", str(tmp_path), "--no-synthetic")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CommandError, match="cannot read the label file"):
        call_command("eval_detector", "--weights", str(w), "--real-labels", str(bad), "--no-synthetic")
