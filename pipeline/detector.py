"""YOLOv8 facial-feature detector on axial CT slices: training wrapper and fast inference.

Inference (no torch needed): :class:`OnnxDetector` runs an Ultralytics-exported
YOLOv8 ONNX model with ONNX Runtime on batches of axial slices. Each slice
``hu[j, i]`` (row ``j`` → patient Posterior, column ``i`` → patient Left; the
face at the top) is windowed from HU to 8 bit with the model's
``hu_windows`` (one window per channel, see :mod:`pipeline.detector_data`),
letterboxed to the square model input (aspect kept, grey 114 padding, centred
— as Ultralytics does), and the raw output is decoded and non-maximum
suppressed per class in numpy. Boxes come back in **pixel coordinates of the
input slice** ``(i0, j0, i1, j1)`` (column/row, continuous, exclusive end).

:class:`UltralyticsDetector` runs a ``.pt`` model through Ultralytics (for
users' own weights and for the parity test). :func:`load_detector` picks one by
file suffix and reads the metadata JSON next to the weights
(``<weights stem>.json``) or a user's class-mapping file.

Training (:func:`train_yolo`, :func:`export_onnx`) wraps Ultralytics fully
offline: :func:`configure_ultralytics` must run before ``import ultralytics``
(it sets ``YOLO_OFFLINE``, ``YOLO_AUTOINSTALL``, ``YOLO_CONFIG_DIR`` and places a
local font as ``Arial.ttf`` so no download is attempted).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .detector_data import (
    CLASSES,
    HU_WINDOWS,
    DatasetSpec,
    domain_head,
    hu_to_rgb8,
    subject_geometry,
)
from .synth import SubjectParams, generate_head

__all__ = [
    "DEFAULT_WEIGHTS",
    "INT8_WEIGHTS",
    "QUANTIZED_OPS",
    "Detection",
    "DetectorError",
    "ModelMeta",
    "OnnxDetector",
    "UltralyticsDetector",
    "configure_ultralytics",
    "decoder_nodes",
    "default_weights",
    "drop_classes",
    "evaluate_yolo",
    "export_onnx",
    "letterbox",
    "load_detector",
    "nms",
    "quantize_onnx",
    "rewrite_dfl_softmax",
    "synthetic_calibration",
    "train_yolo",
]

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_WEIGHTS = MODELS_DIR / "face_yolov8n.onnx"
#: INT8 copy of the shipped model (``manage.py quantize_detector``); used by default
#: when its metadata says ``"default": true`` (see :func:`default_weights`).
INT8_WEIGHTS = MODELS_DIR / "face_yolov8n.int8.onnx"
ULTRALYTICS_VERSION = "8.4.190"


class DetectorError(ValueError):
    """Unusable detector weights, metadata, class mapping or input."""


# ----------------------------------------------------------------------------- metadata


@dataclass
class ModelMeta:
    """What a detector needs besides its weights.

    ``classes``: model class names by output index. ``imgsz``: square input size
    (pixels). ``hu_windows``: per input channel ``(low, high)`` HU mapped to
    0…255. ``class_map``: model class name → canonical class (one of
    :data:`pipeline.detector_data.CLASSES`) or ``None`` to ignore it.
    ``info``: provenance (seed, data, metrics, Ultralytics version).
    """

    classes: list[str]
    imgsz: int = 256
    hu_windows: list[list[float]] = field(default_factory=lambda: [list(w) for w in HU_WINDOWS])
    class_map: dict[str, str | None] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def canonical(self, class_id: int) -> str | None:
        """Canonical class name of model output ``class_id`` (None = ignored)."""
        name = self.classes[class_id]
        if name in self.class_map:
            return self.class_map[name]
        return name if name in CLASSES else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON dict."""
        return {"classes": self.classes, "imgsz": self.imgsz, "hu_windows": self.hu_windows,
                "class_map": self.class_map, **self.info}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelMeta:
        """Parse a metadata dict (see :meth:`to_json`); raises :class:`DetectorError`."""
        try:
            classes = [str(c) for c in d["classes"]]
            imgsz = int(d.get("imgsz", 256))
            windows = [[float(a), float(b)] for a, b in d.get("hu_windows", HU_WINDOWS)]
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectorError(f"detector metadata is malformed ({exc.__class__.__name__}: {exc})") from None
        if not classes or imgsz < 32 or imgsz % 32:
            raise DetectorError("detector metadata needs non-empty 'classes' and imgsz a multiple of 32")
        info = {k: v for k, v in d.items() if k not in ("classes", "imgsz", "hu_windows", "class_map")}
        return cls(classes, imgsz, windows, dict(d.get("class_map") or {}), info)


def _read_class_map(path: Path) -> dict[str, str | None]:
    """Read a class-mapping JSON: ``{"model class": "canonical class" | null, ...}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DetectorError(f"cannot read the class-mapping file ({exc.__class__.__name__})") from None
    if isinstance(data, dict) and "class_map" in data:
        data = data["class_map"]
    if not isinstance(data, dict):
        raise DetectorError('class-mapping file must be a JSON object {"model class": "face"|...}')
    bad = {v for v in data.values() if v is not None and v not in CLASSES}
    if bad:
        raise DetectorError(
            f"class mapping targets unknown classes {sorted(bad)}; allowed: {', '.join(CLASSES)} or null"
        )
    return {str(k): v for k, v in data.items()}


def _check_mappable(meta: ModelMeta) -> None:
    unknown = [c for c in meta.class_map if c not in meta.classes]
    if unknown:
        raise DetectorError(f"class mapping names classes the model does not have: {unknown}")
    mapped = {meta.canonical(i) for i in range(len(meta.classes))} - {None}
    if not mapped:
        raise DetectorError(
            f"none of the model's classes {meta.classes} maps to a facial class "
            f"({', '.join(CLASSES)}); pass a class-mapping file"
        )


# ----------------------------------------------------------------------------- geometry


@dataclass
class Detection:
    """Boxes on one slice: ``boxes`` (N, 4) float ``(i0, j0, i1, j1)`` in input-slice
    pixels (column/row), ``scores`` (N,), ``class_ids`` (N,) model class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def letterbox(
    images: np.ndarray, imgsz: int, pad_value: int = 114
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize ``images`` (N, H, W, C) uint8 to fit ``imgsz``² keeping aspect, pad centred.

    Same arithmetic as Ultralytics' ``LetterBox(auto=False, center=True)``
    (bilinear resize, padding split with ±0.1 rounding). Returns the padded
    batch, the scale ``r`` (input pixel → model pixel) and the ``(pad_x, pad_y)``
    offsets in model pixels, so ``model = input * r + pad``.
    """
    n, h, w, c = images.shape
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    dw, dh = (imgsz - new_w) / 2, (imgsz - new_h) / 2
    top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
    out = np.full((n, imgsz, imgsz, c), pad_value, np.uint8)
    if (new_w, new_h) == (w, h):
        out[:, top:top + h, left:left + w] = images
    else:
        try:
            import cv2
        except ImportError:  # pragma: no cover - opencv comes with ultralytics
            cv2 = None
        for b in range(n):
            if cv2 is not None:
                res = cv2.resize(images[b], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            else:  # pragma: no cover
                from scipy import ndimage as ndi

                res = ndi.zoom(images[b], (new_h / h, new_w / w, 1), order=1)
            out[b, top:top + new_h, left:left + new_w] = res.reshape(new_h, new_w, c)
    return out, r, (float(left), float(top))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(a + b - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float = 0.7) -> np.ndarray:
    """Per-class greedy non-maximum suppression; returns kept indices by descending score.

    ``boxes`` (N, 4) ``(x0, y0, x1, y1)`` any pixel unit; a box is dropped when
    its IoU with a higher-scoring kept box of the same class exceeds ``iou``.
    """
    order = np.argsort(-scores, kind="stable")
    # offset boxes by class so different classes never overlap (as torchvision's batched NMS)
    off = boxes + (class_ids.astype(boxes.dtype) * (boxes.max() + 1.0 if boxes.size else 0))[:, None]
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[_iou_one_to_many(off[i], off[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


# ----------------------------------------------------------------------------- inference


class _BaseDetector:
    meta: ModelMeta
    backend: str = ""

    def detect(
        self, hu_slices: np.ndarray, *, conf: float = 0.25, iou: float = 0.7, batch: int = 16
    ) -> list[Detection]:
        """Detect on axial slices ``hu_slices[k, j, i]`` (HU); one :class:`Detection` per slice."""
        hu_slices = np.asarray(hu_slices)
        if hu_slices.ndim == 2:
            hu_slices = hu_slices[None]
        if hu_slices.ndim != 3 or min(hu_slices.shape[1:]) < 8:
            raise DetectorError(f"need slices [k, j, i] of at least 8×8 pixels, got {hu_slices.shape}")
        out: list[Detection] = []
        for s in range(0, hu_slices.shape[0], batch):
            rgb = hu_to_rgb8(hu_slices[s:s + batch], self.meta.hu_windows)
            out.extend(self._detect_rgb(rgb, conf, iou))
        return out

    def _detect_rgb(self, rgb: np.ndarray, conf: float, iou: float) -> list[Detection]:
        raise NotImplementedError


def _cpu_cores() -> int:
    """CPU cores this process may run on (affinity-aware; ``os.cpu_count()`` counts the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OnnxDetector(_BaseDetector):
    """YOLOv8 detection ONNX model (Ultralytics export, output ``(N, 4 + n_classes, anchors)``)
    run with ONNX Runtime.

    ``threads``: CPU threads to use (default: the cores this process may run on).
    ``sessions``: how many ONNX Runtime sessions share them (default ``min(threads,
    4)``, each with ``threads // sessions`` intra-op threads). A batch of slices is
    split between the sessions and run concurrently (ONNX Runtime releases the
    GIL): at 160 px a YOLOv8n layer is too small to keep two threads busy, so
    data parallelism beats splitting every layer (INT8 model on 2 cores: 1.6 vs
    2.0 ms/slice, ``benchmarks/bench_detector.py speed``). Results do not depend
    on the split.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, meta: ModelMeta, *, threads: int | None = None,
                 sessions: int | None = None) -> None:
        import onnxruntime as ort

        n_threads = max(1, int(threads or _cpu_cores()))
        n_sessions = max(1, min(int(sessions or min(n_threads, 4)), n_threads))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, n_threads // n_sessions)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        source: str | bytes = str(path)
        try:
            import onnx

            graph = onnx.load(str(path))
            if rewrite_dfl_softmax(graph):  # Ultralytics exports: same outputs, faster decoder
                source = graph.SerializeToString()
            del graph
        except Exception:  # noqa: BLE001 - not parseable here: let ONNX Runtime judge the file
            source = str(path)
        try:
            self.sessions = [ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
                             for _ in range(n_sessions)]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise DetectorError(
                f"the weights file is not a loadable ONNX model ({exc.__class__.__name__})"
            ) from None
        self.session = self.sessions[0]
        self._pool = None
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1:
            raise DetectorError("the ONNX model is not a YOLO detector (expects one NCHW input, one output)")
        shp = outputs[0].shape
        if len(shp) != 3:
            raise DetectorError("the ONNX model is not a YOLOv8 detector (output must be (N, 4 + classes, anchors))")
        n_out = shp[1]
        if isinstance(n_out, int) and n_out != 4 + len(meta.classes):
            raise DetectorError(
                f"the ONNX model is not a YOLOv8 detector with {len(meta.classes)} classes "
                f"(output has {n_out} channels, expected {4 + len(meta.classes)})"
            )
        in_shape = inputs[0].shape
        if isinstance(in_shape[2], int) and in_shape[2] != meta.imgsz:
            meta.imgsz = int(in_shape[2])
        self.dynamic_batch = not isinstance(in_shape[0], int)
        self.input_name = inputs[0].name
        self.meta = meta
        _check_mappable(meta)

    def _run_one(self, session: Any, x: np.ndarray) -> np.ndarray:
        if self.dynamic_batch:
            return session.run(None, {self.input_name: x})[0]
        return np.concatenate([session.run(None, {self.input_name: x[b:b + 1]})[0]
                               for b in range(x.shape[0])])

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = min(len(self.sessions), x.shape[0])
        if n <= 1:
            return self._run_one(self.session, x)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(len(self.sessions) - 1, thread_name_prefix="onnx-detect")
        chunks = np.array_split(x, n)
        futures = [self._pool.submit(self._run_one, self.sessions[c], chunks[c]) for c in range(1, n)]
        first = self._run_one(self.session, chunks[0])
        return np.concatenate([first] + [f.result() for f in futures])

    def _detect_rgb(self, rgb: np.ndarray, conf: float, iou: float) -> list[Detection]:
        lb, r, (px, py) = letterbox(rgb, self.meta.imgsz)
        x = np.ascontiguousarray(lb.transpose(0, 3, 1, 2), dtype=np.float32)
        x *= np.float32(1.0 / 255.0)
        pred = self._run(x)  # (N, 4 + nc, A): cx, cy, w, h in model pixels, class scores
        h, w = rgb.shape[1:3]
        out = []
        for p in pred:
            scores_all = p[4:]
            cls = scores_all.argmax(axis=0)
            score = scores_all[cls, np.arange(scores_all.shape[1])]
            sel = score > conf
            if not sel.any():
                out.append(Detection(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                     np.zeros(0, np.int64)))
                continue
            cx, cy, bw, bh = p[:4, sel]
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            score, cls = score[sel], cls[sel]
            keep = nms(boxes, score, cls, iou)[:300]
            boxes = boxes[keep]
            boxes[:, [0, 2]] = np.clip((boxes[:, [0, 2]] - px) / r, 0, w)
            boxes[:, [1, 3]] = np.clip((boxes[:, [1, 3]] - py) / r, 0, h)
            out.append(Detection(boxes.astype(np.float32), score[keep].astype(np.float32),
                                 cls[keep].astype(np.int64)))
        return out


class UltralyticsDetector(_BaseDetector):
    """A ``.pt`` YOLO detection model run through Ultralytics (needs torch)."""

    backend = "ultralytics"

    def __init__(self, path: Path, meta: ModelMeta | None = None, *, config_dir: Path | None = None) -> None:
        configure_ultralytics(config_dir)
        from ultralytics import YOLO

        try:
            self.model = YOLO(str(path), task="detect")
        except Exception as exc:  # noqa: BLE001 - ultralytics raises many types
            raise DetectorError(f"the weights file is not a loadable YOLO model ({exc.__class__.__name__})") from None
        if getattr(self.model, "task", "detect") != "detect":
            raise DetectorError(f"the weights are a YOLO {self.model.task} model, not a detector")
        names = self.model.names
        classes = [names[i] for i in range(len(names))]
        if meta is None:
            imgsz = (getattr(self.model, "overrides", None) or {}).get("imgsz", 256)
            imgsz = int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)
            meta = ModelMeta(classes, imgsz=imgsz)
        elif meta.classes != classes:
            raise DetectorError(f"metadata classes {meta.classes} differ from the model's {classes}")
        self.meta = meta
        _check_mappable(meta)

    def _detect_rgb(self, rgb: np.ndarray, conf: float, iou: float) -> list[Detection]:
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in rgb]  # Ultralytics expects BGR arrays
        res = self.model.predict(bgr, imgsz=self.meta.imgsz, conf=conf, iou=iou, device="cpu",
                                 verbose=False, rect=False)
        out = []
        for r in res:
            b = r.boxes
            out.append(Detection(b.xyxy.numpy().astype(np.float32), b.conf.numpy().astype(np.float32),
                                 b.cls.numpy().astype(np.int64)))
        return out


def default_weights() -> Path:
    """The shipped weights used when none are given: the INT8 copy
    (:data:`INT8_WEIGHTS`) when it is shipped and its metadata marks it
    ``"default": true`` (set by ``quantize_detector --make-default`` after its
    held-out accuracy was checked), else the float model :data:`DEFAULT_WEIGHTS`.
    ``DEIDSTUDY_DETECTOR_PRECISION=float`` forces the float model."""
    if os.environ.get("DEIDSTUDY_DETECTOR_PRECISION", "").lower() in ("float", "fp32", "float32"):
        return DEFAULT_WEIGHTS
    meta = INT8_WEIGHTS.with_suffix(".json")
    if INT8_WEIGHTS.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()).get("default") is True:
                return INT8_WEIGHTS
        except json.JSONDecodeError:
            pass
    return DEFAULT_WEIGHTS


def load_detector(
    weights: Path | None = None, *, class_map: Path | None = None, threads: int | None = None,
    sessions: int | None = None,
) -> _BaseDetector:
    """Load a detector: ``.onnx`` → :class:`OnnxDetector`, ``.pt`` → :class:`UltralyticsDetector`.

    ``weights`` defaults to the shipped model (:func:`default_weights`). Metadata
    is read from ``<weights>.json`` next to the file (``face_yolov8n.onnx`` →
    ``face_yolov8n.json``); for ``.pt`` files the class names come from the
    model itself. ``class_map``: optional JSON ``{"model class": "canonical
    class" | null}`` for users' own models whose class names differ from
    :data:`pipeline.detector_data.CLASSES`. ``threads`` / ``sessions``: CPU use
    of ONNX models (see :class:`OnnxDetector`). Raises :class:`DetectorError`
    when the file is missing, not a YOLO detector, or no class maps.
    """
    path = Path(weights) if weights is not None else default_weights()
    if not path.is_file():
        raise DetectorError("detector weights file not found" + (
            " (the shipped model is missing from pipeline/models/)" if weights is None else ""))
    meta_path = path.with_suffix(".json")
    meta: ModelMeta | None = None
    if meta_path.is_file():
        try:
            meta = ModelMeta.from_json(json.loads(meta_path.read_text()))
        except json.JSONDecodeError:
            raise DetectorError("detector metadata JSON next to the weights is not valid JSON") from None
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if meta is None:
            meta = _meta_from_onnx(path)
        if class_map is not None:
            meta.class_map = _read_class_map(class_map)
        return OnnxDetector(path, meta, threads=threads, sessions=sessions)
    if suffix == ".pt":
        det = UltralyticsDetector(path, None)
        if meta is not None:
            det.meta.hu_windows, det.meta.imgsz, det.meta.info = meta.hu_windows, meta.imgsz, meta.info
            det.meta.class_map = meta.class_map
        if class_map is not None:
            det.meta.class_map = _read_class_map(class_map)
        _check_mappable(det.meta)
        return det
    raise DetectorError(f"unsupported weights format {suffix!r}; use .onnx or .pt")


def _meta_from_onnx(path: Path) -> ModelMeta:
    """Class names / imgsz from an Ultralytics ONNX export's embedded metadata."""
    import ast

    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
        raise DetectorError(f"the weights file is not a valid ONNX model ({exc.__class__.__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "names" not in props:
        raise DetectorError("the ONNX model has no class names (not an Ultralytics YOLO export) "
                            "and no metadata JSON next to it")
    if props.get("task", "detect") != "detect":
        raise DetectorError(f"the ONNX model is a YOLO {props['task']} model, not a detector")
    names = ast.literal_eval(props["names"])
    imgsz = ast.literal_eval(props.get("imgsz", "[256, 256]"))
    return ModelMeta([names[i] for i in sorted(names)], int(imgsz[0]))


# ----------------------------------------------------------------------------- training


def configure_ultralytics(config_dir: Path | None = None, *, threads: int | None = None) -> Path:
    """Make Ultralytics fully offline; call before (or instead of) ``import ultralytics``.

    Sets ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=0``, ``YOLO_CONFIG_DIR`` (default:
    ``$DEIDSTUDY_VAR_DIR/ultralytics`` or ``<repo>/var/ultralytics``), copies
    matplotlib's DejaVuSans as ``Arial.ttf`` / ``Arial.Unicode.ttf`` into
    ``<config>/Ultralytics`` (Ultralytics' user folder) so the
    font check never downloads, disables sync/hub settings if Ultralytics is
    importable, and sets its torch thread count to ``threads`` (default: all
    cores). Returns the config folder.
    """
    if config_dir is None:
        env = os.environ.get("YOLO_CONFIG_DIR")
        if env:
            config_dir = Path(env)
        else:
            base = os.environ.get("DEIDSTUDY_VAR_DIR") or str(Path(__file__).resolve().parent.parent / "var")
            config_dir = Path(base) / "ultralytics"
    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["YOLO_VERBOSE"] = os.environ.get("YOLO_VERBOSE", "False")
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    user_dir = config_dir / "Ultralytics"  # Ultralytics' USER_CONFIG_DIR = $YOLO_CONFIG_DIR/Ultralytics
    user_dir.mkdir(exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (user_dir / name).exists():
            shutil.copyfile(font, user_dir / name)
    try:
        import ultralytics.utils as uu
        import ultralytics.utils.torch_utils as tu
    except ImportError:
        return config_dir
    try:
        uu.SETTINGS.update({"sync": False, "hub": False if "hub" in uu.SETTINGS else uu.SETTINGS.get("hub"),
                            "mlflow": False, "wandb": False, "tensorboard": False, "clearml": False,
                            "comet": False, "dvc": False, "neptune": False, "raytune": False})
    except Exception:  # noqa: BLE001 - unknown keys across versions are not fatal
        for k in ("sync", "mlflow", "wandb", "tensorboard", "clearml", "comet", "dvc", "neptune", "raytune"):
            try:
                uu.SETTINGS.update({k: False})
            except Exception:  # noqa: BLE001, S110
                pass
    n = int(threads or os.cpu_count() or 1)
    tu.NUM_THREADS = n
    if hasattr(uu, "NUM_THREADS"):
        uu.NUM_THREADS = n
    return config_dir


def train_yolo(
    data_yaml: Path,
    out_dir: Path,
    *,
    model_yaml: str = "yolov8n.yaml",
    epochs: int = 30,
    imgsz: int = 256,
    batch: int = 32,
    seed: int = 0,
    time_hours: float | None = None,
    workers: int = 1,
    patience: int = 100,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Train a YOLOv8 detector on CPU, offline: from its yaml (``model_yaml="yolov8n.yaml"``, no
    pretrained weights) or continued from a ``.pt`` checkpoint (``model_yaml="path/best.pt"``).

    ``data_yaml``: Ultralytics dataset file (ours from
    :func:`pipeline.detector_data.build_dataset` or a user's own YOLO dataset).
    ``out_dir``: run folder (``weights/best.pt`` is written there). Colour
    augmentations are disabled (channels are HU windows, not colours).
    ``time_hours`` caps wall time (Ultralytics then fits the LR schedule to it).
    Returns the path of ``best.pt``.
    """
    configure_ultralytics()
    from ultralytics import YOLO

    out_dir = Path(out_dir).resolve()
    args: dict[str, Any] = dict(
        data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device="cpu", seed=seed,
        deterministic=True, workers=workers, project=str(out_dir.parent), name=out_dir.name,
        exist_ok=True, pretrained=not str(model_yaml).endswith((".yaml", ".yml")), amp=False, plots=False, verbose=False, patience=patience,
        hsv_h=0.0, hsv_s=0.0, hsv_v=0.15, degrees=5.0, translate=0.1, scale=0.3, fliplr=0.5,
        mosaic=1.0, close_mosaic=max(1, epochs // 6), val=True,
    )
    if time_hours:
        args["time"] = float(time_hours)
    args.update(extra or {})
    model = YOLO(model_yaml, task="detect")
    model.train(**args)
    best = out_dir / "weights" / "best.pt"
    if not best.is_file():
        best = out_dir / "weights" / "last.pt"
    return best


def export_onnx(pt_path: Path, onnx_path: Path, *, imgsz: int = 256) -> Path:
    """Export a ``.pt`` detector to ONNX (dynamic batch, opset 17, simplified) at ``onnx_path``."""
    configure_ultralytics()
    from ultralytics import YOLO

    model = YOLO(str(pt_path), task="detect")
    produced = Path(model.export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, opset=17,
                                 device="cpu", verbose=False))
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    if produced.resolve() != onnx_path.resolve():
        shutil.move(str(produced), onnx_path)
    return onnx_path


def drop_classes(src_pt: Path, dst_pt: Path, drop: Sequence[str]) -> list[str]:
    """Remove classes from a trained YOLOv8 ``.pt`` detector without retraining.

    YOLOv8 scores every class with its own sigmoid output channel of the last
    1×1 convolution of each classification branch (``Detect.cv3[i][-1]``); the
    box branch is shared. Deleting a class's channel (weights and bias) leaves
    every other class's scores, boxes and per-class NMS bit-for-bit unchanged,
    so the remaining classes keep their measured accuracy. ``drop``: class names
    to remove (must exist; at least one class must remain). The checkpoint is
    written to a temporary file beside ``dst_pt`` and renamed; training state
    (optimizer, EMA) is not carried over. Returns the remaining class names in
    output order.
    """
    configure_ultralytics()
    import torch

    src_pt, dst_pt = Path(src_pt), Path(dst_pt)
    try:
        ckpt = torch.load(str(src_pt), map_location="cpu", weights_only=False)
        model = (ckpt.get("ema") or ckpt["model"]) if isinstance(ckpt, dict) else None
        head = model.model[-1]
        names = [model.names[i] for i in range(len(model.names))]
        branches = list(head.cv3)
    except Exception as exc:  # noqa: BLE001 - torch/pickle raise many types
        raise DetectorError(f"not an Ultralytics YOLO detector checkpoint ({exc.__class__.__name__})") from None
    unknown = [c for c in drop if c not in names]
    if unknown:
        raise DetectorError(f"classes {unknown} are not in the model ({', '.join(names)})")
    keep = [i for i, c in enumerate(names) if c not in set(drop)]
    if not keep:
        raise DetectorError("at least one class must remain")
    if getattr(head, "end2end", False):
        raise DetectorError("end-to-end (NMS-free) heads are not supported")
    idx = torch.tensor(keep)
    with torch.no_grad():
        for seq in branches:
            old = seq[-1]
            new = torch.nn.Conv2d(old.in_channels, len(keep), 1, bias=old.bias is not None)
            new = new.to(old.weight.dtype)
            new.weight.copy_(old.weight[idx])
            if old.bias is not None:
                new.bias.copy_(old.bias[idx])
            seq[-1] = new
    head.nc = len(keep)
    head.no = head.nc + head.reg_max * 4
    model.names = {n: names[i] for n, i in enumerate(keep)}
    model.nc = len(keep)
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = len(keep)
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "ema", "updates", "scaler")}
    out.update(model=model, ema=None, optimizer=None, updates=None)
    if isinstance(out.get("train_args"), dict):
        out["train_args"] = {**out["train_args"], "names": dict(model.names)}
    dst_pt.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_pt.with_name(f".{dst_pt.name}.tmp")
    try:
        torch.save(out, str(tmp))
        os.replace(tmp, dst_pt)
    finally:
        tmp.unlink(missing_ok=True)
    return [names[i] for i in keep]


def evaluate_yolo(weights: Path, data_yaml: Path, *, split: str = "test", imgsz: int = 256,
                  batch: int = 16) -> dict[str, Any]:
    """Ultralytics validation of ``weights`` on ``split`` of ``data_yaml``.

    Returns ``{"split", "images", "mAP50", "mAP50_95", "per_class": {name:
    {"mAP50", "mAP50_95", "instances"}}, "seconds"}`` (mAP in 0…1, IoU-based on
    pixel boxes). Works for ``.pt`` and ``.onnx`` weights.
    """
    configure_ultralytics()
    from ultralytics import YOLO

    t0 = time.perf_counter()
    model = YOLO(str(weights), task="detect")
    m = model.val(data=str(data_yaml), split=split, imgsz=imgsz, batch=batch, device="cpu",
                  plots=False, verbose=False, workers=0, project=str(Path(weights).parent / "_val"),
                  name="run", exist_ok=True)
    names = m.names
    per: dict[str, Any] = {}
    nt = getattr(m, "nt_per_class", None)
    for j, c in enumerate(m.ap_class_index):
        p, r, ap50, ap = m.class_result(j)
        per[names[int(c)]] = {"mAP50": round(float(ap50), 4), "mAP50_95": round(float(ap), 4),
                              "precision": round(float(p), 4), "recall": round(float(r), 4),
                              "instances": int(nt[int(c)]) if nt is not None else None}
    shutil.rmtree(Path(weights).parent / "_val", ignore_errors=True)
    return {"split": split, "mAP50": round(float(m.box.map50), 4), "mAP50_95": round(float(m.box.map), 4),
            "per_class": per, "seconds": round(time.perf_counter() - t0, 1)}



# ----------------------------------------------------------------------------- INT8


def synthetic_calibration(imgsz: int, *, n_subjects: int = 6, every: int = 3,
                          seed_base: int = 7000, domain: bool = False) -> np.ndarray:
    """Calibration batch for :func:`quantize_onnx`: letterboxed synthetic slices.

    Slices with facial features (every ``every``-th) of ``n_subjects`` training
    subjects (seeds ``seed_base …``, the training range of
    :class:`pipeline.detector_data.DatasetSpec`, never the test seeds), windowed
    with :data:`pipeline.detector_data.HU_WINDOWS`; ``domain``: the
    domain-randomised heads (:func:`pipeline.detector_data.domain_head`).
    Returns float32 ``(N, 3, imgsz, imgsz)`` in 0…1, the model's input convention.
    """
    spec = DatasetSpec(seed_base=seed_base)
    out = []
    for seed in spec.seeds("train")[:n_subjects]:
        if domain:
            head = domain_head(seed)
        else:
            geo = subject_geometry(spec, seed)
            head = generate_head(SubjectParams.random(seed), shape=geo["shape"], spacing_mm=geo["spacing_mm"],
                                 noise_hu=geo["noise_hu"], noise_seed=seed)
        ks = [k for k, b in enumerate(head.feature_boxes) if b][::every]
        lb, _, _ = letterbox(hu_to_rgb8(head.volume.hu[ks]), imgsz)
        out.append(lb.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0))
    return np.ascontiguousarray(np.concatenate(out))


#: ONNX ops that :func:`quantize_onnx` runs in 8 bit (ONNX Runtime fuses each Q/DQ-wrapped
#: node into its integer kernel: QLinearConv, QLinearSigmoid, QLinearMul, QLinearAdd,
#: QLinearConcat, int8 MaxPool / Resize / Split), so activations stay 8-bit from one
#: convolution to the next instead of being converted back to float around every SiLU.
QUANTIZED_OPS: tuple[str, ...] = ("Conv", "Mul", "Sigmoid", "Add", "Concat", "MaxPool", "Resize", "Split")


def decoder_nodes(model: Any) -> list[str]:
    """Names of the box-decoding nodes of an Ultralytics YOLOv8 ONNX graph.

    The detection head's module (the one holding the ``dfl`` convolution, e.g.
    ``/model.22/``) turns the raw branch outputs into boxes: anchor grid,
    distribution-focal-loss softmax and its fixed 0…15 convolution, distance →
    ``(cx, cy, w, h)`` in model pixels, class sigmoid. Those must stay in float
    (8-bit pixel coordinates would move boxes by whole pixels). The head's own
    convolution branches (``cv2``: box, ``cv3``: class) are not decoder nodes.
    Returns ``[]`` for graphs without such names (then nothing is excluded).
    """
    names = [n.name for n in model.graph.node]
    prefixes = {nm.split("/dfl/")[0] + "/" for nm in names if "/dfl/" in nm}
    return [nm for nm in names if any(nm.startswith(p) for p in prefixes)
            and not any(nm.startswith(p + b) for p in prefixes for b in ("cv2", "cv3"))]


def rewrite_dfl_softmax(model: Any) -> bool:
    """Make the DFL box decoder of an Ultralytics YOLOv8 ONNX graph cheap for ONNX Runtime, in place.

    Ultralytics exports the distribution-focal-loss decoder as ``Reshape (N, 4,
    16, A) → Transpose (0, 2, 1, 3) → Softmax(axis=1) → 1×1 Conv`` with weights
    0…15 (the expected distance in grid cells). A softmax over a middle axis is
    slow in ONNX Runtime (on 2 cores it took 11 % of the whole INT8 model's time).
    The equivalent ``Transpose (0, 1, 3, 2) → Softmax(axis=-1) → MatMul`` with
    the same 0…15 column vector gives ``(N, 4, A, 1)``, which the following
    Reshape turns into the same ``(N, 4, A)``: identical values (up to float
    summation order). Returns ``False`` (and changes nothing) when the graph does
    not have exactly that pattern.
    """
    from onnx import helper, numpy_helper

    nodes = list(model.graph.node)
    by_output = {o: n for n in nodes for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    softmax = [n for n in nodes if n.op_type == "Softmax" and "/dfl/" in n.name]
    if len(softmax) != 1:
        return False
    sm = softmax[0]
    tr = by_output.get(sm.input[0])
    conv = [n for n in nodes if n.op_type == "Conv" and sm.output[0] in n.input]
    if tr is None or tr.op_type != "Transpose" or len(conv) != 1 or conv[0].input[1] not in inits:
        return False
    conv = conv[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in (*tr.attribute, *sm.attribute)}
    weight = numpy_helper.to_array(inits[conv.input[1]])
    if list(attrs.get("perm", [])) != [0, 2, 1, 3] or attrs.get("axis") != 1 or weight.shape[:2] != (1, weight.size):
        return False
    if len(conv.input) > 2 or sum(1 for n in nodes if tr.output[0] in n.input) != 1:
        return False
    stale = {tr.output[0], sm.output[0], conv.output[0]}  # shapes change: drop their annotations
    for vi in [v for v in model.graph.value_info if v.name in stale]:
        model.graph.value_info.remove(vi)
    for a in tr.attribute:
        if a.name == "perm":
            a.ints[:] = [0, 1, 3, 2]
    for a in sm.attribute:
        if a.name == "axis":
            a.i = -1
    w_name = conv.input[1] + ".column"
    model.graph.initializer.append(numpy_helper.from_array(weight.reshape(-1, 1).astype(weight.dtype), w_name))
    matmul = helper.make_node("MatMul", [sm.output[0], w_name], [conv.output[0]],
                              name=conv.name.replace("/Conv", "/MatMul"))
    idx = nodes.index(conv)
    model.graph.node.remove(conv)
    model.graph.node.insert(idx, matmul)
    if not any(conv.input[1] in n.input for n in model.graph.node):
        model.graph.initializer.remove(inits[conv.input[1]])
    return True


def quantize_onnx(src: Path, dst: Path, calibration: np.ndarray, *,
                  op_types: tuple[str, ...] = QUANTIZED_OPS,
                  exclude_nodes: tuple[str, ...] | None = None) -> Path:
    """Static INT8 quantization of a YOLOv8 ONNX model for ONNX Runtime on CPU.

    QDQ format; convolution weights signed 8 bit per output channel, activations
    unsigned 8 bit with ranges from ``calibration`` (float32 NCHW batch in the
    model's 0…1 input convention, e.g. :func:`synthetic_calibration`; min/max
    calibration). Nodes of ``op_types`` (default :data:`QUANTIZED_OPS`: the whole
    backbone, neck and head branches, SiLU included) are quantized, except
    ``exclude_nodes`` (default :func:`decoder_nodes`: the box decoder stays
    float; its softmax is first made cheap by :func:`rewrite_dfl_softmax`). On
    CPUs with 8-bit dot-product instructions (AVX-512 VNNI / AVX-VNNI) this runs
    faster than float32; check its accuracy (``eval_detector``, or ``manage.py
    quantize_detector`` which does) before shipping it. The output is written to
    a temporary file beside ``dst`` and renamed.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    src, dst = Path(src).resolve(), Path(dst).resolve()  # the work below runs in a temp folder
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or calibration.shape[0] == 0:
        raise DetectorError("calibration must be a non-empty (N, C, H, W) batch")
    try:
        import onnx

        graph_model = onnx.load(str(src), load_external_data=False)
        input_name = graph_model.graph.input[0].name
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
        raise DetectorError(f"not a valid ONNX model ({exc.__class__.__name__})") from None
    fast_dfl = rewrite_dfl_softmax(graph_model)
    if exclude_nodes is None:
        exclude_nodes = tuple(decoder_nodes(graph_model))

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(calibration.shape[0]))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {input_name: calibration[i:i + 1]}

    dst.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        os.chdir(tmp)  # the ONNX tools drop scratch files into the working directory
        try:
            pre = Path(tmp) / "pre.onnx"
            if fast_dfl:
                rewritten = Path(tmp) / "dfl.onnx"
                onnx.save(graph_model, str(rewritten))
                src = rewritten
            del graph_model
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            out = Path(tmp) / "int8.onnx"
            quantize_static(str(pre), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
                            nodes_to_exclude=list(exclude_nodes))
            os.replace(out, dst)
        finally:
            os.chdir(cwd)
    return dst
