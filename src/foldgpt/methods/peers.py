"""Peer depth-pruning methods, each hitting the same unique-parameter budget (whole layers removed)."""

from __future__ import annotations

import logging

import torch

from ..plan import Plan
from ..stages.analysis import angular_distance
from . import Context, Method, lowest, register
from .greedy import greedy_removal

log = logging.getLogger(__name__)


def run_random(ctx: Context) -> Plan:
    """Seeded random layers (a sanity floor for every table)."""
    g = torch.Generator().manual_seed(ctx.cfg.seed)
    scores = torch.rand(ctx.num_layers, generator=g).tolist()
    removed = lowest(scores, ctx.budget.n_remove, ctx.protected())
    return ctx.new_plan([str(i) for i in removed], [], method="random")


def run_angular(ctx: Context) -> Plan:
    """Gromov et al.: drop the contiguous span of n layers whose input and output hidden states have the
    smallest angular distance arccos(cos(h_l, h_{l+n}))/pi."""
    n = ctx.budget.n_remove
    if n == 0:
        return ctx.new_plan([], [], method="angular")
    dist = angular_distance(ctx.similarity)
    prot = ctx.protected()
    spans = [(dist[s, s + n].item(), s) for s in range(ctx.num_layers - n + 1)
             if not prot.intersection(range(s, s + n))]
    d, start = min(spans)
    log.info("angular: span %d..%d (distance %.4f)", start, start + n - 1, d)
    return ctx.new_plan([str(i) for i in range(start, start + n)], [], method="angular",
                        scores={str(s): v for v, s in spans})


def run_sleb(ctx: Context, whole_forward: bool = False) -> Plan:
    """SLEB (Song et al. 2024): iteratively remove the layer whose removal (with the earlier ones gone)
    gives the lowest calibration NLL."""
    removed, nlls = greedy_removal(ctx, "layer", [1.0] * ctx.num_layers, ctx.budget.n_remove, "SLEB", whole_forward)
    ctx.info.sleb = {"order": removed, "nll": nlls}
    return ctx.new_plan([str(i) for i in sorted(removed)], [], method="sleb",
                        scores={str(i): k for k, i in enumerate(removed)})


register(Method("random", run_random, cures_by_default=False, folds=False,
                description="seeded random layer removal"))
register(Method("angular", run_angular, cures_by_default=False, folds=False,
                description="Gromov et al.: contiguous span with the smallest angular distance"))
register(Method("sleb", run_sleb, cures_by_default=False, folds=False,
                description="SLEB: iterative greedy layer removal on calibration NLL"))
