"""Real processes for integration tests: redis-server, rqworker, runserver, manage.py.

Every process runs with an isolated environment: a temporary SQLite database (WAL),
a temporary ``DEIDSTUDY_VAR_DIR`` and a redis-server on a free loopback port.
Workers are started in their own session so a test can kill a worker *and* its
work horse with one ``os.killpg``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


@dataclass
class Platform:
    """A throw-away deployment: env vars, state folder, redis, processes to clean up."""

    var_dir: Path
    redis_port: int
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    postgres_url: str | None = None  # set when the suite runs on PostgreSQL (tests.pgserver)

    @property
    def db_path(self) -> Path:
        return self.var_dir / "test.sqlite3"

    def manage(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``manage.py args`` with this platform's environment; raises on failure."""
        r = subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r

    def start_worker(self, name: str) -> subprocess.Popen:
        """Start ``rqworker pipeline`` (RecoveringWorker) in its own session."""
        log = open(self.var_dir / f"worker-{name}.log", "w")
        p = subprocess.Popen(
            [PYTHON, "manage.py", "rqworker", "pipeline", "--name", name,
             "--worker-class", "deidstudy.rq.RecoveringWorker"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start_server(self, port: int) -> subprocess.Popen:
        """Start ``runserver --noreload --insecure`` on 127.0.0.1:``port``."""
        log = open(self.var_dir / "server.log", "w")
        p = subprocess.Popen([PYTHON, "manage.py", "runserver", "--noreload", "--insecure",
                              f"127.0.0.1:{port}"], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        wait_port(port)
        return p

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read-only SQL (``?`` placeholders) on the platform's database, SQLite or
        PostgreSQL (the test process has no Django DB)."""
        if self.postgres_url:
            import psycopg

            with psycopg.connect(self.postgres_url, autocommit=True) as pg:
                return pg.execute(sql.replace("?", "%s"), params).fetchall()
        con = sqlite3.connect(self.db_path, timeout=30)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def wait_settled(self, cohort_id: int, timeout_s: float = 180.0,
                     until_done: bool = True) -> list[tuple]:
        """Wait until every stage of the cohort is done (or, with ``until_done=False``,
        none is queued/running); returns ``(pseudonym, stage, status, attempts)`` rows."""
        t0 = time.monotonic()
        while True:
            rows = self.query(
                "SELECT s.pseudonym, r.stage, r.status, r.attempts FROM surveys_stagerun r "
                "JOIN surveys_subject s ON s.id = r.subject_id WHERE s.cohort_id = ? "
                "ORDER BY s.pseudonym, r.\"order\"", (cohort_id,))
            statuses = {r[2] for r in rows}
            if rows and (statuses == {"done"} if until_done
                         else not statuses & {"queued", "running"}):
                return rows
            if "failed" in statuses and until_done:
                raise AssertionError(f"a stage failed: {[r for r in rows if r[2] == 'failed']}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"pipeline not finished after {timeout_s} s: {rows}")
            time.sleep(0.3)

    @staticmethod
    def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill a process started in its own session, with all its children."""
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """Terminate every process this platform started (by pid)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill_group(p)


def _fresh_postgres_database(server_url: str) -> str:
    """Create an empty database on the suite's PostgreSQL server; return its URL."""
    import uuid

    import psycopg

    name = f"platform_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as pg:
        pg.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def start_platform(tmp: Path, *, researcher: tuple[str, str] = ("alice", "secret-pw-1")) -> Platform:
    """Migrate a fresh database, start redis-server, create a researcher account."""
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    var = Path(tmp)
    var.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "deidstudy.settings",
        "DEIDSTUDY_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'test.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "DEIDSTUDY_FACE_METHOD": "anatomical",
        "DEIDSTUDY_RENDER_BACKEND": os.environ.get("DEIDSTUDY_RENDER_BACKEND", "raycast"),
        "DEIDSTUDY_DEBUG": "0",
        "PYTHONUNBUFFERED": "1",
    })
    plat = Platform(var_dir=var, redis_port=port, env=env)
    if os.environ.get("DEIDSTUDY_TEST_DATABASE") == "postgresql":
        plat.postgres_url = env["DATABASE_URL"] = _fresh_postgres_database(os.environ["DATABASE_URL"])
    redis = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    plat.procs.append(redis)
    try:
        wait_port(port)
        plat.manage("migrate", "--noinput", "-v", "0")
        if plat.postgres_url and plat.db_path.exists():
            raise RuntimeError("the platform was meant to run on PostgreSQL but made a SQLite file")
        plat.manage("create_researcher", researcher[0], "--password", researcher[1])
    except BaseException:
        plat.stop()
        raise
    return plat


def wait_in_page(page, expression: str, timeout_s: float = 30.0) -> None:
    """Wait until ``expression`` is truthy in ``page``. Playwright's ``wait_for_function``
    evaluates its predicate with ``eval``, which the site's Content-Security-Policy
    (rightly) forbids; ``page.evaluate`` goes through the DevTools protocol instead."""
    t0 = time.monotonic()
    while not page.evaluate(expression):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{expression!r} still false after {timeout_s} s")
        time.sleep(0.1)
