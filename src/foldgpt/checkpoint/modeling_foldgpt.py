"""The folded model's runtime: self-contained (imports only torch and transformers).

This file is copied into every compressed folder, so `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` works where foldgpt is not installed; foldgpt itself uses the same code.

A folded checkpoint is the base architecture with a *layout* applied:
- `layers_path`: where the decoder layers sit in the base model (the dotted path of its layer list);
- `kept`: the original layer that each position comes from (removed layers are gone);
- `parents`: for each shared position, the position whose Linear modules it runs (the same module
  objects, so one storage), through a `SharedLinear` that may add its own low-rank delta;
- `child_ranks` / `child_modes`: per child position, the rank of its low-rank factors (default `adapter_rank`)
  and, per Linear, how the parent's matrix enters ("shared", "alpha": a fitted scalar, "own": not at all);
- `removed_sublayers`: attention/MLP branches deleted inside a kept layer (they contribute zero);
- `position_gates`: an optional learnable scalar on each position's residual branch;
- `child_gates`: positions (folded children) whose attention and MLP branch outputs are scaled by one
  learnable scalar `child_gate` (a child can start anywhere between "deleted" (0) and "full parent" (1)).
Each position keeps its own attention module (own `layer_idx`), so the KV cache is indexed by position
even where blocks share weights.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

WEIGHTS_NAME = "model.safetensors"


class SharedLinear(nn.Module):
    """A child's view of its parent's Linear: the same weights (one storage) plus an optional
    low-rank delta B @ A owned by the child.

    `mode` says how the parent's matrix enters: "shared" y = W_p x + B A x (the parent at full strength),
    "alpha" y = alpha W_p x + B A x + b (a fitted scalar on the parent, own bias), "own" y = B A x + b (the
    parent's matrix is not run: a low-rank child fitted to its own original weights)."""

    MODES = ("shared", "alpha", "own")

    def __init__(self, base: nn.Linear, rank: int = 0, mode: str = "shared"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown SharedLinear mode '{mode}'")
        if mode == "own" and rank <= 0:
            raise ValueError("an 'own' child Linear needs a rank > 0")
        self.base = base
        self.rank = rank
        self.mode = mode
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        if rank > 0:
            self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=w.dtype, device=w.device))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        if mode == "alpha":
            self.alpha = nn.Parameter(torch.ones((), dtype=w.dtype, device=w.device))
        if mode != "shared" and base.bias is not None:
            self.bias = nn.Parameter(torch.zeros(base.out_features, dtype=w.dtype, device=w.device))

    def merged_weight(self) -> torch.Tensor:
        """The effective weight (parent's weight + this child's delta), for dense export."""
        w = self.base.weight
        if self.mode == "alpha":
            w = self.alpha * w
        elif self.mode == "own":
            w = torch.zeros_like(w)
        return w + self.lora_B @ self.lora_A if self.rank > 0 else w

    def merged_bias(self) -> torch.Tensor | None:
        if self.mode == "shared" or self.base.bias is None:
            return self.base.bias
        return self.bias + self.alpha * self.base.bias if self.mode == "alpha" else self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.mode == "shared":
            y = self.base(x)
        elif self.mode == "alpha":  # through the parent's module, so hooks on it (the cure's adapters) apply
            y = self.alpha.to(x.dtype) * self.base(x)
        else:
            y = None
        if self.rank > 0:
            if type(self.lora_A) in (torch.Tensor, nn.Parameter) and type(self.lora_B) in (torch.Tensor, nn.Parameter):
                low = (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
            else:  # weight-only quantized factors (foldgpt.quant): tensor types that run through F.linear
                low = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
            y = low if y is None else y + low
        if self.mode != "shared" and getattr(self, "bias", None) is not None:
            y = y + self.bias.to(y.dtype)
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


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _gate_hook(module, args, kwargs, output):
    h_in = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    gated = h_in + module.fold_gate.to(out.dtype) * (out - h_in)
    return (gated, *output[1:]) if isinstance(output, tuple) else gated


def add_position_gates_(layers: nn.ModuleList) -> None:
    """A learnable scalar on each position's residual branch (h + g * (B(h) - h)), initialised at 1."""
    for layer in layers:
        if not hasattr(layer, "fold_gate"):
            p = next(layer.parameters())
            layer.fold_gate = nn.Parameter(torch.ones((), dtype=p.dtype, device=p.device))
            layer.register_forward_hook(_gate_hook, with_kwargs=True)


def _branch_gate_hook(layer: nn.Module):
    def hook(module, args, output):
        g = layer.child_gate
        if isinstance(output, tuple):
            return (output[0] * g.to(output[0].dtype), *output[1:])
        return output * g.to(output.dtype)

    return hook


def add_child_gates_(layers: nn.ModuleList, positions: list[int], attn_point: str, mlp_point: str) -> None:
    """One learnable scalar per listed position scaling both residual branches (the outputs of the modules
    at `attn_point` and `mlp_point`), initialised at 1. A dense export folds it into those branches' weights."""
    for pos in positions:
        layer = layers[pos]
        if hasattr(layer, "child_gate"):
            continue
        p = next(layer.parameters())
        layer.child_gate = nn.Parameter(torch.ones((), dtype=p.dtype, device=p.device))
        for point in (attn_point, mlp_point):
            layer.get_submodule(point).register_forward_hook(_branch_gate_hook(layer))


def layer_stack(model: nn.Module, layout: dict) -> tuple[nn.Module, str]:
    """(the module holding the decoder layers, the attribute naming them), from the layout's `layers_path`
    (layouts that do not record it: the base model's `layers`)."""
    path = layout.get("layers_path")
    if path is None:
        return model.base_model, "layers"
    owner, _, attr = path.rpartition(".")
    return model.get_submodule(owner), attr


def apply_layout_(model: nn.Module, layout: dict, init_child=None) -> nn.Module:
    """Turn a dense base model (all original layers) into the folded one, in place.

    `init_child(view, own_linear, position, path)` may initialise each child's low-rank delta from
    its original weights before they are dropped."""
    owner, attr = layer_stack(model, layout)
    layers = list(getattr(owner, attr))
    kept = layout["kept"]
    for pos, parts in layout.get("removed_sublayers", {}).items():
        layer = layers[kept[int(pos)]]
        for part in parts:
            branch, norms, returns_tuple = (
                (layout["attn_branch"], layout["attn_norms"], True) if part == "attn"
                else (layout["mlp_branch"], layout["mlp_norms"], False)
            )
            set_submodule(layer, branch, ZeroBranch(returns_tuple))
            for n in norms:
                set_submodule(layer, n, nn.Identity())
    for pos, parent_pos in layout.get("parents", {}).items():
        child, parent = layers[kept[int(pos)]], layers[kept[parent_pos]]
        rank = int(layout.get("child_ranks", {}).get(str(pos), layout.get("adapter_rank", 0)))
        modes = layout.get("child_modes", {}).get(str(pos), {})
        for path in layout["shared_linears"]:
            own = child.get_submodule(path)
            view = SharedLinear(parent.get_submodule(path), rank, modes.get(path, "shared"))
            if init_child is not None:
                init_child(view, own, int(pos), path)
            set_submodule(child, path, view)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    setattr(owner, attr, new_layers)
    model.config.num_hidden_layers = len(new_layers)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    for i, layer in enumerate(new_layers):  # each position indexes its own KV cache slot
        for mod in (layer, getattr(layer, layout.get("attn_branch", "self_attn"), None)):
            if mod is not None and hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    if layout.get("position_gates"):
        add_position_gates_(new_layers)
    if layout.get("child_gates"):
        add_child_gates_(new_layers, [int(p) for p in layout["child_gates"]], layout["attn_gate_point"],
                         layout["mlp_gate_point"])
    model.fold_layout = layout
    return model


def base_config_from_dict(d: dict) -> PretrainedConfig:
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build_meta(base_config: dict, layout: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The folded architecture on the meta device (no memory): the dense skeleton is never allocated."""
    config = base_config_from_dict(base_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_layout_(model, layout)
    return model


def materialize_buffers_(model: nn.Module, device: str = "cpu") -> None:
    """Non-persistent buffers (rotary frequencies, embedding scales) are not stored: recompute them."""
    with torch.no_grad():
        for mod in model.modules():
            metas = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.device.type == "meta"]
            for name in metas:
                buf = getattr(mod, name)
                mod._buffers[name] = torch.empty_like(buf, device=device)
            if metas:
                model._init_weights(mod)


def build_empty(base_config: dict, layout: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The folded architecture with uninitialised storage, every unique tensor allocated once."""
    model = build_meta(base_config, layout, dtype)
    model.to_empty(device="cpu")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers_(model)
    return model


def alias_keys(model: nn.Module) -> dict[str, str]:
    """state_dict keys that alias another key's storage (shared and tied weights) -> that key."""
    owner: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    items = model.state_dict(keep_vars=True).items()
    # a module's own name owns a shared tensor, not a child's view of it (".base."), wherever the child sits
    for k, v in sorted(items, key=lambda kv: ".base." in kv[0]):
        if v.device.type == "meta":  # meta tensors have no storage: shared ones are the same object
            key = ("meta", id(v))
        else:
            key = (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype) if v.numel() else ("empty", k)
        if key in owner:
            aliases[k] = owner[key]
        else:
            owner[key] = k
    return aliases


def load_folded_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the folded model from a folder. The stored tensors are assigned into the meta skeleton (no
    second copy, no copy per position); shared modules receive their tensor once, tied weights are re-tied."""
    from transformers.modeling_utils import load_state_dict

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = build_meta(cfg["base_config"], cfg["fold_layout"], dtype)
    materialize_buffers_(model)  # before the weights: re-initialising a module's buffers may touch its weights
    aliases = alias_keys(model)
    state = load_state_dict(os.path.join(path, WEIGHTS_NAME))
    if cfg.get("quantization"):  # weight-only quantized (foldgpt.quant): without torchao, run it dequantized
        state = dequantize_state(state, cfg["quantization"])
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return finish_load(model, path, set(missing) - set(aliases), unexpected)


def finish_load(model: nn.Module, path, missing: set[str], unexpected: list[str]) -> nn.Module:
    """After load_state_dict: refuse weights that do not match the layout (`missing` without the keys that are
    aliases of others), then materialize buffers and set eval mode and the model's path."""
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or missing or left:
        raise ValueError(f"{path}: weights do not match the layout (missing {sorted(missing or left)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    materialize_buffers_(model)
    model.eval()
    model.config._name_or_path = str(path)
    return model


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (int8 in [-8, 7], rows x cols) as bytes: two per byte, value + 8, the even column in the low
    nibble (an odd last column is padded)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """pack_int4's inverse: int8 values in [-8, 7], `cols` columns."""
    low, high = (packed & 0xF).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :cols].contiguous()


def dequantize_state(state: dict, quantization: dict) -> dict:
    """A weight-only quantized folder's tensors (NAME.qdata, NAME.scale; config.json's "quantization" lists each
    NAME's bits, group size and shape) as float weights NAME = values x scale, for loading without torchao."""
    state = dict(state)
    for name, info in quantization["tensors"].items():
        packed, scale = state.pop(f"{name}.qdata"), state.pop(f"{name}.scale").float()
        q = unpack_int4(packed, int(info["shape"][1])) if int(info["bits"]) == 4 else packed
        group = int(info["group_size"]) or q.shape[-1]
        state[name] = (q.float().reshape(q.shape[0], -1, group) * scale.reshape(q.shape[0], -1, 1)).reshape(q.shape)
    return state


class FoldGPTConfig(PretrainedConfig):
    """Config of a folded checkpoint: the base model's config nested, plus the fold layout."""

    model_type = "foldgpt"

    def __init__(self, base_config: dict | None = None, fold_layout: dict | None = None,
                 fold_plan: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        self.fold_layout = fold_layout or {}
        self.fold_plan = fold_plan or {}
        super().__init__(**kwargs)


class FoldGPTForCausalLM(PreTrainedModel):
    """Loader class for folded checkpoints. `from_pretrained` returns the base family's own model class
    (e.g. LlamaForCausalLM) with the fold layout applied, so generate(), pipelines and PEFT work as
    usual while shared blocks are held in memory once."""

    config_class = FoldGPTConfig

    def __init__(self, config: FoldGPTConfig):
        super().__init__(config)
        raise TypeError("build folded models with FoldGPTForCausalLM.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"folded checkpoints load from a local folder; {path} is not one")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype")) or torch.float32
        if isinstance(dtype, str):
            dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        return load_folded_model(path, dtype)
