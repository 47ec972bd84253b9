"""The cure's teacher signals, computed once and kept on disk.

For every calibration window the cure will see, the teacher's top-k log-probabilities (values and token
ids, at the distillation temperature) and its last-m block outputs are written to one safetensors file
per window. The cure then reads them back instead of running the teacher, so the teacher's logits over
the whole vocabulary are never resident next to the student's, and the teacher need not stay on the
device. With k equal to the vocabulary size the cached loss equals the live one exactly; a smaller k
drops the teacher's tail mass beyond its top k tokens (the usual top-k distillation approximation).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..fileio import TEACHER_PREFIX, clean_stale
from ..signals import signals_held
from ..stages.analysis import capture_hidden
from .precision import autocast

log = logging.getLogger(__name__)


class TeacherCache:
    """Top-k log-probabilities and last-`tail_layers` block outputs of `teacher` for chosen windows."""

    def __init__(self, folder: str | Path | None = None):
        """`folder` None: a private folder `foldgpt-teacher-<pid>-<random>` in the system temporary folder, removed
        by close(); those of runs that were killed (their process is gone) are removed first."""
        self._own = folder is None
        if folder is None:
            clean_stale(tempfile.gettempdir(), TEACHER_PREFIX)
            folder = tempfile.mkdtemp(prefix=f"{TEACHER_PREFIX}{os.getpid()}-")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bytes = 0

    def path(self, index: int) -> Path:
        return self.folder / f"window{index:07d}.safetensors"

    @torch.no_grad()
    def fill(self, teacher: nn.Module, adapter: Adapter, windows: torch.Tensor, indices: list[int], topk: int,
             tail_layers: int, tau: float, precision: str = "fp32", batch_size: int = 4) -> None:
        """Run the teacher once over windows[indices] and write each window's signals."""
        todo = [i for i in dict.fromkeys(indices) if not self.path(i).exists()]
        device = next(teacher.parameters()).device
        for start in tqdm(range(0, len(todo), batch_size), desc="Teacher cache", leave=False):
            chunk = todo[start : start + batch_size]
            ids = windows[chunk].to(device)
            with autocast(device, precision), capture_hidden(teacher, adapter) as hidden:
                logits = teacher(input_ids=ids, use_cache=False).logits
            logp = F.log_softmax(logits.float() / tau, dim=-1)
            k = min(topk, logp.shape[-1])
            values, tokens = logp.topk(k, dim=-1)
            tail = hidden[len(hidden) - tail_layers:] if tail_layers else []
            for j, index in enumerate(chunk):
                tensors = {"logp": values[j].contiguous().cpu(), "tokens": tokens[j].to(torch.int32).cpu()}
                for m, h in enumerate(tail):
                    tensors[f"tail{m}"] = h[j].contiguous().cpu()
                tmp = self.path(index).with_suffix(".tmp")
                save_file(tensors, str(tmp))
                tmp.replace(self.path(index))
                self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        log.info("teacher cache: %d windows, top-%d, %d tail layers, %.1f MiB in %s", len(todo), topk, tail_layers,
                 self.bytes / 2**20, self.folder)

    def get(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(top-k log-probs (B, T, k), their token ids (B, T, k), [tail output (B, T, D)] oldest first)."""
        items = [load_file(str(self.path(i))) for i in indices]
        logp = torch.stack([d["logp"] for d in items]).to(device)
        tokens = torch.stack([d["tokens"] for d in items]).to(device).long()
        m = sum(1 for key in items[0] if key.startswith("tail"))
        tail = [torch.stack([d[f"tail{j}"] for d in items]).to(device) for j in range(m)]
        return logp, tokens, tail

    def close(self) -> None:
        if self._own:
            with signals_held():  # a second Ctrl-C does not leave half of it
                shutil.rmtree(self.folder, ignore_errors=True)


def topk_kl(t_logp: torch.Tensor, t_tokens: torch.Tensor, student_logits: torch.Tensor,
            tau: float = 1.0) -> torch.Tensor:
    """sum over the teacher's top-k tokens of p_T (log p_T - log p_S), averaged over tokens (x tau^2).
    With k = vocabulary size this is exactly KL(p_T || p_S)."""
    s = F.log_softmax(student_logits.float() / tau, dim=-1).gather(-1, t_tokens)
    return (t_logp.exp() * (t_logp - s)).sum(-1).mean() * tau * tau
