"""Report templates (title + sections), drafted reports and their schedules."""
from __future__ import annotations

from django.conf import settings
from django.db import models


class ReportTemplate(models.Model):
    """A title and sections; each section is {"heading", "instruction", "filters": {...}}."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="report_templates")
    title = models.CharField(max_length=200)
    sections = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.title


class Report(models.Model):
    """One drafted report: per-section cited text, an executive summary and the numbered sources."""

    STATUS_CHOICES = [(s, s) for s in ("queued", "drafting", "done", "failed")]
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="reports")
    template = models.ForeignKey(ReportTemplate, null=True, blank=True, on_delete=models.SET_NULL, related_name="reports")
    schedule = models.ForeignKey("ReportSchedule", null=True, blank=True, on_delete=models.SET_NULL, related_name="reports")
    title = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default="queued", db_index=True)
    progress = models.PositiveSmallIntegerField(default=0)
    stage = models.CharField(max_length=200, blank=True, default="")
    error = models.TextField(blank=True, default="")
    summary = models.TextField(blank=True, default="")
    sections = models.JSONField(default=list)  # [{"heading", "instruction", "text", "not_found"}]
    sources = models.JSONField(default=list)  # [{"n", "chunk_id", "document_id", "title", "page_start", "page_end", "url"}]
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.title


class ReportSchedule(models.Model):
    """Runs a template on a crontab through django-celery-beat and mails the report to subscribers."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="report_schedules")
    template = models.ForeignKey(ReportTemplate, on_delete=models.CASCADE, related_name="schedules")
    crontab = models.CharField(max_length=100, help_text="minute hour day-of-month month day-of-week, e.g. '0 7 * * 1'")
    subscribers = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="report_subscriptions")
    periodic_task = models.OneToOneField("django_celery_beat.PeriodicTask", null=True, blank=True, on_delete=models.SET_NULL)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.template} @ {self.crontab}"
