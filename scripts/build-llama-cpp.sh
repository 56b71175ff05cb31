#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-server, llama-bench, rpc-server) from the llama.cpp that the
# pinned llama-cpp-python vendors, so that benchmarks and tests compare against llama.cpp itself
# and not against our settings (docs/notes.md §8), and so that RPC tests have real rpc-servers.
# `make test` runs it (`make tools`).
#
# The sdist comes through pip's configured index; the build is cached outside the clone, under
# $JUPYTER_LLM_LLAMA_CPP_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/jupyter_llm/llama.cpp)/<version>/,
# so that CI's fresh clones on one machine build once: ~13 min on 2 cores the first time,
# nothing after. Binaries an older version of this script built in the clone
# (.cache/llama.cpp/<version>/bin) are copied there instead of built again.
#
#   scripts/build-llama-cpp.sh           build if needed; prints the bin directory on its last line
#   scripts/build-llama-cpp.sh --where   only print the bin directory (whether built or not)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}"
CACHE="${JUPYTER_LLM_LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jupyter_llm/llama.cpp}"
ROOT="$CACHE/$VERSION"
BIN="$ROOT/bin"
TARGETS=(llama-server llama-bench rpc-server)

if [ "${1:-}" = "--where" ]; then echo "$BIN"; exit 0; fi

have_all() { for t in "${TARGETS[@]}"; do [ -x "$1/$t" ] || return 1; done; }
if have_all "$BIN"; then echo "$BIN"; exit 0; fi

OLD_BIN="$PWD/.cache/llama.cpp/$VERSION/bin"
if [ "$OLD_BIN" != "$BIN" ] && have_all "$OLD_BIN"; then
    # statically linked (BUILD_SHARED_LIBS=OFF): the binaries alone are the whole build
    mkdir -p "$BIN.tmp.$$"
    for t in "${TARGETS[@]}"; do cp -p "$OLD_BIN/$t" "$BIN.tmp.$$/"; done
    rm -rf "$BIN"; mv "$BIN.tmp.$$" "$BIN"
    echo "build-llama-cpp.sh: copied ${TARGETS[*]} from $OLD_BIN" >&2
    echo "$BIN"; exit 0
fi

for tool in cmake c++ make; do
    command -v "$tool" >/dev/null || { echo "build-llama-cpp.sh: $tool is not installed: cannot build llama.cpp" >&2; exit 2; }
done

mkdir -p "$ROOT"
start=$(date +%s)
if [ ! -d "$ROOT/src/vendor/llama.cpp" ]; then
    tmp=$(mktemp -d)
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
    mkdir -p "$ROOT/src.tmp.$$"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$ROOT/src.tmp.$$" --strip-components=1
    rm -rf "$tmp" "$ROOT/src"
    mv "$ROOT/src.tmp.$$" "$ROOT/src"  # whole or not at all: an interrupted unpack is not reused
fi
cmake -S "$ROOT/src/vendor/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON >/dev/null
# The rpc-server target is called ggml-rpc-server in some trees, rpc-server in others.
targets=$(cmake --build "$ROOT/build" --target help)  # whole, before grep: pipefail and grep -q's SIGPIPE
rpc_target=rpc-server
if grep -q "ggml-rpc-server" <<<"$targets"; then rpc_target=ggml-rpc-server; fi
cmake --build "$ROOT/build" --target llama-server llama-bench "$rpc_target" -j "$(nproc)" >/dev/null
mkdir -p "$BIN.tmp.$$"
cp "$ROOT/build/bin/llama-server" "$ROOT/build/bin/llama-bench" "$BIN.tmp.$$/"
cp "$ROOT/build/bin/$rpc_target" "$BIN.tmp.$$/rpc-server"
rm -rf "$BIN"; mv "$BIN.tmp.$$" "$BIN"  # complete binaries only: a build cut short leaves none
echo "build-llama-cpp.sh: built ${TARGETS[*]} of llama-cpp-python $VERSION in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
