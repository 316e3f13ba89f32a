"""Django settings for deidstudy, driven by environment variables.

Every setting a deployment changes is read from the environment (12-factor
style, as healthchecks does); the defaults give a working single-machine
set-up with SQLite under ``var/``.

Environment variables
---------------------
DEIDSTUDY_PRODUCTION   "1" in production: secure cookies, HSTS, SSL redirect, and both secrets
                       below are required (the published development values are refused).
DEIDSTUDY_SECRET_KEY   Django secret key (required in production).
DEIDSTUDY_SECRET_KEY_FALLBACKS  former Django keys, comma-separated (key rotation).
DEIDSTUDY_DEBUG        "1" for development (default "0").
DEIDSTUDY_ALLOWED_HOSTS comma-separated host names (default "localhost,127.0.0.1").
DATABASE_URL           e.g. postgres://user:pass@host/db (default: SQLite in var/).
REDIS_URL              e.g. redis://127.0.0.1:6379/0 for RQ.
DEIDSTUDY_DATA_DIR     originals + derived data (default VAR_DIR/data); share it (NFS…) between
                       worker machines when scaling out.
DEIDSTUDY_UPLOAD_MAX_BYTES   largest accepted upload / unpacked archive (default 8 GiB).
DEIDSTUDY_ZIP_MAX_RATIO      largest accepted compression ratio of a zip member (default 200).
DEIDSTUDY_RQ_QUEUE     name of the pipeline queue (default "pipeline").
DEIDSTUDY_IMPORT_QUEUE queue of the upload imports (default: the pipeline queue).
DEIDSTUDY_SHARED_STORAGE  "s3" or "path:/folder": share cohort files between machines.
DEIDSTUDY_FACE_METHOD  face method of the web pipeline (auto/anatomical/model/none).
DEIDSTUDY_REID_ATTACKS reconstruction attacks of the embeddings stage (default
                       "tissue_depth,learned"; "none").
DEIDSTUDY_VAR_DIR      state folder (database, originals, outputs); default ./var.
DEIDSTUDY_PROJECT_SECRET secret for UID hashing and pseudonymisation (required in production).
DEIDSTUDY_UMASK        umask of every process (default 077: files 0600, folders 0700).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _bundled(name: str) -> Path:
    """The top-level ``templates``/``static`` folder of a checkout, or the copy an
    installed wheel carries inside this package (see pyproject.toml)."""
    checkout = BASE_DIR / name
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / name


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


VAR_DIR = Path(os.environ.get("DEIDSTUDY_VAR_DIR", BASE_DIR / "var")).resolve()

DEBUG = env_bool("DEIDSTUDY_DEBUG", False)
PRODUCTION = env_bool("DEIDSTUDY_PRODUCTION", False)

#: Published development values: accepted only outside production (see surveys/checks.py).
DEV_SECRET_KEY = "dev-insecure-key-change-me-" + "x" * 30
DEV_PROJECT_SECRET = "deidstudy-default-project-secret"


def _secret(name: str, dev_value: str) -> str:
    """A secret from the environment; outside production the development value if unset.

    In production (``DEIDSTUDY_PRODUCTION=1``, whatever ``DEIDSTUDY_DEBUG`` says) an unset,
    empty or published development value refuses to start: every process that loads these
    settings (web server, workers, management commands) stops with this message.
    """
    value = os.environ.get(name, "").strip()
    if value and value != dev_value:
        return value
    if PRODUCTION:
        raise ImproperlyConfigured(
            f"{name} must be set to a private value in production (DEIDSTUDY_PRODUCTION=1); "
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'")
    return dev_value


# Django's key (sessions, CSRF, password reset links). Rotate it by moving the old key to
# DEIDSTUDY_SECRET_KEY_FALLBACKS (comma-separated) until the sessions signed with it expire.
SECRET_KEY = _secret("DEIDSTUDY_SECRET_KEY", DEV_SECRET_KEY)
SECRET_KEY_FALLBACKS = env_list("DEIDSTUDY_SECRET_KEY_FALLBACKS", "")

# Secret used for HMAC of DICOM UIDs and pseudonyms. Must stay the same for the
# life of a project so that re-runs map the same input UID to the same output UID.
# Whoever knows it can link de-identified UIDs to the originals and undo the date shift.
PROJECT_SECRET = _secret("DEIDSTUDY_PROJECT_SECRET", DEV_PROJECT_SECRET)

ALLOWED_HOSTS = env_list("DEIDSTUDY_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "surveys",
]

MIDDLEWARE = [
    # outermost: Content-Security-Policy on every response, static files included
    "deidstudy.middleware.SecurityHeadersMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from gunicorn too (the rater pages need their JS and CSS).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # before CSRF, which reads POST data: rights and size of a body are checked unread
    "deidstudy.middleware.RequestBodyGuardMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "deidstudy.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [_bundled("templates")],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "deidstudy.wsgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'deidstudy.sqlite3'}"),
        conn_max_age=int(os.environ.get("DEIDSTUDY_DB_CONN_MAX_AGE", "0")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web server and RQ workers share one SQLite file: WAL lets readers run while a
    # worker writes; IMMEDIATE transactions + a busy timeout avoid "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update({
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    })

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [_bundled("static")]
# Only needed for `collectstatic` (e.g. to serve /static/ from nginx).
STATIC_ROOT = os.environ.get("DEIDSTUDY_STATIC_ROOT") or None
# Serve straight from the source folders: no collectstatic step is needed to deploy.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Originals and derived data live under VAR_DIR, never in a web-served folder.
DATA_DIR = Path(os.environ.get("DEIDSTUDY_DATA_DIR", VAR_DIR / "data")).resolve()

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}


def shared_storage_config(environ: Mapping[str, str] = os.environ) -> dict | None:
    """``STORAGES["cohortdata"]`` from the environment, or None (no shared storage).

    Optional shared storage for several worker machines (see surveys/shared.py):

    ``DEIDSTUDY_SHARED_STORAGE=s3``: an S3-compatible bucket via django-storages.
    ``AWS_STORAGE_BUCKET_NAME`` (required); ``AWS_S3_ENDPOINT_URL`` for MinIO, Ceph
    RGW… (unset: AWS); ``AWS_S3_REGION_NAME``; ``AWS_S3_ADDRESSING_STYLE`` ``path``
    (MinIO/Ceph without wildcard DNS), ``virtual`` or ``auto`` (unset: boto3's choice);
    ``DEIDSTUDY_S3_PREFIX`` key prefix (default ``deidstudy``, empty: bucket root).
    Credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or any source of
    boto3's credential chain (instance role, ``AWS_PROFILE``…). No ACL is sent: objects
    get the bucket's default (private), which also works on buckets with ACLs disabled.

    ``DEIDSTUDY_SHARED_STORAGE=path:/mnt/x``: a folder every machine mounts.
    Unset (default): DATA_DIR alone (one machine, or DATA_DIR itself on NFS/EFS).
    """
    shared = environ.get("DEIDSTUDY_SHARED_STORAGE", "").strip()
    if not shared:
        return None
    if shared == "s3":
        bucket = environ.get("AWS_STORAGE_BUCKET_NAME", "").strip()
        if not bucket:
            raise RuntimeError("DEIDSTUDY_SHARED_STORAGE=s3 needs AWS_STORAGE_BUCKET_NAME")
        style = environ.get("AWS_S3_ADDRESSING_STYLE", "").strip().lower() or None
        if style not in (None, "auto", "path", "virtual"):
            raise RuntimeError("AWS_S3_ADDRESSING_STYLE must be 'path', 'virtual' or 'auto'")
        return {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": bucket,
                "endpoint_url": environ.get("AWS_S3_ENDPOINT_URL", "").strip() or None,
                "region_name": environ.get("AWS_S3_REGION_NAME", "").strip() or None,
                "addressing_style": style,
                "location": environ.get("DEIDSTUDY_S3_PREFIX", "deidstudy").strip().strip("/"),
                "default_acl": None,
                "file_overwrite": True,
                "querystring_auth": True,
            },
        }
    if shared.startswith("path:") and shared[len("path:"):].strip():
        return {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": shared[len("path:"):].strip()},
        }
    raise RuntimeError("DEIDSTUDY_SHARED_STORAGE must be 's3' or 'path:/folder'")


_shared = shared_storage_config()
if _shared is not None:
    STORAGES["cohortdata"] = _shared

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PIPELINE_QUEUE = os.environ.get("DEIDSTUDY_RQ_QUEUE", "pipeline")
RQ_QUEUES = {
    PIPELINE_QUEUE: {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 3600},
    "default": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 3600},
}
# Web uploads are received in the web server's DATA_DIR/tmp and imported by a job on this
# queue. With DEIDSTUDY_SHARED_STORAGE (worker machines that do not see the web server's
# DATA_DIR) give it its own name and run a worker for it on the web machine.
IMPORT_QUEUE = os.environ.get("DEIDSTUDY_IMPORT_QUEUE", PIPELINE_QUEUE)
RQ_QUEUES.setdefault(IMPORT_QUEUE, {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 3600})
RQ_SHOW_ADMIN_LINK = True

# Files and folders the platform creates are private to its user (0600 / 0700): the umask
# is set when Django starts (surveys.apps). DEIDSTUDY_UMASK=027 lets the group read them.
FILE_UMASK = int(os.environ.get("DEIDSTUDY_UMASK", "077"), 8)
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700

# Uploads stream to a temporary file on disk, never into memory.
FILE_UPLOAD_HANDLERS = ["django.core.files.uploadhandler.TemporaryFileUploadHandler"]
# Uploads hold identifiable DICOM: keep their temporary files in the protected data folder
# (same file system as the cohort store), not in the world-readable /tmp.
FILE_UPLOAD_TEMP_DIR = os.environ.get("DEIDSTUDY_UPLOAD_TMP") or str(DATA_DIR / "tmp")
DATA_UPLOAD_MAX_NUMBER_FILES = int(os.environ.get("DEIDSTUDY_UPLOAD_MAX_FILES", "20000"))
UPLOAD_MAX_BYTES = int(os.environ.get("DEIDSTUDY_UPLOAD_MAX_BYTES", str(8 * 1024**3)))
ZIP_MAX_RATIO = float(os.environ.get("DEIDSTUDY_ZIP_MAX_RATIO", "200"))
ZIP_MAX_MEMBERS = int(os.environ.get("DEIDSTUDY_ZIP_MAX_MEMBERS", "200000"))
# Face method of the web pipeline (see pipeline.deidentify.METHODS).
PIPELINE_FACE_METHOD = os.environ.get("DEIDSTUDY_FACE_METHOD", "auto")
PIPELINE_RENDER_BACKEND = os.environ.get("DEIDSTUDY_RENDER_BACKEND", "auto")
# Reconstruction attacks the embeddings stage runs on every de-identified scan
# (pipeline.reconstruct.ATTACKS, comma-separated; "none" for none).
PIPELINE_REID_ATTACKS = tuple(
    a.strip().replace("-", "_") for a in
    os.environ.get("DEIDSTUDY_REID_ATTACKS", "tissue_depth,learned").split(",")
    if a.strip() and a.strip() != "none")
# A running stage whose heartbeat (every 30 s) is older than this counts as abandoned.
PIPELINE_STALE_SECONDS = int(os.environ.get("DEIDSTUDY_STALE_SECONDS", "1800"))
# A stage or upload "queued" for longer than this whose job Redis does not hold (the process
# died between the commit and the enqueue, Redis was down or flushed) is enqueued again.
PIPELINE_QUEUED_GRACE_SECONDS = int(os.environ.get("DEIDSTUDY_QUEUED_GRACE_SECONDS", "120"))
# A stage or upload whose worker died this many times in a row is failed instead of re-queued.
PIPELINE_MAX_CRASHES = int(os.environ.get("DEIDSTUDY_MAX_CRASHES", "3"))
# Viewer data (slices as int16 arrays, meshes) cached below DATA_DIR/cache/viewer on each
# machine, least recently used series deleted beyond this size (surveys.processing.viewer).
VIEWER_CACHE_MAX_BYTES = int(float(os.environ.get("DEIDSTUDY_VIEWER_CACHE_GB", "20")) * 1024**3)
# The worker builds that cache right after a subject's de-identification (0: on first view).
VIEWER_PREWARM = os.environ.get("DEIDSTUDY_VIEWER_PREWARM", "1") != "0"
# Size (pixels, square) of the renders raters and researchers see.
RENDER_SIZE_PX = int(os.environ.get("DEIDSTUDY_RENDER_SIZE_PX", "768"))

LOGIN_URL = "login"
# Login throttling (surveys.login_throttle): a name or client address is locked for
# LOGIN_LOCKOUT_SECONDS after LOGIN_FAILURE_LIMIT / LOGIN_IP_FAILURE_LIMIT failed sign-ins.
AUTHENTICATION_BACKENDS = ["surveys.login_throttle.ThrottledModelBackend"]
LOGIN_FAILURE_LIMIT = int(os.environ.get("DEIDSTUDY_LOGIN_FAILURE_LIMIT", "5"))
LOGIN_IP_FAILURE_LIMIT = int(os.environ.get("DEIDSTUDY_LOGIN_IP_FAILURE_LIMIT", "30"))
LOGIN_LOCKOUT_SECONDS = int(os.environ.get("DEIDSTUDY_LOGIN_LOCKOUT_SECONDS", "900"))
# Behind a reverse proxy REMOTE_ADDR is the proxy's: name the header that carries the
# client's address (e.g. HTTP_X_FORWARDED_FOR; its last entry is used).
LOGIN_CLIENT_IP_HEADER = os.environ.get("DEIDSTUDY_CLIENT_IP_HEADER", "")
LOGIN_REDIRECT_URL = "surveys:cohort_list"
LOGOUT_REDIRECT_URL = "login"

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (deidstudy.middleware): no inline script or style; django-rq's
# staff-only dashboard needs its inline ones.
CSP_RELAXED_PATH_PREFIXES = ("/django-rq/",)
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("DEIDSTUDY_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = int(os.environ.get("DEIDSTUDY_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
# Behind a reverse proxy that ends TLS: trust its X-Forwarded-Proto (else the SSL redirect loops).
if env_bool("DEIDSTUDY_BEHIND_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DEIDSTUDY_LOG_LEVEL", "WARNING")},
    # pydicom logs offending header values (names, IDs) when it meets invalid ones: keep it quiet.
    "loggers": {
        "pydicom": {"level": "CRITICAL", "propagate": False, "handlers": []},
        # audit lines (identity tables shown) and security events are always recorded
        "deidstudy.audit": {"level": "INFO"},
        "deidstudy.security": {"level": "INFO"},
    },
}
