"""Tesseract OCR for scanned PDF pages and images (English + simplified Chinese)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

# One Tesseract thread per worker (no oversubscription). Set for the tesseract child only: in this
# process OMP_THREAD_LIMIT=1 makes torch's bfloat16 CPU kernels return wrong results.
_TESSERACT_ENV = {**os.environ, "OMP_THREAD_LIMIT": "1"}

OCR_LANGS = "chi_sim+eng"  # Chinese first: with eng first, Tesseract reads Chinese lines as Latin noise
OCR_DPI = 200
OCR_TIMEOUT_S = 120
MAX_IMAGE_PIXELS = 80_000_000  # refuse decompression-bomb images before decoding

_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}])[ \t]+(?=[{_CJK}])")


class OcrError(RuntimeError):
    """OCR could not run on this input."""


def tidy_ocr_text(text: str) -> str:
    """Drop the spaces Tesseract puts between Chinese characters; trim each line."""
    text = _SPACE_BETWEEN_CJK.sub("", text)
    return "\n".join(line.strip() for line in text.splitlines())


def ocr_image(image: Image.Image, *, langs: str = OCR_LANGS) -> str:
    """OCR one PIL image and return its text (paragraphs separated by blank lines)."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise OcrError(f"image is {image.width}x{image.height} pixels: too large to OCR")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    with tempfile.TemporaryDirectory(prefix="kd-ocr-") as tmp:
        src = Path(tmp) / "image.png"
        image.save(src)
        try:
            done = subprocess.run(
                ["tesseract", str(src), "stdout", "-l", langs],
                capture_output=True, timeout=OCR_TIMEOUT_S, env=_TESSERACT_ENV,
            )
        except subprocess.TimeoutExpired as exc:
            raise OcrError(f"OCR timed out after {OCR_TIMEOUT_S} s") from exc
        except FileNotFoundError as exc:
            raise OcrError("Tesseract is not installed (Debian: tesseract-ocr tesseract-ocr-chi-sim)") from exc
    if done.returncode != 0:
        raise OcrError(f"Tesseract failed: {done.stderr.decode(errors='replace').strip()[:200]}")
    text = done.stdout.decode("utf-8", errors="replace")
    return tidy_ocr_text(text)


def ocr_image_file(path: Path, *, langs: str = OCR_LANGS) -> str:
    """OCR an image file (PNG, JPEG, TIFF...)."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            image.load()
            return ocr_image(image, langs=langs)
    except (Image.DecompressionBombError, OSError) as exc:
        raise OcrError(f"image cannot be decoded: {exc}") from exc


def ocr_pdf_page(path: Path, *, page: int, langs: str = OCR_LANGS, dpi: int = OCR_DPI) -> str:
    """Render one PDF page (1-based) with pdftoppm and OCR it."""
    with tempfile.TemporaryDirectory(prefix="kd-ocr-") as tmp:
        out = Path(tmp) / "page"
        try:
            subprocess.run(
                ["pdftoppm", "-r", str(dpi), "-f", str(page), "-l", str(page), "-gray", "-png",
                 "-singlefile", str(path), str(out)],
                check=True, capture_output=True, timeout=OCR_TIMEOUT_S,
            )
        except subprocess.CalledProcessError as exc:
            raise OcrError(f"pdftoppm could not render page {page}: {exc.stderr.decode(errors='replace')[:200]}") from exc
        except subprocess.TimeoutExpired as exc:
            raise OcrError(f"rendering page {page} took over {OCR_TIMEOUT_S} s") from exc
        return ocr_image_file(out.with_suffix(".png"), langs=langs)
