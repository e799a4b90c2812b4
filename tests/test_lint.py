"""The code passes the project's ruff configuration (pyproject.toml); the README's and docs' links resolve."""
import re
import shutil
import subprocess
import sys

import harness


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(__import__("pathlib").Path(sys.executable).parent / "ruff")
    run = subprocess.run([ruff, "check", str(harness.PACK_ROOT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation (but - and _) dropped, spaces to -,
    a repeated heading numbered -1, -2..."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1).strip().lower())
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_links_in_the_readme_and_docs_resolve():
    """Every relative link and image of README.md and docs/*.md names a file of the pack, and every #anchor a heading
    of its page (as GitHub renders it)."""
    pages = [harness.PACK_ROOT / "README.md", *sorted((harness.PACK_ROOT / "docs").glob("*.md"))]
    broken, checked = [], 0
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # code blocks hold no links
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert checked > 50, f"only {checked} links found: the pattern no longer matches the pages"
    assert not broken, "\n".join(broken)
