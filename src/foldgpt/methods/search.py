"""One search over actions per layer: keep it, delete its attention or its MLP sub-block, delete it, or make it a
fitted low-rank child (fit.py) at one of a few ranks. Each step takes the action with the smallest calibration-loss
rise per unique parameter saved, with the earlier actions in place, until the model is at the parameter target;
slack left by the last step goes to the children's ranks, so the result lands on the target.

Scoring is the cost: a trial that changes layer l reruns only layers l.. on cached inputs (streaming.StreamedNLL),
and after the first step only the `rescore` actions that ranked best at their last scoring are scored again (with
the actions of the layer that just changed; lazy greedy: a rise seldom shrinks when more is removed). `score`
"topk" replaces the vocabulary head by the teacher's top-k tokens plus the target (the restricted softmax's
cross-entropy), which matters where the head dominates (Gemma-3: 262k tokens); `bench/search_agreement.py` checks
both proxies against the exact search.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import FoldGPTError
from ..scale.streaming import StreamedNLL
from ..stages.fit import ChildFits, lowrank_cost
from ..stages.gates import GateSet
from ..stages.structure import layer_params
from . import Context

log = logging.getLogger(__name__)

KEEP, NO_ATTN, NO_MLP, GONE = "keep", "attn", "mlp", "gone"


@dataclass(frozen=True)
class LayerCosts:
    """Unique parameters of one layer in each state."""

    block: int
    attn: int  # what deleting the attention sub-block frees (branch + its norms)
    mlp: int
    child_base: int  # what a child keeps besides its factors (norms, biases of own Linears)
    per_rank: int  # parameters per unit of rank (sum of in + out over the Linears)

    def params(self, state: tuple) -> int:
        kind = state[0]
        if kind == KEEP:
            return self.block
        if kind == NO_ATTN:
            return self.block - self.attn
        if kind == NO_MLP:
            return self.block - self.mlp
        if kind == GONE:
            return 0
        return self.child_base + state[1] * self.per_rank  # ("child", rank)


def layer_costs(model: nn.Module, ctx: Context, paths: list[str]) -> list[LayerCosts]:
    out = []
    ad = ctx.adapter
    def part(layer, branch, norms):
        mods = [layer.get_submodule(branch), *(layer.get_submodule(n) for n in norms)]
        return sum(p.numel() for m in mods for p in m.parameters())

    for layer in ad.layers(model):
        lin = sum(p.numel() for path in paths for p in layer.get_submodule(path).parameters())
        biases = sum(layer.get_submodule(path).bias.numel() for path in paths
                     if layer.get_submodule(path).bias is not None)
        out.append(LayerCosts(layer_params(layer), part(layer, ad.attn_branch, ad.attn_norms),
                              part(layer, ad.mlp_branch, ad.mlp_norms), layer_params(layer) - lin + biases,
                              lowrank_cost(layer, paths, 1)))
    return out


ACTIONS = ("attn", "mlp", "layer", "child")  # what the search may do to a layer (`--actions`)


def undos(state: tuple, ranks: list[int], actions: tuple[str, ...] = ACTIONS) -> list[tuple]:
    """The states with more parameters one step back from `state` (what the refinement may give back): a child
    at a higher rank, a deleted layer as a child or as a half, a half layer whole again."""
    kind = state[0]
    if kind == "child":
        return [("child", r) for r in ranks if r > state[1]]
    if kind in (NO_ATTN, NO_MLP):
        return [(KEEP,)]
    if kind == GONE:
        return ([("child", r) for r in ranks] if "child" in actions else []) + (
            [(NO_ATTN,)] if "attn" in actions else []) + ([(NO_MLP,)] if "mlp" in actions else [])
    return []


def transitions(state: tuple, ranks: list[int], actions: tuple[str, ...] = ACTIONS) -> list[tuple]:
    """The states one action leads to from `state` (each saves parameters), among the allowed `actions`."""
    kind = state[0]
    gone = [(GONE,)] if "layer" in actions else []
    if kind == KEEP:
        return ([(NO_ATTN,)] if "attn" in actions else []) + ([(NO_MLP,)] if "mlp" in actions else []) + gone + (
            [("child", r) for r in ranks] if "child" in actions else [])
    if kind in (NO_ATTN, NO_MLP):
        return [(GONE,)]
    if kind == "child":
        return [("child", r) for r in ranks if r < state[1]] + gone
    return []


def ranks_for(costs: LayerCosts, fractions: list[float]) -> list[int]:
    """Child ranks whose factors cost the given fractions of a block."""
    return sorted({max(1, int(f * costs.block / costs.per_rank)) for f in fractions}, reverse=True)


class _Scorer:
    """Calibration loss of the model under a state: sub-block gates + swapped low-rank weights."""

    def __init__(self, ctx: Context, ids: torch.Tensor, fits: ChildFits, score: str, topk: int):
        self.ctx, self.fits, self.score = ctx, fits, score
        self.layers = ctx.adapter.layers(ctx.model)
        self.gates = GateSet(ctx.model, ctx.adapter, "sublayer")
        self.alive = torch.ones(2 * len(self.layers))
        self.swapped: dict[int, dict[str, nn.Parameter]] = {}  # layer -> original weights while it is a child
        self.stream = StreamedNLL(ctx.model, ctx.adapter, ids, ctx.model.device)
        self.target = self.stream.ids[:, 1:]
        self.cand = None
        if score == "topk":
            with torch.no_grad():
                logits = self._logits(self.stream.refresh())  # the dense model: the teacher
                top = logits.topk(topk, dim=-1).indices
            self.cand = torch.cat([self.target[..., None], top], dim=-1)  # the target first
            self.dup = top == self.target[..., None]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        from ..scale.streaming import _final_logits

        return _final_logits(self.ctx.model, h)[:, :-1].float()

    @torch.no_grad()
    def loss(self, h: torch.Tensor) -> float:
        if self.cand is None:
            return F.cross_entropy(self._logits(h).flatten(0, 1), self.target.flatten()).item()
        model = self.ctx.model
        hn = self.ctx.adapter.final_norm(model)(h)[:, :-1].float()
        emb = model.get_output_embeddings().weight
        total = 0.0
        for b in range(hn.shape[0]):  # one window at a time: (T, k+1, d) gathered rows
            rows = emb[self.cand[b]].float()
            logits = torch.einsum("td,tkd->tk", hn[b], rows)
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logits[:, 1:] = logits[:, 1:].masked_fill(self.dup[b], float("-inf"))
            total += F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="sum").item()
        return total / self.target.numel()

    @contextmanager
    def state(self, layer: int, state: tuple):
        """Layer `layer` in `state` (the others as committed) inside the block."""
        alive = self.alive.clone()
        alive[2 * layer : 2 * layer + 2] = 1
        if state[0] in (NO_ATTN, GONE):
            alive[2 * layer] = 0
        if state[0] in (NO_MLP, GONE):
            alive[2 * layer + 1] = 0
        with self.gates.set(alive), self._weights(layer, state[1] if state[0] == "child" else None):
            yield

    @contextmanager
    def _weights(self, layer: int, rank: int | None):
        lay = self.layers[layer]
        before = {p: lay.get_submodule(p).weight for p in self.fits.paths}
        try:
            if rank is not None:
                for p, w in self.fits.own_weights(layer, rank).items():
                    lin = lay.get_submodule(p)
                    lin.weight = nn.Parameter(w.to(lin.weight.dtype), requires_grad=False)
            yield
        finally:
            for p, w in before.items():
                lay.get_submodule(p).weight = w

    def commit(self, layer: int, state: tuple) -> None:
        if state[0] != "child" and layer in self.swapped:  # back from a child (the refinement): its own weights
            for p, w in self.swapped.pop(layer).items():
                self.layers[layer].get_submodule(p).weight = w
        if state[0] == "child":
            lay = self.layers[layer]
            self.swapped.setdefault(layer, {p: lay.get_submodule(p).weight for p in self.fits.paths})
            for p, w in self.fits.own_weights(layer, state[1]).items():
                lin = lay.get_submodule(p)
                lin.weight = nn.Parameter(w.to(lin.weight.dtype), requires_grad=False)
        self.alive[2 * layer] = 0 if state[0] in (NO_ATTN, GONE) else 1
        self.alive[2 * layer + 1] = 0 if state[0] in (NO_MLP, GONE) else 1

    def refresh(self) -> float:
        with self.gates.set(self.alive):
            return self.loss(self.stream.refresh())

    def trial(self, layer: int, state: tuple) -> float:
        with self.state(layer, state):
            return self.loss(self.stream.final(layer))

    def close(self) -> None:
        for layer, weights in self.swapped.items():
            for p, w in weights.items():
                self.layers[layer].get_submodule(p).weight = w
        self.gates.remove()
        self.stream.close()


@dataclass
class SearchResult:
    states: list[tuple]
    steps: list[dict]  # per step: layer, state, loss, params
    ranks: list[int]
    loss_dense: float


def search(ctx: Context, fits: ChildFits, target: int, ids: torch.Tensor, fractions: list[float],
           rescore: int = 6, score: str = "nll", topk: int = 64, confirm: int = 0,
           confirm_ids: torch.Tensor | None = None, per_step: int = 1,
           actions: tuple[str, ...] = ACTIONS, refine: int = 0) -> SearchResult:
    """The greedy search over actions until the unique parameters are at most `target` (see the module doc).
    `rescore` <= 0 scores every action at every step (the exact greedy). `confirm` > 0: the best `confirm` actions
    of each step's scores are scored again with the exact NLL on `confirm_ids`, which decides. `per_step` > 1 also
    takes the next best actions of other layers (at most twice the best's cost per parameter) in the same step.
    `refine` > 0: then up to that many exchange rounds (_refine): give one layer back some parameters, take the
    cheapest actions elsewhere until the target again, and keep the exchange only where the loss fell."""
    costs = layer_costs(ctx.model, ctx, fits.paths)
    n = len(costs)
    prot = ctx.protected()
    ranks = ranks_for(costs[0], fractions)
    states: list[tuple] = [(KEEP,)] * n
    fixed = sum(p.numel() for p in {id(p): p for p in ctx.model.parameters()}.values()) - sum(c.block for c in costs)
    params = fixed + sum(c.block for c in costs)
    params_dense = params
    if target >= params:
        return SearchResult(states, [], ranks, float("nan"))
    if fixed >= target:
        raise FoldGPTError(f"the target ({target:,} unique parameters) is below what the embeddings and head alone "
                           f"need ({fixed:,}); raise --target-params")
    scorer = _Scorer(ctx, ids, fits, score, topk)
    judge = _Scorer(ctx, confirm_ids if confirm_ids is not None else ids, fits, "nll", topk) if confirm > 0 else None
    stale: dict[tuple, float] = {}  # (layer, new state) -> loss rise per parameter at its last scoring
    steps: list[dict] = []
    rounds = 0
    first = sum(len(transitions(s, ranks, actions)) for i, s in enumerate(states) if i not in prot)
    bar = tqdm(total=first, desc="FoldGPT search (first step)", leave=False)
    try:
        current = dense = scorer.refresh()
        exact = judge.refresh() if judge is not None else None
        saved = ctx.resume.search_state() if ctx.resume is not None else None
        if saved is not None:  # the steps a stopped run finished (resume.py), replayed
            states, stale, steps, params, current, exact, rounds = _replay(saved, scorer, judge)
            bar.close()
            bar = tqdm(total=params_dense - target, initial=params_dense - params, desc="FoldGPT search (parameters)",
                       leave=False)
        while params > target:
            options = [(i, s) for i in range(n) if i not in prot for s in transitions(states[i], ranks, actions)]
            if not options:
                raise FoldGPTError("the search ran out of actions before the target; raise --target-params")
            fresh = [o for o in options if o not in stale]
            old = sorted((o for o in options if o in stale), key=lambda o: stale[o])
            todo = fresh + (old if rescore <= 0 or not steps else old[:rescore])
            for i, s in todo:
                saved = costs[i].params(states[i]) - costs[i].params(s)
                stale[(i, s)] = (scorer.trial(i, s) - current) / saved
                if not steps:  # (after the first step the bar counts parameters)
                    bar.update(1)
            ranked = sorted(todo, key=lambda o: stale[o])
            if judge is not None:  # the exact NLL decides among the best few
                _, i, s = min(((judge.trial(i, s) - exact) / (costs[i].params(states[i]) - costs[i].params(s)), i, s)
                              for i, s in ranked[:confirm])
                ranked.remove((i, s))
                ranked.insert(0, (i, s))
            chosen: list[tuple] = []
            limit = 2 * max(stale[ranked[0]], 0.0)
            for i, s in ranked:  # the best, and up to per_step - 1 next best of other layers (one refresh for all)
                if len(chosen) == max(1, per_step) or params <= target:
                    break
                if any(i == j for j, _ in chosen) or (chosen and stale[(i, s)] > limit):
                    continue
                chosen.append((i, s))
                saved = costs[i].params(states[i]) - costs[i].params(s)
                states[i] = s
                for sc in (scorer, judge):
                    if sc is not None:
                        sc.commit(i, s)
                for key in [k for k in stale if k[0] == i]:
                    del stale[key]  # the layer's options start from its new state
                params -= saved
                bar.update(saved) if steps else None
            if not steps:
                bar.close()
                bar = tqdm(total=params_dense - target, initial=params_dense - params,
                           desc="FoldGPT search (parameters)", leave=False)
            current = scorer.refresh()
            exact = judge.refresh() if judge is not None else None
            for i, s in chosen:
                steps.append({"layer": i, "state": list(s), "loss": current, "params": params, "scored": len(todo),
                              **({"nll": exact} if exact is not None else {})})
            log.info("search: %s (calibration loss %.4f, %s unique params, %d actions scored)",
                     ", ".join(f"layer {i} -> {s[0] if s[0] != 'child' else f'child rank {s[1]}'}" for i, s in chosen),
                     current, f"{params:,}", len(todo))
            rounds += 1
            if ctx.resume is not None:
                ctx.resume.save_search(_saved_state(states, stale, steps, params, current, exact, rounds))
        if refine > 0 and judge is None:
            bar.close()
            states, params, current = _refine(scorer, costs, states, ranks, actions, prot, target, params, current,
                                              stale, steps, refine, max(rescore, 1))
    finally:
        bar.close()
        if judge is not None:  # first: its weight swaps sit on top of the scorer's
            judge.close()
        scorer.close()
    return SearchResult(states, steps, ranks, dense)


def _refine(scorer: _Scorer, costs: list[LayerCosts], states: list[tuple], ranks: list[int],
            actions: tuple[str, ...], prot: set[int], target: int, params: int, current: float,
            stale: dict[tuple, float], steps: list[dict], rounds: int, rescore: int = 6
            ) -> tuple[list[tuple], int, float]:
    """Exchange rounds after the greedy search: a greedy choice made early, when the model was whole, may be worse
    than what the later ones made possible. Each round scores every one-step give-back (undos) and takes the one
    that lowers the loss most per parameter given back, then the cheapest actions (lazily re-scored, as in the
    search) of the other layers until the model is at the target again; the round is kept only if the loss is
    then lower than before it, else undone, and the next round tries the next give-back. Each kept round is one
    more entry of `steps` (kind "exchange"). The give-backs are scored lazily: all in the first round, then the new
    ones and the `rescore` best of the others. Returns (states, params, loss)."""
    n = len(states)
    tried: set[tuple] = set()
    gains: dict[tuple, float] = {}  # (layer, give-back) -> loss fall per parameter given back at its last scoring
    for _ in tqdm(range(rounds), desc="FoldGPT search (exchanges)", leave=False):
        backs = [(i, s) for i in range(n) if i not in prot for s in undos(states[i], ranks, actions)
                 if (i, s) not in tried]
        if not backs:
            break
        # lazily, as the search: every give-back is scored once; later rounds score the new ones (of the layers the
        # last kept round changed) and re-score only the `rescore` best of the others
        fresh = [o for o in backs if o not in gains]
        old = sorted((o for o in backs if o in gains), key=lambda o: -gains[o])[:rescore]
        for i, s in fresh + old:
            gains[(i, s)] = (current - scorer.trial(i, s)) / (costs[i].params(s) - costs[i].params(states[i]))
        i0, s0 = max(fresh + old, key=lambda o: gains[o])
        tried.add((i0, s0))
        if gains[(i0, s0)] <= 0:
            break
        before = list(states)
        trial, p = list(states), params + costs[i0].params(s0) - costs[i0].params(states[i0])
        trial[i0] = s0
        scorer.commit(i0, s0)
        moves = [(i0, s0)]
        while p > target:
            options = [(i, s) for i in range(n) if i not in prot and i != i0
                       for s in transitions(trial[i], ranks, actions)]
            if not options:
                break
            fresh = [o for o in options if o not in stale]
            todo = fresh + sorted((o for o in options if o in stale), key=lambda o: stale[o])[:rescore]
            base = scorer.refresh()
            for i, s in todo:
                stale[(i, s)] = (scorer.trial(i, s) - base) / (costs[i].params(trial[i]) - costs[i].params(s))
            i, s = min(todo, key=lambda o: stale[o])
            p -= costs[i].params(trial[i]) - costs[i].params(s)
            trial[i] = s
            scorer.commit(i, s)
            for key in [k for k in stale if k[0] == i]:
                del stale[key]
            moves.append((i, s))
        loss = scorer.refresh()
        if p <= target and loss < current:
            log.info("search exchange: %s (calibration loss %.4f -> %.4f)", ", ".join(
                f"layer {i} -> {s[0] if s[0] != 'child' else f'child rank {s[1]}'}" for i, s in moves), current, loss)
            states, params, current = trial, p, loss
            for key in [k for k in gains if any(k[0] == i for i, _ in moves)]:
                del gains[key]  # the moved layers' give-backs start from their new states
            steps.append({"kind": "exchange", "moves": [[i, list(s)] for i, s in moves], "loss": loss,
                          "params": params})
        else:
            for i in {i for i, _ in moves}:  # undone: the scorer back to the states before the round
                scorer.commit(i, before[i])
            scorer.refresh()
    return states, params, current


def _saved_state(states: list[tuple], stale: dict[tuple, float], steps: list[dict], params: int, current: float,
                 exact: float | None, rounds: int) -> dict:
    """The search's state after a finished step, as JSON, so a stopped search continues from it (resume.py)."""
    return {"rounds": rounds, "states": [list(s) for s in states],
            "stale": [[i, list(s), v] for (i, s), v in stale.items()], "steps": steps, "params": params,
            "current": current, "exact": exact}


def _replay(saved: dict, scorer: _Scorer, judge: _Scorer | None) -> tuple:
    """A saved state (_saved_state) back: the scorers commit its steps in their order and refresh. Returns (states,
    stale, steps, params, current, exact, rounds) as the search had them after that step."""
    for step in saved["steps"]:
        for sc in (scorer, judge):
            if sc is not None:
                sc.commit(step["layer"], tuple(step["state"]))
    scorer.refresh()
    if judge is not None:
        judge.refresh()
    stale = {(i, tuple(s)): v for i, s, v in saved["stale"]}
    return ([tuple(s) for s in saved["states"]], stale, list(saved["steps"]), saved["params"], saved["current"],
            saved["exact"], saved["rounds"])


def spend_slack(states: list[tuple], costs: list[LayerCosts], slack: int) -> list[tuple]:
    """Raise the children's ranks (evenly, the lowest first) with the parameters left under the target."""
    states = list(states)
    children = [i for i, s in enumerate(states) if s[0] == "child"]
    while children:
        i = min(children, key=lambda j: (states[j][1], j))
        if costs[i].per_rank > slack:
            break
        states[i] = ("child", states[i][1] + 1)
        slack -= costs[i].per_rank
    return states


def nearest_parent(layer: int, states: list[tuple], kinds: list[str]) -> tuple[int, bool]:
    """The nearest kept whole layer (same attention kind first). Returns (parent, same kind)."""
    kept = [i for i, s in enumerate(states) if s[0] == KEEP]
    if not kept:
        raise FoldGPTError("no whole layer is left to hold the children; raise --target-params")
    same = [i for i in kept if kinds[i] == kinds[layer]]
    pool = same or kept
    return min(pool, key=lambda i: (abs(i - layer), i)), bool(same)


def plan_parts(states: list[tuple], fits: ChildFits, kinds: list[str], use_parent: bool, margin: float,
               ) -> dict:
    """The plan's removed units, groups, child ranks and modes for the searched states."""
    removed, groups, ranks, modes, across = [], {}, {}, {}, False
    for i, s in enumerate(states):
        if s[0] == GONE:
            removed.append(str(i))
        elif s[0] in (NO_ATTN, NO_MLP):
            removed.append(f"{i}.{s[0]}")
        elif s[0] == "child":
            parent, same = nearest_parent(i, states, kinds)
            across |= not same
            groups.setdefault(parent, []).append(i)
            ranks[str(i)] = s[1]
            chosen = fits.choose(i, parent, s[1], use_parent and same, margin)
            modes[str(i)] = {p: c.mode for p, c in chosen.items()}
    return {"removed": removed, "groups": sorted([p, *sorted(cs)] for p, cs in groups.items()),
            "child_ranks": ranks, "child_modes": modes, "across_kinds": across}
