"""Screenshot comparison against stored references (``tests/e2e/refs/*.png``).

``compare(png, name, tolerance)`` fails when the screenshot differs from the reference by
more than the tolerance: the mean absolute difference over all pixels and channels
(0–255) and the fraction of pixels whose largest channel difference exceeds
``pixel_threshold``. On failure the screenshot and a difference image are written to
``DEIDSTUDY_SCREENSHOT_DIR`` (default: the system's temporary folder) and the message
names them. ``DEIDSTUDY_UPDATE_SCREENSHOTS=1`` rewrites the references instead (after
a deliberate change of what the viewers draw; look at the new pictures before
committing them).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REF_DIR = Path(__file__).resolve().parent / "refs"


@dataclass(frozen=True)
class Tolerance:
    mean: float  # mean absolute difference, 0–255
    fraction: float  # of pixels differing by more than pixel_threshold
    pixel_threshold: int = 40


#: 2D canvases are drawn by our own code: near pixel-exact (browser scaling only).
SLICES = Tolerance(mean=1.5, fraction=0.005)
#: NiiVue's WebGL in software (SwiftShader): shading may differ slightly between CPUs.
SURFACES = Tolerance(mean=3.0, fraction=0.02, pixel_threshold=48)


def load(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def difference(a: np.ndarray, b: np.ndarray, pixel_threshold: int = 40) -> tuple[float, float]:
    """(mean absolute difference, fraction of pixels over ``pixel_threshold``)."""
    if a.shape != b.shape:
        return float("inf"), 1.0
    d = np.abs(a - b)
    return float(d.mean()), float((d.max(axis=2) > pixel_threshold).mean())


def compare(png: bytes, name: str, tol: Tolerance) -> tuple[float, float]:
    """Compare a screenshot with reference ``name``; returns (mean, fraction)."""
    ref_path = REF_DIR / f"{name}.png"
    img = load(png)
    if os.environ.get("DEIDSTUDY_UPDATE_SCREENSHOTS") == "1":
        REF_DIR.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(ref_path, optimize=True)
        return 0.0, 0.0
    if not ref_path.exists():
        raise AssertionError(f"no reference screenshot {ref_path.name}: run the test with "
                             "DEIDSTUDY_UPDATE_SCREENSHOTS=1 and check the pictures")
    ref = np.asarray(Image.open(ref_path).convert("RGB"), dtype=np.int16)
    mean, frac = difference(img, ref, tol.pixel_threshold)
    if mean > tol.mean or frac > tol.fraction:
        out = Path(os.environ.get("DEIDSTUDY_SCREENSHOT_DIR") or tempfile.gettempdir())
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(out / f"{name}.actual.png")
        if img.shape == ref.shape:
            diff = np.clip(np.abs(img - ref) * 4, 0, 255).astype(np.uint8)
            Image.fromarray(diff).save(out / f"{name}.diff.png")
        raise AssertionError(
            f"screenshot {name} differs from its reference: mean {mean:.2f} (tolerance "
            f"{tol.mean}), {100 * frac:.2f} % of pixels over {tol.pixel_threshold} (tolerance "
            f"{100 * tol.fraction:.1f} %), shapes {img.shape} vs {ref.shape}; see "
            f"{out / (name + '.actual.png')}")
    return mean, frac
