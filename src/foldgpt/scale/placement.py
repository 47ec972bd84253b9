"""Where each decoder layer lives when the model does not fit on one device (`--device-map auto|offload`).

A placement gives every decoder layer one of two homes:

- *resident* on a device (one of several GPUs): its weights move there once, and a forward pre-hook moves the
  layer's inputs (hidden states, masks, rotary embeddings) there with accelerate's `send_to_device`, so
  consecutive layers may sit on different GPUs (a naive pipeline);
- *offloaded*: its weights stay in CPU memory; while the layer runs, every parameter under it is replaced by a
  copy on the execution (main) device and restored afterwards. A trainable parameter's copy is differentiable,
  so its gradient reaches the CPU parameter. With activation checkpointing the copies live only while their
  layer runs (forward, and the backward's recomputation), so the device holds about one layer's weights at a
  time; without it the autograd graph keeps every copy until the backward.

Everything outside the decoder layers (embeddings, final norm, output head, rotary tables) sits on the main
device. Layers that share weights (a fold group) share a home (`assign_layers`), and a student built from a
placed dense model `follow`s it: each student layer goes where the weights it borrows live, so nothing is copied
twice. Weights move in place (`Module.to` keeps the Parameter objects), so teacher and student keep sharing.

This is ours rather than accelerate's `device_map` dispatch because the cure trains through offloaded layers
(accelerate's offload hooks swap weights in for inference; no gradient reaches them) and because its map knows
nothing of positions that share one matrix.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device as to_device  # tensors in nested tuples / lists / dicts
from torch import nn

from ..adapters import Adapter
from ..errors import FoldGPTError

log = logging.getLogger(__name__)

OFFLOAD = "offload"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ---- pure planning --------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'30GiB', '500MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise FoldGPTError(f"cannot read the memory size '{text}'; write it like 30GiB, 500MB or 2e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_max_memory(spec: str | dict | None) -> dict[str, int]:
    """'cuda:0=30GiB,1=20GiB,cpu=100GiB' (a bare index means a CUDA device) -> {device: bytes}."""
    if spec is None or isinstance(spec, dict):
        return {_device_name(k): (v if isinstance(v, int) else parse_size(v)) for k, v in (spec or {}).items()}
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        if not eq:
            raise FoldGPTError(f"--max-memory entry '{part}' has no '='; write DEVICE=SIZE, "
                               "e.g. cuda:0=30GiB,cpu=64GiB")
        out[_device_name(name.strip())] = parse_size(size)
    return out


def _device_name(name) -> str:
    name = str(name)
    return f"cuda:{name}" if name.isdigit() else ("cuda:0" if name == "cuda" else name)


def layer_groups(shared: list[set[int]]) -> list[list[int]]:
    """Layers that share any tensor (given each layer's set of tensor ids), as sorted groups."""
    groups: list[tuple[set[int], set[int]]] = []  # (layers, the tensor ids they hold)
    for i, ids in enumerate(shared):
        layers, tensors = {i}, set(ids)
        for g in [g for g in groups if g[1] & tensors]:  # every group this layer touches merges into one
            layers |= g[0]
            tensors |= g[1]
            groups.remove(g)
        groups.append((layers, tensors))
    return sorted(sorted(g[0]) for g in groups)


def assign_layers(layer_bytes: list[int], capacities: list[tuple[str, int]], groups: list[list[int]] | None = None,
                  allow_offload: bool = True) -> list[str]:
    """Fill `capacities` (device, free bytes), in order, with the layers in order; a group of layers that share
    weights is placed as one unit when its first layer comes up. Layers that fit nowhere are `OFFLOAD`ed (or,
    without `allow_offload`, raise). `layer_bytes[i]` counts the bytes layer i adds (shared tensors once)."""
    unit_of = {i: g for g in (groups or []) for i in g}
    homes: list[str | None] = [None] * len(layer_bytes)
    free = [[d, c] for d, c in capacities]
    k = 0
    for i in range(len(layer_bytes)):
        if homes[i] is not None:
            continue
        unit = unit_of.get(i, [i])
        need = sum(layer_bytes[j] for j in unit)
        while k < len(free) and free[k][1] < need:
            k += 1
        if k == len(free):
            if not allow_offload:
                raise FoldGPTError(f"layer {i} ({need / 2**30:.2f} GiB with the layers sharing its weights) fits on "
                                   "no device; raise --max-memory or add cpu to it to offload the rest")
            home = OFFLOAD
        else:
            home = free[k][0]
            free[k][1] -= need
        for j in unit:
            homes[j] = home
    return homes  # type: ignore[return-value]


# ---- measuring the model ----------------------------------------------------------------------------------
def _tensors(mod: nn.Module):
    yield from mod.parameters()
    yield from (b for b in mod.buffers() if b is not None)


def layer_bytes(model: nn.Module, adapter: Adapter) -> tuple[list[int], list[list[int]], int]:
    """(bytes each layer adds, groups of layers sharing tensors, bytes outside the layers)."""
    seen: set[int] = set()
    sizes, ids = [], []
    for layer in adapter.layers(model):
        mine = {id(t): t for t in _tensors(layer)}
        ids.append(set(mine))
        sizes.append(sum(t.numel() * t.element_size() for k, t in mine.items() if k not in seen))
        seen |= set(mine)
    rest = sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors(model)}.values()
               if id(t) not in seen)
    return sizes, [g for g in layer_groups(ids) if len(g) > 1], rest


def device_capacities(max_memory: dict[str, int], reserve_main: int) -> tuple[str, list[tuple[str, int]]]:
    """(main device, [(GPU, bytes free for layers)]) from --max-memory, or every visible CUDA device's free
    memory less a 10% margin for activations when none is given. The main device also holds `reserve_main`."""
    gpus = {d: b for d, b in max_memory.items() if d not in ("cpu", "disk")}
    if not gpus and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            gpus[f"cuda:{i}"] = int(free * 0.9)
    if not gpus:
        raise FoldGPTError("--device-map auto found no GPU (and --max-memory names none); run on --device cpu, "
                           "or use --device-map offload --device DEVICE")
    order = sorted(gpus, key=lambda d: torch.device(d).index or 0)
    main = order[0]
    caps = [(d, gpus[d] - (reserve_main if d == main else 0)) for d in order]
    if caps[0][1] < 0:
        raise FoldGPTError(f"the embeddings and head ({reserve_main / 2**30:.2f} GiB) do not fit in {main}'s "
                           f"{gpus[main] / 2**30:.2f} GiB; raise --max-memory for it")
    return main, caps


# ---- applying it ------------------------------------------------------------------------------------------
@dataclass
class Placement:
    """The home of each decoder layer (a device name or OFFLOAD) and the device everything else runs on."""

    main: str
    homes: list[str]

    def describe(self) -> str:
        return ", ".join(f"{n} on {h}" if h != OFFLOAD else f"{n} offloaded to CPU"
                         for h, n in Counter(self.homes).items())


@dataclass
class _Traffic:
    """Bytes of offloaded weights copied to the device, and how many of those copies were alive at once."""

    copied: int = 0
    alive: int = 0
    peak_alive: int = 0

    def track(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.copied += n
        self.alive += n
        self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(t, self._freed, n)

    def _freed(self, n: int) -> None:
        self.alive -= n


def _mark(fn):
    fn._foldgpt_placement = True
    return fn


def _inputs_to(device):
    @_mark
    def pre(module, args, kwargs):
        return to_device(args, device), to_device(kwargs, device)

    return pre


def _is_sharded(mod: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in mod.parameters(recurse=False))


@_mark
def _layer_pre(module, args, kwargs):
    """A placed layer's pre-hook. Its home is read from the layer each call (`sharing_home` may change it)."""
    home = module._foldgpt_home
    if home != OFFLOAD:
        dev = torch.device(home)
        return to_device(args, dev), to_device(kwargs, dev)
    device, traffic = module._foldgpt_main, module._foldgpt_traffic
    saved = []
    for mod in module.modules():
        if _is_sharded(mod):  # an FSDP-sharded matrix (--fsdp) gathers itself onto its device
            continue
        for name, p in [(n, p) for n, p in mod._parameters.items() if p is not None]:
            copy = p.to(device, copy=True) if p.requires_grad else p.detach().to(device, copy=True)
            traffic.track(copy)
            saved.append((mod, name, p))
            mod._parameters[name] = copy  # a plain tensor while the layer runs
    module._foldgpt_swapped = saved
    return to_device(args, device), to_device(kwargs, device)


@_mark
def _layer_post(module, args, output):
    for mod, name, p in reversed(getattr(module, "_foldgpt_swapped", [])):
        mod._parameters[name] = p
    module._foldgpt_swapped = []
    return output


def _store(home: str) -> str:
    return "cpu" if home == OFFLOAD else home


@contextmanager
def sharing_home(child: nn.Module, parent: nn.Module):
    """While `child` runs `parent`'s matrices (a trial fold; enter after borrowing them), run it where the parent
    lives: the child's own tensors move there and back. A no-op for unplaced layers or layers with the same home."""
    mine, theirs = getattr(child, "_foldgpt_home", None), getattr(parent, "_foldgpt_home", None)
    if mine is None or theirs is None or mine == theirs:
        yield
        return
    borrowed = {id(t) for t in _tensors(parent)}
    own = [t for t in _tensors(child) if id(t) not in borrowed]
    for t in own:  # in place: the Parameter objects stay, so an optimizer or a teacher keeps pointing at them
        t.data = t.data.to(_store(theirs))
    child._foldgpt_home = theirs
    try:
        yield
    finally:
        child._foldgpt_home = mine
        for t in own:
            t.data = t.data.to(_store(mine))


def apply(model: nn.Module, adapter: Adapter, placement: Placement) -> _Traffic:
    """Move `model` to `placement` and hook it so that it runs there; returns the offload traffic counter."""
    remove(model)
    main = torch.device(placement.main)
    layers = adapter.layers(model)
    if len(layers) != len(placement.homes):
        raise FoldGPTError("the placement was made for a different number of layers")
    in_layers = {id(t) for layer in layers for t in _tensors(layer)}
    for mod in model.modules():  # everything outside the layers: the main device
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and id(t) not in in_layers and t.device != main:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(main)
                    else:
                        store[name] = t.to(main)
    traffic = _Traffic()
    for layer, home in zip(layers, placement.homes):
        layer.to(_store(home))
        layer._foldgpt_home, layer._foldgpt_main, layer._foldgpt_traffic = home, main, traffic
        layer.register_forward_pre_hook(_layer_pre, with_kwargs=True)
        layer.register_forward_hook(_layer_post, always_call=True)
    for mod in filter(None, (adapter.final_norm(model), model.get_output_embeddings())):
        mod.register_forward_pre_hook(_inputs_to(main), with_kwargs=True)
    model._foldgpt_placement = placement
    log.info("placement: %s; the rest on %s", placement.describe(), placement.main)
    return traffic


def remove(model: nn.Module) -> None:
    """Take a placement's hooks off `model`. Works on a deep copy too (whose hook tables are copies of the
    original's): hooks are found by their mark in the model's own modules, never through saved handles."""
    for mod in model.modules():
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for k in [k for k, fn in hooks.items() if getattr(fn, "_foldgpt_placement", False)]:
                del hooks[k]
                mod._forward_hooks_always_called.pop(k, None)
                mod._forward_pre_hooks_with_kwargs.pop(k, None)
        for attr in ("_foldgpt_home", "_foldgpt_main", "_foldgpt_traffic", "_foldgpt_swapped"):
            mod.__dict__.pop(attr, None)  # plain attributes, never parameters or submodules
    model.__dict__.pop("_foldgpt_placement", None)


def placement_of(model: nn.Module) -> Placement | None:
    return getattr(model, "_foldgpt_placement", None)


def is_placed(layer: nn.Module) -> bool:
    """Whether a placement's hooks run this module (they move its inputs, and an offloaded layer's weights)."""
    return any(getattr(fn, "_foldgpt_placement", False) for fn in layer._forward_pre_hooks.values())


def has_offloaded(model: nn.Module) -> bool:
    """Whether some layer of `model` is offloaded (training then needs activation checkpointing to save memory)."""
    where = placement_of(model)
    return where is not None and OFFLOAD in where.homes


def plan(model: nn.Module, adapter: Adapter, device_map: str, device: str = "cpu",
         max_memory: str | dict | None = None) -> Placement:
    """A placement for `model`: 'offload' keeps every layer on the CPU and runs it on `device`; 'auto' fills
    the GPUs (--max-memory, or their free memory) in layer order and offloads what does not fit when
    --max-memory allows cpu (or names no limits at all)."""
    sizes, groups, rest = layer_bytes(model, adapter)
    if device_map == OFFLOAD and max_memory:
        raise FoldGPTError("--max-memory goes with --device-map auto; --device-map offload keeps every layer on "
                           "the CPU")
    if device_map == OFFLOAD:
        return Placement(str(torch.device(device)), [OFFLOAD] * len(sizes))
    if device_map != "auto":
        raise FoldGPTError(f"unknown --device-map '{device_map}'; use auto or offload")
    mem = parse_max_memory(max_memory)
    main, caps = device_capacities(mem, rest)
    homes = assign_layers(sizes, caps, groups, allow_offload=not mem or "cpu" in mem)
    return Placement(main, homes)


def follow(student: nn.Module, adapter: Adapter, dense: nn.Module) -> _Traffic | None:
    """Place `student` (built from the placed `dense`, sharing its weights) where the weights each of its layers
    borrows already live. No-op when `dense` has no placement."""
    src = placement_of(dense)
    if src is None:
        return None
    home_of = {id(t): h for layer, h in zip(adapter.layers(dense), src.homes) for t in _tensors(layer)}
    homes = []
    for layer in adapter.layers(student):
        found = [home_of[id(t)] for t in _tensors(layer) if id(t) in home_of]
        homes.append(max(set(found), key=found.count) if found else src.main)
    return apply(student, adapter, Placement(src.main, homes))
