"""Conversations, feedback, audit log, API tokens and model profiles of the analyst portal."""
from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _


class Conversation(models.Model):
    """A thread of questions and answers kept for one user."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    """One turn: the user's question or the assistant's verified answer."""

    ROLE_USER = "user"
    ROLE_ASSISTANT = "assistant"
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=[(ROLE_USER, "user"), (ROLE_ASSISTANT, "assistant")])
    text = models.TextField()
    search_query = models.TextField(blank=True, default="")  # the rewritten, standalone question
    citations = models.JSONField(default=list, blank=True)  # [{"n", "chunk_id", "document_id", "page_start", ...}]
    sources = models.JSONField(default=list, blank=True)  # every chunk shown for this answer
    not_found = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]


class Feedback(models.Model):
    """Thumbs up or down, with an optional comment, on one answer."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    rating = models.SmallIntegerField(choices=[(1, "up"), (-1, "down")])
    comment = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="portal_feedback_one_per_user")]


class AuditEvent(models.Model):
    """Who asked what, which documents and chunks were shown, who downloaded what."""

    ACTION_ASK = "ask"
    ACTION_VIEW = "view"
    ACTION_DOWNLOAD = "download"
    ACTION_REPORT = "report"
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    action = models.CharField(max_length=16, db_index=True)
    query = models.TextField(blank=True, default="")
    document_ids = models.JSONField(default=list, blank=True)
    chunk_ids = models.JSONField(default=list, blank=True)
    via = models.CharField(max_length=16, default="web")  # web | api | task
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]


class ApiToken(models.Model):
    """A personal API token; only its SHA-256 is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, default="")
    prefix = models.CharField(max_length=12, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"


class ModelProfile(models.Model):
    """Which generator checkpoint answers questions and drafts reports, and how it runs.

    attention_mode applies to MLA checkpoints (DeepSeek-V2/V3), routing_mode to mixture-of-experts ones; blank
    means the model's own default. clean() refuses a mode the checkpoint does not have, with the reason.
    """

    ATTENTION_CHOICES = [("", _("Model default")), ("absorbed", _("MLA: absorbed (weights folded into the latent)")),
                         ("naive", _("MLA: naive (expanded keys and values)"))]
    ROUTING_CHOICES = [("", _("Model default")), ("dispatch", _("MoE: dispatch (routed experts only)")),
                       ("loop", _("MoE: loop (per-token reference)"))]

    name = models.CharField(max_length=100, unique=True)
    checkpoint_path = models.CharField(
        max_length=500, blank=True, default="", help_text=_("Empty: the built-in default (SmolLM2-135M-Instruct).")
    )
    quantization = models.CharField(max_length=16, blank=True, default="")
    attention_mode = models.CharField(
        max_length=32, blank=True, default="", choices=ATTENTION_CHOICES,
        help_text=_("MLA attention path (DeepSeek-V2/V3 checkpoints only); empty: the model's default."))
    routing_mode = models.CharField(
        max_length=32, blank=True, default="", choices=ROUTING_CHOICES,
        help_text=_("Mixture-of-experts routing (MoE checkpoints only); empty: the model's default."))
    max_new_tokens = models.PositiveIntegerField(default=96)
    use_for_qa = models.BooleanField(default=False)
    use_for_reports = models.BooleanField(default=False)

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from knowledge.portal.model_profiles import profile_check

        profile_check(checkpoint_path=self.checkpoint_path, quantization=self.quantization,
                      attention_mode=self.attention_mode, routing_mode=self.routing_mode)
