"""A dense shell on the face (a mask, splint, cast or dressing) is not facial skeleton
(pipeline.envelope._surface_plastic).

A 350-HU shell pressed onto the skin is as bright as bone on the envelope's 2-mm grid and,
where the skin under it is thin, joined the skull's piece through the skin's partial volume.
The skeleton's hull then spanned the shell: the whole face lay inside it and nothing there
was removed (plain synthetic heads 101-103: nose and lips 0 % removed, face 50-57 %), while
`auto` said the detector's nose boxes were removed. Bone has a cortex (a native pixel of
1000 HU or more) or lies under skin; a shell has neither.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import envelope as E
from pipeline.deface import deface
from pipeline.synth import SubjectParams, face_shell, generate_head
from pipeline.volume import Volume


def _block(shell: bool, bone_hu: int = 1450) -> Volume:
    """40 slices of 2 mm, 1-mm pixels: soft tissue (40 HU) around a bone block of ``bone_hu``
    (5 mm under the skin in front, row 30); in front of it a thin bony ridge (rows 26-29,
    900 HU: no cortex pixel) under 2 mm of skin; with ``shell``, a 3-mm 350-HU shell on the
    skin in front (rows 21-23), touching the skin."""
    hu = np.full((40, 120, 120), -1000, np.int16)
    hu[:, 24:100, 20:100] = 40  # the body; its front skin at rows 24-25
    hu[:, 30:90, 30:90] = bone_hu  # the skeleton's block
    hu[10:30, 26:30, 50:70] = 900  # a ridge of thin bone (a nasal bone on thick slices)
    if shell:
        hu[5:35, 21:24, 25:95] = 350
    return Volume(hu=hu, spacing_mm=(2.0, 1.0, 1.0))


def _plastic(vol: Volume) -> tuple[np.ndarray, np.ndarray, E.CoarseGrid]:
    st = E.EnvelopeSettings()
    grid = E.coarse_grid(vol, st.grid_mm)
    stack = E.SliceStack.of(vol)
    body, _ = E._body_mask(grid, st.body_threshold_hu)
    bone, _ = E._bone_and_rails(grid, body, st, float(np.prod(grid.spacing_mm)) / 1000.0)
    plastic, *_ = E._surface_plastic(vol, grid, stack, bone, E._without_streaks(grid, bone), st)
    return plastic, bone, grid


def test_a_shell_on_the_skin_is_not_bone() -> None:
    plastic, bone, grid = _plastic(_block(shell=True))
    f = grid.f
    assert bone[10, 22 // f, 60 // f]  # the shell joined the bone's piece (the failure) ...
    assert plastic[5:17, 22 // f, 30 // f:90 // f].mean() > 0.9  # ... and is taken out of it
    assert not plastic[:, 30 // f:, :].any()  # the block stays bone
    assert not plastic[:, 26 // f:30 // f, :].any()  # and so does the ridge under the skin


def test_bone_without_a_cortex_pixel_under_skin_stays_bone() -> None:
    """No shell: the ridge of 900 HU protrudes beyond the hull of the cortical block and holds no
    1000-HU pixel, but skin covers it (no dense pixel beside the air around the patient)."""
    plastic, bone, grid = _plastic(_block(shell=False))
    assert bone[15, 27 // grid.f, 60 // grid.f]
    assert not plastic.any()


@pytest.mark.parametrize("seed", [101, 102, 103])
def test_face_under_a_pressed_shell_is_removed(seed: int) -> None:
    head = generate_head(SubjectParams.random(seed), noise_seed=seed)
    hu, _ = face_shell(head, 350.0)
    res = deface(head.volume.with_hu(hu))
    changed = res.hu != hu
    face, fm = head.face_soft_tissue_mask, head.feature_masks
    assert changed[face].mean() >= 0.97  # 0.50-0.57 before
    assert changed[face & fm["nose"]].mean() >= 0.95  # 0 before
    assert changed[face & fm["lips"]].mean() >= 0.95  # 0 before
    assert sum(int((changed & m).sum()) for m in head.inside_masks().values()) == 0
    assert not (changed & head.brain_mask).any()


def test_a_shell_the_skull_did_not_join_protects_nothing() -> None:
    """On 1.7-mm pixels the shell over head 101 stays apart from the skull: a bright piece that
    is not bone, kept as a device with a voxel of skin under it (nose 60 % removed, none of the
    shell). Lying on the face zone, without cortex and beside the air, it is the face's."""
    head = generate_head(SubjectParams.random(101), noise_seed=101, shape=(140, 150, 130),
                         spacing_mm=(2.0, 1.7, 1.7))
    hu, shell = face_shell(head, 350.0)
    res = deface(head.volume.with_hu(hu))
    changed = res.hu != hu
    face, fm = head.face_soft_tissue_mask & ~shell, head.feature_masks
    assert changed[face].mean() >= 0.99  # 0.83 before
    assert changed[face & fm["nose"]].mean() >= 0.97  # 0.60 before
    assert changed[shell].mean() >= 0.4  # its part outside the skeleton's hull; 0 before
    assert sum(int((changed & m).sum()) for m in head.inside_masks().values()) == 0


def test_a_light_shell_was_never_bone() -> None:
    """A 150-HU shell (a soft mask) is below the bone threshold: removed with the face, as
    before."""
    head = generate_head(SubjectParams.random(101), noise_seed=101)
    hu, _ = face_shell(head, 150.0)
    res = deface(head.volume.with_hu(hu))
    assert not res.envelope.plastic.any()
    assert (res.hu != hu)[head.face_soft_tissue_mask].mean() >= 0.99
