"""Dense export: a plain checkpoint of the base architecture that loads with no remote code.

Shared weights are copied into each position and per-child deltas merged into the copies; a deleted
attention/MLP sub-block becomes a zero output projection (its residual contribution stays zero)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import FoldGPTError
from .modeling_foldgpt import SharedLinear, ZeroBranch

log = logging.getLogger(__name__)


def _dense_linear(view: SharedLinear) -> nn.Linear:
    base = view.base
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                    dtype=base.weight.dtype, device=base.weight.device)
    with torch.no_grad():
        lin.weight.copy_(view.merged_weight())
        if base.bias is not None:
            lin.bias.copy_(view.merged_bias())
    return lin


@torch.no_grad()
def to_dense(folded: nn.Module) -> nn.Module:
    """A plain base-architecture model (fresh modules, no shared storage) computing the same function."""
    from transformers import AutoModelForCausalLM

    layout = getattr(folded, "fold_layout", None)
    if layout is None:
        raise FoldGPTError("this model is not a folded model (no fold layout)")
    if layout.get("position_gates"):
        raise FoldGPTError("models with per-position gates cannot be exported densely (a gate on the whole "
                           "residual branch has no equivalent in the base architecture)")
    from ..adapters import get_adapter

    adapter = get_adapter(folded.config)
    config = folded.config.__class__.from_dict(folded.config.to_dict())
    dense = AutoModelForCausalLM.from_config(config, dtype=next(folded.parameters()).dtype)
    stack = adapter.layers_path + "."
    state = {}
    for pos, layer in enumerate(adapter.layers(folded)):
        prefix = f"{stack}{pos}."
        sub = dict(layer.state_dict())
        for name, mod in layer.named_modules():
            if isinstance(mod, SharedLinear):
                for k in list(sub):
                    if k.startswith(name + "."):
                        del sub[k]
                lin = _dense_linear(mod)
                sub[name + ".weight"] = lin.weight
                if lin.bias is not None:
                    sub[name + ".bias"] = lin.bias
        if hasattr(layer, "child_gate"):  # a child's branch gate, folded into the branches' last weights
            g, off = sub.pop("child_gate").float(), adapter.gate_key_offset
            for k in adapter.attn_gate_keys + adapter.mlp_gate_keys:
                if k in sub:
                    sub[k] = (g * (off + sub[k].float()) - off).to(sub[k].dtype)
        for branch, norms, out_proj in ((layout["attn_branch"], layout["attn_norms"], adapter.attn_out),
                                        (layout["mlp_branch"], layout["mlp_norms"], adapter.mlp_out)):
            if isinstance(layer.get_submodule(branch), ZeroBranch):  # the base branch, its output projection zero
                for k, v in adapter.layers(dense)[pos].state_dict().items():
                    if any(k.startswith(n + ".") for n in norms):
                        sub[k] = torch.ones_like(v) if k.endswith(".weight") else torch.zeros_like(v)
                    elif k.startswith(out_proj + "."):
                        sub[k] = torch.zeros_like(v)
                    elif k.startswith(branch + "."):
                        sub[k] = v
        state.update({prefix + k: v for k, v in sub.items()})
    for k, v in folded.state_dict().items():
        if not k.startswith(stack):
            state[k] = v
    missing, unexpected = dense.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"dense export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    dense.eval()
    return dense


def export_dense(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a plain base-architecture checkpoint of the folded model at `src` into `out`."""
    from ..fileio import atomic_dir
    from ..preflight import check_output
    from .folded import load_folded

    check_output(out, overwrite, "--dense", inputs=(src,))
    folded, tok = load_folded(src)
    dense = to_dense(folded)
    with atomic_dir(out, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    log.info("dense checkpoint (%d layers, %s) written to %s", dense.config.num_hidden_layers,
             dense.config.model_type, out)
    return Path(out)
