"""Peak resident memory of gate training alone (issue 5: below twice the model's weight bytes).

Builds a random model of a real shape (weights do not change memory), then runs `train_gates` with the
library's defaults (batch 4 x 256 tokens) and with micro-batching + gradient checkpointing, each in its
own process so one peak does not hide the other. Prints a table and writes JSON.

    python bench/gate_memory.py --shape tinyllama-1.1b --steps 2 --json bench/results/gate_memory_1.1b.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def one(shape: str, steps: int, micro: int, ckpt: bool, seq_len: int, batch: int) -> dict:
    import torch

    torch.set_flush_denormal(True)  # random weights: keep the CPU off denormal slow paths
    from pipeline_cost import PeakRSS
    from shapes import random_model

    from foldgpt.adapters import get_adapter
    from foldgpt.config import GateConfig
    from foldgpt.stages.gates import train_gates

    model = random_model(shape, torch.float32)
    adapter = get_adapter(model.config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, model.config.vocab_size, (16, seq_len), generator=g)
    block = sum(p.numel() for p in adapter.layers(model)[0].parameters())
    cfg = GateConfig(steps=steps, rounds=1, batch_size=batch, micro_batch=micro, grad_checkpointing=ckpt)
    import psutil

    before = psutil.Process().memory_info().rss
    t = time.perf_counter()
    with PeakRSS() as mem:
        train_gates(model, adapter, calib, 2 * block, cfg, seed=0)
    return {"shape": shape, "micro_batch": micro, "grad_checkpointing": ckpt, "batch": batch, "seq_len": seq_len,
            "steps": steps, "weight_bytes": weight_bytes, "rss_before": before, "peak_rss": mem.peak,
            "peak_over_weights": mem.peak / weight_bytes, "seconds": time.perf_counter() - t}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:
        micro, ckpt = a._one.split(",")
        print(json.dumps(one(a.shape, a.steps, int(micro), ckpt == "1", a.seq_len, a.batch)))
        return
    rows = []
    for micro, ckpt in (("0", "0"), ("1", "1")):
        out = subprocess.run([sys.executable, __file__, "--shape", a.shape, "--steps", str(a.steps), "--seq-len",
                              str(a.seq_len), "--batch", str(a.batch), "--_one", f"{micro},{ckpt}"],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib = 2**30
    print(f"gate training, {a.shape}, fp32 CPU, batch {a.batch} x {a.seq_len} tokens, {a.steps} steps")
    print("| micro-batch | checkpointing | weights GiB | peak RSS GiB | peak / weights | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['micro_batch'] or r['batch']} | {'yes' if r['grad_checkpointing'] else 'no'} | "
              f"{r['weight_bytes'] / gib:.2f} | {r['peak_rss'] / gib:.2f} | {r['peak_over_weights']:.2f}x | "
              f"{r['seconds']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
