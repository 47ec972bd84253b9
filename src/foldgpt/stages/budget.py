"""Parameter budget: how many layers to remove and how many to fold to reach a unique-parameter target."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..adapters import Adapter
from ..errors import FoldGPTError
from .structure import child_params, layer_params, unique_params


@dataclass
class Budget:
    base_params: int
    target_params: int | None
    block_params: int
    child_cost: int  # what a folded child still costs (norms + low-rank deltas)
    n_remove: int
    n_fold: int

    @property
    def predicted_params(self) -> int:
        fold_gain = self.block_params - self.child_cost
        return self.base_params - self.n_remove * self.block_params - self.n_fold * fold_gain


def _max_children(retained: int, group_size: int) -> int:
    return retained - math.ceil(retained / group_size) if group_size > 1 else 0


def plan_budget(model: nn.Module, adapter: Adapter, num_layers: int, target: float | None,
                remove_rate: float | None, remove_share: float, group_size: int, rank: int,
                shared: list[str] | None = None, child_gate: bool = False) -> Budget:
    """Split the savings a target asks for between removal and folding.

    - target only: removal takes `remove_share` of the savings (in whole layers), folding the rest;
    - remove_rate (+ group_size) with no target: remove that fraction, fold every retained group;
    - both: remove that fraction, fold as many children as the target still needs."""
    base = unique_params(model)
    layer0 = adapter.layers(model)[0]
    block = layer_params(layer0)
    child = child_params(adapter, layer0, rank, shared) + int(child_gate)  # + its scalar branch gate
    gain = block - child  # what folding one child saves
    tgt = None if target is None else int(target * base)
    if remove_rate is not None:
        n_remove = int(round(remove_rate * num_layers))
    elif group_size > 1 and gain > 0:
        n_remove = int(round(remove_share * (base - tgt) / block))
    else:
        n_remove = math.ceil((base - tgt) / block)
    while True:
        if n_remove >= num_layers and remove_rate is not None:
            raise FoldGPTError(f"--remove-rate {remove_rate} removes {n_remove} of the model's {num_layers} layers, "
                               f"leaving none; lower it (at most {num_layers - 1} layers can go)")
        if n_remove >= num_layers:
            raise FoldGPTError(f"--target-params {target} is too small for this model; raise it")
        max_children = _max_children(num_layers - n_remove, group_size)
        if tgt is None:
            n_fold = max_children
            break
        need = base - n_remove * block - tgt
        n_fold = 0 if need <= 0 else (math.ceil(need / gain) if gain > 0 and group_size > 1 else num_layers)
        if n_fold <= max_children:
            break
        if remove_rate is not None:
            raise FoldGPTError(
                f"--target-params {target} is out of reach with --remove-rate {remove_rate} and "
                f"--group-size {group_size}; raise one of them or the target"
            )
        n_remove += 1  # not enough room to fold: remove one more layer
    return Budget(base, tgt, block, child, n_remove, n_fold)
