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
* ``slice_positions_lps_mm`` — optional ``(n_slices, 3)`` ImagePositionPatient of
  every slice, for series whose slice spacing changes (e.g. 4 mm slices through
  the skull base, then 7 mm above, as routine head CT protocols do). ``None``
  for an ordinary regular stack, whose slice ``k`` lies at
  ``origin + k · dk · normal``. For an irregular stack ``dk`` is the mean
  spacing along the plane normal (information only) and :meth:`Volume.affine`
  refuses: use :meth:`Volume.as_uniform` for code that needs a regular grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Largest deviation (mm) of a slice from a regular stack still treated as regular.
REGULAR_TOLERANCE_MM = 0.02


@dataclass
class Volume:
    """A 3D CT volume in HU with DICOM LPS geometry (see module docstring)."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    row_cosine: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0]))
    col_cosine: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
    normal: np.ndarray | None = None
    slice_positions_lps_mm: np.ndarray | None = None

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
        if self.slice_positions_lps_mm is not None:
            pos = np.asarray(self.slice_positions_lps_mm, dtype=float)
            if pos.shape != (self.hu.shape[0], 3) or not np.all(np.isfinite(pos)):
                raise ValueError(
                    f"slice_positions_lps_mm must be ({self.hu.shape[0]}, 3) finite values")
            self.origin_lps_mm = pos[0].copy()
            regular = self.origin_lps_mm + np.arange(len(pos))[:, None] * (
                self.spacing_mm[0] * self.normal)[None, :]
            # a stack that is regular after all is stored as one
            self.slice_positions_lps_mm = (
                None if np.max(np.abs(pos - regular)) <= REGULAR_TOLERANCE_MM else pos)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm³)."""
        dk, dj, di = self.spacing_mm
        return dk * dj * di / 1000.0

    @property
    def is_regular(self) -> bool:
        """True when slice ``k`` lies at ``origin + k · dk · normal`` (an ordinary stack)."""
        return self.slice_positions_lps_mm is None

    def positions_lps_mm(self) -> np.ndarray:
        """ImagePositionPatient of every slice, ``(n_slices, 3)`` LPS mm."""
        if self.slice_positions_lps_mm is not None:
            return np.array(self.slice_positions_lps_mm, dtype=float)
        k = np.arange(self.hu.shape[0], dtype=float)[:, None]
        return self.origin_lps_mm[None, :] + k * (self.spacing_mm[0] * self.normal)[None, :]

    def same_grid(self, other: Volume) -> bool:
        """True when ``other`` has this volume's voxel grid: shape, spacing, origin and
        orientation (LPS mm, to ``np.allclose`` tolerance)."""
        return (self.shape == other.shape and np.allclose(self.spacing_mm, other.spacing_mm)
                and np.allclose(self.origin_lps_mm, other.origin_lps_mm)
                and np.allclose(self.row_cosine, other.row_cosine)
                and np.allclose(self.col_cosine, other.col_cosine)
                and np.allclose(self.normal, other.normal))

    def plane_normal(self) -> np.ndarray:
        """Unit normal of the slice planes, ``cross(row_cosine, col_cosine)``."""
        n = np.cross(self.row_cosine, self.col_cosine)
        return n / np.linalg.norm(n)

    def slice_offsets_mm(self) -> np.ndarray:
        """Position of every slice along the plane normal, relative to slice 0 (mm)."""
        pos = self.positions_lps_mm()
        return (pos - pos[0]) @ self.plane_normal()

    def slice_cells_mm(self) -> np.ndarray:
        """Thickness (mm, along the plane normal) of the slab each slice stands for.

        The Voronoi cell of each slice along the normal: half the distance to the
        previous plus half the distance to the next slice (the first and last slice
        get their one neighbour's full distance). Their sum is the covered length,
        so volumes (``voxels × pixel area × cell``) are neither counted twice where
        slices overlap nor lost where they are far apart.
        """
        t = self.slice_offsets_mm()
        if t.size == 1:
            return np.array([float(self.spacing_mm[0])])
        d = np.abs(np.diff(t))
        return np.concatenate([[d[0]], (d[:-1] + d[1:]) / 2.0, [d[-1]]])

    def slice_voxel_volumes_ml(self) -> np.ndarray:
        """Volume (mL) of one voxel of every slice (see :meth:`slice_cells_mm`)."""
        _, dj, di = self.spacing_mm
        return self.slice_cells_mm() * dj * di / 1000.0

    def with_hu(self, hu: np.ndarray) -> Volume:
        """The same geometry with other voxel values (``hu`` of the same shape)."""
        if np.shape(hu) != self.hu.shape:
            raise ValueError(f"hu of shape {np.shape(hu)} does not fit a volume of {self.hu.shape}")
        return Volume(hu=hu, spacing_mm=self.spacing_mm, origin_lps_mm=self.origin_lps_mm,
                      row_cosine=self.row_cosine, col_cosine=self.col_cosine, normal=self.normal,
                      slice_positions_lps_mm=self.slice_positions_lps_mm)

    def as_uniform(self, spacing_mm: float | None = None) -> Volume:
        """This volume on a regular stack (itself when it is regular already).

        Irregular stacks are resampled along the stack direction to slices
        ``spacing_mm`` apart (default: the smallest step between neighbouring
        slices, at least 0.5 mm) by linear interpolation between the two nearest
        slices; rows and columns are unchanged. Used by code that needs one
        affine grid (surfaces, renders), never for the de-identified output,
        which keeps the input's slices.
        """
        if self.is_regular:
            return self
        t = self.slice_offsets_mm()
        pos = self.positions_lps_mm()
        steps = np.diff(t)
        step = float(spacing_mm) if spacing_mm else max(0.5, float(steps[steps > 1e-6].min()))
        n = int(np.floor((t[-1] - t[0]) / step + 1e-6)) + 1
        new_t = t[0] + step * np.arange(n)
        idx = np.clip(np.searchsorted(t, new_t, side="right") - 1, 0, len(t) - 2)
        w = np.clip((new_t - t[idx]) / np.maximum(t[idx + 1] - t[idx], 1e-9), 0.0, 1.0)
        hu = np.empty((n, *self.hu.shape[1:]), dtype=np.float32)
        for m in range(n):
            a = self.hu[idx[m]].astype(np.float32)
            hu[m] = a + np.float32(w[m]) * (self.hu[idx[m] + 1].astype(np.float32) - a)
        if np.issubdtype(self.hu.dtype, np.integer):
            hu = np.rint(hu).astype(self.hu.dtype)
        # the stack direction (sheared for a gantry tilt) per mm along the plane normal
        stack = (pos[-1] - pos[0]) / (t[-1] - t[0])
        return Volume(hu=hu, spacing_mm=(step, self.spacing_mm[1], self.spacing_mm[2]),
                      origin_lps_mm=pos[0], row_cosine=self.row_cosine,
                      col_cosine=self.col_cosine, normal=stack)

    def affine(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous ``(i, j, k, 1)`` indices to LPS mm.

        Raises ``ValueError`` for an irregular stack (see :meth:`as_uniform`).
        """
        if not self.is_regular:
            raise ValueError("the slice spacing of this volume is not regular; "
                             "use Volume.as_uniform() for a regular grid")
        dk, dj, di = self.spacing_mm
        a = np.eye(4)
        a[:3, 0] = self.row_cosine * di
        a[:3, 1] = self.col_cosine * dj
        a[:3, 2] = self.normal * dk
        a[:3, 3] = self.origin_lps_mm
        return a

    def slice_position_lps_mm(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        if self.slice_positions_lps_mm is not None:
            return np.array(self.slice_positions_lps_mm[k], dtype=float)
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
