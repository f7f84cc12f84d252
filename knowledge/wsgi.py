"""WSGI entry point (gunicorn with threads: one process, one Engine)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "knowledge.settings")
application = get_wsgi_application()
