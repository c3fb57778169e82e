#!/usr/bin/env bash
# The GPU check on a CUDA machine that reaches no package registry: install keyedge from this tree without
# dependencies or build isolation (the machine's own torch, timm, onnxruntime are used as they are), then run
#   python -m keyedge.benchmarks.gpu_check --out OUT [options]
# Usage: bash benchmarks/gpu_check.sh OUT [--data FILE.npz] [--budget SECONDS] [other options of the check]
# (make FILE.npz on a machine with Fashion-MNIST: python -m keyedge.benchmarks.gpu_check --write-data FILE.npz)
# If pip cannot install here (read-only or externally managed Python), the check runs from a tree of links.
set -euo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT [--data FILE.npz] [options of python -m keyedge.benchmarks.gpu_check]" >&2
    exit 2
fi
out=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
log=$(mktemp)

if "$python" -m pip install --quiet --no-deps --no-build-isolation -e "$root" >"$log" 2>&1; then
    echo "installed keyedge from $root (pip install --no-deps --no-build-isolation -e .)"
    exec "$python" -m keyedge.benchmarks.gpu_check --out "$out" "$@"
fi
# keyedge.exporters and keyedge.benchmarks live in exporters/ and benchmarks/ (pyproject's package-dir mapping):
# a tree of links puts them where Python looks for them, ahead of the working directory on sys.path
links=$(mktemp -d)
mkdir "$links/keyedge"
for entry in "$root"/keyedge/*; do ln -s "$entry" "$links/keyedge/"; done
ln -s "$root/exporters" "$links/keyedge/exporters"
ln -s "$root/benchmarks" "$links/keyedge/benchmarks"
echo "pip could not install keyedge (its output: $log); running it from $links"
exec "$python" -c 'import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module("keyedge.benchmarks.gpu_check", run_name="__main__", alter_sys=True)' \
    "$links" --out "$out" "$@"
