"""Metadata from real filings and releases: company, ticker, form, period, date, language."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestion.clean import clean_elements
from ingestion.elements import Element
from ingestion.metadata import extract_metadata
from ingestion.partition import partition_file

EXPECTED = {
    "APPLE_2023Q3_10Q.pdf": dict(company="Apple Inc.", ticker="AAPL", doc_type="10-Q", fiscal_period="2023Q3", report_date="2023-07-01"),
    "NETFLIX_2023Q2_10Q.pdf": dict(company="Netflix, Inc.", ticker="NFLX", doc_type="10-Q", fiscal_period="2023Q2", report_date="2023-06-30"),
    "AMCOR_2022_8K_2022-07-01.pdf": dict(company="AMCOR PLC", ticker="AMCR", doc_type="8-K", report_date="2022-07-01"),
    "PFIZER_2023Q2_EARNINGS.pdf": dict(company="Pfizer Inc.", ticker="PFE", doc_type="earnings release", fiscal_period="2023Q2"),
    "BESTBUY_2023Q4_EARNINGS.pdf": dict(company="Best Buy Co., Inc.", ticker="BBY", doc_type="earnings release", fiscal_period="2023Q4", report_date="2023-03-02"),
    "COSTCO_2023Q3_EARNINGS.pdf": dict(company="Costco Wholesale Corporation", ticker="COST", doc_type="earnings release", fiscal_period="2023Q3", report_date="2023-05-25"),
    "SALESFORCE_2024Q2_EARNINGS.pdf": dict(ticker="CRM", doc_type="earnings release", fiscal_period="2024Q2"),
    # the file name says 10-Q but the document is Lockheed Martin's earnings press release (Exhibit 99.1)
    "LOCKHEEDMARTIN_2023Q1_10Q.pdf": dict(company="Lockheed Martin Corporation", doc_type="earnings release", fiscal_period="2023Q1"),
    # the file name says 2022Q2 but the cover says "quarterly period ended June 2, 2023"
    "ADOBE_2022Q2_10Q.pdf": dict(ticker="ADBE", doc_type="10-Q", fiscal_period="2023Q2", report_date="2023-06-02"),
    "example-10k-1p.html": dict(company="Galaxy Gaming, Inc.", ticker="GLXZ", doc_type="10-K"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_financial_metadata(corpus: Path, name: str) -> None:
    elements = clean_elements(partition_file(corpus / "financial" / name)[0])
    meta = extract_metadata(elements, filename=name)
    for key, value in EXPECTED[name].items():
        assert meta[key] == value, (key, meta)
    assert meta["language"] == "en" and meta["title"]


def test_filing_title_names_company_and_form(corpus: Path) -> None:
    meta = extract_metadata(partition_file(corpus / "financial" / "APPLE_2023Q3_10Q.pdf")[0], filename="x.pdf")
    assert meta["title"] == "Apple Inc. Form 10-Q (2023Q3)"


def test_languages(corpus: Path, cmrc_passages: list[str]) -> None:
    fr = partition_file(corpus / "multilingual" / "fr_olap.pdf")[0]
    assert extract_metadata(fr, filename="fr_olap.pdf")["language"] == "fr"
    ko = partition_file(corpus / "multilingual" / "korean-text-with-tables.pdf")[0]
    assert extract_metadata(ko, filename="k.pdf")["language"] == "ko"
    zh = [Element(text=p, type="NarrativeText", page=1) for p in cmrc_passages[:3]]
    meta = extract_metadata(zh, filename="passages.docx")
    assert meta["language"] == "zh" and meta["doc_type"] == "other" and meta["company"] is None


def test_broker_research_and_annual_report() -> None:
    research = [Element(text="Acme Widgets Inc. (NYSE: ACME) Equity Research", type="Title", page=1, level=0),
                Element(text="We raise our price target to $45 and keep our Overweight rating.", type="NarrativeText", page=1)]
    meta = extract_metadata(research, filename="note.pdf")
    assert meta["doc_type"] == "broker research" and meta["ticker"] == "ACME" and meta["company"] == "Acme Widgets Inc."
    annual = [Element(text="Reliance Industries Limited Integrated Annual Report 2022-23", type="Title", page=1, level=0)]
    assert extract_metadata(annual, filename="r.pdf")["doc_type"] == "annual report"


def test_unknown_document_has_no_invented_fields() -> None:
    meta = extract_metadata([Element(text="Shopping list: apples, pears.", type="NarrativeText", page=1)], filename="list.txt")
    assert meta["company"] is None and meta["ticker"] is None and meta["fiscal_period"] is None and meta["report_date"] is None
    assert meta["doc_type"] == "other" and meta["title"] == "list"
