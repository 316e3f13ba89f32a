"""Login throttling: a temporary lockout after repeated failed sign-ins.

Counted per account name (``LOGIN_FAILURE_LIMIT`` failures, default 5) and per client
address (``LOGIN_IP_FAILURE_LIMIT``, default 30, so one address cannot try many accounts)
within ``LOGIN_LOCKOUT_SECONDS`` (default 900); reaching a limit locks that name or
address for ``LOGIN_LOCKOUT_SECONDS``. Attempts while locked are refused without checking
the password and do not extend the lock. A successful sign-in clears its account's
counter. Unknown account names are counted like real ones, so the lockout does not
reveal which accounts exist.

Enforced by :class:`ThrottledModelBackend` (every sign-in: the login page, the admin,
any ``authenticate(request, …)``); :class:`ThrottledAuthenticationForm` tells the user
how long to wait. Counters live in the database (:class:`surveys.models.LoginThrottle`),
shared by every web process; names and addresses are stored as keyed hashes only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from datetime import timedelta

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from .models import LoginThrottle

log = logging.getLogger("deidstudy.security")


def _limits() -> tuple[int, int, int]:
    return (int(getattr(settings, "LOGIN_FAILURE_LIMIT", 5)),
            int(getattr(settings, "LOGIN_IP_FAILURE_LIMIT", 30)),
            int(getattr(settings, "LOGIN_LOCKOUT_SECONDS", 900)))


def client_address(request: HttpRequest | None) -> str:
    """The client's address: ``REMOTE_ADDR``, or the last entry of the header named by
    ``LOGIN_CLIENT_IP_HEADER`` (e.g. ``HTTP_X_FORWARDED_FOR``, set by a trusted proxy)."""
    if request is None:
        return ""
    header = getattr(settings, "LOGIN_CLIENT_IP_HEADER", "")
    if header and request.META.get(header):
        return request.META[header].split(",")[-1].strip()
    return request.META.get("REMOTE_ADDR", "")


def _key(kind: str, value: str) -> str:
    digest = hmac.new(settings.SECRET_KEY.encode(), f"{kind}:{value}".encode(),
                      hashlib.sha256).hexdigest()
    return f"{kind}:{digest}"


def _keys(request: HttpRequest | None, username: str | None) -> list[tuple[str, int]]:
    """(key, failure limit) of the account name and the client address of an attempt."""
    user_limit, ip_limit, _ = _limits()
    keys = []
    if username:
        keys.append((_key("user", username.strip().casefold()), user_limit))
    address = client_address(request)
    if address and ip_limit > 0:
        keys.append((_key("addr", address), ip_limit))
    return keys


def locked_seconds(request: HttpRequest | None, username: str | None) -> int:
    """Seconds until sign-ins with this name from this address are accepted again (0: now)."""
    keys = [k for k, limit in _keys(request, username) if limit > 0]
    if not keys:
        return 0
    now = timezone.now()
    until = (LoginThrottle.objects.filter(key__in=keys, locked_until__gt=now)
             .order_by("-locked_until").values_list("locked_until", flat=True).first())
    return 0 if until is None else max(1, math.ceil((until - now).total_seconds()))


def register_failure(request: HttpRequest | None, username: str | None) -> None:
    """Count a failed sign-in; lock the name or address that reaches its limit."""
    _, _, window = _limits()
    now = timezone.now()
    with transaction.atomic():
        for key, limit in _keys(request, username):
            if limit <= 0:
                continue
            row, _ = LoginThrottle.objects.select_for_update().get_or_create(
                key=key, defaults={"window_start": now})
            if row.window_start < now - timedelta(seconds=window):
                row.failures, row.window_start = 0, now
            row.failures += 1
            if row.failures >= limit:
                row.locked_until = now + timedelta(seconds=window)
                row.failures, row.window_start = 0, now
                log.warning("sign-in locked for %d s after %d failures (%s…)", window, limit,
                            key[:14])
            row.save()
        LoginThrottle.objects.filter(window_start__lt=now - timedelta(days=1)).filter(
            Q(locked_until__isnull=True) | Q(locked_until__lt=now)).delete()


def clear(username: str | None) -> None:
    """Forget the failures of an account name (after a successful sign-in)."""
    if username:
        LoginThrottle.objects.filter(key=_key("user", username.strip().casefold())).delete()


class ThrottledModelBackend(ModelBackend):
    """Django's model backend behind the lockout: a locked name or address is refused
    (``PermissionDenied``) before the password is checked; failures are counted."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        if username is None or password is None:
            return None
        if locked_seconds(request, username):
            raise PermissionDenied("sign-in temporarily locked")
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            register_failure(request, username)
        else:
            clear(username)
        return user


def lockout_message(seconds: int) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return (f"Too many failed sign-ins. Sign-in is locked for {minutes} minute"
            f"{'s' if minutes != 1 else ''}; try again later.")


class _LockoutMixin:
    """Says that (and how long) sign-in is locked instead of "wrong password"."""

    def clean(self):
        username = self.cleaned_data.get("username")
        wait = locked_seconds(self.request, username)
        if wait:
            raise ValidationError(lockout_message(wait), code="locked")
        try:
            return super().clean()
        except ValidationError:
            wait = locked_seconds(self.request, username)
            if wait:  # this failure reached the limit
                raise ValidationError(lockout_message(wait), code="locked") from None
            raise


class ThrottledAuthenticationForm(_LockoutMixin, AuthenticationForm):
    """The sign-in form of ``/accounts/login/``."""


class ThrottledAdminAuthenticationForm(_LockoutMixin, AdminAuthenticationForm):
    """The sign-in form of the admin."""


class ThrottledLoginView(LoginView):
    """Django's login view with :class:`ThrottledAuthenticationForm`; answers 429 while locked."""

    authentication_form = ThrottledAuthenticationForm

    def form_invalid(self, form) -> HttpResponse:
        response = super().form_invalid(form)
        if any(e.code == "locked" for e in form.errors.as_data().get("__all__", [])):
            response.status_code = 429
        return response
