#!/usr/bin/env bash
# The GPU check (libra_train.bench.gpu_check): the plug-in on real CUDA kernels (sdpa, flash-attn 2) in fp32 and
# bf16, its host syncs (torch.cuda.set_sync_debug_mode), then the LLaVA-1.5-7B-shaped benchmark (full / fastv-q /
# libra at R=0.5 and 0.8, gradient checkpointing). Under 10 minutes on one H100/H200; results in docs/results/gpu-*/.
#
#   bash scripts/gpu_check.sh [--skip-bench] [--out DIR]
#
# Needs: a CUDA torch and this package's requirements (transformers >=5.23,<5.25). flash-attn is optional: found
# if importable; else installed from a wheel given as FLASH_ATTN_WHEEL=/path/to/flash_attn-*.whl, or from PyPI
# with --no-build-isolation when FLASH_ATTN_BUILD=1 (a source build takes a long while); without it the check
# runs sdpa only and says so. On a machine without network, carry wheels (see docs/benchmarks.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible to ' + torch.__file__)"
if ! "$PY" -c "import flash_attn" 2>/dev/null; then
    if [ -n "${FLASH_ATTN_WHEEL:-}" ]; then
        "$PY" -m pip install -q --no-deps "$FLASH_ATTN_WHEEL"
    elif [ "${FLASH_ATTN_BUILD:-0}" = 1 ]; then
        "$PY" -m pip install -q flash-attn --no-build-isolation
    else
        echo "gpu_check: flash-attn not installed (set FLASH_ATTN_WHEEL or FLASH_ATTN_BUILD=1); checking sdpa only" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m libra_train.bench.gpu_check "$@"
