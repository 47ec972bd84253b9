"""FoldGPT: rank the blocks jointly, delete the least useful, fold the next ones onto a neighbour's weights.

Two rankings (`--ranking`):
- "greedy" (default): remove whole layers (or, `--unit sublayer`, attention and MLP sub-blocks; `--unit auto`, the
  default: both searches, sub-blocks kept only when they end at a clearly lower calibration NLL) one at a time by
  calibration NLL (each step with the earlier removals in place) until the removal *and* folding budget is spent,
  then bring back as folded children
  the removed layers that lower the calibration NLL most when they run a same-kind neighbour's weights
  (`--fold-across-kinds`: or the nearest of another attention kind, same shapes) (their own norms, a rank-r
  delta, and a branch gate set to the measured best value). Every child
  starts at a calibration NLL no worse than deleting it (a gate of 0 is deletion) and the cure trains
  the gate, the norms and the delta from there.
- "gates": learned gates on every block, trained jointly under a hard budget (the paper's
  ranking); the lowest are deleted and the retained layers are folded into the groups whose measured
  folding cost is lowest.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..errors import FoldGPTError
from ..fold import borrowed_weights, fold_costs, select_groups
from ..gates import GateSet, train_gates, unit_names
from ..plan import Plan
from ..precision import autocast
from ..structure import apply_plan_, shape_mismatch
from ..weights import clone_sharing_weights
from . import Context, Method, register
from .greedy import greedy_removal

log = logging.getLogger(__name__)

CHILD_GATE_GRID = (0.25, 0.5, 0.75, 1.0)  # initial child gates tried (0, deletion, is the baseline)
# `--unit auto` folds the sub-block search only when its calibration NLL rise over the dense model is at most this
# fraction of the whole-layer search's. A lower NLL before the cure is not enough: over the pairs of plans of the
# benchmark tables (bench/plan_nll.py; SmolLM2-135M at 75% and 60%, Gemma-3-270M at 75%), the plan with the smaller
# rise cured better in all 43 pairs whose rise ratio was <= 0.60 and in only 18 of the 29 above it (SmolLM2 at 60%:
# the sub-block search ended lower, ratio 0.95, and its plan cured 6% worse). Gemma-3-270M's sub-block search ended
# at 0.45 and its plan cured 48% better. At a toss-up the whole layers stay: they won both such measured cases.
AUTO_SUBLAYER_RISE = 0.6


def gated_removal(ctx: Context) -> tuple[list[str], dict]:
    """Gate training removes units worth `n_remove` layers' parameters, lowest gates first."""
    n = ctx.budget.n_remove
    if n == 0:
        return [], {}
    result = train_gates(ctx.model, ctx.adapter, ctx.calib, n * ctx.budget.block_params, ctx.cfg.gate,
                         seed=ctx.cfg.seed, protected=ctx.protected())
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


@torch.no_grad()
def child_search(ctx: Context, gone: set[int], pairs: list[tuple[int, int]],
                 grid: tuple[float, ...] = CHILD_GATE_GRID, gone_sublayers: set[int] = frozenset(),
                 ) -> dict[tuple[int, int], tuple]:
    """For each (parent, child) pair, the calibration NLL with `gone` layers (and `gone_sublayers`, indexed as
    unit_names(..., "sublayer")) deleted and the child running the parent's Linears (own norms) with both
    branches scaled by g, for g in `grid`.
    Returns {(parent, child): (best NLL, best g, NLL with the child deleted)}; each trial reruns only
    the layers from the child on (streaming.StreamedNLL)."""
    from ..streaming import StreamedNLL

    layers = ctx.adapter.layers(ctx.model)
    paths = ctx.cfg.fold.shared_linears or list(ctx.adapter.linears)
    ids = ctx.calib[: ctx.cfg.fold.cost_batch * 4]  # the windows the greedy ranking scores
    gates = GateSet(ctx.model, ctx.adapter, "sublayer")
    base = torch.ones(2 * ctx.num_layers)
    for layer in gone:
        base[2 * layer : 2 * layer + 2] = 0
    for unit in gone_sublayers:
        base[unit] = 0
    stream = StreamedNLL(ctx.model, ctx.adapter, ids, ctx.model.device)
    out: dict[tuple[int, int], tuple] = {}
    deleted_nll: dict[tuple, float] = {}  # the NLL with the child deleted, once per distinct state
    try:
        with gates.set(base):
            stream.refresh()
        for p, c in tqdm(pairs, desc="Child gates", leave=False):
            without = base.clone()
            without[2 * c : 2 * c + 2] = 0
            key = tuple(without.tolist())
            if key not in deleted_nll:
                with gates.set(without):
                    deleted_nll[key] = stream.nll(c)
            deleted = deleted_nll[key]
            best = (deleted, 0.0)
            with borrowed_weights(layers[c], layers[p], paths):
                for g in grid:
                    trial = base.clone()
                    trial[2 * c : 2 * c + 2] = g
                    with gates.set(trial):
                        nll = stream.nll(c)
                    if nll < best[0]:
                        best = (nll, g)
            out[(p, c)] = (best[0], best[1], deleted)
    finally:
        gates.remove()
        stream.close()
    return out


def neighbours(layer: int, kept: list[int], kinds: list[str], across_kinds: bool = False) -> list[int]:
    """The nearest kept layer of the same attention kind below and above `layer`; with `across_kinds`, also the
    nearest kept layer of any kind below and above."""
    out = []
    for same in (True, False) if across_kinds else (True,):
        below = [k for k in kept if k < layer and (kinds[k] == kinds[layer] or not same)]
        above = [k for k in kept if k > layer and (kinds[k] == kinds[layer] or not same)]
        out += [k for k in ([below[-1]] if below else []) + ([above[0]] if above else []) if k not in out]
    return out


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
    return removed, groups_of(children), _gates(ctx, children)


def greedy_fold(ctx: Context) -> tuple[list[str], list[list[int]], dict[str, float]]:
    """`--unit layer`: greedy NLL removal of n_remove + n_fold layers, then the n_fold removed layers whose folding
    onto a neighbour helps most come back as children. Returns (removed units, groups, child gate values)."""
    return fold_layers(ctx, *layer_search(ctx))


def fold_back(ctx: Context, gone: set[int], kept: list[int], n_fold: int,
              gone_sublayers: set[int] = frozenset()) -> dict[int, tuple[int, float]]:
    """Measure every removed layer of `gone` running a neighbour of `kept` (child_search, with `gone_sublayers`
    deleted too) and pick up to `n_fold` children. Returns {child: (parent, gate)}."""
    kinds = ctx.adapter.layer_kinds(ctx.model.config)
    layers, paths = ctx.adapter.layers(ctx.model), ctx.cfg.fold.shared_linears or list(ctx.adapter.linears)
    pairs = [(p, c) for c in sorted(gone) for p in neighbours(c, kept, kinds, ctx.cfg.fold.across_kinds)
             if shape_mismatch(layers[c], layers[p], paths) is None]
    # without child gates a child runs at full weight, so that is the value its choice is measured at
    found = child_search(ctx, gone, pairs, CHILD_GATE_GRID if ctx.cfg.fold.child_gates else (1.0,), gone_sublayers)
    ctx.info.child_search = {f"{p}->{c}": {"nll": v[0], "gate": v[1], "nll_deleted": v[2]}
                             for (p, c), v in found.items()}
    return pick_children(ctx, found, kept, kinds, n_fold)


def pick_children(ctx: Context, found: dict[tuple[int, int], tuple], kept: list[int], kinds: list[str],
                  n_fold: int) -> dict[int, tuple[int, float]]:
    """Up to `n_fold` children from the child search, most helpful (measured NLL minus NLL deleted) first, each
    parent taking at most group_size - 1. Returns {child: (parent, gate)}."""
    capacity = {p: ctx.cfg.fold.group_size - 1 for p in kept}
    children: dict[int, tuple[int, float]] = {}
    for (p, c), (_nll, g, _deleted) in sorted(found.items(), key=lambda kv: kv[1][0] - kv[1][2]):
        if len(children) == n_fold:
            break
        if c in children or capacity[p] == 0:
            continue
        children[c] = (p, g)
        capacity[p] -= 1
    if len(children) < n_fold:
        log.warning("could fold only %d of %d children (not enough %sneighbours); deleting the rest%s", len(children),
                    n_fold, "" if ctx.cfg.fold.across_kinds else "same-kind ",
                    "" if ctx.cfg.fold.across_kinds or len(set(kinds)) == 1 else " (--fold-across-kinds lets a child "
                    "borrow a layer of another attention kind)")
    return children


def groups_of(children: dict[int, tuple[int, float]]) -> list[list[int]]:
    by_parent: dict[int, list[int]] = {}
    for c, (p, _) in children.items():
        by_parent.setdefault(p, []).append(c)
    return sorted([p, *sorted(cs)] for p, cs in by_parent.items())


def _gates(ctx: Context, children: dict[int, tuple[int, float]]) -> dict[str, float]:
    return {str(c): g for c, (_, g) in children.items()} if ctx.cfg.fold.child_gates else {}


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
    return removed, groups_of(children), _gates(ctx, children)


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


def measured_child_gates(ctx: Context, removed: list[str], groups: list[list[int]]) -> dict[str, float]:
    """Initial gate of each child of `groups` (any ranking): the CHILD_GATE_GRID value with the lowest
    calibration NLL (0 where none beats deletion), each child measured with the removals in place and the other
    children running their own weights."""
    if not groups or not ctx.cfg.fold.child_gates:
        return {}
    gone = {int(u) for u in removed if "." not in u}
    pairs = [(g[0], c) for g in groups for c in g[1:]]
    found = child_search(ctx, gone, pairs)
    return {str(c): found[(p, c)][1] for p, c in pairs}


def search_fold(ctx: Context) -> Plan:
    """`--ranking search` (the default): one search over keep / delete a sub-block / delete / fitted child at a few
    ranks (methods/search.py), then slack under the target goes to the children's ranks."""
    from .search import layer_costs, plan_parts, search, spend_slack

    b, cfg = ctx.budget, ctx.cfg
    target = b.target_params if b.target_params is not None else b.base_params - b.n_remove * b.block_params
    fits = ctx.child_fits()
    ids = ctx.calib[: min(cfg.fold.search_windows, len(ctx.calib))]
    found = search(ctx, fits, target, ids, cfg.fold.child_fractions, cfg.fold.rescore, cfg.fold.score, cfg.fold.topk,
                   cfg.fold.confirm, ctx.calib[: min(cfg.fold.confirm_windows, len(ctx.calib))], cfg.fold.per_step,
                   tuple(cfg.fold.actions))
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
    if ctx.cfg.ranking == "search":
        return search_fold(ctx)
    if ctx.cfg.ranking == "greedy":
        unit = ctx.cfg.gate.unit
        if unit == "auto":
            unit, (removed, groups, child_gates) = greedy_fold_auto(ctx)
        else:
            removed, groups, child_gates = greedy_fold(ctx) if unit == "layer" else greedy_fold_sublayers(ctx)
        gates: dict[str, float] = {}
    else:
        with autocast(ctx.model.device, ctx.cfg.precision):
            removed, gates = gated_removal(ctx)
            log.info("removing %s", removed)
            groups = choose_groups(ctx, removed)
        child_gates = measured_child_gates(ctx, removed, groups)
        unit = ctx.cfg.gate.fixed_unit
    log.info("removing %s; folding groups %s (child gates %s)", removed, groups, child_gates)
    return ctx.new_plan(removed, groups, method="foldgpt", gates=gates, child_gates=child_gates, unit=unit)


def run_bi(ctx: Context) -> Plan:
    """Ablation: one-shot BI ranking (ShortGPT) for the removal, then the same cost-chosen folding."""
    from ..analysis import block_influence
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
