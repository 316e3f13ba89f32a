"""Secrets in production (issue 11, item 1).

Runs ``manage.py`` in subprocesses with controlled environments, as an operator would:
production refuses to start without a private project secret and Django key (also with
debug on), and ``check --deploy`` passes only when every secret is set.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET_VARS = ("DEIDSTUDY_SECRET_KEY", "DEIDSTUDY_PROJECT_SECRET", "DEIDSTUDY_PRODUCTION",
               "DEIDSTUDY_DEBUG", "DEIDSTUDY_SECRET_KEY_FALLBACKS", "DATABASE_URL")


def manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    base.update(DEIDSTUDY_VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="deidstudy.settings")
    base.update(env)
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=120, check=False)


def strong() -> str:
    return secrets.token_urlsafe(48)


def test_production_refuses_to_start_without_project_secret(tmp_path):
    r = manage(tmp_path, "check", DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_SECRET_KEY=strong())
    assert r.returncode != 0
    assert "DEIDSTUDY_PROJECT_SECRET must be set" in r.stderr


def test_production_refuses_the_published_development_values(tmp_path):
    from django.conf import settings

    r = manage(tmp_path, "check", DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_SECRET_KEY=strong(),
               DEIDSTUDY_PROJECT_SECRET=settings.DEV_PROJECT_SECRET)
    assert r.returncode != 0 and "DEIDSTUDY_PROJECT_SECRET must be set" in r.stderr
    r = manage(tmp_path, "check", DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_SECRET_KEY=settings.DEV_SECRET_KEY,
               DEIDSTUDY_PROJECT_SECRET=strong())
    assert r.returncode != 0 and "DEIDSTUDY_SECRET_KEY must be set" in r.stderr


@pytest.mark.parametrize("debug", ["0", "1"])
def test_production_refuses_to_start_without_django_key_even_in_debug(tmp_path, debug):
    r = manage(tmp_path, "check", DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_DEBUG=debug,
               DEIDSTUDY_PROJECT_SECRET=strong())
    assert r.returncode != 0
    assert "DEIDSTUDY_SECRET_KEY must be set" in r.stderr


def test_wsgi_application_refuses_too(tmp_path):
    """gunicorn imports deidstudy.wsgi: it must not come up with a public secret."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    env.update(DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_SECRET_KEY=strong(),
               DEIDSTUDY_VAR_DIR=str(tmp_path / "var"))
    r = subprocess.run([sys.executable, "-c", "import deidstudy.wsgi"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0 and "DEIDSTUDY_PROJECT_SECRET must be set" in r.stderr


def test_check_deploy_passes_only_with_every_secret_set(tmp_path):
    key, project = strong(), strong()
    ok = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", DEIDSTUDY_PRODUCTION="1",
                DEIDSTUDY_SECRET_KEY=key, DEIDSTUDY_PROJECT_SECRET=project)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no issues" in ok.stdout + ok.stderr
    # without production mode the development values are reported as errors
    dev = manage(tmp_path, "check", "--deploy")
    assert dev.returncode != 0
    for code in ("deidstudy.E001", "deidstudy.E003", "deidstudy.E005"):
        assert code in dev.stderr, dev.stderr
    # a weak project secret, or one secret used twice
    weak = manage(tmp_path, "check", "--deploy", DEIDSTUDY_PRODUCTION="1",
                  DEIDSTUDY_SECRET_KEY=key, DEIDSTUDY_PROJECT_SECRET="short-secret")
    assert weak.returncode != 0 and "deidstudy.E002" in weak.stderr
    same = manage(tmp_path, "check", "--deploy", DEIDSTUDY_PRODUCTION="1",
                  DEIDSTUDY_SECRET_KEY=key, DEIDSTUDY_PROJECT_SECRET=key)
    assert same.returncode != 0 and "deidstudy.E004" in same.stderr
    # debug mode in production is an error (error pages show request data)
    debug = manage(tmp_path, "check", "--deploy", DEIDSTUDY_PRODUCTION="1", DEIDSTUDY_DEBUG="1",
                   DEIDSTUDY_SECRET_KEY=key, DEIDSTUDY_PROJECT_SECRET=project)
    assert debug.returncode != 0 and "deidstudy.E006" in debug.stderr


def test_check_deploy_warns_about_folders_open_to_others(tmp_path):
    var = tmp_path / "var"
    var.mkdir()
    var.chmod(0o755)
    r = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", DEIDSTUDY_PRODUCTION="1",
               DEIDSTUDY_SECRET_KEY=strong(), DEIDSTUDY_PROJECT_SECRET=strong())
    assert r.returncode != 0 and "deidstudy.W001" in r.stderr and "0755" in r.stderr


def test_secret_key_rotation_keeps_sessions_signed_with_the_old_key(tmp_path):
    """DEIDSTUDY_SECRET_KEY_FALLBACKS: a value signed with the old key still verifies."""
    old, new = strong(), strong()
    code = ("from django.core import signing; import sys; "
            "print(signing.dumps('x') if sys.argv[1] == 'sign' else signing.loads(sys.argv[2]))")

    def run(env: dict, *argv: str) -> subprocess.CompletedProcess:
        full = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
        full.update(env, DEIDSTUDY_VAR_DIR=str(tmp_path / "var"))
        return subprocess.run([sys.executable, "-c", "import django; django.setup(); " + code, *argv],
                              cwd=ROOT, env=full, capture_output=True, text=True, timeout=120,
                              check=False)

    signed = run({"DEIDSTUDY_SECRET_KEY": old}, "sign").stdout.strip()
    assert run({"DEIDSTUDY_SECRET_KEY": new}, "load", signed).returncode != 0
    r = run({"DEIDSTUDY_SECRET_KEY": new, "DEIDSTUDY_SECRET_KEY_FALLBACKS": old}, "load", signed)
    assert r.returncode == 0 and r.stdout.strip() == "x"


def test_deidentify_warns_when_the_development_secret_is_used(tmp_path):
    empty = tmp_path / "in"
    empty.mkdir()
    r = manage(tmp_path, "deidentify", str(empty), str(tmp_path / "out"))
    assert "DEIDSTUDY_PROJECT_SECRET is not set" in r.stderr
    r = manage(tmp_path, "deidentify", str(empty), str(tmp_path / "out2"),
               DEIDSTUDY_PROJECT_SECRET=strong())
    assert "DEIDSTUDY_PROJECT_SECRET is not set" not in r.stderr


@pytest.mark.parametrize("behind_proxy,expected", [("1", "200"), ("0", "301")])
def test_behind_a_tls_proxy_the_forwarded_scheme_is_trusted(tmp_path, behind_proxy, expected):
    """DEIDSTUDY_BEHIND_PROXY=1: a request the proxy marks https is not redirected again."""
    code = ("from django.test import Client; "
            "print(Client().get('/accounts/login/', HTTP_X_FORWARDED_PROTO='https').status_code)")
    r = manage(tmp_path, "shell", "-c", code, DEIDSTUDY_PRODUCTION="1",
               DEIDSTUDY_SECRET_KEY=strong(), DEIDSTUDY_PROJECT_SECRET=strong(),
               DEIDSTUDY_BEHIND_PROXY=behind_proxy, DEIDSTUDY_ALLOWED_HOSTS="testserver")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expected
