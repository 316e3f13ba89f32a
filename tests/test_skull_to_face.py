"""The learned skull-to-face model: fitting, storage, the shipped model on held-out heads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import skull_to_face as SF
from pipeline.reconstruct import CanonicalGrid, frontal_map, reconstruct, resample_canonical

#: Seeds of the cohorts the README reports (synth_cohort --seed S --subjects 20).
REPORTED_COHORTS = [range(4242, 4262), range(7000, 7020), range(9000, 9020)]


def test_fit_recovers_a_linear_skull_to_face_relation():
    rng = np.random.default_rng(0)
    rg = SF.RadialGrid(theta0=-4.0, theta1=4.0, phi0=-2.0, phi1=2.0)  # 3 × 5 cells
    d_in, d_out = 2 * 15, 15
    a = rng.normal(size=(d_in, d_out))
    x = rng.normal(size=(60, d_in))
    y = x @ a + 0.01 * rng.normal(size=(60, d_out)) + 80.0
    y[0, 3] = np.nan  # an unknown cell is tolerated
    m = SF.fit_model(x[:50], y[:50], k=d_in, lam=1e-3, rg=rg)
    pred = np.array([m.predict_map(v.reshape(2, *rg.shape)).ravel() for v in x[50:]])
    assert np.abs(pred - y[50:]).max() < 0.1
    # with one component it can only do much worse than the full relation
    m1 = SF.fit_model(x[:50], y[:50], k=1, lam=1e-3, rg=rg)
    pred1 = np.array([m1.predict_map(v.reshape(2, *rg.shape)).ravel() for v in x[50:]])
    assert np.abs(pred1 - y[50:]).mean() > 10 * np.abs(pred - y[50:]).mean()
    with pytest.raises(SF.ReconstructionError):
        m.predict_map(np.zeros(7))


def test_model_files_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rg = SF.RadialGrid(theta0=-4.0, theta1=4.0, phi0=-2.0, phi1=2.0)
    x, y = rng.normal(size=(20, 30)), rng.normal(size=(20, 15))
    m = SF.fit_model(x, y, k=5, lam=1.0, rg=rg, card={"train_seeds": [1, 21]})
    m.save(tmp_path / "m.npz")
    back = SF.load_model(tmp_path / "m.npz")
    assert back.radial == rg and back.card == {"train_seeds": [1, 21]}
    v = x[0].reshape(2, *rg.shape)
    assert np.allclose(back.predict_map(v), m.predict_map(v), atol=1e-4)
    with pytest.raises(SF.ReconstructionError):
        SF.load_model(tmp_path / "missing.npz")


def test_held_out_check_refuses_subjects_the_model_has_seen():
    rg = SF.RadialGrid(theta0=-4.0, theta1=4.0, phi0=-2.0, phi1=2.0)
    rng = np.random.default_rng(2)
    m = SF.fit_model(rng.normal(size=(10, 30)), rng.normal(size=(10, 15)), k=3, lam=1.0, rg=rg,
                     card={"train_seeds": [100, 110], "validation_seeds": [200, 203]})
    assert SF.seen_seeds(m) == set(range(100, 110)) | {200, 201, 202}
    ok = SF.check_held_out(m, [110, 111, 199, 203])
    assert ok["disjoint"] is True and ok["subject_seeds"] == [110, 111, 199, 203]
    for seen in ([109, 150], [5, 202]):  # a training head; a validation head (chose k, lam)
        with pytest.raises(SF.ReconstructionError, match="trained or validated on 1 of"):
            SF.check_held_out(m, seen)
    m.card = {"train_seeds": [100, 110]}  # a card that does not say what chose k and lam
    with pytest.raises(SF.ReconstructionError, match="no validation_seeds"):
        SF.check_held_out(m, [1])


def test_the_shipped_model_never_saw_the_reported_cohorts_and_beats_the_mean_face():
    assert SF.DEFAULT_MODEL.is_file() and SF.DEFAULT_MODEL.stat().st_size < 6_000_000
    card = json.loads(SF.DEFAULT_MODEL.with_suffix(".json").read_text())
    train = range(*card["train_seeds"])
    val = range(*card["validation_seeds"])
    assert len(train) == card["n_train"] >= 200 and not set(train) & set(val)
    m = SF.load_model()
    for cohort in REPORTED_COHORTS:
        assert not set(cohort) & set(train) and not set(cohort) & set(val)
        assert SF.check_held_out(m, list(cohort))["disjoint"]
    assert card["validation_mae_mm"] < card["validation_mae_mm_mean_face"]
    assert m.components.shape[0] == card["k"] and m.weights.shape[1] == np.prod(m.radial.shape)


@pytest.mark.slow
def test_the_shipped_model_on_a_held_out_head_and_as_an_attack():
    from pipeline.align import alignment_from_volume
    from pipeline.deface import deface
    from pipeline.synth import SubjectParams, generate_head
    from surveys.management.commands.train_skull_to_face import face_cells

    seed = 4321  # in no training, validation or reported cohort range
    m = SF.load_model()
    assert SF.check_held_out(m, [seed])["disjoint"]
    d = SF.training_pair(seed, "medium")
    cells = face_cells(m.radial) & np.isfinite(d["y"])
    err = np.abs(m.predict_map(d["x"]) - d["y"])[cells].mean()
    err_mean_face = np.abs(m.mean_y.reshape(m.radial.shape) - d["y"])[cells].mean()
    assert err < 0.8 * err_mean_face, (err, err_mean_face)
    # as an attack: the rebuilt face is closer to the original than the de-identified one
    head = generate_head(SubjectParams.random(seed), shape=(80, 96, 96),
                         spacing_mm=(3.0, 2.5, 2.5), noise_seed=seed)
    deid = head.volume.with_hu(deface(head.volume).hu)
    al = alignment_from_volume(deid)
    rec = reconstruct(deid, "learned", alignment=al, stride=(1, 1, 1))
    changed = rec.volume.hu != deid.hu
    assert rec.voxels_added > 1000 and np.all(deid.hu[changed] <= -500)
    grid = CanonicalGrid()

    def front(v):
        return frontal_map(np.nan_to_num(resample_canonical(v, al, grid), nan=-1000.0) > -300,
                           grid)

    f_o, f_d, f_r = front(head.volume), front(deid), front(rec.volume)
    zz, xx = np.meshgrid(grid.zs, grid.xs, indexing="ij")
    removed = (np.abs(f_d - f_o) > 3.0) & (np.abs(xx) < 45) & (zz > -100) & (zz < 30)
    err_d = np.nanmean(np.abs(f_d - f_o)[removed])
    err_r = np.nanmean(np.abs(f_r - f_o)[removed])
    assert err_r < 0.6 * err_d, (err_r, err_d)


def test_acquisitions_are_the_cohort_sizes():
    from surveys.management.commands.synth_cohort import SIZES

    for name, geometry in SF.ACQUISITIONS.items():
        assert SIZES[name] == geometry
