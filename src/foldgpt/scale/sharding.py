"""FSDP for the cure (`--fsdp`, under `torchrun`): each unique frozen Linear of the student, i.e. each matrix a
parent and its children share, is wrapped once with PyTorch's FSDP2 `fully_shard`, so a rank holds 1/world of it
and all-gathers it only while a layer that uses it runs (the parent, or a child borrowing it: the same module).
The per-position parts (norms, children's deltas and gates, the cure's adapters) stay replicated and are
all-reduced as in the data-parallel cure. Sharding the per-position layers instead would gather a shared
matrix once per position and could not keep it shared.

The shards are cut from a copy on the training device, and the student's original modules (which still share
their tensors with the teacher) go back in after the cure, so the adapters merge into plain tensors and the
result saves as usual. Device memory drops by the sharded fraction when the full weights live elsewhere: the
dense teacher kept on the CPU (`--device-map offload`) with its signals precomputed (`--teacher-cache`)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import Adapter
from ..errors import FoldGPTError
from ..stages.lora import unique_linears

log = logging.getLogger(__name__)


def _replace_modules_(root: nn.Module, mapping: dict[int, nn.Module]) -> None:
    """Point every reference under `root` to a module in `mapping` (by id) at its replacement."""
    for mod in list(root.modules()):
        for name, child in list(mod.named_children()):
            if id(child) in mapping:
                setattr(mod, name, mapping[id(child)])


@contextmanager
def sharded_linears(student: nn.Module, adapter: Adapter, device: torch.device | str):
    """Within the block, the student's unique Linears are FSDP-sharded copies. Yields ({id(copy): original},
    sharding stats)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise FoldGPTError("--fsdp shards the cure's frozen weights across processes: launch with "
                           "torchrun --nproc-per-node N (N >= 2)")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    originals = unique_linears(student, adapter)
    to_copy: dict[int, nn.Module] = {}
    back: dict[int, nn.Module] = {}
    for lin in originals:
        if any(p.requires_grad for p in lin.parameters()):
            raise FoldGPTError("--fsdp shards frozen matrices only; this student trains a shared Linear")
        copy = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        copy.weight = nn.Parameter(lin.weight.detach().to(device), requires_grad=False)
        if lin.bias is not None:
            copy.bias = nn.Parameter(lin.bias.detach().to(device), requires_grad=False)
        fully_shard(copy, mesh=mesh)
        to_copy[id(lin)] = copy
        back[id(copy)] = lin
    _replace_modules_(student, to_copy)
    full = sum(p.numel() for lin in originals for p in lin.parameters())
    local = sum(p.to_local().numel() for c in to_copy.values() for p in c.parameters())
    log.info("cure: %d shared matrices sharded over %d processes (%d of %d parameters on this one)",
             len(originals), dist.get_world_size(), local, full)
    stats = {"world": dist.get_world_size(), "matrices": len(originals), "params_full": full, "params_local": local}
    try:
        yield back, stats
    finally:
        _replace_modules_(student, back)
