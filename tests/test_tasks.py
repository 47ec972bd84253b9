"""Zero-shot task evaluation: loading, lm-eval-harness style scoring, cloze, errors."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from foldgpt.errors import FoldGPTError
from foldgpt.evaluation import cloze, scoring, tasks
from foldgpt.evaluation.evaluate import run_lm_eval
from foldgpt.evaluation.scoring import Score
from foldgpt.evaluation.tasks import Example, Task

BIGBENCH = Path("/work/shared/data/bigbench")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama folder loaded with load_model. Like conftest's `tiny_dirs["llama"]`, but 2 layers and
    20 training steps: building all of `tiny_dirs` takes minutes on a busy CPU."""
    from tinymodels import make_tokenizer, tiny_model

    from foldgpt.models import load_model

    path = tmp_path_factory.mktemp("tasks_llama")
    tiny_model("llama", layers=2, train_steps=20).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return load_model(str(path))


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------- (a) metrics


def test_acc_and_acc_norm_by_hand(monkeypatch):
    # ex 1: lls [-2, -4], gold 1. acc: argmax 0 -> wrong. norm by bytes (1, 4): -2, -1 -> 1 -> right.
    # ex 2: lls [-2, -1.8], gold 0. acc: argmax 1 -> wrong. norm by bytes (4, 3): -0.5, -0.6 -> 0 -> right
    #       (by characters (2, 3) it would be -1, -0.6 -> wrong: the byte length matters).
    task = Task("hand", [Example("Q1", ["a", "bbbb"], 1), Example("Q2", ["éé", "abc"], 0)])
    lls = {("Q1", "a"): -2.0, ("Q1", "bbbb"): -4.0, ("Q2", "éé"): -2.0, ("Q2", "abc"): -1.8}
    seen = []

    def fake(model, tokenizer, requests, bos, batch_size, max_length, desc=""):
        seen.extend(requests)
        return [Score(lls[r], 1, False) for r in requests]

    monkeypatch.setattr(scoring, "score_requests", fake)
    out = scoring.evaluate_multiple_choice(None, None, task, batch_size=3)
    assert seen == list(lls)
    assert out == {"task": "hand", "n": 2, "acc": 0.0, "acc_norm": 1.0}


def test_ties_go_to_first_max():
    assert scoring.choice_metrics([-1.0, -1.0], ["ab", "cd"], 0) == (1.0, 1.0)
    assert scoring.choice_metrics([-1.0, -1.0], ["ab", "cd"], 1) == (0.0, 0.0)
    assert scoring.choice_metrics([-3.0, -1.0], ["abc", "d"], 1) == (1.0, 0.0)  # norm: -1, -1 -> first


# ---------------------------------------------------------------------------------------------- (b) loading


def test_bigbench_prefixes_honoured(tmp_path):
    data = {
        "task_prefix": "TP.",
        "example_input_prefix": "\nIn: ",
        "example_output_prefix": "\nOut: ",
        "append_choices_to_input": True,
        "choice_prefix": "\n - ",
        "examples": [
            {"input": "first?", "target_scores": {"yes": 0, "no": 1}},
            {"input": "generative only", "target": "x"},
            {"input": "second?", "target_scores": {"b": 1, "a": 1, "c": 0}, "comment": "ignored"},
        ],
    }
    task = tasks.load_task(write_json(tmp_path / "mytask" / "task.json", data).parent)
    assert task.name == "mytask"
    # choices appended in BIG-bench order: sorted, then RandomState(42).permutation
    assert [e.context for e in task.examples] == [
        "TP.\nIn: first?\n - yes\n - no\nOut: ",
        "TP.\nIn: second?\n - a\n - b\n - c\nOut: ",
    ]
    assert [e.choices for e in task.examples] == [["yes", "no"], ["b", "a", "c"]]
    assert [e.gold for e in task.examples] == [1, 0]  # first maximum of target_scores


def test_bigbench_defaults_and_limit(tmp_path):
    examples = [{"input": f"q{i}", "target_scores": {"x": 1, "y": 0}} for i in range(5)]
    path = write_json(tmp_path / "group" / "sub" / "task.json", {"examples": examples})
    task = tasks.load_task(path, limit=2)
    assert task.name == "sub"
    assert [e.context for e in task.examples] == ["\nQ: q0\n  choice: y\n  choice: x\nA: ",
                                                  "\nQ: q1\n  choice: y\n  choice: x\nA: "]
    write_json(path, {"examples": examples, "append_choices_to_input": False})
    assert tasks.load_task(path).examples[3].context == "\nQ: q3\nA: "
    with pytest.raises(FoldGPTError, match="subtasks are: sub"):
        tasks.load_task(tmp_path / "group")


def test_jsonl_aliases(tmp_path):
    rows = [{"context": "c0", "choices": ["a", "b"], "answer": 1},
            {"query": "c1", "choices": ["a", "b", "c"], "gold": 2},
            {"question": "c2", "choices": ["a"], "label": 0}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = tasks.load_task(str(path))
    assert task.name == "mine"
    assert [(e.context, e.gold, len(e.choices)) for e in task.examples] == [("c0", 1, 2), ("c1", 2, 3), ("c2", 0, 1)]
    assert len(tasks.load_task(path, limit=1).examples) == 1


# ---------------------------------------------------------------------------------------------- (c) scoring


def test_encode_pair_moves_trailing_space(llama):
    _, tok = llama
    ctx, cont = scoring.encode_pair(tok, "The quick brown ", "fox", bos=False)
    assert ctx == tok.encode("The quick brown", add_special_tokens=False)
    assert tok.decode(cont) == " fox"
    ctx_bos, _ = scoring.encode_pair(tok, "The quick brown ", "fox", bos=True)
    assert ctx_bos == [tok.bos_token_id] + ctx


def direct_logprob(model, tok, context: str, continuation: str, bos: bool) -> float:
    ctx, cont = scoring.encode_pair(tok, context, continuation, bos)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(lp[-len(cont):].gather(-1, targets[-len(cont):, None]).sum())


@pytest.mark.parametrize("bos", [False, True])
def test_batched_equals_unbatched(llama, bos):
    model, tok = llama
    requests = [("It is a truth universally ", "acknowledged"), ("The quick brown", " fox jumps over"),
                ("However little known the feelings or views of such a man may be", " on his first"),
                ("a", " wife"), ("must be in want of", " a wife.")]
    scores = scoring.score_requests(model, tok, requests, bos=bos, batch_size=3)
    for (c, x), s in zip(requests, scores):
        assert s.logprob == pytest.approx(direct_logprob(model, tok, c, x, bos), abs=1e-4)
        assert s.tokens == len(scoring.encode_pair(tok, c, x, bos)[1])


def test_left_truncation(llama):
    model, tok = llama
    req = ("The quick brown fox jumps over the", " lazy dog")
    ctx, cont = scoring.encode_pair(tok, *req, bos=False)
    n = len(cont)
    window = n + 3  # the context is cut from the left, the continuation is whole
    s = scoring.score_requests(model, tok, [req], max_length=window)[0]
    kept = (ctx + cont)[-(window + 1):]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([kept[:-1]])).logits[0].float(), -1)
    expect = float(lp[-n:].gather(-1, torch.tensor(kept[-n:])[:, None]).sum())
    assert s.tokens == n and s.logprob == pytest.approx(expect, abs=1e-4)
    # a continuation longer than the window is scored on its last max_length tokens
    assert scoring.score_requests(model, tok, [req], max_length=n - 2)[0].tokens == n - 2


# ---------------------------------------------------------------------------------------------- (d) cloze


def test_cloze_examples_deterministic(text_file):
    text = text_file.read_text()
    a = cloze.cloze_examples(text, n=20, seed=3, context_chars=200)
    assert a == cloze.cloze_examples(text, n=20, seed=3, context_chars=200)
    assert a != cloze.cloze_examples(text, n=20, seed=4, context_chars=200)
    assert len(a) == 20
    flat = " ".join(text.split())
    for ex in a:
        word = ex.target[1:]
        assert ex.target == " " + word and word.isalpha() and len(word) >= 3
        assert ex.context == ex.context.strip() and ex.context
        assert len(ex.context) <= 200 or not re.search(r"[.!?] ", ex.context)  # longer only if one sentence
        at = flat.index(ex.context + ex.target)
        assert re.match(r"[.!?]*(\s|$)", flat[at + len(ex.context + ex.target):])  # the sentence ends here


def test_cloze_hand_text():
    text = "One two three. Four five six!  Seven eight it.\nNine ten eleven? Go."
    exs = cloze.cloze_examples(text, n=10, seed=0, context_chars=15)
    assert [(e.context, e.target) for e in exs] == [
        ("One two", " three"), ("Four five", " six"), ("it. Nine ten", " eleven")]


def test_evaluate_cloze(llama, text_file):
    model, tok = llama
    exs = cloze.cloze_examples(text_file.read_text(), n=6, seed=0, context_chars=120)
    out = cloze.evaluate_cloze(model, tok, exs, bos=True, batch_size=4)
    assert out["n"] == 6 and 0.0 <= out["acc"] <= 1.0 and out["ppl"] >= 1.0 and out["tokens"] >= 6
    scores = scoring.score_requests(model, tok, [(e.context, e.target) for e in exs], bos=True, batch_size=1)
    assert out["acc"] == pytest.approx(sum(s.greedy for s in scores) / 6)


# ---------------------------------------------------------------------------------------------- (e) errors


def test_bad_inputs(tmp_path):
    with pytest.raises(FoldGPTError, match="not found"):
        tasks.load_task(tmp_path / "missing.json")
    with pytest.raises(FoldGPTError, match="not found"):
        tasks.load_task(tmp_path)  # a folder without task.json
    bad = tmp_path / "bad" / "task.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(FoldGPTError, match="not valid JSON"):
        tasks.load_task(bad)
    write_json(bad, {"examples": [{"input": "q", "target": "a"}]})
    with pytest.raises(FoldGPTError, match="no multiple-choice examples"):
        tasks.load_task(bad)
    write_json(bad, {"description": "no examples"})
    with pytest.raises(FoldGPTError, match="no 'examples' list"):
        tasks.load_task(bad)
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"context": "c", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(FoldGPTError, match="t.jsonl:1: 'answer'"):
        tasks.load_task(jl)
    jl.write_text('{"context": "c", "choices": ["a"], "answer": 0}\n{oops\n')
    with pytest.raises(FoldGPTError, match="t.jsonl:2 is not valid JSON"):
        tasks.load_task(jl)
    jl.write_text("\n")
    with pytest.raises(FoldGPTError, match="no examples"):
        tasks.load_task(jl)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(FoldGPTError, match="unknown file type"):
        tasks.load_task(tmp_path / "t.txt")
    with pytest.raises(FoldGPTError, match="no sentence"):
        cloze.cloze_examples("To be. Or not, to be! Ok", n=3)
    with pytest.raises(FoldGPTError, match="no tasks"):
        scoring.evaluate_tasks(None, None, [])


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(FoldGPTError) as info:
        tasks.load_task(tmp_path / "nope" / "task.json")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- (f) lm-eval


def test_run_lm_eval_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails even where lm-eval is installed
    with pytest.raises(FoldGPTError, match=r"lm-eval is not installed: pip install 'foldgpt\[eval\]'"):
        run_lm_eval(None, None, ["hellaswag"])


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (BIGBENCH / "winowhy" / "task.json").is_file(), reason="BIG-bench data not present")
def test_real_bigbench_task(llama):
    model, tok = llama
    specs = [str(BIGBENCH / "winowhy")]
    if (BIGBENCH / "goal_step_wikihow" / "goal_inference" / "task.json").is_file():
        specs.append(str(BIGBENCH / "goal_step_wikihow" / "goal_inference"))
    out = scoring.evaluate_tasks(model, tok, specs, bos=True, batch_size=8, limit=5, max_length=128)
    assert set(out) == {Path(s).name for s in specs}
    for name, r in out.items():
        assert r["task"] == name and r["n"] == 5
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
