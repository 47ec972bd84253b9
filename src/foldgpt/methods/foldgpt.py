"""FoldGPT: gated removal (units ranked jointly), then grouped parameter sharing chosen by cost."""

from __future__ import annotations

import logging

import torch

from ..fold import fold_costs, select_groups
from ..gates import train_gates, unit_costs
from ..plan import Plan
from ..structure import apply_plan_
from ..weights import clone_sharing_weights
from . import Context, Method, register

log = logging.getLogger(__name__)


def choose_removed(names: list[str], gates: list[float], costs: list[float], to_save: float,
                   protected: set[int]) -> list[str]:
    """Lowest gates first until the removed units' cost reaches `to_save`."""
    order = sorted(range(len(names)), key=lambda i: gates[i])
    removed, saved = [], 0.0
    for i in order:
        if saved >= to_save - 1e-9:
            break
        if int(names[i].split(".")[0]) in protected:
            continue
        removed.append(names[i])
        saved += costs[i]
    return removed


def gated_removal(ctx: Context) -> tuple[list[str], dict]:
    cfg = ctx.cfg
    n = ctx.budget.n_remove
    if n == 0:
        return [], {}
    names_costs = unit_costs(ctx.model, ctx.adapter, cfg.gate.unit, "params", ctx.calib.shape[1])
    total = float(names_costs.sum())
    to_save = n * ctx.budget.block_params
    result = train_gates(ctx.model, ctx.adapter, ctx.calib, to_save / total, cfg.gate, seed=cfg.seed)
    ctx.info["gate_history"] = result.history
    removed = choose_removed(result.names, result.gates, names_costs.tolist(), to_save, ctx.protected())
    return removed, dict(zip(result.names, result.gates))


def choose_groups(ctx: Context, removed: list[str]) -> list[list[int]]:
    cfg = ctx.cfg
    n_fold = ctx.budget.n_fold
    if n_fold == 0:
        return []
    probe = ctx.new_plan(removed, [])
    kept = probe.kept_layers()
    kinds = probe.layer_kinds
    if cfg.fold.select == "adjacent":
        return select_groups(kept, kinds, cfg.fold.group_size, n_fold, None)
    ids = ctx.calib[: cfg.fold.cost_batch]
    with torch.no_grad():
        teacher = ctx.model(input_ids=ids, use_cache=False).logits
    pruned = clone_sharing_weights(ctx.model)
    apply_plan_(pruned, probe, ctx.adapter)
    paths = cfg.fold.shared_linears or list(ctx.adapter.linears)
    costs = fold_costs(pruned, ctx.adapter, kept, kinds, cfg.fold.group_size, teacher, ids, paths)
    del pruned
    ctx.info["fold_costs"] = {f"{p}->{c}": v for (p, c), v in costs.items()}
    return select_groups(kept, kinds, cfg.fold.group_size, n_fold, costs)


def run(ctx: Context) -> Plan:
    removed, gates = gated_removal(ctx)
    log.info("removing %s", removed)
    groups = choose_groups(ctx, removed)
    log.info("folding groups %s", groups)
    return ctx.new_plan(removed, groups, method="foldgpt", gates=gates)


register(Method("foldgpt", run, cures_by_default=True, folds=True,
                description="gated removal + grouped parameter sharing + cure (tail-layer distillation)"))
