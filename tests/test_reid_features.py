"""The per-subject re-identification chain: gallery re-scan, probes, views, features."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import render as R  # noqa: F401 — first: OpenGL platform
from pipeline.deface import deface
from pipeline.reid_features import ReidProtocol, study_similarities, subject_features
from pipeline.synth import SubjectParams, generate_head
from pipeline.volume import Volume


def test_protocol_views_are_every_elevation_with_every_head_fixed_light():
    p = ReidProtocol()
    views = p.view_settings()
    assert len(views) == len(p.elevations_deg) * len(p.light_azimuths_deg) == 6
    assert {(v.elevation_deg, v.light_azimuth_deg) for v in views} == {
        (e, a) for e in p.elevations_deg for a in p.light_azimuths_deg}
    assert p.gallery_yaw_deg == 0.0 and p.probe_yaw_deg == 30.0 and p.rescan
    d = p.as_dict()
    assert d["n_views_per_condition"] == 6 and d["render"]["width_px"] == 256
    with pytest.raises(ValueError):
        ReidProtocol(probe_yaw_deg=95.0)
    with pytest.raises(ValueError):
        ReidProtocol(elevations_deg=())


@pytest.mark.slow
def test_subject_features_of_two_heads():
    protocol = ReidProtocol(elevations_deg=(0.0,), light_azimuths_deg=(0.0, 40.0))
    feats = []
    for seed in (31, 32):
        head = generate_head(SubjectParams.random(seed), shape=(64, 80, 80),
                             spacing_mm=(3.75, 3.0, 3.0), noise_seed=seed)
        deid = head.volume.with_hu(deface(head.volume).hu)
        f = subject_features(head.volume, deid, seed=seed, protocol=protocol,
                             backend="raycast", keep_renders=True)
        assert set(f.embeddings) == {"gallery", "control", "deidentified"}
        for c in f.embeddings:
            assert f.embeddings[c].shape == (2, 128) and f.detected[c].shape == (2,)
            assert f.depth_maps[c].shape == protocol.depth_grid.shape
            assert [r.yaw_deg for r in f.renders[c]] == (
                [0.0, 0.0] if c == "gallery" else [30.0, 30.0])
        assert f.detected["gallery"].all()  # the untouched face is found
        # the gallery is a re-scan: its own alignment, a few degrees from the original's
        assert not np.allclose(f.gallery_alignment.rotation, f.alignment.rotation)
        # de-identified = control minus the face outside the skeleton (forehead skin above the
        # face zone stays): the surface lies behind the skin, the nose tip is gone
        ctrl, de = f.depth_maps["control"], f.depth_maps["deidentified"]
        both = np.isfinite(ctrl) & np.isfinite(de)
        behind = (de - ctrl)[both]
        assert np.median(behind) > 0.5 and np.percentile(behind, 75) > 3.0
        assert np.percentile(behind, 5) > -0.5  # nothing moved forwards
        assert np.nanmin(de) > np.nanmin(ctrl) + 5.0  # the nose tip was the front-most point
        # the gallery re-scan shows the same face up to a small residual shift
        g = f.depth_maps["gallery"]
        both = np.isfinite(ctrl) & np.isfinite(g)
        diff = (g - ctrl)[both]
        assert np.median(np.abs(diff - np.median(diff))) < 1.5
        assert set(f.timings_s) >= {"alignment", "rescan", "surfaces", "renders", "embeddings"}
        feats.append(f)
    sims = study_similarities(feats)
    assert set(sims) == {"appearance", "surface"}
    for m in sims.values():
        assert set(m) == {"control", "deidentified"} and m["control"].shape == (2, 2)
