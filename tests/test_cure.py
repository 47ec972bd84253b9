import torch

from foldgpt.adapters import get_adapter
from foldgpt.config import CureConfig
from foldgpt.data import calibration_batches, tokenize
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.stages.cure import cure, tail_mse, trainable_parameters
from foldgpt.stages.structure import SharedLinear, apply_plan_
from foldgpt.stages.weights import clone_sharing_weights


def _setup(tiny_dirs, text_file):
    dense, tok = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(dense.config)
    plan = Plan(6, "llama", removed=["4"], groups=[[1, 2]], adapter_rank=2)
    student = clone_sharing_weights(dense)
    apply_plan_(student, plan, adapter)
    calib = calibration_batches(tokenize(tok, text_file.read_text()), 16, 32, seed=0)
    return dense, student, adapter, calib


def test_cure_trains_only_small_parameters_and_lowers_kl(tiny_dirs, text_file):
    dense, student, adapter, calib = _setup(tiny_dirs, text_file)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    info = cure(student, dense, adapter, calib, CureConfig(steps=12, batch_size=4, warmup=2, lr=1e-2))
    assert info["kl_last"] < info["kl_first"]
    # the teacher (which shares Linear weights with the student) is untouched
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), k
    params = trainable_parameters(student, adapter, train_all_norms=True)
    names = {n for n, p in student.named_parameters() if any(p is q for q in params)}
    assert names and all(("norm" in n or "lora_" in n) for n in names)
    assert any(isinstance(m, SharedLinear) for m in student.modules())


def test_micro_batching_and_checkpointing_match_full_batch(tiny_dirs, text_file):
    # Adam normalises each coordinate, so compare the loss curves (the sum of what every step saw)
    curves = []
    for micro, ckpt in ((0, False), (1, False), (2, True)):
        dense, student, adapter, calib = _setup(tiny_dirs, text_file)
        info = cure(student, dense, adapter, calib, CureConfig(steps=3, batch_size=4, warmup=1, micro_batch=micro,
                                                               grad_checkpointing=ckpt))
        curves.append(torch.tensor([[h["kl"], h["tail"]] for h in info["history"]]))
    for c in curves[1:]:
        torch.testing.assert_close(c, curves[0], rtol=1e-2, atol=1e-5)


def test_tail_mse_is_normalised_and_aligned_from_the_end():
    t = [torch.ones(2, 3, 4) * k for k in (1.0, 2.0, 3.0)]
    s = [torch.ones(2, 3, 4) * 2.0, torch.ones(2, 3, 4) * 3.0]
    assert tail_mse(s, t, 2).item() == 0.0
    s2 = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    assert abs(tail_mse(s2, t, 1).item() - 1.0) < 1e-6


def test_cure_adapters_merge_into_new_weights_and_are_shared_by_children(tiny_dirs, text_file):
    from foldgpt.stages.lora import MergeableLoRA, unique_linears

    dense, student, adapter, calib = _setup(tiny_dirs, text_file)
    linears = unique_linears(student, adapter)
    # 5 kept layers, one a child of layer 1: 4 layers' own Linears, 7 each
    assert len(linears) == 4 * len(adapter.linears)
    lora = MergeableLoRA(linears, rank=3, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in lora.B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    ids = calib[:2]
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    with torch.no_grad():
        hooked = student(input_ids=ids).logits
        plain = dense(input_ids=ids).logits
        lora.merge_()
        merged = student(input_ids=ids).logits
    assert (hooked - plain).abs().max() > 1e-3  # the adapters change the function...
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)  # ...and merging keeps it
    for k, v in dense.state_dict().items():  # the teacher's weights are untouched
        assert torch.equal(v, before[k]), k
    child = adapter.layers(student)[2]  # position 2 is original layer 2, the child of layer 1
    parent = adapter.layers(student)[1]
    assert child.self_attn.q_proj.base.weight is parent.self_attn.q_proj.weight


def test_cure_with_adapters_keeps_unique_parameter_count(tiny_dirs, text_file):
    from foldgpt.stages.structure import unique_params

    dense, student, adapter, calib = _setup(tiny_dirs, text_file)
    n = unique_params(student)
    info = cure(student, dense, adapter, calib, CureConfig(steps=3, batch_size=2, warmup=1, lora_rank=4,
                                                           precision="bf16"))
    assert info["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in info["history"])
    assert unique_params(student) == n
    assert not any(p.requires_grad for p in student.parameters())


def test_teacher_cache_with_full_vocabulary_matches_the_live_teacher(tiny_dirs, text_file, tmp_path):
    curves = []
    for cached in (False, True):
        dense, student, adapter, calib = _setup(tiny_dirs, text_file)
        k = dense.config.vocab_size
        cfg = CureConfig(steps=3, batch_size=4, warmup=1, teacher_cache=cached, teacher_topk=k,
                         teacher_cache_dir=str(tmp_path / "cache") if cached else None)
        info = cure(student, dense, adapter, calib, cfg)
        curves.append(torch.tensor([[h["kl"], h["tail"]] for h in info["history"]]))
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-6)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 12  # 3 steps x 4 windows, one file each


def test_teacher_cache_top_k_still_lowers_kl_and_cleans_up(tiny_dirs, text_file):
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).glob("foldgpt-teacher-*"))
    dense, student, adapter, calib = _setup(tiny_dirs, text_file)
    info = cure(student, dense, adapter, calib, CureConfig(steps=12, batch_size=4, warmup=2, lr=1e-2,
                                                           teacher_cache=True, teacher_topk=8))
    assert info["kl_last"] < info["kl_first"]
    assert set(Path(tempfile.gettempdir()).glob("foldgpt-teacher-*")) == before
