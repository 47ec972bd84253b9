"""Gemma-3 text models: sliding-window and global attention layers alternate (5:1).

The residual branches end in post-norms, so sub-block gates scale the post-norm outputs (scaling the
input of an RMSNorm would be a no-op). Only layers of the same attention kind may share weights.
"""

from .base import Adapter

ADAPTER = Adapter(
    model_types=("gemma3_text",),
    attn_branch="self_attn",
    mlp_branch="mlp",
    attn_gate_point="post_attention_layernorm",
    mlp_gate_point="post_feedforward_layernorm",
    attn_gate_keys=("post_attention_layernorm.weight",),  # Gemma's RMSNorm scales by (1 + weight)
    mlp_gate_keys=("post_feedforward_layernorm.weight",),
    gate_key_offset=1.0,
    attn_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    needs_bos=True,
)
