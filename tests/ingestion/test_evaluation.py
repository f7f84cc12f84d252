"""Retrieval metrics on hand-built cases, dataset loading, and a small real run of manage.py evaluate_retrieval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from ingestion.evaluation import load_cmrc, load_tatqa, mrr_at, ndcg_at, recall_at, score, table_text


def test_metrics_on_a_hand_built_case() -> None:
    gold = frozenset({7, 9})
    ranked = [3, 7, 5, 1, 2, 9, 4]  # gold at ranks 2 and 6
    assert recall_at(ranked, gold, 5) == 0.5
    assert recall_at(ranked, gold, 6) == 1.0
    assert mrr_at(ranked, gold, 10) == 0.5
    assert mrr_at(ranked, gold, 1) == 0.0
    dcg = 1 / math.log2(3) + 1 / math.log2(7)
    ideal = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at(ranked, gold, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at([9, 7], gold, 10) == pytest.approx(1.0)
    assert ndcg_at([], gold, 10) == 0.0
    # means over queries, one perfect and one miss
    m = score([[1, 2], [5, 6]], [frozenset({1}), frozenset({9})])
    assert m == {"recall@5": 0.5, "mrr@10": 0.5, "ndcg@10": 0.5}


def test_tatqa_pools_paragraphs_and_tables_with_gold_of_own_context(shared_dir: Path) -> None:
    ds = load_tatqa(shared_dir / "eval/tatqa/tatqa_dataset_dev.json", limit=3)
    raw = json.loads((shared_dir / "eval/tatqa/tatqa_dataset_dev.json").read_text())[:3]
    assert len(ds.passages) == sum(len(c["paragraphs"]) + 1 for c in raw)
    assert len(ds.queries) == sum(1 for c in raw for q in c["questions"] if q["rel_paragraphs"])
    first = raw[0]
    q0 = next(q for q in ds.queries if q.qid == first["questions"][0]["uid"])
    want = {p["text"] for p in first["paragraphs"] if str(p["order"]) in first["questions"][0]["rel_paragraphs"]}
    assert {ds.passages[i] for i in q0.gold} == want
    assert table_text([["", "2019", ""], ["Total sales", "$1,496.5", " "]]) == "2019\nTotal sales | $1,496.5"
    assert "Total sales | $1,496.5 | $1,202.9 | $1,107.7" in ds.passages[0]


def test_cmrc_gold_is_the_questions_own_context(shared_dir: Path) -> None:
    ds = load_cmrc(shared_dir / "eval/cmrc2018", limit=4)
    assert len(ds.passages) == 4
    raw = json.loads((shared_dir / "eval/cmrc2018/queries.json").read_text())["queries"]
    for q in ds.queries:
        (gold,) = q.gold
        assert ds.passages[gold] == next(r["context"] for r in raw if r["id"] == q.qid)


def test_evaluate_retrieval_command_small_real_run(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "eval.json"
    call_command("evaluate_retrieval", "--limit", "2", "--embedders", "minilm", "--out", str(out), "--no-cache",
                 "--shared", str(shared_dir))
    res = json.loads(out.read_text())
    assert set(res["datasets"]) == {"tatqa", "cmrc2018"}
    for ds in res["datasets"].values():
        assert ds["queries"] > 0 and ds["passages"] > 0
        for m in [ds["bm25"], ds["dense"]["minilm"], ds["hybrid"]["minilm"], ds["hybrid_equal"]["minilm"]]:
            assert set(m) == {"recall@5", "mrr@10", "ndcg@10"} and all(0.0 <= v <= 1.0 for v in m.values())
    # Two Chinese passages: a BM25 search by the question nearly always lands on its own passage.
    assert res["datasets"]["cmrc2018"]["bm25"]["mrr@10"] > 0.8
    assert res["best_embedder_by_hybrid_ndcg"] == "minilm" and res["default_embedder"] == "minilm"
    assert res["embedders"]["minilm"]["passages_per_cpu_s"] > 0
    assert "| cmrc2018 | hybrid | minilm |" in out.with_suffix(".md").read_text()
    # MiniLM's model card covers English only: Chinese questions rank by BM25 (dense only fills in after it).
    assert res["embedders"]["minilm"]["languages"] == ["en"]
    assert res["datasets"]["cmrc2018"]["hybrid"]["minilm"]["mrr@10"] >= res["datasets"]["cmrc2018"]["bm25"]["mrr@10"]


def test_evaluate_retrieval_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="--limit"):
        call_command("evaluate_retrieval", "--limit", "0", "--out", str(tmp_path / "x.json"))
    with pytest.raises(CommandError, match="not found"):
        call_command("evaluate_retrieval", "--shared", str(tmp_path), "--out", str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_multilingual_e5_candidate_matches_chinese_question_to_its_passage() -> None:
    from ingestion.evaluation import load_candidate

    cand = load_candidate("multilingual-e5-small")
    passages = ["公司2019年营业收入增长了百分之十，净利润创历史新高。", "今天上海天气晴朗，适合户外运动。", "该球队在联赛中获得了冠军。"]
    p = cand.passages(passages)
    q = cand.queries(["公司的营业收入增长了多少？", "哪支球队赢得了冠军？"])
    assert p.shape == (3, cand.dim) and q.shape == (2, cand.dim)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-3)
    assert (q @ p.T).argmax(axis=1).tolist() == [0, 2]
    with pytest.raises(ValueError, match="unknown embedder"):
        load_candidate("word2vec")


def test_default_is_the_fastest_of_the_embedders_close_to_the_best() -> None:
    from ingestion.evaluation import best_by_quality, pick_default

    def res(a: float, b: float, speed_a: float, speed_b: float) -> dict:
        ndcg = lambda v: {"ndcg@10": v}  # noqa: E731
        return {"embedders": {"a": {"passages_per_cpu_s": speed_a}, "b": {"passages_per_cpu_s": speed_b}},
                "datasets": {"x": {"hybrid": {"a": ndcg(a), "b": ndcg(b)}}}}

    assert pick_default(res(0.730, 0.735, 30.0, 5.0)) == "a"  # within 0.01: the faster one
    assert best_by_quality(res(0.730, 0.735, 30.0, 5.0)) == "b"
    assert pick_default(res(0.700, 0.735, 30.0, 5.0)) == "b"  # clearly better quality wins
