"""Seeded mutations of what foldgpt reads back: a folded checkpoint's config.json (its fold_layout and fold_plan) and a
plan file. Every load either works (and the model then runs) or fails with one FoldGPTError line; nothing else."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from foldgpt.errors import FoldGPTError

N_LAYOUTS = 120  # per model
N_PLANS = 150

# values a mutation may put anywhere
VALUES = [None, True, False, 0, 1, 2, 3, -1, 4, 7, 99, 2**70, 10**1000, "9" * 5000, 1.5, -0.0, math.nan, math.inf,
          "", "0", "1", "-1", "01", "x", "1.foo", "3.attn", "attn", "mlp", "own", "alpha", "shared", "fit", "svd",
          "__class__", "self_attn", "mlp.up_proj", "self_attn.q_proj", "model.layers", [], [0], [0, 1], [1, 0], [0, 0],
          [[0, 1]], ["attn"], ["mlp.up_proj"], {}, {"0": 1}, {"1": 0}, {"1": 5}, {"1": {"mlp.up_proj": "own"}},
          {"2": ["attn"]}]


def _paths(node, prefix=()):
    """Every path (tuple of keys/indices) into a JSON tree, the root's children first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _get(node, path):
    for k in path:
        node = node[k]
    return node


def mutate(doc, rng: random.Random, n: int):
    """`n` random edits of a JSON tree: replace a value, delete a key or item, add one, rename a key, duplicate an
    item, or shift an integer by one."""
    doc = copy.deepcopy(doc)
    for _ in range(n):
        paths = list(_paths(doc))
        op = rng.choice(["replace", "replace", "delete", "add", "rename", "duplicate", "shift"])
        if not paths:
            op = "add"
        path = rng.choice(paths) if paths else ()
        parent, key = (_get(doc, path[:-1]), path[-1]) if path else (doc, None)
        if op == "replace":
            parent[key] = copy.deepcopy(rng.choice(VALUES))
        elif op == "delete":
            del parent[key]
        elif op == "add":  # into the container at `path`, else into the one holding it
            target = _get(doc, path) if path and isinstance(_get(doc, path), (dict, list)) else parent
            if isinstance(target, dict):
                target[rng.choice(["0", "1", "2", "9", "x", "kept", "parents", "extra"])] = copy.deepcopy(
                    rng.choice(VALUES))
            else:
                target.append(copy.deepcopy(rng.choice(VALUES)))
        elif op == "rename" and isinstance(parent, dict):
            parent[rng.choice(["0", "1", "01", "-1", "9", "x", str(key) + "_"])] = parent.pop(key)
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op == "shift" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += rng.choice([-1, 1])
    return doc


def _one_line(exc: FoldGPTError) -> None:
    text = str(exc)
    assert text and "\n" not in text, repr(text)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def folded(request, tmp_path_factory):
    """(a tiny dense model folder, a folded checkpoint of it with removed layers and sub-blocks, a group, child
    gates, ranks and modes)."""
    from test_bad_inputs import _save_folded
    from tinymodels import save_tiny, tiny_config, tiny_model

    from foldgpt.plan import Plan

    root = tmp_path_factory.mktemp("fuzz")
    if request.param == "llama":
        dense = save_tiny(root / "dense", "llama", model=tiny_model("llama", layers=4, train_steps=0))
        plan = Plan(4, "llama", removed=["3", "2.attn"], groups=[[0, 1]], adapter_rank=2, child_gates={"1": 0.5},
                    child_ranks={"1": 3}, child_modes={"1": {"mlp.up_proj": "own", "self_attn.q_proj": "alpha"}},
                    layer_kinds=["full_attention"] * 4)
    else:
        dense = save_tiny(root / "dense", "gemma3", model=tiny_model("gemma3", layers=6, train_steps=0))
        plan = Plan(6, "gemma3_text", removed=["4", "5.mlp"], groups=[[0, 1, 3]], adapter_rank=2,
                    child_gates={"1": 0.5}, layer_kinds=list(tiny_config("gemma3", 6).layer_types))
    return dense, _save_folded(dense, root / "folded", plan)


def test_fuzz_folded_config(folded, tmp_path):
    from foldgpt.checkpoint.folded import load_folded

    _, src = folded
    base = json.loads((src / "config.json").read_text())
    rng = random.Random(f"layout:{base['base_model_type']}")
    work = Path(shutil.copytree(src, tmp_path / "m"))
    ids = torch.tensor([[1, 5, 9]])
    outcome = {"loaded": 0, "refused": 0}
    for i in range(N_LAYOUTS):
        config = copy.deepcopy(base)
        part = "fold_plan" if i % 5 == 4 else "fold_layout"
        config[part] = mutate(config[part], rng, rng.randint(1, 3))
        (work / "config.json").write_text(json.dumps(config))
        try:
            model, _ = load_folded(work)
        except FoldGPTError as exc:
            _one_line(exc)
            outcome["refused"] += 1
            continue
        with torch.no_grad():
            assert model(input_ids=ids).logits.shape[:2] == (1, 3), config[part]
        outcome["loaded"] += 1
    assert outcome["loaded"] > 0 and outcome["refused"] > N_LAYOUTS // 2, outcome


def test_fuzz_plan_file(folded, tmp_path):
    from foldgpt.adapters import get_adapter
    from foldgpt.models import load_model
    from foldgpt.plan import Plan
    from foldgpt.stages.structure import apply_plan_

    dense_dir, src = folded
    dense, _ = load_model(str(dense_dir))
    adapter = get_adapter(dense.config)
    base = json.loads((src / "plan.json").read_text())
    rng = random.Random(f"plan:{base['model_type']}")
    path = tmp_path / "plan.json"
    ids = torch.tensor([[1, 5, 9]])
    outcome = {"applied": 0, "refused": 0}
    for _ in range(N_PLANS):
        path.write_text(json.dumps(mutate(base, rng, rng.randint(1, 3))))
        try:
            plan = Plan.load(path)
            if plan.num_layers != base["num_layers"] or plan.model_type != base["model_type"]:
                raise FoldGPTError("the plan was made for another model")  # what compress checks
            model = apply_plan_(copy.deepcopy(dense), plan, adapter)
        except FoldGPTError as exc:
            _one_line(exc)
            outcome["refused"] += 1
            continue
        with torch.no_grad():
            assert model(input_ids=ids).logits.shape[:2] == (1, 3)
        outcome["applied"] += 1
    assert outcome["applied"] > 0 and outcome["refused"] > N_PLANS // 3, outcome
