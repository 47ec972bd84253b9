"""ShortGPT (Men et al. 2024): remove the layers with the lowest Block Influence, one shot."""

from __future__ import annotations

from ..plan import Plan
from ..stages.analysis import block_influence
from . import Context, Method, lowest, register


def run(ctx: Context) -> Plan:
    bi = block_influence(ctx.similarity).tolist()
    removed = lowest(bi, ctx.budget.n_remove, ctx.protected())
    return ctx.new_plan([str(i) for i in removed], [], method="shortgpt",
                        scores={str(i): b for i, b in enumerate(bi)})


register(Method("shortgpt", run, cures_by_default=False, folds=False,
                description="one-shot Block Influence (1 - cos(in, out)) layer removal"))
