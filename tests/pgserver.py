"""A throw-away PostgreSQL server for the test-suite (Debian's ``postgresql`` binaries).

    python -m tests.pgserver -- python -m pytest -q tests/test_web_views.py

starts a private cluster in a temporary folder (``initdb``, trust authentication on
127.0.0.1 and a private socket folder only, a free port, durability off for speed),
runs the command with ``DATABASE_URL=postgres://deidstudy@127.0.0.1:PORT/deidstudy``
and ``DEIDSTUDY_TEST_DATABASE=postgresql`` in its environment, then stops the server
and deletes the folder, also when the command fails or is interrupted. As root the
server runs as the ``postgres`` system user (PostgreSQL refuses to run as root).
Exit status: the command's, or 3 when no PostgreSQL binaries are installed (then it
says how to install them; with ``--skip-if-missing`` before ``--`` that is a note and
status 0, for machines where the packages cannot be installed).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.procs import free_port

NO_POSTGRES = 3


def pg_bindir() -> Path | None:
    """Folder of ``initdb``/``pg_ctl`` (newest Debian version first), or None."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                       key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                       reverse=True):
        if (Path(cand) / "initdb").is_file() and (Path(cand) / "pg_ctl").is_file():
            return Path(cand)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@contextmanager
def postgres_server(user: str = "deidstudy", db: str = "deidstudy") -> Iterator[str]:
    """Start a private PostgreSQL cluster; yield its URL; stop and delete it afterwards."""
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    as_root = os.geteuid() == 0
    prefix: list[str] = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="deidstudy-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_root:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    root.chmod(0o700)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8"

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, env=env, cwd=root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8",
            "--no-sync", "--no-instructions")
        opts = (f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", opts,
            "-w", "-t", "60", "start")
        started = True
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db)
        yield f"postgres://{user}@127.0.0.1:{port}/{db}"
    finally:
        if started:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                            "stop"], env=env, cwd=root, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    skip_if_missing = bool(args) and args[0] == "--skip-if-missing"
    if skip_if_missing:
        args = args[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    if pg_bindir() is None:
        print("NOTE: PostgreSQL tests skipped: no PostgreSQL server binaries; as root: "
              "apt-get install postgresql", file=sys.stderr)
        return 0 if skip_if_missing else NO_POSTGRES
    t0 = time.monotonic()
    with postgres_server() as url:
        print(f"PostgreSQL ready on {url.split('@')[1]} ({time.monotonic() - t0:.1f} s)", flush=True)
        env = dict(os.environ, DATABASE_URL=url, DEIDSTUDY_TEST_DATABASE="postgresql")
        try:
            return subprocess.run(args, env=env, check=False).returncode
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
