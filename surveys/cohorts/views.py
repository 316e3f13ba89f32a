"""Researcher dashboard: cohorts, upload, pipeline status, subjects, images and downloads.

No view puts an identifier in a URL: cohorts are addressed by their id, subjects by
pseudonym, images by their row id. Files are served only by these permission-checked
views (``FileResponse`` from ``settings.DATA_DIR``), never from a static/media URL.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import zipfile

from django.contrib import messages
from django.db import transaction
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    JsonResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from deidstudy.middleware import accepts_uploads

from ..access import cohort_upload_gate, cohort_view, cohorts_for, is_researcher, sign_in_required
from ..csvsafe import write_csv
from ..models import Cohort, CohortUpload, RenderImage, StageRun, Subject
from ..processing import jobs, rowjobs
from ..processing.reid import reid_table
from ..processing.stages import STAGES
from ..storage.mirror import ensure_local, pull_tree
from ..storage.paths import data_path, tmp_root
from . import identity, overlap, qa_grid, uploads
from .forms import CohortForm
from .importing import ImportRejected
from .viewer_views import subject_signature

log = logging.getLogger(__name__)

#: Said when a stage was queued but Redis could not be reached (it starts when Redis is back).
QUEUE_DOWN = ("the job queue is not reachable at the moment: the work is recorded as queued "
              "and starts by itself when the queue is back")


def _local_next(request: HttpRequest, default: str) -> str:
    """The POSTed ``next`` if it is a path on this site, else ``default`` (no open redirect)."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts=None) \
            and target.startswith("/") and not target.startswith("//"):
        return target
    return default


def _wants_json(request: HttpRequest) -> bool:
    return (request.headers.get("x-requested-with") == "XMLHttpRequest"
            or "application/json" in request.headers.get("accept", ""))


def cohort_list(request: HttpRequest) -> HttpResponse:
    """Cohorts of the user; researchers can create one (POST)."""
    if not request.user.is_authenticated:
        return sign_in_required(request)
    if not is_researcher(request.user):
        return HttpResponseForbidden("only researchers can manage cohorts")
    form = CohortForm()
    if request.method == "POST":
        form = CohortForm(request.POST)
        if form.is_valid():
            cohort = form.save(commit=False)
            cohort.owner = request.user
            cohort.save()
            cohort.researchers.add(request.user)
            return redirect("surveys:cohort_detail", cohort_id=cohort.pk)
    cohorts = cohorts_for(request.user).prefetch_related("subjects")
    return render(request, "surveys/cohort_list.html", {"cohorts": cohorts, "form": form})


@require_GET
@cohort_view("page")
def cohort_detail(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """Subjects with per-stage status (polled), upload, QA grid and re-id summary."""
    subjects = cohort.subjects.prefetch_related("stages", "series")
    reid = getattr(cohort, "reid", None) if hasattr(cohort, "reid") else None
    return render(request, "surveys/cohort_detail.html", {
        "cohort": cohort, "subjects": subjects, "stages": STAGES, "reid": reid,
        "reid_table": reid_table(reid.metrics) if reid is not None else None,
        "progress": jobs.cohort_progress(cohort), "uploads": uploads.recent_uploads(cohort),
        "sees_identities": (cohort.keep_mapping
                            and identity.may_see_identities(request.user, cohort)),
        "identity_accesses": identity.recent_accesses(cohort) if cohort.keep_mapping else [],
        "qa_cards": qa_grid.cards(cohort), "qa_figures": qa_grid.FIGURES,
        "missing": missing_from_download(cohort),
        "overlaps": overlap.matches(request.user, cohort),
        "overlap_explanation": overlap.EXPLANATION})


@require_GET
@cohort_view("file")
def qa_grid_fragment(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """The QA grid's cards as an HTML fragment (the cohort page swaps them in when the
    status poll reports new QA)."""
    resp = render(request, "surveys/_qa_cards.html", {"cohort": cohort,
                                                      "qa_cards": qa_grid.cards(cohort)})
    resp["Cache-Control"] = "private, no-store"
    return resp


@require_GET
@cohort_view("file")
def cohort_status(request: HttpRequest, cohort: Cohort) -> JsonResponse:
    """JSON status of every subject's stages and of the recent uploads (polled by the dashboard)."""
    uploads.push_waiting(cohort)  # uploads that wait for Redis: start them once it is back
    data = jobs.cohort_progress(cohort)
    reid = getattr(cohort, "reid", None) if hasattr(cohort, "reid") else None
    data["reid"] = None if reid is None else {"rank1": reid.rank1, "auc": reid.auc,
                                              "rank1_control": reid.baseline_rank1,
                                              "n": reid.n_subjects}
    data["uploads"] = uploads.upload_rows(cohort)
    data["importing"] = any(u["active"] for u in data["uploads"])

    data["qa"] = {c.pseudonym: c.signature for c in qa_grid.cards(cohort)}
    return JsonResponse(data)


@accepts_uploads(cohort_upload_gate)  # rights and size checked before the body is read
@require_POST
@cohort_view("file")
def cohort_upload(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """Receive zip archive(s) or DICOM files (streamed to disk) and queue their import.

    The checks and the import run in a background job (:mod:`surveys.cohorts.uploads`); the
    cohort page shows the upload's status. Answers JSON ``{"ok", "message", "upload":
    {"id", "status"}, "status_url"}`` to XHR/JSON requests, else redirects.
    """
    try:
        with rowjobs.push_failures() as not_queued:
            upload = uploads.receive_upload(cohort, request.user, request.FILES.getlist("files"))
    except ImportRejected as exc:
        if _wants_json(request):
            return JsonResponse({"ok": False, "error": str(exc)}, status=400)
        messages.error(request, str(exc))
        return redirect("surveys:cohort_detail", cohort_id=cohort.pk)
    if not_queued:  # Redis down: kept and recorded, imported when the queue is back
        msg = uploads.QUEUE_DOWN_MESSAGE
        messages.warning(request, msg)
    else:
        msg = uploads.RECEIVED_MESSAGE
        messages.success(request, msg)  # shown after the page reloads
    if _wants_json(request):
        return JsonResponse({"ok": True, "message": msg, "queue_unavailable": bool(not_queued),
                             "upload": {"id": upload.pk, "status": upload.status},
                             "status_url": reverse("surveys:cohort_status", args=[cohort.pk])})
    return redirect("surveys:cohort_detail", cohort_id=cohort.pk)


@require_POST
@cohort_view("file")
def upload_retry(request: HttpRequest, cohort: Cohort, upload_id: int) -> HttpResponse:
    """Queue the import of a failed upload of this cohort again, if its files are still kept."""
    upload = get_object_or_404(CohortUpload, pk=upload_id, cohort=cohort)
    if upload.status != "failed":
        ok, msg = False, f"upload #{upload.pk} is {upload.status}; nothing to retry"
    else:
        with rowjobs.push_failures() as not_queued:
            ok = uploads.retry_upload(upload)
        if not ok:
            msg = f"upload #{upload.pk}: {uploads.GONE_MESSAGE}"
        elif not_queued:
            msg = f"upload #{upload.pk}: {uploads.QUEUE_DOWN_MESSAGE}"
        else:
            msg = f"upload #{upload.pk}: import queued again"
    if _wants_json(request):
        return JsonResponse({"ok": ok, "message": msg}, status=200 if ok else 409)
    (messages.info if ok else messages.error)(request, msg)
    return redirect("surveys:cohort_detail", cohort_id=cohort.pk)


@require_POST
@cohort_view("file")
def cohort_run(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """Enqueue every subject with unfinished (not failed) stages."""
    with rowjobs.push_failures() as not_queued, transaction.atomic():
        n = jobs.enqueue_cohort(cohort)
    messages.info(request, f"{n} subject(s) queued")
    if not_queued:
        messages.warning(request, QUEUE_DOWN)
    return redirect("surveys:cohort_detail", cohort_id=cohort.pk)


@require_POST
@cohort_view("file")
def stage_retry(request: HttpRequest, cohort: Cohort, run_id: int) -> HttpResponse:
    """Retry one stage (and reset the later ones) of a subject of this cohort."""
    run = get_object_or_404(StageRun, pk=run_id, subject__cohort=cohort)
    if run.status in ("queued", "running"):
        messages.warning(request, f"{run.subject.pseudonym}: {run.stage} is already {run.status}")
    else:
        with rowjobs.push_failures() as not_queued:
            jobs.retry_stage(run)
        messages.info(request, f"{run.subject.pseudonym}: {run.stage} queued again")
        if not_queued:
            messages.warning(request, QUEUE_DOWN)
    if _wants_json(request):
        return JsonResponse({"ok": True})
    return redirect(_local_next(request, reverse("surveys:cohort_detail", args=[cohort.pk])))

@require_GET
@cohort_view("page")
def subject_detail(request: HttpRequest, cohort: Cohort, pseudonym: str) -> HttpResponse:
    """QA figures, the slice and surface viewers, the QA picture and the renders of one
    subject; the page polls the subject's status and offers new results when a stage ends."""
    from django.contrib.staticfiles import finders


    subject = get_object_or_404(Subject.objects.prefetch_related("stages", "series", "images"),
                                cohort=cohort, pseudonym=pseudonym)
    images = {(i.kind, i.view, i.variant): i for i in subject.images.all()}
    yaws = sorted({i.view for i in subject.images.all() if i.kind == "render"})
    renders = [(view, images.get(("render", view, "original")), images.get(("render", view, "deid")))
               for view in yaws]
    return render(request, "surveys/subject_detail.html", {
        "cohort": cohort, "subject": subject, "series": subject.series.all(),
        "stages": subject.stages.order_by("order"), "renders": renders,
        "qa_image": images.get(("qa", "deface", "both")),
        "overlaps": overlap.matches(request.user, cohort, [subject]),
        "overlap_explanation": overlap.EXPLANATION,
        "signature": subject_signature(subject),
        "niivue": finders.find("vendor/niivue/niivue.umd.js") is not None})


def _file_response(rel: str, content_type: str, filename: str | None = None) -> FileResponse:
    try:
        path = ensure_local(rel)
        fh = open(path, "rb")
    except (OSError, ValueError):
        raise Http404("file not available") from None
    resp = FileResponse(fh, content_type=content_type, as_attachment=filename is not None,
                        filename=filename)
    resp["Cache-Control"] = "private, no-store"
    return resp


@require_GET
@cohort_view("file")
def image(request: HttpRequest, cohort: Cohort, image_id: int) -> FileResponse:
    """A pipeline PNG of a subject of this cohort."""
    img = get_object_or_404(RenderImage, pk=image_id, subject__cohort=cohort)
    return _file_response(img.path, "image/png")


@require_GET
@cohort_view("file")
def reid_plot(request: HttpRequest, cohort: Cohort) -> FileResponse:
    """CMC plot of the cohort's re-identification summary."""
    reid = getattr(cohort, "reid", None) if hasattr(cohort, "reid") else None
    if reid is None or not reid.plot_path:
        raise Http404("no re-identification summary yet")
    return _file_response(reid.plot_path, "image/png")


REGIONS = ("nose", "lips", "chin", "cheeks", "eyelids", "forehead", "ears", "other")
QA_COLUMNS = ["subject", "series", "slices", "method", "face_found", "no_face_reason",
              "removed_ml", *[f"removed_ml_{r}" for r in REGIONS], "inside_skeleton_changed_pct",
              "outside_body_changed_ml", "bone_dice", "bone_dice_150", "nose_check_removed_pct",
              "warnings", "deid_status"]


def qa_rows(cohort: Cohort) -> list[dict[str, object]]:
    """One row per series: pseudonym, series label, QA figures (no identifiers)."""
    rows = []
    for subject in cohort.subjects.prefetch_related("series", "stages"):
        deid = next((r.status for r in subject.stages.all() if r.stage == "deidentify"), "")
        for s in subject.series.all():
            by_region = s.removed_by_region
            rows.append({"subject": subject.pseudonym, "series": s.label, "slices": s.n_slices,
                         "method": s.method, "face_found": s.face_found,
                         "no_face_reason": s.no_face_reason, "removed_ml": s.removed_ml,
                         **{f"removed_ml_{r}": by_region.get(r) for r in REGIONS},
                         "inside_skeleton_changed_pct": s.inside_changed_pct,
                         "outside_body_changed_ml": s.outside_body_ml, "bone_dice": s.bone_dice,
                         "bone_dice_150": s.bone_dice_150,
                         "nose_check_removed_pct": s.nose_check_removed_pct,
                         "warnings": " | ".join(s.warnings or []), "deid_status": deid})
    return rows


@require_GET
@cohort_view("file")
def download_qa(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """QA table of the cohort as CSV."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=QA_COLUMNS)
    w.writeheader()
    w.writerows(qa_rows(cohort))
    resp = HttpResponse(buf.getvalue(), content_type="text/csv")
    resp["Content-Disposition"] = f'attachment; filename="cohort-{cohort.pk}-qa.csv"'
    return resp


def missing_from_download(cohort: Cohort) -> list[dict[str, str]]:
    """Subjects the de-identified zip would not hold (de-identification not done), with
    their status and reason, in pseudonym order."""
    out = []
    for subject in cohort.subjects.prefetch_related("stages"):
        run = next((r for r in subject.stages.all() if r.stage == "deidentify"), None)
        if run is not None and run.status == "done":
            continue
        status = run.status if run else "no stage"
        if run is not None and run.status == "pending":
            # an earlier stage may be the one that failed
            before = [r for r in subject.stages.all() if r.order < run.order]
            failed = next((r for r in before if r.status == "failed"), None)
            if failed is not None:
                out.append({"pseudonym": subject.pseudonym, "status": "failed",
                            "reason": f"{failed.stage}: {failed.error}"})
                continue
        reason = run.error if run is not None and run.status == "failed" else {
            "pending": "not started yet", "queued": "waiting for a worker",
            "running": "being de-identified now"}.get(status, "")
        out.append({"pseudonym": subject.pseudonym, "status": status, "reason": reason})
    return out


@require_GET
@cohort_view("file")
def download_deid(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """Zip of every de-identified series (``<pseudonym>/<Snn>/IM*.dcm``) plus ``qa.csv``.

    Only series whose de-identification finished are included. When some subjects are
    unfinished or failed, a page first lists them (``?confirm=1`` downloads anyway) and
    the zip then holds ``not-included.csv`` naming them. Built in a temporary file
    (unlinked at once) and streamed.
    """
    missing = missing_from_download(cohort)
    if missing and request.GET.get("confirm") != "1":
        n_total = cohort.subjects.count()
        resp = render(request, "surveys/download_confirm.html", {
            "cohort": cohort, "missing": missing, "n_total": n_total,
            "n_included": n_total - len(missing)})
        resp["Cache-Control"] = "private, no-store"
        return resp
    fh = tempfile.TemporaryFile(dir=tmp_root())
    n = 0
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for subject in cohort.subjects.prefetch_related("series", "stages"):
            done = any(r.stage == "deidentify" and r.status == "done" for r in subject.stages.all())
            if not done:
                continue
            for s in subject.series.all():
                if not s.deid_dir:
                    continue
                pull_tree(s.deid_dir)  # no-op without shared storage
                folder = data_path(s.deid_dir)
                for f in sorted(folder.glob("*.dcm")):
                    zf.write(f, f"{subject.pseudonym}/{s.label}/{f.name}")
                    n += 1
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=QA_COLUMNS)
        w.writeheader()
        w.writerows(qa_rows(cohort))
        zf.writestr("qa.csv", buf.getvalue())
        if missing:
            zf.writestr("not-included.csv", write_csv(
                ({"subject": m["pseudonym"], "status": m["status"], "reason": m["reason"]}
                 for m in missing), ["subject", "status", "reason"]))
    fh.seek(0)
    resp = FileResponse(fh, content_type="application/zip", as_attachment=True,
                        filename=f"cohort-{cohort.pk}-deidentified.zip")
    resp["Cache-Control"] = "private, no-store"
    return resp


@cohort_view("page")
def identity_mapping(request: HttpRequest, cohort: Cohort) -> HttpResponse:
    """Pseudonym → identity table, only if the cohort kept it, only for its own researchers;
    shown on explicit POST and recorded (:mod:`surveys.cohorts.identity`)."""
    if not cohort.keep_mapping or not identity.may_see_identities(request.user, cohort):
        raise Http404("no identity mapping")
    if request.method != "POST":
        return render(request, "surveys/mapping_confirm.html", {"cohort": cohort})
    resp = HttpResponse(identity.mapping_csv(cohort, request.user, request),
                        content_type="text/csv")
    resp["Content-Disposition"] = f'attachment; filename="cohort-{cohort.pk}-mapping.csv"'
    resp["Cache-Control"] = "private, no-store"
    return resp


def home(request: HttpRequest) -> HttpResponse:
    """Researchers land on their cohorts; everyone else on the login page."""
    if request.user.is_authenticated and is_researcher(request.user):
        return redirect("surveys:cohort_list")
    if request.user.is_authenticated:
        return render(request, "surveys/not_researcher.html", status=403)
    return redirect("login")


