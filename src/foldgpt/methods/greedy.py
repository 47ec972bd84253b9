"""The iterative greedy search SLEB and BlockPruner share: at each step, remove the unit whose removal
(with the earlier removals in place) gives the lowest calibration NLL, until enough is removed.

Scores come from `streaming.StreamedNLL`: each greedy step caches every layer's input under the current
removals once, and a trial that changes layer l reruns only layers l..L (about half the work of whole
forward passes, same scores: tested against `calibration_nll`). With `--streaming` the model stays on
the CPU and one block at a time runs on the device.

A `SearchCache` on the method's Context (`foldgpt bench` passes one per run) keeps finished searches: each step
depends only on the steps before it, so a longer search's prefix is a shorter search's answer, and a shorter one
can be continued."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FoldGPTError
from ..fileio import write_json_atomic
from ..stages.gates import GateSet, unit_names
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


@dataclass
class SavedSearch:
    """A greedy search so far: the removed units in order, the NLL after each, and the seconds spent up to each."""

    order: list[int]
    nll: list[float]
    seconds: list[float]


class SearchCache:
    """Finished greedy searches of one run, so methods that share one (SLEB and FoldGPT's greedy ranking in one
    bench) run it once. With `folder`, every step is also written there (one JSON file per search, named by a digest
    of what the search depends on), so a stopped run continues a search instead of starting it again."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.searches: dict[str, SavedSearch] = {}  # key -> the longest search of that key so far

    def get(self, key: str) -> SavedSearch | None:
        """The search saved under `key`, from memory or else from the folder."""
        if key in self.searches or self.folder is None:
            return self.searches.get(key)
        path = self.folder / f"search-{key}.json"
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            found = SavedSearch(list(d["order"]), list(d["nll"]), list(d["seconds"]))
        except (OSError, ValueError, KeyError):
            return None
        log.info("continuing the greedy search saved in %s", path)
        self.searches[key] = found
        return found

    def put(self, key: str, search: SavedSearch) -> None:
        self.searches[key] = search
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / f"search-{key}.json",
                              {"order": search.order, "nll": search.nll, "seconds": search.seconds})


def search_key(ctx: Context, unit: str, costs: list[float], ids: torch.Tensor) -> str:
    """A digest of what a search depends on: the model (name, size, a few weights), the windows, the unit, the costs,
    the protected layers, and where the scores run (streamed scores differ in the last digits)."""
    h = hashlib.sha256()
    first = next(iter(ctx.adapter.layers(ctx.model)[0].parameters()))
    h.update(repr((getattr(ctx.model.config, "_name_or_path", ""), sum(p.numel() for p in ctx.model.parameters()),
                   float(first.detach().float().flatten()[:4096].double().sum()), unit, [round(c, 6) for c in costs],
                   sorted(ctx.protected()), ctx.cfg.streaming)).encode())
    h.update(ids.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _add_reused(ctx: Context, seconds: float) -> None:
    """Count the seconds a reused search cost when it ran into the run's time (a run may reuse two searches)."""
    ctx.info.reused_search_seconds += seconds


@torch.no_grad()
def greedy_removal(ctx: Context, unit: str, costs: list[float], need: float, label: str,
                   whole_forward: bool = False) -> tuple[list[int], list[float]]:
    """Remove units (`unit`: "layer" or "sublayer") greedily until their `costs` sum to `need`.
    Returns (removed unit indices in removal order, the calibration NLL after each removal).
    `whole_forward` scores every trial with a whole forward pass instead (the reference path, never cached)."""
    ids = ctx.calib[: ctx.cfg.fold.cost_batch * 4]  # a few calibration windows
    cache = None if whole_forward else ctx.searches
    key = search_key(ctx, unit, costs, ids) if cache is not None else ""
    hit = cache.get(key) if cache is not None else None
    start: tuple[list[int], list[float]] = ([], [])
    clock: list[float] = []
    if hit is not None:
        clock = list(hit.seconds)
        saved, n = 0.0, 0
        while n < len(hit.order) and saved < need - 1e-9:
            saved += costs[hit.order[n]]
            n += 1
        if saved >= need - 1e-9:
            log.info("%s: reusing an earlier greedy search of this model and calibration set", label)
            _add_reused(ctx, clock[n - 1])  # what the search cost when it ran
            return list(hit.order[:n]), list(hit.nll[:n])
        start = (list(hit.order), list(hit.nll))
        _add_reused(ctx, clock[-1] if clock else 0.0)
    base = clock[-1] if clock else 0.0

    def on_step(order: list[int], scores: list[float], steps: list[float]) -> None:
        if cache is not None:
            cache.put(key, SavedSearch(list(order), list(scores), clock + [base + t for t in steps]))

    removed, nlls, _ = _search(ctx, unit, costs, need, label, ids, whole_forward, start, on_step=on_step)
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
        from ..scale.streaming import StreamedNLL

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
