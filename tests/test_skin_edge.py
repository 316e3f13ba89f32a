"""The skin's bright edge in a sharp-kernel image is not bone (pipeline.deface._keep_bright).

Bone outside the skeleton hull is kept: in-plane clusters ≥ 150 HU that reach 300 HU. A bone
(sharp) kernel lifts the skin's outermost pixels to 150–450 HU, so the skin's edge made one
long such cluster round the face, and it was kept: a bright line outlining the face the
removal was meant to take (domain head 27012: 2002 of its 14679 face voxels kept, nearly all
of them ≥ 150 HU). A cluster with at least half its pixels next to the air around the patient
is the skin's edge now, unless it reaches 1000 HU (cortical bone); one touching a device
stays kept.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.deface import _keep_bright, deface
from pipeline.synth import LABELS
from tests.deface_checks import check_removal, synth


def _slice() -> tuple[np.ndarray, np.ndarray]:
    """A disc of soft tissue (40 HU) in air whose outermost pixel ring is 250 HU with every
    fifth pixel 320 HU (a sharpened edge), and a 5 × 5 bone fragment of 600 HU 6 px under it."""
    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 <= 30 ** 2
    sl = np.where(disc, 40, -1000).astype(np.int16)
    edge = disc & ~ndi.binary_erosion(disc)
    sl[edge] = 250
    jj, ii = np.nonzero(edge)
    sl[jj[::5], ii[::5]] = 320
    sl[14:19, 38:43] = 600
    return sl, disc


def test_the_skin_edge_is_not_kept_and_bone_under_it_is() -> None:
    sl, disc = _slice()
    air = sl <= -500
    # before: the ring is one bright cluster reaching 300 HU, kept as bone
    old = _keep_bright(sl, disc, 2.0, False)
    assert old[disc & (sl == 250)].all()
    keep = _keep_bright(sl, disc, 2.0, False, exterior=air)
    assert not keep[(sl == 250) | (sl == 320)].any()
    assert keep[14:19, 38:43].all()  # the fragment under the skin


def test_bone_a_pixel_under_the_air_stays() -> None:
    """A nasal bone's apex under a pixel of skin: its cluster touches the air around, but it
    holds cortical bone (1200 HU), which no skin edge reaches."""
    sl, disc = _slice()
    top = disc & (np.arange(80)[:, None] <= 13)
    sl[top & (sl == 250)] = 40  # no sharpened edge over the apex's region
    sl[top & (sl == 320)] = 40
    sl[10, 40] = 1200  # the disc's topmost pixel
    sl[11, 39:42] = 400
    keep = _keep_bright(sl, disc, 2.0, False, exterior=sl <= -500)
    assert keep[10, 40] and keep[11, 39:42].all()
    assert not keep[disc & (sl == 250) & ~top].any()  # the edge elsewhere still goes


def test_air_inside_is_not_the_air_around() -> None:
    """The same ring round an air cavity inside the body (a sinus): bone walls kept."""
    sl, disc = _slice()
    keep = _keep_bright(sl, disc, 2.0, False, exterior=np.zeros_like(disc))
    assert keep[(sl == 250) & disc].all()


def test_an_edge_touching_a_device_stays() -> None:
    sl, disc = _slice()
    devices = np.zeros_like(disc)
    devices[40, 70:72] = True  # a holder against the ring's right side
    keep = _keep_bright(sl, disc, 2.0, False, exterior=sl <= -500, devices=devices)
    assert keep[(sl == 250) & disc].all()


@pytest.mark.slow
def test_head_with_a_sharpened_skin_edge_loses_its_face_and_keeps_its_bone() -> None:
    """A plain head whose skin pixels next to the air are lifted by 150 HU, every fourth by
    280 HU (a bone kernel's overshoot, 190–330 HU): the face goes, bone, the inside, the couch
    and the air stay."""
    head = synth(2)
    hu = head.volume.hu
    air = hu <= -500
    near_air = ndi.binary_dilation(air, structure=np.ones((1, 3, 3), bool))
    edge = near_air & ~air & (head.labels == LABELS["skin"])
    assert edge.sum() > 5000
    sharp = hu.copy()
    lift = np.full(int(edge.sum()), 150, np.int16)
    lift[::4] = 280
    sharp[edge] += lift
    head.volume = head.volume.with_hu(sharp)
    res = deface(head.volume)
    face = head.face_soft_tissue_mask
    changed = res.hu != sharp
    assert changed[face & edge].mean() >= 0.98
    # check_removal's HU-threshold bone Dice counts the lifted skin as "bone": label checks only
    bone = np.isin(head.labels, [LABELS[n] for n in ("cortical_bone", "cancellous_bone", "teeth")])
    assert not (changed & bone).any()
    assert not (changed & head.brain_mask).any() and not (changed & air).any()
    assert not (changed & (head.labels == LABELS["couch"])).any()
    assert sum(int((changed & m).sum()) for m in head.inside_masks().values()) == 0
    assert changed[face].mean() >= 0.99


def test_plain_head_unchanged_by_the_rule() -> None:
    """Without a sharpened edge nothing the old rule kept is taken (the promise holds)."""
    head = synth(1)
    check_removal(head, deface(head.volume))
