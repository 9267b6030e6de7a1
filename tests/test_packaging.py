"""One namespace, nothing shadowing PyPA's `build`, and a wheel that carries templates, assets and the schema."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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
    for expected in ["featureatlas/cli.py", "featureatlas/__main__.py", "featureatlas/harvest/topk.py",
                     "featureatlas/harvest/native.cpp",
                     "featureatlas/store/schema.sql", "featureatlas/build/site.py",
                     "featureatlas/site_templates/unit.html", "featureatlas/site_templates/static/site.js",
                     "featureatlas/site_templates/static/style.css"]:
        assert expected in names, expected
    assert not any(name.startswith(("build/", "harvest/", "tests/")) for name in names)


def test_every_command_has_help() -> None:
    for command in ([], ["harvest"], ["build"], ["serve"], ["info"], ["demo"]):
        out = subprocess.run([sys.executable, "-m", "featureatlas", *command, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("usage: featureatlas")
