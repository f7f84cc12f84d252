"""Upload checks made before a file reaches the documents app: name, size and content agree."""
from __future__ import annotations

from pathlib import PurePath

import magic
from django.conf import settings
from django.utils.translation import gettext as _

# extension -> MIME types its content may be sniffed as
ALLOWED = {
    ".pdf": {"application/pdf"},
    ".docx": {"application/vnd.openxmlformats-officedocument.wordprocessingml.document", "application/zip"},
    ".pptx": {"application/vnd.openxmlformats-officedocument.presentationml.presentation", "application/zip"},
    ".xlsx": {"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "application/zip"},
    ".xls": {"application/vnd.ms-excel", "application/x-ole-storage", "application/CDFV2"},
    ".doc": {"application/msword", "application/x-ole-storage", "application/CDFV2"},
    ".html": {"text/html", "text/plain", "text/xml"},
    ".htm": {"text/html", "text/plain", "text/xml"},
    ".txt": {"text/plain"},
    ".md": {"text/plain", "text/markdown", "text/x-markdown"},
    ".csv": {"text/plain", "text/csv", "application/csv"},
    ".eml": {"message/rfc822", "text/plain"},
    ".png": {"image/png"},
    ".jpg": {"image/jpeg"},
    ".jpeg": {"image/jpeg"},
}


class UploadRejected(ValueError):
    """The file is refused; the message says why in words a person can act on."""


def upload_check(*, filename: str, size: int, head: bytes) -> None:
    """Raise UploadRejected unless the name, size and first bytes make an acceptable document."""
    name = PurePath(filename or "").name
    ext = PurePath(name).suffix.lower()
    if not name or ext not in ALLOWED:
        raise UploadRejected(_("%(name)s: this file type is not supported (allowed: %(exts)s).")
                             % {"name": name or "?", "exts": ", ".join(sorted(ALLOWED))})
    if size <= 0:
        raise UploadRejected(_("%(name)s is empty.") % {"name": name})
    limit = settings.KD_MAX_UPLOAD_BYTES
    if size > limit:
        raise UploadRejected(_("%(name)s is larger than the %(mb)s MiB upload limit.")
                             % {"name": name, "mb": limit // (1024 * 1024)})
    sniffed = magic.from_buffer(head, mime=True) or "application/octet-stream"
    allowed = ALLOWED[ext]
    textual = ext in {".html", ".htm", ".txt", ".md", ".csv", ".eml"}
    if sniffed not in allowed and not (textual and sniffed.startswith("text/")):
        raise UploadRejected(_("%(name)s: its content (%(type)s) does not match its %(ext)s name.")
                             % {"name": name, "type": sniffed, "ext": ext})
