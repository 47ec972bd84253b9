"""The benchmarks' text and model loading: the five Austen calibration novels (../shared/data, SHARED_DATA
overrides), Pride and Prejudice held out, and a text of another kind where the system has one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]
OOD_TEXT = "/usr/share/common-licenses/GPL-3"  # the GNU GPL v3: modern legal English, unlike the novels


def austen(name: str) -> str:
    data = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "corpora" / "austen"
    return str(data / f"austen_{name}.txt")


class Bench:
    """A model, its adapter and tokenizer, and the calibration windows `foldgpt compress` draws (512 x 256)."""

    def __init__(self, model_name: str):
        from foldgpt.adapters import get_adapter
        from foldgpt.data import calibration_batches, load_text, needs_bos, tokenize
        from foldgpt.models import load_model

        self._batches, self._load, self._tokenize = calibration_batches, load_text, tokenize
        self.model, self.tok = load_model(model_name)
        self.adapter = get_adapter(self.model.config)
        self.bos_id = self.tok.bos_token_id if needs_bos(self.tok, self.adapter.needs_bos) else None
        self.calib = self.windows([austen(n) for n in CALIB], 512)

    def windows(self, paths: list[str] | None, n: int) -> torch.Tensor:
        """n windows of 256 tokens of the text at `paths` (None: the built-in generic text), seed 0."""
        return self._batches(self._tokenize(self.tok, self._load(paths).text), n, 256, 0, self.bos_id)


@contextmanager
def swapped(module: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run `module` with the given weights (dotted paths of Linears below it) in place of its own, then restore."""
    saved = {}
    try:
        for path, w in weights.items():
            sub = module.get_submodule(path)
            saved[path] = sub.weight
            sub.weight = nn.Parameter(w.to(sub.weight.dtype), requires_grad=False)
        yield
    finally:
        for path, w in saved.items():
            module.get_submodule(path).weight = w


def layer_output(layer: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    """A decoder layer's hidden-state output for input `h`, with the (args, kwargs) the model called it with."""
    args, kwargs = call
    y = layer(h, *args, **kwargs)
    return y[0] if isinstance(y, tuple) else y
