"""Model / auto face-region methods: region logic with an oracle detector, real model, wiring."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import deface
from pipeline.detector import DEFAULT_WEIGHTS, Detection, DetectorError, ModelMeta
from pipeline.detector_data import CLASSES
from pipeline.face_model import AutoFaceRegion, ModelFaceRegion, make_model_method
from pipeline.synth import SubjectParams, generate_head

needs_model = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped model not committed yet")


@pytest.fixture(scope="module")
def head():
    """Held-out synthetic subject, standard axial orientation (canonical view = array)."""
    return generate_head(SubjectParams.random(515151), shape=(60, 112, 112),
                         spacing_mm=(4.0, 2.2, 2.2), noise_seed=9)


class OracleDetector:
    """Returns boxes from a per-slice table; finds the slice by content (canonical == array)."""

    backend = "oracle"

    def __init__(self, hu: np.ndarray, boxes: dict[int, list[tuple[str, float, float, float, float]]]):
        self.meta = ModelMeta(list(CLASSES), imgsz=256)
        self.hu = hu
        self.boxes = boxes
        self.calls = 0

    def detect(self, slices: np.ndarray, *, conf: float = 0.25, **_: object) -> list[Detection]:
        out = []
        for s in slices:
            self.calls += 1
            ks = [k for k in range(self.hu.shape[0]) if np.array_equal(self.hu[k], s)]
            rows = self.boxes.get(ks[0], []) if ks else []
            b = np.array([r[1:] for r in rows], np.float32).reshape(-1, 4)
            c = np.array([CLASSES.index(r[0]) for r in rows], np.int64)
            out.append(Detection(b, np.full(len(rows), 0.9, np.float32), c))
        return out


def gt_boxes(head) -> dict[int, list]:
    table = {}
    for k, rows in enumerate(head.feature_boxes):
        rows = [r for r in rows if r[0] in CLASSES]  # the generator's brow and chin are not classes
        face = head.face_label_mask[k]
        if face.any():
            jj, ii = np.nonzero(face)
            rows.append(("face", ii.min(), jj.min(), ii.max() + 1, jj.max() + 1))
        if rows:
            table[k] = rows
    return table


def removed_fraction(before, after, mask) -> float:
    """Of the voxels of ``mask`` that are facial soft tissue outside the skeleton, the share
    changed (the ground truth of what removal must take)."""
    return float(np.count_nonzero(mask & (after != before)) / max(1, np.count_nonzero(mask)))


def check_invariants(head, result, *, zone: bool = False):
    """Bone, brain and everything inside the skeleton unchanged; a model-only region
    changes nothing outside its boxes."""
    hu, out = head.volume.hu, result.hu
    changed = out != hu
    assert not (changed & np.isin(head.labels, (5, 6, 7))).any(), "bone was modified"
    assert not (changed & head.brain_mask).any(), "brain was modified"
    for name, m in head.inside_masks().items():
        assert not (changed & m).any(), f"{name} was modified"
    assert not (changed & (hu <= -500)).any(), "air was modified"
    if not zone and result.region.mask is not None:
        assert not (changed & ~result.region.mask).any()


def test_model_region_with_oracle_boxes(head):
    oracle = OracleDetector(head.volume.hu, gt_boxes(head))
    method = ModelFaceRegion(loaded_detector=oracle, detect_every_mm=1.0)
    res = deface.deface(head.volume, method)
    check_invariants(head, res)
    hu, face = head.volume.hu, head.face_soft_tissue_mask
    assert removed_fraction(hu, res.hu, head.feature_masks["nose"] & face) > 0.95
    assert removed_fraction(hu, res.hu, head.feature_masks["lips"] & face) > 0.9
    assert removed_fraction(hu, res.hu, face) > 0.85
    # the auricles are removed too, and the cheeks between the face and the ears
    assert removed_fraction(hu, res.hu, head.ear_soft_tissue_mask) > 0.8
    assert res.qa.bone_dice == 1.0 and not res.qa.warnings


def test_ear_boxes_bridge_to_the_face(head):
    """On a slice with ear boxes the region spans them and the face's boxes; without the
    bridge only the boxes themselves."""
    table = gt_boxes(head)
    ks = [k for k, rows in table.items() if {r[0] for r in rows} >= {"ears", "face"}]
    assert ks
    k = ks[len(ks) // 2]
    one = {k - 1: table[k - 1], k: table[k], k + 1: table[k + 1]}
    with_bridge = ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, one),
                                  detect_every_mm=1.0).face_region(head.volume).mask[k]
    without = ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, one), detect_every_mm=1.0,
                              bridge_ears=False).face_region(head.volume).mask[k]
    assert without.sum() < with_bridge.sum()
    # the auricles are a removal class: the ear boxes' soft tissue is in the region even without
    # the bridge (an oracle with only the ear boxes)
    ears_only = {q: [r for r in rows if r[0] == "ears"] for q, rows in one.items()}
    only = ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, ears_only), detect_every_mm=1.0,
                           bridge_ears=False).face_region(head.volume).mask[k]
    ear_soft = head.ear_soft_tissue_mask[k]
    assert ear_soft.any() and only[ear_soft].mean() > 0.9
    rows = np.array([r[1:] for r in table[k]], float)
    i0, j0, i1, j1 = rows[:, 0].min(), rows[:, 1].min(), rows[:, 2].max(), rows[:, 3].max()
    jj, ii = np.nonzero(with_bridge)
    assert ii.min() <= i0 and ii.max() >= i1 - 1 and jj.min() <= j0 and jj.max() >= j1 - 1


def test_slice_stride_carries_boxes(head):
    """Running every ~3rd slice gives almost the same region as running every slice."""
    table = gt_boxes(head)
    full = ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, table), detect_every_mm=1.0)
    strided_det = OracleDetector(head.volume.hu, table)
    strided = ModelFaceRegion(loaded_detector=strided_det, detect_every_mm=8.0)
    a = full.face_region(head.volume).mask
    b = strided.face_region(head.volume).mask
    n_body = int((head.volume.hu > -500).reshape(60, -1).sum(1).astype(bool).sum())
    assert strided_det.calls <= n_body // 2 + 2
    inter = np.count_nonzero(a & b)
    assert inter / np.count_nonzero(a) > 0.9


def test_isolated_false_box_is_dropped(head):
    k = 50  # a brain-level slice
    oracle = OracleDetector(head.volume.hu, {k: [("nose", 10, 5, 100, 100)]})
    res = ModelFaceRegion(loaded_detector=oracle, detect_every_mm=1.0).face_region(head.volume)
    assert not res.mask.any()
    assert res.details["isolated_dropped"] == 1
    assert any("no facial feature" in w for w in res.warnings)


def test_false_boxes_on_brain_slices_never_reach_brain(head):
    table = {k: [("face", 0, 0, 112, 112)] for k in range(40, 56)}
    res = deface.deface(head.volume, ModelFaceRegion(
        loaded_detector=OracleDetector(head.volume.hu, table), detect_every_mm=1.0))
    check_invariants(head, res)
    assert res.qa.removed_voxels > 0  # scalp outside the skull may go, brain never


def test_one_slice_gap_is_filled(head):
    table = gt_boxes(head)
    nose_ks = sorted(k for k, rows in table.items() if any(r[0] == "nose" for r in rows))
    gap = nose_ks[len(nose_ks) // 2]
    holed = {k: v for k, v in table.items() if k != gap}
    res = ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, holed),
                          detect_every_mm=1.0).face_region(head.volume)
    nose_gap = head.feature_masks["nose"][gap]
    assert res.mask[gap][nose_gap].mean() > 0.9


def test_auto_falls_back_to_anatomical_when_model_finds_nothing(head):
    auto = AutoFaceRegion(model=ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, {})))
    res = auto.face_region(head.volume)
    assert res.mask is None and res.use_zone and res.envelope is not None
    assert any("used the anatomical zone" in w for w in res.warnings)
    assert res.details["source"] == "anatomical"
    a = deface.deface(head.volume, auto)
    b = deface.deface(head.volume)
    assert np.array_equal(a.hu, b.hu)


def test_auto_uses_model_and_fills_missed_slices(head):
    table = gt_boxes(head)
    nose_ks = sorted(k for k, rows in table.items() if any(r[0] == "nose" for r in rows))
    # the model misses three consecutive nose slices (more than smoothing can fill)
    missed = set(nose_ks[1:4])
    holed = {k: v for k, v in table.items() if k not in missed}
    # plus a false box far above the face on consecutive slices
    for k in range(52, 58):
        holed[k] = [("nose", 20, 20, 60, 60)]
    auto = AutoFaceRegion(model=ModelFaceRegion(loaded_detector=OracleDetector(head.volume.hu, holed),
                                                detect_every_mm=1.0))
    res = deface.deface(head.volume, auto)
    check_invariants(head, res, zone=True)
    assert res.region.details["source"] == "anatomical+model"
    zone_ks = sorted(res.envelope.native_boxes_of_zone())
    assert not res.region.mask[zone_ks[-1] + 5:].any(), "false boxes above the face were kept"
    face = head.face_soft_tissue_mask
    assert removed_fraction(head.volume.hu, res.hu, head.feature_masks["nose"] & face) > 0.95
    # never less than the anatomical zone alone
    anat = deface.deface(head.volume)
    assert not ((anat.hu != head.volume.hu) & (res.hu == head.volume.hu)).any()


def test_bad_weights_clear_errors(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        make_model_method(tmp_path / "missing.onnx")
    from pipeline.deidentify import make_face_method

    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ValueError):
        make_face_method("model", bad)
    method, warnings = make_face_method("auto", bad)
    assert isinstance(method, deface.AnatomicalFaceRegion)
    assert warnings and "anatomical" in warnings[0]


@needs_model
def test_deidentify_factory_uses_detector():
    from pipeline.deidentify import make_face_method

    m, w = make_face_method("model", None)
    assert isinstance(m, ModelFaceRegion) and not w
    a, w = make_face_method("auto", None)
    assert isinstance(a, AutoFaceRegion) and not w


@needs_model
@pytest.mark.parametrize("kind", ["model", "auto"])
def test_shipped_model_defaces_held_out_subject(kind):
    head = generate_head(SubjectParams.random(626262), shape=(64, 160, 160),
                         spacing_mm=(4.0, 1.6, 1.6), noise_seed=4)
    method = make_model_method(auto=kind == "auto")
    res = deface.deface(head.volume, method)
    check_invariants(head, res, zone=kind == "auto")
    hu, face = head.volume.hu, head.face_soft_tissue_mask
    assert removed_fraction(hu, res.hu, head.feature_masks["nose"] & face) > 0.9
    assert removed_fraction(hu, res.hu, head.feature_masks["lips"] & face) > 0.8
    assert removed_fraction(hu, res.hu, face) > (0.99 if kind == "auto" else 0.7)


@needs_model
def test_model_handles_flipped_orientation():
    """Rows stored posterior→anterior (col_cosine −y): same voxels removed after un-flipping."""
    from pipeline.volume import Volume

    head = generate_head(SubjectParams.random(737373), shape=(64, 160, 160),
                         spacing_mm=(4.0, 1.6, 1.6), noise_seed=2)
    v = head.volume
    flipped = Volume(np.ascontiguousarray(v.hu[:, ::-1, :]), v.spacing_mm, v.origin_lps_mm,
                     v.row_cosine, -v.col_cosine)
    method = make_model_method()
    a = method.face_region(v).mask
    b = method.face_region(flipped).mask[:, ::-1, :]
    assert a.sum() > 0
    assert np.count_nonzero(a & b) / np.count_nonzero(a | b) > 0.97


def test_nose_boxes_come_as_a_crop_that_maps_to_the_same_voxels(head):
    """``RegionResult.nose`` (the nose boxes, for the QA's nose check) is a bounding box and the
    mask within it, cut in the canonical view and mapped back to the array's order: with nose
    boxes only, it covers exactly the removal region, also when rows and columns are stored
    the other way round."""
    from pipeline.volume import Volume

    table = {k: [r for r in rows if r[0] == "nose"] for k, rows in gt_boxes(head).items()}
    table = {k: rows for k, rows in table.items() if rows}
    assert len(table) >= 3
    v = head.volume
    flipped = Volume(np.ascontiguousarray(v.hu[:, ::-1, ::-1]), v.spacing_mm, v.origin_lps_mm,
                     -v.row_cosine, -v.col_cosine)
    masks = []
    for vol in (v, flipped):
        res = ModelFaceRegion(loaded_detector=OracleDetector(v.hu, table),
                              detect_every_mm=1.0).face_region(vol)
        box, sub = res.nose
        full = np.zeros(vol.hu.shape, bool)
        full[box] = sub
        assert sub.shape == full[box].shape and sub.any() and sub.size < full.size / 20
        assert np.array_equal(full, res.mask)
        masks.append(full)
    assert np.array_equal(masks[0], masks[1][:, ::-1, ::-1])


class ScoredOracle(OracleDetector):
    """As :class:`OracleDetector`, with a score per box (``(class, score, i0, j0, i1, j1)``) and
    the detector's own threshold (score > conf)."""

    def detect(self, slices: np.ndarray, *, conf: float = 0.25, **_: object) -> list[Detection]:
        out = []
        for s in slices:
            self.calls += 1
            ks = [k for k in range(self.hu.shape[0]) if np.array_equal(self.hu[k], s)]
            rows = [r for r in (self.boxes.get(ks[0], []) if ks else []) if r[1] > conf]
            out.append(Detection(np.array([r[2:] for r in rows], np.float32).reshape(-1, 4),
                                 np.array([r[1] for r in rows], np.float32),
                                 np.array([CLASSES.index(r[0]) for r in rows], np.int64)))
        return out


def test_boxes_are_linked_across_slices(head):
    """A nose found at 0.8 and 0.6 on two slices and at 0.15 on the next two (below the
    threshold 0.3): linked, the chain's mean (0.425) keeps it on all four; each slice alone, on
    two. A chain that never reached the threshold stays out."""
    nose = {k: [("nose", s, 40, 10, 70, 30)] for k, s in zip(range(20, 24), (0.8, 0.6, 0.15, 0.15))}
    weak = {k: [("ears", 0.2, 5, 50, 15, 70)] for k in range(20, 24)}
    table = {k: nose[k] + weak[k] for k in nose}
    linked = ModelFaceRegion(loaded_detector=ScoredOracle(head.volume.hu, table), detect_every_mm=1.0)
    alone = ModelFaceRegion(loaded_detector=ScoredOracle(head.volume.hu, table), detect_every_mm=1.0,
                            link_slices=False)
    _, d_linked = linked.detect_masks(head.volume)
    _, d_alone = alone.detect_masks(head.volume)
    assert d_linked["found"] == {"nose": 4}
    assert d_alone["found"] == {"nose": 2}
