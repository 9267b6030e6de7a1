"""Untrusted token strings as safe, visible HTML: whitespace shown, controls and direction overrides defused.

Everything invisible or layout-changing is drawn inside `<i>`: whitespace as a symbol (newline \u23ce, space
\u00b7, tab \u21e5), anything else as an escape (`\\x00`, `\\u202e`); the glyph is marked, so it cannot be mistaken
for the characters it stands for.
"""

from __future__ import annotations

import re

from markupsafe import escape

# Characters that are invisible, reorder the surrounding text or break the layout.
_HIDDEN = (
    "\x00-\x1f\x7f-\x9f"  # C0 and C1 controls, newline and tab among them
    "\u00ad\u061c\u180e"  # soft hyphen, Arabic letter mark, Mongolian vowel separator
    "\u200b\u200e\u200f"  # zero-width space, left-to-right and right-to-left marks
    "\u2028-\u202e"  # line and paragraph separators, bidi embeddings and overrides
    "\u2060-\u2064\u2066-\u2069"  # word joiner, invisible operators, bidi isolates
    "\ufeff\ufff9-\ufffb"  # byte order mark, interlinear annotation
    "\U000e0000-\U000e007f"  # tag characters
)
# In ordinary tokens a single space stays a space; runs of spaces and hidden characters become glyphs.
_SPECIAL = re.compile(f"[{_HIDDEN}]+| {{2,}}")
# In whitespace-only tokens every space is drawn, so " \n" does not look like "\n".
_SPECIAL_IN_BLANK = re.compile(f"[{_HIDDEN} ]+")
_GLYPHS = {"\n": "\u23ce", " ": "\u00b7", "\t": "\u21e5", "\r": "\\r"}


def _glyph(char: str) -> str:
    """One character's visible stand-in: a symbol for whitespace, a Python-style escape for the rest.

    Escapes rather than Unicode control pictures (U+2400...): common fonts lack those and would draw boxes.
    """
    glyph = _GLYPHS.get(char)
    if glyph is not None:
        return glyph
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _pattern(token: str) -> re.Pattern[str]:
    return _SPECIAL if token.strip(" \t\n\r") else _SPECIAL_IN_BLANK


def token_html(token: str) -> str:
    """Escaped HTML for a token in a context; a newline glyph is followed by a real line break."""
    parts: list[str] = []
    last = 0
    for match in _pattern(token).finditer(token):
        parts.append(str(escape(token[last:match.start()])))
        glyphs = "".join(_glyph(c) + ("\n" if c == "\n" else "") for c in match.group())
        parts.append(f"<i>{glyphs}</i>")
        last = match.end()
    parts.append(str(escape(token[last:])))
    return "".join(parts)


def token_text(token: str) -> str:
    """Escaped one-line text for a token in a snippet: every special character as a glyph, no markup."""
    shown = _pattern(token).sub(lambda m: "".join(map(_glyph, m.group())), token)
    return str(escape(shown))


_HIDDEN_CHAR = re.compile(f"[{_HIDDEN}]")


def visible(text: str) -> str:
    """Any untrusted one-line string (model, document name) with hidden characters as glyphs; not escaped."""
    return _HIDDEN_CHAR.sub(lambda m: _glyph(m.group()), text) if _HIDDEN_CHAR.search(text) else text


# Controls (escape sequences could move the cursor, retitle or "paste" into the terminal) and bidi overrides.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def terminal_text(value: object) -> str:
    """A store's value as text safe to print: every control or direction override as a visible \\x or \\u
    escape."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))
