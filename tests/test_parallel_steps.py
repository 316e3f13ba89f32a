"""The defacing's multi-threaded steps give the arrays their serial versions give.

Speed (``make bench``) comes from running scipy/numpy work on two threads; none of it may
change a voxel. Here the parallel primitives are compared with the plain calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from pipeline.deface import AnatomicalFaceRegion, deface
from pipeline.envelope import _pool_inplane, in_slabs
from pipeline.synth import SubjectParams, generate_head

CUBE = np.ones((3, 3, 3), bool)


@pytest.mark.parametrize("shape", [(61, 23, 19), (40, 8, 8), (9, 12, 12)])
@pytest.mark.parametrize(("op", "kwargs", "halo"), [
    (ndi.binary_dilation, {"iterations": 1}, 1),
    (ndi.binary_dilation, {"iterations": 3}, 3),
    (ndi.binary_dilation, {"iterations": 2, "structure": CUBE}, 2),
    (ndi.binary_erosion, {"iterations": 1}, 1),
    (ndi.binary_erosion, {"iterations": 4}, 4),
    (ndi.binary_opening, {"iterations": 1}, 2),
])
def test_in_slabs_is_the_plain_operation(shape, op, kwargs, halo) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = ndi.binary_opening(rng.random(shape) > 0.35)  # blobs, touching every border
    mask[:, 0] = mask[0] = mask[-1] = True
    np.testing.assert_array_equal(in_slabs(op, mask, halo, **kwargs), op(mask, **kwargs))


def test_too_small_a_halo_would_be_caught() -> None:
    """The comparison above can fail: an erosion of 3 with a halo of 1 differs."""
    mask = np.ones((64, 12, 12), bool)
    assert not np.array_equal(in_slabs(ndi.binary_erosion, mask, 1, iterations=3),
                              ndi.binary_erosion(mask, iterations=3))


def _reference_pool(hu: np.ndarray, f: int, fill: float = -1000.0) -> np.ndarray:
    nk, nj, ni = hu.shape
    pj, pi = (-nj) % f, (-ni) % f
    padded = np.pad(hu.astype(np.float64), ((0, 0), (0, pj), (0, pi)), constant_values=fill)
    return padded.reshape(nk, (nj + pj) // f, f, (ni + pi) // f, f).mean(axis=(2, 4))


@pytest.mark.parametrize(("shape", "dtype", "f"), [
    ((37, 64, 64), np.int16, 4), ((20, 50, 47), np.int16, 3), ((17, 30, 31), np.float32, 2),
    ((5, 9, 9), np.int32, 4), ((3, 8, 8), np.int16, 1)])
def test_pooling_is_the_block_mean(shape, dtype, f) -> None:
    rng = np.random.default_rng(f)
    hu = rng.integers(-1024, 3000, shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        hu += rng.random(shape).astype(dtype)
    pooled = _pool_inplane(hu, f)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, _reference_pool(hu, f), rtol=1e-6, atol=1e-3)


def test_changed_slices_are_the_slices_that_changed() -> None:
    volume = generate_head(SubjectParams.random(21), noise_seed=21).volume
    result = deface(volume, AnatomicalFaceRegion())
    differ = [k for k in range(volume.hu.shape[0]) if np.any(result.hu[k] != volume.hu[k])]
    assert differ and list(result.changed_slices) == differ
