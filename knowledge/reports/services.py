"""Writes of reports: templates, drafting (called by the task), edits, schedules and mailing."""
from __future__ import annotations

import json
import re

from django.conf import settings
from django.core.mail import EmailMessage
from django.db import transaction

from knowledge.reports.models import Report, ReportSchedule, ReportTemplate

from knowledge.queues import TASK_REPORT_DRAFT as TASK_DRAFT
from knowledge.queues import TASK_REPORT_SCHEDULED as TASK_SCHEDULED
_MARK = re.compile(r"\[(\d+)\]")


def sections_parse(*, text: str) -> list[dict]:
    """Sections from lines 'Heading: instruction' (optionally '| company=X, doc_type=Y' filters)."""
    sections = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        line, _, filt = line.partition("|")
        heading, sep, instruction = line.partition(":")
        if not sep or not heading.strip() or not instruction.strip():
            raise ValueError(f"Each section line needs 'Heading: instruction', got {line!r}.")
        filters = {}
        for pair in filt.split(","):
            if "=" in pair:
                k, v = (p.strip() for p in pair.split("=", 1))
                if k not in {"company", "doc_type", "language", "date_from", "date_to"}:
                    raise ValueError(f"Unknown section filter {k!r}.")
                filters[k] = v
        sections.append({"heading": heading.strip()[:200], "instruction": instruction.strip()[:1000], "filters": filters})
    if not sections:
        raise ValueError("A report template needs at least one section.")
    return sections


def template_create(*, owner, title: str, sections: list[dict]) -> ReportTemplate:
    if not title.strip():
        raise ValueError("A report template needs a title.")
    return ReportTemplate.objects.create(owner=owner, title=title.strip()[:200], sections=sections)


def report_request(*, template: ReportTemplate, owner, schedule: ReportSchedule | None = None) -> Report:
    """Create a queued report and draft it on the generate queue after commit."""
    from knowledge.queues import QUEUE_GENERATE
    from knowledge.reports.tasks import report_draft

    with transaction.atomic():
        report = Report.objects.create(owner=owner, template=template, schedule=schedule, title=template.title,
                                       sections=[{"heading": s["heading"], "instruction": s["instruction"], "text": ""}
                                                 for s in template.sections])
        transaction.on_commit(lambda: report_draft.apply_async(args=[report.pk], queue=QUEUE_GENERATE))
    return report


def _progress(report: Report, *, progress: int, stage: str) -> None:
    Report.objects.filter(pk=report.pk).update(progress=progress, stage=stage[:200], status="drafting")


def report_draft_run(*, report_id: int, use_model: bool = True) -> Report:
    """Draft every section with verified citations, then an executive summary from the sections."""
    from knowledge.portal.answering import answer_compose
    from knowledge.portal.services import audit_record

    report = Report.objects.select_related("template", "owner").get(pk=report_id)
    if report.status == "done":
        return report  # safe to run twice
    sections_in = report.template.sections if report.template else report.sections
    sources: dict[int, dict] = {}  # chunk_id -> global source
    drafted = []
    steps = len(sections_in) * 2 + 1
    for i, sec in enumerate(sections_in):
        _progress(report, progress=int(100 * (2 * i) / steps), stage=f"retrieving: {sec['heading']}")
        ans = answer_compose(user=report.owner, question=sec["instruction"], filters=sec.get("filters") or None,
                             purpose="reports", via="task", use_model=use_model)
        _progress(report, progress=int(100 * (2 * i + 1) / steps), stage=f"drafting: {sec['heading']}")
        local = {c["n"]: c for c in ans.citations}
        for c in ans.citations:
            if c["chunk_id"] not in sources:
                sources[c["chunk_id"]] = {k: c[k] for k in c if k != "n"} | {"n": len(sources) + 1}

        def renumber(m, local=local):
            c = local.get(int(m.group(1)))
            return f"[{sources[c['chunk_id']]['n']}]" if c else ""

        drafted.append({"heading": sec["heading"], "instruction": sec["instruction"],
                        "text": _MARK.sub(renumber, ans.text), "not_found": ans.not_found})
    _progress(report, progress=int(100 * (steps - 1) / steps), stage="executive summary")
    summary = " ".join(_first_sentence(s["text"]) for s in drafted if not s["not_found"] and s["text"])
    Report.objects.filter(pk=report.pk).update(sections=drafted, sources=sorted(sources.values(), key=lambda s: s["n"]),
                                               summary=summary, status="done", progress=100, stage="done")
    audit_record(user=report.owner, action="report", query=report.title, via="task",
                 document_ids=[s["document_id"] for s in sources.values()], chunk_ids=list(sources))
    report.refresh_from_db()
    return report


def _first_sentence(text: str) -> str:
    m = re.search(r"^.*?[.!?。！？](?:\s*\[\d+\])*", text, flags=re.S)
    return (m.group(0) if m else text).strip()


def report_fail(*, report_id: int, reason: str) -> None:
    Report.objects.filter(pk=report_id).update(status="failed", error=reason[:2000], stage="failed")


def report_update(*, report: Report, summary: str, section_texts: list[str]) -> Report:
    """Save the analyst's edits of the summary and section texts."""
    if len(section_texts) != len(report.sections):
        raise ValueError("The edit does not match the report's sections.")
    sections = [dict(s, text=t) for s, t in zip(report.sections, section_texts)]
    Report.objects.filter(pk=report.pk).update(summary=summary, sections=sections)
    report.refresh_from_db()
    return report


def schedule_create(*, owner, template: ReportTemplate, crontab: str, subscribers=()) -> ReportSchedule:
    """A beat schedule (DatabaseScheduler) that drafts the template on the crontab and mails subscribers."""
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    from knowledge.queues import QUEUE_GENERATE

    parts = crontab.split()
    if len(parts) != 5:
        raise ValueError("A crontab has five fields: minute hour day-of-month month day-of-week.")
    with transaction.atomic():
        schedule = ReportSchedule.objects.create(owner=owner, template=template, crontab=" ".join(parts))
        schedule.subscribers.set(list(subscribers) or [owner])
        cron, _ = CrontabSchedule.objects.get_or_create(minute=parts[0], hour=parts[1], day_of_month=parts[2],
                                                        month_of_year=parts[3], day_of_week=parts[4],
                                                        timezone=settings.TIME_ZONE)
        schedule.periodic_task = PeriodicTask.objects.create(
            name=f"report schedule {schedule.pk}: {template.title}"[:200], task=TASK_SCHEDULED, crontab=cron,
            args=json.dumps([schedule.pk]), queue=QUEUE_GENERATE)
        schedule.save(update_fields=["periodic_task"])
    return schedule


def report_mail(*, report: Report) -> int:
    """Mail a finished report (Markdown body, DOCX attached) to its schedule's subscribers."""
    from knowledge.reports.export import report_docx, report_markdown

    if report.schedule is None:
        return 0
    to = [u.email for u in report.schedule.subscribers.all() if u.email]
    if not to:
        return 0
    mail = EmailMessage(subject=f"[Knowledge Desk] {report.title}", body=report_markdown(report=report), to=to)
    mail.attach(f"report-{report.pk}.docx", report_docx(report=report),
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document")
    return mail.send()
