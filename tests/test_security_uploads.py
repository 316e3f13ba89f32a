"""Request bodies (issue 11, item 3): rights and size are checked before the body is read.

The WSGI tests hand Django a body stream that counts what is read and fails loudly after
1 MiB, announcing 100 MiB: an anonymous POST to a rater page or an upload into a cohort
without rights is answered without reading it; an upload over the limit too. The
integration test does the same against a running server over a socket.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import time

import pytest
from django.contrib.auth.models import Group, User
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client

from surveys.models import Cohort, CohortUpload

MiB = 1024 * 1024
BOUNDARY = "----deidstudyboundary"
CSRF = "a" * 32  # a CSRF secret as a cookie (what a GET of any form page hands out)


class Body(io.RawIOBase):
    """A multipart body announcing a file of ``size`` zero bytes, produced lazily; fails the
    test if more than ``max_read`` bytes are read."""

    def __init__(self, size: int, max_read: int = MiB, fields: dict | None = None) -> None:
        head = "".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                       for k, v in (fields or {}).items())
        head += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
                 f'filename="x.dcm"\r\nContent-Type: application/octet-stream\r\n\r\n')
        self.head = head.encode()
        self.tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        self.size = size
        self.length = len(self.head) + size + len(self.tail)
        self.pos = 0
        self.max_read = max_read

    def readable(self) -> bool:
        return True

    def _byte(self, i: int) -> int:
        if i < len(self.head):
            return self.head[i]
        if i < len(self.head) + self.size:
            return 0
        return self.tail[i - len(self.head) - self.size]

    def readinto(self, b) -> int:
        n = min(len(b), self.length - self.pos)
        if self.pos + n > self.max_read:
            raise AssertionError(f"the server read past {self.max_read} bytes of the body")
        for j in range(n):
            b[j] = self._byte(self.pos + j)
        self.pos += n
        return n


def wsgi_post(path: str, body: Body, cookies: str = "", **extra) -> tuple[int, bytes]:
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "localhost",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "localhost", "wsgi.url_scheme": "http", "wsgi.version": (1, 0),
        "wsgi.input": io.BufferedReader(body), "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}",
        "CONTENT_LENGTH": str(body.length),
        "HTTP_COOKIE": f"csrftoken={CSRF}" + (f"; {cookies}" if cookies else ""),
        "HTTP_X_CSRFTOKEN": CSRF,
    }
    environ.update(extra)
    status = []
    # as Django's test client does: the request signals must not close the test's
    # database connection (its transaction holds the test data; PostgreSQL would lose it)
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        chunks = WSGIHandler()(environ, lambda s, h, *a: status.append(s))
        content = b"".join(chunks)
        if hasattr(chunks, "close"):
            chunks.close()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return int(status[0].split()[0]), content


@pytest.fixture()
def world(db, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "data" / "tmp")
    (tmp_path / "data" / "tmp").mkdir(parents=True)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    group = Group.objects.create(name="researcher")
    owner = User.objects.create_user("owner", password="pw")
    other = User.objects.create_user("other", password="pw")
    owner.groups.add(group)
    other.groups.add(group)
    cohort = Cohort.objects.create(name="c", owner=owner)
    cohort.researchers.add(owner)
    return {"cohort": cohort, "owner": owner, "other": other, "tmp": tmp_path / "data" / "tmp"}


def session_cookie(user) -> str:
    c = Client()
    c.force_login(user)
    return f"sessionid={c.cookies['sessionid'].value}"


def stored_files(world) -> list:
    return [p for p in world["tmp"].rglob("*") if p.is_file()]


def test_anonymous_100mib_post_to_a_rater_page_is_not_read(world):
    body = Body(100 * MiB, fields={"code": "abc"})
    status, content = wsgi_post("/take/start/", body)
    assert status == 413 and body.pos == 0
    assert stored_files(world) == []


@pytest.mark.parametrize("who", [None, "other"])
def test_upload_without_rights_is_not_read(world, who):
    body = Body(100 * MiB)
    cookies = session_cookie(world[who]) if who else ""
    status, _ = wsgi_post(f"/cohorts/{world['cohort'].pk}/upload/", body, cookies)
    assert status == (403 if who is None else 404)
    assert body.pos == 0 and stored_files(world) == []
    assert CohortUpload.objects.count() == 0


def test_upload_over_the_limit_is_refused_unread(world, settings):
    settings.UPLOAD_MAX_BYTES = 50 * MiB
    body = Body(100 * MiB)
    status, content = wsgi_post(f"/cohorts/{world['cohort'].pk}/upload/", body,
                                session_cookie(world["owner"]), HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert status == 413 and body.pos == 0
    assert json.loads(content) == {"ok": False, "error": f"the upload is larger than {50 * MiB} bytes"}
    assert stored_files(world) == [] and CohortUpload.objects.count() == 0


def test_upload_the_disk_cannot_hold_is_refused_unread(world, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=300 * MiB))
    body = Body(100 * MiB)
    status, content = wsgi_post(f"/cohorts/{world['cohort'].pk}/upload/", body,
                                session_cookie(world["owner"]))
    assert status == 507 and b"free disk space" in content and body.pos == 0


def test_chunked_upload_without_length_is_refused(world):
    body = Body(10)
    status, _ = wsgi_post(f"/cohorts/{world['cohort'].pk}/upload/", body,
                          session_cookie(world["owner"]), CONTENT_LENGTH="",
                          HTTP_TRANSFER_ENCODING="chunked")
    assert status == 411


def test_allowed_upload_is_received(world, settings, monkeypatch, django_capture_on_commit_callbacks):
    import fakeredis
    from rq import Queue

    from surveys.processing import jobs

    q = Queue("pipeline", connection=fakeredis.FakeStrictRedis())
    monkeypatch.setattr(jobs, "get_pipeline_queue", lambda: q)
    body = Body(2 * MiB, max_read=10 * MiB)
    with django_capture_on_commit_callbacks(execute=True):
        status, content = wsgi_post(f"/cohorts/{world['cohort'].pk}/upload/", body,
                                    session_cookie(world["owner"]),
                                    HTTP_X_REQUESTED_WITH="XMLHttpRequest")
    assert status == 200, content
    up = CohortUpload.objects.get()
    assert (up.n_received, up.bytes_received) == (1, 2 * MiB)
    assert body.pos == body.length


def test_rater_pages_take_no_files(world, monkeypatch):
    """A file sent to a page without uploads is dropped unstored; the form still works."""
    from django.core.files import uploadhandler

    made = []
    real = uploadhandler.TemporaryFileUploadHandler.new_file
    monkeypatch.setattr(uploadhandler.TemporaryFileUploadHandler, "new_file",
                        lambda self, *a, **k: made.append(a) or real(self, *a, **k))
    body = Body(MiB // 2, fields={"code": "not-a-real-code"})
    status, _ = wsgi_post("/take/start/", body)
    assert status in (200, 302)
    assert made == [] and stored_files(world) == []
    # a body over the form limit is refused whatever it holds
    status, _ = wsgi_post("/take/trial/", Body(3 * MiB))
    assert status == 413


@pytest.mark.integration
@pytest.mark.slow
def test_running_server_answers_before_the_body(tmp_path):
    """Against runserver: headers announcing 100 MiB, no body sent → answered at once."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    from tests.e2e.procs import free_port, start_platform

    plat = start_platform(tmp_path / "var")
    try:
        port = free_port()
        plat.start_server(port)
        head = (f"POST /take/start/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {100 * MiB}\r\nCookie: csrftoken={CSRF}\r\n"
                f"X-CSRFToken: {CSRF}\r\n\r\n").encode()
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + f"--{BOUNDARY}\r\n".encode())
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert time.monotonic() - t0 < 5
        assert not [p for p in (tmp_path / "var" / "data" / "tmp").rglob("*") if p.is_file()]
    finally:
        plat.stop()
