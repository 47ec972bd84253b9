"""Bad input: one clear line on stderr, exit code 2, and no output folder left behind."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "foldgpt.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_clean_error(proc, out_dir, pattern):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("foldgpt: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert pattern in lines[0], lines[0]
    assert not out_dir.exists()
    assert not any(p.name.startswith(f".{out_dir.name}") for p in out_dir.parent.iterdir())


FAST = ["--seq-len", "32", "--calib-seqs", "16", "--gate-steps", "2", "--cure-steps", "1"]


def test_unknown_model_type(tmp_path, text_file):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    out = tmp_path / "out"
    proc = run_cli("compress", model, "--text", text_file, "--out", out, *FAST)
    assert_clean_error(proc, out, "unsupported model type 'bert'")
    assert "llama" in proc.stderr and "gemma3_text" in proc.stderr


@pytest.mark.parametrize("target", ["1.5", "0", "-0.2"])
def test_target_out_of_range(tiny_dirs, text_file, tmp_path, target):
    out = tmp_path / "out"
    proc = run_cli("compress", tiny_dirs["llama"], "--text", text_file, "--out", out, "--target-params", target, *FAST)
    assert_clean_error(proc, out, "--target-params")


def test_missing_text(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compress", tiny_dirs["llama"], "--text", tmp_path / "nope.txt", "--out", out, *FAST)
    assert_clean_error(proc, out, "text not found")


def test_empty_text(tiny_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    proc = run_cli("compress", tiny_dirs["llama"], "--text", empty, "--out", out, *FAST)
    assert_clean_error(proc, out, "empty")


def test_text_shorter_than_one_window(tiny_dirs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    out = tmp_path / "out"
    proc = run_cli("compress", tiny_dirs["llama"], "--text", short, "--out", out, *FAST)
    assert_clean_error(proc, out, "fewer than one window")


def test_eval_text_shorter_than_one_window(tiny_dirs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    out = tmp_path / "res.json"
    proc = run_cli("eval", tiny_dirs["llama"], "--text", short, "--seq-len", "512", "--json", out)
    assert proc.returncode == 2 and "fewer than one window" in proc.stderr
    assert not out.exists()


def test_missing_model_path(tmp_path, text_file):
    out = tmp_path / "out"
    proc = run_cli("compress", tmp_path / "no_model", "--text", text_file, "--out", out, *FAST)
    assert_clean_error(proc, out, "not found")


def test_existing_output_is_not_touched(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = run_cli("compress", tiny_dirs["llama"], "--text", text_file, "--out", out, *FAST)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "x"
