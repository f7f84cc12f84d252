"""Task names, queue names and lock keys: the one place they are spelled."""

QUEUE_INGEST = "ingest"  # partition, clean, chunk
QUEUE_EMBED = "embed"  # batched embeddings through modelcore
QUEUE_INDEX = "index"  # the single writer of FAISS + BM25
QUEUE_GENERATE = "generate"  # report drafting through the in-process Engine
ALL_QUEUES = (QUEUE_INGEST, QUEUE_EMBED, QUEUE_INDEX, QUEUE_GENERATE)

# Document pipeline tasks (knowledge.documents.tasks), one per stage.
TASK_PARTITION = "documents.partition"
TASK_CLEAN = "documents.clean"
TASK_CHUNK = "documents.chunk"
TASK_EMBED = "documents.embed"
TASK_INDEX = "documents.index"
TASK_INDEX_DELETE = "documents.index_delete"
TASK_RESUME_STALLED = "documents.resume_stalled"  # housekeeping, for the beat schedule

# Report tasks (knowledge.reports.tasks).
TASK_REPORT_DRAFT = "reports.draft"
TASK_REPORT_SCHEDULED = "reports.run_schedule"
TASK_QUEUES = {
    TASK_PARTITION: QUEUE_INGEST,
    TASK_CLEAN: QUEUE_INGEST,
    TASK_CHUNK: QUEUE_INGEST,
    TASK_EMBED: QUEUE_EMBED,
    TASK_INDEX: QUEUE_INDEX,
    TASK_INDEX_DELETE: QUEUE_INDEX,
    TASK_RESUME_STALLED: QUEUE_INGEST,
    TASK_REPORT_DRAFT: QUEUE_GENERATE,
    TASK_REPORT_SCHEDULED: QUEUE_GENERATE,
}

# Locks: the one index writer holds an fcntl lock on INDEX_DIR/.lock (ingestion.index.IndexWriter);
# paragraph fingerprint counts need none (atomic F() updates in the DB).
