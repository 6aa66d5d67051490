"""Every relative link in README.md, BENCHMARKS.md and docs/**/*.md points to a file that exists,
and every #anchor to a heading of that file (GitHub's heading ids), so moving or renaming a page
or a heading cannot leave a dead link behind. Also: the README keeps the two blocks CI runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's id for a heading: inline markup dropped, lower case, punctuation removed
    (letters of any script, digits, spaces, '-' and '_' kept), each space a hyphen."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a markdown file's headings, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    """(line number, target) of every link outside code blocks and code spans."""
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            yield n, m.group(1)


def broken_links(path: Path) -> list[str]:
    bad = []
    cache: dict[Path, set[str]] = {}
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                bad.append(f"{where} (an anchor into a file that is not markdown)")
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                bad.append(f"{where} (no heading with id '{anchor}')")
    return bad


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_a_dead_link_or_anchor_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Title\n\n## `sdxl-1step` — DMD2, 1-step (at 399)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Step by step\n\n## Step by step\n\n"
        "[ok](other.md#sdxl-1step--dmd2-1-step-at-399) [ok](#step-by-step-1) "
        "[ok](https://example.org/x.md) `[not a link](missing.md)`\n\n"
        "```\n[in a code block](missing.md)\n```\n\n"
        "[gone](missing.md) [no anchor](other.md#nope) [own](#nowhere)\n"
    )
    assert broken_links(page) == [
        "page.md:13: missing.md (no such file)",
        "page.md:13: other.md#nope (no heading with id 'nope')",
        "page.md:13: #nowhere (no heading with id 'nowhere')",
    ]


def test_github_heading_ids():
    assert slug("quality with intervals: DMD2 on digits, 10,000 samples per row (issue 14)") == (
        "quality-with-intervals-dmd2-on-digits-10000-samples-per-row-issue-14"
    )
    assert slug("FID speed: eigh Fréchet distance vs scipy sqrtm") == (
        "fid-speed-eigh-fréchet-distance-vs-scipy-sqrtm"
    )
    assert slug("LoRA settings (`--lora-rank`)") == "lora-settings---lora-rank"


@pytest.mark.parametrize("marker", ["test", "demo"])
def test_readme_keeps_the_blocks_ci_runs(marker):
    """.ci/run takes the first line of the code block after <!-- ci:test --> (and the demo's
    after <!-- ci:demo -->) from README.md: both must stay, each followed by a bash block."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    at = lines.index(f"<!-- ci:{marker} -->")
    assert lines[at + 1].startswith("```")
    command = lines[at + 2]
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e ")
