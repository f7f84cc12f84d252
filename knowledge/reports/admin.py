"""Admin: report templates, reports, schedules."""
from django.contrib import admin

from knowledge.reports.models import Report, ReportSchedule, ReportTemplate


@admin.register(ReportTemplate)
class ReportTemplateAdmin(admin.ModelAdmin):
    list_display = ("title", "owner", "created_at")


@admin.register(Report)
class ReportAdmin(admin.ModelAdmin):
    list_display = ("title", "owner", "status", "progress", "created_at")
    list_filter = ("status",)


@admin.register(ReportSchedule)
class ReportScheduleAdmin(admin.ModelAdmin):
    list_display = ("template", "owner", "crontab", "enabled")
    filter_horizontal = ("subscribers",)
