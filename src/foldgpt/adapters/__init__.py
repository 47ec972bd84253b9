"""Architecture adapters, chosen by `config.model_type`."""

from __future__ import annotations

from ..errors import FoldGPTError
from . import gemma3, gpt_neox, llama, phi3
from .base import Adapter

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> None:
    for t in adapter.model_types:
        _REGISTRY[t] = adapter


for _mod in (llama, gemma3, phi3, gpt_neox):
    register(_mod.ADAPTER)


def supported_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config_or_type) -> Adapter:
    model_type = config_or_type if isinstance(config_or_type, str) else config_or_type.model_type
    if model_type == "gemma3":  # multimodal wrapper: use its text config
        model_type = "gemma3_text"
    if model_type not in _REGISTRY:
        raise FoldGPTError(
            f"unsupported model type '{model_type}'; supported types: {', '.join(supported_types())}"
        )
    return _REGISTRY[model_type]


__all__ = ["Adapter", "get_adapter", "register", "supported_types"]
