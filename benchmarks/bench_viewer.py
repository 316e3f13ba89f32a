"""Subject page with its viewers: load time in Chromium for a 512×512×300 subject.

Sets up a throw-away deployment (migrate, a researcher, one subject whose original and
de-identified series are a 512×512×300 head phantom at 0.45 × 0.45 × 1 mm written as
DICOM, see ``tests/viewer_fixture.py``), starts gunicorn on 127.0.0.1 (2 workers ×
4 threads) and opens the subject page in Debian's Chromium (headless, software WebGL):

* **cold** — the first visit: the server reads both series once into its viewer cache
  (``surveys.processing.viewer``) and makes the four surfaces;
* **prewarmed** — what a researcher normally gets: the worker built the cache after
  the de-identification stage (``surveys.processing.viewer.prewarm``), timed here too;
* **warm** — every later visit (``--repeats`` page loads, median and worst).

"Loaded" = navigation start → both viewers show their first picture (the slice viewer's
first original | de-identified pair drawn on its canvases, the 3D viewer's two skin
surfaces drawn by NiiVue); the bone surfaces follow. Also printed: the server's time
per image (axial, coronal, sagittal) from the cache and scrolling 30 images with the
mouse wheel. Target: warm ≤ 1.5 s on 2 cores.

    .venv/bin/python benchmarks/bench_viewer.py [--repeats 5] [--shape 300,512,512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.procs import free_port, wait_port  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SETUP = """
from django.contrib.auth.models import User, Group
from tests.viewer_fixture import build_site
u = User.objects.create_user("bench", password="bench-pw-1")
u.groups.add(Group.objects.get_or_create(name="researcher")[0])
print(build_site("bench", 1, shape=({shape}), spacing=({spacing})))
"""
PREWARM = """
import time
from surveys.models import Subject
from surveys import viewer
s = Subject.objects.get()
t = time.perf_counter(); viewer.prewarm(s); print(round(time.perf_counter() - t, 2))
"""


def page_load(page, url: str, timeout_s: float = 300.0) -> dict[str, float]:
    page.goto(url)
    t0 = time.monotonic()
    while True:
        done = page.evaluate("""() => {
            const a = document.getElementById('viewer').dataset;
            const b = document.getElementById('viewer3d').dataset;
            return a.readyMs && b.readyMs ? [+a.readyMs, +b.readyMs] : null; }""")
        if done:
            return {"slices": done[0] / 1000, "surfaces": done[1] / 1000,
                    "both": max(done) / 1000}
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError("the viewers did not load")
        time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", default="300,512,512", help="slices,rows,columns")
    ap.add_argument("--spacing", default="1.0,0.45,0.45", help="mm: slice,row,column")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if not os.path.exists(CHROMIUM):
        print("Debian chromium is needed (apt-get install chromium)")
        return 2
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="deidstudy.settings",
               DEIDSTUDY_VAR_DIR=str(tmp), DEIDSTUDY_DEBUG="0", PYTHONUNBUFFERED="1",
               DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}")
    py = sys.executable
    gunicorn = None
    try:
        subprocess.run([py, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        t = time.perf_counter()
        out = subprocess.run([py, "manage.py", "shell", "-c", SETUP.format(
            shape=args.shape, spacing=args.spacing)], cwd=ROOT, env=env, check=True,
            capture_output=True, text=True).stdout
        cohort_id = int(out.strip().splitlines()[-1].split(",")[0].strip("("))
        print(f"subject: {args.shape.replace(',', '×')} voxels, original + de-identified written "
              f"as DICOM in {time.perf_counter() - t:.1f} s; "
              f"{os.cpu_count()} CPUs visible")
        port = free_port()
        log = open(tmp / "gunicorn.log", "w")
        gunicorn = subprocess.Popen(
            [py, "-m", "gunicorn", "deidstudy.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2",
             "-k", "gthread", "--threads", "4", "--timeout", "300"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/cohorts/{cohort_id}/subjects/SUBJ-0001/"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--headless", "--no-sandbox"])
            ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
            page = ctx.new_page()
            page.goto(f"{base}/accounts/login/")
            page.fill("input[name=username]", "bench")
            page.fill("input[name=password]", "bench-pw-1")
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/cohorts/")
            page.goto(f"{base}/cohorts/")  # warm the workers (URL conf, templates)
            cold = page_load(page, url)
            print(f"cold (first visit builds the cache): page with viewers "
                  f"{cold['both']:.2f} s (slices {cold['slices']:.2f} s, surfaces "
                  f"{cold['surfaces']:.2f} s)")
            # what the worker does after de-identification: rebuild from scratch, timed
            import shutil

            shutil.rmtree(tmp / "data" / "cache", ignore_errors=True)
            r = subprocess.run([py, "manage.py", "shell", "-c", PREWARM], cwd=ROOT, env=env,
                               check=True, capture_output=True, text=True)
            print(f"prewarm by the worker (volumes + 4 surfaces): {r.stdout.split()[-1]} s")
            warm = [page_load(page, url) for _ in range(args.repeats)]
            both = [w["both"] for w in warm]
            print(f"warm (cached, {args.repeats} loads): page with viewers median "
                  f"{statistics.median(both):.2f} s, worst {max(both):.2f} s "
                  f"(slices median {statistics.median(w['slices'] for w in warm):.2f} s, "
                  f"surfaces median {statistics.median(w['surfaces'] for w in warm):.2f} s)")
            # server time per image, measured by the browser (Resource Timing)
            times = page.evaluate("""async () => {
                const m = window.deidViewer.state.manifest.selected, out = {};
                for (const v of ['axial', 'coronal', 'sagittal']) {
                    const n = m.views[v].n, ts = [];
                    for (const f of [0.3, 0.4, 0.5, 0.6, 0.7]) {
                        const t = performance.now();
                        const r = await fetch(m.base + v + '/' + Math.floor(f * n) + '.bin');
                        await r.arrayBuffer();
                        ts.push(performance.now() - t);
                    }
                    ts.sort((a, b) => a - b); out[v] = ts[2];
                }
                return out; }""")
            print("one image pair (original + de-identified) from the cache, median of 5: " +
                  ", ".join(f"{k} {v:.0f} ms" for k, v in times.items()))
            page.locator("#vw-canvas-original").hover()
            start = int(page.evaluate("document.getElementById('viewer').dataset.index"))
            t = time.perf_counter()
            for _ in range(30):
                page.mouse.wheel(0, 100)
                time.sleep(0.01)
            target = start + 30
            while int(page.evaluate("document.getElementById('viewer').dataset.index")) != target:
                if time.perf_counter() - t > 60:
                    break
                time.sleep(0.01)
            print(f"scrolling 30 axial images with the wheel: {time.perf_counter() - t:.2f} s "
                  "until the last one is drawn")
            browser.close()
    finally:
        if gunicorn is not None:
            gunicorn.terminate()
            gunicorn.wait(timeout=20)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
