"""Zero-shot evaluation of (compressed) causal LMs: multiple-choice tasks and a LAMBADA-style cloze.

Task sources
------------
* BIG-bench JSON tasks: a ``task.json`` file, or a folder holding one. The task's name is the name of the
  folder that holds ``task.json`` (``goal_step_wikihow/goal_inference`` -> ``goal_inference``); any other
  ``*.json`` file is read the same way and named by its stem. Fields, as BIG-bench's ``json_task.py``
  (``default_format_fn``) uses them for zero-shot multiple choice:

  - ``examples`` (required, non-empty list): each ``{"input": str, "target_scores": {choice: score}}``.
    Examples without ``target_scores`` (generative-only ones) are skipped; other example keys
    (``comment``, ``target``, ...) are ignored. Choices keep the order of ``target_scores``; the gold
    choice is the first one with the maximum score.
  - ``task_prefix`` (default ``""``): put once in front of the context.
  - ``example_input_prefix`` (default ``"\\nQ: "``): put in front of ``input``.
  - ``append_choices_to_input`` (default ``True``): if true, ``choice_prefix + choice`` for each choice
    is appended to the input, in BIG-bench's order: the sorted choices permuted by
    ``numpy.random.RandomState(seed).permutation`` (a fresh generator per example; ``seed=42`` by
    default, which is what lm-evaluation-harness's BIG-bench port uses).
  - ``choice_prefix`` (default ``"\\n  choice: "``).
  - ``example_output_prefix`` (default ``"\\nA: "``): ends the context.

  So ``context = task_prefix + example_input_prefix + input [+ choice_prefix + c for c in choices]
  + example_output_prefix`` and each continuation is the bare choice text. ``name``, ``description``,
  ``keywords``, ``metrics``, ``preferred_score``, ``canary``, ``contributors`` are ignored; every task is
  scored by log-likelihood multiple choice. Duplicate examples are kept (BIG-bench drops them).
* JSONL files: one ``{"context": str, "choices": [str, ...], "answer": int}`` per line; ``query`` or
  ``question`` may stand for ``context`` and ``gold`` or ``label`` for ``answer``. Named by file stem.

``limit`` keeps the first N usable examples.

Scoring (as lm-evaluation-harness's ``loglikelihood``)
------------------------------------------------------
Trailing whitespace of the context moves to the front of the continuation; then ``whole =
encode(context + continuation)``, ``context_enc = encode(context)``, continuation tokens =
``whole[len(context_enc):]`` (no special tokens; the BOS id is prepended when ``bos=True``). The model
reads ``(context_enc + continuation_enc)[:-1]`` truncated from the left to ``max_length`` tokens, in
right-padded batches with an attention mask. ``acc``: the argmax of the summed continuation log-prob is
the gold choice; ``acc_norm``: the same after dividing by the choice's length in UTF-8 bytes (the
harness divides by ``len(choice)`` in characters: the same for ASCII). Ties go to the first maximum.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import FoldGPTError

logger = logging.getLogger(__name__)

BB_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
               "choice_prefix": "\n  choice: ", "append_choices_to_input": True}


@dataclass
class Example:
    context: str
    choices: list[str]
    gold: int


@dataclass
class Task:
    name: str
    examples: list[Example] = field(default_factory=list)


@dataclass
class Score:
    """Summed log-prob of a continuation, its token count, and whether every token was the argmax."""

    logprob: float
    tokens: int
    greedy: bool


@dataclass
class ClozeExample:
    context: str
    target: str


# ----------------------------------------------------------------------------------------------- loading


def load_task(spec: str | Path, limit: int | None = None, seed: int = 42) -> Task:
    """A task from a BIG-bench ``task.json`` (or its folder) or a ``.jsonl`` file; see the module doc."""
    path = Path(spec)
    if path.is_dir():
        subtasks = sorted(p.parent.name for p in path.glob("*/task.json"))
        if subtasks and not (path / "task.json").is_file():
            raise FoldGPTError(f"task folder '{spec}' has no task.json; its subtasks are: {', '.join(subtasks)}")
        path = path / "task.json"
    if not path.is_file():
        raise FoldGPTError(f"task '{spec}' not found: give a task.json, a folder holding one, or a .jsonl file")
    if limit is not None and limit < 1:
        raise FoldGPTError(f"limit must be at least 1, got {limit}")
    if path.suffix == ".jsonl":
        task = Task(path.stem, _jsonl_examples(path, limit))
    elif path.suffix == ".json":
        name = path.parent.name if path.name == "task.json" else path.stem
        task = Task(name, _bigbench_examples(path, limit, seed))
    else:
        raise FoldGPTError(f"task '{spec}': unknown file type '{path.suffix}', expected .json or .jsonl")
    logger.info("task %s: %d examples from %s", task.name, len(task.examples), path)
    return task


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FoldGPTError(f"task file {path} is not valid JSON: {exc}") from None


def _bigbench_examples(path: Path, limit: int | None, seed: int) -> list[Example]:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise FoldGPTError(f"task file {path} has no 'examples' list: not a BIG-bench task.json")
    fmt = {k: data.get(k, v) for k, v in BB_DEFAULTS.items()}
    out = []
    for i, ex in enumerate(data["examples"]):
        if not isinstance(ex, dict) or not ex.get("target_scores"):
            continue
        if not isinstance(ex.get("input"), str) or not isinstance(ex["target_scores"], dict):
            raise FoldGPTError(f"task file {path}: example {i} needs a string 'input' and a 'target_scores' dict")
        out.append(_bigbench_example(ex, fmt, seed))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise FoldGPTError(f"task file {path} has no multiple-choice examples (none with 'target_scores')")
    return out


def _bigbench_example(ex: dict, fmt: dict, seed: int) -> Example:
    scores = ex["target_scores"]
    choices = [str(c) for c in scores]
    text = ex["input"]
    if fmt["append_choices_to_input"]:
        order = np.random.RandomState(seed).permutation(sorted(choices))
        text += "".join(fmt["choice_prefix"] + str(c) for c in order)
    context = fmt["task_prefix"] + fmt["example_input_prefix"] + text + fmt["example_output_prefix"]
    values = list(scores.values())
    return Example(context, choices, values.index(max(values)))


def _jsonl_examples(path: Path, limit: int | None) -> list[Example]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FoldGPTError(f"{path}:{lineno} is not valid JSON: {exc}") from None
            out.append(_jsonl_example(row, f"{path}:{lineno}"))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise FoldGPTError(f"task file {path} has no examples")
    return out


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if k in row), None)


def _jsonl_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise FoldGPTError(f"{where}: expected a JSON object with context, choices and answer")
    context, answer = _first(row, ("context", "query", "question")), _first(row, ("answer", "gold", "label"))
    choices = row.get("choices")
    if not isinstance(context, str):
        raise FoldGPTError(f"{where}: missing string 'context' (or 'query'/'question')")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise FoldGPTError(f"{where}: 'choices' must be a non-empty list of strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise FoldGPTError(f"{where}: 'answer' (or 'gold'/'label') must be an index into the {len(choices)} choices")
    return Example(context, choices, answer)


# ----------------------------------------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str, bos: bool) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) split as lm-evaluation-harness does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    prefix = _prefix_ids(tokenizer, bos or not ctx)
    return prefix + ctx, whole[len(ctx):]


def _prefix_ids(tokenizer, needed: bool) -> list[int]:
    """The BOS id (EOS if there is no BOS) to start a sequence with, when needed."""
    if not needed:
        return []
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise FoldGPTError("the tokenizer has no BOS or EOS token to start an empty context with")
    return [tid]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch_scores(model: nn.Module, pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[Score]:
    """Score one batch of (context tokens, continuation tokens) with one right-padded forward pass."""
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    width = max(1, max(len(x) for x in inputs))
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    mask = torch.zeros(len(inputs), width, dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    dev = _device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    out = []
    for i, (x, (_, cont)) in enumerate(zip(inputs, pairs)):
        n = min(len(cont), len(x))
        lp = logprobs[i, len(x) - n : len(x)]
        target = torch.tensor(cont[len(cont) - n :], dtype=torch.long)
        picked = lp.gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((lp.argmax(-1) == target).all())
        out.append(Score(float(picked.sum()), n, greedy))
    return out


@torch.no_grad()
def score_requests(model: nn.Module, tokenizer, requests: list[tuple[str, str]], bos: bool = False,
                   batch_size: int = 8, max_length: int = 1024, desc: str = "Scoring") -> list[Score]:
    """Log-prob of each continuation given its context, for (context, continuation) requests."""
    if batch_size < 1 or max_length < 2:
        raise FoldGPTError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    pairs = [encode_pair(tokenizer, ctx, cont, bos) for ctx, cont in requests]
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    scores: list[Score | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start : start + batch_size]
        for i, s in zip(idx, _batch_scores(model, [pairs[i] for i in idx], max_length)):
            scores[i] = s
    return scores  # type: ignore[return-value]


def _argmax(values: list[float]) -> int:
    """Index of the first maximum."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(logprobs: list[float], choices: list[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one example: argmax of log-prob, and of log-prob per UTF-8 byte of the choice."""
    norm = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(logprobs, choices)]
    return float(_argmax(logprobs) == gold), float(_argmax(norm) == gold)


def evaluate_multiple_choice(model: nn.Module, tokenizer, task: Task, bos: bool = False, batch_size: int = 8,
                             max_length: int = 1024) -> dict:
    """Zero-shot multiple-choice accuracy: {"task", "n", "acc", "acc_norm"}."""
    if not task.examples:
        raise FoldGPTError(f"task {task.name} has no examples")
    requests = [(ex.context, c) for ex in task.examples for c in ex.choices]
    scores = score_requests(model, tokenizer, requests, bos, batch_size, max_length, desc=task.name)
    acc = acc_norm = 0.0
    pos = 0
    for ex in task.examples:
        lps = [s.logprob for s in scores[pos : pos + len(ex.choices)]]
        pos += len(ex.choices)
        a, an = choice_metrics(lps, ex.choices, ex.gold)
        acc, acc_norm = acc + a, acc_norm + an
    n = len(task.examples)
    result = {"task": task.name, "n": n, "acc": acc / n, "acc_norm": acc_norm / n}
    logger.info("%s: acc %.4f acc_norm %.4f (n=%d)", task.name, result["acc"], result["acc_norm"], n)
    return result


def evaluate_tasks(model: nn.Module, tokenizer, specs: list[str], bos: bool = False, batch_size: int = 8,
                   limit: int | None = None, max_length: int = 1024, seed: int = 42) -> dict[str, dict]:
    """Load and evaluate several tasks: {task name: evaluate_multiple_choice result}."""
    if not specs:
        raise FoldGPTError("no tasks given")
    results: dict[str, dict] = {}
    for spec in specs:
        task = load_task(spec, limit=limit, seed=seed)
        if task.name in results:
            raise FoldGPTError(f"two tasks are named '{task.name}' (the second is '{spec}')")
        results[task.name] = evaluate_multiple_choice(model, tokenizer, task, bos, batch_size, max_length)
    return results


# ----------------------------------------------------------------------------------------------- cloze

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LAST_WORD = re.compile(r"(\S+?)[\"'.,;:!?)\]]*$")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if e > s]


def _cloze_at(text: str, span: tuple[int, int], context_chars: int) -> ClozeExample | None:
    s, e = span
    m = _LAST_WORD.search(text, s, e)
    if m is None or not m.group(1).isalpha() or len(m.group(1)) < 3:
        return None
    word_start = m.start(1)
    start = max(0, word_start - context_chars)
    if start > 0:  # begin at a word boundary, never inside the sentence
        nxt = text.find(" ", start)
        start = nxt + 1 if 0 <= nxt < word_start else start
    context = text[min(start, s) : word_start].rstrip()
    return ClozeExample(context, " " + m.group(1)) if context else None


def cloze_examples(text: str, n: int = 200, seed: int = 0, context_chars: int = 600) -> list[ClozeExample]:
    """LAMBADA-style examples: predict a sentence's last word from up to ~context_chars of preceding text.

    Whitespace is collapsed to single spaces; sentences end at . ! or ? followed by whitespace. A sentence
    qualifies if its last word (trailing punctuation stripped) is alphabetic and at least 3 characters
    long; `n` of them are drawn with random.Random(seed) and returned in text order."""
    text = " ".join(text.split())
    candidates = [ex for span in _sentence_spans(text) if (ex := _cloze_at(text, span, context_chars))]
    if not candidates:
        raise FoldGPTError("the text has no sentence ending in an alphabetic word of 3+ letters for a cloze task")
    picked = sorted(random.Random(seed).sample(range(len(candidates)), min(n, len(candidates))))
    return [candidates[i] for i in picked]


def evaluate_cloze(model: nn.Module, tokenizer, examples: list[ClozeExample], bos: bool = False,
                   batch_size: int = 8, max_length: int = 1024) -> dict:
    """{"n", "acc", "ppl", "tokens"}: greedy accuracy of the whole target word, and target perplexity."""
    if not examples:
        raise FoldGPTError("no cloze examples to evaluate")
    requests = [(ex.context, ex.target) for ex in examples]
    scores = score_requests(model, tokenizer, requests, bos, batch_size, max_length, desc="Cloze")
    tokens = sum(s.tokens for s in scores)
    nll = -sum(s.logprob for s in scores) / max(1, tokens)
    result = {"n": len(examples), "acc": sum(s.greedy for s in scores) / len(examples),
              "ppl": math.exp(nll), "tokens": tokens}
    logger.info("cloze: acc %.4f ppl %.3f (n=%d)", result["acc"], result["ppl"], result["n"])
    return result


# ----------------------------------------------------------------------------------------------- lm-eval


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], batch_size: int = 8,
                limit: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks on an in-memory model; returns its per-task "results" dict."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise FoldGPTError("lm-eval is not installed: pip install 'foldgpt[eval]'") from None
    if not tasks:
        raise FoldGPTError("no lm-eval tasks given")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except (OSError, ConnectionError) as exc:  # hub/datasets errors: offline, missing, unreachable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FoldGPTError(f"cannot reach the data of lm-eval tasks {', '.join(tasks)}: {first}") from None
    return dict(out["results"]) if out else {}
