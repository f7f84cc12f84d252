"""A PDF page rendered to PNG (pdfium), with the cited passage highlighted by translucent boxes (Pillow).

The passage (a chunk's text, cleaned by ingestion) is aligned to the page's characters with whitespace removed
and compatibility forms folded (ligatures, full-width forms, curly quotes, dashes), in short anchored pieces so that small cleaning
differences do not lose the rest of the passage. Only the part of the passage on this page is drawn; a passage
that is not on the page draws nothing.
"""
from __future__ import annotations

import ctypes
import io
import unicodedata
from pathlib import Path

PIECE = 24  # characters (whitespace removed) per anchored piece of the passage
RESYNC_WINDOW = 400  # how far past the previous piece the next piece may be found
HIGHLIGHT_RGBA = (255, 214, 0, 96)
OUTLINE_RGBA = (230, 150, 0, 200)


_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
                        "\u2212": "-", "\u00ad": None})


def _fold(ch: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKC", ch).lower().translate(_PUNCT) if not c.isspace())


def _folded(text: str) -> tuple[str, list[int]]:
    """Text without whitespace, case- and compatibility-folded, and each folded char's index in the original."""
    out, where = [], []
    for i, ch in enumerate(text):
        f = _fold(ch)
        out.append(f)
        where.extend([i] * len(f))
    return "".join(out), where


def passage_char_ranges(page_text: str, passage: str) -> list[tuple[int, int]]:
    """[start, end) index ranges of page_text that hold the passage (or the part of it on this page).

    The passage is cut into pieces of PIECE folded chars; a run starts where two consecutive pieces are found
    together (or the whole passage, when it is shorter), and each next piece is looked for shortly after the
    last one, so an unmatched piece (a cleaning difference) is skipped without losing the rest.
    """
    hay, where = _folded(page_text)
    needle, _ = _folded(passage)
    if not hay or not needle:
        return []
    pieces = [needle[i : i + PIECE] for i in range(0, len(needle), PIECE)]
    if len(pieces) > 1 and len(pieces[-1]) < PIECE // 2:  # a short tail matches too easily on its own
        pieces[-2] += pieces.pop()
    spans: list[tuple[int, int]] = []
    pos = -1  # end (in hay) of the last matched piece; -1: not started
    for k, piece in enumerate(pieces):
        if pos < 0:
            if len(pieces) > 1 and k + 1 == len(pieces):
                break  # one lone piece is too weak an anchor to start on
            at = hay.find(piece + (pieces[k + 1] if len(pieces) > 1 else ""))
            if at < 0:
                continue  # the start of the passage is on an earlier page (or changed): try the next piece
        else:
            at = hay.find(piece, pos, pos + RESYNC_WINDOW + len(piece))
            if at < 0:
                continue
        spans.append((at, at + len(piece)))
        pos = at + len(piece)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + 2:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(where[a], where[b - 1] + 1) for a, b in merged]


def _page_chars(textpage) -> str:
    """The text page's characters, one per pdfium char index (so indices match get_charbox / count_rects)."""
    import pypdfium2.raw as pdfium_c

    n = textpage.count_chars()
    return "".join(chr(pdfium_c.FPDFText_GetUnicode(textpage, i) or 0x20) for i in range(n))


def _to_device(page, width: int, height: int, x: float, y: float) -> tuple[int, int]:
    import pypdfium2.raw as pdfium_c

    dx, dy = ctypes.c_int(), ctypes.c_int()
    pdfium_c.FPDF_PageToDevice(page, 0, 0, width, height, 0, x, y, ctypes.byref(dx), ctypes.byref(dy))
    return dx.value, dy.value


def passage_boxes(page, passage: str, *, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom) on a width x height render of the page covering the passage."""
    textpage = page.get_textpage()
    try:
        text = _page_chars(textpage)
        boxes = []
        for start, end in passage_char_ranges(text, passage):
            for i in range(textpage.count_rects(start, end - start)):
                left, bottom, right, top = textpage.get_rect(i)
                x0, y0 = _to_device(page, width, height, left, top)
                x1, y1 = _to_device(page, width, height, right, bottom)
                box = (min(x0, x1) - 1, min(y0, y1) - 1, max(x0, x1) + 1, max(y0, y1) + 1)
                if box[2] - box[0] > 2 and box[3] - box[1] > 2:
                    boxes.append(box)
        return boxes
    finally:
        textpage.close()


def page_png(*, path: str | Path, page: int, passage: str = "", dpi: int = 96) -> tuple[bytes, int]:
    """(PNG bytes of 1-based page `page` at dpi, number of highlight boxes drawn)."""
    import pypdfium2 as pdfium
    from PIL import Image, ImageDraw

    pdf = pdfium.PdfDocument(str(path))
    try:
        if not 1 <= page <= len(pdf):
            raise IndexError(f"page {page} is outside 1..{len(pdf)}")
        pg = pdf[page - 1]
        try:
            image = pg.render(scale=dpi / 72).to_pil().convert("RGB")
            boxes = passage_boxes(pg, passage, width=image.width, height=image.height) if passage.strip() else []
        finally:
            pg.close()
    finally:
        pdf.close()
    if boxes:
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        for box in boxes:
            draw.rectangle(box, fill=HIGHLIGHT_RGBA, outline=OUTLINE_RGBA)
        image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), len(boxes)
