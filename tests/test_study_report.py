"""Researcher side: study creation/freeze, report page, CSV/JSON/PDF exports against the DB,
compatibility with ``analyze_responses``, and ``check --deploy`` with production settings."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from pipeline.stats import analyze, wilson_ci
from tests.factories.studies import make_render_cohort, make_researcher, make_study, run_rater

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def done_study(tmp_path, settings):
    """A study with 2 raters per group; general always right, surgeons right on control only."""
    from surveys.models import Invitation

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user, ask_confidence=True)
    inv_g = Invitation.objects.create(study=study, group="general")
    inv_p = Invitation.objects.create(study=study, group="plastic surgeon")
    for _ in range(2):
        run_rater(Client(), inv_g.token, answer=lambda t: t.correct_index + 1, confidence=4)
    for _ in range(2):
        run_rater(Client(), inv_p.token, confidence=2,
                  answer=lambda t: t.correct_index + 1 if t.condition == "control"
                  else (t.correct_index + 1) % 4 + 1)
    c = Client()
    c.force_login(user)
    return {"study": study, "client": c, "user": user, "cohort": cohort}


def db_rows(study):
    from surveys.models import Answer

    return list(Answer.objects.filter(trial__rater__study=study, trial__kind="main")
                .select_related("trial__rater", "trial__subject"))


def test_responses_csv_matches_db_and_analyze_responses(done_study, tmp_path):
    study, c = done_study["study"], done_study["client"]
    r = c.get(f"/studies/{study.pk}/export/responses.csv")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.content.decode())))
    answers = db_rows(study)
    assert len(rows) == len(answers) == 4 * 8
    by_key = {(a.trial.rater.code, a.trial.subject.pseudonym, a.trial.condition): a
              for a in answers}
    for row in rows:
        a = by_key[(row["rater_id"], row["subject_id"], row["condition"])]
        assert row["rater_group"] == a.trial.rater.group
        assert int(row["correct"]) == int(a.correct) and int(row["n_choices"]) == 4
        assert int(row["confidence"]) == a.confidence
        assert float(row["response_time_ms"]) == pytest.approx(a.client_rt_ms)
        assert row["rater_id"].startswith("R-") and row["subject_id"].startswith("SUBJ-")
    # known answers: general always right; surgeons right on control only
    for row in rows:
        expect = row["rater_group"] == "general" or row["condition"] == "control"
        assert int(row["correct"]) == int(expect)
    # the CSV feeds analyze_responses unchanged, with the web analysis' figures
    path = tmp_path / "r.csv"
    path.write_bytes(r.content)
    out = io.StringIO()
    call_command("analyze_responses", str(path), "--format", "json", stdout=out)
    cmd = json.loads(out.getvalue())
    doc = json.loads(c.get(f"/studies/{study.pk}/export/analysis.json").content)
    web = doc["analysis_all_raters"]
    strip = {g: {k: v for k, v in m.items() if k != "note"} for g, m in web["mcnemar"].items()}
    assert cmd["groups"] == web["groups"]
    assert {g: {k: v for k, v in m.items() if k != "note"} for g, m in cmd["mcnemar"].items()} \
        == strip
    # between-rater design: no rater answered a subject in both conditions → no McNemar
    assert all(m["n_pairs"] == 0 and "between-rater design" in m["note"]
               for m in web["mcnemar"].values())
    # the surgeons fail their catch trial (steered wrong): the pre-registered rule (pass at
    # least 50 %) excludes them, and the primary analysis is the one without them
    assert doc["primary_analysis"] == "excluded"
    assert {e["rater_id"] for e in doc["excluded_raters"]} == \
        {r["rater_id"] for r in rows if r["rater_group"] == "plastic surgeon"}
    kept = tmp_path / "kept.csv"
    kept.write_text("".join(line for n, line in enumerate(
        r.content.decode().splitlines(keepends=True)) if n == 0 or ",plastic surgeon," not in line))
    out = io.StringIO()
    call_command("analyze_responses", str(kept), "--format", "json", stdout=out)
    assert json.loads(out.getvalue())["groups"] == doc["analysis"]["groups"] == \
        doc["analysis_without_excluded"]["groups"]
    assert set(doc["analysis"]["groups"]) == {"general", "all"}
    assert all(row["rater_excluded"] == str(int(row["rater_group"] == "plastic surgeon"))
               for row in rows)
    # independent check of one cell
    gen = [a for a in answers if a.trial.rater.group == "plastic surgeon"
           and a.trial.condition == "deidentified"]
    cell = web["groups"]["plastic surgeon"]["deidentified"]
    assert cell["n"] == len(gen) and cell["n_correct"] == 0
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(wilson_ci(0, len(gen)))
    assert web["groups"]["general"]["control"]["accuracy"] == 1.0


def test_all_answers_export_has_practice_and_catch(done_study):
    study, c = done_study["study"], done_study["client"]
    rows = list(csv.DictReader(io.StringIO(
        c.get(f"/studies/{study.pk}/export/all-answers.csv").content.decode())))
    conds = {r["condition"] for r in rows}
    assert len(rows) == 4 * 10 and "catch" in conds
    # attention table: general raters pass their catch trial, surgeons (steered wrong on every
    # non-control trial) fail it and are flagged; counts match the export
    r = c.get(f"/studies/{study.pk}/report/")
    att = {a["rater_id"]: a for a in r.context["attention"]}
    for rid in {row["rater_id"] for row in rows}:
        catch = [row for row in rows if row["rater_id"] == rid and row["condition"] == "catch"]
        assert att[rid]["catch_n"] == len(catch) == 1
        assert att[rid]["catch_correct"] == sum(int(x["correct"]) for x in catch)
        assert att[rid]["flag"] == (att[rid]["rater_group"] == "plastic surgeon")
    doc = json.loads(c.get(f"/studies/{study.pk}/export/analysis.json").content)
    assert len(doc["attention"]) == 4


def test_report_page_and_plots(done_study):
    study, c = done_study["study"], done_study["client"]
    r = c.get(f"/studies/{study.pk}/report/")
    assert r.status_code == 200
    html = r.content.decode()
    assert 'id="accuracy"' in html and 'id="tests"' in html and 'id="difficulty"' in html
    assert "exact McNemar" in html and "Fleiss" in html
    every = [dict(rater_id=a.trial.rater.code, rater_group=a.trial.rater.group,
                  subject_id=a.trial.subject.pseudonym, condition=a.trial.condition,
                  correct=a.correct, n_choices=4) for a in db_rows(study)]
    # primary analysis = without the excluded raters (the surgeons fail their catch trial);
    # the sensitivity analysis has everybody
    kept = analyze([x for x in every if x["rater_group"] == "general"], mixed_model=False)
    analysis = analyze(every, mixed_model=False)
    for cell in r.context["cells"]:
        ref = kept["groups"][cell["group"]][cell["condition"]]
        assert (cell["n"], cell["n_correct"]) == (ref["n"], ref["n_correct"])
    for cell in r.context["other_cells"]:
        ref = analysis["groups"][cell["group"]][cell["condition"]]
        assert (cell["n"], cell["n_correct"]) == (ref["n"], ref["n_correct"])
    assert "Primary analysis: without excluded raters (primary, pre-registered)" in html
    assert "Sensitivity analysis: all raters (sensitivity analysis)" in html
    assert study.refresh_from_db() or study.prereg_hash in html
    prog = {p["group"]: p for p in r.context["progress"]}
    assert prog["general"]["raters"] == 2 and prog["general"]["finished"] == 2
    assert prog["plastic surgeon"]["excluded"] == 2 and prog["general"]["excluded"] == 0
    assert prog["plastic surgeon"]["answered"] == prog["plastic surgeon"]["planned"] == 20
    for name in ("accuracy", "rt"):
        p = c.get(f"/studies/{study.pk}/plots/{name}.png")
        assert p.status_code == 200 and p.content[:4] == b"\x89PNG"
    assert c.get(f"/studies/{study.pk}/plots/other.png").status_code == 404
    diff = r.context["difficulty"]
    assert sum(d["n"] for d in diff) == 16  # the primary analysis' answers (2 raters x 8)
    assert diff == sorted(diff, key=lambda d: (d["accuracy"], d["subject_id"], d["condition"]))


def test_practice_subjects_reported_and_excluded(done_study):
    """The study page, report, analysis JSON and PDF text name the subjects reserved for
    practice; they appear in practice trials only and nowhere in the analysed answers."""
    from surveys.models import Subject, Trial
    from surveys.studies.report import practice_note

    study, c = done_study["study"], done_study["client"]
    study.refresh_from_db()
    reserved = sorted(Subject.objects.filter(pk__in=study.practice_subjects)
                      .values_list("pseudonym", flat=True))
    assert len(reserved) == 4
    practice_shown = set()
    for t in Trial.objects.filter(rater__study=study, kind="practice"):
        practice_shown |= {t.subject_id, *t.candidates}
    assert practice_shown == set(study.practice_subjects)  # all 4 are candidates every time
    for t in Trial.objects.filter(rater__study=study).exclude(kind="practice"):
        assert not {t.subject_id, *t.candidates} & set(study.practice_subjects)
    listed = ", ".join(reserved)
    detail = c.get(f"/studies/{study.pk}/").content.decode()
    assert f"reserved when the first rater started): {listed}." in detail
    report = c.get(f"/studies/{study.pk}/report/")
    html = report.content.decode()
    assert f"Subjects reserved for practice: {listed}." in html and "excluded from the analysis" \
        in html
    csv_subjects = {row["subject_id"] for row in csv.DictReader(io.StringIO(
        c.get(f"/studies/{study.pk}/export/responses.csv").content.decode()))}
    assert csv_subjects and not csv_subjects & set(reserved)
    assert not {d["subject_id"] for d in report.context["difficulty"]} & set(reserved)
    doc = json.loads(c.get(f"/studies/{study.pk}/export/analysis.json").content)
    assert doc["study"]["practice_subjects"] == reserved
    assert doc["study"]["practice_subjects_reserved"] is True
    assert doc["study"]["practice_excluded_from_analysis"] is True
    assert listed in practice_note(study) and "excluded from the analysis" in practice_note(study)


def test_practice_subjects_previewed_before_the_first_rater(tmp_path, settings):
    from surveys.studies.design import reserve_practice_subjects
    from surveys.studies.report import practice_note

    settings.DATA_DIR = tmp_path / "data"
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user)
    study = make_study(cohort, user)
    ids = reserve_practice_subjects(cohort.subjects.values_list("pk", flat=True), 4, 1,
                                    study.seed)
    names = ", ".join(sorted(cohort.subjects.filter(pk__in=ids)
                             .values_list("pseudonym", flat=True)))
    c = Client()
    c.force_login(user)
    page = c.get(f"/studies/{study.pk}/").content.decode()
    assert f"reserved from the seed when the first rater starts; currently): {names}." in page
    assert "not yet reserved" in practice_note(study) and names in practice_note(study)
    study.n_practice = 0
    study.save()
    assert "No practice trials" in c.get(f"/studies/{study.pk}/").content.decode()
    assert practice_note(study).startswith("No subject reserved for practice")


def test_pdf_report(done_study):
    study, c = done_study["study"], done_study["client"]
    r = c.get(f"/studies/{study.pk}/export/report.pdf")
    assert r.status_code == 200 and r.content[:5] == b"%PDF-"
    assert r.content.count(b"/Type /Page\n") + r.content.count(b"/Type /Page ") >= 1
    assert r["Content-Disposition"].startswith("attachment")


def test_create_edit_freeze_and_invite(tmp_path, settings):
    from surveys.models import Invitation, Study

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user, n_subjects=4)
    c = Client()
    c.force_login(user)
    form = {"name": "My study", "cohort": cohort.pk, "n_choices": 4,
            "conditions": ["control", "deidentified"], "views": "yaw+0, yaw+30",
            "trials_per_rater": 8, "n_practice": 0, "n_catch": 0, "design": "within",
            "primary_analysis": "excluded", "exclusion_min_catch": "0.5",
            "groups": "general, plastic surgeon, dentist", "lay_groups": "general",
            "consent_text": "Consent text X"}
    # impossible design: 9 trials > 4 subjects x 2 conditions
    r = c.post("/studies/", {**form, "trials_per_rater": 9})
    assert r.status_code == 200 and b"at most 8 trials" in r.content
    # practice would reserve 4 of the 4 subjects: refused with what to change
    r = c.post("/studies/", {**form, "n_practice": 1})
    assert r.status_code == 200
    assert b"need at least 8 subjects with renders (4 reserved for practice" in r.content
    assert b"set practice trials to 0 or add subjects" in r.content
    assert not Study.objects.exists()
    r = c.post("/studies/", form)
    study = Study.objects.get()
    assert r["Location"] == f"/studies/{study.pk}/"
    assert study.groups == ["general", "plastic surgeon", "dentist"] and study.seed is not None
    assert c.get(f"/studies/{study.pk}/edit/").status_code == 200
    # the edit form refuses practice on this cohort the same way, and changes nothing
    r = c.post(f"/studies/{study.pk}/edit/", {**form, "n_practice": 2})
    assert r.status_code == 200 and b"set practice trials to 0 or add subjects" in r.content
    study.refresh_from_db()
    assert study.n_practice == 0
    c.post(f"/studies/{study.pk}/edit/", {**form, "n_choices": 3, "seed": 5})
    study.refresh_from_db()
    assert study.n_choices == 3 and study.seed == 5
    c.post(f"/studies/{study.pk}/invite/", {"group": "dentist", "max_uses": 2,
                                            "expires_at": "2099-01-01 00:00"})
    assert not Invitation.objects.exists()  # more than a year ahead: refused
    soon = (timezone.now() + timedelta(days=7)).strftime("%Y-%m-%d %H:%M")
    c.post(f"/studies/{study.pk}/invite/", {"group": "dentist", "max_uses": 2,
                                            "expires_at": soon})
    inv = Invitation.objects.get()
    assert inv.group == "dentist" and inv.max_uses == 2 and len(inv.token) >= 32
    page = c.get(f"/studies/{study.pk}/").content.decode()
    assert f"/take/i/{inv.token}/" in page
    run_rater(Client(), inv.token)
    study.refresh_from_db()
    assert study.frozen
    r = c.post(f"/studies/{study.pk}/edit/", {**form, "n_choices": 2})
    study.refresh_from_db()
    assert study.n_choices == 3 and r.status_code == 302
    # consent text shown to raters
    rc = Client()
    rc.post(f"/take/i/{inv.token}/")
    assert b"Consent text X" in rc.get("/take/consent/").content


def test_form_defaults_fit_the_demo_cohort(tmp_path, settings):
    """The new-study form's defaults (k = 4, 8 trials, 2 practice, 2 catch) are a valid design
    on the demo's 12 subjects with 4 of them reserved for practice, and raters can start."""
    from surveys.models import Invitation, Study, Trial
    from surveys.studies.forms import StudyForm

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user, n_subjects=12)
    blank = StudyForm()
    data = {name: blank.get_initial_for_field(field, name)
            for name, field in blank.fields.items()}
    data = {k: v for k, v in data.items() if v not in (None, False, "")}
    data.update(name="Demo", cohort=cohort.pk)
    c = Client()
    c.force_login(user)
    r = c.post("/studies/", data)
    assert r.status_code == 302, r.context["form"].errors
    study = Study.objects.get()
    assert (study.n_choices, study.trials_per_rater, study.n_practice, study.n_catch) == \
        (4, 8, 2, 2)
    assert (study.design, study.lay_groups, study.exclusion_min_catch,
            study.primary_analysis) == ("between", ["general"], 0.5, "excluded")
    inv = Invitation.objects.create(study=study, group="general")
    for _ in range(2):
        run_rater(Client(), inv.token)
    study.refresh_from_db()
    assert len(study.practice_subjects) == 4
    kinds = [t.kind for t in Trial.objects.filter(rater__study=study)]
    assert kinds.count("practice") == 4 and kinds.count("main") == 16


def test_check_deploy_clean_with_production_settings(tmp_path):
    env = dict(os.environ, DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_DEBUG="0",
               DEIDSTUDY_SECRET_KEY="k" * 20 + "Q9!zR#p2%Lw8&yT5^mN1*bV4(cX7)jH3-" + "a1b2c3d4",
               DEIDSTUDY_PROJECT_SECRET="p" * 8 + "Zr4-Lq9_Wx2-Tn7_Hs5-Kd3_Mb8-Fv1_Gy6",
               DEIDSTUDY_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="deidstudy.settings")
    r = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level",
                        "WARNING"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no issues" in r.stdout


def test_empty_study_pages(tmp_path, settings):
    """A study without answers: every researcher page and export works and says so."""
    from surveys.models import Invitation

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = make_researcher()
    cohort = make_render_cohort(settings.DATA_DIR, user, n_subjects=4)
    study = make_study(cohort, user, trials_per_rater=4)
    Invitation.objects.create(study=study, group="general")
    c = Client()
    c.force_login(user)
    for url in ("/studies/", f"/studies/{study.pk}/", f"/studies/{study.pk}/report/"):
        r = c.get(url)
        assert r.status_code == 200, url
    # 4 subjects cannot hold k = 4 plus 4 reserved for practice: the study page says so
    page = c.get(f"/studies/{study.pk}/").content.decode()
    assert 'id="design-problem"' in page and "set practice trials to 0 or add subjects" in page
    assert b"No answers yet" in c.get(f"/studies/{study.pk}/report/").content
    csv_text = c.get(f"/studies/{study.pk}/export/responses.csv").content.decode()
    assert csv_text.strip().split(",")[:6] == ["rater_id", "rater_group", "subject_id",
                                               "condition", "correct", "n_choices"]
    assert json.loads(c.get(f"/studies/{study.pk}/export/analysis.json").content)["analysis"] \
        is None
    assert c.get(f"/studies/{study.pk}/export/report.pdf").content[:5] == b"%PDF-"
    for name in ("accuracy", "rt"):
        assert c.get(f"/studies/{study.pk}/plots/{name}.png").content[:4] == b"\x89PNG"
