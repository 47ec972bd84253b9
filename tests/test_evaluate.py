import json
import math

import torch
import torch.nn.functional as F
from test_errors import run_cli

import foldgpt
from foldgpt.data import tokenize
from foldgpt.evaluation.evaluate import make_windows, perplexity
from foldgpt.models import load_model


def test_windows_with_and_without_bos():
    ids = torch.arange(10, 30)
    w = make_windows(ids, 5, bos_id=None, max_tokens=None)
    assert w.shape == (4, 5) and w[1, 0].item() == 15
    wb = make_windows(ids, 5, bos_id=1, max_tokens=None)
    assert wb.shape == (5, 5) and (wb[:, 0] == 1).all() and wb[1, 1].item() == 14
    assert make_windows(ids, 5, None, max_tokens=8).shape[0] == 2  # 4 predicted tokens per window


def test_perplexity_matches_hand_computation(tiny_dirs, eval_file):
    model, tok = load_model(str(tiny_dirs["llama"]))
    ids = tokenize(tok, eval_file.read_text())
    res = perplexity(model, tok, ids, seq_len=16, bos=True, max_tokens=60)
    windows = make_windows(ids, 16, tok.bos_token_id, 60)
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0, :-1]
            nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
            n += 15
    assert res.tokens == n == 60
    assert math.isclose(res.perplexity, math.exp(nll / n), rel_tol=1e-5)
    assert res.bits_per_byte > 0


def test_eval_cli_several_models_json_in_order(tiny_dirs, eval_file, tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("eval", tiny_dirs["qwen2"], tiny_dirs["llama"], "--text", eval_file, "--seq-len", "32",
                   "--max-tokens", "200", "--json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == [str(tiny_dirs["qwen2"]), str(tiny_dirs["llama"])]
    for r in rows:
        for key in ("perplexity", "tokens", "bits_per_byte", "unique_params"):
            assert key in r
    assert "perplexity" in proc.stdout and str(tiny_dirs["llama"]) in proc.stdout


def test_evaluate_api_matches_cli_numbers(tiny_dirs, eval_file):
    rows = foldgpt.evaluate([str(tiny_dirs["llama"])], [str(eval_file)], seq_len=32, max_tokens=200)
    assert rows[0]["tokens"] == 217  # 7 windows x 31 predicted tokens


def test_eval_cli_tasks_and_cloze(tiny_dirs, eval_file, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "It is a truth", "choices": [" universally", " dog"], "answer": 0}\n'
                    '{"context": "The quick brown", "choices": [" fox", " wife"], "answer": 0}\n')
    out = tmp_path / "r.json"
    proc = run_cli("eval", tiny_dirs["llama"], "--text", eval_file, "--seq-len", "32", "--max-tokens", "64",
                   "--tasks", task, "--cloze", "5", "--json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())[0]
    assert row["tasks"]["t"]["n"] == 2 and 0.0 <= row["tasks"]["t"]["acc"] <= 1.0
    assert row["cloze"]["n"] == 5
    proc = run_cli("eval", tiny_dirs["llama"], "--tasks", task, "--lm-eval", "lambada_openai")
    assert proc.returncode == 2 and "lm-eval" in proc.stderr
