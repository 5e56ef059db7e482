"""kernels/ is a leaf like csrc/ (issue 10): it takes plain tensors and imports nothing from engine.
The Triton kernels themselves are tested in test_triton_kernels.py."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def test_kernels_package_imports_nothing_from_engine():
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert len(files) >= 6, files  # the package is where this test thinks it is
    bad = {f.name: m for f in files for m in _imported_modules(f) if m == "engine" or m.startswith("engine.")}
    assert not bad, f"kernels/ must not import engine (one adapter, engine/gpu.py, goes the other way): {bad}"


def test_the_check_sees_an_engine_import(tmp_path):
    """The parser above is not vacuous: each spelling of an engine import is caught."""
    for src in ("import engine.formats", "from engine.reference import apply_activation",
                "import importlib\nimportlib.import_module('engine.ops')"):
        f = tmp_path / "k.py"
        f.write_text(src + "\n")
        assert any(m.startswith("engine") for m in _imported_modules(f)), src


def test_importing_kernels_loads_no_engine_module():
    pytest.importorskip("triton", reason="kernels/ imports its launchers only where triton is installed")
    code = ("import sys, kernels\n"
            "assert kernels.available(), kernels.import_error()\n"
            "from kernels import bsr_linear, csr_linear, epilogue, launch, reduce_epilogue, tuning\n"
            "bad = sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.'))\n"
            "assert not bad, bad\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
