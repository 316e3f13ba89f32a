"""Django admin for every model: cohorts and pipeline, studies and raters."""

from django.contrib import admin
from django.db.models import Q
from django.db.models.constants import LOOKUP_SEP
from django.urls import reverse
from django.utils.html import format_html

from .processing import jobs
from .login_throttle import ThrottledAdminAuthenticationForm
from .models import (
    Answer, Cohort, CohortUpload, IdentityAccess, IdentityLink, Invitation, LoginThrottle,
    PowerEstimate, Rater, ReidSummary, RenderImage, Series, StageRun, Study, Subject, Trial,
    TrialImage,
)

# the admin's sign-in is throttled like /accounts/login/ and says when it is locked
admin.site.login_form = ThrottledAdminAuthenticationForm


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
    """Identity links are never shown here, to anybody (superusers included): only which
    subjects of the user's own cohorts have one. The table itself is on the cohort's
    mapping page, for its researchers, after a confirmation, and every view is recorded."""

    list_display = ("__str__", "cohort", "mapping_page")
    fields = ("subject", "cohort", "mapping_page")
    readonly_fields = fields
    search_fields = ("subject__pseudonym",)
    IDENTITY_FIELDS = ("patient_id", "patient_name", "birth_date")

    def get_queryset(self, request):
        mine = Q(subject__cohort__owner=request.user) | Q(subject__cohort__researchers=request.user)
        return super().get_queryset(request).filter(mine).distinct().select_related(
            "subject__cohort")

    def lookup_allowed(self, lookup, value, request=None) -> bool:
        # ?patient_name__startswith=A would be an oracle on the hidden fields
        if lookup.split(LOOKUP_SEP)[0] in self.IDENTITY_FIELDS:
            return False
        return super().lookup_allowed(lookup, value, request)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="cohort")
    def cohort(self, obj: IdentityLink) -> str:
        return str(obj.subject.cohort)

    @admin.display(description="identity table")
    def mapping_page(self, obj: IdentityLink) -> str:
        url = reverse("surveys:identity_mapping", args=[obj.subject.cohort_id])
        return format_html('<a href="{}">on the cohort\'s mapping page (recorded)</a>', url)


@admin.register(IdentityAccess)
class IdentityAccessAdmin(admin.ModelAdmin):
    """The audit of identity-table views: read-only, never deleted from here."""

    list_display = ("at", "username", "cohort_label", "n_subjects", "client_address")
    list_filter = ("cohort",)
    search_fields = ("username", "cohort_label")
    readonly_fields = ("at", "username", "user", "cohort", "cohort_label", "action", "n_subjects",
                       "client_address")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


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


# ------------------------------------------------------------------ security


@admin.register(LoginThrottle)
class LoginThrottleAdmin(admin.ModelAdmin):
    """Sign-in lockouts (keyed hashes only); delete a row to unlock at once."""

    list_display = ("__str__", "failures", "window_start", "locked_until")
    readonly_fields = ("key", "failures", "window_start", "locked_until")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
