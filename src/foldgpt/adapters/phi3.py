"""Phi-3 (Phi-3-mini / medium, Phi-3.5-mini, Phi-4-mini): Llama's layout with fused projections.

Queries, keys and values come from one Linear (`qkv_proj`), the MLP's gate and up projections from another
(`gate_up_proj`); a folded child shares (and fits deltas on) the fused matrices whole.
"""

from .base import Adapter

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

ADAPTER = Adapter(
    model_types=("phi3",),
    linears=LINEARS,
    attn_linears=LINEARS[:2],
    mlp_linears=LINEARS[2:],
)
