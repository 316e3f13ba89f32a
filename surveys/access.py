"""Who may see what: researchers (staff or the "researcher" group) see only their cohorts.

Everything below ``/cohorts/`` goes through :func:`cohort_view`: anonymous users get
403 — for HTML pages a short page with a sign-in link that returns to the page, for
files, JSON and downloads a bare 403; signed-in users who are not researchers of the
cohort get 404, so a cohort's existence is not revealed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from urllib.parse import urlencode

from django.db.models import Q, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseNotFound,
)
from django.shortcuts import render
from django.urls import reverse

from .models import Cohort

RESEARCHER_GROUP = "researcher"


def is_researcher(user) -> bool:
    """True for active staff and members of the ``researcher`` group."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return bool(user.is_staff or user.groups.filter(name=RESEARCHER_GROUP).exists())


def cohorts_for(user) -> QuerySet[Cohort]:
    """Cohorts ``user`` may open: superusers all, researchers those they own or belong to."""
    if not is_researcher(user):
        return Cohort.objects.none()
    if user.is_superuser:
        return Cohort.objects.all()
    return Cohort.objects.filter(Q(owner=user) | Q(researchers=user)).distinct()


def sign_in_required(request: HttpRequest) -> HttpResponse:
    """403 page for anonymous visitors of a researcher page, with a link to sign in and
    come back (``?next=`` is the requested path; Django's login view only follows
    same-host targets)."""
    login = reverse("login") + "?" + urlencode({"next": request.get_full_path()})
    return render(request, "surveys/sign_in_required.html", {"login_url": login}, status=403)


def cohort_view(kind: str = "page") -> Callable:
    """Decorator for views taking ``cohort_id``: replaces it by the permitted Cohort.

    Anonymous users get 403: ``kind="page"`` with :func:`sign_in_required`,
    ``kind="file"`` (downloads, images, JSON) a bare 403.
    """

    def deco(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, cohort_id: int, *args, **kwargs) -> HttpResponse:
            if not request.user.is_authenticated:
                if kind == "page":
                    return sign_in_required(request)
                return HttpResponseForbidden("login required")
            try:
                cohort = cohorts_for(request.user).get(pk=cohort_id)
            except Cohort.DoesNotExist:
                raise Http404("no such cohort") from None
            return view(request, cohort, *args, **kwargs)

        return wrapper

    return deco


def cohort_upload_gate(request: HttpRequest, view_kwargs: dict) -> HttpResponse | None:
    """Rights to upload into ``view_kwargs["cohort_id"]``, checked before the body is read
    (see :func:`deidstudy.middleware.accepts_uploads`): anonymous 403, a user who may not
    open the cohort 404 (as :func:`cohort_view` answers), else None."""
    if not request.user.is_authenticated:
        return HttpResponseForbidden("login required")
    if not cohorts_for(request.user).filter(pk=view_kwargs.get("cohort_id")).exists():
        return HttpResponseNotFound("no such cohort")
    return None
