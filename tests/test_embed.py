"""Face embeddings: dlib HOG detection, ResNet descriptors, fallback box, similarity maths."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.transform
from scipy.spatial.distance import cdist, cosine

from pipeline.embed import (
    EMBEDDING_DIM,
    EmbedError,
    cosine_similarity,
    cosine_similarity_matrix,
    embed_face,
    get_embedder,
    l2_distance,
    model_paths,
)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # one clearly visible face in the upper middle


def _lfw_face(idx: int) -> np.ndarray:
    face = skimage.data.lfw_subset()[idx]  # 25×25 grey face crops, values 0..1
    big = skimage.transform.resize(face, (150, 150), order=3)
    return np.pad((np.clip(big, 0, 1) * 255).astype(np.uint8), 40, mode="edge")


def test_models_are_found_offline():
    paths = model_paths()
    assert all(p.is_file() and p.stat().st_size > 1_000_000 for p in paths.values())


def test_detects_and_embeds_a_real_face(astronaut):
    e = embed_face(astronaut)
    assert e.detected and np.isfinite(e.detection_score)
    left, top, right, bottom = e.box
    # the astronaut's face: upper half, horizontally between 1/4 and 3/5 of the width
    assert 0 < top < bottom < 256 and 100 < left < right < 320
    assert e.vector.shape == (EMBEDDING_DIM,) and np.all(np.isfinite(e.vector))
    again = embed_face(astronaut)
    assert np.array_equal(e.vector, again.vector)  # deterministic


def test_same_person_is_closer_than_other_people(astronaut):
    ref = embed_face(astronaut).vector
    # same identity, different scale, shift and colour → grey
    grey = (skimage.color.rgb2gray(astronaut) * 255).astype(np.uint8)
    small = (skimage.transform.rescale(grey, 0.7, order=1) * 255).astype(np.uint8)
    shifted = np.pad(small, ((30, 0), (0, 50)), mode="edge")
    same = embed_face(shifted)
    assert same.detected
    d_same = l2_distance(ref, same.vector)
    others = [embed_face(_lfw_face(i), fallback_box=(40, 40, 190, 190)) for i in range(6)]
    d_other = [l2_distance(ref, o.vector) for o in others if o.detected]
    assert len(d_other) >= 4
    assert d_same < 0.6 < min(d_other)
    assert cosine_similarity(ref, same.vector) > max(cosine_similarity(ref, o.vector)
                                                    for o in others)


def test_fallback_box_is_used_and_recorded():
    cat = skimage.data.chelsea()
    with pytest.raises(EmbedError, match="no face detected"):
        embed_face(cat)
    box = (120, 40, 300, 220)
    e = embed_face(cat, fallback_box=box)
    assert not e.detected and e.box == box and np.isnan(e.detection_score)
    assert e.vector.shape == (EMBEDDING_DIM,) and np.all(np.isfinite(e.vector))


def test_similarity_functions_match_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 128)), rng.normal(size=(7, 128))
    assert cosine_similarity(a[0], b[0]) == pytest.approx(1 - cosine(a[0], b[0]))
    assert l2_distance(a[1], b[2]) == pytest.approx(cdist(a[1:2], b[2:3])[0, 0])
    assert np.allclose(cosine_similarity_matrix(a, b), 1 - cdist(a, b, "cosine"))
    assert cosine_similarity(a[0], 3 * a[0]) == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(EmbedError, match="uint8"):
        embed_face(np.zeros((64, 64)))
    with pytest.raises(EmbedError, match="shape"):
        embed_face(np.zeros((64, 64, 2), dtype=np.uint8))
    with pytest.raises(EmbedError, match="too small"):
        embed_face(np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(EmbedError, match="zero vector"):
        cosine_similarity(np.zeros(3), np.ones(3))
    with pytest.raises(EmbedError, match="sizes differ"):
        cosine_similarity_matrix(np.ones((2, 3)), np.ones((2, 4)))
    assert get_embedder() is get_embedder()
