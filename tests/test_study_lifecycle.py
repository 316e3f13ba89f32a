"""Running a study: locked groups and questionnaires, consent funnel, closing, revoking,
exclusion rule and researcher exclusions, reset, preview, panels (Prolific ids, completion,
duplicates), pre-registration hash, power estimate, form labels and copy buttons."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile

import pytest
from django.test import Client

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
    study = make_study(cohort, user, n_catch=2)
    inv = Invitation.objects.create(study=study, group="general")
    inv_p = Invitation.objects.create(study=study, group="plastic surgeon")
    res = Client()
    res.force_login(user)
    return {"user": user, "cohort": cohort, "study": study, "inv": inv, "inv_p": inv_p,
            "res": res}


def enrol(client, token, **get):
    from surveys.models import Rater
    from surveys.studies.rater_views import SESSION_KEY

    if get:
        r = client.get(f"/take/i/{token}/", get)
        assert r.status_code == 302 and r["Location"] == f"/take/i/{token}/"  # ids dropped
    r = client.post(f"/take/i/{token}/")
    assert r.status_code == 302, r.status_code
    return Rater.objects.get(resume_token=client.session[SESSION_KEY])


# ------------------------------------------------------------------ groups and questionnaire


def test_group_is_locked_and_questionnaire_fits_the_group(world):
    c = Client()
    rater = enrol(c, world["inv"].token)
    c.post("/take/consent/", {"agree": "yes"})
    page = c.get("/take/about-you/").content.decode()
    # the public is not asked about professional experience, and cannot pick a group
    assert "years_experience" not in page and 'name="group"' not in page
    assert "How often do you look at medical images" in page
    c.post("/take/about-you/", {"profession": "plastic surgeon", "familiarity": "rarely"})
    rater.refresh_from_db()
    assert rater.group == "general" and rater.group_mismatch
    # a surgeon is asked years of experience as a surgeon
    c2 = Client()
    enrol(c2, world["inv_p"].token)
    c2.post("/take/consent/", {"agree": "yes"})
    page = c2.get("/take/about-you/").content.decode()
    assert "Years of experience as plastic surgeon" in page and "familiarity" not in page
    r = c2.post("/take/about-you/", {"profession": "plastic surgeon"})
    assert r.status_code == 200  # years required for professionals
    c2.post("/take/about-you/", {"profession": "plastic surgeon", "years_experience": 9})
    p = world["study"].raters.get(group="plastic surgeon")
    assert p.years_experience == 9 and not p.group_mismatch
    # the mismatch reaches the report, the CSV and the JSON
    for cl, answer in ((c, lambda t: t.correct_index + 1), (c2, lambda t: 1)):
        cl.post("/take/instructions/")
        while True:
            resp = cl.get("/take/trial/")
            if resp.status_code == 302:
                break
            t = resp.context["trial"]
            cl.post("/take/trial/", {"trial": t.token, "choice": answer(t), "rt_ms": "700"})
    res, sid = world["res"], world["study"].pk
    html = res.get(f"/studies/{sid}/report/").content.decode()
    assert 'id="mismatches"' in html and f'data-rater="{rater.code}"' in html
    rows = list(csv.DictReader(io.StringIO(
        res.get(f"/studies/{sid}/export/responses.csv").content.decode())))
    mine = [r for r in rows if r["rater_id"] == rater.code]
    assert mine and all(r["rater_group"] == "general" and r["group_mismatch"] == "1"
                        and r["self_reported_profession"] == "plastic surgeon" for r in mine)
    assert all(r["group_mismatch"] == "0" for r in rows if r["rater_id"] != rater.code)
    doc = json.loads(res.get(f"/studies/{sid}/export/design.json").content)
    assert [r["rater_id"] for r in doc["raters"] if r["group_mismatch"]] == [rater.code]
    prog = {p["group"]: p for p in doc["progress"]}
    assert prog["general"]["mismatch"] == 1 and prog["plastic surgeon"]["mismatch"] == 0


def test_funnel_counts_declined_and_stopped_separately(world):
    from surveys.models import Rater

    study = world["study"]
    declined = Client()
    enrol(declined, world["inv"].token)
    r = declined.post("/take/consent/", {"agree": "no"})
    assert r["Location"].endswith("/take/declined/")
    assert b"You chose not to take part" in declined.get("/take/declined/").content
    assert declined.get("/take/trial/")["Location"].endswith("/take/declined/")
    at_questionnaire = Client()
    enrol(at_questionnaire, world["inv"].token)
    at_questionnaire.post("/take/consent/", {"agree": "yes"})
    stopped = Client()
    rs = enrol(stopped, world["inv"].token)
    stopped.post("/take/consent/", {"agree": "yes"})
    stopped.post("/take/about-you/", questionnaire_answers(rs))
    stopped.post("/take/instructions/")
    t = stopped.get("/take/trial/").context["trial"]
    stopped.post("/take/trial/", {"trial": t.token, "choice": 1, "rt_ms": "800"})
    run_rater(Client(), world["inv"].token)
    # only raters who start the trials get a plan (decliners take no counterbalancing slot)
    assert [r.group_index for r in Rater.objects.filter(study=study).order_by("index")] == \
        [None, None, 0, 1]
    from surveys.studies.participation import progress

    g = {p["group"]: p for p in progress(study)}["general"]
    assert (g["enrolled"], g["consented"], g["declined"], g["started"], g["finished"],
            g["stopped"]) == (4, 3, 1, 2, 1, 1)
    assert g["planned"] == 2 * study.n_screens and g["answered"] == 1 + study.n_screens
    page = world["res"].get(f"/studies/{study.pk}/").content.decode()
    assert '<td class="declined">1</td>' in page and '<td class="stopped">1</td>' in page


def test_welcome_page_counts_every_screen(world):
    study = world["study"]
    page = Client().get(f"/take/i/{world['inv'].token}/").content.decode()
    assert study.n_screens == 1 + 8 + 2
    assert "<b>11 screens</b>: 1 practice screen with feedback, then 10 screens" in page
    # and the rater really gets that many
    run_rater(Client(), world["inv"].token)
    assert study.raters.get().trials.count() == 11


# ------------------------------------------------------------------ closing, revoking


def test_closed_study_refuses_new_raters_trial_starts_and_answers(world):
    from surveys.models import Answer

    study, res = world["study"], world["res"]
    started = Client()
    rater = enrol(started, world["inv"].token)
    started.post("/take/consent/", {"agree": "yes"})
    started.post("/take/about-you/", questionnaire_answers(rater))
    started.post("/take/instructions/")
    t = started.get("/take/trial/").context["trial"]
    before = Client()
    rb = enrol(before, world["inv_p"].token)
    before.post("/take/consent/", {"agree": "yes"})
    before.post("/take/about-you/", questionnaire_answers(rb))
    assert res.post(f"/studies/{study.pk}/do/close/").status_code == 302
    study.refresh_from_db()
    assert study.closed
    r = started.post("/take/trial/", {"trial": t.token, "choice": 1, "rt_ms": "900"})
    assert r.status_code == 410 and b"This study is closed" in r.content
    assert not Answer.objects.exists()
    assert started.get("/take/trial/").status_code == 410
    r = before.post("/take/instructions/")  # cannot start the trials either
    assert r.status_code == 410 and not rb.trials.exists()
    r = Client().get(f"/take/i/{world['inv'].token}/")
    assert r.status_code == 410 and b"closed" in r.content
    # the service refuses too (not only the view)
    from surveys.studies.service import StudyClosed, record_answer

    with pytest.raises(StudyClosed):
        record_answer(rater, t.token, 1, 900.0, None)
    res.post(f"/studies/{study.pk}/do/reopen/")
    r = started.post("/take/trial/", {"trial": t.token, "choice": 1, "rt_ms": "900"})
    assert r.status_code == 302 and Answer.objects.count() == 1


def test_revoked_invitation(world):
    inv, res, study = world["inv"], world["res"], world["study"]
    c = Client()
    rater = enrol(c, inv.token)
    res.post(f"/studies/{study.pk}/invitations/{inv.pk}/revoke/")
    inv.refresh_from_db()
    assert inv.revoked_at is not None
    r = Client().get(f"/take/i/{inv.token}/")
    assert r.status_code == 410 and b"withdrawn" in r.content
    # a rater who had already started carries on
    c.post("/take/consent/", {"agree": "yes"})
    c.post("/take/about-you/", questionnaire_answers(rater))
    assert c.post("/take/instructions/")["Location"].endswith("/take/trial/")
    assert "revoked" in res.get(f"/studies/{study.pk}/").content.decode()


def test_invitation_form_defaults_to_expiry_and_use_limit(world):
    from surveys.models import Invitation

    res, study = world["res"], world["study"]
    page = res.get(f"/studies/{study.pk}/").content.decode()
    assert 'name="expires_at"' in page and 'name="max_uses" value="30"' in page
    assert "Maximum number of raters" in page and "Copy link" in page and "Copy code" in page
    r = res.post(f"/studies/{study.pk}/invite/", {"group": "general"})  # no expiry/limit
    assert r.status_code == 302
    assert Invitation.objects.filter(study=study).count() == 2  # refused
    from surveys.studies.forms import InvitationForm

    form = InvitationForm(groups=["general"])
    data = {"group": "general", "expires_at": form.fields["expires_at"].initial,
            "max_uses": form.fields["max_uses"].initial}
    res.post(f"/studies/{study.pk}/invite/", data)
    inv = Invitation.objects.filter(study=study).order_by("-pk").first()
    assert inv.max_uses == 30 and inv.expires_at is not None


def test_study_form_labels_are_words(world):
    page = world["res"].get("/studies/").content.decode()
    for label in ("Number of choices", "Scored trials per rater", "Practice trials (with "
                  "feedback)", "Attention-check (catch) trials", "Time limit per trial "
                  "(seconds)", "Groups of the general public", "Primary analysis",
                  "Exclude raters passing fewer than this fraction of catch trials"):
        assert label in page, label
    assert "N choices" not in page and "Time limit s" not in page


# ------------------------------------------------------------------ exclusions


def test_exclusion_rule_and_researcher_exclusion(world):
    study, res = world["study"], world["res"]
    good = run_rater(Client(), world["inv"].token, answer=lambda t: t.correct_index + 1)
    # fails both catch trials, right on every scored trial
    careless = run_rater(Client(), world["inv"].token,
                         answer=lambda t: (t.correct_index + 1) % 4 + 1 if t.kind == "catch"
                         else t.correct_index + 1)
    # passes 1 of 2 catch trials: kept by the 50 % rule
    seen = []

    def half(t):
        if t.kind == "catch":
            seen.append(t)
            return t.correct_index + 1 if len(seen) == 1 else (t.correct_index + 1) % 4 + 1
        return 1

    half_rater = run_rater(Client(), world["inv_p"].token, answer=half)
    doc = json.loads(res.get(f"/studies/{study.pk}/export/analysis.json").content)
    assert [e["rater_id"] for e in doc["excluded_raters"]] == [careless.code]
    assert doc["analysis"]["meta"]["n_raters"] == 2
    assert doc["analysis_all_raters"]["meta"]["n_raters"] == 3
    assert doc["analysis"]["groups"]["general"]["control"]["n_raters"] == 1
    # researcher excludes the half rater by hand, with a reason; not pre-registered
    r = res.post(f"/studies/{study.pk}/raters/{half_rater.code}/exclude/", {"reason": ""})
    assert r.status_code == 302
    half_rater.refresh_from_db()
    assert half_rater.excluded_at is None  # a reason is required
    res.post(f"/studies/{study.pk}/raters/{half_rater.code}/exclude/",
             {"reason": "reported a broken screen"})
    doc = json.loads(res.get(f"/studies/{study.pk}/export/analysis.json").content)
    ex = {e["rater_id"]: e for e in doc["excluded_raters"]}
    assert set(ex) == {careless.code, half_rater.code}
    assert ex[half_rater.code]["manual"] and not ex[half_rater.code]["rule"]
    assert "not pre-registered" in ex[half_rater.code]["reasons"][0]
    html = res.get(f"/studies/{study.pk}/report/").content.decode()
    assert "reported a broken screen" in html and "researcher (not pre-registered)" in html
    res.post(f"/studies/{study.pk}/raters/{half_rater.code}/include/")
    doc = json.loads(res.get(f"/studies/{study.pk}/export/analysis.json").content)
    assert [e["rater_id"] for e in doc["excluded_raters"]] == [careless.code]
    assert good.code not in html.split('id="exclusions"')[1].split("</table>")[0]
    # primary = all raters when declared so (sensitivity = without exclusions)
    from surveys.models import Study

    Study.objects.filter(pk=study.pk).update(primary_analysis="all")
    doc = json.loads(res.get(f"/studies/{study.pk}/export/analysis.json").content)
    assert doc["analysis"]["meta"]["n_raters"] == 3


def test_reset_rater(world):
    study, res = world["study"], world["res"]
    c = Client()
    rater = run_rater(c, world["inv"].token)
    slot = rater.group_index
    res.post(f"/studies/{study.pk}/raters/{rater.code}/reset/")
    rater.refresh_from_db()
    assert rater.step == "instructions" and rater.finished is None and rater.reset_count == 1
    assert not rater.trials.filter(answer__isnull=False).exists()
    assert c.get("/take/")["Location"].endswith("/take/instructions/")
    c.post("/take/instructions/")
    rater.refresh_from_db()
    assert rater.step == "trials" and rater.group_index == slot


# ------------------------------------------------------------------ preview


def test_preview_walks_the_rater_pages_and_counts_nowhere(world):
    from surveys.models import Rater

    study, res = world["study"], world["res"]
    r = res.post(f"/studies/{study.pk}/do/preview/", {"group": "plastic surgeon"})
    assert r["Location"] == "/take/"
    page = res.get("/take/consent/").content.decode()
    assert 'id="preview-banner"' in page
    res.post("/take/consent/", {"agree": "yes"})
    res.post("/take/about-you/", {"profession": "plastic surgeon", "years_experience": 3})
    res.post("/take/instructions/")
    n = 0
    while True:
        resp = res.get("/take/trial/")
        if resp.status_code == 302:
            break
        t = resp.context["trial"]
        res.post("/take/trial/", {"trial": t.token, "choice": 1, "rt_ms": "600"})
        n += 1
    assert n == study.n_screens
    assert "End of the preview" in res.get("/take/thanks/").content.decode()
    study.refresh_from_db()
    assert not study.frozen and not study.prereg_hash  # a preview freezes nothing
    preview = Rater.objects.get(study=study, is_preview=True)
    assert preview.index is None and preview.group_index is None
    doc = json.loads(res.get(f"/studies/{study.pk}/export/analysis.json").content)
    assert doc["analysis"] is None and doc["progress_total"]["enrolled"] == 0
    assert res.get(f"/studies/{study.pk}/export/responses.csv").content.decode().count("\n") == 1
    # the next real rater gets slot 0 and index 0
    real = run_rater(Client(), world["inv_p"].token)
    assert (real.index, real.group_index, real.code) == (0, 0, "R-0001")


# ------------------------------------------------------------------ panels


def test_panel_ids_completion_and_duplicates(world):
    from surveys.models import Rater, Study

    study, res = world["study"], world["res"]
    Study.objects.filter(pk=study.pk).update(
        panel_completion_url="https://panel.example/complete?cc=ABC123",
        panel_completion_code="ABC123")
    pid = "5f1e2d3c4b5a69788796a5b4"
    c = Client()
    rater = enrol(c, world["inv"].token, PROLIFIC_PID=pid, STUDY_ID="st1", SESSION_ID="se1")
    assert (rater.panel_pid, rater.panel_study_id, rater.panel_session_id) == (pid, "st1", "se1")
    # the completion address appears nowhere before the last answer is stored
    c.post("/take/consent/", {"agree": "yes"})
    c.post("/take/about-you/", questionnaire_answers(rater))
    c.post("/take/instructions/")
    while True:
        resp = c.get("/take/trial/")
        if resp.status_code == 302:
            break
        assert b"ABC123" not in resp.content and b"panel.example" not in resp.content
        assert c.get("/take/thanks/")["Location"].endswith("/take/trial/")
        t = resp.context["trial"]
        c.post("/take/trial/", {"trial": t.token, "choice": 1, "rt_ms": "600"})
    done = c.get("/take/thanks/").content.decode()
    assert 'content="3;url=https://panel.example/complete?cc=ABC123"' in done
    assert 'id="completion-code">ABC123<' in done
    # the same panel id again (another browser): refused
    r = Client().get(f"/take/i/{world['inv_p'].token}/", {"PROLIFIC_PID": pid})
    c2 = Client()
    c2.get(f"/take/i/{world['inv_p'].token}/", {"PROLIFIC_PID": pid})
    r = c2.post(f"/take/i/{world['inv_p'].token}/")
    assert r.status_code == 409 and b"already taken part" in r.content
    assert Rater.objects.filter(study=study).count() == 1
    # invalid ids are ignored, a rater without panel id gets no redirect
    c3 = Client()
    r3 = enrol(c3, world["inv"].token)
    assert r3.panel_pid == ""
    c4 = Client()
    c4.get(f"/take/i/{world['inv'].token}/", {"PROLIFIC_PID": "<script>"})
    assert "study_panel" not in c4.session
    plain = run_rater(Client(), world["inv_p"].token)
    assert plain.panel_pid == ""
    # the panel export (for payments) links codes and panel ids; analysis exports do not
    panel = res.get(f"/studies/{study.pk}/export/panel.csv").content.decode()
    assert pid in panel and rater.code in panel
    for url in ("responses.csv", "all-answers.csv", "analysis.json", "design.json"):
        assert pid not in res.get(f"/studies/{study.pk}/export/{url}").content.decode(), url


# ------------------------------------------------------------------ pre-registration


def test_preregistration_hash_is_frozen_verifiable_and_printed(world):
    from surveys.models import Study

    study, res = world["study"], world["res"]
    assert "not frozen yet" in res.get(f"/studies/{study.pk}/").content.decode()
    res.post(f"/studies/{study.pk}/do/freeze/")
    study.refresh_from_db()
    assert study.frozen and len(study.prereg_hash) == 64
    assert hashlib.sha256(study.prereg_json.encode()).hexdigest() == study.prereg_hash
    plan = json.loads(study.prereg_json)
    assert plan["exclusion_rule"]["min_catch_fraction"] == 0.5
    assert plan["analysis"]["primary"]["population"] == "excluded"
    assert plan["design"]["design"] == "between"
    assert len(plan["subjects"]["practice"]) == 4 and len(plan["subjects"]["scored"]) == 8
    assert all(s.startswith("SUBJ-") for s in plan["subjects"]["scored"])
    run_rater(Client(), world["inv"].token)
    study.refresh_from_db()
    h = study.prereg_hash
    # printed on every report page and export
    for url in ("", "report/"):
        assert h in res.get(f"/studies/{study.pk}/{url}").content.decode(), url
    for url in ("responses.csv", "all-answers.csv"):
        rows = list(csv.DictReader(io.StringIO(
            res.get(f"/studies/{study.pk}/export/{url}").content.decode())))
        assert rows and {r["design_sha256"] for r in rows} == {h}
    assert json.loads(res.get(f"/studies/{study.pk}/export/analysis.json").content)[
        "preregistration_sha256"] == h
    z = zipfile.ZipFile(io.BytesIO(res.get(f"/studies/{study.pk}/export/dataset.zip").content))
    design = json.loads(z.read(f"study-{study.pk}/design.json"))
    canon = json.dumps(design["preregistration"], sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False)
    assert hashlib.sha256(canon.encode()).hexdigest() == design["preregistration_sha256"] == h
    assert h in z.read(f"study-{study.pk}/README.txt").decode()
    dictionary = list(csv.DictReader(io.StringIO(
        z.read(f"study-{study.pk}/data_dictionary.csv").decode())))
    header = z.read(f"study-{study.pk}/responses_long.csv").decode().splitlines()[0].split(",")
    assert [d["column"] for d in dictionary] == header
    assert all(d["type"] and d["meaning"] and d["units"] for d in dictionary)
    # a changed plan does not verify; the design cannot be edited any more
    from surveys.studies.prereg import verify

    assert verify(study.prereg_json, h)
    plan["exclusion_rule"]["min_catch_fraction"] = 0.0
    assert not verify(plan, h)
    res.post(f"/studies/{study.pk}/edit/", {"name": "x"})
    assert Study.objects.get(pk=study.pk).prereg_hash == h


# ------------------------------------------------------------------ power


def test_power_estimate_small_simulation(world, settings):
    from surveys.studies.power import request_estimate, simulate_power

    study = world["study"]
    pe = request_estimate(study, {"n_sim": 6, "n_sim_search": 4, "raters_per_group": 6,
                                  "max_seconds": 60}, run_now=True)
    assert pe.status == "done", pe.error
    a = pe.result["at_planned"]
    assert a["n_sim"] == 6 and a["raters_per_group"] == 6
    assert set(a["ci_half_width"]) == {f"{g} / {c}" for g in study.groups
                                       for c in study.conditions}
    assert all(0 < v < 0.5 for v in a["ci_half_width"].values())
    assert 0 <= a["power_condition"] <= 1 and 0 <= a["power_group"] <= 1
    assert pe.result["raters_needed"]["group"]["tried"]
    page = world["res"].get(f"/studies/{study.pk}/").content.decode()
    assert 'id="power-table"' in page and "raters per group" in page
    # the simulation detects a large effect and not a null one (seeded, small n_sim)
    from surveys.studies.power import design_of

    d = design_of(study)
    big = simulate_power(d, {"p_control": 0.95, "p_deidentified": 0.3, "group_difference": 0.0},
                         raters_per_group=8, n_sim=8)
    null = simulate_power(d, {"p_control": 0.6, "p_deidentified": 0.6, "group_difference": 0.0},
                          raters_per_group=8, n_sim=8)
    assert big["power_condition"] >= 0.75 and null["power_condition"] <= 0.4
    # precision: more raters → narrower intervals
    wide = simulate_power(d, raters_per_group=4, n_sim=3)
    narrow = simulate_power(d, raters_per_group=16, n_sim=3)
    assert all(narrow["ci_half_width"][k] < wide["ci_half_width"][k]
               for k in wide["ci_half_width"])


def test_power_is_queued_at_creation_and_reports_a_dead_queue(world, settings):
    """Creating a study queues a power estimate; without Redis the page says what to run."""
    from surveys.models import PowerEstimate

    settings.RQ_QUEUES = {k: {**v, "URL": "redis://127.0.0.1:1/0"}
                          for k, v in settings.RQ_QUEUES.items()}
    res = world["res"]
    form = {"name": "P", "cohort": world["cohort"].pk, "n_choices": 4,
            "conditions": ["control", "deidentified"], "views": "yaw+0, yaw+30",
            "design": "between", "trials_per_rater": 6, "n_practice": 1, "n_catch": 1,
            "groups": "general, plastic surgeon", "lay_groups": "general",
            "exclusion_min_catch": "0.5", "primary_analysis": "excluded",
            "consent_text": "c"}
    r = res.post("/studies/", form)
    assert r.status_code == 302, r.context["form"].errors if r.context else r
    from django.db import connection  # run the on_commit hook of the test transaction

    for _, hook, _robust in list(connection.run_on_commit):
        hook()
    pe = PowerEstimate.objects.order_by("-pk").first()
    assert pe is not None and pe.params["design"]["trials_per_rater"] == 6
    assert pe.status == "failed" and "manage.py study_power" in pe.error


def test_trial_start_with_a_broken_design_is_a_clear_page(world):
    """A subject reserved for practice lost its renders after the freeze: starting the trials
    says the study is not ready (no server error, nothing planned)."""
    from surveys.models import RenderImage

    study = world["study"]
    c = Client()
    rater = enrol(c, world["inv"].token)
    c.post("/take/consent/", {"agree": "yes"})
    c.post("/take/about-you/", questionnaire_answers(rater))
    study.refresh_from_db()
    RenderImage.objects.filter(subject_id=study.practice_subjects[0]).update(kind="hidden")
    r = c.post("/take/instructions/")
    assert r.status_code == 503 and b"not ready" in r.content
    assert not rater.trials.exists()
