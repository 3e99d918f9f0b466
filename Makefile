# make book         : build the book into _build/html, executing every notebook (warnings are errors)
# make test         : unit tests and every notebook through nbmake
# make pdf          : the book as one PDF, _build/latex/attention-gradients.pdf, every chapter executed (Jupyter
#                     Book's LaTeX builder with XeLaTeX; installs Debian's TeX Live packages when missing)
# make browser-test : check the built book as a reader gets it: every internal link resolves, and every
#                     page opened in headless Chromium has its equations typeset, its images loaded, its
#                     cells' outputs and its Colab link (builds the book if it is missing or older than
#                     its sources; installs Debian's chromium if missing, and MathJax from npm)
# All create .venv with the pinned environment on first use; only python3 is needed (and, for
# browser-test, npm and apt-get as root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
READY  := $(VENV)/.ready

HTML            := _build/html/index.html
BOOK_SOURCES    := _config.yml _toc.yml $(wildcard book/*.md book/*.bib book/_ext/*.py notebooks/*.ipynb attnpkg/*.py attnpkg/*/*.py)
CHROMIUM        ?= /usr/bin/chromium
MATHJAX_VERSION := 3.2.2
MATHJAX         := _build/vendor/mathjax
SUDO            := $(if $(filter 0,$(shell id -u)),,sudo)
# Debian's TeX Live for the PDF: XeLaTeX (Unicode in cell outputs), latexmk, the LaTeX packages that Sphinx
# and sphinx-jupyterbook-latex load, and the FreeFont and Latin Modern fonts Sphinx's XeLaTeX set-up uses.
TEX_PACKAGES    := texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended texlive-xetex \
                   latexmk xindy fonts-freefont-otf lmodern tex-gyre

.PHONY: book test pdf tex browser-test env clean
.DELETE_ON_ERROR:

env: $(READY)

$(READY): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test: $(READY)
	$(BIN)/python -m pytest

book: $(READY)
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going

pdf: $(READY) tex
	rm -rf _build/latex
	$(BIN)/jupyter-book build . --builder pdflatex
	test -s _build/latex/attention-gradients.pdf
	@echo "the book as a PDF: _build/latex/attention-gradients.pdf"

tex:
	dpkg -s $(TEX_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(TEX_PACKAGES); }

$(HTML): $(READY) $(BOOK_SOURCES)
	$(MAKE) book

browser-test: $(READY) $(HTML) $(CHROMIUM) $(MATHJAX)/.version-$(MATHJAX_VERSION)
	BOOK_CHECKS=required CHROMIUM=$(CHROMIUM) MATHJAX_DIR=$(MATHJAX) \
	  $(BIN)/python -m pytest tests/test_book_links.py tests/test_book_browser.py
	@echo "screenshots of every page: _build/screenshots/"

# Debian's chromium (no browser download from anywhere else).
$(CHROMIUM):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium

# A reader's browser loads MathJax 3 from its CDN; the browser test serves it from this copy of the
# npm package instead (there is no network on the test machine).
$(MATHJAX)/.version-$(MATHJAX_VERSION):
	rm -rf $(MATHJAX) && mkdir -p $(MATHJAX)
	cd $(MATHJAX) && npm pack mathjax@$(MATHJAX_VERSION) && tar -xzf mathjax-$(MATHJAX_VERSION).tgz --strip-components=1 \
	  && rm mathjax-$(MATHJAX_VERSION).tgz
	test -f $(MATHJAX)/es5/tex-mml-chtml.js
	touch $@

clean:
	rm -rf _build .pytest_cache
