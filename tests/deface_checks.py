"""Shared checks of a face removal against a synthetic head's ground truth (used by tests)."""

from __future__ import annotations

import numpy as np

from pipeline.synth import LABELS, SubjectParams, generate_head

#: 260 × 246 × 220 mm at 2.6 × 2.2 × 2.2 mm: vertex to below the chin, fast enough for tests.
SHAPE = (100, 112, 100)
SPACING = (2.6, 2.2, 2.2)


def synth(seed: int, **kw):
    """A synthetic head for the tests (keyword arguments go to :func:`generate_head`)."""
    kw.setdefault("shape", SHAPE)
    kw.setdefault("spacing_mm", SPACING)
    return generate_head(SubjectParams.random(seed), noise_seed=seed, **kw)


def check_removal(head, res, *, min_face: float = 0.99) -> dict[str, float]:
    """Assert what face removal promises on a synthetic head; return the measured figures.

    * ≥ ``min_face`` of the facial soft tissue outside the skeleton is changed;
    * every inner structure (globe, orbital fat, eye muscles, nasal cavity,
      sinuses, oral cavity, pharynx, masticator muscles, brain) inside the
      skeleton hull shrunk by 3 mm is bit-identical; the brain everywhere;
    * no voxel outside the body changes: air and partial-volume air (≤ −500 HU)
      and the couch;
    * bone, teeth and metal unchanged; without metal, every voxel ≥ 150 HU and
      ≥ 300 HU too (Dice 1.0; metal streaks in soft tissue are not bone);
    * the QA counts what changed.
    """
    before, after = head.volume.hu, res.hu
    changed = after != before
    gt = head.face_soft_tissue_mask
    assert gt.sum() > 200, "ground truth too small to measure"
    figures = {"face": float(changed[gt].mean())}
    for name, mask in head.inside_masks().items():
        assert not (changed & mask).any(), f"{name}: {int((changed & mask).sum())} voxels changed"
    assert not (changed & head.brain_mask).any(), "brain changed"
    assert not (changed & (before <= -500)).any(), "air changed"
    assert not (changed & (head.labels == LABELS["couch"])).any(), "couch changed"
    bone = np.isin(head.labels, [LABELS[n] for n in ("cortical_bone", "cancellous_bone", "teeth",
                                                      "metal")])
    assert not (changed & bone).any(), "bone changed"
    if not (head.labels == LABELS["metal"]).any():  # metal streaks ≥ 150 HU are not bone
        for thr in (150, 300):
            assert np.array_equal(before >= thr, after >= thr), f"bone at {thr} HU changed"
    assert res.qa.removed_voxels == int(changed.sum())
    vox = head.volume.slice_voxel_volumes_ml()
    assert res.qa.removed_ml == round(float((changed.sum(axis=(1, 2)) * vox).sum()), 3) or \
        abs(res.qa.removed_ml - float((changed.sum(axis=(1, 2)) * vox).sum())) < 1e-2
    assert res.qa.inside_soft_changed_pct == 0.0
    assert res.qa.outside_body_changed_ml == 0.0
    assert figures["face"] >= min_face, figures
    return figures
