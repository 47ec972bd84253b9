"""What each command checks before any work starts: the output location, the model argument, the plan, the settings
against the model, the device. A bad input is one FoldGPTError line at once, not a failure at "(6/6): Saving"."""

from __future__ import annotations

import math
from pathlib import Path

from .checks import check_source, optional_json, text_config
from .errors import FoldGPTError
from .fileio import check_output as _check_output


def check_output(out: str | Path, overwrite: bool, option: str = "--out", kind: str = "folder",
                 inputs: tuple = ()) -> None:
    """An output `kind` ("folder" or "file") at `out` can be written (see fileio.check_output)."""
    if str(out).strip() == "":
        raise FoldGPTError(f"{option} is empty, which names the current folder; name a new {kind}")
    _check_output(out, overwrite, option=option, file=kind == "file", inputs=[p for p in inputs if p is not None])


def check_device(device: str, option: str = "--device") -> None:
    """A device torch knows and this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FoldGPTError(f"{option} '{device}' is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FoldGPTError(f"{option} {device}, but torch sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise FoldGPTError(f"{option} {device}, but there {'is' if count == 1 else 'are'} only {count} GPU(s) "
                               f"(cuda:0..cuda:{count - 1}); choose one of them")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise FoldGPTError(f"{option} mps, but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise FoldGPTError(f"{option} '{device}': foldgpt runs on cpu, cuda or mps")


def _local_paths(specs) -> list[Path]:
    if specs is None:
        return []
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    return [Path(s) for s in specs if Path(s).exists()]


def check_context(seq_len: int, config: dict, option: str = "--seq-len") -> None:
    """`seq_len` fits the model's context (max_position_embeddings of its config, where it says)."""
    ctx = text_config(config).get("max_position_embeddings")
    if isinstance(ctx, int) and not isinstance(ctx, bool) and 0 < ctx < seq_len:
        raise FoldGPTError(f"{option} {seq_len} is longer than the model's context ({ctx} tokens); use {option} "
                           f"{ctx} or less")


def check_layers(cfg, plan, layers: int) -> None:
    """Settings that depend on the model's layer count: the remove rate, a given plan's layer count."""
    if cfg.remove_rate is not None and round(cfg.remove_rate * layers) >= layers:
        raise FoldGPTError(f"--remove-rate {cfg.remove_rate} removes {round(cfg.remove_rate * layers)} of the "
                           f"model's {layers} layers, leaving none; lower it (at most {layers - 1} layers can go)")
    if plan is not None and plan.num_layers != layers:
        raise FoldGPTError(f"the plan was made for a model of {plan.num_layers} layers, this one has {layers}; give a "
                           "plan made for this model")


def preflight_compress(model: str, text, out, cfg, plan, overwrite: bool):
    """Everything `compress` can check before it loads anything: the output location, the model argument (a folded
    checkpoint is no base model), the plan (read and checked against the schema), the device, the settings against
    the model's config where it is a local folder. Returns the plan (a Plan, or None)."""
    from .plan import Plan

    inputs = [*_local_paths(model), *_local_paths(text), *_local_paths(plan if isinstance(plan, (str, Path))
                                                                        else None)]
    check_output(out, overwrite, "--out", inputs=tuple(inputs))
    check_device(cfg.device)
    given = Plan.load(plan) if isinstance(plan, (str, Path)) else plan
    config = check_source(model)
    if config is not None and config.get("model_type") == "foldgpt":
        try:
            base = optional_json(Path(model) / "plan.json").get("provenance", {}).get("model")
        except (FoldGPTError, AttributeError):  # a damaged plan.json only loses the hint
            base = None
        raise FoldGPTError(f"{model} is already a folded foldgpt checkpoint; compress the original model"
                           f"{f' ({base})' if isinstance(base, str) else ''} instead, with the smaller "
                           "--target-params you want")
    if config is not None:
        check_context(cfg.seq_len, config)
        layers = text_config(config).get("num_hidden_layers")
        if isinstance(layers, int):
            check_layers(cfg, given, layers)
        if given is not None and given.model_type not in (config["model_type"], text_config(config).get("model_type")):
            raise FoldGPTError(f"the plan was made for a {given.model_type} model, this one is "
                               f"{config['model_type']}; give a plan made for this model")
    return given


def preflight_eval(models: list[str], cfg, json_out, device: str) -> None:
    """`eval`'s checks before the first model loads: every model argument, the JSON output, the device."""
    from .evaluation.tasks import load_task

    for name in models:
        check_source(name)
    for spec in cfg.tasks:  # read once here, so a bad task file stops the run before the first model loads
        load_task(spec, cfg.task_limit)
    if json_out is not None:
        check_output(json_out, True, "--json", kind="file", inputs=tuple(_local_paths(models)))
    check_device(device)


def preflight_generate(max_new_tokens: int, sample: bool, temperature: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise FoldGPTError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if sample and not (math.isfinite(temperature) and temperature > 0):
        raise FoldGPTError(f"--temperature must be a finite number > 0 when sampling, got {temperature}; use e.g. "
                           "--temperature 0.7, or drop --sample for greedy decoding")
