import json

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
