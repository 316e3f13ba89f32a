"""Researcher workspace (issue 15): the cohort's QA grid and its flags, the live subject
status, QA thumbnails, the de-identified download's warning about unfinished or failed
subjects, patients already in another of the researcher's cohorts; raters' balanced
views and recorded enlargements."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter

import numpy as np
import pytest
from django.contrib.auth.models import Group, User
from PIL import Image

from surveys.cohorts.qa_grid import Card, flag_outliers
from tests.viewer_fixture import head_phantom, make_subject


@pytest.fixture()
def site(db, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    from surveys.models import Cohort

    group = Group.objects.create(name="researcher")
    owner = User.objects.create_user("owner", password="pw")
    other = User.objects.create_user("other", password="pw")
    for u in (owner, other):
        u.groups.add(group)
    cohort = Cohort.objects.create(name="Trauma 2024", owner=owner)
    cohort.researchers.add(owner)
    ph = head_phantom((12, 24, 20), (6.0, 8.0, 8.0))
    subjects = [make_subject(cohort, f"SUBJ-{n:04d}", ph, patient_id=f"FAKE{n}")
                for n in range(1, 4)]
    return {"cohort": cohort, "owner": owner, "other": other, "subjects": subjects, "ph": ph}


def _card(name, **fig):
    base = {"removed_ml": 100.0, "inside_pct": 0.0, "outside_ml": 0.0, "bone_dice": 1.0,
            "n_warnings": 0.0}
    base.update(fig)
    return Card(subject_id=0, pseudonym=name, status="done", figures=base, warnings=[],
                face_found=True, no_face_reason="", n_series=1, qa_image_id=None)


def test_flags_limits_and_robust_outliers():
    cards = [_card(f"S{n}", removed_ml=100.0 + n) for n in range(8)]
    cards.append(_card("LOW", removed_ml=12.0))  # a face left behind
    cards.append(_card("BONE", bone_dice=0.97))
    cards.append(_card("INSIDE", inside_pct=2.5))
    flag_outliers(cards)
    by = {c.pseudonym: c for c in cards}
    assert "removed_ml" in by["LOW"].flags and "far below" in by["LOW"].flags["removed_ml"]
    assert set(by["BONE"].flags) == {"bone_dice"} and set(by["INSIDE"].flags) == {"inside_pct"}
    assert not any(by[f"S{n}"].flags for n in range(8))
    assert by["LOW"].flagged and not by["S3"].flagged
    # too few subjects for outliers: only the absolute limits
    few = [_card("A", removed_ml=100.0), _card("B", removed_ml=5.0), _card("C", bone_dice=0.5)]
    flag_outliers(few)
    assert [sorted(c.flags) for c in few] == [[], [], ["bone_dice"]]


def test_a_detector_nose_left_behind_is_flagged():
    """DefaceQA.nose_check → the card's "Nose check: removed" figure and its flag."""
    from surveys.models import Series

    def pct(check):
        return Series(qa={"nose_check": check} if check is not None else {}).nose_check_removed_pct

    assert pct(None) is None
    assert pct({"outside_ml": 0.1, "inside_ml": 0.5, "removed_pct": None,
                "nose_may_be_left": False}) is None  # a box with nothing to measure
    assert pct({"outside_ml": 0.0, "inside_ml": 18.7, "removed_pct": None,
                "nose_may_be_left": True}) == 0.0  # the hull swallowed the nose
    assert pct({"outside_ml": 10.3, "inside_ml": 3.2, "removed_pct": 70.4,
                "nose_may_be_left": True}) == 70.4
    cards = [_card("OK", nose_check_pct=99.6), _card("NONE", nose_check_pct=None),
             _card("LEFT", nose_check_pct=70.4), _card("SWALLOWED", nose_check_pct=0.0)]
    flag_outliers(cards)
    assert [sorted(c.flags) for c in cards] == [[], [], ["nose_check_pct"], ["nose_check_pct"]]
    assert "the nose may be left" in cards[2].flags["nose_check_pct"]
    row = next(r for r in cards[2].rows() if r["key"] == "nose_check_pct")
    assert row["text"] == "70 %" and row["flag"]


def test_cohort_page_has_a_qa_grid_with_thumbnails(client, site):
    from surveys.models import Series

    c = site["cohort"]
    Series.objects.filter(subject=site["subjects"][1]).update(
        bone_dice=0.95, warnings=["the detector found no eyes"])
    client.force_login(site["owner"])
    page = client.get(f"/cohorts/{c.pk}/").content.decode()
    assert page.count('class="qa-card') == 3 and 'id="qa-sort"' in page
    cards = {re.search(r'data-subject="([^"]+)"', a).group(1): a
             for a in re.findall(r'<article class="qa-card.*?</article>', page, re.S)}
    assert sorted(cards) == ["SUBJ-0001", "SUBJ-0002", "SUBJ-0003"]
    card2 = cards["SUBJ-0002"]
    assert card2.startswith('<article class="qa-card flagged"') and 'data-flagged="1"' in card2
    assert 'data-bone_dice="0.95"' in card2 and "bone changed" in card2
    assert "the detector found no eyes" in card2
    assert 'data-flagged="0"' in cards["SUBJ-0001"]
    # sort keys are plain numbers; thumbnails go through the permission checks
    img = site["subjects"][0].images.get(kind="qa")
    url = f"/cohorts/{c.pk}/images/{img.pk}/thumb.png"
    assert url in page
    r = client.get(url)
    assert r.status_code == 200 and r["Content-Type"] == "image/png"
    thumb = Image.open(io.BytesIO(r.content))
    full = Image.open(io.BytesIO(client.get(f"/cohorts/{c.pk}/images/{img.pk}.png")
                                 .getvalue()))
    assert thumb.width == min(360, full.width)
    assert client.get(url).content == r.content  # from the thumbnail cache
    # the fragment the page swaps in, and the signatures the status poll reports
    frag = client.get(f"/cohorts/{c.pk}/qa-grid/").content.decode()
    assert frag.count('class="qa-card') == 3
    status = client.get(f"/cohorts/{c.pk}/status.json").json()
    assert set(status["qa"]) == {"SUBJ-0001", "SUBJ-0002", "SUBJ-0003"}
    before = status["qa"]["SUBJ-0003"]
    Series.objects.filter(subject=site["subjects"][2]).update(removed_ml=1.0)
    assert client.get(f"/cohorts/{c.pk}/status.json").json()["qa"]["SUBJ-0003"] != before
    client.force_login(site["other"])
    for u in (url, f"/cohorts/{c.pk}/qa-grid/"):
        assert client.get(u).status_code == 404
    client.logout()
    assert client.get(url).status_code == 403


def test_download_warns_about_unfinished_and_failed_subjects(client, site):
    from surveys.models import StageRun

    c = site["cohort"]
    s2, s3 = site["subjects"][1], site["subjects"][2]
    StageRun.objects.filter(subject=s2, stage="deidentify").update(
        status="failed", error="no face found: bare skull")
    StageRun.objects.filter(subject=s3, stage__in=["deidentify", "surfaces", "embeddings"]) \
        .update(status="pending")
    StageRun.objects.filter(subject=s3, stage="import").update(status="running")
    client.force_login(site["owner"])
    page = client.get(f"/cohorts/{c.pk}/").content.decode()
    assert 'id="download-missing"' in page and "2 subjects unfinished or failed" in page
    r = client.get(f"/cohorts/{c.pk}/download/deidentified.zip")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/html")
    text = r.content.decode()
    assert "2 of 3 subjects will be missing" in text
    assert "SUBJ-0002" in text and "no face found: bare skull" in text
    assert "SUBJ-0003" in text and "not started yet" in text and "SUBJ-0001</a>" not in text
    r = client.get(f"/cohorts/{c.pk}/download/deidentified.zip?confirm=1")
    assert r["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content))) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names if n.endswith(".dcm")} == {"SUBJ-0001"}
        rows = list(csv.DictReader(io.StringIO(zf.read("not-included.csv").decode())))
    assert [(x["subject"], x["status"]) for x in rows] == [("SUBJ-0002", "failed"),
                                                           ("SUBJ-0003", "pending")]
    # everything done: straight to the zip, no list
    StageRun.objects.filter(subject__cohort=c).update(status="done", error="")
    r = client.get(f"/cohorts/{c.pk}/download/deidentified.zip")
    assert r["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content))) as zf:
        assert "not-included.csv" not in zf.namelist()
    assert 'id="download-missing"' not in client.get(f"/cohorts/{c.pk}/").content.decode()


def test_same_patient_in_another_cohort_of_the_researcher(client, site):
    from surveys.models import Cohort

    owner, other = site["owner"], site["other"]
    mine2 = Cohort.objects.create(name="Follow-up", owner=owner)
    mine2.researchers.add(owner)
    theirs = Cohort.objects.create(name="Their cohort", owner=other)
    theirs.researchers.add(other)
    ph = site["ph"]
    make_subject(mine2, "SUBJ-0001", ph, patient_id="FAKE3")  # = SUBJ-0003 of the first
    make_subject(mine2, "SUBJ-0002", ph, patient_id="NEW")
    make_subject(theirs, "SUBJ-0001", ph, patient_id="FAKE1")  # someone else's cohort
    client.force_login(owner)
    page = client.get(f"/cohorts/{site['cohort'].pk}/").content.decode()
    assert 'id="overlap-notice"' in page
    notice = page.split('id="overlap-notice"')[1].split("</section>")[0]
    assert "SUBJ-0003</a> here is" in notice and "Follow-up" in notice
    assert "Their cohort" not in page and "pseudonym" in notice and "per cohort" in notice
    sub = client.get(f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0003/").content.decode()
    assert 'id="overlap-notice"' in sub and f"/cohorts/{mine2.pk}/subjects/SUBJ-0001/" in sub
    assert 'id="overlap-notice"' not in client.get(
        f"/cohorts/{site['cohort'].pk}/subjects/SUBJ-0001/").content.decode()
    # the other researcher sees no link to the owner's cohorts
    client.force_login(other)
    assert 'id="overlap-notice"' not in client.get(f"/cohorts/{theirs.pk}/").content.decode()


def test_upload_message_names_patients_known_from_another_cohort(client, db, settings, tmp_path):
    from surveys.cohorts import uploads
    from surveys.cohorts.importing import import_folder
    from surveys.models import Cohort
    from tests.factories.dicom_cohorts import write_synthetic_cohort, zip_folder

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = User.objects.create_user("r", password="pw")
    user.groups.add(Group.objects.create(name="researcher"))
    first = Cohort.objects.create(name="First", owner=user)
    first.researchers.add(user)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 2, size="tiny", seed=3)
    import_folder(first, src, move=False)
    second = Cohort.objects.create(name="Second", owner=user)
    second.researchers.add(user)
    client.force_login(user)
    with open(zip_folder(src, tmp_path / "again.zip"), "rb") as fh:
        r = client.post(f"/cohorts/{second.pk}/upload/", {"files": fh},
                        HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert r.json()["ok"]
    up = second.uploads.get()
    assert uploads.run_upload(up.pk, up.rq_job_id) == "done"  # what the import job runs
    up.refresh_from_db()
    assert "2 of these patients are already in another of your cohorts" in up.message
    assert "FAKE" not in up.message and "MRN" not in up.message
    page = client.get(f"/cohorts/{second.pk}/").content.decode()
    assert page.count("</a> here is <a") == 2


def test_subject_status_reports_stages_and_a_changing_signature(client, site):
    from django.utils import timezone

    from surveys.models import StageRun

    c, s = site["cohort"], site["subjects"][0]
    client.force_login(site["owner"])
    page = client.get(f"/cohorts/{c.pk}/subjects/{s.pseudonym}/").content.decode()
    url = f"/cohorts/{c.pk}/subjects/{s.pseudonym}/status.json"
    assert f'data-status-url="{url}"' in page and 'id="viewer"' in page and 'id="viewer3d"' in page
    first = client.get(url).json()
    assert [x["stage"] for x in first["stages"]] == ["import", "deidentify", "surfaces",
                                                     "embeddings"]
    assert first["settled"] and f'data-signature="{first["signature"]}"' in page
    StageRun.objects.filter(subject=s, stage="surfaces").update(status="running", progress=0.4)
    mid = client.get(url).json()
    assert not mid["settled"] and mid["signature"] != first["signature"]
    assert [x["progress"] for x in mid["stages"] if x["stage"] == "surfaces"] == [0.4]
    StageRun.objects.filter(subject=s, stage="surfaces").update(
        status="done", progress=1.0, finished=timezone.now())
    assert client.get(url).json()["signature"] != mid["signature"]


# ------------------------------------------------------------------ raters


def test_balanced_views_are_the_same_in_both_conditions():
    from surveys.studies.design import plan_trials

    views = ["yaw+0", "yaw+30"]
    totals: dict[str, Counter] = {"control": Counter(), "deidentified": Counter()}
    for rater in range(12):
        plan = plan_trials(list(range(20)), ["control", "deidentified"], views, n_choices=4,
                           trials_per_rater=8, n_practice=1, n_catch=2, seed=99,
                           rater_index=rater, design="between", view_assignment="balanced")
        per = {"control": Counter(), "deidentified": Counter()}
        for t in plan:
            if t.kind == "main":
                assert t.target_view != t.candidate_view
                per[t.condition][(t.target_view, t.candidate_view)] += 1
            elif t.kind == "catch":
                assert t.target_view == t.candidate_view
        assert per["control"] == per["deidentified"], (rater, per)  # 4 + 4 trials each
        for c in per:
            totals[c].update(per[c])
    assert totals["control"] == totals["deidentified"]
    assert set(totals["control"].values()) == {24}  # every pair equally often
    # the random (legacy) assignment is unchanged by the new option
    a = plan_trials(list(range(20)), ["control", "deidentified"], views, n_choices=4,
                    trials_per_rater=8, n_practice=1, n_catch=2, seed=99, rater_index=3,
                    design="between")
    b = plan_trials(list(range(20)), ["control", "deidentified"], views, n_choices=4,
                    trials_per_rater=8, n_practice=1, n_catch=2, seed=99, rater_index=3,
                    design="between", view_assignment="random")
    assert a == b
    # subjects and conditions do not depend on the view assignment
    c = plan_trials(list(range(20)), ["control", "deidentified"], views, n_choices=4,
                    trials_per_rater=8, n_practice=1, n_catch=2, seed=99, rater_index=3,
                    design="between", view_assignment="balanced")
    assert [(t.subject, t.condition, t.kind) for t in a] == \
        [(t.subject, t.condition, t.kind) for t in c]


def test_enlarged_images_are_recorded_and_exported(client, db, settings, tmp_path):
    from surveys.models import Answer, Invitation
    from tests.factories.studies import make_render_cohort, make_researcher, make_study

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user, n_practice=0, n_catch=0)
    assert study.view_assignment == "balanced"
    inv = Invitation.objects.create(study=study, group="general")
    client.post(f"/take/i/{inv.token}/")
    client.post("/take/consent/", {"agree": "yes"})
    client.post("/take/about-you/", {"profession": "not a healthcare professional",
                                     "familiarity": "never"})
    client.post("/take/instructions/")
    sent = ["0,2", "3,3,9,-1,x", ""]
    for raw in sent:
        r = client.get("/take/trial/")
        html = r.content.decode()
        assert 'id="zoom-dialog"' in html and 'id="zoom-2"' in html and 'name="enlarged"' in html
        client.post("/take/trial/", {"trial": r.context["trial"].token, "choice": 1,
                                     "rt_ms": "900", "enlarged": raw})
    got = [a.enlarged for a in Answer.objects.order_by("trial__position")]
    assert got == [[0, 2], [3], []]
    client.force_login(user)
    rows = list(csv.DictReader(io.StringIO(client.get(
        f"/studies/{study.pk}/export/responses.csv").content.decode())))
    assert [r["enlarged"] for r in rows[:3]] == ["0;2", "3", ""]
    import json

    plan = json.loads(study.__class__.objects.get(pk=study.pk).prereg_json)
    assert "view_assignment" in plan["design"]


def test_rater_images_are_large(settings):
    from surveys.processing.stages import human_render_settings

    rs = human_render_settings()
    assert rs.width_px == rs.height_px == settings.RENDER_SIZE_PX == 768
    assert rs.yfov_deg > 18.0
    assert np.isfinite(rs.camera_distance)


def test_thumbnail_cache_goes_with_its_image(client, site):
    from surveys.processing import viewer

    c = site["cohort"]
    img = site["subjects"][0].images.get(kind="qa")
    client.force_login(site["owner"])
    assert client.get(f"/cohorts/{c.pk}/images/{img.pk}/thumb.png").status_code == 200
    assert list(viewer.thumb_dir(c.pk).glob(f"{img.pk}-*.png"))
    site["subjects"][0].delete()
    assert not list(viewer.thumb_dir(c.pk).glob(f"{img.pk}-*.png"))
