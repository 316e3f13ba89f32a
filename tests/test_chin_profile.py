"""The menton is the lowest point of the face's bony front profile, not the spine below it.

``envelope._chin_profile`` walks down the midline bone from below the nose and keeps the
most anterior bone of each step while it does not jump far back; the spine and the hyoid
behind the chin are skipped. Before it, the lowest midline bone within 50 mm behind the
globes was the menton, and on heads tipped back with the neck in the field of view that
was a cervical vertebra 145–151 mm below the globes: the pitch came out +25° (chin down)
for heads tipped −11 to −13° (chin up), and the face zone reached the back of the neck.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.envelope import _chin_profile, find_envelope

# ------------------------------------------------------------------ points (mm, head axes)


def column(post_mm: float, top_mm: float, bottom_mm: float, step_mm: float = 1.0,
           width_mm: float = 8.0) -> np.ndarray:
    """(post, sup) points of a bony column from ``top_mm`` down to ``bottom_mm`` (sup, mm)."""
    s = np.arange(top_mm, bottom_mm - 1e-9, -step_mm)
    p = np.arange(post_mm, post_mm + width_mm + 1e-9, 2.0)
    pp, ss = np.meshgrid(p, s)
    return np.column_stack([pp.ravel(), ss.ravel()])


def lowest(points: np.ndarray) -> tuple[float, float]:
    ok = _chin_profile(points[:, 0], points[:, 1])
    assert ok is not None
    sel = points[ok]
    p, s = sel[int(np.argmin(sel[:, 1]))]
    return float(p), float(s)


def test_spine_reaching_lower_than_the_chin_is_not_the_menton() -> None:
    face = column(-20.0, -35.0, -115.0)  # maxilla, teeth, mandible to the menton at -115
    spine = column(45.0, -20.0, -160.0)  # cervical vertebrae to the field of view's edge
    p, s = lowest(np.concatenate([face, spine]))
    assert s == pytest.approx(-115.0) and p < 0.0


def test_hyoid_behind_and_below_the_chin_is_skipped() -> None:
    face = column(-20.0, -35.0, -110.0)
    hyoid = column(15.0, -125.0, -132.0)  # 35 mm behind the chin's front, below it
    assert lowest(np.concatenate([face, hyoid]))[1] == pytest.approx(-110.0)


def test_jaws_apart_are_bridged() -> None:
    """Edentulous or open mouth: 24 mm without anterior bone, only the spine behind."""
    maxilla = column(-20.0, -35.0, -60.0)
    mandible = column(-15.0, -85.0, -120.0)
    spine = column(45.0, -20.0, -160.0)
    assert lowest(np.concatenate([maxilla, mandible, spine]))[1] == pytest.approx(-120.0)


def test_chin_tucked_back_by_flexion_is_followed() -> None:
    """A profile sloping back 35° (chin down): small steps back, all of them the face."""
    s = np.arange(-35.0, -120.0, -1.0)
    pts = np.column_stack([-30.0 + np.tan(np.radians(35.0)) * (-35.0 - s), s])
    spine = column(80.0, -20.0, -170.0)
    p, low = lowest(np.concatenate([pts, spine]))
    assert low == pytest.approx(-119.0) and p < 30.0


def test_no_bone_below_the_start_is_none() -> None:
    pts = column(-20.0, 10.0, -25.0)  # the field of view ends at the nose
    assert _chin_profile(pts[:, 0], pts[:, 1]) is None


# ------------------------------------------------------------------ a generated head


@pytest.mark.slow
def test_head_tipped_back_with_neck_in_view_gets_its_pitch_sign_right() -> None:
    """Domain head 28010 (tipped −11.5°, 4.6-mm slices to below C3): menton on the chin."""
    from pipeline.detector_data import domain_head

    head = domain_head(28010)
    lm = find_envelope(head.volume).landmarks
    true_pitch = head.pose_deg[1]
    assert true_pitch < -10.0
    assert lm.pitch_deg is not None and abs(lm.pitch_deg - true_pitch) <= 6.0
    assert lm.menton is not None
    below = float(np.linalg.norm(lm.menton - lm.anchor))
    assert 90.0 <= below <= 130.0  # globes → menton of an adult (the spine was 145 mm)
