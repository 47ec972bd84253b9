"""Stage 1: gated block removal. Scalar gates on every unit's residual branch, trained jointly with
all weights frozen, so each unit is judged with the others present (the coupling one-shot scores miss).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .config import GateConfig

log = logging.getLogger(__name__)


def unit_names(num_layers: int, unit: str) -> list[str]:
    if unit == "layer":
        return [str(i) for i in range(num_layers)]
    return [f"{i}.{p}" for i in range(num_layers) for p in ("attn", "mlp")]


def unit_costs(model: nn.Module, adapter: Adapter, unit: str, metric: str, seq_len: int) -> torch.Tensor:
    """Cost of every unit: its parameters, or its forward FLOPs per token (attention includes scores)."""
    costs = []
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    attn_extra = 4 * n_heads * head_dim * seq_len if metric == "flops" else 0
    for layer in adapter.layers(model):
        if unit == "layer":
            n = sum(p.numel() for p in layer.parameters())
            costs.append(n * (2 if metric == "flops" else 1) + attn_extra)
        else:
            a = sum(layer.get_submodule(p).weight.numel() for p in adapter.attn_linears)
            m = sum(layer.get_submodule(p).weight.numel() for p in adapter.mlp_linears)
            k = 2 if metric == "flops" else 1
            costs += [a * k + attn_extra, m * k]
    return torch.tensor(costs, dtype=torch.float64)


def polarization(g: torch.Tensor, t: float) -> torch.Tensor:
    """R(g) = t * sum|g| - sum|g - mean(g)| (Zhuang et al. 2020), normalised by the number of gates."""
    return (t * g.abs().sum() - (g - g.mean()).abs().sum()) / g.numel()


def budget_penalty(g: torch.Tensor, costs: torch.Tensor, keep: float) -> torch.Tensor:
    """Squared distance of the cost-weighted kept fraction C(g) from the budget. Two-sided: the gate mass
    is pinned at the budget, so gates compete for it (a one-sided penalty lets weak KL signals and the
    polarizer drive every gate to zero at once, which ranks nothing)."""
    c = costs.to(g.dtype)
    frac = (g * c).sum() / c.sum()
    return (frac - keep) ** 2


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(p_T || p_S) per token, averaged over tokens."""
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * tau * tau


class GateSet:
    """Forward hooks that scale each unit's residual branch by a shared gate vector."""

    def __init__(self, model: nn.Module, adapter: Adapter, unit: str):
        self.values = torch.ones(len(unit_names(len(adapter.layers(model)), unit)))
        self.handles = []
        for i, layer in enumerate(adapter.layers(model)):
            if unit == "layer":
                self.handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
            else:
                for j, point in enumerate((adapter.attn_gate_point, adapter.mlp_gate_point)):
                    mod = layer.get_submodule(point)
                    self.handles.append(mod.register_forward_hook(self._branch_hook(2 * i + j)))

    def _layer_hook(self, idx: int):
        def hook(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            gated = h + self.values[idx].to(out.dtype) * (out - h)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        return hook

    def _branch_hook(self, idx: int):
        def hook(module, args, output):
            g = self.values[idx]
            if isinstance(output, tuple):
                return (output[0] * g.to(output[0].dtype), *output[1:])
            return output * g.to(output.dtype)

        return hook

    @contextmanager
    def set(self, values: torch.Tensor):
        old, self.values = self.values, values
        try:
            yield
        finally:
            self.values = old

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def project_budget(theta: torch.Tensor, costs: torch.Tensor, keep: float, iters: int = 50) -> torch.Tensor:
    """Project gates onto {g in [0,1]^U : sum(c g) / sum(c) = keep} by a common shift (bisection)."""
    c = costs.to(theta.dtype)
    lo, hi = theta.min().item() - 1.0, theta.max().item()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        frac = ((theta - mid).clamp(0.0, 1.0) * c).sum() / c.sum()
        if frac > keep:
            lo = mid
        else:
            hi = mid
    return (theta - 0.5 * (lo + hi)).clamp(0.0, 1.0)


def _unit_max(v: torch.Tensor) -> torch.Tensor:
    return v / v.abs().max().clamp_min(1e-12)


@dataclass
class GateResult:
    names: list[str]
    gates: list[float]
    history: list[dict]


def train_gates(model: nn.Module, adapter: Adapter, batches: torch.Tensor, removal_rate: float,
                cfg: GateConfig, seed: int = 0) -> GateResult:
    """Learn one gate per unit (weights frozen): KL to the ungated model + polarization, under a budget.

    The budget C(g) = sum(g c)/sum(c) is tightened from 1 to 1 - removal_rate over the first
    `cfg.anneal` of the steps. Two ways to hold it (cfg.budget):
    - "project" (default): after every step the gates are projected onto the budget exactly, and the
      step direction is the KL gradient scaled to unit max-norm plus the polarization gradient, likewise
      scaled (so the ranking depends on the *relative* size of the KL gradients, not on their scale,
      which varies by orders of magnitude between models; Adam's per-gate normalisation would erase it);
    - "penalty": Adam on KL + lambda_pol * R_pol + lambda_budget * (C(g) - target)^2, as METHOD.md writes it.
    """
    torch.manual_seed(seed)
    names = unit_names(len(adapter.layers(model)), cfg.unit)
    costs = unit_costs(model, adapter, cfg.unit, "flops" if cfg.unit == "sublayer" else "params",
                       batches.shape[1])
    for p in model.parameters():
        p.requires_grad_(False)
    theta = torch.ones(len(names))
    velocity = torch.zeros(len(names))
    param = nn.Parameter(theta.clone())
    opt = torch.optim.Adam([param], lr=cfg.lr) if cfg.budget == "penalty" else None
    gates = GateSet(model, adapter, cfg.unit)
    g = torch.Generator().manual_seed(seed)
    history = []
    try:
        bar = tqdm(range(cfg.steps), desc="Gate training", leave=False)
        for step in bar:
            idx = torch.randint(0, len(batches), (cfg.batch_size,), generator=g)
            ids = batches[idx]
            with torch.no_grad(), gates.set(torch.ones(len(names))):
                t_logits = model(input_ids=ids, use_cache=False).logits
            frac = min(1.0, (step + 1) / max(1, int(cfg.anneal * cfg.steps)))
            keep = 1.0 - removal_rate * frac
            gv = param.clamp(0.0, 1.0) if opt is not None else theta.clone().requires_grad_(True)
            with gates.set(gv):
                s_logits = model(input_ids=ids, use_cache=False).logits
            kl = kl_div(t_logits, s_logits)
            pol = polarization(gv, cfg.pol_t)
            bud = budget_penalty(gv, costs, keep)
            if opt is not None:
                loss = kl + cfg.lambda_pol * frac * pol + cfg.lambda_budget * bud
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    param.clamp_(-0.05, 1.05)
            else:
                g_kl = torch.autograd.grad(kl, gv)[0]
                g_pol = torch.autograd.grad(pol, gv)[0]
                direction = _unit_max(g_kl) + cfg.lambda_pol * frac * _unit_max(g_pol)
                velocity = cfg.momentum * velocity + direction
                theta = project_budget(theta - cfg.lr * velocity, costs, keep)
            history.append({"step": step, "kl": kl.item(), "pol": pol.item(), "budget": bud.item(),
                            "keep_target": keep})
            bar.set_postfix(kl=f"{kl.item():.3f}", low=f"{gv.min().item():.2f}")
    finally:
        gates.remove()
    final = (param.detach().clamp(0.0, 1.0) if opt is not None else theta).tolist()
    log.info("gates: %s", " ".join(f"{n}:{v:.2f}" for n, v in zip(names, final)))
    return GateResult(names, final, history)
