#!/usr/bin/env bash
# Issue 4's table: every method at 75% (and 60%) unique parameters on SmolLM2-135M, each peer with and without
# the same cure (MODEL=gemma3-270m: TARGETS=0.75 only; 60% is below its embeddings, see bench/budget_check.py),
# calibrated on five Austen novels, evaluated on Pride and Prejudice (held out,
# first 16,384 tokens) and the BIG-bench tasks in ../shared/data (first 25 examples of each: the CPU budget).
#   bash bench/table_smollm2.sh                       (all rows; ~4 h per target on 2 CPU cores)
#   METHODS=sleb,laco OUT=bench/results/part2 bash bench/table_smollm2.sh   (some rows)
#   python bench/render_rows.py A.rows.jsonl B.rows.jsonl OUT   (one table from several partial runs)
# A stopped run continues where it stopped when started again with the same command (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${SHARED_DATA:-../shared/data}
A=$D/corpora/austen
TEXT="$A/austen_emma.txt $A/austen_mansfieldpark.txt $A/austen_sensesensibility.txt $A/austen_northangerabbey.txt $A/austen_persuasion.txt"
TASKS=$(find "$D/bigbench" -name task.json | sort | paste -sd, -)
MODEL=${MODEL:-smollm2-135m}
TARGETS=${TARGETS:-0.75,0.6}
METHODS=${METHODS:-"shortgpt,foldgpt,foldgpt-no-child-gates,foldgpt-gates,foldgpt-gates-only,foldgpt-bi,sleb,blockpruner,laco,angular,random"}
OUT=${OUT:-bench/results/table_${MODEL}}
export HF_HUB_OFFLINE=1
FG=${FOLDGPT:-.venv/bin/foldgpt}
$FG bench "$MODEL" --methods "$METHODS" --targets "$TARGETS" --cure --text $TEXT \
  --eval-text "$A/austen_prideprejudice.txt" --eval-max-tokens 16384 --tasks "$TASKS" --task-limit 25 \
  --cure-precision bf16 --out "$OUT" --overwrite --resume
