"""Project middleware: security headers on every response.

:class:`SecurityHeadersMiddleware` is the outermost middleware, so the headers are also
on static files (WhiteNoise answers before the inner middlewares), redirects, error
pages and the admin.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

#: No inline script or style anywhere in our pages (scripts and styles are static files);
#: images are served by our own views; nothing may frame a page.
STRICT_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
              "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
              "base-uri 'none'; object-src 'none'")
#: django-rq's dashboard templates (staff only) carry inline scripts and styles.
RELAXED_CSP = STRICT_CSP.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'").replace(
    "style-src 'self'", "style-src 'self' 'unsafe-inline'")
#: Browser features no page of the platform uses.
PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"


def csp_for(path: str) -> str:
    """The Content-Security-Policy for a request path."""
    relaxed = tuple(getattr(settings, "CSP_RELAXED_PATH_PREFIXES", ()))
    return RELAXED_CSP if relaxed and path.startswith(relaxed) else STRICT_CSP


class SecurityHeadersMiddleware:
    """Adds ``Content-Security-Policy`` and ``Permissions-Policy`` to every response.

    A view that sets its own policy keeps it.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", csp_for(request.path_info))
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        return response
