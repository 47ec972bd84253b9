"""Small configurations that keep the tests fast."""

from foldgpt import CompressConfig, CureConfig, FoldConfig, GateConfig, RankingConfig


def fast_config(ranking: str = "search", unit: str = "layer", cure: bool | None = None, **kw) -> CompressConfig:
    """A small CompressConfig: `ranking` (its kind) and `unit` go to RankingConfig (whole layers: one greedy search
    instead of `--unit auto`'s two; test_foldgpt_ranking tests auto), `cure` to CureConfig.enabled."""
    base = dict(target_params=0.75, seq_len=32, calib_seqs=48, seed=0,
                ranking=RankingConfig(kind=ranking, unit=unit), gate=GateConfig(steps=24, batch_size=4),
                fold=FoldConfig(adapter_rank=2), cure=CureConfig(enabled=cure, steps=4, batch_size=2, warmup=1))
    base.update(kw)
    return CompressConfig(**base)


GEMMA_KINDS = ["sliding_attention", "full_attention"] * 2  # the wide tiny Gemma-3's layer types (4 layers)


def wide_config(kind: str, layers: int = 4):
    """A tiny Llama ("llama", tied embedding) or Gemma-3 config wide enough (hidden 256) that a file's header is small
    next to its weights: the export and quantization tests compare file sizes with parameter bytes."""
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    return Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                            layer_types=GEMMA_KINDS[:layers])
