"""API auth: hashed bearer tokens without cookies or CSRF; sessions keep CSRF; clear errors."""
from __future__ import annotations

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from knowledge.documents.models import Document
from knowledge.portal.models import ApiToken
from knowledge.portal.services import token_create
from portal_helpers import AMCOR, make_document


def test_token_is_stored_hashed_and_authenticates(users, media):
    token, key = token_create(user=users["alice"], name="cli")
    assert key not in token.key_hash and ApiToken.objects.filter(key_hash__contains=key).count() == 0
    mine = make_document(owner=users["alice"], media=media, title="Mine")
    theirs = make_document(owner=users["bob"], media=media, title="Theirs")
    api = Client(enforce_csrf_checks=True)
    resp = api.get("/api/documents/", HTTP_AUTHORIZATION=f"Bearer {key}")
    ids = {d["id"] for d in resp.json()["documents"]}
    assert mine.pk in ids and theirs.pk not in ids
    assert api.get(f"/api/documents/{theirs.pk}/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 404
    upload = SimpleUploadedFile(AMCOR.name, AMCOR.read_bytes())
    up = api.post("/api/documents/", {"file": upload, "visibility": "private"}, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert up.status_code == 201 and Document.objects.get(pk=up.json()["id"]).owner == users["alice"]


def test_bad_or_revoked_token_and_anonymous_get_401(users):
    token, key = token_create(user=users["alice"])
    c = Client()
    assert c.get("/api/documents/").status_code == 401
    assert c.get("/api/documents/", HTTP_AUTHORIZATION="Bearer kd_wrong").status_code == 401
    token.revoked = True
    token.save()
    assert c.get("/api/documents/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 401


def test_session_api_posts_still_need_csrf(users):
    c = Client(enforce_csrf_checks=True)
    c.force_login(users["alice"])
    resp = c.post("/api/ask/", {"question": "What was revenue?"})
    assert resp.status_code == 403 and "CSRF" in resp.json()["error"]
    resp = c.post("/v1/chat/completions", data="{}", content_type="application/json")
    assert resp.status_code == 403


def test_chat_completions_rejects_bad_requests(users):
    _, key = token_create(user=users["alice"])
    c = Client()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    assert c.post("/v1/chat/completions", data="not json", content_type="application/json", **auth).status_code == 400
    r = c.post("/v1/chat/completions", data={"messages": []}, content_type="application/json", **auth)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = c.post("/api/ask/", data={"question": "  "}, content_type="application/json", **auth)
    assert r.status_code == 400 and "question" in r.json()["error"]


def test_token_page_shows_key_once(users, client):
    client.force_login(users["alice"])
    page = client.post("/tokens/", {"name": "laptop"}).content.decode()
    token = ApiToken.objects.get(user=users["alice"])
    assert token.prefix in page and "new-token" in page
    assert "new-token" not in client.get("/tokens/").content.decode()
