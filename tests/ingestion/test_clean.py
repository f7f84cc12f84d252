"""Cleaning on real documents and on the specific text problems it must fix."""

from __future__ import annotations

import re
from pathlib import Path

from ingestion.clean import clean_elements, clean_text, normalize_width, paragraph_fingerprint
from ingestion.elements import Element
from ingestion.partition import partition_file


def test_running_footer_and_page_numbers_removed(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "financial" / "APPLE_2023Q3_10Q.pdf")
    footer = re.compile(r"Apple Inc\. \| Q3 2023 Form 10-Q \| \d+")
    before = [e for e in elements if footer.fullmatch(" ".join(e.text.split()))]
    assert len(before) >= 20  # one per numbered page
    cleaned = clean_elements(elements)
    assert not [e for e in cleaned if footer.search(e.text)]
    assert not [e for e in cleaned if e.type in ("PageNumber", "Header", "Footer")]
    # body text survives, on its page
    assert any("fiscal year is the 52- or 53-week period" in e.text for e in cleaned)
    assert len(cleaned) > 0.6 * len([e for e in elements if e.type not in ("PageNumber", "Header", "Footer")])


def test_docx_headers_and_footers_dropped(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "formats" / "docx-hdrftr.docx")
    assert {e.type for e in elements} >= {"Header", "Footer"}
    cleaned = clean_elements(elements)
    assert [e.text for e in cleaned] == ["Main document"]


def test_duplicate_paragraphs_dropped(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "formats" / "duplicate-paragraphs.docx")
    assert sum(e.text == "some text" for e in elements) == 6
    cleaned = clean_elements(elements)
    assert [e.text for e in cleaned] == ["This document contains duplicates", "some text"]


def test_hyphenation_at_line_end() -> None:
    assert clean_text("The manu-\nfacturing plant was\nexpanded.") == "The manufacturing plant was expanded."
    assert clean_text("Sales of Coca-\nCola rose") == "Sales of Coca-Cola rose"
    assert clean_text("long-\nterm debt") == "longterm debt"  # without the document's words: joined
    assert clean_text("twenty- five") == "twenty- five"  # not a line-end hyphen: untouched


def test_line_end_hyphen_keeps_the_documents_compounds() -> None:
    texts = ["Our long-term debt rose; the term loan is long.", "The manu-\nfacturing plant and long-\nterm notes.",
             "Something new: some-\nthing else; a pre-\ntax gain and year-\nover-year growth.",
             "Pre-tax income grew year-over-year."]
    out = [e.text for e in clean_elements([Element(text=t, type="NarrativeText", page=1) for t in texts])]
    assert out[1] == "The manufacturing plant and long-term notes."  # compound used elsewhere: hyphen kept
    assert out[2] == "Something new: something else; a pre-tax gain and year-over-year growth."


def test_width_normalisation_keeps_chinese_punctuation() -> None:
    assert normalize_width("ＡＢＣ１２３％") == "ABC123%"
    assert normalize_width("营收增长１２％，利润下降。") == "营收增长12%，利润下降。"
    assert normalize_width("ﬁnancial\u00a0results") == "financial results"
    assert clean_text("营业收入\n同比增长") == "营业收入同比增长"  # no space invented inside Chinese text
    assert clean_text("  a \t b\n\n c ") == "a b c"


def test_table_keeps_rows() -> None:
    table = Element(text="Revenue  1,200\nCost   800\n", type="Table", page=2)
    (out,) = clean_elements([table])
    assert out.text == "Revenue 1,200\nCost 800" and out.page == 2 and out.type == "Table"


def test_boilerplate_fingerprints_dropped() -> None:
    disclaimer = "This report is for information only and is not an offer to buy or sell securities."
    elements = [
        Element(text="Results", type="Title", page=1, level=0),
        Element(text="Revenue rose 12% on strong demand.", type="NarrativeText", page=1),
        Element(text=disclaimer.upper().replace(" ", "  "), type="NarrativeText", page=1),
    ]
    fps = {paragraph_fingerprint(disclaimer)}
    assert paragraph_fingerprint(disclaimer) == paragraph_fingerprint("  " + disclaimer.upper() + "\n")
    cleaned = clean_elements(elements, boilerplate=fps)
    assert [e.text for e in cleaned] == ["Results", "Revenue rose 12% on strong demand."]
    assert len(clean_elements(elements)) == 3


def test_running_header_needs_repetition() -> None:
    """Text at a page top that appears on only one page is content, not a running header."""
    facts = ["Revenue rose.", "Margins fell.", "Cash grew.", "Debt was repaid.", "Capex doubled.", "Guidance held."]
    pages = []
    for p in range(1, 7):
        pages.append(Element(text=f"Acme Corp Quarterly Report Page {p}", type="UncategorizedText", page=p))
        pages.append(Element(text=f"Body paragraph: {facts[p - 1]}", type="NarrativeText", page=p))
    pages.append(Element(text="Unique closing remark.", type="NarrativeText", page=6))
    cleaned = clean_elements(pages)
    assert not any("Acme Corp" in e.text for e in cleaned)
    assert sum("Body paragraph" in e.text for e in cleaned) == 6
    assert cleaned[-1].text == "Unique closing remark."
