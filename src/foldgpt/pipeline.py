"""The compression pipeline under `compress` and `bench`: load and analyze once (Session), then for each method
plan, build, compensate, cure and measure (run_method), and write the run folder (write_outputs)."""

from __future__ import annotations

import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .adapters import get_adapter
from .config import CompressConfig
from .data import DEFAULT_TEXT, builtin_text, calibration_batches, load_text, mixed_calibration, needs_bos, tokenize
from .errors import FoldGPTError
from .fileio import write_json_atomic
from .methods import Context, MethodInfo, get_method
from .methods.greedy import SearchCache
from .models import load_model
from .plan import Plan
from .preflight import check_context
from .resume import Resume
from .scale import placement
from .stages.analysis import analysis_dict, similarity
from .stages.budget import plan_budget
from .stages.compensate import CALIB_WINDOWS as COMPENSATION_WINDOWS
from .stages.compensate import apply_compensation_, check_compensable
from .stages.cure import cure as run_cure
from .stages.structure import apply_plan_, flops_per_token, unique_params
from .stages.weights import clone_sharing_weights

log = logging.getLogger(__name__)

# methods whose scores need no gradients and no whole-model forward on the device
STREAMING_METHODS = ("shortgpt", "angular", "sleb", "blockpruner", "random")


class Timer:
    """Wall seconds of each named stage, logged as "(index/total): name" when it starts."""

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


def versions() -> dict:
    """The versions of foldgpt and what it runs on, for a plan's provenance."""
    import transformers

    return {"foldgpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


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
    general: torch.Tensor | None = None  # windows of built-in general text the search scores (--search-general)
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
            convert_cache: str | Path | None = None, resume: Resume | None = None) -> Session:
    """Load the model and the calibration text, draw the calibration windows and run the analysis (`resume`: the
    saved stages of a stopped run, resume.py: the analysis is read from there when saved, and saved)."""
    corpus = load_text(text)
    timer = Timer()
    with timer.stage("Loading", 1, 6):
        dense, tok = load_model(model, convert_cache)
        adapter = get_adapter(dense.config)
        check_context(cfg.seq_len, dense.config.to_dict())  # hub ids and GGUF files: known only now
        if cfg.target_size is not None:  # a budget below what the model can reach: before any work on it
            from .size import choose, parse_size

            choose(dense, adapter, parse_size(cfg.target_size))
        if cfg.device_map:  # layers spread over devices or offloaded to the CPU, moved in as they run
            placement.apply(dense, adapter, placement.plan(dense, adapter, cfg.device_map, cfg.device,
                                                           cfg.max_memory))
        elif not cfg.streaming:  # streaming keeps the model on the CPU and moves one block at a time
            dense.to(cfg.device)
        bos = needs_bos(tok, adapter.needs_bos)
        ids = tokenize(tok, corpus.text)
        wants_general = cfg.general_share > 0 or cfg.ranking.search_general > 0
        general = tokenize(tok, builtin_text()) if wants_general and corpus.sources != [DEFAULT_TEXT] else None
        calib = mixed_calibration(ids, general if cfg.general_share > 0 else None, cfg.calib_seqs, cfg.seq_len,
                                  cfg.seed, cfg.general_share, tok.bos_token_id if bos else None)
        general_windows = (calibration_batches(general, cfg.ranking.search_general, cfg.seq_len, cfg.seed + 2,
                                               tok.bos_token_id if bos else None)
                           if general is not None and cfg.ranking.search_general > 0 else None)
        log.info("calibration: %d tokens of text, %d windows of %d%s", ids.numel(), len(calib), cfg.seq_len,
                 f" ({cfg.general_share:.0%} from built-in general text)"
                 if cfg.general_share > 0 and general is not None else "")
        if resume is not None:
            resume.bind(dense, calib, corpus.sha256, cfg)
    with timer.stage("Analyzing", 2, 6):
        sim = resume.similarity() if resume is not None else None
        if sim is not None:
            log.info("analysis: the saved one (%s)", resume.dir)
        elif cfg.streaming:
            from .scale.streaming import streamed_similarity

            sim = streamed_similarity(dense, adapter, calib[: min(32, len(calib))], bos, cfg.device)
        else:
            sim = similarity(dense, adapter, calib[: min(32, len(calib))], skip_first=bos)
        if resume is not None:
            resume.save_similarity(sim)
    return Session(model, dense, tok, adapter, bos, calib, sim, analysis_dict(sim), corpus, timer.seconds,
                   general=general_windows)


@dataclass
class MethodRun:
    """One method's result: its plan, the compressed model, the summary (summary.json), what the method recorded
    and what the cure reported (steps, trainable parameters, history)."""

    plan: Plan
    student: torch.nn.Module
    summary: dict
    info: MethodInfo
    cure_info: dict


def run_method(s: Session, cfg: CompressConfig, plan: Plan | None = None,
               searches: SearchCache | None = None, resume: Resume | None = None) -> MethodRun:
    """Plan (or re-apply `plan`), build the compressed model, cure it if asked, and measure it. `searches`: greedy
    searches to reuse and continue (bench passes one for all its rows); None: every search runs afresh. `resume`:
    the saved stages of a stopped run (resume.py): search steps, the plan and cure checkpoints are read from there
    when saved, and saved as they finish."""
    method = get_method(cfg.method)
    if cfg.streaming and (cfg.method not in STREAMING_METHODS or cfg.cure.enabled):
        raise FoldGPTError(f"--streaming runs {', '.join(STREAMING_METHODS)} without a cure (one block on the "
                           f"device at a time); '{cfg.method}'{' with a cure' if cfg.cure.enabled else ''} trains "
                           "through the whole model: drop --streaming and use --micro-batch / --grad-checkpointing")
    size_choice = None
    if cfg.target_size is not None:  # a byte budget: the parameter target and the quantization level (size.py)
        from .size import resolve

        cfg, size_choice, whole = resolve(s.dense, s.adapter, cfg)
        plan = whole if whole is not None else plan
    timer = Timer()
    timer.seconds.update(s.seconds)
    torch.manual_seed(cfg.seed)
    num_layers = len(s.adapter.layers(s.dense))
    budget = plan_budget(s.dense, s.adapter, num_layers, cfg.target_params, cfg.remove_rate, cfg.remove_share,
                         cfg.fold.group_size if method.folds else 1, cfg.fold.adapter_rank,
                         cfg.fold.shared_linears or None, cfg.fold.child_gates)
    if plan is None and cfg.method == "foldgpt" and cfg.ranking.kind == "search" and budget.target_params is not None:
        log.info("budget: %s unique params of %s (the search chooses deletions and children)",
                 f"{int(budget.target_params):,}", f"{int(budget.base_params):,}")
    else:
        log.info("budget: remove %d layers, fold %d children (predicted %s unique params of %s)",
                 budget.n_remove, budget.n_fold, f"{int(budget.predicted_params):,}", f"{int(budget.base_params):,}")
    if cfg.compensate != "none":  # an architecture it cannot merge into: fail before planning, not after
        check_compensable(s.adapter, s.dense.config.model_type, cfg.compensate)
    if resume is not None and searches is None:
        searches = resume.searches()
    ctx = Context(s.dense, s.adapter, s.calib, cfg, budget, s.bos, s.similarity, searches=searches, resume=resume,
                  general=s.general)
    with timer.stage("Planning" if plan is None else "Applying plan", 3, 6):
        if plan is not None:
            if plan.num_layers != num_layers or plan.model_type != s.dense.config.model_type:
                raise FoldGPTError("the plan was made for a different model (layer count or type differ)")
            the_plan = Plan.from_dict(plan.to_dict())
        else:
            the_plan = resume.planned(ctx, method.run) if resume is not None else method.run(ctx)
        the_plan.provenance = {
            "model": s.source, "text": s.corpus.sources, "text_sha256": s.corpus.sha256, "seed": cfg.seed,
            "config": cfg.to_dict(), "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"unit_choice": ctx.info.unit_choice} if ctx.info.unit_choice is not None else {}),  # --unit auto
            **({"target_size": size_choice.to_dict()} if size_choice is not None else {}),  # size.choose
        }
        student = clone_sharing_weights(s.dense)
        apply_plan_(student, the_plan, s.adapter, seed=cfg.seed,
                    fits=ctx.child_fits() if the_plan.adapter_init == "fit" and the_plan.groups else None)
        ctx.fits = None  # every layer's fits (about as large as the model): the children hold what they need
        traffic = placement.follow(student, s.adapter, s.dense)  # each layer where the weights it borrows live
        if the_plan.compensation:  # after follow: a placed student runs where its weights live
            ctx.info.compensation = apply_compensation_(student, s.dense, the_plan, s.adapter,
                                                        s.calib[:COMPENSATION_WINDOWS], skip_first=s.bos)
    held = s.held()
    do_cure = method.cures_by_default if cfg.cure.enabled is None else cfg.cure.enabled
    with timer.stage("Curing", 4, 6):
        loss_before_cure = calibration_loss(student, held)
        cure_seed = cfg.seed if cfg.cure.seed is None else cfg.cure.seed
        cure_info = (run_cure(student, s.dense, s.adapter, s.calib, cfg.cure, seed=cure_seed,
                              checkpoints=resume.cure_checkpoints() if resume is not None else None) if do_cure
                     else {"steps": 0, "trainable_params": 0, "history": []})
    with timer.stage("Measuring", 5, 6):
        quantized = None
        if cfg.quantize != "none":  # weight-only, after the cure (quant.py); measured below as quantized
            from .size import quantize_result

            quantized = quantize_result(s, student, held, cfg.quantize, size_choice)
        summary = summary_dict(s, student, the_plan, loss_before_cure, cure_info, cfg, budget, do_cure)
    if quantized is not None:
        summary["quantization"] = quantized
    if size_choice is not None:
        summary["target_size"] = size_choice.to_dict()
    summary["seconds"] = timer.seconds
    summary["source"] = s.source
    if traffic is not None:
        where = placement.placement_of(student)
        summary["placement"] = {"main": where.main, "layers": where.homes, "offload_copied_bytes": traffic.copied,
                                "offload_peak_bytes": traffic.peak_alive}
    return MethodRun(the_plan, student, summary, ctx.info, cure_info)


def summary_dict(s: Session, student, plan: Plan, loss_before_cure: float, cure_info: dict, cfg: CompressConfig,
                 budget, cured: bool) -> dict:
    """summary.json's measurements of a compressed model against the session's dense one."""
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
        "config": cfg.to_dict(),  # every setting, with the layout's CONFIG_VERSION
    }


def _child_gates(student, adapter, plan: Plan) -> dict[str, dict]:
    """Each child's branch gate (by original layer): the measured start and the value after the cure."""
    layers, kept = adapter.layers(student), plan.kept_layers()
    return {c: {"start": g0, "end": round(layers[kept.index(int(c))].child_gate.detach().item(), 4)}
            for c, g0 in plan.child_gates.items()}


def write_outputs(folder: Path, run: MethodRun, tokenizer, analysis: dict, source: str) -> None:
    """Write a compressed model's folder: the checkpoint, plan.json, analysis.json, summary.json, and (report.py)
    the figures, report.md and the model card README.md. `run.summary` gains the list of files."""
    from .checkpoint.folded import base_config_dict, save_folded
    from .report import write_figures, write_report

    plan, summary = run.plan, run.summary
    save_folded(run.student, tokenizer, plan, folder, base_config_dict(run.student, plan.num_layers,
                                                                         plan.layer_kinds))
    plan.save(folder / "plan.json")
    write_json_atomic(folder / "analysis.json", analysis)
    figs = write_figures(folder, plan, analysis, run.info.gate_history, run.cure_info, source)
    summary["files"] = sorted({p.name for p in folder.iterdir()} | {"report.md", "README.md", "summary.json"})
    write_json_atomic(folder / "summary.json", summary)
    write_report(folder, summary, plan, figs, source)
