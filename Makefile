# make book : build the book into _build/html, executing every notebook (warnings are errors)
# make test : unit tests and every notebook through nbmake
# Both create .venv with the pinned environment on first use; only python3 is needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
READY  := $(VENV)/.ready

.PHONY: book test env clean

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

clean:
	rm -rf _build .pytest_cache
