"""End-to-end in Debian's Chromium: the Content-Security-Policy blocks nothing the pages
need (researcher pages, admin, a rater's whole study, the practice feedback), and it
is enforced (an injected inline script is blocked and reported)."""

from __future__ import annotations

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
import json
from django.conf import settings
from django.contrib.auth.models import User
from surveys.models import Invitation
from tests.factories.studies import make_render_cohort, make_study
u = User.objects.get(username="alice")
cohort = make_render_cohort(settings.DATA_DIR, u, n_subjects=8)
study = make_study(cohort, u, trials_per_rater=2, n_practice=1, n_catch=0, ask_confidence=True)
g = Invitation.objects.create(study=study, group="general")
User.objects.create_superuser("root", password="e2e-root-pw-9")
print(json.dumps({"cohort": cohort.pk, "study": study.pk, "token": g.token}))
"""

#: Collects CSP violations in the page (they are also console errors).
LISTEN = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture()
def site(tmp_path):
    plat = start_platform(tmp_path / "var", researcher=("alice", "e2e-pass-42"))
    try:
        port = free_port()
        plat.start_server(port)
        yield plat, f"http://127.0.0.1:{port}"
    finally:
        plat.stop()


def test_pages_work_under_the_policy(site):
    from playwright.sync_api import expect, sync_playwright

    plat, base = site
    expect.set_options(timeout=30_000)
    info = json.loads(plat.manage("shell", "-c", SETUP).stdout.strip().splitlines()[-1])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context()
            ctx.add_init_script(LISTEN)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            console = []
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)

            def visit(url: str) -> None:
                resp = page.goto(base + url)
                assert resp is not None and resp.status == 200, url
                assert "script-src 'self'" in resp.headers["content-security-policy"], url
                page.wait_for_load_state("load")
                assert page.evaluate("window.__csp") == [], (url, page.evaluate("window.__csp"))

            # researcher pages (with their scripts: upload form, status polling)
            page.goto(f"{base}/accounts/login/")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "e2e-pass-42")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Cohorts")
            for url in ("/cohorts/", f"/cohorts/{info['cohort']}/",
                        f"/cohorts/{info['cohort']}/subjects/SUBJ-0001/", "/studies/",
                        f"/studies/{info['study']}/", f"/studies/{info['study']}/report/"):
                visit(url)
            # the admin (strict policy too)
            ctx2 = browser.new_context()
            ctx2.add_init_script(LISTEN)
            admin = ctx2.new_page()
            admin.goto(f"{base}/admin/login/")
            admin.fill("input[name=username]", "root")
            admin.fill("input[name=password]", "e2e-root-pw-9")
            admin.click("input[type=submit]")
            for url in ("/admin/", "/admin/surveys/cohort/", f"/admin/surveys/cohort/{info['cohort']}/change/",
                        "/admin/auth/user/add/", "/admin/surveys/stagerun/"):
                resp = admin.goto(base + url)
                assert resp is not None and resp.status == 200, url
                admin.wait_for_load_state("load")
                assert admin.evaluate("window.__csp") == [], (url, admin.evaluate("window.__csp"))
            ctx2.close()

            # a rater's whole study: images load, keys and the timer script work
            rater = ctx.new_page()
            rater.set_default_timeout(30_000)
            rater.goto(f"{base}/take/i/{info['token']}/")
            rater.click("#start")
            rater.click("#agree")
            rater.select_option("select[name=profession]", "not a healthcare professional")
            rater.check("input[name=familiarity][value=rarely]")  # the general public's question
            rater.click("#questionnaire button[type=submit]")
            rater.click("#begin")
            screens = 0
            while True:
                rater.wait_for_selector("#trial-form, #feedback, #thanks")
                assert rater.evaluate("window.__csp") == [], rater.evaluate("window.__csp")
                if rater.locator("#thanks").count():
                    break
                if rater.locator("#feedback").count():
                    rater.keyboard.press("Enter")  # feedback.js
                    rater.wait_for_selector("#trial-form, #thanks")
                    continue
                rater.wait_for_selector("body[data-ready='1']")  # trial.js ran
                widths = rater.eval_on_selector_all("#stage img", "els => els.map(e => e.naturalWidth)")
                assert all(w > 0 for w in widths), widths
                with rater.expect_navigation():
                    rater.keyboard.press("1")
                    rater.keyboard.press("3")
                screens += 1
            assert screens == 3  # 1 practice + 2 trials

            assert not [m for m in console if "Content Security Policy" in m], console
            # the policy is enforced: an injected inline script does not run and is reported
            page.goto(f"{base}/cohorts/")
            page.evaluate("() => { const s = document.createElement('script');"
                          " s.textContent = 'window.__ran = 1'; document.body.appendChild(s); }")
            wait_in_page(page, "window.__csp.length > 0")
            assert page.evaluate("window.__ran === undefined")
            assert "script-src" in page.evaluate("window.__csp")[0]
        finally:
            browser.close()
