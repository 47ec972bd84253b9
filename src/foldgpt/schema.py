"""Schemas of the JSON that foldgpt reads back: plan files (plan.json, `--plan`) and the folded checkpoint's config.json
(its `base_config`, `fold_layout` and `fold_plan`).

Everything is checked before anything acts on it: types, indices in range for the model's layer count, names only
from the architecture's known Linears and branches, enums. Each problem is one FoldGPTError line that says where it
is and what to do; nothing else is raised, whatever the file holds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import FoldGPTError

ADAPTER_INITS = ("zero", "svd", "fit")
CHILD_MODES = ("shared", "alpha", "own")
COMPENSATIONS = ("", "replaceme", "linearpatch")
SUBLAYERS = ("attn", "mlp")
_UNIT = re.compile(r"(0|[1-9][0-9]{0,8})(?:\.(attn|mlp))?")  # at most 9 digits: far beyond MAX_LAYERS
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")
MAX_LAYERS = 100_000  # far beyond any model; guards against absurd counts in a damaged file
MAX_RANK = 1 << 16  # low-rank factors beyond any Linear's size (apply_plan_ checks the model's own sizes)

PLAN_FIELDS = ("num_layers", "model_type", "removed", "groups", "merges", "layer_kinds", "shared_linears",
               "adapter_rank", "adapter_init", "child_ranks", "child_modes", "position_gates", "child_gates",
               "across_kinds", "compensation", "method", "unit", "gates", "scores", "provenance", "version")
PLAN_DERIVED = ("layer_map",)  # written for people, recomputed on load
MAX_JSON_BYTES = 256 << 20  # plans and configs are kilobytes; anything this large is not one


def read_json(path: str | Path, what: str, fix: str):
    """The parsed JSON of the file at `path`, or one FoldGPTError line naming `what` it should be and `fix`."""
    path = Path(path)
    if not path.exists():
        raise FoldGPTError(f"{what} not found: {path}; {fix}")
    if path.is_dir():
        raise FoldGPTError(f"{what} {path} is a folder, not a file; {fix}")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FoldGPTError(f"{what} {path} is {path.stat().st_size >> 20} MiB, too large to be one; {fix}")
        raw = path.read_bytes()
    except OSError as exc:
        raise FoldGPTError(f"cannot read {what} {path} ({exc.strerror or exc}); check that it is readable") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FoldGPTError(f"{what} {path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as exc:
        raise FoldGPTError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                           f"{fix}") from None
    except (ValueError, RecursionError) as exc:
        raise FoldGPTError(f"{what} {path} is not valid JSON ({type(exc).__name__}); {fix}") from None


class _Where:
    """Builds the one-line error for a field of a named document."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix

    def fail(self, field: str, problem: str):
        raise FoldGPTError(f"{self.what}: {field} {problem}; {self.fix}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite JSON number that converts to a float (JSON integers may be arbitrarily large)."""
    return (_is_int(v) and abs(v) < 10**300) or (isinstance(v, float) and math.isfinite(v))


def json_kind(v) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if isinstance(v, bool):
        return "true/false"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number"}.get(type(v), "null")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(w: _Where, field: str, v, lo: int = 0, hi: int | None = None) -> int:
    if not _is_int(v):
        w.fail(field, f"must be an integer, got {_short(v)}")
    if v < lo or (hi is not None and v >= hi):
        w.fail(field, f"is {v}, outside [{lo}, {hi})" if hi is not None else f"must be >= {lo}, got {v}")
    return v


def _str(w: _Where, field: str, v, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str):
        w.fail(field, f"must be a string, got {_short(v)}")
    if choices is not None and v not in choices:
        w.fail(field, f"must be one of {', '.join(repr(c) for c in choices)}, got {_short(v)}")
    return v


def _bool(w: _Where, field: str, v) -> bool:
    if not isinstance(v, bool):
        w.fail(field, f"must be true or false, got {_short(v)}")
    return v


def _list(w: _Where, field: str, v) -> list:
    if not isinstance(v, list):
        w.fail(field, f"must be a list, got {_short(v)}")
    return v


def _dict(w: _Where, field: str, v) -> dict:
    if not isinstance(v, dict):
        w.fail(field, f"must be an object, got {_short(v)}")
    return v


def _index_key(w: _Where, field: str, k, n: int) -> int:
    """A JSON object key naming a layer or position: a decimal integer in [0, n)."""
    if not isinstance(k, str) or not _INDEX.fullmatch(k):
        w.fail(field, f"has key {_short(k)}, which is not a layer index")
    if int(k) >= n:
        w.fail(field, f"names layer {k}, but there are only {n} (0..{n - 1})")
    return int(k)


def _index_list(w: _Where, field: str, v, n: int) -> list[int]:
    for i, x in enumerate(_list(w, field, v)):
        _int(w, f"{field}[{i}]", x, 0, n)
    return v


def _known_names(w: _Where, field: str, v, known: tuple[str, ...]) -> list[str]:
    names = _list(w, field, v)
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in known:
            w.fail(f"{field}[{i}]", f"is {_short(name)}, not a Linear of this architecture (known: "
                                    f"{', '.join(known)})")
    if len(set(names)) != len(names):
        w.fail(field, "lists a Linear twice")
    return names


def _adapter(w: _Where, field: str, model_type):
    from .adapters import get_adapter, supported_types

    _str(w, field, model_type)
    try:
        return get_adapter(model_type)
    except FoldGPTError:
        w.fail(field, f"is {_short(model_type)}, which foldgpt does not support (supported: "
                      f"{', '.join(supported_types())})")


# ---- plans -----------------------------------------------------------------------------------------
def check_plan_dict(d, source: str = "the plan") -> None:
    """Check a plan's JSON object (Plan.to_dict / plan.json) before a Plan is built from it."""
    w = _Where(f"{source} is not a valid foldgpt plan", "fix the plan file or make a new one with foldgpt compress")
    if not isinstance(d, dict):
        raise FoldGPTError(f"{source} is not a valid foldgpt plan: it holds a JSON {json_kind(d)}, not an object; "
                           "give the plan.json that foldgpt compress wrote")
    unknown = sorted(str(k) for k in d if k not in PLAN_FIELDS and k not in PLAN_DERIVED)
    if unknown:
        w.fail("the field(s)", f"{', '.join(_short(k) for k in unknown[:5])} are unknown (fields: "
                               f"{', '.join(PLAN_FIELDS)})")
    for req in ("num_layers", "model_type"):
        if req not in d:
            w.fail(req, "is missing")
    n = _int(w, "num_layers", d["num_layers"], 1, MAX_LAYERS)
    adapter = _adapter(w, "model_type", d["model_type"])
    check_plan_parts(w, d, n, adapter)


def check_plan_parts(w: _Where, d: dict, n: int, adapter) -> None:
    """The fields of a plan (as a dict) for a model of `n` layers of `adapter`'s architecture."""
    seen_units: set[str] = set()
    for i, u in enumerate(_list(w, "removed", d.get("removed", []))):
        m = _UNIT.fullmatch(u) if isinstance(u, str) else None
        if m is None:
            w.fail(f"removed[{i}]", f"is {_short(u)}; a removed unit is a layer index ('7') or one of its "
                                    "sub-blocks ('7.attn', '7.mlp')")
        if int(m.group(1)) >= n:
            w.fail(f"removed[{i}]", f"is {u!r}, but the model has {n} layers (0..{n - 1})")
        if u in seen_units:
            w.fail("removed", f"lists {u!r} twice")
        seen_units.add(u)
    for u in seen_units:
        if "." in u and u.split(".")[0] in seen_units:
            w.fail("removed", f"removes layer {u.split('.')[0]} whole and also its sub-block {u!r}")
    for key in ("groups", "merges"):
        for i, g in enumerate(_list(w, key, d.get(key, []))):
            _index_list(w, f"{key}[{i}]", g, n)
    kinds = _list(w, "layer_kinds", d.get("layer_kinds", []))
    if kinds and len(kinds) != n:
        w.fail("layer_kinds", f"has {len(kinds)} entries for {n} layers")
    for i, k in enumerate(kinds):
        _str(w, f"layer_kinds[{i}]", k)
    shared = _known_names(w, "shared_linears", d.get("shared_linears", []), adapter.linears)
    _int(w, "adapter_rank", d.get("adapter_rank", 0), 0, MAX_RANK)
    _str(w, "adapter_init", d.get("adapter_init", "zero"), ADAPTER_INITS)
    for k, r in _dict(w, "child_ranks", d.get("child_ranks", {})).items():
        _index_key(w, "child_ranks", k, n)
        _int(w, f"child_ranks[{k}]", r, 0, MAX_RANK)
    for k, modes in _dict(w, "child_modes", d.get("child_modes", {})).items():
        _index_key(w, "child_modes", k, n)
        for path, mode in _dict(w, f"child_modes[{k}]", modes).items():
            if path not in (shared or adapter.linears):
                w.fail(f"child_modes[{k}]", f"names {_short(path)}, not a shared Linear of this architecture")
            _str(w, f"child_modes[{k}][{path}]", mode, CHILD_MODES)
    _bool(w, "position_gates", d.get("position_gates", False))
    for k, g in _dict(w, "child_gates", d.get("child_gates", {})).items():
        _index_key(w, "child_gates", k, n)
        if not _is_number(g):
            w.fail(f"child_gates[{k}]", f"must be a finite number, got {_short(g)}")
    _bool(w, "across_kinds", d.get("across_kinds", False))
    _str(w, "compensation", d.get("compensation", ""), COMPENSATIONS)
    _str(w, "method", d.get("method", "foldgpt"))
    _str(w, "unit", d.get("unit", "layer"))
    for key in ("gates", "scores"):
        for k, v in _dict(w, key, d.get(key, {})).items():
            if not (v is None or _is_int(v) or isinstance(v, float)):
                w.fail(f"{key}[{k}]", f"must be a number, got {_short(v)}")
    _dict(w, "provenance", d.get("provenance", {}))
    _int(w, "version", d.get("version", 1), 1)
    _list(w, "layer_map", d.get("layer_map", []))


def check_plan_units(plan) -> None:
    """What a Plan built in code must also satisfy (Plan.validate): removed units well formed and in range, groups
    and merges in range, Linear names of the plan's architecture."""
    w = _Where("invalid plan", "fix the plan file or make a new one with foldgpt compress")
    n = plan.num_layers
    for u in plan.removed:
        m = _UNIT.fullmatch(u) if isinstance(u, str) else None
        if m is None or int(m.group(1)) >= n:
            w.fail("removed", f"holds {_short(u)}; a removed unit is a layer index below {n} ('7') or one of its "
                              "sub-blocks ('7.attn', '7.mlp')")
    for key in ("groups", "merges"):
        for g in getattr(plan, key):
            if any(not 0 <= int(x) < n for x in g):
                w.fail(key, f"holds {_short(g)}, with a layer outside 0..{n - 1}")
    if plan.shared_linears:
        _known_names(w, "shared_linears", list(plan.shared_linears), _adapter(w, "model_type", plan.model_type).linears)


# ---- folded checkpoints ----------------------------------------------------------------------------
LAYOUT_NAMES = ("attn_gate_point", "mlp_gate_point", "attn_branch", "mlp_branch")


def check_folded_config(config, where: str) -> None:
    """Check a folded checkpoint's config.json (already parsed): the nested base config, the fold layout and the
    plan, against each other and against the architecture the base config names."""
    fix = "the folder is damaged: write it again with foldgpt compress (or restore its config.json)"
    w = _Where(f"{where}/config.json", fix)
    if not isinstance(config, dict):
        w.fail("the file", "does not hold a JSON object")
    base = _dict(w, "base_config", config.get("base_config"))
    adapter = _adapter(w, "base_config.model_type", base.get("model_type"))
    n = _int(w, "base_config.num_hidden_layers", base.get("num_hidden_layers"), 1, MAX_LAYERS)
    types = base.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) < n):
        w.fail("base_config.layer_types", f"must list the kind of each of the {n} layers")
    layout = _dict(w, "fold_layout", config.get("fold_layout"))
    check_layout(layout, n, adapter, w)
    plan = config.get("fold_plan")
    if plan:
        check_plan_dict(plan, f"{where}/config.json's fold_plan")


def check_layout(layout: dict, n: int, adapter, w: _Where) -> None:
    """The runtime layout (structure.layout_from_plan) of a model whose base has `n` layers."""
    if _int(w, "fold_layout.num_layers", layout.get("num_layers"), 1) != n:
        w.fail("fold_layout.num_layers", f"is {layout['num_layers']}, but the base config has {n} layers")
    if "layers_path" in layout and layout["layers_path"] != adapter.layers_path:
        w.fail("fold_layout.layers_path", f"is {_short(layout['layers_path'])}; this architecture's layers are at "
                                          f"{adapter.layers_path!r}")
    kept = _index_list(w, "fold_layout.kept", layout.get("kept"), n)
    if not kept:
        w.fail("fold_layout.kept", "is empty (no layer left)")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        w.fail("fold_layout.kept", "must list distinct layers in increasing order")
    positions = len(kept)
    for key in LAYOUT_NAMES:
        if key in layout and layout[key] != getattr(adapter, key):
            w.fail(f"fold_layout.{key}", f"is {_short(layout[key])}; this architecture's is "
                                         f"{getattr(adapter, key)!r}")
    for key, names in (("attn_norms", adapter.attn_norms), ("mlp_norms", adapter.mlp_norms)):
        if key in layout and layout[key] != list(names):
            w.fail(f"fold_layout.{key}", f"is {_short(layout[key])}; this architecture's is {list(names)!r}")
    removed = _dict(w, "fold_layout.removed_sublayers", layout.get("removed_sublayers", {}))
    for k, parts in removed.items():
        _index_key(w, "fold_layout.removed_sublayers", k, positions)
        parts = _list(w, f"fold_layout.removed_sublayers[{k}]", parts)
        if not parts or any(p not in SUBLAYERS for p in parts) or len(set(parts)) != len(parts):
            w.fail(f"fold_layout.removed_sublayers[{k}]", f"is {_short(parts)}; list 'attn' and/or 'mlp'")
        for key in ("attn_branch", "attn_norms", "mlp_branch", "mlp_norms"):
            if key not in layout:
                w.fail(f"fold_layout.{key}", "is missing (the layout removes sub-blocks)")
    parents = _dict(w, "fold_layout.parents", layout.get("parents", {}))
    children = set()
    for k, p in parents.items():
        c = _index_key(w, "fold_layout.parents", k, positions)
        _int(w, f"fold_layout.parents[{k}]", p, 0, positions)
        if p == c or str(p) in parents:
            w.fail(f"fold_layout.parents[{k}]", f"is {p}, which is {'the child itself' if p == c else 'a child'}; "
                                                "a parent must be a position that runs its own weights")
        if str(p) in removed or k in removed:
            w.fail(f"fold_layout.parents[{k}]", "pairs a position that lost a sub-block; it cannot share")
        children.add(c)
    if parents:
        if "shared_linears" not in layout:
            w.fail("fold_layout.shared_linears", "is missing (the layout shares weights)")
    shared = _known_names(w, "fold_layout.shared_linears", layout.get("shared_linears", list(adapter.linears)),
                          adapter.linears)
    if parents and not shared:
        w.fail("fold_layout.shared_linears", "is empty, but the layout shares weights")
    rank = _int(w, "fold_layout.adapter_rank", layout.get("adapter_rank", 0), 0, MAX_RANK)
    ranks = _dict(w, "fold_layout.child_ranks", layout.get("child_ranks", {}))
    for k, r in ranks.items():
        if _index_key(w, "fold_layout.child_ranks", k, positions) not in children:
            w.fail("fold_layout.child_ranks", f"gives position {k} a rank, but it is not a child")
        _int(w, f"fold_layout.child_ranks[{k}]", r, 0, MAX_RANK)
    for k, modes in _dict(w, "fold_layout.child_modes", layout.get("child_modes", {})).items():
        if _index_key(w, "fold_layout.child_modes", k, positions) not in children:
            w.fail("fold_layout.child_modes", f"gives position {k} modes, but it is not a child")
        for path, mode in _dict(w, f"fold_layout.child_modes[{k}]", modes).items():
            if path not in shared:
                w.fail(f"fold_layout.child_modes[{k}]", f"names {_short(path)}, not one of the shared Linears")
            _str(w, f"fold_layout.child_modes[{k}][{path}]", mode, CHILD_MODES)
            if mode == "own" and ranks.get(k, rank) <= 0:
                w.fail(f"fold_layout.child_modes[{k}][{path}]", "is 'own', which needs a rank > 0")
    _bool(w, "fold_layout.position_gates", layout.get("position_gates", False))
    gates = _index_list(w, "fold_layout.child_gates", layout.get("child_gates", []), positions)
    if len(set(gates)) != len(gates):
        w.fail("fold_layout.child_gates", "lists a position twice")
    if set(gates) - children:
        w.fail("fold_layout.child_gates", f"gates position {min(set(gates) - children)}, which is not a child")
    if gates:
        for key in ("attn_gate_point", "mlp_gate_point"):
            if key not in layout:
                w.fail(f"fold_layout.{key}", "is missing (the layout has child gates)")
