"""Security records: login throttling counters and the audit of identity-table views.

Neither table holds a patient identifier. :class:`LoginThrottle` keys are keyed hashes of
the user name / client address typed at sign-in (people sometimes type a password into the
user-name field, so it is never stored as typed).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from .cohorts import Cohort

__all__ = ["IdentityAccess", "LoginThrottle"]


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


class IdentityAccess(models.Model):
    """One view of a cohort's identity table (pseudonym → patient identity): who, when, what.

    Written before the table is sent (no record, no table); kept when the cohort or the
    user is deleted (``cohort_label`` / ``username`` keep what they were); read-only in the
    admin. Listed on the cohort page.
    """

    ACTIONS = [("mapping_csv", "identity mapping downloaded (CSV)")]
    cohort = models.ForeignKey(Cohort, on_delete=models.SET_NULL, null=True, blank=True,
                               related_name="identity_accesses")
    cohort_label = models.CharField(max_length=220, help_text="cohort id and name at the time")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True,
                             blank=True, related_name="+")
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=20, choices=ACTIONS, default="mapping_csv")
    n_subjects = models.PositiveIntegerField(default=0, help_text="rows of the table shown")
    client_address = models.CharField(max_length=64, blank=True)
    at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-at", "-pk"]
        verbose_name = "identity table view"

    def __str__(self) -> str:
        return (f"{self.username} viewed the identity table of {self.cohort_label} "
                f"at {self.at:%Y-%m-%d %H:%M}")
