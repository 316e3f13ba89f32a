"""Small synthetic CT volumes and DICOM series for tests (no patient data)."""

from __future__ import annotations

import numpy as np

from pipeline.volume import Volume


def rotation_matrix(axis: str, degrees: float) -> np.ndarray:
    """3×3 rotation about the LPS ``axis`` ("x", "y" or "z") by ``degrees``."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def synthetic_volume(
    shape: tuple[int, int, int] = (20, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.5, 0.7, 0.7),
    *,
    tilt_deg: float = 0.0,
    origin_lps_mm: tuple[float, float, float] = (-22.4, -30.1, 101.25),
    seed: int = 0,
) -> Volume:
    """A head-like phantom in HU: air outside, soft tissue ellipsoid, bone shell, noise.

    ``tilt_deg`` rotates the axial orientation about the patient x (L) axis,
    like a gantry tilt / oblique reconstruction, producing non-trivial
    ImageOrientationPatient.
    """
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    k, j, i = np.meshgrid(
        np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij"
    )
    r = np.sqrt((k / 1.1) ** 2 + (j / 0.85) ** 2 + (i / 0.75) ** 2)
    hu = np.full(shape, -1000.0)
    hu[r < 0.95] = 40.0
    hu[(r >= 0.8) & (r < 0.9)] = 1200.0
    hu += rng.normal(0.0, 15.0, size=shape)
    hu = np.rint(hu).astype(np.int16)
    rot = rotation_matrix("x", tilt_deg)
    return Volume(
        hu=hu,
        spacing_mm=spacing_mm,
        origin_lps_mm=np.array(origin_lps_mm),
        row_cosine=rot @ np.array([1.0, 0.0, 0.0]),
        col_cosine=rot @ np.array([0.0, 1.0, 0.0]),
    )
