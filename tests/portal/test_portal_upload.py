"""Upload endpoint: CSRF, validation by name/content/size, duplicates, metadata and visibility."""
from __future__ import annotations

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from knowledge.documents.models import Document
from portal_helpers import AMCOR


def _csrf_client(user) -> tuple[Client, str]:
    c = Client(enforce_csrf_checks=True)
    c.force_login(user)
    c.get("/upload/")
    return c, c.cookies["csrftoken"].value


def _pdf(name=AMCOR.name, data=None):
    return SimpleUploadedFile(name, data if data is not None else AMCOR.read_bytes(), content_type="application/pdf")


def test_upload_needs_csrf_then_accepts_with_metadata(users, media):
    c, token = _csrf_client(users["alice"])
    refused = c.post("/api/documents/", {"file": _pdf(), "visibility": "private"})
    assert refused.status_code == 403 and Document.objects.count() == 0
    resp = c.post("/api/documents/", {"file": _pdf(), "visibility": "group", "group": users["desk"].pk,
                                      "company": "Amcor", "ticker": "AMCR", "doc_type": "8-K",
                                      "report_date": "2022-07-01"}, HTTP_X_CSRFTOKEN=token)
    assert resp.status_code == 201, resp.content
    body = resp.json()
    doc = Document.objects.get(pk=body["id"])
    assert (doc.owner, doc.company, doc.ticker, doc.visibility, doc.group) == (
        users["alice"], "Amcor", "AMCR", "group", users["desk"])
    assert body["status"] == "queued" and body["duplicate_of"] is None
    assert (media / doc.file).read_bytes() == AMCOR.read_bytes()


def test_duplicate_says_which_document(users, media):
    c, token = _csrf_client(users["alice"])
    first = c.post("/api/documents/", {"file": _pdf(), "visibility": "private"}, HTTP_X_CSRFTOKEN=token).json()
    again = c.post("/api/documents/", {"file": _pdf("copy.pdf"), "visibility": "private"}, HTTP_X_CSRFTOKEN=token)
    assert again.status_code == 200
    assert again.json()["duplicate_of"]["id"] == first["id"]
    assert str(first["id"]) in again.json()["message"]
    assert Document.objects.count() == 1


def test_duplicate_of_invisible_document_does_not_leak(users, media):
    a, ta = _csrf_client(users["alice"])
    a.post("/api/documents/", {"file": _pdf(), "visibility": "private", "title": "Alice private deal memo"},
           HTTP_X_CSRFTOKEN=ta)
    b, tb = _csrf_client(users["bob"])
    resp = b.post("/api/documents/", {"file": _pdf(), "visibility": "private"}, HTTP_X_CSRFTOKEN=tb)
    body = resp.json()
    assert "Alice private deal memo" not in resp.content.decode()
    assert body["duplicate_of"]["id"] is None and "cannot see" in body["message"]


def test_bad_uploads_are_refused_with_reasons(users, media, settings):
    c, token = _csrf_client(users["alice"])
    cases = [
        (SimpleUploadedFile("evil.exe", b"MZ\x90\x00binary"), "not supported"),
        (SimpleUploadedFile("fake.pdf", b"<html><script>alert(1)</script></html>"), "does not match"),
        (SimpleUploadedFile("empty.pdf", b""), "empty"),
    ]
    for upload, reason in cases:
        resp = c.post("/api/documents/", {"file": upload, "visibility": "private"}, HTTP_X_CSRFTOKEN=token)
        assert resp.status_code == 400 and reason in resp.json()["error"], (upload.name, resp.content)
    settings.KD_MAX_UPLOAD_BYTES = 1000
    resp = c.post("/api/documents/", {"file": _pdf()}, HTTP_X_CSRFTOKEN=token)
    assert resp.status_code == 400 and "upload limit" in resp.json()["error"]
    resp = c.post("/api/documents/", {"file": _pdf(), "visibility": "group", "group": 99999}, HTTP_X_CSRFTOKEN=token)
    assert resp.status_code == 400
    assert Document.objects.count() == 0


def test_group_visibility_needs_own_group(users, media):
    c, token = _csrf_client(users["bob"])  # bob is in no group
    resp = c.post("/api/documents/", {"file": _pdf(), "visibility": "group", "group": users["desk"].pk},
                  HTTP_X_CSRFTOKEN=token)
    assert resp.status_code == 400 and "groups" in resp.json()["error"]


def test_failed_document_can_be_retried_by_its_owner_only(users, media):
    from portal_helpers import make_document

    doc = make_document(owner=users["alice"], media=media, status="failed")
    doc.status_reason = "The PDF is encrypted: upload a copy without a password, then retry."
    doc.save()
    c, token = _csrf_client(users["alice"])
    status = c.get(f"/api/documents/status/?ids={doc.pk}").json()["documents"][0]
    assert status["status"] == "failed" and "encrypted" in status["status_reason"]
    b, tb = _csrf_client(users["bob"])
    assert b.post(f"/api/documents/{doc.pk}/retry/", HTTP_X_CSRFTOKEN=tb).status_code == 404
    resp = c.post(f"/api/documents/{doc.pk}/retry/", HTTP_X_CSRFTOKEN=token)
    assert resp.status_code == 200 and resp.json()["status"] == "queued"
    doc.refresh_from_db()
    assert doc.status == "queued"


def test_retry_of_a_document_in_progress_is_refused_with_a_reason(users, media):
    from portal_helpers import make_document

    doc = make_document(owner=users["alice"], media=media, status="embedding")
    c, token = _csrf_client(users["alice"])
    resp = c.post(f"/api/documents/{doc.pk}/retry/", HTTP_X_CSRFTOKEN=token)
    assert resp.status_code == 400 and "Only failed documents" in resp.json()["error"]
