"""Errors a person reads are one short line: a list of names becomes a count and a few examples, and a message from
elsewhere (diffusers, PEFT) is cut to a bound. The command line, the server and the runtime say names this way."""

from __future__ import annotations

from collections.abc import Iterable

EXAMPLES = 5  # the most names shown of a list
EXAMPLE_CHARS = 160  # ... and the most characters they take (fewer names when they are long)
LINE_CHARS = 360  # the longest message said whole: with "fastcache serve: error: " it fits 400 characters


def count(names: Iterable[object], noun: str, plural: str | None = None) -> str:
    """``"90 modules"``, ``"1 module"``: how many distinct names."""
    number = len({str(name) for name in names})
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def examples(names: Iterable[object], limit: int = EXAMPLES, chars: int = EXAMPLE_CHARS, ordered: bool = False) -> str:
    """``"(a, b, c)"``, or ``"(e.g. a, b, c, d, e)"`` when some are left out: sorted (``ordered``: as given), so a
    message is the same every time; at most ``limit`` names and about ``chars`` characters (a long name is shortened,
    one is always shown)."""
    unique = list(dict.fromkeys(map(str, names))) if ordered else sorted({str(name) for name in names})
    shown: list[str] = []
    for name in unique[:limit]:
        name = name if len(name) <= chars else name[:chars - 1] + "…"
        if shown and sum(len(s) + 2 for s in shown) + len(name) > chars:
            break
        shown.append(name)
    return f"({'e.g. ' if len(shown) < len(unique) else ''}{', '.join(shown)})"


def listing(names: Iterable[object], noun: str, plural: str | None = None, ordered: bool = False) -> str:
    """``"90 modules (e.g. a, b, c)"``: the count and the examples."""
    names = list(names)
    return f"{count(names, noun, plural)} {examples(names, ordered=ordered)}"


def one_line(text: object, limit: int = LINE_CHARS) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 1].rstrip() + "…"
