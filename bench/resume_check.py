"""`kill -9` a real compress during the search and again during the cure, rerun the same command each time, and
compare the result with an uninterrupted run's: the plan (but for when it was made), the weights bit for bit, and the
logits on held-out text. Writes the numbers as JSON.

  OMP_NUM_THREADS=1 python bench/resume_check.py smollm2-135m --out bench/results/resume_check_smollm2-135m.json \\
      -- --seq-len 64 --calib-seqs 32 --cure-steps 20 --cure-checkpoint-every 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "corpora" / "austen"


def command(model: str, text: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "foldgpt.cli", "compress", model, "--text", text, "--out", str(out), *extra]


def run(cmd: list[str], log: Path, stop=None) -> dict:
    """Run `cmd` (stderr to `log`); with `stop`, SIGKILL it as soon as stop() returns a description."""
    t = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        killed = None
        while proc.poll() is None:
            if stop is not None and (killed := stop()) is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.5)
    lines = [ln.split("INFO ", 1)[-1] for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()
             if "resuming:" in ln or "cure: continuing" in ln]
    return {"seconds": round(time.perf_counter() - t, 1), "returncode": proc.returncode, "killed": killed,
            "log": lines}


def saved(state: Path, name: str) -> dict | None:
    try:
        return json.loads((state / name).read_text())
    except (OSError, ValueError):
        return None


def compare(a: Path, b: Path, eval_text: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from foldgpt import api
    from foldgpt.data import tokenize

    def plan(folder):
        d = json.loads((folder / "plan.json").read_text())
        d["provenance"].pop("created")
        return d

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    bitwise = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    (ma, tok), (mb, _) = api.load(a), api.load(b)
    ids = tokenize(tok, eval_text.read_text()[:20000])[: 4 * 256].reshape(4, 256)
    with torch.no_grad():
        la, lb = ma(input_ids=ids).logits, mb(input_ids=ids).logits
    return {"plan_identical": plan(a) == plan(b), "weights_bitwise_equal": bitwise,
            "max_abs_logit_diff": float((la - lb).abs().max()), "logit_windows": list(ids.shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--text", default=str(DATA / "austen_emma.txt"))
    p.add_argument("--eval-text", default=str(DATA / "austen_prideprejudice.txt"))
    p.add_argument("--search-steps", type=int, default=2, help="kill after this many finished search steps")
    p.add_argument("--cure-step", type=int, default=5, help="kill after the cure checkpoint at this step")
    p.add_argument("--out", required=True, help="the JSON to write")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra  # compress options (after --)
    work = Path(tempfile.mkdtemp(prefix="resume-check-"))
    ref, out = work / "uninterrupted", work / "resumed"
    state = out.parent / f".{out.name}.resume"
    result = {"model": args.model, "text": args.text, "compress_options": args.extra,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    result["uninterrupted"] = run(command(args.model, args.text, ref, args.extra), work / "uninterrupted.log")

    def in_search():
        s = saved(state, "search.json")
        return f"after search step {s['rounds']}" if s and s["rounds"] >= args.search_steps else None

    def in_cure():
        c = saved(state, "cure.json")
        if c and c["step"] >= args.cure_step:
            time.sleep(3)  # into the next steps, past the checkpoint
            return f"in the cure, after the checkpoint at step {c['step']}"
        return None

    cmd = command(args.model, args.text, out, args.extra)
    result["first"] = run(cmd, work / "first.log", in_search)
    result["second"] = run(cmd, work / "second.log", in_cure)
    result["third"] = run(cmd, work / "third.log")
    result["state_left"] = state.exists()
    result.update(compare(out, ref, Path(args.eval_text)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
