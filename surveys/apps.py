import os
from pathlib import Path

from django.apps import AppConfig


class SurveysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "surveys"
    verbose_name = "De-identification studies"

    def ready(self) -> None:
        """Private files, deployment checks, and the upload scratch folder.

        Sets the process umask (``settings.FILE_UMASK``, default ``077``): every file and
        folder the platform creates from here on — the SQLite database, originals,
        de-identified and derived files, uploads — is readable by this user only (0600
        files, 0700 folders). Runs in every process that loads Django (web server, RQ
        workers and their work horses, management commands) before any of them writes.
        """
        from django.conf import settings

        # late by design: ready() runs once the app registry can import models
        from . import checks  # noqa: F401 — registers the deployment checks
        from .processing.viewer import connect_signals

        connect_signals()

        umask = getattr(settings, "FILE_UMASK", None)
        if umask is not None:
            os.umask(umask)
        tmp = getattr(settings, "FILE_UPLOAD_TEMP_DIR", None)
        if tmp:
            try:
                Path(tmp).mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError:
                pass  # reported by Django when an upload needs it
