"""Do the search's cheap scores rank actions as the exact calibration NLL does, and what does each cost?

From the dense model (the search's first step), every action of every `--stride`-th layer (delete attention,
delete MLP, delete the layer, fitted child at each rank) is scored three ways on the search's windows:
`nll` (the vocabulary head, the reference), `topk` (the teacher's top-k tokens + the target) and both on half the
windows. Prints Spearman's rank correlation of the loss rise per parameter saved against the reference, whether
the best action agrees, the overlap of the best five, and the seconds per trial.

    python bench/search_agreement.py smollm2-135m --out bench/results/search_agreement_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--stride", type=int, default=3, help="score the actions of every n-th layer")
    ap.add_argument("--windows", type=int, default=4, help="windows of the reference (the variants use half)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from foldgpt.config import CompressConfig
    from foldgpt.methods import Context
    from foldgpt.methods.search import _Scorer, layer_costs, ranks_for, transitions
    from foldgpt.pipeline import prepare
    from foldgpt.stages.budget import plan_budget

    data = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "corpora" / "austen"
    cfg = CompressConfig()
    s = prepare(args.model, [str(data / f"austen_{n}.txt") for n in CALIB], cfg)
    n = len(s.adapter.layers(s.dense))
    budget = plan_budget(s.dense, s.adapter, n, cfg.target_params, None, 0.5, 2, 8)
    ctx = Context(s.dense, s.adapter, s.calib, cfg, budget, s.bos, s.similarity)
    fits = ctx.child_fits()
    costs = layer_costs(ctx.model, ctx, fits.paths)
    ranks = ranks_for(costs[0], cfg.ranking.child_fractions)
    actions = [(i, st) for i in range(0, n, args.stride) for st in transitions(("keep",), ranks)]
    w = args.windows
    variants = {"nll": ("nll", w), "topk": ("topk", w), f"nll, {w // 2} windows": ("nll", w // 2),
                f"topk, {w // 2} windows": ("topk", w // 2)}
    scores, seconds = {}, {}
    for name, (score, windows) in variants.items():
        scorer = _Scorer(ctx, ctx.calib[:windows], fits, score, cfg.ranking.topk)
        try:
            base = scorer.refresh()
            t = time.perf_counter()
            scores[name] = [(scorer.trial(i, st) - base) / (costs[i].block - costs[i].params(st)) for i, st in actions]
            seconds[name] = (time.perf_counter() - t) / len(actions)
        finally:
            scorer.close()
        print(f"{name}: {seconds[name]:.2f} s per trial", flush=True)
    ref = scores["nll"]
    best = sorted(range(len(actions)), key=lambda k: ref[k])
    rows = {}
    for name, sc in scores.items():
        order = sorted(range(len(actions)), key=lambda k: sc[k])
        rows[name] = {"spearman": spearman(ref, sc), "same_best": order[0] == best[0],
                      "top5_overlap": len(set(order[:5]) & set(best[:5])), "seconds_per_trial": seconds[name]}
        print(f"{name:<20} spearman {rows[name]['spearman']:.3f}  best agrees {rows[name]['same_best']}  "
              f"top-5 overlap {rows[name]['top5_overlap']}/5  {seconds[name]:.2f} s/trial")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "actions": [[i, list(st)] for i, st in actions], "scores": scores, "summary": rows,
        "command": f"python bench/search_agreement.py {args.model} --stride {args.stride} --windows {w} "
                   f"--out {args.out}"},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
