"""Upload page and the JSON endpoints behind it: accept one file, report pipeline status."""
from __future__ import annotations

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.http import JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods

from knowledge.portal.api_auth import api_view
from knowledge.portal.forms import MetadataForm, form_errors
from knowledge.portal.uploads import UploadRejected, upload_check
from knowledge.portal.views.documents import document_or_404


@require_GET
def upload_page(request):
    form = MetadataForm(user=request.user)
    return render(request, "portal/upload.html", {"form": form, "groups": request.user.groups.all()})


def document_json(doc) -> dict:
    """What the upload page and the API show about one document."""
    return {
        "id": doc.pk, "title": doc.title, "original_name": doc.original_name, "status": doc.status,
        "progress": doc.progress, "status_reason": doc.status_reason, "company": doc.company, "ticker": doc.ticker,
        "report_date": doc.report_date.isoformat() if doc.report_date else None, "doc_type": doc.doc_type,
        "language": doc.language, "page_count": doc.page_count, "visibility": doc.visibility,
        "url": reverse("portal:document_detail", args=[doc.pk]),
    }


def _accept(request):
    from knowledge.documents.services import document_accept

    upload = request.FILES.get("file")
    if upload is None:
        return JsonResponse({"error": _("Send the file in a multipart field named 'file'.")}, status=400)
    form = MetadataForm(request.POST, user=request.user)
    if not form.is_valid():
        return JsonResponse({"error": form_errors(form), "filename": upload.name}, status=400)
    try:
        head = upload.read(8192)
        upload.seek(0)
        upload_check(filename=upload.name, size=upload.size, head=head)
        gid = form.cleaned_data["group"]
        result = document_accept(uploader=request.user, file_obj=upload, filename=upload.name,
                                 metadata=form.metadata(), visibility=form.cleaned_data["visibility"],
                                 group=Group.objects.get(pk=gid) if gid else None)
    except UploadRejected as exc:
        return JsonResponse({"error": str(exc), "filename": upload.name}, status=400)
    except (ValidationError, ValueError) as exc:
        msg = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        return JsonResponse({"error": msg, "filename": upload.name}, status=400)
    doc, dup = result.document, result.duplicate_of
    body = document_json(doc) | {"filename": upload.name, "duplicate_of": None}
    if dup is not None and not _visible(request.user, dup):
        body = {"filename": upload.name, "duplicate_of": {"id": None, "title": None, "url": None}, "status": "duplicate",
                "message": _("This file is already in the library, in a document you cannot see; ask its owner to share it.")}
        return JsonResponse(body, status=200)
    if dup is not None:
        body["duplicate_of"] = {"id": dup.pk, "title": str(dup), "url": reverse("portal:document_detail", args=[dup.pk])}
        body["message"] = _("Already uploaded as document %(id)s “%(title)s”.") % {"id": dup.pk, "title": str(dup)}
    return JsonResponse(body, status=200 if dup is not None else 201)


def _visible(user, doc) -> bool:
    from knowledge.documents.selectors import document_list_for_user

    return document_list_for_user(user=user, filters={}).filter(pk=doc.pk).exists()


@api_view
@require_http_methods(["GET", "POST"])
def api_documents(request):
    """GET: the user's visible documents; POST (multipart): upload one file with metadata."""
    if request.method == "POST":
        return _accept(request)
    from knowledge.documents.selectors import document_list_for_user

    filters = {k: v for k in ("company", "doc_type", "status") if (v := request.GET.get(k, "").strip())}
    docs = document_list_for_user(user=request.user, filters=filters)[:500]
    return JsonResponse({"documents": [document_json(d) for d in docs]})


@api_view
@require_GET
def api_document(request, id: int):
    return JsonResponse(document_json(document_or_404(user=request.user, id=id)))


@api_view
@require_GET
def api_document_status(request):
    """Status of several documents at once: ?ids=1,2,3 (ids the user may not see are left out)."""
    from knowledge.documents.selectors import document_list_for_user

    try:
        ids = [int(i) for i in request.GET.get("ids", "").split(",") if i.strip()][:200]
    except ValueError:
        return JsonResponse({"error": "ids must be comma-separated integers."}, status=400)
    docs = document_list_for_user(user=request.user, filters={}).filter(pk__in=ids)
    return JsonResponse({"documents": [document_json(d) for d in docs]})


@api_view
@require_http_methods(["POST"])
def api_document_retry(request, id: int):
    from knowledge.documents.services import document_retry

    doc = document_or_404(user=request.user, id=id)
    if doc.owner_id != request.user.pk and not request.user.is_superuser:
        return JsonResponse({"error": _("Only the owner may retry this document.")}, status=403)
    try:
        document_retry(document=doc)
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    doc.refresh_from_db()
    return JsonResponse(document_json(doc))
