"""Answer quality on TAT-QA (dev): accuracy, citation precision and the "not in your documents" rate.

Each TAT-QA context (a table and its paragraphs from a financial report) becomes one text document of
one user, ingested through the real pipeline into a fresh data folder. Questions of the ingested
contexts are asked through ``answer_compose`` (the same function the portal and API use):

- accuracy: the gold answer (span text, or the number for arithmetic/count questions) occurs in the answer;
- citation precision: share of citations that point to the question's own context document;
- not-found rate on answerable questions (should be low) and on held-out questions whose context was NOT
  ingested (should be high: the documents don't contain the answer).

    .venv/bin/python benchmarks/answer_quality.py --contexts 30 --questions 2 [--model]
Saves benchmarks/results/answer_quality[_model].json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TATQA = ROOT.parent / "shared" / "eval" / "tatqa" / "tatqa_dataset_dev.json"


def context_text(ctx: dict) -> str:
    rows = [" | ".join(c.strip() for c in row if c.strip()) for row in ctx["table"]["table"]]
    paras = [p["text"] for p in sorted(ctx["paragraphs"], key=lambda p: p["order"])]
    return "\n".join(r for r in rows if r) + "\n\n" + "\n\n".join(paras)


def norm(s: str) -> str:
    return re.sub(r"[\s,$%()]+", " ", str(s).lower()).strip()


def number_forms(x) -> set[str]:
    try:
        v = float(str(x).replace(",", ""))
    except ValueError:
        return {norm(x)}
    forms = {f"{v:.2f}", f"{v:.1f}", f"{v:.0f}", f"{v:,.2f}", f"{v:,.1f}", f"{v:,.0f}", str(x)}
    return {norm(f) for f in forms}


def correct(answer: str, gold, answer_type: str) -> bool:
    text = norm(answer)
    golds = gold if isinstance(gold, list) else [gold]
    if answer_type in ("span", "multi-span"):
        return all(norm(g) in text for g in golds)
    return any(any(f in text for f in number_forms(g)) for g in golds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=30, help="contexts ingested")
    ap.add_argument("--questions", type=int, default=2, help="questions asked per ingested context")
    ap.add_argument("--held-out", type=int, default=20, help="questions from contexts that were not ingested")
    ap.add_argument("--model", action="store_true", help="generate with the Engine (default: extractive answers)")
    ap.add_argument("--warm-embedder", action="store_true",
                    help="load the embedder before any ingestion import (works around the import-order bug in the report)")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="kd-answer-quality-"))
    os.environ["KD_DATA_DIR"] = str(data_dir)
    os.environ["DATABASE_URL"] = f"sqlite:///{data_dir / 'db.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "knowledge.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    if args.warm_embedder:
        from modelcore import load_embedder

        load_embedder()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from knowledge.documents.runner import pipeline_run_inline
    from knowledge.documents.services import document_accept
    from knowledge.portal.answering import answer_compose

    settings.KD_ANSWER_WITH_MODEL = args.model
    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench")
    contexts = json.loads(TATQA.read_text())
    ingested, held = contexts[: args.contexts], contexts[args.contexts : args.contexts + args.held_out]
    t0 = time.time()
    doc_of: dict[str, int] = {}
    for i, ctx in enumerate(ingested):
        path = data_dir / f"tatqa_{i:03d}.txt"
        path.write_text(context_text(ctx))
        doc = document_accept(uploader=user, path=path, filename=path.name, enqueue=False).document
        doc = pipeline_run_inline(document_id=doc.pk)
        assert doc.status == "indexed", doc.status_reason
        doc_of[ctx["table"]["uid"]] = doc.pk
    ingest_s = time.time() - t0

    rows, latencies = [], []
    asked = [(ctx, q) for ctx in ingested for q in ctx["questions"][: args.questions]]
    for ctx, q in asked:
        t = time.time()
        ans = answer_compose(user=user, question=q["question"])
        latencies.append(time.time() - t)
        own = doc_of[ctx["table"]["uid"]]
        rows.append({"type": q["answer_type"], "correct": correct(ans.text, q["answer"], q["answer_type"]),
                     "not_found": ans.not_found, "citations": len(ans.citations),
                     "own_citations": sum(c["document_id"] == own for c in ans.citations)})
    held_rows = []
    for ctx in held:
        q = ctx["questions"][0]
        held_rows.append(answer_compose(user=user, question=q["question"]).not_found)

    n_cit = sum(r["citations"] for r in rows)
    by_type = {}
    for t in sorted({r["type"] for r in rows}):
        sub = [r for r in rows if r["type"] == t]
        by_type[t] = {"n": len(sub), "accuracy": round(sum(r["correct"] for r in sub) / len(sub), 3)}
    result = {
        "dataset": "TAT-QA dev", "mode": "model (Engine, guarded)" if args.model else "extractive (no model)",
        "contexts_ingested": len(ingested), "questions": len(rows), "held_out_questions": len(held_rows),
        "accuracy": round(sum(r["correct"] for r in rows) / len(rows), 3),
        "accuracy_by_type": by_type,
        "citation_precision": round(sum(r["own_citations"] for r in rows) / n_cit, 3) if n_cit else None,
        "answers_with_citation": round(sum(r["citations"] > 0 for r in rows) / len(rows), 3),
        "not_found_rate_answerable": round(sum(r["not_found"] for r in rows) / len(rows), 3),
        "not_found_rate_held_out": round(sum(held_rows) / len(held_rows), 3) if held_rows else None,
        "answer_latency_s_p50": round(statistics.median(latencies), 3),
        "ingest_seconds": round(ingest_s, 1),
        "command": "benchmarks/answer_quality.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    name = "answer_quality" + ("_model" if args.model else "") + ("_warm" if args.warm_embedder else "")
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
