"""The folded model on disk: a Hugging Face-style folder holding every unique tensor once.

config.json   model_type "foldgpt", the base model's config nested under "base_config", the plan
model.safetensors   the compressed model's state dict with aliases (shared and tied weights) dropped
Loading builds the skeleton on the meta device, applies the plan (children reference their parent's
Linears), allocates each unique tensor once and copies the stored weights in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import get_adapter
from .errors import FoldGPTError
from .plan import Plan
from .structure import apply_plan_

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


def dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each storage once (first key wins) and the map alias -> stored key."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        key = (v.data_ptr(), v.shape, v.stride(), v.dtype) if v.numel() else ("empty", k)
        if key in owner:
            aliases[k] = owner[key]
            continue
        owner[key] = k
        out[k] = v.detach().contiguous().clone() if not v.is_contiguous() else v.detach()
    return out, aliases


def base_config_dict(model: nn.Module, num_layers: int, layer_kinds: list[str]) -> dict:
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = num_layers
    if cfg.get("layer_types") is not None:
        cfg["layer_types"] = list(layer_kinds)
    cfg.pop("quantization_config", None)
    return cfg


def save_folded(model: nn.Module, tokenizer, plan: Plan, out: str | Path, base_config: dict,
                extra_config: dict | None = None) -> None:
    """Write the compressed model into an existing (temporary) folder."""
    out = Path(out)
    state, aliases = dedup_state_dict(model)
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "foldgpt_aliases": json.dumps(aliases)})
    config = {
        "model_type": "foldgpt",
        "architectures": ["FoldGPTForCausalLM"],
        "base_config": base_config,
        "fold_plan": plan.to_dict(),
        **(extra_config or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def build_skeleton(base_config: dict, plan: Plan, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The compressed architecture with empty (uninitialised) storage, each unique tensor once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(base_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    adapter = get_adapter(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_plan_(model, plan, adapter)
    model.to_empty(device="cpu")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    # non-persistent buffers (rotary frequencies, embedding scales) are not stored: recompute them
    with torch.no_grad():
        for mod in model.modules():
            if any(True for _ in mod.buffers(recurse=False)):
                model._init_weights(mod)
    return model


def load_folded(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a foldgpt folder as (model, tokenizer). Shared weights are allocated once."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FoldGPTError(f"{path} is not a foldgpt model folder: {exc}") from None
    if config.get("model_type") != "foldgpt":
        raise FoldGPTError(f"{path}/config.json is not a foldgpt config (model_type={config.get('model_type')})")
    plan = Plan.from_dict(config["fold_plan"])
    model = build_skeleton(config["base_config"], plan, dtype)
    state = load_file(str(path / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    _, expected_aliases = dedup_state_dict(model)
    bad_missing = set(missing) - set(expected_aliases)
    if unexpected or bad_missing:
        raise FoldGPTError(
            f"{path} does not match its plan: missing {sorted(bad_missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.eval()
    model.config._name_or_path = str(path)
    model.fold_plan = plan
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tok
