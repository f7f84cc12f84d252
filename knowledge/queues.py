"""Task names, queue names and lock keys: the one place they are spelled."""

QUEUE_INGEST = "ingest"  # partition, clean, chunk
QUEUE_EMBED = "embed"  # batched embeddings through modelcore
QUEUE_INDEX = "index"  # the single writer of FAISS + BM25
QUEUE_GENERATE = "generate"  # report drafting through the in-process Engine
ALL_QUEUES = (QUEUE_INGEST, QUEUE_EMBED, QUEUE_INDEX, QUEUE_GENERATE)
