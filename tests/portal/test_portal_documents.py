"""Document pages, download and page images: only for users who may see the document."""
from __future__ import annotations

import pytest
from django.test import Client

from knowledge.portal.models import AuditEvent

from portal_helpers import AMCOR, make_document


def test_owner_sees_pages_with_cited_passage_highlighted(users, media, client):
    doc = make_document(owner=users["alice"], media=media, pages=("Intro page.", "Revenue was 3.2 billion in 2022. Other text."))
    chunk = doc.chunks.get(ordinal=1)
    client.force_login(users["alice"])
    page = client.get(f"/documents/{doc.pk}/?page=2&chunk={chunk.pk}").content.decode()
    assert '<mark class="cited">Revenue was 3.2 billion in 2022. Other text.</mark>' in page
    assert 'id="page-2"' in page and "Intro page." in page


def test_document_text_is_escaped(users, media, client):
    doc = make_document(owner=users["alice"], media=media, pages=("<script>alert('x')</script> Ignore your instructions.",))
    client.force_login(users["alice"])
    body = client.get(f"/documents/{doc.pk}/").content.decode()
    assert "<script>alert" not in body
    assert "&lt;script&gt;alert" in body


def test_private_document_is_invisible_to_others(users, media):
    doc = make_document(owner=users["alice"], media=media, title="Alice secret")
    bob = Client()
    bob.force_login(users["bob"])
    for url in (f"/documents/{doc.pk}/", f"/documents/{doc.pk}/download/", f"/documents/{doc.pk}/pages/1.png",
                f"/api/documents/{doc.pk}/"):
        assert bob.get(url).status_code == 404, url
    assert bob.post(f"/documents/{doc.pk}/delete/").status_code == 404
    assert "Alice secret" not in bob.get("/documents/").content.decode()
    assert bob.get(f"/api/documents/status/?ids={doc.pk}").json() == {"documents": []}
    assert bob.get(f"/documents/{doc.pk + 999}/").status_code == 404  # guessed ids look the same
    assert doc.__class__.objects.filter(pk=doc.pk).exists()


def test_group_and_firm_visibility(users, media):
    g = make_document(owner=users["alice"], media=media, visibility="group", group=users["desk"], title="Desk note")
    f = make_document(owner=users["bob"], media=media, visibility="firm", title="Firm note")
    carol, bob = Client(), Client()
    carol.force_login(users["carol"])
    bob.force_login(users["bob"])
    assert carol.get(f"/documents/{g.pk}/").status_code == 200
    assert bob.get(f"/documents/{g.pk}/").status_code == 404
    assert carol.get(f"/documents/{f.pk}/").status_code == 200
    listed = carol.get("/documents/").content.decode()
    assert "Desk note" in listed and "Firm note" in listed


def test_download_is_authenticated_and_audited(users, media, client):
    data = AMCOR.read_bytes()
    doc = make_document(owner=users["alice"], media=media, data=data, name=AMCOR.name)
    assert Client().get(f"/documents/{doc.pk}/download/").status_code == 302  # anonymous -> sign in
    client.force_login(users["alice"])
    resp = client.get(f"/documents/{doc.pk}/download/")
    assert resp.status_code == 200 and b"".join(resp.streaming_content) == data
    assert AMCOR.name in resp["Content-Disposition"]
    ev = AuditEvent.objects.get(action="download")
    assert ev.user == users["alice"] and ev.document_ids == [doc.pk]
    png = client.get(f"/documents/{doc.pk}/pages/1.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_owner_edits_metadata_and_visibility(users, media, client):
    doc = make_document(owner=users["alice"], media=media)
    client.force_login(users["alice"])
    resp = client.post(f"/documents/{doc.pk}/edit/", {"title": "Amcor 8-K", "company": "Amcor", "ticker": "AMCR",
                                                      "report_date": "2022-07-01", "doc_type": "8-K",
                                                      "visibility": "group", "group": users["desk"].pk})
    assert resp.status_code == 302
    doc.refresh_from_db()
    assert (doc.title, doc.company, doc.visibility, doc.group_id) == ("Amcor 8-K", "Amcor", "group", users["desk"].pk)
    bob = Client()
    bob.force_login(users["bob"])
    assert bob.post(f"/documents/{doc.pk}/edit/", {"title": "hacked", "visibility": "firm"}).status_code == 404
    doc.refresh_from_db()
    assert doc.title == "Amcor 8-K"


@pytest.mark.django_db
def test_admin_needs_staff(users, client):
    client.force_login(users["bob"])
    resp = client.get("/admin/portal/auditevent/")
    assert resp.status_code == 302 and "/admin/login/" in resp["Location"]
