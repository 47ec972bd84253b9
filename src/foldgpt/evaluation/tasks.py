"""Zero-shot multiple-choice tasks: where they come from and how they are read (scored by scoring.py).

Task sources
------------
------------
* BIG-bench JSON tasks: a ``task.json`` file, or a folder holding one. The task's name is the name of the
  folder that holds ``task.json`` (``goal_step_wikihow/goal_inference`` -> ``goal_inference``); any other
  ``*.json`` file is read the same way and named by its stem. Fields, as BIG-bench's ``json_task.py``
  (``default_format_fn``) uses them for zero-shot multiple choice:

  - ``examples`` (required, non-empty list): each ``{"input": str, "target_scores": {choice: score}}``.
    Examples without ``target_scores`` (generative-only ones) are skipped; other example keys
    (``comment``, ``target``, ...) are ignored. Choices keep the order of ``target_scores``; the gold
    choice is the first one with the maximum score.
  - ``task_prefix`` (default ``""``): put once in front of the context.
  - ``example_input_prefix`` (default ``"\\nQ: "``): put in front of ``input``.
  - ``append_choices_to_input`` (default ``True``): if true, ``choice_prefix + choice`` for each choice
    is appended to the input, in BIG-bench's order: the sorted choices permuted by
    ``numpy.random.RandomState(seed).permutation`` (a fresh generator per example; ``seed=42`` by
    default, which is what lm-evaluation-harness's BIG-bench port uses).
  - ``choice_prefix`` (default ``"\\n  choice: "``).
  - ``example_output_prefix`` (default ``"\\nA: "``): ends the context.

  So ``context = task_prefix + example_input_prefix + input [+ choice_prefix + c for c in choices]
  + example_output_prefix`` and each continuation is the bare choice text. ``name``, ``description``,
  ``keywords``, ``metrics``, ``preferred_score``, ``canary``, ``contributors`` are ignored; every task is
  scored by log-likelihood multiple choice. Duplicate examples are kept (BIG-bench drops them).
* JSONL files: one ``{"context": str, "choices": [str, ...], "answer": int}`` per line; ``query`` or
  ``question`` may stand for ``context`` and ``gold`` or ``label`` for ``answer``. Named by file stem.

``limit`` keeps the first N usable examples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FoldGPTError

logger = logging.getLogger(__name__)

BB_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
               "choice_prefix": "\n  choice: ", "append_choices_to_input": True}


@dataclass
class Example:
    context: str
    choices: list[str]
    gold: int


@dataclass
class Task:
    name: str
    examples: list[Example] = field(default_factory=list)




def load_task(spec: str | Path, limit: int | None = None, seed: int = 42) -> Task:
    """A task from a BIG-bench ``task.json`` (or its folder) or a ``.jsonl`` file; see the module doc."""
    path = Path(spec)
    if path.is_dir():
        subtasks = sorted(p.parent.name for p in path.glob("*/task.json"))
        if subtasks and not (path / "task.json").is_file():
            raise FoldGPTError(f"task folder '{spec}' has no task.json; its subtasks are: {', '.join(subtasks)}")
        path = path / "task.json"
    if not path.is_file():
        raise FoldGPTError(f"task '{spec}' not found: give a task.json, a folder holding one, or a .jsonl file")
    if limit is not None and limit < 1:
        raise FoldGPTError(f"limit must be at least 1, got {limit}")
    if path.suffix == ".jsonl":
        task = Task(path.stem, _jsonl_examples(path, limit))
    elif path.suffix == ".json":
        name = path.parent.name if path.name == "task.json" else path.stem
        task = Task(name, _bigbench_examples(path, limit, seed))
    else:
        raise FoldGPTError(f"task '{spec}': unknown file type '{path.suffix}', expected .json or .jsonl")
    logger.info("task %s: %d examples from %s", task.name, len(task.examples), path)
    return task


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FoldGPTError(f"task file {path} is not valid JSON: {exc}") from None


def _bigbench_examples(path: Path, limit: int | None, seed: int) -> list[Example]:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise FoldGPTError(f"task file {path} has no 'examples' list: not a BIG-bench task.json")
    fmt = {k: data.get(k, v) for k, v in BB_DEFAULTS.items()}
    out = []
    for i, ex in enumerate(data["examples"]):
        if not isinstance(ex, dict) or not ex.get("target_scores"):
            continue
        if not isinstance(ex.get("input"), str) or not isinstance(ex["target_scores"], dict):
            raise FoldGPTError(f"task file {path}: example {i} needs a string 'input' and a 'target_scores' dict")
        out.append(_bigbench_example(ex, fmt, seed))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise FoldGPTError(f"task file {path} has no multiple-choice examples (none with 'target_scores')")
    return out


def _bigbench_example(ex: dict, fmt: dict, seed: int) -> Example:
    scores = ex["target_scores"]
    choices = [str(c) for c in scores]
    text = ex["input"]
    if fmt["append_choices_to_input"]:
        order = np.random.RandomState(seed).permutation(sorted(choices))
        text += "".join(fmt["choice_prefix"] + str(c) for c in order)
    context = fmt["task_prefix"] + fmt["example_input_prefix"] + text + fmt["example_output_prefix"]
    values = list(scores.values())
    return Example(context, choices, values.index(max(values)))


def _jsonl_examples(path: Path, limit: int | None) -> list[Example]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise FoldGPTError(f"task file {path} is not UTF-8 text; convert it to UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise FoldGPTError(f"{path}:{lineno} is not valid JSON: {exc}") from None
        out.append(_jsonl_example(row, f"{path}:{lineno}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise FoldGPTError(f"task file {path} has no examples")
    return out


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if k in row), None)


def _jsonl_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise FoldGPTError(f"{where}: expected a JSON object with context, choices and answer")
    context, answer = _first(row, ("context", "query", "question")), _first(row, ("answer", "gold", "label"))
    choices = row.get("choices")
    if not isinstance(context, str):
        raise FoldGPTError(f"{where}: missing string 'context' (or 'query'/'question')")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise FoldGPTError(f"{where}: 'choices' must be a non-empty list of strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise FoldGPTError(f"{where}: 'answer' (or 'gold'/'label') must be an index into the {len(choices)} choices")
    return Example(context, choices, answer)

