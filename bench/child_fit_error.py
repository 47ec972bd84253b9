"""How well can a folded child stand in for its layer? Per adjacent pair (parent l-1, child l), the relative error
of the child's residual update u = layer(x) - x against the layer's own, on held-out windows, for:

- deletion (u = 0: error 1 by definition);
- shared: the child runs the parent's Linears with its own norms (the folded child of the paper);
- shared + alpha: alpha * parent per Linear, alpha by least squares on calibration activations (fit.lstsq_alpha);
- own low-rank: the child's own weights, whitened truncated SVD (fit.py) at ranks R;
- alpha * parent + low-rank fit of what it leaves, at the same ranks;
- chosen: fit.ChildFits.choose (own, or alpha + fit where that lowers the calibration error by > 10%).

Fits use the first 32 calibration windows (as `foldgpt compress` does); errors are measured on 8 other windows of
the calibration text and on Pride and Prejudice (never used for fitting).

    python bench/child_fit_error.py smollm2-135m --out bench/results/child_fit_error_smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from corpus import Bench, austen, layer_output, swapped


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ranks", default="32,64,128")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    from foldgpt.scale.streaming import layer_inputs
    from foldgpt.stages.fit import ChildFits

    torch.manual_seed(0)
    ranks = [int(r) for r in args.ranks.split(",")]
    b = Bench(args.model)
    model, adapter, calib = b.model, b.adapter, b.calib
    heldout = {"calibration text, other windows": calib[-8:],
               "Pride and Prejudice": b.windows([austen("prideprejudice")], 8)}
    paths = list(adapter.linears)
    fits = ChildFits(model, adapter, calib[:32], paths)
    layers = adapter.layers(model)
    kinds = adapter.layer_kinds(model.config)

    def variants(c: int, p: int) -> dict[str, dict[str, torch.Tensor]]:
        w = {q: layers[p].get_submodule(q).weight for q in paths}
        out = {"shared": dict(w)}
        alphas = {q: fits.with_parent(c, p, q)[0] for q in paths}
        out["shared + alpha"] = {q: alphas[q] * w[q] for q in paths}
        for r in ranks:
            out[f"own low-rank r={r}"] = fits.own_weights(c, r)
            out[f"alpha * parent + fit r={r}"] = {q: alphas[q] * w[q] + fits.with_parent(c, p, q)[1].weight(r)
                                                  for q in paths}
            chosen = fits.choose(c, p, r, True)
            out[f"chosen r={r}"] = {q: ch.alpha * w[q] + ch.b @ ch.a for q, ch in chosen.items()}
        return out

    rows: dict[str, dict[str, list[float]]] = {}
    for name, ids in heldout.items():
        h0, calls = layer_inputs(model, adapter, ids)
        h = h0
        errs: dict[str, list[float]] = {}
        for c, layer in enumerate(layers):
            y = layer_output(layer, h, calls[c])
            u = (y - h).float()
            same = [q for q in range(c - 1, -1, -1) if kinds[q] == kinds[c]]
            if same:
                p = same[0]
                errs.setdefault("deletion", []).append(1.0)
                for vname, weights in variants(c, p).items():
                    with swapped(layer, weights):
                        y2 = layer_output(layer, h, calls[c])
                    errs.setdefault(vname, []).append(float((y2 - y).float().norm() / u.norm()))
            h = y
        rows[name] = errs
    cost = {r: r * sum(layers[0].get_submodule(q).in_features + layers[0].get_submodule(q).out_features
                       for q in paths) for r in ranks}
    block = sum(p.numel() for p in layers[0].parameters())
    lines = [f"# Child fit error, {args.model}", "",
             "Median (and best / worst) over adjacent same-kind pairs of ||u_child - u|| / ||u|| (u: the layer's "
             "residual update; deletion = 1). Command: `python bench/child_fit_error.py " + args.model +
             f" --out {args.out}`.", "",
             "| variant | unique params of a child | " + " | ".join(heldout) + " | pairs better than deletion |",
             "|---|---|" + "---|" * len(heldout) + "---|"]
    for vname in rows[next(iter(heldout))]:
        r = next((k for k in ranks if vname.endswith(f"r={k}")), None)
        size = "0 (deleted)" if vname == "deletion" else (
            f"{cost[r]:,} ({cost[r] / block:.0%} of a block)" if r else "norms only")
        cells = []
        for name in heldout:
            v = rows[name][vname]
            cells.append(f"{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})")
        better = sum(x < 1.0 for x in rows["Pride and Prejudice"][vname])
        total = len(rows["Pride and Prejudice"][vname])
        lines.append(f"| {vname} | {size} | " + " | ".join(cells) + f" | {better}/{total} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"model": args.model, "ranks": ranks, "errors": rows}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
