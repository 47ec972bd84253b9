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
import os
import statistics
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ridges", default="0.001,0.01,0.1,1")
    ap.add_argument("--fraction", type=float, default=0.25, help="a child's factors as a fraction of a block")
    ap.add_argument("--ood", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    from foldgpt.adapters import get_adapter
    from foldgpt.data import calibration_batches, load_text, needs_bos, tokenize
    from foldgpt.models import load_model

    from foldgpt.scale.streaming import layer_inputs
    from foldgpt.stages.fit import ChildFits

    torch.manual_seed(0)
    ridges = [float(r) for r in args.ridges.split(",")]
    data = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "corpora" / "austen"
    model, tok = load_model(args.model)
    adapter = get_adapter(model.config)
    bos_id = tok.bos_token_id if needs_bos(tok, adapter.needs_bos) else None
    corpus = load_text([str(data / f"austen_{n}.txt") for n in CALIB])
    calib = calibration_batches(tokenize(tok, corpus.text), 512, 256, 0, bos_id)  # as compress draws them

    def windows(path: str) -> torch.Tensor:
        return calibration_batches(tokenize(tok, load_text([path]).text), 8, 256, 0, bos_id)

    heldout = {"calibration text, other windows": calib[-8:],
               "Pride and Prejudice": windows(str(data / "austen_prideprejudice.txt"))}
    if Path(args.ood).is_file():
        heldout[f"{Path(args.ood).name} (other kind of text)"] = windows(args.ood)
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
            args_c, kw_c = calls[c]
            y = layer(h, *args_c, **kw_c)
            y = y[0] if isinstance(y, tuple) else y
            u = (y - h).float()
            for lam in ridges:
                weights = fits[lam].own_weights(c, rank)
                saved = {q: layer.get_submodule(q).weight for q in paths}
                try:
                    for q, wq in weights.items():
                        layer.get_submodule(q).weight = nn.Parameter(wq.to(saved[q].dtype), requires_grad=False)
                    y2 = layer(h, *args_c, **kw_c)
                    y2 = y2[0] if isinstance(y2, tuple) else y2
                finally:
                    for q, wq in saved.items():
                        layer.get_submodule(q).weight = wq
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
