"""The Jinja2 environment over site_templates/ and the static files every site gets a copy of."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import jinja2
from markupsafe import Markup

from featureatlas.text import visible

STATIC_PATTERNS = ("*.css", "*.js")  # as the wheel's package data: every site and every install carry the same files


def templates_dir() -> Path:
    """site_templates/ wherever it is installed (namespace package: editable checkout or wheel)."""
    spec = importlib.util.find_spec("featureatlas.site_templates")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("featureatlas.site_templates is not installed; reinstall featureatlas")
    return Path(list(spec.submodule_search_locations)[0])


def _finalize(value: object) -> object:
    """Every plain string a template prints loses its direction overrides and controls (then is escaped)."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


def last_part(path: str | None) -> str | None:
    """A path of the building machine as a public page shows it: its last part (a folder or file name)."""
    if not path:
        return path
    stripped = path.rstrip("/\\")
    return stripped.replace("\\", "/").rsplit("/", 1)[-1] or path


def make_environment(full_paths: bool = False) -> jinja2.Environment:
    """Autoescaping on for every template: all store strings are untrusted. The `place` filter hides where
    things lie on the building machine (a public site must not leak it) unless full_paths."""
    env = jinja2.Environment(
        finalize=_finalize,
        loader=jinja2.FileSystemLoader(templates_dir()),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["place"] = (lambda path: path) if full_paths else last_part
    return env


def write_page(template: jinja2.Template, path: Path, **context: object) -> int:
    """Render a page (at the site root) to path; returns its size in bytes."""
    data = template.render(root="", **context).encode("utf-8")
    path.write_bytes(data)
    return len(data)


def static_files() -> list[Path]:
    """The stylesheet and the page scripts (site_templates/static/) that the templates link to."""
    folder = templates_dir() / "static"
    return sorted(path for pattern in STATIC_PATTERNS for path in folder.glob(pattern))


def copy_static(site_dir: Path) -> list[Path]:
    """Copy the shared stylesheet and scripts into site_dir/static/."""
    target = site_dir / "static"
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(path, target / path.name)) for path in static_files()]
