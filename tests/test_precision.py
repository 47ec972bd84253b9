"""precision.resolve: 'auto' is bf16 where the hardware computes it (a bf16 GPU, a CPU with AVX512-BF16 or AMX),
else fp32; explicit precisions pass through."""

import pytest
import torch

import foldgpt.scale.precision as precision


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_the_cpu_follows_its_bf16_instructions(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    want = "bf16" if fast else "fp32"
    assert precision.resolve("auto", "cpu") == want
    assert precision.resolve("auto", torch.device("cpu")) == want
    for explicit in ("fp32", "bf16", "fp16"):
        assert precision.resolve(explicit, "cpu") == explicit
    with precision.autocast("cpu", "auto"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_a_gpu_does_not_depend_on_the_cpu(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert precision.resolve("auto", "cuda") == ("bf16" if gpu_bf16 else "fp32")


@pytest.mark.parametrize("flags, fast", [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
], ids=["avx512_bf16", "amx_bf16", "neither"])
def test_cpu_has_fast_bf16_reads_the_cpu_flags(monkeypatch, tmp_path, flags, fast):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: test\n" + flags)
    real_open = open
    monkeypatch.setattr(precision, "open", lambda path, *a, **k: real_open(info, *a, **k), raising=False)
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        assert precision.cpu_has_fast_bf16() is fast
    finally:
        precision.cpu_has_fast_bf16.cache_clear()  # the next caller reads the real /proc/cpuinfo again


def test_cpu_has_fast_bf16_is_false_without_cpuinfo(monkeypatch):
    def missing(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(precision, "open", missing, raising=False)
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        assert precision.cpu_has_fast_bf16() is False
    finally:
        precision.cpu_has_fast_bf16.cache_clear()
