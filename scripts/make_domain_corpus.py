#!/usr/bin/env python
"""Build the domain corpora of BENCHMARKS.md section 7 from files on this machine, as JSONL for train_drafter.py.

    python scripts/make_domain_corpus.py prose corpus/prose.jsonl   # licence texts of the installed packages
    python scripts/make_domain_corpus.py c corpus/c.jsonl           # CPython's C headers (include/python3.X/)
    python scripts/make_domain_corpus.py json corpus/json.jsonl     # JSON files of the installed packages

Three domains the bundled drafter (trained on Python source) never saw:

- prose: every `LICEN*` file under this Python's `site-packages/*.dist-info/`, one per wording (two texts that
  differ only in their copyright lines, case, punctuation or spacing are one licence: the MIT licence of fifty
  packages is one text);
- c: every file under this Python's `include/python3.X/`, the C API headers;
- json: the `*.json` files under `site-packages` of at most 64 kB, in the order of their path's SHA-256 (so that no
  one package's schemas fill the corpus), until 1,000,000 characters, one per content.

Each text is cut at paragraph ends (blank lines; at line ends where a paragraph is longer) into documents of about
--chars characters, so that train_drafter.py's split by text hash holds out whole passages, not whole files, and
its prompts (cut at random from held-out documents) have text around them. One JSON line {"text": ...} per document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path

JSON_MAX_FILE = 64_000
JSON_TOTAL = 1_000_000


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def readable(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def wording(text: str) -> str:
    """The words of a licence, its copyright lines aside: the key two copies of one licence share."""
    lines = (line for line in text.lower().splitlines() if "copyright" not in line)
    return " ".join(re.findall(r"[a-z]+", " ".join(lines)))


def unique(texts, key) -> list[str]:
    seen, out = set(), []
    for text in texts:
        k = key(text)
        if text.strip() and k not in seen:
            seen.add(k)
            out.append(text)
    return out


def prose_texts() -> list[str]:
    files = sorted(p for d in site_packages().glob("*.dist-info") for p in d.rglob("LICEN*") if p.is_file())
    return unique(filter(None, map(readable, files)), wording)


def c_texts() -> list[str]:
    include = Path(sysconfig.get_paths()["include"])
    return unique(filter(None, map(readable, sorted(p for p in include.rglob("*") if p.is_file()))), lambda t: t)


def json_texts() -> list[str]:
    files = [p for p in site_packages().rglob("*.json") if p.is_file() and p.stat().st_size <= JSON_MAX_FILE]
    files.sort(key=lambda p: hashlib.sha256(str(p.relative_to(site_packages())).encode()).hexdigest())
    out, total = [], 0
    for text in unique(filter(None, map(readable, files)), lambda t: t):
        if total >= JSON_TOTAL:
            break
        out.append(text)
        total += len(text)
    return out


def pieces(text: str) -> list[str]:
    """Paragraphs with the blank lines after them; a paragraph longer than 2,000 characters split into lines."""
    out = []
    for paragraph in re.split(r"(?<=\n\n)", text):
        out += [paragraph] if len(paragraph) <= 2000 else paragraph.splitlines(keepends=True)
    return out


def documents(text: str, chars: int) -> list[str]:
    """`text` cut at paragraph ends into documents of at least `chars` characters (the last one may be shorter)."""
    docs, current = [], ""
    for piece in pieces(text):
        current += piece
        if len(current) >= chars:
            docs.append(current)
            current = ""
    if current.strip():
        docs.append(current)
    return docs


DOMAINS = {"prose": prose_texts, "c": c_texts, "json": json_texts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("domain", choices=sorted(DOMAINS))
    p.add_argument("out", type=Path, help="the JSONL file to write")
    p.add_argument("--chars", type=int, default=2000, help="characters per document (default 2000)")
    args = p.parse_args(argv)
    texts = DOMAINS[args.domain]()
    docs = [d for t in texts for d in documents(t, args.chars)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"{args.domain}: {len(texts)} texts, {len(docs)} documents, {sum(map(len, docs)):,} characters -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
