"""docs/reliability.md names, for every guarantee, the test that holds it: each named test must exist, and
every fault-injection module of tests/reliability must be listed there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"


def _named_tests() -> set[tuple[str, str]]:
    return set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", DOC.read_text()))


def test_every_test_the_guarantees_name_exists() -> None:
    named = _named_tests()
    assert len(named) >= 40, f"docs/reliability.md names only {len(named)} tests"
    missing = []
    for module, name in sorted(named):
        path = ROOT / module
        tree = ast.parse(path.read_text()) if path.is_file() else None
        functions = (
            {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)} if tree else set()
        )
        if name not in functions:
            missing.append(f"{module}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_fault_injection_module_is_documented() -> None:
    listed = {module for module, _ in _named_tests()}
    modules = {f"tests/reliability/{p.name}" for p in (ROOT / "tests" / "reliability").glob("test_*.py")}
    modules.discard("tests/reliability/test_guarantees_doc.py")
    assert modules <= listed, f"not in docs/reliability.md: {sorted(modules - listed)}"
