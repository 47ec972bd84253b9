"""The architecture contract: every supported family runs the whole pipeline through its adapter alone.

Per family, on a tiny model: the adapter finds the body, layers, Linears, norms and head; a compress with the
default search (deletions and fitted children) saves a folder that reloads with identical logits and exports to an
equal dense checkpoint; layer-deleting peers and training-free compensation run (or refuse in one line)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import fast_config
from test_peers import applied, make_ctx
from tinymodels import save_tiny, tiny_config, tiny_model
from torch import nn

import foldgpt
from foldgpt.adapters import get_adapter, supported_types
from foldgpt.checkpoint.export import export_dense
from foldgpt.config import with_settings
from foldgpt.methods import get_method
from foldgpt.plan import Plan
from foldgpt.scale import placement
from foldgpt.scale.streaming import _final_logits, streamed_hidden_states
from foldgpt.stages.compensate import apply_compensation_
from foldgpt.stages.structure import apply_plan_, unique_params
from foldgpt.stages.weights import clone_sharing_weights

FAMILIES = ["llama", "qwen2", "gemma3", "phi3", "gpt_neox"]
IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(5))
# the default ranking (the search) at 60%; without whole-attention deletions every tiny family's plan then holds
# both deleted units and fitted children (some would otherwise spend the whole budget on one kind of action)
CONFIG = with_settings(fast_config(target_params=0.6), {"ranking.actions": ["layer", "mlp", "child"]})


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def family_dirs(tiny_dirs, tmp_path_factory):
    """A trained tiny model folder per family: conftest's, plus the families only this contract test uses."""
    root = tmp_path_factory.mktemp("families")
    out = {k: v for k, v in tiny_dirs.items() if k in FAMILIES}
    for kind in FAMILIES:
        if kind not in out:
            out[kind] = save_tiny(root / kind, kind, model=tiny_model(kind, layers=6, train_steps=100))
    return out


@pytest.fixture(scope="module")
def compressed(family_dirs, text_file, tmp_path_factory):
    """kind -> (folder, CompressResult), compressed on first use."""
    root, done = tmp_path_factory.mktemp("compressed"), {}

    def get(kind):
        if kind not in done:
            done[kind] = root / kind, foldgpt.compress(str(family_dirs[kind]), [str(text_file)], root / kind, CONFIG)
        return done[kind]

    return get


def test_every_family_is_registered():
    assert {"llama", "qwen2", "gemma3_text", "phi3", "gpt_neox"} <= set(supported_types())
    with pytest.raises(foldgpt.FoldGPTError, match="unsupported model type 'bert'.*supported types"):
        get_adapter("bert")


@pytest.mark.parametrize("kind", FAMILIES)
def test_adapter_finds_the_architecture(kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    ad = get_adapter(model.config)
    layers = ad.layers(model)
    assert len(layers) == model.config.num_hidden_layers == 6
    assert model.get_submodule(ad.layers_path) is layers
    assert set(ad.attn_linears) | set(ad.mlp_linears) == set(ad.linears)
    assert not set(ad.attn_linears) & set(ad.mlp_linears)
    assert ad.attn_out in ad.attn_linears and ad.mlp_out in ad.mlp_linears
    for layer in layers:
        keys = layer.state_dict()
        assert all(isinstance(layer.get_submodule(p), nn.Linear) for p in ad.linears)
        assert all(p.startswith(ad.attn_branch + ".") for p in ad.attn_linears)
        assert all(p.startswith(ad.mlp_branch + ".") for p in ad.mlp_linears)
        assert set(ad.attn_norms) | set(ad.mlp_norms) <= set(ad.norms(layer))
        for point in (ad.attn_gate_point, ad.mlp_gate_point):
            layer.get_submodule(point)
        assert all(k in keys for k in ad.attn_gate_keys + ad.mlp_gate_keys if k.endswith(".weight"))
    assert ad.embed_tokens(model) is model.get_input_embeddings()
    assert ad.rotary_emb(model) is not None
    # layer by layer (the cache keyword dropped), then the final norm and head: the model's own logits
    states = [h for _, h in streamed_hidden_states(model, ad, IDS, "cpu")]
    assert len(states) == 7
    with torch.no_grad():
        torch.testing.assert_close(_final_logits(model, states[-1]), logits(model), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ad.decoder(model)(input_ids=IDS).last_hidden_state,
                                   ad.final_norm(model)(states[-1]), rtol=1e-5, atol=1e-5)
    # every layer offloaded (copied in while it runs) computes the same function
    ref = logits(model)
    placement.apply(model, ad, placement.plan(model, ad, "offload", "cpu"))
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    placement.remove(model)
    # installing a shorter stack re-indexes the positions (each owns its KV cache slot)
    keep = [0, 2, 5]
    ad.set_layers(model, [layers[i] for i in keep], [ad.layer_kinds(model.config)[i] for i in keep])
    assert [layer.get_submodule(ad.attn_branch).layer_idx for layer in ad.layers(model)] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3 and torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_compress_reloads_and_exports_dense(compressed, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    d, res = compressed(kind)
    assert res.plan.removed and res.plan.groups, "the contract needs deletions and fitted children"
    assert res.plan.adapter_init == "fit" and res.plan.child_modes
    model, _ = foldgpt.load(d)
    assert torch.equal(logits(model), logits(res.model))
    assert unique_params(model) == res.summary["unique_params"]
    dense = AutoModelForCausalLM.from_pretrained(export_dense(d, tmp_path / "dense"))
    assert dense.config.model_type == res.model.config.model_type
    assert dense.config.num_hidden_layers == len(get_adapter(model.config).layers(model))
    assert (logits(dense) - logits(model)).abs().max().item() <= 1e-5
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44]])  # the KV cache is indexed by position
    with torch.no_grad():
        a = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=2)
        b = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(a, b)


def test_remote_code_finds_a_body_other_than_model(compressed, tmp_path):
    """GPT-NeoX keeps its layers under `gpt_neox`: the bundled runtime reads where from the layout."""
    d, res = compressed("gpt_neox")
    assert json.loads((d / "config.json").read_text())["fold_layout"]["layers_path"] == "gpt_neox.layers"
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["foldgpt"] = None  # foldgpt is not importable in this process
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(d)!r}, trust_remote_code=True)
        with torch.no_grad():
            torch.save(m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (torch.load(tmp_path / "out.pt") - logits(res.model)).abs().max().item() <= 1e-5


def test_layouts_saved_without_a_layers_path_still_load(compressed, tmp_path):
    d, res = compressed("llama")
    old = tmp_path / "old"
    shutil.copytree(d, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["fold_layout"]["layers_path"]
    (old / "config.json").write_text(json.dumps(cfg))
    model, _ = foldgpt.load(old)
    assert torch.equal(logits(model), logits(res.model))


@pytest.mark.parametrize("method", ["shortgpt", "sleb", "blockpruner", "laco"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_layer_deleting_peers(family_dirs, text_file, kind, method):
    ctx = make_ctx(family_dirs[kind], text_file, method)
    plan = get_method(method).run(ctx)
    student = applied(ctx, plan)
    assert plan.removed and unique_params(student) <= ctx.budget.target_params
    assert torch.isfinite(student(input_ids=ctx.calib[:2]).logits).all()
    if method == "sleb":  # layer by layer (--streaming): the same removals
        streamed = get_method(method).run(make_ctx(family_dirs[kind], text_file, method, streaming=True))
        assert streamed.removed == plan.removed


@pytest.mark.parametrize("kind", FAMILIES)
def test_compensation_merges_or_refuses_in_one_line(family_dirs, kind):
    model, _ = foldgpt.load(family_dirs[kind])
    ad = get_adapter(model.config)
    plan = Plan(6, model.config.model_type, removed=["2", "3"], layer_kinds=ad.layer_kinds(model.config),
                compensation="replaceme")
    student = clone_sharing_weights(model)
    apply_plan_(student, plan, ad)
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    if kind == "gemma3":  # its MLP output passes a post-norm before the residual: no exact merge exists
        with pytest.raises(foldgpt.FoldGPTError, match="--compensate none") as err:
            apply_compensation_(student, model, plan, ad, ids)
        assert "\n" not in str(err.value)
        return
    plain = {k: v.clone() for k, v in student.state_dict().items()}
    (rec,) = apply_compensation_(student, model, plan, ad, ids)
    assert rec["cut_mse_after"] < rec["cut_mse_before"]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, plain[k])}
    down = f"{ad.layers_path}.1.{ad.mlp_out}"  # only the last kept layer's down projection (weight, bias)
    assert f"{down}.weight" in changed and changed <= {f"{down}.weight", f"{down}.bias"}
