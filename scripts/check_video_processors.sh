#!/usr/bin/env bash
# The video tests against transformers' real video processors (tests/data/test_real_video_processors.py), which
# need torchvision: on CPU machines the torchvision wheel beside torch 2.13 does not import, so this builds a
# separate venv (default .venv-video, ~6 GB) with torch 2.14.1 + torchvision 0.29.1, torchcodec and PyAV, and
# runs them there. Video *files* are decoded by torchcodec, which loads FFmpeg's shared libraries (4-7):
# `apt install ffmpeg` (Debian 12: FFmpeg 5.1) if `ffmpeg -version` finds none.
#     bash scripts/check_video_processors.sh            # VENV=/path/to/venv to put it elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-video}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" torchcodec av
constraint=$(mktemp)
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraint"
"$VENV/bin/python" -m pip install -q --no-deps "lmms-eval==0.7.3"   # its video-file requests (the libra model)
"$VENV/bin/python" -m pip install -q -e ".[dev,lmms-eval-light]" -c "$constraint"
rm -f "$constraint"
command -v ffmpeg >/dev/null || echo "note: no FFmpeg found: the video-file tests will fail to decode (apt install ffmpeg)"
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -n 0 -p no:cacheprovider tests/data/test_real_video_processors.py "$@"
