"""`foldgpt bench`: every method at every target on the same calibration tokens, one table.

Rows: dense, then for each target and method the compressed model (and, with cure, the same method
followed by the same cure budget). Each row has method, target, cure, unique_params, flops_ratio,
perplexity (eval file name -> perplexity), bits_per_byte, tasks (task -> accuracy), seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .config import CompressConfig, EvalConfig, with_settings
from .data import load_text, tokenize
from .errors import FoldGPTError
from .evaluation.evaluate import Evaluation, evaluate_model
from .fileio import atomic_dir, holds_output, write_json_atomic
from .methods import get_method
from .methods.greedy import SearchCache
from .pipeline import prepare, run_method
from .plan import Plan
from .quant import state_bytes
from .report import fmt_int, markdown_table, ppl, write_bench_figures
from .stages.structure import flops_per_token, unique_params

log = logging.getLogger(__name__)

# ablations of foldgpt: name -> (method, overrides of the config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "foldgpt": ("foldgpt", {}),
    # the paper's ranking: jointly trained gates, retained layers folded by measured cost, full-weight children
    "foldgpt-gates": ("foldgpt", {"ranking.kind": "gates", "fold.child_gates": False}),
    "foldgpt-gates-only": ("foldgpt", {"ranking.kind": "gates", "remove_share": 1.0, "fold.child_gates": False}),
    "foldgpt-bi": ("foldgpt-bi", {"fold.child_gates": False}),  # BI ranking + sharing
    "foldgpt-no-child-gates": ("foldgpt", {"fold.child_gates": False}),  # children start at full weight
    "foldgpt-no-norm": ("foldgpt", {"cure.train_all_norms": False, "cure.train_child_norms": False}),
    "foldgpt-no-tail": ("foldgpt", {"cure.beta_tail": 0.0}),
}


def split_methods(spec: str) -> list[str]:
    """'a,b[x=1;y=2],c' -> ['a', 'b[x=1;y=2]', 'c'] (commas inside brackets do not split)."""
    return [m for m in re.split(r",(?![^\[]*\])", spec) if m]


def parse_variant(name: str) -> tuple[str, dict]:
    """A registered variant, a method, or METHOD[key=value;key=value] with CompressConfig fields as dotted
    paths, e.g. 'foldgpt[remove_share=0.8;fold.adapter_rank=16]'. Returns (method, overrides)."""
    m = re.fullmatch(r"([\w.-]+)\[(.*)\]", name)
    if m is None:
        return VARIANTS.get(name, (name, {}))
    method, overrides = VARIANTS.get(m.group(1), (m.group(1), {}))
    overrides = dict(overrides)
    for item in filter(None, m.group(2).split(";")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise FoldGPTError(f"bad override '{item}' in '{name}': write key=value, e.g. remove_share=0.8")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw.strip()
    return method, overrides


def variant_config(name: str, base: CompressConfig, target: float | str, cure: bool | None) -> CompressConfig:
    """The configuration of the variant `name` (parse_variant) at `target` (a fraction of unique parameters, or a
    byte budget such as "100MB": --target-size), cured or not as `cure` says (None: the method's default)."""
    method, overrides = parse_variant(name)
    get_method(method)
    if "cure.enabled" in overrides:
        raise FoldGPTError(f"'{name}': bench decides the cure of each row (--cure), not cure.enabled")
    try:
        goal = ({"target_params": None, "target_size": target} if isinstance(target, str)
                else {"target_params": target})
        return with_settings(base, {"method": method, **goal, "cure.enabled": cure, **overrides})
    except FoldGPTError as exc:
        raise FoldGPTError(f"{exc} in method '{name}'") from None


def _metrics(ev: Evaluation) -> dict:
    """A row's measurements: perplexity and bits per byte by text, accuracy by task (the cloze task's too)."""
    out = {"perplexity": {n: r.perplexity for n, r in ev.perplexity.items()},
           "bits_per_byte": {n: r.bits_per_byte for n, r in ev.perplexity.items()},
           "tasks": {k: v["acc"] for k, v in ev.tasks.items()}}
    if ev.tasks:
        out["tasks_acc_norm"] = {k: v["acc_norm"] for k, v in ev.tasks.items()}
    if ev.cloze is not None:
        out["tasks"]["cloze"] = ev.cloze["acc"]
    return out


def _plan_key(cfg: CompressConfig) -> str:
    """Everything that decides a method's plan (not the cure): rows that agree on it share one plan."""
    d = cfg.to_dict()
    d.pop("cure")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cure_only(name: str) -> bool:
    """Whether a variant changes only the cure (e.g. 'sleb[cure.seed=1]'): it runs only with the cure."""
    overrides = parse_variant(name)[1]
    return bool(overrides) and all(k.startswith("cure.") for k in overrides)


def rows_file(out: str | Path) -> Path:
    """Finished rows are appended here as they complete, so a stopped bench can `--resume`."""
    out = Path(out)
    return out.parent / f"{out.name}.rows.jsonl"


class _Ledger:
    """The rows file of one bench (`rows_file(out)`): the rows finished so far and the plans they ran.
    Each finished row is appended as it completes; with `resume`, rows already there for the same command are
    kept, and a later row that differs from one only in the cure re-applies its plan instead of re-planning."""

    def __init__(self, path: Path, command: dict, resume: bool):
        self.path, self.command = path, command
        self.done: dict[tuple, dict] = {}  # (method, target, cure) -> row
        self.plans: dict[str, tuple[Plan, float]] = {}  # plan key -> (plan, seconds it took)
        if resume and path.exists():
            as_saved = json.loads(json.dumps(command))  # tuples as lists, as a saved command reads back
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec["command"] == as_saved:
                    self.done[_row_key(rec["row"])] = rec["row"]
                    if "plan" in rec:
                        self.plans[rec["plan"]["key"]] = (Plan.from_dict(rec["plan"]["plan"]), rec["plan"]["seconds"])
            log.info("bench: resuming with %d finished rows (%d plans) from %s", len(self.done), len(self.plans), path)
        elif path.exists():
            path.unlink()

    def record(self, row: dict, plan_key: str | None = None) -> dict:
        if _row_key(row) not in self.done:
            plan = None
            if plan_key is not None:
                plan = {"key": plan_key, "plan": self.plans[plan_key][0].to_dict(), "seconds": self.plans[plan_key][1]}
            with open(self.path, "a") as f:
                f.write(json.dumps({"command": self.command, "row": row, **({"plan": plan} if plan else {})}) + "\n")
        return row


def _row_key(row: dict) -> tuple:
    return row["method"], row["target"], row["cure"]


def _row_modes(methods: list[str], targets: list[float], cure: bool) -> list[tuple[float, str, bool]]:
    """(target, method, cured) of every row after the dense one: a peer without and (with `cure`) with the cure;
    foldgpt and cure-only variants with it only."""
    out = []
    for target in targets:
        for name in methods:
            if get_method(parse_variant(name)[0]).cures_by_default or cure_only(name):
                modes = [True]
            else:
                modes = [False, True] if cure else [False]
            out.extend((target, name, m) for m in modes)
    return out


def _run_row(session, ledger: _Ledger, name: str, target: float, do_cure: bool, base: CompressConfig,
             evaluate: Callable, eval_seq_len: int, searches: SearchCache) -> dict:
    cfg = variant_config(name, base, target, do_cure)
    key = _plan_key(cfg)
    log.info("bench: %s at %s%s%s", name, _target(target), " + cure" if do_cure else "",
             " (plan reused)" if key in ledger.plans else "")
    t = time.perf_counter()
    plan, plan_seconds = ledger.plans.get(key, (None, 0.0))
    run = run_method(session, cfg, plan, searches=searches)
    # a greedy search reused from an earlier row counts in this row's compression time too
    seconds = time.perf_counter() - t + plan_seconds + run.info.reused_search_seconds
    if plan is None:
        ledger.plans[key] = (run.plan, run.summary["seconds"].get("Planning", 0.0) + run.info.reused_search_seconds)
    t = time.perf_counter()
    ev = evaluate(run.student)
    dense_flops = flops_per_token(session.dense, session.adapter, eval_seq_len)
    row = ledger.record({
        "method": name, "target": target, "cure": do_cure,
        "unique_params": run.summary["unique_params"], "params_ratio": run.summary["params_ratio"],
        "flops_ratio": flops_per_token(run.student, session.adapter, eval_seq_len) / dense_flops,
        "unit": run.plan.unit, "removed": run.plan.removed, "groups": run.plan.groups,
        "child_gates": run.summary.get("child_gates", {}), "seconds": seconds, **ev,
        "eval_seconds": time.perf_counter() - t,
        **(_bytes(run) if isinstance(target, str) or cfg.quantize != "none" else {}),
    }, plan_key=key)
    log.info("bench: %s", {k: row[k] for k in ("method", "target", "cure", "perplexity")})
    return row


@holds_output(inputs=("model", "text", "eval_text"))  # checked and locked before any work
def bench(model: str, methods: list[str], targets: list[float | str], text: list[str] | None, eval_text: list[str],
          out: str | Path, cure: bool = False, base: CompressConfig | None = None,
          evaluation: EvalConfig | None = None, overwrite: bool = False, resume: bool = False) -> list[dict]:
    """Run every method at every target on one calibration set, evaluate each result on the texts `eval_text` as
    `evaluation` says (its cloze task from the first text), and write results.json/.md and plots.

    Rows that differ only in the cure (a peer with and without it, foldgpt and its cure ablations)
    reuse one plan, and greedy searches are shared between rows (SLEB and foldgpt's greedy ranking search once).
    Each finished row is appended to `rows_file(out)`, and each greedy-search step to a folder beside it; with
    `resume`, rows already there for the same command are kept instead of rerun, and saved searches continue.
    A target given as a byte budget ("100MB") is a --target-size: each row chooses its target and quantization."""
    base = base or CompressConfig()
    evaluation = evaluation or EvalConfig()
    for m in methods:
        variant_config(m, base, targets[0], None)  # fail early on unknown names
    for t in targets[1:]:
        variant_config(methods[0], base, t, None)  # ... and on bad sizes
    if Path(out).exists() and not overwrite:
        raise FoldGPTError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if evaluation.tasks:
        from .evaluation.tasks import load_task

        for spec in evaluation.tasks:  # fail before hours of compute, not after
            load_task(spec, limit=evaluation.task_limit)
    command = {"model": model, "text": text, "eval_text": eval_text, "evaluation": asdict(evaluation),
               "base": base.to_dict()}
    ledger = _Ledger(rows_file(out), command, resume)
    search_dir = Path(out).parent / f"{Path(out).name}.search"  # greedy searches, step by step (resumable)
    if not resume and search_dir.exists():
        shutil.rmtree(search_dir)
    searches = SearchCache(search_dir)
    session = prepare(model, text, base)
    tok, bos = session.tokenizer, session.bos
    eval_ids = {Path(spec).name: tokenize(tok, load_text([spec], split="test").text) for spec in eval_text}
    cloze_set = None
    if evaluation.cloze:
        from .evaluation.cloze import cloze_examples

        cloze_set = cloze_examples(load_text([eval_text[0]]).text, n=evaluation.cloze, seed=base.seed)

    def evaluate(m) -> dict:
        return _metrics(evaluate_model(m, tok, bos, eval_ids, evaluation, cloze_set))

    rows = [ledger.done.get(("dense", 1.0, False))]
    if rows[0] is None:
        t = time.perf_counter()
        rows[0] = ledger.record({"method": "dense", "target": 1.0, "cure": False,
                                 "unique_params": unique_params(session.dense), "params_ratio": 1.0,
                                 "flops_ratio": 1.0, "seconds": 0.0, **evaluate(session.dense),
                                 "eval_seconds": time.perf_counter() - t,
                                 **({"weights_bytes": state_bytes(session.dense)}
                                    if any(isinstance(x, str) for x in targets) else {})})
    for target, name, do_cure in _row_modes(methods, targets, cure):
        row = ledger.done.get((name, target, do_cure))
        rows.append(row if row is not None else _run_row(session, ledger, name, target, do_cure, base, evaluate,
                                                         evaluation.seq_len, searches))
    with atomic_dir(out, overwrite) as tmp:
        write_json_atomic(tmp / "results.json", rows)
        write_json_atomic(tmp / "command.json", command)
        (tmp / "results.md").write_text(results_markdown(rows, model))
        write_bench_figures(rows, tmp)
    ledger.path.unlink(missing_ok=True)
    shutil.rmtree(search_dir, ignore_errors=True)
    return rows


def _bytes(run) -> dict:
    """A quantized or --target-size row's level and weight bytes (the tensors, without the file's header)."""
    level = run.summary["quantization"]["level"] if "quantization" in run.summary else "none"
    return {"quantization": level, "weights_bytes": state_bytes(run.student)}


def _target(t: float | str) -> str:
    return t if isinstance(t, str) else f"{t:.2f}"


def results_markdown(rows: list[dict], model: str) -> str:
    ppl_names = list(rows[0]["perplexity"])
    task_names = list(rows[0]["tasks"])
    sized = any("weights_bytes" in r for r in rows)  # --target-size / quantized rows: their bytes
    headers = (["method", "target", "cure", "unique params", "FLOPs/token"] + (["quant", "weights MB"] if sized else [])
               + [f"PPL {n}" for n in ppl_names] + [f"bpb {n}" for n in ppl_names]
               + task_names + (["task avg"] if task_names else []) + ["compress s"])
    body = []
    for r in rows:
        accs = [r["tasks"].get(t) for t in task_names]
        body.append(
            [r["method"], _target(r["target"]), "yes" if r["cure"] else "no",
             f"{fmt_int(r['unique_params'])} ({r['params_ratio']:.1%})", f"{r['flops_ratio']:.1%}"]
            + ([r.get("quantization", "none"), f"{r['weights_bytes'] / 1e6:.1f}" if "weights_bytes" in r else "-"]
               if sized else [])
            + [ppl(r["perplexity"][n]) for n in ppl_names]
            + [f"{r['bits_per_byte'][n]:.3f}" for n in ppl_names]
            + [f"{a:.3f}" if a is not None else "-" for a in accs]
            + ([f"{sum(a for a in accs if a is not None) / max(1, len(accs)):.3f}"] if task_names else [])
            + [f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"]
        )
    return f"# foldgpt bench: {model}\n\n" + markdown_table(headers, body) + "\n"


def render(folder: str | Path) -> None:
    """Redraw a finished bench's plots from its results.json (`python -m foldgpt.bench render DIR`)."""
    folder = Path(folder)
    try:
        rows = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        raise FoldGPTError(f"{folder} holds no readable results.json of a bench") from None
    write_bench_figures(rows, folder)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "render":
        sys.exit("usage: python -m foldgpt.bench render DIR  (redraws DIR's plots from its results.json)")
    try:
        render(sys.argv[2])
    except FoldGPTError as exc:
        sys.exit(f"foldgpt: error: {exc}")
