"""End-to-end in Debian's Chromium (issue 15): the researcher's workspace.

A subject made of a deterministic head phantom (``tests/viewer_fixture.py``; its pictures
do not change when the de-identification improves) is opened on the subject page: the
slice viewer is scrolled with the wheel and the keyboard, its overlay toggled, its
window and view changed, the 3D viewer rotated by dragging, and the canvases are
compared with stored screenshots within a tolerance (``tests/e2e/screens.py``). Then the
cohort's QA grid is sorted and filtered, the subject page follows a stage live, the
de-identified download warns about an unfinished subject, and a rater enlarges faces.
One platform and one browser serve the whole module (≈ 1 min).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.e2e import screens
from tests.e2e.procs import free_port, start_platform, wait_in_page
from tests.e2e.test_e2e_cohort import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.test_e2e_security import LISTEN

ROOT = Path(__file__).resolve().parents[2]
NIIVUE = ROOT / "static" / "vendor" / "niivue" / "niivue.umd.js"

pytestmark = [
    pytest.mark.postgres,  # its worker or server processes use the announced database
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian chromium not installed at /usr/bin/chromium"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
    pytest.mark.skipif(not NIIVUE.exists() and shutil.which("npm") is None,
                       reason="NiiVue is not installed and npm is missing (apt-get install "
                              "nodejs npm; make install)"),
]

VIEWPORT = {"width": 1400, "height": 1000}
SETUP = """
import json
from tests.viewer_fixture import build_site
cid, names = build_site("alice", 3)
print(json.dumps({"cohort": cid, "subjects": names}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not NIIVUE.exists():  # npm is there: install it as `make install` does
        import subprocess

        subprocess.run(["bash", str(ROOT / "scripts" / "vendor_js.sh")], check=True, cwd=ROOT)
    from playwright.sync_api import sync_playwright

    plat = start_platform(tmp_path_factory.mktemp("viewer") / "var",
                          researcher=("alice", "e2e-pass-42"))
    try:
        info = json.loads(plat.manage("shell", "-c", SETUP).stdout.strip().splitlines()[-1])
        port = free_port()
        plat.start_server(port)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1,
                                      accept_downloads=True)
            ctx.add_init_script(LISTEN)  # records Content-Security-Policy violations
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            problems: list[str] = []
            # errors of the page and failed requests (the browser's own favicon probe aside)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{base}/accounts/login/")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "e2e-pass-42")
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/cohorts/")
            yield {"plat": plat, "base": base, "page": page, "browser": browser,
                   "cohort": info["cohort"], "subjects": info["subjects"],
                   "problems": problems}
            browser.close()
    finally:
        plat.stop()


def _wait_across_reloads(page, expression: str, timeout_s: float = 20.0) -> None:
    """:func:`wait_in_page` for a page that may reload itself meanwhile."""
    from playwright.sync_api import Error

    t0 = time.monotonic()
    while True:
        try:
            if page.evaluate(expression):
                return
        except Error as exc:  # the page navigated while we looked
            if "context was destroyed" not in str(exc) and "navigat" not in str(exc):
                raise
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{expression!r} still false after {timeout_s} s")
        time.sleep(0.1)


def _drawn(page) -> str:
    return page.evaluate("document.getElementById('viewer').dataset.drawn || ''")


def _wait_drawn(page, expected: str) -> None:
    wait_in_page(page, f"document.getElementById('viewer').dataset.drawn === {expected!r}")
    page.wait_for_timeout(50)


def _shot(page, selector: str) -> bytes:
    return page.locator(selector).screenshot(animations="disabled")


def _open_subject(site, name: str = "SUBJ-0001") -> None:
    page = site["page"]
    page.goto(f"{site['base']}/cohorts/{site['cohort']}/subjects/{name}/")
    wait_in_page(page, "document.getElementById('viewer').dataset.ready === '1'")


def test_slice_viewer_scroll_overlay_window_views(site):
    page, problems = site["page"], site["problems"]
    _open_subject(site)
    m = page.evaluate("window.deidViewer.state.manifest.selected")
    ax = m["views"]["axial"]
    start = ax["start"]
    assert start == max(range(ax["n"]), key=lambda k: ax["removed"][k])  # opens on the face
    _wait_drawn(page, f"axial:{start}:1:soft")
    # full resolution: the canvas holds the native 100 × 100 slice pixel for pixel
    assert page.evaluate("[document.getElementById('vw-canvas-original').width,"
                         " document.getElementById('vw-canvas-original').height]") == [100, 100]
    on_o = _shot(page, "#vw-canvas-original")
    on_d = _shot(page, "#vw-canvas-deid")
    screens.compare(on_o, "slice-axial-original", screens.SLICES)
    screens.compare(on_d, "slice-axial-deid", screens.SLICES)

    # the mouse wheel scrolls both panes together; keys too
    page.locator("#vw-canvas-deid").hover()
    for _ in range(3):
        page.mouse.wheel(0, 120)
    _wait_drawn(page, f"axial:{start + 3}:1:soft")
    page.keyboard.press("ArrowUp")
    _wait_drawn(page, f"axial:{start + 2}:1:soft")
    page.keyboard.press("PageUp")
    _wait_drawn(page, f"axial:{start - 8}:1:soft")
    page.keyboard.press("Home")
    _wait_drawn(page, "axial:0:1:soft")
    page.keyboard.press("n")  # next image with removed voxels
    first_removed = next(k for k in range(ax["n"]) if ax["removed"][k] > 0)
    _wait_drawn(page, f"axial:{first_removed}:1:soft")
    page.fill("#vw-slider", str(start))
    page.dispatch_event("#vw-slider", "input")
    _wait_drawn(page, f"axial:{start}:1:soft")
    assert _shot(page, "#vw-canvas-original") == on_o  # back where we were: same picture

    # the overlay off (checkbox), on (key O), off again
    page.uncheck("#vw-overlay")
    _wait_drawn(page, f"axial:{start}:0:soft")
    off_o = _shot(page, "#vw-canvas-original")
    screens.compare(off_o, "slice-axial-original-no-overlay", screens.SLICES)
    mean, frac = screens.difference(screens.load(on_o), screens.load(off_o))
    assert frac > 0.01, "the overlay changes nothing visible"  # the face is 3 % of the image
    page.keyboard.press("o")
    _wait_drawn(page, f"axial:{start}:1:soft")
    page.keyboard.press("o")
    _wait_drawn(page, f"axial:{start}:0:soft")
    # without the overlay the de-identified slice shows the air where the face was
    screens.compare(_shot(page, "#vw-canvas-deid"), "slice-axial-deid-no-overlay", screens.SLICES)

    # window presets: bone (key 2), brain (button)
    page.keyboard.press("2")
    _wait_drawn(page, f"axial:{start}:0:bone")
    screens.compare(_shot(page, "#vw-canvas-original"), "slice-axial-original-bone",
                    screens.SLICES)
    page.click("#vw-windows button[data-key=brain]")
    _wait_drawn(page, f"axial:{start}:0:brain")

    # reformats: sagittal through the reference point, overlay back on
    page.keyboard.press("1")
    page.keyboard.press("o")
    page.keyboard.press("s")
    sag = m["views"]["sagittal"]
    _wait_drawn(page, f"sagittal:{sag['start']}:1:soft")
    assert page.evaluate("document.getElementById('vw-canvas-original').height") == sag["height"]
    screens.compare(_shot(page, "#vw-canvas-original"), "slice-sagittal-original",
                    screens.SLICES)
    # click the middle of the sagittal image: the reference point; axial goes through it
    box = page.locator("#vw-canvas-original").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.75)
    point = [float(x) for x in page.evaluate(
        "document.getElementById('viewer').dataset.point").split(",")]
    page.keyboard.press("a")
    g = m["geometry"]
    t = point[2] - g["origins"][0][2]
    expect_k = min(range(len(g["offsets_mm"])), key=lambda k: abs(g["offsets_mm"][k] - t))
    _wait_drawn(page, f"axial:{expect_k}:1:soft")
    page.keyboard.press("c")
    cor = m["views"]["coronal"]
    expect_n = round((point[1] - cor["origin"][1]) / cor["step_w"])
    _wait_drawn(page, f"coronal:{expect_n}:1:soft")
    screens.compare(_shot(page, "#vw-canvas-deid"), "slice-coronal-deid", screens.SLICES)
    # 1:1 shows native pixels
    page.keyboard.press("0")
    wait_in_page(page, "document.getElementById('vw-canvas-deid').style.width === "
                       f"'{cor['width']}px'")
    assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p]
    assert not problems, problems


def test_3d_viewer_rotates_both_views_together(site):
    page, problems = site["page"], site["problems"]
    _open_subject(site)
    wait_in_page(page, "document.getElementById('viewer3d').dataset.bone === '1'", 60)
    page.wait_for_timeout(300)
    assert page.evaluate("document.getElementById('viewer3d').dataset.azimuth") == "180"
    screens.compare(_shot(page, "#v3-original"), "surface-front-original", screens.SURFACES)
    screens.compare(_shot(page, "#v3-deid"), "surface-front-deid", screens.SURFACES)
    front_d = screens.load(_shot(page, "#v3-deid"))

    # drag on the original: both cameras turn by the same angle
    box = page.locator("#v3-original").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for dx in range(0, 161, 20):
        page.mouse.move(x + dx, y, steps=2)
    page.mouse.up()
    page.wait_for_timeout(300)
    az = page.evaluate("[window.deidViewer3d.nv.original.scene.renderAzimuth,"
                       " window.deidViewer3d.nv.deid.scene.renderAzimuth]")
    assert az[0] == az[1] and abs(az[0] - 180) > 20, az
    el = page.evaluate("[window.deidViewer3d.nv.original.scene.renderElevation,"
                       " window.deidViewer3d.nv.deid.scene.renderElevation]")
    assert el[0] == el[1]
    page.evaluate("window.deidViewer3d.nv.original.setRenderAzimuthElevation(240, 0);"
                  "window.deidViewer3d.nv.deid.setRenderAzimuthElevation(240, 0)")
    page.wait_for_timeout(300)
    rot_d = _shot(page, "#v3-deid")
    screens.compare(_shot(page, "#v3-original"), "surface-240-original", screens.SURFACES)
    screens.compare(rot_d, "surface-240-deid", screens.SURFACES)
    _, frac = screens.difference(front_d, screens.load(rot_d))
    assert frac > 0.05, "rotating changed nothing"

    # the buttons turn both; bone and skin opacity; the removed region colours off
    page.click("#v3-views button[data-az='90']")
    page.wait_for_timeout(200)
    assert page.evaluate("[window.deidViewer3d.nv.original.scene.renderAzimuth,"
                         " window.deidViewer3d.nv.deid.scene.renderAzimuth]") == [90, 90]
    page.click("#v3-views button[data-az='180']")
    page.check("#v3-bone")
    page.fill("#v3-opacity", "30")
    page.dispatch_event("#v3-opacity", "input")
    page.wait_for_timeout(300)
    screens.compare(_shot(page, "#v3-original"), "surface-front-bone-original",
                    screens.SURFACES)
    page.fill("#v3-opacity", "100")
    page.dispatch_event("#v3-opacity", "input")
    page.uncheck("#v3-bone")
    # NiiVue runs under the site's strict policy (its font and matcap come as static files)
    assert page.evaluate("window.__csp") == []
    red_on = _red_fraction(_shot(page, "#v3-original"))
    page.uncheck("#v3-removed")
    page.wait_for_timeout(300)
    red_off = _red_fraction(_shot(page, "#v3-original"))
    assert red_on > 0.01 and red_off < red_on / 10, (red_on, red_off)
    assert not problems, problems


def _red_fraction(png: bytes) -> float:
    a = screens.load(png)
    return float(((a[..., 0] > 120) & (a[..., 0] > 2 * a[..., 1]) & (a[..., 0] > 2 * a[..., 2]))
                 .mean())


def test_cohort_grid_sorts_and_filters(site):
    page, base, cid = site["page"], site["base"], site["cohort"]
    page.goto(f"{base}/cohorts/{cid}/")
    assert page.locator(".qa-card").count() == 3
    wait_in_page(page, "document.querySelectorAll('.qa-card img').length === 3 && "
                       "[...document.querySelectorAll('.qa-card img')].every("
                       "i => i.complete && i.naturalWidth > 0)")
    removed = {c.get_attribute("data-subject"): float(c.get_attribute("data-removed_ml"))
               for c in page.locator(".qa-card").all()}
    page.select_option("#qa-sort", "removed_ml")
    order = page.evaluate("document.getElementById('qa-grid').dataset.order").split(",")
    assert order == sorted(removed, key=lambda s: -removed[s])
    page.click("#qa-dir")
    order = page.evaluate("document.getElementById('qa-grid').dataset.order").split(",")
    assert order == sorted(removed, key=lambda s: removed[s])
    # what is on screen follows the order
    shown = [c.get_attribute("data-subject") for c in page.locator(".qa-card").all()]
    assert shown == order
    page.check("#qa-only-flagged")  # SUBJ-0003 has a warning
    assert page.locator(".qa-card:visible").count() == 1
    assert page.locator(".qa-card:visible").get_attribute("data-subject") == "SUBJ-0003"
    page.reload()  # the choice is kept for the session
    assert page.locator(".qa-card:visible").count() == 1
    page.uncheck("#qa-only-flagged")


def test_subject_page_follows_a_stage_live(site):
    page, plat = site["page"], site["plat"]
    _open_subject(site, "SUBJ-0002")
    plat.manage("shell", "-c",
                "from surveys.models import StageRun;"
                "StageRun.objects.filter(subject__pseudonym='SUBJ-0002', subject__cohort_id="
                f"{site['cohort']}, stage='embeddings').update(status='running', progress=0.4)")
    # the row changes without a reload (the viewer was not used: the page may reload itself
    # once the signature changes, which it does here, so look for either)
    _wait_across_reloads(page, "(() => { const td = [...document.querySelectorAll("
                               "'#stages td.stage')]"
                       ".find(t => t.closest('tr').textContent.includes('embeddings'));"
                       " return td && td.textContent.includes('running 40%'); })()", 20)
    plat.manage("shell", "-c",
                "from django.utils import timezone; from surveys.models import StageRun;"
                "StageRun.objects.filter(subject__pseudonym='SUBJ-0002', subject__cohort_id="
                f"{site['cohort']}, stage='embeddings').update(status='done', progress=1,"
                " finished=timezone.now())")
    _wait_across_reloads(page, "(() => { const td = [...document.querySelectorAll("
                               "'#stages td.stage')]"
                       ".find(t => t.closest('tr').textContent.includes('embeddings'));"
                       " return td && td.className === 'stage done'; })()", 20)
    # a researcher in the middle of reading slices is offered the results, not reloaded
    _wait_across_reloads(page, "document.getElementById('viewer').dataset.ready === '1'")
    page.locator("#vw-canvas-original").hover()
    page.mouse.wheel(0, 120)
    page.evaluate("document.body.dataset.marker = 'reading'")
    plat.manage("shell", "-c",
                "from django.utils import timezone; from surveys.models import StageRun;"
                "StageRun.objects.filter(subject__pseudonym='SUBJ-0002', subject__cohort_id="
                f"{site['cohort']}, stage='embeddings').update(attempts=2,"
                " finished=timezone.now())")
    wait_in_page(page, "!document.getElementById('live-banner').hidden", 20)
    assert page.evaluate("document.body.dataset.marker") == "reading"


def test_download_lists_unfinished_subjects(site):
    page, plat, base, cid = site["page"], site["plat"], site["base"], site["cohort"]
    plat.manage("shell", "-c",
                "from surveys.models import StageRun;"
                "StageRun.objects.filter(subject__pseudonym='SUBJ-0003', subject__cohort_id="
                f"{cid}, stage='deidentify').update(status='failed', error='no face found')")
    page.goto(f"{base}/cohorts/{cid}/")
    assert "1 subject unfinished or failed" in page.locator("#download-missing").inner_text()
    page.click("#download-deid")
    assert "1 of 3 subjects will be missing" in page.locator("#download-warning").inner_text()
    assert "no face found" in page.locator("#missing-subjects").inner_text()
    with page.expect_download() as dl:
        page.click("#download-anyway")
    import zipfile

    path = Path(dl.value.path())
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert "not-included.csv" in names
    assert {n.split("/")[0] for n in names if n.endswith(".dcm")} == {"SUBJ-0001", "SUBJ-0002"}


RATER_SETUP = """
import json
from django.conf import settings
from django.contrib.auth.models import User
from surveys.models import Invitation
from tests.factories.studies import make_render_cohort, make_study
u = User.objects.get(username="alice")
cohort = make_render_cohort(settings.DATA_DIR, u, n_subjects=8, name="raters")
study = make_study(cohort, u, trials_per_rater=4, n_practice=0, n_catch=0)
print(json.dumps({"token": Invitation.objects.create(study=study, group="general").token,
                  "study": study.pk}))
"""


def test_rater_enlarges_faces_on_a_large_screen(site):
    plat, base, browser = site["plat"], site["base"], site["browser"]
    info = json.loads(plat.manage("shell", "-c", RATER_SETUP).stdout.strip().splitlines()[-1])
    ctx = browser.new_context(viewport={"width": 2560, "height": 1440})
    page = ctx.new_page()
    try:
        page.goto(f"{base}/take/i/{info['token']}/")
        page.click("#start")
        page.click("#agree")
        page.select_option("select[name=profession]", "not a healthcare professional")
        page.check("input[name=familiarity][value=rarely]")
        page.click("#questionnaire button[type=submit]")
        page.click("#begin")
        wait_in_page(page, "document.body.dataset.ready === '1'")
        # large screen: large images
        tw = page.locator("#target-img").bounding_box()["width"]
        cw = page.locator("#cand-1 img").bounding_box()
        assert tw > 700 and cw["width"] > 500 and cw["height"] > 500, (tw, cw)
        assert cw["y"] + cw["height"] < 1440  # the candidates fit on the screen
        # Shift+2 enlarges face 2 next to the target; → moves to face 3; Enter chooses it
        page.keyboard.press("Shift+Digit2")
        wait_in_page(page, "document.getElementById('zoom-dialog').open")
        assert page.evaluate("document.body.dataset.zoom") == "2"
        big = page.locator("#zoom-cand").bounding_box()
        assert big["width"] > 1000 and big["height"] > 1000, big
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.body.dataset.zoom") == "3"
        assert "Face 3 of 4" in page.locator("#zoom-caption").inner_text()
        page.keyboard.press("Enter")
        _wait_across_reloads(page, "document.getElementById('trial-label') && "
                                   "document.getElementById('trial-label').textContent"
                                   ".startsWith('2') && document.body.dataset.ready === '1' && "
                           "!document.getElementById('zoom-dialog').open")
        # second trial: the button, Esc, then a plain answer
        page.click("#zoom-1")
        wait_in_page(page, "document.getElementById('zoom-dialog').open")
        page.keyboard.press("Escape")
        wait_in_page(page, "!document.getElementById('zoom-dialog').open")
        page.keyboard.press("4")
        _wait_across_reloads(page, "document.getElementById('trial-label') && "
                           "document.getElementById('trial-label').textContent.startsWith('3')")
    finally:
        ctx.close()
    rows = plat.query("SELECT a.choice, a.enlarged FROM surveys_answer a JOIN surveys_trial t "
                      "ON t.id = a.trial_id JOIN surveys_rater r ON r.id = t.rater_id "
                      "WHERE r.study_id = ? ORDER BY t.position", (info["study"],))
    got = [(c, json.loads(e) if isinstance(e, str) else e) for c, e in rows]
    assert got == [(3, [2, 3]), (4, [1])]
