"""Shared pytest fixtures and the ``postgres`` marker.

Fixtures: ``fake_queue`` (the pipeline's RQ queue on an in-memory fakeredis; jobs are
queued, not run, unless a test runs them), ``synthetic_cohort`` (a session-wide cache of
synthetic DICOM cohorts from :mod:`tests.factories.dicom_cohorts`: ``synthetic_cohort(n,
seed)`` returns the same read-only folder for the same arguments; copy it before
changing it).

``postgres``: every test that uses the database (``django_db`` marker or a database
fixture) is marked automatically; tests that reach the database another way (worker
processes, a browser against a live server) carry the marker themselves. ``make test``
runs ``-m postgres`` a second time on PostgreSQL, so no hand-kept file list can drift.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deidstudy.settings")

DB_FIXTURES = frozenset({"db", "transactional_db", "live_server", "django_db_reset_sequences",
                         "django_db_serialized_rollback"})


def uses_database(item: pytest.Item) -> bool:
    """True when pytest-django gives ``item`` the test database."""
    return (item.get_closest_marker("django_db") is not None
            or bool(DB_FIXTURES & set(getattr(item, "fixturenames", ()))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if uses_database(item) and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture()
def fake_queue(monkeypatch):
    """The pipeline queue on fakeredis (``surveys.processing.jobs.get_pipeline_queue`` patched)."""
    import fakeredis
    from rq import Queue

    from surveys.processing import jobs

    q = Queue("pipeline", connection=fakeredis.FakeStrictRedis())
    monkeypatch.setattr(jobs, "get_pipeline_queue", lambda: q)
    return q


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory) -> Callable[..., Path]:
    """``synthetic_cohort(n, seed=…, size="tiny")`` → folder of ``n`` fake patients (cached)."""
    from tests.factories.dicom_cohorts import write_synthetic_cohort

    made: dict[tuple, Path] = {}

    def get(n: int, *, seed: int, size: str = "tiny") -> Path:
        key = (n, seed, size)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"synth-{n}-{seed}-{size}") / "cohort"
            write_synthetic_cohort(folder, n, size=size, seed=seed)
            made[key] = folder
        return made[key]

    return get
