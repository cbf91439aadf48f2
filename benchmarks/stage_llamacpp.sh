#!/usr/bin/env bash
# Stages llama.cpp's source for the peer benchmark (bench_llamacpp.py) in $1 (default
# benchmarks/zz_llamacpp, which travels to the GPU machine with the working tree; never commit it).
# The source is the llama.cpp that llama-cpp-python vendors (the registry is the only network we
# have), trimmed to what a CUDA build of llama-bench and llama-quantize needs, so that the tree
# stays under the device tool's 64 MiB. Version: $2 (default 0.3.36, the oracle the tests build).
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$root/zz_llamacpp}
version=${2:-0.3.36}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download "llama-cpp-python==$version" --no-deps --no-binary :all: -d "$tmp" -q
tar xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$version/vendor/llama.cpp"
# the sdist carries the submodule's git data: note the commit (llama-bench's own build_commit would
# read this repository's HEAD instead, the staged tree having no git of its own), then drop the link
echo "llama.cpp $(git -C "$src" log -1 --format='%H (%cs)') from llama-cpp-python $version" > "$src/LLAMA_CPP_VERSION"
rm -f "$src/.git"
# models (vocab test files), docs, tests, the web UI and the backends not built are not needed
rm -rf "$src"/{models,docs,tests,benches,media,examples,gguf-py,conversion,scripts,.github,.devops,tools/ui,tools/server}
for backend in "$src"/ggml/src/ggml-*/; do
    case "$(basename "$backend")" in ggml-cpu|ggml-cuda) ;; *) rm -rf "$backend" ;; esac
done
rm -rf "$dest" && mkdir -p "$(dirname "$dest")" && mv "$src" "$dest"
du -sh "$dest" >&2
echo "$dest"
