"""manage.py ingest / search / rebuild_index on a fresh data folder with no workers up (in-process pipeline)."""
from __future__ import annotations

import io
import json
import shutil

import pytest
from django.core.management import CommandError, call_command

from knowledge.documents.models import Chunk, Document, Status

pytestmark = pytest.mark.django_db


def _call(*args, **kwargs) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **kwargs)
    return out.getvalue()


def test_ingest_search_and_rebuild(make_user, data_dir, write_report, shared_dir, tmp_path):
    admin = make_user("admin", superuser=True)
    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    first = write_report("alpha.md", seed=11, paragraphs=8)
    shutil.copy(first, folder / "alpha.md")
    shutil.copy(first, folder / "sub" / "alpha-copy.md")  # same bytes: a duplicate
    shutil.copy(write_report("beta.md", seed=12, paragraphs=8), folder / "sub" / "beta.md")
    shutil.copy(shared_dir / "corpus" / "bad" / "empty.txt", folder / "empty.txt")

    out = _call("ingest", str(folder), str(tmp_path / "missing.pdf"), "--visibility", "firm")
    lines = out.strip().splitlines()
    assert lines[-1] == "2 indexed, 1 duplicate, 2 failed", out
    by_name = {line.split(": ", 1)[0].rsplit("/", 1)[-1]: line.split(": ", 1)[1] for line in lines[:-1]}
    alpha = Document.objects.get(original_name="alpha.md")
    assert by_name["alpha.md"].startswith(f"indexed as document {alpha.pk}")
    assert by_name["alpha-copy.md"] == f'duplicate of document {alpha.pk} "{alpha.title}"'
    assert by_name["empty.txt"].startswith("failed: ") and len(by_name["empty.txt"]) > 25
    assert by_name["missing.pdf"] == "failed: no such file or folder"
    assert Document.objects.filter(status=Status.INDEXED).count() == 2
    assert all(d.owner == admin and d.visibility == "firm" for d in Document.objects.all())

    query = "Paragraph 3 of report 12"
    rows = [json.loads(line) for line in _call("search", query, "--k", "3", "--json").splitlines()]
    assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"query", "rank", "score", "document_id", "original_name", "page_start", "page_end",
                            "heading_path", "text"}
    assert rows[0]["original_name"] == "beta.md" and "report 12" in rows[0]["text"]
    text = _call("search", query, "--k", "2")
    assert text.startswith(f"== {query}") and "beta.md" in text

    queries = tmp_path / "queries.txt"
    queries.write_text("Paragraph 3 of report 11\n\nParagraph 5 of report 12\n")
    rows = [json.loads(line) for line in _call("search", "--queries", str(queries), "--k", "1", "--json").splitlines()]
    assert [(r["query"], r["original_name"]) for r in rows] == [
        ("Paragraph 3 of report 11", "alpha.md"), ("Paragraph 5 of report 12", "beta.md")]

    shutil.rmtree(data_dir / "index")  # derived data: the DB rebuilds it
    out = _call("rebuild_index")
    assert f"{Chunk.objects.count()} chunks" in out
    rows = [json.loads(line) for line in _call("search", query, "--k", "1", "--json").splitlines()]
    assert rows[0]["original_name"] == "beta.md"


def test_commands_that_cannot_run_say_why(make_user, data_dir, tmp_path):
    with pytest.raises(CommandError, match="No user to own"):
        _call("ingest", str(tmp_path))
    make_user("ann")
    with pytest.raises(CommandError, match="No user named 'bob'"):
        _call("ingest", str(tmp_path), "--as", "bob")
    with pytest.raises(CommandError, match="Give a query"):
        _call("search", "--as", "ann")
    with pytest.raises(CommandError, match="empty"):
        _call("search", "  ", "--as", "ann")
