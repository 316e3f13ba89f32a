"""Blinded human re-identification studies (issue #6): design, invitations, raters, trials.

A :class:`Study` runs on a processed cohort: each trial shows a *target* render and
``n_choices`` candidate renders (originals), one of which is the target's subject.
Conditions: ``control`` (original target, original candidates from another view) and
``deidentified`` (de-identified target, original candidates). Practice trials (with
feedback) and catch trials (target identical to one candidate) are stored as trials of
``kind`` ``practice`` / ``catch`` and left out of the analysis. Practice trials show only
the subjects reserved for practice (:attr:`Study.practice_subjects`), which no main or
catch trial shows, so practice feedback cannot give away a scored answer.

Raters have no account: an :class:`Invitation` token (per group) creates a
:class:`Rater`, who is then known by an unguessable resume token kept in the session.
What a rater's browser sees of a trial is only opaque per-trial tokens
(:class:`TrialImage`); subjects, conditions and the right answer stay on the server.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

from .cohorts import Cohort, RenderImage, Subject

__all__ = [
    "DEFAULT_CONSENT",
    "DEFAULT_GROUPS",
    "STUDY_CONDITIONS",
    "Answer",
    "Invitation",
    "Rater",
    "Study",
    "Trial",
    "TrialImage",
    "new_token",
]

STUDY_CONDITIONS = ("control", "deidentified")
DEFAULT_GROUPS = ["general", "plastic surgeon"]
DEFAULT_CONSENT = (
    "You are invited to take part in a research study on the recognisability of faces "
    "rendered from CT scans. You will see computer renderings of heads and choose which "
    "candidate shows the same person as the target. The renderings are of research "
    "subjects; you will not learn who they are. Taking part is voluntary, you can stop at "
    "any time, and your answers are stored under a code, not your name."
)


def new_token(nbytes: int = 24) -> str:
    """A URL-safe random token with ``8 * nbytes`` bits of entropy (``secrets``)."""
    return secrets.token_urlsafe(nbytes)


class Study(models.Model):
    """Design of one k-alternative forced-choice study on a cohort (frozen once raters start)."""

    cohort = models.ForeignKey(Cohort, on_delete=models.PROTECT, related_name="studies")
    name = models.CharField(max_length=200)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                   related_name="studies")
    created = models.DateTimeField(default=timezone.now)
    n_choices = models.PositiveSmallIntegerField(default=4, help_text="k candidates per trial")
    conditions = models.JSONField(default=list, help_text="subset of control / deidentified")
    views = models.JSONField(default=list, help_text="render views used, e.g. yaw+0, yaw+30")
    trials_per_rater = models.PositiveIntegerField(default=16)
    n_practice = models.PositiveSmallIntegerField(default=2)
    n_catch = models.PositiveSmallIntegerField(default=2)
    groups = models.JSONField(default=list, help_text="rater group names")
    ask_confidence = models.BooleanField(default=False)
    time_limit_s = models.PositiveIntegerField(null=True, blank=True)
    consent_text = models.TextField(default=DEFAULT_CONSENT)
    seed = models.BigIntegerField(help_text="seed of every randomisation of this study")
    frozen_at = models.DateTimeField(null=True, blank=True,
                                     help_text="set when the first rater starts")
    practice_subjects = models.JSONField(
        null=True, blank=True, default=None,
        help_text="subject ids reserved for practice trials (never in main or catch trials), "
                  "drawn from the seed when the first rater starts; null = not reserved yet")

    class Meta:
        ordering = ["-created"]
        verbose_name_plural = "studies"

    def __str__(self) -> str:
        return self.name

    @property
    def frozen(self) -> bool:
        """True once a rater has started (the design can no longer change)."""
        return self.frozen_at is not None


class Invitation(models.Model):
    """A link/code for one rater group; optional expiry and maximum number of uses."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="invitations")
    group = models.CharField(max_length=64)
    token = models.CharField(max_length=64, unique=True, default=new_token)
    label = models.CharField(max_length=100, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    max_uses = models.PositiveIntegerField(null=True, blank=True)
    uses = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["study", "group", "created"]

    def __str__(self) -> str:
        return f"invitation ({self.group})"

    def problem(self, now=None) -> str | None:
        """Why this invitation cannot be used now (``"expired"``/``"exhausted"``) or None."""
        now = now or timezone.now()
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "exhausted"
        return None


class Rater(models.Model):
    """An anonymous participant; ``code`` (R-0001) is the only name used in exports."""

    STEPS = ("consent", "questionnaire", "instructions", "trials", "done")
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="raters")
    invitation = models.ForeignKey(Invitation, on_delete=models.SET_NULL, null=True,
                                   related_name="raters")
    index = models.PositiveIntegerField(help_text="0-based order of arrival in the study")
    code = models.CharField(max_length=16)
    resume_token = models.CharField(max_length=64, unique=True, default=new_token)
    group = models.CharField(max_length=64)
    step = models.CharField(max_length=16, default="consent")
    consented_at = models.DateTimeField(null=True, blank=True)
    years_experience = models.PositiveSmallIntegerField(null=True, blank=True)
    group_confirmed = models.BooleanField(default=False)
    started = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["study", "index"]
        constraints = [
            models.UniqueConstraint(fields=["study", "index"], name="uniq_rater_index"),
        ]

    def __str__(self) -> str:
        return self.code


class Trial(models.Model):
    """One trial of a rater: target, candidates, correct position (server side only)."""

    KINDS = [("practice", "practice"), ("main", "main"), ("catch", "catch")]
    rater = models.ForeignKey(Rater, on_delete=models.CASCADE, related_name="trials")
    position = models.PositiveIntegerField(help_text="0-based order within the rater's session")
    kind = models.CharField(max_length=10, choices=KINDS)
    condition = models.CharField(max_length=20)
    subject = models.ForeignKey(Subject, on_delete=models.PROTECT, related_name="+")
    target_view = models.CharField(max_length=32)
    candidate_view = models.CharField(max_length=32)
    candidates = models.JSONField(help_text="subject ids of the candidates, in display order")
    correct_index = models.PositiveSmallIntegerField(help_text="0-based slot of the right one")
    token = models.CharField(max_length=64, unique=True, default=new_token)
    shown_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["rater", "position"]
        constraints = [
            models.UniqueConstraint(fields=["rater", "position"], name="uniq_trial_position"),
        ]

    def __str__(self) -> str:
        return f"trial {self.position}"


class TrialImage(models.Model):
    """An image of a trial behind an opaque token: slot 0 = target, 1..k = candidates."""

    trial = models.ForeignKey(Trial, on_delete=models.CASCADE, related_name="images")
    slot = models.PositiveSmallIntegerField()
    image = models.ForeignKey(RenderImage, on_delete=models.PROTECT, related_name="+")
    token = models.CharField(max_length=64, unique=True, default=new_token)

    class Meta:
        ordering = ["trial", "slot"]
        constraints = [
            models.UniqueConstraint(fields=["trial", "slot"], name="uniq_trial_slot"),
        ]


class Answer(models.Model):
    """The one answer of a trial; times measured by the browser and by the server."""

    trial = models.OneToOneField(Trial, on_delete=models.CASCADE, related_name="answer")
    choice = models.PositiveSmallIntegerField(null=True, blank=True,
                                              help_text="1-based; None = timed out")
    correct = models.BooleanField()
    confidence = models.PositiveSmallIntegerField(null=True, blank=True)
    client_rt_ms = models.FloatField(null=True, blank=True)
    server_rt_ms = models.FloatField(null=True, blank=True)
    rt_suspect = models.BooleanField(default=False,
                                     help_text="browser time disagrees with the server's")
    timed_out = models.BooleanField(default=False)
    answered_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"answer to {self.trial}"
