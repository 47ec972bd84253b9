"""Model surgery: merge layers, delete units, fold children onto their parent's weights, gates on branches.

Everything here edits a Hugging Face causal LM in place (`name_` with a trailing underscore) and keeps
its config consistent, so the result still runs through the family's own forward and generate().
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import Adapter
from ..checkpoint.modeling_foldgpt import SharedLinear, ZeroBranch, add_position_gates_, apply_layout_, set_submodule  # noqa: F401
from ..errors import FoldGPTError
from ..plan import Plan


def init_lowrank_(shared: SharedLinear, own: nn.Linear | None, init: str, seed: int) -> None:
    """Initialise a child's low-rank delta: 'zero' (A random, B = 0: the child starts as the parent)
    or 'svd' (B @ A = best rank-r approximation of W_child - W_parent)."""
    if shared.rank == 0:
        return
    with torch.no_grad():
        if init == "svd" and own is not None:
            delta = (own.weight.to(shared.base.weight.device) - shared.base.weight).float()  # (out, in)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(shared.rank, s.numel())  # a rank above min(out, in) pads with zeros
            root = s[:r].sqrt()
            shared.lora_B.zero_()
            shared.lora_A.zero_()
            shared.lora_B[:, :r].copy_((u[:, :r] * root).to(shared.lora_B.dtype))
            shared.lora_A[:r].copy_((root[:, None] * vh[:r]).to(shared.lora_A.dtype))
        else:
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(shared.lora_A.shape, generator=g) / math.sqrt(shared.in_features)
            shared.lora_A.copy_(a.to(shared.lora_A.dtype))
            shared.lora_B.zero_()


def layout_from_plan(plan: Plan, adapter: Adapter) -> dict:
    """The runtime layout (positions, parents, removed branches) of a plan, with the architecture names
    the standalone modeling file needs."""
    kept = plan.kept_layers()
    pos = {layer: i for i, layer in enumerate(kept)}
    return {
        "num_layers": plan.num_layers,
        "layers_path": adapter.layers_path,
        "kept": kept,
        "parents": {str(pos[c]): pos[p] for c, p in sorted(plan.parent_of().items())},
        "removed_sublayers": {str(pos[layer]): sorted(parts)
                              for layer, parts in sorted(plan.removed_sublayers().items()) if layer in pos},
        "shared_linears": list(plan.shared_linears or adapter.linears),
        "adapter_rank": plan.adapter_rank,
        "child_ranks": {str(pos[int(c)]): r for c, r in sorted(plan.child_ranks.items(), key=lambda kv: int(kv[0]))},
        "child_modes": {str(pos[int(c)]): dict(m) for c, m in sorted(plan.child_modes.items(),
                                                                     key=lambda kv: int(kv[0]))},
        "position_gates": plan.position_gates,
        "child_gates": sorted(pos[int(c)] for c in plan.child_gates),
        "attn_gate_point": adapter.attn_gate_point,
        "mlp_gate_point": adapter.mlp_gate_point,
        "attn_branch": adapter.attn_branch,
        "mlp_branch": adapter.mlp_branch,
        "attn_norms": list(adapter.attn_norms),
        "mlp_norms": list(adapter.mlp_norms),
    }


def merge_layers_(layers: list[nn.Module], merge: list[int]) -> None:
    """LaCo's RDSC layer merge: every parameter of layer l = merge[0] (Linears and norms) becomes
    theta_l + sum_k (theta_{l+k} - theta_l) over the other layers of the merge (computed in float32).

    The result is installed as NEW nn.Parameter objects: the old tensors are never written, since a
    student made by clone_sharing_weights shares its Linear weights with the dense teacher."""
    head, rest = layers[merge[0]], [layers[i] for i in merge[1:]]
    with torch.no_grad():
        for name, p in list(head.named_parameters()):
            base = p.float()
            merged = base + sum(layer.get_parameter(name).float() - base for layer in rest)
            owner_path, _, attr = name.rpartition(".")
            owner = head.get_submodule(owner_path) if owner_path else head
            setattr(owner, attr, nn.Parameter(merged.to(p.dtype), requires_grad=p.requires_grad))


def shape_mismatch(child: nn.Module, parent: nn.Module, paths: list[str]) -> str | None:
    """The first of the Linears `paths` whose weight shape differs between the two layers (None: all match)."""
    return next((p for p in paths if child.get_submodule(p).weight.shape != parent.get_submodule(p).weight.shape),
                None)


def apply_plan_(model: nn.Module, plan: Plan, adapter: Adapter, seed: int = 0, fits=None) -> nn.Module:
    """Apply a plan to a dense model in place: merge layers (LaCo), remove units, fold groups, add deltas
    and gates. A plan with fitted children (adapter_init "fit") needs `fits` (fit.ChildFits of the dense model)."""
    if plan.adapter_init == "fit" and plan.groups and fits is None:
        raise FoldGPTError("this plan's children are fitted on calibration activations; apply it with calibration "
                           "text (foldgpt compress --plan ... --text ...)")
    n = len(adapter.layers(model))
    if n != plan.num_layers:
        raise ValueError(f"plan is for {plan.num_layers} layers, model has {n}")
    layers = list(adapter.layers(model))
    for merge in plan.merges:  # before the layout: merged weights are then position l's ordinary weights
        merge_layers_(layers, merge)
    layout = layout_from_plan(plan, adapter)
    paths = layout["shared_linears"]
    for c, p in plan.parent_of().items():
        if (path := shape_mismatch(layers[c], layers[p], paths)) is not None:
            a, b = layers[c].get_submodule(path).weight.shape, layers[p].get_submodule(path).weight.shape
            raise FoldGPTError(f"layer {c} cannot share layer {p}'s {path}: shapes {tuple(a)} and {tuple(b)} "
                               "differ; group layers of the same shapes")
        rank, size = plan.child_ranks.get(str(c), plan.adapter_rank), max(max(layers[c].get_submodule(q).weight.shape)
                                                                         for q in paths)
        if rank > size:
            raise FoldGPTError(f"plan gives child {c} rank {rank}, more than its Linears' largest size {size}; "
                               "lower the rank")

    kept, parent_of = plan.kept_layers(), plan.parent_of()

    def init_child(view: SharedLinear, own: nn.Module, pos: int, path: str) -> None:
        if view.base.weight.device.type == "meta":
            return
        if plan.adapter_init == "fit":
            from .fit import fit_linear_

            fit_linear_(view, own, fits, kept[pos], parent_of[kept[pos]], path)
        else:
            init_lowrank_(view, own if isinstance(own, nn.Linear) else None, plan.adapter_init,
                          seed=seed * 1009 + pos * 31 + paths.index(path))

    apply_layout_(model, layout, init_child)
    if plan.child_gates:
        kept = plan.kept_layers()
        with torch.no_grad():
            for c, value in plan.child_gates.items():
                layer = adapter.layers(model)[kept.index(int(c))]
                if layer.child_gate.device.type != "meta":
                    layer.child_gate.fill_(float(value))
    return model


# ---- parameter accounting -------------------------------------------------------------------------
def unique_params(model: nn.Module) -> int:
    """Parameters counted once per storage (shared and tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = p.data_ptr() if p.device.type != "meta" and p.data_ptr() else id(p)  # quantized tensors: no pointer
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


def _is_shared_base(layer: nn.Module, lin: nn.Module) -> bool:
    return any(isinstance(m, SharedLinear) and m.base is lin for m in layer.modules())


def flops_per_token(model: nn.Module, adapter: Adapter, seq_len: int = 512) -> int:
    """Approximate forward FLOPs per token: 2 x matmul parameters actually executed (shared weights count
    at every position that runs them) + attention scores at the given context length + LM head."""
    total = 0
    for layer in adapter.layers(model):
        for m in layer.modules():
            if isinstance(m, SharedLinear):
                total += 2 * m.rank * (m.in_features + m.out_features)
                total += 0 if m.mode == "own" else 2 * m.in_features * m.out_features
            elif isinstance(m, nn.Linear) and not _is_shared_base(layer, m):
                total += 2 * m.in_features * m.out_features
        attn = layer.get_submodule(adapter.attn_branch)
        if not isinstance(attn, ZeroBranch):
            n_heads = model.config.num_attention_heads
            head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // n_heads
            total += 2 * 2 * n_heads * head_dim * seq_len  # QK^T and AV, averaged causal length ~ S/2 x 2
    emb = adapter.embed_tokens(model).weight
    total += 2 * emb.shape[0] * emb.shape[1]
    return total
