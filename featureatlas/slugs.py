"""Folder names for untrusted model and source names: safe on every filesystem and in relative URLs."""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")  # "a..b" is a legal name but looks like path traversal; keep one dot
_MAX_LENGTH = 64
# Names the site itself uses at the top level; a model called "static" must not overwrite the stylesheet.
_RESERVED = {"static", "index.html"}


def slugify(name: str) -> str:
    """Lowercase `[a-z0-9._-]`, never empty, never hidden, never a name the site itself uses."""
    # no leading or trailing dot or dash: never hidden, never `.` or `..`, nothing Windows trims away
    slug = _DOTS.sub(".", _UNSAFE.sub("-", name.lower())).strip(".-")[:_MAX_LENGTH].strip(".-")
    if not slug:
        slug = "x"
    if slug in _RESERVED:
        slug += "-"
    return slug


def unique_slugs(names: Iterable[str]) -> dict[str, str]:
    """Slug per distinct name; names that collide after slugifying get `-2`, `-3`, ... in first-seen order."""
    result: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        if name in result:
            continue
        base = slugify(name)
        slug, n = base, 1
        while slug in taken:
            n += 1
            slug = f"{base}-{n}"
        result[name] = slug
        taken.add(slug)
    return result
