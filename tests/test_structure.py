import pytest
import torch
from helpers import fast_config

import foldgpt
from foldgpt.adapters import get_adapter
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.stages.structure import SharedLinear, apply_plan_, unique_params
from foldgpt.stages.weights import clone_sharing_weights


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_children_share_parent_storage_and_count_is_exact(tiny_dirs, kind):
    model, _ = load_model(str(tiny_dirs[kind]))
    adapter = get_adapter(model.config)
    kinds = adapter.layer_kinds(model.config)
    base = unique_params(model)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    # fold two same-kind layers, remove one other layer
    same = [i for i in range(6) if kinds[i] == kinds[0]]
    parent, child = same[0], same[1]
    removed = next(i for i in range(6) if i not in (parent, child))
    rank = 2
    plan = Plan(6, model.config.model_type, removed=[str(removed)], groups=[[parent, child]],
                layer_kinds=kinds, adapter_rank=rank)
    student = clone_sharing_weights(model)
    apply_plan_(student, plan, adapter)
    pos = plan.kept_layers()
    p_layer, c_layer = student.model.layers[pos.index(parent)], student.model.layers[pos.index(child)]
    shared_numel, lora = 0, 0
    for path in adapter.linears:
        view = c_layer.get_submodule(path)
        assert isinstance(view, SharedLinear)
        assert view.base.weight.data_ptr() == p_layer.get_submodule(path).weight.data_ptr()
        shared_numel += sum(p.numel() for p in view.base.parameters())
        lora += rank * (view.in_features + view.out_features)
    # norms are the child's own, initialised from its original norms
    assert c_layer.input_layernorm.weight.data_ptr() != p_layer.input_layernorm.weight.data_ptr()
    assert torch.equal(c_layer.input_layernorm.weight, model.model.layers[child].input_layernorm.weight)
    assert unique_params(student) == base - block - shared_numel + lora


def test_removed_layers_leave_config_consistent(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["gemma3"]))
    adapter = get_adapter(model.config)
    kinds = adapter.layer_kinds(model.config)
    plan = Plan(6, "gemma3_text", removed=["1", "4"], layer_kinds=kinds)
    apply_plan_(model, plan, adapter)
    assert model.config.num_hidden_layers == 4
    assert model.config.layer_types == [kinds[i] for i in (0, 2, 3, 5)]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    out = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert out.shape == (1, 4, model.config.vocab_size)


def test_plan_rejects_mixed_kind_group():
    with pytest.raises(foldgpt.FoldGPTError, match="kinds"):
        Plan(3, "gemma3_text", groups=[[0, 1]], layer_kinds=["sliding_attention", "full_attention", "x"])


def test_budget_hits_target(tiny_dirs, text_file, tmp_path):
    res = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "o",
                           fast_config(target_params=0.7, cure=False))
    assert res.summary["unique_params"] <= 0.7 * res.summary["base_params"]
    assert res.summary["unique_params"] == unique_params(res.model)


def test_svd_initialised_delta_recovers_the_childs_own_weights_at_full_rank(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(model.config)
    original = model.model.layers[2].self_attn.q_proj.weight.detach().clone()
    plan = Plan(6, "llama", groups=[[1, 2]], adapter_rank=32, adapter_init="svd")  # 32 = full rank of q_proj
    student = clone_sharing_weights(model)
    apply_plan_(student, plan, adapter)
    view = student.model.layers[2].self_attn.q_proj
    torch.testing.assert_close(view.merged_weight(), original, rtol=1e-4, atol=1e-5)
    zero = clone_sharing_weights(model)
    apply_plan_(zero, Plan(6, "llama", groups=[[1, 2]], adapter_rank=4), adapter)
    child_w = zero.model.layers[2].self_attn.q_proj.merged_weight()
    assert torch.equal(child_w, model.model.layers[1].self_attn.q_proj.weight)


def test_sublayer_compress_round_trip(tiny_dirs, text_file, tmp_path):
    from helpers import fast_config

    res = foldgpt.compress(str(tiny_dirs["gemma3"]), [str(text_file)], tmp_path / "o",
                           fast_config(ranking="gates", unit="sublayer", gate=foldgpt.GateConfig(steps=8, rounds=2)))
    assert any("." in u for u in res.plan.removed) or res.plan.removed
    model, _ = foldgpt.load(tmp_path / "o")
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - res.model(input_ids=ids).logits).abs().max().item() <= 1e-5
    assert unique_params(model) == res.summary["unique_params"]


def test_sharing_layers_of_different_shapes_is_a_clear_error(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(model.config)
    q = adapter.layers(model)[3].self_attn.q_proj
    adapter.layers(model)[3].self_attn.q_proj = torch.nn.Linear(q.in_features, q.out_features // 2, bias=False)
    plan = Plan(num_layers=6, model_type="llama", groups=[[1, 3]], adapter_rank=2)
    with pytest.raises(foldgpt.FoldGPTError, match="cannot share layer 1's self_attn.q_proj: shapes"):
        apply_plan_(model, plan, adapter)
