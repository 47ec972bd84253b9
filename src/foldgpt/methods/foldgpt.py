"""FoldGPT: gated removal (units ranked jointly), then grouped parameter sharing chosen by cost."""

from __future__ import annotations

import logging

import torch

from ..fold import fold_costs, select_groups
from ..gates import train_gates
from ..plan import Plan
from ..precision import autocast
from ..structure import apply_plan_
from ..weights import clone_sharing_weights
from . import Context, Method, register

log = logging.getLogger(__name__)


def gated_removal(ctx: Context) -> tuple[list[str], dict]:
    """Gate training removes units worth `n_remove` layers' parameters, lowest gates first."""
    n = ctx.budget.n_remove
    if n == 0:
        return [], {}
    result = train_gates(ctx.model, ctx.adapter, ctx.calib, n * ctx.budget.block_params, ctx.cfg.gate,
                         seed=ctx.cfg.seed, protected=ctx.protected())
    ctx.info["gate_history"] = result.history
    removed = [result.names[i] for i in result.removed]
    return removed, dict(zip(result.names, result.gates))


def choose_groups(ctx: Context, removed: list[str]) -> list[list[int]]:
    cfg = ctx.cfg
    n_fold = ctx.budget.n_fold
    if n_fold == 0:
        return []
    probe = ctx.new_plan(removed, [])
    partial = probe.removed_sublayers()  # layers that lost a sub-block are not folded
    kept = [i for i in probe.kept_layers() if i not in partial]
    kinds = probe.layer_kinds
    if cfg.fold.select == "adjacent":
        return select_groups(kept, kinds, cfg.fold.group_size, n_fold, None)
    ids = ctx.calib[: cfg.fold.cost_batch].to(ctx.model.device)
    with torch.no_grad():
        teacher = ctx.model(input_ids=ids, use_cache=False).logits
    pruned = clone_sharing_weights(ctx.model)
    apply_plan_(pruned, probe, ctx.adapter)
    paths = cfg.fold.shared_linears or list(ctx.adapter.linears)
    costs = fold_costs(pruned, ctx.adapter, probe.kept_layers(), kinds, cfg.fold.group_size, teacher, ids, paths,
                       foldable=kept)
    del pruned
    ctx.info["fold_costs"] = {f"{p}->{c}": v for (p, c), v in costs.items()}
    return select_groups(kept, kinds, cfg.fold.group_size, n_fold, costs)


def run(ctx: Context) -> Plan:
    with autocast(ctx.model.device, ctx.cfg.precision):
        removed, gates = gated_removal(ctx)
        log.info("removing %s", removed)
        groups = choose_groups(ctx, removed)
    log.info("folding groups %s", groups)
    return ctx.new_plan(removed, groups, method="foldgpt", gates=gates)


def run_bi(ctx: Context) -> Plan:
    """Ablation: one-shot BI ranking (ShortGPT) for the removal, then the same cost-chosen folding."""
    from ..analysis import block_influence
    from . import lowest

    bi = block_influence(ctx.similarity).tolist()
    removed = [str(i) for i in lowest(bi, ctx.budget.n_remove, ctx.protected())]
    groups = choose_groups(ctx, removed)
    return ctx.new_plan(removed, groups, method="foldgpt-bi", scores={str(i): b for i, b in enumerate(bi)})


register(Method("foldgpt-bi", run_bi, cures_by_default=True, folds=True,
                description="ablation: BI removal + grouped sharing + cure"))
register(Method("foldgpt", run, cures_by_default=True, folds=True,
                description="gated removal + grouped parameter sharing + cure (tail-layer distillation)"))
