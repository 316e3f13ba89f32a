"""Researcher side of studies: design, invitations, progress, report and exports.

Access follows the cohort: a study is visible to whoever may open its cohort
(:func:`surveys.access.cohorts_for`); others get 404, anonymous users the login
page (pages) or 403 (files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from ..access import cohorts_for, is_researcher, sign_in_required
from ..models import Invitation, Study
from .design import DesignError
from .forms import InvitationForm, StudyForm
from .service import (
    available_views,
    eligible_subjects,
    practice_reservation,
    response_rows,
    validate_study,
)


def _rep():
    """The report module, imported on first use: it loads matplotlib and scipy, which the
    rater pages (same URL conf, same worker processes) never need."""
    from . import report

    return report


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
            return redirect("studies:study_detail", study_id=study.pk)
    studies = Study.objects.filter(cohort__in=cohorts).select_related("cohort")
    return render(request, "studies/study_list.html", {"studies": studies, "form": form})


@require_GET
@study_view("page")
def study_detail(request: HttpRequest, study: Study) -> HttpResponse:
    """Design summary (with the subjects reserved for practice, or why the design is
    impossible), invitations (with links), progress per group."""
    invitations = [(inv, request.build_absolute_uri(reverse("studies:invitation",
                                                            args=[inv.token])))
                   for inv in study.invitations.all()]
    return render(request, "studies/study_detail.html", {
        "study": study, "invitations": invitations, "progress": _rep().progress(study),
        "n_eligible": len(eligible_subjects(study)), "views": available_views(study.cohort),
        "practice": practice_reservation(study),
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
    """Report: progress, accuracy plot, tests table, per-subject difficulty, RT plot."""
    rows = response_rows(study)
    analysis = _rep().study_analysis(rows)
    cells = []
    if analysis:
        for g, conds in analysis["groups"].items():
            for c, cell in conds.items():
                cells.append({"group": g, "condition": c, **cell})
    return render(request, "studies/study_report.html", {
        "study": study, "progress": _rep().progress(study), "analysis": analysis, "cells": cells,
        "tests": _rep().tests_table(analysis) if analysis else [],
        "difficulty": _rep().difficulty(rows), "n_answers": len(rows),
        "attention": _rep().attention(study), "practice": practice_reservation(study),
        "mixed": (analysis or {}).get("mixed_model") or {},
        **_rep().automated_reid(study, analysis)})


@require_GET
@study_view("file")
def plot(request: HttpRequest, study: Study, name: str) -> HttpResponse:
    """PNG plots of the report: ``accuracy`` or ``rt``."""
    rows = response_rows(study)
    if name == "accuracy":
        fig = _rep().accuracy_figure(_rep().study_analysis(rows, mixed_model=False))
    elif name == "rt":
        fig = _rep().rt_figure(rows)
    else:
        raise Http404("no such plot")
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
    """Every answer incl. practice and catch trials (``condition`` = catch for catch trials)."""
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
    """PDF report made with matplotlib."""
    return _download(_rep().pdf_report(study), "application/pdf", f"study-{study.pk}-report.pdf")


__all__ = [
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
