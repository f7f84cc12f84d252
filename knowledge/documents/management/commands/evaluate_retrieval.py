"""manage.py evaluate_retrieval: recall@5 / MRR@10 / nDCG@10 of dense, BM25 and hybrid retrieval on TAT-QA and CMRC 2018."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ingestion.evaluation import CANDIDATES, LOADERS, markdown, run_evaluation


class Command(BaseCommand):
    help = "Evaluate retrieval (dense per embedder, BM25, hybrid RRF) on the shared eval sets; writes JSON + markdown."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--limit", type=int, default=None, help="use only the first N contexts of each dataset")
        parser.add_argument("--embedders", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
        parser.add_argument("--datasets", nargs="+", default=list(LOADERS), choices=list(LOADERS))
        parser.add_argument("--shared", type=Path, default=settings.BASE_DIR.parent / "shared", help="folder holding eval/")
        parser.add_argument("--out", type=Path, default=settings.BASE_DIR / "benchmarks/results/retrieval_eval.json")
        parser.add_argument("--no-cache", action="store_true", help="re-embed instead of reusing DATA_DIR/cache/retrieval_eval")

    def handle(self, *args, limit, embedders, datasets, shared, out, no_cache, **options) -> None:
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1")
        if not (shared / "eval").is_dir():
            raise CommandError(f"{shared / 'eval'} not found: pass --shared to the folder holding eval/tatqa and eval/cmrc2018")
        cache = None if no_cache else settings.DATA_DIR / "cache" / "retrieval_eval"
        results = run_evaluation(
            shared_dir=shared, datasets=datasets, embedders=embedders, limit=limit, cache_dir=cache, log=self.stdout.write
        )
        results["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        argv = (["--limit", str(limit)] if limit else []) + ["--embedders", *embedders, "--datasets", *datasets]
        results["command"] = "python manage.py evaluate_retrieval " + " ".join(argv)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        table = markdown(results)
        speeds = "\n".join(f"- {n}: {e.get('passages_per_cpu_s')} passages per CPU-second" for n, e in results["embedders"].items())
        out.with_suffix(".md").write_text(
            f"# Retrieval evaluation\n\n`{results['command']}`\n\n{table}\n"
            f"Embedding speed ({results['speed_probe']}):\n{speeds}\n\n"
            f"Best embedder by mean hybrid nDCG@10: {results['best_embedder_by_hybrid_ndcg']}\n"
            f"Default by the rule ({results['default_rule']}): {results['default_embedder']}\n")
        self.stdout.write(table)
        self.stdout.write(f"saved {out} and {out.with_suffix('.md')}")
