#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-quantize with CUDA for Hopper (sm_90), on the GPU machine
# (its image has nvcc, CMake and ninja), from the source stage_llamacpp.sh staged. The build folder
# defaults to build/llamacpp at the repository root: ignored by git, so the device tool keeps it
# between calls on a warm machine. FlashAttention kernels are built (llama.cpp's decode default).
# Prints the folder holding the binaries.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=${1:-$root/benchmarks/zz_llamacpp}
build=${2:-$root/build/llamacpp}
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >&2
ninja -C "$build" llama-bench llama-quantize >&2
cp "$src/LLAMA_CPP_VERSION" "$build/bin/"
echo "$build/bin"
