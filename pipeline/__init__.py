"""deidstudy's imaging pipeline: pure Python, no Django imports.

Conventions used throughout the package
---------------------------------------
* Volumes are numpy arrays indexed ``[k, j, i]`` = ``[slice, row, column]``.
* Patient coordinates are DICOM LPS in millimetres (x → patient Left,
  y → Posterior, z → Superior).
* CT intensities are Hounsfield units (HU) after RescaleSlope/Intercept.
* Units are part of names: ``spacing_mm``, ``removed_ml``, ``hu``.
"""

__all__: list[str] = []
