"""Django admin for every model: cohorts and pipeline, studies and raters."""

from django.contrib import admin

from . import jobs
from .models import (
    Answer, Cohort, CohortUpload, IdentityLink, Invitation, PowerEstimate, Rater, ReidSummary,
    RenderImage, Series, StageRun, Study, Subject, Trial, TrialImage,
)


class SubjectInline(admin.TabularInline):
    model = Subject
    fields = ("pseudonym", "created")
    readonly_fields = fields
    extra = 0
    show_change_link = True


@admin.register(Cohort)
class CohortAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "n_subjects", "keep_mapping", "created")
    list_filter = ("keep_mapping", "created")
    search_fields = ("name",)
    filter_horizontal = ("researchers",)
    inlines = [SubjectInline]

    @admin.display(description="subjects")
    def n_subjects(self, obj: Cohort) -> int:
        return obj.subjects.count()


class StageInline(admin.TabularInline):
    model = StageRun
    fields = ("stage", "status", "attempts", "progress", "error", "started", "finished")
    readonly_fields = fields
    extra = 0


@admin.register(Subject)
class SubjectAdmin(admin.ModelAdmin):
    list_display = ("pseudonym", "cohort", "created")
    list_filter = ("cohort",)
    search_fields = ("pseudonym",)
    exclude = ("patient_key",)
    inlines = [StageInline]


@admin.register(Series)
class SeriesAdmin(admin.ModelAdmin):
    list_display = ("__str__", "n_slices", "method", "removed_ml", "bone_dice")
    list_filter = ("method", "subject__cohort")
    search_fields = ("subject__pseudonym",)
    exclude = ("series_key",)


@admin.action(description="Retry the selected stages")
def retry_stages(modeladmin, request, queryset) -> None:
    for run in queryset.exclude(status__in=("queued", "running")):
        jobs.retry_stage(run)


@admin.register(StageRun)
class StageRunAdmin(admin.ModelAdmin):
    list_display = ("subject", "stage", "status", "attempts", "progress", "started", "finished")
    list_filter = ("status", "stage", "subject__cohort")
    search_fields = ("subject__pseudonym", "rq_job_id")
    actions = [retry_stages]


@admin.register(RenderImage)
class RenderImageAdmin(admin.ModelAdmin):
    list_display = ("subject", "kind", "view", "variant")
    list_filter = ("kind", "variant", "subject__cohort")


@admin.register(ReidSummary)
class ReidSummaryAdmin(admin.ModelAdmin):
    list_display = ("cohort", "n_subjects", "rank1", "auc", "computed")


@admin.register(CohortUpload)
class CohortUploadAdmin(admin.ModelAdmin):
    list_display = ("pk", "cohort", "uploaded_by", "status", "n_received", "n_subjects",
                    "attempts", "created", "finished")
    list_filter = ("status", "cohort")
    readonly_fields = ("staging_dir", "staging_host", "rq_job_id", "worker_host", "worker_pid",
                       "heartbeat")


@admin.register(IdentityLink)
class IdentityLinkAdmin(admin.ModelAdmin):
    list_display = ("__str__",)  # identities are not listed; open one to see it
    search_fields = ("subject__pseudonym",)


# ------------------------------------------------------------------ studies (human raters)


class InvitationInline(admin.TabularInline):
    model = Invitation
    fields = ("group", "label", "expires_at", "max_uses", "uses", "revoked_at", "created")
    readonly_fields = ("uses", "created")
    extra = 0


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ("name", "cohort", "design", "n_choices", "trials_per_rater", "frozen_at",
                    "closed_at", "created")
    list_filter = ("cohort", "frozen_at", "design")
    search_fields = ("name",)
    readonly_fields = ("seed", "frozen_at", "practice_subjects", "prereg_json", "prereg_hash")
    inlines = [InvitationInline]


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ("study", "group", "label", "uses", "max_uses", "expires_at", "revoked_at")
    list_filter = ("study", "group")
    exclude = ("token",)  # a token is a credential: not shown in lists


@admin.register(Rater)
class RaterAdmin(admin.ModelAdmin):
    list_display = ("code", "study", "group", "self_reported_profession", "step",
                    "years_experience", "started", "finished", "excluded_at", "is_preview")
    list_filter = ("study", "group", "step", "is_preview")
    search_fields = ("code",)
    exclude = ("resume_token", "panel_pid", "panel_study_id", "panel_session_id")


@admin.register(PowerEstimate)
class PowerEstimateAdmin(admin.ModelAdmin):
    list_display = ("study", "status", "created", "finished")
    list_filter = ("status",)
    readonly_fields = ("params", "result", "error", "rq_job_id")


@admin.register(Trial)
class TrialAdmin(admin.ModelAdmin):
    list_display = ("rater", "position", "kind", "condition", "shown_at")
    list_filter = ("kind", "condition", "rater__study")
    exclude = ("token",)


@admin.register(TrialImage)
class TrialImageAdmin(admin.ModelAdmin):
    list_display = ("trial", "slot", "image")
    exclude = ("token",)


@admin.register(Answer)
class AnswerAdmin(admin.ModelAdmin):
    list_display = ("trial", "choice", "correct", "confidence", "client_rt_ms", "timed_out", "answered_at")
    list_filter = ("correct", "timed_out", "rt_suspect", "trial__condition", "trial__rater__group")
