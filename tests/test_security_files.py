"""Private files (issue 11, item 8): the database, originals, de-identified and derived
files are created 0600 in 0700 folders by every platform process.

The test process itself runs with umask 022 (as a shell usually does) while it starts
the platform, so the modes come from the platform processes (``manage.py migrate``,
``import_cohort``, the RQ worker and its work horse), not from the test.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.procs import ROOT, start_platform

pytestmark = [
    pytest.mark.postgres,  # its worker or server processes use the announced database
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]


def modes_below(root: Path, skip: set[Path]) -> dict[str, int]:
    """``relative path → permission bits`` of every file and folder below ``root``."""
    out = {}
    for p in [root, *root.rglob("*")]:
        if p in skip or p.is_symlink():
            continue
        out[str(p.relative_to(root)) + ("/" if p.is_dir() else "")] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_platform_creates_private_files(tmp_path, umask_022):
    from tests.factories.dicom_cohorts import write_synthetic_cohort

    var = tmp_path / "var"
    plat = start_platform(var)  # migrate + create_researcher in subprocesses
    try:
        src = tmp_path / "src"
        write_synthetic_cohort(src, 1, size="tiny", seed=1)
        plat.manage("import_cohort", str(src), "--name", "modes", "--owner", "alice", "--enqueue")
        cohort = plat.query("SELECT id FROM surveys_cohort WHERE name = 'modes'")[0][0]
        plat.start_worker("w")
        plat.wait_settled(cohort, timeout_s=170)
    finally:
        plat.stop()
    own = {var, var / "worker-w.log"}  # made by this test process (see the deploy check)
    modes = modes_below(var, own)
    files = {p: m for p, m in modes.items() if not p.endswith("/")}
    folders = {p: m for p, m in modes.items() if p.endswith("/")}
    # what must be there: the database, originals, de-identified DICOM, renders
    assert plat.postgres_url or "test.sqlite3" in files
    for part in ("/orig/", "/deid/", "/derived/"):
        assert any(part in p and p.endswith((".dcm", ".png")) for p in files), part
    assert {p: oct(m) for p, m in files.items() if m != 0o600} == {}
    assert {p: oct(m) for p, m in folders.items() if m != 0o700} == {}


def test_umask_can_be_relaxed_for_a_group(tmp_path, umask_022):
    """DEIDSTUDY_UMASK=027 (e.g. a group of operators) is honoured."""
    env = dict(os.environ, DEIDSTUDY_VAR_DIR=str(tmp_path / "var"), DEIDSTUDY_UMASK="027")
    env.pop("DATABASE_URL", None)
    r = subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "var" / "deidstudy.sqlite3").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o750
