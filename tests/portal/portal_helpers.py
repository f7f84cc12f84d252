"""Helpers shared by the portal tests: paths of real documents and documents written straight to the DB."""
from __future__ import annotations

import hashlib
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared"
AMCOR = SHARED / "corpus" / "financial" / "AMCOR_2022_8K_2022-07-01.pdf"


def make_document(*, owner, media: Path, visibility="private", group=None, pages=("Page one text.",), name="note.pdf",
                  data: bytes | None = None, title="A note", status="indexed"):
    """A document row with its original file, pages and one chunk per page (no index)."""
    from knowledge.documents.models import Chunk, Document, DocumentPage

    data = data if data is not None else b"%PDF-1.4 test " + title.encode() + owner.username.encode()
    sha = hashlib.sha256(data).hexdigest()
    rel = f"originals/{sha[:2]}/{sha}"
    (media / rel).parent.mkdir(parents=True, exist_ok=True)
    (media / rel).write_bytes(data)
    doc = Document.objects.create(owner=owner, visibility=visibility, group=group, title=title, original_name=name,
                                  sha256=sha, size=len(data), content_type="application/pdf", file=rel,
                                  status=status, page_count=len(pages), progress=100)
    for i, text in enumerate(pages, start=1):
        DocumentPage.objects.create(document=doc, page=i, text=text)
        Chunk.objects.create(document=doc, ordinal=i - 1, text=text, page_start=i, page_end=i)
    return doc
