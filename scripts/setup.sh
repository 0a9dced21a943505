#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything libra-train needs, CPU-only.
# torch is installed first and pinned by constraints.txt so no CUDA wheel is pulled on a CPU machine.
# On a GPU machine: install your CUDA torch build into .venv first, then run this (it keeps that torch),
# and optionally `pip install flash-attn --no-build-isolation`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
constraint=$(mktemp)
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraint"
python -m pip install -q -e ".[dev,trl]" -c "$constraint"   # trl: the optional TRL integration and its tests
rm -f "$constraint"
bash scripts/install_lmms_eval.sh --light   # lmms-eval for tests/integrations, without its CUDA-bound dependencies
echo "libra-train is set up in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
