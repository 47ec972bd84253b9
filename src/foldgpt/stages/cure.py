"""Stage 3: cure. Train only the small parameters (child norms, low-rank deltas, gates, optionally all
norms) with tail-layer distillation from the original model."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..config import CureConfig
from ..scale.placement import has_offloaded
from ..scale.precision import autocast, resolve, set_checkpointing
from ..scale.sharding import sharded_linears
from ..scale.teacher_cache import TeacherCache, topk_kl
from .analysis import capture_hidden
from .cure_state import CureCheckpoints
from .gates import kl_div
from .lora import MergeableLoRA, unique_linears
from .structure import SharedLinear

log = logging.getLogger(__name__)


def trainable_parameters(model: nn.Module, adapter: Adapter, train_all_norms: bool,
                         train_child_norms: bool = True) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the cure's parameter set and return it."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: dict[int, nn.Parameter] = {}
    for layer in adapter.layers(model):
        is_child = any(isinstance(m, SharedLinear) for m in layer.modules())
        for name, mod in layer.named_modules():
            if isinstance(mod, SharedLinear):  # the child's own small parameters: factors, alpha, own bias
                for name in ("lora_A", "lora_B", "alpha", "bias"):
                    if isinstance(getattr(mod, name, None), nn.Parameter):
                        chosen[id(getattr(mod, name))] = getattr(mod, name)
            elif name in adapter.norms(layer) and ((is_child and train_child_norms) or train_all_norms):
                for p in mod.parameters(recurse=False):
                    chosen[id(p)] = p
        for gate in ("fold_gate", "child_gate"):
            if hasattr(layer, gate):
                chosen[id(getattr(layer, gate))] = getattr(layer, gate)
    params = list(chosen.values())
    for p in params:
        p.requires_grad_(True)
    return params


def tail_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], m: int) -> torch.Tensor:
    """sum over the last m block outputs of ||h_S - h_T||^2 / ||h_T||^2 (aligned from the end)."""
    if m == 0:
        return student[-1].new_zeros(()).float()
    loss = student[-1].new_zeros(()).float()
    for hs, ht in zip(student[-m:], teacher[-m:]):
        loss = loss + ((hs.float() - ht.float()) ** 2).sum() / (ht.float() ** 2).sum().clamp_min(1e-8)
    return loss


def lr_at(step: int, cfg: CureConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _distill_loss(student: nn.Module, teacher: nn.Module | None, adapter: Adapter, ids: torch.Tensor,
                  cfg: CureConfig, cached: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha KL(p_T || p_S) + beta tail MSE (+ gamma CE) on one (micro-)batch. The teacher's signals come
    from running `teacher`, or from `cached` = TeacherCache.get(...) (top-k log-probs, ids, tail outputs)."""
    if cached is None:
        with autocast(ids.device, cfg.precision):
            with torch.no_grad(), capture_hidden(teacher, adapter) as t_hidden:
                t_logits = teacher(input_ids=ids, use_cache=False).logits
        t_tail = t_hidden[1:]
    else:
        t_logp, t_tokens, t_tail = cached
    s_hidden: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(
        lambda mod, a, k, out: s_hidden.append(out[0] if isinstance(out, tuple) else out), with_kwargs=True)
        for layer in adapter.layers(student)]
    try:
        with autocast(ids.device, cfg.precision):
            s_logits = student(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    kl = kl_div(t_logits, s_logits, cfg.tau) if cached is None else topk_kl(t_logp, t_tokens, s_logits, cfg.tau)
    tail = tail_mse(s_hidden, t_tail, min(cfg.tail_layers, len(s_hidden), len(t_tail)))
    loss = cfg.alpha_kl * kl + cfg.beta_tail * tail
    if cfg.gamma_ce > 0:
        ce = F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss = loss + cfg.gamma_ce * ce
    return loss, kl.detach(), tail.detach()


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(params: list[nn.Parameter], totals: dict[str, float]) -> None:
    """Sum gradients (each rank weighted its share by shard/global batch) and the logged losses."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    vals = torch.tensor([totals[k] for k in ("loss", "kl", "tail")], dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.SUM)
    totals.update(zip(("loss", "kl", "tail"), vals.tolist()))


def cure(student: nn.Module, teacher: nn.Module, adapter: Adapter, batches: torch.Tensor, cfg: CureConfig,
         seed: int = 0, checkpoints: CureCheckpoints | None = None) -> dict:
    """Distil `teacher` into the trainable small parameters of `student`. Returns a summary. `checkpoints`: where the
    cure's state is saved as it goes and continued from (cure_state.py; one process only)."""
    params = trainable_parameters(student, adapter, cfg.train_all_norms, cfg.train_child_norms)
    if cfg.steps == 0 or (not params and cfg.lora_rank == 0):
        return {"trainable_params": sum(p.numel() for p in params), "steps": 0, "history": []}
    shard = sharded_linears(student, adapter, student.device) if cfg.fsdp else nullcontext(({}, None))
    lora = None
    with shard as (originals, sharding):
        if cfg.lora_rank > 0:  # on the sharded copies under --fsdp; merged into the originals below
            lora = MergeableLoRA(unique_linears(student, adapter), cfg.lora_rank, seed=seed + 2)
            params = params + lora.parameters()
        n_train = sum(p.numel() for p in params)
        log.info("cure: %d trainable parameters (%s), %d steps of %d x %d tokens, %s", n_train,
                 f"norms, deltas and rank-{cfg.lora_rank} adapters merged afterwards" if lora else "norms and deltas",
                 cfg.steps, cfg.batch_size, batches.shape[1], resolve(cfg.precision, student.device))
        try:
            info = _cure_loop(student, teacher, adapter, batches, cfg, seed, params, n_train,
                              checkpoints if dist_info()[1] == 1 else None)
        finally:
            if lora is not None:
                lora.remove()
    if lora is not None:
        lora.linears = [originals.get(id(lin), lin) for lin in lora.linears]
        lora.merge_()
    if sharding is not None:
        info["fsdp"] = sharding
    return info


def _schedule(step: int, cfg: CureConfig, order: torch.Tensor, n: int, rank: int, world: int) -> list[int]:
    """The window indices this rank trains on at `step` (each rank takes its share of the global batch)."""
    take = [(step * cfg.batch_size + j) % n for j in range(cfg.batch_size)]
    return order[take].tolist()[rank::world]


def _cure_loop(student: nn.Module, teacher: nn.Module, adapter: Adapter, batches: torch.Tensor, cfg: CureConfig,
               seed: int, params: list[nn.Parameter], n_train: int, checkpoints: CureCheckpoints | None) -> dict:
    for p in teacher.parameters():
        p.requires_grad_(False)
    fitted = {id(p) for m in student.modules() if isinstance(m, SharedLinear) and m.mode != "shared"
              for p in (getattr(m, "lora_A", None), getattr(m, "lora_B", None)) if p is not None}
    groups = [{"params": [p for p in params if id(p) not in fitted], "scale": 1.0},
              {"params": [p for p in params if id(p) in fitted], "scale": cfg.child_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(batches), generator=g)
    student.train(False)  # no dropout: distillation is deterministic
    offloaded = has_offloaded(student)
    if offloaded and not cfg.grad_checkpointing:
        log.info("cure: activation checkpointing on, so offloaded weights stay on the device one layer at a time")
    checkpointing = (cfg.grad_checkpointing or offloaded) and set_checkpointing(student, True)
    micro = cfg.micro_batch or cfg.batch_size
    rank, world = dist_info()
    if world > 1:
        log.info("cure: data parallel over %d processes (rank %d)", world, rank)
    start, history = checkpoints.restore(params, opt) if checkpoints is not None else (0, [])
    cache = None
    try:
        if cfg.teacher_cache and start < cfg.steps:
            cache = TeacherCache(cfg.teacher_cache_dir)
            needed = [i for s in range(cfg.steps) for i in _schedule(s, cfg, order, len(batches), rank, world)]
            cache.fill(teacher, adapter, batches, needed, cfg.teacher_topk, cfg.tail_layers, cfg.tau,
                       cfg.precision, micro)
        bar = tqdm(range(start, cfg.steps), desc="Cure", leave=False, disable=rank != 0)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg) * group["scale"]
            opt.zero_grad()
            totals = {"loss": 0.0, "kl": 0.0, "tail": 0.0}
            mine = _schedule(step, cfg, order, len(batches), rank, world)
            for start in range(0, len(mine), micro):
                chunk = mine[start : start + micro]
                ids = batches[chunk].to(student.device)
                weight = len(ids) / cfg.batch_size
                cached = cache.get(chunk, student.device) if cache is not None else None
                loss, kl, tail = _distill_loss(student, teacher, adapter, ids, cfg, cached)
                (loss * weight).backward()
                for k, v in (("loss", loss), ("kl", kl), ("tail", tail)):
                    totals[k] += v.item() * weight
            if world > 1:
                _all_reduce_(params, totals)
            opt.step()
            history.append({"step": step, **totals})
            bar.set_postfix(kl=f"{totals['kl']:.3f}", tail=f"{totals['tail']:.3f}")
            if checkpoints is not None:
                checkpoints.step_done(step + 1, cfg.steps, params, opt, history)
    finally:
        if cache is not None:
            cache.close()
        if checkpointing:
            set_checkpointing(student, False)
        student.train(False)
    for p in params:
        p.requires_grad_(False)
    first = sum(h["kl"] for h in history[:5]) / min(5, len(history))
    last = sum(h["kl"] for h in history[-5:]) / min(5, len(history))
    log.info("cure: KL %.4f -> %.4f", first, last)
    return {"trainable_params": n_train, "steps": cfg.steps, "kl_first": first, "kl_last": last,
            "history": history}
