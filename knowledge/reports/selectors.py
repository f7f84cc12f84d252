"""Reads of reports, limited to the user's own (superusers see all)."""
from __future__ import annotations

from django.http import Http404

from knowledge.reports.models import Report, ReportTemplate


def report_list_for_user(*, user):
    qs = Report.objects.select_related("template")
    return qs if user.is_superuser else qs.filter(owner=user)


def report_get_for_user(*, user, id: int) -> Report:
    report = report_list_for_user(user=user).filter(pk=id).first()
    if report is None:
        raise Http404("No such report.")
    return report


def template_list_for_user(*, user):
    return ReportTemplate.objects.all() if user.is_superuser else ReportTemplate.objects.filter(owner=user)


def template_get_for_user(*, user, id: int) -> ReportTemplate:
    tpl = template_list_for_user(user=user).filter(pk=id).first()
    if tpl is None:
        raise Http404("No such template.")
    return tpl
