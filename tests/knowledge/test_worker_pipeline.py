"""The whole pipeline through a real Celery worker on real Redis: each format indexes, bad files fail cleanly."""
from __future__ import annotations

import os
import random
import re
import shutil

import pytest

from knowledge.documents import services
from knowledge.documents.models import IN_PROGRESS, Document, Status
from knowledge.documents.retrieval import retrieve
from knowledge.documents.workers import workers_up

from conftest import wait_for

pytestmark = pytest.mark.slow

# A representative subset of the corpus (the full run is benchmarks/ingest_throughput.py): a few PDFs and each other format.
GOOD = [
    "financial/AMCOR_2022_8K_2022-07-01.pdf",
    "formats/all-number-table.pdf",
    "financial/example-10k-1p.html",
    "financial/vodafone.xlsx",
    "formats/docx-tables.docx",
    "formats/fake-power-point-table.pptx",
    "formats/fake-power-point-many-pages.pptx",  # only "Page 1", "Page 2": all of it looks like page numbers
    "formats/codeblock.md",
    "formats/fake-email-attachment.eml",
    "formats/fake-text-utf-16.txt",
    "multilingual/eng_spa_mult.docx",
]
# Damaged but still readable: ingestion reads its slides (tests/ingestion/test_bad_input.py), so it indexes what it can.
READABLE_DESPITE_DAMAGE = {"fake-power-point-malformed.pptx": "Test Slide"}


def _generated_bad(folder):
    """Broken files of the kinds people upload by mistake."""
    rnd = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "random-bytes.pdf").write_bytes(bytes(rnd.randrange(256) for _ in range(4096)))
    (folder / "truncated.pdf").write_bytes(b"%PDF-1.7\n" + bytes(rnd.randrange(256) for _ in range(2000)))
    (folder / "not-a-zip.docx").write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
    (folder / "binary.txt").write_bytes(bytes(rnd.randrange(256) for _ in range(3000)))
    (folder / "only-newlines.md").write_text("\n\n \n\t\n")
    return sorted(folder.iterdir())


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _assert_pages_hold_chunks(path, chunks) -> None:
    """Right pages, checked against an independent reader (pypdf): a chunk's words are on its pages."""
    import pypdf

    pages = [_squash(p.extract_text() or "") for p in pypdf.PdfReader(path).pages]
    for c in chunks:
        words = re.findall(r"[A-Za-z]{4,}", c.text)[:6]
        span = "".join(pages[c.page_start - 1 : c.page_end])
        missing = [w for w in words if _squash(w) not in span]
        assert not missing, (path.name, c.ordinal, c.page_start, c.page_end, missing)


def test_worker_indexes_each_format_and_fails_bad_files_cleanly(on_workers, make_user, shared_dir, tmp_path):
    owner = make_user("ann")
    assert workers_up()  # the heartbeat of the worker started for this module
    corpus = shared_dir / "corpus"
    bad = sorted((corpus / "bad").iterdir()) + _generated_bad(tmp_path / "bad")
    docs = {}
    for path in [corpus / name for name in GOOD] + bad:
        result = services.document_accept(uploader=owner, path=path, filename=path.name, visibility="firm")
        assert result.duplicate_of is None, path
        docs[path] = result.document.pk

    def all_done():
        return not Document.objects.filter(pk__in=docs.values(), status__in=IN_PROGRESS).exists()

    wait_for(all_done, timeout=420, what="every document to finish", worker=on_workers)
    assert on_workers.alive(), on_workers.tail()
    for path, pk in docs.items():
        doc = Document.objects.get(pk=pk)
        if path.name in READABLE_DESPITE_DAMAGE:
            assert doc.status == Status.INDEXED, (path.name, doc.status_reason)
            assert READABLE_DESPITE_DAMAGE[path.name] in " ".join(doc.chunks.values_list("text", flat=True))
        elif path in bad:
            assert doc.status == Status.FAILED, (path.name, doc.status, doc.chunks.count())
            assert len(doc.status_reason) > 15 and "Traceback" not in doc.status_reason, (path.name, doc.status_reason)
            assert not doc.chunks.exists()
        else:
            assert doc.status == Status.INDEXED, (path.name, doc.status_reason)
            chunks = list(doc.chunks.order_by("ordinal"))
            assert chunks and all(c.text.strip() and c.vector for c in chunks), path.name
            assert [c.ordinal for c in chunks] == list(range(len(chunks)))
            assert doc.page_count >= 1 and doc.pages.exists()
            assert all(1 <= c.page_start <= c.page_end <= doc.page_count for c in chunks), path.name
            if path.suffix == ".pdf":
                _assert_pages_hold_chunks(path, chunks)

    # Served from the index the worker published.
    amcor = docs[corpus / GOOD[0]]
    hits = retrieve(query="Amcor 8-K current report", user=owner, k=5)
    assert amcor in {h.document_id for h in hits}

    # A failed document is retried through the workers once its cause is gone.
    failed = Document.objects.get(pk=docs[bad[-1]])
    (tmp_path / "fixed.md").write_text("# Fixed\n\nThe corrected upload has real text about quarterly revenue.\n")
    stored = os.path.join(os.fspath(on_workers.data_dir / "uploads"), failed.file)
    shutil.copy(tmp_path / "fixed.md", stored)
    Document.objects.filter(pk=failed.pk).update(content_type="text/markdown", original_name="fixed.md")
    services.document_retry(document=failed)
    wait_for(lambda: Document.objects.get(pk=failed.pk).status == Status.INDEXED, timeout=120,
             what="the retried document", worker=on_workers)


def test_ingest_command_goes_through_the_workers_when_they_are_up(on_workers, make_user, write_report):
    import io

    from django.core.management import call_command

    make_user("admin", superuser=True)
    path = write_report("via-workers.md", seed=600)
    out, err = io.StringIO(), io.StringIO()
    call_command("ingest", str(path), stdout=out, stderr=err)
    assert "sending to the workers" in err.getvalue()
    doc = Document.objects.get(original_name="via-workers.md")
    assert out.getvalue().splitlines() == [f"{path}: indexed as document {doc.pk} ({doc.chunks.count()} chunks, 1 pages)",
                                           "1 indexed, 0 duplicate, 0 failed"]

    # Deleting it takes its vectors out of the index through the index worker.
    from ingestion.index import IndexReader

    reader = IndexReader(on_workers.data_dir / "index")

    def live_ids() -> set[int]:
        return {int(i) for i in reader._snapshot().row_ids if i >= 0}

    ids = set(doc.chunks.values_list("pk", flat=True))
    assert ids and ids <= live_ids()
    services.document_delete(document=doc)
    wait_for(lambda: not (ids & live_ids()), timeout=60, what="the deleted document's vectors to leave the index", worker=on_workers)
