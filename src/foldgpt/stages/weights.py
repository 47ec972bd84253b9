"""Copies of a model that share its frozen weights (so a teacher and a student cost one model)."""

from __future__ import annotations

import copy

from torch import nn


def clone_sharing_weights(model: nn.Module) -> nn.Module:
    """Deep copy whose Linear and embedding weights are the original's tensors (not copied);
    norms, buffers and everything else are copied, so the clone can be edited and its norms trained."""
    memo: dict[int, object] = {}
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            for p in mod.parameters(recurse=False):
                memo[id(p)] = p
    clone = copy.deepcopy(model, memo)
    from ..scale.placement import remove

    remove(clone)  # a placement's hooks belong to the original (place the clone with placement.follow)
    return clone
