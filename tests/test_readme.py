"""The README's Python examples run as written, and its quick start has exactly two command lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_quick_start_is_two_command_lines() -> None:
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert lines[0].endswith("dmlkit train") and "constraints.txt" in lines[0]
    assert "[dev]" in lines[1] and "pytest" in lines[1]


#: Pages whose examples register names in the global registries run in a process of their own.
ISOLATED = ("CONVENTIONS.md",)


def test_docs_python_examples_run() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in sorted(docs.glob("*.md")):
        if page.name in ISOLATED:
            continue
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            exec(compile(block, str(page), "exec"), {})


def test_isolated_docs_examples_run(tmp_path) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    for name in ISOLATED:
        blocks = re.findall(r"```python\n(.*?)```", (docs / name).read_text(), re.S)
        assert blocks, name
        script = tmp_path / f"{Path(name).stem}.py"
        script.write_text("\n\n".join(blocks))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}:\n{done.stderr[-3000:]}"
