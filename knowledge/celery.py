"""The Celery application: one definition for every worker and for beat."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "knowledge.settings")

app = Celery("knowledge")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
