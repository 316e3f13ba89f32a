"""Login throttling (issue 11, item 8): repeated failed sign-ins lock the account name and
the client address for a while, on the login page and in the admin alike."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from django.utils import timezone

from surveys.models import LoginThrottle

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"


@pytest.fixture()
def user(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.LOGIN_FAILURE_LIMIT = 5
    settings.LOGIN_IP_FAILURE_LIMIT = 30
    settings.LOGIN_LOCKOUT_SECONDS = 900
    u = User.objects.create_user("alice", password="right-pw-1")
    u.groups.add(Group.objects.create(name="researcher"))
    return u


def attempt(client: Client, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post(LOGIN, {"username": username, "password": password}, REMOTE_ADDR=ip)


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_account_is_locked_after_five_failures(client, user):
    for n in range(4):
        r = attempt(client, "alice", f"wrong-{n}")
        assert r.status_code == 200 and b"correct username and password" in r.content
    r = attempt(client, "alice", "wrong-4")  # the fifth failure locks and says so
    assert r.status_code == 429 and b"locked for 15 minutes" in r.content
    # now even the right password is refused, without a password check
    r = attempt(client, "alice", "right-pw-1")
    assert r.status_code == 429 and b"Too many failed sign-ins" in r.content
    assert not signed_in(client)
    # from another address too (the account is locked), but other accounts are not
    r = attempt(Client(), "alice", "right-pw-1", ip="10.9.9.9")
    assert r.status_code == 429
    bob = User.objects.create_user("bob", password="bob-pw-1")
    c = Client()
    r = attempt(c, "bob", "bob-pw-1")
    assert r.status_code == 302 and signed_in(c) and int(c.session["_auth_user_id"]) == bob.pk


def test_lock_expires_and_attempts_while_locked_do_not_extend_it(client, user):
    for n in range(5):
        attempt(client, "alice", f"wrong-{n}")
    row = LoginThrottle.objects.get(key__startswith="user:")
    until = row.locked_until
    assert until > timezone.now() + timedelta(seconds=890)
    for _ in range(3):
        assert attempt(client, "alice", "wrong").status_code == 429
    row.refresh_from_db()
    assert row.locked_until == until
    # 15 minutes later the right password works and clears the account's counter
    LoginThrottle.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
    r = attempt(client, "alice", "right-pw-1")
    assert r.status_code == 302 and signed_in(client)
    assert not LoginThrottle.objects.filter(key__startswith="user:").exists()


def test_success_clears_the_count(client, user):
    for n in range(4):
        attempt(client, "alice", f"wrong-{n}")
    assert attempt(Client(), "alice", "right-pw-1").status_code == 302
    for n in range(4):
        assert attempt(client, "alice", f"wrong-{n}").status_code == 200
    assert attempt(Client(), "alice", "right-pw-1").status_code == 302


def test_unknown_names_are_locked_the_same_way(client, user):
    """The lockout does not tell which accounts exist."""
    for n in range(5):
        attempt(client, "nobody", f"wrong-{n}")
    r_unknown = attempt(client, "nobody", "x")
    for n in range(5):
        attempt(client, "alice", f"wrong-{n}")
    r_known = attempt(client, "alice", "x")
    assert r_unknown.status_code == r_known.status_code == 429
    def page(r) -> str:  # without the per-response CSRF token
        return re.sub(r'name="csrfmiddlewaretoken" value="[^"]+"', "", r.content.decode())

    assert page(r_unknown).replace("nobody", "alice") == page(r_known)


def test_one_address_cannot_try_many_accounts(client, user, settings):
    settings.LOGIN_IP_FAILURE_LIMIT = 8
    for n in range(8):  # 8 different names, 1 failure each: no account reaches 5
        attempt(client, f"guess{n}", "pw", ip="192.0.2.7")
    r = attempt(client, "alice", "right-pw-1", ip="192.0.2.7")
    assert r.status_code == 429 and not signed_in(client)
    r = attempt(client, "alice", "right-pw-1", ip="192.0.2.8")
    assert r.status_code == 302 and signed_in(client)


def test_client_address_from_a_trusted_proxy_header(client, user, settings):
    settings.LOGIN_IP_FAILURE_LIMIT = 3
    settings.LOGIN_CLIENT_IP_HEADER = "HTTP_X_FORWARDED_FOR"
    for n in range(3):
        client.post(LOGIN, {"username": f"g{n}", "password": "x"}, REMOTE_ADDR="10.0.0.254",
                    HTTP_X_FORWARDED_FOR="spoofed, 198.51.100.4")
    r = client.post(LOGIN, {"username": "alice", "password": "right-pw-1"},
                    REMOTE_ADDR="10.0.0.254", HTTP_X_FORWARDED_FOR="198.51.100.5")
    assert r.status_code == 302  # another client behind the same proxy
    r = Client().post(LOGIN, {"username": "alice", "password": "right-pw-1"},
                      REMOTE_ADDR="10.0.0.254", HTTP_X_FORWARDED_FOR="x, 198.51.100.4")
    assert r.status_code == 429


def test_admin_sign_in_is_throttled(client, user):
    User.objects.create_superuser("root", password="root-pw-1")
    for n in range(5):
        r = client.post("/admin/login/", {"username": "root", "password": f"no-{n}",
                                          "next": "/admin/"})
        assert r.status_code == 200
    r = client.post("/admin/login/", {"username": "root", "password": "root-pw-1", "next": "/admin/"})
    assert b"Too many failed sign-ins" in r.content and not signed_in(client)
    # authenticate() without a request (e.g. a script) is counted by account name as well
    c = Client()
    assert c.login(username="root", password="root-pw-1") is False


def test_names_are_stored_and_logged_only_as_keyed_hashes(client, user, caplog):
    typed = "my-Secret-Password-typed-as-name"
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            attempt(client, typed, "x")
    assert LoginThrottle.objects.count() == 2  # the name and the address
    for row in LoginThrottle.objects.all():
        assert typed.lower() not in row.key.lower() and "10.0.0.1" not in row.key
    assert "sign-in locked" in caplog.text
    assert typed not in caplog.text and "10.0.0.1" not in caplog.text
