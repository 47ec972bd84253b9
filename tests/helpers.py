"""Small configurations that keep the tests fast."""

from foldgpt import CompressConfig, CureConfig, FoldConfig, GateConfig


def fast_config(**kw) -> CompressConfig:
    base = dict(target_params=0.75, seq_len=32, calib_seqs=48, seed=0,
                # whole layers: one search instead of `--unit auto`'s two (test_foldgpt_ranking tests auto)
                gate=GateConfig(steps=24, batch_size=4, unit="layer"), fold=FoldConfig(adapter_rank=2),
                cure_cfg=CureConfig(steps=4, batch_size=2, warmup=1))
    base.update(kw)
    return CompressConfig(**base)
