"""Admin: look at documents, their status and chunks; retry failed ones."""
from __future__ import annotations

from django.contrib import admin, messages

from knowledge.documents import services
from knowledge.documents.models import Chunk, Document, Status, WorkerHeartbeat


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "company", "ticker", "doc_type", "status", "progress", "visibility", "owner", "created_at")
    list_filter = ("status", "visibility", "doc_type", "language")
    search_fields = ("title", "original_name", "company", "ticker", "sha256")
    readonly_fields = ("sha256", "size", "content_type", "file", "status", "progress", "status_reason", "attempts",
                       "created_at", "updated_at", "indexed_at", "page_count")
    actions = ["retry_failed"]

    @admin.action(description="Retry the selected failed documents")
    def retry_failed(self, request, queryset):
        done = 0
        for document in queryset.filter(status=Status.FAILED):
            services.document_retry(document=document)
            done += 1
        self.message_user(request, f"{done} document(s) queued again.", messages.SUCCESS)

    def delete_model(self, request, obj):
        services.document_delete(document=obj)

    def delete_queryset(self, request, queryset):
        for document in queryset:
            services.document_delete(document=document)


@admin.register(Chunk)
class ChunkAdmin(admin.ModelAdmin):
    list_display = ("id", "document", "ordinal", "page_start", "page_end", "token_count", "embed_model")
    search_fields = ("text",)
    raw_id_fields = ("document",)
    exclude = ("vector",)


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(admin.ModelAdmin):
    list_display = ("hostname", "queues", "pid", "last_seen")
