"""Language-aware reciprocal rank fusion."""
from __future__ import annotations

from pathlib import Path

import pytest

from ingestion.fusion import hybrid_weights, query_language, rrf


def test_query_language_detects_chinese_by_share_of_letters() -> None:
    assert query_language("苹果公司2023年第三季度的营收是多少？") == "zh"
    assert query_language("What was 营业收入 in 2023?") == "zh"  # 4 of 13 letters
    assert query_language("What was Apple's revenue in 2023 Q3?") == "other"
    assert query_language("Was ist der Umsatz?") == "other"
    assert query_language("2023 12.5%") == "other"


def test_dense_counts_only_where_the_embedder_reads_the_language() -> None:
    assert hybrid_weights("公司的营业收入增长了多少？", languages=frozenset({"en"})) == (0.0, 1.0)
    assert hybrid_weights("公司的营业收入增长了多少？", languages=None) == (1.0, 1.0)  # multilingual
    assert hybrid_weights("公司的营业收入增长了多少？", languages=frozenset({"zh", "en"})) == (1.0, 1.0)
    assert hybrid_weights("How much did revenue grow?", languages=frozenset({"en"})) == (1.0, 1.0)


def test_zero_weighted_list_only_fills_in_after_the_others() -> None:
    dense = [(7, 0.9), (3, 0.8), (9, 0.7)]
    bm25 = [(3, 12.0), (5, 9.0)]
    assert [i for i, _ in rrf([dense, bm25], k=60, weights=[0.0, 1.0])] == [3, 5, 7, 9]
    assert [i for i, _ in rrf([dense, bm25], k=60)] == [3, 7, 5, 9]
    fused = dict(rrf([dense, bm25], k=60, weights=[0.0, 1.0]))
    assert fused[3] == pytest.approx(1 / 61) and fused[7] == 0.0
    with pytest.raises(ValueError, match="weights"):
        rrf([dense, bm25], weights=[1.0])


def test_model_card_languages(tmp_path: Path) -> None:
    from modelcore import load_embedder
    from modelcore.embed import model_card_languages

    assert load_embedder().languages == frozenset({"en"})  # all-MiniLM-L6-v2's card says "language: en"
    (tmp_path / "README.md").write_text("---\nlanguage:\n- multilingual\n- zh\n- en\nlicense: mit\n---\n# e5\n")
    assert model_card_languages(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlanguage:\n- zh\n- en\ntags:\n- x\n---\n")
    assert model_card_languages(tmp_path) == frozenset({"zh", "en"})
    (tmp_path / "README.md").write_text("# no front matter\nlanguage: en\n")
    assert model_card_languages(tmp_path) is None
