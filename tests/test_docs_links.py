"""Every relative link in the README and docs/ resolves to a file (and heading) in the repository.

The docs ship with the repository, so a link that leaves it or names a missing file or heading is
a broken page on GitHub. External links (http, https, mailto) are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "kernels" / "NOTES.md",
                *(ROOT / "docs").rglob("*.md")])

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (code is not rendered as links)."""
    lines, in_fence = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if not match:
            continue
        base = github_anchor(match.group(1))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for line in prose_lines(page) for m in LINK.finditer(INLINE_CODE.sub("", line))]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `page` that leave `root` or name a missing file or heading."""
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        dest = page if not path_part else (page.parent / path_part).resolve()
        if root not in dest.parents and dest != root:
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target} (no heading #{fragment} in {dest.relative_to(root)})")
    return bad


def test_anchor_rule_matches_github() -> None:
    assert github_anchor("Defaults, and where they differ from the reference (`git-disl/Antidote`)") == \
        "defaults-and-where-they-differ-from-the-reference-git-dislantidote"
    assert github_anchor("First GPU run: checklist") == "first-gpu-run-checklist"
    assert github_anchor("Where the weights moved: `surgery diff`") == "where-the-weights-moved-surgery-diff"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Top\n\n## Second part\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#second-part) [ok](#here) [web](https://x.org/y)\n"
        "# Here\n"
        "[gone](docs/missing.md) [out](../shared/DESIGN.md) [anchor](docs/a.md#nope)\n"
        "`[code](not/a/link.md)`\n```\n[fenced](no.md)\n```\n",
        encoding="utf-8")
    assert broken_links(page, root=tmp_path) == [
        "docs/missing.md (no such file)",
        "../shared/DESIGN.md (outside the repository)",
        "docs/a.md#nope (no heading #nope in docs/a.md)",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} has dangling links"
