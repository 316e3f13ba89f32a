"""Cohorts of CT series, their pseudonymised subjects and the per-subject pipeline stages.

Nothing in these tables identifies a patient except :class:`IdentityLink`, which a
researcher fills only by asking for the mapping at import; subjects are named by
pseudonyms (``SUBJ-0001``), series by their index (``S01``) and UIDs are stored as
keyed HMACs. File paths are relative to ``settings.DATA_DIR`` and are built from
pseudonyms only.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from ..storage.paths import cohort_dir
from .rowjob import STATUS_CHOICES_NO_PENDING, JobStatus, RowJob

__all__ = [
    "Cohort",
    "CohortUpload",
    "IdentityLink",
    "ReidSummary",
    "RenderImage",
    "Series",
    "StageRun",
    "Subject",
]



class Cohort(models.Model):
    """A set of subjects uploaded by a researcher; visible to its owner and researchers."""

    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                              related_name="owned_cohorts")
    researchers = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True,
                                         related_name="cohorts")
    keep_mapping = models.BooleanField(
        default=False, help_text="store the pseudonym → identity mapping at import")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return self.name

    def storage_dir(self) -> str:
        """Folder of this cohort relative to ``settings.DATA_DIR``."""
        return cohort_dir(self.pk)


class Subject(models.Model):
    """One patient of a cohort, known only by a pseudonym and a keyed hash of its ID."""

    cohort = models.ForeignKey(Cohort, on_delete=models.CASCADE, related_name="subjects")
    pseudonym = models.CharField(max_length=32)
    patient_key = models.CharField(max_length=64, help_text="HMAC of the patient ID (no identifier)")
    created = models.DateTimeField(default=timezone.now)
    # QA of the primary series, copied here for the dashboard and the CSV
    embedding_original = models.JSONField(null=True, blank=True)
    embedding_deid = models.JSONField(null=True, blank=True)
    embedding_detected = models.JSONField(null=True, blank=True)
    reid_features = models.JSONField(
        null=True, blank=True,
        help_text="re-identification features (pipeline.reid_features.features_to_json)")

    class Meta:
        ordering = ["cohort", "pseudonym"]
        constraints = [
            models.UniqueConstraint(fields=["cohort", "pseudonym"], name="uniq_subject_pseudonym"),
            models.UniqueConstraint(fields=["cohort", "patient_key"], name="uniq_subject_patient"),
        ]

    def __str__(self) -> str:
        return self.pseudonym

    def primary_series(self) -> Series | None:
        """The series used for renders and embeddings: the one with most slices."""
        return self.series.order_by("-n_slices", "label").first()


class Series(models.Model):
    """One CT series of a subject: originals and de-identified copy, with QA figures."""

    subject = models.ForeignKey(Subject, on_delete=models.CASCADE, related_name="series")
    label = models.CharField(max_length=8)  # S01, S02 …
    series_key = models.CharField(max_length=64, help_text="HMAC of SeriesInstanceUID")
    n_files = models.PositiveIntegerField(default=0)
    n_slices = models.PositiveIntegerField(default=0)
    original_dir = models.CharField(max_length=300)  # relative to DATA_DIR
    deid_dir = models.CharField(max_length=300, blank=True)
    spacing_mm = models.JSONField(null=True, blank=True)
    shape = models.JSONField(null=True, blank=True)
    # de-identification QA
    method = models.CharField(max_length=40, blank=True)
    removed_ml = models.FloatField(null=True, blank=True)
    bone_dice = models.FloatField(null=True, blank=True)
    warnings = models.JSONField(default=list, blank=True)
    qa = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["subject", "label"]
        verbose_name_plural = "series"
        constraints = [
            models.UniqueConstraint(fields=["subject", "label"], name="uniq_series_label"),
        ]

    def __str__(self) -> str:
        return f"{self.subject.pseudonym}/{self.label}"

    # QA figures of the de-identification (pipeline.deface.DefaceQA, stored in ``qa``)
    @property
    def face_found(self) -> bool | None:
        return self.qa.get("face_found") if self.qa else None

    @property
    def no_face_reason(self) -> str:
        return (self.qa or {}).get("no_face_reason", "")

    @property
    def inside_changed_pct(self) -> float | None:
        return (self.qa or {}).get("inside_soft_changed_pct")

    @property
    def outside_body_ml(self) -> float | None:
        return (self.qa or {}).get("outside_body_changed_ml")

    @property
    def bone_dice_150(self) -> float | None:
        return (self.qa or {}).get("bone_dice_150")

    @property
    def removed_by_region(self) -> dict[str, float]:
        return dict((self.qa or {}).get("removed_ml_by_region") or {})

    @property
    def nose_check_removed_pct(self) -> float | None:
        """The nose check (``DefaceQA.nose_check``): of the soft tissue outside the skeleton
        around the nose (the detector's nose boxes, else the anatomy's nose region), the %
        removed (0 when the detector's boxes hold none outside the skeleton and the nose may be
        left inside it); None without a nose or without tissue to measure."""
        check = (self.qa or {}).get("nose_check") or {}
        pct = check.get("removed_pct")
        return 0.0 if pct is None and check.get("nose_may_be_left") else pct


class StageRun(RowJob):
    """State of one pipeline stage of one subject (one row per subject and stage)."""

    subject = models.ForeignKey(Subject, on_delete=models.CASCADE, related_name="stages")
    stage = models.CharField(max_length=32)
    order = models.PositiveSmallIntegerField(default=0)
    status = models.CharField(max_length=10, default=JobStatus.PENDING, choices=JobStatus.choices)
    error = models.TextField(blank=True, help_text="readable reason; never holds identifiers")
    progress = models.FloatField(default=0.0, help_text="0..1")

    class Meta:
        ordering = ["subject", "order"]
        constraints = [
            models.UniqueConstraint(fields=["subject", "stage"], name="uniq_stage_per_subject"),
        ]

    def __str__(self) -> str:
        return f"{self.subject.pseudonym}:{self.stage}={self.status}"

    @property
    def seconds(self) -> float | None:
        """Wall time of the last attempt in seconds (None while not finished)."""
        if self.started and self.finished:
            return (self.finished - self.started).total_seconds()
        return None


class RenderImage(models.Model):
    """A PNG made by the pipeline (render, QA figure or windowed slice), below DATA_DIR."""

    KINDS = [("render", "render"), ("qa", "QA figure"), ("slice", "slice")]
    subject = models.ForeignKey(Subject, on_delete=models.CASCADE, related_name="images")
    kind = models.CharField(max_length=10, choices=KINDS)
    variant = models.CharField(max_length=10, help_text="original / deid / both")
    view = models.CharField(max_length=32, help_text="e.g. yaw+0, axial, sagittal")
    path = models.CharField(max_length=300)  # relative to DATA_DIR

    class Meta:
        ordering = ["subject", "kind", "view", "variant"]
        constraints = [
            models.UniqueConstraint(fields=["subject", "kind", "view", "variant"],
                                    name="uniq_image"),
        ]

    def __str__(self) -> str:
        return f"{self.subject.pseudonym}:{self.kind}:{self.view}:{self.variant}"


class ReidSummary(models.Model):
    """Automated re-identification result of a cohort.

    ``rank1``/``auc``/``cmc`` are the primary (fused) matcher's de-identified
    condition, ``baseline_rank1`` its control; ``metrics`` holds everything.
    """

    cohort = models.OneToOneField(Cohort, on_delete=models.CASCADE, related_name="reid")
    n_subjects = models.PositiveIntegerField(default=0)
    rank1 = models.FloatField(null=True, blank=True)
    auc = models.FloatField(null=True, blank=True)
    cmc = models.JSONField(default=list, blank=True, help_text="CMC curve, index r = rank r+1")
    baseline_rank1 = models.FloatField(null=True, blank=True,
                                       help_text="original vs original (sanity: should be 1)")
    metrics = models.JSONField(default=dict, blank=True,
                               help_text="pipeline.reid.evaluate_study result: every matcher "
                                         "and the fusion, both conditions, CIs, chance")
    plot_path = models.CharField(max_length=300, blank=True)
    computed = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"re-id of {self.cohort}"


class IdentityLink(models.Model):
    """Pseudonym → identity, kept only when the cohort asked for the mapping at import."""

    subject = models.OneToOneField(Subject, on_delete=models.CASCADE, related_name="identity")
    patient_id = models.CharField(max_length=128, blank=True)
    patient_name = models.CharField(max_length=256, blank=True)
    birth_date = models.CharField(max_length=16, blank=True)

    def __str__(self) -> str:  # never the identity itself
        return f"identity of {self.subject.pseudonym}"


class CohortUpload(RowJob):
    """One web upload into a cohort, imported by a background job (:mod:`surveys.cohorts.uploads`).

    The request only stores the received files in a private folder below
    ``DATA_DIR/tmp`` (``staging_dir``, a random name) and queues the import. ``message``
    is shown to researchers and never holds a path or a header value. ``staging_dir`` is
    emptied when the folder is deleted: a failed upload can be retried only while it is set.
    """

    cohort = models.ForeignKey(Cohort, on_delete=models.CASCADE, related_name="uploads")
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                                    null=True, blank=True, related_name="+")
    status = models.CharField(max_length=10, default=JobStatus.QUEUED,
                              choices=STATUS_CHOICES_NO_PENDING)
    message = models.TextField(blank=True, help_text="readable result; never holds identifiers")
    n_received = models.PositiveIntegerField(default=0, help_text="files received")
    bytes_received = models.PositiveBigIntegerField(default=0)
    n_subjects = models.PositiveIntegerField(default=0, help_text="subjects created")
    n_series = models.PositiveIntegerField(default=0, help_text="series created")
    n_files = models.PositiveIntegerField(default=0, help_text="DICOM files imported")
    staging_dir = models.CharField(max_length=300, blank=True,
                                   help_text="DATA_DIR-relative folder of the received files")
    staging_host = models.CharField(max_length=255, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-pk"]

    def __str__(self) -> str:
        return f"upload #{self.pk} to {self.cohort_id}: {self.status}"

    @property
    def retryable(self) -> bool:
        """A failed upload whose received files are still kept."""
        return self.status == JobStatus.FAILED and bool(self.staging_dir)
