"""GPT-NeoX (Pythia, GPT-NeoX-20B): the body is `gpt_neox`, LayerNorms and Linears carry biases, and by default
the attention and the MLP read the same input and are added to the residual together (parallel residual).

Each branch is still one residual term ending in its output Linear (`attention.dense`, `mlp.dense_4h_to_h`), so
sub-block deletion, branch gates and their dense export (gate folded into the weight and bias) work as for Llama.
The body hands its KV cache to a layer as `layer_past`.
"""

from .base import Adapter

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

ADAPTER = Adapter(
    model_types=("gpt_neox",),
    body="gpt_neox",
    final_norm_attr="final_layer_norm",
    embed_attr="embed_in",
    linears=LINEARS,
    attn_linears=LINEARS[:2],
    mlp_linears=LINEARS[2:],
    attn_branch="attention",
    attn_out="attention.dense",
    mlp_out="mlp.dense_4h_to_h",
    attn_gate_point="attention",
    attn_gate_keys=("attention.dense.weight", "attention.dense.bias"),
    mlp_gate_keys=("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"),
    cache_kwargs=("cache", "past_key_values", "layer_past"),
)
