#!/usr/bin/env bash
# One prepared check for a lent GPU (< 8 minutes): the whole pipeline on a LLaMA-2-7B-shaped random model
# in bf16, printing stage times and peak GPU memory; then ShortGPT + cure with every layer offloaded to the CPU
# (--device-map offload), whose peak GPU memory should be about one layer plus activations, not the model.
# Run from the repository root:
#   bash bench/gpu_check.sh   (writes bench/results/gpu_check_llama2-7b.json and gpu_check_llama2-7b_offload.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import foldgpt" 2>/dev/null; then
  $PY -m pip install -q --no-deps -e . >/dev/null
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "${OUT:-bench/results}"
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
timeout 330 $PY bench/pipeline_cost.py --shape llama2-7b --device cuda --dtype bf16 --seq-len 2048 \
  --calib-seqs 64 --gate-steps 10 --cure-steps 10 --batch-size 4 --grad-checkpointing --teacher-cache \
  --json "${OUT:-bench/results}/gpu_check_llama2-7b.json"
timeout 120 $PY bench/pipeline_cost.py --shape llama2-7b --device cuda --dtype bf16 --seq-len 1024 \
  --calib-seqs 16 --cure-steps 3 --batch-size 2 --method shortgpt --device-map offload \
  --json "${OUT:-bench/results}/gpu_check_llama2-7b_offload.json"
