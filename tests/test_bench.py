import json

import pytest
from helpers import fast_config

from foldgpt.bench import bench


def test_bench_rows_and_files(tiny_dirs, text_file, eval_file, tmp_path):
    rows = bench(str(tiny_dirs["llama"]), ["shortgpt", "foldgpt-gates-only"], [0.8], [str(text_file)],
                 [str(eval_file)], tmp_path / "b", cure=True, base=fast_config(), eval_seq_len=32)
    assert [(r["method"], r["cure"]) for r in rows] == [("dense", False), ("shortgpt", False), ("shortgpt", True),
                                                        ("foldgpt-gates-only", True)]
    for r in rows[1:]:
        assert r["unique_params"] <= 0.8 * rows[0]["unique_params"]
        assert r["perplexity"]["eval.txt"] > 0
    # the same removal with and without the cure
    assert rows[1]["removed"] == rows[2]["removed"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(saved) == 4 and (tmp_path / "b" / "results.md").exists()
    assert (tmp_path / "b" / "perplexity_vs_params.png").exists()


def test_method_specs_with_config_overrides():
    from foldgpt import CompressConfig, FoldGPTError
    from foldgpt.bench import split_methods, variant_config

    assert split_methods("sleb,foldgpt[remove_share=0.8;fold.adapter_rank=16],foldgpt-no-tail") == [
        "sleb", "foldgpt[remove_share=0.8;fold.adapter_rank=16]", "foldgpt-no-tail"]
    cfg = variant_config("foldgpt[remove_share=0.8;fold.adapter_rank=16]", CompressConfig(), 0.6, None)
    assert (cfg.method, cfg.remove_share, cfg.fold.adapter_rank, cfg.target_params) == ("foldgpt", 0.8, 16, 0.6)
    cfg = variant_config("foldgpt-no-tail[cure_cfg.steps=7]", CompressConfig(), 0.75, True)
    assert cfg.cure_cfg.beta_tail == 0.0 and cfg.cure_cfg.steps == 7
    assert variant_config("shortgpt", CompressConfig(), 0.75, False).method == "shortgpt"
    for bad, msg in (("foldgpt[nope=1]", "unknown setting"), ("foldgpt[remove_share]", "key=value"),
                     ("foldgpt[fold.adapter_rank=-1]", "rank")):
        with pytest.raises(FoldGPTError, match=msg):
            variant_config(bad, CompressConfig(), 0.75, None)


def test_resume_matches_rows_written_before_an_option_was_added():
    from foldgpt.bench import _same_command

    old = {"model": "m", "base": {"seed": 0, "cure_cfg": {"steps": 4}}}
    assert _same_command(old, {"model": "m", "base": {"seed": 0, "device_map": None,
                                                      "cure_cfg": {"steps": 4, "fsdp": False}}})
    assert not _same_command(old, {"model": "m", "base": {"seed": 0, "cure_cfg": {"steps": 4, "fsdp": True}}})
    assert not _same_command(old, {"model": "m", "base": {"seed": 0, "device_map": "offload",
                                                          "cure_cfg": {"steps": 4}}})
    assert not _same_command(old, {"model": "m", "base": {"seed": 1, "cure_cfg": {"steps": 4}}})
    assert not _same_command(old, {"model": "m", "base": {"cure_cfg": {"steps": 4}}})  # an option gone


def test_resume_reapplies_the_plan_of_a_finished_row(tiny_dirs, text_file, eval_file, tmp_path, monkeypatch):
    """A bench stopped after 'shortgpt' finished continues with 'shortgpt + cure' on the saved plan (no
    re-planning: for the greedy methods that is the hour-long part), and leaves no search folder behind."""
    import foldgpt.bench as fb
    from foldgpt.methods import greedy

    real_eval, real_run = fb._evaluate, fb.run_method
    calls = {"eval": 0, "plans": []}

    def stop_at_third_eval(*a, **k):
        calls["eval"] += 1
        if calls["eval"] == 3:  # dense, shortgpt, then stop while evaluating shortgpt + cure
            raise KeyboardInterrupt
        return real_eval(*a, **k)

    args = (str(tiny_dirs["llama"]), ["shortgpt"], [0.8], [str(text_file)], [str(eval_file)], tmp_path / "b")
    kw = dict(cure=True, base=fast_config(), eval_seq_len=32)
    monkeypatch.setattr(fb, "_evaluate", stop_at_third_eval)
    with pytest.raises(KeyboardInterrupt):
        bench(*args, **kw)
    assert greedy.SEARCH_DIR is None and not (tmp_path / "b").exists()
    monkeypatch.setattr(fb, "_evaluate", real_eval)
    monkeypatch.setattr(fb, "run_method", lambda s, cfg, plan=None: calls["plans"].append(plan) or
                        real_run(s, cfg, plan))
    rows = bench(*args, **kw, resume=True)
    assert [(r["method"], r["cure"]) for r in rows] == [("dense", False), ("shortgpt", False), ("shortgpt", True)]
    assert len(calls["plans"]) == 1 and calls["plans"][0] is not None  # only the cured row ran, on the saved plan
    assert calls["plans"][0].removed == rows[1]["removed"] == rows[2]["removed"]


def test_cure_seed_variant_reuses_the_plan_of_a_row_written_without_one(tiny_dirs, text_file, eval_file, tmp_path,
                                                                        monkeypatch):
    """Rows written before rows carried their plan still lend it (rebuilt from the removed layers, groups and child
    gate starts) to a cure-only variant such as 'foldgpt[cure_cfg.seed=1]', which runs only with the cure; the
    rebuilt plan gives the same model (unique parameters) and a different cure seed gives a different result. A
    search row's plan is not rebuilt (a row does not record its fitted children)."""
    import json

    import foldgpt.bench as fb

    real_run = fb.run_method
    args = (str(tiny_dirs["llama"]), ["foldgpt", "random"], [0.8], [str(text_file)], [str(eval_file)])
    # such rows come from a foldgpt that predates the search: its foldgpt rows ranked greedily
    kw = dict(cure=True, base=fast_config(ranking="greedy"), eval_seq_len=32)
    bench(*args, tmp_path / "a", **kw)
    # the same rows as an older foldgpt wrote them: no plan
    log = fb.rows_file(tmp_path / "b")
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    command = json.loads((tmp_path / "a" / "command.json").read_text())
    log.write_text("".join(json.dumps({"command": command, "row": r}) + "\n" for r in first))
    plans = []
    monkeypatch.setattr(fb, "run_method", lambda s, cfg, plan=None: plans.append((cfg, plan)) or real_run(s, cfg, plan))
    rows = bench(*args[:1], ["foldgpt", "random", "foldgpt[cure_cfg.seed=1]", "random[cure_cfg.seed=1]"],
                 *args[2:], tmp_path / "b", **kw, resume=True)
    new = rows[len(first):]
    assert [(r["method"], r["cure"]) for r in new] == [("foldgpt[cure_cfg.seed=1]", True),
                                                       ("random[cure_cfg.seed=1]", True)]
    assert [cfg.cure_cfg.seed for cfg, _ in plans] == [1, 1] and all(p is not None for _, p in plans)
    by = {(r["method"], r["cure"]): r for r in rows}
    for name in ("foldgpt", "random"):
        old, seeded = by[(name, True)], by[(f"{name}[cure_cfg.seed=1]", True)]
        assert (seeded["removed"], seeded["groups"], seeded["unique_params"]) == (
            old["removed"], old["groups"], old["unique_params"])
        assert seeded["perplexity"] != old["perplexity"]
    assert by[("foldgpt[cure_cfg.seed=1]", True)]["seconds"] is None  # a cured row's plan time is unknown
    assert by[("random[cure_cfg.seed=1]", True)]["seconds"] > by[("random", False)]["seconds"]
    # the search's plan is more than a row records (its fitted children's ranks and modes): not rebuilt from one
    search = fb.variant_config("foldgpt", fast_config(), 0.8, True)
    assert search.ranking == "search" and fb._plan_from_row(by[("foldgpt", True)], search, None) is None
