"""Training-free span replacement peers: ReplaceMe (arXiv 2505.02819) and LinearPatch (arXiv 2505.24680).

Both delete one contiguous span of n = budget.n_remove layers, chosen as in Gromov et al. (the span whose input
h_s and output h_{s+n} have the smallest angular distance arccos(cos)/pi on the calibration analysis, the
"angular" peer's criterion, through analysis.angular_distance), and then compensate the cut with a linear map
merged into the last kept layer's MLP down projection (compensate.py): a least-squares map (ReplaceMe) or a
channel scale in a Hadamard basis restricted to that MLP output (LinearPatch). No parameter is added, so they
meet the same unique-parameter budget as the other removal peers.

A span needs a kept layer before it to merge into, so these methods never delete layer 0 (the angular peer may).
Any other method takes the same compensation with --compensate.
"""

from __future__ import annotations

import logging

from ..errors import FoldGPTError
from ..plan import Plan
from ..stages.analysis import angular_distance
from ..stages.compensate import check_compensable
from . import Context, Method, register

log = logging.getLogger(__name__)


def angular_span(ctx: Context, n: int) -> tuple[int, dict[str, float]]:
    """The first layer of the n-layer span with the smallest angular distance between its input and output
    hidden states, never starting at layer 0 nor touching a protected layer; and every candidate's distance."""
    dist = angular_distance(ctx.similarity)
    prot = ctx.protected()
    spans = [(dist[s, s + n].item(), s) for s in range(1, ctx.num_layers - n + 1)
             if not prot.intersection(range(s, s + n))]
    if not spans:
        raise FoldGPTError(f"no span of {n} layers after layer 0 avoids the protected layers; raise --target-params")
    d, start = min(spans)
    log.info("span %d..%d (angular distance %.4f)", start, start + n - 1, d)
    return start, {str(s): v for v, s in spans}


def _run(ctx: Context, mode: str) -> Plan:
    check_compensable(ctx.adapter, ctx.model.config.model_type, mode)
    n = ctx.budget.n_remove
    if n == 0:
        return ctx.new_plan([], [], method=mode, compensation=mode)
    start, scores = angular_span(ctx, n)
    return ctx.new_plan([str(i) for i in range(start, start + n)], [], method=mode, compensation=mode, scores=scores)


def run_replaceme(ctx: Context) -> Plan:
    return _run(ctx, "replaceme")


def run_linearpatch(ctx: Context) -> Plan:
    return _run(ctx, "linearpatch")


register(Method("replaceme", run_replaceme, cures_by_default=False, folds=False, compensation="replaceme",
                description="ReplaceMe: the angular span, replaced by a least-squares linear map merged into the "
                            "last kept layer's MLP down projection"))
register(Method("linearpatch", run_linearpatch, cures_by_default=False, folds=False, compensation="linearpatch",
                description="LinearPatch: the angular span, patched by a Hadamard-basis channel scale of the last "
                            "kept layer's MLP output (merged into its down projection)"))
