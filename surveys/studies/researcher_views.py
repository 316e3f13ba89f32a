"""Researcher side of studies: design, invitations, progress, report and exports.

Access follows the cohort: a study is visible to whoever may open its cohort
(:func:`surveys.access.cohorts_for`); others get 404, anonymous users the login
page (pages) or 403 (files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from ..access import cohorts_for, is_researcher, sign_in_required
from ..csvsafe import write_csv
from ..models import Invitation, Rater, Study
from . import lifecycle
from .design import DesignError
from .forms import InvitationForm, StudyForm
from .rater_views import PREVIEW_KEY, SESSION_KEY
from .reid_section import automated_reid
from .service import (
    available_views,
    eligible_subjects,
    freeze,
    practice_reservation,
    response_rows,
    start_preview,
    validate_study,
)


def _rep():
    """The report module, imported on first use: it loads matplotlib and scipy, which the
    rater pages (same URL conf, same worker processes) never need."""
    # loaded on first use: pulls in matplotlib
    from . import report

    return report


def _pdf():
    """The PDF module, imported on first use (ReportLab, matplotlib)."""
    # loaded on first use: pulls in matplotlib
    from . import pdf

    return pdf


def _power():
    # loaded on first use: pulls in scipy
    from . import power

    return power


def study_view(kind: str = "page") -> Callable:
    """Decorator for views taking ``study_id``: replaces it by the permitted Study."""

    def deco(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, study_id: int, *args, **kwargs) -> HttpResponse:
            if not request.user.is_authenticated:
                if kind == "page":
                    return sign_in_required(request)
                return HttpResponseForbidden("login required")
            study = (Study.objects.select_related("cohort")
                     .filter(pk=study_id, cohort__in=cohorts_for(request.user)).first())
            if study is None:
                raise Http404("no such study")
            return view(request, study, *args, **kwargs)

        return wrapper

    return deco


def _download(body: str | bytes, content_type: str, filename: str) -> HttpResponse:
    resp = HttpResponse(body, content_type=content_type)
    resp["Content-Disposition"] = f'attachment; filename="{filename}"'
    resp["Cache-Control"] = "private, no-store"
    return resp


@require_http_methods(["GET", "POST"])
def study_list(request: HttpRequest) -> HttpResponse:
    """Studies of the user's cohorts and the new-study form."""
    if not request.user.is_authenticated:
        return sign_in_required(request)
    if not is_researcher(request.user):
        return HttpResponseForbidden("only researchers can manage studies")
    cohorts = cohorts_for(request.user)
    initial = {}
    if request.GET.get("cohort", "").isdigit():
        initial["cohort"] = int(request.GET["cohort"])
    form = StudyForm(request.POST or None, cohorts=cohorts, initial=initial)
    if request.method == "POST" and form.is_valid():
        study = form.save(commit=False)
        study.created_by = request.user
        try:
            validate_study(study)
        except DesignError as exc:
            form.add_error(None, str(exc))
        else:
            study.save()
            _power().request_estimate(study)  # simulation-based power, as a background job
            return redirect("studies:study_detail", study_id=study.pk)
    from django.db.models import Count, Q

    studies = (Study.objects.filter(cohort__in=cohorts).select_related("cohort")
               .annotate(n_raters=Count("raters", filter=Q(raters__is_preview=False))))
    return render(request, "studies/study_list.html", {"studies": studies, "form": form})


@require_GET
@study_view("page")
def study_detail(request: HttpRequest, study: Study) -> HttpResponse:
    """Design summary (with the subjects reserved for practice, or why the design is
    impossible), pre-registration hash, power estimate, invitations (links with copy
    buttons, revoke), recruitment funnel per group, raters (exclude / reset), close /
    reopen, preview."""
    invitations = [(inv, request.build_absolute_uri(reverse("studies:invitation",
                                                            args=[inv.token])))
                   for inv in study.invitations.all()]
    rep = _rep()
    prog = rep.progress(study)
    estimate = study.power_estimates.first()
    return render(request, "studies/study_detail.html", {
        "study": study, "invitations": invitations, "progress": prog,
        "totals": rep.funnel_totals(prog),
        "n_eligible": len(eligible_subjects(study)), "views": available_views(study.cohort),
        "practice": practice_reservation(study), "raters": rep.rater_table(study),
        "exclusion_rule": rep.exclusion_rule_text(study),
        "estimate": estimate, "estimate_stale": bool(
            estimate and estimate.params.get("design") != _power().design_of(study)),
        "power_defaults": _power().DEFAULTS,
        "inv_form": InvitationForm(groups=study.groups)})


@require_http_methods(["GET", "POST"])
@study_view("page")
def study_edit(request: HttpRequest, study: Study) -> HttpResponse:
    """Edit the design (refused once the first rater started)."""
    if study.frozen:
        messages.error(request, "the design is frozen: a rater has already started")
        return redirect("studies:study_detail", study_id=study.pk)
    form = StudyForm(request.POST or None, instance=study,
                     cohorts=cohorts_for(request.user))
    if request.method == "POST" and form.is_valid():
        edited = form.save(commit=False)
        try:
            validate_study(edited)
        except DesignError as exc:
            form.add_error(None, str(exc))
        else:
            # refuse if a rater started while the form was open
            if Study.objects.filter(pk=study.pk, frozen_at__isnull=False).exists():
                messages.error(request, "the design is frozen: a rater has already started")
                return redirect("studies:study_detail", study_id=study.pk)
            edited.save()
            Rater.objects.filter(study=study, is_preview=True).delete()  # stale previews
            _power().request_estimate(edited)
            return redirect("studies:study_detail", study_id=study.pk)
    return render(request, "studies/study_edit.html", {"study": study, "form": form})


@require_POST
@study_view("page")
def invite(request: HttpRequest, study: Study) -> HttpResponse:
    """Create an invitation link for one group."""
    form = InvitationForm(request.POST, groups=study.groups)
    if form.is_valid():
        Invitation.objects.create(study=study, group=form.cleaned_data["group"],
                                  label=form.cleaned_data["label"],
                                  expires_at=form.cleaned_data["expires_at"],
                                  max_uses=form.cleaned_data["max_uses"])
        messages.success(request, "invitation created")
    else:
        messages.error(request, "invitation not created: " + "; ".join(
            f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    return redirect("studies:study_detail", study_id=study.pk)


@require_GET
@study_view("page")
def study_report(request: HttpRequest, study: Study) -> HttpResponse:
    """Report: design and pre-registration hash, recruitment funnel, exclusions, primary
    and sensitivity analyses (accuracy, tests with sidedness), per-subject difficulty,
    response times, automated re-identification."""
    rep = _rep()
    res = rep.study_results(study)
    primary = study.primary_analysis
    other = "all" if primary == "excluded" else "excluded"
    analysis = res[primary]
    rows = res["rows_kept"] if primary == "excluded" else res["rows"]
    prog = rep.progress(study)
    return render(request, "studies/study_report.html", {
        "study": study, "progress": prog, "totals": rep.funnel_totals(prog),
        "design": rep.design_summary(study),
        "analysis": analysis, "cells": rep.accuracy_cells(analysis, study.groups),
        "tests": rep.tests_table(analysis, study.groups) if analysis else [],
        "primary_label": rep.primary_label(study, primary),
        "other": res[other], "other_cells": rep.accuracy_cells(res[other], study.groups),
        "other_tests": [t for t in rep.tests_table(res[other]) if
                        t["test"].startswith("mixed model")] if res[other] else [],
        "other_label": rep.primary_label(study, other), "other_key": other,
        "excluded": list(res["excluded_raters"].values()),
        "exclusion_rule": rep.exclusion_rule_text(study),
        "mismatches": [r for r in rep.rater_table(study) if r["group_mismatch"]],
        "difficulty": rep.difficulty(rows), "rt": rep.rt_table(rows, study.groups),
        "n_answers": len(res["rows"]), "n_answers_primary": len(rows),
        "attention": rep.attention(study), "practice": practice_reservation(study),
        **_reid_context(automated_reid(study.cohort, analysis, study.n_choices)),
        "mixed": (analysis or {}).get("mixed_model") or {}})


def _reid_context(reid: dict[str, Any]) -> dict[str, Any]:
    """The report's automated section: the whole dict, and its page parts at the top level."""
    return {"reid": reid, **{k: reid[k] for k in ("reid_table", "reid_compare", "reid_plot_url")}}


@require_GET
@study_view("file")
def plot(request: HttpRequest, study: Study, name: str) -> HttpResponse:
    """PNG plots of the report: ``accuracy`` or ``rt``."""
    if name not in ("accuracy", "accuracy-sensitivity", "rt", "cmc"):
        raise Http404("no such plot")
    if name == "cmc":
        cmc = automated_reid(study.cohort).get("cmc")
        if not cmc:
            raise Http404("no automated re-identification yet")
        fig = _rep().cmc_figure(cmc)
    else:
        primary = study.primary_analysis
        which = primary if name != "accuracy-sensitivity" else (
            "all" if primary == "excluded" else "excluded")
        rows = response_rows(study, exclude_excluded=which == "excluded")
        if name == "rt":
            fig = _rep().rt_figure(rows, order=study.groups)
        else:
            # loaded on first use: pulls in scipy
            from .prereg import paired_conditions, reference_group

            fig = _rep().accuracy_figure(_rep().study_analysis(
                rows, mixed_model=False, paired=paired_conditions(study),
                reference=reference_group(study)), order=study.groups)
    resp = HttpResponse(_rep().png_bytes(fig), content_type="image/png")
    resp["Cache-Control"] = "private, no-store"
    return resp


@require_GET
@study_view("file")
def export_responses(request: HttpRequest, study: Study) -> HttpResponse:
    """Responses CSV: one row per main-trial answer, pseudonyms only (analyze_responses)."""
    return _download(_rep().responses_csv(response_rows(study)), "text/csv",
                     f"study-{study.pk}-responses.csv")


@require_GET
@study_view("file")
def export_all_answers(request: HttpRequest, study: Study) -> HttpResponse:
    """Every answer incl. practice and catch trials (``trial_kind`` says which; ``condition``
    is practice / catch for them)."""
    rows = response_rows(study, kinds=("practice", "main", "catch"))
    return _download(_rep().responses_csv(rows), "text/csv", f"study-{study.pk}-all-answers.csv")


@require_GET
@study_view("file")
def export_analysis(request: HttpRequest, study: Study) -> HttpResponse:
    """Analysis JSON (``pipeline.stats.analyze`` of the main trials + design + progress)."""
    return _download(_rep().analysis_json(study), "application/json",
                     f"study-{study.pk}-analysis.json")


@require_GET
@study_view("file")
def export_pdf(request: HttpRequest, study: Study) -> HttpResponse:
    """Typeset PDF report (ReportLab)."""
    return _download(_pdf().build_pdf(study), "application/pdf", f"study-{study.pk}-report.pdf")


@require_GET
@study_view("file")
def export_dataset(request: HttpRequest, study: Study) -> HttpResponse:
    """Analysis dataset zip: tidy answers CSV, data dictionary, design.json sidecar."""
    return _download(_rep().dataset_zip(study), "application/zip",
                     f"study-{study.pk}-dataset.zip")


@require_GET
@study_view("file")
def export_dictionary(request: HttpRequest, study: Study) -> HttpResponse:
    """Data dictionary of the answer exports (column, type, meaning, units)."""
    return _download(_rep().data_dictionary_csv(), "text/csv",
                     f"study-{study.pk}-data-dictionary.csv")


@require_GET
@study_view("file")
def export_design(request: HttpRequest, study: Study) -> HttpResponse:
    """Design sidecar JSON: pre-registered plan + hash, raters, exclusions, funnel."""
    return _download(json.dumps(_rep().design_document(study), indent=2, ensure_ascii=False),
                     "application/json", f"study-{study.pk}-design.json")


@require_GET
@study_view("file")
def export_panel(request: HttpRequest, study: Study) -> HttpResponse:
    """Recruitment-panel ids (e.g. Prolific) per rater, for approving payments. Kept out of
    every analysis export: it links rater codes to panel accounts."""
    rows = [{"rater_id": r.code, "panel_pid": r.panel_pid, "panel_study_id": r.panel_study_id,
             "panel_session_id": r.panel_session_id, "step": r.step,
             "finished": "" if r.finished is None else r.finished.isoformat(),
             "design_sha256": study.prereg_hash}
            for r in Rater.objects.filter(study=study, is_preview=False).exclude(panel_pid="")
            .order_by("index")]
    return _download(write_csv(rows, ["rater_id", "panel_pid", "panel_study_id",
                                      "panel_session_id", "step", "finished", "design_sha256"]),
                     "text/csv", f"study-{study.pk}-panel.csv")


def _back(study: Study) -> HttpResponse:
    return redirect("studies:study_detail", study_id=study.pk)


@require_POST
@study_view("page")
def study_action(request: HttpRequest, study: Study, action: str) -> HttpResponse:
    """Lifecycle buttons of the study page: close, reopen, freeze, preview, power."""
    if action == "close":
        if lifecycle.close_study(study):
            messages.success(request, "study closed: no further answers are accepted")
    elif action == "reopen":
        if lifecycle.reopen_study(study):
            messages.success(request, "study reopened")
    elif action == "freeze":
        try:
            freeze(study)
            messages.success(request, "design frozen; pre-registration hash stored")
        except DesignError as exc:
            messages.error(request, f"cannot freeze: {exc}")
    elif action == "preview":
        try:
            rater = start_preview(study, request.POST.get("group") or study.groups[0])
        except DesignError as exc:
            messages.error(request, f"cannot preview: {exc}")
            return _back(study)
        request.session[SESSION_KEY] = rater.resume_token
        request.session[PREVIEW_KEY] = study.pk
        return redirect("studies:take")
    elif action == "power":
        inputs = {}
        for key, value in _power().DEFAULTS.items():
            raw = request.POST.get(key, "").strip()
            if not raw:
                continue
            try:
                inputs[key] = type(value)(raw)
            except ValueError:
                messages.error(request, f"{key}: not a number")
                return _back(study)
        bounds = {"p_control": (0.0, 1.0), "p_deidentified": (0.0, 1.0),
                  "group_difference": (-1.0, 1.0), "rater_sd": (0.0, 5.0),
                  "subject_sd": (0.0, 5.0), "alpha": (1e-6, 0.5), "target_power": (0.05, 0.99),
                  "n_sim": (5, 1000), "n_sim_search": (5, 500), "max_seconds": (5, 900),
                  "raters_per_group": (1, 500)}
        for key, (lo, hi) in bounds.items():
            if key in inputs and not lo <= inputs[key] <= hi:
                messages.error(request, f"{key} must be between {lo} and {hi}")
                return _back(study)
        try:
            validate_study(study)
        except DesignError as exc:
            messages.error(request, f"the design is impossible: {exc}")
            return _back(study)
        _power().request_estimate(study, inputs)
        messages.success(request, "power estimate queued (about a minute)")
    else:
        raise Http404("no such action")
    return _back(study)


@require_POST
@study_view("page")
def invitation_action(request: HttpRequest, study: Study, inv_id: int) -> HttpResponse:
    """Revoke an invitation."""
    inv = study.invitations.filter(pk=inv_id).first()
    if inv is None:
        raise Http404("no such invitation")
    if lifecycle.revoke_invitation(inv):
        messages.success(request, "invitation revoked")
    return _back(study)


@require_POST
@study_view("page")
def rater_action(request: HttpRequest, study: Study, code: str, action: str) -> HttpResponse:
    """Exclude (with a reason), re-include or reset a rater."""
    rater = Rater.objects.filter(study=study, code=code, is_preview=False).first()
    if rater is None:
        raise Http404("no such rater")
    if action == "exclude":
        try:
            lifecycle.exclude_rater(rater, request.POST.get("reason", ""))
            messages.success(request, f"{rater.code} excluded from the analysis")
        except ValueError as exc:
            messages.error(request, str(exc))
    elif action == "include":
        lifecycle.include_rater(rater)
        messages.success(request, f"{rater.code} included again")
    elif action == "reset":
        n = lifecycle.reset_rater(rater)
        messages.success(request, f"{rater.code} reset ({n} answers deleted)")
    else:
        raise Http404("no such action")
    return _back(study)


__all__ = [
    "export_dataset",
    "export_design",
    "export_dictionary",
    "export_panel",
    "invitation_action",
    "rater_action",
    "study_action",
    "export_all_answers",
    "export_analysis",
    "export_pdf",
    "export_responses",
    "invite",
    "json",
    "plot",
    "study_detail",
    "study_edit",
    "study_list",
    "study_report",
    "study_view",
]
