"""Rater flow: blinding of pages/URLs/images/headers, permissions, idempotent answers,
invitations (invalid / expired / exhausted), resume, time limits."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from PIL import Image

from tests.factories.studies import (
    make_render_cohort,
    make_researcher,
    make_study,
    questionnaire_answers,
    run_rater,
)

pytestmark = pytest.mark.django_db


@pytest.fixture()
def world(tmp_path, settings):
    from surveys.models import Invitation

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user)
    inv = Invitation.objects.create(study=study, group="general")
    inv2 = Invitation.objects.create(study=study, group="plastic surgeon")
    return {"user": user, "cohort": cohort, "study": study, "inv": inv, "inv2": inv2}


def start(client: Client, token: str):
    from surveys.models import Rater
    from surveys.studies.rater_views import SESSION_KEY

    assert client.post(f"/take/i/{token}/").status_code == 302
    rater = Rater.objects.get(resume_token=client.session[SESSION_KEY])
    client.post("/take/consent/", {"agree": "yes"})
    client.post("/take/about-you/", questionnaire_answers(rater, years=2))
    client.post("/take/instructions/")
    rater.refresh_from_db()
    assert rater.step == "trials"
    return rater


def secrets_of(world) -> list[str]:
    """Strings that must never reach a rater: pseudonyms, condition names, paths, ids."""
    words = ["SUBJ-", "deidentified", "control", "deid", "original", "render-", "yaw", "cohorts/",
             "catch", "correct"]
    return words


def strip_tokens(text: str, rater) -> str:
    """``text`` without the rater's random tokens (trial, image, resume) and the form's random
    CSRF token (64 letters and digits: it holds a word such as "yaw" now and then)."""
    from surveys.models import TrialImage

    text = re.sub(r'(name="csrfmiddlewaretoken" value=")[^"]*"', r'\1TOKEN"', text)

    toks = [rater.resume_token] + list(rater.trials.values_list("token", flat=True)) + list(
        TrialImage.objects.filter(trial__rater=rater).values_list("token", flat=True))
    for t in toks:
        text = text.replace(t, "TOKEN")
    return text


def scan(text: str, forbidden: list[str]) -> list[str]:
    low = text.lower()
    return [w for w in forbidden if w.lower() in low]


def test_full_flow_and_blinding(world):
    from surveys.models import Answer

    c = Client()
    r = c.get(f"/take/i/{world['inv'].token}/")
    assert r.status_code == 200 and b"Start" in r.content
    rater = start(c, world["inv"].token)
    forbidden = secrets_of(world)
    seen_pages = 0
    while True:
        r = c.get("/take/trial/")
        if r.status_code == 302:
            break
        html = r.content.decode()
        trial = r.context["trial"]
        # progress bar: practice (1 trial) not counted; 8 main + 1 catch
        assert r.context["n_total"] == 9
        assert r.context["n_done"] == max(0, seen_pages - 1) == \
            Answer.objects.filter(trial__rater=rater).exclude(trial__kind="practice").count()
        # no identifier, condition, path or answer in the page, its URLs or headers
        # (random tokens are removed first: they could contain a word by chance)
        body = strip_tokens(html, rater)
        assert not scan(body, forbidden), scan(body, forbidden)
        for v in dict(r.items()).values():
            assert not scan(strip_tokens(v, rater), forbidden)
        img_urls = re.findall(r'src="(/take/img/[^"]+)"', html)
        assert len(img_urls) == 5
        for u in img_urls:
            assert not scan(strip_tokens(u, rater), forbidden)
            ir = c.get(u)
            assert ir.status_code == 200 and ir["Content-Type"] == "image/png"
            assert "Content-Disposition" not in ir and "no-store" in ir["Cache-Control"]
            data = ir.content
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            for chunk in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"):
                assert chunk not in data
            assert not any(w in data for w in (b"SUBJ-", b"subject", b"original", b"variant"))
            with Image.open(io.BytesIO(data)) as im:
                assert not im.info.get("subject") and not getattr(im, "text", {})
        # the right answer is not in the page: the candidate order in HTML is 1..k only
        assert re.findall(r'name="choice" value="(\d)"', html) == ["1", "2", "3", "4"]
        c.post("/take/trial/", {"trial": trial.token, "choice": trial.correct_index + 1,
                                "rt_ms": "300"})
        seen_pages += 1
    assert seen_pages == 10
    rater.refresh_from_db()
    assert rater.step == "done" and rater.finished is not None
    assert Answer.objects.filter(trial__rater=rater).count() == 10
    assert all(a.correct for a in Answer.objects.filter(trial__rater=rater))
    assert c.get("/take/thanks/").status_code == 200


def test_image_of_another_trial_or_rater_is_refused(world):
    from surveys.models import TrialImage

    a, b = Client(), Client()
    ra = start(a, world["inv"].token)
    rb = start(b, world["inv2"].token)
    cur_a = ra.trials.order_by("position").first()
    own = TrialImage.objects.filter(trial=cur_a).first()
    later = TrialImage.objects.filter(trial__rater=ra, trial__position=3).first()
    other = TrialImage.objects.filter(trial__rater=rb).first()
    assert a.get(f"/take/img/{own.token}").status_code == 200
    assert a.get(f"/take/img/{later.token}").status_code == 404  # not the current trial
    assert a.get(f"/take/img/{other.token}").status_code == 404  # another rater's
    assert Client().get(f"/take/img/{own.token}").status_code == 404  # no session
    assert a.get("/take/img/" + "A" * 32).status_code == 404
    # once answered, the trial's images are gone for good
    a.post("/take/trial/", {"trial": cur_a.token, "choice": 1, "rt_ms": "100"})
    assert a.get(f"/take/img/{own.token}").status_code == 404
    # another rater's trial cannot be answered
    other_trial = rb.trials.order_by("position").first()
    b_before = other_trial.__class__.objects.get(pk=other_trial.pk)
    a.post("/take/trial/", {"trial": other_trial.token, "choice": 1, "rt_ms": "100"})
    assert not hasattr(b_before, "answer") or b_before.answer is None


def test_rater_cannot_reach_researcher_pages(world):
    c = Client()
    start(c, world["inv"].token)
    sid = world["study"].pk
    cid = world["cohort"].pk
    img = world["cohort"].subjects.first().images.first()
    for url in [f"/studies/{sid}/", f"/studies/{sid}/report/", "/studies/",
                f"/cohorts/{cid}/"]:
        r = c.get(url)
        # 403 with a sign-in link back to the page, never the page itself
        assert r.status_code == 403, url
        assert f'href="/accounts/login/?next={url.replace("/", "%2F")}"' in r.content.decode(), url
    for url in [f"/studies/{sid}/export/responses.csv", f"/studies/{sid}/export/all-answers.csv",
                f"/studies/{sid}/export/analysis.json", f"/studies/{sid}/export/report.pdf",
                f"/studies/{sid}/plots/accuracy.png", f"/cohorts/{cid}/images/{img.pk}.png"]:
        assert c.get(url).status_code == 403, url
    # another researcher (not of this cohort) gets 404
    other = make_researcher("eve")
    c2 = Client()
    c2.force_login(other)
    assert c2.get(f"/studies/{sid}/").status_code == 404
    assert c2.get(f"/studies/{sid}/export/responses.csv").status_code == 404


def test_answers_are_idempotent(world):
    from surveys.models import Answer

    c = Client()
    rater = start(c, world["inv"].token)
    t0 = rater.trials.order_by("position")[0]  # practice
    c.get("/take/trial/")
    c.post("/take/trial/", {"trial": t0.token, "choice": t0.correct_index + 1, "rt_ms": "200"})
    a0 = Answer.objects.get(trial=t0)
    # replay / double submit / back button with a different choice: nothing changes
    wrong = (t0.correct_index + 1) % 4 + 1
    for _ in range(3):
        r = c.post("/take/trial/", {"trial": t0.token, "choice": wrong, "rt_ms": "50"})
        assert r.status_code == 302
    assert Answer.objects.filter(trial=t0).count() == 1
    a0b = Answer.objects.get(trial=t0)
    assert (a0b.choice, a0b.correct, a0b.client_rt_ms, a0b.answered_at) == \
        (a0.choice, a0.correct, a0.client_rt_ms, a0.answered_at)
    # practice feedback names the right candidate, only for the own practice trial
    fb = c.get(f"/take/feedback/{t0.token}/")
    assert fb.status_code == 200 and fb.context["right"] == t0.correct_index + 1
    t1 = rater.trials.order_by("position")[1]
    assert c.get(f"/take/feedback/{t1.token}/").status_code == 404
    # answering a future trial is refused
    t3 = rater.trials.order_by("position")[3]
    c.post("/take/trial/", {"trial": t3.token, "choice": 1, "rt_ms": "50"})
    assert not Answer.objects.filter(trial=t3).exists()
    # bad choice values are refused
    c.get("/take/trial/")
    for bad in ["0", "5", "x", ""]:
        c.post("/take/trial/", {"trial": t1.token, "choice": bad, "rt_ms": "50"})
    # 0/5/x are out of range; "" (no answer) is refused without a time limit
    assert not Answer.objects.filter(trial=t1).exists()
    c.post("/take/trial/", {"trial": t1.token, "choice": "2", "rt_ms": "50"})
    assert Answer.objects.get(trial=t1).choice == 2


def test_server_time_checks_browser_time(world):
    from surveys.models import Answer, Trial

    c = Client()
    rater = start(c, world["inv"].token)
    c.get("/take/trial/")
    t0 = rater.trials.order_by("position")[0]
    Trial.objects.filter(pk=t0.pk).update(shown_at=timezone.now() - timedelta(seconds=2))
    c.post("/take/trial/", {"trial": t0.token, "choice": 1, "rt_ms": "60000"})  # impossible
    a = Answer.objects.get(trial=t0)
    assert a.rt_suspect and 1900 <= a.server_rt_ms <= 10_000
    c.get(f"/take/feedback/{t0.token}/")
    c.get("/take/trial/")
    t1 = rater.trials.order_by("position")[1]
    Trial.objects.filter(pk=t1.pk).update(shown_at=timezone.now() - timedelta(seconds=2))
    c.post("/take/trial/", {"trial": t1.token, "choice": 1, "rt_ms": "1500"})
    assert not Answer.objects.get(trial=t1).rt_suspect


def test_time_limit_enforced_on_server(world):
    from surveys.models import Answer, Trial

    study = world["study"]
    study.time_limit_s = 5
    study.save()
    c = Client()
    rater = start(c, world["inv"].token)
    r = c.get("/take/trial/")
    assert b'id="timer"' in r.content
    t0 = rater.trials.order_by("position")[0]
    Trial.objects.filter(pk=t0.pk).update(shown_at=timezone.now() - timedelta(seconds=60))
    c.post("/take/trial/", {"trial": t0.token, "choice": t0.correct_index + 1, "rt_ms": "900"})
    a = Answer.objects.get(trial=t0)
    assert a.timed_out and a.choice is None and not a.correct
    # the page submits an empty answer when time is up: stored as timed out
    c.get(f"/take/feedback/{t0.token}/")
    c.get("/take/trial/")
    t1 = rater.trials.order_by("position")[1]
    c.post("/take/trial/", {"trial": t1.token, "choice": "", "rt_ms": "5000"})
    a1 = Answer.objects.get(trial=t1)
    assert a1.timed_out and a1.choice is None and not a1.correct


def test_resume_after_browser_closed(world):
    from surveys.models import Answer

    c = Client()
    rater = start(c, world["inv"].token)
    for _ in range(4):
        r = c.get("/take/trial/")
        t = r.context["trial"]
        c.post("/take/trial/", {"trial": t.token, "choice": 1, "rt_ms": "100"})
    cur = c.get("/take/trial/").context["trial"]
    fresh = Client()  # a new browser: no cookie
    assert fresh.get("/take/trial/")["Location"].endswith("/take/start/")
    assert fresh.get(f"/take/r/{rater.resume_token}/").status_code == 302
    r = fresh.get("/take/trial/")
    assert r.context["trial"].pk == cur.pk
    assert Answer.objects.filter(trial__rater=rater).count() == 4
    assert fresh.get("/take/r/not-a-token/").status_code == 404
    # the invitation link again in the resumed browser continues, no second rater
    n = rater.study.raters.count()
    assert fresh.get(f"/take/i/{world['inv'].token}/")["Location"].endswith("/take/")
    assert rater.study.raters.count() == n


@pytest.mark.parametrize("case", ["invalid", "expired", "exhausted"])
def test_unusable_invitations_get_a_clear_page(world, case):
    from surveys.models import Invitation, Rater

    inv = world["inv"]
    token = inv.token
    if case == "invalid":
        # Flip the first character to a different one (a fixed "x" is the same
        # token whenever the real one happens to start with "x").
        token = ("y" if token[0] == "x" else "x") + token[1:]
        assert token != inv.token
    elif case == "expired":
        Invitation.objects.filter(pk=inv.pk).update(expires_at=timezone.now() - timedelta(1))
    else:
        Invitation.objects.filter(pk=inv.pk).update(max_uses=1)
        run_rater(Client(), inv.token)
    n = Rater.objects.count()
    c = Client()
    for r in (c.get(f"/take/i/{token}/"), c.post(f"/take/i/{token}/")):
        assert r.status_code in (404, 410)
        assert r.context["reason"] == case
        assert {"invalid": b"not valid", "expired": b"expired",
                "exhausted": b"used up"}[case] in r.content
    assert Rater.objects.count() == n


def test_code_entry_page(world):
    c = Client()
    r = c.post("/take/start/", {"code": f"  {world['inv'].token} "})
    assert r["Location"] == f"/take/i/{world['inv'].token}/"


def test_steps_cannot_be_skipped(world):
    from surveys.models import Rater
    from surveys.studies.rater_views import SESSION_KEY

    c = Client()
    c.post(f"/take/i/{world['inv'].token}/")
    rater = Rater.objects.get(resume_token=c.session[SESSION_KEY])
    assert c.get("/take/trial/")["Location"].endswith("/take/consent/")
    assert c.post("/take/instructions/")["Location"].endswith("/take/consent/")
    c.post("/take/consent/", {"agree": "yes"})
    r = c.post("/take/about-you/", {"profession": "hacker", "familiarity": "never"})
    assert r.status_code == 200  # an answer that is not offered is refused
    # the group comes from the (general) invitation: a rater who says "plastic surgeon"
    # stays in "general", the answer is kept separately and flagged as a mismatch
    c.post("/take/about-you/", {"group": "plastic surgeon", "profession": "plastic surgeon",
                                "familiarity": "weekly", "years_experience": 12})
    rater.refresh_from_db()
    assert rater.group == "general" and rater.self_reported_profession == "plastic surgeon"
    assert rater.group_mismatch and rater.years_experience is None
    assert rater.questionnaire == {"familiarity": "weekly"} and rater.step == "instructions"


def test_csrf_enforced(world):
    c = Client(enforce_csrf_checks=True)
    assert c.post(f"/take/i/{world['inv'].token}/").status_code == 403


def test_images_are_frozen_with_the_design(world, settings):
    """Re-running the pipeline (new render files) does not change a running study's images;
    the frozen copies are named without identifiers."""
    from pathlib import Path

    import numpy as np

    from surveys.models import TrialImage

    c = Client()
    rater = start(c, world["inv"].token)
    frozen = sorted((Path(settings.DATA_DIR) / "studies").rglob("*.png"))
    # 12 subjects (practice ones included) x 2 variants x 2 views, names carry no identifier
    assert len(frozen) == 48
    assert not any(scan(str(p.relative_to(settings.DATA_DIR)), ["SUBJ", "deid", "original",
                                                                 "yaw"]) for p in frozen)
    ti = TrialImage.objects.filter(trial__rater=rater, trial__position=0, slot=0) \
        .select_related("image").get()
    before = np.asarray(Image.open(io.BytesIO(c.get(f"/take/img/{ti.token}").content)))
    render = Path(settings.DATA_DIR) / ti.image.path
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(render)  # the pipeline re-ran
    after = np.asarray(Image.open(io.BytesIO(c.get(f"/take/img/{ti.token}").content)))
    assert before.any() and np.array_equal(before, after)
    # the pixels are those of the original render (independent decoding of the fixture)
    from tests.factories.studies import synthetic_png

    subj = ti.image.subject
    n = int(subj.pseudonym.split("-")[1]) - 1
    expect = np.asarray(Image.open(io.BytesIO(synthetic_png(n, ti.image.variant, ti.image.view,
                                                            subj.pseudonym))))
    assert np.array_equal(before, expect)
