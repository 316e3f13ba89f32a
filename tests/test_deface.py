"""Face removal (pipeline.deface): the face outside the skeleton goes, everything inside stays.

Synthetic heads carry the ground truth (pipeline.synth): the facial soft tissue
outside the skeleton's hull, and the inner structures (globes, orbital fat and
muscles, nasal cavity, sinuses with mucosa and fluid, oral cavity and tongue,
pharynx, masticator muscles, brain) inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from pipeline.deface import (
    AirFill,
    AnatomicalFaceRegion,
    DefaceError,
    FaceRegionMethod,
    RegionResult,
    deface,
    qa_picture,
)
from pipeline.evaluate import removal_figures
from pipeline.synth import LABELS
from pipeline.volume import Volume
from tests.deface_checks import check_removal, synth
from tests.dicom_factory import reorient_volume as _reorient


@pytest.fixture(scope="module")
def head0():
    return synth(0)


@pytest.fixture(scope="module")
def res0(head0):
    return deface(head0.volume)


# --------------------------------------------------------------------------- the promise


def test_face_removed_inside_kept(head0, res0) -> None:
    check_removal(head0, res0)
    qa = res0.qa
    assert qa.face_found and qa.no_face_reason == ""
    assert qa.method == "anatomical"
    assert qa.bone_dice == 1.0 and qa.bone_dice_150 == 1.0
    for region in ("nose", "lips", "chin", "cheeks", "forehead", "ears"):
        assert qa.removed_ml_by_region[region] > 0.5, (region, qa.removed_ml_by_region)
    assert sum(qa.removed_ml_by_region.values()) == pytest.approx(qa.removed_ml, abs=0.01)
    lm = qa.landmarks
    assert lm["globe_right_lps_mm"] is not None and lm["globe_left_lps_mm"] is not None
    assert lm["nose_tip_lps_mm"] is not None


@pytest.mark.parametrize("seed", [1, 2])
def test_more_heads(seed: int) -> None:
    head = synth(seed)
    check_removal(head, deface(head.volume))


def test_ears_go_with_the_face(head0, res0) -> None:
    ears = head0.ear_soft_tissue_mask
    assert ears.sum() > 100
    assert (res0.hu[ears] != head0.volume.hu[ears]).mean() >= 0.9


@pytest.mark.parametrize(
    "kw",
    [
        dict(shape=(40, 112, 100), spacing_mm=(5.0, 2.2, 2.2), thickness_mm=5.0, tilt_deg=18.5),
        dict(shape=(45, 112, 100), spacing_mm=(4.0, 2.2, 2.2), tilt_deg=15.0,
             positions_mm=[*range(0, 100, 4), *range(101, 240, 7)], thickness_mm=[4.0] * 25 + [7.0] * 20),
        dict(shape=(36, 112, 100), spacing_mm=(7.0, 2.2, 2.2), thickness_mm=7.0),
        dict(shape=(100, 84, 75), spacing_mm=(2.6, 2.95, 2.95)),
    ],
    ids=["tilt18-5mm", "4-then-7mm-tilt15", "7mm", "coarse-pixels"],
)
def test_routine_acquisitions(kw) -> None:
    """Thick, tilted (sheared), variable-spacing and coarse-pixel series: same promise."""
    head = synth(3, **kw)
    res = deface(head.volume)
    check_removal(head, res)
    geo = res.qa.geometry
    assert geo["slices"] == head.volume.hu.shape[0]
    if "tilt_deg" in kw:
        assert geo["gantry_tilt_deg"] == pytest.approx(kw["tilt_deg"], abs=0.1)
    if "positions_mm" in kw:
        assert geo["regular_spacing"] is False


@pytest.mark.parametrize("pose", [(30.0, 0.0, 0.0), (0.0, 25.0, 0.0), (0.0, -25.0, 0.0),
                                  (0.0, 0.0, 25.0), (-20.0, 15.0, -15.0)])
def test_rotated_heads(pose) -> None:
    """Yaw, pitch and roll up to 30°: the axes come from the globes, the pitch from the
    globes → menton line (a field of view of 300 mm keeps chin and vertex in it)."""
    head = synth(4, pose_deg=pose, shape=(116, 112, 100))
    check_removal(head, deface(head.volume))


def test_dental_metal_and_streaks() -> None:
    head = synth(5, metal=True)
    assert (head.labels == LABELS["metal"]).any()
    check_removal(head, deface(head.volume))


# --------------------------------------------------------------------------- no face, no change


def test_bare_skull_is_no_face(head0) -> None:
    """A skull without skin (a phantom): nothing is removed and the reason is given."""
    hu = head0.volume.hu.copy()
    keep = np.isin(head0.labels, (LABELS["cortical_bone"], LABELS["cancellous_bone"],
                                  LABELS["teeth"], LABELS["couch"]))
    rng = np.random.default_rng(0)
    hu[~keep] = np.clip(-1000 + rng.normal(0, 10, int((~keep).sum())), -1024, None).astype(np.int16)
    vol = head0.volume.with_hu(hu)
    res = deface(vol)
    assert np.array_equal(res.hu, hu)
    assert res.qa.face_found is False and res.qa.removed_voxels == 0
    assert res.qa.no_face_reason
    assert any(w.startswith("no face found") for w in res.qa.warnings)


def test_brain_only_field_of_view_is_no_face(head0) -> None:
    lm = deface(head0.volume).qa.landmarks
    z_globes = (lm["globe_right_lps_mm"][2] + lm["globe_left_lps_mm"][2]) / 2.0
    pos = head0.volume.positions_lps_mm()
    top = pos[:, 2] > z_globes + 75.0  # well above the brows
    sub = Volume(hu=np.ascontiguousarray(head0.volume.hu[top]), spacing_mm=head0.volume.spacing_mm,
                 origin_lps_mm=pos[top][0])
    res = deface(sub)
    assert np.array_equal(res.hu, sub.hu)
    assert res.qa.face_found is False


def test_empty_volume_is_no_face() -> None:
    vol = Volume(hu=np.full((10, 12, 14), -1000, np.int16), spacing_mm=(2.0, 2.0, 2.0))
    res = deface(vol)
    assert np.array_equal(res.hu, vol.hu)
    assert "no body" in res.qa.no_face_reason


# --------------------------------------------------------------------------- geometry


def _back(arr: np.ndarray, perm, flips) -> np.ndarray:
    for ax, f in enumerate(flips):
        if f:
            arr = np.flip(arr, axis=ax)
    return np.transpose(arr, np.argsort(perm))


@pytest.mark.parametrize(("perm", "flips"), [
    ((0, 1, 2), (False, True, False)),  # rows flipped: the face at the bottom of the image
    ((0, 1, 2), (True, False, True)),  # reversed slices, columns flipped
    ((2, 0, 1), (False, True, False)),  # sagittal acquisition
])
def test_storage_order_does_not_matter(head0, res0, perm, flips) -> None:
    vol = _reorient(head0.volume, perm, flips)
    res = deface(vol)
    changed = _back(res.hu != vol.hu, perm, flips)
    ref = res0.hu != head0.volume.hu
    # the same patient points change, up to the coarse grid (which follows the storage)
    assert (changed & ref).sum() / ref.sum() >= 0.93
    assert (changed & ~ref).sum() / ref.sum() <= 0.05
    back = res0.__class__(_back(res.hu, perm, flips), res.qa, res.region)
    check_removal(head0, back)


# --------------------------------------------------------------------------- the fill


def test_fill_is_the_scans_own_air(head0, res0) -> None:
    """Removed voxels look like the air around the head at every window: same histogram,
    same pixel correlation; no face-shaped patch of flat −1000 HU."""
    before, after = head0.volume.hu, res0.hu
    filled = after[after != before].astype(float)
    env = res0.region.envelope
    g = env.grid
    far = np.zeros(before.shape, bool)
    from scipy import ndimage as ndi

    far_c = ~ndi.binary_dilation(env.body, iterations=3) & ~env.devices
    ks = np.arange(before.shape[0])
    far[:] = far_c[g.native_k[ks]][:, (np.arange(before.shape[1]) // g.f)[:, None],
                                   (np.arange(before.shape[2]) // g.f)[None, :]]
    air = before[far & (before < -850)].astype(float)
    assert abs(filled.mean() - air.mean()) < 2.0
    assert filled.std() == pytest.approx(air.std(), rel=0.2)
    assert stats.ks_2samp(filled, air).statistic < 0.05
    for t in (-1010.0, -1000.0, -990.0, -980.0):  # no threshold separates them
        assert abs((filled > t).mean() - (air > t).mean()) < 0.05
    assert len(np.unique(filled)) > 20


def test_air_fill_tile_reproduces_correlation() -> None:
    rng = np.random.default_rng(1)
    from scipy import ndimage as ndi

    noise = ndi.gaussian_filter(rng.standard_normal((400, 400)), 1.5)
    air = -1000 + 20 * noise / noise.std()
    a, b = air[:, :-1].ravel(), air[:, 1:].ravel()
    corr = float(np.corrcoef(a, b)[0, 1])
    fill = AirFill(np.sort(air.ravel()).astype(np.float32), corr,
                   float(np.sqrt(-1 / (4 * np.log(corr)))))
    tile = fill.tile()
    t_corr = float(np.corrcoef(tile[:, :-1].ravel(), tile[:, 1:].ravel())[0, 1])
    assert t_corr == pytest.approx(corr, abs=0.05)
    assert stats.ks_2samp(tile.ravel(), air.ravel()).statistic < 0.02


# --------------------------------------------------------------------------- methods and QA


@dataclass
class BoxMethod:
    """A trivial region method: a fixed box (stands in for a detector-based method)."""

    box: tuple[slice, slice, slice]
    name: str = "box"

    def face_region(self, volume: Volume) -> RegionResult:
        mask = np.zeros(volume.shape, bool)
        mask[self.box] = True
        return RegionResult(mask, ["test warning"], {"n": 1})


def test_custom_method_removes_only_outside_the_skeleton_in_the_body(head0, res0) -> None:
    """A box over the whole head: only the patient's tissue outside the hull goes."""
    method = BoxMethod((slice(None), slice(None), slice(None)))
    assert isinstance(method, FaceRegionMethod)
    res = deface(head0.volume, method)
    assert res.qa.method == "box" and "test warning" in res.qa.warnings
    check_removal(head0, res)
    # the box reaches beyond the face (scalp, neck): more goes than with the face zone
    assert res.qa.removed_voxels > res0.qa.removed_voxels


def test_method_returning_wrong_shape_is_rejected(head0) -> None:
    class Bad:
        name = "bad"

        def face_region(self, volume: Volume) -> RegionResult:
            return RegionResult(np.zeros((2, 2, 2), bool))

    with pytest.raises(DefaceError, match="expected bool"):
        deface(head0.volume, Bad())


def test_qa_agrees_with_independent_figures(head0, res0) -> None:
    fig = removal_figures(head0.volume, res0.hu)
    assert fig.outside_body_changed_voxels == 0
    assert fig.inside_soft_changed_pct == 0.0
    assert fig.changed_voxels == res0.qa.removed_voxels
    assert fig.bone_dice_150 == res0.qa.bone_dice_150 == 1.0


def test_qa_picture(head0, res0) -> None:
    img = qa_picture(head0.volume, res0)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    red = (img[..., 0] > 120) & (img[..., 1] < img[..., 0] * 0.6)
    yellow = (img[..., 0] == 230) & (img[..., 1] == 200) & (img[..., 2] == 0)
    assert red.sum() > 200 and yellow.sum() > 100
    assert img.shape[0] > 4 * 100  # four axial rows and a sagittal reformat


def test_anatomical_settings_are_used(head0) -> None:
    from pipeline.envelope import EnvelopeSettings

    narrow = AnatomicalFaceRegion(EnvelopeSettings(zone_superior_mm=20.0))
    res = deface(head0.volume, narrow)
    assert res.qa.removed_ml_by_region["forehead"] < 0.5 * deface(
        head0.volume).qa.removed_ml_by_region["forehead"]
