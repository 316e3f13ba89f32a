"""Rater side (no account): invitation → consent → questionnaire → instructions → trials.

The rater is identified by the resume token kept in the session (and shown as a
personal resume link). Pages and image URLs carry only opaque per-trial tokens;
an image is served only to the rater owning the trial, only while that trial is
the current one, re-encoded without metadata and without a file name.
"""

from __future__ import annotations

import math
import re

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from ..models import Invitation, Rater, Trial
from ..models import RaterStep as Step
from ..storage.mirror import ensure_local
from ..storage.paths import data_path
from .design import DesignError
from .flow import advance
from .forms import QuestionnaireForm
from .service import (
    InvitationError,
    StudyClosed,
    begin_trials,
    clean_png,
    current_image_path,
    current_trial,
    enroll,
    mark_shown,
    panel_params,
    record_answer,
    time_left_s,
)

SESSION_KEY = "study_rater"
#: the session's rater is a researcher's preview (banner on every page)
PREVIEW_KEY = "study_preview"
#: recruitment-panel ids from the invitation URL, kept until the rater enrols
PANEL_KEY = "study_panel"
REASONS = {
    "invalid": ("This invitation link is not valid",
                ("Please check that you copied the whole link, or ask the study team for a "
                 "new one.")),
    "expired": ("This invitation has expired",
                ("The study no longer accepts new participants with this link. Thank you for "
                 "your interest.")),
    "exhausted": ("This invitation has been used up",
                  ("The planned number of participants has been reached for this link. Thank "
                   "you for your interest.")),
    "revoked": ("This invitation has been withdrawn",
                ("The study team no longer uses this link. Thank you for your interest.")),
    "closed": ("This study is closed",
               ("The study no longer accepts answers. Thank you for your interest; your "
                "earlier answers, if any, are kept.")),
    "duplicate": ("You have already taken part",
                  ("Your panel id has already been used for this study. To continue where you "
                   "stopped, use the personal link shown to you on the study pages.")),
}


def _no_store(resp: HttpResponse) -> HttpResponse:
    resp["Cache-Control"] = "no-store, private"
    resp["Referrer-Policy"] = "same-origin"
    return resp


def session_rater(request: HttpRequest) -> Rater | None:
    """The rater of this browser session, or None."""
    token = request.session.get(SESSION_KEY)
    if not token:
        return None
    return Rater.objects.select_related("study").filter(resume_token=token).first()


def _page(request: HttpRequest, template: str, ctx: dict, status: int = 200) -> HttpResponse:
    ctx.setdefault("preview", bool(request.session.get(PREVIEW_KEY)))
    return _no_store(render(request, template, ctx, status=status))


def _problem(request: HttpRequest, reason: str) -> HttpResponse:
    title, text = REASONS[reason]
    status = {"invalid": 404, "duplicate": 409}.get(reason, 410)
    return _page(request, "studies/rater_problem.html", {"title": title, "text": text,
                                                         "reason": reason}, status)


@never_cache
@require_http_methods(["GET", "POST"])
def invitation(request: HttpRequest, token: str) -> HttpResponse:
    """Landing page of an invitation link; POST starts (enrols) a new rater."""
    inv = Invitation.objects.select_related("study").filter(token=token).first()
    if inv is None:
        return _problem(request, "invalid")
    rater = session_rater(request)
    if rater is not None and rater.study_id == inv.study_id and not rater.is_preview:
        return redirect("studies:take")
    problem = inv.problem() or ("closed" if inv.study.closed else None)
    if problem:
        return _problem(request, problem)
    panel = panel_params(request.GET)
    if panel:
        # keep the panel ids in the session and drop them from the address bar
        request.session[PANEL_KEY] = {"token": token, **panel}
        return redirect("studies:invitation", token=token)
    if request.method == "POST":
        stored = request.session.get(PANEL_KEY) or {}
        panel = {k: v for k, v in stored.items() if k != "token"} \
            if stored.get("token") == token else {}
        try:
            rater = enroll(token, panel=panel)
        except InvitationError as exc:
            return _problem(request, exc.reason)
        except DesignError:
            return _page(request, "studies/rater_problem.html",
                         {"title": "This study is not ready",
                          "text": "Please contact the study team."}, 503)
        request.session.cycle_key()
        request.session[SESSION_KEY] = rater.resume_token
        request.session.pop(PANEL_KEY, None)
        request.session.pop(PREVIEW_KEY, None)
        return redirect("studies:take")
    return _page(request, "studies/rater_welcome.html", {"study": inv.study})


#: What an invitation token looks like (``secrets.token_urlsafe``).
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _typed_code(text: str) -> str:
    """The invitation code in what a rater typed or pasted (the code, or the whole link)."""
    code = "".join(text.split())
    if "/take/i/" in code:  # a pasted invitation link
        code = code.split("/take/i/", 1)[1].split("/", 1)[0].split("?", 1)[0]
    return code


@never_cache
@require_http_methods(["GET", "POST"])
def enter_code(request: HttpRequest) -> HttpResponse:
    """Start page without a link: type the invitation code (or continue a session)."""
    if session_rater(request) is not None:
        return redirect("studies:take")
    if request.method == "POST":
        code = _typed_code(request.POST.get("code", ""))
        if TOKEN_RE.fullmatch(code):
            return redirect("studies:invitation", token=code)
        return _page(request, "studies/rater_code.html",
                     {"error": "This is not a valid invitation code. Please copy the whole code "
                               "(or the whole link) from your invitation."}, 400)
    return _page(request, "studies/rater_code.html", {})


@never_cache
@require_GET
def resume(request: HttpRequest, token: str) -> HttpResponse:
    """Personal resume link: binds this browser to the rater and continues."""
    rater = Rater.objects.filter(resume_token=token).first()
    if rater is None:
        return _problem(request, "invalid")
    request.session.cycle_key()
    request.session[SESSION_KEY] = rater.resume_token
    if not rater.is_preview:
        request.session.pop(PREVIEW_KEY, None)
    return redirect("studies:take")


def _resume_url(request: HttpRequest, rater: Rater) -> str:
    return request.build_absolute_uri(reverse("studies:resume", args=[rater.resume_token]))


@never_cache
@require_GET
def take(request: HttpRequest) -> HttpResponse:
    """Dispatch to the rater's current step."""
    rater = session_rater(request)
    if rater is None:
        return redirect("studies:enter_code")
    return redirect(f"studies:{rater.step}")


def _rater_or_redirect(request: HttpRequest, step: str) -> tuple[Rater | None, HttpResponse | None]:
    rater = session_rater(request)
    if rater is None:
        return None, redirect("studies:enter_code")
    if rater.step != step:
        return None, redirect(f"studies:{rater.step}")
    return rater, None


@never_cache
@require_http_methods(["GET", "POST"])
def consent(request: HttpRequest) -> HttpResponse:
    """Consent page (text of the study); agreeing moves on to the questionnaire."""
    rater, other = _rater_or_redirect(request, "consent")
    if other:
        return other
    if request.method == "POST":
        if request.POST.get("agree") == "yes":
            advance(rater, Step.CONSENT, Step.QUESTIONNAIRE, consented_at=timezone.now())
            return redirect("studies:questionnaire")
        advance(rater, Step.CONSENT, Step.DECLINED, declined_at=timezone.now())
        return redirect("studies:declined")
    return _page(request, "studies/rater_consent.html",
                 {"study": rater.study, "resume_url": _resume_url(request, rater)})


@never_cache
@require_http_methods(["GET", "POST"])
def questionnaire(request: HttpRequest) -> HttpResponse:
    """Profession and experience; the group stays the invitation's (locked)."""
    rater, other = _rater_or_redirect(request, "questionnaire")
    if other:
        return other
    form = QuestionnaireForm(request.POST or None, study=rater.study, group=rater.group)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        advance(
            rater, Step.QUESTIONNAIRE, Step.INSTRUCTIONS, self_reported_profession=data["profession"],
            years_experience=data.get("years_experience"),
            questionnaire={"familiarity": data["familiarity"]} if "familiarity" in data
            else {})
        return redirect("studies:instructions")
    return _page(request, "studies/rater_questionnaire.html", {"form": form,
                                                              "study": rater.study})


@never_cache
@require_http_methods(["GET", "POST"])
def instructions(request: HttpRequest) -> HttpResponse:
    """Instructions with a worked example; POST starts the trials."""
    rater, other = _rater_or_redirect(request, "instructions")
    if other:
        return other
    if request.method == "POST":
        try:
            begin_trials(rater)
        except StudyClosed:
            return _problem(request, "closed")
        except DesignError:  # e.g. a reserved subject lost its renders after the freeze
            return _page(request, "studies/rater_problem.html",
                         {"title": "This study is not ready",
                          "text": "Please contact the study team."}, 503)
        return redirect("studies:trials")
    study = rater.study
    return _page(request, "studies/rater_instructions.html", {
        "study": study, "keys": list(range(1, study.n_choices + 1)),
        "n_practice": study.n_practice,
        "example_correct": 2 if study.n_choices >= 2 else 1})


def _int(value: str | None, default=None):
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def _float(value: str | None):
    try:
        v = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return v if v is None or math.isfinite(v) else None


def _enlarged(raw: str, k: int) -> list[int]:
    """Positions the page reports as enlarged (``"0,2"``: the target and candidate 2);
    anything that is not a position 0..k is ignored (never a reason to refuse an answer)."""
    out = set()
    for part in (raw or "").split(",")[: k + 1]:
        n = _int(part.strip())
        if n is not None and 0 <= n <= k:
            out.add(n)
    return sorted(out)


def _answer_fields(post, study) -> tuple[str | None, int | None, int | None]:
    """(problem, choice, confidence) of a posted answer; ``problem`` says what is wrong
    with it in words for the rater (None: acceptable). A missing choice or confidence is
    acceptable only with a time limit (time ran out); values that are not whole numbers in
    range never."""
    k = study.n_choices
    raw = (post.get("choice") or "").strip()
    choice = _int(raw)
    if raw and (choice is None or not 1 <= choice <= k):
        return f"That answer is not one of the faces. Choose a face (1 to {k}).", None, None
    if choice is None and not study.time_limit_s:
        return f"Please choose one of the faces (click it or press 1 to {k}).", None, None
    confidence = None
    if study.ask_confidence:
        raw = (post.get("confidence") or "").strip()
        confidence = _int(raw)
        if raw and (confidence is None or not 1 <= confidence <= 5):
            return "How sure you are must be a number from 1 to 5. Please answer again.", None, None
        if not raw and choice is not None and not study.time_limit_s:
            return "Please also say how sure you are (1 to 5).", None, None
    return None, choice, confidence


def _trial_page(request: HttpRequest, rater: Rater, trial: Trial, error: str | None = None,
                status: int = 200) -> HttpResponse:
    """The page of the rater's current trial (``error`` above it: why an answer was refused)."""
    study = rater.study
    mark_shown(trial)
    # answers are sequential, so the current position = trials answered (no count query)
    n_total = study.trials_per_rater + study.n_catch
    n_done = max(0, trial.position - study.n_practice)
    imgs = list(trial.images.order_by("slot").values_list("slot", "token"))
    ctx = {
        "study": study, "trial": trial, "practice": trial.kind == "practice",
        "target": imgs[0][1], "candidates": [(s, t) for s, t in imgs[1:]],
        "n_done": n_done, "n_total": n_total,
        "percent": round(100 * n_done / n_total) if n_total else 0,
        "time_left_s": time_left_s(trial, study), "confidence_levels": [1, 2, 3, 4, 5],
        "resume_url": _resume_url(request, rater), "error": error,
    }
    return _page(request, "studies/rater_trial.html", ctx, status)


@never_cache
@require_http_methods(["GET", "POST"])
def trials(request: HttpRequest) -> HttpResponse:
    """GET: the current trial (large images, keys 1..k); POST: answer it (idempotent).

    An answer that cannot be stored as sent (no face chosen without a time limit, a choice
    or confidence that is not a number in range) is refused with the trial page and a
    message saying why (400); nothing is stored and the clock keeps running."""
    rater = session_rater(request)
    if rater is None:
        return redirect("studies:enter_code")
    if rater.step != Step.TRIALS:
        return redirect(f"studies:{rater.step}")
    study = rater.study
    if study.closed and not rater.is_preview:
        return _problem(request, "closed")
    if request.method == "POST":
        token = request.POST.get("trial", "")
        problem, choice, confidence = _answer_fields(request.POST, study)
        if problem is not None:
            trial = current_trial(rater)
            if trial is not None and trial.token == token:  # the trial on screen: say why
                return _trial_page(request, rater, trial, problem, status=400)
            return redirect("studies:trials")  # stale/back-button/replayed form: no change
        try:
            answer, _created = record_answer(
                rater, token, choice, _float(request.POST.get("rt_ms")), confidence,
                enlarged=_enlarged(request.POST.get("enlarged", ""), study.n_choices))
        except StudyClosed:
            return _problem(request, "closed")
        except ValueError:
            return redirect("studies:trials")  # stale/back-button/replayed form: no change
        if answer.trial.kind == "practice":
            return redirect("studies:feedback", token=answer.trial.token)
        return redirect("studies:trials")
    trial = current_trial(rater)
    if trial is None:
        return redirect("studies:done")
    return _trial_page(request, rater, trial)


@never_cache
@require_GET
def feedback(request: HttpRequest, token: str) -> HttpResponse:
    """Feedback after a practice trial (only practice trials, only the rater's own)."""
    rater = session_rater(request)
    if rater is None:
        return redirect("studies:enter_code")
    trial = (Trial.objects.select_related("answer")
             .filter(token=token, rater=rater, kind="practice", answer__isnull=False).first())
    if trial is None:
        raise Http404("no feedback")
    return _page(request, "studies/rater_feedback.html", {
        "correct": trial.answer.correct, "right": trial.correct_index + 1,
        "timed_out": trial.answer.timed_out})


@never_cache
@require_GET
def image(request: HttpRequest, token: str) -> HttpResponse:
    """PNG behind an opaque token: only the session rater's current trial; no metadata."""
    rater_token = request.session.get(SESSION_KEY)
    paths = current_image_path(token, rater_token) if rater_token else None
    if paths is None:
        raise Http404("no such image")
    render_rel, snapshot = paths
    try:
        frozen = data_path(snapshot)
        # the study's frozen copy; the live render only if the copy is missing (e.g. a web
        # server that does not share DATA_DIR with the one that froze the study)
        data = (frozen.read_bytes() if frozen.is_file()
                else clean_png(ensure_local(render_rel)))
    except (OSError, ValueError):
        raise Http404("image not available") from None
    return _no_store(HttpResponse(data, content_type="image/png"))


@never_cache
@require_GET
def done(request: HttpRequest) -> HttpResponse:
    """Thank-you page."""
    rater = session_rater(request)
    if rater is None:
        return redirect("studies:enter_code")
    if rater.step != Step.DONE:
        return redirect(f"studies:{rater.step}")
    study = rater.study
    # the completion code / panel redirect exists only here, i.e. after the last answer is
    # stored (step "done" is set in the same transaction)
    panel = bool(rater.panel_pid and study.panel_completion_url)
    return _page(request, "studies/rater_done.html", {
        "study": study, "rater": rater, "panel_url": study.panel_completion_url if panel else "",
        "completion_code": study.panel_completion_code if rater.panel_pid else ""})


@never_cache
@require_GET
def declined(request: HttpRequest) -> HttpResponse:
    """Page after declining consent."""
    rater = session_rater(request)
    if rater is None:
        return redirect("studies:enter_code")
    if rater.step != Step.DECLINED:
        return redirect(f"studies:{rater.step}")
    return _page(request, "studies/rater_problem.html",
                 {"title": "Thank you", "text": "You chose not to take part. Nothing else is "
                  "stored about you. You can close this page."})
