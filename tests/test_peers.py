"""Peer methods (ShortGPT, random, angular, SLEB, BlockPruner, LaCo): equal budgets and their defining
behaviour on tiny models."""

import json

import pytest
import torch
from helpers import fast_config

import foldgpt
from foldgpt.adapters import get_adapter
from foldgpt.data import calibration_batches, load_text, needs_bos, tokenize
from foldgpt.methods import METHODS, Context, get_method, make_plan
from foldgpt.methods.blockpruner import sublayer_params
from foldgpt.methods.laco import laco
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.stages.analysis import similarity
from foldgpt.stages.budget import plan_budget
from foldgpt.stages.structure import apply_plan_, unique_params
from foldgpt.stages.weights import clone_sharing_weights

PEERS = ["shortgpt", "random", "angular", "sleb", "blockpruner", "laco"]
TARGET = 0.8
_SESSIONS: dict = {}


def session(path, text_file):
    """Dense model, adapter, calibration windows and similarity of a tiny model folder (cached)."""
    key = str(path)
    if key not in _SESSIONS:
        cfg = fast_config()
        model, tok = load_model(key)
        adapter = get_adapter(model.config)
        bos = needs_bos(tok, adapter.needs_bos)
        ids = tokenize(tok, load_text([str(text_file)]).text)
        calib = calibration_batches(ids, cfg.calib_seqs, cfg.seq_len, cfg.seed, tok.bos_token_id if bos else None)
        sim = similarity(model, adapter, calib[:32], skip_first=bos)
        _SESSIONS[key] = (model, adapter, calib, bos, sim)
    return _SESSIONS[key]


def make_ctx(path, text_file, method: str, target: float = TARGET, **kw) -> Context:
    model, adapter, calib, bos, sim = session(path, text_file)
    cfg = fast_config(method=method, target_params=target, cure=False, **kw)
    m = get_method(method)
    budget = plan_budget(model, adapter, len(adapter.layers(model)), cfg.target_params, cfg.remove_rate,
                         cfg.remove_share, cfg.fold.group_size if m.folds else 1, cfg.fold.adapter_rank,
                         cfg.fold.shared_linears or None, cfg.fold.child_gates)
    return Context(model, adapter, calib, cfg, budget, bos, sim)


def applied(ctx: Context, plan: Plan):
    student = clone_sharing_weights(ctx.model)
    apply_plan_(student, plan, ctx.adapter)
    return student


def test_every_peer_is_registered():
    for name in PEERS:
        assert name in METHODS and not METHODS[name].folds and not METHODS[name].cures_by_default


@pytest.mark.parametrize("method,kind", [(m, "llama") for m in PEERS]
                         + [("blockpruner", "gemma3"), ("laco", "qwen2"), ("laco", "gemma3")])
def test_peer_hits_the_target_count_exactly(tiny_dirs, text_file, method, kind):
    ctx = make_ctx(tiny_dirs[kind], text_file, method)
    plan = get_method(method).run(ctx)
    student = applied(ctx, plan)
    b = ctx.budget
    uniq = unique_params(student)
    assert uniq <= b.target_params
    if method == "blockpruner":
        assert plan.unit == "sublayer"
        # a plan rebuilt from a bench row's removed units (a resumed bench) records the same unit
        rebuilt = make_plan(ctx.cfg, ctx.model, ctx.adapter, list(plan.removed), [], method="blockpruner")
        assert rebuilt.unit == "sublayer" and rebuilt.removed == plan.removed
        costs = dict(zip([f"{i}.{p}" for i in range(ctx.num_layers) for p in ("attn", "mlp")],
                         sublayer_params(ctx.model, ctx.adapter)))
        order = sorted(plan.scores, key=plan.scores.get)
        assert uniq == b.base_params - sum(costs[u] for u in order)
        assert uniq + costs[order[-1]] > b.target_params  # one unit less would exceed the target
        # a layer that lost both sub-blocks is removed whole
        for layer, parts in plan.removed_sublayers().items():
            assert len(parts) == 1, (layer, parts)
    else:
        assert len(plan.removed_layers()) == len(plan.removed) == b.n_remove
        assert uniq == b.base_params - b.n_remove * b.block_params
        assert uniq + b.block_params > b.target_params
    ids = ctx.calib[:2]
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()


def test_sleb_removes_the_planted_useless_layer_first(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama-zero2"], text_file, "sleb")
    plan = get_method("sleb").run(ctx)
    first = min(plan.scores, key=plan.scores.get)
    assert first == "2"


def test_blockpruner_removes_the_planted_sub_blocks_first(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama-zero2"], text_file, "blockpruner")
    plan = get_method("blockpruner").run(ctx)
    order = sorted(plan.scores, key=plan.scores.get)
    assert set(order[:2]) == {"2.attn", "2.mlp"}
    assert "2" in plan.removed and not any(u.startswith("2.") for u in plan.removed)


def test_single_sub_block_removal_runs_and_counts(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["gemma3"]))
    adapter = get_adapter(model.config)
    kinds = adapter.layer_kinds(model.config)
    costs = sublayer_params(model, adapter)
    base = unique_params(model)
    plan = Plan(6, model.config.model_type, removed=["1.attn", "3.mlp"], layer_kinds=kinds, unit="sublayer")
    student = clone_sharing_weights(model)
    apply_plan_(student, plan, adapter)
    assert len(student.model.layers) == 6
    assert unique_params(student) == base - costs[2 * 1] - costs[2 * 3 + 1]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        out = student(input_ids=ids).logits
        dense = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)


def test_laco_merges_by_the_rdsc_formula(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama"]))
    adapter = get_adapter(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Plan(6, model.config.model_type, removed=["3", "4"], merges=[[2, 3, 4]],
                layer_kinds=adapter.layer_kinds(model.config))
    assert plan.version >= 2 and plan.layer_map()[2]["merged_from"] == [2, 3, 4]
    student = clone_sharing_weights(model)
    apply_plan_(student, plan, adapter)
    L = model.model.layers
    for path in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        t = [L[i].get_parameter(path).detach() for i in (2, 3, 4)]
        expected = t[0] + ((t[1] - t[0]) + (t[2] - t[0]))
        torch.testing.assert_close(student.model.layers[2].get_parameter(path), expected, rtol=0, atol=1e-6)
    assert len(student.model.layers) == 4
    assert torch.equal(student.model.layers[3].self_attn.q_proj.weight, L[5].self_attn.q_proj.weight)
    # the dense teacher (which shares its Linear weights with the student) is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # re-applying the plan to the same base model reproduces the same weights
    again = clone_sharing_weights(model)
    apply_plan_(again, plan, adapter)
    for (k, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    block = sum(p.numel() for p in L[0].parameters())
    assert unique_params(student) == unique_params(model) - 2 * block


@pytest.mark.parametrize("removed,merges,match", [
    (["3", "4"], [[3, 4]], "removes"),  # the head is removed
    (["4"], [[2, 3, 4]], "removed whole"),  # a merged layer is kept
    (["3.attn", "4"], [[2, 3, 4]], "removed whole"),  # a merged layer only loses a sub-block
    (["3", "4"], [[2, 3], [3, 4]], "another merge|removes"),
    (["3"], [[3, 2]], "increasing"),
])
def test_plan_rejects_bad_merges(removed, merges, match):
    with pytest.raises(foldgpt.FoldGPTError, match=match):
        Plan(6, "llama", removed=removed, merges=merges)


def test_laco_lowers_the_threshold_to_hit_the_budget(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "laco", target=0.6)
    merges, record = laco(ctx, threshold=0.99999)
    assert sum(len(m) - 1 for m in merges) == ctx.budget.n_remove
    assert len(record["thresholds_tried"]) > 1 and record["threshold_used"] < 0.99999
    assert all(s > record["threshold_used"] for s in record["similarity"])


@pytest.mark.parametrize("method", ["blockpruner", "laco"])
def test_protected_layers_are_never_touched(tiny_dirs, text_file, method):
    ctx = make_ctx(tiny_dirs["llama"], text_file, method, target=0.6, protect_ends=True)
    plan = get_method(method).run(ctx)
    touched = {int(u.split(".")[0]) for u in plan.removed} | {i for m in plan.merges for i in m}
    assert touched and not touched & {0, 5}
    assert unique_params(applied(ctx, plan)) <= ctx.budget.target_params


def test_laco_deep_budget_uses_short_last_merge(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "laco", target=0.5)
    assert ctx.budget.n_remove == 4
    plan = get_method("laco").run(ctx)
    assert len(plan.removed) == 4 and plan.kept_layers() == [m[0] for m in plan.merges]
    assert unique_params(applied(ctx, plan)) == ctx.budget.base_params - 4 * ctx.budget.block_params


def test_laco_plan_round_trip(tiny_dirs, text_file, tmp_path):
    cfg = fast_config(method="laco", target_params=TARGET, cure=False)
    first = foldgpt.compress(str(tiny_dirs["qwen2"]), [str(text_file)], tmp_path / "a", cfg)
    assert first.plan.merges and first.plan.method == "laco"
    saved = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert saved["merges"] == first.plan.merges
    again = foldgpt.compress(str(tiny_dirs["qwen2"]), [str(text_file)], tmp_path / "b", cfg,
                             plan=tmp_path / "a" / "plan.json")
    loaded, _ = foldgpt.load(tmp_path / "a")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = first.model(input_ids=ids).logits
        assert torch.equal(ref, again.model(input_ids=ids).logits)
        assert torch.equal(ref, loaded(input_ids=ids).logits)
    assert unique_params(loaded) == first.summary["unique_params"]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["sleb", "blockpruner"])
def test_prefix_cached_and_streamed_greedy_scores_equal_whole_forwards(tiny_dirs, text_file, kind, method):
    """The default scorer (cached prefix inputs) and --streaming give the removal order and NLLs of whole
    forward passes."""
    results = []
    for streaming, whole in ((False, True), (False, False), (True, False)):
        ctx = make_ctx(tiny_dirs[kind], text_file, method, streaming=streaming)
        plan = get_method(method).run(ctx, whole_forward=whole)
        results.append((plan.removed, plan.scores, getattr(ctx.info, method)["nll"]))
    for r in results[1:]:
        assert r[0] == results[0][0] and r[1] == results[0][1]
        torch.testing.assert_close(torch.tensor(r[2]), torch.tensor(results[0][2]), rtol=1e-4, atol=1e-5)


def test_streaming_refuses_methods_that_train_through_the_model(tiny_dirs, text_file, tmp_path):
    with pytest.raises(foldgpt.FoldGPTError, match="--streaming runs"):
        foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "out",
                         fast_config(method="foldgpt", streaming=True))
    assert not (tmp_path / "out").exists()
