"""Every reference a reader meets resolves to something in this repository.

- No source or document cites a document the repository does not hold: the background notes the code was written
  from (their names are assembled below, so that this file does not cite them either).
- Every relative link of README.md and docs/*.md names an existing file or folder, and a `#section` anchor names a
  heading of the linked page (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens).
- Every repository path named in a Python comment or docstring (`gemma4/cache.py`, `docs/loop.md`, `BENCHMARKS.md`,
  `tests/test_target.py::test_rollback_beyond_capacity_is_refused`) exists, and so does the named test.
Oracle: the file system of the checkout.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", ".venv", "venv", "node_modules"}
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith(".")}


def files(*suffixes: str) -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts) or path.suffix not in suffixes:
            continue
        if path.is_file():
            out.append(path)
    return out


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# Names of documents that live outside the repository (split so that this file does not match itself).
DESIGN = "DESIGN" + ".md"
FOREIGN = ["spec " + "\u00a7", "GEMMA4" + "_SPEC", "REAL" + "_CHECKPOINTS", "../" + "shared"]
if not any(ROOT.rglob(DESIGN)):
    FOREIGN.append(DESIGN)


@pytest.mark.parametrize("path", files(".py", ".md"), ids=rel)
def test_no_reference_to_a_document_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    found = [(n + 1, name) for n, line in enumerate(text.splitlines()) for name in FOREIGN if name in line]
    assert not found, f"{rel(path)} cites documents that are not in the repository (line, name): {found}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    out = set()
    in_code = False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_of_the_docs_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        if not linked.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            bad.append(f"{target} (no heading '#{anchor}' in {rel(linked)})")
    assert not bad, f"{rel(doc)} links to what does not exist: {bad}"


# A path inside the repository: starts with one of its top-level folders or is a top-level markdown file.
PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|png|json|jinja|cfg|toml)|[A-Z][A-Z_]*\.md)"
                  r"(?:::(\w+))?")


@pytest.mark.parametrize("path", files(".py"), ids=rel)
def test_paths_named_in_python_sources_exist(path):
    bad = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for name, test in PATH.findall(line):
            first = name.split("/")[0]
            if "/" in name and first not in TOP:
                continue  # not a repository path (a hub file, a path under a user's cache folder)
            target = ROOT / name
            if not target.exists():
                bad.append(f"line {n}: {name}")
            elif test and f"def {test}(" not in target.read_text(encoding="utf-8"):
                bad.append(f"line {n}: {name}::{test} (no such test)")
    assert not bad, f"{rel(path)} names repository files that do not exist: {bad}"


def test_the_checks_see_what_they_should():
    """The scan covers the packages and the docs, and its patterns catch what they are meant to catch."""
    scanned = {rel(p) for p in files(".py", ".md")}
    assert {"gemma4/cache.py", "speculative/loop.py", "docs/loop.md", "README.md"} <= scanned
    assert not any(".egg-info" in p for p in scanned)
    assert PATH.findall(f"see docs/loop.md and tests/test_target.py:" f":test_x, {DESIGN}") == [
        ("docs/loop.md", ""), ("tests/test_target.py", "test_x"), (DESIGN, "")]
    assert LINK.findall("[a](../gemma4/model.py) ![b](figures/round.png) [c](#x)") == [
        "../gemma4/model.py", "figures/round.png", "#x"]
    assert "kv-sharing-store-and-reuse-e2b-e4b" in anchors(ROOT / "docs" / "gemma4.md")
