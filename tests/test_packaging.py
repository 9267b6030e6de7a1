"""One namespace, nothing shadowing PyPA's `build`, and a wheel that carries templates, assets and the schema."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_build_from_repo_root_finds_pypa_build() -> None:
    out = subprocess.run([sys.executable, "-c", "import build, featureatlas.build.site as s; "
                          "print(build.__file__); print(s.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" in out[0] and Path(out[0]).parent.name == "build"
    assert Path(out[1]) == ROOT / "build" / "site.py"


def test_wheel_carries_package_data(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), "."],
                   cwd=ROOT, capture_output=True, check=True)
    (wheel,) = tmp_path.glob("featureatlas-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = [f"featureatlas/site_templates/static/{path.name}" for path in (ROOT / "site_templates/static").iterdir()]
    assert "featureatlas/site_templates/static/core.js" in static
    for expected in ["featureatlas/cli.py", "featureatlas/__main__.py", "featureatlas/commands/options.py",
                     "featureatlas/commands/harvest.py", "featureatlas/harvest/config.py",
                     "featureatlas/harvest/topk.py", "featureatlas/harvest/native.cpp",
                     "featureatlas/store/schema.sql", "featureatlas/build/site.py",
                     "featureatlas/site_templates/unit.html", *static]:
        assert expected in names, expected
    assert not any(name.startswith(("build/", "harvest/", "tests/")) for name in names)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """The list of commands from `python -m featureatlas`, and each command's own page (read in this process: the
    same parser, without a Python start per command): its usage, description and options."""
    from featureatlas.cli import COMMANDS, main

    listing = subprocess.run([sys.executable, "-m", "featureatlas", "--help"], capture_output=True, text=True,
                             check=True).stdout
    assert listing.startswith("usage: featureatlas") and all(f"\n    {name}" in listing for name in COMMANDS)
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit.value.code == 0
        assert out.startswith(f"usage: featureatlas {command} [-h]"), out
        assert "\noptions:\n  -h, --help" in out, out
