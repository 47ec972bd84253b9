#!/usr/bin/env bash
# Set up a virtual environment (pinned, CPU torch) and run the main job: compress SmolLM2-135M to 75%
# of its unique parameters with the built-in default text. Extra arguments go to `foldgpt compress`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -x .venv/bin/foldgpt ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0              # the CPU build; a bare `torch` pulls CUDA
  .venv/bin/pip install -q --no-deps -r requirements-ci.txt
  .venv/bin/pip install -q --no-deps -e .
fi
.venv/bin/foldgpt compress smollm2-135m --target-params 0.75 --out runs/smollm2-135m-075 --overwrite "$@"
