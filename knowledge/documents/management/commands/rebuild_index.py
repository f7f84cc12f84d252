"""manage.py rebuild_index : rebuild FAISS + BM25 from the vectors stored in the database."""
from __future__ import annotations

import time

from django.core.management.base import BaseCommand

from knowledge.documents.pipeline import index_rebuild


class Command(BaseCommand):
    help = "Rebuild the search indexes from the database (the source of truth)."

    def handle(self, *args, **opts):
        start = time.monotonic()
        count = index_rebuild()
        self.stdout.write(f"rebuilt the index: {count} chunks in {time.monotonic() - start:.1f} s")
