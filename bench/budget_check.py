"""What a unique-parameter target means for a model in depth: how many whole layers pure removal must
delete, how FoldGPT's default splits it (deleted + folded children), and which targets are out of reach
because the embeddings alone exceed them. Loads the model only (no calibration, no compute):

    python bench/budget_check.py smollm2-135m gemma3-270m --targets 0.75,0.6 --json bench/results/budget_check.json
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from foldgpt.adapters import get_adapter  # noqa: E402
from foldgpt.config import CompressConfig  # noqa: E402
from foldgpt.errors import FoldGPTError  # noqa: E402
from foldgpt.models import load_model  # noqa: E402
from foldgpt.stages.budget import plan_budget  # noqa: E402
from foldgpt.stages.structure import layer_params, unique_params  # noqa: E402


def check(name: str, targets: list[float]) -> dict:
    model, _ = load_model(name)
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    base = unique_params(model)
    block = layer_params(layers[0])
    cfg = CompressConfig()
    out = {"model": name, "unique_params": base, "layers": len(layers), "params_per_layer": block,
           "params_outside_layers": base - sum(layer_params(lay) for lay in layers), "targets": {}}
    out["lowest_reachable_target"] = out["params_outside_layers"] / base
    for t in targets:
        row: dict = {"target_params": int(t * base)}
        try:
            removal = plan_budget(model, adapter, len(layers), t, None, 1.0, 1, 0)
            fold = plan_budget(model, adapter, len(layers), t, None, cfg.remove_share, cfg.fold.group_size,
                               cfg.fold.adapter_rank, None, cfg.fold.child_gates)
            row.update(removal_layers=removal.n_remove, removal_params=removal.predicted_params,
                       foldgpt_deleted=fold.n_remove, foldgpt_children=fold.n_fold,
                       foldgpt_params=fold.predicted_params)
        except FoldGPTError as exc:
            row["error"] = str(exc)
        out["targets"][str(t)] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--targets", default="0.75,0.6")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    res = [check(m, [float(x) for x in a.targets.split(",")]) for m in a.models]
    for r in res:
        print(f"{r['model']}: {r['unique_params']:,} unique params, {r['layers']} layers of {r['params_per_layer']:,}; "
              f"{r['params_outside_layers']:,} outside the layers (lowest reachable target "
              f"{r['lowest_reachable_target']:.3f})")
        for t, row in r["targets"].items():
            if "error" in row:
                print(f"  target {t}: out of reach ({row['error']})")
            else:
                print(f"  target {t}: removal deletes {row['removal_layers']} layers; foldgpt deletes "
                      f"{row['foldgpt_deleted']} and folds {row['foldgpt_children']} children")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
