"""Cohort re-identification summary on the web: computed by pipeline.reid, shown with both
conditions, every matcher, CIs, chance, n and a small-cohort warning."""

from __future__ import annotations

import numpy as np
import pytest
from django.contrib.auth.models import Group, User

from pipeline.reid import evaluate_study
from pipeline.reid_features import (
    SubjectFeatures,
    features_from_json,
    features_to_json,
    study_similarities,
)
from surveys.access import RESEARCHER_GROUP
from surveys.models import Cohort, ReidSummary, Subject
from surveys.processing.reid import compute_cohort_study, reid_table, update_cohort_reid


def fake_features(n: int, seed: int = 0) -> list[SubjectFeatures]:
    """Subjects whose control probes resemble their gallery; de-identified probes are noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ident = rng.normal(size=128)
        face = rng.normal(size=(20, 20))
        emb = {"gallery": ident + 0.2 * rng.normal(size=(6, 128)),
               "control": ident + 0.2 * rng.normal(size=(6, 128)),
               "deidentified": rng.normal(size=(6, 128))}
        depth = {"gallery": face, "control": face + 0.05 * rng.normal(size=face.shape),
                 "deidentified": rng.normal(size=face.shape)}
        depth["control"][:2] = np.nan
        out.append(SubjectFeatures(label="", embeddings=emb, depth_maps=depth,
                                   detected={c: np.ones(6, bool) for c in emb}))
    return out


def test_features_survive_json_storage():
    (f,) = fake_features(1)
    back = features_from_json(features_to_json(f), "S1")
    for c in f.embeddings:
        assert np.allclose(back.embeddings[c], f.embeddings[c], atol=1e-6)
        assert np.allclose(back.depth_maps[c], f.depth_maps[c], atol=0.01, equal_nan=True)
        assert np.array_equal(back.detected[c], f.detected[c])
    assert back.label == "S1"
    with pytest.raises(ValueError):
        features_from_json({"format": 99})


@pytest.fixture()
def cohort(db, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    owner = User.objects.create_user("owner", password="pw")
    owner.groups.add(Group.objects.create(name=RESEARCHER_GROUP))
    c = Cohort.objects.create(name="c", owner=owner)
    c.researchers.add(owner)
    return c, owner


def _subjects(cohort, feats):
    for i, f in enumerate(feats):
        Subject.objects.create(cohort=cohort, pseudonym=f"P{i + 1:04d}", patient_key=f"k{i}",
                               reid_features=features_to_json(f))


def test_summary_is_computed_by_pipeline_reid_and_shown_with_ci_chance_and_both_curves(
        client, cohort):
    from PIL import Image

    from surveys.storage.paths import data_path

    c, owner = cohort
    feats = fake_features(12, seed=3)
    _subjects(c, feats)
    summary = update_cohort_reid(c)
    assert summary is not None and summary.n_subjects == 12
    # the same numbers as pipeline.reid on the stored features (one implementation)
    stored = [features_from_json(s.reid_features) for s in c.subjects.order_by("pseudonym")]
    direct = evaluate_study(study_similarities(stored), [f"P{i + 1:04d}" for i in range(12)])
    for m in ("appearance", "surface", "fused"):
        for cond in ("control", "deidentified"):
            assert summary.metrics["matchers"][m][cond]["rank1"] == direct["matchers"][m][cond][
                "rank1"]
    assert summary.rank1 == direct["matchers"]["fused"]["deidentified"]["rank1"]
    assert summary.baseline_rank1 == direct["matchers"]["fused"]["control"]["rank1"] == 1.0
    img = Image.open(data_path(summary.plot_path))
    assert img.size[0] > 300
    client.force_login(owner)
    page = client.get(f"/cohorts/{c.pk}/").content.decode()
    assert 'id="reid-table"' in page and 'id="reid-small"' not in page
    for m in ("appearance", "surface", "fused"):
        for cond in ("control", "deidentified"):
            assert f'data-matcher="{m}" data-condition="{cond}"' in page
    assert "Chance: rank-1 0.08, rank-5 0.42, AUC 0.50" in page
    assert "[1.00, 1.00]" in page  # control rank-1 with its CI
    assert "random" in page  # the tie rule is stated
    status = client.get(f"/cohorts/{c.pk}/status.json").json()
    assert status["reid"]["n"] == 12 and status["reid"]["rank1_control"] == 1.0
    r = client.get(f"/cohorts/{c.pk}/reid-cmc.png")
    assert r.status_code == 200 and r["Content-Type"] == "image/png"


def test_small_cohorts_are_flagged_and_incomplete_cohorts_wait(client, cohort):
    c, owner = cohort
    feats = fake_features(3, seed=4)
    _subjects(c, feats)
    Subject.objects.filter(pseudonym="P0003").update(reid_features=None)
    assert compute_cohort_study(c) is None and update_cohort_reid(c) is None
    assert not ReidSummary.objects.filter(cohort=c).exists()
    Subject.objects.filter(pseudonym="P0003").update(reid_features=features_to_json(feats[2]))
    summary = update_cohort_reid(c)
    table = reid_table(summary.metrics)
    assert table["small_cohort"] and table["n"] == 3 and len(table["rows"]) == 6
    client.force_login(owner)
    page = client.get(f"/cohorts/{c.pk}/").content.decode()
    assert 'id="reid-small"' in page and "Fewer than 10 subjects" in page


from tests.test_study_report import done_study  # noqa: E402,F401 — fixture


@pytest.mark.django_db
def test_study_report_shows_the_raters_beside_the_automated_matchers(done_study):
    import re

    study, c, cohort = done_study["study"], done_study["client"], done_study["cohort"]
    pdf_before = c.get(f"/studies/{study.pk}/export/report.pdf").content
    page = c.get(f"/studies/{study.pk}/report/").content.decode()
    assert "No automated result for this cohort yet" in page
    subjects = list(cohort.subjects.order_by("pseudonym"))
    for s, f in zip(subjects, fake_features(len(subjects), seed=9)):
        s.reid_features = features_to_json(f)
        s.save(update_fields=["reid_features"])
    summary = update_cohort_reid(cohort)
    page = c.get(f"/studies/{study.pk}/report/").content.decode()
    table = page[page.index('id="human-vs-automated"'):]
    table = table[:table.index("</table>")]
    # raters (known answers): general always right, surgeons right on control only; the table
    # shows the primary analysis (surgeons also miss their catch trials: excluded by the rule)
    from surveys.studies.report import study_results

    pooled = study_results(study)[study.primary_analysis]["groups"]["all"]
    control = re.search(r'data-condition="control">(.*?)</tr>', table, re.S).group(1)
    deid = re.search(r'data-condition="deidentified">(.*?)</tr>', table, re.S).group(1)
    assert f"{pooled['control']['accuracy']:.3f} [" in control
    assert f"{pooled['deidentified']['accuracy']:.3f} [" in deid
    assert f"({pooled['deidentified']['n']})" in deid
    k_fused = summary.metrics["matchers"]["fused"]["control"]
    assert "fused 1.000" in control and k_fused["rank1"] == 1.0
    assert 'id="reid-table"' in page and 'id="reid-small"' not in page  # 10 subjects
    pdf_after = c.get(f"/studies/{study.pk}/export/report.pdf").content
    assert pdf_after.count(b"/Type /Page\n") + pdf_after.count(b"/Type /Page ") > \
        pdf_before.count(b"/Type /Page\n") + pdf_before.count(b"/Type /Page ")


def with_attacks(feats: list[SubjectFeatures], seed: int = 5) -> list[SubjectFeatures]:
    """Add two reconstruction-attack probes: ``attack_tissue_depth`` resembles the gallery
    (a face rebuilt on the skull that identifies), ``attack_learned`` is noise."""
    rng = np.random.default_rng(seed)
    for f in feats:
        f.embeddings["attack_tissue_depth"] = f.embeddings["gallery"] + 0.3 * rng.normal(
            size=f.embeddings["gallery"].shape)
        f.embeddings["attack_learned"] = rng.normal(size=f.embeddings["gallery"].shape)
        f.depth_maps["attack_tissue_depth"] = f.depth_maps["gallery"] + 0.05 * rng.normal(
            size=f.depth_maps["gallery"].shape)
        f.depth_maps["attack_learned"] = rng.normal(size=f.depth_maps["gallery"].shape)
        for c in ("attack_tissue_depth", "attack_learned"):
            f.detected[c] = np.ones(6, bool)
        f.attacks = {"tissue_depth": {"voxels_added": 10}, "learned": {"voxels_added": 12}}
    return feats


def test_cohort_page_shows_deidentified_beside_deidentified_plus_reconstruction(client, cohort):
    import re

    c, owner = cohort
    feats = with_attacks(fake_features(12, seed=3))
    _subjects(c, feats)
    back = features_from_json(c.subjects.first().reid_features)
    assert back.attacks["learned"] == {"voxels_added": 12}
    summary = update_cohort_reid(c)
    m = summary.metrics
    assert m["conditions"] == ["control", "deidentified", "attack_learned", "attack_tissue_depth"]
    assert m["matchers"]["fused"]["attack_tissue_depth"]["rank1"] == 1.0
    assert m["matchers"]["fused"]["attack_learned"]["rank1"] < 0.5
    table = reid_table(m)
    assert table["side_by_side_labels"] == [
        "de-identified", "de-identified + learned reconstruction",
        "de-identified + tissue-depth reconstruction"]
    assert [r["matcher"] for r in table["side_by_side"]] == ["appearance", "surface", "fused"]
    client.force_login(owner)
    page = client.get(f"/cohorts/{c.pk}/").content.decode()
    side = page[page.index('id="reid-side-by-side"'):]
    side = side[:side.index("</table>")]
    fused = re.search(r'data-matcher="fused" class="primary">(.*?)</tr>', side, re.DOTALL).group(1)
    cells = re.findall(r'data-condition="([a-z_]+)">([^<]*)</td>', fused)
    assert [k for k, _ in cells] == ["deidentified", "attack_learned", "attack_tissue_depth"]
    assert cells[2][1].startswith("1.00 [1.00, 1.00]; 1.00")
    assert "De-identified + tissue-depth reconstruction: rank-1 <b>1.00</b>" in page
    # every matcher × condition row of the main table, attacks included
    for cond in ("attack_learned", "attack_tissue_depth"):
        assert f'data-matcher="surface" data-condition="{cond}"' in page


@pytest.mark.django_db
def test_study_report_and_pdf_show_the_reconstruction_attacks(done_study):
    import pypdfium2 as pdfium

    study, c, cohort = done_study["study"], done_study["client"], done_study["cohort"]
    subjects = list(cohort.subjects.order_by("pseudonym"))
    for s, f in zip(subjects, with_attacks(fake_features(len(subjects), seed=9))):
        s.reid_features = features_to_json(f)
        s.save(update_fields=["reid_features"])
    update_cohort_reid(cohort)
    page = c.get(f"/studies/{study.pk}/report/").content.decode()
    assert 'id="reid-side-by-side"' in page
    assert "de-identified + tissue-depth reconstruction" in page.lower()
    pdf = pdfium.PdfDocument(c.get(f"/studies/{study.pk}/export/report.pdf").content)
    text = " ".join(pdf[i].get_textpage().get_text_range() for i in range(len(pdf)))
    text = " ".join(text.split())
    assert "De-identified beside de-identified + reconstruction" in text
    assert "de-identified + tissue-depth reconstruction" in text
