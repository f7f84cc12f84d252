"""Writes of the portal: conversations, messages, feedback, audit events, API tokens."""
from __future__ import annotations

import hashlib
import secrets

from django.db import transaction
from django.utils import timezone

from knowledge.portal.models import ApiToken, AuditEvent, Conversation, Feedback, Message

TOKEN_PREFIX = "kd_"


def audit_record(*, user, action: str, query: str = "", document_ids=(), chunk_ids=(), via: str = "web") -> AuditEvent:
    """Append one audit event."""
    return AuditEvent.objects.create(
        user=user if getattr(user, "is_authenticated", False) else None, action=action, query=query[:4000],
        document_ids=sorted({int(d) for d in document_ids}), chunk_ids=[int(c) for c in chunk_ids], via=via,
    )


def conversation_create(*, user, title: str = "") -> Conversation:
    return Conversation.objects.create(owner=user, title=title[:200])


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = title.strip()[:200]
    if not title:
        raise ValueError("A title may not be empty.")
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    conversation.delete()


@transaction.atomic
def answer_record(*, user, conversation, question: str, search_query: str, text: str, citations: list[dict],
                  sources: list[dict], not_found: bool, shown_chunks, via: str = "web") -> Message | None:
    """Store the question and its answer in the conversation (if any) and audit what was shown."""
    audit_record(user=user, action=AuditEvent.ACTION_ASK, query=question, via=via,
                 document_ids=[s["document_id"] for s in sources], chunk_ids=[s["chunk_id"] for s in sources])
    if conversation is None:
        return None
    Message.objects.create(conversation=conversation, role=Message.ROLE_USER, text=question, search_query=search_query)
    slim = [{k: v for k, v in s.items() if k != "text"} for s in sources]
    message = Message.objects.create(conversation=conversation, role=Message.ROLE_ASSISTANT, text=text,
                                     citations=citations, sources=slim, not_found=not_found)
    if not conversation.title:
        conversation.title = question[:80]
    conversation.save(update_fields=["title", "updated_at"])
    return message


def feedback_set(*, user, message: Message, rating: int, comment: str = "") -> Feedback:
    """Store (or replace) this user's thumbs up/down on an answer."""
    if rating not in (1, -1):
        raise ValueError("Rating must be 1 or -1.")
    fb, _ = Feedback.objects.update_or_create(message=message, user=user,
                                              defaults={"rating": rating, "comment": comment.strip()[:4000]})
    return fb


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token_create(*, user, name: str = "") -> tuple[ApiToken, str]:
    """A new API token; the plain key is returned once and never stored."""
    key = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name[:100], prefix=key[:10], key_hash=_hash(key))
    return token, key


def token_authenticate(*, key: str):
    """The active user owning this key, or None."""
    if not key.startswith(TOKEN_PREFIX):
        return None
    token = ApiToken.objects.select_related("user").filter(key_hash=_hash(key), revoked=False).first()
    if token is None or not token.user.is_active:
        return None
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token.user


@transaction.atomic
def document_visibility_set(*, user, document, visibility: str, group=None):
    """Change who may see a document (owner or superuser only); group visibility needs one of the user's groups."""
    from knowledge.documents.models import Document, Visibility

    if document.owner_id != user.pk and not user.is_superuser:
        raise ValueError("Only the owner may change who sees this document.")
    if visibility not in Visibility.values:
        raise ValueError(f"Visibility must be one of {', '.join(Visibility.values)}.")
    if visibility == Visibility.GROUP and (group is None or not (user.is_superuser or user.groups.filter(pk=group.pk).exists())):
        raise ValueError("Choose one of your groups for group visibility.")
    Document.objects.filter(pk=document.pk).update(visibility=visibility,
                                                   group=group if visibility == Visibility.GROUP else None)
    document.refresh_from_db()
    return document
