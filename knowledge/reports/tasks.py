"""Report tasks (queue "generate"): thin wrappers that take ids and call services."""
from __future__ import annotations

from celery import shared_task

from knowledge.reports import services


@shared_task(name=services.TASK_DRAFT, bind=True, acks_late=True, soft_time_limit=1500, time_limit=1600)
def report_draft(self, report_id: int) -> int:
    try:
        report = services.report_draft_run(report_id=report_id)
    except Exception as exc:
        services.report_fail(report_id=report_id, reason=f"Drafting failed: {exc}")
        raise
    if report.schedule_id:
        services.report_mail(report=report)
    return report_id


@shared_task(name=services.TASK_SCHEDULED)
def report_run_schedule(schedule_id: int) -> int | None:
    from knowledge.reports.models import ReportSchedule

    schedule = ReportSchedule.objects.select_related("template", "owner").filter(pk=schedule_id, enabled=True).first()
    if schedule is None:
        return None
    return services.report_request(template=schedule.template, owner=schedule.owner, schedule=schedule).pk
