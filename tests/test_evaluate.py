"""Independent figures of a face removal (pipeline.evaluate) on hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import labelled_removal, native_skeleton_hull, removal_figures
from pipeline.volume import Volume


def _head() -> Volume:
    """10 slices of 2 mm, 1-mm pixels: a block of soft tissue (40 HU; rows 10–49, columns
    10–49) around a bone cube (600 HU; rows and columns 20–39), and a flap of soft tissue
    standing 7 mm off its side (rows 25–34, columns 50–56): an auricle's stand-in."""
    hu = np.full((10, 60, 60), -1000, np.int16)
    hu[:, 10:50, 10:50] = 40
    hu[:, 20:40, 20:40] = 600
    hu[:, 25:35, 50:57] = 30
    return Volume(hu=hu, spacing_mm=(2.0, 1.0, 1.0))


def test_labelled_removal_counts_the_tissue_outside_the_skeleton_in_each_box() -> None:
    vol = _head()
    out = vol.hu.copy()
    out[2, 25:35, 50:57] = -1000  # the flap's whole cross-section on slice 2
    out[3, 25:30, 50:57] = -1000  # half of it on slice 3
    out[3, 0:5, 0:5] = -900  # air outside every box changes nothing counted here
    boxes = {2: [("ears", 50, 25, 57, 35)], 3: [("ears", 50, 25, 57, 35), ("eyes", 22, 22, 38, 38)],
             4: [("ears", 50, 25, 57, 35)]}
    got = labelled_removal(vol, out, boxes)
    ears = got["ears"]
    assert ears.boxes == 3 and ears.soft_voxels == 3 * 70
    assert [b["removed_pct"] for b in ears.per_box] == [100.0, 50.0, 0.0]
    assert ears.removed_pct == pytest.approx(100.0 * 105 / 210, abs=0.01)
    assert ears.boxes_removed_90 == 1 and ears.worst_box_removed_pct == 0.0
    # a box inside the skeleton holds no soft tissue outside it: nothing to count
    eyes = got["eyes"]
    assert eyes.soft_voxels == 0 and eyes.removed_pct is None and eyes.boxes_counted == 0
    assert eyes.worst_box_removed_pct is None


def test_labelled_removal_measures_only_beyond_3_mm_of_the_skeleton() -> None:
    vol = _head()
    out = vol.hu.copy()
    out[:, 25:35, 40:43] = -1000  # soft tissue within 3 mm of the bone cube (columns 40–42)
    box = {5: [("ears", 40, 25, 57, 35)]}
    got = labelled_removal(vol, out, box, hull=native_skeleton_hull(vol))["ears"]
    assert got.soft_voxels == 10 * (57 - 43) and got.removed_pct == 0.0
    out[5, 25:35, 43:57] = -1000
    got = labelled_removal(vol, out, box)["ears"]
    assert got.removed_pct == 100.0 and got.boxes_removed_90 == 1
    # the same figure as removal_figures' "outside removed" in the box's region
    region = np.zeros(vol.hu.shape, bool)
    region[5, 25:35, 40:57] = True
    assert removal_figures(vol, out, region=region).outside_soft_removed_pct == 100.0


def test_labelled_removal_min_voxels_and_bad_boxes() -> None:
    vol = _head()
    out = vol.hu.copy()
    small = {1: [("ears", 50, 25, 52, 27)]}  # 4 soft voxels, none removed
    assert labelled_removal(vol, out, small, min_voxels=5)["ears"].boxes_counted == 0
    assert labelled_removal(vol, out, small, min_voxels=4)["ears"].worst_box_removed_pct == 0.0
    with pytest.raises(ValueError, match="outside the volume"):
        labelled_removal(vol, out, {10: [("ears", 50, 25, 57, 35)]})
    with pytest.raises(ValueError, match="outside the volume"):
        labelled_removal(vol, out, {0: [("ears", 50, 25, 61, 35)]})
    with pytest.raises(ValueError, match="shape"):
        labelled_removal(vol, out[:5], {0: [("ears", 50, 25, 57, 35)]})
