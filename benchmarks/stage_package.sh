#!/usr/bin/env bash
# Lays the repository out as the installed `qruntime` namespace in $1 (default /tmp/qruntime-pkg),
# without pip (the GPU machines have no network for build dependencies). Use: PYTHONPATH=$1.
set -euo pipefail
dest=${1:-/tmp/qruntime-pkg}
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$dest" && mkdir -p "$dest"
cp -r "$root/qruntime" "$dest/qruntime"
for sub in converters quantizers kernels; do cp -r "$root/$sub" "$dest/qruntime/$sub"; done
# pure-Python runtime deps the GPU image lacks, carried in .device_deps/ (run's `carry`)
[ -d "$root/.device_deps" ] && cp -r "$root/.device_deps/." "$dest/"
echo "$dest"
