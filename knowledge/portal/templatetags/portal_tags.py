"""Template helpers: answer text with its verified citation markers as links (everything else escaped)."""
from __future__ import annotations

import re

from django import template
from django.utils.html import escape, format_html
from django.utils.safestring import mark_safe

register = template.Library()
_MARK = re.compile(r"\[(\d+)\]")


@register.filter
def cite_links(text: str, citations) -> str:
    """Escape text; turn [n] into a link to its cited page when n is a verified citation."""
    by_n = {int(c["n"]): c for c in (citations or [])}
    out, last = [], 0
    for m in _MARK.finditer(text or ""):
        out.append(escape(text[last : m.start()]))
        c = by_n.get(int(m.group(1)))
        if c:
            out.append(format_html('<a class="cite" href="{}" title="{} p. {}">[{}]</a>', c["url"], c["title"],
                                   c.get("page_start") or "", c["n"]))
        last = m.end()
    out.append(escape((text or "")[last:]))
    return mark_safe("".join(out))
