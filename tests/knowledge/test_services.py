"""Accepting uploads, metadata rules, retry, reprocess and delete, run in-process on the real stages and model."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from django.contrib.auth.models import Group

from knowledge.documents import services, storage
from knowledge.documents.models import Chunk, Document, IndexDeletion, Status
from knowledge.documents.pipeline import index_deletions_run
from knowledge.documents.runner import pipeline_run_inline

pytestmark = pytest.mark.django_db


def _index_ids(settings) -> set[int]:
    from ingestion.index import IndexReader

    reader = IndexReader(settings.INDEX_DIR)
    snap = reader._snapshot()
    return set() if snap is None else {int(i) for i in snap.row_ids if i >= 0}


def test_accept_stores_original_untouched_and_reports_duplicates(make_user, data_dir, write_report):
    owner = make_user("ann")
    path = write_report("acme-q2.md", seed=1)
    result = services.document_accept(uploader=owner, path=path, filename=path.name, visibility="firm",
                                      metadata={"company": "Acme", "report_date": "2023-06-30"}, enqueue=False)
    doc = result.document
    assert result.duplicate_of is None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc.sha256 == sha and doc.size == path.stat().st_size
    stored = storage.original_path(relative=doc.file)
    assert stored.read_bytes() == path.read_bytes() and str(stored).startswith(str(data_dir / "uploads" / "originals"))
    assert doc.content_type.startswith("text/")
    assert doc.status == Status.QUEUED and doc.company == "Acme" and str(doc.report_date) == "2023-06-30"
    assert doc.given_fields == ["company", "report_date"]

    again = services.document_accept(uploader=make_user("bob"), file_obj=io.BytesIO(path.read_bytes()),
                                      filename="other-name.md", enqueue=False)
    assert again.duplicate_of is not None and again.duplicate_of.pk == doc.pk
    assert Document.objects.count() == 1


def test_bad_requests_get_clear_errors_and_keep_nothing(make_user, data_dir, write_report, settings):
    owner = make_user("ann")
    path = write_report("big.md", seed=2)
    settings.KD_MAX_UPLOAD_BYTES = 100
    with pytest.raises(services.DocumentError, match="upload limit"):
        services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False)
    settings.KD_MAX_UPLOAD_BYTES = 10**9
    with pytest.raises(services.DocumentError, match="Unknown metadata"):
        services.document_accept(uploader=owner, path=path, filename=path.name, metadata={"colour": "red"}, enqueue=False)
    with pytest.raises(services.DocumentError, match="not a date"):
        services.document_accept(uploader=owner, path=path, filename=path.name, metadata={"report_date": "June"}, enqueue=False)
    with pytest.raises(services.DocumentError, match="needs a group"):
        services.document_accept(uploader=owner, path=path, filename=path.name, visibility="group", enqueue=False)
    with pytest.raises(services.DocumentError, match="not a member"):
        services.document_accept(uploader=owner, path=path, filename=path.name, visibility="group",
                                 group=Group.objects.create(name="desk"), enqueue=False)
    with pytest.raises(services.DocumentError, match="Cannot read"):
        services.document_accept(uploader=owner, path=data_dir / "nope.pdf", filename="nope.pdf", enqueue=False)
    assert Document.objects.count() == 0
    originals = data_dir / "uploads" / "originals"
    assert not originals.exists() or not [p for p in originals.rglob("*") if p.is_file()]


def test_inline_pipeline_indexes_and_uploader_metadata_wins(make_user, data_dir, write_report, settings):
    owner = make_user("ann")
    path = write_report("ACME_2023Q2_REPORT.md", seed=3, paragraphs=12)
    doc = services.document_accept(uploader=owner, path=path, filename=path.name,
                                   metadata={"company": "Given Name Ltd", "title": "My title"}, enqueue=False).document
    doc = pipeline_run_inline(document_id=doc.pk)
    assert doc.status == Status.INDEXED, doc.status_reason
    assert doc.progress == 100 and doc.indexed_at is not None and doc.attempts == 1
    assert doc.company == "Given Name Ltd" and doc.title == "My title"
    chunks = list(doc.chunks.order_by("ordinal"))
    assert [c.ordinal for c in chunks] == list(range(len(chunks))) and chunks
    assert all(c.text.strip() and c.embed_model for c in chunks)
    vectors = np.stack([np.frombuffer(bytes(c.vector), dtype=np.float32) for c in chunks])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert "Paragraph 11 of report 3" in " ".join(c.text for c in chunks)
    assert doc.pages.count() >= 1 and doc.page_count >= 1
    assert {c.pk for c in chunks} <= _index_ids(settings)
    assert not storage.work_dir(document_id=doc.pk).exists()  # scratch removed once indexed


def test_failed_document_keeps_original_and_retry_works(make_user, data_dir, write_report):
    owner = make_user("ann")
    # A document that failed because its original went missing indexes after it is back and retried.
    path = write_report("later.md", seed=4)
    doc = services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False).document
    stored = storage.original_path(relative=doc.file)
    stored.rename(stored.with_suffix(".away"))
    doc = pipeline_run_inline(document_id=doc.pk)
    assert doc.status == Status.FAILED and "missing" in doc.status_reason
    with pytest.raises(services.DocumentError):
        services.document_reprocess(document=Document.objects.create(
            owner=owner, original_name="x", sha256="0" * 64, size=1, file="x", status=Status.EMBEDDING))
    stored.with_suffix(".away").rename(stored)
    services.document_retry(document=doc, enqueue=False)
    doc = pipeline_run_inline(document_id=doc.pk)
    assert doc.status == Status.INDEXED and doc.attempts == 2 and doc.status_reason == ""


def test_reprocess_and_delete_remove_old_vectors_from_the_index(
    make_user, data_dir, write_report, settings, django_capture_on_commit_callbacks
):
    owner = make_user("ann")
    path = write_report("a.md", seed=5, paragraphs=9)
    doc = services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False).document
    doc = pipeline_run_inline(document_id=doc.pk)
    old_ids = set(doc.chunks.values_list("pk", flat=True))
    assert old_ids and old_ids <= _index_ids(settings)

    services.document_reprocess(document=doc, enqueue=False)
    assert not Chunk.objects.filter(pk__in=old_ids).exists()
    doc = pipeline_run_inline(document_id=doc.pk)
    new_ids = set(doc.chunks.values_list("pk", flat=True))
    in_index = _index_ids(settings)
    assert doc.status == Status.INDEXED and new_ids <= in_index and not (old_ids & in_index)
    assert not IndexDeletion.objects.exists()

    stored = storage.original_path(relative=doc.file)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.document_delete(document=doc)
    for callback in callbacks:
        if callback.__name__ != "_deletions_enqueue":  # the index task runs below, in this process
            callback()
    assert index_deletions_run() == len(new_ids)
    assert not (new_ids & _index_ids(settings))
    assert not Document.objects.filter(pk=doc.pk).exists() and not stored.exists()


def test_paragraphs_repeated_across_documents_are_dropped_as_boilerplate(make_user, data_dir, write_report, report_text):
    from ingestion.clean import paragraph_fingerprint

    owner = make_user("ann")
    disclaimer = ("This document contains forward-looking statements within the meaning of the Private Securities "
                  "Litigation Reform Act; actual results may differ materially from those projected herein.")
    assert paragraph_fingerprint(disclaimer)
    docs = []
    for seed in range(4):
        text = report_text(seed=100 + seed, paragraphs=4) + "\n\n" + disclaimer + "\n"
        path = write_report(f"r{seed}.md", text)
        doc = services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False).document
        docs.append(pipeline_run_inline(document_id=doc.pk))
    assert all(d.status == Status.INDEXED for d in docs)
    texts = [" ".join(d.chunks.values_list("text", flat=True)) for d in docs]
    assert "forward-looking statements" in texts[0]  # seen once: still content
    assert "forward-looking statements" not in texts[3]  # seen in 3 documents before: boilerplate
    assert all(f"report {100 + i}" in t for i, t in enumerate(texts))


def test_metadata_set_by_hand_survives_reprocessing(make_user, data_dir, write_report):
    owner = make_user("ann")
    path = write_report("ACME_2023Q2_NOTE.md", seed=7)
    doc = pipeline_run_inline(document_id=services.document_accept(
        uploader=owner, path=path, filename=path.name, enqueue=False).document.pk)
    assert doc.status == Status.INDEXED
    doc = services.document_update_metadata(document=doc, metadata={"company": "Hand Set Co", "report_date": "2024-01-31"})
    assert doc.company == "Hand Set Co" and {"company", "report_date"} <= set(doc.given_fields)
    services.document_reprocess(document=doc, enqueue=False)
    doc = pipeline_run_inline(document_id=doc.pk)
    assert doc.status == Status.INDEXED and doc.company == "Hand Set Co" and str(doc.report_date) == "2024-01-31"
    doc = services.document_update_metadata(document=doc, metadata={"company": ""})
    assert doc.company == "" and "company" not in doc.given_fields
    with pytest.raises(services.DocumentError, match="not a date"):
        services.document_update_metadata(document=doc, metadata={"report_date": "soon"})


def test_embedding_a_long_document_goes_on_in_steps_when_the_budget_runs_out(make_user, data_dir, write_report, settings):
    from knowledge.documents.pipeline import STAGES, StageContinues, embed_run

    owner = make_user("ann")
    path = write_report("long.md", seed=8, paragraphs=40)
    doc = services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False).document
    for stage, run in STAGES[:3]:
        assert run(document_id=doc.pk), stage
    settings.KD_EMBED_BATCH = 4
    total = Chunk.objects.filter(document=doc).count()
    assert total > 2 * settings.KD_EMBED_BATCH  # several batches
    with pytest.raises(StageContinues):
        embed_run(document_id=doc.pk, budget_s=0.0)  # one batch, then out of time
    done = Chunk.objects.filter(document=doc, vector__isnull=False).count()
    assert 0 < done < total and Document.objects.get(pk=doc.pk).status == Status.EMBEDDING
    assert embed_run(document_id=doc.pk, budget_s=None)
    assert not Chunk.objects.filter(document=doc, vector__isnull=True).exists()
    assert Document.objects.get(pk=doc.pk).status == Status.INDEXING


def test_cut_off_json_fails_but_text_opening_with_a_bracket_reads(make_user, data_dir, write_report):
    from knowledge.documents.pipeline import StageError, partition_run

    owner = make_user("ann")
    cut = write_report("export.txt", '{\n  "company": "Acme",\n  "revenue": [1, 2,\n')
    doc = services.document_accept(uploader=owner, path=cut, filename=cut.name, enqueue=False).document
    with pytest.raises(StageError, match="cut off"):
        partition_run(document_id=doc.pk)
    for name, text in [("links.md", "[Home](index.html) quarterly notes on revenue.\n"),
                       ("notes.txt", "[1] Revenue grew in the quarter.\n")]:
        path = write_report(name, text)
        doc = services.document_accept(uploader=owner, path=path, filename=name, enqueue=False).document
        assert partition_run(document_id=doc.pk)
        assert Document.objects.get(pk=doc.pk).status == Status.CLEANING
