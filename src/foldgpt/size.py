"""`--target-size`: a byte budget for the compressed model's weights file (model.safetensors), turned into a
unique-parameter target and a weight-only quantization level (quant.py).

The rule (docs/size.md has the measurements behind it): **quantize before folding**. For each level (none, int8,
int4) the bytes a model of P unique parameters can take are bounded from the model's own tensors: the embedding at
the level's embedding precision, norms and other vectors in fp32, every matrix at the level's largest bytes per
parameter, and an allowance for what folding adds (the children's scales per row, alpha scalars, gates, biases,
the file's header). That gives each level the largest parameter target that fits. The choice is the least
aggressive level at which the whole model fits; where none does, int4 with the target that fits. On SmolLM2-135M
int8 costs +0.002 nats of calibration loss and int4 +0.1 while halving the bytes again; folding costs ~0.5 nats
for the 25% of the parameters it saves at the default target, so a level's bytes are always bought more cheaply by
quantizing than by folding.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field

from .errors import FoldGPTError

log = logging.getLogger(__name__)

UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([A-Za-z]+)")
HEADER_BYTES_PER_TENSOR = 160  # safetensors' JSON header: a name, a dtype, a shape and two offsets per tensor
MIN_SPARE = 64 * 1024  # below this, no int8 upgrades (not worth measuring the kinds of matrices)


def parse_size(text: str, option: str = "--target-size") -> int:
    """'60MB', '0.5GB', '100MiB' -> bytes (decimal units are powers of 1000, binary ones of 1024)."""
    m = _SIZE.fullmatch(str(text).strip())
    if m is None or m.group(2) not in UNITS:
        raise FoldGPTError(f"{option} '{text}' is not a size; write a number and a unit ({', '.join(UNITS)}), e.g. "
                           "60MB, 0.5GB or 100MiB")
    n = math.floor(float(m.group(1)) * UNITS[m.group(2)])
    if n < 1:
        raise FoldGPTError(f"{option} '{text}' is zero; give a size above 0, e.g. 60MB")
    return n


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10**9 else f"{n / 1e9:.2f} GB"


@dataclass
class LevelFit:
    """What a level allows under the budget."""

    level: str
    dense_bytes: int  # the uncompressed model's weights at this level
    max_fraction: float  # the largest unique-parameter fraction that fits (>= 1: the whole model fits)
    feasible: bool


@dataclass
class SizeChoice:
    """--target-size's decision: the level, the unique-parameter target (None: the whole model, nothing folded)."""

    budget: int
    level: str
    target_params: float | None
    levels: list[LevelFit] = field(default_factory=list)
    spare_bytes: int = 0  # the whole model fits at int4 with this much left (a folded one: see quantize_result)

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "level": self.level, "target_params": self.target_params,
                "spare_bytes": self.spare_bytes, "levels": [asdict(f) for f in self.levels]}


@dataclass
class _Tensors:
    """A dense model's tensors as the bound needs them."""

    embeddings: list[tuple[int, ...]]  # shapes of the embedding matrices (a tied head is the same one)
    matrices: list[tuple[int, ...]]  # every other quantizable matrix
    vector_params: int  # norms, biases and other tensors kept in float
    n_tensors: int
    layers: int
    block_params: int
    rows_per_layer: int  # output rows of one layer's Linears (a child's B factors have as many rows)
    biased_rows_per_layer: int  # ... of those with a bias (a child's own bias)
    linears_per_layer: int
    params: int


def _tensors(model, adapter) -> _Tensors:
    from torch import nn

    from .quant import _entries
    from .stages.structure import layer_params, unique_params

    entries = _entries(model)
    ids = {id(e.param) for e in entries}
    vector = 0
    seen = set()
    n_tensors = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n_tensors += 1
        if id(p) not in ids:
            vector += p.numel()
    layer0 = adapter.layers(model)[0]
    lins = [layer0.get_submodule(p) for p in adapter.linears]
    return _Tensors(
        embeddings=[tuple(e.param.shape) for e in entries if e.embedding],
        matrices=[tuple(e.param.shape) for e in entries if not e.embedding],
        vector_params=vector, n_tensors=n_tensors, layers=len(adapter.layers(model)),
        block_params=layer_params(layer0),
        rows_per_layer=sum(m.out_features for m in lins if isinstance(m, nn.Linear)),
        biased_rows_per_layer=sum(m.out_features for m in lins if isinstance(m, nn.Linear) and m.bias is not None),
        linears_per_layer=len(lins), params=unique_params(model))


def level_fit(t: _Tensors, level: str, budget: int) -> LevelFit:
    """The largest unique-parameter fraction whose weights file at `level` stays within `budget` (an upper bound of
    the bytes, so a model at that target fits)."""
    from .quant import scheme_bytes, scheme_for

    def tensor_bytes(shape, embedding):
        return scheme_bytes(scheme_for(level, shape, embedding), shape)

    emb_params = sum(math.prod(s) for s in t.embeddings)
    emb_bytes = sum(tensor_bytes(s, True) for s in t.embeddings)
    mat_bytes = [tensor_bytes(s, False) for s in t.matrices]
    header = HEADER_BYTES_PER_TENSOR * 2 * t.n_tensors
    dense = emb_bytes + sum(mat_bytes) + 4 * t.vector_params + header
    if dense <= budget:
        return LevelFit(level, dense, 1.0, True)
    rate = max((b / math.prod(s) for b, s in zip(mat_bytes, t.matrices)), default=4.0)  # bytes per matrix parameter
    row_scale = {"none": 0, "int8": 4, "int4": 2}[level]  # a child's B factor: at most one scale per row more
    per_layer_extra = (t.rows_per_layer * row_scale  # children's B factors: scales per row
                       + 4 * (t.linears_per_layer + 1 + t.biased_rows_per_layer)  # alpha, gate, own bias
                       + HEADER_BYTES_PER_TENSOR * (4 * t.linears_per_layer + 4))  # factor, alpha, gate entries
    fixed = emb_bytes + (4 - rate) * t.vector_params + header + t.layers * per_layer_extra
    max_params = emb_params + (budget - fixed) / rate
    fraction = max_params / t.params
    feasible = budget - fixed > 0 and max_params >= emb_params + t.vector_params + t.block_params
    return LevelFit(level, dense, min(fraction, 0.9999), feasible)


def choose(model, adapter, budget: int, levels: tuple[str, ...] = ("none", "int8", "int4")) -> SizeChoice:
    """The level and unique-parameter target for `budget` bytes of weights: the least aggressive level at which the
    whole model fits, else the most aggressive (int4) with the largest target that fits. One line when even the
    embeddings do not fit at the cheapest level."""
    t = _tensors(model, adapter)
    fits = [level_fit(t, level, budget) for level in levels]
    whole = [f for f in fits if f.max_fraction >= 1.0]
    if whole:
        spare = budget - whole[0].dense_bytes if whole[0].level == "int4" else 0
        choice = SizeChoice(budget, whole[0].level, None, fits, spare)
    else:
        cheapest = fits[-1]
        if not cheapest.feasible:
            from .quant import scheme_bytes, scheme_for

            emb = sum(scheme_bytes(scheme_for(cheapest.level, s, True), s) for s in t.embeddings)
            what = ("what the embeddings alone take" if emb >= budget else
                    "what the embeddings and one layer take")
            raise FoldGPTError(f"--target-size {fmt_bytes(budget)} is below {what} at {cheapest.level} "
                               f"(embeddings: {fmt_bytes(emb)}); give a larger size (the whole model takes "
                               f"{fmt_bytes(cheapest.dense_bytes)} at {cheapest.level})")
        choice = SizeChoice(budget, cheapest.level, cheapest.max_fraction, fits)
    log.info("target size %s: %s", fmt_bytes(budget), "; ".join(
        f"{f.level}: whole model {fmt_bytes(f.dense_bytes)}, "
        + ("fits" if f.max_fraction >= 1 else f"{f.max_fraction:.1%} of the parameters fit" if f.feasible
           else "does not fit") for f in fits))
    log.info("target size %s: %s%s", fmt_bytes(budget), choice.level,
             "" if choice.target_params is None else f" at {choice.target_params:.2%} unique parameters")
    return choice


def resolve(dense, adapter, cfg):
    """A configuration with --target-size turned into a parameter target and a quantization level: (config, the
    choice, a plan that keeps the whole model or None). Where the whole model fits at the chosen level, nothing is
    removed or folded and nothing is cured: the plan keeps every layer."""
    from .config import with_settings
    from .methods import make_plan

    choice = choose(dense, adapter, parse_size(cfg.target_size))
    if choice.target_params is None:
        cfg = with_settings(cfg, {"target_size": None, "remove_rate": 0.0, "quantize": choice.level,
                                  "cure.enabled": False})
        return cfg, choice, make_plan(cfg, dense, adapter, [], [], method=cfg.method)
    cfg = with_settings(cfg, {"target_size": None, "target_params": choice.target_params, "quantize": choice.level})
    return cfg, choice, None


def size_summary(folder, model, budget: int | None) -> dict:
    """The bytes of a written model folder next to the budget: the weights file, the files a load reads (config,
    weights, tokenizer, generation config, runtime), and what the loaded tensors hold in memory."""
    from pathlib import Path

    from .quant import resident_bytes

    folder = Path(folder)
    weights = (folder / "model.safetensors").stat().st_size
    runtime = [p for p in folder.iterdir() if p.is_file() and (p.name.startswith("tokenizer") or p.name in (
        "config.json", "model.safetensors", "generation_config.json", "modeling_foldgpt.py", "special_tokens_map.json",
        "chat_template.jinja", "vocab.json", "merges.txt"))]
    out = {"weights_bytes": weights, "load_files_bytes": sum(p.stat().st_size for p in runtime),
           "resident_bytes": resident_bytes(model)}
    if budget is not None:
        out.update(budget_bytes=budget, within_budget=weights <= budget)
        if weights > budget:
            log.warning("the weights file (%s) is over the --target-size budget (%s)", fmt_bytes(weights),
                        fmt_bytes(budget))
    return out


def predicted_bytes(model, level: str) -> int:
    """An upper bound of the weights file of `model` at `level`: every unique tensor at its scheme's bytes, and the
    header at HEADER_BYTES_PER_TENSOR per stored tensor."""
    from .quant import _entries, scheme_bytes, scheme_for

    schemes = {id(e.param): scheme_for(level, tuple(e.param.shape), e.embedding) for e in _entries(model)}
    seen, total, stored = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        scheme = schemes.get(id(p))
        total += scheme_bytes(scheme, tuple(p.shape)) if scheme is not None else p.numel() * p.element_size()
        stored += 2 if scheme is not None else 1
    return total + HEADER_BYTES_PER_TENSOR * stored


def int8_upgrades(model, held, spare: int) -> tuple[set[str], dict]:
    """Which matrices to keep at int8 in an int4 model with `spare` bytes left under the budget: each kind of matrix
    (q_proj, ..., down_proj, the LM head; every layer's together) is quantized to int4 alone and the calibration loss
    rise measured on `held`; kinds are taken by rise per byte that int8 costs over int4, each kind's matrices in layer
    order, while they fit. Returns (the names, {kind: measured rise})."""
    import re

    from .pipeline import calibration_loss
    from .quant import _entries, _quantize_tensor, _set, scheme_bytes, scheme_for

    entries = [e for e in _entries(model) if not e.embedding]
    kinds: dict[str, list] = {}
    for e in entries:
        kinds.setdefault(re.sub(r"\.\d+\.", ".", e.name), []).append(e)
    base = calibration_loss(model, held)
    rises, costs = {}, {}
    for kind, group in kinds.items():
        originals = [e.param for e in group]
        for e in group:
            _set(e, _quantize_tensor(e.param, scheme_for("int4", tuple(e.param.shape), False)))
        rises[kind] = calibration_loss(model, held) - base
        for e, p in zip(group, originals):
            _set(e, p)
            e.param = p
        costs[kind] = sum(scheme_bytes(scheme_for("int8", tuple(e.param.shape), False), tuple(e.param.shape))
                          - scheme_bytes(scheme_for("int4", tuple(e.param.shape), False), tuple(e.param.shape))
                          for e in group)
    chosen: set[str] = set()
    for kind in sorted(kinds, key=lambda k: -rises[k] / max(costs[k], 1)):
        for e in kinds[kind]:
            shape = tuple(e.param.shape)
            cost = (scheme_bytes(scheme_for("int8", shape, False), shape)
                    - scheme_bytes(scheme_for("int4", shape, False), shape))
            if cost <= spare:
                chosen.add(e.name)
                spare -= cost
    log.info("target size: int8 for %d of %d int4 matrices in the spare bytes (int4 loss rise by kind: %s)",
             len(chosen), len(entries), ", ".join(f"{k} {v:+.3f}" for k, v in sorted(rises.items(), key=lambda kv:
                                                                                     -kv[1])))
    return chosen, {k: round(v, 5) for k, v in rises.items()}


def quantize_result(session, student, held, level: str, choice: SizeChoice | None) -> dict:
    """Quantize the compressed model at `level` in place, after the cure (with --target-size's spare bytes spent on
    int8 for the matrices that lose most at int4); return what the summary records of it."""
    from .pipeline import calibration_loss
    from .quant import quantize_model_, state_bytes

    out = {"level": level, "calib_loss_before": calibration_loss(student, held),
           "dense_bytes": state_bytes(session.dense)}
    names = None
    # what is left under the budget once the model is at int4: the whole model's spare bytes, or a folded one's
    # (its parameter target is bounded from above: the plan lands a little under it)
    spare = 0 if choice is None or level != "int4" else choice.budget - predicted_bytes(student, level)
    if spare >= MIN_SPARE:
        names, rises = int8_upgrades(student, held, spare)
        out.update(spare_bytes=spare, int8_matrices=sorted(names), int4_rise_by_kind=rises)
    quantize_model_(student, level, int8_names=names)
    return out
