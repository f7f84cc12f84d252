"""URLs of the analyst portal: pages under /, JSON under /api/, OpenAI-compatible under /v1/."""
from django.contrib.auth.decorators import login_not_required
from django.contrib.staticfiles.views import serve as static_serve
from django.urls import path
from django.views.i18n import set_language

from knowledge.portal.views import api, ask, documents, upload

app_name = "portal"

urlpatterns = [
    path("", ask.ask_page, name="home"),
    # Embedded mode serves its few static files itself (no collectstatic, no separate web server).
    path("static/<path:path>", login_not_required(static_serve), {"insecure": True}, name="static"),
    path("i18n/setlang/", set_language, name="set_language"),
    path("ask/stream/", ask.ask_stream, name="ask_stream"),
    path("conversations/", ask.conversation_list, name="conversation_list"),
    path("conversations/<int:id>/", ask.ask_page, name="conversation"),
    path("conversations/<int:id>/rename/", ask.conversation_rename, name="conversation_rename"),
    path("conversations/<int:id>/delete/", ask.conversation_delete, name="conversation_delete"),
    path("answers/<int:id>/feedback/", ask.feedback, name="feedback"),
    path("upload/", upload.upload_page, name="upload"),
    path("documents/", documents.document_list, name="document_list"),
    path("documents/<int:id>/", documents.document_detail, name="document_detail"),
    path("documents/<int:id>/edit/", documents.document_edit, name="document_edit"),
    path("documents/<int:id>/retry/", documents.document_retry, name="document_retry"),
    path("documents/<int:id>/delete/", documents.document_delete, name="document_delete"),
    path("documents/<int:id>/download/", documents.document_download, name="document_download"),
    path("documents/<int:id>/pages/<int:page>.png", documents.document_page_image, name="document_page_image"),
    path("tokens/", api.token_page, name="tokens"),
    path("api/documents/", upload.api_documents, name="api_documents"),
    path("api/documents/status/", upload.api_document_status, name="api_document_status"),
    path("api/documents/<int:id>/", upload.api_document, name="api_document"),
    path("api/documents/<int:id>/retry/", upload.api_document_retry, name="api_document_retry"),
    path("api/ask/", api.api_ask, name="api_ask"),
    path("v1/chat/completions", api.chat_completions, name="chat_completions"),
]
