"""The rendered PDF page highlights the cited passage: a real filing, ingested by the real pipeline."""
from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from PIL import Image, ImageChops

from tests.portal.portal_helpers import AMCOR


@pytest.fixture(scope="module")
def amcor(django_db_setup, django_db_blocker, tmp_path_factory):
    from knowledge.documents.runner import pipeline_run_inline
    from knowledge.documents.services import document_accept

    root = tmp_path_factory.mktemp("kd-img")
    with override_settings(DATA_DIR=root, MEDIA_ROOT=root / "uploads", INDEX_DIR=root / "index"):
        with django_db_blocker.unblock():
            alice = User.objects.create_user("alice-img", password="pw-alice-123")
            bob = User.objects.create_user("bob-img", password="pw-bob-123")
            doc = document_accept(uploader=alice, path=AMCOR, filename=AMCOR.name, enqueue=False).document
            doc = pipeline_run_inline(document_id=doc.pk)
            assert doc.status == "indexed" and doc.page_count == 9
            yield {"alice": alice, "bob": bob, "doc": doc}
            doc.delete()
            alice.delete()
            bob.delete()


def _png(client, doc, page, chunk=None):
    url = f"/documents/{doc.pk}/pages/{page}.png" + (f"?chunk={chunk.pk}" if chunk else "")
    resp = client.get(url)
    assert resp.status_code == 200, resp.status_code
    assert resp["Content-Type"] == "image/png"
    return resp, Image.open(io.BytesIO(resp.content)).convert("RGB")


@pytest.mark.django_db
def test_cited_passage_is_highlighted_on_the_page_image(amcor, client):
    import pypdfium2 as pdfium

    from knowledge.portal.page_image import passage_boxes

    doc = amcor["doc"]
    chunk = next(c for c in doc.chunks.order_by("ordinal") if c.page_start == c.page_end and len(c.text) > 200)
    page = chunk.page_start
    client.force_login(amcor["alice"])
    plain_resp, plain = _png(client, doc, page)
    lit_resp, lit = _png(client, doc, page, chunk)
    assert plain_resp["X-Highlight-Boxes"] == "0"
    assert int(lit_resp["X-Highlight-Boxes"]) > 0
    assert plain.size == lit.size

    pdf = pdfium.PdfDocument(str(AMCOR))
    boxes = passage_boxes(pdf[page - 1], chunk.text, width=plain.width, height=plain.height)
    pdf.close()
    assert boxes and len(boxes) == int(lit_resp["X-Highlight-Boxes"])
    diff = ImageChops.difference(plain, lit)
    for box in boxes:  # every box is tinted: its pixels differ from the plain render, yellow over white
        region = diff.crop(box)
        assert region.getbbox() is not None, box
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        r, g, b = lit.getpixel((box[0] + 2, cy))
        assert b < r and b < g, (r, g, b)
    # nothing outside the boxes changed
    mask = Image.new("L", plain.size, 255)
    for box in boxes:
        mask.paste(0, (box[0], box[1], box[2] + 1, box[3] + 1))
    outside = Image.composite(diff, Image.new("RGB", plain.size), mask)
    assert outside.getbbox() is None


@pytest.mark.django_db
def test_passage_from_another_page_draws_nothing(amcor, client):
    doc = amcor["doc"]
    chunk = next(c for c in doc.chunks.order_by("ordinal") if c.page_start == c.page_end == 1 and len(c.text) > 100)
    other = 2
    client.force_login(amcor["alice"])
    plain_resp, plain = _png(client, doc, other)
    lit_resp, lit = _png(client, doc, other, chunk)
    assert lit_resp["X-Highlight-Boxes"] == "0"
    assert ImageChops.difference(plain, lit).getbbox() is None


@pytest.mark.django_db
def test_page_image_needs_permission_and_a_chunk_of_this_document(amcor, client, tmp_path):
    doc = amcor["doc"]
    client.force_login(amcor["bob"])
    assert client.get(f"/documents/{doc.pk}/pages/1.png").status_code == 404
    client.logout()
    assert client.get(f"/documents/{doc.pk}/pages/1.png").status_code == 302
    client.force_login(amcor["alice"])
    resp = client.get(f"/documents/{doc.pk}/pages/1.png?chunk=999999999")  # not a chunk of this document
    assert resp.status_code == 200 and resp["X-Highlight-Boxes"] == "0"
    assert client.get(f"/documents/{doc.pk}/pages/{doc.page_count + 1}.png").status_code == 404


def test_alignment_skips_cleaning_differences_and_foreign_text() -> None:
    from knowledge.portal.page_image import passage_char_ranges

    page = "Header\r\nThe Company’s net sales were $1,234 million\r\nin fiscal 2023, up ﬁve percent.\r\nFooter"
    passage = "The Company's net sales were $1,234 million in fiscal 2023, up five percent."
    ranges = passage_char_ranges(page, passage)
    assert ranges and page[ranges[0][0]:].startswith("The Company")
    assert page[: ranges[-1][1]].endswith("percent.")
    assert passage_char_ranges(page, "Revenue from the cloud segment grew strongly in the quarter.") == []
    assert passage_char_ranges(page, "") == []


@pytest.mark.django_db
def test_page_image_and_download_take_a_bearer_token(amcor):
    from django.test import Client

    from knowledge.portal.services import token_create

    doc = amcor["doc"]
    chunk = doc.chunks.order_by("ordinal").first()
    key = token_create(user=amcor["alice"])[1]
    other = token_create(user=amcor["bob"])[1]
    anon = Client()
    resp = anon.get(f"/documents/{doc.pk}/pages/{chunk.page_start}.png?chunk={chunk.pk}", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert resp.status_code == 200 and int(resp["X-Highlight-Boxes"]) > 0
    assert anon.get(f"/documents/{doc.pk}/download/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    assert anon.get(f"/documents/{doc.pk}/download/", HTTP_AUTHORIZATION=f"Bearer {other}").status_code == 404
    assert anon.get(f"/documents/{doc.pk}/pages/1.png", HTTP_AUTHORIZATION="Bearer kd_wrong").status_code == 401
    assert anon.get(f"/documents/{doc.pk}/pages/1.png").status_code == 302  # no token, no session: sign in
