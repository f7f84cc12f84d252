"""Admin extras for staff: audit log, conversations, feedback, model profiles, report templates and schedules."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from knowledge.portal.generation import profile_for
from knowledge.portal.models import AuditEvent, ModelProfile


@pytest.mark.django_db
def test_admin_pages_for_staff(client):
    admin = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    AuditEvent.objects.create(user=admin, action="download", document_ids=[1])
    client.force_login(admin)
    for model in ("portal/auditevent", "portal/conversation", "portal/feedback", "portal/modelprofile",
                  "portal/apitoken", "reports/reporttemplate", "reports/reportschedule", "reports/report"):
        assert client.get(f"/admin/{model}/").status_code == 200, model
    assert client.get("/admin/portal/auditevent/add/").status_code == 403  # the log is append-only


@pytest.mark.django_db
def test_model_profiles_are_assigned_per_purpose():
    assert profile_for(purpose="qa") is None
    ModelProfile.objects.create(name="small", use_for_qa=True)
    ModelProfile.objects.create(name="reports", checkpoint_path="/models/x.gguf", quantization="int8", use_for_reports=True)
    assert profile_for(purpose="qa").name == "small"
    assert profile_for(purpose="reports").checkpoint_path == "/models/x.gguf"
