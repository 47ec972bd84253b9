"""Mergeable low-rank adapters for the cure.

Every method's cure trains the same kind of parameter set: norms, FoldGPT's per-child deltas, and a
rank-r adapter B @ A on each unique Linear of the surviving layers. The adapters run as forward hooks
(a child that borrows its parent's Linear runs the parent's adapter too, so a shared matrix stays
shared) and are merged into the weights after the cure, so they add no parameters to the result.
Merging writes a new weight tensor: the frozen original, which the teacher still uses, is untouched.

Not peft: peft swaps each adapted Linear for a wrapper in its parent module, but a child's SharedLinear keeps
calling the original Linear, so the child would run without the adapter that is merged into the weight it
shares; and peft merges in place, into a weight the student shares with the teacher. A hook on the one shared
Linear gives every position that runs it the same adapter, which merges exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import Adapter
from ..checkpoint.modeling_foldgpt import SharedLinear


def unique_linears(model: nn.Module, adapter: Adapter) -> list[nn.Linear]:
    """The distinct nn.Linear modules of the decoder layers (a child's view resolves to its parent's)."""
    seen: dict[int, nn.Linear] = {}
    for layer in adapter.layers(model):
        for path in adapter.linears:
            try:
                mod = layer.get_submodule(path)
            except AttributeError:  # the sub-block was deleted
                continue
            if isinstance(mod, SharedLinear):
                mod = mod.base
            if isinstance(mod, nn.Linear):
                seen.setdefault(id(mod), mod)
    return list(seen.values())


class MergeableLoRA:
    """Rank-`rank` adapters y += (x A^T) B^T on `linears` (A random, B = 0: the model starts unchanged)."""

    def __init__(self, linears: list[nn.Linear], rank: int, seed: int = 0):
        self.linears = linears
        self.rank = rank
        self.A: list[nn.Parameter] = []
        self.B: list[nn.Parameter] = []
        self._hooks = []
        g = torch.Generator().manual_seed(seed)
        for lin in linears:
            dev = lin.weight.device
            a = torch.randn(rank, lin.in_features, generator=g) / math.sqrt(lin.in_features)
            A = nn.Parameter(a.to(dev))
            B = nn.Parameter(torch.zeros(lin.out_features, rank, device=dev))
            self.A.append(A)
            self.B.append(B)
            self._hooks.append(lin.register_forward_hook(self._hook(A, B)))

    @staticmethod
    def _hook(A: nn.Parameter, B: nn.Parameter):
        def hook(module, args, out):
            x = args[0]
            a, b = A.t().to(x.device, x.dtype), B.t().to(x.device, x.dtype)  # an offloaded layer runs elsewhere
            return out + ((x @ a) @ b).to(out.dtype)
        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in zip(self.A, self.B) for p in pair]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold B @ A into new weight tensors and remove the hooks (the model then computes the same)."""
        self.remove()
        for lin, A, B in zip(self.linears, self.A, self.B):
            w = lin.weight
            lin.weight = nn.Parameter((w.float() + B.float() @ A.float()).to(w.dtype), requires_grad=False)
