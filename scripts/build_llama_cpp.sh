#!/usr/bin/env bash
# llama.cpp beside ours in benchmarks/generate.py: a separate venv with llama-cpp-python built for this CPU, and the
# benchmark's random GPT-2 small as GGUF files (f32, f16, q8_0), checked against our model. Never needed by
# `make test`. Run from anywhere; it is safe to run again (what is already there is kept).
#
#   bash scripts/build_llama_cpp.sh
#   $BENCH_VENV/bin/python benchmarks/generate.py --formats-only      # the weight-format table with llama.cpp rows
#
# Environment:
#   BENCH_VENV   the venv (default: bench-venv beside the repository, outside it)
#   GGUF_DIR     where the GGUF files and the converter go (default: artifacts/bench, git-ignored)
#   SDIST_DIR    where the llama-cpp-python sdist is, or is downloaded to (default: $GGUF_DIR/sdist)
#   JOBS         parallel compile jobs of the build (default: 1; the build takes 10-25 minutes on one job)
#   PYTHON       the Python that creates the venv (default: python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_VENV="${BENCH_VENV:-$(dirname "$ROOT")/bench-venv}"
GGUF_DIR="${GGUF_DIR:-$ROOT/artifacts/bench}"
SDIST_DIR="${SDIST_DIR:-$GGUF_DIR/sdist}"
JOBS="${JOBS:-1}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VERSION="$(sed -n 's/^llama-cpp-python==//p' "$ROOT/requirements-bench.txt")"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
PIP=("$BENCH_VENV/bin/python" -m pip)

echo "== venv: $BENCH_VENV"
if [ ! -x "$BENCH_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$BENCH_VENV"
    "${PIP[@]}" install -q --upgrade pip==26.3 setuptools==84.2.1
fi

echo "== llama-cpp-python $VERSION sdist: $SDIST"
if [ ! -s "$SDIST" ]; then
    mkdir -p "$SDIST_DIR"
    "${PIP[@]}" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

echo "== pinned installs (requirements-bench.txt); llama-cpp-python is compiled here ($JOBS job(s), -march=native)"
# LLAVA_BUILD=OFF: the multimodal library (mtmd) is not used here; llama_cpp imports it only for image chats.
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" \
CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" MAKEFLAGS="-j$JOBS" \
    nice -n 19 "${PIP[@]}" install -r "$ROOT/requirements-bench.txt" --find-links "$SDIST_DIR"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"

echo "== the benchmark's model as GGUF files, checked against ours"
nice -n 19 "$BENCH_VENV/bin/python" "$ROOT/scripts/gpt2_to_gguf.py" --sdist "$SDIST" --out "$GGUF_DIR"

echo
echo "done. The weight-format table with the llama.cpp rows (on a quiet machine):"
echo "  $BENCH_VENV/bin/python $ROOT/benchmarks/generate.py --formats-only --gguf-dir $GGUF_DIR"
