"""Who may see what: researchers (staff or the "researcher" group) see only their cohorts.

Everything below ``/cohorts/`` goes through :func:`cohort_view`: anonymous users are
sent to the login page (HTML pages) or get 403 (files, JSON, downloads); signed-in
users who are not researchers of the cohort get 404, so a cohort's existence is not
revealed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden

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


def cohort_view(kind: str = "page") -> Callable:
    """Decorator for views taking ``cohort_id``: replaces it by the permitted Cohort.

    ``kind="page"`` redirects anonymous users to the login page; ``kind="file"``
    answers 403 instead (downloads, images, JSON).
    """

    def deco(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, cohort_id: int, *args, **kwargs) -> HttpResponse:
            if not request.user.is_authenticated:
                if kind == "page":
                    return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
                return HttpResponseForbidden("login required")
            try:
                cohort = cohorts_for(request.user).get(pk=cohort_id)
            except Cohort.DoesNotExist:
                raise Http404("no such cohort") from None
            return view(request, cohort, *args, **kwargs)

        return wrapper

    return deco
