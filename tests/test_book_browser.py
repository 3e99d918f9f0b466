"""The built book as a reader sees it: every page of _toc.yml opened in headless Chromium.

For each page: it loads (HTTP 200, no JavaScript error, no missing file of the book); MathJax has
typeset every equation (no raw TeX left, no MathJax error, no undefined macro); every image of the
book has loaded; every code cell that produced output shows it; on notebook pages the Colab launch
button and the Colab badge point at the notebook in the repository of _config.yml. The front page
shows attnpkg's version. A screenshot of every page goes to _build/screenshots/.

The browser is Debian's `chromium` (CHROMIUM, default /usr/bin/chromium), driven through Playwright's
Python package (no browser download), started with a fresh user-data dir. The book is served over
HTTP from 127.0.0.1. There is no network: a reader's browser loads MathJax from its CDN, so the test
answers those requests from a copy of the npm package `mathjax` (MATHJAX_DIR, which `make
browser-test` fills) and refuses every other request that leaves the machine; images from outside
the book (the Colab badge's picture) are listed in EXTERNAL_IMAGES and cannot be checked here.

Skipped when the book is not built (or older than its sources), or Chromium or MathJax is missing,
unless BOOK_CHECKS=required (as `make browser-test` and CI set it): then that is a failure.
"""
import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import sync_playwright

import attnpkg

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html")).resolve()
EXECUTED = HTML.parent / "jupyter_execute"  # the executed notebooks, beside the HTML
SCREENSHOTS = Path(os.environ.get("BOOK_SCREENSHOTS", ROOT / "_build" / "screenshots"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
MATHJAX_DIR = Path(os.environ.get("MATHJAX_DIR", ROOT / "_build" / "vendor" / "mathjax"))
REQUIRED = os.environ.get("BOOK_CHECKS") == "required"

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
MATHJAX_CDN = re.compile(r"^https://cdn\.jsdelivr\.net/npm/mathjax@3(?:\.[\d.]+)?/(?P<path>[^?#]+)")
EXTERNAL_IMAGES = {"https://colab.research.google.com/assets/colab-badge.svg"}

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
BRANCH = CONFIG["repository"]["branch"]
COLAB_URL = CONFIG["launch_buttons"]["colab_url"].rstrip("/")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]


PAGES = toc_files()


def _book_sources() -> list[Path]:
    files = [*(ROOT / "book").rglob("*.*"), *(ROOT / "notebooks").glob("*.ipynb")]
    return [ROOT / "_config.yml", ROOT / "_toc.yml", *(f for f in files if "__pycache__" not in f.parts)]


def _missing(why: str):
    if REQUIRED:
        pytest.fail(why)
    pytest.skip(why)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def book():
    """(base URL of the served book, browser context, list that collects refused outside requests)."""
    index = HTML / "index.html"
    if not index.is_file():
        _missing(f"no built book at {HTML} (run `make book`)")
    if not REQUIRED and index.stat().st_mtime < max(p.stat().st_mtime for p in _book_sources()):
        pytest.skip(f"the book at {HTML} is older than its sources (run `make book`)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(f"no Chromium at {CHROMIUM} (`make browser-test` installs Debian's chromium)")
    if not (MATHJAX_DIR / "es5" / "tex-mml-chtml.js").is_file():
        _missing(f"no MathJax copy at {MATHJAX_DIR} (`make browser-test` fetches it)")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=HTML))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/"
    refused: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith(base):
            return r.continue_()
        m = MATHJAX_CDN.match(url)
        if m and (MATHJAX_DIR / m["path"]).is_file():
            return r.fulfill(path=MATHJAX_DIR / m["path"])
        refused.append(url)
        return r.abort()

    profile = tempfile.mkdtemp(prefix="book-chromium-")  # a fresh user-data dir
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900}, service_workers="block")
            context.set_default_timeout(int(os.environ.get("BOOK_TIMEOUT_MS", 60_000)))
            context.route("**/*", route)
            yield base, context, refused
            context.close()
    finally:
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


# Runs in the page once MathJax is done; returns what the assertions need.
INSPECT = r"""async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const main = document.querySelector("main") || document.body;
  const sameOrigin = (u) => new URL(u, location.href).origin === location.origin;
  const images = [...document.images];
  for (const img of images) { img.loading = "eager"; }
  await Promise.all(images.filter((i) => sameOrigin(i.src)).map((i) => i.decode().catch(() => null)));
  const prose = main.cloneNode(true);
  prose.querySelectorAll("pre, code, script, style, textarea, .highlight, mjx-container").forEach((e) => e.remove());
  const text = prose.textContent;
  const mathNodes = [...main.querySelectorAll(".math")];
  return {
    title: document.title,
    mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
    mathNodes: mathNodes.length,
    typeset: main.querySelectorAll("mjx-container").length,
    untypeset: mathNodes.filter((e) => !e.querySelector("mjx-container")).map((e) => e.textContent.slice(0, 80)),
    mathErrors: [...main.querySelectorAll("mjx-merror")].map((e) => e.getAttribute("data-mjx-error") || e.textContent),
    undefinedMacros: [...main.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]')]
      .map((e) => e.textContent).filter((t) => t.startsWith("\\")),
    rawTex: ["$$", "\\[", "\\]", "\\(", "\\)", "\\begin{", "\\frac"].filter((s) => text.includes(s))
      .concat((text.match(/\$[^\s$][^$\n]{0,120}\$/g) || []).slice(0, 5)),
    brokenImages: images.filter((i) => sameOrigin(i.src) && !(i.complete && i.naturalWidth > 0)).map((i) => i.src),
    externalImages: images.filter((i) => !sameOrigin(i.src)).map((i) => i.src),
    nImages: images.length,
    cells: [...main.querySelectorAll("div.cell")].map((c) => {
      const out = c.querySelector(":scope > .cell_output");
      return {
        input: (c.querySelector(":scope > .cell_input pre") || {textContent: ""}).textContent,
        output: out ? out.textContent.trim() : null,
        outputImages: out ? out.querySelectorAll("img").length : 0,
      };
    }),
    launchColab: [...document.querySelectorAll(".dropdown-launch-buttons a")].map((a) => a.href)
      .filter((h) => h.includes("colab")),
    badgeLinks: [...main.querySelectorAll("a")].filter((a) => a.querySelector('img[alt="Open in Colab"]'))
      .map((a) => a.href),
    mainText: main.innerText,
  };
}"""


def expected_outputs(page: str) -> list[bool]:
    """For each code cell the page shows, in order: whether it produced output when executed."""
    nb = json.loads((EXECUTED / f"{page}.ipynb").read_text())
    shown = []
    for cell in nb["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or "remove-cell" in tags:
            continue
        shown.append(bool(cell.get("outputs")) and "remove-output" not in tags)
    return shown


@pytest.mark.parametrize("page", PAGES)
def test_page_in_a_real_browser(book, page):
    base, context, refused = book
    tab = context.new_page()
    js_errors, failed = [], []
    tab.on("pageerror", lambda exc: js_errors.append(str(exc)))
    tab.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.url.startswith(base) and r.status >= 400 else None)
    tab.on("requestfailed", lambda r: failed.append(f"{r.failure} {r.url}") if r.url.startswith(base) else None)
    try:
        response = tab.goto(base + f"{page}.html", wait_until="load")
        assert response is not None and response.status == 200, f"{page}.html: HTTP {response and response.status}"
        # Sphinx loads MathJax only on pages that have math.
        has_mathjax = tab.evaluate("() => !!document.querySelector('script[src*=\"mathjax\"]')")
        if has_mathjax:
            tab.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
        info = tab.evaluate(INSPECT)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = page.replace("/", "__")
        tab.screenshot(path=SCREENSHOTS / f"{name}.png")
        if page == next(p for p in PAGES if p.startswith("notebooks/")):
            tab.screenshot(path=SCREENSHOTS / f"{name}__full.png", full_page=True)
    finally:
        tab.close()

    # It loads.
    assert not js_errors, f"JavaScript errors: {js_errors}"
    assert not failed, f"files of the book that did not load: {failed}"
    assert info["mainText"].strip(), "the page is empty"

    # Its equations are typeset.
    if has_mathjax or info["mathNodes"]:
        assert info["mathjax"] and info["mathjax"].startswith("3."), "MathJax did not load"
    assert not info["untypeset"], f"equations MathJax did not typeset: {info['untypeset']}"
    assert info["typeset"] >= info["mathNodes"]
    assert not info["mathErrors"], f"MathJax errors: {info['mathErrors']}"
    assert not info["undefinedMacros"], f"undefined TeX macros: {info['undefinedMacros']}"
    assert not info["rawTex"], f"raw TeX left in the text: {info['rawTex']}"

    # Every image of the book has loaded; images from outside it are the known ones.
    assert not info["brokenImages"], f"images that did not load: {info['brokenImages']}"
    assert set(info["externalImages"]) <= EXTERNAL_IMAGES, f"unexpected outside images: {info['externalImages']}"
    outside = [u for u in refused if u not in EXTERNAL_IMAGES]
    assert not outside, f"the page asked for files outside the book: {outside}"

    if page.startswith("notebooks/"):
        # Code cells have their outputs.
        cells = info["cells"]
        expected = expected_outputs(page)
        assert len(cells) == len(expected), f"{len(cells)} code cells shown, {len(expected)} executed"
        for i, (cell, has_output) in enumerate(zip(cells, expected)):
            if has_output:
                assert cell["output"] or cell["outputImages"], f"code cell {i} shows no output:\n{cell['input'][:200]}"
        assert f"attnpkg {attnpkg.__version__}" in (cells[0]["output"] or ""), "the set-up cell's output is missing"

        # The Colab launch button and badge open this notebook from the repository.
        colab = f"{COLAB_URL}/github/{REPO_URL.removeprefix('https://github.com/')}/blob/{BRANCH}/{page}.ipynb"
        assert info["launchColab"] == [colab], f"launch button: {info['launchColab']}, expected {colab}"
        assert info["badgeLinks"] == [colab], f"Colab badge: {info['badgeLinks']}, expected {colab}"

    if page == PAGES[0]:
        assert f"attnpkg {attnpkg.__version__}" in info["mainText"], "the front page does not show attnpkg's version"
