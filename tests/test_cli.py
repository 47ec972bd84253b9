import json
import re

from test_errors import FAST, run_cli


def test_compress_cli_end_to_end_and_plan_reuse(tiny_dirs, text_file, eval_file, tmp_path):
    out = tmp_path / "small"
    proc = run_cli("compress", tiny_dirs["gemma3"], "--text", text_file, "--out", out, "--target-params", "0.8",
                   *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unique params" in proc.stdout and "Curing" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unique_params"] <= 0.8 * summary["base_params"]
    from foldgpt.config import CONFIG_VERSION

    config = json.loads((out / "plan.json").read_text())["provenance"]["config"]
    assert config["version"] == CONFIG_VERSION and config["cure"]["steps"] == 1 and config["target_params"] == 0.8
    assert summary["config"] == config
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


def test_cli_defaults_are_the_dataclasses_defaults():
    """An option left out keeps its configuration field's default (config.py), which its help shows."""
    import argparse

    from foldgpt import CompressConfig, EvalConfig
    from foldgpt.cli_parser import build_parser, compress_config, eval_config

    parser = build_parser()
    assert compress_config(parser.parse_args(["compress", "m", "--out", "o"])) == CompressConfig()
    args = parser.parse_args(["bench", "m", "--eval-text", "e", "--out", "o"])
    assert compress_config(args) == CompressConfig() and eval_config(args) == EvalConfig()
    assert eval_config(parser.parse_args(["eval", "m"])) == EvalConfig()
    cfg = compress_config(parser.parse_args([
        "compress", "m", "--out", "o", "--ranking", "greedy", "--unit", "sublayer", "--no-cure", "--cure-seed", "3",
        "--micro-batch", "2", "--child-fractions", "0.1,0.2", "--no-alpha", "--actions", "layer,child"]))
    assert (cfg.ranking.kind, cfg.ranking.unit, cfg.cure.enabled, cfg.cure.seed) == ("greedy", "sublayer", False, 3)
    assert cfg.gate.micro_batch == cfg.cure.micro_batch == 2 and cfg.ranking.child_fractions == [0.1, 0.2]
    assert cfg.fold.alpha is False and cfg.ranking.actions == ["layer", "child"]
    rate = compress_config(parser.parse_args(["compress", "m", "--out", "o", "--remove-rate", "0.25"]))
    assert (rate.target_params, rate.remove_rate) == (None, 0.25)
    plan = compress_config(parser.parse_args(["compress", "m", "--out", "o", "--plan", "p.json"]))
    assert (plan.target_params, plan.remove_rate) == (None, 0.0)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    compress_help = " ".join(sub["compress"].format_help().split())
    assert re.search(rf"--gate-steps GATE_STEPS default: {CompressConfig().gate.steps}\b", compress_help)
    assert re.search(rf"\(default: {CompressConfig().ranking.rescore}\)", compress_help)
    assert re.search(rf"--seq-len SEQ_LEN default: {CompressConfig().seq_len}\b", compress_help)
    eval_help = " ".join(sub["eval"].format_help().split())
    assert re.search(rf"--seq-len SEQ_LEN default: {EvalConfig().seq_len}\b", eval_help)


def test_bench_cli_runs_rows_with_tasks_and_cloze(tiny_dirs, text_file, eval_file, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "It is a truth", "choices": [" universally", " dog"], "answer": 0}\n')
    out = tmp_path / "b"
    proc = run_cli("bench", tiny_dirs["llama"], "--methods", "random", "--targets", "0.8", "--text", text_file,
                   "--eval-text", eval_file, "--out", out, "--cure", "--tasks", task, "--cloze", "3",
                   "--eval-seq-len", "32", "--seq-len", "32", "--calib-seqs", "16", "--cure-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["cure"]) for r in rows] == [("dense", False), ("random", False), ("random", True)]
    assert set(rows[1]["tasks"]) == {"t", "cloze"} and set(rows[1]["tasks_acc_norm"]) == {"t"}
    command = json.loads((out / "command.json").read_text())
    assert command["evaluation"]["seq_len"] == 32 and command["evaluation"]["cloze"] == 3
    assert command["base"]["cure"]["steps"] == 1 and "version" in command["base"]
