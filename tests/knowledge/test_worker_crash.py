"""A worker SIGKILLed in the middle of embedding a document: after a restart the document completes, exactly once."""
from __future__ import annotations

import time

import numpy as np
import pytest

from knowledge.documents import services
from knowledge.documents.models import Chunk, Document, Status
from knowledge.documents.pipeline import chunk_plan

from conftest import REDIS_URL, Worker, celery_broker, data_settings, redis_flush, report_text, wait_for

pytestmark = pytest.mark.slow
BATCH = 6  # chunks embedded and saved per step in this test's workers


def test_sigkill_during_embed_then_restart_finishes_with_the_same_chunks(
    transactional_db, django_db_blocker, settings, make_user, tmp_path, write_report
):
    from ingestion.clean import clean_elements
    from ingestion.index import IndexReader
    from ingestion.partition import partition_file

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_settings(settings, data_dir)
    owner = make_user("ann")
    path = write_report("long.md", report_text(seed=42, paragraphs=100, title="Long annual report"))
    # What a clean run gives: the same stage functions, no crash.
    expected = chunk_plan(elements=clean_elements(partition_file(path)[0]))
    assert len(expected) > 3 * BATCH, len(expected)  # several embed batches, so there is a middle to die in, so there is a middle to die in

    redis_flush(REDIS_URL)
    first = Worker(data_dir=data_dir, broker_url=REDIS_URL, env={"KD_EMBED_BATCH": str(BATCH)}).start()
    second = None
    try:
        with celery_broker(REDIS_URL):
            doc = services.document_accept(uploader=owner, path=path, filename=path.name).document

        def half_embedded():
            d = Document.objects.get(pk=doc.pk)
            done = Chunk.objects.filter(document=doc, vector__isnull=False).count()
            return d.status == Status.EMBEDDING and 0 < done < len(expected)

        wait_for(half_embedded, timeout=240, interval=0.1, what="the embed stage to be half way", worker=first)
        first.kill()
        killed_at = time.monotonic()
        partial = Chunk.objects.filter(document=doc, vector__isnull=False).count()
        assert Document.objects.get(pk=doc.pk).status == Status.EMBEDDING
        assert 0 < partial < len(expected)

        # The broker hands the unacknowledged task back once its visibility timeout (8 s here) has passed.
        time.sleep(max(0.0, 9 - (time.monotonic() - killed_at)))
        # The second worker also hands embedding on to a fresh task after every batch (the path very long documents take).
        second = Worker(data_dir=data_dir, broker_url=REDIS_URL,
                        env={"KD_EMBED_BATCH": str(BATCH), "KD_EMBED_TASK_BUDGET_S": "0"}).start()
        wait_for(lambda: Document.objects.get(pk=doc.pk).status in (Status.INDEXED, Status.FAILED), timeout=300,
                 what="the document to finish after the restart", worker=second)
        doc.refresh_from_db()
        assert doc.status == Status.INDEXED, doc.status_reason
        chunks = list(Chunk.objects.filter(document=doc).order_by("ordinal"))
        assert [c.ordinal for c in chunks] == list(range(len(expected)))
        assert [c.text for c in chunks] == [c.text for c in expected]
        vectors = np.stack([np.frombuffer(bytes(c.vector), dtype=np.float32) for c in chunks])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        snap = IndexReader(data_dir / "index")._snapshot()
        live = sorted(int(i) for i in snap.row_ids if i >= 0)
        assert live == sorted(c.pk for c in chunks)  # every chunk once, nothing else
        embed_tasks = second.log.read_text().count("documents.embed[")
        assert embed_tasks >= 2 * 2, second.tail()  # received + succeeded lines: at least two embed tasks ran
    finally:
        first.kill()
        if second is not None:
            second.stop()
        redis_flush(REDIS_URL)
