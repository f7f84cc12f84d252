"""Report pages and JSON: templates, drafting with progress, editing, Markdown/DOCX export."""
from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from knowledge.portal.api_auth import api_view
from knowledge.reports import selectors, services
from knowledge.reports.export import report_docx, report_markdown


def report_json(report) -> dict:
    return {"id": report.pk, "title": report.title, "status": report.status, "progress": report.progress,
            "stage": report.stage, "error": report.error, "summary": report.summary, "sections": report.sections,
            "sources": report.sources, "url": reverse("reports:report_detail", args=[report.pk]),
            "docx": reverse("reports:report_docx", args=[report.pk]),
            "markdown": reverse("reports:report_markdown", args=[report.pk])}


@require_http_methods(["GET", "POST"])
def report_list(request):
    if request.method == "POST":
        try:
            sections = services.sections_parse(text=request.POST.get("sections", ""))
            tpl = services.template_create(owner=request.user, title=request.POST.get("title", ""), sections=sections)
        except ValueError as exc:
            messages.error(request, str(exc))
            return redirect("reports:report_list")
        messages.success(request, f"Template “{tpl.title}” saved.")
        return redirect("reports:report_list")
    return render(request, "reports/report_list.html", {
        "reports": selectors.report_list_for_user(user=request.user)[:100],
        "templates": selectors.template_list_for_user(user=request.user)})


@require_POST
def report_draft(request, template_id: int):
    tpl = selectors.template_get_for_user(user=request.user, id=template_id)
    report = services.report_request(template=tpl, owner=request.user)
    return redirect("reports:report_detail", id=report.pk)


@require_POST
def schedule_create(request, template_id: int):
    tpl = selectors.template_get_for_user(user=request.user, id=template_id)
    try:
        services.schedule_create(owner=request.user, template=tpl, crontab=request.POST.get("crontab", ""))
        messages.success(request, "Schedule saved.")
    except ValueError as exc:
        messages.error(request, str(exc))
    return redirect("reports:report_list")


@require_http_methods(["GET", "POST"])
def report_detail(request, id: int):
    report = selectors.report_get_for_user(user=request.user, id=id)
    if request.method == "POST":
        try:
            services.report_update(report=report, summary=request.POST.get("summary", ""),
                                   section_texts=request.POST.getlist("section_text"))
            messages.success(request, "Saved.")
        except ValueError as exc:
            messages.error(request, str(exc))
        return redirect("reports:report_detail", id=report.pk)
    return render(request, "reports/report_detail.html", {"report": report})


@api_view
@require_GET
def report_status(request, id: int):
    return JsonResponse(report_json(selectors.report_get_for_user(user=request.user, id=id)))


@api_view
@require_http_methods(["GET", "POST"])
def api_reports(request):
    """GET: the user's reports; POST {"template": id}: draft one."""
    if request.method == "POST":
        import json

        try:
            data = json.loads(request.body or b"{}") if request.content_type == "application/json" else request.POST.dict()
            tpl = selectors.template_get_for_user(user=request.user, id=int(data.get("template", 0)))
        except (ValueError, TypeError):
            return JsonResponse({"error": "Give a report template id as 'template'."}, status=400)
        return JsonResponse(report_json(services.report_request(template=tpl, owner=request.user)), status=202)
    return JsonResponse({"reports": [report_json(r) for r in selectors.report_list_for_user(user=request.user)[:100]],
                         "templates": [{"id": t.pk, "title": t.title, "sections": t.sections}
                                       for t in selectors.template_list_for_user(user=request.user)]})


@api_view
@require_GET
def report_markdown_view(request, id: int):
    report = selectors.report_get_for_user(user=request.user, id=id)
    resp = HttpResponse(report_markdown(report=report), content_type="text/markdown; charset=utf-8")
    resp["Content-Disposition"] = f'attachment; filename="report-{report.pk}.md"'
    return resp


@api_view
@require_GET
def report_docx_view(request, id: int):
    report = selectors.report_get_for_user(user=request.user, id=id)
    resp = HttpResponse(report_docx(report=report),
                        content_type="application/vnd.openxmlformats-officedocument.wordprocessingml.document")
    resp["Content-Disposition"] = f'attachment; filename="report-{report.pk}.docx"'
    return resp
