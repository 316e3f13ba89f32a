"""Security records: login throttling counters and the audit of identity-table views.

Neither table holds a patient identifier. :class:`LoginThrottle` keys are keyed hashes of
the user name / client address typed at sign-in (people sometimes type a password into the
user-name field, so it is never stored as typed).
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["LoginThrottle"]


class LoginThrottle(models.Model):
    """Failed sign-ins of one account name or one client address (see surveys.login_throttle)."""

    key = models.CharField(max_length=80, unique=True,
                           help_text="kind + keyed hash of the user name or client address")
    failures = models.PositiveIntegerField(default=0)
    window_start = models.DateTimeField(default=timezone.now)
    locked_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "login throttle"

    def __str__(self) -> str:
        return f"{self.key[:14]}…: {self.failures} failure(s)"
