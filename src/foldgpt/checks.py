"""Checks of the files a run reads, before anything heavier touches them: model folders (config.json, safetensors
headers, tokenizer), GGUF files, folded checkpoints and text files. Each problem is one FoldGPTError line."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from .errors import FoldGPTError
from .schema import json_kind, read_json

log = logging.getLogger(__name__)

SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
GGUF_MAGIC = b"GGUF"
REWRITE = "download or write the model again"


# ---- weights ----------------------------------------------------------------------------------------
def check_safetensors(path: str | Path) -> dict[str, dict]:
    """The tensors a .safetensors file declares ({name: {dtype, shape, data_offsets}}), after checking that its
    header parses and that every tensor's bytes lie inside the file (a truncated or random file fails here)."""
    path = Path(path)
    bad = f"{path} is not a readable safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(SAFETENSORS_MAX_HEADER, size - 8):
                raise FoldGPTError(f"{bad} (its {size} bytes hold no valid header: truncated or not safetensors); "
                                   f"{REWRITE}")
            raw = f.read(n)
    except OSError as exc:
        raise FoldGPTError(f"cannot read {path} ({exc.strerror or exc}); check that it is readable") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise FoldGPTError(f"{bad} (its header is not valid JSON: damaged or not safetensors); {REWRITE}") from None
    if not isinstance(header, dict):
        raise FoldGPTError(f"{bad} (its header is a JSON {json_kind(header)}); {REWRITE}")
    data = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            ok = isinstance(info["dtype"], str) and 0 <= start <= end and all(s >= 0 for s in shape)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise FoldGPTError(f"{bad} (tensor {name!r} has a damaged entry in the header); {REWRITE}")
        if end > data:
            raise FoldGPTError(f"{path} is truncated: its header places tensor {name!r} at bytes up to {end}, but the "
                               f"file holds {data} bytes of data; {REWRITE}")
        tensors[name] = info
    return tensors


def check_weights(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded through model.safetensors.index.json or not), each header
    checked. A folder holding only pickle weights, or none, fails with one line."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "weights index", REWRITE)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise FoldGPTError(f"{index} has no valid weight_map; {REWRITE}")
        files = sorted({folder / v for v in wmap.values()})
        for f in files:
            if f.parent != folder or not f.is_file():
                raise FoldGPTError(f"{index} names the shard {f.name}, which is missing from {folder}; {REWRITE}")
    else:
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if pickles:
            raise FoldGPTError(f"{folder} holds only pickle weights ({pickles[0]}), which foldgpt never loads (loading "
                               "them can run code); convert them to safetensors with the tool of a source you trust, "
                               "or use the model's safetensors release")
        raise FoldGPTError(f"{folder} has no weights (no *.safetensors file); {REWRITE}")
    for f in files:
        check_safetensors(f)
    return files


def check_gguf(path: Path) -> None:
    """A .gguf file: the GGUF magic and version, then its metadata and tensor table readable."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise FoldGPTError(f"cannot read {path} ({exc.strerror or exc}); check that it is readable") from None
    if head[:4] != GGUF_MAGIC:
        raise FoldGPTError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf "
                           "model file, a model folder or an alias")
    version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else 0
    if version not in (1, 2, 3):
        raise FoldGPTError(f"{path} is a damaged or unsupported GGUF file (version {version}); {REWRITE}")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise FoldGPTError("reading GGUF files needs the gguf package: pip install 'foldgpt[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
        if not reader.tensors:
            raise ValueError("no tensors")
    except Exception as exc:  # noqa: BLE001 - the reader fails on damaged files in many ways
        raise FoldGPTError(f"{path} is a damaged GGUF file ({type(exc).__name__}: {_first_line(exc)}); "
                           f"{REWRITE}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else "").strip() or "no detail"


# ---- model folders ------------------------------------------------------------------------------------
def model_config(folder: Path) -> dict:
    """config.json of a model folder, parsed and checked to be an object with a model_type."""
    config = read_json(folder / "config.json", "model config", "fix config.json or " + REWRITE)
    if not isinstance(config, dict):
        raise FoldGPTError(f"{folder}/config.json holds a JSON {json_kind(config)}, not an object; fix config.json or "
                           f"{REWRITE}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise FoldGPTError(f"{folder}/config.json has no model_type; fix config.json or {REWRITE}")
    return config


def check_model_folder(folder: Path) -> dict:
    """A local Hugging Face model folder before transformers reads it: config.json valid, its model_type known to
    transformers and supported by foldgpt, weights in safetensors with readable headers, a tokenizer. Returns the
    config. A folded checkpoint is checked by check_folded instead."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .adapters import get_adapter

    config = model_config(folder)
    model_type = config["model_type"]
    if model_type == "foldgpt":
        return check_folded(folder)
    if model_type not in CONFIG_MAPPING:
        raise FoldGPTError(f"{folder}/config.json has model_type '{model_type}', which transformers "
                           f"{transformers.__version__} does not know; fix config.json or upgrade transformers")
    get_adapter(model_type)  # unsupported families: one line with the supported ones
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = text.get("num_hidden_layers")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise FoldGPTError(f"{folder}/config.json has num_hidden_layers {layers!r}; it must be a positive integer")
    check_weights(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FoldGPTError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}); copy the base "
                           "model's tokenizer files into it")
    return config


def check_folded(folder: str | Path) -> dict:
    """A folded checkpoint (foldgpt's output folder) before the model is built: config.json against the schema
    (schema.check_folded_config: base config, fold layout and plan), and the weights file's header. Returns the
    config."""
    from .checkpoint.modeling_foldgpt import WEIGHTS_NAME
    from .schema import check_folded_config

    folder = Path(folder)
    if not folder.is_dir():
        raise FoldGPTError(f"{folder} is not a folder; give the folder foldgpt compress wrote")
    config = read_json(folder / "config.json", "model config", "give the folder foldgpt compress wrote")
    if not isinstance(config, dict) or config.get("model_type") != "foldgpt":
        found = config.get("model_type") if isinstance(config, dict) else json_kind(config)
        raise FoldGPTError(f"{folder} is not a foldgpt folder (model_type {found}); give the folder foldgpt "
                           "compress wrote")
    if "fold_layout" not in config:
        raise FoldGPTError(f"{folder}/config.json has no fold_layout; the folder is damaged: write it again with "
                           "foldgpt compress")
    check_folded_config(config, str(folder))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FoldGPTError(f"{folder} has no {WEIGHTS_NAME}; the folder is incomplete: write it again with "
                           "foldgpt compress")
    check_safetensors(weights)
    return config


def optional_json(path: Path) -> dict:
    """A JSON object a folder may hold (summary.json, plan.json): {} when absent, one line when damaged."""
    if not path.exists():
        return {}
    data = read_json(path, "file", "restore it or delete it")
    if not isinstance(data, dict):
        raise FoldGPTError(f"{path} holds a JSON {json_kind(data)}, not an object; restore it or delete it")
    return data


def check_source(source: str) -> dict | None:
    """What can be checked of a model argument without loading it: a local folder (dense or folded) or a .gguf file.
    Returns the folder's config.json (None for aliases, hub ids and GGUF files)."""
    from .models import ALIASES

    if source in ALIASES:
        return None
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        check_gguf(path)
        return None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FoldGPTError(f"{source} is not a Hugging Face model folder (no config.json); give the folder "
                               "holding the model's config.json and weights")
        return check_model_folder(path)
    return None


def text_config(config: dict) -> dict:
    """The language model's part of a model config (multimodal configs nest it as text_config)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


# ---- text files -------------------------------------------------------------------------------------
def decode_text_file(path: Path) -> str:
    """The text of a .txt/.jsonl file: it must be UTF-8 (a BOM is allowed) and not binary."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FoldGPTError(f"cannot read text file {path} ({exc.strerror or exc}); check that it is readable") \
            from None
    if b"\x00" in raw[:1 << 16]:
        raise FoldGPTError(f"{path} looks binary (it holds NUL bytes), not text; give UTF-8 .txt/.jsonl files")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FoldGPTError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert it, "
                           f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}") from None
    sample = text[:1 << 16]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f\v")
    if sample and controls > 0.01 * len(sample):
        raise FoldGPTError(f"{path} looks binary ({controls} control characters in its first {len(sample)}), not "
                           "text; give UTF-8 .txt/.jsonl files")
    return text
