#!/usr/bin/env bash
# The default against the best peers given the same cure (TARGET, default 0.75 unique parameters): each row is one
# `foldgpt compress` (timed, peak RSS) and one `foldgpt eval` on Pride and Prejudice (first 16,384 tokens, 512-token
# windows), written to $OUT/ROW.json by bench/compress_time.py. A row whose JSON exists is skipped, so a stopped run
# continues where it stopped. Render the table with `python bench/render_compare.py $OUT`.
#   bash bench/compare_default.sh                                  (SmolLM2-135M, all rows: about 1 h on 2 CPU cores)
#   MODEL=gemma3-270m ROWS="foldgpt_s0 blockpruner_s0" bash bench/compare_default.sh
#   TARGET=0.60 ROWS="foldgpt_s0 sleb_s0 shortgpt_s0" bash bench/compare_default.sh
#   TEXT=code ROWS="foldgpt_s0 shortgpt_s0 sleb_search_s0" bash bench/compare_default.sh
#     calibrates on another kind of text (bench/other_text.py: Python's standard library, modules a-m) and measures
#     on its held-out part (modules n-z) and on Pride and Prejudice; results in ..._code/.
# Peers whose searches take hours re-apply the plans of those searches (bench/plans/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-smollm2-135m}
TARGET=${TARGET:-0.75}
TAG=$(printf '%03d' "$(awk -v t="$TARGET" 'BEGIN{printf "%d", t*100+0.5}')")
TEXT=${TEXT:-austen}
if [ "$TEXT" != austen ]; then  # another kind of calibration text, written once into a cache folder
  CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/foldgpt/other_text
  read -r CAL HELD < <($PY bench/other_text.py "$TEXT" "$CACHE") || true
  [ -n "${HELD:-}" ] || { echo "error: bench/other_text.py wrote no '$TEXT' text (TEXT=code is the one there is)"; exit 2; }
  export CALIB_TEXT=$CAL EVAL_TEXT=$HELD
  export OOD_TEXT=${SHARED_DATA:-../shared/data}/corpora/austen/austen_prideprejudice.txt
fi
OUT=${OUT:-bench/results/compare_${MODEL}_${TAG}$([ "$TEXT" = austen ] || echo "_$TEXT")}
P=bench/plans/${MODEL}_${TAG}
mkdir -p "$OUT"
declare -A ARGS=(
  [foldgpt_s0]="--cure-seed 0"
  [foldgpt_s1]="--cure-seed 1"
  [sleb_s0]="--method sleb --plan ${P}_sleb.json --cure --cure-seed 0"
  [sleb_s1]="--method sleb --plan ${P}_sleb.json --cure --cure-seed 1"
  [blockpruner_s0]="--method blockpruner --plan ${P}_blockpruner.json --cure --cure-seed 0"
  [blockpruner_s1]="--method blockpruner --plan ${P}_blockpruner.json --cure --cure-seed 1"
  [sleb_search_s0]="--method sleb --cure --cure-seed 0"
  [sleb_search_s1]="--method sleb --cure --cure-seed 1"
  [shortgpt_s0]="--method shortgpt --cure --cure-seed 0"
  [shortgpt_s1]="--method shortgpt --cure --cure-seed 1"
  [replaceme_s0]="--method replaceme --cure --cure-seed 0"
  [replaceme_nocure]="--method replaceme --no-cure"
  [sleb_replaceme_s0]="--method sleb --plan ${P}_sleb.json --compensate replaceme --cure --cure-seed 0"
  [foldgpt_noalpha_s0]="--no-alpha --cure-seed 0"
  [foldgpt_nocure]="--no-cure"
  [foldgpt_plan_nocure]="--plan ${P}_foldgpt.json --no-cure"
  [foldgpt_plan_childlr0_s0]="--plan ${P}_foldgpt.json --child-lr-scale 0 --cure-seed 0"
  [sleb_nocure]="--method sleb --plan ${P}_sleb.json --no-cure"
  [foldgpt_compensate_s0]="--compensate replaceme --cure-seed 0"
  [foldgpt_r0125_s0]="--child-fractions 0.125 --cure-seed 0"
  [foldgpt_r0125_s1]="--child-fractions 0.125 --cure-seed 1"
  [foldgpt_r025_s0]="--child-fractions 0.25 --cure-seed 0"
  [foldgpt_greedy_s0]="--ranking greedy --cure-seed 0"
  [foldgpt_refine_s0]="--refine 8 --cure-seed 0"
  [foldgpt_sg1_s0]="--search-general 1 --cure-seed 0"
  [foldgpt_r0125_refine_s0]="--child-fractions 0.125 --refine 8 --cure-seed 0"
  [foldgpt_gen25_s0]="--general-share 0.25 --cure-seed 0"
  [foldgpt_gen25_s1]="--general-share 0.25 --cure-seed 1"
  [shortgpt_gen25_s0]="--method shortgpt --general-share 0.25 --cure --cure-seed 0"
  [sleb_gen25_s0]="--method sleb --plan ${P}_sleb.json --general-share 0.25 --cure --cure-seed 0"
  [blockpruner_gen25_s0]="--method blockpruner --plan ${P}_blockpruner.json --general-share 0.25 --cure --cure-seed 0"
)
ORDER=${ROWS:-"foldgpt_s0 sleb_s0 replaceme_s0 foldgpt_s1 sleb_s1 blockpruner_s0 replaceme_nocure foldgpt_nocure sleb_replaceme_s0 foldgpt_noalpha_s0"}
for row in $ORDER; do
  [ -f "$OUT/$row.json" ] && { echo "skip $row (done)"; continue; }
  # shellcheck disable=SC2086
  $PY bench/compress_time.py "$MODEL" --target-params "$TARGET" --out "$OUT/$row.json" ${ARGS[$row]}
done
