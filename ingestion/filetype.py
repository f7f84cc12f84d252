"""Decide what a file IS from its bytes (libmagic + ZIP contents), never from its name."""

from __future__ import annotations

import zipfile
from pathlib import Path

import magic

KIND_NAMES = {
    "pdf": "a PDF", "docx": "a Word DOCX", "pptx": "a PowerPoint PPTX", "xlsx": "an Excel XLSX",
    "zip": "a ZIP archive", "png": "a PNG image", "jpeg": "a JPEG image", "tiff": "a TIFF image",
    "gif": "a GIF image", "html": "HTML", "eml": "an e-mail message", "text": "plain text",
    "encrypted-office": "a password-protected Office file", "ole": "a legacy Office (OLE) file",
}

_MIME_KIND = {
    "application/pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": "pptx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "image/png": "png", "image/jpeg": "jpeg", "image/tiff": "tiff", "image/gif": "gif",
    "text/html": "html", "message/rfc822": "eml", "application/encrypted": "encrypted-office",
    "application/x-ole-storage": "ole", "application/CDFV2": "ole", "application/msword": "ole",
    "application/vnd.ms-excel": "ole", "application/vnd.ms-powerpoint": "ole",
}

_ZIP_MARKERS = (("word/document.xml", "docx"), ("ppt/presentation.xml", "pptx"), ("xl/workbook.xml", "xlsx"))


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return "zip"
    for marker, kind in _ZIP_MARKERS:
        if marker in names:
            return kind
    return "zip"


def detect_kind(path: Path) -> tuple[str, str]:
    """Return (kind, mime) judged from content: kind is a key of KIND_NAMES or the raw MIME type."""
    mime = magic.from_file(str(path), mime=True)
    desc = magic.from_file(str(path))
    if "encrypted" in desc.lower() and ("CDFV2" in desc or mime == "application/encrypted"):
        return "encrypted-office", mime
    if mime in _MIME_KIND:
        return _MIME_KIND[mime], mime
    if mime in ("application/zip", "application/octet-stream") and path.open("rb").read(2) == b"PK":
        return _zip_kind(path), mime
    if desc.startswith(("MIME entity", "RFC 822 mail", "SMTP mail", "news or mail")):
        return "eml", mime
    if mime in ("text/xml", "application/xhtml+xml", "application/xml"):
        head = path.open("rb").read(4096).lower()
        return ("html" if b"<html" in head else "text"), mime
    if mime.startswith("text/") or mime in ("application/json", "application/csv"):
        return "text", mime
    return mime, mime
