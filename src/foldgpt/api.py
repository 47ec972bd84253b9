"""The Python API: one function per CLI verb (analyze, compress, evaluate, info, generate, load).

The pipeline under compress is in pipeline.py; what the verbs write for people to read is in report.py."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import get_adapter
from .config import CompressConfig, EvalConfig, with_settings
from .data import calibration_batches, load_text, needs_bos, tokenize
from .errors import FoldGPTError
from .evaluation.cloze import cloze_examples
from .evaluation.evaluate import evaluate_model
from .fileio import atomic_dir, holds_output, input_paths, write_json_atomic
from .methods import get_method
from .models import load_model
from .pipeline import prepare, run_method, write_outputs
from .plan import Plan
from .preflight import check_output, preflight_compress, preflight_eval, preflight_generate
from .resume import Resume
from .scale import placement
from .stages.analysis import analysis_dict, similarity
from .stages.cure import dist_info
from .stages.structure import unique_params

log = logging.getLogger(__name__)


# ---- analyze ------------------------------------------------------------------------------------------
def analyze(models: list[str] | str, text: list[str] | str | None = None, out: str | Path = "analysis",
            seq_len: int = 256, n_seqs: int = 32, seed: int = 0, overwrite: bool = True) -> dict:
    """Per-block similarity, BI, full similarity matrix and angular distances for one or more models.

    Writes analysis.json, one heatmap per model and similarity.png (one line per model)."""
    from .report import write_analysis_figures

    models = [models] if isinstance(models, str) else list(models)
    check_output(out, overwrite, inputs=[*models, *input_paths(text)])
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
        write_analysis_figures(results, tmp)
        write_json_atomic(tmp / "analysis.json", {"text": corpus.sources, "text_sha256": corpus.sha256,
                                                  "seq_len": seq_len, "n_seqs": n_seqs, "models": results})
    log.info("analysis written to %s", out)
    return results


# ---- compress -----------------------------------------------------------------------------------------
@dataclass
class CompressResult:
    out: Path
    plan: Plan
    summary: dict
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)

    @property
    def table(self) -> str:
        """The summary as the table `foldgpt compress` prints."""
        from .report import summary_table

        return summary_table(self.summary)


@holds_output(inputs=("model", "text", "plan", "convert_cache"))  # checked and locked before any work
def compress(model: str, text: list[str] | str | None, out: str | Path, config: CompressConfig | None = None,
             plan: str | Path | Plan | None = None, overwrite: bool = False,
             convert_cache: str | Path | None = None, fresh: bool = False) -> CompressResult:
    """Compress `model` (alias, folder, .gguf, hub id) into the folder `out`. Mirrors `foldgpt compress`.
    Finished stages are saved beside `out` (resume.py) and a rerun continues from them; `fresh`: start over."""
    cfg = config or CompressConfig()
    get_method(cfg.method)
    given_plan = preflight_compress(model, text, out, cfg, plan, overwrite)  # every check before any work
    state = Resume(out, given_plan, fresh) if dist_info()[1] == 1 else None  # under torchrun: no saved state
    with state.kept() if state is not None else nullcontext():
        session = prepare(model, text, cfg, convert_cache, resume=state)
        run = run_method(session, cfg, given_plan, resume=state)
    summary = run.summary
    rank, world = dist_info()
    if world > 1:
        summary["distributed"] = {"world": world, **({"fsdp": run.cure_info["fsdp"]} if "fsdp" in run.cure_info
                                                     else {})}
    if rank != 0:  # under torchrun every process computes the same model; the first one writes it
        return CompressResult(Path(out), run.plan, summary, run.student, session.tokenizer)
    t = time.perf_counter()
    log.info("(6/6): Saving")
    with state.kept() if state is not None else nullcontext(), atomic_dir(out, overwrite) as tmp:
        summary["seconds"]["Saving"] = 0.0
        write_outputs(tmp, run, session.tokenizer, session.analysis, model)
        if cfg.target_size is not None or cfg.quantize != "none":  # bytes on disk and in memory (size.py)
            from .size import parse_size, size_summary

            summary["size"] = size_summary(tmp, run.student, cfg.target_size and parse_size(cfg.target_size))
        summary["seconds"]["Saving"] = round(time.perf_counter() - t, 2)
        write_json_atomic(tmp / "summary.json", summary)
    if state is not None:
        state.discard()
    return CompressResult(Path(out), run.plan, summary, run.student, session.tokenizer)


# ---- evaluate -----------------------------------------------------------------------------------------
def evaluate(models: list[str] | str, text: list[str] | str | None, config: EvalConfig | None = None,
             json_out: str | Path | None = None, device: str = "cpu", device_map: str | None = None,
             max_memory: str | None = None, **settings) -> list[dict]:
    """Perplexity (and bits per byte) of one or more models on the same text, plus zero-shot tasks:
    multiple choice (BIG-bench task.json / JSONL), a cloze task built from the text, lm-eval tasks; what to measure is
    `config` with `settings` (EvalConfig fields, e.g. seq_len=512) over it. Mirrors `foldgpt eval`."""
    cfg = with_settings(config or EvalConfig(), settings)
    models = [models] if isinstance(models, str) else list(models)
    if not text and not cfg.tasks and not cfg.lm_eval:
        raise FoldGPTError("give evaluation text with --text (a .txt/.jsonl file, a directory or a dataset name) "
                           "or --tasks")
    preflight_eval(models, cfg, json_out, device)  # every model and the output, before the first one loads
    corpus = load_text(text, split="test") if text else None
    if cfg.cloze and corpus is None:
        raise FoldGPTError("--cloze builds its examples from --text; give --text")
    cloze = cloze_examples(corpus.text, n=cfg.cloze) if cfg.cloze else None
    rows = []
    for name in models:
        model, tok = load_model(name)
        if tok is None:
            raise FoldGPTError(f"{name} has no tokenizer; copy the base model's tokenizer files into it")
        adapter = get_adapter(model.config)
        if device_map:
            placement.apply(model, adapter, placement.plan(model, adapter, device_map, device, max_memory))
        else:
            model.to(device)
        bos = needs_bos(tok, adapter.needs_bos)
        texts = {name: tokenize(tok, corpus.text)} if corpus is not None else {}
        ev = evaluate_model(model, tok, bos, texts, cfg, cloze)
        row: dict = {"model": name, "unique_params": unique_params(model)}
        if corpus is not None:
            row.update(ev.perplexity[name].to_dict(), text=corpus.sources)
        if cfg.tasks:
            row["tasks"] = ev.tasks
        if ev.cloze is not None:
            row["cloze"] = ev.cloze
        if ev.lm_eval is not None:
            row["lm_eval"] = ev.lm_eval
        rows.append(row)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, rows)
    return rows


def info(path: str | Path) -> dict:
    """What a compressed folder holds: base model, removed units, groups, sizes. Mirrors `foldgpt info`."""
    from .checks import check_folded, optional_json

    path = Path(path)
    config = check_folded(path)  # the layout against the schema, the weights present and readable
    summary = optional_json(path / "summary.json")
    plan = config.get("fold_plan", {})
    layout = config["fold_layout"]
    prov = optional_json(path / "plan.json").get("provenance", {})
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
        "quantization": (config.get("quantization") or {}).get("level"),  # weight-only (quant.py), None: float
        "base_params": summary.get("base_params"),
        "unique_params": summary.get("unique_params"),
        "flops_ratio": summary.get("flops_ratio"),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "weights_bytes": (path / "model.safetensors").stat().st_size if (path / "model.safetensors").exists() else None,
    }


def generate(path: str | Path, prompt: str, max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 0.7, chat: bool = True, seed: int = 0) -> str:
    """Generate a continuation (with the chat template when the tokenizer has one). Mirrors `foldgpt generate`."""
    preflight_generate(max_new_tokens, sample, temperature)
    model, tok = load_model(str(path))
    if tok is None:
        raise FoldGPTError(f"{path} has no tokenizer; copy the base model's tokenizer files into it")
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


def export(path: str | Path, out: str | Path, fmt: str = "dense", overwrite: bool = False, int8: bool = False,
           gguf_dtype: str = "f16", seq_len: int | None = None) -> Path:
    """Export the folded model in `path`: "dense" (a base-architecture folder), "onnx" (one file, each shared
    matrix stored once; `int8`: onnxruntime's dynamic int8 on top), "gguf" (dense, for llama.cpp) or "executorch"
    (a .pte for ExecuTorch's XNNPACK delegate, each shared matrix stored once, `seq_len` tokens; `int8`: torchao's
    8da8w). Mirrors `foldgpt export`."""
    from .quant import refuse_quantized

    refuse_quantized(path, fmt)
    if fmt == "dense":
        from .checkpoint.export import export_dense

        return export_dense(path, out, overwrite)
    if fmt == "onnx":
        from .runtimes.onnx import export_onnx

        return export_onnx(path, out, overwrite, int8=int8)
    if fmt == "gguf":
        from .runtimes.gguf_export import export_gguf

        return export_gguf(path, out, overwrite, dtype=gguf_dtype)
    if fmt == "executorch":
        from .runtimes.executorch_export import DEFAULT_SEQ_LEN, export_executorch

        return export_executorch(path, out, overwrite, int8=int8, seq_len=seq_len or DEFAULT_SEQ_LEN)
    raise FoldGPTError(f"unknown export format '{fmt}' (dense, onnx, gguf or executorch)")


def load(path: str | Path):
    """Load a compressed folder (or any supported model) as (model, tokenizer)."""
    return load_model(str(path))


__all__ = ["CompressResult", "analyze", "compress", "evaluate", "export", "generate", "info", "load"]
