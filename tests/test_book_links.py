"""Internal links of the built book: every href and src inside _build/html that points into the book
resolves to a file, and every #anchor to an element with that id in it.

Runs on the built HTML (BOOK_HTML, default _build/html). Without a built book, or with one older than
its sources, it is skipped, unless BOOK_CHECKS=required (as `make browser-test` and CI set it): then a
missing book is a failure, and the book is checked as it is.
External links are not followed (there is no network here); tests/test_book_notebooks.py checks the
ones to the repository.
"""
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html")).resolve()
REQUIRED = os.environ.get("BOOK_CHECKS") == "required"

LINK_ATTRS = {"a": "href", "link": "href", "img": "src", "script": "src", "source": "src", "iframe": "src"}
EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, data:, javascript:, //host


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[int, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        attr = LINK_ATTRS.get(tag)
        if attr and attrs.get(attr):
            self.links.append((self.getpos()[0], attrs[attr]))


def _parse(path: Path, cache: dict) -> _Page:
    if path not in cache:
        page = _Page()
        page.feed(path.read_text(encoding="utf-8", errors="replace"))
        cache[path] = page
    return cache[path]


def book_sources() -> list[Path]:
    files = [*(ROOT / "book").rglob("*.*"), *(ROOT / "notebooks").glob("*.ipynb")]
    return [ROOT / "_config.yml", ROOT / "_toc.yml", *(f for f in files if "__pycache__" not in f.parts)]


@pytest.fixture(scope="module")
def html_root():
    index = HTML / "index.html"
    if not index.is_file():
        why = f"no built book at {HTML} (run `make book`)"
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    if not REQUIRED and index.stat().st_mtime < max(p.stat().st_mtime for p in book_sources()):
        pytest.skip(f"the book at {HTML} is older than its sources (run `make book`)")
    return HTML


def test_every_page_of_the_toc_was_built(html_root):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
    missing = [f for f in files if not (html_root / f"{f}.html").is_file()]
    assert not missing, f"pages of _toc.yml missing from {html_root}: {missing}"


def test_internal_links_resolve(html_root):
    cache: dict[Path, _Page] = {}
    # The book's pages: everything but the theme's Jinja templates that land in _static.
    pages = sorted(p for p in html_root.rglob("*.html") if "_static" not in p.relative_to(html_root).parts)
    broken, checked = [], 0
    for path in pages:
        for line, url in _parse(path, cache).links:
            if EXTERNAL.match(url):
                continue
            parts = urlsplit(url)
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            where = f"{path.relative_to(html_root)}:{line}: {url}"
            checked += 1
            if html_root not in target.parents:
                broken.append(f"{where} (points outside the book)")
            elif not target.is_file():
                broken.append(f"{where} (no file {target.relative_to(html_root)})")
            elif parts.fragment and target.suffix == ".html":
                if unquote(parts.fragment) not in _parse(target, cache).ids:
                    broken.append(f"{where} (no id {parts.fragment!r} in {target.relative_to(html_root)})")
    assert checked > 0 and len(pages) > 1
    assert not broken, f"{len(broken)} broken internal links of {checked}:\n" + "\n".join(broken)
