"""Ask page, the streaming answer endpoint, conversations and feedback."""
from __future__ import annotations

import json

from django.contrib import messages
from django.http import HttpResponseBadRequest, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from knowledge.portal import selectors, services
from knowledge.portal.answering import answer_stream
from knowledge.portal.forms import FilterForm, form_errors


@require_GET
def ask_page(request, id: int | None = None):
    conversation = selectors.conversation_get_for_user(user=request.user, id=id) if id else None
    return render(request, "portal/ask.html", {
        "conversation": conversation, "turns": conversation.messages.all() if conversation else [],
        "conversations": selectors.conversation_list_for_user(user=request.user)[:50], "filter_form": FilterForm()})


def sse(event: dict) -> str:
    """One server-sent event."""
    return f"event: {event['event']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def events_response(events) -> StreamingHttpResponse:
    resp = StreamingHttpResponse((sse(e) for e in events), content_type="text/event-stream; charset=utf-8")
    resp["Cache-Control"] = "no-cache"
    resp["X-Accel-Buffering"] = "no"
    return resp


def guarded(events):
    """Turn an error inside the stream into an error event instead of a broken connection."""
    try:
        yield from events
    except ValueError as exc:
        yield {"event": "error", "error": str(exc)}


def ask_inputs(request, data: dict):
    """(question, conversation, filters) from form or JSON data; raises ValueError with a clear message."""
    question = str(data.get("question", "")).strip()
    if not question:
        raise ValueError(_("Please type a question."))
    if len(question) > 2000:
        raise ValueError(_("Questions are limited to 2000 characters."))
    form = FilterForm({k: data.get(k, "") for k in ("company", "date_from", "date_to", "doc_type", "language")})
    if not form.is_valid():
        raise ValueError(form_errors(form))
    conv_id = data.get("conversation")
    if conv_id:
        conversation = selectors.conversation_get_for_user(user=request.user, id=int(conv_id))
    else:
        conversation = services.conversation_create(user=request.user)
    return question, conversation, form.filters()


@require_POST
def ask_stream(request):
    """POST question (+filters, conversation) -> text/event-stream of sources, token, replace, done."""
    try:
        question, conversation, filters = ask_inputs(request, request.POST)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc))
    events = answer_stream(user=request.user, question=question, conversation=conversation, filters=filters)
    return events_response(guarded(events))


@require_GET
def conversation_list(request):
    return render(request, "portal/conversation_list.html",
                  {"conversations": selectors.conversation_list_for_user(user=request.user)})


@require_POST
def conversation_rename(request, id: int):
    conv = selectors.conversation_get_for_user(user=request.user, id=id)
    try:
        services.conversation_rename(conversation=conv, title=request.POST.get("title", ""))
    except ValueError as exc:
        messages.error(request, str(exc))
    if request.POST.get("next") == "ask":
        return redirect("portal:conversation", id=conv.pk)
    return redirect("portal:conversation_list")


@require_POST
def conversation_delete(request, id: int):
    conv = selectors.conversation_get_for_user(user=request.user, id=id)
    services.conversation_delete(conversation=conv)
    messages.success(request, _("Conversation deleted."))
    return redirect("portal:conversation_list")


@require_POST
def feedback(request, id: int):
    msg = selectors.message_get_for_user(user=request.user, id=id)
    try:
        services.feedback_set(user=request.user, message=msg, rating=int(request.POST.get("rating", "0")),
                              comment=request.POST.get("comment", ""))
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"ok": True})
