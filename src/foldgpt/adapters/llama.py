"""Llama family: llama (SmolLM2, TinyLlama, LLaMA-2/3), mistral, qwen2, qwen3."""

from .base import Adapter

ADAPTER = Adapter(model_types=("llama", "mistral", "qwen2", "qwen3"))
