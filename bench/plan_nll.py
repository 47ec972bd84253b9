"""Calibration NLL of finished bench rows' plans before the cure: the number the greedy searches and `--unit auto`
compare (and its rise over the dense model, which `--unit auto` compares), next to each row's perplexity after
the cure, to see how well it predicts the cured result.

    python bench/plan_nll.py smollm2-135m P/part3/results.json:foldgpt P/part5/results.json:blockpruner \
        --json bench/results/plan_nll_smollm2-135m.json

With `--proxy`, each plan is also scored by the default search's cheap score (cross-entropy over the dense
model's top-k tokens plus the target, on the search's first `ranking.search_windows` windows), and every pair of
plans at one target says whether the proxy orders them as the exact NLL on the reference windows does:

    python bench/plan_nll.py smollm2-135m ... --proxy --json bench/results/plan_proxy_smollm2-135m.json

Each SOURCE is a results.json (or OUT.rows.jsonl) with the methods to take after the colon (every target, the cured
row where there is one). The plan is rebuilt from the row (removed units, groups, child gates at their start
values) and scored on the windows the greedy searches use (the first 4 x cost_batch calibration windows of the
bench's five-novel calibration set; same seed and settings as `bench/table_smollm2.sh`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from render_rows import read_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NOVELS = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("sources", nargs="+", help="SOURCE:METHOD,METHOD...")
    p.add_argument("--data", default=os.environ.get("SHARED_DATA", "../shared/data"))
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--proxy", action="store_true", help="also score each plan by the search's top-k proxy")
    a = p.parse_args(argv)

    import torch

    from foldgpt import CompressConfig
    from foldgpt.bench import variant_config
    from foldgpt.fileio import write_json_atomic
    from foldgpt.methods.greedy import calibration_nll
    from foldgpt.pipeline import prepare
    from foldgpt.stages.structure import apply_plan_
    from foldgpt.stages.weights import clone_sharing_weights

    text = [str(Path(a.data) / "corpora/austen" / f"austen_{n}.txt") for n in NOVELS]
    base = CompressConfig()
    session = prepare(a.model, text, base)
    ids = session.calib[: base.fold.cost_batch * 4]
    proxy_ids = session.calib[: base.ranking.search_windows]
    with torch.no_grad():
        dense = calibration_nll(session.dense, ids)
        cand = None
        if a.proxy:  # the teacher's top-k tokens on the search's windows, the target first
            logits = session.dense(input_ids=proxy_ids, use_cache=False).logits[:, :-1].float()
            target = proxy_ids[:, 1:]
            top = logits.topk(base.ranking.topk, dim=-1).indices
            cand, dup = torch.cat([target[..., None], top], dim=-1), top == target[..., None]
    print(f"{'dense':32s}      calibration NLL {dense:.4f}", flush=True)
    out = [{"method": "dense", "calibration_nll": dense}]
    for spec in a.sources:
        path, _, methods = spec.rpartition(":")
        rows = [rec["row"] for rec in read_records(path)]
        for name in methods.split(","):
            picked = {}
            for r in rows:  # per target, the cured row where there is one
                if r["method"] == name and (r["target"] not in picked or r["cure"]):
                    picked[r["target"]] = r
            if not picked:
                raise SystemExit(f"error: {path} has no rows for {name}")
            for target, r in sorted(picked.items()):
                cfg = variant_config(current_name(name), base, target, None)
                if r.get("groups") and cfg.fold.child_gates and "child_gates" not in r:
                    raise SystemExit(f"error: {path}: the {name} row at {target} predates recorded child gates, so "
                                     "its plan cannot be rebuilt; take a row of the same plan that records them")
                plan = plan_from_row(r, cfg, session)
                student = clone_sharing_weights(session.dense)
                apply_plan_(student, plan, session.adapter)
                with torch.no_grad():
                    nll = calibration_nll(student, ids)
                    proxy = topk_loss(student, proxy_ids, cand, dup) if cand is not None else None
                cured = [x for x in rows if x["method"] == name and x["target"] == target and x["cure"]]
                ppl = next(iter(cured[0]["perplexity"].values())) if cured else None
                out.append({"method": name, "target": target, "unit": plan.unit, "params_ratio": r["params_ratio"],
                            "calibration_nll": nll, "nll_rise": nll - dense, "cured_perplexity": ppl,
                            **({"proxy": proxy} if proxy is not None else {})})
                print(f"{name:32s} {target:.2f} {plan.unit:8s} params {r['params_ratio']:.3f}  "
                      f"calibration NLL {nll:.4f} (rise {nll - dense:.4f})  "
                      f"cured PPL {ppl if ppl is None else round(ppl, 2)}", flush=True)
    pairs = agreement([r for r in out if r.get("cured_perplexity") is not None])
    print("\npairs of plans at one target, by the ratio of their NLL rises (smaller / larger): does the plan with the "
          "smaller rise also have the lower perplexity after the cure?")
    for q in pairs:
        print(f"  {q['ratio']:.2f}  {q['target']:.2f}  {q['lower']} ({q['lower_ppl']:.2f}) vs {q['higher']} "
              f"({q['higher_ppl']:.2f}): {'yes' if q['agrees'] else 'NO'}")
    result = {"rows": out, "pairs": pairs}
    if a.proxy:
        result["proxy_pairs"] = proxy_agreement([r for r in out if "proxy" in r])
        q = result["proxy_pairs"]
        print(f"\nthe search's proxy orders {sum(x['agrees'] for x in q)} of {len(q)} pairs of plans at one target as "
              "the exact calibration NLL does")
        for x in q:
            if not x["agrees"]:
                print(f"  disagrees: {x['target']:.2f} {x['a']} vs {x['b']} "
                      f"(NLL {x['nll'][0]:.4f} / {x['nll'][1]:.4f}, proxy {x['proxy'][0]:.4f} / {x['proxy'][1]:.4f})")
    if a.json:
        write_json_atomic(Path(a.json), result)


# the setting paths row labels were written with before CONFIG_VERSION 2, and where those settings are now
OLD_PATHS = {"gate.unit=": "ranking.unit=", "cure_cfg.": "cure.", "[ranking=": "[ranking.kind=",
             ";ranking=": ";ranking.kind="}


def current_name(name: str) -> str:
    """A row's method label (`foldgpt[gate.unit=sublayer]`) with today's setting paths."""
    for old, new in OLD_PATHS.items():
        name = name.replace(old, new)
    return name


def plan_from_row(row: dict, cfg, session):
    """The plan a finished row ran, from the removed units, groups and child gate starts it records."""
    from foldgpt.methods import get_method, make_plan

    searched = cfg.method == "foldgpt" and cfg.ranking.kind == "search"
    if get_method(cfg.method).merges or "removed" not in row or searched:
        raise SystemExit(f"error: a {row['method']} row does not record its whole plan "
                         "(merged layers, fitted children)")
    gates = {c: g["start"] if isinstance(g, dict) else g for c, g in row.get("child_gates", {}).items()}
    groups = [list(g) for g in row.get("groups", [])]
    return make_plan(cfg, session.dense, session.adapter, list(row["removed"]), groups, child_gates=gates,
                     method=cfg.method)


def topk_loss(model, ids, cand, dup) -> float:
    """The search's `topk` score of `model`: cross-entropy over the teacher's top-k tokens plus the target (the
    target first; a top-k token equal to the target is masked), from the model's logits at those tokens."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    picked = logits.gather(-1, cand)
    picked[..., 1:] = picked[..., 1:].masked_fill(dup, float("-inf"))
    zeros = torch.zeros(picked.shape[:-1], dtype=torch.long)
    return F.cross_entropy(picked.flatten(0, 1), zeros.flatten()).item()


def proxy_agreement(rows: list[dict]) -> list[dict]:
    """Every pair of plans at one target: does the proxy order them as the exact calibration NLL does?"""
    pairs = []
    for i, x in enumerate(rows):
        for y in rows[i + 1:]:
            if x["target"] == y["target"]:
                pairs.append({"target": x["target"], "a": x["method"], "b": y["method"],
                              "nll": [x["calibration_nll"], y["calibration_nll"]], "proxy": [x["proxy"], y["proxy"]],
                              "agrees": (x["calibration_nll"] < y["calibration_nll"]) == (x["proxy"] < y["proxy"])})
    return pairs


def agreement(rows: list[dict]) -> list[dict]:
    """Every pair of rows at one target, sorted by the ratio of their NLL rises, with whether the smaller rise
    also has the lower cured perplexity."""
    pairs = []
    for i, x in enumerate(rows):
        for y in rows[i + 1:]:
            if x["target"] != y["target"]:
                continue
            lo, hi = sorted((x, y), key=lambda r: r["nll_rise"])
            pairs.append({"target": x["target"], "lower": lo["method"], "higher": hi["method"],
                          "ratio": lo["nll_rise"] / hi["nll_rise"], "lower_ppl": lo["cured_perplexity"],
                          "higher_ppl": hi["cured_perplexity"],
                          "agrees": lo["cured_perplexity"] < hi["cured_perplexity"]})
    return sorted(pairs, key=lambda q: q["ratio"])


if __name__ == "__main__":
    main()
