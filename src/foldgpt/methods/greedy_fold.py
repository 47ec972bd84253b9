"""FoldGPT's greedy ranking (`--ranking greedy`): remove whole layers (`--unit layer`), attention and MLP sub-blocks
(`--unit sublayer`), or (`--unit auto`) run both searches and keep sub-blocks only when they end at a clearly lower
calibration NLL; one at a time by calibration NLL (each step with the earlier removals in place, methods/greedy.py)
until the removal *and* folding budget is spent, then bring back as folded children the removed layers that lower
the calibration NLL most when they run a same-kind neighbour's weights (`--fold-across-kinds`: or the nearest of
another attention kind, same shapes), with their own norms, a rank-r delta and a branch gate set to the measured best
value (children.py). Every child starts at a calibration NLL no worse than deleting it (a gate of 0 is deletion) and
the cure trains the gate, the norms and the delta from there."""

from __future__ import annotations

import logging

import torch

from ..errors import FoldGPTError
from ..stages.gates import unit_names
from . import Context
from .children import child_gate_values, fold_back, groups_of
from .greedy import greedy_removal

log = logging.getLogger(__name__)

# `--unit auto` folds the sub-block search only when its calibration NLL rise over the dense model is at most this
# fraction of the whole-layer search's: a smaller pre-cure difference did not predict which plan cures better
# (evidence: bench/plan_nll.py and docs/results-greedy.md). At a toss-up the whole layers stay.
AUTO_SUBLAYER_RISE = 0.6


def layer_search(ctx: Context) -> tuple[list[int], list[float]]:
    """Greedy NLL removal of n_remove + n_fold whole layers (the children come back from these)."""
    total = ctx.budget.n_remove + ctx.budget.n_fold
    if total == 0:
        return [], []
    return greedy_removal(ctx, "layer", [1.0] * ctx.num_layers, total, "FoldGPT ranking (layers)")


def fold_layers(ctx: Context, order: list[int], nlls: list[float]) -> tuple[list[str], list[list[int]], dict]:
    """The n_fold layers of the layer search whose folding onto a neighbour helps most come back as children.
    Returns (removed units, groups, child gate values)."""
    ctx.info.ranking = {"unit": "layer", "order": order, "nll": nlls}
    if ctx.budget.n_fold == 0 or not order:
        return [str(i) for i in sorted(order)], [], {}
    gone = set(order)
    children = fold_back(ctx, gone, [i for i in range(ctx.num_layers) if i not in gone], ctx.budget.n_fold)
    removed = [str(i) for i in sorted(gone - set(children))]
    return removed, groups_of(children), child_gate_values(ctx, children)


def greedy_fold(ctx: Context) -> tuple[list[str], list[list[int]], dict[str, float]]:
    """`--unit layer`: greedy NLL removal of n_remove + n_fold layers, then the n_fold removed layers whose folding
    onto a neighbour helps most come back as children. Returns (removed units, groups, child gate values)."""
    return fold_layers(ctx, *layer_search(ctx))


def sublayer_search(ctx: Context) -> tuple[list[int], list[float]]:
    """Greedy NLL removal of attention and MLP sub-blocks (BlockPruner's search, indexed as
    unit_names(..., "sublayer")) until the target is met with room for the budget's children."""
    from .blockpruner import sublayer_params

    b = ctx.budget
    if b.target_params is None:
        raise FoldGPTError("--ranking greedy with --unit sublayer needs --target-params (not --remove-rate alone)")
    need = b.base_params - b.target_params + b.n_fold * b.child_cost  # each child is paid for by deleting more
    if need <= 0:
        return [], []
    return greedy_removal(ctx, "sublayer", sublayer_params(ctx.model, ctx.adapter), need,
                          "FoldGPT ranking (sub-blocks)")


def fold_sublayers(ctx: Context, order: list[int], nlls: list[float]) -> tuple[list[str], list[list[int]], dict]:
    """Removed *whole* layers of the sub-block search come back as children of a kept whole layer (a layer that
    lost one sub-block is neither parent nor child). Returns as fold_layers."""
    from .blockpruner import units_to_plan

    names = unit_names(ctx.num_layers, "sublayer")
    ctx.info.ranking = {"unit": "sublayer", "order": [names[u] for u in order], "nll": nlls}
    removed_units = units_to_plan([names[u] for u in order])
    gone = {u // 2 for u in order if u ^ 1 in order}  # layers that lost both sub-blocks
    half = {u for u in order if u // 2 not in gone}  # sub-blocks removed from layers that keep the other one
    if ctx.budget.n_fold == 0 or not gone:
        return removed_units, [], {}
    kept = [i for i in range(ctx.num_layers) if i not in gone and i not in {u // 2 for u in half}]
    children = fold_back(ctx, gone, kept, ctx.budget.n_fold, half)
    removed = [u for u in removed_units if "." in u or int(u) not in children]
    return removed, groups_of(children), child_gate_values(ctx, children)


def greedy_fold_sublayers(ctx: Context) -> tuple[list[str], list[list[int]], dict[str, float]]:
    """`--unit sublayer`: the sub-block search, then removed whole layers fold back (fold_sublayers)."""
    return fold_sublayers(ctx, *sublayer_search(ctx))


def greedy_fold_auto(ctx: Context) -> tuple[str, tuple[list[str], list[list[int]], dict[str, float]]]:
    """`--unit auto` (the default): run the whole-layer and the sub-block search, each to the target with room for
    the children, and fold the sub-block one only if it is clearly cheaper: its calibration NLL rise over the dense
    model (same windows) at most AUTO_SUBLAYER_RISE times the whole-layer search's. Sub-blocks pay when the target
    leaves few layers (the choice of what to keep in each layer then matters most); at a similar NLL whole layers
    cure better (see AUTO_SUBLAYER_RISE). Returns (the chosen unit, the plan's parts as greedy_fold)."""
    if ctx.budget.target_params is None:
        log.info("--unit auto: ranking whole layers (a sub-block search needs --target-params)")
        return "layer", greedy_fold(ctx)
    layers = layer_search(ctx)
    subs = sublayer_search(ctx)
    if not layers[1] or not subs[1]:
        return "layer", fold_layers(ctx, *layers)
    from .greedy import calibration_nll

    with torch.no_grad():
        dense = calibration_nll(ctx.model, ctx.calib[: ctx.cfg.fold.cost_batch * 4])  # the searches' windows
    rise = {"layer": layers[1][-1] - dense, "sublayer": subs[1][-1] - dense}
    ratio = rise["sublayer"] / rise["layer"] if rise["layer"] > 0 else float("inf")
    unit = "sublayer" if ratio <= AUTO_SUBLAYER_RISE else "layer"
    ctx.info.unit_choice = {"chosen": unit, "dense_nll": dense, "end_nll": {"layer": layers[1][-1],
                            "sublayer": subs[1][-1]}, "rise_ratio": ratio}
    log.info("--unit auto: calibration NLL %.4f dense, %.4f after the layer search, %.4f after the sub-block search "
             "(rise ratio %.2f; sub-blocks need <= %.2f): folding %ss", dense, layers[1][-1], subs[1][-1], ratio,
             AUTO_SUBLAYER_RISE, unit)
    return unit, fold_layers(ctx, *layers) if unit == "layer" else fold_sublayers(ctx, *subs)


def greedy_ranking(ctx: Context) -> tuple[str, list[str], list[list[int]], dict[str, float]]:
    """`--ranking greedy` at the configured unit. Returns (the unit ranked, removed units, groups, child gates)."""
    unit = ctx.cfg.ranking.unit
    if unit == "auto":
        unit, (removed, groups, child_gates) = greedy_fold_auto(ctx)
    else:
        removed, groups, child_gates = greedy_fold(ctx) if unit == "layer" else greedy_fold_sublayers(ctx)
    return unit, removed, groups, child_gates
