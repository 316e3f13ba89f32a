"""End-to-end in Debian's Chromium: log in, create a cohort, upload a zip with a progress bar,
watch its background import and the pipeline finish (real redis-server, rqworker, runserver), open a subject, download
the de-identified zip and check that it holds no identifier."""

from __future__ import annotations

import io
import os
import shutil
import zipfile

import pydicom
import pytest

from tests.e2e.procs import free_port, start_platform, wait_in_page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]

pytestmark = [
    pytest.mark.postgres,  # its worker or server processes use the announced database
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian chromium not installed at /usr/bin/chromium "
                              "(apt-get install chromium; `make test` does it as root)"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]


#: records in sessionStorage that the upload progress bar was un-hidden (a MutationObserver
#: runs before the reload the upload's success schedules)
BAR_SHOWN = """
document.addEventListener("DOMContentLoaded", function () {
  var bar = document.getElementById("upload-progress");
  if (!bar) return;
  new MutationObserver(function () {
    if (!bar.hidden) sessionStorage.setItem("uploadBarShown", "1");
  }).observe(bar, {attributes: true, attributeFilter: ["hidden"]});
});
"""


@pytest.fixture()
def site(tmp_path):
    plat = start_platform(tmp_path / "var", researcher=("alice", "e2e-pass-42"))
    try:
        plat.start_worker("e2e")
        port = free_port()
        plat.start_server(port)
        yield plat, f"http://127.0.0.1:{port}"
    finally:
        plat.stop()


def test_upload_watch_open_download(site, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from tests.factories.dicom_cohorts import FAKE_MARKER, write_synthetic_cohort, zip_folder

    plat, base = site
    expect.set_options(timeout=30_000)
    src = tmp_path / "src"
    idents = write_synthetic_cohort(src, 2, size="tiny", seed=31)
    upload = zip_folder(src, tmp_path / "scans.zip")
    secrets = [FAKE_MARKER, "FAKE GENERAL"] + [v for i in idents
                                                for v in (i.patient_id, i.birth_date)]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(accept_downloads=True)
            page.set_default_timeout(30_000)
            # the progress bar is shown only while the upload runs, and the page reloads
            # 0.8 s after it: record that it was shown (in the tab's sessionStorage, which
            # survives the reload) instead of racing the reload on a busy machine
            page.add_init_script(BAR_SHOWN)
            page.goto(f"{base}/")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "e2e-pass-42")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Cohorts")
            page.fill("#new-cohort input[name=name]", "E2E cohort")
            page.click("#new-cohort button[type=submit]")
            expect(page.locator("h1")).to_have_text("E2E cohort")

            page.set_input_files("#upload-files", str(upload))
            page.click("#upload-button")
            # progress bar shown during the upload; the request only receives the files
            expect(page.locator("ul.messages")).to_contain_text(
                "upload received, importing in the background", timeout=60_000)
            assert page.evaluate("sessionStorage.getItem('uploadBarShown')") == "1"
            # the import runs in a worker; the page polls and shows the upload's result
            expect(page.locator("#uploads tr.upload.done")).to_contain_text(
                "imported 2 subject(s)", timeout=60_000)
            # the page reloads and polls; wait for every stage of both subjects
            expect(page.locator("#summary")).to_have_text("8 / 8 stages done", timeout=180_000)
            page.reload()
            expect(page.locator("#reid-rank1")).to_be_visible()
            assert page.locator("td.stage.done").count() == 8
            body = page.content()
            assert not any(s in body for s in secrets)
            assert page.url.startswith(f"{base}/cohorts/") and "SUBJ" not in page.url

            page.click("text=SUBJ-0001")
            expect(page.locator("h1")).to_have_text("SUBJ-0001")
            page.wait_for_load_state("load")
            images = page.locator("main img")
            assert images.count() >= 5  # QA figure + 2 render pairs
            widths = page.eval_on_selector_all("main img", "els => els.map(e => e.naturalWidth)")
            assert all(w > 0 for w in widths), widths  # every image really loaded
            # the viewers show the pipeline's own output (the worker prewarmed their data)
            wait_in_page(page, "document.getElementById('viewer').dataset.ready === '1' && "
                               "document.getElementById('viewer3d').dataset.ready === '1'", 60)
            assert page.evaluate("window.deidViewer.state.manifest.selected.removed_voxels") > 0
            assert not any(s in page.content() for s in secrets)

            page.go_back()
            with page.expect_download() as dl:
                page.click("#download-deid")
            path = tmp_path / "downloaded.zip"
            dl.value.save_as(path)
        finally:
            browser.close()

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        dcm = [n for n in names if n.endswith(".dcm")]
        assert len(dcm) == 80 and {n.split("/")[0] for n in dcm} == {"SUBJ-0001", "SUBJ-0002"}
        for n in names:
            data = zf.read(n)
            assert not any(s in n for s in secrets)
            assert not any(s.encode() in data for s in secrets), n
        ds = pydicom.dcmread(io.BytesIO(zf.read(dcm[0])))
        assert ds.PatientIdentityRemoved == "YES" and str(ds.PatientID).startswith("SUBJ-")
    for log in plat.var_dir.glob("*.log"):
        text = log.read_text()
        assert not any(s in text for s in secrets), log.name
