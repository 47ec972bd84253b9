"""Fitted children (fit.py) and the one search over keep / delete / fitted child (methods/search.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import fast_config
from test_peers import make_ctx

import foldgpt
from foldgpt.checkpoint.modeling_foldgpt import SharedLinear
from foldgpt.errors import FoldGPTError
from foldgpt.methods.search import KEEP, LayerCosts, spend_slack, transitions
from foldgpt.stages.fit import ChildFits, lowrank_fit, lstsq_alpha, whitening
from foldgpt.stages.structure import apply_plan_, unique_params
from foldgpt.stages.weights import clone_sharing_weights


def _data(seed=0, n=400, d_in=24, d_out=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) @ torch.diag(torch.linspace(3.0, 0.05, d_in))  # anisotropic inputs
    w = torch.randn(d_out, d_in, generator=g)
    return x, w


def test_whitened_fit_beats_plain_svd_on_the_activation_error_and_is_exact_at_full_rank():
    x, w = _data()
    cov = x.t().double() @ x.double()
    fit = lowrank_fit(w, *whitening(cov, ridge=1e-9))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for r in (2, 4, 8):
        plain = (u[:, :r] * s[:r]) @ vh[:r]
        b, a = fit.factors(r)
        err_white = ((w - b @ a) @ x.t()).norm()
        err_plain = ((w - plain) @ x.t()).norm()
        assert err_white < err_plain
        assert fit.error(r) == pytest.approx(float(err_white) ** 2, rel=1e-3)  # the error it reports is the real one
    b, a = fit.factors(16)
    assert torch.allclose(b @ a, w, atol=1e-4)


def test_lstsq_alpha_recovers_a_scaled_parent():
    x, w_parent = _data(1)
    noise = 0.01 * torch.randn(w_parent.shape, generator=torch.Generator().manual_seed(3))
    cov = x.t().double() @ x.double()
    assert lstsq_alpha(0.7 * w_parent + noise, w_parent, cov) == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("mode", ["own", "alpha", "shared"])
def test_shared_linear_modes_compute_their_merged_weight(mode):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=True)
    view = SharedLinear(base, rank=3, mode=mode)
    with torch.no_grad():
        view.lora_A.normal_()
        view.lora_B.normal_()
        if mode == "alpha":
            view.alpha.fill_(0.3)
        if mode != "shared":
            view.bias.normal_()
    x = torch.randn(5, 12)
    ref = torch.nn.functional.linear(x, view.merged_weight(), view.merged_bias())
    assert torch.allclose(view(x), ref, atol=1e-5)


def test_transitions_only_save_parameters():
    costs = LayerCosts(block=1000, attn=300, mlp=650, child_base=20, per_rank=10)
    for state in [(KEEP,), ("attn",), ("mlp",), ("child", 30), ("gone",)]:
        for nxt in transitions(state, [30, 10]):
            assert costs.params(nxt) < costs.params(state)
    assert transitions(("gone",), [30]) == []


def test_spend_slack_raises_the_lowest_ranks_within_the_slack():
    costs = [LayerCosts(1000, 300, 650, 20, 10)] * 3
    states = spend_slack([("child", 5), (KEEP,), ("child", 7)], costs, 45)
    assert states == [("child", 8), (KEEP,), ("child", 8)]  # 3 + 1 rank steps = 40 of the 45


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_search_lands_on_the_target_and_the_plan_rebuilds_the_same_model(tiny_dirs, text_file, kind):
    ctx = make_ctx(tiny_dirs[kind], text_file, "foldgpt", target=0.6)
    assert ctx.cfg.ranking.kind == "search"  # the default
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    plan = foldgpt.methods.get_method("foldgpt").run(ctx)
    after = ctx.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # restored
    steps = ctx.info.search["steps"]
    assert steps and all(b["loss"] >= 0 for b in steps)
    assert plan.adapter_init == "fit" and plan.unit == "action"
    student = clone_sharing_weights(ctx.model)
    apply_plan_(student, plan, ctx.adapter, fits=ctx.child_fits())
    target = ctx.budget.target_params
    got = unique_params(student)
    block = ctx.budget.block_params
    assert got <= target and target - got < block  # at the target, within one block's worth of slack
    # a child is worth more than nothing: its fitted factors are non-zero and rebuild identically from the plan
    again = clone_sharing_weights(ctx.model)
    apply_plan_(again, foldgpt.Plan.from_dict(plan.to_dict()), ctx.adapter, fits=ctx.child_fits())
    ids = ctx.calib[:2]
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, again(input_ids=ids).logits)


def test_lazy_search_starts_like_the_exact_search(tiny_dirs, text_file):
    """Step one scores every action in both; the lazy search only re-scores the best ones afterwards."""
    lazy = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    exact = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    exact.cfg.ranking.rescore = 0
    foldgpt.methods.get_method("foldgpt").run(lazy)
    foldgpt.methods.get_method("foldgpt").run(exact)
    a, b = lazy.info.search["steps"], exact.info.search["steps"]
    assert a[0]["layer"] == b[0]["layer"] and a[0]["state"] == b[0]["state"]
    assert sum(s["scored"] for s in a) < sum(s["scored"] for s in b)


def test_a_fitted_plan_needs_calibration_data(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    plan = foldgpt.methods.get_method("foldgpt").run(ctx)
    if not plan.groups:
        pytest.skip("the search chose no child on this model")
    with pytest.raises(FoldGPTError, match="calibration"):
        apply_plan_(clone_sharing_weights(ctx.model), plan, ctx.adapter)


def test_a_child_that_is_a_scaled_copy_of_its_parent_uses_alpha(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    layers = ctx.adapter.layers(ctx.model)
    saved = {p: layers[3].get_submodule(p).weight for p in ctx.adapter.linears}
    try:
        for p in ctx.adapter.linears:
            layers[3].get_submodule(p).weight = torch.nn.Parameter(0.5 * layers[2].get_submodule(p).weight.detach())
        fits = ChildFits(ctx.model, ctx.adapter, ctx.calib[:8], list(ctx.adapter.linears))
        chosen = fits.choose(3, 2, 1, use_parent=True)
        assert all(c.mode == "alpha" and c.alpha == pytest.approx(0.5, abs=1e-3) for c in chosen.values())
        assert all(c.mode == "own" for c in fits.choose(3, 2, 1, use_parent=False).values())
    finally:
        for p, w in saved.items():
            layers[3].get_submodule(p).weight = w


def test_with_ridge_reuses_the_covariances_and_changes_only_the_whitening(tiny_dirs, text_file):
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    fits = ChildFits(ctx.model, ctx.adapter, ctx.calib[:8], list(ctx.adapter.linears))
    path = ctx.adapter.linears[0]
    same, other = fits.with_ridge(fits.ridge), fits.with_ridge(1.0)
    assert other.cov is fits.cov
    assert torch.equal(same.own(2, path).factors(4)[0], fits.own(2, path).factors(4)[0])
    strong = other.own(2, path)
    assert strong.s.shape == fits.own(2, path).s.shape and not torch.allclose(strong.s, fits.own(2, path).s)


def test_compress_with_the_search_saves_a_folder_that_reloads_and_exports(tiny_dirs, text_file, tmp_path):
    res = foldgpt.compress(str(tiny_dirs["qwen2"]), [str(text_file)], tmp_path / "out", fast_config(target_params=0.6))
    model, _ = foldgpt.load(tmp_path / "out")
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    from foldgpt.checkpoint.export import to_dense

    with torch.no_grad():
        a = model(input_ids=ids).logits
        assert torch.allclose(a, res.model(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(a, to_dense(model)(input_ids=ids).logits, atol=1e-4)
    assert res.summary["params_ratio"] <= 0.6


def test_actions_restrict_what_the_search_may_do():
    assert transitions((KEEP,), [8, 4], ("layer", "child")) == [("gone",), ("child", 8), ("child", 4)]
    assert transitions((KEEP,), [8], ("attn",)) == [("attn",)]
    assert transitions(("child", 8), [8, 4], ("child",)) == [("child", 4)]  # no deletion without "layer"
    with pytest.raises(FoldGPTError, match="actions"):
        foldgpt.RankingConfig(actions=["prune"])


def test_cure_trains_fitted_factors_at_a_scaled_learning_rate(tiny_dirs, text_file):
    """The children's fitted factors move less than the rest (child_lr_scale); at 0 they stay as fitted."""
    ctx = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    plan = foldgpt.methods.get_method("foldgpt").run(ctx)
    if not plan.groups:
        pytest.skip("the search chose no child on this model")
    from foldgpt.config import CureConfig
    from foldgpt.stages.cure import cure

    moved = {}
    for scale in (0.0, 1.0):
        student = clone_sharing_weights(ctx.model)
        apply_plan_(student, plan, ctx.adapter, fits=ctx.child_fits())
        views = [m for m in student.modules() if isinstance(m, SharedLinear)]
        before = [v.lora_B.detach().clone() for v in views]
        cure(student, ctx.model, ctx.adapter, ctx.calib[:8], CureConfig(steps=3, batch_size=2, warmup=1,
                                                                        child_lr_scale=scale, teacher_cache=False))
        moved[scale] = max(float((v.lora_B - b).abs().max()) for v, b in zip(views, before))
    assert moved[0.0] == 0.0 and moved[1.0] > 0.0


def test_exchange_rounds_keep_the_target_and_never_raise_the_loss(tiny_dirs, text_file):
    """--refine: an exchange is kept only where the loss falls, so the searched loss is at most the greedy one;
    the model's own weights are back afterwards and the plan still lands on the target."""
    plain = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    refined = make_ctx(tiny_dirs["llama"], text_file, "foldgpt", target=0.6)
    refined.cfg.ranking.refine = 4
    before = {k: v.clone() for k, v in refined.model.state_dict().items()}
    foldgpt.methods.get_method("foldgpt").run(plain)
    plan = foldgpt.methods.get_method("foldgpt").run(refined)
    after = refined.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    greedy = [s for s in plain.info.search["steps"] if "layer" in s]
    steps = refined.info.search["steps"]
    assert steps[: len(greedy)] == greedy  # the same greedy search first
    exchanges = steps[len(greedy):]
    assert all(s["kind"] == "exchange" for s in exchanges)
    losses = [greedy[-1]["loss"]] + [s["loss"] for s in exchanges]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    student = clone_sharing_weights(refined.model)
    apply_plan_(student, plan, refined.adapter, fits=refined.child_fits())
    assert unique_params(student) <= refined.budget.target_params
