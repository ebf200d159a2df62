# PA Core: `make up` installs and starts the platform, `make test` installs and runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch goes in first, so that nothing that depends on it pulls a CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install up test lint unit bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

up: install
	$(VENV)/bin/pacore up $(ARGS)

lint: install
	$(VENV)/bin/ruff check pacore deployments agent sdk tests benchmarks
	$(VENV)/bin/mypy

# Suites that start Ray run in their own pytest process, each with its own Ray instance.
# pytest's exit code 5 means it collected nothing: a suite that runs nothing proves nothing.
TEST_GROUPS ?= "tests/unit tests/providers tests/integration" tests/selfhosted tests/agent tests/serve tests/ops

test: lint
	@failed=0; for group in $(TEST_GROUPS); do \
		echo "== pytest $$group"; \
		$(PY) -m pytest $$group $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests in $$group" >&2; rc=1; fi; \
		if [ $$rc -ne 0 ]; then failed=1; fi; \
	done; exit $$failed

unit: install
	$(PY) -m pytest tests/unit tests/providers $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
