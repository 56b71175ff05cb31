#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-server, llama-bench, rpc-server) from the llama.cpp that the
# pinned llama-cpp-python vendors, so that benchmarks and tests compare against llama.cpp itself
# and not against our settings (docs/notes.md §8). Never part of `make test`'s default path.
#
# The sdist comes through pip's configured index; the build is cached under
# .cache/llama.cpp/<version>/ (about 15 min on 2 cores the first time, nothing after).
# Prints the bin directory on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}"
ROOT="$PWD/.cache/llama.cpp/$VERSION"
BIN="$ROOT/bin"
TARGETS=(llama-server llama-bench rpc-server)

have_all() { for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

mkdir -p "$ROOT"
start=$(date +%s)
if [ ! -d "$ROOT/src/vendor/llama.cpp" ]; then
    tmp=$(mktemp -d)
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
    mkdir -p "$ROOT/src"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$ROOT/src" --strip-components=1
    rm -rf "$tmp"
fi
cmake -S "$ROOT/src/vendor/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON >/dev/null
# The rpc-server target is called ggml-rpc-server in some trees, rpc-server in others.
targets=$(cmake --build "$ROOT/build" --target help)  # whole, before grep: pipefail and grep -q's SIGPIPE
rpc_target=rpc-server
if grep -q "ggml-rpc-server" <<<"$targets"; then rpc_target=ggml-rpc-server; fi
cmake --build "$ROOT/build" --target llama-server llama-bench "$rpc_target" -j "$(nproc)" >/dev/null
mkdir -p "$BIN"
cp "$ROOT/build/bin/llama-server" "$ROOT/build/bin/llama-bench" "$BIN/"
cp "$ROOT/build/bin/$rpc_target" "$BIN/rpc-server"
echo "build-llama-cpp.sh: built ${TARGETS[*]} of llama-cpp-python $VERSION in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
