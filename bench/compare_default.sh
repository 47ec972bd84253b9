#!/usr/bin/env bash
# The default against the best peers given the same cure, on SmolLM2-135M at 75% unique parameters: each row is
# one `foldgpt compress` (timed, peak RSS) and one `foldgpt eval` on Pride and Prejudice (first 16,384 tokens,
# 512-token windows), written to $OUT/ROW.json by bench/compress_time.py. A row whose JSON exists is skipped, so a
# stopped run continues where it stopped. Render the table with `python bench/render_compare.py $OUT`.
#   bash bench/compare_default.sh                 (all rows, about 1 h on 2 CPU cores)
#   ROWS="foldgpt_s0 sleb_s0" bash bench/compare_default.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/results/compare_smollm2-135m_075}
mkdir -p "$OUT"
declare -A ARGS=(
  [foldgpt_s0]="--cure-seed 0"
  [foldgpt_s1]="--cure-seed 1"
  [sleb_s0]="--method sleb --plan bench/plans/smollm2-135m_075_sleb.json --cure --cure-seed 0"
  [sleb_s1]="--method sleb --plan bench/plans/smollm2-135m_075_sleb.json --cure --cure-seed 1"
  [blockpruner_s0]="--method blockpruner --plan bench/plans/smollm2-135m_075_blockpruner.json --cure --cure-seed 0"
  [replaceme_s0]="--method replaceme --cure --cure-seed 0"
  [replaceme_nocure]="--method replaceme --no-cure"
  [sleb_replaceme_s0]="--method sleb --plan bench/plans/smollm2-135m_075_sleb.json --compensate replaceme --cure --cure-seed 0"
  [foldgpt_noalpha_s0]="--no-alpha --cure-seed 0"
  [foldgpt_nocure]="--no-cure"
)
ORDER=${ROWS:-"foldgpt_s0 sleb_s0 replaceme_s0 foldgpt_s1 sleb_s1 blockpruner_s0 replaceme_nocure foldgpt_nocure sleb_replaceme_s0 foldgpt_noalpha_s0"}
for row in $ORDER; do
  [ -f "$OUT/$row.json" ] && { echo "skip $row (done)"; continue; }
  # shellcheck disable=SC2086
  $PY bench/compress_time.py smollm2-135m --target-params 0.75 --out "$OUT/$row.json" ${ARGS[$row]}
done
