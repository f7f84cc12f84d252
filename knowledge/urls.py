"""Top-level URL map: each app contributes its own urls module."""
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("knowledge.documents.urls")),
    path("", include("knowledge.portal.urls")),
    path("", include("knowledge.reports.urls")),
]
