"""Closed-form fits of folded children on calibration activations.

A fitted child replaces each Linear W (out x in) of its layer by alpha * W_parent + B A, fitted on the inputs X
(tokens x in) that the Linear sees in the dense model:

- whitening (SVD-LLM): C = X^T X + ridge I (float64), C = L L^T (Cholesky). For a target D, the rank-r B A
  minimising ||(D - B A) X^T||_F is the truncated SVD of D L mapped back: D L = U S V^T,
  B = U_r S_r^1/2, A = S_r^1/2 V_r^T L^-1;
- alpha: least squares on the outputs, alpha = <W X^T, W_p X^T> / ||W_p X^T||^2 = tr(W C W_p^T) / tr(W_p C W_p^T);
  the low-rank factors then fit D = W - alpha W_p. alpha = 0 is a low-rank child of the layer's own weights.

Everything here is pure tensor math except `input_covariances`, which runs the model once with hooks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter

RIDGE = 1e-3  # ridge added to C, relative to the mean of its diagonal (keeps L well conditioned)


@torch.no_grad()
def input_covariances(model: nn.Module, adapter: Adapter, ids: torch.Tensor, paths: list[str],
                      batch_size: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """X^T X (float64, summed over tokens) of the input of every Linear `paths` of every layer, on windows `ids`.
    Linears that read the same tensor (q/k/v, gate/up) share one computation."""
    layers = adapter.layers(model)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    memo: dict = {}  # the current layer's inputs (tensor, X^T X), so Linears reading one tensor share it
    hooks = []

    def hook_for(key: tuple[int, str]):
        def hook(module, args, out):
            x = args[0]
            if memo.get("layer") != key[0]:  # one layer at a time: its inputs are alive while it runs
                memo.clear()
                memo["layer"] = key[0]
            hit = next((c for t, c in memo.get("seen", []) if t is x), None)  # the same tensor object, not address
            if hit is None:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                hit = (flat.t() @ flat).double()
                memo.setdefault("seen", []).append((x, hit))
            sums[key] = hit if key not in sums else sums[key] + hit
        return hook

    for i, layer in enumerate(layers):
        for p in paths:
            hooks.append(layer.get_submodule(p).register_forward_hook(hook_for((i, p))))
    try:
        for s in tqdm(range(0, len(ids), batch_size), desc="Fitting: input covariances", leave=False):
            memo.clear()
            model(input_ids=ids[s : s + batch_size].to(model.device), use_cache=False)
    finally:
        memo.clear()
        for h in hooks:
            h.remove()
    return sums


def whitening(cov: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with L L^T = cov + ridge * mean(diag) I, in float64."""
    c = cov.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lam = ridge * c.diagonal().mean().clamp_min(1e-12)
    for _ in range(6):  # raise the ridge until the factorisation succeeds (rank-deficient inputs)
        chol, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) == 0:
            break
        lam = lam * 10
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol, inv


@dataclass
class LowRankFit:
    """The whitened SVD of one target D (out x in): every rank's factors and error from one decomposition."""

    u: torch.Tensor  # (out, k)
    s: torch.Tensor  # (k,)
    vh_linv: torch.Tensor  # (k, in): V^T L^-1
    total: float  # ||D L||^2: the error of the zero approximation (deleting the Linear's output)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A), B (out x r), A (r x in), float32; a rank above the fit's pads with zeros."""
        r = min(rank, self.s.numel())
        root = self.s[:r].sqrt()
        b = torch.zeros(self.u.shape[0], rank, dtype=torch.float64, device=self.u.device)
        a = torch.zeros(rank, self.vh_linv.shape[1], dtype=torch.float64, device=self.u.device)
        b[:, :r] = self.u[:, :r].double() * root
        a[:r] = root[:, None] * self.vh_linv[:r].double()
        return b.float(), a.float()

    def weight(self, rank: int) -> torch.Tensor:
        r = min(rank, self.s.numel())
        return (self.u[:, :r] * self.s[:r].float()) @ self.vh_linv[:r]

    def error(self, rank: int) -> float:
        """||(D - B A) X^T||^2 on the calibration inputs (plus the ridge) at this rank."""
        return float((self.s[rank:] ** 2).sum())


def lowrank_fit(target: torch.Tensor, chol: torch.Tensor, inv: torch.Tensor) -> LowRankFit:
    m = target.double() @ chol
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    # decomposed in float64, kept in float32 (the search holds every layer's fits)
    return LowRankFit(u.float(), s, (vh @ inv).float(), float((s**2).sum()))


def lstsq_alpha(w: torch.Tensor, w_parent: torch.Tensor, cov: torch.Tensor) -> float:
    """The scalar alpha minimising ||(W - alpha W_p) X^T||_F."""
    wd, pd, c = w.double(), w_parent.double(), cov.double()
    den = float(((pd @ c) * pd).sum())
    return float(((wd @ c) * pd).sum()) / den if den > 0 else 0.0


@dataclass
class LinearChoice:
    """A child's fitted Linear: mode ("own" or "alpha"), alpha, factors and their calibration error."""

    mode: str
    alpha: float
    b: torch.Tensor
    a: torch.Tensor
    error: float
    total: float


class ChildFits:
    """Whitened low-rank fits of every layer's Linears, computed once from one pass over calibration windows and
    reused by the search (every rank of a Linear comes from one SVD) and by the plan's application."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor, paths: list[str],
                 ridge: float = RIDGE):
        self.model, self.adapter, self.paths, self.ridge = model, adapter, list(paths), ridge
        self.cov = input_covariances(model, adapter, ids, self.paths)
        self._white: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._own: dict[tuple[int, str], LowRankFit] = {}
        self._par: dict[tuple[int, int, str], tuple[float, LowRankFit]] = {}

    def with_ridge(self, ridge: float) -> ChildFits:
        """The same covariances whitened with another ridge (its fits are computed on demand)."""
        other = copy.copy(self)
        other.ridge, other._white, other._own, other._par = ridge, {}, {}, {}
        return other

    def weight(self, layer: int, path: str) -> torch.Tensor:
        return self.adapter.layers(self.model)[layer].get_submodule(path).weight.detach()

    def white(self, layer: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, path)
        if key not in self._white:
            self._white[key] = whitening(self.cov[key], self.ridge)
        return self._white[key]

    def own(self, layer: int, path: str) -> LowRankFit:
        """The fit of the layer's own weight (alpha = 0)."""
        key = (layer, path)
        if key not in self._own:
            self._own[key] = lowrank_fit(self.weight(layer, path), *self.white(layer, path))
        return self._own[key]

    def with_parent(self, layer: int, parent: int, path: str) -> tuple[float, LowRankFit]:
        """alpha by least squares against the parent's weight, and the fit of what alpha * parent leaves."""
        key = (layer, parent, path)
        if key not in self._par:
            w, wp = self.weight(layer, path), self.weight(parent, path)
            alpha = lstsq_alpha(w, wp, self.cov[(layer, path)])
            self._par[key] = alpha, lowrank_fit(w.double() - alpha * wp.double(), *self.white(layer, path))
        return self._par[key]

    def own_weights(self, layer: int, rank: int) -> dict[str, torch.Tensor]:
        """The effective weights of the layer as an own low-rank child at `rank` (for scoring trials)."""
        return {p: self.own(layer, p).weight(rank) for p in self.paths}

    def choose(self, layer: int, parent: int | None, rank: int, use_parent: bool, margin: float = 0.1,
               ) -> dict[str, LinearChoice]:
        """Per Linear: the own low-rank fit, or alpha * parent + fit where that lowers the calibration error by more
        than `margin` (a fraction; the parent term must pay for running the parent's matrix)."""
        out = {}
        for p in self.paths:
            own = self.own(layer, p)
            best = LinearChoice("own", 0.0, *own.factors(rank), own.error(rank), own.total)
            if use_parent and parent is not None:
                alpha, fit = self.with_parent(layer, parent, p)
                if fit.error(rank) < (1 - margin) * best.error:
                    best = LinearChoice("alpha", alpha, *fit.factors(rank), fit.error(rank), own.total)
            out[p] = best
        return out


def lowrank_cost(layer: nn.Module, paths: list[str], rank: int) -> int:
    """Parameters of rank-r factors on the Linears `paths` of `layer`."""
    return sum(rank * (layer.get_submodule(p).in_features + layer.get_submodule(p).out_features) for p in paths)


@torch.no_grad()
def fit_linear_(view: nn.Module, own: nn.Linear, fits: ChildFits, layer: int, parent: int, path: str) -> None:
    """Initialise a child's SharedLinear `view` (mode own / alpha / shared) in closed form from `fits`; `own` is the
    child's original Linear (its bias is kept where the mode has one)."""
    if view.mode == "own":
        fit = fits.own(layer, path)
    elif view.mode == "alpha":
        alpha, fit = fits.with_parent(layer, parent, path)
        view.alpha.fill_(alpha)
    else:  # the parent at full strength: fit what it leaves
        w, wp = fits.weight(layer, path), fits.weight(parent, path)
        fit = lowrank_fit(w.double() - wp.double(), *fits.white(layer, path))
    if view.rank > 0:
        b, a = fit.factors(view.rank)
        view.lora_B.copy_(b.to(view.lora_B.dtype))
        view.lora_A.copy_(a.to(view.lora_A.dtype))
    if getattr(view, "bias", None) is not None and own.bias is not None and view.mode != "shared":
        bias = own.bias.double() - (float(view.alpha) * view.base.bias.double() if view.mode == "alpha" else 0.0)
        view.bias.copy_(bias.to(view.bias.dtype))
