"""``manage.py demo`` survives a dying worker and does not share its Redis (issue 11, item 6).

Two demos run at once on one machine, with ``REDIS_URL`` pointing both at a Redis that is
already running (as the old demo would have used). Each must start a Redis of its own on a
free port, finish its pipeline without the other taking its jobs, and restart its worker
(killed with its work horse mid-pipeline, and again later) and its web server instead of
stopping everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.procs import ROOT, free_port, wait_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]


class Demo:
    def __init__(self, tmp: Path, name: str, redis_url: str) -> None:
        self.port = free_port()
        self.out = tmp / f"{name}.out"
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "DEIDSTUDY_RQ_QUEUE", "DEIDSTUDY_IMPORT_QUEUE")}
        env.update(DEIDSTUDY_VAR_DIR=str(tmp / name / "var"), REDIS_URL=redis_url,
                   DEIDSTUDY_RENDER_BACKEND="raycast", DEIDSTUDY_FACE_METHOD="anatomical",
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "demo", "--subjects", "3", "--size", "tiny", "--seed", "2",
             "--workers", "1", "--port", str(self.port), "--out", str(tmp / name / "out")],
            cwd=ROOT, env=env, stdout=open(self.out, "w"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float = 240, count: int = 1) -> None:
        t0 = time.monotonic()
        while self.text().count(needle) < count:
            assert self.proc.poll() is None, f"demo exited:\n{self.text()[-3000:]}"
            assert time.monotonic() - t0 < timeout_s, f"no {needle!r}:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def children(self, pid: int) -> list[tuple[int, str]]:
        """(pid, command line) of the processes whose parent is ``pid``."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append((int(d.name), cmd))
        return out

    def worker(self) -> int:
        pids = [p for p, cmd in self.children(self.proc.pid) if " rqworker " in cmd]
        assert len(pids) == 1, self.children(self.proc.pid)
        return pids[0]

    def redis_port(self) -> int:
        line = next(ln for ln in self.text().splitlines() if ln.startswith("Redis"))
        return int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/accounts/login/", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_two_demos_with_dying_processes(tmp_path):
    shared_port = free_port()
    shared = subprocess.Popen(["redis-server", "--port", str(shared_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
                              start_new_session=True)
    demos: list[Demo] = []
    try:
        wait_port(shared_port)
        url = f"redis://127.0.0.1:{shared_port}/0"
        a, b = Demo(tmp_path, "a", url), Demo(tmp_path, "b", url)
        demos = [a, b]
        # demo A's worker dies (with its work horse) while the pipeline runs
        a.wait_for("Import     :")
        worker = a.worker()
        victims = [worker] + [p for p, _ in a.children(worker)]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        a.wait_for("worker1 exited (status -9); restarted")
        assert a.worker() != worker
        for d in demos:  # both pipelines complete
            d.wait_for("Dashboard  :")
            assert "some stages failed" not in d.text(), d.text()[-2000:]
        # each demo has its own Redis; nobody used the one REDIS_URL named
        ports = {a.redis_port(), b.redis_port()}
        assert len(ports) == 2 and shared_port not in ports
        import redis

        assert redis.Redis(port=shared_port).dbsize() == 0
        # later deaths: the worker again, and the web server
        worker = a.worker()
        os.kill(worker, signal.SIGKILL)
        a.wait_for("worker1 exited (status -9); restarted", count=2)
        web = next(p for p, cmd in a.children(a.proc.pid) if " runserver " in cmd)
        os.kill(web, signal.SIGKILL)
        a.wait_for("web exited (status -9); restarted")
        wait_port(a.port)
        assert http_ok(a.port) and http_ok(b.port)
        assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        for d in demos:
            d.stop()
        shared.terminate()
        shared.wait(timeout=10)
    for d in demos:
        assert "stopped every process the demo started" in d.text()
        assert "Traceback" not in d.text()
    for port in ports:
        with pytest.raises(OSError):
            wait_port(port, timeout_s=1)
