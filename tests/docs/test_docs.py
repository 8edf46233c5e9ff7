"""The documentation: the site builds with warnings as errors, and its examples run.

Every ```` ```python ```` block of README.md and docs/**/*.md runs on its own in a fresh
interpreter, unless the line directly above its fence is the MyST comment ``% fragment``
(the convention is described in docs/DESIGN.md).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FRAGMENT = "% fragment"

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class CodeBlock:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    fragment: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown file, with their language and fragment mark."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[CodeBlock] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index].strip())
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        info = opening["info"].strip()
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        index += 1  # past the closing fence
        language = info.split()[0].strip("{}") if info else ""
        previous = lines[start - 1].strip() if start > 0 else ""
        blocks.append(
            CodeBlock(path, start + 1, language, "\n".join(body) + "\n", previous == FRAGMENT)
        )
    return blocks


def documents() -> list[Path]:
    pages = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    return [ROOT / "README.md", *pages]


def python_blocks() -> list[CodeBlock]:
    return [
        block
        for path in documents()
        for block in code_blocks(path)
        if block.language in ("python", "py") and not block.fragment
    ]


def test_code_blocks_are_found() -> None:
    # The parser itself: a README without Python examples would make the test below vacuous.
    readme = [b for b in python_blocks() if b.path.name == "README.md"]
    assert len(readme) >= 3
    assert all(b.code.strip() for b in readme)


def test_a_fragment_mark_skips_exactly_the_next_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "% fragment\n```python\nundefined_name\n```\n\n```python\nprint(1)\n```\n",
        encoding="utf-8",
    )
    first, second = code_blocks(page)
    assert (first.fragment, second.fragment) == (True, False)
    assert (first.line, second.line) == (2, 6)
    assert second.code == "print(1)\n"


@pytest.mark.parametrize("block", python_blocks(), ids=lambda block: block.id)
def test_python_block_runs(block: CodeBlock, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (
        f"{block.id} failed (mark it '{FRAGMENT}' if it cannot run alone):\n{done.stderr}"
    )


def test_site_builds_without_warnings(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "reference" / "api.html").is_file()
