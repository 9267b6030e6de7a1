"""The layers import one way: loading and the store at the bottom, harvest on them, the site, exports and
annotations on the store, the server above those, the command line and notebook API on top. A new import that
points the wrong way fails here, naming the file and the line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder of the repository -> package under featureatlas (see pyproject.toml).
FOLDERS = {"featureatlas": "featureatlas", "load": "featureatlas.load", "store": "featureatlas.store",
           "harvest": "featureatlas.harvest", "build": "featureatlas.build", "export": "featureatlas.export",
           "annotate": "featureatlas.annotate", "explain": "featureatlas.explain", "serve": "featureatlas.serve",
           "site_templates": "featureatlas.site_templates"}
TOP = ("featureatlas.cli", "featureatlas.__main__", "featureatlas.notebook", "featureatlas.commands")
LAYERS = ("load", "store", "harvest", "build", "export", "annotate", "explain", "serve", "site_templates")
# What each layer may import besides itself and the core (featureatlas.errors, .atomic, .text, ...).
ALLOWED = {
    "core": set(),
    "load": set(),
    "store": set(),
    "harvest": {"load", "store"},
    "build": {"store", "site_templates"},
    "site_templates": set(),
    "export": {"store"},
    "annotate": {"store"},
    "explain": {"load", "store", "annotate"},
    "serve": {"load", "store", "harvest"},
    "top": set(LAYERS) | {"top"},
}


def layer_of(module: str) -> str:
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return "top"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "core"


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            name = ".".join([package, *relative.parts]).removesuffix(".__init__")
            found.append((name, path))
    return found


def imports(path: Path) -> list[tuple[int, str]]:
    result = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            result += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            result += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in result if name.split(".")[0] == "featureatlas"]


def test_every_import_points_down() -> None:
    wrong = []
    for module, path in modules():
        mine = layer_of(module)
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs not in ALLOWED[mine] | {mine, "core"}:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} ({theirs})")
    assert not wrong, "imports that point the wrong way:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from featureatlas.harvest.probe import Prober\nimport featureatlas.store.schema\n")
    found = [(layer_of(target), line) for line, target in imports(bad)]
    assert found == [("harvest", 1), ("store", 2)]
    assert "harvest" not in ALLOWED["build"] and layer_of("featureatlas.commands.probe") == "top"
    assert layer_of("featureatlas.errors") == "core" and layer_of("featureatlas.load.models") == "load"


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """A name that starts with an underscore is its module's own; another module needing it means it belongs
    in a public interface."""
    wrong = []
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featureatlas"):
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}"
                          for alias in node.names if alias.name.startswith("_") and node.module != module]
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)
