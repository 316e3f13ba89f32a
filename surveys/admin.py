"""Django admin for every model of the cohort side."""

from django.contrib import admin

from . import jobs
from .models import Cohort, IdentityLink, ReidSummary, RenderImage, Series, StageRun, Subject


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


@admin.register(IdentityLink)
class IdentityLinkAdmin(admin.ModelAdmin):
    list_display = ("__str__",)  # identities are not listed; open one to see it
    search_fields = ("subject__pseudonym",)
