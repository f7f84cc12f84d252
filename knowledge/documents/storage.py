"""Where originals and intermediate stage outputs live on disk.

Originals are kept untouched under ``MEDIA_ROOT/originals/<sha[:2]>/<sha256>``. Stage outputs
between tasks (the elements after partition and after clean) are JSON files under
``DATA_DIR/work/<document_id>/``; they are scratch, recomputable from the original, and removed
once the document is indexed or deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import IO, Any

import magic
from django.conf import settings

CHUNK_BYTES = 1 << 20


class UploadTooLarge(ValueError):
    """The upload is over settings.KD_MAX_UPLOAD_BYTES."""


def data_dir() -> Path:
    return Path(settings.DATA_DIR)


def original_path(*, relative: str) -> Path:
    return Path(settings.MEDIA_ROOT) / relative


def original_store(*, source: IO[bytes], max_bytes: int) -> tuple[str, str, int]:
    """Copy a stream to storage, hashing as it goes: (relative path, sha256, size).

    Raises UploadTooLarge before keeping anything when the stream passes ``max_bytes``.
    """
    root = Path(settings.MEDIA_ROOT) / "originals"
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as out:
            while block := source.read(CHUNK_BYTES):
                size += len(block)
                if size > max_bytes:
                    raise UploadTooLarge(
                        f"The file is larger than the {max_bytes // (1024 * 1024)} MiB upload limit."
                    )
                digest.update(block)
                out.write(block)
        sha = digest.hexdigest()
        relative = f"originals/{sha[:2]}/{sha}"
        final = Path(settings.MEDIA_ROOT) / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.unlink(tmp_name)
        else:
            os.replace(tmp_name, final)
        return relative, sha, size
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def original_remove(*, relative: str) -> None:
    path = original_path(relative=relative)
    if path.exists():
        path.unlink()


def content_sniff(*, path: Path) -> str:
    """The MIME type read from the file's bytes, not from its name."""
    try:
        return magic.from_file(str(path), mime=True) or "application/octet-stream"
    except (OSError, magic.MagicException):
        return "application/octet-stream"


def work_dir(*, document_id: int) -> Path:
    return data_dir() / "work" / str(document_id)


def work_write(*, document_id: int, name: str, items: list[Any]) -> Path:
    """Write a stage output atomically (tmp file + rename) so a killed task leaves no half file."""
    folder = work_dir(document_id=document_id)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.json"
    rows = [asdict(i) if is_dataclass(i) else i for i in items]
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(rows, out, ensure_ascii=False, default=str)
    os.replace(tmp_name, target)
    return target


def work_read(*, document_id: int, name: str) -> list[dict] | None:
    target = work_dir(document_id=document_id) / f"{name}.json"
    if not target.exists():
        return None
    with target.open(encoding="utf-8") as f:
        return json.load(f)


def work_remove(*, document_id: int) -> None:
    shutil.rmtree(work_dir(document_id=document_id), ignore_errors=True)
