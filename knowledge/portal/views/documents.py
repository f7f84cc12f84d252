"""Document pages: list, detail with highlighted passage, metadata edit, retry, delete, download, page image."""
from __future__ import annotations

import logging
from pathlib import Path

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from knowledge.portal.api_auth import token_or_session
from knowledge.portal.forms import MetadataForm
from knowledge.portal.services import audit_record, document_visibility_set

log = logging.getLogger(__name__)


def document_or_404(*, user, id: int):
    """The document if this user may see it; 404 otherwise (never reveals that it exists)."""
    from knowledge.documents.selectors import document_get_for_user

    try:
        doc = document_get_for_user(user=user, id=id)
    except (PermissionDenied, Http404, LookupError, ValueError) as exc:
        raise Http404(_("No such document.")) from exc
    except Exception as exc:
        if exc.__class__.__name__ == "DoesNotExist":
            raise Http404(_("No such document.")) from exc
        raise
    if doc is None:
        raise Http404(_("No such document."))
    return doc


@require_GET
def document_list(request):
    from knowledge.documents.selectors import document_list_for_user

    filters = {k: v for k in ("company", "doc_type", "status", "q") if (v := request.GET.get(k, "").strip())}
    docs = document_list_for_user(user=request.user, filters=filters)
    return render(request, "portal/document_list.html", {"documents": docs[:500], "filters": filters})


@require_GET
def document_detail(request, id: int):
    doc = document_or_404(user=request.user, id=id)
    try:
        page = int(request.GET.get("page", "0"))
        chunk_id = int(request.GET.get("chunk", "0"))
    except ValueError:
        page, chunk_id = 0, 0
    chunk = doc.chunks.filter(pk=chunk_id).first() if chunk_id else None
    pages = []
    for p in doc.pages.all():
        pages.append({"page": p.page, "parts": _highlight_parts(p.text, chunk.text if chunk and
                      (chunk.page_start or 0) <= p.page <= (chunk.page_end or chunk.page_start or 0) else "")})
    form = MetadataForm(user=request.user, initial={
        "title": doc.title, "company": doc.company, "ticker": doc.ticker, "report_date": doc.report_date,
        "doc_type": doc.doc_type, "visibility": doc.visibility, "group": doc.group_id})
    audit_record(user=request.user, action="view", document_ids=[doc.pk], chunk_ids=[chunk.pk] if chunk else [])
    return render(request, "portal/document_detail.html", {
        "doc": doc, "pages": pages, "chunk": chunk, "page": page, "chunks": doc.chunks.all()[:400], "form": form,
        "is_owner": doc.owner_id == request.user.pk or request.user.is_superuser,
        "is_pdf": doc.original_name.lower().endswith(".pdf"), "groups": request.user.groups.all()})


def _highlight_parts(text: str, passage: str) -> list[tuple[str, bool]]:
    """Split page text into (text, highlighted) parts around the cited passage; escaped by the template."""
    if not passage:
        return [(text, False)]
    probe = " ".join(passage.split())
    flat = " ".join(text.split())
    for size in (len(probe), 200, 80, 40):
        needle = probe[:size]
        at = flat.find(needle) if needle else -1
        if at >= 0:
            end = at + len(probe) if size == len(probe) else min(len(flat), at + len(probe))
            return [(flat[:at], False), (flat[at:end], True), (flat[end:], False)]
    return [(text, False)]


@require_POST
def document_edit(request, id: int):
    from knowledge.documents.services import document_update_metadata

    doc = document_or_404(user=request.user, id=id)
    if doc.owner_id != request.user.pk and not request.user.is_superuser:
        raise Http404(_("No such document."))
    form = MetadataForm(request.POST, user=request.user)
    if not form.is_valid():
        for err in form.errors.values():
            messages.error(request, " ".join(err))
        return redirect("portal:document_detail", id=doc.pk)
    try:
        document_update_metadata(document=doc, metadata=form.metadata())
        document_visibility_set(user=request.user, document=doc, visibility=form.cleaned_data["visibility"],
                                group=_group(form.cleaned_data["group"]))
    except ValueError as exc:
        messages.error(request, str(exc))
        return redirect("portal:document_detail", id=doc.pk)
    messages.success(request, _("Saved."))
    return redirect("portal:document_detail", id=doc.pk)


def _group(gid):
    from django.contrib.auth.models import Group

    return Group.objects.get(pk=gid) if gid else None


@require_POST
def document_retry(request, id: int):
    from knowledge.documents.services import document_retry as retry

    doc = document_or_404(user=request.user, id=id)
    if doc.owner_id != request.user.pk and not request.user.is_superuser:
        raise Http404(_("No such document."))
    try:
        retry(document=doc)
    except ValueError as exc:
        messages.error(request, str(exc))
        return redirect("portal:document_detail", id=doc.pk)
    if request.headers.get("Accept", "").startswith("application/json"):
        from django.http import JsonResponse

        return JsonResponse({"id": doc.pk, "status": "queued"})
    messages.success(request, _("Queued again."))
    return redirect("portal:document_detail", id=doc.pk)


@require_POST
def document_delete(request, id: int):
    from knowledge.documents.services import document_delete as delete

    doc = document_or_404(user=request.user, id=id)
    if doc.owner_id != request.user.pk and not request.user.is_superuser:
        raise Http404(_("No such document."))
    delete(document=doc)
    messages.success(request, _("Deleted."))
    return redirect("portal:document_list")


def original_file(doc) -> Path:
    from django.conf import settings

    path = (Path(settings.MEDIA_ROOT) / doc.file).resolve()
    if Path(settings.MEDIA_ROOT).resolve() not in path.parents or not path.is_file():
        raise Http404(_("The original file is missing."))
    return path


@token_or_session
@require_GET
def document_download(request, id: int):
    doc = document_or_404(user=request.user, id=id)
    path = original_file(doc)
    audit_record(user=request.user, action="download", document_ids=[doc.pk], via=getattr(request, "auth_via", "web"))
    return FileResponse(path.open("rb"), as_attachment=True, filename=doc.original_name,
                        content_type=doc.content_type or "application/octet-stream")


@token_or_session
@require_GET
def document_page_image(request, id: int, page: int):
    """A PDF page rendered to PNG (96 dpi); ``?chunk=ID`` (a chunk of this document) highlights its passage."""
    from knowledge.portal.page_image import page_png

    doc = document_or_404(user=request.user, id=id)
    if not doc.original_name.lower().endswith(".pdf") or page < 1 or (doc.page_count and page > doc.page_count):
        raise Http404(_("No such page."))
    path = original_file(doc)
    try:
        chunk_id = int(request.GET.get("chunk", "0"))
    except ValueError:
        chunk_id = 0
    chunk = doc.chunks.filter(pk=chunk_id).first() if chunk_id else None  # only this document's chunks
    try:
        data, boxes = page_png(path=path, page=page, passage=chunk.text if chunk else "")
    except Exception as exc:  # noqa: BLE001 - a page pdfium cannot open or render
        log.warning("page %s of document %s could not be rendered: %s", page, doc.pk, exc)
        raise Http404(_("This page could not be rendered.")) from exc
    resp = HttpResponse(data, content_type="image/png")
    resp["Cache-Control"] = "private, max-age=3600"
    resp["X-Highlight-Boxes"] = str(boxes)
    return resp
