"""The architecture contract: everything the algorithms need to know about a model family."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

# Linear sub-modules of a decoder layer, as dotted paths relative to the layer.
LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Adapter:
    """Architecture glue for one family of decoder-only models.

    The algorithms only talk to a model through these attributes and methods, so adding a family
    means adding one small module that instantiates this class (or a subclass).
    """

    model_types: tuple[str, ...]
    linears: tuple[str, ...] = LLAMA_LINEARS
    attn_linears: tuple[str, ...] = LLAMA_LINEARS[:4]
    mlp_linears: tuple[str, ...] = LLAMA_LINEARS[4:]
    # modules whose output is the attention / MLP residual branch (what a sub-block gate scales)
    attn_branch: str = "self_attn"
    mlp_branch: str = "mlp"
    # modules whose output a sub-block gate scales (the last op of each residual branch)
    attn_gate_point: str = "self_attn"
    mlp_gate_point: str = "mlp"
    # state-dict keys (relative to the layer) whose values a branch gate g can be folded into for a dense
    # export: value -> g * (offset + value) - offset (the gate point computes (offset + weight) * ...)
    attn_gate_keys: tuple[str, ...] = ("self_attn.o_proj.weight", "self_attn.o_proj.bias")
    mlp_gate_keys: tuple[str, ...] = ("mlp.down_proj.weight", "mlp.down_proj.bias")
    gate_key_offset: float = 0.0
    # norms that belong to the attention / MLP sub-block (removed together with it)
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # the model expects BOS at the start of every sequence
    needs_bos: bool = False

    # ---- structure -------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def set_layers(self, model: nn.Module, layers: list[nn.Module], kinds: list[str] | None) -> None:
        """Install `layers` as the model's decoder stack and update config and layer indices."""
        model.model.layers = nn.ModuleList(layers)
        model.config.num_hidden_layers = len(layers)
        if kinds is not None and getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = list(kinds)
        for i, layer in enumerate(layers):
            self.set_layer_index(layer, i)

    def set_layer_index(self, layer: nn.Module, idx: int) -> None:
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = idx
        attn = layer.get_submodule(self.attn_branch)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = idx

    def layer_kinds(self, config) -> list[str]:
        """The attention kind of every layer; only layers of the same kind may share weights."""
        types = getattr(config, "layer_types", None)
        if types is None:
            return ["full_attention"] * config.num_hidden_layers
        return list(types)[: config.num_hidden_layers]

    def layer_class(self, model: nn.Module) -> type:
        module = sys.modules[type(model).__module__]
        names = [n for n in dir(module) if n.endswith("DecoderLayer")]
        if len(names) != 1:
            raise RuntimeError(f"cannot identify the decoder layer class in {module.__name__}: {names}")
        return getattr(module, names[0])

    def norms(self, layer: nn.Module) -> list[str]:
        """Names of the layer's own normalisation modules (kept per position when folded)."""
        return [n for n, m in layer.named_modules() if n and "norm" in type(m).__name__.lower()]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens
