"""The front door: a README that fits on a screen, and the documentation site under docs/ that
holds the rest (mkdocs.yml), built the way a reader would build it."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# [text](target): the links of a markdown file, outside code
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (their brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file, as MkDocs (Python-Markdown's toc) names them."""
    from markdown.extensions.toc import slugify

    return {slugify(m, "-") for m in re.findall(r"^#+\s+(.+?)\s*$", _prose(path.read_text()), flags=re.M)}


def test_readme_fits_on_a_screen():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; the rest belongs in docs/"


def test_docs_build_strict(tmp_path):
    """--strict fails on a broken link or anchor between pages and on a page missing from nav."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    for page in pages:
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), page


def test_readme_links_resolve():
    links = [t for t in _LINK.findall(_prose(README.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert links, "README.md links to no documentation page"
    for target in links:
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve() if path else README
        assert file.exists(), f"README.md links to {target}: {file} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"README.md links to {target}: no heading with that anchor"
