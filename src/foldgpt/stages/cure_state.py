"""The cure's state on disk, so a stopped cure continues where its last checkpoint left it (resume.py).

A checkpoint holds what the next step depends on: the trainable parameters, the optimizer's moments, the global
random-number generator states, and the number of finished steps with their history (the learning-rate schedule
and the data order follow from the step: cure.lr_at, cure._schedule). Tensors go to `cure.safetensors`, the rest
to `cure.json`, each written under a temporary name and renamed into place; `cure.json` is written last, so a
checkpoint is only read once both are whole."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import FoldGPTError
from ..fileio import write_json_atomic

log = logging.getLogger(__name__)


def rng_state() -> dict[str, torch.Tensor]:
    """The global torch generator states: the CPU one, and each CUDA device's once CUDA is in use."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state saved (CUDA devices that are not there now are left alone)."""
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors of `tensors` (copied to the CPU, unshared), written under a temporary name and renamed."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CureCheckpoints:
    """Saves the cure every `every` steps (and after its last step) in `folder`, tagged with `key` (what the cure
    depends on, resume.py); `restore` continues from a checkpoint of the same key."""

    def __init__(self, folder: Path, key: str, every: int):
        self.folder, self.key, self.every = Path(folder), key, every
        self.json, self.tensors = self.folder / "cure.json", self.folder / "cure.safetensors"

    def saved_step(self) -> int | None:
        """The step of the checkpoint saved for this key, or None."""
        try:
            meta = json.loads(self.json.read_text())
        except (OSError, ValueError):
            return None
        return meta.get("step") if meta.get("key") == self.key else None

    def restore(self, params: list[nn.Parameter], opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
        """Load the saved checkpoint into `params` and `opt` and the generators. Returns (the next step, the history
        so far); (0, []) when nothing usable is saved."""
        if self.saved_step() is None:
            return 0, []
        try:
            meta = json.loads(self.json.read_text())
            t = load_file(str(self.tensors))
            saved = [t[f"param.{i}"] for i in range(meta["n_params"])]
            if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
                raise ValueError("the trainable parameters differ")
            state = {int(i): {k: t[f"opt.{i}.{k}"] for k in names} for i, names in meta["opt_state"].items()}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cure: the checkpoint in %s cannot be used (%s); the cure starts from step 0", self.folder, exc)
            return 0, []
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        set_rng_state(t)
        log.info("cure: continuing from the checkpoint at step %d", meta["step"])
        return meta["step"], meta["history"]

    def step_done(self, step: int, steps: int, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                  history: list[dict]) -> None:
        """After `step` finished steps of `steps`: save a checkpoint every `every` steps and after the last."""
        if self.every <= 0 or (step % self.every and step != steps):
            return
        tensors = {f"param.{i}": p for i, p in enumerate(params)}
        opt_state = {}
        for i, s in opt.state_dict()["state"].items():
            opt_state[str(i)] = sorted(k for k, v in s.items() if isinstance(v, torch.Tensor))
            tensors.update({f"opt.{i}.{k}": s[k] for k in opt_state[str(i)]})
        tensors.update(rng_state())
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.json.unlink(missing_ok=True)  # the old checkpoint stops counting before its tensors are replaced
            save_tensors_atomic(self.tensors, tensors)
            write_json_atomic(self.json, {"key": self.key, "step": step, "n_params": len(params),
                                          "opt_state": opt_state, "history": history})
        except (OSError, FoldGPTError) as exc:  # a read-only place, a full disk: the cure goes on without them
            self.every = 0
            log.warning("cure: cannot save a checkpoint in %s (%s); the cure goes on without them", self.folder, exc)
            return
        log.debug("cure: checkpoint at step %d in %s", step, self.folder)
