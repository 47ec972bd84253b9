"""The fold plan: every decision of a compression run, as a JSON artifact that can be re-applied."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FoldGPTError
from .fileio import write_json_atomic

PLAN_VERSION = 5  # the newest format this foldgpt reads
MERGES_VERSION = 2  # plans with LaCo merges need at least this version (older foldgpt would drop them)
CHILD_GATES_VERSION = 3  # plans with child gates (older foldgpt would build children without them)
COMPENSATION_VERSION = 4  # plans with a training-free span compensation (older foldgpt would skip it)
FIT_VERSION = 5  # plans with fitted children (per-child ranks and modes)


@dataclass
class Plan:
    """What to remove and what to fold, in terms of the *original* layer indices.

    removed: units to delete: "7" is a whole layer, "7.attn" / "7.mlp" a sub-block.
    groups:  folded groups [parent, child, ...] of retained layers (children in increasing order, on either
             side of the parent); children run the parent's Linear weights (by reference) and keep
             their own norms.
    child_gates: initial value of each child's branch gate (original layer -> scalar): the child's attention
             and MLP outputs are scaled by it (0 = the layer deleted, 1 = the parent's block in full).
    merges:  LaCo layer merges [l, l+1, ..., l+K]: layer l's parameters become
             theta_l + sum_k (theta_{l+k} - theta_l) and layers l+1..l+K are removed (listed in `removed`).
             Applied before removal and folding; the merged weights are saved as position l's own.
    """

    num_layers: int
    model_type: str
    removed: list[str] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    merges: list[list[int]] = field(default_factory=list)
    layer_kinds: list[str] = field(default_factory=list)
    shared_linears: list[str] = field(default_factory=list)  # empty = every Linear of the layer
    adapter_rank: int = 0
    # "zero" (LoRA: B=0), "svd" (truncated SVD of W_child - W_parent) or "fit" (closed-form fit on calibration
    # activations, fit.py: the children of `child_modes` run alpha * parent + B A or their own B A)
    adapter_init: str = "zero"
    child_ranks: dict[str, int] = field(default_factory=dict)  # child (original layer) -> rank (default adapter_rank)
    child_modes: dict[str, dict[str, str]] = field(default_factory=dict)  # child -> {Linear: shared/alpha/own}
    position_gates: bool = False  # a learnable scalar gate on every retained position
    child_gates: dict[str, float] = field(default_factory=dict)
    across_kinds: bool = False  # groups may mix attention kinds (each child keeps its own kind; same weight shapes)
    # training-free compensation of each deleted span, merged into the last kept layer's MLP down projection
    # (compensate.py): "" (none), "replaceme" (least-squares map) or "linearpatch" (Hadamard-basis channel scale)
    compensation: str = ""
    method: str = "foldgpt"
    unit: str = "layer"
    gates: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    version: int = 1  # raised to MERGES_VERSION when the plan merges layers

    def __post_init__(self) -> None:
        self.merges = [[int(x) for x in m] for m in self.merges]
        self.child_gates = {str(k): float(v) for k, v in self.child_gates.items()}
        if self.merges:
            self.version = max(self.version, MERGES_VERSION)
        if self.child_gates:
            self.version = max(self.version, CHILD_GATES_VERSION)
        self.child_ranks = {str(k): int(v) for k, v in self.child_ranks.items()}
        self.child_modes = {str(k): {str(p): str(m) for p, m in v.items()} for k, v in self.child_modes.items()}
        if self.child_ranks or self.child_modes or self.adapter_init == "fit":
            self.version = max(self.version, FIT_VERSION)
        if self.compensation:
            self.version = max(self.version, COMPENSATION_VERSION)
        self.validate()

    # ---- derived views -----------------------------------------------------------------------
    def removed_layers(self) -> set[int]:
        return {int(u) for u in self.removed if "." not in u}

    def removed_sublayers(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for u in self.removed:
            if "." in u:
                layer, part = u.split(".")
                out.setdefault(int(layer), set()).add(part)
        return out

    def kept_layers(self) -> list[int]:
        gone = self.removed_layers()
        return [i for i in range(self.num_layers) if i not in gone]

    def parent_of(self) -> dict[int, int]:
        return {c: g[0] for g in self.groups for c in g[1:]}

    def layer_map(self) -> list[dict]:
        """One entry per position of the compressed model: which original layer it came from,
        which layer's weights it runs, and which sub-blocks it lost."""
        parents = self.parent_of()
        subs = self.removed_sublayers()
        merged = {m[0]: m for m in self.merges}
        return [
            {
                "position": pos,
                "source": layer,
                "weights_from": parents.get(layer, layer),
                "shared": layer in parents,
                "kind": self.layer_kinds[layer] if self.layer_kinds else "full_attention",
                "removed_sublayers": sorted(subs.get(layer, ())),
                "merged_from": list(merged.get(layer, ())),
            }
            for pos, layer in enumerate(self.kept_layers())
        ]

    def validate(self) -> None:
        from .schema import check_plan_units

        check_plan_units(self)
        if self.version > PLAN_VERSION:
            raise FoldGPTError(f"plan version {self.version} is newer than this foldgpt ({PLAN_VERSION}); upgrade")
        if self.compensation not in ("", "replaceme", "linearpatch"):
            raise FoldGPTError(f"plan compensation must be '', 'replaceme' or 'linearpatch', got "
                               f"'{self.compensation}'")
        kept = set(self.kept_layers())
        if not kept:
            raise FoldGPTError("the plan removes every layer; lower the compression target")
        seen: set[int] = set()
        for g in self.groups:
            if len(g) < 2 or g[1:] != sorted(set(g[1:])) or g[0] in g[1:]:
                raise FoldGPTError(f"plan group {g} must list a parent, then >= 1 children in increasing order")
            for layer in g:
                if layer in self.removed_sublayers():
                    raise FoldGPTError(f"plan group {g} uses layer {layer}, which lost a sub-block; it cannot share")
                if layer not in kept or layer in seen:
                    raise FoldGPTError(f"plan group {g} uses layer {layer}, which is removed or already grouped; a "
                                       "kept layer may be in one group")
                seen.add(layer)
            if self.layer_kinds and len({self.layer_kinds[i] for i in g}) > 1 and not self.across_kinds:
                raise FoldGPTError(f"plan group {g} mixes attention kinds; only same-kind layers may share unless "
                                   "the plan allows it (--fold-across-kinds)")
        children = set(self.parent_of())
        for c in self.child_gates:
            if int(c) not in children:
                raise FoldGPTError(f"plan gives layer {c} a child gate, but it is not a folded child; give child gates "
                                   "to the children of groups only")
        if self.adapter_init not in ("zero", "svd", "fit"):
            raise FoldGPTError(f"plan adapter_init must be 'zero', 'svd' or 'fit', got '{self.adapter_init}'")
        for c, r in self.child_ranks.items():
            if int(c) not in children or r < 0:
                raise FoldGPTError(f"plan gives layer {c} a child rank {r}, but it is not a folded child (or r < 0); "
                                   "give ranks >= 0 to the children of groups only")
        for c, modes in self.child_modes.items():
            if int(c) not in children:
                raise FoldGPTError(f"plan gives layer {c} child modes, but it is not a folded child; give modes to the "
                                   "children of groups only")
            for path, mode in modes.items():
                if mode not in ("shared", "alpha", "own"):
                    raise FoldGPTError(f"plan child {c}: mode '{mode}' of {path} must be shared, alpha or own")
                if mode == "own" and self.child_ranks.get(c, self.adapter_rank) <= 0:
                    raise FoldGPTError(f"plan child {c}: an 'own' Linear ({path}) needs a rank > 0")
        gone = self.removed_layers()
        merged: set[int] = set()
        for m in self.merges:
            if len(m) < 2 or m != sorted(set(m)) or m[0] < 0 or m[-1] >= self.num_layers:
                raise FoldGPTError(f"plan merge {m} must list >= 2 layers of the model in increasing order")
            if m[0] not in kept:
                raise FoldGPTError(f"plan merge {m} merges into layer {m[0]}, which the plan removes; keep the first "
                                   "layer of a merge")
            if any(layer not in gone for layer in m[1:]):
                raise FoldGPTError(f"plan merge {m}: the merged layers {m[1:]} must be removed whole")
            if merged.intersection(m):
                raise FoldGPTError(f"plan merge {m} uses a layer that another merge already uses; each layer may be in "
                                   "one merge")
            merged.update(m)

    # ---- I/O --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_map"] = self.layer_map()
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "the plan") -> Plan:
        """A plan from its JSON object, checked against the schema (schema.py) first; `source` names it in errors."""
        from .schema import check_plan_dict

        check_plan_dict(d, source)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from .schema import read_json

        return cls.from_dict(read_json(path, "plan file", "give the plan.json that foldgpt compress wrote"),
                             str(path))
