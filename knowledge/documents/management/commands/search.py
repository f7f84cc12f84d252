"""manage.py search "query" : ranked chunks through the same retrieval service as the portal."""
from __future__ import annotations

import json
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from knowledge.documents.retrieval import retrieve


def pages(start: int | None, end: int | None) -> str:
    if start is None:
        return "-"
    return f"p. {start}" if end in (None, start) else f"pp. {start}-{end}"


class Command(BaseCommand):
    help = "Search the indexed documents as a user sees them."

    def add_arguments(self, parser):
        parser.add_argument("query", nargs="?", default=None)
        parser.add_argument("--k", type=int, default=8)
        parser.add_argument("--as", dest="username", help="whose view (default: the first superuser)")
        parser.add_argument("--json", action="store_true", help="JSON lines instead of text")
        parser.add_argument("--queries", help="file of queries, one a line")
        parser.add_argument("--company")
        parser.add_argument("--doc-type", dest="doc_type")
        parser.add_argument("--language")
        parser.add_argument("--date-from", dest="date_from")
        parser.add_argument("--date-to", dest="date_to")

    def handle(self, *args, **opts):
        User = get_user_model()
        if opts["username"]:
            user = User.objects.filter(username=opts["username"]).first()
            if user is None:
                raise CommandError(f"No user named {opts['username']!r}.")
        else:
            user = User.objects.filter(is_superuser=True).order_by("pk").first()
            if user is None:
                raise CommandError("No user to search as: pass --as USER or create an admin.")
        queries: list[str] = []
        if opts["query"]:
            queries.append(opts["query"])
        if opts["queries"]:
            try:
                queries += [q.strip() for q in Path(opts["queries"]).read_text(encoding="utf-8").splitlines() if q.strip()]
            except OSError as exc:
                raise CommandError(f"Cannot read {opts['queries']}: {exc.strerror or exc}") from None
        if not queries:
            raise CommandError("Give a query or --queries FILE.")
        filters = {k: opts[k] for k in ("company", "doc_type", "language", "date_from", "date_to") if opts[k]}
        for query in queries:
            try:
                hits = retrieve(query=query, user=user, k=opts["k"], filters=filters or None)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            if not opts["json"]:
                self.stdout.write(f"== {query}" + ("" if hits else "\n(no results)"))
            for rank, h in enumerate(hits, 1):
                if opts["json"]:
                    self.stdout.write(json.dumps({
                        "query": query, "rank": rank, "score": round(h.score, 6), "document_id": h.document_id,
                        "chunk_id": h.chunk_id, "title": h.title, "original_name": h.original_name,
                        "page_start": h.page_start, "page_end": h.page_end, "heading_path": h.heading_path, "text": h.text,
                    }, ensure_ascii=False))
                else:
                    heading = " > ".join(h.heading_path)
                    snippet = " ".join(h.text.split())[:300]
                    self.stdout.write(f"{rank:>2}. {h.score:.4f}  {h.title} [{h.original_name}, {pages(h.page_start, h.page_end)}]"
                                      + (f"  § {heading}" if heading else "") + f"\n    {snippet}")
