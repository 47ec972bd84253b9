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

from ..adapters import Adapter
from ..config import GateConfig
from ..scale.placement import has_offloaded
from ..scale.precision import set_checkpointing

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
            gated = h + self.values[idx].to(out.device, out.dtype) * (out - h)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        return hook

    def _branch_hook(self, idx: int):
        def hook(module, args, output):
            g = self.values[idx]
            if isinstance(output, tuple):
                return (output[0] * g.to(output[0].device, output[0].dtype), *output[1:])
            return output * g.to(output.device, output.dtype)

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
    gates: list[float]  # final gate of every unit (a removed unit: its gate when it was removed)
    removed: list[int]  # units removed, in the order the rounds removed them
    history: list[dict]


def _accumulate_kl(model: nn.Module, gates: GateSet, ids: torch.Tensor, micro: int, gate_values, n_units: int) -> float:
    """KL(ungated || gated) over `ids` in micro-batches; each one's share of the gradient is accumulated
    (backward) into the gate leaf. Returns the batch KL."""
    total = 0.0
    for start in range(0, len(ids), micro):
        chunk = ids[start : start + micro]
        with torch.no_grad(), gates.set(torch.ones(n_units)):  # teacher: the ungated dense model
            t_logits = model(input_ids=chunk, use_cache=False).logits
        with gates.set(gate_values()):
            s_logits = model(input_ids=chunk, use_cache=False).logits
        kl = kl_div(t_logits, s_logits) * (len(chunk) / len(ids))
        del t_logits, s_logits
        kl.backward()
        total += kl.item()
    return total


def train_gates(model: nn.Module, adapter: Adapter, batches: torch.Tensor, to_remove: float,
                cfg: GateConfig, seed: int = 0, protected: set[int] | None = None, unit: str = "layer") -> GateResult:
    """Learn gates on every unit's residual branch (`unit`: "layer" or "sublayer", attention and MLP apart;
    weights frozen) and remove the lowest-gated units until units worth `to_remove` (in cost units: parameters, or
    FLOPs for sub-blocks) are gone.

    Objective: KL(ungated model || gated model) + lambda_pol * R_pol(g), with the budget
    C(g) = sum(g c)/sum(c) held by projection. The removal happens over `cfg.rounds` rounds: each round
    re-opens all surviving gates at 1, tightens the budget by that round's share over the first
    `cfg.anneal` of its steps, and then deletes the lowest gates. Gates are judged jointly, with the
    units removed by earlier rounds already gone (the coupling one-shot scores miss), and each round's
    soft state stays close to the binary model it decides about.

    Steps are scale-free: the KL gradient is scaled to unit max-norm before the step (its magnitude
    varies by orders of magnitude between models; Adam's per-gate normalisation would erase the
    *relative* sizes that carry the ranking). `cfg.budget == "penalty"` uses Adam on
    KL + lambda_pol * R_pol + lambda_budget * (C(g) - target)^2 instead, as METHOD.md writes it.
    """
    torch.manual_seed(seed)
    names = unit_names(len(adapter.layers(model)), unit)
    costs = unit_costs(model, adapter, unit, "flops" if unit == "sublayer" else "params", batches.shape[1])
    param_costs = unit_costs(model, adapter, unit, "params", batches.shape[1])
    protected = protected or set()
    for p in model.parameters():
        p.requires_grad_(False)
    gates = GateSet(model, adapter, unit)
    g = torch.Generator().manual_seed(seed)
    n_units = len(names)
    alive = torch.ones(n_units, dtype=torch.bool)
    final = torch.ones(n_units)
    removed: list[int] = []
    history: list[dict] = []
    saved = 0.0
    rounds = max(1, cfg.rounds)
    steps_per_round = max(1, cfg.steps // rounds)
    micro = cfg.micro_batch or cfg.batch_size
    checkpointing = (cfg.grad_checkpointing or has_offloaded(model)) and set_checkpointing(model, True)
    try:
        bar = tqdm(total=steps_per_round * rounds, desc="Gate training", leave=False)
        for r in range(rounds):
            if saved >= to_remove - 1e-6:
                break
            goal = to_remove * (r + 1) / rounds - saved  # cost to remove in this round
            frac_off = float(goal / (param_costs[alive].sum()))
            theta = alive.float().clone()
            param = nn.Parameter(theta.clone())
            opt = torch.optim.Adam([param], lr=cfg.lr) if cfg.budget == "penalty" else None
            velocity = torch.zeros(n_units)
            c_alive = costs * alive
            for step in range(steps_per_round):
                ids = batches[torch.randint(0, len(batches), (cfg.batch_size,), generator=g)].to(model.device)
                ramp = min(1.0, (step + 1) / max(1, int(cfg.anneal * steps_per_round)))
                keep = 1.0 - frac_off * ramp
                if opt is not None:
                    opt.zero_grad()
                    gv_leaf = None
                    gate_values = lambda p=param, a=alive: p.clamp(0.0, 1.0) * a  # noqa: E731  (a fresh graph per use)
                else:
                    gv_leaf = theta.clone().requires_grad_(True)
                    gate_values = lambda v=gv_leaf: v  # noqa: E731
                kl = _accumulate_kl(model, gates, ids, micro, gate_values, n_units)  # grads into param/gv_leaf
                gv = gate_values()
                pol = polarization(gv[alive], cfg.pol_t)
                bud = budget_penalty(gv[alive], costs[alive], keep)
                if opt is not None:
                    (cfg.lambda_pol * ramp * pol + cfg.lambda_budget * bud).backward()
                    opt.step()
                    with torch.no_grad():
                        param.clamp_(-0.05, 1.05)
                else:
                    g_kl = gv_leaf.grad * alive
                    g_pol = torch.autograd.grad(pol, gv)[0] * alive
                    direction = _unit_max(g_kl) + cfg.lambda_pol * ramp * _unit_max(g_pol)
                    velocity = cfg.momentum * velocity + direction
                    stepped = (theta - cfg.lr * velocity)
                    theta = torch.zeros(n_units)
                    theta[alive] = project_budget(stepped[alive], c_alive[alive], keep)
                history.append({"round": r, "step": step, "kl": kl, "pol": pol.item(),
                                "budget": bud.item(), "keep_target": keep})
                bar.update(1)
                bar.set_postfix(round=r + 1, kl=f"{kl:.3f}")
            values = (param.detach().clamp(0.0, 1.0) * alive) if opt is not None else theta
            order = [i for i in sorted(range(n_units), key=lambda i: values[i].item())
                     if alive[i] and int(names[i].split(".")[0]) not in protected]
            round_saved = 0.0
            for i in order:
                if round_saved >= goal - 1e-6:
                    break
                alive[i] = False
                final[i] = values[i]
                removed.append(i)
                round_saved += float(param_costs[i])
            saved += round_saved
            for i in range(n_units):
                if alive[i]:
                    final[i] = values[i]
            log.info("gate round %d/%d: removed %s", r + 1, rounds, [names[i] for i in removed])
        bar.close()
    finally:
        gates.remove()
        if checkpointing:
            set_checkpointing(model, False)
    log.info("gates: %s", " ".join(f"{n}:{v:.2f}" for n, v in zip(names, final.tolist())))
    return GateResult(names, final.tolist(), removed, history)
