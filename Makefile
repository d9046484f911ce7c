# Two commands matter on a fresh machine: `make demo` and `make test`. Both create the virtual
# environment and install what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test check lint typecheck docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/python -m buttress demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy src
	$(BIN)/mypy tests/typing

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

check: lint typecheck docs

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/bench_flags.py --check
	$(BIN)/python bench/bench_subscribers.py
	@if command -v redis-server >/dev/null; then $(BIN)/python bench/bench_redis.py; \
	else echo "redis-server is not installed: skipping the shared-state benchmark"; fi

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache
