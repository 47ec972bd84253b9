"""Mixed precision and activation checkpointing for the training stages (gates, fold costs, cure)."""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast about halves the
    cure's step time; elsewhere it is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve(precision: str, device: str | torch.device) -> str:
    """'auto': bf16 on a GPU that supports it and on a CPU with bf16 instructions (cpu_has_fast_bf16), else fp32."""
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    if dev.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast(device: str | torch.device, precision: str):
    """A torch.autocast context for `precision` on `device` (a no-op for fp32)."""
    p = resolve(precision, device)
    if p == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def set_checkpointing(model, enabled: bool) -> bool:
    """Turn activation (gradient) checkpointing on or off; returns whether the model supports it.
    Hugging Face models checkpoint only in training mode, so this also sets the mode (dropout is 0 here)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        on = lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # noqa: E731
        off = model.activation_checkpointing_disable
    elif hasattr(model, "gradient_checkpointing_enable"):
        on = lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # noqa: E731
        off = model.gradient_checkpointing_disable
    else:
        return False
    on() if enabled else off()
    model.train(enabled)
    return True
