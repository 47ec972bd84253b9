"""How each stage's cost grows with depth, width and calibration tokens, on random models of real shapes.

    python bench/scaling.py --out bench/results/scaling        (CPU, fp32; ~20 minutes on 2 cores)

Each configuration runs bench/pipeline_cost.py in its own process (clean peak-memory numbers). The fit
is seconds = a * x^b per stage (least squares in log space) for x = layers, params per layer, tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent

SWEEPS = {
    "depth": [("smollm2-135m", {"layers": n}) for n in (8, 16, 30)],
    "width": [("smollm2-135m", {}), ("smollm2-360m", {}), ("tinyllama-1.1b", {})],
    "calibration tokens": [("smollm2-135m", {"layers": 8, "batch_size": b}) for b in (1, 2, 4)],
}
STAGES = ["analyze", "plan (gates + fold costs)", "cure"]


def run(shape: str, opts: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, str(HERE / "pipeline_cost.py"), "--shape", shape, "--gate-steps", str(steps),
               "--cure-steps", str(steps), "--calib-seqs", "32", "--seq-len", "256", "--json", str(out)]
        if "layers" in opts:
            cmd += ["--layers", str(opts["layers"])]
        if "batch_size" in opts:
            cmd += ["--batch-size", str(opts["batch_size"])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((a - mx) * (c - my) for a, c in zip(lx, ly)) / max(1e-12, sum((a - mx) ** 2 for a in lx))
    return math.exp(my - b * mx), b


def x_of(sweep: str, r: dict) -> float:
    if sweep == "depth":
        return r["layers"]
    if sweep == "width":
        return r["params"] / r["layers"]
    return r["tokens_per_step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/scaling")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sweeps", default=",".join(SWEEPS))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, fits = [], []
    for sweep in a.sweeps.split(","):
        results = []
        for shape, opts in SWEEPS[sweep]:
            r = run(shape, opts, a.steps)
            r["tokens_per_step"] = opts.get("batch_size", 4) * 256
            r["sweep"] = sweep
            results.append(r)
            rows.append(r)
            print(sweep, shape, opts, {s: round(r["stages"][s]["seconds"], 2) for s in STAGES}, flush=True)
        for stage in STAGES:
            xs = [x_of(sweep, r) for r in results]
            ys = [r["stages"][stage]["seconds"] for r in results]
            _, b = fit(xs, ys)
            fits.append({"sweep": sweep, "stage": stage, "exponent": b})
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "fits": fits}, indent=2))
    lines = ["| sweep | shape | layers | params | " + " | ".join(f"{s} s" for s in STAGES)
             + " | peak RSS (MiB) | weights (MiB) |", "|" + "---|" * (6 + len(STAGES))]
    for r in rows:
        lines.append(f"| {r['sweep']} | {r['shape']} | {r['layers']} | {r['params'] / 1e6:.1f}M | "
                     + " | ".join(f"{r['stages'][s]['seconds']:.1f}" for s in STAGES)
                     + f" | {r['peak_rss_run'] / 2**20:.0f} | {r['weight_bytes'] / 2**20:.0f} |")
    lines += ["", "| sweep | stage | fitted exponent b (seconds ~ x^b) |", "|---|---|---|"]
    lines += [f"| {f['sweep']} | {f['stage']} | {f['exponent']:.2f} |" for f in fits]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.sweeps.split(",")), figsize=(5 * len(a.sweeps.split(",")), 3.6))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, sweep in zip(axes, a.sweeps.split(",")):
        rs = [r for r in rows if r["sweep"] == sweep]
        for stage in STAGES:
            ax.plot([x_of(sweep, r) for r in rs], [r["stages"][stage]["seconds"] for r in rs], marker="o",
                    label=stage)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel({"depth": "layers", "width": "params per layer", "calibration tokens": "tokens per step"}[sweep])
        ax.set_ylabel("seconds")
        ax.set_title(sweep)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print((out / "scaling.md").read_text())


if __name__ == "__main__":
    main()
