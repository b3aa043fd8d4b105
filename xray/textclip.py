"""Shorten a text (an error message) without cutting a sentence in half.

    clip_text(message, 300)   # whole when it fits, else up to a sentence / clause end + " [...]"

Error texts from a hostile corpus can be long (a model file names its own globals, a path can be
any length); a reader needs the whole first sentence, not the first N characters of it.
"""
from __future__ import annotations

MAX_ERROR_CHARS = 2000  # generous: a real error's first sentence fits whole
ELLIPSIS = " [...]"
# Cut points, best first: the end of a sentence, of a clause, of a word.
_BOUNDARIES = ((". ", "! ", "? "), ("; ", ": ", ", "), (" ",))


def clip_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` itself when it has at most `limit` characters, else its longest prefix ending at a
    sentence end (or, when that keeps less than half, a clause end, then a word end) followed by
    " [...]"; the result never exceeds `limit`."""
    if len(text) <= limit:
        return text
    head = text[:max(0, limit - len(ELLIPSIS))]
    latest = -1
    for ends in _BOUNDARIES:
        cut = max(head.rfind(end) for end in ends)
        if cut >= len(head) // 2:
            return head[:cut + 1].rstrip() + ELLIPSIS
        latest = max(latest, cut)
    if latest > 0:
        return head[:latest + 1].rstrip() + ELLIPSIS
    return head + ELLIPSIS  # one unbroken token: nothing better to cut at
