"""The README's Python examples run as written, and its quick start has exactly two command lines."""

from __future__ import annotations

import re
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


def test_docs_python_examples_run() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in sorted(docs.glob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            exec(compile(block, str(page), "exec"), {})
