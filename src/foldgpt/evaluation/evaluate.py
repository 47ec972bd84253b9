"""Evaluation of a model, the one path `foldgpt eval` and `foldgpt bench` share (evaluate_model): perplexity by
the project's protocol (tokenize once, non-overlapping windows, BOS per window where the model needs it,
exp(mean NLL) over every predicted token, plus bits per byte), zero-shot multiple-choice tasks (tasks.py,
scoring.py), a cloze task (cloze.py) and, optionally, lm-evaluation-harness tasks."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..errors import FoldGPTError
from .cloze import ClozeExample, evaluate_cloze
from .scoring import evaluate_tasks

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    bytes: int
    bits_per_byte: float
    seq_len: int
    windows: int
    bos: bool

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(ids: torch.Tensor, seq_len: int, bos_id: int | None, max_tokens: int | None) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows of `seq_len` model inputs: (W, seq_len).

    Every window predicts seq_len - 1 tokens; `max_tokens` caps the predicted tokens (whole windows)."""
    body = seq_len - (1 if bos_id is not None else 0)
    n = ids.numel() // body
    if n == 0:
        raise FoldGPTError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if max_tokens is not None:
        n = max(1, min(n, math.ceil(max_tokens / (seq_len - 1))))
    rows = ids[: n * body].view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               desc: str = "Perplexity") -> tuple[float, int]:
    """Sum of NLL (nats) over every predicted token (positions 1..T-1 of each window) and their count."""
    total, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
        ids = windows[i : i + batch_size].to(model.device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        target = ids[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
    return total, count


def perplexity(model: nn.Module, tokenizer, ids: torch.Tensor, seq_len: int, bos: bool,
               max_tokens: int | None = None, batch_size: int = 4) -> PerplexityResult:
    windows = make_windows(ids, seq_len, tokenizer.bos_token_id if bos else None, max_tokens)
    nll, count = window_nll(model, windows, batch_size)
    n_bytes = sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in windows[:, 1:])
    return PerplexityResult(
        perplexity=math.exp(nll / count), nll=nll / count, tokens=count, bytes=n_bytes,
        bits_per_byte=nll / math.log(2) / max(1, n_bytes), seq_len=seq_len, windows=len(windows), bos=bos,
    )


@dataclass
class Evaluation:
    """One model's results: perplexity per text, then (where asked) the tasks', the cloze task's and lm-eval's."""

    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)  # text name -> result
    tasks: dict[str, dict] = field(default_factory=dict)  # task name -> {"task", "n", "acc", "acc_norm"}
    cloze: dict | None = None  # {"n", "acc", "ppl", "tokens"}
    lm_eval: dict | None = None  # lm-eval's per-task "results"


def evaluate_model(model: nn.Module, tokenizer, bos: bool, texts: dict[str, torch.Tensor], cfg: EvalConfig,
                   cloze: list[ClozeExample] | None = None) -> Evaluation:
    """Evaluate `model`: the perplexity of each token stream of `texts` (name -> ids), the multiple-choice tasks of
    `cfg.tasks`, the `cloze` examples (cloze.cloze_examples, built once for every model) and `cfg.lm_eval`."""
    out = Evaluation()
    for name, ids in texts.items():
        res = perplexity(model, tokenizer, ids, cfg.seq_len, bos, cfg.max_tokens, cfg.batch_size)
        log.info("%s: perplexity %.3f over %d tokens", name, res.perplexity, res.tokens)
        out.perplexity[name] = res
    if cfg.tasks:
        out.tasks = evaluate_tasks(model, tokenizer, cfg.tasks, bos=bos, limit=cfg.task_limit)
    if cloze is not None:
        out.cloze = evaluate_cloze(model, tokenizer, cloze, bos=bos)
    if cfg.lm_eval:
        out.lm_eval = run_lm_eval(model, tokenizer, cfg.lm_eval, limit=cfg.task_limit)
    return out


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
