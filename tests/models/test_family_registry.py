"""The model-family registry: built-ins found by name and by --arch prefix, and no family knowledge
outside engine/models (the smell this layout removes: `if family == "bert"` elsewhere)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.convert import parse_arch
from engine.checkpoint import Checkpoint
from engine.models import ArchError, Family, families, family_for_arch, get_family

ENGINE = Path(__file__).resolve().parents[2] / "engine"
BUILTIN = {"mlp", "bert", "custom"}


def test_builtins_are_registered_and_found_by_arch_prefix():
    assert BUILTIN <= {f.name for f in families()}
    assert all(isinstance(f, Family) for f in families())
    assert family_for_arch("module") is get_family("custom")
    assert family_for_arch("mlp") is get_family("mlp")
    assert family_for_arch("custom") is None  # the custom family is named `module:` on --arch


def test_parse_arch_asks_the_families():
    ck = Checkpoint("hf", {}, hf_config={"model_type": "bert"})
    assert parse_arch(None, ck) == (get_family("bert"), {})
    assert parse_arch("mlp:gelu", ck) == (get_family("mlp"), {"activation": "gelu"})
    assert parse_arch("module:pkg.mod:make", ck) == (get_family("custom"), {"factory": "pkg.mod:make"})
    with pytest.raises(ArchError, match="the bert family takes no option"):
        parse_arch("bert:large", ck)
    with pytest.raises(ArchError, match=r"model_type 'gpt2', which no registered family recognises"):
        parse_arch(None, Checkpoint("hf", {}, hf_config={"model_type": "gpt2"}))


def _family_branches(path: Path) -> list[str]:
    """Comparisons against a built-in family's name, e.g. `name == "bert"` or `x in ("mlp", ...)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(v, ast.Constant) and v.value in BUILTIN for v in values):
                    found.append(f"{path}:{node.lineno}")
    return found


def test_no_family_branches_outside_engine_models():
    files = [p for p in ENGINE.rglob("*.py") if "models" not in p.relative_to(ENGINE).parts]
    assert len(files) > 20  # the walk really saw the package
    branches = [hit for p in files for hit in _family_branches(p)]
    assert branches == [], f"family knowledge outside engine/models: {branches}"


def test_the_branch_finder_finds_a_branch(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text('if spec["family"] == "bert":\n    pass\nok = name in ("a", "mlp")\nfine = name == "bertha"\n')
    assert _family_branches(bad) == [f"{bad}:1", f"{bad}:3"]
