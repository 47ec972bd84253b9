"""Folded children of FoldGPT's greedy and gates rankings: a removed layer measured running a kept neighbour's
weights (its own norms, both branches scaled by a gate), and the children chosen from those measurements."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..stages.fold import borrowed_weights
from ..stages.gates import GateSet
from ..stages.structure import shape_mismatch
from . import Context

log = logging.getLogger(__name__)

CHILD_GATE_GRID = (0.25, 0.5, 0.75, 1.0)  # initial child gates tried (0, deletion, is the baseline)


@torch.no_grad()
def child_search(ctx: Context, gone: set[int], pairs: list[tuple[int, int]],
                 grid: tuple[float, ...] = CHILD_GATE_GRID, gone_sublayers: set[int] = frozenset(),
                 ) -> dict[tuple[int, int], tuple]:
    """For each (parent, child) pair, the calibration NLL with `gone` layers (and `gone_sublayers`, indexed as
    unit_names(..., "sublayer")) deleted and the child running the parent's Linears (own norms) with both
    branches scaled by g, for g in `grid`.
    Returns {(parent, child): (best NLL, best g, NLL with the child deleted)}; each trial reruns only
    the layers from the child on (streaming.StreamedNLL)."""
    from ..scale.streaming import StreamedNLL

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


def child_gate_values(ctx: Context, children: dict[int, tuple[int, float]]) -> dict[str, float]:
    return {str(c): g for c, (_, g) in children.items()} if ctx.cfg.fold.child_gates else {}


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
