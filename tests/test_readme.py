"""The README is a front page: the two commands as written, at most 200 lines, and every
relative link in it and in docs/ leads to a file (and a heading, for a #anchor) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMANDS = (
    "scripts/run.sh     # set up, then train on real FashionMNIST "
    "(default: tiny preset, 2 clients, 6 rounds)",
    "scripts/test.sh    # set up, then ruff + the test suite (what CI runs)",
)
PAGES = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks: their lines are neither links nor headings."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, only letters, digits, ``_``, ``-`` and spaces
    kept, spaces to hyphens (link targets and code marks dropped first)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Every heading anchor of ``page``, repeated headings numbered as GitHub does (-1, -2)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(_prose(page.read_text())):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading for a #anchor, does not exist."""
    broken = []
    for target in LINK.findall(CODE.sub("", _prose(page.read_text()))):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def test_the_readme_keeps_the_two_commands_as_written() -> None:
    lines = README.read_text().splitlines()
    for command in COMMANDS:
        assert command in lines


def test_the_readme_is_at_most_200_lines() -> None:
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert _broken_links(page) == []


def test_the_slug_is_githubs() -> None:
    assert _slug("Quality: global loss, FID and KID, offline") == (
        "quality-global-loss-fid-and-kid-offline"
    )
    assert _slug("Update codec (`feddm_flower/fed/codecs.py`, format 2)") == (
        "update-codec-feddm_flowerfedcodecspy-format-2"
    )
