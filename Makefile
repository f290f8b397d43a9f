# mlatlas — two commands are all a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
REQS   := pyproject.toml requirements/dev.txt requirements/constraints.txt
PYTEST_ARGS ?= -n 2

.PHONY: install demo test lint readme clean

install: $(STAMP)

# Re-installs only when the requirements changed (the stamp is newer otherwise).
$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $(STAMP)

# Runs every built experiment and benchmark; the last line printed is the site's index.html.
demo: install
	$(VENV)/bin/mlatlas tour

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests scripts

readme: install
	$(PY) scripts/update_readme.py

clean:
	rm -rf $(VENV) runs .pytest_cache
