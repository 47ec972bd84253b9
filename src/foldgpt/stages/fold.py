"""Stage 2: choose which retained layers to fold onto a parent, by measured calibration cost."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..scale.placement import sharing_home
from .gates import kl_div
from .structure import set_submodule

log = logging.getLogger(__name__)


@contextmanager
def borrowed_weights(child: nn.Module, parent: nn.Module, paths: list[str]):
    """Temporarily make `child` run `parent`'s Linears (no copy), keeping its own norms."""
    saved = {p: child.get_submodule(p) for p in paths}
    for p in paths:
        set_submodule(child, p, parent.get_submodule(p))
    try:
        with sharing_home(child, parent):  # layers placed on different devices (--device-map)
            yield
    finally:
        for p, m in saved.items():
            set_submodule(child, p, m)


def candidate_groups(kept: list[int], kinds: list[str], group_size: int) -> list[list[int]]:
    """Contiguous runs (in retained order) of 2..group_size same-kind layers. Gemma-3 style models
    share within a kind: a child may skip layers of the other kind between it and its parent."""
    out = []
    for kind in dict.fromkeys(kinds[i] for i in kept):
        seq = [i for i in kept if kinds[i] == kind]
        for start in range(len(seq)):
            for size in range(2, group_size + 1):
                if start + size <= len(seq):
                    out.append(seq[start : start + size])
    return out


@torch.no_grad()
def fold_costs(model: nn.Module, adapter: Adapter, kept: list[int], kinds: list[str], group_size: int,
               teacher_logits: torch.Tensor, ids: torch.Tensor, paths: list[str],
               foldable: list[int] | None = None) -> dict[tuple[int, int], float]:
    """Increase of KL(dense || current) on a calibration batch when child c runs parent p's weights,
    for every (p, c) pair that some candidate group (of `foldable` layers, default all kept) contains.
    `model` already has removals applied and its layers are indexed by position; kept[i] is the
    original index of position i."""
    pos = {layer: i for i, layer in enumerate(kept)}
    if foldable is not None:
        kept = foldable
    layers = adapter.layers(model)
    base = kl_div(teacher_logits, model(input_ids=ids, use_cache=False).logits).item()
    pairs = sorted({(g[0], c) for g in candidate_groups(kept, kinds, group_size) for c in g[1:]})
    costs = {}
    for p, c in tqdm(pairs, desc="Folding costs", leave=False):
        with borrowed_weights(layers[pos[c]], layers[pos[p]], paths):
            kl = kl_div(teacher_logits, model(input_ids=ids, use_cache=False).logits).item()
        costs[(p, c)] = kl - base
    return costs


def select_groups(kept: list[int], kinds: list[str], group_size: int, n_children: int,
                  costs: dict[tuple[int, int], float] | None) -> list[list[int]]:
    """Pick disjoint groups holding `n_children` children in all, cheapest per child first.

    Without costs, fold adjacent retained layers from the top of the network down."""
    if n_children <= 0:
        return []
    cands = candidate_groups(kept, kinds, group_size)
    if costs is None:
        cands.sort(key=lambda g: (-g[-1], len(g)))
        score = {tuple(g): i for i, g in enumerate(cands)}
    else:
        score = {tuple(g): sum(costs[(g[0], c)] for c in g[1:]) / (len(g) - 1) for g in cands}
        cands.sort(key=lambda g: score[tuple(g)])
    used: set[int] = set()
    chosen: list[list[int]] = []
    remaining = n_children
    for g in cands:
        if remaining <= 0:
            break
        if len(g) - 1 > remaining or used.intersection(g):
            continue
        chosen.append(g)
        used.update(g)
        remaining -= len(g) - 1
    if remaining > 0:
        log.warning("could fold only %d of %d children (not enough same-kind neighbours)",
                    n_children - remaining, n_children)
    return sorted(chosen)
