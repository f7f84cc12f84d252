"""Plain data records passed between the ingestion stages (no Django, no Celery)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Element:
    """One piece of a document as read: a paragraph, heading, list item, table..."""

    text: str
    type: str  # unstructured category: Title, NarrativeText, ListItem, Table, Header, Footer, ...
    page: int = 1  # 1-based; 1 for formats without pages
    level: int | None = None  # heading depth where known (0 = top)
    html: str | None = None  # tables only: the table as HTML


@dataclass(slots=True)
class Chunk:
    """A retrieval unit: consecutive text of one section within a token budget."""

    text: str
    page_start: int
    page_end: int
    heading_path: list[str] = field(default_factory=list)
    element_types: list[str] = field(default_factory=list)
    token_count: int = 0
