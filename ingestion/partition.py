"""Partition any supported upload into Elements: detect by content, refuse clearly, read fast.

PDF text layers go through pdfium (`ingestion.pdf_text`), pages without one through Tesseract;
Office, HTML, Markdown and text through unstructured's partitioners; e-mail through the stdlib
parser with each attachment partitioned in turn; images through OCR.
"""

from __future__ import annotations

import email
import email.policy
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ingestion import spacy_model
from ingestion.elements import Element
from ingestion.filetype import KIND_NAMES, detect_kind
from ingestion.ocr import OcrError, ocr_image_file
from ingestion.pdf_text import PdfReadError, read_pdf

# spacy_model's import sets DO_NOT_TRACK before unstructured is imported; the spaCy patch itself is applied
# lazily (install_offline_spacy) so text-layer PDFs never load spaCy at all.

SUPPORTED_EXTENSIONS = frozenset({
    ".pdf", ".docx", ".pptx", ".xlsx", ".html", ".htm", ".xhtml", ".md", ".markdown",
    ".txt", ".text", ".csv", ".json", ".eml", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
})
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_UNZIPPED_BYTES = 512 * 1024 * 1024
_BOMB_RATIO = 200  # an entry this much larger than its compressed size, and over 10 MB, is a bomb
_MAX_ATTACHMENT_DEPTH = 2

_EXT_KINDS: dict[str, set[str]] = {
    ".pdf": {"pdf"}, ".docx": {"docx"}, ".pptx": {"pptx"}, ".xlsx": {"xlsx"},
    ".png": {"png"}, ".jpg": {"jpeg"}, ".jpeg": {"jpeg"}, ".tif": {"tiff"}, ".tiff": {"tiff"},
}
_TEXT_KINDS = {"text", "html", "eml"}  # a text-family name accepts any text-family content


class PartitionError(ValueError):
    """The file cannot be read; `reason` is a sentence a person can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def partition_file(
    path: Path,
    *,
    filename: str | None = None,
    max_pages: int = 3000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES,
    _depth: int = 0,
) -> tuple[list[Element], dict[str, Any]]:
    """Read `path` (named `filename` by the user) into elements and info.

    info: page_count, detected_type, ocr_pages, encoding (text formats), attachments (e-mail).
    Raises PartitionError with a reason for anything that cannot become valid elements.
    """
    path = Path(path)
    name = filename or path.name
    ext = Path(name).suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise PartitionError(f"unsupported file type '{ext or name}': supported are {', '.join(sorted(SUPPORTED_EXTENSIONS))}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PartitionError(f"file cannot be read: {exc.strerror}") from exc
    if size == 0:
        raise PartitionError("zero-byte file: the upload is empty")
    if size > max_bytes:
        raise PartitionError(f"file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")

    kind, mime = detect_kind(path)
    _check_kind_matches_name(kind=kind, mime=mime, ext=ext)
    if kind in ("docx", "pptx", "xlsx"):
        _check_zip(path, kind=kind, max_unzipped_bytes=max_unzipped_bytes)

    info: dict[str, Any] = {"page_count": 1, "detected_type": kind, "ocr_pages": [], "encoding": None}
    if kind == "pdf":
        try:
            elements, pdf_info = read_pdf(path, max_pages=max_pages)
        except PdfReadError as exc:
            raise PartitionError(str(exc)) from exc
        info.update(pdf_info)
    elif kind in ("png", "jpeg", "tiff"):
        elements = _read_image(path)
        info["ocr_pages"] = [1]
    elif kind in ("docx", "pptx", "xlsx"):
        elements = _read_office(path, kind=kind)
    elif ext == ".eml" or kind == "eml":
        elements = _read_email(path, info=info, depth=_depth, max_pages=max_pages, max_bytes=max_bytes)
    else:
        elements = _read_text_family(path, ext=ext, kind=kind, info=info)

    elements = [e for e in elements if e.text.strip()]
    if not elements:
        raise PartitionError(f"{KIND_NAMES.get(kind, kind)} file yielded no text: nothing to index")
    if kind != "pdf":
        info["page_count"] = max(e.page for e in elements)
    if info["page_count"] > max_pages:
        raise PartitionError(f"document has {info['page_count']} pages; the limit is {max_pages}: split it and upload the parts")
    return elements, info


def _check_kind_matches_name(*, kind: str, mime: str, ext: str) -> None:
    if kind == "encrypted-office":
        raise PartitionError("password-protected Office file: remove the password and upload again")
    if kind == "ole":
        raise PartitionError("legacy binary Office file (.doc/.xls/.ppt): save it as .docx/.xlsx/.pptx and upload again")
    expected = _EXT_KINDS.get(ext)
    if expected is None:  # text-family name
        if kind in _TEXT_KINDS:
            return
    elif kind in expected:
        return
    raise PartitionError(f"file content is {KIND_NAMES.get(kind, mime)} but the name says {ext}: rename it or upload the right file")


def _check_zip(path: Path, *, kind: str, max_unzipped_bytes: int) -> None:
    """Refuse damaged and zip-bomb Office files before any parser expands them."""
    label = kind.upper()
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PartitionError(f"damaged or truncated {label}: the ZIP container cannot be read; re-save the file and upload again") from exc
    total = sum(i.file_size for i in infos)
    if total > max_unzipped_bytes:
        raise PartitionError(f"{label} expands to >{max_unzipped_bytes // 2**20} MB: refused (zip bomb)")
    for i in infos:
        if i.file_size > 10 * 2**20 and i.file_size > _BOMB_RATIO * max(i.compress_size, 1):
            raise PartitionError(f"{label} part '{i.filename}' expands {i.file_size // max(i.compress_size, 1)}x to {i.file_size // 2**20} MB: refused (zip bomb)")


def _from_unstructured(items: list[Any]) -> list[Element]:
    out: list[Element] = []
    for item in items:
        text = (item.text or "").strip()
        if not text:
            continue
        md = item.metadata
        category = item.category
        level = md.category_depth if category == "Title" else None
        html = getattr(md, "text_as_html", None) if category == "Table" else None
        out.append(Element(text=text, type=category, page=md.page_number or 1, level=level, html=html))
    return out


def _read_office(path: Path, *, kind: str) -> list[Element]:
    spacy_model.install_offline_spacy()
    try:
        if kind == "docx":
            from unstructured.partition.docx import partition_docx
            items = partition_docx(filename=str(path), infer_table_structure=True)
        elif kind == "pptx":
            from unstructured.partition.pptx import partition_pptx
            items = partition_pptx(filename=str(path), infer_table_structure=True)
        else:
            from unstructured.partition.xlsx import partition_xlsx
            items = partition_xlsx(filename=str(path), infer_table_structure=True)
    except (zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise PartitionError(f"damaged {kind.upper()}: a required part is missing or truncated ({exc}); re-save the file and upload again") from exc
    except Exception as exc:  # python-docx/pptx/openpyxl raise many types on malformed XML
        raise PartitionError(f"damaged {kind.upper()}: {type(exc).__name__}: {str(exc)[:200]}; re-save the file and upload again") from exc
    return _from_unstructured(items)


def _read_image(path: Path) -> list[Element]:
    spacy_model.install_offline_spacy()
    from unstructured.partition.text import element_from_text

    try:
        text = ocr_image_file(path)
    except OcrError as exc:
        raise PartitionError(f"image could not be read: {exc}") from exc
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paras:
        raise PartitionError("image contains no readable text (OCR found nothing)")
    return [Element(text=p, type=type(element_from_text(p)).__name__, page=1) for p in paras]


def decode_text(data: bytes) -> tuple[str, str]:
    """Decode bytes of unknown encoding: BOMs, then UTF-8, then charset detection."""
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                     (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            return data.decode(enc, errors="replace"), enc
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data, cp_isolation=["gb18030", "big5", "utf_16", "cp1252", "latin_1", "shift_jis", "euc_kr"]).best()
    if best is not None:
        return str(best), best.encoding
    return data.decode("latin-1"), "latin-1"


def _read_text_family(path: Path, *, ext: str, kind: str, info: dict[str, Any]) -> list[Element]:
    text, encoding = decode_text(path.read_bytes())
    info["encoding"] = encoding
    if not text.strip():
        raise PartitionError("file contains only whitespace: there is no text to index")
    return _partition_text(text, ext=ext, kind=kind)


def _partition_text(text: str, *, ext: str, kind: str) -> list[Element]:
    spacy_model.install_offline_spacy()
    if ext in (".html", ".htm", ".xhtml") or (kind == "html" and ext not in (".md", ".markdown", ".txt", ".text", ".csv", ".json")):
        from unstructured.partition.html import partition_html
        return _from_unstructured(partition_html(text=text))
    if ext in (".md", ".markdown"):
        from unstructured.partition.md import partition_md
        return _from_unstructured(partition_md(text=text))
    from unstructured.partition.text import partition_text
    return _from_unstructured(partition_text(text=text))


def _read_email(path: Path, *, info: dict[str, Any], depth: int, max_pages: int, max_bytes: int) -> list[Element]:
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    elements: list[Element] = []
    subject = str(msg.get("subject") or "").strip()
    if subject:
        elements.append(Element(text=subject, type="Title", page=1, level=0))
    body = msg.get_body(preferencelist=("plain", "html"))
    if body is not None:
        content = body.get_content()
        if isinstance(content, str) and content.strip():
            sub = "html" if body.get_content_subtype() == "html" else "text"
            elements.extend(_partition_text(content, ext=".html" if sub == "html" else ".txt", kind=sub))
    attachments: list[dict[str, Any]] = []
    for part in msg.iter_attachments():
        att_name = Path(part.get_filename() or "attachment.bin").name
        record: dict[str, Any] = {"filename": att_name, "elements": 0, "error": None}
        attachments.append(record)
        if depth >= _MAX_ATTACHMENT_DEPTH:
            record["error"] = "attachment nested too deeply"
            continue
        payload = part.get_payload(decode=True) or b""
        with tempfile.TemporaryDirectory(prefix="kd-att-") as tmp:
            att_path = Path(tmp) / att_name
            att_path.write_bytes(payload)
            try:
                found, _ = partition_file(att_path, filename=att_name, max_pages=max_pages, max_bytes=max_bytes, _depth=depth + 1)
            except PartitionError as exc:
                record["error"] = exc.reason
                continue
        record["elements"] = len(found)
        elements.extend(found)
    info["attachments"] = attachments
    if not any(e.text.strip() for e in elements[1 if subject else 0:]) and not attachments:
        raise PartitionError("e-mail has no body text and no attachments: nothing to index")
    return elements


def warm_up() -> list[str]:
    """Partition a tiny generated file of each unstructured-backed format once, so a worker pays the
    first-use imports (pandas, lxml, python-docx/pptx, openpyxl, unstructured's partitioners) at start,
    not inside the first document it reads. Returns the kinds that were warmed."""
    import docx
    import openpyxl
    import pptx

    warmed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kd-warm-") as tmp:
        folder = Path(tmp)
        d = docx.Document()
        d.add_heading("Warm-up", level=1)
        d.add_paragraph("Revenue rose 4% in the quarter.")
        d.save(str(folder / "w.docx"))
        deck = pptx.Presentation()
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = "Warm-up"
        slide.placeholders[1].text = "Revenue rose 4% in the quarter."
        deck.save(str(folder / "w.pptx"))
        wb = openpyxl.Workbook()
        wb.active.append(["Segment", "Revenue"])
        wb.active.append(["Cloud", 12])
        wb.save(str(folder / "w.xlsx"))
        (folder / "w.html").write_text("<html><body><h1>Warm-up</h1><p>Revenue rose 4%.</p>"
                                       "<table><tr><td>a</td><td>1</td></tr></table></body></html>")
        (folder / "w.md").write_text("# Warm-up\n\nRevenue rose 4% in the quarter.\n")
        (folder / "w.txt").write_text("Warm-up\n\nRevenue rose 4% in the quarter.\n")
        for name in ("w.docx", "w.pptx", "w.xlsx", "w.html", "w.md", "w.txt"):
            partition_file(folder / name)
            warmed.append(name.split(".")[1])
    return warmed
