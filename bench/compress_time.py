"""Wall time of the default `foldgpt compress`, stage by stage, its peak resident memory, and the result's
perplexity on held-out text.

    python bench/compress_time.py smollm2-135m --target-params 0.75 --out bench/results/compress_time_smollm2_075.json
    python bench/compress_time.py gemma3-270m --target-params 0.75 --out bench/results/compress_time_gemma3_075.json

Calibration text: the five Austen calibration novels of ../shared/data (SHARED_DATA overrides); evaluation: the
first 16,384 tokens of Pride and Prejudice in 512-token windows, and, as text of another kind than the calibration
novels, the GNU GPL v3 licence text where the system has it (`OOD_TEXT` overrides; `eval_ood` in the row) and
the stories of BIG-bench's causal_judgment task (modern narrative English, ../shared/data/bigbench; `eval_stories`).
`CALIB_TEXT` (files joined by ':') and `EVAL_TEXT` replace the novels and Pride and Prejudice, to check the lead on
another kind of text (bench/other_text.py writes one; the row records the names as `calib_text` and `eval_text`).
Other arguments go to `foldgpt compress` (e.g. `--cure-seed 1`). The compress runs in a child process, so its peak
RSS is the process's own (resource.getrusage of the children).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]


def write_stories(shared: Path, out: Path) -> bool:
    """The inputs of BIG-bench's causal_judgment task (short stories, each ending in a question), one per paragraph,
    as a text file: modern narrative English unlike the calibration novels. False where the task is missing."""
    task = shared / "bigbench" / "causal_judgment" / "task.json"
    if not task.is_file():
        return False
    examples = json.loads(task.read_text())["examples"]
    out.write_text("\n\n".join(e["input"].strip() for e in examples) + "\n")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--target-params", default="0.75")
    ap.add_argument("--out", required=True, help="JSON file for the measurements")
    ap.add_argument("--keep", default=None, help="keep the compressed folder here (default: a temporary one)")
    args, extra = ap.parse_known_args()  # the rest goes to `foldgpt compress`
    args.extra = [a for a in extra if a != "--"]
    data = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "corpora" / "austen"
    text = (os.environ["CALIB_TEXT"].split(os.pathsep) if os.environ.get("CALIB_TEXT")
            else [str(data / f"austen_{n}.txt") for n in CALIB])
    held_out = os.environ.get("EVAL_TEXT") or str(data / "austen_prideprejudice.txt")
    fg = str(Path(sys.executable).with_name("foldgpt"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or str(Path(tmp) / "model")
        cmd = [fg, "compress", args.model, "--text", *text, "--target-params", args.target_params, "--out", out,
               "--overwrite", *args.extra]
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        summary = json.loads((Path(out) / "summary.json").read_text())
        plan = json.loads((Path(out) / "plan.json").read_text())
        ev = Path(tmp) / "eval.json"
        subprocess.run([fg, "eval", out, "--text", held_out, "--seq-len", "512",
                        "--max-tokens", "16384", "--json", str(ev)], check=True, env=env)
        ppl = json.loads(ev.read_text())
        ood = Path(os.environ.get("OOD_TEXT", "/usr/share/common-licenses/GPL-3"))
        ppl_ood = None
        if ood.is_file():
            subprocess.run([fg, "eval", out, "--text", str(ood), "--seq-len", "512", "--max-tokens", "16384", "--json",
                            str(ev)], check=True, env=env)
            ppl_ood = json.loads(ev.read_text())
        stories = Path(tmp) / "stories.txt"
        ppl_stories = None
        if write_stories(data.parents[1], stories):
            subprocess.run([fg, "eval", out, "--text", str(stories), "--seq-len", "512", "--max-tokens", "16384",
                            "--json", str(ev)], check=True, env=env)
            ppl_stories = json.loads(ev.read_text())
    row = {"model": args.model, "target_params": float(args.target_params), "extra": args.extra,
           "calib_text": [Path(t).name for t in text], "eval_text": Path(held_out).name,
           "ood_text": ood.name if ppl_ood is not None else None,
           "wall_seconds": round(wall, 1), "peak_rss_bytes": peak, "stage_seconds": summary["seconds"],
           "params_ratio": summary["params_ratio"], "removed": summary["removed"], "groups": summary["groups"],
           "calib_loss_before_cure": summary["calib_loss_before_cure"], "calib_loss": summary["calib_loss"],
           "eval": ppl, "eval_ood": ppl_ood, "eval_stories": ppl_stories,
           "plan": {k: plan.get(k) for k in ("removed", "groups", "child_ranks", "child_modes", "adapter_init", "unit",
                                             "method", "compensation")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(f"wall {wall:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    for stage, sec in summary["seconds"].items():
        print(f"  {stage:<16} {sec:8.1f} s")
    print(json.dumps(ppl)[:400])


if __name__ == "__main__":
    main()
