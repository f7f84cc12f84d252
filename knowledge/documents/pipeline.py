"""The stage services of the ingestion pipeline: partition -> clean -> chunk -> embed -> index.

Each stage takes a document id, re-reads the row and runs only when the status says it is this
stage's turn (``stage_enter``), so a task delivered twice does nothing the second time. A stage
ends by moving the status to the next stage. Between stages the elements live as JSON under
``DATA_DIR/work/<document_id>/`` (see storage.py); chunks and their vectors live in the DB, and the
embed stage saves vectors batch by batch, so a killed worker resumes where it stopped.
Failures a person can act on raise ``StageError``; the task layer marks the document failed.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from knowledge.documents import storage
from knowledge.documents.models import (
    Chunk,
    Document,
    DocumentFingerprint,
    DocumentPage,
    IndexDeletion,
    ParagraphFingerprint,
    Status,
)

log = logging.getLogger(__name__)

BOILERPLATE_MIN_DOCUMENTS = 3
EMBED_BATCH = 32
CHUNK_MAX_TOKENS = 256
CHUNK_OVERLAP_TOKENS = 32
INDEX_LOCK_TIMEOUT = 120.0  # seconds to wait for the one index writer (rebuild_index may hold it)


class StageError(Exception):
    """A permanent failure of one document; ``reason`` tells a person what to do."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_EMBEDDER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _embedder_loaded():
    from modelcore import load_embedder

    return load_embedder(settings.KD_EMBED_MODEL or None)


def embedder():
    """The process's embedder, loaded once on first use (KD_EMBED_MODEL or the built-in default).

    Locked: the worker's start-up warm-up thread and a first task may ask for it at the same time.
    """
    with _EMBEDDER_LOCK:
        return _embedder_loaded()


def worker_warm_up() -> dict[str, float]:
    """What a worker process does once at start, before its first document: load the embedder and
    partition a tiny file of each unstructured-backed format (first-use imports). Seconds per part."""
    from ingestion.partition import warm_up

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    embedder().embed(["warm-up"])
    seconds["embedder"] = time.perf_counter() - t
    t = time.perf_counter()
    warm_up()
    seconds["partitioners"] = time.perf_counter() - t
    return seconds


def embed_batch_size() -> int:
    """Chunks embedded and saved per step (KD_EMBED_BATCH; a setting once settings.py names it)."""
    return int(getattr(settings, "KD_EMBED_BATCH", 0) or os.environ.get("KD_EMBED_BATCH") or EMBED_BATCH)


def stage_enter(*, document_id: int, expected: tuple[str, ...], status: str, progress: int | None = None) -> Document | None:
    """Claim a stage: returns the row with its status set, or None when it is not this stage's turn."""
    with transaction.atomic():
        document = Document.objects.select_for_update().filter(pk=document_id).first()
        if document is None or document.status not in expected:
            return None
        fields = ["status", "updated_at"]
        document.status = status
        if progress is not None:
            document.progress = progress
            fields.append("progress")
        document.save(update_fields=fields)
        return document


def stage_advance(*, document: Document, status: str, progress: int, **fields) -> None:
    """Hand the document on to the next stage."""
    Document.objects.filter(pk=document.pk).update(status=status, progress=progress, updated_at=timezone.now(), **fields)


def document_fail(*, document_id: int, reason: str) -> None:
    """Mark a document failed with a reason; its original file and metadata stay."""
    Document.objects.filter(pk=document_id).update(
        status=Status.FAILED, status_reason=reason[:2000], updated_at=timezone.now()
    )


JSON_CHECK_MAX_BYTES = 10 * 1024 * 1024


def _truncated_json_check(*, path: Path, document: Document) -> None:
    """Text that is JSON data but does not parse is a cut-off export, not prose: say so."""
    if not document.content_type.startswith(("text/", "application/json")) or document.size > JSON_CHECK_MAX_BYTES:
        return
    raw = path.read_bytes().strip()
    if raw[:1] not in (b"{", b"["):
        return
    try:
        text = raw.decode("utf-8-sig")
        json.loads(text)
    except UnicodeDecodeError:
        return
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text) - 1:  # parsed well up to the very end: cut off (prose like "[1] Note" fails at once)
            raise StageError(
                f"The file holds JSON data that is cut off ({exc.msg} at line {exc.lineno}, its end); "
                "upload the complete file."
            ) from None


def _partitioned(*, document: Document):
    from ingestion.partition import PartitionError, partition_file

    path = storage.original_path(relative=document.file)
    if not path.exists():
        raise StageError("The original file is missing from storage; delete the document and upload the file again.")
    _truncated_json_check(path=path, document=document)
    try:
        elements, info = partition_file(path, filename=document.original_name)
    except PartitionError as exc:
        raise StageError(getattr(exc, "reason", None) or str(exc)) from None
    elements = [e for e in elements if (e.text or "").strip()]
    if not elements:
        raise StageError("No text could be read from the file: it is empty, holds only whitespace or only images without readable text.")
    return elements, dict(info or {})


def _elements_load(*, document: Document, name: str):
    from ingestion.elements import Element

    rows = storage.work_read(document_id=document.pk, name=name)
    if rows is None:
        return None
    return [Element(**row) for row in rows]


def partition_run(*, document_id: int) -> bool:
    """Read the original into elements, pages and extracted metadata."""
    from ingestion.metadata import extract_metadata

    document = stage_enter(
        document_id=document_id, expected=(Status.QUEUED, Status.PARTITIONING), status=Status.PARTITIONING, progress=5
    )
    if document is None:
        return False
    Document.objects.filter(pk=document_id).update(attempts=F("attempts") + 1)
    elements, info = _partitioned(document=document)
    storage.work_write(document_id=document_id, name="elements", items=elements)
    pages: dict[int, list[str]] = defaultdict(list)
    for element in elements:
        pages[int(element.page or 1)].append(element.text)
    extracted = extract_metadata(elements, filename=document.original_name) or {}
    page_count = int(info.get("page_count") or info.get("pages") or 0) or max(pages, default=0)
    updates = {k: v for k, v in extracted.items() if v and k not in document.given_fields and hasattr(document, k)}
    with transaction.atomic():
        DocumentPage.objects.filter(document_id=document_id).delete()
        DocumentPage.objects.bulk_create(
            [DocumentPage(document_id=document_id, page=p, text="\n\n".join(t)) for p, t in sorted(pages.items())]
        )
        stage_advance(document=document, status=Status.CLEANING, progress=20, page_count=page_count, **updates)
    return True


def _boilerplate_for(*, document: Document, elements) -> set[str]:
    """Count this document's paragraph fingerprints once; return those seen in enough documents."""
    from ingestion.clean import paragraph_fingerprint

    fps = {fp for e in elements if (fp := paragraph_fingerprint(e.text))}
    with transaction.atomic():
        known = set(DocumentFingerprint.objects.filter(document=document).values_list("fingerprint", flat=True))
        new = sorted(fps - known)
        if new:
            DocumentFingerprint.objects.bulk_create(
                [DocumentFingerprint(document=document, fingerprint=f) for f in new], ignore_conflicts=True
            )
            ParagraphFingerprint.objects.bulk_create(
                [ParagraphFingerprint(fingerprint=f, document_count=0) for f in new], ignore_conflicts=True
            )
            for start in range(0, len(new), 500):
                ParagraphFingerprint.objects.filter(fingerprint__in=new[start : start + 500]).update(
                    document_count=F("document_count") + 1
                )
    common: set[str] = set()
    listed = sorted(fps)
    for start in range(0, len(listed), 500):
        common.update(
            ParagraphFingerprint.objects.filter(
                fingerprint__in=listed[start : start + 500], document_count__gte=BOILERPLATE_MIN_DOCUMENTS
            ).values_list("fingerprint", flat=True)
        )
    return common


def clean_run(*, document_id: int) -> bool:
    """Drop noise and boilerplate (paragraphs that recur across documents)."""
    from ingestion.clean import clean_elements

    document = stage_enter(document_id=document_id, expected=(Status.CLEANING,), status=Status.CLEANING)
    if document is None:
        return False
    elements = _elements_load(document=document, name="elements")
    if elements is None:  # scratch lost (disk cleaned): recompute from the original
        elements, _ = _partitioned(document=document)
    boilerplate = _boilerplate_for(document=document, elements=elements)
    cleaned = clean_elements(elements, boilerplate=boilerplate)
    if not cleaned:
        # Everything looked like headers, page numbers or boilerplate (a deck titled "Page 1", "Page 2"):
        # that text is still all the file says, so index it rather than lose the document.
        log.info("document %s: cleaning left nothing; keeping the text as read", document_id)
        cleaned = elements
    storage.work_write(document_id=document_id, name="cleaned", items=cleaned)
    stage_advance(document=document, status=Status.CHUNKING, progress=30)
    return True


def chunk_plan(*, elements) -> list:
    """The chunks of cleaned elements, within the embedder's token budget."""
    from ingestion.chunk import chunk_elements

    emb = embedder()
    max_tokens = min(CHUNK_MAX_TOKENS, int(getattr(emb, "max_tokens", CHUNK_MAX_TOKENS) or CHUNK_MAX_TOKENS))
    chunks = chunk_elements(elements, count_tokens=emb.count_tokens, max_tokens=max_tokens, overlap_tokens=CHUNK_OVERLAP_TOKENS,
                            token_starts=getattr(emb, "token_starts", None))
    return [c for c in chunks if c.text.strip()]


def chunk_run(*, document_id: int) -> bool:
    """Cut the cleaned elements into token-bounded chunks (rows without vectors yet)."""
    from ingestion.clean import clean_elements

    document = stage_enter(document_id=document_id, expected=(Status.CHUNKING,), status=Status.CHUNKING)
    if document is None:
        return False
    elements = _elements_load(document=document, name="cleaned")
    if elements is None:
        elements = clean_elements(_partitioned(document=document)[0], boilerplate=set())
    chunks = chunk_plan(elements=elements)
    if not chunks:
        raise StageError("The file has no text that can be indexed.")
    with transaction.atomic():
        old = list(Chunk.objects.filter(document_id=document_id).values_list("pk", flat=True))
        IndexDeletion.objects.bulk_create([IndexDeletion(chunk_id=i) for i in old], ignore_conflicts=True)
        Chunk.objects.filter(document_id=document_id).delete()
        Chunk.objects.bulk_create(
            [
                Chunk(
                    document_id=document_id,
                    ordinal=i,
                    text=c.text,
                    page_start=c.page_start,
                    page_end=c.page_end,
                    heading_path=list(c.heading_path or []),
                    element_types=list(c.element_types or []),
                    token_count=int(c.token_count or 0),
                    language=document.language,
                )
                for i, c in enumerate(chunks)
            ],
            batch_size=500,
        )
        stage_advance(document=document, status=Status.EMBEDDING, progress=40)
    return True


class StageContinues(Exception):
    """The stage used its time budget with work left (saved so far); run it again to go on."""


def embed_run(
    *, document_id: int, budget_s: float | None = None, on_batch: Callable[[int, int], None] | None = None
) -> bool:
    """Embed the chunks still without vectors, saving each batch so a restart resumes.

    With ``budget_s`` it stops after the batch that passes the budget and raises StageContinues, so
    a very long document is embedded by several tasks, each well inside the task time limit.
    """
    document = stage_enter(document_id=document_id, expected=(Status.EMBEDDING,), status=Status.EMBEDDING)
    if document is None:
        return False
    emb = embedder()
    total = Chunk.objects.filter(document_id=document_id).count()
    batch = embed_batch_size()
    started = time.monotonic()
    while True:
        # Longest first: each batch holds chunks of similar length, so little of it is padding (on corpus/financial
        # 17% fewer tokens through the model than in ordinal order). The order is fixed, so a restart resumes it.
        todo = list(
            Chunk.objects.filter(document_id=document_id, vector__isnull=True).order_by("-token_count", "ordinal")[:batch]
        )
        if not todo:
            break
        vectors = np.asarray(emb.embed([c.text for c in todo], batch_size=batch), dtype=np.float32)
        assert vectors.shape[0] == len(todo)
        for chunk, vec in zip(todo, vectors):
            chunk.vector = vec.tobytes()
            chunk.embed_model = emb.name
        with transaction.atomic():
            Chunk.objects.bulk_update(todo, ["vector", "embed_model"])
            done = total - Chunk.objects.filter(document_id=document_id, vector__isnull=True).count()
            Document.objects.filter(pk=document_id).update(progress=40 + int(50 * done / max(total, 1)))
        if on_batch is not None:
            on_batch(done, total)
        if budget_s is not None and done < total and time.monotonic() - started > budget_s:
            raise StageContinues(f"document {document_id}: embedding continues in a new task")  # at least a batch done
    stage_advance(document=document, status=Status.INDEXING, progress=90)
    return True


def index_dir() -> Path:
    return Path(settings.INDEX_DIR)


def _deletions_apply(*, writer) -> list[int]:
    ids = list(IndexDeletion.objects.values_list("chunk_id", flat=True))
    if ids:
        writer.delete(np.array(ids, dtype=np.int64))
    return ids


def _writer(*, dim: int):
    from ingestion.index import IndexWriter

    index_dir().mkdir(parents=True, exist_ok=True)
    return IndexWriter(index_dir(), dim=dim, lock_timeout=INDEX_LOCK_TIMEOUT)


def index_run(*, document_id: int) -> bool:
    """Put the document's vectors and texts in FAISS + BM25 (and drop retired ones), then publish."""
    document = stage_enter(document_id=document_id, expected=(Status.INDEXING,), status=Status.INDEXING)
    if document is None:
        return False
    rows = list(Chunk.objects.filter(document_id=document_id).order_by("ordinal").values_list("pk", "vector", "text"))
    if not rows or any(v is None for _, v, _ in rows):
        raise StageError("Some chunks have no vectors; reprocess the document.")
    vectors = np.stack([np.frombuffer(bytes(v), dtype=np.float32) for _, v, _ in rows])
    writer = _writer(dim=vectors.shape[1])
    with writer:
        drained = _deletions_apply(writer=writer)
        writer.upsert(np.array([pk for pk, _, _ in rows], dtype=np.int64), vectors, [t for _, _, t in rows])
        writer.publish()
    IndexDeletion.objects.filter(chunk_id__in=drained).delete()
    stage_advance(document=document, status=Status.INDEXED, progress=100, indexed_at=timezone.now(), status_reason="")
    storage.work_remove(document_id=document_id)
    return True


def index_deletions_run() -> int:
    """Remove retired chunk vectors (deleted or reprocessed documents) from the index."""
    if not IndexDeletion.objects.exists():
        return 0
    sample = Chunk.objects.exclude(vector=None).values_list("vector", flat=True).first()
    dim = len(bytes(sample)) // 4 if sample is not None else embedder().dim
    writer = _writer(dim=dim)
    with writer:
        drained = _deletions_apply(writer=writer)
        writer.publish()
    IndexDeletion.objects.filter(chunk_id__in=drained).delete()
    return len(drained)


STAGES: tuple[tuple[str, Callable[..., bool]], ...] = (
    ("partition", partition_run),
    ("clean", clean_run),
    ("chunk", chunk_run),
    ("embed", embed_run),
    ("index", index_run),
)


def index_rebuild(*, batch: int = 2000) -> int:
    """Rebuild FAISS + BM25 from the vectors in the DB (indexed documents only); returns the chunk count."""
    sample = Chunk.objects.filter(document__status=Status.INDEXED).exclude(vector=None).values_list("vector", flat=True).first()
    dim = len(bytes(sample)) // 4 if sample is not None else embedder().dim
    qs = (
        Chunk.objects.filter(document__status=Status.INDEXED)
        .exclude(vector=None)
        .order_by("pk")
        .values_list("pk", "vector", "text")
    )
    count = 0
    last_deletion = IndexDeletion.objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    def items():
        nonlocal count
        for pk, vector, text in qs.iterator(chunk_size=batch):
            count += 1
            yield pk, np.frombuffer(bytes(vector), dtype=np.float32), text

    with _writer(dim=dim) as writer:
        writer.rebuild(items())
        writer.publish()
    IndexDeletion.objects.filter(pk__lte=last_deletion).delete()  # later ones may name rows just written
    return count
