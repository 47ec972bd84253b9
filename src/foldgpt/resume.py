"""A stopped `compress` continues where it stopped: every finished stage is saved in a state folder beside the output
(`.OUT.resume` for `--out OUT`), keyed by what it depends on, and the same command reads it back instead of
computing the stage again. Each stage is deterministic, so the result equals an uninterrupted run's (same plan,
same weights); the folder is removed when compress succeeds, and `--fresh` deletes it first.

What is saved, and the key that must match for it to be used:
- analysis.json + analysis.safetensors: the block similarity (key "analysis": the model's weights, the text, the
  calibration windows, where the model runs, the versions of foldgpt, torch and transformers);
- search.json: the search's state after its last finished step (methods/search.py); greedy/: the greedy searches,
  step by step (methods/greedy.SearchCache); plan.json: the method's plan and what it recorded (key "plan": the
  analysis key, every setting but the cure's, the plan file given with --plan);
- cure.json + cure.safetensors: the cure every `cure.checkpoint_every` steps and after its last (key "cure": the
  plan key and the cure's settings; stages/cure_state.py).
Saved state of another key (other text, other settings) is ignored, with a log line, and replaced. Tensors are
written as safetensors and the rest as JSON, each under a temporary name and renamed into place."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import CompressConfig
from .errors import FoldGPTError
from .fileio import write_text_atomic
from .methods import MethodInfo
from .methods.greedy import SavedSearch, SearchCache
from .plan import Plan
from .stages.cure_state import CureCheckpoints, save_tensors_atomic

log = logging.getLogger(__name__)

# stage -> (the key it is saved under, its files; the first is the JSON that holds the key, written last)
STAGES = {
    "analysis": ("analysis", ("analysis.json", "analysis.safetensors")),
    "search": ("plan", ("search.json",)),
    "greedy": ("plan", ("greedy.json", "greedy")),
    "plan": ("plan", ("plan.json",)),
    "cure": ("cure", ("cure.json", "cure.safetensors")),
}
# cure settings that do not change its result
CURE_UNKEYED = ("checkpoint_every", "teacher_cache_dir")


def state_dir(out: str | Path) -> Path:
    """The state folder of the output `out`: `.OUT.resume` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of a model's weights: every tensor's name, shape and type, and 4096 of its values evenly spaced (cheap
    for any size, and any retrained or other model differs)."""
    h = hashlib.sha256(repr((type(model).__name__, model.config.model_type)).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        n = min(4096, flat.numel())
        idx = torch.arange(n, dtype=torch.int64) * (flat.numel() - 1) // max(n - 1, 1)
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        h.update(flat[idx.to(flat.device)].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _rng() -> list[int]:
    return torch.get_rng_state().tolist()


def _set_rng(state: list[int] | None) -> None:
    if state is not None:
        torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))


class Resume:
    """The saved stages of one compress into `out`. `plan`: the plan given with --plan (part of the key);
    `fresh`: delete what is saved first. Nothing is written before the first stage finishes."""

    def __init__(self, out: str | Path, plan: Plan | None = None, fresh: bool = False):
        self.dir = state_dir(out)
        self.plan_digest = _digest(plan.to_dict()) if plan is not None else None
        self.keys: dict[str, str] = {}
        self.cure_every = 0
        self.unwritable = False  # a save failed (read-only place, full disk): the run goes on without saving
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
            log.info("--fresh: removed the state saved in %s", self.dir)

    # ---- keys ---------------------------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, calib: torch.Tensor, text_sha256: str, cfg: CompressConfig) -> None:
        """Key every stage by what it depends on, drop what is saved under other keys, and log what is resumed."""
        from .pipeline import versions

        ver = versions()
        ver.pop("python")
        self.keys["analysis"] = _digest(
            ver, model_fingerprint(model), text_sha256, calib.cpu().numpy().tobytes(),
            {k: getattr(cfg, k) for k in ("seq_len", "calib_seqs", "general_share", "seed", "device", "device_map",
                                          "streaming")})
        plan_cfg = cfg.to_dict()
        plan_cfg.pop("cure")
        self.keys["plan"] = _digest(self.keys["analysis"], plan_cfg, self.plan_digest)
        cure_cfg = {k: v for k, v in asdict(cfg.cure).items() if k not in CURE_UNKEYED}
        self.keys["cure"] = _digest(self.keys["plan"], cure_cfg)
        self.cure_every = cfg.cure.checkpoint_every
        if not self.dir.is_dir():
            return
        for tmp in self.dir.glob(".tmp-*"):  # a write a stopped run did not finish
            tmp.unlink(missing_ok=True)
        stale = []
        for stage in STAGES:
            if self._meta(stage) is None and self._exists(stage):
                if self._key_of(stage) is not None:  # else a write that did not finish: nothing to say
                    stale.append(stage)
                self._drop(stage)
        if stale:
            log.info("resume: ignoring and replacing the %s saved in %s (made for another model, text or "
                     "configuration)", ", ".join(stale), self.dir)
        found = self.found()
        if found:
            log.info("resuming: %s from %s", ", ".join(found), self.dir)

    def found(self) -> list[str]:
        """What is saved for these keys, in words."""
        out = []
        if self._meta("analysis") is not None:
            out.append("analysis")
        if (m := self._meta("search")) is not None:
            out.append(f"{m['rounds']} search step{'s' if m['rounds'] != 1 else ''}")
        if self._meta("greedy") is not None:
            n = len(list((self.dir / "greedy").glob("search-*.json")))
            out.append(f"{n} greedy search{'es' if n != 1 else ''}")
        if self._meta("plan") is not None:
            out.append("plan")
        if (m := self._meta("cure")) is not None:
            out.append(f"cure at step {m['step']}")
        return out

    def _meta(self, stage: str) -> dict | None:
        """The stage's JSON if it is saved under its current key."""
        try:
            meta = json.loads((self.dir / STAGES[stage][1][0]).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("key") == self.keys.get(STAGES[stage][0]) else None

    def _key_of(self, stage: str) -> str | None:
        """The key the stage's JSON was saved under (None: no readable JSON)."""
        try:
            meta = json.loads((self.dir / STAGES[stage][1][0]).read_text())
        except (OSError, ValueError):
            return None
        return meta.get("key") if isinstance(meta, dict) else None

    def _exists(self, stage: str) -> bool:
        return any((self.dir / f).exists() for f in STAGES[stage][1])

    def _drop(self, stage: str) -> None:
        for name in STAGES[stage][1]:  # the JSON first: without it the rest does not count
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass

    def _write(self, stage: str, obj: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Save a stage: its tensors (the second file), then its JSON with the key. A failure to write is logged
        once and the run goes on without saving (what it computes does not depend on it)."""
        if self.unwritable:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensors is not None:
                save_tensors_atomic(self.dir / STAGES[stage][1][1], tensors)
            write_text_atomic(self.dir / STAGES[stage][1][0],
                              json.dumps({"key": self.keys[STAGES[stage][0]], **obj}))
        except (OSError, FoldGPTError) as exc:  # FoldGPTError: a full disk, as fileio reports it
            self.unwritable = True
            log.warning("resume: cannot save the finished stages in %s (%s); this run goes on without saving them",
                        self.dir, exc)

    # ---- stages -------------------------------------------------------------------------------------------
    def similarity(self) -> torch.Tensor | None:
        """The saved block similarity, or None."""
        if self._meta("analysis") is None:
            return None
        try:
            return load_file(str(self.dir / "analysis.safetensors"))["similarity"]
        except (OSError, ValueError, KeyError):
            self._drop("analysis")
            return None

    def save_similarity(self, sim: torch.Tensor) -> None:
        if self._meta("analysis") is None:  # else it is the saved one
            self._write("analysis", {}, {"similarity": sim})

    def search_state(self) -> dict | None:
        """The search's saved state (search.save_state's dict), with the generator as it was then; or None."""
        meta = self._meta("search")
        if meta is not None:
            _set_rng(meta.get("rng"))
        return meta

    def save_search(self, state: dict) -> None:
        self._write("search", {**state, "rng": _rng()})

    def searches(self) -> SearchCache:
        """Greedy searches saved step by step under greedy/ (the folder counts while greedy.json has this key)."""
        return _Searches(self)

    def planned(self, ctx, run: Callable) -> Plan:
        """The method's plan for `ctx`: the saved one (with what the method recorded, and the generator as planning
        left it), or `run(ctx)`'s, saved."""
        meta = self._meta("plan")
        if meta is not None:
            try:
                plan = Plan.from_dict(meta["plan"])
            except (FoldGPTError, KeyError, TypeError, ValueError):
                self._drop("plan")
            else:
                names = {f.name for f in fields(MethodInfo)}
                ctx.info = MethodInfo(**{k: v for k, v in meta.get("info", {}).items() if k in names})
                _set_rng(meta.get("rng"))
                return plan
        plan = run(ctx)
        info = json.loads(json.dumps(asdict(ctx.info), default=_plain))
        self._write("plan", {"plan": plan.to_dict(), "info": info, "rng": _rng()})
        self._drop("search")  # what the plan was made of is not needed any more
        self._drop("greedy")
        return plan

    def cure_checkpoints(self) -> CureCheckpoints:
        return CureCheckpoints(self.dir, self.keys["cure"], 0 if self.unwritable else self.cure_every)

    # ---- the end ------------------------------------------------------------------------------------------
    def discard(self) -> None:
        """Remove the state folder (the run succeeded, or its input was wrong)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Around the stages and the saving: an error line (FoldGPTError: bad input, a full disk) removes the state,
        anything else (an interruption, a crash) keeps it for the next run."""
        try:
            yield
        except FoldGPTError:
            self.discard()
            raise
        except BaseException:
            if self.dir.exists():
                log.info("the finished stages are saved in %s: the same command continues from there (--fresh "
                         "starts over)", self.dir)
            raise


class _Searches(SearchCache):
    """A SearchCache in the state folder: greedy.json, with the plan key, is written before the first search step."""

    def __init__(self, resume: Resume):
        super().__init__(resume.dir / "greedy")
        self.resume = resume

    def get(self, key: str) -> SavedSearch | None:
        return super().get(key) if self.resume._meta("greedy") is not None else self.searches.get(key)

    def put(self, key: str, search: SavedSearch) -> None:
        if self.resume._meta("greedy") is None:
            self.resume._drop("greedy")
            self.resume._write("greedy", {})
        if self.resume.unwritable:
            self.folder = None  # kept in memory only
        try:
            super().put(key, search)
        except (OSError, FoldGPTError) as exc:  # FoldGPTError: a full disk, as fileio reports it
            self.folder = None
            log.warning("resume: cannot save the greedy search in %s (%s); it goes on without saving", self.dir,
                        exc)


def _plain(obj):
    """JSON for the numbers a method may record as tensors or numpy scalars."""
    return obj.item() if hasattr(obj, "item") else str(obj)
