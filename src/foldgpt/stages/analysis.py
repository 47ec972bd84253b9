"""Stage 0: redundancy analysis. Hidden-state capture plus pure tensor functions on the result."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter


@contextmanager
def capture_hidden(model: nn.Module, adapter: Adapter):
    """Collect h_0 (input of the first layer) and every layer's output h_1..h_L, before the final norm.

    Yields a list that fills with L+1 tensors (B, T, D) per forward pass."""
    store: list[torch.Tensor] = []
    layers = adapter.layers(model)

    def pre(module, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach())

    def post(module, args, kwargs, output):  # layers spread over devices (a placement): gather on h_0's
        store.append((output[0] if isinstance(output, tuple) else output).detach().to(store[0].device))

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post, with_kwargs=True) for layer in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def cosine_matrix_sums(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """hidden: (L+1, N, D) states of N tokens. Returns (sum over tokens of cos(h_i, h_j), N used)."""
    if mask is not None:
        hidden = hidden[:, mask]
    hn = nn.functional.normalize(hidden.float(), dim=-1)  # (L+1, N, D)
    return torch.einsum("ind,jnd->ij", hn, hn), hn.shape[1]


def block_influence(sim: torch.Tensor) -> torch.Tensor:
    """BI_l = 1 - cos(h_l, h_{l+1}) from the (L+1)x(L+1) mean-cosine matrix."""
    return 1.0 - torch.diagonal(sim, offset=1)


def angular_distance(sim: torch.Tensor) -> torch.Tensor:
    """arccos(cos)/pi for every pair of hidden states (Gromov et al.)."""
    return torch.arccos(sim.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def similarity(model: nn.Module, adapter: Adapter, batches: torch.Tensor, skip_first: bool,
               batch_size: int = 4, desc: str = "Analyzing") -> torch.Tensor:
    """Mean cosine between all pairs of hidden states over the calibration tokens: (L+1, L+1)."""
    total, count = None, 0
    for i in tqdm(range(0, len(batches), batch_size), desc=desc, leave=False):
        ids = batches[i : i + batch_size].to(model.device)
        with capture_hidden(model, adapter) as store:
            model(input_ids=ids, use_cache=False)
        hidden = torch.stack(store)  # (L+1, B, T, D)
        if skip_first:  # the BOS position is an attention sink, not text
            hidden = hidden[:, :, 1:]
        s, n = cosine_matrix_sums(hidden.flatten(1, 2))
        total = s if total is None else total + s
        count += n
    return total / count


def analysis_dict(sim: torch.Tensor) -> dict:
    L = sim.shape[0] - 1
    cos = torch.diagonal(sim, offset=1)
    return {
        "num_layers": L,
        "cosine": cos.tolist(),
        "block_influence": block_influence(sim).tolist(),
        "relative_depth": [(i + 0.5) / L for i in range(L)],
        "similarity_matrix": sim.tolist(),
        "angular_distance": angular_distance(sim).tolist(),
    }
