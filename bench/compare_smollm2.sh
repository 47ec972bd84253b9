#!/usr/bin/env bash
# The README's headline comparison: SmolLM2-135M at 75% unique parameters, calibrated on five Austen
# novels, evaluated on Pride and Prejudice (never used for calibration). Needs ../shared/data.
#   bash bench/compare_smollm2.sh        (~25 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
A=${AUSTEN:-../shared/data/corpora/austen}
TEXT="$A/austen_emma.txt $A/austen_mansfieldpark.txt $A/austen_sensesensibility.txt $A/austen_northangerabbey.txt $A/austen_persuasion.txt"
export HF_HUB_OFFLINE=1
FG=${FOLDGPT:-.venv/bin/foldgpt}
/usr/bin/time -v $FG compress smollm2-135m --text $TEXT --target-params 0.75 --out runs/smol-fold-075 --overwrite
$FG compress smollm2-135m --text $TEXT --target-params 0.75 --method shortgpt --out runs/smol-short-075 --overwrite
$FG eval smollm2-135m runs/smol-short-075 runs/smol-fold-075 --text $A/austen_prideprejudice.txt \
  --seq-len 512 --max-tokens 32768 --json bench/results/compare_smollm2_075.json
