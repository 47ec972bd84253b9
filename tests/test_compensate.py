"""Training-free compensation of deleted spans (ReplaceMe, LinearPatch): the solves, the exact merge into the
down projection, the effect on tiny models, the plan/config/CLI plumbing and the compress round trip."""

import json

import pytest
import torch
from helpers import fast_config
from test_peers import session as _peer_session

import foldgpt
from foldgpt.adapters import get_adapter
from foldgpt.methods import METHODS, Context, get_method, make_plan
from foldgpt.pipeline import calibration_loss
from foldgpt.plan import COMPENSATION_VERSION, Plan
from foldgpt.stages.budget import plan_budget
from foldgpt.stages.compensate import (
    CutStats,
    apply_compensation_,
    check_compensable,
    hadamard,
    merge_into_down_,
    removed_spans,
    solve_least_squares,
    solve_linearpatch,
)
from foldgpt.stages.structure import apply_plan_, unique_params
from foldgpt.stages.weights import clone_sharing_weights


def session(path, text_file):
    """Dense model, adapter, calibration windows and BOS flag of a tiny model folder (test_peers caches it)."""
    return _peer_session(path, text_file)[:4]


def build(model, adapter, removed, mode="", groups=()):
    plan = Plan(len(adapter.layers(model)), model.config.model_type, removed=list(removed),
                groups=[list(g) for g in groups], layer_kinds=adapter.layer_kinds(model.config), compensation=mode)
    student = clone_sharing_weights(model)
    apply_plan_(student, plan, adapter)
    return plan, student


@torch.no_grad()
def cut_error(student, dense, adapter, position, last, ids) -> float:
    """Mean over tokens of ||student state after `position` - dense state after layer `last`||^2."""
    got, want = {}, {}
    hs = adapter.layers(student)[position].register_forward_hook(lambda m, a, o: got.setdefault("h", o))
    hd = adapter.layers(dense)[last].register_forward_hook(lambda m, a, o: want.setdefault("h", o))
    try:
        student(input_ids=ids)
        dense(input_ids=ids)
    finally:
        hs.remove()
        hd.remove()
    g = got["h"][0] if isinstance(got["h"], tuple) else got["h"]
    w = want["h"][0] if isinstance(want["h"], tuple) else want["h"]
    return ((g.double() - w.double()) ** 2).sum(-1).mean().item()


# ---- pure math ------------------------------------------------------------------------------------------------
def test_least_squares_recovers_a_known_map():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    t_true = torch.randn(16, 16, generator=g, dtype=torch.float64)
    y = m @ t_true + 1e-3 * torch.randn(2000, 16, generator=g, dtype=torch.float64)
    stats = CutStats(m.T @ m, m.T @ y, float((y * y).sum()), 2000)
    t = solve_least_squares(stats.mtm, stats.mty, ridge=1e-8)
    torch.testing.assert_close(t, t_true, rtol=0, atol=1e-3)
    # the closed-form error matches the direct one (T and the identity = plain deletion)
    assert stats.error(t) == pytest.approx(((m @ t - y) ** 2).sum().item() / 2000, rel=1e-6)
    assert stats.error() == pytest.approx(((m - y) ** 2).sum().item() / 2000, rel=1e-9)
    assert stats.error(t) < 2e-5 and stats.error() > 1.0  # the noise floor (16 x 1e-6) vs the map
    # a dead MLP (M = 0): the identity, not a singular solve
    assert torch.equal(solve_least_squares(torch.zeros(4, 4), torch.zeros(4, 4)), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("dim", [16, 24])
def test_rotation_and_linearpatch_form(dim):
    h = hadamard(dim)
    torch.testing.assert_close(h @ h.T, dim * torch.eye(dim, dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.equal(h, hadamard(dim))  # fixed seed: reproducible
    if dim == 16:
        assert set(h.unique().tolist()) == {-1.0, 1.0}  # Sylvester
    g = torch.Generator().manual_seed(1)
    abs_m = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    d = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    p = solve_linearpatch(abs_m, abs_m * d, h)
    torch.testing.assert_close(p, p.T)
    # P = H diag(d) H^T / dim: eigenvectors are H's columns, eigenvalues d
    torch.testing.assert_close(p @ h, h * d, rtol=0, atol=1e-9)
    torch.testing.assert_close(solve_linearpatch(abs_m, abs_m, h), torch.eye(dim, dtype=torch.float64),
                               rtol=0, atol=1e-9)  # nothing to scale: the identity


@pytest.mark.parametrize("bias", [False, True])
def test_merge_into_down_is_exact_and_installs_new_parameters(bias):
    from tinymodels import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", layers=2)
    cfg.mlp_bias = bias
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    adapter = get_adapter(model.config)
    layer = model.model.layers[0]
    if bias:
        torch.nn.init.normal_(layer.mlp.down_proj.bias)
    old_w, old_b = layer.mlp.down_proj.weight, layer.mlp.down_proj.bias
    old_copy = old_w.detach().clone()
    x = torch.randn(5, 32)
    t = torch.randn(32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = (layer.mlp(x).double() @ t).float()
        merge_into_down_(layer, adapter, t)
        got = layer.mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.mlp.down_proj.weight is not old_w and torch.equal(old_w, old_copy)
    assert isinstance(layer.mlp.down_proj.weight, torch.nn.Parameter)
    assert (layer.mlp.down_proj.bias is not old_b) if bias else layer.mlp.down_proj.bias is None


def test_removed_spans():
    plan = Plan(8, "llama", removed=["0", "2", "3", "4.attn", "5", "6"])
    assert removed_spans(plan) == [(0, 0), (2, 3), (5, 6)]


# ---- on tiny models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["replaceme", "linearpatch"])
def test_compensation_lowers_the_cut_error_and_the_loss(tiny_dirs, text_file, mode):
    model, adapter, calib, bos = session(tiny_dirs["llama"], text_file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, held = calib[:32], calib[32:48]
    plan, plain = build(model, adapter, ["2", "3"], mode)
    _, student = build(model, adapter, ["2", "3"], mode)
    records = apply_compensation_(student, model, plan, adapter, ids, skip_first=bos)
    (rec,) = records
    assert rec["span"] == [2, 3] and rec["layer"] == 1 and rec["tokens"] == ids.numel()
    assert rec["cut_mse_after"] < rec["cut_mse_before"]
    # measured independently: the state the student carries into its cut (position 1) vs the dense h_4
    e_plain = cut_error(plain, model, adapter, 1, 3, ids)
    e_comp = cut_error(student, model, adapter, 1, 3, ids)
    assert e_plain == pytest.approx(rec["cut_mse_before"], rel=1e-4)
    assert e_comp == pytest.approx(rec["cut_mse_after"], rel=1e-3)
    if mode == "replaceme":  # what least squares minimises, by a wide margin
        assert e_comp < 0.5 * e_plain
    # ... and the calibration loss on windows the statistics did not see
    assert calibration_loss(student, held) < calibration_loss(plain, held) - 0.02
    # no parameter added; only layer 1's down projection changed; the dense teacher untouched
    assert unique_params(student) == unique_params(plain)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_several_spans_are_compensated_in_order(tiny_dirs, text_file):
    model, adapter, calib, bos = session(tiny_dirs["llama"], text_file)
    plan, student = build(model, adapter, ["2", "4"], "replaceme")
    records = apply_compensation_(student, model, plan, adapter, calib[:16], skip_first=bos)
    assert [r["span"] for r in records] == [[2, 2], [4, 4]] and [r["layer"] for r in records] == [1, 3]
    assert all(r["cut_mse_after"] < r["cut_mse_before"] for r in records)
    # the second span's statistics come from the student with the first one compensated
    assert cut_error(student, model, adapter, 2, 4, calib[:16]) == pytest.approx(records[1]["cut_mse_after"],
                                                                                 rel=1e-3)


@pytest.mark.parametrize("removed,groups,reason", [
    (["0", "1"], [], "layer 0"),
    (["1.mlp", "2", "3"], [], "lost its MLP"),
    (["2", "3"], [[1, 4]], "shared with a folded child"),
    (["2", "3"], [[0, 1]], "folded child"),
])
def test_spans_without_an_exact_merge_are_skipped(tiny_dirs, text_file, removed, groups, reason):
    model, adapter, calib, bos = session(tiny_dirs["llama"], text_file)
    plan, student = build(model, adapter, removed, "replaceme", groups)
    ref = {k: v.clone() for k, v in student.state_dict().items()}
    (rec,) = apply_compensation_(student, model, plan, adapter, calib[:4], skip_first=bos)
    assert reason in rec["skipped"]
    for k, v in student.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_gemma3_refuses_in_one_line(tiny_dirs, text_file, tmp_path):
    model, adapter, calib, bos = session(tiny_dirs["gemma3"], text_file)
    plan, student = build(model, adapter, ["2", "3"], "replaceme")
    with pytest.raises(foldgpt.FoldGPTError, match="gemma3_text") as err:
        apply_compensation_(student, model, plan, adapter, calib[:4])
    assert "\n" not in str(err.value) and "post_feedforward_layernorm" in str(err.value)
    check_compensable(get_adapter("llama"), "llama", "linearpatch")  # no error
    for kw in ({"method": "replaceme"}, {"method": "shortgpt", "compensate": "linearpatch"}):
        with pytest.raises(foldgpt.FoldGPTError, match="gemma3_text"):
            foldgpt.compress(str(tiny_dirs["gemma3"]), [str(text_file)], tmp_path / "g",
                             fast_config(target_params=0.8, cure=False, **kw))
        assert not (tmp_path / "g").exists()


def test_cli_reports_the_refusal_as_one_line(tiny_dirs, text_file, tmp_path, capsys):
    from foldgpt.cli import main

    rc = main(["compress", str(tiny_dirs["gemma3"]), "--text", str(text_file), "--out", str(tmp_path / "g"),
               "--method", "sleb", "--compensate", "replaceme", "--seq-len", "32", "--calib-seqs", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("foldgpt: error:") and "gemma3_text" in err[-1]


# ---- methods, plan, config, CLI -----------------------------------------------------------------------------------
def test_peers_are_registered_and_hit_the_budget(tiny_dirs, text_file):
    model, adapter, calib, bos = session(tiny_dirs["llama"], text_file)
    from foldgpt.stages.analysis import similarity

    sim = similarity(model, adapter, calib[:16], skip_first=bos)
    for name in ("replaceme", "linearpatch"):
        m = METHODS[name]
        assert not m.folds and not m.cures_by_default and m.compensation == name
        cfg = fast_config(method=name, target_params=0.6, cure=False)
        budget = plan_budget(model, adapter, 6, cfg.target_params, None, cfg.remove_share, 1, 0, None, False)
        ctx = Context(model, adapter, calib, cfg, budget, bos, sim)
        plan = get_method(name).run(ctx)
        assert plan.compensation == name and plan.method == name
        removed = sorted(plan.removed_layers())
        assert len(removed) == budget.n_remove >= 2 and removed == list(range(removed[0], removed[-1] + 1))
        assert removed[0] >= 1  # a kept layer to merge into
        dist = torch.arccos(sim.clamp(-1, 1)) / torch.pi
        n = budget.n_remove
        best = min(range(1, 7 - n), key=lambda s: dist[s, s + n].item())
        assert removed[0] == best
        _, student = build(model, adapter, plan.removed, name)
        assert unique_params(student) == budget.base_params - n * budget.block_params


def test_plan_field_version_and_make_plan(tiny_dirs, text_file):
    plan = Plan(6, "llama", removed=["2", "3"], compensation="replaceme")
    assert plan.version == COMPENSATION_VERSION
    assert Plan(6, "llama", removed=["2", "3"]).version == 1
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.compensation == "replaceme" and again.version == COMPENSATION_VERSION and again == plan
    with pytest.raises(foldgpt.FoldGPTError, match="compensation"):
        Plan(6, "llama", removed=["2"], compensation="bogus")
    with pytest.raises(foldgpt.FoldGPTError, match="--compensate"):
        foldgpt.CompressConfig(compensate="bogus")
    model, adapter, _, _ = session(tiny_dirs["llama"], text_file)
    cfg = fast_config(compensate="linearpatch")
    assert make_plan(cfg, model, adapter, ["2"], [], method="sleb").compensation == "linearpatch"
    assert make_plan(cfg, model, adapter, ["2"], [], method="sleb", compensation="").compensation == ""
    assert make_plan(fast_config(), model, adapter, ["2"], [], method="sleb").compensation == ""
    # the method's own compensation (a bench row's plan rebuilt from its removed layers keeps it)
    assert make_plan(fast_config(), model, adapter, ["2"], [], method="replaceme").compensation == "replaceme"


def test_cli_flag_reaches_the_config_and_the_plan_key():
    from foldgpt.bench import _plan_key
    from foldgpt.cli_parser import build_parser, compress_config

    for verb in (["compress", "m", "--out", "o"], ["bench", "m", "--eval-text", "e", "--out", "o"]):
        args = build_parser().parse_args(verb + ["--compensate", "linearpatch"])
        assert compress_config(args).compensate == "linearpatch"
        assert compress_config(build_parser().parse_args(verb)).compensate == "none"
    assert _plan_key(fast_config()) != _plan_key(fast_config(compensate="replaceme"))


# ---- end to end -----------------------------------------------------------------------------------------------
def test_compress_replaceme_writes_a_folder_that_reloads(tiny_dirs, text_file, tmp_path):
    cfg = fast_config(method="replaceme", target_params=0.8, cure=False)
    res = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "a", cfg)
    assert res.plan.compensation == "replaceme" and res.plan.removed
    saved = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert saved["compensation"] == "replaceme" and saved["version"] >= COMPENSATION_VERSION
    loaded, _ = foldgpt.load(tmp_path / "a")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = res.model(input_ids=ids).logits
        assert torch.equal(ref, loaded(input_ids=ids).logits)
    assert unique_params(loaded) == res.summary["unique_params"]
    # the compensation changed the layer before the span (and is not plain deletion)
    model, adapter, _, _ = session(tiny_dirs["llama"], text_file)
    _, plain = build(model, adapter, res.plan.removed)
    assert unique_params(plain) == res.summary["unique_params"]
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, ref)
    # re-applying the saved plan recomputes the same compensation
    again = foldgpt.compress(str(tiny_dirs["llama"]), [str(text_file)], tmp_path / "b",
                             fast_config(target_params=0.8, cure=False), plan=tmp_path / "a" / "plan.json")
    with torch.no_grad():
        assert torch.equal(ref, again.model(input_ids=ids).logits)


def test_compensate_option_on_another_method(tiny_dirs, text_file, tmp_path):
    cfg = fast_config(method="shortgpt", target_params=0.8, cure=False, compensate="linearpatch")
    res = foldgpt.compress(str(tiny_dirs["qwen2"]), [str(text_file)], tmp_path / "s", cfg)
    assert res.plan.compensation == "linearpatch" and res.plan.method == "shortgpt"
    loaded, _ = foldgpt.load(tmp_path / "s")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["unique_params"] == unique_params(loaded)
    # every span after layer 0 changed the down projection before it, and nothing else
    model, adapter, _, _ = session(tiny_dirs["qwen2"], text_file)
    kept = res.plan.kept_layers()
    before = {s - 1 for s, _ in removed_spans(res.plan) if s > 0}
    assert before
    for layer in kept:
        ours = adapter.layers(res.model)[kept.index(layer)].mlp.down_proj.weight
        theirs = adapter.layers(model)[layer].mlp.down_proj.weight
        assert torch.equal(ours, theirs) == (layer not in before), layer
