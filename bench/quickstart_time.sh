#!/usr/bin/env bash
# Time `bash scripts/quickstart.sh` as a new user meets it: a fresh clone of this repository (so a fresh venv with
# the pinned packages), an empty model cache (the GGUF checkpoint is converted once), then the main job. Prints the
# wall time and peak RSS of the whole script and writes them to bench/results/quickstart_time.json.
#   bash bench/quickstart_time.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git clone -q "$ROOT" "$TMP/foldgpt"
cd "$TMP/foldgpt"
export FOLDGPT_CACHE="$TMP/cache"
start=$(date +%s)
/usr/bin/time -f "%M" -o "$TMP/rss" bash scripts/quickstart.sh > "$TMP/log" 2>&1 || { tail -20 "$TMP/log"; exit 1; }
wall=$(( $(date +%s) - start ))
rss_kb=$(tail -1 "$TMP/rss")
tail -5 "$TMP/log"
printf '{"wall_seconds": %d, "peak_rss_kib": %d, "commit": "%s"}\n' "$wall" "$rss_kb" "$(git rev-parse HEAD)" \
  | tee "$ROOT/bench/results/quickstart_time.json"
