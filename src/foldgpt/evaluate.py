"""Perplexity by the project's protocol: tokenize once, non-overlapping windows, BOS per window where
the model needs it, exp(mean NLL) over every predicted token, plus bits per byte."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import FoldGPTError


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
