"""Model surgery: delete units, fold children onto their parent's weights, gates on branches.

Everything here edits a Hugging Face causal LM in place (`name_` with a trailing underscore) and keeps
its config consistent, so the result still runs through the family's own forward and generate().
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import Adapter
from .plan import Plan


class SharedLinear(nn.Module):
    """A child's view of its parent's Linear: the same weights (one storage) plus an optional
    low-rank delta B @ A owned by the child."""

    def __init__(self, base: nn.Linear, rank: int = 0):
        super().__init__()
        self.base = base
        self.rank = rank
        self.in_features, self.out_features = base.in_features, base.out_features
        if rank > 0:
            w = base.weight
            self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=w.dtype, device=w.device))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))

    @property
    def weight(self) -> torch.Tensor:  # the effective weight, for export and inspection
        w = self.base.weight
        return w + self.lora_B @ self.lora_A if self.rank > 0 else w

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = self.base(x)
        if self.rank > 0:
            y = y + (x @ self.lora_A.t()) @ self.lora_B.t()
        return y


class ZeroBranch(nn.Module):
    """Stands in for a deleted attention or MLP sub-block: its residual contribution is zero."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = args[0]
        z = torch.zeros_like(hidden_states)
        return (z, None) if self.returns_tuple else z


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def init_lowrank_(shared: SharedLinear, own: nn.Linear | None, init: str, seed: int) -> None:
    """Initialise a child's low-rank delta: 'zero' (A random, B = 0: the child starts as the parent)
    or 'svd' (B @ A = best rank-r approximation of W_child - W_parent)."""
    if shared.rank == 0:
        return
    with torch.no_grad():
        if init == "svd" and own is not None:
            delta = (own.weight - shared.base.weight).float()  # (out, in)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = shared.rank
            root = s[:r].sqrt()
            shared.lora_B.copy_((u[:, :r] * root).to(shared.lora_B.dtype))
            shared.lora_A.copy_((root[:, None] * vh[:r]).to(shared.lora_A.dtype))
        else:
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(shared.lora_A.shape, generator=g) / math.sqrt(shared.in_features)
            shared.lora_A.copy_(a.to(shared.lora_A.dtype))
            shared.lora_B.zero_()


def remove_sublayer_(layer: nn.Module, adapter: Adapter, part: str) -> None:
    """Delete a layer's attention ('attn') or MLP ('mlp') sub-block and its norms."""
    branch = adapter.attn_branch if part == "attn" else adapter.mlp_branch
    norms = adapter.attn_norms if part == "attn" else adapter.mlp_norms
    _set_submodule(layer, branch, ZeroBranch(returns_tuple=part == "attn"))
    for n in norms:
        _set_submodule(layer, n, nn.Identity())


def apply_plan_(model: nn.Module, plan: Plan, adapter: Adapter, seed: int = 0) -> nn.Module:
    """Apply a plan to a dense model in place: remove units, fold groups, add adapters and gates."""
    layers = list(adapter.layers(model))
    if len(layers) != plan.num_layers:
        raise ValueError(f"plan is for {plan.num_layers} layers, model has {len(layers)}")
    kinds = adapter.layer_kinds(model.config)
    for layer_idx, parts in plan.removed_sublayers().items():
        for part in sorted(parts):
            remove_sublayer_(layers[layer_idx], adapter, part)
    shared = plan.shared_linears or list(adapter.linears)
    for group in plan.groups:
        parent = layers[group[0]]
        for child_idx in group[1:]:
            child = layers[child_idx]
            for path_idx, path in enumerate(shared):
                own = child.get_submodule(path)
                base = parent.get_submodule(path)
                if isinstance(base, SharedLinear):  # pragma: no cover - parents are never children
                    base = base.base
                view = SharedLinear(base, plan.adapter_rank)
                init_lowrank_(view, own if isinstance(own, nn.Linear) else None, plan.adapter_init,
                              seed=seed * 1009 + child_idx * 31 + path_idx)
                _set_submodule(child, path, view)
    kept = plan.kept_layers()
    adapter.set_layers(model, [layers[i] for i in kept], [kinds[i] for i in kept])
    if plan.position_gates:
        add_position_gates_(model, adapter)
    return model


# ---- per-position persistent gates ---------------------------------------------------------------
def _gate_hook(module, args, kwargs, output):
    h_in = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    gated = h_in + module.fold_gate.to(out.dtype) * (out - h_in)
    return (gated, *output[1:]) if isinstance(output, tuple) else gated


def add_position_gates_(model: nn.Module, adapter: Adapter) -> None:
    """A learnable scalar on each position's residual branch (h + g * (B(h) - h)), initialised at 1."""
    for layer in adapter.layers(model):
        if not hasattr(layer, "fold_gate"):
            p = next(layer.parameters())
            layer.fold_gate = nn.Parameter(torch.ones((), dtype=p.dtype, device=p.device))
            layer.register_forward_hook(_gate_hook, with_kwargs=True)


# ---- parameter accounting -------------------------------------------------------------------------
def unique_params(model: nn.Module) -> int:
    """Parameters counted once per storage (shared and tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = p.data_ptr() if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def layer_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def lowrank_params(adapter: Adapter, layer: nn.Module, rank: int, shared: list[str] | None = None) -> int:
    """Extra parameters a child pays for rank-r deltas on its shared Linears."""
    paths = shared or list(adapter.linears)
    return sum(rank * (layer.get_submodule(p).in_features + layer.get_submodule(p).out_features) for p in paths)


def child_params(adapter: Adapter, layer: nn.Module, rank: int, shared: list[str] | None = None) -> int:
    """What a folded child still costs: everything but its shared Linears, plus its deltas."""
    paths = shared or list(adapter.linears)
    shared_n = sum(sum(p.numel() for p in layer.get_submodule(path).parameters()) for path in paths)
    return layer_params(layer) - shared_n + lowrank_params(adapter, layer, rank, paths)


def flops_per_token(model: nn.Module, adapter: Adapter, seq_len: int = 512) -> int:
    """Approximate forward FLOPs per token: 2 x matmul parameters actually executed (shared weights count
    at every position that runs them) + attention scores at the given context length + LM head."""
    total = 0
    for layer in adapter.layers(model):
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                total += 2 * m.in_features * m.out_features
            elif isinstance(m, SharedLinear) and m.rank:
                total += 2 * m.rank * (m.in_features + m.out_features)
        attn = layer.get_submodule(adapter.attn_branch)
        if not isinstance(attn, ZeroBranch):
            n_heads = model.config.num_attention_heads
            head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // n_heads
            total += 2 * 2 * n_heads * head_dim * seq_len  # QK^T and AV, averaged causal length ~ S/2 x 2
    emb = adapter.embed_tokens(model).weight
    total += 2 * emb.shape[0] * emb.shape[1]
    return total
