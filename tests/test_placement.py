"""Layer placement (--device-map auto|offload): the pure assignment, and offloaded layers that give the same
numbers as a model in one place while holding one layer's weights on the device at a time."""

import pytest
import torch
from helpers import fast_config

import foldgpt
from foldgpt.adapters import get_adapter
from foldgpt.errors import FoldGPTError
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.scale import placement as P
from foldgpt.scale.precision import set_checkpointing
from foldgpt.stages.structure import apply_plan_
from foldgpt.stages.weights import clone_sharing_weights


def test_parse_sizes_and_max_memory():
    assert P.parse_size("2GiB") == 2 * 2**30 and P.parse_size("500MB") == 500 * 10**6 and P.parse_size("1e3") == 1000
    assert P.parse_max_memory("0=1GiB, cuda:1=2GB,cpu=3GiB") == {"cuda:0": 2**30, "cuda:1": 2 * 10**9, "cpu": 3 * 2**30}
    with pytest.raises(FoldGPTError, match="DEVICE=SIZE"):
        P.parse_max_memory("cuda:0")
    with pytest.raises(FoldGPTError, match="30GiB"):
        P.parse_size("lots")


def test_assign_layers_fills_in_order_keeps_groups_together_and_offloads_the_rest():
    sizes = [10, 10, 10, 10, 10, 10]
    assert P.assign_layers(sizes, [("cuda:0", 25), ("cuda:1", 30)]) == \
        ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:1", P.OFFLOAD]
    # layers 1 and 4 share weights: placed as one unit of 20 when layer 1 comes up
    assert P.assign_layers(sizes, [("cuda:0", 25), ("cuda:1", 30)], groups=[[1, 4]]) == \
        ["cuda:0", "cuda:1", "cuda:1", P.OFFLOAD, "cuda:1", P.OFFLOAD]
    with pytest.raises(FoldGPTError, match="fits on no device"):
        P.assign_layers(sizes, [("cuda:0", 25)], allow_offload=False)
    assert P.layer_groups([{1, 2}, {3}, {2, 5}, {6}, {5}]) == [[0, 2, 4], [1], [3]]


def _norm_grads(model, adapter, ids, ckpt):
    norms = [layer.input_layernorm.weight for layer in adapter.layers(model)]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for n in norms:
        n.requires_grad_(True)
    if ckpt:
        set_checkpointing(model, True)
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    if ckpt:
        set_checkpointing(model, False)
    return logits.detach(), [n.grad.clone() for n in norms]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_offloaded_layers_give_the_same_logits_and_gradients(tiny_dirs, kind):
    model, _ = load_model(str(tiny_dirs[kind]))
    adapter = get_adapter(model.config)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, ref_grads = _norm_grads(model, adapter, ids, ckpt=False)
    traffic = P.apply(model, adapter, P.plan(model, adapter, "offload", "cpu"))
    sizes, _, _ = P.layer_bytes(model, adapter)
    for ckpt in (False, True):
        traffic.peak_alive = 0
        logits, grads = _norm_grads(model, adapter, ids, ckpt)
        torch.testing.assert_close(logits, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        # without checkpointing the autograd graph keeps every layer's copy until the backward; with it, one
        if ckpt:
            assert traffic.peak_alive == max(sizes)
        else:
            assert traffic.peak_alive > sum(sizes) - max(sizes)
    assert traffic.alive == 0
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # the originals are back
    P.remove(model)
    assert not any(P.is_placed(layer) for layer in adapter.layers(model))
    torch.testing.assert_close(model(ids).logits, ref)


def test_a_folded_student_follows_its_placed_teacher(tiny_dirs):
    dense, _ = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(dense.config)
    plan = Plan(6, "llama", removed=["4"], groups=[[1, 2]], adapter_rank=2)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = clone_sharing_weights(dense)
    apply_plan_(plain, plan, adapter)
    ref = plain(ids).logits
    P.apply(dense, adapter, P.plan(dense, adapter, "offload", "cpu"))
    student = clone_sharing_weights(dense)
    assert not any(P.is_placed(m) for m in adapter.layers(student))  # the copied hooks were not the student's
    apply_plan_(student, plan, adapter)
    traffic = P.follow(student, adapter, dense)
    assert P.placement_of(student).homes == [P.OFFLOAD] * len(adapter.layers(student))
    torch.testing.assert_close(student(ids).logits, ref)
    assert traffic.copied > 0


def test_compress_with_offloaded_layers_matches_the_plain_run(tiny_dirs, text_file, tmp_path):
    plain = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "a", fast_config(target_params=0.6))
    off = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "b",
                           fast_config(target_params=0.6, device_map="offload"))
    assert off.plan.to_dict()["groups"] == plain.plan.to_dict()["groups"]
    assert off.plan.removed == plain.plan.removed
    for key in ("calib_loss_before_cure", "calib_loss"):
        assert off.summary[key] == pytest.approx(plain.summary[key], rel=1e-4)
    where = off.summary["placement"]
    assert where["layers"] == [P.OFFLOAD] * len(where["layers"])
    # the cure held one layer's weights at a time (a child's counting the parent matrices it borrows)
    biggest = max(sum(p.numel() * p.element_size() for _, p in layer.named_parameters(remove_duplicate=False))
                  for layer in get_adapter(off.model.config).layers(off.model))
    assert 0 < where["offload_peak_bytes"] <= biggest
    assert "placement" not in plain.summary


def test_placement_options_fail_in_one_line(tiny_dirs, text_file, tmp_path):
    with pytest.raises(FoldGPTError, match="needs --device-map auto"):
        fast_config(max_memory="cuda:0=1GiB", device_map="offload")
    with pytest.raises(FoldGPTError, match="use one"):
        fast_config(device_map="offload", streaming=True)
    if not torch.cuda.is_available():
        with pytest.raises(FoldGPTError, match="found no GPU"):
            foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "o",
                             fast_config(device_map="auto"))
        assert not (tmp_path / "o").exists()


def test_a_trial_fold_runs_where_the_borrowed_weights_live(tiny_dirs):
    from foldgpt.stages.fold import borrowed_weights

    model, _ = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with borrowed_weights(layers[3], layers[2], adapter.linears):
        ref = model(ids).logits
    homes = ["cpu", "cpu", P.OFFLOAD, "cpu", "cpu", "cpu"]  # the parent (2) offloaded, the child (3) resident
    traffic = P.apply(model, adapter, P.Placement("cpu", homes))
    before = traffic.copied
    with borrowed_weights(layers[3], layers[2], adapter.linears):
        assert layers[3]._foldgpt_home == P.OFFLOAD
        torch.testing.assert_close(model(ids).logits, ref)
    assert layers[3]._foldgpt_home == "cpu"
    # the parent's weights were copied in twice: for the parent and for the child borrowing them
    sizes, _, _ = P.layer_bytes(model, adapter)
    assert traffic.copied - before >= 2 * sizes[2] - 1024


def test_eval_with_offloaded_layers_gives_the_same_perplexity(tiny_dirs, eval_file, tmp_path):
    import json

    from test_errors import run_cli

    out = {}
    for name, extra in (("plain", []), ("offload", ["--device-map", "offload"])):
        path = tmp_path / f"{name}.json"
        proc = run_cli("eval", tiny_dirs["gemma3"], "--text", eval_file, "--seq-len", "32", "--json", path, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = json.loads(path.read_text())[0]["perplexity"]
    assert out["offload"] == pytest.approx(out["plain"], rel=1e-5)
