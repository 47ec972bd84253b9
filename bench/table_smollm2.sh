#!/usr/bin/env bash
# Issue 4's table: every method at 75% and 60% unique parameters on SmolLM2-135M, each peer with and
# without the same cure, calibrated on five Austen novels, evaluated on Pride and Prejudice (held out)
# and the BIG-bench tasks (first 25 examples of each: the CPU budget). Needs ../shared/data.
#   bash bench/table_smollm2.sh             (peers + foldgpt; ~2.5 h on 2 CPU cores)
#   ABLATIONS=1 TARGETS=0.75 bash bench/table_smollm2.sh   (foldgpt's ablation rows)
# A stopped run continues where it stopped when started again (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${SHARED_DATA:-../shared/data}
A=$D/corpora/austen
TEXT="$A/austen_emma.txt $A/austen_mansfieldpark.txt $A/austen_sensesensibility.txt $A/austen_northangerabbey.txt $A/austen_persuasion.txt"
TASKS=$(find "$D/bigbench" -name task.json | sort | paste -sd, -)
MODEL=${MODEL:-smollm2-135m}
TARGETS=${TARGETS:-0.75,0.6}
if [ "${ABLATIONS:-0}" = 1 ]; then
  METHODS=foldgpt-gates-only,foldgpt-bi,foldgpt-no-norm,foldgpt-no-tail
  OUT=${OUT:-bench/results/table_${MODEL}_ablations}
else
  METHODS=shortgpt,foldgpt,sleb,laco,angular,blockpruner,random
  OUT=${OUT:-bench/results/table_${MODEL}}
fi
export HF_HUB_OFFLINE=1
FG=${FOLDGPT:-.venv/bin/foldgpt}
$FG bench "$MODEL" --methods "$METHODS" --targets "$TARGETS" --cure --text $TEXT \
  --eval-text "$A/austen_prideprejudice.txt" --eval-max-tokens 16384 --tasks "$TASKS" --task-limit 25 \
  --cure-precision bf16 --out "$OUT" --overwrite --resume
