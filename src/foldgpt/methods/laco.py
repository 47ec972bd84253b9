"""LaCo (Yang et al. 2024, "Layer Collapse"): merge runs of consecutive layers into their first layer.

Reserving-Differences-while-Seeking-Common (RDSC) merge of layers l..l+K into l:
    theta_l <- theta_l + sum_{k=1..K} (theta_{l+k} - theta_l)   (every parameter: Linears and norms)
then layers l+1..l+K are deleted (structure.merge_layers_ does the arithmetic; the plan lists the merge).

The search (the paper's Algorithm 1), in original layer indices:
- walk the merge head l from the top of the model downward; at each l merge the span l..l+K with
  K = min(C - 1, layers still to remove) into a temporary model (the accepted merges so far + this one);
- accept it if the mean cosine similarity between the temporary model's last-layer representation
  (final-norm hidden state, every token of a few calibration windows) and the dense model's is > T;
  then jump down by I (the minimum distance between merge heads); otherwise move down by one layer;
- stop when the removed layers reach the budget (ctx.budget.n_remove, exactly).

Choices (no configuration fields exist for LaCo, so they are module constants):
- C = 4 (merge up to 3 layers into one per step), T = 0.65, I = 2 (minimum distance between merge
  heads): values after the paper's Llama2-7B setting (not verified against its text: check it before quoting);
  in addition a span must end below the
  previous head, so spans never overlap and a merged layer is never merged again (the paper walks its
  shrinking model, where I < C can fold an already merged layer into a new merge; a plan's merges are
  flat runs of original layers, so here the next head is at most min(l - I, l - 1 - K'));
- protected layers (--protect-ends) are never merged into nor merged away;
- the last merge is shortened (K < C - 1) so that exactly n_remove layers go.
If a walk ends short of the budget (the threshold rejected too much), T is lowered to just below the
highest similarity the walk rejected -- the largest threshold at which the walk changes -- and the walk
is repeated (trials are cached); so the method always hits the exact budget. Every threshold tried, the
final one and each accepted merge's similarity are recorded in the plan's scores and in ctx.info.laco.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import FoldGPTError
from ..plan import Plan
from ..stages.structure import apply_plan_
from ..stages.weights import clone_sharing_weights
from . import Context, Method, register

log = logging.getLogger(__name__)

C = 4  # layers per merge (the head + up to C - 1 merged into it)
T = 0.65  # accept a merge while the last-layer cosine similarity to the dense model exceeds this
I = 2  # noqa: E741  minimum distance between merge heads (spans never overlap in any case)
CALIB_WINDOWS = 8  # a few calibration sentences


def _final_hidden(model, adapter, ids: torch.Tensor, skip_first: bool) -> torch.Tensor:
    h = adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state.float()
    return h[:, 1:] if skip_first else h


@torch.no_grad()
def laco(ctx: Context, span: int = C, threshold: float = T, interval: int = I, n_windows: int = CALIB_WINDOWS,
         ) -> tuple[list[list[int]], dict]:
    """The merges (each [l, ..., l+K]) removing exactly ctx.budget.n_remove layers, and a record."""
    if span < 2 or interval < 1:
        raise ValueError(f"LaCo needs C >= 2 and I >= 1 (got C={span}, I={interval})")
    n, goal = ctx.num_layers, ctx.budget.n_remove
    prot = ctx.protected()
    ids = ctx.calib[:n_windows]
    dense = _final_hidden(ctx.model, ctx.adapter, ids, ctx.bos)
    cache: dict[tuple, float] = {}

    def similarity(merges: list[list[int]]) -> float:
        key = tuple(tuple(m) for m in merges)
        if key not in cache:
            plan = ctx.new_plan([str(i) for m in merges for i in m[1:]], [], method="laco", merges=merges)
            trial = clone_sharing_weights(ctx.model)
            apply_plan_(trial, plan, ctx.adapter)
            h = _final_hidden(trial, ctx.adapter, ids, ctx.bos)
            cache[key] = F.cosine_similarity(h, dense, dim=-1).mean().item()
            del trial
        return cache[key]

    def walk(t: float) -> tuple[list[list[int]], list[float], float | None]:
        merges: list[list[int]] = []
        sims: list[float] = []
        best_rejected = None
        remaining = goal
        top = n - 1  # the highest layer a span may reach (free, below the last accepted head)
        head = n - 1
        while remaining > 0:
            k = min(span - 1, remaining)
            head = min(head, top - k)  # the last merge may be shorter
            if head < 0:
                break
            cand = list(range(head, head + k + 1))
            if prot.intersection(cand):
                head -= 1
                continue
            s = similarity(merges + [cand])
            if s > t:
                merges.append(cand)
                sims.append(s)
                remaining -= k
                top = head - 1
                head -= interval
                log.info("LaCo: merged %s (cosine %.4f > %.4f)", cand, s, t)
            else:
                best_rejected = s if best_rejected is None else max(best_rejected, s)
                head -= 1
        return (merges, sims, best_rejected) if remaining == 0 else ([], [], best_rejected)

    t, tried = threshold, []
    while True:
        tried.append(t)
        merges, sims, best_rejected = walk(t)
        if merges or goal == 0:
            break
        if best_rejected is None:  # nothing was rejected: the budget does not fit the spans
            raise FoldGPTError(f"LaCo cannot merge away {goal} of {n} layers with spans of <= {span} layers "
                               "(protected layers in the way?); raise --target-params")
        # lower T to just below the highest rejected similarity: the largest threshold that changes the walk
        # (after many tries, accept everything)
        t = best_rejected - 1e-6 if len(tried) < 20 * n else -2.0
        log.info("LaCo: threshold too strict for the budget; lowering it to %.4f", t)
    pairs = sorted(zip(merges, sims))
    record = {"C": span, "I": interval, "T": threshold, "threshold_used": t, "thresholds_tried": tried,
              "merges": [m for m, _ in pairs], "similarity": [s for _, s in pairs], "trials": len(cache)}
    return record["merges"], record


def run(ctx: Context) -> Plan:
    merges, record = laco(ctx)
    ctx.info.laco = record
    scores = {f"merge {m[0]}-{m[-1]}": s for m, s in zip(merges, record["similarity"])}
    scores.update({"threshold": record["T"], "threshold_used": record["threshold_used"]})
    removed = sorted(i for m in merges for i in m[1:])
    return ctx.new_plan([str(i) for i in removed], [], method="laco", merges=merges, scores=scores)


register(Method("laco", run, cures_by_default=False, folds=False, merges=True,
                description="LaCo: merge consecutive layers (theta_l + sum_k (theta_{l+k} - theta_l)) while "
                            "the output cosine stays above T"))
