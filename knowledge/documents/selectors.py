"""Reads on documents, always filtered by what the user may see."""
from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import Http404

from knowledge.documents.models import Chunk, Document, Status, Visibility

FILTER_FIELDS = ("company", "ticker", "doc_type", "language", "fiscal_period", "status", "date_from", "date_to", "q")


def visibility_q(*, user: AbstractBaseUser | AnonymousUser, prefix: str = "") -> Q | None:
    """The condition on documents a user may see; None means everything (superuser)."""
    if user is None or not user.is_authenticated or not user.is_active:
        return Q(pk__in=[])
    if user.is_superuser:
        return None
    p = prefix
    return (
        Q(**{f"{p}owner": user})
        | Q(**{f"{p}visibility": Visibility.FIRM})
        | Q(**{f"{p}visibility": Visibility.GROUP, f"{p}group__in": user.groups.all()})
    )


def document_visible_queryset(*, user) -> QuerySet[Document]:
    condition = visibility_q(user=user)
    qs = Document.objects.all()
    return qs if condition is None else qs.filter(condition)


def _filters_apply(qs: QuerySet[Document], *, filters: dict[str, Any] | None) -> QuerySet[Document]:
    filters = {k: v for k, v in (filters or {}).items() if v not in (None, "")}
    unknown = set(filters) - set(FILTER_FIELDS)
    if unknown:
        raise ValueError(f"Unknown filter(s): {', '.join(sorted(unknown))}. Known: {', '.join(FILTER_FIELDS)}.")
    for key in ("company", "ticker", "doc_type", "language", "fiscal_period"):
        if key in filters:
            qs = qs.filter(**{f"{key}__iexact": filters[key]})
    if "status" in filters:
        qs = qs.filter(status=filters["status"])
    if "date_from" in filters:
        qs = qs.filter(report_date__gte=filters["date_from"])
    if "date_to" in filters:
        qs = qs.filter(report_date__lte=filters["date_to"])
    if "q" in filters:
        q = filters["q"]
        qs = qs.filter(Q(title__icontains=q) | Q(original_name__icontains=q) | Q(company__icontains=q) | Q(ticker__iexact=q))
    return qs


def document_list_for_user(*, user, filters: dict[str, Any] | None = None) -> QuerySet[Document]:
    """Documents the user may see, narrowed by filters (company, ticker, doc_type, language, dates, status, q)."""
    return _filters_apply(document_visible_queryset(user=user), filters=filters).select_related("owner", "group")


def document_get_for_user(*, user, id: int) -> Document:  # noqa: A002 - the brief's name
    """One document; Http404 when it does not exist, PermissionDenied when the user may not see it."""
    document = Document.objects.select_related("owner", "group").filter(pk=id).first()
    if document is None:
        raise Http404("No such document.")
    if not document_visible_queryset(user=user).filter(pk=id).exists():
        raise PermissionDenied("You may not see this document.")
    return document


def chunk_list_for_user(*, user, document_id: int | None = None, filters: dict[str, Any] | None = None) -> QuerySet[Chunk]:
    """Chunks of indexed documents the user may see (of one document, or of those matching filters)."""
    docs = document_list_for_user(user=user, filters=filters).filter(status=Status.INDEXED)
    if document_id is not None:
        docs = docs.filter(pk=document_id)
    return Chunk.objects.filter(document__in=docs).order_by("document_id", "ordinal")


def chunk_ids_for_user(*, user, filters: dict[str, Any] | None = None) -> set[int]:
    """Ids of chunks the user may retrieve: the allowed set handed to the index."""
    return set(chunk_list_for_user(user=user, filters=filters).values_list("pk", flat=True))
