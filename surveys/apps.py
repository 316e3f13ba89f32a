from pathlib import Path

from django.apps import AppConfig


class SurveysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "surveys"
    verbose_name = "De-identification studies"

    def ready(self) -> None:
        """Create the upload scratch folder (``FILE_UPLOAD_TEMP_DIR``) if it is missing."""
        from django.conf import settings

        tmp = getattr(settings, "FILE_UPLOAD_TEMP_DIR", None)
        if tmp:
            try:
                Path(tmp).mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError:
                pass  # reported by Django when an upload needs it
