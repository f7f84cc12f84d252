"""URLs of reports."""
from django.urls import path

from knowledge.reports import views

app_name = "reports"

urlpatterns = [
    path("reports/", views.report_list, name="report_list"),
    path("reports/templates/<int:template_id>/draft/", views.report_draft, name="report_draft"),
    path("reports/templates/<int:template_id>/schedule/", views.schedule_create, name="schedule_create"),
    path("reports/<int:id>/", views.report_detail, name="report_detail"),
    path("reports/<int:id>/report.md", views.report_markdown_view, name="report_markdown"),
    path("reports/<int:id>/report.docx", views.report_docx_view, name="report_docx"),
    path("api/reports/", views.api_reports, name="api_reports"),
    path("api/reports/<int:id>/", views.report_status, name="report_status"),
]
