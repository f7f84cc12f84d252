"""Reports: cited drafting per section with summary, editing, Markdown/DOCX export, schedules and mail, ACL."""
from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.test import Client, override_settings
from django_celery_beat.models import PeriodicTask
from docx import Document as DocxDocument

from knowledge.reports import services
from knowledge.reports.models import Report
from knowledge.reports.tasks import report_run_schedule

MEMO = ("Project Nightingale is the codename of the planned acquisition of Blue Heron Logistics. "
        "The board approved a purchase price of 418 million dollars for Project Nightingale on 3 March 2023. "
        "Blue Heron Logistics operates 37 warehouses in Ohio and Indiana.")


@pytest.fixture(scope="module")
def owner(django_db_setup, django_db_blocker, tmp_path_factory):
    from knowledge.documents.runner import pipeline_run_inline
    from knowledge.documents.services import document_accept

    root = tmp_path_factory.mktemp("kdr")
    memo = root / "nightingale.txt"
    memo.write_text(MEMO)
    with override_settings(DATA_DIR=root, MEDIA_ROOT=root / "uploads", INDEX_DIR=root / "index",
                           KD_ANSWER_WITH_MODEL=False):  # extractive here; the model path has its own test
        with django_db_blocker.unblock():
            user = User.objects.create_user("rita", email="rita@example.com", password="pw-rita-123")
            doc = document_accept(uploader=user, path=memo, filename=memo.name, enqueue=False).document
            assert pipeline_run_inline(document_id=doc.pk).status == "indexed"
            yield user
            Report.objects.all().delete()
            doc.delete()
            user.delete()


@pytest.mark.django_db
def test_report_is_drafted_with_citations_summary_and_exports(owner):
    sections = services.sections_parse(text="Deal: What purchase price did the board approve for Project Nightingale?\n"
                                            "Footprint: How many warehouses does Blue Heron Logistics operate?\n"
                                            "Geography: What is the capital of France?")
    tpl = services.template_create(owner=owner, title="Nightingale brief", sections=sections)
    report = Report.objects.create(owner=owner, template=tpl, title=tpl.title)
    report = services.report_draft_run(report_id=report.pk)
    assert report.status == "done" and report.progress == 100
    deal, footprint, geo = report.sections
    assert "418" in deal["text"] and "[1]" in deal["text"]
    assert "37" in footprint["text"]
    assert geo["not_found"] and "[" not in geo["text"], geo
    assert len(report.sources) == 1 and report.sources[0]["n"] == 1
    assert "418" in report.summary
    from knowledge.reports.export import report_docx, report_markdown

    text = report_markdown(report=report)
    assert "## Deal" in text and "## Sources" in text and "- [1] nightingale" in text
    doc = DocxDocument(io.BytesIO(report_docx(report=report)))
    paras = [p.text for p in doc.paragraphs]
    assert "Nightingale brief" in paras and "Sources" in paras and any(p.startswith("[1] nightingale") for p in paras)


@pytest.mark.django_db
def test_report_pages_edit_export_and_acl(owner):
    c = Client(enforce_csrf_checks=True)
    c.force_login(owner)
    token = c.get("/reports/").cookies["csrftoken"].value
    assert c.post("/reports/", {"title": "T", "sections": "no colon here"}, HTTP_X_CSRFTOKEN=token).status_code == 302
    c.post("/reports/", {"title": "Weekly", "sections": "Deal: Nightingale price? | company=Blue Heron"},
           HTTP_X_CSRFTOKEN=token)
    tpl = owner.report_templates.get(title="Weekly")
    assert tpl.sections == [{"heading": "Deal", "instruction": "Nightingale price?", "filters": {"company": "Blue Heron"}}]
    resp = c.post(f"/reports/templates/{tpl.pk}/draft/", HTTP_X_CSRFTOKEN=token)
    report = Report.objects.get(template=tpl)
    assert resp["Location"] == f"/reports/{report.pk}/" and report.status == "queued"
    Report.objects.filter(pk=report.pk).update(status="done")
    c.post(f"/reports/{report.pk}/", {"summary": "Edited summary.", "section_text": ["Edited deal [1]."]},
           HTTP_X_CSRFTOKEN=token)
    report.refresh_from_db()
    assert report.summary == "Edited summary." and report.sections[0]["text"] == "Edited deal [1]."
    assert "Edited deal" in c.get(f"/reports/{report.pk}/report.md").content.decode()
    docx = c.get(f"/reports/{report.pk}/report.docx")
    assert docx.status_code == 200 and docx.content[:2] == b"PK"
    other = User.objects.create_user("mallory")
    m = Client()
    m.force_login(other)
    for url in (f"/reports/{report.pk}/", f"/reports/{report.pk}/report.docx", f"/api/reports/{report.pk}/"):
        assert m.get(url).status_code == 404, url
    assert m.post(f"/reports/templates/{tpl.pk}/draft/").status_code == 404


@pytest.mark.django_db
def test_schedule_runs_through_beat_entry_and_mails_subscribers(owner):
    tpl = services.template_create(owner=owner, title="Daily Nightingale", sections=services.sections_parse(
        text="Deal: What purchase price did the board approve for Project Nightingale?"))
    with pytest.raises(ValueError):
        services.schedule_create(owner=owner, template=tpl, crontab="every day")
    schedule = services.schedule_create(owner=owner, template=tpl, crontab="0 7 * * 1-5")
    task = PeriodicTask.objects.get(pk=schedule.periodic_task_id)
    assert task.task == services.TASK_SCHEDULED and task.queue == "generate" and json.loads(task.args) == [schedule.pk]
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == ("0", "7", "1-5")
    report_id = report_run_schedule(schedule.pk)  # what beat's entry calls, run in-process here
    report = services.report_draft_run(report_id=report_id)
    assert report.schedule_id == schedule.pk and "418" in report.sections[0]["text"]
    assert services.report_mail(report=report) == 1
    msg = mail.outbox[-1]
    assert msg.to == ["rita@example.com"] and "418" in msg.body and msg.attachments[0][0].endswith(".docx")
