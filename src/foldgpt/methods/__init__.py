"""Compression methods, one registry. Each turns a calibration context into a Plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters import Adapter
from ..config import CompressConfig
from ..errors import FoldGPTError
from ..plan import Plan
from ..stages.budget import Budget

if TYPE_CHECKING:
    from ..resume import Resume
    from .greedy import SearchCache


@dataclass
class MethodInfo:
    """What a method records beside its plan: diagnostics for people and tests, and the few values the pipeline
    reads (the gate history for gate_training.png, `--unit auto`'s choice for the plan's provenance, the time of
    reused greedy searches for bench). None: the method did not run that step."""

    gate_history: list[dict] = field(default_factory=list)  # gate training, one record per step ({"kl": ...})
    ranking: dict | None = None  # foldgpt's greedy ranking: {"unit", "order", "nll"}
    child_search: dict | None = None  # "parent->child": {"nll", "gate", "nll_deleted"}
    fold_costs: dict | None = None  # "parent->child": measured cost of folding (the gates ranking)
    unit_choice: dict | None = None  # --unit auto: {"chosen", "dense_nll", "end_nll", "rise_ratio"}
    search: dict | None = None  # foldgpt's search: {"ranks", "loss_dense", "steps", "final_ranks"}
    sleb: dict | None = None  # {"order", "nll"}
    blockpruner: dict | None = None  # {"order", "nll", "saved_params", "needed_params"}
    laco: dict | None = None  # thresholds tried and merges accepted (laco.py)
    compensation: list[dict] | None = None  # one record per compensated span (compensate.apply_compensation_)
    reused_search_seconds: float = 0.0  # what greedy searches reused from earlier runs cost when they ran


@dataclass
class Context:
    """What every method gets: the dense model, its calibration tokens and the budget."""

    model: nn.Module
    adapter: Adapter
    calib: torch.Tensor  # (N, T) token ids
    cfg: CompressConfig
    budget: Budget
    bos: bool
    similarity: torch.Tensor | None = None  # (L+1, L+1) mean cosine, from the analysis
    info: MethodInfo = field(default_factory=MethodInfo)  # what the method records beside its plan
    fits: object | None = None  # fit.ChildFits of the dense model, built on first use (child_fits)
    searches: SearchCache | None = None  # finished greedy searches to reuse and continue; None: none kept
    resume: Resume | None = None  # where compress saves finished stages (resume.py); None: nothing saved
    general: torch.Tensor | None = None  # windows of built-in general text the search also scores (--search-general)

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    def child_fits(self):
        """Whitened low-rank fits of every layer's Linears (fit.ChildFits), from the first calibration windows."""
        if self.fits is None:
            from ..stages.fit import ChildFits

            ids = self.calib[: min(self.cfg.fold.fit_windows, len(self.calib))]
            self.fits = ChildFits(self.model, self.adapter, ids, self.cfg.fold.shared_linears or list(
                self.adapter.linears))
        return self.fits

    def protected(self) -> set[int]:
        return {0, self.num_layers - 1} if self.cfg.protect_ends else set()

    def new_plan(self, removed: list[str], groups: list[list[int]], **kw) -> Plan:
        return make_plan(self.cfg, self.model, self.adapter, removed, groups, **kw)


def make_plan(cfg: CompressConfig, model, adapter: Adapter, removed: list[str], groups: list[list[int]],
              **kw) -> Plan:
    """A plan for `model` removing `removed` and folding `groups`, with the fold settings of `cfg`; its unit is
    `unit=` when given (the one `--unit auto` chose), else the one its method always ranks (BlockPruner:
    sub-blocks), else the config's. Its compensation is `compensation=` when given, else the one its method always
    applies (ReplaceMe, LinearPatch), else the config's --compensate."""
    fixed = METHODS[kw["method"]].unit if kw.get("method") in METHODS else None
    compensation = kw.pop("compensation", None)
    if compensation is None:
        compensation = (METHODS[kw["method"]].compensation if kw.get("method") in METHODS else "") or (
            "" if cfg.compensate == "none" else cfg.compensate)
    return Plan(
        num_layers=len(adapter.layers(model)),
        model_type=model.config.model_type,
        removed=removed,
        groups=groups,
        layer_kinds=adapter.layer_kinds(model.config),
        shared_linears=list(cfg.fold.shared_linears),
        adapter_rank=kw.pop("adapter_rank", cfg.fold.adapter_rank if groups else 0),
        adapter_init=kw.pop("adapter_init", cfg.fold.adapter_init),
        position_gates=cfg.fold.position_gates,
        child_gates=kw.pop("child_gates", {}),
        across_kinds=kw.pop("across_kinds", cfg.fold.across_kinds),
        unit=kw.pop("unit", None) or fixed or cfg.ranking.fixed_unit,
        compensation=compensation,
        **kw,
    )


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Context], Plan]
    cures_by_default: bool
    folds: bool  # uses the fold budget (removal + sharing) rather than removal only
    description: str
    merges: bool = False  # its plans merge layers (more than the removed layers, groups and gates a row records)
    unit: str | None = None  # the unit it always ranks ("sublayer" for BlockPruner); None: the config's --unit
    compensation: str = ""  # the compensation its plans always carry (compensate.py); "": the config's --compensate


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FoldGPTError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def lowest(scores: list[float], n: int, protected: set[int]) -> list[int]:
    """Indices of the n lowest scores, skipping protected ones."""
    order = [i for i in sorted(range(len(scores)), key=lambda i: scores[i]) if i not in protected]
    if n > len(order):
        raise FoldGPTError(f"cannot remove {n} layers: only {len(order)} are removable")
    return sorted(order[:n])


from . import blockpruner, foldgpt, laco, peers, replaceme, shortgpt  # noqa: E402,F401  (registration)
