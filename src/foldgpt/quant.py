"""Weight-only quantization of a compressed (or dense) model with torchao, and how a quantized model is stored.

Levels (LEVELS):
- "int8": every matrix int8 with one fp32 scale per output row (torchao's Int8WeightOnlyConfig, `Int8Tensor`).
- "int4": matrices int4, symmetric, one bf16 scale per group of INT4_GROUP inputs, the scales chosen by HQQ
  (torchao's IntxWeightOnlyConfig, weight_dtype=torch.int4, HQQ_SCALE_ONLY; torchao 0.18's Int4WeightOnlyConfig has
  no CPU path: its packing formats need mslk or tinygemm on CUDA, or an XPU/NPU). A matrix whose input size is not a
  multiple of the group takes one scale per row. The token embedding (and with it a tied LM head) stays int8 per
  row at this level (docs/size.md: int4 there costs more loss than the bytes it saves are worth).
Norms, biases, gates and alpha scalars stay fp32. A folded child's low-rank factors (B A) are matrices like any
other and are quantized at the level too (they are a fifth of a 60% SmolLM2's unique parameters).

Shared matrices stay shared: every unique Parameter is quantized once and the quantized Parameter is set on every
module that held it, so a folded child still runs its parent's Linear (the same module object) and a tied LM head
the embedding. torchao's int4 tensor keeps its values unpacked, one int8 per value, in memory (`resident_bytes`).

On disk (model.safetensors, through folded.save_folded): a quantized tensor NAME is stored as plain tensors
`NAME.qdata` (int8; for int4 two values per byte, uint8, value + 8, the even column in the low nibble) and
`NAME.scale`; config.json's "quantization" record lists each one's bits and group size. `load_quantized` rebuilds
torchao's tensors from them exactly (no second rounding); the bundled runtime (modeling_foldgpt.py) loads the same
folder without torchao, dequantized to float.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint.auto import quiet_torchao
from .checkpoint.modeling_foldgpt import pack_int4, unpack_int4
from .config import QUANT_LEVELS as LEVELS
from .errors import FoldGPTError

log = logging.getLogger(__name__)

INT4_GROUP = 32
FORMAT = 1  # the layout of the stored tensors and of config.json's "quantization" record
INSTALL = "pip install 'foldgpt[quant]'"


def _torchao():
    """torchao.quantization, imported on first use."""
    quiet_torchao()
    try:
        import torchao.quantization as tq
    except ImportError:
        raise FoldGPTError(f"weight-only quantization needs torchao; install it with: {INSTALL}") from None
    return tq


def check_level(level: str, option: str = "--quantize") -> str:
    if level not in LEVELS:
        raise FoldGPTError(f"{option} must be {', '.join(LEVELS[:-1])} or {LEVELS[-1]}, got '{level}'")
    return level


# ---- which tensors, at what precision -------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorScheme:
    bits: int
    group_size: int  # 0: one scale per row

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


def scheme_for(level: str, shape: tuple[int, ...], embedding: bool, group_size: int = INT4_GROUP,
               embedding_bits: int = 8) -> TensorScheme | None:
    """How a 2-D weight of `shape` is quantized at `level` (None: kept in float). `group_size` and `embedding_bits`
    (the int4 level's) are settings to measure other choices with (bench/quant_loss.py), not the product's."""
    if level == "none" or len(shape) != 2:
        return None
    if level == "int8" or (embedding and embedding_bits == 8):
        return TensorScheme(8, 0)
    return TensorScheme(4, group_size if shape[1] % group_size == 0 else 0)


def scheme_bytes(scheme: TensorScheme | None, shape: tuple[int, ...], float_bytes: int = 4) -> int:
    """Bytes a weight of `shape` takes on disk under `scheme` (values and scales)."""
    n = math.prod(shape)
    if scheme is None:
        return n * float_bytes
    rows, cols = shape
    if scheme.bits == 8:
        return n + rows * 4  # int8 values, one fp32 scale per row
    groups = cols // scheme.group_size if scheme.group_size else 1
    return rows * ((cols + 1) // 2) + rows * groups * 2  # two values per byte, one bf16 scale per group


@dataclass
class _Entry:
    """One unique quantizable Parameter: the modules (and attribute) that hold it, its state-dict name."""

    param: nn.Parameter
    owners: list[tuple[nn.Module, str]]
    name: str
    embedding: bool


def _entries(model: nn.Module) -> list[_Entry]:
    """Every unique 2-D weight of a Linear or Embedding, and every child's low-rank factor (lora_A / lora_B of
    modeling_foldgpt.SharedLinear), once per Parameter object. Its name is the one the saved state dict keeps
    (a module's own name, not a child's `.base.` view of its parent's module)."""
    by_id: dict[int, _Entry] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        attrs = (["weight"] if isinstance(mod, (nn.Linear, nn.Embedding)) else []) + [
            a for a in ("lora_A", "lora_B") if isinstance(getattr(mod, a, None), nn.Parameter)]
        for attr in attrs:
            p = getattr(mod, attr, None)
            if not isinstance(p, nn.Parameter) or p.dim() != 2:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            e = by_id.get(id(p))
            if e is None:
                by_id[id(p)] = _Entry(p, [(mod, attr)], name, isinstance(mod, nn.Embedding))
                continue
            if (mod, attr) not in [(m, a) for m, a in e.owners]:
                e.owners.append((mod, attr))
            e.embedding = e.embedding or isinstance(mod, nn.Embedding)
            if ".base." in e.name and ".base." not in name:
                e.name = name
    return list(by_id.values())


def _quantize_tensor(w: torch.Tensor, scheme: TensorScheme, hqq: bool = True) -> nn.Parameter:
    """torchao's weight-only quantization of one matrix, through its public configs on a bare Linear shell (`hqq`:
    int4 scales chosen by HQQ, else from each group's largest magnitude)."""
    tq = _torchao()
    if scheme.bits == 8:
        config = tq.Int8WeightOnlyConfig(granularity=tq.PerRow(), set_inductor_config=False)
    else:
        granularity = tq.PerGroup(scheme.group_size) if scheme.group_size else tq.PerAxis(0)
        config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity,
                                         mapping_type=tq.MappingType.SYMMETRIC, scale_dtype=torch.bfloat16,
                                         intx_choose_qparams_algorithm="hqq_scale_only" if hqq else "affine")
    shell = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    shell.weight = nn.Parameter(w.detach().float(), requires_grad=False)
    tq.quantize_(shell, config)
    return shell.weight


def _set(entry: _Entry, value: nn.Parameter) -> None:
    for mod, attr in entry.owners:
        if attr in mod._parameters:
            mod._parameters[attr] = value
        else:
            setattr(mod, attr, value)


@torch.no_grad()
def quantize_model_(model: nn.Module, level: str, group_size: int = INT4_GROUP, embedding_bits: int = 8,
                    int8_names: set[str] | None = None, hqq: bool = True) -> dict | None:
    """Quantize `model` in place at `level` (weights only); return the "quantization" record for config.json (None
    for "none"). Each unique Parameter is quantized once, and every module holding it gets the quantized one.
    `int8_names`: matrices (state-dict names) kept at int8 at the int4 level (size.int8_upgrades). `group_size`,
    `embedding_bits` and `hqq` other than their defaults are for measuring other choices (bench/quant_loss.py)."""
    check_level(level)
    if level == "none":
        return None
    if getattr(model, "fold_quantization", None):
        raise FoldGPTError("the model is quantized already; start from the unquantized one")
    tensors = {}
    for e in _entries(model):
        scheme = scheme_for("int8" if int8_names and e.name in int8_names else level, tuple(e.param.shape),
                            e.embedding, group_size, embedding_bits)
        if scheme is None:
            continue
        _set(e, _quantize_tensor(e.param, scheme, hqq))
        tensors[e.name] = {**scheme.to_dict(), "shape": list(e.param.shape)}
    record = {"format": FORMAT, "level": level, "library": "torchao", "library_version": _torchao_version(),
              "tensors": tensors}
    model.fold_quantization = record
    log.info("quantized %d matrices weight-only (%s)", len(tensors), level)
    return record


def _torchao_version() -> str:
    import torchao

    return getattr(torchao, "__version__", "unknown")


def is_quantized(t) -> bool:
    """Whether a tensor is one of torchao's quantized tensor subclasses (not a plain tensor or Parameter)."""
    return isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "qdata")


# ---- storage -------------------------------------------------------------------------------------------------
def _inner(t) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values as int8, scale, bits) of a quantized tensor."""
    bits = 4 if getattr(t, "target_dtype", torch.int8) == torch.int4 else 8
    zero = getattr(t, "zero_point", None)
    if zero is not None and bool((zero != 0).any()):
        raise FoldGPTError("asymmetric quantization (non-zero zero points) cannot be stored; use foldgpt's levels")
    return t.qdata, t.scale, bits


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A quantized model's state dict as plain tensors, each unique tensor once: quantized NAME as NAME.qdata and
    NAME.scale (int4 values packed two per byte); shared and tied tensors under one name (the module's own)."""
    state = model.state_dict(keep_vars=True)
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in sorted(state.items(), key=lambda kv: ".base." in kv[0]):  # as modeling_foldgpt.alias_keys
        key = ("q", id(v)) if is_quantized(v) else (
            (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype) if v.numel() else ("empty", k))
        if key in seen:
            continue
        seen[key] = k
        if is_quantized(v):
            q, scale, bits = _inner(v)
            out[f"{k}.qdata"] = (pack_int4(q) if bits == 4 else q).detach().contiguous().cpu()
            out[f"{k}.scale"] = scale.detach().reshape(q.shape[0], -1).contiguous().cpu()
        else:
            out[k] = v.detach().contiguous().cpu()
    return out


def _rebuild(qdata: torch.Tensor, scale: torch.Tensor, info: dict, cols: int, dtype: torch.dtype) -> nn.Parameter:
    """torchao's quantized tensor from the stored values and scales (exactly the one that was saved)."""
    tq = _torchao()
    bits, group = int(info["bits"]), int(info["group_size"])
    if bits == 8:
        t = tq.Int8Tensor(qdata, scale.float().reshape(-1, 1), [1, cols], dtype)
    else:
        q = unpack_int4(qdata, cols)
        block = (1, group or cols)
        t = tq.IntxUnpackedToInt8Tensor(q, scale, torch.zeros(scale.shape, dtype=torch.int8), torch.int4, block,
                                        dtype, None)
    return nn.Parameter(t, requires_grad=False)


def load_quantized(path: str, config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build a quantized folded model from its folder: the float tensors are assigned into the meta skeleton as in
    modeling_foldgpt.load_folded_model, each quantized tensor is rebuilt once and set on every module holding it."""
    import os

    from safetensors.torch import load_file

    from .checkpoint.modeling_foldgpt import WEIGHTS_NAME, alias_keys, build_meta, finish_load, materialize_buffers_

    record = config["quantization"]
    if not (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("tensors"), dict)
            and all(isinstance(i, dict) and i.get("bits") in (4, 8) and isinstance(i.get("group_size"), int)
                    for i in record["tensors"].values())):
        raise ValueError(f"config.json's quantization record is not one this foldgpt reads (format {FORMAT})")
    model = build_meta(config["base_config"], config["fold_layout"], dtype)
    materialize_buffers_(model)
    aliases = alias_keys(model)
    entries = {e.name: e for e in _entries(model)}
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    bad = [n for n in record["tensors"] if n not in entries or f"{n}.qdata" not in state or f"{n}.scale" not in state]
    if bad:
        raise ValueError(f"quantized tensor {bad[0]} is not in the weights or not a matrix of the layout")
    for name, info in record["tensors"].items():
        e = entries[name]
        cols = e.param.shape[1]
        _set(e, _rebuild(state.pop(f"{name}.qdata"), state.pop(f"{name}.scale"), info, cols, dtype))
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    finish_load(model, path, set(missing) - set(aliases) - set(record["tensors"]), unexpected)
    model.fold_quantization = record
    return model


# ---- sizes ---------------------------------------------------------------------------------------------------
def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold in memory, each storage once (a quantized tensor: its values,
    scales and zero points)."""
    seen: set = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if is_quantized(t):
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += sum(getattr(t, n).nbytes for n in ("qdata", "scale", "zero_point")
                         if isinstance(getattr(t, n, None), torch.Tensor))
        elif t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the weights file holds for `model` (each unique tensor once; quantized ones as stored),
    without the file's header."""
    if getattr(model, "fold_quantization", None):
        return sum(t.nbytes for t in saved_state(model).values())
    from .checkpoint.folded import dedup_state_dict

    return sum(t.nbytes for t in dedup_state_dict(model).values())


def refuse_quantized(path, fmt: str) -> None:
    """Exports read the folder's float weights: a quantized folder is refused with one line."""
    import json
    from pathlib import Path

    cfg = Path(path) / "config.json"
    try:
        quantized = bool(json.loads(cfg.read_text()).get("quantization"))
    except (OSError, ValueError, AttributeError):
        return  # the export's own checks report what is wrong with the folder
    if quantized:
        raise FoldGPTError(f"{path} is weight-only quantized; export --{fmt} reads an unquantized folder: export the "
                           "folder compress wrote without --quantize / --target-size")


def quantize_folder(src: str, out, level: str, overwrite: bool = False):
    """Quantize a model at `level` into the folder `out`: a folder foldgpt compress wrote (its plan and layout kept),
    or a dense model (an alias, a folder; written as a folded checkpoint that keeps every layer). Returns `out`."""
    from pathlib import Path

    from .adapters import get_adapter
    from .checkpoint.folded import base_config_dict, save_folded
    from .config import CompressConfig
    from .fileio import atomic_dir, check_output
    from .methods import make_plan
    from .models import load_model

    check_level(level)
    check_output(out, overwrite, inputs=[src])
    model, tok = load_model(src)
    adapter = get_adapter(model.config)
    plan = getattr(model, "fold_plan", None)
    if getattr(model, "fold_layout", None) is None:  # a dense model: the plan that keeps every layer
        cfg = CompressConfig(target_params=None, remove_rate=0.0)
        plan = make_plan(cfg, model, adapter, [], [], method="dense", compensation="")
        base_config = base_config_dict(model, plan.num_layers, plan.layer_kinds)
    else:
        import json

        base_config = json.loads((Path(src) / "config.json").read_text())["base_config"]
        if plan is None:
            raise FoldGPTError(f"{src}/config.json has no fold_plan; write the folder again with foldgpt compress")
    quantize_model_(model, level)
    with atomic_dir(out, overwrite) as tmp:
        save_folded(model, tok, plan, tmp, base_config)
    return Path(out)
