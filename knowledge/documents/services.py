"""Writes on documents: accept an upload, retry, reprocess, delete, edit metadata. All atomic."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import IntegrityError, transaction
from django.db.models import F

from knowledge.documents import storage
from knowledge.queues import QUEUE_INDEX
from knowledge.documents.models import (
    IN_PROGRESS,
    Chunk,
    Document,
    DocumentFingerprint,
    DocumentPage,
    IndexDeletion,
    ParagraphFingerprint,
    Status,
    Visibility,
)

METADATA_FIELDS = ("title", "company", "ticker", "report_date", "fiscal_period", "doc_type", "language")


class DocumentError(ValueError):
    """A request on documents that cannot be done; the message says why, for a person."""


@dataclass(frozen=True)
class AcceptResult:
    document: Document
    duplicate_of: Document | None


def _metadata_clean(*, metadata: dict[str, Any]) -> dict[str, Any]:
    unknown = set(metadata) - set(METADATA_FIELDS)
    if unknown:
        raise DocumentError(f"Unknown metadata field(s): {', '.join(sorted(unknown))}. Known: {', '.join(METADATA_FIELDS)}.")
    cleaned: dict[str, Any] = {}
    for key, value in metadata.items():
        if value in (None, ""):
            continue
        if key == "report_date":
            if isinstance(value, str):
                try:
                    value = dt.date.fromisoformat(value.strip())
                except ValueError:
                    raise DocumentError(f"report_date {value!r} is not a date like 2023-06-30.") from None
            elif not isinstance(value, dt.date):
                raise DocumentError("report_date must be a date like 2023-06-30.")
        else:
            value = str(value).strip()
            limit = Document._meta.get_field(key).max_length
            if limit and len(value) > limit:
                raise DocumentError(f"{key} is longer than {limit} characters.")
        cleaned[key] = value
    return cleaned


def _visibility_check(*, visibility: str, group: Group | None, uploader: AbstractBaseUser) -> None:
    if visibility not in Visibility.values:
        raise DocumentError(f"Visibility must be one of {', '.join(Visibility.values)}, not {visibility!r}.")
    if visibility == Visibility.GROUP:
        if group is None:
            raise DocumentError("Group visibility needs a group.")
        if not uploader.is_superuser and not uploader.groups.filter(pk=group.pk).exists():
            raise DocumentError(f"You are not a member of the group {group.name!r}.")


def pipeline_enqueue(*, document_id: int) -> None:
    """Queue the stage chain for a document once the current transaction commits."""
    from knowledge.documents.tasks import pipeline_signature

    transaction.on_commit(lambda: pipeline_signature(document_id=document_id).apply_async())


def document_accept(
    *,
    uploader: AbstractBaseUser,
    filename: str,
    file_obj: IO[bytes] | None = None,
    path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    visibility: str = Visibility.PRIVATE,
    group: Group | None = None,
    enqueue: bool = True,
) -> AcceptResult:
    """Store an upload untouched, create its row and queue its pipeline; a known file is not re-ingested."""
    if (file_obj is None) == (path is None):
        raise DocumentError("Give exactly one of file_obj or path.")
    given = _metadata_clean(metadata=metadata or {})
    _visibility_check(visibility=visibility, group=group, uploader=uploader)
    if visibility != Visibility.GROUP:
        group = None
    name = Path(filename).name or "upload"
    if file_obj is None:
        try:
            with open(path, "rb") as f:  # type: ignore[arg-type]
                relative, sha, size = storage.original_store(source=f, max_bytes=settings.KD_MAX_UPLOAD_BYTES)
        except storage.UploadTooLarge as exc:
            raise DocumentError(str(exc)) from None
        except OSError as exc:
            raise DocumentError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    else:
        try:
            relative, sha, size = storage.original_store(source=file_obj, max_bytes=settings.KD_MAX_UPLOAD_BYTES)
        except storage.UploadTooLarge as exc:
            raise DocumentError(str(exc)) from None

    existing = Document.objects.filter(sha256=sha).first()
    if existing is not None:
        return AcceptResult(document=existing, duplicate_of=existing)
    content_type = storage.content_sniff(path=storage.original_path(relative=relative))
    try:
        with transaction.atomic():
            document = Document.objects.create(
                owner=uploader,
                group=group,
                visibility=visibility,
                original_name=name[:500],
                sha256=sha,
                size=size,
                content_type=content_type,
                file=relative,
                given_fields=sorted(given),
                **given,
            )
            if not given.get("title"):
                document.title = Path(name).stem[:500]
                document.save(update_fields=["title"])
            if enqueue:
                pipeline_enqueue(document_id=document.pk)
    except IntegrityError:
        # The same bytes were accepted concurrently: report that document.
        existing = Document.objects.get(sha256=sha)
        return AcceptResult(document=existing, duplicate_of=existing)
    return AcceptResult(document=document, duplicate_of=None)


def _chunks_retire(*, document: Document) -> None:
    """Drop a document's chunks and pages, marking their vectors for removal from the index."""
    ids = list(Chunk.objects.filter(document=document).values_list("pk", flat=True))
    IndexDeletion.objects.bulk_create([IndexDeletion(chunk_id=i) for i in ids], ignore_conflicts=True)
    Chunk.objects.filter(document=document).delete()
    DocumentPage.objects.filter(document=document).delete()


def _fingerprints_release(*, document: Document) -> None:
    fps = list(DocumentFingerprint.objects.filter(document=document).values_list("fingerprint", flat=True))
    if fps:
        ParagraphFingerprint.objects.filter(fingerprint__in=fps, document_count__gt=0).update(
            document_count=F("document_count") - 1
        )
        DocumentFingerprint.objects.filter(document=document).delete()


def _restart(*, document: Document, enqueue: bool) -> Document:
    with transaction.atomic():
        document = Document.objects.select_for_update().get(pk=document.pk)
        _chunks_retire(document=document)
        _fingerprints_release(document=document)
        document.status = Status.QUEUED
        document.progress = 0
        document.status_reason = ""
        document.indexed_at = None
        document.save()
        storage.work_remove(document_id=document.pk)
        if enqueue:
            pipeline_enqueue(document_id=document.pk)
            transaction.on_commit(_deletions_enqueue)
    return document


def _deletions_enqueue() -> None:
    from knowledge.documents.tasks import index_delete

    index_delete.apply_async(queue=QUEUE_INDEX)


def document_retry(*, document: Document, enqueue: bool = True) -> Document:
    """Run a failed document's pipeline again from the start; its original is still there."""
    if document.status != Status.FAILED:
        raise DocumentError(f"Only failed documents can be retried; this one is {document.status}.")
    return _restart(document=document, enqueue=enqueue)


def document_reprocess(*, document: Document, enqueue: bool = True) -> Document:
    """Rebuild a finished document's pages, chunks and vectors from its original."""
    if document.status in IN_PROGRESS:
        raise DocumentError(f"The document is still being processed ({document.status}); wait for it to finish.")
    return _restart(document=document, enqueue=enqueue)


def document_delete(*, document: Document) -> None:
    """Delete a document, its original file and (through the index task) its vectors."""
    with transaction.atomic():
        document = Document.objects.select_for_update().get(pk=document.pk)
        _chunks_retire(document=document)
        _fingerprints_release(document=document)
        relative, doc_id = document.file, document.pk
        document.delete()
        transaction.on_commit(lambda: storage.original_remove(relative=relative))
        transaction.on_commit(lambda: storage.work_remove(document_id=doc_id))
        transaction.on_commit(_deletions_enqueue)


def document_update_metadata(*, document: Document, metadata: dict[str, Any]) -> Document:
    """Set metadata by hand; what a person sets is never overwritten by extraction."""
    given = _metadata_clean(metadata=metadata)
    cleared = [k for k, v in metadata.items() if v in (None, "")]
    with transaction.atomic():
        document = Document.objects.select_for_update().get(pk=document.pk)
        for key, value in given.items():
            setattr(document, key, value)
        for key in cleared:
            setattr(document, key, None if key == "report_date" else "")
        document.given_fields = sorted((set(document.given_fields) | set(given)) - set(cleared))
        document.save()
    return document
