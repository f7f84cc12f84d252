"""JSON API: ask (streaming or not), OpenAI-compatible chat completions, API token page."""
from __future__ import annotations

import json
import time
import uuid

from django.http import JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from knowledge.portal import services
from knowledge.portal.answering import answer_compose, answer_stream
from knowledge.portal.api_auth import api_view
from knowledge.portal.models import ApiToken
from knowledge.portal.views.ask import ask_inputs, events_response, guarded


def _json_body(request) -> dict:
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"The body is not valid JSON: {exc.msg}.") from exc
        if not isinstance(data, dict):
            raise ValueError("The body must be a JSON object.")
        return data
    return request.POST.dict()


@api_view
@require_http_methods(["POST"])
def api_ask(request):
    """{"question", "conversation"?, filters?, "stream"?} -> answer JSON or an event stream."""
    try:
        data = _json_body(request)
        question, conversation, filters = ask_inputs(request, data)
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    if data.get("stream"):
        return events_response(guarded(answer_stream(user=request.user, question=question, conversation=conversation,
                                                     filters=filters, via="api")))
    ans = answer_compose(user=request.user, question=question, conversation=conversation, filters=filters, via="api")
    return JsonResponse({"answer": ans.text, "citations": ans.citations, "sources": ans.sources,
                         "not_found": ans.not_found, "conversation": ans.conversation_id, "message": ans.message_id})


def _chunk(cid: str, created: int, delta: dict, finish=None, extra: dict | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "knowledge-desk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@api_view
@require_http_methods(["POST"])
def chat_completions(request):
    """OpenAI-compatible: answers the last user message from the user's documents, with citations."""
    try:
        data = _json_body(request)
    except ValueError as exc:
        return JsonResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        return JsonResponse({"error": {"message": "messages must be a non-empty list of {role, content}.",
                                       "type": "invalid_request_error"}}, status=400)
    users = [str(m.get("content", "")) for m in msgs if m.get("role") == "user"]
    if not users or not users[-1].strip():
        return JsonResponse({"error": {"message": "The last user message is empty.",
                                       "type": "invalid_request_error"}}, status=400)
    conversation = services.conversation_create(user=request.user, title=users[-1][:80])
    for earlier in users[:-1]:  # earlier questions give follow-ups their context
        conversation.messages.create(role="user", text=earlier, search_query=earlier)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    events = answer_stream(user=request.user, question=users[-1], conversation=conversation, via="api")
    if data.get("stream"):
        def gen():
            yield _chunk(cid, created, {"role": "assistant", "content": ""})
            for e in guarded(events):
                if e["event"] == "token":
                    yield _chunk(cid, created, {"content": e["text"]})
                elif e["event"] == "replace":
                    yield _chunk(cid, created, {"content": "\n\n" + e["text"]})
                elif e["event"] == "done":
                    yield _chunk(cid, created, {}, "stop", {"citations": e["citations"], "not_found": e["not_found"]})
            yield "data: [DONE]\n\n"

        resp = StreamingHttpResponse(gen(), content_type="text/event-stream; charset=utf-8")
        resp["Cache-Control"] = "no-cache"
        return resp
    done = {}
    for e in events:
        if e["event"] == "done":
            done = e
    return JsonResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": "knowledge-desk",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]}, "finish_reason": "stop"}],
        "citations": done["citations"], "not_found": done["not_found"],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    })


@require_http_methods(["GET", "POST"])
def token_page(request):
    """List, create and revoke the user's API tokens (the key is shown once)."""
    new_key = None
    if request.method == "POST":
        if request.POST.get("revoke", "").isdigit():
            ApiToken.objects.filter(user=request.user, pk=int(request.POST["revoke"])).update(revoked=True)
        else:
            _, new_key = services.token_create(user=request.user, name=request.POST.get("name", ""))
    return render(request, "portal/tokens.html",
                  {"tokens": ApiToken.objects.filter(user=request.user).order_by("-created_at"), "new_key": new_key})
