"""Why do fitted children carry over less well to text unlike the calibration text than deletions do? On the
layers a plan makes children, whole-model perplexity on held-out calibration-like text (Pride and Prejudice) and on
text of another kind (the GNU GPL v3 licence where the system has it; `--ood FILE`), for: the dense model; those
layers deleted; those layers as own-weight low-rank children fitted on the calibration novels (as `compress`
does), on the novels mixed with a generic text (Python's documentation, the built-in default text), on the
generic text alone, and with a strong whitening ridge. No cure: the fits alone.

    python bench/ood_children.py smollm2-135m --plan bench/plans/smollm2-135m_060_foldgpt.json \
        --out bench/results/ood_children_smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from corpus import OOD_TEXT, Bench, austen, swapped


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--plan", required=True, help="a plan whose child_ranks name the layers and ranks")
    ap.add_argument("--ood", default=OOD_TEXT)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    from foldgpt.stages.fit import ChildFits

    b = Bench(args.model)
    model, adapter, novels = b.model, b.adapter, b.calib
    generic = b.windows(None, 32)
    texts = {"Pride and Prejudice": b.windows([austen("prideprejudice")], args.windows)}
    if Path(args.ood).is_file():
        texts[f"{Path(args.ood).name} (other kind of text)"] = b.windows([args.ood], args.windows)
    ranks = {int(k): int(v) for k, v in json.loads(Path(args.plan).read_text())["child_ranks"].items()}
    paths = list(adapter.linears)
    layers = adapter.layers(model)
    novel_fits = ChildFits(model, adapter, novels[:32], paths)
    variants: dict[str, dict[int, dict[str, torch.Tensor]] | None] = {"dense": None}
    outs = (adapter.attn_out, adapter.mlp_out)
    variants["the child layers deleted"] = {
        i: {q: torch.zeros_like(layers[i].get_submodule(q).weight) for q in paths if q in outs} for i in ranks}
    for name, fits in [("children fitted on the novels (compress)", novel_fits),
                       ("children fitted on the novels, whitening ridge 1", novel_fits.with_ridge(1.0)),
                       ("children fitted on 3/4 novels + 1/4 generic text",
                        ChildFits(model, adapter, torch.cat([novels[:24], generic[:8]]), paths)),
                       ("children fitted on the generic text only", ChildFits(model, adapter, generic, paths))]:
        variants[name] = {i: fits.own_weights(i, r) for i, r in ranks.items()}
    rows = {}
    for name, swap in variants.items():
        with ExitStack() as stack:
            for i, weights in (swap or {}).items():
                stack.enter_context(swapped(layers[i], weights))
            rows[name] = {t: perplexity(model, ids) for t, ids in texts.items()}
        print(name, {k: round(v, 2) for k, v in rows[name].items()}, flush=True)
    lines = [f"# Fitted children on other text, {args.model}", "",
             f"Layers {sorted(ranks)} (the children of `{args.plan}`, ranks {sorted(set(ranks.values()))}); "
             f"perplexity on {args.windows} windows of 256 tokens, no cure. Command: `python bench/ood_children.py "
             f"{args.model} --plan {args.plan} --out {args.out}`.", "",
             "| variant | " + " | ".join(texts) + " |", "|---|" + "---|" * len(texts)]
    lines += [f"| {n} | " + " | ".join(f"{v[t]:.2f}" for t in texts) + " |" for n, v in rows.items()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"model": args.model, "plan": args.plan, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    total, n = 0.0, 0
    for s in range(0, len(ids), batch):
        b = ids[s : s + batch]
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    return math.exp(total / n)


if __name__ == "__main__":
    main()
