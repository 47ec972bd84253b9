"""Tiny random models built from configs, with a small trained tokenizer: no downloads."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. The quick brown fox jumps over the lazy dog. "
)


def sample_text(n_chars: int = 20000, seed: int = 0) -> str:
    """Deterministic pseudo-English text made by shuffling the words of TEXT."""
    g = torch.Generator().manual_seed(seed)
    words = TEXT.split()
    out, size = [], 0
    while size < n_chars:
        w = words[int(torch.randint(len(words), (1,), generator=g))]
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def make_tokenizer():
    from foldgpt.data import byte_level_tokenizer

    return byte_level_tokenizer([TEXT] * 4, vocab_size=300)


def tiny_config(kind: str, layers: int = 6):
    from transformers import Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
                                layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention"
                                             for i in range(layers)])
    if kind == "phi3":
        return Phi3Config(**common, tie_word_embeddings=False)
    if kind == "gpt_neox":  # biases everywhere, LayerNorms, parallel residual, partial rotary (the defaults)
        common.pop("num_key_value_heads")
        return GPTNeoXConfig(**common, tie_word_embeddings=False)
    raise ValueError(kind)


def tiny_model(kind: str, layers: int = 6, seed: int = 0, train_steps: int = 200):
    """A tiny model briefly trained on sample text, so that its blocks do something measurable."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers), dtype=torch.float32)
    if train_steps:
        tok = make_tokenizer()
        ids = torch.tensor(tok(sample_text(20000, seed + 5))["input_ids"])
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(train_steps):
            starts = torch.randint(0, ids.numel() - 33, (16,), generator=g)
            batch = torch.stack([ids[s : s + 32] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def save_tiny(path: Path, kind: str, layers: int = 6, seed: int = 0, zero_layer: int | None = None,
              model=None) -> Path:
    """Write a tiny model folder; `zero_layer` plants a useless block (zeroed output projections)."""
    import copy

    from foldgpt.adapters import get_adapter

    model = copy.deepcopy(model) if model is not None else tiny_model(kind, layers, seed)
    if zero_layer is not None:
        adapter = get_adapter(model.config)
        layer = adapter.layers(model)[zero_layer]
        with torch.no_grad():
            for name in (adapter.attn_out, adapter.mlp_out):
                for p in layer.get_submodule(name).parameters():
                    p.zero_()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
