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

# pytest's exit code 5 means it collected nothing: a suite that runs nothing proves nothing.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

unit: install
	$(PY) -m pytest tests/unit tests/providers $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
