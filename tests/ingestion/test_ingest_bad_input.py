"""Hostile and broken input ends in a PartitionError that says what to do, or in valid elements."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from ingestion.partition import PartitionError, partition_file

BAD_FILES = {
    "empty.txt": r"^zero-byte file",
    "empty.eml": r"^e-mail has no body text and no attachments",
    "fake-text-all-whitespace.txt": r"^file contains only whitespace",
    "password_protected.xlsx": r"^password-protected Office file: remove the password",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_corpus_files_refused_with_reason(corpus: Path, name: str) -> None:
    with pytest.raises(PartitionError, match=BAD_FILES[name]):
        partition_file(corpus / "bad" / name)


def test_bad_corpus_files_that_still_read(corpus: Path) -> None:
    """Truncated JSON is still text; the malformed PPTX still has readable slides."""
    elements, info = partition_file(corpus / "bad" / "fake-incomplete-json.txt")
    assert info["detected_type"] == "text" and any('"name": "John Doe"' in e.text for e in elements)
    elements, info = partition_file(corpus / "bad" / "fake-power-point-malformed.pptx")
    assert info["detected_type"] == "pptx" and elements and all(e.text.strip() for e in elements)


def test_every_bad_file_is_covered(corpus: Path) -> None:
    names = {p.name for p in (corpus / "bad").iterdir()}
    assert names == set(BAD_FILES) | {"fake-incomplete-json.txt", "fake-power-point-malformed.pptx"}


@pytest.mark.parametrize(
    ("source", "fake_name", "message"),
    [
        ("multilingual/chi_sim_image.jpeg", "report.pdf", r"^file content is a JPEG image but the name says \.pdf"),
        ("formats/docx-tables.docx", "filing.pdf", r"^file content is a Word DOCX but the name says \.pdf"),
        ("financial/APPLE_2023Q3_10Q.pdf", "memo.docx", r"^file content is a PDF but the name says \.docx"),
        ("financial/vodafone.xlsx", "deck.pptx", r"^file content is an Excel XLSX but the name says \.pptx"),
        ("formats/codeblock.md", "scan.png", r"^file content is HTML but the name says \.png"),
    ],
)
def test_content_and_name_mismatch(corpus: Path, tmp_path: Path, source: str, fake_name: str, message: str) -> None:
    path = tmp_path / "upload.bin"
    shutil.copy(corpus / source, path)
    with pytest.raises(PartitionError, match=message):
        partition_file(path, filename=fake_name)


def test_plain_zip_named_docx(tmp_path: Path) -> None:
    path = tmp_path / "a.docx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(PartitionError, match=r"^file content is a ZIP archive but the name says \.docx"):
        partition_file(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "tool.exe"
    path.write_bytes(b"MZ\x90\x00" + b"\x00" * 100)
    with pytest.raises(PartitionError, match=r"^unsupported file type '\.exe'"):
        partition_file(path)


def test_file_over_size_limit(corpus: Path) -> None:
    with pytest.raises(PartitionError, match=r"^file is 0\.3 MB; the limit is 0 MB"):
        partition_file(corpus / "financial" / "APPLE_2023Q3_10Q.pdf", max_bytes=100_000)


def test_encrypted_pdf_refused(corpus: Path, tmp_path: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=str(corpus / "formats" / "all-number-table.pdf"))
    writer.encrypt(user_password="secret", owner_password="owner")
    path = tmp_path / "locked.pdf"
    with path.open("wb") as fh:
        writer.write(fh)
    with pytest.raises(PartitionError, match=r"^encrypted PDF: remove the password and upload again"):
        partition_file(path)


def test_copy_protected_pdf_is_read(corpus: Path) -> None:
    """Owner-password (copy/print restricted) PDFs open without a password and must index."""
    elements, info = partition_file(corpus / "formats" / "copy-protected.pdf")
    assert info["page_count"] == 2 and len(elements) > 20
    assert any("layout detection" in e.text for e in elements if e.page == 2)


def test_truncated_pdf(corpus: Path, tmp_path: Path) -> None:
    data = (corpus / "financial" / "APPLE_2023Q3_10Q.pdf").read_bytes()
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(PartitionError, match=r"^damaged or truncated PDF"):
        partition_file(path)


def test_truncated_docx(corpus: Path, tmp_path: Path) -> None:
    data = (corpus / "formats" / "docx-tables.docx").read_bytes()
    path = tmp_path / "cut.docx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PartitionError, match=r"^damaged or truncated DOCX: the ZIP container cannot be read"):
        partition_file(path)


def _bomb(src: Path, dst: Path, *, extra_mb: int) -> None:
    """Copy an Office file and add a part of zeros that deflates ~1000:1."""
    shutil.copy(src, dst)
    with zipfile.ZipFile(dst, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("word/media/pad.bin", "w", force_zip64=True) as fh:
            block = b"\x00" * 2**20
            for _ in range(extra_mb):
                fh.write(block)


def test_docx_zip_bomb_refused_by_ratio(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "bomb.docx"
    _bomb(corpus / "formats" / "docx-tables.docx", path, extra_mb=64)
    assert path.stat().st_size < 2**20
    with pytest.raises(PartitionError, match=r"^DOCX part 'word/media/pad\.bin' expands \d+x to 64 MB: refused \(zip bomb\)"):
        partition_file(path)


def test_xlsx_zip_bomb_refused_by_total(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "bomb.xlsx"
    _bomb(corpus / "financial" / "vodafone.xlsx", path, extra_mb=8)
    with pytest.raises(PartitionError, match=r"^XLSX expands to >4 MB: refused \(zip bomb\)"):
        partition_file(path, max_unzipped_bytes=4 * 2**20)


def test_2000_page_pdf_streams_and_respects_limit(tmp_path: Path) -> None:
    from reportlab.pdfgen import canvas

    path = tmp_path / "long.pdf"
    pdf = canvas.Canvas(str(path))
    for i in range(1, 2001):
        pdf.drawString(72, 720, f"Section {i} of the long report: revenue grew on page {i}.")
        pdf.showPage()
    pdf.save()
    elements, info = partition_file(path)
    assert info["page_count"] == 2000 and len(elements) == 2000
    assert all(e.text.endswith(f"page {e.page}.") for e in elements)
    with pytest.raises(PartitionError, match=r"^PDF has 2000 pages; the limit is 1000: split it"):
        partition_file(path, max_pages=1000)


def test_image_without_text(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), "white").save(path)
    with pytest.raises(PartitionError, match=r"^image contains no readable text"):
        partition_file(path)


def test_pdf_without_any_text(tmp_path: Path) -> None:
    """A PDF whose pages are blank must fail loudly, not index as an empty document."""
    from reportlab.pdfgen import canvas

    path = tmp_path / "blank.pdf"
    pdf = canvas.Canvas(str(path))
    pdf.rect(100, 100, 200, 200)
    pdf.showPage()
    pdf.save()
    with pytest.raises(PartitionError, match=r"^PDF yielded no text"):
        partition_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match=r"^file cannot be read"):
        partition_file(tmp_path / "nope.pdf")


def test_isolated_partition_matches_direct(corpus: Path) -> None:
    from ingestion.sandbox import partition_file_isolated

    path = corpus / "financial" / "AMCOR_2022_8K_2022-07-01.pdf"
    isolated, info = partition_file_isolated(path, timeout_s=120)
    direct, direct_info = partition_file(path)
    assert isolated == direct and info == direct_info


def test_isolated_partition_deadline_and_memory_cap(corpus: Path, tmp_path: Path) -> None:
    from ingestion.sandbox import partition_file_isolated

    with pytest.raises(PartitionError, match=r"^reading the file took longer than 0\.5 s: refused"):
        partition_file_isolated(corpus / "long" / "DA-619p.pdf", timeout_s=0.5)
    from PIL import Image

    big = tmp_path / "huge.png"  # 60 Mpixel RGB: ~180 MB once decoded, a few hundred KB as PNG
    Image.new("RGB", (7750, 7750), "white").save(big)
    # decoding needs more than the 400 MB address-space cap: MemoryError in the child, not a dead worker
    with pytest.raises(PartitionError, match=r"^reading this file needs more than 400 MB of memory: refused"):
        partition_file_isolated(big, timeout_s=120, memory_mb=400)
    elements, _ = partition_file_isolated(corpus / "formats" / "all-number-table.pdf", timeout_s=120)
    assert any(e.type == "Table" for e in elements)  # the next file reads normally
