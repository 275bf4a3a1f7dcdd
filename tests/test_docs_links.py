"""Relative links in README.md and docs/*.md, and docs/methods.md anchors cited in
the code, point at files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)
METHODS_ANCHOR = re.compile(r"docs/methods\.md#([a-z0-9-]+)")


def _anchors(md: Path) -> set[str]:
    """Explicit `<a id>` anchors and GitHub's heading slugs of a Markdown file."""
    text = md.read_text(encoding="utf-8")
    found = set(re.findall(r'<a id="([^"]+)"', text))
    seen: dict[str, int] = {}
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
        slug = slug.replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def _broken_links(md: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", md.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{md.relative_to(ROOT)}: no file {target}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{md.relative_to(ROOT)}: no anchor {target}")
    return broken


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [line for page in pages for line in _broken_links(page)]
    assert not broken, "\n".join(broken)


def test_methods_anchors_cited_in_the_code_exist():
    anchors = _anchors(ROOT / "docs" / "methods.md")
    cited = {
        (str(path.relative_to(ROOT)), anchor)
        for path in [*ROOT.glob("axolotl_prefalign/**/*.py"), *ROOT.glob("tests/*.py")]
        for anchor in METHODS_ANCHOR.findall(path.read_text(encoding="utf-8"))
    }
    missing = sorted(f"{path}: #{a}" for path, a in cited if a not in anchors)
    assert cited and not missing, "\n".join(missing)
