"""The docs cannot drift from the tree: every repository path they name exists, and every relative
markdown link (and its #anchor) resolves. CPU only, no imports of the package."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
TOP = r"(?:tilert|models|passes|benchmarks|scripts|tests|docs)"
EXT = r"(?:py|md|sh|json|gz|png|txt|toml|cu)"
# a path in running text or code: a top-level folder, then path characters (braces: {a,b} lists),
# ending in a known extension
PATH = re.compile(rf"(?<![\w/.-]){TOP}/[\w./{{}},-]*\.{EXT}(?![\w/<>{{}}-])")
# a folder named alone in backticks: `tilert/ir`, `models/`
FOLDER = re.compile(rf"`({TOP}/[\w/-]*)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXAMPLES = {"passes/drop_unit_scale.py"}  # files a walkthrough creates (docs/passes.md, "Writing a new pass")


def expand(token: str) -> list[str]:
    """`a/{b,c}.py` -> [a/b.py, a/c.py] (several brace lists multiply)."""
    parts = re.split(r"\{([^{}]*)\}", token)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def named_paths(text: str) -> set[str]:
    out = {p for m in PATH.finditer(text) for p in expand(m.group())}
    return out | {m.group(1) for m in FOLDER.finditer(text)}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (underscores are word
    characters: they stay), spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(path.read_text())}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(doc: Path) -> None:
    missing = sorted(p for p in named_paths(doc.read_text()) - EXAMPLES if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading with that anchor)")
    assert not bad, f"{doc.relative_to(ROOT)} has broken links: {bad}"


def test_checks_can_fail(tmp_path: Path) -> None:
    """The path and anchor rules themselves: a missing path and a wrong anchor are found."""
    text = "see `tilert/no_such_module.py` and tilert/kernels/{common,nope}.py, `tilert/ir`"
    assert named_paths(text) == {"tilert/no_such_module.py", "tilert/kernels/common.py", "tilert/kernels/nope.py",
                                 "tilert/ir"}  # fmt: skip
    assert slug("The plan (`tilert/plan.py`)") == "the-plan-tilertplanpy"
    assert "the-plan-tilertplanpy-and-the-task-table-tilertabipy" in anchors(ROOT / "docs" / "architecture.md")
    assert "no-such-heading" not in anchors(ROOT / "docs" / "architecture.md")
