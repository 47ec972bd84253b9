"""Dense vs folded, each loaded in its own process: unique params, bytes on disk, resident memory after
load, prefill time for 512 tokens and decode tokens/s for 128 new tokens.

    python bench/efficiency.py smollm2-135m runs/smol-075 --out bench/results/efficiency_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(source: str, out: str, threads: int) -> None:
    import psutil
    import torch

    torch.set_num_threads(threads)
    import foldgpt
    from foldgpt.models import resolve

    path = resolve(source)
    rss0 = psutil.Process().memory_info().rss
    model, tok = foldgpt.load(path)
    with torch.no_grad():  # touch every weight once, so lazily mapped pages count in both cases
        for p in model.parameters():
            p.sum()
    rss = psutil.Process().memory_info().rss
    params = sum(p.numel() for p in model.parameters())
    files = [p for p in Path(path).iterdir() if p.suffix == ".safetensors"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (1, 512), generator=gen)
    with torch.no_grad():
        model(input_ids=ids[:, :32])  # warm-up
        prefill = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            prefill.append(time.perf_counter() - t)
        prompt = ids[:, :32]
        t = time.perf_counter()
        out_ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=128,
                                 min_new_tokens=128, do_sample=False, pad_token_id=0)
        decode_s = time.perf_counter() - t
    new = out_ids.shape[1] - prompt.shape[1]
    Path(out).write_text(json.dumps({
        "model": source, "depth": model.config.num_hidden_layers, "unique_params": params,
        "weight_bytes": params * next(model.parameters()).element_size(),
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "rss_after_load": rss, "rss_before_load": rss0,
        "prefill_512_s": statistics.median(prefill), "decode_tok_s": new / decode_s,
    }))


def measure(source: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        subprocess.run([sys.executable, __file__, "--worker", source, "--json", out, "--threads", str(threads)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dense", nargs="?")
    p.add_argument("folded", nargs="?")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.json, a.threads)
    d, f = measure(a.dense, a.threads), measure(a.folded, a.threads)
    overhead = d["rss_after_load"] - d["weight_bytes"]
    mem_target = f["weight_bytes"] + overhead
    speed_target = d["decode_tok_s"] * d["depth"] / f["depth"] * 0.9
    mib = 2**20
    rows = [
        ("depth (positions)", d["depth"], f["depth"]),
        ("unique parameters", f"{d['unique_params']:,}", f"{f['unique_params']:,}"),
        ("bytes on disk (MiB)", f"{d['bytes_on_disk'] / mib:.1f}", f"{f['bytes_on_disk'] / mib:.1f}"),
        ("resident memory after load (MiB)", f"{d['rss_after_load'] / mib:.1f}", f"{f['rss_after_load'] / mib:.1f}"),
        ("prefill 512 tokens (s)", f"{d['prefill_512_s']:.3f}", f"{f['prefill_512_s']:.3f}"),
        ("decode tokens/s (128 new)", f"{d['decode_tok_s']:.1f}", f"{f['decode_tok_s']:.1f}"),
    ]
    lines = ["| | dense | folded |", "|---|---|---|"] + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    mem_ok = f["rss_after_load"] <= 1.10 * mem_target
    speed_ok = f["decode_tok_s"] >= speed_target
    lines += ["", f"Memory target: folded RSS <= 1.10 x (unique params x bytes/param + dense non-weight overhead "
              f"{overhead / mib:.1f} MiB) = {1.10 * mem_target / mib:.1f} MiB: {'met' if mem_ok else 'NOT met'} "
              f"({f['rss_after_load'] / mib:.1f} MiB).",
              f"Decode target: >= dense x depth ratio x 0.9 = {speed_target:.1f} tok/s: "
              f"{'met' if speed_ok else 'NOT met'} ({f['decode_tok_s']:.1f} tok/s).",
              f"({a.threads} threads, fp32, CPU; dense = {a.dense}, folded = {a.folded})"]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps({"dense": d, "folded": f}, indent=2))


if __name__ == "__main__":
    main()
