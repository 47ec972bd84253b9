"""Log-likelihood scoring of continuations (as lm-evaluation-harness's ``loglikelihood``) and zero-shot
multiple-choice accuracy of the tasks tasks.py reads.

Trailing whitespace of the context moves to the front of the continuation; then ``whole =
encode(context + continuation)``, ``context_enc = encode(context)``, continuation tokens =
``whole[len(context_enc):]`` (no special tokens; the BOS id is prepended when ``bos=True``). The model
reads ``(context_enc + continuation_enc)[:-1]`` truncated from the left to ``max_length`` tokens, in
right-padded batches with an attention mask. ``acc``: the argmax of the summed continuation log-prob is
the gold choice; ``acc_norm``: the same after dividing by the choice's length in UTF-8 bytes (the
harness divides by ``len(choice)`` in characters: the same for ASCII). Ties go to the first maximum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import FoldGPTError
from .tasks import Task, load_task

logger = logging.getLogger(__name__)


@dataclass
class Score:
    """Summed log-prob of a continuation, its token count, and whether every token was the argmax."""

    logprob: float
    tokens: int
    greedy: bool


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

