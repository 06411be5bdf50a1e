# The two commands of the README: `make demo` and `make test`. Both install first (idempotent).
# constraints.txt pins every package to the versions the tests last passed with (a lock file):
# pip then resolves nothing. Regenerate with: .venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' > constraints.txt
# (--all keeps setuptools, which torch needs at run time; the comments beside pins are lost, pyproject.toml keeps the reasons)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test browser

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/protonmf demo

# The report test renders HTML in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver)

test: install browser
	$(PY) -m pytest
