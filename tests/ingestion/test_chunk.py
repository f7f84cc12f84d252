"""Chunking to the embedding tokenizer's budget: sections, overlap, tables, Chinese sentences."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ingestion.chunk import chunk_elements, is_additive, split_sentences
from ingestion.clean import clean_elements, clean_text
from ingestion.elements import Element
from ingestion.partition import partition_file

Count = Callable[[str], int]
_END = "。！？；"


def test_apple_chunks_respect_budget_and_keep_everything(corpus: Path, count_tokens: Count) -> None:
    cleaned = clean_elements(partition_file(corpus / "financial" / "APPLE_2023Q3_10Q.pdf")[0])
    chunks = chunk_elements(cleaned, count_tokens=count_tokens, max_tokens=256, overlap_tokens=32)
    assert len(chunks) > 30
    for c in chunks:
        assert 0 < c.token_count <= 256 and c.token_count == count_tokens(c.text)
        assert 1 <= c.page_start <= c.page_end <= 29
        assert c.element_types and c.heading_path
    joined = "\n".join(c.text for c in chunks)
    for el in cleaned:
        if el.type == "Table":
            continue
        for sentence in split_sentences(el.text):
            if count_tokens(sentence) <= 256:
                assert sentence in joined, sentence
    # chunk pages agree with the pages of the elements they contain
    first_statement = next(c for c in chunks if "Total net sales 81,797" in c.text)
    assert first_statement.page_start == 4


def test_overlap_repeats_whole_sentences(count_tokens: Count) -> None:
    sentences = [f"Revenue in region {i} grew by {i + 3} percent on higher volumes." for i in range(40)]
    elements = [Element(text="Regional results", type="Title", page=1, level=0),
                Element(text=" ".join(sentences), type="NarrativeText", page=1)]
    chunks = chunk_elements(elements, count_tokens=count_tokens, max_tokens=64, overlap_tokens=24)
    assert len(chunks) > 5
    for prev, nxt in zip(chunks, chunks[1:]):
        carried = split_sentences(nxt.text.splitlines()[0])[0]
        assert carried in prev.text  # the next chunk starts with the previous one's last sentence(s)
        assert count_tokens(carried) <= 24
    no_overlap = chunk_elements(elements, count_tokens=count_tokens, max_tokens=64, overlap_tokens=0)
    assert sum(len(split_sentences(ln)) for c in no_overlap for ln in c.text.splitlines()) == 41  # title + 40, each once


def _body(topic: str) -> str:
    return " ".join(f"{topic} fact number {i} is reported with supporting detail here." for i in range(8))


def test_sections_give_heading_paths(count_tokens: Count) -> None:
    elements = [
        Element(text="Part I", type="Title", page=1, level=0),
        Element(text="Item 2. Management's Discussion", type="Title", page=1, level=1),
        Element(text=_body("Sales"), type="NarrativeText", page=1),
        Element(text="Liquidity", type="Title", page=2, level=2),
        Element(text=_body("Cash"), type="NarrativeText", page=2),
        Element(text="Item 3. Market Risk", type="Title", page=3, level=1),
        Element(text=_body("Rates"), type="NarrativeText", page=3),
    ]
    chunks = chunk_elements(elements, count_tokens=count_tokens, max_tokens=256)
    paths = {c.text.splitlines()[-1].split()[0]: c.heading_path for c in chunks}
    assert paths["Sales"] == ["Part I", "Item 2. Management's Discussion"]
    assert paths["Cash"] == ["Part I", "Item 2. Management's Discussion", "Liquidity"]
    assert paths["Rates"] == ["Part I", "Item 3. Market Risk"]
    assert [c.page_start for c in chunks] == [1, 2, 3] and all(c.page_start == c.page_end for c in chunks)


def test_tiny_sections_share_a_chunk(count_tokens: Count) -> None:
    elements = [
        Element(text="Revenue", type="Title", page=1, level=1),
        Element(text="Up 5%.", type="NarrativeText", page=1),
        Element(text="Margin", type="Title", page=1, level=1),
        Element(text="Down 1%.", type="NarrativeText", page=1),
    ]
    (chunk,) = chunk_elements(elements, count_tokens=count_tokens, max_tokens=256)
    assert chunk.text == "Revenue\nUp 5%.\nMargin\nDown 1%." and chunk.heading_path == ["Revenue"]


def _table(rows: int) -> Element:
    body = "".join(f"<tr><td>Segment {i}</td><td>{1000 + i:,}</td><td>{i % 7}.{i % 10}%</td></tr>" for i in range(rows))
    html = f"<table><tr><th>Segment</th><th>Revenue</th><th>Growth</th></tr>{body}</table>"
    text = "Segment Revenue Growth\n" + "\n".join(f"Segment {i} {1000 + i:,} {i % 7}.{i % 10}%" for i in range(rows))
    return Element(text=text, type="Table", page=5, html=html)


def test_small_table_stays_whole(count_tokens: Count) -> None:
    elements = [Element(text="Some intro text before the table.", type="NarrativeText", page=5), _table(5)]
    chunks = chunk_elements(elements, count_tokens=count_tokens, max_tokens=256)
    holders = [c for c in chunks if "Segment 0 | 1,000" in c.text]
    assert len(holders) == 1 and all(f"Segment {i} |" in holders[0].text for i in range(5))


def test_large_table_split_repeats_header(count_tokens: Count) -> None:
    chunks = chunk_elements([_table(120)], count_tokens=count_tokens, max_tokens=128, overlap_tokens=16)
    assert len(chunks) > 3
    for c in chunks:
        assert c.text.splitlines()[0] == "Segment | Revenue | Growth"
        assert c.token_count <= 128 and c.element_types == ["Table"]
    rows = [ln for c in chunks for ln in c.text.splitlines()[1:]]
    assert rows == [f"Segment {i} | {1000 + i:,} | {i % 7}.{i % 10}%" for i in range(120)]  # each row once, in order


def test_docx_tables_chunked_whole(corpus: Path, count_tokens: Count) -> None:
    cleaned = clean_elements(partition_file(corpus / "formats" / "docx-tables.docx")[0])
    tables = [e for e in cleaned if e.type == "Table"]
    chunks = chunk_elements(cleaned, count_tokens=count_tokens)
    for t in tables:
        first_row = t.html and re.search(r"<td>(.*?)</td>", t.html).group(1)
        assert first_row and sum(first_row in c.text for c in chunks) >= 1


def _chinese_passages(cmrc_passages: list[str], n: int, count_tokens: Count) -> list[str]:
    """Passages whose every sentence fits one chunk, so every chunk must end on 。！？；."""
    picked = []
    for p in cmrc_passages:
        sents = split_sentences(p)
        if len(p) > 300 and p[-1] in _END and all(count_tokens(s) <= 70 for s in sents) and not re.search(r"[A-Za-z]{3}|[\uac00-\ud7af\u3040-\u30ff]", p):
            picked.append(p)
        if len(picked) == n:
            break
    assert len(picked) == n
    return picked


def _assert_chinese_chunks(chunks, passages: list[str], count_tokens: Count, max_tokens: int, *, title: str = "") -> None:
    squashed = [re.sub(r"\s+", "", clean_text(p)) for p in passages]
    boundaries = []  # sentence boundaries (offsets) of each passage
    for p in squashed:
        offs, pos = {0}, 0
        for s in split_sentences(p):
            pos = p.index(s, pos) + len(s)
            offs.add(pos)
        boundaries.append(offs)
    assert len(chunks) > len(passages)
    for c in chunks:
        assert c.token_count <= max_tokens and c.token_count == count_tokens(c.text) and "\ufffd" not in c.text
        for piece in c.text.split("\n"):
            piece = re.sub(r"\s+", "", piece)
            if piece == title:
                continue
            homes = [(i, p.find(piece)) for i, p in enumerate(squashed) if piece in p]
            assert homes, f"chunk text not found in any passage: {piece[:40]}"
            assert any(start in boundaries[i] and start + len(piece) in boundaries[i] for i, start in homes), (
                f"chunk piece does not start and end on sentence boundaries: {piece[:30]}...{piece[-30:]}")
    covered = "".join(re.sub(r"\s+", "", c.text) for c in chunks)
    for p in squashed:
        for s in split_sentences(p):
            assert s in covered


def test_chinese_docx_chunks_on_sentence_punctuation(tmp_path: Path, cmrc_passages: list[str], count_tokens: Count) -> None:
    import docx

    passages = _chinese_passages(cmrc_passages, 6, count_tokens)
    document = docx.Document()
    document.add_heading("中文测试文档", level=1)
    for p in passages:
        document.add_paragraph(p)
    path = tmp_path / "chinese.docx"
    document.save(path)
    elements, _ = partition_file(path)
    chunks = chunk_elements(clean_elements(elements), count_tokens=count_tokens, max_tokens=96, overlap_tokens=24)
    body = [c for c in chunks if c.text != "中文测试文档"]
    assert all(c.heading_path == ["中文测试文档"] for c in body)
    _assert_chinese_chunks(body, passages, count_tokens, 96, title="中文测试文档")


def test_chinese_pdf_chunks_on_sentence_punctuation(tmp_path: Path, cmrc_passages: list[str], count_tokens: Count) -> None:
    """reportlab cannot embed Noto CJK (CFF outlines), so the PDF uses its built-in STSong CID font."""
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    style = ParagraphStyle("zh", fontName="STSong-Light", fontSize=11, leading=16, wordWrap="CJK")
    passages = _chinese_passages(cmrc_passages, 5, count_tokens)
    path = tmp_path / "chinese.pdf"
    story = []
    for p in passages:
        story += [Paragraph(p, style), Spacer(1, 18)]
    SimpleDocTemplate(str(path)).build(story)
    elements, info = partition_file(path)
    assert info["ocr_pages"] == []
    chunks = chunk_elements(clean_elements(elements), count_tokens=count_tokens, max_tokens=96, overlap_tokens=24)
    _assert_chinese_chunks(chunks, passages, count_tokens, 96)


def test_overlong_chinese_sentence_split_on_clauses(count_tokens: Count) -> None:
    sentence = "，".join(f"第{i}个分部的收入增长较快" for i in range(60)) + "。"
    chunks = chunk_elements([Element(text=sentence, type="NarrativeText", page=1)], count_tokens=count_tokens, max_tokens=64, overlap_tokens=0)
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == sentence
    assert all(c.text.endswith(("，", "。")) and c.token_count <= 64 for c in chunks)


def test_bad_budget_rejected(count_tokens: Count) -> None:
    with pytest.raises(ValueError, match="overlap_tokens < max_tokens"):
        chunk_elements([], count_tokens=count_tokens, max_tokens=32, overlap_tokens=32)


def test_token_counts_exact_for_non_additive_tokenizers(corpus: Path, count_tokens: Count) -> None:
    """MiniLM's WordPiece is additive over our joins (counts summed); a char counter is not (re-counted)."""
    assert is_additive(count_tokens)
    chars: Count = len
    assert not is_additive(chars)
    cleaned = clean_elements(partition_file(corpus / "financial" / "COSTCO_2023Q3_EARNINGS.pdf")[0])
    chunks = chunk_elements(cleaned, count_tokens=chars, max_tokens=400, overlap_tokens=60)
    assert len(chunks) > 10
    assert all(c.token_count == len(c.text) <= 400 for c in chunks)


@pytest.mark.parametrize("name", ["financial/PFIZER_2023Q2_EARNINGS.pdf", "financial/ADOBE_2022Q2_10Q.pdf",
                                  "formats/docx-tables.docx"])
def test_counting_from_one_encoding_matches_counting_every_piece(corpus: Path, count_tokens: Count, token_starts, name: str) -> None:
    """Sentence, clause and row counts taken from the element's one encoding give the very chunks that
    tokenising every piece separately gives, with exact token counts."""
    cleaned = clean_elements(partition_file(corpus / name)[0])
    for max_tokens, overlap in ((256, 32), (64, 16)):
        fast = chunk_elements(cleaned, count_tokens=count_tokens, max_tokens=max_tokens, overlap_tokens=overlap,
                              token_starts=token_starts)
        naive = chunk_elements(cleaned, count_tokens=count_tokens, max_tokens=max_tokens, overlap_tokens=overlap)
        assert [(c.text, c.token_count, c.page_start, c.page_end, c.heading_path) for c in fast] == \
               [(c.text, c.token_count, c.page_start, c.page_end, c.heading_path) for c in naive]
        assert all(c.token_count == count_tokens(c.text) <= max_tokens for c in fast)


def test_counting_from_one_encoding_chinese_and_overlong(cmrc_passages: list[str], count_tokens: Count, token_starts) -> None:
    long_sentence = "，".join(f"第{i}个分部的收入增长较快" for i in range(60)) + "。"
    words = " ".join(f"Segment {i} revenue grew 1,2{i}0 dollars" for i in range(80)) + "."
    elements = [Element(text="中文测试文档", type="Title", page=1, level=0)]
    elements += [Element(text=p, type="NarrativeText", page=i + 1) for i, p in enumerate(cmrc_passages[:12])]
    elements += [Element(text=long_sentence, type="NarrativeText", page=13), Element(text=words, type="NarrativeText", page=14)]
    fast = chunk_elements(elements, count_tokens=count_tokens, max_tokens=96, overlap_tokens=24, token_starts=token_starts)
    naive = chunk_elements(elements, count_tokens=count_tokens, max_tokens=96, overlap_tokens=24)
    assert [(c.text, c.token_count) for c in fast] == [(c.text, c.token_count) for c in naive]
    assert all(c.token_count == count_tokens(c.text) <= 96 for c in fast)


def test_split_sentences_keeps_closers_and_decimals() -> None:
    assert split_sentences("Sales rose 3.5% in Q2. Costs fell.") == ["Sales rose 3.5% in Q2.", "Costs fell."]
    assert split_sentences('He said "go." Then') == ['He said "go." Then']  # a stop ends a sentence before whitespace only
    assert split_sentences("增长。」净利润下降；好") == ["增长。」", "净利润下降；", "好"]
    assert split_sentences("Really?! Yes.. ok") == ["Really?!", "Yes..", "ok"]
