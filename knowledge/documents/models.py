"""Documents, their pages and chunks: the source of truth that the indexes are derived from."""
from __future__ import annotations

from django.conf import settings
from django.db import models


class Visibility(models.TextChoices):
    PRIVATE = "private", "Private"
    GROUP = "group", "Group"
    FIRM = "firm", "Firm"


class Status(models.TextChoices):
    QUEUED = "queued", "Queued"
    PARTITIONING = "partitioning", "Partitioning"
    CLEANING = "cleaning", "Cleaning"
    CHUNKING = "chunking", "Chunking"
    EMBEDDING = "embedding", "Embedding"
    INDEXING = "indexing", "Indexing"
    INDEXED = "indexed", "Indexed"
    FAILED = "failed", "Failed"


IN_PROGRESS = (Status.QUEUED, Status.PARTITIONING, Status.CLEANING, Status.CHUNKING, Status.EMBEDDING, Status.INDEXING)


class Document(models.Model):
    """One uploaded file, its metadata and where it stands in the pipeline."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="documents")
    group = models.ForeignKey("auth.Group", null=True, blank=True, on_delete=models.SET_NULL, related_name="documents")
    visibility = models.CharField(max_length=10, choices=Visibility.choices, default=Visibility.PRIVATE)

    title = models.CharField(max_length=500, blank=True)
    company = models.CharField(max_length=200, blank=True, db_index=True)
    ticker = models.CharField(max_length=20, blank=True, db_index=True)
    report_date = models.DateField(null=True, blank=True)
    fiscal_period = models.CharField(max_length=40, blank=True)
    doc_type = models.CharField(max_length=40, blank=True)
    language = models.CharField(max_length=16, blank=True)
    page_count = models.PositiveIntegerField(default=0)
    # Which metadata fields the uploader gave: extraction never overwrites those.
    given_fields = models.JSONField(default=list, blank=True)

    original_name = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64, unique=True)
    size = models.BigIntegerField()
    content_type = models.CharField(max_length=200, blank=True)
    file = models.CharField(max_length=500, help_text="Path of the untouched original, relative to MEDIA_ROOT.")

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0)
    status_reason = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    indexed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.title or self.original_name


class DocumentPage(models.Model):
    """The text of one page, for the document view."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="pages")
    page = models.PositiveIntegerField()
    text = models.TextField()

    class Meta:
        ordering = ["document", "page"]
        constraints = [models.UniqueConstraint(fields=["document", "page"], name="uniq_document_page")]


class Chunk(models.Model):
    """A retrievable piece of a document with its embedding (float32 bytes)."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    ordinal = models.PositiveIntegerField()
    text = models.TextField()
    page_start = models.PositiveIntegerField(null=True)
    page_end = models.PositiveIntegerField(null=True)
    heading_path = models.JSONField(default=list)
    element_types = models.JSONField(default=list)
    token_count = models.PositiveIntegerField(default=0)
    vector = models.BinaryField(null=True)
    embed_model = models.CharField(max_length=200, blank=True)
    language = models.CharField(max_length=16, blank=True)

    class Meta:
        ordering = ["document", "ordinal"]
        constraints = [models.UniqueConstraint(fields=["document", "ordinal"], name="uniq_chunk_ordinal")]


class ParagraphFingerprint(models.Model):
    """How many documents carry a paragraph: seen in enough of them, it is boilerplate."""

    fingerprint = models.CharField(max_length=64, unique=True)
    document_count = models.PositiveIntegerField(default=0)


class DocumentFingerprint(models.Model):
    """Which fingerprints a document contributed, so counting stays right on reprocess and delete."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="fingerprints")
    fingerprint = models.CharField(max_length=64)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["document", "fingerprint"], name="uniq_document_fingerprint")]


class IndexDeletion(models.Model):
    """Chunk ids whose vectors must leave the index; the index task drains this table."""

    chunk_id = models.BigIntegerField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)


class WorkerHeartbeat(models.Model):
    """A running worker's last sign of life and the queues it consumes."""

    hostname = models.CharField(max_length=300, unique=True)
    queues = models.JSONField(default=list)
    pid = models.IntegerField(default=0)
    last_seen = models.DateTimeField()
