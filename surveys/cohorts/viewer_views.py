"""Researcher workspace data: the viewers' manifest, slices and meshes, the subject's live
status, QA thumbnails.

Every view goes through :func:`surveys.access.cohort_view` (anonymous 403, other users
404) and addresses a subject by its pseudonym within the cohort, a series by its label
(``S01``) and the cached data by an opaque version (:func:`surveys.processing.viewer.series_version`).
Payloads hold pixel values, geometry in millimetres and mesh coordinates only — no
header value, no identifier. Responses are ``private, no-store``: the data are cached
on the server (:mod:`surveys.processing.viewer`) and in the page's memory, never in the browser's
disk cache (these are identifiable images).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
from functools import wraps

from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_GET

from pipeline.atomic import atomic_write_bytes
from pipeline.errors import safe_message
from pipeline.viewer import VIEWS

from ..access import cohort_view
from ..models import Cohort, RenderImage, Subject
from ..processing import viewer
from ..storage.mirror import ensure_local

log = logging.getLogger(__name__)
LABEL_RE = re.compile(r"S\d{2,4}")
VERSION_RE = re.compile(r"[0-9a-f]{16}")


def _no_store(resp: HttpResponse) -> HttpResponse:
    resp["Cache-Control"] = "private, no-store"
    return resp


def _binary(request: HttpRequest, data: bytes, *, gzipped: bool = False) -> HttpResponse:
    """``application/octet-stream``, gzip-encoded when the browser accepts it."""
    accepts = "gzip" in request.headers.get("accept-encoding", "").lower()
    if gzipped and not accepts:
        data, gzipped = gzip.decompress(data), False
    elif not gzipped and accepts:
        data, gzipped = viewer.gzip_bytes(data), True
    resp = HttpResponse(data, content_type="application/octet-stream")
    if gzipped:
        resp["Content-Encoding"] = "gzip"
    resp["Vary"] = "Accept-Encoding"
    return _no_store(resp)


def _subject(cohort: Cohort, pseudonym: str) -> Subject:
    return get_object_or_404(Subject.objects.prefetch_related("stages", "series"),
                             cohort=cohort, pseudonym=pseudonym)


def _series(subject: Subject, label: str):
    if not LABEL_RE.fullmatch(label):
        raise Http404("no such series")
    for s in subject.series.all():
        if s.label == label:
            return s
    raise Http404("no such series")


def _data(subject: Subject, label: str, version: str) -> viewer.SeriesData:
    """Cached data of series ``label`` at ``version``; 410 when the series was processed
    again since the page was loaded (the page then reloads its manifest)."""
    if not VERSION_RE.fullmatch(version):
        raise Http404("no such version")
    s = _series(subject, label)
    run = viewer.deid_run(subject)
    if not viewer.series_ready(s, run):
        raise Http404("not de-identified")
    if viewer.series_version(s, run) != version:
        raise _Gone()
    try:
        return viewer.open_series(s, run)
    except viewer.ViewerUnavailable:
        raise Http404("no viewer data") from None


class _Gone(Exception):
    pass


def _gone_or(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _Gone:
            return _no_store(JsonResponse({"error": "this series was processed again; reload"},
                                          status=410))

    return wrapper


@require_GET
@cohort_view("file")
def manifest(request: HttpRequest, cohort: Cohort, pseudonym: str) -> JsonResponse:
    """What the viewers need: the subject's series, and for the chosen one (``?series=``,
    default the primary series) the three views' geometry, removed voxels per image,
    where to start, window presets and the URLs of slices and meshes. Builds the
    series' cached data on the first request."""
    subject = _subject(cohort, pseudonym)
    run = viewer.deid_run(subject)
    series = sorted(subject.series.all(), key=lambda s: s.label)
    primary = subject.primary_series()
    wanted = request.GET.get("series") or (primary.label if primary else "")
    listing = [{"label": s.label, "slices": s.n_slices, "ready": viewer.series_ready(s, run),
                "primary": primary is not None and s.pk == primary.pk} for s in series]
    out = {"subject": subject.pseudonym, "series": listing, "windows": viewer.WINDOWS,
           "deidentify_status": run.status if run else "", "selected": None}
    chosen = next((s for s in series if s.label == wanted), None)
    if chosen is None:
        if request.GET.get("series"):
            raise Http404("no such series")
        return _no_store(JsonResponse(out))
    if not viewer.series_ready(chosen, run):
        out["message"] = "The viewers are available once de-identification is done."
        return _no_store(JsonResponse(out))
    try:
        data = viewer.open_series(chosen, run)
    except viewer.ViewerUnavailable as exc:
        out["message"] = f"The viewers are not available: {exc}."
        return _no_store(JsonResponse(out))
    except (ValueError, OSError) as exc:  # a stored series that cannot be read
        log.warning("viewer data of subject row %s series %s not built (%s)", subject.pk,
                    chosen.label, type(exc).__name__)
        out["message"] = f"The viewers are not available: {safe_message(exc)}."
        return _no_store(JsonResponse(out))
    data.touch()
    first = reverse("surveys:viewer_slice", args=[cohort.pk, subject.pseudonym, chosen.label,
                                                  data.version, "axial", 0])
    base = first[: -len("axial/0.bin")]
    meta = data.meta
    out["selected"] = {
        "label": chosen.label, "version": data.version, "base": base,
        "views": {name: {**data.views[name].as_json(),
                         "removed": meta["removed"]["per_image"][name],
                         "start": meta["start"][name]} for name in VIEWS},
        "geometry": {k: meta["geometry"][k] for k in ("origins", "row", "col", "normal",
                                                      "pixel_mm", "offsets_mm", "cells_mm",
                                                      "shape")},
        "removed_voxels": meta["removed"]["voxels"], "removed_ml": meta["removed"]["ml"],
        "regular": meta["regular"],
        "meshes": {name: f"{base}mesh/{name}.bin" for name in viewer.MESH_NAMES},
    }
    return _no_store(JsonResponse(out))


@require_GET
@cohort_view("file")
@_gone_or
def slice_data(request: HttpRequest, cohort: Cohort, pseudonym: str, label: str, version: str,
               view: str, n: int) -> HttpResponse:
    """Image ``n`` of ``view`` (axial/coronal/sagittal), original and de-identified
    (:func:`pipeline.viewer.encode_slice`)."""
    if view not in VIEWS:
        raise Http404("no such view")
    data = _data(_subject(cohort, pseudonym), label, version)
    if not 0 <= n < data.views[view].n:
        raise Http404("no such image")
    return _binary(request, data.slice_bytes(view, n))


@require_GET
@cohort_view("file")
@_gone_or
def mesh_data(request: HttpRequest, cohort: Cohort, pseudonym: str, label: str, version: str,
              name: str) -> HttpResponse:
    """Decimated surface ``name`` (skin/bone × original/deid,
    :func:`pipeline.viewer.encode_mesh`); built on the first request."""
    if name not in viewer.MESH_NAMES:
        raise Http404("no such mesh")
    subject = _subject(cohort, pseudonym)
    data = _data(subject, label, version)
    try:
        body = data.mesh_bytes(name)
    except KeyError:
        raise Http404("this surface could not be made for this series") from None
    except (ValueError, OSError) as exc:
        log.warning("surfaces of subject row %s series %s not made (%s)", subject.pk, label,
                    type(exc).__name__)
        return _no_store(JsonResponse({"error": safe_message(exc)}, status=500))
    return _binary(request, body, gzipped=True)


def subject_signature(subject: Subject) -> str:
    """Changes when the subject's stages finish or its results (images, QA) change."""
    stages = sorted(subject.stages.all(), key=lambda r: r.order)
    images = sorted(subject.images.values_list("pk", "path"))
    series = sorted((s.label, s.deid_dir, s.removed_ml, s.method) for s in subject.series.all())
    state = [(r.stage, r.status, r.attempts, r.finished and r.finished.isoformat())
             for r in stages]
    return hashlib.sha256(repr((images, series, state)).encode()).hexdigest()[:16]


@require_GET
@cohort_view("file")
def subject_status(request: HttpRequest, cohort: Cohort, pseudonym: str) -> JsonResponse:
    """The subject's stages and a signature of its results (polled by the subject page,
    which reloads what changed)."""
    subject = _subject(cohort, pseudonym)
    stages = sorted(subject.stages.all(), key=lambda r: r.order)
    signature = subject_signature(subject)
    return _no_store(JsonResponse({
        "stages": [{"id": r.pk, "stage": r.stage, "status": r.status,
                    "progress": round(r.progress, 2), "attempts": r.attempts, "error": r.error,
                    "seconds": None if r.seconds is None else round(r.seconds, 1)}
                   for r in stages],
        "settled": all(r.status not in ("queued", "running") for r in stages),
        "signature": signature,
    }))


THUMB_WIDTH = 360


@require_GET
@cohort_view("file")
def image_thumb(request: HttpRequest, cohort: Cohort, image_id: int) -> HttpResponse:
    """A pipeline PNG scaled to :data:`THUMB_WIDTH` pixels wide (QA grid), cached on disk."""
    from PIL import Image

    img = get_object_or_404(RenderImage, pk=image_id, subject__cohort=cohort)
    try:
        src = ensure_local(img.path)
        st = src.stat()
    except (OSError, ValueError):
        raise Http404("file not available") from None
    key = hashlib.sha256(f"{img.pk}|{img.path}|{st.st_size}|{st.st_mtime_ns}|{THUMB_WIDTH}"
                         .encode()).hexdigest()[:20]
    cache = viewer.thumb_dir(cohort.pk)
    path = cache / f"{img.pk}-{key}.png"
    try:
        data = path.read_bytes()
    except OSError:
        with Image.open(src) as im:
            im = im.convert("RGB")
            if im.width > THUMB_WIDTH:
                h = max(1, round(im.height * THUMB_WIDTH / im.width))
                im = im.resize((THUMB_WIDTH, h), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f"{img.pk}-*.png"):
            old.unlink(missing_ok=True)

        atomic_write_bytes(path, data)
    return _no_store(HttpResponse(data, content_type="image/png"))
