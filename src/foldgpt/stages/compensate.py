"""Training-free compensation of deleted layer spans, merged into an existing weight (no parameter added).

When the whole layers l+1..l+n (a contiguous *span*) are deleted, the hidden state that reaches layer l+n+1 is
h_l (the output of the last kept layer l) instead of the dense model's h_{l+n}. Layer l's output is
h_l = r_l + M_l, with r_l its post-attention residual and M_l its MLP branch output (the module at
`adapter.mlp_gate_point`, the thing added to the residual). A linear map T on the MLP output,
h_l' = r_l + M_l T, is merged exactly into the MLP's down projection (HF layout, out x in):
    M_l T = (x W^T + b) T = x (T^T W)^T + T^T b   ->   W <- T^T W,  b <- T^T b
so the compressed model keeps its architecture and its parameter count. This is exact only where the down
projection is the last operation before the residual add (Llama, Mistral, Qwen2/3). Gemma-3 passes the MLP
output through a post-feedforward RMSNorm first (a nonlinear map), so no general linear T merges into a weight
there; compensation refuses such architectures with a FoldGPTError (`check_compensable`).

Two ways to choose T (the plan's `compensation`):

- "replaceme" (ReplaceMe, Shopkhoev et al. 2025, arXiv 2505.02819, least-squares variant): with
  Y = h_{l+n} - r_l (the MLP output that would make the state at the cut equal to the dense model's),
  T = argmin_T sum_tokens ||M T - Y||^2 + ridge ||T||^2 = (M^T M + ridge I)^-1 M^T Y, the sums accumulated in
  float64 over the calibration tokens; ridge = RIDGE * trace(M^T M) / dim. The quantity it minimises is the
  squared hidden-state error at the cut, sum ||h_l' - h_{l+n}||^2 (reported before and after in the records).
- "linearpatch" (LinearPatch, arXiv 2505.24680), *restricted to the MLP branch of layer l*: the paper puts
  P = H diag(d) H^T / dim on the whole hidden state at the cut, with H a Hadamard matrix and
  d_c = mean|(H x_after)_c| / mean|(H x_before)_c| (a channel scale in the rotated basis, where outlier
  channels are spread out). A patch on the whole hidden state cannot be merged into a weight (the residual
  r_l passes through no weight of layer l), so here P acts on the MLP output only: x_before = M_l (what the
  branch gives) and x_after = Y (what the branch should give for the dense state at the cut), T = P. For a
  span that does nothing, Y = M and P = I. H is the Sylvester Hadamard matrix (entries +-1) when dim is a
  power of two; otherwise a random orthogonal matrix from a fixed seed (ROTATION_SEED), scaled by sqrt(dim) so
  that H H^T = dim I and the same formula holds. (The paper's optional fine-tuning of P is not done here; the
  cure plays that role.)

Several spans are compensated one after another, in layer order, on the *student*: the statistics of span k
come from the compressed model with the spans before it already deleted and compensated (and every other
change of the plan: sub-block deletions, folds, merges), and the target h_{l+n} from the dense teacher. So each
T corrects the error the student actually carries into its cut.

Spans are skipped (with a log line and a record) where no exact merge exists: a span that starts at layer 0
(no kept layer before it), a layer l whose MLP was deleted ("l.mlp" in the plan), or a layer l whose down
projection is shared with other positions (a folded parent or child: changing it would change them too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter
from ..errors import FoldGPTError
from ..plan import Plan

log = logging.getLogger(__name__)

MODES = ("replaceme", "linearpatch")
CALIB_WINDOWS = 32  # calibration windows the statistics use (32 x seq_len tokens: a few thousand at least)
RIDGE = 1e-4  # ridge of the least-squares solve, relative to the mean diagonal of M^T M
ROTATION_SEED = 0  # the random orthogonal rotation used where dim is not a power of two
BATCH = 4  # windows per forward pass


class _Stop(Exception):
    """Raised by a capture hook once everything needed from a forward pass is stored."""


# ---- architecture checks ------------------------------------------------------------------------------
def down_projection_path(adapter: Adapter) -> str:
    """The dotted path (relative to a layer) of the Linear whose output is the MLP residual branch."""
    return adapter.mlp_gate_keys[0].rpartition(".")[0] if adapter.mlp_gate_keys else ""


def check_compensable(adapter: Adapter, model_type: str, mode: str) -> None:
    """Raise a one-line FoldGPTError unless a linear map on the MLP output merges exactly into a weight."""
    if mode not in MODES:
        raise FoldGPTError(f"unknown compensation '{mode}'; use {' or '.join(MODES)}")
    key = adapter.mlp_gate_keys[0] if adapter.mlp_gate_keys else ""
    path = down_projection_path(adapter)
    if (adapter.mlp_gate_point != adapter.mlp_branch or not key.endswith(".weight") or adapter.gate_key_offset != 0
            or not path.startswith(adapter.mlp_branch + ".")):
        raise FoldGPTError(f"--compensate {mode} merges a linear map into the MLP down projection, which is exact "
                           f"only when the MLP output is added to the residual directly; {model_type} passes it "
                           f"through '{adapter.mlp_gate_point}' (a norm) first: use --compensate none for it")


# ---- spans --------------------------------------------------------------------------------------------
def removed_spans(plan: Plan) -> list[tuple[int, int]]:
    """Maximal runs of whole removed layers, as (first, last) original indices, in layer order."""
    out: list[tuple[int, int]] = []
    for i in sorted(plan.removed_layers()):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


# ---- statistics ---------------------------------------------------------------------------------------
@dataclass
class CutStats:
    """Sums over calibration tokens at one cut (float64): M^T M, M^T Y, sum ||Y||^2, token count and, for
    LinearPatch, sum |M H| and sum |Y H| per rotated channel."""

    mtm: torch.Tensor
    mty: torch.Tensor
    yy: float
    tokens: int
    abs_m: torch.Tensor | None = None
    abs_y: torch.Tensor | None = None

    def error(self, t: torch.Tensor | None = None) -> float:
        """Mean over tokens of ||M T - Y||^2 (T = None: the identity, i.e. plain deletion)."""
        if t is None:
            e = torch.trace(self.mtm) - 2 * torch.trace(self.mty) + self.yy
        else:
            t = t.to(self.mtm)
            e = (t * (self.mtm @ t)).sum() - 2 * (t * self.mty).sum() + self.yy
        return float(e) / max(self.tokens, 1)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _stat_device(t: torch.Tensor) -> torch.device:
    return t.device if t.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 needs cpu or cuda


@torch.no_grad()
def collect_cut_stats(student: nn.Module, dense: nn.Module, adapter: Adapter, position: int, last: int,
                      calib_ids: torch.Tensor, skip_first: bool = False, rotation: torch.Tensor | None = None,
                      batch_size: int = BATCH) -> CutStats:
    """Statistics of the cut after the student's layer at `position`, against the dense model's output of its
    layer `last` (the last layer of the deleted span).

    M: the output of the student layer's module at `adapter.mlp_gate_point`; Y: dense h_{last+1} - (student
    layer output - M). Forward passes stop at the hooked layers. `skip_first` drops each window's first token
    (a BOS attention sink, whose huge activations would dominate the sums); `rotation` (dim x dim) also sums
    |M H| and |Y H|."""
    s_layer = adapter.layers(student)[position]
    d_layer = adapter.layers(dense)[last]
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, stop: bool):
        def hook(module, args, output):
            store[name] = _first(output).detach()
            if stop:
                raise _Stop

        return hook

    handles = [s_layer.get_submodule(adapter.mlp_gate_point).register_forward_hook(keep("m", False)),
               s_layer.register_forward_hook(keep("h", True)),
               d_layer.register_forward_hook(keep("target", True))]
    stats: CutStats | None = None
    try:
        for s in range(0, len(calib_ids), batch_size):
            batch = calib_ids[s : s + batch_size]
            for model in (dense, student):
                try:
                    model(input_ids=batch.to(adapter.embed_tokens(model).weight.device), use_cache=False)
                except _Stop:
                    pass
            m, h = store.pop("m"), store.pop("h")
            dev = _stat_device(m)
            m, h, target = m.to(dev).float(), h.to(dev).float(), store.pop("target").to(dev).float()
            y = target - (h - m)
            if skip_first:
                m, y = m[:, 1:], y[:, 1:]
            m, y = m.reshape(-1, m.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            if stats is None:
                dim = m.shape[-1]
                zeros = torch.zeros(dim, dim, dtype=torch.float64, device=dev)
                stats = CutStats(zeros, zeros.clone(), 0.0, 0)
                if rotation is not None:
                    stats.abs_m = torch.zeros(dim, dtype=torch.float64, device=dev)
                    stats.abs_y = torch.zeros(dim, dtype=torch.float64, device=dev)
            stats.mtm += m.T @ m
            stats.mty += m.T @ y
            stats.yy += float((y * y).sum())
            stats.tokens += m.shape[0]
            if rotation is not None:
                rot = rotation.to(device=dev, dtype=torch.float64)
                stats.abs_m += (m @ rot).abs().sum(0)
                stats.abs_y += (y @ rot).abs().sum(0)
    finally:
        for handle in handles:
            handle.remove()
    if stats is None:
        raise FoldGPTError("compensation needs at least one calibration window")
    return stats


# ---- solving ------------------------------------------------------------------------------------------
def solve_least_squares(mtm: torch.Tensor, mty: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """ReplaceMe's T = (M^T M + lambda I)^-1 M^T Y, lambda = ridge * trace(M^T M) / dim (float64)."""
    a, b = mtm.double(), mty.double()
    dim = a.shape[0]
    lam = ridge * float(torch.trace(a)) / dim
    if not lam > 0:  # M is zero on every token (a dead MLP): nothing to scale
        return torch.eye(dim, dtype=torch.float64, device=a.device)
    return torch.linalg.solve(a + lam * torch.eye(dim, dtype=a.dtype, device=a.device), b)


def hadamard(dim: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """A dim x dim matrix H with H H^T = dim I (float64): Sylvester's Hadamard matrix (+-1 entries) when dim is
    a power of two, else sqrt(dim) times a random orthogonal matrix drawn from `seed` (QR of a Gaussian)."""
    if dim > 0 and dim & (dim - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a unique Q (Haar distributed)
    return q * dim**0.5


def solve_linearpatch(abs_m: torch.Tensor, abs_y: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """LinearPatch's P = H diag(d) H^T / dim with d_c = sum|(Y H)_c| / sum|(M H)_c| (1 where M H is 0)."""
    abs_m, abs_y = abs_m.double(), abs_y.double()
    d = torch.where(abs_m > 0, abs_y / abs_m.clamp_min(1e-300), torch.ones_like(abs_m))
    h = rotation.to(device=abs_m.device, dtype=torch.float64)
    return (h * d) @ h.T / h.shape[0]


# ---- merging ------------------------------------------------------------------------------------------
def merge_into_down_(layer: nn.Module, adapter: Adapter, t: torch.Tensor) -> None:
    """Make the layer's MLP output x W^T + b become (x W^T + b) T: W <- T^T W, b <- T^T b (computed in float64).
    The results are installed as NEW nn.Parameter objects: the old tensors are shared with the dense teacher
    (clone_sharing_weights) and are never written."""
    down = layer.get_submodule(down_projection_path(adapter))
    if not isinstance(down, nn.Linear):
        raise FoldGPTError(f"cannot merge a compensation into {down_projection_path(adapter)}: it is a "
                           f"{type(down).__name__}, not a plain Linear")
    with torch.no_grad():
        tt = t.to(device=down.weight.device, dtype=torch.float64).T
        w = down.weight
        down.weight = nn.Parameter((tt @ w.double()).to(w.dtype), requires_grad=w.requires_grad)
        if down.bias is not None:
            b = down.bias
            down.bias = nn.Parameter((tt @ b.double()).to(b.dtype), requires_grad=b.requires_grad)


def _skip_reason(plan: Plan, layer: int, student_layer: nn.Module, adapter: Adapter,
                 student: nn.Module) -> str | None:
    """Why no exact merge exists for the span after `layer` (None: it does)."""
    if "mlp" in plan.removed_sublayers().get(layer, set()):
        return f"layer {layer} lost its MLP"
    down = student_layer.get_submodule(down_projection_path(adapter))
    if not isinstance(down, nn.Linear):
        return f"layer {layer} is a folded child (its down projection is its parent's)"
    w = down.weight
    for other in adapter.layers(student):
        if other is not student_layer and any(p is w for p in other.parameters()):
            return f"layer {layer}'s down projection is shared with a folded child"
    return None


def apply_compensation_(student: nn.Module, dense: nn.Module, plan: Plan, adapter: Adapter,
                        calib_ids: torch.Tensor, skip_first: bool | None = None,
                        batch_size: int = BATCH) -> list[dict]:
    """Apply `plan.compensation` to `student` (built from `dense` by apply_plan_), in place: for every span of
    deleted whole layers, in layer order, measure the cut on `calib_ids` and merge T into the last kept layer's
    down projection. `skip_first` (None: when every window starts with the model's BOS id) leaves each window's
    first token out of the statistics. Returns one record per span (the cut error before and after, or why it
    was skipped)."""
    mode = plan.compensation
    if not mode:
        return []
    check_compensable(adapter, plan.model_type, mode)
    if skip_first is None:
        bos = getattr(dense.config, "bos_token_id", None)
        skip_first = bos is not None and bool((calib_ids[:, 0] == bos).all())
    kept = plan.kept_layers()
    records = []
    for first, last in removed_spans(plan):
        layer = first - 1
        rec: dict = {"span": [first, last], "layer": layer, "mode": mode}
        student_layer = adapter.layers(student)[kept.index(layer)] if layer >= 0 else None
        reason = ("the span starts at layer 0: no kept layer before it" if student_layer is None
                  else _skip_reason(plan, layer, student_layer, adapter, student))
        if reason is not None:
            log.info("compensation (%s): span %d..%d skipped: %s", mode, first, last, reason)
            records.append({**rec, "skipped": reason})
            continue
        dim = student_layer.get_submodule(down_projection_path(adapter)).out_features
        rotation = hadamard(dim) if mode == "linearpatch" else None
        stats = collect_cut_stats(student, dense, adapter, kept.index(layer), last, calib_ids, skip_first,
                                  rotation, batch_size)
        t = (solve_least_squares(stats.mtm, stats.mty) if mode == "replaceme"
             else solve_linearpatch(stats.abs_m, stats.abs_y, rotation))
        before, after = stats.error(), stats.error(t)
        merge_into_down_(student_layer, adapter, t)
        log.info("compensation (%s): span %d..%d merged into layer %d's down projection; cut MSE %.4g -> %.4g "
                 "(%d tokens)", mode, first, last, layer, before, after, stats.tokens)
        records.append({**rec, "tokens": stats.tokens, "cut_mse_before": before, "cut_mse_after": after})
    return records
