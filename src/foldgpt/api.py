"""The Python API: one function per CLI verb (analyze, compress, evaluate, load)."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, placement
from .adapters import get_adapter
from .analysis import analysis_dict, similarity
from .budget import plan_budget
from .compensate import CALIB_WINDOWS as COMPENSATION_WINDOWS
from .compensate import apply_compensation_, check_compensable
from .config import CompressConfig
from .cure import cure as run_cure
from .cure import dist_info
from .data import calibration_batches, load_text, needs_bos, tokenize
from .errors import FoldGPTError
from .evaluate import perplexity
from .methods import Context, get_method
from .models import load_model
from .plan import Plan, write_json_atomic
from .report import (
    fmt_int,
    markdown_table,
    plot_curves,
    plot_gates,
    plot_heatmap,
    plot_similarity_lines,
    ppl,
    text_table,
)
from .structure import apply_plan_, flops_per_token, unique_params
from .weights import clone_sharing_weights

log = logging.getLogger(__name__)


# ---- helpers ----------------------------------------------------------------------------------------
@contextmanager
def atomic_dir(out: str | Path, overwrite: bool):
    """Yield a temporary folder next to `out`; move it into place only if the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FoldGPTError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, index: int, total: int):
        log.info("(%d/%d): %s", index, total, name)
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 2)


@torch.no_grad()
def calibration_loss(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) on calibration windows."""
    total, n = 0.0, 0
    for i in range(0, len(ids), batch_size):
        b = ids[i : i + batch_size].to(model.device)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    return total / n


def _versions() -> dict:
    import transformers

    return {"foldgpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ---- analyze ------------------------------------------------------------------------------------------
def analyze(models: list[str] | str, text: list[str] | str | None = None, out: str | Path = "analysis",
            seq_len: int = 256, n_seqs: int = 32, seed: int = 0, overwrite: bool = True) -> dict:
    """Per-block similarity, BI, full similarity matrix and angular distances for one or more models.

    Writes analysis.json, one heatmap per model and similarity.png (one line per model)."""
    models = [models] if isinstance(models, str) else list(models)
    corpus = load_text(text)
    results = {}
    with atomic_dir(out, overwrite) as tmp:
        for name in models:
            model, tok = load_model(name)
            adapter = get_adapter(model.config)
            bos = needs_bos(tok, adapter.needs_bos)
            calib = calibration_batches(tokenize(tok, corpus.text), n_seqs, seq_len, seed,
                                        tok.bos_token_id if bos else None)
            sim = similarity(model, adapter, calib, skip_first=bos)
            results[name] = analysis_dict(sim)
            stem = _slug(name)
            plot_heatmap(results[name]["similarity_matrix"], tmp / f"heatmap_{stem}.png", f"{name}: mean cosine")
        plot_similarity_lines({n: r["cosine"] for n, r in results.items()}, tmp / "similarity.png")
        write_json_atomic(tmp / "analysis.json", {"text": corpus.sources, "text_sha256": corpus.sha256,
                                                  "seq_len": seq_len, "n_seqs": n_seqs, "models": results})
    log.info("analysis written to %s", out)
    return results


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)


# ---- compress -----------------------------------------------------------------------------------------
@dataclass
class CompressResult:
    out: Path
    plan: Plan
    summary: dict
    table: str
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)


@dataclass
class Session:
    """A loaded dense model with its calibration tokens and analysis, reusable across methods."""

    source: str
    dense: torch.nn.Module
    tokenizer: object
    adapter: object
    bos: bool
    calib: torch.Tensor
    similarity: torch.Tensor
    analysis: dict
    corpus: object
    seconds: dict = field(default_factory=dict)
    _dense_loss: float | None = None

    def held(self) -> torch.Tensor:
        """The calibration windows every method's calibration loss is measured on."""
        return self.calib[: min(16, len(self.calib))]

    def dense_loss(self) -> float:
        """The dense model's calibration loss, computed once per session (bench reuses it for every row)."""
        if self._dense_loss is None:
            self._dense_loss = calibration_loss(self.dense, self.held())
        return self._dense_loss


def prepare(model: str, text: list[str] | str | None, cfg: CompressConfig,
            convert_cache: str | Path | None = None) -> Session:
    """Load the model and the calibration text, draw the calibration windows and run the analysis."""
    corpus = load_text(text)
    timer = Timer()
    with timer.stage("Loading", 1, 6):
        dense, tok = load_model(model, convert_cache)
        adapter = get_adapter(dense.config)
        if cfg.device_map:  # layers spread over devices or offloaded to the CPU, moved in as they run
            placement.apply(dense, adapter, placement.plan(dense, adapter, cfg.device_map, cfg.device,
                                                           cfg.max_memory))
        elif not cfg.streaming:  # streaming keeps the model on the CPU and moves one block at a time
            dense.to(cfg.device)
        bos = needs_bos(tok, adapter.needs_bos)
        ids = tokenize(tok, corpus.text)
        calib = calibration_batches(ids, cfg.calib_seqs, cfg.seq_len, cfg.seed, tok.bos_token_id if bos else None)
        log.info("calibration: %d tokens of text, %d windows of %d", ids.numel(), len(calib), cfg.seq_len)
    with timer.stage("Analyzing", 2, 6):
        if cfg.streaming:
            from .streaming import streamed_similarity

            sim = streamed_similarity(dense, adapter, calib[: min(32, len(calib))], bos, cfg.device)
        else:
            sim = similarity(dense, adapter, calib[: min(32, len(calib))], skip_first=bos)
    return Session(model, dense, tok, adapter, bos, calib, sim, analysis_dict(sim), corpus, timer.seconds)


# methods whose scores need no gradients and no whole-model forward on the device
STREAMING_METHODS = ("shortgpt", "angular", "sleb", "blockpruner", "random")


@dataclass
class MethodRun:
    plan: Plan
    student: torch.nn.Module
    summary: dict
    info: dict
    cure_info: dict


def run_method(s: Session, cfg: CompressConfig, plan: Plan | None = None) -> MethodRun:
    """Plan (or re-apply `plan`), build the compressed model, cure it if asked, and measure it."""
    method = get_method(cfg.method)
    if cfg.streaming and (cfg.method not in STREAMING_METHODS or cfg.cure):
        raise FoldGPTError(f"--streaming runs {', '.join(STREAMING_METHODS)} without a cure (one block on the "
                           f"device at a time); '{cfg.method}'{' with a cure' if cfg.cure else ''} trains through "
                           "the whole model: drop --streaming and use --micro-batch / --grad-checkpointing")
    timer = Timer()
    timer.seconds.update(s.seconds)
    torch.manual_seed(cfg.seed)
    num_layers = len(s.adapter.layers(s.dense))
    budget = plan_budget(s.dense, s.adapter, num_layers, cfg.target_params, cfg.remove_rate, cfg.remove_share,
                         cfg.fold.group_size if method.folds else 1, cfg.fold.adapter_rank,
                         cfg.fold.shared_linears or None, cfg.fold.child_gates)
    if plan is None and cfg.method == "foldgpt" and cfg.ranking == "search" and budget.target_params is not None:
        log.info("budget: %s unique params of %s (the search chooses deletions and children)",
                 fmt_int(budget.target_params), fmt_int(budget.base_params))
    else:
        log.info("budget: remove %d layers, fold %d children (predicted %s unique params of %s)",
                 budget.n_remove, budget.n_fold, fmt_int(budget.predicted_params), fmt_int(budget.base_params))
    if cfg.compensate != "none":  # an architecture it cannot merge into: fail before planning, not after
        check_compensable(s.adapter, s.dense.config.model_type, cfg.compensate)
    ctx = Context(s.dense, s.adapter, s.calib, cfg, budget, s.bos, s.similarity)
    with timer.stage("Planning" if plan is None else "Applying plan", 3, 6):
        if plan is not None:
            if plan.num_layers != num_layers or plan.model_type != s.dense.config.model_type:
                raise FoldGPTError("the plan was made for a different model (layer count or type differ)")
            the_plan = Plan.from_dict(plan.to_dict())
        else:
            the_plan = method.run(ctx)
        the_plan.provenance = {
            "model": s.source, "text": s.corpus.sources, "text_sha256": s.corpus.sha256, "seed": cfg.seed,
            "config": cfg.to_dict(), "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"unit_choice": ctx.info["unit_choice"]} if "unit_choice" in ctx.info else {}),  # --unit auto
        }
        student = clone_sharing_weights(s.dense)
        apply_plan_(student, the_plan, s.adapter, seed=cfg.seed,
                    fits=ctx.child_fits() if the_plan.adapter_init == "fit" and the_plan.groups else None)
        ctx.fits = None  # every layer's fits (about as large as the model): the children hold what they need
        traffic = placement.follow(student, s.adapter, s.dense)  # each layer where the weights it borrows live
        if the_plan.compensation:  # after follow: a placed student runs where its weights live
            ctx.info["compensation"] = apply_compensation_(student, s.dense, the_plan, s.adapter,
                                                           s.calib[:COMPENSATION_WINDOWS], skip_first=s.bos)
    held = s.held()
    do_cure = method.cures_by_default if cfg.cure is None else cfg.cure
    with timer.stage("Curing", 4, 6):
        loss_before_cure = calibration_loss(student, held)
        cure_seed = cfg.seed if cfg.cure_cfg.seed is None else cfg.cure_cfg.seed
        cure_info = (run_cure(student, s.dense, s.adapter, s.calib, cfg.cure_cfg, seed=cure_seed) if do_cure
                     else {"steps": 0, "trainable_params": 0, "history": []})
    with timer.stage("Measuring", 5, 6):
        summary = _summary(s, student, the_plan, loss_before_cure, cure_info, cfg, budget, do_cure)
    summary["seconds"] = timer.seconds
    summary["source"] = s.source
    if traffic is not None:
        where = placement.placement_of(student)
        summary["placement"] = {"main": where.main, "layers": where.homes, "offload_copied_bytes": traffic.copied,
                                "offload_peak_bytes": traffic.peak_alive}
    return MethodRun(the_plan, student, summary, ctx.info, cure_info)


def compress(model: str, text: list[str] | str | None, out: str | Path, config: CompressConfig | None = None,
             plan: str | Path | Plan | None = None, overwrite: bool = False,
             convert_cache: str | Path | None = None) -> CompressResult:
    """Compress `model` (alias, folder, .gguf, hub id) into the folder `out`. Mirrors `foldgpt compress`."""
    cfg = config or CompressConfig()
    get_method(cfg.method)
    if Path(out).exists() and not overwrite:
        raise FoldGPTError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    given_plan = Plan.load(plan) if isinstance(plan, (str, Path)) else plan
    session = prepare(model, text, cfg, convert_cache)
    run = run_method(session, cfg, given_plan)
    summary = run.summary
    rank, world = dist_info()
    if world > 1:
        summary["distributed"] = {"world": world, **({"fsdp": run.cure_info["fsdp"]} if "fsdp" in run.cure_info
                                                     else {})}
    if rank != 0:  # under torchrun every process computes the same model; the first one writes it
        return CompressResult(Path(out), run.plan, summary, summary_table(summary), run.student, session.tokenizer)
    t = time.perf_counter()
    log.info("(6/6): Saving")
    with atomic_dir(out, overwrite) as tmp:
        summary["seconds"]["Saving"] = 0.0
        _write_outputs(tmp, run.student, session.tokenizer, run.plan, summary, session.analysis, run.info,
                       run.cure_info, model)
        summary["seconds"]["Saving"] = round(time.perf_counter() - t, 2)
        write_json_atomic(tmp / "summary.json", summary)
    return CompressResult(Path(out), run.plan, summary, summary_table(summary), run.student, session.tokenizer)


def _summary(s: Session, student, plan, loss_before_cure, cure_info, cfg, budget, cured) -> dict:
    dense, adapter = s.dense, s.adapter
    base, uniq = unique_params(dense), unique_params(student)
    f_base, f_new = flops_per_token(dense, adapter, cfg.seq_len), flops_per_token(student, adapter, cfg.seq_len)
    return {
        "method": plan.method,
        "base_params": base,
        "unique_params": uniq,
        "params_ratio": uniq / base,
        "target_params": cfg.target_params,
        "flops_per_token_base": f_base,
        "flops_per_token": f_new,
        "flops_ratio": f_new / f_base,
        "depth_base": len(adapter.layers(dense)),
        "depth": len(adapter.layers(student)),
        "removed": plan.removed,
        "groups": plan.groups,
        "child_gates": _child_gates(student, adapter, plan),
        "calib_loss_dense": s.dense_loss(),
        "calib_loss_before_cure": loss_before_cure,
        "calib_loss": calibration_loss(student, s.held()),
        "cured": cured,
        "cure_steps": cure_info.get("steps", 0),
        "trainable_params": cure_info.get("trainable_params", 0),
        "budget": {"n_remove": budget.n_remove, "n_fold": budget.n_fold},
    }


def _child_gates(student, adapter, plan: Plan) -> dict[str, dict]:
    """Each child's branch gate (by original layer): the measured start and the value after the cure."""
    layers, kept = adapter.layers(student), plan.kept_layers()
    return {c: {"start": g0, "end": round(layers[kept.index(int(c))].child_gate.detach().item(), 4)}
            for c, g0 in plan.child_gates.items()}


def summary_table(s: dict) -> str:
    rows = [
        ["unique params", fmt_int(s["base_params"]), fmt_int(s["unique_params"]), f"{s['params_ratio']:.1%}"],
        ["FLOPs / token", fmt_int(s["flops_per_token_base"]), fmt_int(s["flops_per_token"]), f"{s['flops_ratio']:.1%}"],
        ["depth (positions)", s["depth_base"], s["depth"], ""],
        ["calibration loss (nats)", f"{s['calib_loss_dense']:.4f}", f"{s['calib_loss']:.4f}",
         f"before cure {s['calib_loss_before_cure']:.4f}"],
    ]
    out = text_table(["", "before", "after", "ratio / note"], rows)
    out += "\n\n" + text_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in s["seconds"].items()])
    return out


def _write_outputs(tmp: Path, student, tok, plan: Plan, summary: dict, analysis: dict, info: dict, cure_info: dict,
                   source: str) -> None:
    from .folded import base_config_dict, save_folded

    base_cfg = base_config_dict(student, plan.num_layers, plan.layer_kinds)
    save_folded(student, tok, plan, tmp, base_cfg)
    plan.save(tmp / "plan.json")
    write_json_atomic(tmp / "analysis.json", analysis)
    plot_heatmap(analysis["similarity_matrix"], tmp / "similarity_heatmap.png", f"{source}: mean cosine")
    plot_similarity_lines({source: analysis["cosine"]}, tmp / "similarity.png")
    figs = ["similarity.png", "similarity_heatmap.png"]
    if plan.gates:
        plot_gates(list(plan.gates), list(plan.gates.values()), plan.removed, tmp / "gates.png")
        figs.append("gates.png")
        hist = info.get("gate_history", [])
        plot_curves({"KL to dense": [h["kl"] for h in hist]}, tmp / "gate_training.png", "KL", "gate training")
        figs.append("gate_training.png")
    if cure_info.get("history"):
        h = cure_info["history"]
        plot_curves({"KL": [x["kl"] for x in h], "tail MSE": [x["tail"] for x in h]}, tmp / "cure.png",
                    "loss", "cure")
        figs.append("cure.png")
    summary["files"] = sorted({p.name for p in tmp.iterdir()} | {"report.md", "README.md", "summary.json"})
    write_json_atomic(tmp / "summary.json", summary)
    (tmp / "report.md").write_text(_report_md(summary, plan, figs, source))
    (tmp / "README.md").write_text(_model_card(summary, plan, source, tmp))


def _report_md(s: dict, plan: Plan, figs: list[str], source: str) -> str:
    lm = plan.layer_map()
    rows = [[m["position"], m["source"], m["weights_from"], "yes" if m["shared"] else "", m["kind"],
             ",".join(m["removed_sublayers"])] for m in lm]
    parts = [
        f"# foldgpt report: {source}",
        f"Method **{s['method']}**: {fmt_int(s['base_params'])} -> {fmt_int(s['unique_params'])} unique parameters "
        f"({s['params_ratio']:.1%}), FLOPs per token {s['flops_ratio']:.1%} of dense, depth {s['depth_base']} -> "
        f"{s['depth']}.",
        f"Removed units: {', '.join(plan.removed) or 'none'}. Folded groups (parent first): "
        f"{', '.join(str(g) for g in plan.groups) or 'none'}.",
        "## Summary",
        "```\n" + summary_table(s) + "\n```",
        "## Layer map",
        markdown_table(["position", "original layer", "weights from", "shared", "kind", "removed sub-blocks"], rows),
        "## Figures",
        *[f"![{f}]({f})" for f in figs],
    ]
    return "\n\n".join(parts) + "\n"


def _model_card(s: dict, plan: Plan, source: str, folder: Path) -> str:
    weights = folder / "model.safetensors"
    size = weights.stat().st_size if weights.exists() else 0
    base_bytes = s["base_params"] * 4
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [foldgpt, compressed, depth-pruning, parameter-sharing]",
        "---",
        f"# {Path(str(source)).name} compressed with foldgpt ({s['method']})",
        "",
        f"- **Base model:** `{source}` ({s['depth_base']} layers, {fmt_int(s['base_params'])} parameters)",
        f"- **Method:** {s['method']}: removed {', '.join(plan.removed) or 'nothing'}; folded groups (parent first) "
        f"{', '.join(str(g) for g in plan.groups) or 'none'}; per-child low-rank rank {plan.adapter_rank}",
        f"- **Unique parameters:** {fmt_int(s['base_params'])} -> {fmt_int(s['unique_params'])} "
        f"({s['params_ratio']:.1%}); FLOPs per token {s['flops_ratio']:.1%} of the base",
        f"- **Bytes (fp32 weights):** {base_bytes / 2**20:.1f} MiB -> {size / 2**20:.1f} MiB on disk",
        f"- **Calibration loss (nats/token):** dense {s['calib_loss_dense']:.4f}, compressed {s['calib_loss']:.4f} "
        f"(before the cure {s['calib_loss_before_cure']:.4f}); cure: {s['cure_steps']} steps, "
        f"{fmt_int(s['trainable_params'])} trained parameters",
        "",
        "## Load",
        "```python",
        "import foldgpt  # registers the foldgpt model type with the Auto classes",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "# without foldgpt installed: AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "A plain checkpoint of the base architecture (for vLLM, TGI, llama.cpp converters): "
        "`foldgpt export PATH --dense OUT`.",
        "",
    ])


# ---- evaluate -----------------------------------------------------------------------------------------
def evaluate(models: list[str] | str, text: list[str] | str | None, seq_len: int = 512,
             max_tokens: int | None = None, json_out: str | Path | None = None, batch_size: int = 4,
             tasks: list[str] | None = None, task_limit: int | None = None, cloze: int = 0,
             lm_eval: list[str] | None = None, device: str = "cpu", device_map: str | None = None,
             max_memory: str | None = None) -> list[dict]:
    """Perplexity (and bits per byte) of one or more models on the same text, plus zero-shot tasks:
    multiple choice (BIG-bench task.json / JSONL), a cloze task built from the text, lm-eval tasks.
    Mirrors `foldgpt eval`."""
    models = [models] if isinstance(models, str) else list(models)
    if not text and not tasks and not lm_eval:
        raise FoldGPTError("give evaluation text with --text (a .txt/.jsonl file, a directory or a dataset name) "
                           "or --tasks")
    corpus = load_text(text, split="test") if text else None
    if cloze and corpus is None:
        raise FoldGPTError("--cloze builds its examples from --text; give --text")
    rows = []
    for name in models:
        model, tok = load_model(name)
        adapter = get_adapter(model.config)
        if device_map:
            placement.apply(model, adapter, placement.plan(model, adapter, device_map, device, max_memory))
        else:
            model.to(device)
        bos = needs_bos(tok, adapter.needs_bos)
        row: dict = {"model": name, "unique_params": unique_params(model)}
        if corpus is not None:
            res = perplexity(model, tok, tokenize(tok, corpus.text), seq_len, bos, max_tokens, batch_size)
            row.update(res.to_dict(), text=corpus.sources)
            log.info("%s: perplexity %.3f over %d tokens", name, res.perplexity, res.tokens)
        if tasks:
            from .tasks import evaluate_tasks

            row["tasks"] = evaluate_tasks(model, tok, tasks, bos=bos, limit=task_limit)
        if cloze:
            from .tasks import cloze_examples, evaluate_cloze

            row["cloze"] = evaluate_cloze(model, tok, cloze_examples(corpus.text, n=cloze), bos=bos)
        if lm_eval:
            from .tasks import run_lm_eval

            row["lm_eval"] = run_lm_eval(model, tok, lm_eval, limit=task_limit)
        rows.append(row)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, rows)
    return rows


def eval_table(rows: list[dict]) -> str:
    task_names = list(rows[0].get("tasks", {}))
    headers = ["model", "perplexity", "bits/byte", "tokens", "unique params"]
    headers += [f"{t} acc/acc_norm" for t in task_names]
    if "cloze" in rows[0]:
        headers.append("cloze acc")
    body = []
    for r in rows:
        line = [r["model"], ppl(r.get("perplexity")), f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-",
                r.get("tokens", "-"), fmt_int(r["unique_params"])]
        line += [f"{r['tasks'][t]['acc']:.3f}/{r['tasks'][t]['acc_norm']:.3f}" for t in task_names]
        if "cloze" in r:
            line.append(f"{r['cloze']['acc']:.3f}")
        body.append(line)
    return text_table(headers, body)


def info(path: str | Path) -> dict:
    """What a compressed folder holds: base model, removed units, groups, sizes. Mirrors `foldgpt info`."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise FoldGPTError(f"{path} is not a model folder (no readable config.json)") from None
    if config.get("model_type") != "foldgpt":
        raise FoldGPTError(f"{path} is not a foldgpt folder (model_type {config.get('model_type')})")
    summary = {}
    if (path / "summary.json").exists():
        summary = json.loads((path / "summary.json").read_text())
    plan = config.get("fold_plan", {})
    layout = config["fold_layout"]
    prov = json.loads((path / "plan.json").read_text()).get("provenance", {}) if (path / "plan.json").exists() else {}
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {
        "path": str(path),
        "base_model": prov.get("model"),
        "base_model_type": config.get("base_model_type"),
        "method": plan.get("method"),
        "layers_before": layout["num_layers"],
        "positions": len(layout["kept"]),
        "removed": plan.get("removed", []),
        "groups": plan.get("groups", []),
        "child_gates": summary.get("child_gates") or plan.get("child_gates") or None,
        "adapter_rank": layout.get("adapter_rank", 0),
        "base_params": summary.get("base_params"),
        "unique_params": summary.get("unique_params"),
        "flops_ratio": summary.get("flops_ratio"),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "weights_bytes": (path / "model.safetensors").stat().st_size if (path / "model.safetensors").exists() else None,
    }


def info_text(d: dict) -> str:
    rows = [[k, d[k] if not isinstance(d[k], int) or isinstance(d[k], bool) else fmt_int(d[k])]
            for k in d if d[k] is not None]
    return text_table(["field", "value"], rows)


def generate(path: str | Path, prompt: str, max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 0.7, chat: bool = True, seed: int = 0) -> str:
    """Generate a continuation (with the chat template when the tokenizer has one). Mirrors `foldgpt generate`."""
    model, tok = load_model(str(path))
    if tok is None:
        raise FoldGPTError(f"{path} has no tokenizer")
    torch.manual_seed(seed)
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        adapter = get_adapter(model.config)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if needs_bos(tok, adapter.needs_bos) and (ids.numel() == 0 or ids[0, 0] != tok.bos_token_id):
            ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    kw = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load(path: str | Path):
    """Load a compressed folder (or any supported model) as (model, tokenizer)."""
    return load_model(str(path))


__all__ = ["CompressResult", "analyze", "compress", "evaluate", "generate", "info", "load"]
