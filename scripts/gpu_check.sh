#!/usr/bin/env bash
# The accelerator check: kernel correctness, the attention timing table, block-sparse rows at 16K and the
# lm_gpu step time and MFU, as JSON in $OUT/gpu_check.json (effitrans/bench/gpu_check.py says what each
# section holds). Runs from the source tree; ends within 8 minutes on one H200.
#
#   OUT=/tmp/gpu_check scripts/gpu_check.sh            # on a GPU machine
#   OUT=/tmp/gpu_check scripts/gpu_check.sh --dry      # tiny shapes, GPU-only rows skipped (any CPU)
#
# Wheels of packages the machine lacks (ml-collections for the lm section) are installed from
# $WHEELS (default .whl) into /tmp/site when that folder holds any.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
WHEELS="${WHEELS:-.whl}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
timeout "${GPU_CHECK_TIMEOUT:-470}" "$PYTHON" -m effitrans.bench gpu_check --out "$OUT" "$@"
