"""BlockPruner (Zhong et al. 2024): iterative greedy removal of attention and MLP sub-blocks.

Each step removes the sub-block whose removal (with the earlier removals in place) gives the lowest
calibration perplexity, until the removed sub-blocks' parameters reach the savings the budget asks for.
Attention and MLP sub-blocks cost different amounts, so the count of removed units is not fixed: the
search stops at the first step where the unique parameters are at or below the target.
"""

from __future__ import annotations

import logging

from torch import nn

from ..adapters import Adapter
from ..plan import Plan
from ..stages.gates import unit_names
from . import Context, Method, register
from .greedy import greedy_removal

log = logging.getLogger(__name__)


def sublayer_params(model: nn.Module, adapter: Adapter) -> list[int]:
    """Parameters each sub-block frees when removed ("i.attn", "i.mlp" order, as unit_names): the branch
    module (its Linears, biases and inner norms such as Gemma's q/k norms) plus the sub-block's norms,
    exactly what apply_plan_ replaces by a ZeroBranch / Identity."""
    out = []
    for layer in adapter.layers(model):
        for branch, norms in ((adapter.attn_branch, adapter.attn_norms), (adapter.mlp_branch, adapter.mlp_norms)):
            mods = [layer.get_submodule(branch), *(layer.get_submodule(n) for n in norms)]
            out.append(sum(p.numel() for m in mods for p in m.parameters()))
    return out


def units_to_plan(removed: list[str]) -> list[str]:
    """Plan units: a layer that lost both sub-blocks is removed whole ("i"), sorted by layer."""
    parts: dict[int, set[str]] = {}
    for u in removed:
        layer, part = u.split(".")
        parts.setdefault(int(layer), set()).add(part)
    out = []
    for layer in sorted(parts):
        if parts[layer] == {"attn", "mlp"}:
            out.append(str(layer))
        else:
            out += [f"{layer}.{p}" for p in sorted(parts[layer])]
    return out


def run(ctx: Context, whole_forward: bool = False) -> Plan:
    names = unit_names(ctx.num_layers, "sublayer")
    costs = sublayer_params(ctx.model, ctx.adapter)
    b = ctx.budget
    need = (b.base_params - b.target_params) if b.target_params is not None else b.n_remove * b.block_params
    removed, nlls = greedy_removal(ctx, "sublayer", costs, need, "BlockPruner", whole_forward)
    saved = sum(costs[i] for i in removed)
    ctx.info.blockpruner = {"order": [names[i] for i in removed], "nll": nlls, "saved_params": saved,
                            "needed_params": need}
    return ctx.new_plan(units_to_plan([names[i] for i in removed]), [], method="blockpruner",
                        scores={names[i]: k for k, i in enumerate(removed)})


register(Method("blockpruner", run, cures_by_default=False, folds=False, unit="sublayer",
                description="BlockPruner: iterative greedy attention/MLP sub-block removal on calibration "
                            "perplexity"))
