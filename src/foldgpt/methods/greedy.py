"""The iterative greedy search SLEB and BlockPruner share: at each step, remove the unit whose removal
(with the earlier removals in place) gives the lowest calibration NLL, until enough is removed.

Scores come from `streaming.StreamedNLL`: each greedy step caches every layer's input under the current
removals once, and a trial that changes layer l reruns only layers l..L (about half the work of whole
forward passes, same scores: tested against `calibration_nll`). With `--streaming` the model stays on
the CPU and one block at a time runs on the device."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FoldGPTError
from ..gates import GateSet, unit_names
from ..plan import write_json_atomic
from . import Context

log = logging.getLogger(__name__)


def calibration_nll(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL of `model` on the windows `ids` (whole forward passes)."""
    total, n = 0.0, 0
    for s in range(0, len(ids), batch_size):
        b = ids[s : s + batch_size].to(model.device)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    return total / n


# Finished greedy searches, so methods that share one (SLEB and FoldGPT's ranking in one bench) run it once.
# key -> (weak reference to the model, removal order, NLLs, seconds spent up to each step). Each step depends
# only on the steps before it, so a longer search's prefix is a shorter search's answer, and a shorter one can
# be continued.
_MEMO: dict[tuple, tuple] = {}
# Where finished steps are also written (`foldgpt bench` sets it beside its output), so a stopped run continues a
# search instead of starting it again: one JSON file per search, named by a digest of what the search depends on.
SEARCH_DIR: Path | None = None


@contextmanager
def searches_in(folder: Path | None) -> Iterator[None]:
    """Save (and continue) greedy searches in `folder` inside the block; the old setting returns afterwards, even
    on an error, so a failed run does not leave later runs in the same process writing there."""
    global SEARCH_DIR
    old, SEARCH_DIR = SEARCH_DIR, folder
    try:
        yield
    finally:
        SEARCH_DIR = old


def _disk_key(ctx: Context, unit: str, costs: list[float], ids: torch.Tensor) -> str:
    """A digest of the model (name, size, a few weights), the windows and the search's settings."""
    h = hashlib.sha256()
    first = next(iter(ctx.adapter.layers(ctx.model)[0].parameters()))
    h.update(repr((getattr(ctx.model.config, "_name_or_path", ""), sum(p.numel() for p in ctx.model.parameters()),
                   float(first.detach().float().flatten()[:4096].double().sum()), unit, [round(c, 6) for c in costs],
                   sorted(ctx.protected()))).encode())
    h.update(ids.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _disk_load(name: str) -> tuple[list[int], list[float], list[float]] | None:
    if SEARCH_DIR is None or not (SEARCH_DIR / name).is_file():
        return None
    try:
        d = json.loads((SEARCH_DIR / name).read_text())
        return list(d["order"]), list(d["nll"]), list(d["seconds"])
    except (OSError, ValueError, KeyError):
        return None


def _disk_save(name: str, order: list[int], nlls: list[float], seconds: list[float]) -> None:
    if SEARCH_DIR is None:
        return
    SEARCH_DIR.mkdir(parents=True, exist_ok=True)
    write_json_atomic(SEARCH_DIR / name, {"order": order, "nll": nlls, "seconds": seconds})


def _add_reused(ctx: Context, seconds: float) -> None:
    """Count the seconds a reused search cost when it ran into the run's time (a run may reuse two searches)."""
    ctx.info.reused_search_seconds += seconds


def _memo_key(ctx: Context, unit: str, costs: list[float], ids: torch.Tensor) -> tuple:
    return (id(ctx.model), ids.data_ptr(), tuple(ids.shape), int(ids[:, :8].sum()), unit, tuple(costs),
            tuple(sorted(ctx.protected())), ctx.cfg.streaming, str(ctx.cfg.device))


@torch.no_grad()
def greedy_removal(ctx: Context, unit: str, costs: list[float], need: float, label: str,
                   whole_forward: bool = False) -> tuple[list[int], list[float]]:
    """Remove units (`unit`: "layer" or "sublayer") greedily until their `costs` sum to `need`.
    Returns (removed unit indices in removal order, the calibration NLL after each removal).
    `whole_forward` scores every trial with a whole forward pass instead (the reference path)."""
    ids = ctx.calib[: ctx.cfg.fold.cost_batch * 4]  # a few calibration windows
    key = _memo_key(ctx, unit, costs, ids)
    disk = f"search-{_disk_key(ctx, unit, costs, ids)}.json" if SEARCH_DIR is not None and not whole_forward else ""
    start: tuple[list[int], list[float]] = ([], [])
    hit = _MEMO.get(key)
    if (hit is None or hit[0]() is not ctx.model) and disk and (found := _disk_load(disk)) is not None:
        log.info("%s: continuing the greedy search saved in %s", label, SEARCH_DIR / disk)
        hit = (weakref.ref(ctx.model), *found)
    clock: list[float] = []
    if not whole_forward and hit is not None and hit[0]() is ctx.model:
        order, nlls, clock = hit[1], hit[2], hit[3]
        saved, n = 0.0, 0
        while n < len(order) and saved < need - 1e-9:
            saved += costs[order[n]]
            n += 1
        if saved >= need - 1e-9:
            log.info("%s: reusing an earlier greedy search of this model and calibration set", label)
            _add_reused(ctx, clock[n - 1])  # what the search cost when it ran
            return list(order[:n]), list(nlls[:n])
        start = (list(order), list(nlls))
        _add_reused(ctx, clock[-1] if clock else 0.0)
    base = clock[-1] if clock else 0.0

    def on_step(order: list[int], scores: list[float], steps: list[float]) -> None:
        if disk:
            _disk_save(disk, order, scores, list(clock) + [base + t for t in steps])

    removed, nlls, steps = _search(ctx, unit, costs, need, label, ids, whole_forward, start, on_step=on_step)
    if not whole_forward:
        for k in [k for k, v in _MEMO.items() if v[0]() is not ctx.model]:
            del _MEMO[k]  # one model at a time: do not keep scores of models that are gone
        _MEMO[key] = (weakref.ref(ctx.model), list(removed), list(nlls), list(clock) + [base + t for t in steps])
    return removed, nlls


def _search(ctx: Context, unit: str, costs: list[float], need: float, label: str, ids: torch.Tensor,
            whole_forward: bool, start: tuple[list[int], list[float]],
            on_step: Callable[[list[int], list[float], list[float]], None] | None = None,
            ) -> tuple[list[int], list[float], list[float]]:
    """The search from the `start` removals; also returns the seconds elapsed at the end of each new step."""
    names = unit_names(ctx.num_layers, unit)
    layer_of = [int(n.split(".")[0]) for n in names]
    prot = ctx.protected()
    gates = GateSet(ctx.model, ctx.adapter, unit)
    alive = torch.ones(len(names))
    stream = None
    if not whole_forward:
        from ..streaming import StreamedNLL

        stream = StreamedNLL(ctx.model, ctx.adapter, ids, ctx.cfg.device if ctx.cfg.streaming else ctx.model.device)
    score: Callable[[int], float] = (
        (lambda u: stream.nll(layer_of[u])) if stream is not None else (lambda u: calibration_nll(ctx.model, ids)))
    removed, nlls = list(start[0]), list(start[1])
    for u in removed:
        alive[u] = 0
    saved = sum(costs[u] for u in removed)
    t0, steps = time.perf_counter(), []
    try:
        bar = tqdm(total=need, initial=saved, desc=label, leave=False)
        while saved < need - 1e-9:
            if stream is not None:
                with gates.set(alive):
                    stream.refresh()
            best = None
            for u in range(len(names)):
                if alive[u] == 0 or layer_of[u] in prot:
                    continue
                trial = alive.clone()
                trial[u] = 0
                with gates.set(trial):
                    nll = score(u)
                if best is None or nll < best[0]:
                    best = (nll, u)
            if best is None:
                raise FoldGPTError(f"{label}: every removable unit is gone before the target; raise --target-params")
            alive[best[1]] = 0
            removed.append(best[1])
            nlls.append(best[0])
            steps.append(time.perf_counter() - t0)
            saved += costs[best[1]]
            bar.update(costs[best[1]])
            if on_step is not None:
                on_step(removed, nlls, steps)
            log.info("%s: removed %s (calibration NLL %.4f)", label, names[best[1]], best[0])
        bar.close()
    finally:
        gates.remove()
        if stream is not None:
            stream.close()
    return removed, nlls, steps
