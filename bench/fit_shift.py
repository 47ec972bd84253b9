"""Do fitted children carry over to text unlike the calibration text? Per layer, the relative error of an own-weight
low-rank child's residual update against the layer's own (deletion = 1), fitted on calibration windows with the
whitening's ridge at several strengths, measured on held-out windows of the calibration text, on Pride and
Prejudice, and on text of another kind (the GNU GPL v3 licence where the system has it; `--ood FILE` overrides).

A ridge of lambda adds lambda * mean(diag C) * I to the input covariance C before the Cholesky factor: 0 is
SVD-LLM's pure whitening (the rank goes where the calibration activations have energy), large values tend to the
plain SVD of the weights (every input direction counts the same).

    python bench/fit_shift.py smollm2-135m --out bench/results/fit_shift_smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from corpus import OOD_TEXT, Bench, austen, layer_output, swapped


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ridges", default="0.001,0.01,0.1,1")
    ap.add_argument("--fraction", type=float, default=0.25, help="a child's factors as a fraction of a block")
    ap.add_argument("--ood", default=OOD_TEXT)
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    from foldgpt.scale.streaming import layer_inputs
    from foldgpt.stages.fit import ChildFits

    torch.manual_seed(0)
    ridges = [float(r) for r in args.ridges.split(",")]
    b = Bench(args.model)
    model, adapter, calib = b.model, b.adapter, b.calib
    heldout = {"calibration text, other windows": calib[-8:],
               "Pride and Prejudice": b.windows([austen("prideprejudice")], 8)}
    if Path(args.ood).is_file():
        heldout[f"{Path(args.ood).name} (other kind of text)"] = b.windows([args.ood], 8)
    paths = list(adapter.linears)
    layers = adapter.layers(model)
    per_rank = sum(layers[0].get_submodule(q).in_features + layers[0].get_submodule(q).out_features for q in paths)
    block = sum(p.numel() for p in layers[0].parameters())
    rank = max(1, round(args.fraction * block / per_rank))
    first = ChildFits(model, adapter, calib[:32], paths, ridge=ridges[0])
    fits = {lam: first.with_ridge(lam) for lam in ridges}  # one covariance pass; only the whitening differs

    rows: dict[str, dict[str, list[float]]] = {}
    for name, ids in heldout.items():
        h, calls = layer_inputs(model, adapter, ids)
        errs: dict[str, list[float]] = {}
        for c, layer in enumerate(layers):
            y = layer_output(layer, h, calls[c])
            u = (y - h).float()
            for lam in ridges:
                with swapped(layer, fits[lam].own_weights(c, rank)):
                    y2 = layer_output(layer, h, calls[c])
                errs.setdefault(f"ridge {lam:g}", []).append(float((y2 - y).float().norm() / u.norm()))
            h = y
        rows[name] = errs
        print(name, {k: round(statistics.median(v), 3) for k, v in errs.items()}, flush=True)
    lines = [f"# Fitted children off the calibration text, {args.model}", "",
             f"Own-weight low-rank children at rank {rank} ({rank * per_rank / block:.0%} of a block), fitted on 32 "
             "calibration windows (five Austen novels). Median (best-worst) over layers of ||u_child - u|| / ||u|| "
             "(u: the layer's residual update; deletion = 1). Command: `python bench/fit_shift.py "
             f"{args.model} --out {args.out}`.", "",
             "| whitening ridge | " + " | ".join(heldout) + " |", "|---|" + "---|" * len(heldout)]
    for v in rows[next(iter(heldout))]:
        cells = [f"{statistics.median(rows[n][v]):.3f} ({min(rows[n][v]):.2f}-{max(rows[n][v]):.2f})" for n in heldout]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"model": args.model, "rank": rank, "errors": rows}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
