"""Face removal on real CT (../shared/realct, beside the checkout; CI has it).

``ge-head-ct``: a real head, gantry tilt +18.5°, 14 slices of 4 mm then 14 of
7 mm. ``philips-skull-phantom``: a skull without skin. Figures are measured
independently of the defacer (:mod:`pipeline.evaluate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline import dicom_io
from pipeline.deface import deface
from pipeline.deidentify import DeidOptions, deidentify_folder, make_face_method
from pipeline.evaluate import (
    REALCT_FACE_REGIONS,
    face_region_mask,
    labelled_removal,
    removal_figures,
)
from pipeline.real_labels import load_labels

REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"
LABELS = Path(__file__).resolve().parent / "data" / "realct_labels" / "ge-head-ct.json"
pytestmark = pytest.mark.skipif(not REALCT.is_dir(), reason="../shared/realct not beside the checkout")


def _load(name: str):
    return dicom_io.load_series(dicom_io.scan_folder(REALCT / name).series[0])


@pytest.fixture(scope="module")
def ge():
    loaded = _load("ge-head-ct")
    return loaded, deface(loaded.volume)


def test_ge_face_outside_the_skeleton_removed_inside_kept(ge) -> None:
    loaded, res = ge
    vol = loaded.volume
    assert res.qa.face_found
    fig = removal_figures(vol, res.hu, region=face_region_mask(vol, **REALCT_FACE_REGIONS["ge-head-ct"]))
    assert fig.outside_soft_removed_pct >= 95.0, fig
    assert fig.inside_soft_changed_pct <= 1.0 and fig.inside_soft_changed_pct_worst_slice <= 1.0, fig
    assert fig.outside_body_changed_voxels == 0, fig
    assert fig.bone_dice_300 >= 0.9999 and fig.bone_dice_150 >= 0.999, fig
    assert res.qa.outside_body_changed_ml == 0.0 and res.qa.inside_soft_changed_pct == 0.0
    assert res.qa.removed_ml_by_region["ears"] > 10 and res.qa.removed_ml_by_region["forehead"] > 10
    # the globes are found where they are (measured on the images: x ≈ −54/+20, y ≈ −78)
    r, le = res.qa.landmarks["globe_right_lps_mm"], res.qa.landmarks["globe_left_lps_mm"]
    assert r[0] < -40 and le[0] > 10 and -95 < r[1] < -60 and -95 < le[1] < -60


@pytest.fixture(scope="module")
def ge_auto(ge):
    """``deidentify``'s default method (``auto``: the anatomical zone plus the shipped
    detector's boxes) on ge-head-ct."""
    loaded, _ = ge
    return deface(loaded.volume, make_face_method("auto")[0])


@pytest.fixture(scope="module")
def ge_labelled(ge, ge_auto):
    """What ``auto`` removes in the labelled boxes."""
    loaded, _ = ge
    return labelled_removal(loaded.volume, ge_auto.hu, load_labels(LABELS).slices)


def test_ge_detector_nose_stands_in_for_the_anatomy_and_is_checked(ge_auto) -> None:
    """The anatomy finds no nose ≥ 10 mm proud of the hull here (the bony pyramid under thin
    skin); the detector's nose boxes are used, and the nose check finds the soft tissue outside
    the skeleton in them (≈ 1 mL: slice 0's tip) removed."""
    qa = ge_auto.qa
    assert qa.details["source"] == "anatomical+model"
    assert any(w.endswith("the detector's nose boxes are removed") for w in qa.warnings)
    assert qa.nose_check["outside_ml"] >= 0.5 and qa.nose_check["removed_pct"] >= 90.0
    assert not [w for w in qa.warnings if "the nose may be left" in w]


def test_ge_labelled_eyelids_face_and_auricles_removed(ge_labelled) -> None:
    """The hand-labelled boxes (tests/data/realct_labels): the soft tissue in them more than
    3 mm outside the skeleton is what the default method has to take."""
    face, eyes, ears = ge_labelled["face"], ge_labelled["eyes"], ge_labelled["ears"]
    assert face.boxes == 16 and face.removed_pct >= 99.5 and face.worst_box_removed_pct >= 99.0
    assert eyes.boxes_counted == 13 and eyes.worst_box_removed_pct >= 99.0  # the lids, all of them
    assert ears.boxes == 32 and ears.removed_pct >= 84.0
    left = [b for b in ears.per_box if b["box"][0] > 256]  # image right = patient left
    right = [b for b in ears.per_box if b["box"][0] < 256]
    assert len(left) == 15 and min(b["removed_pct"] for b in left) >= 85.0, left
    assert min(b["removed_pct"] for b in right if b["slice"] >= 3) >= 78.0, right
    # the external nose on these slices (mid-nose up) is the bony pyramid under 1-3 mm of
    # skin: inside the skeleton's hull, kept by design; only slice 0 has tissue to count
    assert [b["slice"] for b in ge_labelled["nose"].per_box if b["soft_voxels"] >= 50] == [0]


@pytest.mark.xfail(strict=True, reason="known gap (README): on slices 0-2 the right auricle's lower "
                   "part lies behind the face zone, is too thick for the ear zone's flap rule, and no "
                   "detector box there reaches the threshold; auto removes 23-52 % of it")
def test_ge_right_auricle_lowest_slices_removed(ge_labelled) -> None:
    low = [b for b in ge_labelled["ears"].per_box if b["box"][0] < 256 and b["slice"] <= 2]
    assert len(low) == 3 and min(b["removed_pct"] for b in low) >= 80.0, low


def test_ge_thin_facial_bones_are_not_taken_for_a_shell_on_the_face(ge) -> None:
    """On 4-mm slices the nasal bones and the maxilla's front wall peak at 700-1000 HU: no
    cortex pixel, outside the hull of the bone that has one, like a shell pressed on the face
    (pipeline.envelope._surface_plastic). Skin covers them, so they stay bone."""
    from pipeline import envelope as E

    loaded, res = ge
    env = res.envelope
    assert env.plastic is not None and not env.plastic.any()
    # the cortex-and-hull test alone would have taken them (the exposure test keeps them)
    vol, g, st = loaded.volume, env.grid, env.settings
    body, _ = E._body_mask(g, st.body_threshold_hu)
    bone, _ = E._bone_and_rails(g, body, st, float(np.prod(g.spacing_mm)) / 1000.0)
    cortex = E.coarse_grid(vol.with_hu((vol.hu >= E.CORTEX_HU).astype(np.int16))).hu > 0
    no_cortex = bone & ~cortex
    hull = E.SkeletonHull.of_points(E._hull_points(g, bone & ~no_cortex), st.hull_margin_mm)
    beyond = no_cortex & ~E._inside_coarse(g, env.stack, hull)
    assert float(beyond.sum() * np.prod(g.spacing_mm)) / 1000.0 >= 1.0
    exterior = E._exterior_coarse(g, st.body_threshold_hu)
    assert not E._exposed_dense(vol, g, beyond, exterior, st).any()


def test_ge_orbits_sinuses_nasal_cavity_untouched(ge) -> None:
    """The slices through the orbits: nothing behind the orbital rims changes."""
    loaded, res = ge
    hu, out = loaded.volume.hu, res.hu
    vol = loaded.volume
    for k in range(2, 9):
        changed = out[k] != hu[k]
        # the nasal cavity, sinuses and orbits behind the rims: x −60…+25 mm, y −65…0 mm
        pos = vol.slice_position_lps_mm(k)
        x = pos[0] + np.arange(512) * vol.spacing_mm[2]
        y = pos[1] + np.arange(512) * vol.spacing_mm[1] * vol.col_cosine[1]
        deep = (x[None, :] > -60) & (x[None, :] < 25) & (y[:, None] > -65) & (y[:, None] < 0)
        assert not (changed & deep).any(), k


def test_ge_whole_series_written_slice_for_slice(tmp_path: Path) -> None:
    src = REALCT / "ge-head-ct"
    out = tmp_path / "out"
    summary = deidentify_folder(src, out, DeidOptions(project_secret="test-secret-realct"),
                                registry_path=tmp_path / "reg.json")
    assert summary.ok, [s.error for s in summary.series]
    (s,) = summary.series
    assert s.status == "written" and s.slices == 28 and s.face_found
    files = sorted((out / s.output).glob("*.dcm"))
    assert len(files) == 28
    before = _load("ge-head-ct").volume
    after = dicom_io.load_series(dicom_io.scan_folder(out).series[0]).volume
    np.testing.assert_allclose(after.positions_lps_mm(), before.positions_lps_mm(), atol=1e-3)
    np.testing.assert_allclose(after.col_cosine, before.col_cosine, atol=1e-6)
    # source identifiers and UIDs absent from every output file
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(src.glob("*.dcm"))]
    needles = {str(d.get(k, "")) for d in srcs for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                          "SOPInstanceUID", "PatientID", "StudyDate")}
    needles = {n.encode() for n in needles if len(n) >= 6}
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(n in data for n in needles), p.name
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert "113102" in codes  # the face was removed


def test_skull_phantom_no_face_no_change(tmp_path: Path) -> None:
    src = REALCT / "philips-skull-phantom"
    loaded = _load("philips-skull-phantom")
    res = deface(loaded.volume)
    assert res.qa.face_found is False and "no face" in res.qa.no_face_reason
    assert np.array_equal(res.hu, loaded.volume.hu)
    out = tmp_path / "out"
    summary = deidentify_folder(src, out, DeidOptions(project_secret="test-secret-realct"),
                                registry_path=tmp_path / "reg.json")
    (s,) = summary.series
    assert s.status == "written" and s.face_found is False
    doc = json.loads((out / "deid-summary.json").read_text())
    assert doc["n_no_face"] == 1 and "no face" in doc["series"][0]["qa"]["no_face_reason"]
    after = dicom_io.load_series(dicom_io.scan_folder(out).series[0]).volume
    assert np.array_equal(after.hu, loaded.volume.hu)  # 0 voxels changed
    ds = pydicom.dcmread(next((out / s.output).glob("*.dcm")), stop_before_pixels=True)
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert "113102" not in codes and "113100" in codes
