"""deidstudy's imaging pipeline: pure Python, no Django imports.

Conventions used throughout the package
---------------------------------------
* Volumes are numpy arrays indexed ``[k, j, i]`` = ``[slice, row, column]``.
* Patient coordinates are DICOM LPS in millimetres (x → patient Left,
  y → Posterior, z → Superior).
* CT intensities are Hounsfield units (HU) after RescaleSlope/Intercept.
* Units are part of names: ``spacing_mm``, ``removed_ml``, ``hu``.
"""

import os as _os

# Offscreen OpenGL for pipeline.render: PyOpenGL reads the platform when it is first
# imported, so it is set when the package loads — before any module of it (or of its
# users, which all import it first) can import OpenGL/pyrender. llvmpipe runs
# single-threaded (LP_NUM_THREADS=0), which is safe to fork. setdefault: an explicit
# environment wins.
_os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
_os.environ.setdefault("LP_NUM_THREADS", "0")

__all__: list[str] = []
