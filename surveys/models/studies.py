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
from .rowjob import STATUS_CHOICES_NO_PENDING, JobStatus

__all__ = [
    "DEFAULT_CONSENT",
    "DEFAULT_GROUPS",
    "DEFAULT_LAY_GROUPS",
    "DESIGNS",
    "PowerEstimate",
    "STUDY_CONDITIONS",
    "Answer",
    "Invitation",
    "Rater",
    "RaterStep",
    "Study",
    "Trial",
    "TrialImage",
    "new_token",
]

STUDY_CONDITIONS = ("control", "deidentified")
DEFAULT_GROUPS = ["general", "plastic surgeon"]
#: groups of the general public: asked no professional-experience question
DEFAULT_LAY_GROUPS = ["general"]
DESIGNS = [
    ("between", "each rater sees a subject in one condition only (Latin square across raters)"),
    ("within", "each rater sees a subject in every condition (paired; carry-over possible)"),
]
VIEW_ASSIGNMENTS = [
    ("balanced", "the same target/candidate view pairs in every condition"),
    ("random", "a view pair drawn per trial"),
]
PRIMARY_ANALYSES = [
    ("excluded", "without the raters excluded by the rule"),
    ("all", "all raters (exclusions as a sensitivity analysis)"),
]
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
    n_choices = models.PositiveSmallIntegerField(
        "number of choices", default=4, help_text="k candidates per trial (chance = 1/k)")
    conditions = models.JSONField(default=list, help_text="subset of control / deidentified")
    views = models.JSONField(default=list, help_text="render views used, e.g. yaw+0, yaw+30")
    design = models.CharField(
        "design", max_length=10, choices=DESIGNS, default="between",
        help_text="between: no carry-over, analysed with the mixed model; within: pairs for "
                  "McNemar, but a rater sees each subject's original before its de-identified "
                  "version or after it")
    view_assignment = models.CharField(
        "view assignment", max_length=10, choices=VIEW_ASSIGNMENTS, default="balanced",
        help_text="balanced: both conditions get the same target/candidate view pairs; random "
                  "(studies created before): drawn per trial")
    trials_per_rater = models.PositiveIntegerField("scored trials per rater", default=8)
    n_practice = models.PositiveSmallIntegerField("practice trials (with feedback)", default=2)
    n_catch = models.PositiveSmallIntegerField("attention-check (catch) trials", default=2)
    groups = models.JSONField(default=list, help_text="rater group names")
    lay_groups = models.JSONField(
        default=list, blank=True,
        help_text="groups of the general public (asked no professional-experience question)")
    ask_confidence = models.BooleanField("ask for confidence (1–5)", default=False)
    time_limit_s = models.PositiveIntegerField("time limit per trial (seconds)", null=True,
                                               blank=True)
    consent_text = models.TextField("consent text", default=DEFAULT_CONSENT)
    seed = models.BigIntegerField(help_text="seed of every randomisation of this study")
    exclusion_min_catch = models.FloatField(
        "exclude raters passing fewer than this fraction of catch trials", null=True,
        blank=True, default=0.5,
        help_text="e.g. 0.5: a rater who fails both of 2 catch trials is excluded; blank = no "
                  "attention rule. Frozen with the design.")
    exclude_incomplete = models.BooleanField(
        "exclude raters who did not finish", default=False,
        help_text="otherwise the answers of raters who stopped early are analysed")
    primary_analysis = models.CharField(
        "primary analysis", max_length=10, choices=PRIMARY_ANALYSES, default="excluded")
    closed_at = models.DateTimeField(null=True, blank=True,
                                     help_text="closed: no enrolment and no answer accepted")
    prereg_json = models.TextField(blank=True, default="",
                                   help_text="canonical JSON of the design and analysis plan, "
                                             "stored at freeze")
    prereg_hash = models.CharField(max_length=64, blank=True, default="",
                                   help_text="SHA-256 of prereg_json")
    panel_completion_url = models.URLField(
        "panel completion URL", blank=True, default="",
        help_text="e.g. https://app.prolific.com/submissions/complete?cc=CODE: raters who came "
                  "with a panel id are sent there once their last answer is stored")
    panel_completion_code = models.CharField("panel completion code", max_length=64,
                                             blank=True, default="")
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

    @property
    def closed(self) -> bool:
        """True once the researcher closed the study (no enrolment, no answer)."""
        return self.closed_at is not None

    def is_lay(self, group: str) -> bool:
        """True for a group of the general public (see :attr:`lay_groups`)."""
        return group in (self.lay_groups or [])

    @property
    def n_screens(self) -> int:
        """Screens a rater answers: practice + scored + catch trials."""
        return self.n_practice + self.trials_per_rater + self.n_catch


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
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["study", "group", "created"]

    def __str__(self) -> str:
        return f"invitation ({self.group})"

    def problem(self, now=None) -> str | None:
        """Why this invitation cannot be used now (``"revoked"``/``"expired"``/``"exhausted"``)
        or None."""
        now = now or timezone.now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "exhausted"
        return None


class RaterStep(models.TextChoices):
    """Where a rater is; the page of each step is ``studies:<value>``."""

    CONSENT = "consent", "consent"
    QUESTIONNAIRE = "questionnaire", "questionnaire"
    INSTRUCTIONS = "instructions", "instructions"
    TRIALS = "trials", "trials"
    DONE = "done", "done"
    DECLINED = "declined", "declined"


class Rater(models.Model):
    """An anonymous participant; ``code`` (R-0001) is the only name used in exports."""

    Step = RaterStep

    #: The moves a rater can make (:func:`surveys.studies.flow.advance` refuses others);
    #: a researcher's reset sends ``trials``/``done`` back to ``instructions``.
    TRANSITIONS = {
        Step.CONSENT: (Step.QUESTIONNAIRE, Step.DECLINED),
        Step.QUESTIONNAIRE: (Step.INSTRUCTIONS,),
        Step.INSTRUCTIONS: (Step.TRIALS,),
        Step.TRIALS: (Step.DONE, Step.INSTRUCTIONS),
        Step.DONE: (Step.INSTRUCTIONS,),
        Step.DECLINED: (),
    }
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="raters")
    invitation = models.ForeignKey(Invitation, on_delete=models.SET_NULL, null=True,
                                   related_name="raters")
    index = models.PositiveIntegerField(null=True, blank=True,
                                        help_text="0-based order of arrival in the study "
                                                  "(null for a researcher's preview)")
    group_index = models.PositiveIntegerField(
        null=True, blank=True, help_text="0-based order within the group of starting the trials "
                                         "(the counterbalancing slot)")
    code = models.CharField(max_length=16)
    resume_token = models.CharField(max_length=64, unique=True, default=new_token)
    group = models.CharField(max_length=64, help_text="from the invitation (locked)")
    step = models.CharField(max_length=16, default=Step.CONSENT, choices=Step.choices)
    consented_at = models.DateTimeField(null=True, blank=True)
    declined_at = models.DateTimeField(null=True, blank=True)
    years_experience = models.PositiveSmallIntegerField(null=True, blank=True)
    self_reported_profession = models.CharField(
        max_length=64, blank=True, default="",
        help_text="questionnaire answer; the analysed group is the invitation's")
    questionnaire = models.JSONField(default=dict, blank=True,
                                     help_text="other questionnaire answers")
    group_confirmed = models.BooleanField(default=False)
    started = models.DateTimeField(default=timezone.now)
    trials_started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    excluded_at = models.DateTimeField(null=True, blank=True,
                                       help_text="excluded by the researcher (not by the rule)")
    excluded_reason = models.CharField(max_length=200, blank=True, default="")
    reset_count = models.PositiveSmallIntegerField(default=0)
    is_preview = models.BooleanField(default=False,
                                     help_text="a researcher's preview: never analysed")
    panel_pid = models.CharField(max_length=64, blank=True, default="",
                                 help_text="recruitment panel participant id (e.g. PROLIFIC_PID)")
    panel_study_id = models.CharField(max_length=64, blank=True, default="")
    panel_session_id = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["study", "index"]
        constraints = [
            models.UniqueConstraint(fields=["study", "index"], name="uniq_rater_index"),
            models.UniqueConstraint(fields=["study", "panel_pid"], name="uniq_rater_panel_pid",
                                    condition=~models.Q(panel_pid="")),
            models.CheckConstraint(condition=models.Q(step__in=RaterStep.values),
                                   name="rater_step_known"),
        ]

    @property
    def group_mismatch(self) -> bool:
        """True when the questionnaire's profession contradicts the invitation's group: a
        professional group's rater reporting another profession, or a lay rater reporting
        one of the study's professional groups."""
        said = self.self_reported_profession
        if not said:
            return False
        if self.study.is_lay(self.group):
            return said in self.study.groups and not self.study.is_lay(said)
        return said != self.group

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
    enlarged = models.JSONField(
        default=list, blank=True,
        help_text="images the rater enlarged before answering: 0 = target, 1..k = candidates")
    answered_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"answer to {self.trial}"


class PowerEstimate(models.Model):
    """A simulation-based power / precision estimate of a study design (run as an RQ job)."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="power_estimates")
    created = models.DateTimeField(default=timezone.now)
    params = models.JSONField(default=dict)
    status = models.CharField(max_length=10, choices=STATUS_CHOICES_NO_PENDING,
                              default=JobStatus.QUEUED)
    result = models.JSONField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    rq_job_id = models.CharField(max_length=64, blank=True, default="")
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"power estimate {self.pk}"
