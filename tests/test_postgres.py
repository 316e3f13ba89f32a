"""The suite's database backend: SQLite by default; PostgreSQL under ``tests.pgserver``.

``make test`` runs the database-facing tests a second time on a private PostgreSQL
server (``python -m tests.pgserver -- pytest …``); these checks make sure that pass
really talks to PostgreSQL, and that the helper starts and removes its server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from tests import pgserver

ROOT = Path(__file__).resolve().parent.parent
ON_POSTGRES = os.environ.get("DEIDSTUDY_TEST_DATABASE") == "postgresql"


@pytest.mark.django_db
def test_the_suite_runs_on_the_announced_database():
    if ON_POSTGRES:
        assert connection.vendor == "postgresql"
        assert connection.cursor().connection.info.server_version >= 130000
    else:
        assert connection.vendor == "sqlite"
        # the web server and workers share the file in WAL mode (the test database is in memory)
        assert "journal_mode=WAL" in connection.settings_dict["OPTIONS"]["init_command"]


@pytest.mark.skipif(pgserver.pg_bindir() is None, reason="PostgreSQL server binaries not installed")
def test_pgserver_starts_a_private_server_and_removes_it(tmp_path):
    probe = ("import os, psycopg; c = psycopg.connect(os.environ['DATABASE_URL']); "
             "print(c.execute('show data_directory').fetchone()[0]); "
             "print(os.environ['DEIDSTUDY_TEST_DATABASE'])")
    r = subprocess.run([sys.executable, "-m", "tests.pgserver", "--", sys.executable, "-c", probe],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    data_dir, flag = r.stdout.strip().splitlines()[-2:]
    assert flag == "postgresql" and "deidstudy-pg-" in data_dir
    assert not Path(data_dir).exists()  # stopped and deleted
    failing = subprocess.run([sys.executable, "-m", "tests.pgserver", "--", sys.executable, "-c",
                              "raise SystemExit(7)"], cwd=ROOT, capture_output=True, timeout=120,
                             check=False)
    assert failing.returncode == 7  # the command's status is passed on
