"""The book's sources agree with its one configuration: every notebook (present and future) opens in
Colab from its own path in the repository and starts with the same set-up cell; the pages, README and
citation files name the repository of _config.yml and the version of attnpkg.

Fast: reads files, and installs attnpkg once into a temporary folder; needs no build of the book.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import attnpkg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
BRANCH = CONFIG["repository"]["branch"]
OWNER_REPO = REPO_URL.removeprefix("https://github.com/")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

SETUP_CELL = f"""\
# Set-up, runs anywhere: on Colab it installs attnpkg from the repository and keeps Colab's torch and triton.
import importlib.util
if importlib.util.find_spec("attnpkg") is None:
    %pip install --no-deps git+{REPO_URL}
from attnpkg.notebook import setup
rt = setup()"""

# GitHub repositories other than the book's own that the pages may link to (none so far).
OTHER_REPOSITORIES: set[str] = set()


def colab_url(relpath: str) -> str:
    return f"https://colab.research.google.com/github/{OWNER_REPO}/blob/{BRANCH}/{relpath}"


def cell_source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return files


def test_configuration():
    assert REPO_URL.startswith("https://github.com/") and OWNER_REPO.count("/") == 1
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert CONFIG["repository"].get("path_to_book", "") == ""  # the book sits at the repository's root
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_in_colab_and_sets_up(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = cells[0]
    assert first["cell_type"] == "markdown", "the first cell holds the label, the title and the Colab badge"
    lines = cell_source(first).splitlines()
    assert re.fullmatch(r"\([\w-]+\)=", lines[0]), "first line: the chapter's label, (label)="
    assert lines[1].startswith("# "), "second line: the chapter's # Title"
    badge = (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"({colab_url('notebooks/' + path.name)})")
    assert badge in lines, f"the first cell must hold the Colab badge line\n{badge}"

    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, "no code cell"
    assert cell_source(code[0]) == SETUP_CELL, "the first code cell must be exactly the shared set-up cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_with_unique_cell_ids(path):
    """nbformat 4.5 wants an id on every cell (a cell without one is a warning today, an error later)."""
    import nbformat
    raw = json.loads(path.read_text())                 # nbformat.read would fill in missing ids
    ids = [cell.get("id") for cell in raw["cells"]]
    nbformat.validate(raw)
    assert None not in ids and len(set(ids)) == len(ids), f"cells without an id or with a repeated one: {ids}"


def test_every_notebook_is_in_the_book():
    listed = set(toc_files())
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}" not in listed]
    assert not missing, f"notebooks not in _toc.yml (they would not be built): {missing}"


def test_pages_name_the_configured_repository():
    """Every GitHub or Colab link in the pages, README and citation files points at _config.yml's repository."""
    files = [ROOT / "README.md", ROOT / "CITATION.cff", *sorted((ROOT / "book").glob("*.md"))]
    for path in files:
        text = path.read_text()
        for owner_repo in re.findall(r"github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?(?=[/\s)\"'>}]|$)", text):
            assert owner_repo == OWNER_REPO or owner_repo in OTHER_REPOSITORIES, \
                f"{path.name} links to github.com/{owner_repo}, not to {REPO_URL}"
        for owner_repo, branch in re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([\w.-]+)/", text):
            assert (owner_repo, branch) == (OWNER_REPO, BRANCH), f"{path.name}: Colab link to {owner_repo}@{branch}"
    # The set-up cell quoted on the "Running the book" page is the one the notebooks start with.
    assert SETUP_CELL in (ROOT / "book" / "running.md").read_text()


def test_citation_cff():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["message"] and cff["authors"] and all(a.get("name") or a.get("family-names") for a in cff["authors"])
    assert cff["title"] == CONFIG["title"]
    assert cff["version"] == attnpkg.__version__
    assert cff["repository-code"] == REPO_URL


def test_how_to_cite_bibtex():
    text = (ROOT / "book" / "how_to_cite.md").read_text()
    block = re.search(r"```bibtex\n(@\w+\{[\w-]+,\n.*?\n\})\n```", text, re.S)
    assert block, "how_to_cite.md must hold one BibTeX entry in a ```bibtex block"
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", block.group(1), re.M))
    assert fields["title"] == CONFIG["title"]
    assert fields["version"] == attnpkg.__version__
    assert fields["url"] == REPO_URL
    assert fields["year"] == str(CONFIG["copyright"])
    assert attnpkg.__version__ in fields["note"]
    assert "{{ attnpkg_version }}" in text, "the prose names the version through the substitution"


def test_front_page_shows_the_version_from_the_package():
    # Filled at build time by book/_ext/attnpkg_book.py from attnpkg.__version__, so it cannot drift.
    assert "{{ attnpkg_version }}" in (ROOT / "book" / "intro.md").read_text()


def test_the_set_up_cell_installs_a_working_attnpkg(tmp_path):
    """What the set-up cell's `pip install --no-deps git+REPO` gives a Colab reader: a regular (not
    editable) install of the repository, beside the torch and triton already there. Every module of
    attnpkg/ must be in it, and `from attnpkg.notebook import setup; setup()` must work from it."""
    src, target = tmp_path / "src", tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "attnpkg", src / "attnpkg", ignore=ignore)  # build from a copy: no build/ in the repo
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-build-isolation", "--no-index", "--target", str(target), str(src)]
    subprocess.run(pip, check=True, cwd=tmp_path)

    def modules(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*.py") if "__pycache__" not in p.parts}

    missing = modules(ROOT / "attnpkg") - modules(target / "attnpkg")
    assert not missing, f"a regular install of attnpkg lacks {sorted(missing)}: list them in pyproject.toml's packages"
    check = ("import attnpkg; from attnpkg.notebook import setup; rt = setup(); "
             "assert attnpkg.__file__.startswith(%r), attnpkg.__file__" % str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"attnpkg {attnpkg.__version__} | torch" in run.stdout
