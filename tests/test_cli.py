import json

from test_errors import FAST, run_cli


def test_compress_cli_end_to_end_and_plan_reuse(tiny_dirs, text_file, eval_file, tmp_path):
    out = tmp_path / "small"
    proc = run_cli("compress", tiny_dirs["gemma3"], "--text", text_file, "--out", out, "--target-params", "0.8",
                   *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unique params" in proc.stdout and "Curing" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unique_params"] <= 0.8 * summary["base_params"]
    # shortgpt at the same target, and the plan re-applied
    proc = run_cli("compress", tiny_dirs["gemma3"], "--text", text_file, "--out", tmp_path / "sg",
                   "--method", "shortgpt", "--target-params", "0.8", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("compress", tiny_dirs["gemma3"], "--text", text_file, "--out", tmp_path / "again",
                   "--plan", out / "plan.json", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["groups"] == summary["groups"]
    proc = run_cli("eval", tiny_dirs["gemma3"], out, tmp_path / "sg", "--text", eval_file, "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_analyze_cli_several_models(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "an"
    proc = run_cli("analyze", tiny_dirs["llama"], tiny_dirs["gemma3"], "--text", text_file, "--out", out,
                   "--seq-len", "32", "--n-seqs", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["models"]) == 2
    for r in data["models"].values():
        L = r["num_layers"]
        assert len(r["cosine"]) == L and len(r["similarity_matrix"]) == L + 1
    assert (out / "similarity.png").exists()
    assert len(list(out.glob("heatmap_*.png"))) == 2
