"""The architecture contract: everything the algorithms need to know about a model family."""

from __future__ import annotations

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

    The algorithms only talk to a model through these attributes and methods (never through `model.model`),
    so adding a family means adding one small module that instantiates this class (or a subclass).
    """

    model_types: tuple[str, ...]
    # the decoder body inside the causal LM (its base model) and, inside the body, the layer stack, the final
    # norm, the token embeddings and the rotary tables
    body: str = "model"
    layers_attr: str = "layers"
    final_norm_attr: str = "norm"
    embed_attr: str = "embed_tokens"
    rotary_attr: str = "rotary_emb"
    linears: tuple[str, ...] = LLAMA_LINEARS
    attn_linears: tuple[str, ...] = LLAMA_LINEARS[:4]
    mlp_linears: tuple[str, ...] = LLAMA_LINEARS[4:]
    # modules whose output is the attention / MLP residual branch (what a sub-block gate scales)
    attn_branch: str = "self_attn"
    mlp_branch: str = "mlp"
    # the last Linear of each branch (a deleted branch exports as this projection zeroed)
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
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
    # keyword arguments through which the body hands its KV cache to a layer
    cache_kwargs: tuple[str, ...] = ("cache", "past_key_values")
    # the model expects BOS at the start of every sequence
    needs_bos: bool = False

    # ---- structure -------------------------------------------------------------------------
    @property
    def layers_path(self) -> str:
        """Dotted path of the layer stack from the causal LM (the prefix of the layers' state-dict keys)."""
        return f"{self.body}.{self.layers_attr}"

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder body (embeddings, layers, final norm): called like the LM, returns the last hidden state."""
        return getattr(model, self.body)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder(model), self.layers_attr)

    def set_layers(self, model: nn.Module, layers: list[nn.Module], kinds: list[str] | None) -> None:
        """Install `layers` as the model's decoder stack and update config and layer indices."""
        setattr(self.decoder(model), self.layers_attr, nn.ModuleList(layers))
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

    def norms(self, layer: nn.Module) -> list[str]:
        """Names of the layer's own normalisation modules (kept per position when folded)."""
        return [n for n, m in layer.named_modules() if n and "norm" in type(m).__name__.lower()]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.final_norm_attr)

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.embed_attr)

    def rotary_emb(self, model: nn.Module) -> nn.Module | None:
        """The body's shared rotary tables (None where the family has none)."""
        return getattr(self.decoder(model), self.rotary_attr, None)
