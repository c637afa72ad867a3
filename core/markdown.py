"""Untrusted text as safe inline Markdown, for every report the project writes (eval, pairs, ablation)."""
from __future__ import annotations

import html
import re

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_escape(text, max_chars: int | None = None) -> str:
    """Untrusted text → safe inline Markdown: truncated to ``max_chars`` (with …), Markdown specials
    (``\\ ` * _ { } [ ] ( ) # + ! | ~``) backslash-escaped, then ``& < >`` HTML-escaped (no tag can form, so
    quotes need no escaping), newlines → ``⏎``."""
    s = "" if text is None else str(text)
    if max_chars is not None and len(s) > max_chars:
        s = s[:max_chars] + "…"
    s = _MD_SPECIAL.sub(r"\\\1", s)
    s = html.escape(s, quote=False)  # after the Markdown escapes, so entities are never broken by a backslash
    return s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ⏎ ")
