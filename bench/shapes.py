"""Random-initialised models of real shapes (weights do not change the cost of a stage)."""

from __future__ import annotations

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, head_dim=64),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, head_dim=128),
}


def random_model(shape: str, dtype, device: str = "cpu", **overrides):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**SHAPES[shape], **overrides}, bos_token_id=1, eos_token_id=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def byte_tokenizer():
    """A small byte-level BPE trained on Python's docs, offline (the text only needs to become ids)."""
    from foldgpt.data import builtin_text, byte_level_tokenizer

    return byte_level_tokenizer([builtin_text()[:200_000]], vocab_size=2000)
