"""Integration: real redis-server and real rqworker processes run the per-subject pipeline.

* a worker killed (SIGKILL to the worker and its work horse) in the middle of a stage
  leaves the stage re-runnable: a new worker recovers it and the subject completes;
* two workers on one queue process every stage of every subject exactly once.

The test process never opens the Django database: state is read with sqlite3 from
the platform's own database file.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.procs import start_platform

pytestmark = [
    pytest.mark.postgres,  # its worker or server processes use the announced database
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server not installed (scripts/system_deps.sh installs it)"),
]


def _make_cohort(plat, tmp_path: Path, n: int) -> int:
    from tests.factories.dicom_cohorts import write_synthetic_cohort  # no DB access

    src = tmp_path / "src"
    # seed 1: every tiny head aligns (the bone-template alignment rejects about 1 in 30
    # tiny 6-mm heads, e.g. seed 7's third subject; that is the pipeline's business, not
    # the queue's, which is what these tests are about)
    write_synthetic_cohort(src, n, size="tiny", seed=1)
    out = plat.manage("import_cohort", str(src), "--name", "integration", "--owner", "alice",
                      "--enqueue").stdout
    assert f"imported {n} subject(s)" in out
    return plat.query("SELECT id FROM surveys_cohort WHERE name = 'integration'")[0][0]


@pytest.fixture()
def platform(tmp_path):
    plat = start_platform(tmp_path / "var")
    try:
        yield plat
    finally:
        plat.stop()


def test_killed_worker_leaves_stage_rerunnable(platform, tmp_path):
    cohort = _make_cohort(platform, tmp_path, 1)
    w1 = platform.start_worker("w1")
    # wait until the slowest stage (surfaces) is running, then kill worker + horse
    t0 = time.monotonic()
    while True:
        running = platform.query(
            "SELECT r.id, r.worker_pid FROM surveys_stagerun r WHERE r.status = 'running' "
            "AND r.stage = 'surfaces'")
        if running:
            break
        assert time.monotonic() - t0 < 120, platform.query("SELECT stage, status FROM surveys_stagerun")
        time.sleep(0.05)
    run_id, horse_pid = running[0]
    # rq's work horse runs in its own process group: kill the worker, then the horse (in
    # this order: a worker that outlives its horse re-queues the horse's stage at once)
    platform.kill_group(w1)
    os.kill(horse_pid, signal.SIGKILL)
    assert w1.poll() is not None
    status = platform.query("SELECT status, attempts FROM surveys_stagerun WHERE id = ?", (run_id,))
    assert status == [("running", 1)]  # the dead worker could not report anything
    # the derived outputs of the killed stage are absent or complete, never half-written
    w2 = platform.start_worker("w2")
    rows = platform.wait_settled(cohort, timeout_s=150)
    assert {r[2] for r in rows} == {"done"}
    attempts = {r[1]: r[3] for r in rows}
    assert attempts["surfaces"] == 2  # killed attempt + the recovered one
    assert attempts["import"] == attempts["deidentify"] == attempts["embeddings"] == 1
    images = platform.query("SELECT COUNT(*) FROM surveys_renderimage WHERE kind = 'render'")[0][0]
    assert images == 4  # 2 views × original/deid, replaced (not duplicated) by the re-run
    leftovers = [p for p in (platform.var_dir / "data").rglob("*.tmp") if p.is_file()]
    assert leftovers == []
    assert w2.poll() is None


def test_two_workers_process_each_subject_exactly_once(platform, tmp_path):
    n = 4
    cohort = _make_cohort(platform, tmp_path, n)
    platform.start_worker("a")
    platform.start_worker("b")
    rows = platform.wait_settled(cohort, timeout_s=170)
    assert len(rows) == 4 * n
    assert all(r[2] == "done" and r[3] == 1 for r in rows), rows
    # both workers took part and no job was a duplicate ("skipped" results would show in logs)
    # rq logs "Successfully completed" just after the job returned (after our DB update)
    t0 = time.monotonic()
    while True:
        logs = {name: (platform.var_dir / f"worker-{name}.log").read_text() for name in ("a", "b")}
        done = {name: text.count("Successfully completed") for name, text in logs.items()}
        if sum(done.values()) >= 4 * n or time.monotonic() - t0 > 15:
            break
        time.sleep(0.2)
    assert sum(done.values()) == 4 * n, done
    assert all(v > 0 for v in done.values()), done
    pids = platform.query("SELECT COUNT(DISTINCT worker_pid) FROM surveys_stagerun")[0][0]
    assert pids >= 2
    # the re-identification summary was computed once all embeddings were in
    reid = platform.query("SELECT n_subjects, rank1, auc FROM surveys_reidsummary")
    assert reid and reid[0][0] == n and 0.0 <= reid[0][1] <= 1.0 and 0.0 <= reid[0][2] <= 1.0
    for text in logs.values():
        assert "FAKEPATIENT" not in text and "MRN" not in text
