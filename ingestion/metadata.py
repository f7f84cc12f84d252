"""Document metadata from its first pages: company, ticker, form, fiscal period, date, language."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path

from ingestion.elements import Element

_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
_DATE = re.compile(r"\b(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?\s+(\d{1,2}),?\s+(\d{4})\b")
_NUM_DATE = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
_FORM = re.compile(r"\bFORM\s+(10-K|10-Q|8-K|20-F|6-K|10-KT|10-QT)\b", re.I)
_QUARTER_WORD = {"first": 1, "second": 2, "third": 3, "fourth": 4}
_Q_FISCAL = re.compile(r"\b(first|second|third|fourth)[-\s]quarter\b[^.]{0,80}?\b(?:fiscal(?: year)?|FY)\s?'?(\d{4}|\d{2})\b", re.I)
_Q_YEAR = re.compile(r"\b(first|second|third|fourth)[-\s]quarter(?:\s+of)?\s+(?:fiscal\s+)?(\d{4})\b", re.I)
_Q_SHORT = re.compile(r"\bQ([1-4])\s?(?:FY|F)?'?(\d{4}|\d{2})\b")
_QUARTER_ENDED = re.compile(r"quarterly period ended\s+(.{6,30}?\d{4})", re.I)
_YEAR_ENDED = re.compile(r"fiscal year ended\s+(.{6,30}?\d{4})", re.I)
_DATE_OF_REPORT = re.compile(r"Date of Report[^:]{0,60}:\s*(.{6,30}?\d{4})", re.I)
_EXCHANGE_TICKER = re.compile(r"\((?:NYSE|NASDAQ|Nasdaq|NYSE American|Nasdaq GS|TSX|LSE)\s*:\s*([A-Z][A-Z.]{0,5})\)")
_SUFFIX = re.compile(r"(?<=\s)(Inc\.|Inc\b|Incorporated\b|Corporation\b|Corp\.|Company\b|Co\., Inc\.|plc\b|PLC\b|Ltd\.|Limited\b|N\.V\.|S\.A\.|AG\b|SE\b)")
_EXCHANGE_NAME = re.compile(
    r"([A-Z][\w&'.-]*(?:,?\s[A-Z][\w&'.-]*){0,5}),?\s*(?:\([^()]{0,60}\)\s*)?\((?:NYSE|NASDAQ|Nasdaq|NYSE American|Nasdaq GS)\s*:")
_NAME_STOP = {"news", "release", "per", "share", "reports", "report", "the", "founder", "chairman", "for", "immediate",
              "announces", "diluted", "and", "of", "contact", "information", "exhibit"}
_TICKER_STOP = {"NYSE", "LLC", "THE", "INC", "NA", "OF", "AND", "PLC", "CT", "SEC", "USD", "II", "III", "LP"}
_FILENAME_PERIOD = re.compile(r"(?<!\d)(\d{4})[ _-]?Q([1-4])(?!\d)", re.I)
_FILENAME_FY = re.compile(r"FY[ _-]?(\d{4})", re.I)
_FILENAME_FORM = re.compile(r"(?<![A-Z0-9])(10-?K|10-?Q|8-?K)(?![A-Z0-9])", re.I)


def _parse_date(text: str) -> dt.date | None:
    m = _DATE.search(text)
    try:
        if m:
            return dt.date(int(m.group(3)), _MONTHS[m.group(1)[:3].lower()], int(m.group(2)))
        m = _NUM_DATE.search(text)
        if m:
            return dt.date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
    except ValueError:
        return None
    return None


def detect_language(text: str) -> str:
    """"zh"/"ja"/"ko" by script ratio, else langdetect (seeded), else "en"."""
    letters = [ch for ch in text[:5000] if ch.isalpha()]
    if letters:
        han = sum(1 for ch in letters if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
        kana = sum(1 for ch in letters if "\u3040" <= ch <= "\u30ff")
        hangul = sum(1 for ch in letters if "\uac00" <= ch <= "\ud7af")
        if hangul > 0.2 * len(letters):
            return "ko"
        if kana > 0.05 * len(letters) and han + kana > 0.2 * len(letters):
            return "ja"
        if han > 0.2 * len(letters):
            return "zh"
    try:
        from langdetect import DetectorFactory, detect

        DetectorFactory.seed = 0
        return detect(text[:3000]) if letters else "en"
    except Exception:  # langdetect raises LangDetectException on featureless text
        return "en"


def _doc_type(head: str, filename: str) -> str:
    form = _FORM.search(head[:8000])
    if form:
        code = form.group(1).upper()
        return {"10-K": "10-K", "10-KT": "10-K", "10-Q": "10-Q", "10-QT": "10-Q", "8-K": "8-K", "20-F": "annual report"}.get(code, "other")
    low = head[:4000].lower()
    if re.search(r"price target|target price|analyst certification|equity research|rating:\s*(buy|sell|hold|overweight|underweight|neutral)", low):
        return "broker research"
    if re.search(r"\b(reports?|announces?|reported|announced)\b[^.]{0,120}\b(results|earnings)\b", low) or (
        re.search(r"news release|press release", low) and "results" in low):
        return "earnings release"
    if "annual report" in low:
        return "annual report"
    fm = _FILENAME_FORM.search(filename)
    if fm:
        return fm.group(1).upper().replace("10K", "10-K").replace("10Q", "10-Q").replace("8K", "8-K")
    if "earnings" in filename.lower():
        return "earnings release"
    return "other"


def _fiscal_period(head: str, doc_type: str, filename: str) -> str | None:
    if doc_type == "10-K":
        m = _YEAR_ENDED.search(head)
        d = _parse_date(m.group(1)) if m else None
        if d:
            return f"FY{d.year}"
    if doc_type == "10-Q":
        m = _QUARTER_ENDED.search(head)
        d = _parse_date(m.group(1)) if m else None
        if d:
            return f"{d.year}Q{(d.month - 1) // 3 + 1}"
    for rx in (_Q_FISCAL, _Q_YEAR):
        m = rx.search(head)
        if m:
            year = int(m.group(2))
            return f"{year + 2000 if year < 100 else year}Q{_QUARTER_WORD[m.group(1).lower()]}"
    m = _Q_SHORT.search(head)
    if m:
        year = int(m.group(2))
        return f"{year + 2000 if year < 100 else year}Q{m.group(1)}"
    m = _FILENAME_PERIOD.search(filename)
    if m:
        return f"{m.group(1)}Q{m.group(2)}"
    m = _FILENAME_FY.search(filename) or _YEAR_ENDED.search(head)
    if m:
        d = _parse_date(m.group(1)) if not m.group(1).isdigit() else None
        return f"FY{d.year if d else m.group(1)}"
    return None


def _report_date(head: str, doc_type: str) -> str | None:
    for rx in ((_DATE_OF_REPORT,) if doc_type == "8-K" else ()) + ((_QUARTER_ENDED, _YEAR_ENDED) if doc_type in ("10-Q", "10-K") else ()):
        m = rx.search(head)
        d = _parse_date(m.group(1)) if m else None
        if d:
            return d.isoformat()
    d = _parse_date(head[:3000])
    return d.isoformat() if d else None


def _company(elements: Sequence[Element], head: str, filename: str) -> str | None:
    for i, el in enumerate(elements[:120]):
        low = el.text.lower()
        k = low.find("exact name of")
        if k < 0:
            continue
        before = el.text[:k].strip(" (\n")
        if before:
            return before.splitlines()[-1].strip()
        if i > 0:
            return elements[i - 1].text.strip().splitlines()[-1]
    m = _EXCHANGE_NAME.search(head[:6000])
    if m:
        return " ".join(m.group(1).split())
    for m in _SUFFIX.finditer(head[:4000]):
        words = re.split(r"[ \t]+", head[:m.start()].rstrip().split("\n")[-1])
        name: list[str] = []
        for word in reversed(words[-4:]):
            if not word[:1].isupper() or word.strip(",.").lower() in _NAME_STOP:
                break
            name.insert(0, word)
        if name:
            return " ".join(name + [m.group(1)])
    stem = Path(filename).stem.split("_")[0]
    if stem.isalpha() and (_FILENAME_PERIOD.search(filename) or _FILENAME_FORM.search(filename)):
        return stem.title()
    return None


def _ticker(head: str) -> str | None:
    m = _EXCHANGE_TICKER.search(head)
    if m:
        return m.group(1)
    k = head.lower().find("trading symbol")
    if k >= 0:
        seg = head[k + len("trading symbol"):k + 700]
        j = seg.lower().find("on which registered")
        seg = seg[j + len("on which registered"):] if 0 <= j < 200 else seg
        for tok in re.findall(r"(?<![\w$.])[A-Z]{2,5}(?![\w])", seg):
            if tok not in _TICKER_STOP:
                return tok
    return None


def _title(elements: Sequence[Element], *, company: str | None, doc_type: str, period: str | None, filename: str) -> str:
    if doc_type in ("10-K", "10-Q", "8-K") and company:
        return f"{company} Form {doc_type}" + (f" ({period})" if period else "")
    for el in elements[:40]:
        if el.type == "Title" and el.page == elements[0].page and 10 <= len(el.text) <= 200 and len(el.text.split()) >= 2:
            return " ".join(el.text.split())
    return Path(filename).stem


def extract_metadata(elements: Sequence[Element], *, filename: str) -> dict:
    """title, company, ticker, doc_type, fiscal_period, report_date (ISO or None), language."""
    first_pages = [el for el in elements if el.page <= (elements[0].page + 2 if elements else 3)]
    head = "\n".join(el.text for el in first_pages)[:20000]
    doc_type = _doc_type(head, filename)
    period = _fiscal_period(head, doc_type, filename)
    company = _company(first_pages, head, filename)
    return {
        "title": _title(elements, company=company, doc_type=doc_type, period=period, filename=filename),
        "company": company,
        "ticker": _ticker(head),
        "doc_type": doc_type,
        "fiscal_period": period,
        "report_date": _report_date(head, doc_type),
        "language": detect_language("\n".join(el.text for el in elements[:200])),
    }
