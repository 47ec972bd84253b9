"""FoldGPT: rank the blocks jointly, delete the least useful, fold the next ones onto a neighbour's weights.

Three rankings (`--ranking`):
- "search" (the default): one search over keep / delete a sub-block / delete / fitted low-rank child for every layer
  (methods/search.py); the slack under the target goes to the children's ranks.
- "greedy": greedy calibration-NLL removal of layers or sub-blocks, then the removed layers whose folding helps most
  come back as children with measured branch gates (greedy_fold.py, children.py).
- "gates": learned gates on every block, trained jointly under a hard budget (the paper's ranking); the lowest are
  deleted and the retained layers are folded into the groups whose measured folding cost is lowest.
"""

from __future__ import annotations

import logging

import torch

from ..plan import Plan
from ..scale.precision import autocast
from ..stages.fold import fold_costs, select_groups
from ..stages.gates import train_gates
from ..stages.structure import apply_plan_
from ..stages.weights import clone_sharing_weights
from . import Context, Method, register
from .children import measured_child_gates
from .greedy_fold import greedy_ranking

log = logging.getLogger(__name__)


def gated_removal(ctx: Context) -> tuple[list[str], dict]:
    """Gate training removes units worth `n_remove` layers' parameters, lowest gates first."""
    n = ctx.budget.n_remove
    if n == 0:
        return [], {}
    result = train_gates(ctx.model, ctx.adapter, ctx.calib, n * ctx.budget.block_params, ctx.cfg.gate,
                         seed=ctx.cfg.seed, protected=ctx.protected(), unit=ctx.cfg.ranking.fixed_unit)
    ctx.info.gate_history = result.history
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
    kinds = probe.layer_kinds if not cfg.fold.across_kinds else [""] * len(probe.layer_kinds)  # one kind for all
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
    ctx.info.fold_costs = {f"{p}->{c}": v for (p, c), v in costs.items()}
    return select_groups(kept, kinds, cfg.fold.group_size, n_fold, costs)


def search_fold(ctx: Context) -> Plan:
    """`--ranking search` (the default): one search over keep / delete a sub-block / delete / fitted child at a few
    ranks (methods/search.py), then slack under the target goes to the children's ranks."""
    from .search import layer_costs, plan_parts, search, spend_slack

    b, cfg = ctx.budget, ctx.cfg
    target = b.target_params if b.target_params is not None else b.base_params - b.n_remove * b.block_params
    fits = ctx.child_fits()
    ids = ctx.calib[: min(cfg.ranking.search_windows, len(ctx.calib))]
    if ctx.general is not None:  # --search-general: general-text windows scored beside the calibration ones
        ids = torch.cat([ids, ctx.general.to(ids.device)])
    r = cfg.ranking
    found = search(ctx, fits, target, ids, r.child_fractions, r.rescore, r.score, r.topk, r.confirm,
                   ctx.calib[: min(r.confirm_windows, len(ctx.calib))], r.per_step, tuple(r.actions), r.refine)
    costs = layer_costs(ctx.model, ctx, fits.paths)
    used = b.base_params - sum(c.block for c in costs) + sum(c.params(s) for c, s in zip(costs, found.states))
    n_children = sum(s[0] == "child" for s in found.states)
    reserve = n_children * len(fits.paths) if cfg.fold.alpha else 0  # one alpha per Linear at most
    states = spend_slack(found.states, costs, target - used - reserve)
    parts = plan_parts(states, fits, ctx.adapter.layer_kinds(ctx.model.config), cfg.fold.alpha,
                       cfg.fold.alpha_margin)
    ctx.info.search = {"ranks": found.ranks, "loss_dense": found.loss_dense, "steps": found.steps,
                       "final_ranks": parts["child_ranks"]}
    log.info("search: removing %s; children %s (ranks %s)", parts["removed"], parts["groups"], parts["child_ranks"])
    return ctx.new_plan(parts["removed"], parts["groups"], method="foldgpt", unit="action", adapter_init="fit",
                        adapter_rank=0, child_ranks=parts["child_ranks"], child_modes=parts["child_modes"],
                        across_kinds=parts["across_kinds"] or cfg.fold.across_kinds)


def run(ctx: Context) -> Plan:
    if ctx.cfg.ranking.kind == "search":
        return search_fold(ctx)
    if ctx.cfg.ranking.kind == "greedy":
        unit, removed, groups, child_gates = greedy_ranking(ctx)
        gates: dict[str, float] = {}
    else:
        with autocast(ctx.model.device, ctx.cfg.precision):
            removed, gates = gated_removal(ctx)
            log.info("removing %s", removed)
            groups = choose_groups(ctx, removed)
        child_gates = measured_child_gates(ctx, removed, groups)
        unit = ctx.cfg.ranking.fixed_unit
    log.info("removing %s; folding groups %s (child gates %s)", removed, groups, child_gates)
    return ctx.new_plan(removed, groups, method="foldgpt", gates=gates, child_gates=child_gates, unit=unit)


def run_bi(ctx: Context) -> Plan:
    """Ablation: one-shot BI ranking (ShortGPT) for the removal, then the same cost-chosen folding."""
    from ..stages.analysis import block_influence
    from . import lowest

    bi = block_influence(ctx.similarity).tolist()
    removed = [str(i) for i in lowest(bi, ctx.budget.n_remove, ctx.protected())]
    groups = choose_groups(ctx, removed)
    return ctx.new_plan(removed, groups, method="foldgpt-bi", child_gates=measured_child_gates(ctx, removed, groups),
                        scores={str(i): b for i, b in enumerate(bi)})


register(Method("foldgpt-bi", run_bi, cures_by_default=True, folds=True,
                description="ablation: BI removal + grouped sharing + cure"))
register(Method("foldgpt", run, cures_by_default=True, folds=True,
                description="joint ranking, removal + grouped parameter sharing + cure (tail-layer distillation)"))
