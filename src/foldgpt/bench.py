"""`foldgpt bench`: every method at every target on the same calibration tokens, one table.

Rows: dense, then for each target and method the compressed model (and, with cure, the same method
followed by the same cure budget). Each row has method, target, cure, unique_params, flops_ratio,
perplexity (eval file name -> perplexity), bits_per_byte, tasks (task -> accuracy), seconds.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from .api import atomic_dir, prepare, run_method
from .config import CompressConfig
from .data import load_text, tokenize
from .evaluate import perplexity
from .methods import get_method
from .plan import write_json_atomic
from .report import fmt_int, markdown_table, plot_xy, ppl
from .structure import flops_per_token, unique_params

log = logging.getLogger(__name__)

# ablations of foldgpt: name -> (method, overrides of the config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "foldgpt": ("foldgpt", {}),
    "foldgpt-gates-only": ("foldgpt", {"remove_share": 1.0}),  # removal by gates, no sharing
    "foldgpt-bi": ("foldgpt-bi", {}),  # BI ranking + sharing
    "foldgpt-no-norm": ("foldgpt", {"cure_cfg.train_all_norms": False, "cure_cfg.train_child_norms": False}),
    "foldgpt-no-tail": ("foldgpt", {"cure_cfg.beta_tail": 0.0}),
}


def variant_config(name: str, base: CompressConfig, target: float, cure: bool | None) -> CompressConfig:
    method, overrides = VARIANTS.get(name, (name, {}))
    get_method(method)
    cfg = copy.deepcopy(base)
    cfg = replace(cfg, method=method, target_params=target, cure=cure)
    for key, value in overrides.items():
        obj = cfg
        *path, leaf = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
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


def bench(model: str, methods: list[str], targets: list[float], text: list[str] | None, eval_text: list[str],
          out: str | Path, tasks: list[str] | None = None, cure: bool = False, base: CompressConfig | None = None,
          eval_seq_len: int = 512, eval_max_tokens: int | None = None, task_limit: int | None = None,
          cloze: int = 0, overwrite: bool = False) -> list[dict]:
    """Run every method at every target on one calibration set and write results.json/.md and plots."""
    base = base or CompressConfig()
    tasks = tasks or []
    for m in methods:
        variant_config(m, base, targets[0], None)  # fail early on unknown names
    session = prepare(model, text, base)
    tok, bos = session.tokenizer, session.bos
    eval_ids = {}
    for spec in eval_text:
        eval_ids[Path(spec).name] = tokenize(tok, load_text([spec], split="test").text)
    cloze_set = None
    if cloze:
        from .tasks import cloze_examples

        cloze_set = {"examples": cloze_examples(load_text([eval_text[0]]).text, n=cloze, seed=base.seed)}
    rows = []
    t = time.perf_counter()
    dense_eval = _evaluate(session.dense, tok, bos, eval_ids, eval_seq_len, eval_max_tokens, tasks, task_limit,
                           cloze_set)
    base_params = unique_params(session.dense)
    rows.append({"method": "dense", "target": 1.0, "cure": False, "unique_params": base_params,
                 "params_ratio": 1.0, "flops_ratio": 1.0, "seconds": 0.0, **dense_eval,
                 "eval_seconds": time.perf_counter() - t})
    for target in targets:
        for name in methods:
            method = VARIANTS.get(name, (name, {}))[0]
            cures_by_default = get_method(method).cures_by_default
            modes = [True] if cures_by_default else ([False, True] if cure else [False])
            for do_cure in modes:
                cfg = variant_config(name, base, target, do_cure)
                log.info("bench: %s at %.2f%s", name, target, " + cure" if do_cure else "")
                t = time.perf_counter()
                run = run_method(session, cfg)
                seconds = time.perf_counter() - t
                t = time.perf_counter()
                ev = _evaluate(run.student, tok, bos, eval_ids, eval_seq_len, eval_max_tokens, tasks, task_limit,
                               cloze_set)
                rows.append({
                    "method": name, "target": target, "cure": do_cure,
                    "unique_params": run.summary["unique_params"], "params_ratio": run.summary["params_ratio"],
                    "flops_ratio": flops_per_token(run.student, session.adapter, eval_seq_len)
                    / flops_per_token(session.dense, session.adapter, eval_seq_len),
                    "removed": run.plan.removed, "groups": run.plan.groups, "seconds": seconds, **ev,
                    "eval_seconds": time.perf_counter() - t,
                })
                log.info("bench: %s", {k: rows[-1][k] for k in ("method", "target", "cure", "perplexity")})
                del run
    with atomic_dir(out, overwrite) as tmp:
        write_json_atomic(tmp / "results.json", rows)
        (tmp / "results.md").write_text(results_markdown(rows, model))
        _plots(rows, tmp)
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
            + [f"{r['seconds']:.0f}"]
        )
    return f"# foldgpt bench: {model}\n\n" + markdown_table(headers, body) + "\n"


def _plots(rows: list[dict], folder: Path) -> None:
    name = next(iter(rows[0]["perplexity"]))
    series: dict[str, list] = {}
    acc: dict[str, list] = {}
    for r in rows:
        label = r["method"] + (" + cure" if r["cure"] and not r["method"].startswith("foldgpt") else "")
        series.setdefault(label, []).append((r["unique_params"] / 1e6, r["perplexity"][name]))
        if r["tasks"]:
            acc.setdefault(label, []).append((r["unique_params"] / 1e6, sum(r["tasks"].values()) / len(r["tasks"])))
    plot_xy(series, folder / "perplexity_vs_params.png", "unique parameters (M)", f"perplexity ({name})", logy=True)
    if acc:
        plot_xy(acc, folder / "accuracy_vs_params.png", "unique parameters (M)", "mean task accuracy")
