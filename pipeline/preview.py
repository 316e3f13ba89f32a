"""Preview images of CT volumes: HU windowing, mid-slices, PNG encoding.

Arrays in, bytes out; no Django. Volumes are ``hu[k, j, i]`` (slice k, row j, column i)
in Hounsfield units in the DICOM LPS patient frame as :mod:`pipeline.volume` loads
them: rows run anterior → posterior, columns patient right → left.

Image conventions: slices are windowed linearly (default −1000..1000 HU); axial
panels show anterior up and patient left on the image right; sagittal panels show
superior up and anterior left. No image carries text or header data.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

WINDOW_HU = (-1000.0, 1000.0)


def png_bytes(image: np.ndarray, compress_level: int = 3) -> bytes:
    """PNG encoding of a uint8 grey ``(H, W)`` or RGB ``(H, W, 3)`` image.

    zlib level 3: on CT pictures as small as Pillow's default 6 and half the time.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG",
                                                     compress_level=compress_level)
    return buf.getvalue()


def window(hu: np.ndarray, window_hu: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """Linear window of HU values to uint8 (``window_hu`` = (low, high) HU)."""
    lo, hi = window_hu
    x = (np.asarray(hu, np.float32) - lo) / (hi - lo)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mid_slices(hu: np.ndarray, spacing_mm: tuple[float, float, float],
               k: int | None = None, i: int | None = None) -> dict[str, np.ndarray]:
    """Windowed axial (slice ``k``) and sagittal (column ``i``) images of ``hu[k, j, i]``.

    Axial: rows j (anterior at the top), columns i (patient left on the right).
    Sagittal: flipped so superior is up, rows j become columns (anterior on the
    left), resampled along k to square pixels using ``spacing_mm`` (dk, dj, di).
    """
    nk, _, ni = hu.shape
    k = nk // 2 if k is None else k
    i = ni // 2 if i is None else i
    axial = window(hu[k])
    sag = window(hu[::-1, :, i])  # rows: superior → inferior, cols: anterior → posterior
    dk, dj, _ = spacing_mm
    rows = max(1, round(nk * dk / dj))
    idx = np.clip((np.arange(rows) * nk / rows).astype(int), 0, nk - 1)
    return {"axial": axial, "sagittal": sag[idx]}
