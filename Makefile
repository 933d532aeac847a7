# Two commands for users: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first and pinned, so nothing below can pull multi-GB CUDA wheels.
# Outside machines whose pip already finds CPU wheels, set TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=
PYTEST_ARGS   ?=

.PHONY: install demo test lint docs bench clean compat-matrix

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,docs,benchmarks]"
	touch $@

install: $(BIN)/.installed

demo: install  ## end-to-end demo on tiny models and real data; artifacts in outputs/
	$(BIN)/python examples/demo.py --out outputs

lint: install
	$(BIN)/ruff check hfhooks tests examples benchmarks scripts
	$(BIN)/ruff format --check hfhooks tests examples benchmarks scripts

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint  ## ruff, the unit suite, docs/compatibility.md up to date with it, and a strict docs build
	$(BIN)/python -m pytest -n 2 -q --junitxml=build/junit.xml $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,$(BIN)/python scripts/compat_matrix.py --junit build/junit.xml --check)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

compat-matrix: install  ## run tests/compat and write docs/compatibility.md from the results
	$(BIN)/python scripts/compat_matrix.py --run --pytest-args="-n 2"

bench: install  ## benchmarks (not tests): print ratios against naive / plain baselines
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) site outputs .pytest_cache .ruff_cache
