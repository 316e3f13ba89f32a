"""Concurrent simulated raters against gunicorn on loopback (SQLite WAL by default).

Sets up a throw-away deployment in a temporary folder (migrate, a synthetic cohort of
small renders, one study, one invitation per group), starts gunicorn on 127.0.0.1 and
runs N raters in threads. Each rater takes the invitation, consents, fills the
questionnaire, then answers every trial: GET the trial page, GET its k + 1 images,
think, POST the answer. Bounded in time (``--max-s``). Prints p50/p95 latency of
enrolment (invitation → rater with planned trials), intro pages (consent,
questionnaire, instructions), trial pages, images and submits, server and client
CPU, and answers stored in the database vs answers sent (must be equal).
Target: trial page and submit p95 ≤ 100 ms. The client runs on the same machine
and takes CPU from the server (its CPU time is printed).

    .venv/bin/python benchmarks/bench_raters.py                 # 100 raters, 5 s per trial
    .venv/bin/python benchmarks/bench_raters.py --think-s 1     # overload: 2 cores saturate
    .venv/bin/python -m tests.pgserver -- .venv/bin/python benchmarks/bench_raters.py  # PostgreSQL
    DATABASE_URL=postgres://... .venv/bin/python benchmarks/bench_raters.py
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.procs import free_port, wait_port  # noqa: E402  (shared with the e2e tests)

SETUP = """
from django.conf import settings
from django.contrib.auth.models import User
from surveys.models import Invitation
from tests.test_study_fixtures import make_cohort, make_study
u = User.objects.create_user("bench")
cohort = make_cohort(settings.DATA_DIR, u, n_subjects={n_subjects})
study = make_study(cohort, u, trials_per_rater={trials}, n_practice=1, n_catch=1)
print(Invitation.objects.create(study=study, group="general").token,
      Invitation.objects.create(study=study, group="plastic surgeon").token)
"""
CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
TRIAL = re.compile(r'name="trial" value="([^"]+)"')
IMG = re.compile(r'src="(/take/img/[^"]+)"')



class Stats:
    """Thread-safe latency lists (seconds) per kind and counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = {"enrol": [], "intro": [], "page": [], "image": [],
                                           "submit": []}
        self.sent = 0
        self.errors: list[str] = []
        self.finished = 0

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.lat[kind].append(seconds)


def timed(stats: Stats, kind: str, fn, *args, **kw) -> requests.Response:
    t0 = time.perf_counter()
    r = fn(*args, **kw)
    stats.add(kind, time.perf_counter() - t0)
    return r


def rater(base: str, token: str, stats: Stats, deadline: float, think_s: float,
          rng: random.Random) -> None:
    """One simulated rater; stops at ``deadline`` (time.time)."""
    s = requests.Session()
    try:
        r = timed(stats, "intro", s.get, f"{base}/take/i/{token}/")
        r = timed(stats, "enrol", s.post, f"{base}/take/i/{token}/",
                  data={"csrfmiddlewaretoken": CSRF.search(r.text).group(1)})
        csrf = CSRF.search(r.text).group(1)  # consent page (redirect followed)
        r = timed(stats, "intro", s.post, f"{base}/take/consent/",
                  data={"csrfmiddlewaretoken": csrf, "agree": "yes"})
        # the group is the invitation's; these answers fit lay and professional groups
        r = timed(stats, "intro", s.post, f"{base}/take/about-you/",
                  data={"csrfmiddlewaretoken": csrf, "profession": "not a healthcare professional",
                        "familiarity": "never", "years_experience": 3})
        r = timed(stats, "intro", s.post, f"{base}/take/instructions/",
                  data={"csrfmiddlewaretoken": csrf})
        while time.time() < deadline:
            if "/take/thanks/" in r.url:
                with stats.lock:
                    stats.finished += 1
                return
            if "/take/feedback/" in r.url:
                r = timed(stats, "page", s.get, f"{base}/take/trial/")
                continue
            m = TRIAL.search(r.text)
            if m is None:
                raise RuntimeError(f"unexpected page {r.status_code} {r.url}")
            shown = time.perf_counter()
            for u in IMG.findall(r.text):
                img = timed(stats, "image", s.get, base + u)
                if img.status_code != 200:
                    raise RuntimeError(f"image {img.status_code}")
            time.sleep(think_s * rng.uniform(0.5, 1.5))
            rt = (time.perf_counter() - shown) * 1000
            resp = timed(stats, "submit", s.post, f"{base}/take/trial/", allow_redirects=False,
                         data={"csrfmiddlewaretoken": csrf, "trial": m.group(1),
                               "choice": rng.randint(1, 4), "rt_ms": f"{rt:.1f}"})
            if resp.status_code != 302:
                raise RuntimeError(f"submit {resp.status_code}")
            with stats.lock:
                stats.sent += 1
            r = timed(stats, "page", s.get, base + resp.headers["Location"])
    except Exception as exc:  # noqa: BLE001 - reported, counted
        with stats.lock:
            stats.errors.append(f"{type(exc).__name__}: {exc}"[:200])


def client_share(base: str, tokens: list[str], ids: list[int], t0: float, ramp_s: float,
                 n_raters: int, deadline: float, think_s: float) -> dict:
    """Run the raters ``ids`` in threads of this process (one of several client processes,
    so that the client's GIL does not inflate the measured latencies)."""
    stats = Stats()
    cpu0 = time.process_time()
    threads = [threading.Thread(target=rater, args=(base, tokens[n % 2], stats, deadline,
                                                    think_s, random.Random(n)), daemon=True)
               for n in ids]
    for n, th in zip(ids, threads):
        time.sleep(max(0.0, t0 + ramp_s * n / max(1, n_raters) - time.time()))
        th.start()
    for th in threads:
        th.join(timeout=max(0.0, deadline + 30 - time.time()))
    return {"lat": stats.lat, "sent": stats.sent, "errors": stats.errors,
            "finished": stats.finished, "cpu": time.process_time() - cpu0}


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of gunicorn (master and workers) so far."""
    import psutil

    try:
        master = psutil.Process(pid)
        procs = [master, *master.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0..100) in milliseconds (nan when empty)."""
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raters", type=int, default=100)
    ap.add_argument("--trials", type=int, default=10, help="main trials per rater")
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--think-s", type=float, default=5.0,
                    help="mean think time per trial (uniform 0.5..1.5 × this; default 5 s, "
                         "a brisk human pace for matching one face against four)")
    ap.add_argument("--ramp-s", type=float, default=20.0,
                    help="raters arrive evenly within this time")
    ap.add_argument("--max-s", type=float, default=120.0, help="stop the load after this")
    ap.add_argument("--client-procs", type=int, default=4,
                    help="client processes (threads inside); avoids client GIL queueing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-raters-"))
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="deidstudy.settings",
               DEIDSTUDY_VAR_DIR=str(tmp), DEIDSTUDY_DEBUG="0",
               DEIDSTUDY_DB_CONN_MAX_AGE="60", PYTHONUNBUFFERED="1")
    env.setdefault("DATABASE_URL", f"sqlite:///{tmp / 'bench.sqlite3'}")
    py = sys.executable
    gunicorn = None
    try:
        subprocess.run([py, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([py, "manage.py", "shell", "-c", SETUP.format(
            n_subjects=args.subjects, trials=args.trials)], cwd=ROOT, env=env, check=True,
            capture_output=True, text=True).stdout.split()
        tokens = out[-2:]
        port = free_port()
        log = open(tmp / "gunicorn.log", "w")
        gunicorn = subprocess.Popen(
            [py, "-m", "gunicorn", "deidstudy.wsgi", "-b", f"127.0.0.1:{port}",
             "-w", str(args.workers), "-k", "gthread", "--threads", str(args.threads),
             "--backlog", "512", "--timeout", "60", "--keep-alive", "30"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        for _ in range(4 * args.workers):  # warm up every worker (URL conf, templates)
            requests.get(f"{base}/take/start/", timeout=30)
        stats = Stats()
        cpu0 = server_cpu_s(gunicorn.pid)
        t0 = time.time()
        deadline = t0 + args.max_s
        nproc = max(1, min(args.client_procs, args.raters))
        with ProcessPoolExecutor(nproc) as pool:
            futs = [pool.submit(client_share, base, tokens, list(range(i, args.raters, nproc)),
                                t0, args.ramp_s, args.raters, deadline, args.think_s)
                    for i in range(nproc)]
            shares = [f.result() for f in futs]
        client_cpu = 0.0
        for sh in shares:
            for kind, vals in sh["lat"].items():
                stats.lat[kind].extend(vals)
            stats.sent += sh["sent"]
            stats.errors.extend(sh["errors"])
            stats.finished += sh["finished"]
            client_cpu += sh["cpu"]
        wall = time.time() - t0
        server_cpu = server_cpu_s(gunicorn.pid) - cpu0
        if env["DATABASE_URL"].startswith("sqlite"):
            con = sqlite3.connect(tmp / "bench.sqlite3")
            stored = con.execute("SELECT COUNT(*) FROM surveys_answer").fetchone()[0]
            con.close()
        else:
            stored = int(subprocess.run(
                [py, "manage.py", "shell", "-c",
                 "from surveys.models import Answer; print(Answer.objects.count())"],
                cwd=ROOT, env=env, capture_output=True, text=True).stdout.split()[-1])
        print(f"raters {args.raters} ({stats.finished} finished) · {args.trials}+2 trials each · "
              f"think {args.think_s} s · gunicorn {args.workers}×{args.threads} gthread · "
              f"{'SQLite WAL' if env['DATABASE_URL'].startswith('sqlite') else 'server DB'} · "
              f"wall {wall:.1f} s")
        for kind, vals in stats.lat.items():
            print(f"  {kind:7s} n={len(vals):5d}  p50 {pct(vals, 50):7.1f} ms  "
                  f"p95 {pct(vals, 95):7.1f} ms  max {pct(vals, 100):7.1f} ms")
        n_req = sum(len(v) for v in stats.lat.values())
        print(f"  {n_req} requests, {n_req / wall:.0f}/s · server CPU {server_cpu:.1f} s "
              f"({1000 * server_cpu / max(1, n_req):.1f} ms/request) · client CPU "
              f"{client_cpu:.1f} s · machine load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        ok = stored == stats.sent and not stats.errors
        print(f"  answers sent {stats.sent}, stored {stored}: "
              f"{'EQUAL' if stored == stats.sent else 'MISMATCH'}; errors {len(stats.errors)}")
        for e in stats.errors[:5]:
            print("   ", e)
        p95 = max(pct(stats.lat["page"], 95), pct(stats.lat["submit"], 95))
        print(f"  target p95 ≤ 100 ms (page, submit): {'met' if p95 <= 100 else 'MISSED'} "
              f"({p95:.1f} ms)")
        return 0 if ok else 1
    finally:
        if gunicorn is not None and gunicorn.poll() is None:
            os.killpg(gunicorn.pid, 15)
            try:
                gunicorn.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(gunicorn.pid, 9)
        if args.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
