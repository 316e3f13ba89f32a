"""WSGI entry point for deidstudy (e.g. ``gunicorn deidstudy.wsgi``)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deidstudy.settings")
application = get_wsgi_application()
