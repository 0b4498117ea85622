# make test: build .venv from the pins in pyproject.toml (once; again only when they change),
# then lint, build the documentation site (strict: every link and anchor resolves) and run
# the test suite. make demo: the whole pipeline on a generated dataset.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SITE := .site

.PHONY: test lint docs demo bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,cluster]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# not --quiet: it hides the warnings that --strict turns into a failure
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(SITE)

test: lint docs
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) cli.py demo

clean-venv:
	rm -rf $(VENV)
