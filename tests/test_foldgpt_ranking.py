"""FoldGPT's greedy ranking (`--ranking greedy`, the ablation of the default search): greedy calibration NLL,
fold-or-delete by measured cost, child branch gates."""

import pytest
import torch
from helpers import fast_config
from test_peers import applied
from test_peers import make_ctx as _make_ctx

import foldgpt
from foldgpt.adapters import get_adapter
from foldgpt.methods import get_method
from foldgpt.methods import greedy as greedy_mod
from foldgpt.methods.children import CHILD_GATE_GRID
from foldgpt.models import load_model
from foldgpt.plan import Plan
from foldgpt.stages.cure import trainable_parameters
from foldgpt.stages.structure import unique_params


def make_ctx(*args, searches=None, **kw):
    kw.setdefault("ranking", "greedy")
    ctx = _make_ctx(*args, **kw)
    ctx.searches = searches
    return ctx


IDS = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(5))


def test_greedy_foldgpt_folds_back_removed_layers_with_measured_gates(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6, unit="layer")
    b = ctx.budget
    assert b.n_fold >= 1
    plan = get_method("foldgpt").run(ctx)
    order = ctx.info.ranking["order"]
    children = {c: g[0] for g in plan.groups for c in g[1:]}
    assert len(order) == b.n_remove + b.n_fold
    # deleted layers and children are exactly the greedy ranking's removals; parents are kept layers
    assert sorted(plan.removed_layers() | set(children)) == sorted(order)
    assert len(children) == b.n_fold and not set(children.values()) & set(order)
    # every child's gate is the measured best of the grid (or 0 = deletion), never worse than deleting it
    for c, p in children.items():
        found = ctx.info.child_search[f"{p}->{c}"]
        assert plan.child_gates[str(c)] == found["gate"] in (0.0, *CHILD_GATE_GRID)
        assert found["nll"] <= found["nll_deleted"]
    student = applied(ctx, plan)
    assert unique_params(student) == b.predicted_params <= b.target_params
    for c in children:
        layer = student.model.layers[plan.kept_layers().index(c)]
        assert layer.child_gate.item() == pytest.approx(plan.child_gates[str(c)])
        assert any(p is layer.child_gate for p in trainable_parameters(student, ctx.adapter, True))


def test_greedy_ranking_equals_sleb_at_the_same_depth(tiny_dirs, text_file):
    """FoldGPT's greedy ranking is the SLEB search (shared: with one SearchCache it runs once)."""
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6, unit="layer")
    get_method("foldgpt").run(ctx)
    total = ctx.budget.n_remove + ctx.budget.n_fold
    sctx = make_ctx(tiny_dirs["llama"], text_file, "sleb", target=0.6)
    sctx.budget.n_remove = total
    sleb = get_method("sleb").run(sctx)
    assert sorted(int(u) for u in sleb.removed) == sorted(ctx.info.ranking["order"])


def test_greedy_search_is_reused_and_continued(tiny_dirs, text_file, monkeypatch):
    cache = greedy_mod.SearchCache()
    ctx = make_ctx(tiny_dirs["llama"], text_file, "sleb", target=0.6, searches=cache)
    calls = []
    real = greedy_mod._search

    def counting(*a, **k):
        calls.append(len(a[-1][0]))  # how many steps it started from
        return real(*a, **k)

    monkeypatch.setattr(greedy_mod, "_search", counting)
    costs = [1.0] * ctx.num_layers
    two, nll2 = greedy_mod.greedy_removal(ctx, "layer", costs, 2, "t")
    one, nll1 = greedy_mod.greedy_removal(ctx, "layer", costs, 1, "t")  # a prefix: no search
    three, _ = greedy_mod.greedy_removal(ctx, "layer", costs, 3, "t")  # continues from the two steps
    assert calls == [0, 2]
    assert ctx.info.reused_search_seconds > 0  # a reuse reports what the search cost when it ran
    assert one == two[:1] and nll1 == nll2[:1] and three[:2] == two
    ctx.searches = None  # no cache: the search runs again, to the same answer
    fresh, _ = greedy_mod.greedy_removal(ctx, "layer", costs, 3, "t")
    assert fresh == three and calls == [0, 2, 0]


def test_a_stopped_greedy_search_continues_from_disk(tiny_dirs, text_file, monkeypatch, tmp_path):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "sleb", target=0.6)
    calls = []
    real = greedy_mod._search

    def counting(*a, **k):
        calls.append(len(a[-1][0]))
        return real(*a, **k)

    monkeypatch.setattr(greedy_mod, "_search", counting)
    costs = [1.0] * ctx.num_layers
    ctx.searches = greedy_mod.SearchCache(tmp_path / "search")
    two, _ = greedy_mod.greedy_removal(ctx, "layer", costs, 2, "t")
    assert len(list((tmp_path / "search").glob("search-*.json"))) == 1
    ctx.searches = greedy_mod.SearchCache(tmp_path / "search")  # a new process: only the file is left
    again, _ = greedy_mod.greedy_removal(ctx, "layer", costs, 2, "t")
    three, _ = greedy_mod.greedy_removal(ctx, "layer", costs, 3, "t")
    assert calls == [0, 2] and again == two and three[:2] == two
    other = make_ctx(tiny_dirs["llama"], text_file, "sleb", target=0.6)
    other.calib = other.calib.flip(0)  # other windows: another file
    other.searches = greedy_mod.SearchCache(tmp_path / "search")
    greedy_mod.greedy_removal(other, "layer", costs, 1, "t")
    assert calls[-1] == 0 and len(list((tmp_path / "search").glob("search-*.json"))) == 2


@pytest.mark.parametrize("kind,plan_kw", [
    ("llama", dict(removed=["1"], groups=[[4, 3]], child_gates={"3": 0.5})),  # the child sits below its parent
    ("gemma3", dict(removed=["2"], groups=[[1, 0], [4, 3]], child_gates={"0": 0.25, "3": 0.75})),
    # sliding-window children on global layers' weights (--fold-across-kinds); each keeps its own kind
    ("gemma3", dict(removed=["0"], groups=[[2, 1], [5, 3, 4]], child_gates={"1": 0.5, "3": 1.0, "4": 0.25},
                    across_kinds=True)),
])
def test_child_gates_save_load_and_dense_export(tiny_dirs, text_file, tmp_path, kind, plan_kw):
    from transformers import AutoModelForCausalLM

    from foldgpt.checkpoint.export import export_dense

    model, _ = load_model(str(tiny_dirs[kind]))
    kinds = get_adapter(model.config).layer_kinds(model.config)
    plan = Plan(num_layers=6, model_type=model.config.model_type, layer_kinds=kinds, adapter_rank=2, **plan_kw)
    assert plan.version == 3
    res = foldgpt.compress(str(tiny_dirs[kind]), [str(text_file)], tmp_path / "o", fast_config(cure=False), plan=plan)
    with torch.no_grad():
        ref = res.model(input_ids=IDS).logits
        loaded, _ = foldgpt.load(tmp_path / "o")
        assert (loaded(input_ids=IDS).logits - ref).abs().max().item() <= 1e-5
        gates = {c: loaded.model.layers[plan.kept_layers().index(int(c))].child_gate.item() for c in plan.child_gates}
        assert gates == pytest.approx(plan.child_gates)
        dense = AutoModelForCausalLM.from_pretrained(export_dense(tmp_path / "o", tmp_path / "dense"))
        assert (dense(input_ids=IDS).logits - ref).abs().max().item() <= 1e-4
    # a gate of 0.5 changes the function: the gate is not a no-op
    half = Plan.from_dict({**plan.to_dict(), "child_gates": {c: 1.0 for c in plan.child_gates}})
    full = foldgpt.compress(str(tiny_dirs[kind]), [str(text_file)], tmp_path / "f", fast_config(cure=False), plan=half)
    with torch.no_grad():
        assert (full.model(input_ids=IDS).logits - ref).abs().max().item() > 1e-3


def test_plan_rejects_gates_on_non_children():
    with pytest.raises(foldgpt.FoldGPTError, match="not a folded child"):
        Plan(num_layers=4, model_type="llama", groups=[[0, 1]], child_gates={"2": 0.5})
    with pytest.raises(foldgpt.FoldGPTError, match="parent, then"):
        Plan(num_layers=4, model_type="llama", groups=[[1, 1]])


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_greedy_sublayer_ranking_is_blockpruners_search_plus_whole_layer_children(tiny_dirs, text_file, kind):
    ctx = make_ctx(tiny_dirs[kind], text_file, "foldgpt", target=0.5, unit="sublayer")
    b = ctx.budget
    assert b.n_fold >= 1
    plan = get_method("foldgpt").run(ctx)
    assert plan.unit == "sublayer"
    order = ctx.info.ranking["order"]
    bctx = make_ctx(tiny_dirs[kind], text_file, "blockpruner", target=0.5)
    bp = get_method("blockpruner").run(bctx).scores
    assert order[: len(bp)] == sorted(bp, key=bp.get)  # the same search (it may go on to pay for the children)
    children = {c: g[0] for g in plan.groups for c in g[1:]}
    assert children
    partial = plan.removed_sublayers()
    for c, p in children.items():  # a child is a whole layer the search removed; its parent a whole kept layer
        assert {f"{c}.attn", f"{c}.mlp"} <= set(order) and p not in partial and p not in plan.removed_layers()
        found = ctx.info.child_search[f"{p}->{c}"]
        assert plan.child_gates[str(c)] == found["gate"] and found["nll"] <= found["nll_deleted"]
    # every removed sub-block is either deleted or (as part of a whole layer) folded back
    halves = ("attn", "mlp")
    deleted = {u for u in plan.removed if "." in u} | {f"{i}.{h}" for i in plan.removed_layers() for h in halves}
    assert deleted | {f"{c}.{h}" for c in children for h in halves} == set(order)
    assert unique_params(applied(ctx, plan)) <= b.target_params


def test_greedy_sublayer_ranking_needs_a_target(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=None, remove_rate=0.25,
                   unit="sublayer")
    with pytest.raises(foldgpt.FoldGPTError, match="needs --target-params"):
        get_method("foldgpt").run(ctx)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_auto_unit_folds_sub_blocks_only_when_their_nll_rise_is_clearly_smaller(tiny_dirs, text_file, kind,
                                                                                monkeypatch):
    """The default `--unit auto` runs both greedy searches and folds the sub-block one only when its NLL rise over
    the dense model is at most AUTO_SUBLAYER_RISE x the layer search's; its plan is then exactly the plan of the
    chosen unit alone."""
    from foldgpt.methods import greedy_fold as gf

    ctx = make_ctx(tiny_dirs[kind], text_file, "foldgpt", target=0.5, unit="auto")
    assert foldgpt.CompressConfig().ranking.unit == "auto"  # the default
    plan = get_method("foldgpt").run(ctx)
    choice = ctx.info.unit_choice
    ends, dense = choice["end_nll"], choice["dense_nll"]
    assert dense == pytest.approx(greedy_mod.calibration_nll(ctx.model, ctx.calib[: ctx.cfg.fold.cost_batch * 4]))
    ratio = (ends["sublayer"] - dense) / (ends["layer"] - dense)
    assert choice["rise_ratio"] == pytest.approx(ratio)
    assert choice["chosen"] == plan.unit == ("sublayer" if ratio <= gf.AUTO_SUBLAYER_RISE else "layer")
    plans = {}
    cache = greedy_mod.SearchCache()
    for unit in ("layer", "sublayer"):
        uctx = make_ctx(tiny_dirs[kind], text_file, "foldgpt", target=0.5, unit=unit, searches=cache)
        alone = get_method("foldgpt").run(uctx)
        assert uctx.info.ranking["nll"][-1] == pytest.approx(ends[unit])  # each search as it runs alone
        plans[unit] = (alone.removed, alone.groups, alone.child_gates)
    assert (plan.removed, plan.groups, plan.child_gates) == plans[plan.unit]
    # either way round the threshold, the plan is the chosen unit's (both searches now come from the cache)
    for limit, unit in ((ratio - 0.01, "layer"), (ratio + 0.01, "sublayer")):
        monkeypatch.setattr(gf, "AUTO_SUBLAYER_RISE", limit)
        forced = get_method("foldgpt").run(make_ctx(tiny_dirs[kind], text_file, "foldgpt", target=0.5,
                                                    unit="auto", searches=cache))
        assert forced.unit == unit and (forced.removed, forced.groups, forced.child_gates) == plans[unit]
    # both searches are timed: a run that reuses them counts what each cost when it ran
    rctx = make_ctx(tiny_dirs[kind], text_file, "foldgpt", target=0.5, unit="auto", searches=cache)
    get_method("foldgpt").run(rctx)
    clocks = [s.seconds[-1] for s in cache.searches.values()]  # each search's seconds when it ran
    assert len(clocks) == 2 and rctx.info.reused_search_seconds == pytest.approx(sum(clocks))


def test_compress_records_the_auto_units_choice(tiny_dirs, text_file, tmp_path):
    # the greedy ranking with the default unit, auto (the default ranking, the search, has no units to choose)
    cfg = fast_config(target_params=0.5, ranking="greedy", unit="auto")
    assert cfg.ranking.unit == foldgpt.RankingConfig().unit == "auto"
    res = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "o", cfg)
    saved = Plan.load(tmp_path / "o" / "plan.json")
    choice = saved.provenance["unit_choice"]
    assert choice["chosen"] == saved.unit == res.plan.unit and set(choice["end_nll"]) == {"layer", "sublayer"}


def test_auto_unit_ranks_layers_without_a_target(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=None, remove_rate=0.25,
                   unit="auto")
    plan = get_method("foldgpt").run(ctx)
    assert plan.unit == "layer" and ctx.info.ranking["unit"] == "layer" and ctx.info.unit_choice is None


def test_compress_reports_child_gates_before_and_after_the_cure(tiny_dirs, text_file, tmp_path):
    # the greedy ranking's children carry measured branch gates (the search's fitted children do not)
    res = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "o",
                           fast_config(target_params=0.6, ranking="greedy"))
    gates = res.summary["child_gates"]
    assert gates and set(gates) == set(res.plan.child_gates)
    assert all(v["start"] == res.plan.child_gates[c] for c, v in gates.items())
    assert any(v["end"] != v["start"] for v in gates.values())  # the cure trains them
    assert foldgpt.api.info(tmp_path / "o")["child_gates"] == gates


def test_children_borrow_another_attention_kind_only_when_allowed(tiny_dirs, text_file, monkeypatch):
    from foldgpt.methods.children import neighbours

    kinds = ["s", "s", "g", "s", "s", "g"]
    assert neighbours(3, [2, 5], kinds) == []  # no sliding-window layer kept: nothing to borrow
    assert neighbours(3, [1, 2, 5], kinds) == [1]
    assert neighbours(3, [1, 2, 5], kinds, across_kinds=True) == [1, 2, 5]
    with pytest.raises(foldgpt.FoldGPTError, match="mixes attention kinds.*--fold-across-kinds"):
        Plan(num_layers=6, model_type="gemma3_text", layer_kinds=kinds, groups=[[2, 1]])
    # tiny Gemma-3 (sliding, sliding, global, ...) when the ranking removed every sliding-window layer: no
    # same-kind parent is left, so only borrowing the global layers folds the budgeted children back
    import dataclasses

    import foldgpt.methods.greedy_fold as gf

    monkeypatch.setattr(gf, "greedy_removal", lambda ctx, *a, **k: ([0, 1, 3, 4], [0.0] * 4))
    folded = {}
    for across in (False, True):
        ctx = make_ctx(tiny_dirs["gemma3"], text_file, "foldgpt", target=0.5)
        ctx.budget = dataclasses.replace(ctx.budget, n_remove=2, n_fold=2)
        ctx.cfg.fold.across_kinds = across
        plan = get_method("foldgpt").run(ctx)
        folded[across] = {c: g[0] for g in plan.groups for c in g[1:]}
        assert plan.across_kinds is across
        applied(ctx, plan)  # mixed groups apply
    assert folded[False] == {}
    assert len(folded[True]) == 2 and set(folded[True].values()) == {2, 5}
