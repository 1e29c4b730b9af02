#!/usr/bin/env bash
# The device check of issue #17 (see benchmarks/device_check.py and benchmarks/README.md).
#
#   benchmarks/device_check.sh OUT_DIR            # on a GPU machine: at most 8 minutes
#   benchmarks/device_check.sh OUT_DIR --ci       # CI-sized, on the CPU (tests/test_device_check.py)
#
# Writes the figures under OUT_DIR; env.txt records the machine (nvidia-smi, commit), summary.json
# torch and the CUDA devices.
# PYTHON selects the interpreter (default: python3), e.g. PYTHON=.venv/bin/python.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [--ci] [--only SECTION,...]" >&2
    exit 2
fi
OUT=$1
shift
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"
{
    date -u
    git -C "$HERE/.." rev-parse HEAD 2>/dev/null || echo "no git commit"
    nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
} > "$OUT/env.txt" 2>&1
# the sections' own limits add up to 460 s; this bounds the whole run, start-up included
exec timeout 480 "$PY" "$HERE/device_check.py" "$OUT" "$@"
