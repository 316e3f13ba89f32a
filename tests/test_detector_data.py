"""YOLO dataset builder from the synthetic generator: windowing, labels, split by subject."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import detector_data as dd
from pipeline.synth import _FEATURE_CODES, SubjectParams, generate_head


def test_hu_to_rgb8_matches_independent_window():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1200, 2500, size=(3, 7, 5)).astype(np.int16)
    rgb = dd.hu_to_rgb8(hu)
    assert rgb.shape == (3, 7, 5, 3) and rgb.dtype == np.uint8
    for c, (lo, hi) in enumerate(dd.HU_WINDOWS):
        expect = np.floor(np.clip((hu.astype(float) - lo) / (hi - lo), 0, 1) * 255 + 0.5)
        np.testing.assert_array_equal(rgb[..., c], expect.astype(np.uint8))
    # end points of the window
    edge = dd.hu_to_rgb8(np.array([[-1000.0, 1000.0]]), windows=[(-1000, 1000)])
    assert edge[0, :, 0].tolist() == [0, 255]


def test_hu_to_rgb8_rejects_bad_window():
    with pytest.raises(dd.DatasetError, match="high > low"):
        dd.hu_to_rgb8(np.zeros((4, 4)), windows=[(10, 10)])
    with pytest.raises(dd.DatasetError, match="2D"):
        dd.hu_to_rgb8(np.zeros(4))


def test_slice_labels_equal_ground_truth_boxes():
    head = generate_head(SubjectParams.random(11), shape=(40, 64, 64), spacing_mm=(6.0, 3.6, 3.6),
                         noise_seed=1)
    n_checked = 0
    for k in range(head.volume.hu.shape[0]):
        got = dd.slice_labels(head.feature_ids[k], head.face_label_mask[k], _FEATURE_CODES)
        # independent: the generator's own feature boxes (those with enough pixels)
        expect = []
        for name, i0, j0, i1, j1 in head.feature_boxes[k]:
            codes = [c for c, n in _FEATURE_CODES.items() if n == name]
            sub = np.isin(head.feature_ids[k, j0:j1, i0:i1], codes)
            if sub.sum() >= 6 and name in dd.CLASSES:  # brow, chin: not detector classes
                expect.append((dd.CLASSES.index(name), i0, j0, i1, j1))
        face = head.face_label_mask[k]
        if face.sum() >= 6:
            jj, ii = np.nonzero(face)
            expect.append((0, ii.min(), jj.min(), ii.max() + 1, jj.max() + 1))
        assert sorted(got) == sorted(expect)
        n_checked += len(got)
    assert n_checked > 10
    assert any(c == dd.CLASSES.index("nose") for k in range(40) for c, *_ in
               dd.slice_labels(head.feature_ids[k], head.face_label_mask[k], _FEATURE_CODES))


def test_build_dataset_split_by_subject(tmp_path):
    spec = dd.DatasetSpec(n_train=2, n_val=1, n_test=1, size_px=64, slice_mm=(6.0, 7.0),
                          pixel_mm=(3.6, 4.0))
    yaml_path = dd.build_dataset(tmp_path, spec)
    text = yaml_path.read_text()
    assert "train: images/train" in text and "4: ears" in text
    assert "brow" not in text and "chin" not in text
    subjects = {}
    for split in ("train", "val", "test"):
        imgs = sorted((tmp_path / "images" / split).glob("*.png"))
        labs = sorted((tmp_path / "labels" / split).glob("*.txt"))
        assert imgs and [p.stem for p in imgs] == [p.stem for p in labs]
        subjects[split] = {p.stem.split("_")[0] for p in imgs}
        for lab in labs:
            for line in lab.read_text().splitlines():
                c, *xywh = line.split()
                assert 0 <= int(c) < len(dd.CLASSES)
                assert all(0.0 <= float(v) <= 1.0 for v in xywh)
    assert len(subjects["train"]) == 2
    assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]


def test_dataset_labels_match_generator(tmp_path):
    """A label file converted back to pixels equals the generator's boxes for that slice."""
    from PIL import Image

    spec = dd.DatasetSpec(n_train=1, n_val=0, n_test=0, size_px=64, slice_mm=(6.0, 7.0),
                          pixel_mm=(3.6, 4.0))
    dd.build_dataset(tmp_path, spec, splits=("train",))
    seed = spec.seeds("train")[0]
    geo = dd.subject_geometry(spec, seed)
    head = generate_head(SubjectParams.random(seed), shape=geo["shape"], spacing_mm=geo["spacing_mm"],
                         noise_hu=geo["noise_hu"], noise_seed=seed)
    lab = sorted((tmp_path / "labels" / "train").glob("*.txt"))[len(spec.seeds("train")) * 5]
    k = int(lab.stem.split("_k")[1])
    img = np.asarray(Image.open(lab.with_suffix(".png").as_posix().replace("/labels/", "/images/")))
    np.testing.assert_array_equal(img, dd.hu_to_rgb8(head.volume.hu[k]))
    w = h = 64
    got = []
    for line in lab.read_text().splitlines():
        c, x, y, bw, bh = line.split()
        x, y, bw, bh = float(x) * w, float(y) * h, float(bw) * w, float(bh) * h
        got.append((int(c), round(x - bw / 2), round(y - bh / 2), round(x + bw / 2), round(y + bh / 2)))
    expect = dd.slice_labels(head.feature_ids[k], head.face_label_mask[k], _FEATURE_CODES)
    assert sorted(got) == sorted(expect)


def test_spec_rejects_unknown_split():
    with pytest.raises(dd.DatasetError, match="unknown split"):
        dd.DatasetSpec().seeds("holdout")


def test_volume_labels_drop_slivers_below_the_visible_fraction():
    """A feature is labelled only on slices showing ≥ fraction of its largest cross-section."""
    ids = np.zeros((5, 20, 20), np.int16)
    areas = [0, 8, 40, 100, 12]  # pixels of feature code 3 (nose) per slice
    for k, a in enumerate(areas):
        ids[k].flat[:a] = 3
    face = np.zeros_like(ids, bool)
    face[1:4, 10:20, 0:10] = True  # 100 px on slices 1..3
    face[4, 10, 0:7] = True  # 7 px sliver
    codes = {3: "nose"}
    nose = dd.CLASSES.index("nose")

    def classes_per_slice(frac):
        return [sorted(c for c, *_ in lab) for lab in dd.volume_labels(ids, face, codes, frac)]

    # 0: every fragment of ≥ 6 px (same as slice_labels)
    assert classes_per_slice(0.0) == [[], [0, nose], [0, nose], [0, nose], [0, nose]]
    # 0.2 of the largest (100 px) = 20 px: the 8 and 12 px nose slivers and the 7 px face go
    assert classes_per_slice(0.2) == [[], [0], [0, nose], [0, nose], []]
    # boxes that are kept are the same boxes as without the rule
    assert dd.volume_labels(ids, face, codes, 0.2)[2] == dd.slice_labels(ids[2], face[2], codes)
    with pytest.raises(dd.DatasetError, match="min_visible_fraction"):
        dd.volume_labels(ids, face, codes, 1.0)
    # per class: the nose on every slice where it is seen, the face only where it is large
    assert classes_per_slice({"face": 0.2, "nose": 0.05}) == [[], [0, nose], [0, nose], [0, nose], [nose]]
    assert classes_per_slice({"face": 0.2, "nose": 0.2}) == classes_per_slice(0.2)
    assert classes_per_slice({"nose": 0.2}) == [[], [0], [0, nose], [0, nose], [0]]
    with pytest.raises(dd.DatasetError, match="unknown classes.*'noze'"):
        dd.volume_labels(ids, face, codes, {"noze": 0.1})
    with pytest.raises(dd.DatasetError, match="min_visible_fraction"):
        dd.volume_labels(ids, face, codes, {"nose": -0.1})


def test_dataset_spec_records_the_visible_fraction(tmp_path):
    import json

    spec = dd.DatasetSpec(n_train=1, n_val=0, n_test=0, size_px=64, slice_mm=(6.0, 7.0),
                          pixel_mm=(3.6, 4.0), min_visible_fraction=0.3)
    dd.build_dataset(tmp_path, spec, splits=("train",))
    meta = json.loads((tmp_path / "spec.json").read_text())
    assert meta["spec"]["min_visible_fraction"] == 0.3
    n_boxes = sum(len(p.read_text().splitlines()) for p in (tmp_path / "labels" / "train").glob("*.txt"))
    spec0 = dd.DatasetSpec(**{**meta["spec"], "min_visible_fraction": 0.0, "classes": dd.CLASSES})
    dd.build_dataset(tmp_path / "all", spec0, splits=("train",))
    n_all = sum(len(p.read_text().splitlines()) for p in (tmp_path / "all" / "labels" / "train").glob("*.txt"))
    assert 0 < n_boxes < n_all


def test_domain_dataset_max_slices_and_workers(tmp_path):
    """DatasetSpec(domain=True): domain heads at their routine acquisition, at most ``max_slices``
    labelled slices a subject, image size from the acquisition; workers=2 writes the same files."""
    from PIL import Image

    spec = dd.DatasetSpec(n_train=2, n_val=0, n_test=0, domain=True, max_slices=4,
                          negatives_fraction=0.0, min_visible_fraction=0.2)
    dd.build_dataset(tmp_path / "one", spec, splits=("train",))
    dd.build_dataset(tmp_path / "two", spec, splits=("train",), workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*")
                   if p.suffix in (".png", ".txt"))
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*")
                           if p.suffix in (".png", ".txt"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    imgs = sorted((tmp_path / "one" / "images" / "train").glob("*.png"))
    for seed in spec.seeds("train"):
        mine = [p for p in imgs if p.stem.startswith(f"s{seed:05d}_")]
        assert len(mine) == 4  # capped (every domain head has more labelled slices)
        n = dd.domain_acquisition(seed)["shape"][1]
        assert all(Image.open(p).size == (n, n) for p in mine)
    # the labels of one image are the domain head's boxes on that slice
    from pipeline.synth import _FEATURE_CODES

    seed = spec.seeds("train")[0]
    head = dd.domain_head(seed)
    lab = sorted((tmp_path / "one" / "labels" / "train").glob(f"s{seed:05d}_*.txt"))[1]
    k = int(lab.stem.split("_k")[1])
    n = head.volume.hu.shape[1]
    got = []
    for line in lab.read_text().splitlines():
        c, x, y, bw, bh = line.split()
        x, y, bw, bh = float(x) * n, float(y) * n, float(bw) * n, float(bh) * n
        got.append((int(c), round(x - bw / 2), round(y - bh / 2), round(x + bw / 2), round(y + bh / 2)))
    expect = dd.volume_labels(head.feature_ids, head.face_label_mask, _FEATURE_CODES, 0.2)[k]
    assert got and sorted(got) == sorted(expect)
