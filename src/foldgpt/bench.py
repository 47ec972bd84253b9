"""`foldgpt bench`: every method at every target on the same calibration tokens, one table.

Rows: dense, then for each target and method the compressed model (and, with cure, the same method
followed by the same cure budget). Each row has method, target, cure, unique_params, flops_ratio,
perplexity (eval file name -> perplexity), bits_per_byte, tasks (task -> accuracy), seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from .config import CompressConfig
from .data import load_text, tokenize
from .errors import FoldGPTError
from .evaluate import perplexity
from .fileio import atomic_dir, write_json_atomic
from .methods import METHODS, get_method, greedy, make_plan
from .pipeline import prepare, run_method
from .plan import Plan
from .report import fmt_int, markdown_table, ppl, write_bench_figures
from .structure import flops_per_token, unique_params

log = logging.getLogger(__name__)

# ablations of foldgpt: name -> (method, overrides of the config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "foldgpt": ("foldgpt", {}),
    # the paper's ranking: jointly trained gates, retained layers folded by measured cost, full-weight children
    "foldgpt-gates": ("foldgpt", {"ranking": "gates", "fold.child_gates": False}),
    "foldgpt-gates-only": ("foldgpt", {"ranking": "gates", "remove_share": 1.0, "fold.child_gates": False}),
    "foldgpt-bi": ("foldgpt-bi", {"fold.child_gates": False}),  # BI ranking + sharing
    "foldgpt-no-child-gates": ("foldgpt", {"fold.child_gates": False}),  # children start at full weight
    "foldgpt-no-norm": ("foldgpt", {"cure_cfg.train_all_norms": False, "cure_cfg.train_child_norms": False}),
    "foldgpt-no-tail": ("foldgpt", {"cure_cfg.beta_tail": 0.0}),
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


def variant_config(name: str, base: CompressConfig, target: float, cure: bool | None) -> CompressConfig:
    method, overrides = parse_variant(name)
    get_method(method)
    cfg = copy.deepcopy(base)
    cfg = replace(cfg, method=method, target_params=target, cure=cure)
    for key, value in overrides.items():
        obj = cfg
        *path, leaf = key.split(".")
        for p in path:
            if not hasattr(obj, p):
                raise FoldGPTError(f"unknown setting '{key}' in method '{name}'")
            obj = getattr(obj, p)
        if not hasattr(obj, leaf):
            raise FoldGPTError(f"unknown setting '{key}' in method '{name}'")
        setattr(obj, leaf, value)
        if hasattr(obj, "__post_init__"):
            obj.__post_init__()  # re-check the edited settings
    return cfg


def _evaluate(model, tok, bos: bool, eval_ids: dict[str, torch.Tensor], seq_len: int, max_tokens: int | None,
              tasks: list[str], task_limit: int | None, cloze: dict | None) -> dict:
    out = {"perplexity": {}, "bits_per_byte": {}, "tasks": {}}
    for name, ids in eval_ids.items():
        r = perplexity(model, tok, ids, seq_len, bos, max_tokens)
        out["perplexity"][name] = r.perplexity
        out["bits_per_byte"][name] = r.bits_per_byte
    if tasks:
        from .tasks import evaluate_tasks

        res = evaluate_tasks(model, tok, tasks, bos=bos, limit=task_limit)
        out["tasks"].update({k: v["acc"] for k, v in res.items()})
        out["tasks_acc_norm"] = {k: v["acc_norm"] for k, v in res.items()}
    if cloze is not None:
        from .tasks import evaluate_cloze

        res = evaluate_cloze(model, tok, cloze["examples"], bos=bos)
        out["tasks"]["cloze"] = res["acc"]
    return out


def _plan_key(cfg: CompressConfig) -> str:
    """Everything that decides a method's plan (not the cure): rows that agree on it share one plan."""
    d = cfg.to_dict()
    d.pop("cure")
    d.pop("cure_cfg")
    if d.get("compensate") == "none":  # off: the key plans saved before the option existed have
        d.pop("compensate")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cure_only(name: str) -> bool:
    """Whether a variant changes only the cure (e.g. 'sleb[cure_cfg.seed=1]'): it runs only with the cure."""
    overrides = parse_variant(name)[1]
    return bool(overrides) and all(k.startswith("cure_cfg.") for k in overrides)


def _plan_from_row(row: dict, cfg: CompressConfig, session) -> Plan | None:
    """The plan of a row written before rows carried it, from the removed layers, groups and child gate starts
    the row records; None where those do not describe it (a method that merges layers; foldgpt's search, whose
    fitted children's ranks and modes a row does not record)."""
    if get_method(cfg.method).merges or "removed" not in row or (cfg.method == "foldgpt" and cfg.ranking == "search"):
        return None
    gates = {c: g["start"] if isinstance(g, dict) else g for c, g in row.get("child_gates", {}).items()}
    return make_plan(cfg, session.dense, session.adapter, list(row["removed"]),
                     [list(g) for g in row.get("groups", [])], child_gates=gates, method=cfg.method)


def _same_command(old, new) -> bool:
    """Whether a saved row's command is this one; an option added to foldgpt since (a key only in `new`) matches
    when it is off (None, False or "none"), so rows written by an earlier version still resume."""
    if isinstance(old, dict) and isinstance(new, dict):
        return (all(k in new and _same_command(v, new[k]) for k, v in old.items())
                and all(new[k] is None or new[k] is False or new[k] == "none" for k in new.keys() - old.keys()))
    return old == new


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
        self.plans: dict[str, tuple[Plan, float | None]] = {}  # plan key -> (plan, seconds it took, if known)
        self.legacy: list[dict] = []  # resumed rows written before rows carried their plan
        if resume and path.exists():
            as_saved = json.loads(json.dumps(command))  # tuples as lists, as a saved command reads back
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if _same_command(rec.get("command"), as_saved):
                    self.done[_row_key(rec["row"])] = rec["row"]
                    if "plan" in rec:
                        self.plans[rec["plan"]["key"]] = (Plan.from_dict(rec["plan"]["plan"]), rec["plan"]["seconds"])
                    else:
                        self.legacy.append(rec["row"])
            log.info("bench: resuming with %d finished rows (%d plans) from %s", len(self.done), len(self.plans), path)
        elif path.exists():
            path.unlink()

    def adopt_legacy(self, base: CompressConfig, session) -> None:
        """Rebuild the plans of resumed rows written without one, so a cure-only variant does not plan again."""
        for row in self.legacy:
            if row["method"] == "dense" or parse_variant(row["method"])[0] not in METHODS:
                continue
            cfg = variant_config(row["method"], base, row["target"], row["cure"])
            key = _plan_key(cfg)
            if (key not in self.plans or self.plans[key][1] is None) and (plan := _plan_from_row(row, cfg, session)):
                # an uncured row's time is its planning (and applying); a cured row's also holds its cure
                self.plans[key] = (plan, None if row["cure"] else row["seconds"])

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
             evaluate: Callable, eval_seq_len: int) -> dict:
    cfg = variant_config(name, base, target, do_cure)
    key = _plan_key(cfg)
    log.info("bench: %s at %.2f%s%s", name, target, " + cure" if do_cure else "",
             " (plan reused)" if key in ledger.plans else "")
    t = time.perf_counter()
    plan, plan_seconds = ledger.plans.get(key, (None, 0.0))
    run = run_method(session, cfg, plan)
    # a greedy search reused from an earlier row counts in this row's compression time too
    seconds = (None if plan_seconds is None  # a plan rebuilt from an old row: its time is unknown
               else time.perf_counter() - t + plan_seconds + run.info.reused_search_seconds)
    if plan is None:
        ledger.plans[key] = (run.plan, run.summary["seconds"].get("Planning", 0.0)
                             + run.info.reused_search_seconds)
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
    }, plan_key=key)
    log.info("bench: %s", {k: row[k] for k in ("method", "target", "cure", "perplexity")})
    return row


def bench(model: str, methods: list[str], targets: list[float], text: list[str] | None, eval_text: list[str],
          out: str | Path, tasks: list[str] | None = None, cure: bool = False, base: CompressConfig | None = None,
          eval_seq_len: int = 512, eval_max_tokens: int | None = None, task_limit: int | None = None,
          cloze: int = 0, overwrite: bool = False, resume: bool = False) -> list[dict]:
    """Run every method at every target on one calibration set and write results.json/.md and plots.

    Rows that differ only in the cure (a peer with and without it, foldgpt and its cure ablations)
    reuse one plan. Each finished row is appended to `rows_file(out)`; with `resume`, rows already
    there for the same command are kept instead of rerun, and saved greedy-search steps are continued."""
    base = base or CompressConfig()
    tasks = tasks or []
    for m in methods:
        variant_config(m, base, targets[0], None)  # fail early on unknown names
    if Path(out).exists() and not overwrite:
        raise FoldGPTError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if tasks:
        from .tasks import load_task

        for spec in tasks:  # fail before hours of compute, not after
            load_task(spec, limit=task_limit)
    command = {"model": model, "text": text, "eval_text": eval_text, "tasks": tasks, "task_limit": task_limit,
               "cloze": cloze, "eval_seq_len": eval_seq_len, "eval_max_tokens": eval_max_tokens,
               "base": base.to_dict()}
    ledger = _Ledger(rows_file(out), command, resume)
    search_dir = Path(out).parent / f"{Path(out).name}.search"  # greedy searches, step by step (resumable)
    if not resume and search_dir.exists():
        shutil.rmtree(search_dir)
    with greedy.searches_in(search_dir):
        session = prepare(model, text, base)
        ledger.adopt_legacy(base, session)
        tok, bos = session.tokenizer, session.bos
        eval_ids = {Path(spec).name: tokenize(tok, load_text([spec], split="test").text) for spec in eval_text}
        cloze_set = None
        if cloze:
            from .tasks import cloze_examples

            cloze_set = {"examples": cloze_examples(load_text([eval_text[0]]).text, n=cloze, seed=base.seed)}

        def evaluate(m) -> dict:
            return _evaluate(m, tok, bos, eval_ids, eval_seq_len, eval_max_tokens, tasks, task_limit, cloze_set)

        rows = [ledger.done.get(("dense", 1.0, False))]
        if rows[0] is None:
            t = time.perf_counter()
            rows[0] = ledger.record({"method": "dense", "target": 1.0, "cure": False,
                                     "unique_params": unique_params(session.dense), "params_ratio": 1.0,
                                     "flops_ratio": 1.0, "seconds": 0.0, **evaluate(session.dense),
                                     "eval_seconds": time.perf_counter() - t})
        for target, name, do_cure in _row_modes(methods, targets, cure):
            row = ledger.done.get((name, target, do_cure))
            rows.append(row if row is not None
                        else _run_row(session, ledger, name, target, do_cure, base, evaluate, eval_seq_len))
        with atomic_dir(out, overwrite) as tmp:
            write_json_atomic(tmp / "results.json", rows)
            write_json_atomic(tmp / "command.json", command)
            (tmp / "results.md").write_text(results_markdown(rows, model))
            write_bench_figures(rows, tmp)
        ledger.path.unlink(missing_ok=True)
        shutil.rmtree(search_dir, ignore_errors=True)
    return rows


def results_markdown(rows: list[dict], model: str) -> str:
    ppl_names = list(rows[0]["perplexity"])
    task_names = list(rows[0]["tasks"])
    headers = (["method", "target", "cure", "unique params", "FLOPs/token"]
               + [f"PPL {n}" for n in ppl_names] + [f"bpb {n}" for n in ppl_names]
               + task_names + (["task avg"] if task_names else []) + ["compress s"])
    body = []
    for r in rows:
        accs = [r["tasks"].get(t) for t in task_names]
        body.append(
            [r["method"], f"{r['target']:.2f}", "yes" if r["cure"] else "no",
             f"{fmt_int(r['unique_params'])} ({r['params_ratio']:.1%})", f"{r['flops_ratio']:.1%}"]
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
