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
