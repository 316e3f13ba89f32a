"""Face embeddings with dlib's ResNet face descriptor (offline models).

Models come from the ``face-recognition-models`` package (5-point shape
predictor and ``dlib_face_recognition_resnet_model_v1``); nothing is
downloaded. Faces are found with dlib's HOG detector
(``get_frontal_face_detector``); when it finds none on a standardised render,
the caller's fallback box (the canonical face box of the standardised camera,
see :func:`pipeline.render.canonical_face_box`) is used and the result says
``detected=False``.

Images are 8-bit arrays, grey ``(H, W)`` or RGB ``(H, W, 3)``; boxes are
``(left, top, right, bottom)`` in pixels with the origin at the top-left.
Embeddings are 128-d float vectors; dlib's usual same-person threshold is an
L2 distance of 0.6.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "EMBEDDING_DIM",
    "EmbedError",
    "FaceEmbedder",
    "FaceEmbedding",
    "cosine_similarity",
    "cosine_similarity_matrix",
    "embed_face",
    "get_embedder",
    "l2_distance",
    "model_paths",
]

EMBEDDING_DIM = 128


class EmbedError(ValueError):
    """Bad image or box, or the dlib models cannot be found."""


@dataclass(frozen=True)
class FaceEmbedding:
    """A face descriptor and how its face box was obtained.

    ``box`` is ``(left, top, right, bottom)`` px; ``detected`` is False when
    the fallback (canonical) box was used; ``detection_score`` is the HOG
    detector's score (NaN for the fallback).
    """

    vector: np.ndarray
    detected: bool
    box: tuple[int, int, int, int]
    detection_score: float


def model_paths() -> dict[str, Path]:
    """Paths of the dlib model files shipped by ``face-recognition-models``.

    The package's own helpers import ``pkg_resources`` (gone from recent
    setuptools), so the files are located through the import system instead,
    without executing the package.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedError("package face-recognition-models is not installed")
    base = Path(next(iter(spec.submodule_search_locations))) / "models"
    paths = {
        "shape_predictor_5": base / "shape_predictor_5_face_landmarks.dat",
        "resnet": base / "dlib_face_recognition_resnet_model_v1.dat",
    }
    for p in paths.values():
        if not p.is_file():
            raise EmbedError(f"dlib model file missing from face-recognition-models: {p.name}")
    return paths


def _as_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise EmbedError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise EmbedError(f"images must be (H, W) grey or (H, W, 3) RGB, got shape {arr.shape}")
    if min(arr.shape[:2]) < 32:
        raise EmbedError(f"image too small for face embedding: {arr.shape[1]}×{arr.shape[0]} px")
    return np.ascontiguousarray(arr)


class FaceEmbedder:
    """dlib HOG detector + 5-point landmarks + ResNet descriptor (load once, reuse).

    ``upsample`` is the largest number of 2× upsamplings the detector tries
    (0 first, then more only if no face was found; 1 finds faces down to
    ~40 px); ``num_jitters`` > 0 averages descriptors over jittered
    crops (slower, slightly more stable).
    """

    def __init__(self, *, upsample: int = 1, num_jitters: int = 0) -> None:
        import dlib

        paths = model_paths()
        self.upsample = int(upsample)
        self.num_jitters = int(num_jitters)
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(paths["shape_predictor_5"]))
        self._resnet = dlib.face_recognition_model_v1(str(paths["resnet"]))

    def detect(self, image: np.ndarray) -> list[tuple[tuple[int, int, int, int], float]]:
        """HOG face boxes ``[((left, top, right, bottom), score), ...]``, best score first.

        Boxes come from the lowest upsampling level (0..``upsample``) that finds any.
        """
        rgb = _as_rgb(image)
        found: list[tuple[tuple[int, int, int, int], float]] = []
        for up in range(self.upsample + 1):  # cheapest first: most renders need no upsampling
            rects, scores, _kinds = self._detector.run(rgb, up, 0.0)
            found = [((r.left(), r.top(), r.right(), r.bottom()), float(s))
                     for r, s in zip(rects, scores)]
            if found:
                break
        return sorted(found, key=lambda t: -t[1])

    def descriptor(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """128-d descriptor of the face in ``box`` (left, top, right, bottom px)."""
        rgb = _as_rgb(image)
        left, top, right, bottom = (int(v) for v in box)
        if right - left < 8 or bottom - top < 8:
            raise EmbedError(f"face box is too small: {box}")
        rect = self._dlib.rectangle(left, top, right, bottom)
        shape = self._shape(rgb, rect)
        vec = self._resnet.compute_face_descriptor(rgb, shape, self.num_jitters)
        return np.asarray(vec, dtype=np.float64)

    def embed(self, image: np.ndarray,
              fallback_box: tuple[int, int, int, int] | None = None) -> FaceEmbedding:
        """Embed the best-scoring detected face, else the ``fallback_box``.

        Raises :class:`EmbedError` when no face is detected and no fallback
        box is given.
        """
        found = self.detect(image)
        if found:
            box, score = found[0]
            return FaceEmbedding(self.descriptor(image, box), True, box, score)
        if fallback_box is None:
            raise EmbedError("no face detected and no fallback face box given")
        box = tuple(int(v) for v in fallback_box)
        return FaceEmbedding(self.descriptor(image, box), False, box, float("nan"))  # type: ignore[arg-type]


_EMBEDDERS: dict[tuple[int, int, int], FaceEmbedder] = {}
_LOCK = threading.Lock()


def get_embedder(*, upsample: int = 1, num_jitters: int = 0) -> FaceEmbedder:
    """The process-wide :class:`FaceEmbedder` for these options (models loaded once)."""
    key = (os.getpid(), int(upsample), int(num_jitters))
    with _LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = FaceEmbedder(upsample=upsample, num_jitters=num_jitters)
        return _EMBEDDERS[key]


def embed_face(image: np.ndarray, fallback_box: tuple[int, int, int, int] | None = None,
               *, upsample: int = 1) -> FaceEmbedding:
    """Embed one face image with the cached embedder; see :meth:`FaceEmbedder.embed`."""
    return get_embedder(upsample=upsample).embed(image, fallback_box)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (−1..1)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise EmbedError("cosine similarity of a zero vector is undefined")
    return float(a @ b / (na * nb))


def l2_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two embedding vectors."""
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def cosine_similarity_matrix(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``(n_probes, n_gallery)`` cosine similarities between rows of two matrices."""
    p, g = np.atleast_2d(np.asarray(probes, float)), np.atleast_2d(np.asarray(gallery, float))
    if p.shape[1] != g.shape[1]:
        raise EmbedError(f"embedding sizes differ: {p.shape[1]} vs {g.shape[1]}")
    pn, gn = np.linalg.norm(p, axis=1), np.linalg.norm(g, axis=1)
    if np.any(pn == 0) or np.any(gn == 0):
        raise EmbedError("cosine similarity of a zero vector is undefined")
    return (p / pn[:, None]) @ (g / gn[:, None]).T
