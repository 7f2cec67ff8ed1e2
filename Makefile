# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Built artefacts (seeded checkpoints, ONNX graphs, repositories) live here, never in git.
export MOFSERVE_HOME ?= $(CURDIR)/.mofserve
export PIP_DISABLE_PIP_VERSION_CHECK := 1
PYTEST_ARGS ?=

.PHONY: install browser demo test test-unit test-integration lint bench-encoders bench-load bench-load-paper-shaped bench-llm bench-perf-analyzer soak fuzz gpu-check clean

install: $(STAMP)

# torch goes first and pinned: a resolver free to pick `torch` pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -e ".[dev]"
	$(PY) -m mofserve.protogen --force
	@$(MAKE) --no-print-directory browser
	touch $@

# Debian's chromium for the playground's browser test (Playwright drives it; no browser download). Once: skipped when
# chromium is there; never fails the install (no apt, not root, offline): tests/e2e/test_playground.py then skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get) for the playground's browser test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium >/dev/null; } || echo "note: apt-get could not install chromium; the browser test will skip"; \
	else echo "note: chromium is not installed and apt-get as root is not available; the browser test will skip"; fi

demo: install
	$(VENV)/bin/mofserve demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# Encoder latency per runtime vs the machine's matmul ceiling (small profile; minutes).
bench-encoders: install
	$(VENV)/bin/mofserve bench encoders --profile small

# Load sweep: serves the small profile on free loopback ports, runs the eager fp32, eager bf16 and exported
# in-process baselines on the same images first, sweeps concurrency 1 2 4 8 over AskStream (TTFT, ITL,
# tokens/s; ~8 min), stops it. Every image is fresh (--repeat-ratio 0: a like-for-like throughput ratio;
# BENCH_LOAD_ARGS="--repeat-ratio 0.3" shows the cache). Report (JSON, Markdown with the targets' MET /
# MISSED, PNGs, serve.log) in results/load-<timestamp>/; BENCH_LOAD_ARGS adds options.
BENCH_LOAD_ARGS ?=
bench-load: install
	$(VENV)/bin/mofserve bench load --serve small --concurrency 1 2 4 8 --duration 60 --warmup 10 \
		--baseline eager eager-bf16 exported --baseline-requests 20 --repeat-ratio 0 $(BENCH_LOAD_ARGS)

# The same on the paper-shaped profile (ViT-L/14-336 towers, a 7B-wide LM of MOFSERVE_PAPER_SHAPED_LLM_LAYERS
# layers, default 2): A-MoF prompts (576 visual tokens), 32 new tokens, 1 and 8 concurrent streams, the exported
# in-process baseline (its path to the first token), the LM's per-layer cost extrapolated to 32 layers
# (~10 min; the first export ~2 min and ~4 GB of checkpoints). Report in results/load-<timestamp>/.
BENCH_LOAD_PAPER_ARGS ?=
bench-load-paper-shaped: install
	$(VENV)/bin/mofserve bench load --serve paper-shaped --concurrency 1 8 --duration 90 --warmup 15 \
		--mix additive=1 --max-new-tokens 32 --timeout 300 --baseline exported --baseline-requests 6 \
		--repeat-ratio 0 --extrapolate-layers 32 $(BENCH_LOAD_PAPER_ARGS)

# The LLM stage in process on the paper-shaped LM: LLMEngine batched vs one at a time vs transformers generate
# vs transformers continuous batching (8 sequences of 640 positions, 32 new tokens), 4 I-MoF prompts joining 4
# running streams with the prefill whole vs in chunks of 256 / 512 (the running streams' ITL), the per-layer cost and
# its 32-layer extrapolation, bf16 greedy agreement batched vs one at a time on the small and paper-shaped
# LMs (~7 min). Report in results/llm-<timestamp>/; BENCH_LLM_ARGS adds options (see --help).
BENCH_LLM_ARGS ?=
bench-llm: install
	$(PY) -m mofserve.benchmarks.llm_stage --profile paper-shaped $(BENCH_LLM_ARGS)

# NVIDIA perf_analyzer straight on the small profile's Triton ensembles (installs perf_analyzer 2.51.0
# into $(MOFSERVE_HOME)/tools on first use). Report in results/perf-analyzer-<timestamp>/.
BENCH_PA_ARGS ?=
bench-perf-analyzer: install
	$(VENV)/bin/mofserve bench perf-analyzer --serve small --models tokens_interleaved vqa_interleaved \
		--concurrency 1 2 4 --pa-requests 10 $(BENCH_PA_ARGS)

# Soak: serves the tiny profile on free loopback ports, Ask at concurrency 4 for 10 min (mode mix),
# errors by code and RSS of every process; exits 1 on an error or growth. Report in results/soak-<timestamp>/.
SOAK_ARGS ?=
soak: install
	$(VENV)/bin/mofserve soak --profile tiny --duration 600 --concurrency 4 $(SOAK_ARGS)

# Fuzz image decoding (atheris/libFuzzer) for FUZZ_SECONDS; the corpus grows in $(MOFSERVE_HOME)/fuzz/decode,
# crash inputs land in $(MOFSERVE_HOME)/fuzz/ (make test runs a short seeded run: tests/fuzz).
FUZZ_SECONDS ?= 600
fuzz: install
	mkdir -p $(MOFSERVE_HOME)/fuzz
	$(PY) tests/fuzz/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=2048 \
		-max_len=65536 -artifact_prefix=$(MOFSERVE_HOME)/fuzz/

# Optional, on a GPU machine only: the prepared gpu-torch check (< 8 min; docs/benchmarks.md "GPU check").
# Needs PyTorch with CUDA, nothing installed; the serving stage needs .whl/ (see the doc). GPU_CHECK_ARGS adds options.
GPU_CHECK_OUT ?= results/gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHON=$${PYTHON:-python3} benchmarks/gpu_check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(MOFSERVE_HOME) .pytest_cache .ruff_cache
