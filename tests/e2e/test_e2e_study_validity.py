"""End-to-end in Debian's Chromium (real runserver, redis-server): what a journal reviewer
asks of the human study.

* a rater invited as "general" who says "plastic surgeon" in the questionnaire stays in
  "general" and is flagged as a mismatch (report page and CSV);
* the pre-registered exclusion rule removes a rater who fails the catch trials from the
  primary analysis (report page), not from the sensitivity analysis;
* a closed study refuses the answer of a rater who had already started (nothing stored);
* a recruitment-panel rater is sent to the completion URL only after the server stored the
  last answer (a lost last answer sends nobody anywhere);
* the trial page fits a 390 px phone screen with usable face sizes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest

from tests.e2e.procs import free_port, start_platform
from tests.e2e.test_e2e_cohort import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.postgres,  # its worker or server processes use the announced database
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian chromium not installed at /usr/bin/chromium"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]

PANEL_URL = "https://panel.example/submissions/complete?cc=C0DE42"

SETUP = """
import json
from django.conf import settings
from django.contrib.auth.models import User
from surveys.models import Invitation
from tests.factories.studies import make_render_cohort, make_study
u = User.objects.get(username="alice")
cohort = make_render_cohort(settings.DATA_DIR, u, n_subjects=12, name="C-%(name)s")
study = make_study(cohort, u, name="%(name)s", trials_per_rater=4, n_practice=1, n_catch=2,
                   panel_completion_url="%(panel)s", panel_completion_code="C0DE42")
g = Invitation.objects.create(study=study, group="general")
p = Invitation.objects.create(study=study, group="plastic surgeon")
print(json.dumps({"study": study.pk, "general": g.token, "surgeon": p.token}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    plat = start_platform(tmp_path_factory.mktemp("validity") / "var",
                          researcher=("alice", "e2e-pass-42"))
    try:
        port = free_port()
        plat.start_server(port)
        yield plat, f"http://127.0.0.1:{port}"
    finally:
        plat.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_study(plat, name: str) -> dict:
    out = plat.manage("shell", "-c", SETUP % {"name": name, "panel": PANEL_URL}).stdout
    return json.loads(out.strip().splitlines()[-1])


def page_of(browser, **kw):
    ctx = browser.new_context(**kw)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    return ctx, page


def researcher(browser, base: str):
    ctx, page = page_of(browser, accept_downloads=True)
    page.goto(f"{base}/accounts/login/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "e2e-pass-42")
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
    return ctx, page


def intro(page, base: str, token: str, profession: str, query: str = "") -> None:
    page.goto(f"{base}/take/i/{token}/{query}")
    page.click("#start")
    page.click("#agree")
    page.select_option("select[name=profession]", profession)
    if page.locator("input[name=years_experience]").count():
        page.fill("input[name=years_experience]", "7")
    else:
        page.check("input[name=familiarity][value=never]")
    page.click("#questionnaire button[type=submit]")
    page.click("#begin")


def trial_info(plat, page) -> tuple[str, int, str]:
    """(kind, 1-based right choice, token) of the trial on screen (server-side knowledge,
    read from the database by the test only)."""
    token = page.locator("input[name=trial]").input_value()
    kind, correct = plat.query("SELECT kind, correct_index FROM surveys_trial WHERE token = ?",
                               (token,))[0]
    return kind, correct + 1, token


def run_trials(plat, page, choose) -> int:
    """Answer every screen with ``choose(kind, right) -> choice``; returns trials answered."""
    n = 0
    while True:
        page.wait_for_selector("#trial-form, #feedback, #thanks")
        if page.locator("#thanks").count():
            return n
        if page.locator("#feedback").count():
            page.click("#continue")
            continue
        page.wait_for_selector("body[data-ready='1']")
        kind, right, _ = trial_info(plat, page)
        with page.expect_navigation():
            page.click(f"#cand-{choose(kind, right)}")
        n += 1


def test_locked_group_with_mismatching_questionnaire(site, browser, tmp_path):
    from playwright.sync_api import expect

    plat, base = site
    info = new_study(plat, "locked")
    ctx, page = page_of(browser)
    intro(page, base, info["general"], "plastic surgeon")
    assert run_trials(plat, page, lambda kind, right: right) == 1 + 4 + 2
    ctx.close()
    group, said = plat.query("SELECT \"group\", self_reported_profession FROM surveys_rater "
                             "WHERE study_id = ?", (info["study"],))[0]
    assert (group, said) == ("general", "plastic surgeon")
    ctx, page = researcher(browser, base)
    page.goto(f"{base}/studies/{info['study']}/report/")
    expect(page.locator("#progress tr[data-group='general'] .mismatch")).to_have_text("1")
    expect(page.locator("#progress tr[data-group='plastic surgeon'] .enrolled")).to_have_text("0")
    row = page.locator("#mismatches tr[data-rater='R-0001']")
    expect(row).to_contain_text("general")
    expect(row).to_contain_text("plastic surgeon")
    expect(page.locator("#accuracy tr[data-group='general'][data-condition='control']"))\
        .to_have_count(1)
    expect(page.locator("#accuracy tr[data-group='plastic surgeon']")).to_have_count(0)
    with page.expect_download() as dl:
        page.click("#dl-csv")
    path = tmp_path / "r.csv"
    dl.value.save_as(path)
    ctx.close()
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(rows) == 4
    assert {(r["rater_group"], r["self_reported_profession"], r["group_mismatch"])
            for r in rows} == {("general", "plastic surgeon", "1")}


def test_exclusion_rule_applied(site, browser):
    from playwright.sync_api import expect

    plat, base = site
    info = new_study(plat, "exclusion")
    # R-0001 attentive; R-0002 fails both catch trials (rule: pass at least 50 %)
    for choose in (lambda kind, right: right,
                   lambda kind, right: right % 4 + 1 if kind == "catch" else right):
        ctx, page = page_of(browser)
        intro(page, base, info["general"], "not a healthcare professional")
        run_trials(plat, page, choose)
        ctx.close()
    ctx, page = researcher(browser, base)
    page.goto(f"{base}/studies/{info['study']}/report/")
    expect(page.locator("#exclusions tr[data-rater='R-0002']")).to_contain_text(
        "passed 0 of 2 catch trials")
    expect(page.locator("#exclusions tr[data-rater='R-0001']")).to_have_count(0)
    expect(page.locator("#primary-title")).to_contain_text("without excluded raters (primary")
    expect(page.locator("#n-answers")).to_contain_text("8 answers to scored trials")
    expect(page.locator("#n-answers")).to_contain_text("4 in the primary analysis")
    pooled = page.locator("#accuracy tr[data-group='all'] .n")
    assert sum(int(x) for x in pooled.all_inner_texts()) == 4
    sens = page.locator("#accuracy-sensitivity tr[data-group='all'] .n")
    assert sum(int(x) for x in sens.all_inner_texts()) == 8
    # the study page shows the rater as excluded, with the reason
    page.goto(f"{base}/studies/{info['study']}/")
    expect(page.locator("#raters tr[data-rater='R-0002'] .rater-status")).to_contain_text(
        "excluded: passed 0 of 2 catch trials")
    copy = page.locator("#invitations button.copy").first
    copy.click()  # copy buttons on the invitation links
    expect(copy).to_have_text("Copied")
    expect(page.locator("#progress tr[data-group='general'] .excluded")).to_have_text("1")
    ctx.close()


def test_closed_study_refuses_an_answer(site, browser):
    from playwright.sync_api import expect

    plat, base = site
    info = new_study(plat, "closing")
    rctx, rater = page_of(browser)
    intro(rater, base, info["surgeon"], "plastic surgeon")
    rater.wait_for_selector("body[data-ready='1']")
    kind, right, token = trial_info(plat, rater)
    # the researcher closes the study while the rater looks at a trial
    ctx, page = researcher(browser, base)
    page.goto(f"{base}/studies/{info['study']}/")
    page.on("dialog", lambda d: d.accept())
    page.click("#close-study")
    expect(page.locator("#study-state")).to_contain_text("Closed")
    ctx.close()
    with rater.expect_navigation():
        rater.click(f"#cand-{right}")
    expect(rater.locator("#problem-title")).to_have_text("This study is closed")
    assert plat.query("SELECT COUNT(*) FROM surveys_answer a JOIN surveys_trial t ON "
                      "t.id = a.trial_id WHERE t.token = ?", (token,))[0][0] == 0
    # reloading does not bring the trial back, a new rater cannot start
    rater.goto(f"{base}/take/trial/")
    expect(rater.locator("#problem-title")).to_have_text("This study is closed")
    rctx.close()
    ctx, page = page_of(browser)
    page.goto(f"{base}/take/i/{info['general']}/")
    expect(page.locator("#problem-title")).to_have_text("This study is closed")
    ctx.close()


def test_panel_completion_redirect_only_after_the_save(site, browser):
    plat, base = site
    info = new_study(plat, "panel")
    pid = "60aa11bb22cc33dd44ee55ff"
    ctx, page = page_of(browser)
    arrivals = []  # (url, answers stored at that moment, screens of the rater)

    def completion(route):
        n = plat.query("SELECT COUNT(*) FROM surveys_answer a JOIN surveys_trial t ON "
                       "t.id = a.trial_id JOIN surveys_rater r ON r.id = t.rater_id "
                       "WHERE r.panel_pid = ?", (pid,))[0][0]
        arrivals.append((route.request.url, n))
        route.fulfill(status=200, content_type="text/html",
                      body="<html><body><h1 id='panel-done'>panel</h1></body></html>")

    page.route("https://panel.example/**", completion)
    intro(page, base, info["general"], "not a healthcare professional",
          query=f"?PROLIFIC_PID={pid}&STUDY_ID=s1&SESSION_ID=x1")
    assert "PROLIFIC_PID" not in page.url  # the ids left the address bar at once
    total = 1 + 4 + 2
    lost = {"done": False}

    def drop_last_answer(route):
        # the first attempt at the last answer never reaches the server
        if route.request.method == "POST" and not lost["done"] and plat.query(
                "SELECT COUNT(*) FROM surveys_answer a JOIN surveys_trial t ON t.id = a.trial_id "
                "JOIN surveys_rater r ON r.id = t.rater_id WHERE r.panel_pid = ?",
                (pid,))[0][0] == total - 1:
            lost["done"] = True
            route.abort()
            return
        route.continue_()

    page.route("**/take/trial/", drop_last_answer)
    answered = 0
    while answered < total - 1:
        page.wait_for_selector("#trial-form, #feedback")
        if page.locator("#feedback").count():
            page.click("#continue")
            continue
        page.wait_for_selector("body[data-ready='1']")
        _, right, _ = trial_info(plat, page)
        with page.expect_navigation():
            page.click(f"#cand-{right}")
        answered += 1
    page.wait_for_selector("body[data-ready='1']")
    _, right, _ = trial_info(plat, page)
    page.click(f"#cand-{right}")
    page.wait_for_timeout(4000)  # longer than the completion page's 3 s refresh
    assert lost["done"] and arrivals == []  # the lost answer sent nobody to the panel
    page.goto(f"{base}/take/trial/")  # the rater retries the last screen
    page.wait_for_selector("body[data-ready='1']")
    _, right, _ = trial_info(plat, page)
    with page.expect_navigation():
        page.click(f"#cand-{right}")
    assert page.locator("#completion-code").inner_text() == "C0DE42"
    page.wait_for_selector("#panel-done", timeout=15_000)
    assert arrivals == [(PANEL_URL, total)]  # redirected once, after every answer was stored
    ctx.close()
    assert plat.query("SELECT panel_study_id, panel_session_id, step FROM surveys_rater "
                      "WHERE panel_pid = ?", (pid,)) == [("s1", "x1", "done")]
    # the same panel id cannot take part again
    ctx, page = page_of(browser)
    page.goto(f"{base}/take/i/{info['surgeon']}/?PROLIFIC_PID={pid}")
    page.click("#start")
    assert "already taken part" in page.locator("#problem-title").inner_text()
    ctx.close()


def test_trial_page_fits_a_phone(site, browser):
    plat, base = site
    info = new_study(plat, "phone")
    ctx, page = page_of(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                        is_mobile=True, has_touch=True)
    intro(page, base, info["general"], "not a healthcare professional")
    page.wait_for_selector("body[data-ready='1']")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    boxes = page.eval_on_selector_all(
        "#stage img", "els => els.map(e => e.getBoundingClientRect().width)")
    assert len(boxes) == 5
    target, cands = boxes[0], boxes[1:]
    assert target >= 240 and min(cands) >= 160, boxes
    keep = os.environ.get("DEIDSTUDY_SCREENSHOT_DIR")
    if keep:
        page.screenshot(path=os.path.join(keep, "rater-phone.png"), full_page=True)
    # tapping a candidate answers
    _, right, token = trial_info(plat, page)
    with page.expect_navigation():
        page.tap(f"#cand-{right}")
    assert plat.query("SELECT COUNT(*) FROM surveys_answer a JOIN surveys_trial t ON "
                      "t.id = a.trial_id WHERE t.token = ?", (token,))[0][0] == 1
    ctx.close()
