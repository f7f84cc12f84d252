"""Report exports: Markdown and DOCX (python-docx), each with its sources list."""
from __future__ import annotations

import io

from docx import Document as DocxDocument

from knowledge.reports.models import Report


def _source_line(s: dict) -> str:
    pages = f"p. {s.get('page_start')}" + (f"–{s['page_end']}" if s.get("page_end") not in (None, s.get("page_start")) else "")
    return f"[{s['n']}] {s.get('title', '')}, {pages}"


def report_markdown(*, report: Report) -> str:
    lines = [f"# {report.title}", ""]
    if report.summary:
        lines += ["## Executive summary", "", report.summary, ""]
    for sec in report.sections:
        lines += [f"## {sec['heading']}", "", sec.get("text", ""), ""]
    if report.sources:
        lines += ["## Sources", ""] + [f"- {_source_line(s)}" for s in report.sources]
    return "\n".join(lines).rstrip() + "\n"


def report_docx(*, report: Report) -> bytes:
    doc = DocxDocument()
    doc.add_heading(report.title, level=0)
    if report.summary:
        doc.add_heading("Executive summary", level=1)
        doc.add_paragraph(report.summary)
    for sec in report.sections:
        doc.add_heading(sec["heading"], level=1)
        for para in (sec.get("text") or "").split("\n\n"):
            doc.add_paragraph(para)
    if report.sources:
        doc.add_heading("Sources", level=1)
        for s in report.sources:
            doc.add_paragraph(_source_line(s), style="List Number")
    buf = io.BytesIO()
    doc.save(buf)
    return buf.getvalue()
