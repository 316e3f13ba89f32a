"""Project middleware: security headers on every response.

:class:`SecurityHeadersMiddleware` is the outermost middleware, so the headers are also
on static files (WhiteNoise answers before the inner middlewares), redirects, error
pages and the admin.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
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


# ---------------------------------------------------------------- request bodies

#: Room for the multipart framing around the files of an upload (part headers, boundaries).
MULTIPART_ALLOWANCE = 16 * 1024 * 1024
#: Free space left on the upload folder's file system after an upload.
DISK_RESERVE_BYTES = 256 * 1024 * 1024

UploadGate = Callable[[HttpRequest, dict], "HttpResponse | None"]


def accepts_uploads(gate: UploadGate) -> Callable:
    """Mark a view as an upload endpoint (files up to ``UPLOAD_MAX_BYTES``).

    ``gate(request, view_kwargs)`` runs *before* the body is read — it checks the
    caller's rights and returns a response to refuse (or None). Every other view
    accepts bodies up to ``DATA_UPLOAD_MAX_MEMORY_SIZE`` and no file: file parts are
    read and dropped, never written (:class:`RequestBodyGuardMiddleware`).
    """

    def deco(view: Callable) -> Callable:
        view.upload_gate = gate
        return view

    return deco


def _refuse(request: HttpRequest, status: int, message: str) -> HttpResponse:
    from django.http import JsonResponse

    if (request.headers.get("x-requested-with") == "XMLHttpRequest"
            or "application/json" in request.headers.get("accept", "")):
        return JsonResponse({"ok": False, "error": message}, status=status)
    return HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")


class _DropFiles(FileUploadHandler):
    """Upload handler of the views that take no file: file parts are skipped (not stored)."""

    def new_file(self, *args, **kwargs) -> None:
        raise SkipFile()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        return None

    def file_complete(self, file_size: int) -> None:
        return None


class RequestBodyGuardMiddleware:
    """Decides about a request body before anything reads it.

    Must come before ``CsrfViewMiddleware`` (which reads POST data): its
    ``process_view`` runs first, when the view is known but no byte of the body has been
    read. Upload endpoints (:func:`accepts_uploads`) first run their gate (rights),
    then refuse a body larger than ``UPLOAD_MAX_BYTES`` (+ multipart framing) with 413,
    one without a length with 411, and one the disk cannot hold with 507. Every other
    endpoint refuses bodies over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` with 413 and drops file
    parts unread to disk. Django never reads past ``Content-Length``, so nothing beyond
    these limits is ever read.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request: HttpRequest, view_func: Callable, view_args: tuple,
                     view_kwargs: dict) -> HttpResponse | None:
        import shutil

        raw = request.META.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = int(raw) if raw else 0
        except ValueError:
            return _refuse(request, 400, "invalid Content-Length")
        gate = getattr(view_func, "upload_gate", None)
        if gate is None:
            limit = int(getattr(settings, "DATA_UPLOAD_MAX_MEMORY_SIZE", None) or 2621440)
            if length > limit:
                return _refuse(request, 413, f"request body larger than {limit} bytes")
            request.upload_handlers = [_DropFiles(request)]
            return None
        refused = gate(request, view_kwargs)
        if refused is not None:
            return refused
        if not length:
            if chunked:
                return _refuse(request, 411, "uploads need a Content-Length")
            return None
        limit = int(settings.UPLOAD_MAX_BYTES)
        if length > limit + MULTIPART_ALLOWANCE:
            return _refuse(request, 413, f"the upload is larger than {limit} bytes")
        folder = getattr(settings, "FILE_UPLOAD_TEMP_DIR", None) or str(settings.DATA_DIR)
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and length > free - DISK_RESERVE_BYTES:
            return _refuse(request, 507, "not enough free disk space for this upload on the "
                                         "server; try a smaller one or ask the administrator")
        return None
