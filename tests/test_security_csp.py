"""Content-Security-Policy on every response (issue 11, item 8).

Every kind of response — pages, static files, redirects, 403/404 pages, JSON, images, the
admin, the rater pages — carries the strict policy (no inline script or style); only
django-rq's staff dashboard gets inline scripts and styles. Our templates and the pages
the admin renders contain no inline script, style or event handler the policy would
block (the browser test ``tests/e2e/test_e2e_security.py`` checks it in Chromium).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from deidstudy.middleware import RELAXED_CSP, STRICT_CSP

ROOT = Path(__file__).resolve().parent.parent
INLINE = [
    (re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I), "inline <script>"),
    (re.compile(r"<style\b", re.I), "<style> element"),
    (re.compile(r"\sstyle\s*=", re.I), "style attribute"),
    (re.compile(r"\son[a-z]+\s*=", re.I), "event handler attribute"),
    (re.compile(r"javascript:", re.I), "javascript: URL"),
]


def inline_code(html: str) -> list[str]:
    """What in ``html`` a policy without 'unsafe-inline' would block."""
    return [what for rx, what in INLINE if rx.search(html)]


def test_policy_is_strict():
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "frame-ancestors 'none'", "object-src 'none'", "base-uri 'none'",
                      "form-action 'self'"):
        assert directive in STRICT_CSP
    assert "unsafe" not in STRICT_CSP and "data:" not in STRICT_CSP and "*" not in STRICT_CSP


def test_our_templates_have_no_inline_code():
    found = {str(p.relative_to(ROOT)): inline_code(p.read_text())
             for p in (ROOT / "templates").rglob("*.html")}
    assert {k: v for k, v in found.items() if v} == {}


def test_inline_code_detector_finds_inline_code():
    assert inline_code('<script>alert(1)</script>') == ["inline <script>"]
    assert inline_code('<p style="color:red" onclick="x()">') == ["style attribute",
                                                                  "event handler attribute"]
    assert inline_code('<script src="/static/a.js"></script>') == []


@pytest.fixture()
def researcher(db, settings, tmp_path):
    from django.contrib.auth.models import Group

    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = User.objects.create_user("res", password="pw")
    user.groups.add(Group.objects.create(name="researcher"))
    return user


def test_every_kind_of_response_has_the_policy(client, researcher):
    from surveys.models import Cohort

    cohort = Cohort.objects.create(name="c", owner=researcher)
    cohort.researchers.add(researcher)
    anonymous = {
        "/": 302, "/accounts/login/": 200, "/static/surveys/app.css": 200,
        "/static/studies/trial.js": 200, "/cohorts/": 403, f"/cohorts/{cohort.pk}/status.json": 403,
        "/no/such/page/": 404, "/take/start/": 200, "/take/i/not-a-token/": 404,
        "/take/trial/": 302, "/admin/": 302, "/admin/login/": 200,
    }
    for url, status in anonymous.items():
        r = client.get(url)
        assert r.status_code == status, url
        assert r["Content-Security-Policy"] == STRICT_CSP, url
        assert "camera=()" in r["Permissions-Policy"], url
    client.force_login(researcher)
    signed_in = {"/cohorts/": 200, f"/cohorts/{cohort.pk}/": 200,
                 f"/cohorts/{cohort.pk}/status.json": 200, "/studies/": 200,
                 f"/cohorts/{cohort.pk + 1}/": 404}
    for url, status in signed_in.items():
        r = client.get(url)
        assert r.status_code == status, url
        assert r["Content-Security-Policy"] == STRICT_CSP, url
        if r["Content-Type"].startswith("text/html"):
            assert inline_code(r.content.decode()) == [], url


def test_admin_pages_render_without_inline_code(admin_client, researcher):
    from django.apps import apps

    from surveys.models import Cohort

    Cohort.objects.create(name="c", owner=researcher)
    urls = ["/admin/", "/admin/auth/user/", f"/admin/auth/user/{researcher.pk}/change/",
            "/admin/surveys/cohort/add/"]
    urls += [f"/admin/surveys/{m._meta.model_name}/"
             for m in apps.get_app_config("surveys").get_models()]
    for url in urls:
        r = admin_client.get(url)
        assert r.status_code == 200, url
        assert r["Content-Security-Policy"] == STRICT_CSP
        assert inline_code(r.content.decode()) == [], (url, inline_code(r.content.decode()))


def test_rq_dashboard_gets_the_relaxed_policy(admin_client, monkeypatch):
    import fakeredis
    import redis

    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, *a, **k: fake))
    r = admin_client.get("/django-rq/")
    assert r.status_code == 200
    assert r["Content-Security-Policy"] == RELAXED_CSP
    assert "'unsafe-inline'" in RELAXED_CSP and "frame-ancestors 'none'" in RELAXED_CSP
