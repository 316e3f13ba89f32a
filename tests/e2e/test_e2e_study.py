"""End-to-end in Debian's Chromium: two raters of two groups complete a blinded study
(keyboard and mouse), one closes the browser halfway, the server is killed and restarted,
and the rater resumes with the personal link;
unusable invitations get a clear page; the report and the CSV match the database."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest

from tests.e2e.procs import free_port, start_platform, wait_in_page
from tests.e2e.test_e2e_cohort import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.postgres,  # its worker or server processes use the announced database
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian chromium not installed at /usr/bin/chromium"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]

SETUP = """
import json, datetime
from django.conf import settings
from django.contrib.auth.models import User
from django.utils import timezone
from surveys.models import Invitation
from tests.factories.studies import make_render_cohort, make_study
u = User.objects.get(username="alice")
cohort = make_render_cohort(settings.DATA_DIR, u, n_subjects=10)  # 4 reserved for practice
study = make_study(cohort, u, trials_per_rater=6, n_practice=1, n_catch=1, ask_confidence=True)
g = Invitation.objects.create(study=study, group="general")
p = Invitation.objects.create(study=study, group="plastic surgeon", max_uses=1)
e = Invitation.objects.create(study=study, group="general",
                              expires_at=timezone.now() - datetime.timedelta(hours=1))
print(json.dumps({"study": study.pk, "general": g.token, "surgeon": p.token, "expired": e.token}))
"""


@pytest.fixture()
def site(tmp_path):
    plat = start_platform(tmp_path / "var", researcher=("alice", "e2e-pass-42"))
    try:
        port = free_port()
        server = plat.start_server(port)
        yield plat, f"http://127.0.0.1:{port}", port, server
    finally:
        plat.stop()


def _intro(page, base: str, token: str, group: str, years: int) -> None:
    page.goto(f"{base}/take/i/{token}/")
    page.click("#start")
    page.click("#agree")
    page.select_option("select[name=profession]", group if group != "general"
                       else "not a healthcare professional")
    if page.locator("input[name=years_experience]").count():
        page.fill("input[name=years_experience]", str(years))
    else:  # the public is asked how often they see medical images instead
        page.check("input[name=familiarity][value=rarely]")
    page.click("#questionnaire button[type=submit]")
    page.click("#begin")


def _answer(page, mode: str, choice: int, confidence: int) -> str:
    """Answer what is on screen; returns 'trial', 'feedback' or 'done'."""
    page.wait_for_selector("#trial-form, #feedback, #thanks")
    if page.locator("#thanks").count():
        return "done"
    if page.locator("#feedback").count():
        if mode == "keyboard":
            page.keyboard.press("Enter")
        else:
            page.click("#continue")
        page.wait_for_selector("#trial-form, #thanks")
        return "feedback"
    page.wait_for_selector("body[data-ready='1']")
    widths = page.eval_on_selector_all("#stage img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 5 and all(w > 0 for w in widths), widths
    with page.expect_navigation():
        if mode == "keyboard":
            page.keyboard.press(str(choice))
            page.keyboard.press(str(confidence))
        else:
            page.click(f"#cand-{choice}")
            page.click(f"#confidence input[value='{confidence}']")
    return "trial"


def test_two_raters_resume_report_csv(site, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    plat, base, port, server = site
    expect.set_options(timeout=30_000)
    info = json.loads(plat.manage("shell", "-c", SETUP).stdout.strip().splitlines()[-1])
    sid = info["study"]
    n_per_rater = 1 + 6 + 1

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # rater 1, general, keyboard only
            ctx = browser.new_context()
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            _intro(page, base, info["general"], "general", 4)
            answered = 0
            while True:
                state = _answer(page, "keyboard", 1 + answered % 4, 4)
                if state == "done":
                    break
                answered += state == "trial"
            assert answered == n_per_rater
            expect(page.locator("#thanks")).to_be_visible()
            ctx.close()

            # rater 2, plastic surgeon, mouse; closes the browser halfway and resumes
            ctx = browser.new_context()
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            _intro(page, base, info["surgeon"], "plastic surgeon", 15)
            resume = page.locator("#resume-link").input_value()
            assert resume.startswith(f"{base}/take/r/")
            answered = 0
            while answered < 4:
                answered += _answer(page, "mouse", 2, 3) == "trial"
            assert "/take/" in page.url and "SUBJ" not in page.content()
            ctx.close()
            stored = plat.query("SELECT COUNT(*) FROM surveys_answer a JOIN surveys_trial t ON "
                                "t.id = a.trial_id JOIN surveys_rater r ON r.id = t.rater_id "
                                "WHERE r.\"group\" = 'plastic surgeon'")[0][0]
            assert stored == 4
            # the server is killed (SIGKILL) and restarted mid-study: nothing is lost
            plat.kill_group(server)
            plat.start_server(port)

            ctx = browser.new_context()
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{base}/take/")
            expect(page.locator("input[name=code]")).to_be_visible()  # no session: code page
            # the (single-use) invitation is exhausted now
            page.goto(f"{base}/take/i/{info['surgeon']}/")
            expect(page.locator("#problem-title")).to_contain_text("used up")
            page.goto(resume)
            while True:
                state = _answer(page, "mouse", 2, 3)
                if state == "done":
                    break
                answered += state == "trial"
            assert answered == n_per_rater
            ctx.close()
            # invalid and expired links get a clear page (new browser, no rater session)
            ctx = browser.new_context()
            page = ctx.new_page()
            page.goto(f"{base}/take/i/not-a-real-token/")
            expect(page.locator("#problem-title")).to_contain_text("not valid")
            page.goto(f"{base}/take/i/{info['expired']}/")
            expect(page.locator("#problem-title")).to_contain_text("expired")
            ctx.close()

            # researcher: report and CSV
            ctx = browser.new_context(accept_downloads=True)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            # not signed in: a 403 page whose sign-in link comes back to the report
            resp = page.goto(f"{base}/studies/{sid}/report/")
            assert resp is not None and resp.status == 403
            page.click("a:has-text('Sign in')")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "e2e-pass-42")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_contain_text("Report")
            expect(page.locator("#n-answers")).to_contain_text("12 answers")
            for grp in ("general", "plastic surgeon"):
                row = page.locator(f"#progress tr[data-group='{grp}']")
                expect(row.locator(".finished")).to_have_text("1")
            wait_in_page(page, "[...document.querySelectorAll('main img')].every("
                               "i => i.complete && i.naturalWidth > 0)")
            widths = page.eval_on_selector_all("main img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) == 2 and all(w > 0 for w in widths)
            report_cells = {(tr.get_attribute("data-group"), tr.get_attribute("data-condition")):
                            (int(tr.locator(".n").inner_text()), int(tr.locator(".k").inner_text()))
                            for tr in page.locator("#accuracy tbody tr").all()}
            with page.expect_download() as dl:
                page.click("#dl-csv")
            path = tmp_path / "responses.csv"
            dl.value.save_as(path)
            ctx.close()
        finally:
            browser.close()

    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    db = plat.query(
        "SELECT r.code, r.\"group\", s.pseudonym, t.condition, a.correct, a.choice, "
        "a.confidence FROM surveys_answer a JOIN surveys_trial t ON t.id = a.trial_id "
        "JOIN surveys_rater r ON r.id = t.rater_id JOIN surveys_subject s ON s.id = t.subject_id "
        "WHERE t.kind = 'main' ORDER BY r.\"index\", t.position")
    assert [(r["rater_id"], r["rater_group"], r["subject_id"], r["condition"], int(r["correct"]),
             int(r["choice"]), int(r["confidence"])) for r in rows] == \
        [(a, b, c, d, int(e), f, g) for a, b, c, d, e, f, g in db]
    assert {r["rater_group"] for r in rows} == {"general", "plastic surgeon"}
    assert {int(r["confidence"]) for r in rows if r["rater_group"] == "general"} == {4}
    assert all(float(r["response_time_ms"]) > 0 and r["rt_suspect"] == "0" for r in rows)
    # the report's primary analysis leaves out the raters excluded by the pre-registered rule
    for (grp, cond), (n, k) in report_cells.items():
        sel = [r for r in rows if cond == r["condition"] and grp in ("all", r["rater_group"])
               and r["rater_excluded"] == "0"]
        assert (n, k) == (len(sel), sum(int(r["correct"]) for r in sel)), (grp, cond)
    for log in plat.var_dir.glob("*.log"):
        assert "SUBJ-" not in log.read_text(), log.name
