#!/usr/bin/env bash
# Install lmms-eval 0.7.3 into .venv (after scripts/setup.sh) for `python -m lmms_eval --model libra`.
#
#   bash scripts/install_lmms_eval.sh           # --full with CUDA, --light without
#   bash scripts/install_lmms_eval.sh --full    # lmms-eval with all its dependencies (GPU machine)
#   bash scripts/install_lmms_eval.sh --light   # CPU: lmms-eval without its declared dependencies + what it imports
#
# Why two ways: lmms-eval 0.7.3 declares torchvision, opencv, av, wandb==0.25.0, ... . Beside a CUDA torch a full
# install is fine; beside the CPU torch the registry's torchvision fails to import, so --light installs lmms-eval
# with --no-deps and then the extra `lmms-eval-light` (its evaluator, task manager and CLI imports). Both keep
# the installed torch (a constraint pins it) and filelock < 4 (lmms-eval 0.7.3 imports filelock._api).
# `pip check` then lists lmms-eval's declared-but-absent packages (torchvision, timm, ...; --light only): the
# `libra` model and the local tasks do not use them, the paper's benchmarks may (run those on a --full install).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
mode=${1:-auto}
if [ "$mode" = auto ]; then
    mode=$(python -c "import torch; print('--full' if torch.cuda.is_available() else '--light')")
fi
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraint"
case "$mode" in
    --full) python -m pip install -q -e ".[lmms-eval]" -c "$constraint" ;;
    --light)
        python -m pip install -q --no-deps "lmms-eval==0.7.3"
        python -m pip install -q -e ".[lmms-eval-light]" -c "$constraint"
        ;;
    *) echo "usage: $0 [--full|--light]" >&2; exit 2 ;;
esac
python -c "
from lmms_eval.models import get_model
import torch
get_model('libra')  # the entry point of libra-train
print('lmms-eval 0.7.3 installed ($mode), model libra registered; torch', torch.__version__)"
