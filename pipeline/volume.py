"""A CT volume in Hounsfield units with its geometry.

Array layout: ``hu[k, j, i]`` where ``k`` is the slice index (sorted along the
slice normal), ``j`` the row and ``i`` the column of a DICOM image.

Geometry follows DICOM (patient coordinates LPS, millimetres):

* ``row_cosine``  — direction of increasing column index ``i``
  (ImageOrientationPatient[0:3]);
* ``col_cosine``  — direction of increasing row index ``j``
  (ImageOrientationPatient[3:6]);
* ``normal``      — direction of increasing slice index ``k``;
* ``origin_lps_mm`` — ImagePositionPatient of slice ``k = 0`` (centre of voxel
  ``[0, 0, 0]``);
* ``spacing_mm`` — ``(dk, dj, di)`` = (slice spacing, row spacing, column
  spacing), i.e. in array-axis order. Note that DICOM PixelSpacing is
  ``[row spacing, column spacing]`` = ``(dj, di)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A 3D CT volume in HU with DICOM LPS geometry (see module docstring)."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    row_cosine: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0]))
    col_cosine: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
    normal: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.origin_lps_mm = np.asarray(self.origin_lps_mm, dtype=float)
        self.row_cosine = np.asarray(self.row_cosine, dtype=float)
        self.col_cosine = np.asarray(self.col_cosine, dtype=float)
        if self.normal is None:
            self.normal = np.cross(self.row_cosine, self.col_cosine)
        self.normal = np.asarray(self.normal, dtype=float)
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        if self.hu.ndim != 3:
            raise ValueError(f"a volume must be 3D, got shape {self.hu.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm³)."""
        dk, dj, di = self.spacing_mm
        return dk * dj * di / 1000.0

    def affine(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous ``(i, j, k, 1)`` indices to LPS mm."""
        dk, dj, di = self.spacing_mm
        a = np.eye(4)
        a[:3, 0] = self.row_cosine * di
        a[:3, 1] = self.col_cosine * dj
        a[:3, 2] = self.normal * dk
        a[:3, 3] = self.origin_lps_mm
        return a

    def slice_position_lps_mm(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.origin_lps_mm + k * self.spacing_mm[0] * self.normal

    def axis_towards(self, lps_direction: str) -> tuple[int, int]:
        """Return ``(array_axis, sign)`` of the array axis closest to a patient direction.

        ``lps_direction`` is one of ``"L", "R", "P", "A", "S", "I"``. ``sign`` is +1
        when increasing the index moves towards that direction, −1 otherwise.
        """
        unit = {
            "L": (0, 1.0), "R": (0, -1.0),
            "P": (1, 1.0), "A": (1, -1.0),
            "S": (2, 1.0), "I": (2, -1.0),
        }[lps_direction]
        target = np.zeros(3)
        target[unit[0]] = unit[1]
        # array axis 0 = k (normal), 1 = j (col_cosine), 2 = i (row_cosine)
        dirs = [self.normal, self.col_cosine, self.row_cosine]
        dots = [float(np.dot(d, target)) for d in dirs]
        axis = int(np.argmax(np.abs(dots)))
        return axis, (1 if dots[axis] > 0 else -1)
