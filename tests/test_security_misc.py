"""Crashes and leaks (issue 11, item 7; the zip parts are in test_security_zip.py):

* an invitation code with ``/`` (or any character a token cannot hold) is a clear page,
  not a 500; a pasted invitation link works;
* the ``next`` field of a stage retry only leads to a page of this site;
* a rater's answer that cannot be stored as sent (no face, a choice out of range or not a
  number, ``confidence=abc``) is refused with a message, never dropped or stored as NULL.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from surveys.models import Answer, Cohort, StageRun, Subject
from tests.factories.studies import make_render_cohort, make_researcher, make_study
from tests.test_study_rater import start

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("code", ["abc/def", "../../etc", "a?b=c", "x" * 65, "ä", "%2F"])
def test_invalid_invitation_codes_get_a_clear_page(client, code):
    client.raise_request_exception = False
    r = client.post("/take/start/", {"code": code})
    assert r.status_code == 400
    assert b"not a valid invitation code" in r.content and b'name="code"' in r.content


def test_pasted_invitation_links_and_codes_work(client, settings, tmp_path):
    from surveys.models import Invitation

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    study = make_study(make_render_cohort(settings.DATA_DIR, user), user)
    inv = Invitation.objects.create(study=study, group="general")
    for typed in (inv.token, f"  {inv.token[:10]} {inv.token[10:]} ",
                  f"https://study.example.org/take/i/{inv.token}/",
                  f"http://127.0.0.1:8000/take/i/{inv.token}/?x=1"):
        r = client.post("/take/start/", {"code": typed})
        assert r.status_code == 302 and r["Location"] == f"/take/i/{inv.token}/", typed
    r = client.post("/take/start/", {"code": "unknown-but-well-formed"})
    assert r.status_code == 302 and client.get(r["Location"]).status_code == 404


@pytest.fixture()
def retry_world(settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    user = User.objects.create_user("r", password="pw")
    user.groups.add(Group.objects.create(name="researcher"))
    cohort = Cohort.objects.create(name="c", owner=user)
    cohort.researchers.add(user)
    subject = Subject.objects.create(cohort=cohort, pseudonym="SUBJ-0001", patient_key="k")
    run = StageRun.objects.create(subject=subject, stage="surfaces", status="failed", order=2)
    return user, cohort, run


@pytest.mark.parametrize("target", [
    "https://evil.example/phish", "//evil.example/phish", "/\\evil.example", "\\\\evil.example",
    "http:/evil.example", "javascript:alert(1)", " https://evil.example",
])
def test_stage_retry_never_redirects_off_site(client, retry_world, monkeypatch, target):
    from surveys.processing import jobs

    user, cohort, run = retry_world
    monkeypatch.setattr(jobs, "retry_stage", lambda run, queue=None: None)
    client.force_login(user)
    r = client.post(f"/cohorts/{cohort.pk}/stages/{run.pk}/retry/", {"next": target})
    assert r.status_code == 302 and r["Location"] == f"/cohorts/{cohort.pk}/", target


def test_stage_retry_follows_a_local_next(client, retry_world, monkeypatch):
    from surveys.processing import jobs

    user, cohort, run = retry_world
    monkeypatch.setattr(jobs, "retry_stage", lambda run, queue=None: None)
    client.force_login(user)
    here = f"/cohorts/{cohort.pk}/subjects/SUBJ-0001/"
    r = client.post(f"/cohorts/{cohort.pk}/stages/{run.pk}/retry/", {"next": here})
    assert r.status_code == 302 and r["Location"] == here


@pytest.fixture()
def rater_world(settings, tmp_path):
    from surveys.models import Invitation

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user, ask_confidence=True)
    limited = make_study(cohort, user, name="T", ask_confidence=True, time_limit_s=30)
    return {"inv": Invitation.objects.create(study=study, group="general"),
            "limited": Invitation.objects.create(study=limited, group="general")}


def current(client: Client):
    r = client.get("/take/trial/")
    assert r.status_code == 200
    return r.context["trial"]


@pytest.mark.parametrize("fields,message", [
    ({"choice": "abc", "confidence": "3"}, "not one of the faces"),
    ({"choice": "9", "confidence": "3"}, "not one of the faces"),
    ({"choice": "0", "confidence": "3"}, "not one of the faces"),
    ({"choice": "1.5", "confidence": "3"}, "not one of the faces"),
    ({"confidence": "3"}, "Please choose one of the faces"),
    ({"choice": "2", "confidence": "abc"}, "number from 1 to 5"),
    ({"choice": "2", "confidence": "6"}, "number from 1 to 5"),
    ({"choice": "2"}, "how sure you are"),
])
def test_invalid_answers_are_refused_and_said(rater_world, fields, message):
    c = Client()
    rater = start(c, rater_world["inv"].token)
    trial = current(c)
    r = c.post("/take/trial/", {"trial": trial.token, "rt_ms": "400", **fields})
    assert r.status_code == 400
    assert message in r.content.decode() and b'id="answer-error"' in r.content
    assert r.context["trial"].pk == trial.pk  # the same trial, answered again
    assert not Answer.objects.filter(trial__rater=rater).exists()
    # a valid answer to it is then stored, with its confidence
    r = c.post("/take/trial/", {"trial": trial.token, "rt_ms": "400", "choice": "2",
                                "confidence": "4"})
    assert r.status_code == 302
    a = Answer.objects.get(trial=trial)
    assert (a.choice, a.confidence) == (2, 4)


def test_a_stale_invalid_post_changes_nothing(rater_world):
    c = Client()
    rater = start(c, rater_world["inv"].token)
    first = current(c)
    c.post("/take/trial/", {"trial": first.token, "choice": "1", "confidence": "5", "rt_ms": "300"})
    # the back button re-posts the answered trial with garbage: no error page, no change
    r = c.post("/take/trial/", {"trial": first.token, "choice": "abc", "confidence": "x"})
    assert r.status_code == 302
    assert Answer.objects.filter(trial__rater=rater).count() == 1
    assert Answer.objects.get(trial=first).confidence == 5


def test_time_ran_out_answers_are_still_accepted(rater_world):
    c = Client()
    rater = start(c, rater_world["limited"].token)
    trial = current(c)
    assert c.post("/take/trial/", {"trial": trial.token, "rt_ms": "30000"}).status_code == 302
    a = Answer.objects.get(trial=trial)
    assert a.choice is None and a.timed_out and a.confidence is None
    # chosen but no confidence before the time ran out: kept without confidence
    trial = current(c)
    assert c.post("/take/trial/", {"trial": trial.token, "choice": "3",
                                   "rt_ms": "29000"}).status_code == 302
    assert Answer.objects.get(trial=trial).confidence is None
    # but garbage is refused there too
    trial = current(c)
    r = c.post("/take/trial/", {"trial": trial.token, "choice": "3", "confidence": "abc"})
    assert r.status_code == 400
    assert Answer.objects.filter(trial__rater=rater).count() == 2
