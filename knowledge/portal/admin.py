"""Admin: conversations, feedback, the audit log, API tokens, model profiles."""
from django.contrib import admin

from knowledge.portal.models import ApiToken, AuditEvent, Conversation, Feedback, Message, ModelProfile


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "text", "not_found", "created_at")
    readonly_fields = fields


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("title", "owner", "updated_at")
    search_fields = ("title", "owner__username")
    inlines = [MessageInline]


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("message", "user", "rating", "comment", "created_at")
    list_filter = ("rating",)
    readonly_fields = ("message", "user", "created_at")


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "user", "action", "via", "query", "document_ids")
    list_filter = ("action", "via")
    search_fields = ("query", "user__username")
    readonly_fields = ("created_at", "user", "action", "via", "query", "document_ids", "chunk_ids")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")


@admin.register(ModelProfile)
class ModelProfileAdmin(admin.ModelAdmin):
    list_display = ("name", "checkpoint_path", "quantization", "attention_mode", "routing_mode", "use_for_qa",
                    "use_for_reports")
    fields = ("name", "checkpoint_path", "quantization", "attention_mode", "routing_mode", "max_new_tokens", "use_for_qa",
              "use_for_reports")
