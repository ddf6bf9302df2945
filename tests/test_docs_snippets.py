"""The Python code blocks of README.md and docs/*.md run as written.

Each ```python block is pasted into its own script, as a reader would paste it, and run in a fresh interpreter;
a page's blocks run in order in one empty folder (the repository's ``analysis/`` and ``hw_profiles/`` linked in,
for the paths the docs use), so a later block may read files an earlier one wrote (``runs/tiny``) but not its
variables. The page has a time limit. Markers, on the line right before a block's opening fence:

    <!-- no-test -->     the block is illustrative and is not run (keep these few; say why next to it)
    <!-- test: slow -->  the page's script takes more than a few seconds: its test is marked slow
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
NO_TEST = "<!-- no-test -->"
SLOW = "<!-- test: slow -->"
TIME_LIMIT_S = {False: 120, True: 600}  # per page: fast, slow


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line
    code: str
    skip: bool
    slow: bool


def blocks(page: Path) -> list[Block]:
    """The page's ```python blocks with their markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(Block(str(page.relative_to(ROOT)), i + 2, "\n".join(lines[i + 1:j]), before == NO_TEST,
                             before == SLOW))
            i = j
        i += 1
    return out


def _params():
    for page in PAGES:
        bs = blocks(page)
        if not any(not b.skip for b in bs):
            continue
        slow = any(b.slow for b in bs if not b.skip)
        yield pytest.param(page, id=str(page.relative_to(ROOT)), marks=[pytest.mark.slow] if slow else [])


def test_markers_are_few_and_well_formed():
    """Opt-outs stay rare, and a marker always sits right before a python block (a typo would silently run or
    skip the wrong thing)."""
    all_blocks = [b for p in PAGES for b in blocks(p)]
    assert len(all_blocks) >= 5
    assert sum(b.skip for b in all_blocks) <= 2
    for p in PAGES:
        lines = p.read_text(encoding="utf-8").splitlines()
        for i, ln in enumerate(lines):
            if ln.strip() in (NO_TEST, SLOW):
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                assert FENCE.match(nxt), f"{p.relative_to(ROOT)}:{i + 1}: marker not followed by a ```python block"


@pytest.mark.parametrize("page", list(_params()))
def test_page_python_blocks_run(page: Path, tmp_path: Path):
    import time

    bs = [b for b in blocks(page) if not b.skip]
    for name in ("analysis", "hw_profiles"):
        (tmp_path / name).symlink_to(ROOT / name)
    slow = any(b.slow for b in bs)
    deadline = time.monotonic() + TIME_LIMIT_S[slow]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k, b in enumerate(bs):
        path = tmp_path / f"block{k}.py"
        path.write_text(b.code + "\n")
        try:
            r = subprocess.run([sys.executable, path.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{page.relative_to(ROOT)}: its python blocks did not finish in {TIME_LIMIT_S[slow]} s "
                        f"(stopped in the block at {b.page}:{b.line})")
        if r.returncode != 0:
            lines = [int(m) for m in re.findall(rf'File ".*{path.name}", line (\d+)', r.stderr)]
            at = f"{b.page}:{b.line + lines[-1] - 1}" if lines else f"{b.page}:{b.line}"
            pytest.fail(f"the python block's line {at} fails (exit code {r.returncode}):\n{r.stderr[-3000:]}")
