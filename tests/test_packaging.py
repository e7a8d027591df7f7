"""The package layout: every subpackage is installed, and the CLI loads without heavy imports."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"decodekit"} | {"decodekit." + ".".join(p.parent.relative_to(ROOT).parts)
                             for top in ("export", "graphs", "runtime", "tools") for p in (ROOT / top).rglob("__init__.py")}
    assert found == listed


def test_help_imports_no_heavy_backend():
    code = ("import sys; from decodekit.tools.cli import cli; "
            "cli.main(['--help'], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt_rtx', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_bad_option_is_one_line():
    r = subprocess.run([sys.executable, "-m", "decodekit", "generate", "x", "--backend", "onnx"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "onnx" in r.stderr  # usage error: 2
