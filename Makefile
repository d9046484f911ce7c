# Two commands matter on a fresh machine: `make demo` and `make test`. Both create the virtual
# environment and install what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# A second environment with every dependency at the lower bound pyproject.toml declares
# (constraints/lowest.txt), so a range that no longer holds fails CI instead of a user.
LOWEST       := .venv-lowest
LOWEST_BIN   := $(LOWEST)/bin
LOWEST_STAMP := $(LOWEST)/.installed-$(shell cat pyproject.toml constraints/lowest.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-lowest constraints check lint typecheck docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The demo is not in the wheel: it runs from demo/ at the repository root (the current directory,
# which `python -m` puts on the path). `.[all,dev]` already holds the demo extra's libraries.
demo: $(STAMP)
	$(BIN)/python -m demo

test: $(STAMP)
	$(BIN)/python -m pytest

$(LOWEST_STAMP): pyproject.toml constraints/lowest.txt
	test -x $(LOWEST_BIN)/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LOWEST_BIN)/python -m pip install --quiet -c constraints/lowest.txt -e '.[all,dev]'
	rm -f $(LOWEST)/.installed-*
	touch $@

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_BIN)/python -m pytest

# Regenerate the lower-bound pins after changing a dependency in pyproject.toml.
constraints:
	$(PYTHON) constraints/lowest.py > constraints/lowest.txt.new
	mv constraints/lowest.txt.new constraints/lowest.txt

lint: $(STAMP)
	$(BIN)/ruff check src tests bench constraints demo
	$(BIN)/ruff format --check src tests bench constraints demo

typecheck: $(STAMP)
	$(BIN)/mypy src
	$(BIN)/mypy demo
	$(BIN)/mypy tests/typing
	$(BIN)/mypy constraints/lowest.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

check: lint typecheck docs

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/bench_flags.py --check
	$(BIN)/python bench/bench_subscribers.py
	$(BIN)/python bench/bench_service.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_threads.py
	$(BIN)/python -m bench.sim
	$(BIN)/python bench/bench_integrations.py
	@if command -v redis-server >/dev/null; then $(BIN)/python bench/bench_redis.py \
		&& $(BIN)/python bench/bench_rate_redis.py; \
	else echo "redis-server is not installed: skipping the shared-state benchmark"; fi
	@if command -v redis-server >/dev/null; then $(BIN)/python bench/bench_fleet.py; \
	else echo "redis-server is not installed: skipping the fleet benchmark"; fi

clean:
	rm -rf $(VENV) $(LOWEST) site .mypy_cache .ruff_cache
