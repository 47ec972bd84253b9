import json

import pytest
from helpers import fast_config

from foldgpt import EvalConfig
from foldgpt.bench import bench


def test_bench_rows_and_files(tiny_dirs, text_file, eval_file, tmp_path):
    rows = bench(str(tiny_dirs["llama"]), ["shortgpt", "foldgpt-gates-only"], [0.8], [str(text_file)],
                 [str(eval_file)], tmp_path / "b", cure=True, base=fast_config(), evaluation=EvalConfig(seq_len=32))
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
    cfg = variant_config("foldgpt-no-tail[cure.steps=7]", CompressConfig(), 0.75, True)
    assert cfg.cure.beta_tail == 0.0 and cfg.cure.steps == 7 and cfg.cure.enabled is True
    cfg = variant_config("foldgpt[ranking.kind=greedy;ranking.unit=sublayer]", CompressConfig(), 0.75, None)
    assert (cfg.ranking.kind, cfg.ranking.unit, cfg.cure.enabled) == ("greedy", "sublayer", None)
    assert variant_config("shortgpt", CompressConfig(), 0.75, False).method == "shortgpt"
    for bad, msg in (("foldgpt[nope=1]", "unknown setting"), ("foldgpt[remove_share]", "key=value"),
                     ("foldgpt[fold.adapter_rank=-1]", "rank"), ("foldgpt[ranking.unit=half]", "unit"),
                     ("foldgpt[cure.enabled=false]", "bench decides the cure")):
        with pytest.raises(FoldGPTError, match=msg):
            variant_config(bad, CompressConfig(), 0.75, None)


def test_resume_reapplies_the_plan_of_a_finished_row(tiny_dirs, text_file, eval_file, tmp_path, monkeypatch):
    """A bench stopped after 'shortgpt' finished continues with 'shortgpt + cure' on the saved plan (no
    re-planning: for the greedy methods that is the hour-long part), and leaves no search folder behind."""
    import foldgpt.bench as fb

    real_eval, real_run = fb.evaluate_model, fb.run_method
    calls = {"eval": 0, "plans": []}

    def stop_at_third_eval(*a, **k):
        calls["eval"] += 1
        if calls["eval"] == 3:  # dense, shortgpt, then stop while evaluating shortgpt + cure
            raise KeyboardInterrupt
        return real_eval(*a, **k)

    args = (str(tiny_dirs["llama"]), ["shortgpt"], [0.8], [str(text_file)], [str(eval_file)], tmp_path / "b")
    kw = dict(cure=True, base=fast_config(), evaluation=EvalConfig(seq_len=32))
    monkeypatch.setattr(fb, "evaluate_model", stop_at_third_eval)
    with pytest.raises(KeyboardInterrupt):
        bench(*args, **kw)
    assert not (tmp_path / "b").exists() and fb.rows_file(tmp_path / "b").exists()
    monkeypatch.setattr(fb, "evaluate_model", real_eval)
    monkeypatch.setattr(fb, "run_method", lambda s, cfg, plan=None, searches=None: calls["plans"].append(plan) or
                        real_run(s, cfg, plan, searches))
    rows = bench(*args, **kw, resume=True)
    assert [(r["method"], r["cure"]) for r in rows] == [("dense", False), ("shortgpt", False), ("shortgpt", True)]
    assert len(calls["plans"]) == 1 and calls["plans"][0] is not None  # only the cured row ran, on the saved plan
    assert calls["plans"][0].removed == rows[1]["removed"] == rows[2]["removed"]
    assert not fb.rows_file(tmp_path / "b").exists() and not (tmp_path / "b.search").exists()


def test_cure_only_variant_reuses_the_plan_and_rows_share_one_search_cache(tiny_dirs, text_file, eval_file, tmp_path,
                                                                         monkeypatch):
    """A variant that changes only the cure ('random[cure.seed=1]') runs only with the cure, on the plan of its
    method's row; a different cure seed gives a different result. Every row gets the bench's one SearchCache, kept
    beside the output while the bench runs."""
    import foldgpt.bench as fb
    from foldgpt.methods.greedy import SearchCache

    real_run = fb.run_method
    runs = []
    monkeypatch.setattr(fb, "run_method", lambda s, cfg, plan=None, searches=None: runs.append((cfg, plan, searches))
                        or real_run(s, cfg, plan, searches))
    rows = bench(str(tiny_dirs["llama"]), ["random", "random[cure.seed=1]"], [0.8], [str(text_file)],
                 [str(eval_file)], tmp_path / "b", cure=True, base=fast_config(), evaluation=EvalConfig(seq_len=32))
    assert [(r["method"], r["cure"]) for r in rows[1:]] == [("random", False), ("random", True),
                                                            ("random[cure.seed=1]", True)]
    assert [cfg.cure.seed for cfg, _, _ in runs] == [None, None, 1]
    assert runs[0][1] is None and runs[1][1] is not None and runs[2][1] is not None  # planned once
    caches = {id(c) for _, _, c in runs}
    assert len(caches) == 1 and isinstance(runs[0][2], SearchCache) and runs[0][2].folder == tmp_path / "b.search"
    seeded, cured = rows[3], rows[2]
    assert (seeded["removed"], seeded["unique_params"]) == (cured["removed"], cured["unique_params"])
    assert seeded["perplexity"] != cured["perplexity"]
