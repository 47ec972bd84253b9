"""The folded checkpoint on disk: a Hugging Face folder holding every unique tensor once.

config.json         model_type "foldgpt", the base config nested ("base_config"), the runtime layout
                    ("fold_layout") and the plan; "auto_map" points at the bundled modeling file
model.safetensors   the compressed model's tensors, aliases (shared and tied weights) stored once
modeling_foldgpt.py the runtime (torch + transformers only), for trust_remote_code loading
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import get_adapter
from ..checks import check_folded
from ..errors import FoldGPTError
from ..plan import Plan
from ..stages.structure import layout_from_plan
from . import modeling_foldgpt
from .modeling_foldgpt import WEIGHTS_NAME, alias_keys, load_folded_model

log = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "modeling_foldgpt.FoldGPTConfig",
    "AutoModelForCausalLM": "modeling_foldgpt.FoldGPTForCausalLM",
}


def dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each storage once (first key wins): no two saved tensors share memory. On the CPU,
    wherever the layers ran (a GPU, several under --device-map)."""
    aliases = alias_keys(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}


def base_config_dict(model: nn.Module, num_layers: int, layer_kinds: list[str]) -> dict:
    """The dense base model's config (all original layers), as the folded config nests it."""
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = num_layers
    if cfg.get("layer_types") is not None:
        cfg["layer_types"] = list(layer_kinds)
    for k in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        cfg.pop(k, None)
    return cfg


def folded_config(model: nn.Module, plan: Plan, base_config: dict, extra: dict | None = None) -> dict:
    adapter = get_adapter(model.config)
    return {
        "model_type": "foldgpt",
        "architectures": ["FoldGPTForCausalLM"],
        "auto_map": AUTO_MAP,
        "base_model_type": base_config["model_type"],
        "base_config": base_config,
        "fold_layout": layout_from_plan(plan, adapter),
        "fold_plan": {k: v for k, v in plan.to_dict().items() if k != "provenance"},
        **(extra or {}),
    }


def save_folded(model: nn.Module, tokenizer, plan: Plan, out: str | Path, base_config: dict,
                extra_config: dict | None = None) -> None:
    """Write the compressed model into an existing (temporary) folder."""
    out = Path(out)
    quantization = getattr(model, "fold_quantization", None)
    if quantization:  # weight-only quantized (quant.py): values and scales as plain tensors, the record in config
        from ..quant import saved_state

        state, extra_config = saved_state(model), {**(extra_config or {}), "quantization": quantization}
    else:
        state = dedup_state_dict(model)
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = folded_config(model, plan, base_config, extra_config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(modeling_foldgpt.__file__, out / "modeling_foldgpt.py")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def load_folded(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a foldgpt folder as (model, tokenizer). Shared weights are allocated once."""
    from ..models import load_tokenizer

    path = Path(path)
    config = check_folded(path)  # config.json against the schema, the weights' header: before building anything
    try:
        if config.get("quantization"):  # weight-only quantized: torchao's tensors rebuilt from the stored ones
            from ..quant import load_quantized

            model = load_quantized(str(path), config, dtype)
        else:
            model = load_folded_model(str(path), dtype)
    except (ValueError, RuntimeError) as exc:  # weights that do not fit the layout (names or shapes)
        line = " ".join(str(exc).split())[:300]
        raise FoldGPTError(f"{path}: the weights do not match config.json ({line}); the folder is damaged: write it "
                           "again with foldgpt compress") from None
    if config.get("fold_plan"):
        model.fold_plan = Plan.from_dict(config["fold_plan"], f"{path}/config.json's fold_plan")
    tok = load_tokenizer(path) if (path / "tokenizer_config.json").exists() else None
    return model, tok
