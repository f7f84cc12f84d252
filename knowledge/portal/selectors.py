"""Reads of the portal, always limited to what the given user may see."""
from __future__ import annotations

from django.http import Http404

from knowledge.portal.models import Conversation, Message


def conversation_list_for_user(*, user):
    return Conversation.objects.filter(owner=user)


def conversation_get_for_user(*, user, id: int) -> Conversation:
    conv = Conversation.objects.filter(owner=user, pk=id).first()
    if conv is None:
        raise Http404("No such conversation.")
    return conv


def message_get_for_user(*, user, id: int) -> Message:
    msg = Message.objects.select_related("conversation").filter(conversation__owner=user, pk=id).first()
    if msg is None:
        raise Http404("No such answer.")
    return msg
