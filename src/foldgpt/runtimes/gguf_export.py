"""Dense GGUF export: the folded model expanded to its base architecture (checkpoint/export.to_dense), written in
the tensor names and metadata llama.cpp reads (gguf's own name map, as llama.cpp's HF converter uses it).

GGUF has no way to say "this block runs that block's matrices", so the file holds one matrix per position: its
size is the dense size of the kept positions, not the folded model's unique parameters (use the ONNX export for
that). Weights are written as f16 (matrices) with norms in f32, as llama.cpp's converter does by default, or all
f32 with dtype="f32".

Families:
- llama (SmolLM2 and other Llama-architecture models): q/k rows permuted into llama.cpp's rotary layout (the
  permutation its converter applies and transformers' GGUF loader undoes). Rotary scaling and biases are refused.
- gemma3_text: RMSNorm weights stored as 1 + w (llama.cpp multiplies by the stored weight); llama.cpp's gemma3
  runs every p-th layer (p = `gemma3.attention.sliding_window_pattern`, 6 by default) with full attention and the
  others with the sliding window, scales queries by 1/sqrt(head_dim) and has no soft-capping, so a model whose
  kept layers break that pattern (whole layers deleted between global ones) or whose query scale differs is
  refused with the reason.
The tokenizer must be a byte-level BPE (GPT-2 style, as SmolLM2's): it is written as llama.cpp's "gpt2" vocabulary
(tokens, token types, merges, special ids, chat template). SentencePiece-style vocabularies are refused: llama.cpp
tokenizes them by per-token scores that a tokenizer.json does not hold."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import FoldGPTError
from . import check_output_file, file_bytes, require, token_windows

log = logging.getLogger(__name__)

ARCHS = {"llama": "llama", "gemma3_text": "gemma3"}  # transformers model_type -> GGUF architecture
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (inverse of transformers' reverse permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg, kind: str = "full_attention") -> tuple[float, dict]:
    params = getattr(cfg, "rope_parameters", None) or {}
    if kind in params:  # per layer kind (Gemma-3)
        params = params[kind]
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise FoldGPTError(f"{cfg.model_type}: the config names no rotary base (rope_theta); use --dense or --onnx")
    return float(theta), params


def _sliding_period(layer_types: list[str]) -> int:
    """p such that layer i is global iff i % p == p - 1 (llama.cpp's gemma3 pattern), or 0 if there is none."""
    for p in range(1, len(layer_types) + 2):
        if all((t == "full_attention") == (i % p == p - 1) for i, t in enumerate(layer_types)):
            return p
    return 0


def check_architecture(cfg) -> dict:
    """Refuse what llama.cpp's architecture cannot run as the model does; return the values to write."""
    mt = cfg.model_type
    if mt not in ARCHS:
        raise FoldGPTError(f"GGUF export supports Llama-architecture and Gemma-3 models; this one is {mt} "
                           "(use --dense or --onnx)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = {"head_dim": head_dim}
    if mt == "llama":
        theta, rope = _rope_theta(cfg)
        if rope.get("rope_type", "default") != "default":
            raise FoldGPTError(f"GGUF export: rotary scaling '{rope.get('rope_type')}' is not written yet "
                               "(use --dense or --onnx)")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise FoldGPTError("GGUF export: Llama models with biases are not written yet (use --dense or --onnx)")
        out["rope_theta"] = theta
        return out
    theta, rope = _rope_theta(cfg, "full_attention")
    theta_swa, rope_swa = _rope_theta(cfg, "sliding_attention")
    if rope.get("rope_type", "default") != "default" or rope_swa.get("rope_type", "default") != "default":
        raise FoldGPTError("GGUF export: Gemma-3 with rotary scaling is not written yet (use --dense or --onnx)")
    if float(cfg.query_pre_attn_scalar) != float(head_dim):
        raise FoldGPTError(f"GGUF export: llama.cpp's gemma3 scales queries by 1/sqrt(head_dim = {head_dim}), this "
                           f"model by 1/sqrt({cfg.query_pre_attn_scalar}) (use --dense or --onnx)")
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        raise FoldGPTError("GGUF export: llama.cpp's gemma3 has no logit soft-capping (use --dense or --onnx)")
    if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise FoldGPTError(f"GGUF export: llama.cpp's gemma3 runs tanh-GELU, this model {cfg.hidden_activation} "
                           "(use --dense or --onnx)")
    period = _sliding_period(list(cfg.layer_types))
    if not period:
        kinds = "".join("G" if t == "full_attention" else "s" for t in cfg.layer_types)
        raise FoldGPTError(f"GGUF export: llama.cpp's gemma3 makes every p-th layer global; the kept layers' pattern "
                           f"{kinds} (G global, s sliding) is not of that form, because deleted layers shifted it "
                           "(use --dense or --onnx)")
    out.update(rope_theta=theta, rope_theta_swa=theta_swa, period=period)
    return out


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer (how text is split before the merges)."""
    def is_gpt2(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and is_gpt2(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and is_gpt2(parts[1])):
            return "smollm"
    log.warning("GGUF export: unrecognised pre-tokenizer %s; writing llama.cpp's 'default' split",
                json.dumps(pre)[:120])
    return "default"


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """The GGUF tokenizer keys of a byte-level BPE tokenizer: tokens by id (padded to the model's vocabulary),
    token types, merges, llama.cpp's pre-tokenizer name, special ids, add-bos flag and chat template."""
    if tok is None:
        raise FoldGPTError("GGUF export needs the model's tokenizer; the folder has none (copy its tokenizer files "
                           "into it)")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise FoldGPTError("GGUF export needs a fast tokenizer; give the folder a tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = any(p and p.get("type") == "ByteLevel" for p in
                     [spec.get("decoder")] + [spec.get("pre_tokenizer")]
                     + list((spec.get("pre_tokenizer") or {}).get("pretokenizers", [])))
    if model.get("type") != "BPE" or not byte_level:
        raise FoldGPTError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); this one is a "
                           f"{model.get('type')} tokenizer without byte-level pre-tokenization, which llama.cpp "
                           "tokenizes by scores a tokenizer.json does not hold (use --dense or --onnx)")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if max(id_to_token) >= vocab_size:
        raise FoldGPTError(f"the tokenizer has ids up to {max(id_to_token)} but the model only {vocab_size} rows; "
                           "fix the tokenizer")
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            token_types.append(types.get(i, TOKEN_NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokens": tokens, "token_types": token_types, "merges": merges,
            "pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
            "add_bos": bool(getattr(tok, "add_bos_token", False))}
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{key}_token_id", None)
        if tid is not None:
            meta[f"{key}_id"] = int(tid)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        meta["chat_template"] = template
    return meta


def _tensors(dense: nn.Module, arch: str, dtype: str):
    """(GGUF name, numpy array) for every stored tensor, in llama.cpp's layout and precision."""
    import gguf

    cfg = dense.config
    gg_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(gg_arch, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, t in dense.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FoldGPTError(f"GGUF export: no llama.cpp name for tensor {key}; use --dense or --onnx")
        t = t.detach().float()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            t = _permute_rotary(t, heads)
        if arch == "gemma3" and key.endswith("norm.weight"):
            t = t + 1.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
        arr = t.numpy()
        if dtype == "f16" and arr.ndim >= 2:
            arr = arr.astype(np.float16)
        yield name, np.ascontiguousarray(arr)


def write_gguf(dense: nn.Module, tok, path: str | Path, dtype: str = "f16", name: str = "foldgpt") -> None:
    """Write the dense model `dense` (and its tokenizer) as a GGUF file at `path` (not atomically)."""
    import gguf

    cfg = dense.config
    hp = check_architecture(cfg)
    arch = ARCHS[cfg.model_type]
    vocab = tokenizer_metadata(tok, int(cfg.vocab_size))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(cfg.num_key_value_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_key_length(int(hp["head_dim"]))
    w.add_value_length(int(hp["head_dim"]))
    if arch == "llama":
        w.add_rope_dimension_count(int(hp["head_dim"]))
    else:
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern(int(hp["period"]))
        w.add_rope_freq_base_swa(hp["rope_theta_swa"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    for key, add in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id), ("unk_id", w.add_unk_token_id),
                     ("pad_id", w.add_pad_token_id)):
        if key in vocab:
            add(vocab[key])
    w.add_add_bos_token(vocab["add_bos"])
    if "chat_template" in vocab:
        w.add_chat_template(vocab["chat_template"])
    for tname, arr in _tensors(dense, arch, dtype):
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(model_dir: str | Path, out_path: str | Path, overwrite: bool = False, dtype: str = "f16") -> Path:
    """Write the folded model in `model_dir` as a dense GGUF file `out_path` (f16 matrices, or all f32 with
    dtype="f32"), atomically: the file appears whole or not at all."""
    require(["gguf"], "the GGUF export", "gguf")
    if dtype not in ("f16", "f32"):
        raise FoldGPTError(f"GGUF export: dtype must be f16 or f32, not {dtype}")
    out = check_output_file(out_path, overwrite, ".gguf")
    from ..checkpoint.export import to_dense
    from ..checkpoint.folded import load_folded
    from ..fileio import staging_dir

    t = time.perf_counter()
    folded, tok = load_folded(model_dir)
    dense = to_dense(folded)
    del folded
    check_architecture(dense.config)
    tokenizer_metadata(tok, int(dense.config.vocab_size))  # refuse before writing anything
    with staging_dir(out.parent, f".{out.name}.tmp-") as tmp:
        write_gguf(dense, tok, tmp / out.name, dtype, name=Path(model_dir).name)
        os.replace(tmp / out.name, out)
    log.info("GGUF (%s, %s, %d layers) written to %s (%.1f MB) in %.1f s", ARCHS[dense.config.model_type], dtype,
             dense.config.num_hidden_layers, out, file_bytes(out) / 1e6, time.perf_counter() - t)
    return out


def gguf_config_overrides(gguf_path: str | Path) -> dict:
    """Config values llama.cpp derives from the file's metadata that transformers' GGUF loader does not read
    (Gemma-3: which layers are global, the query scale, the sliding layers' rotary base), as the file states them."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    arch = r.fields["general.architecture"].contents()
    if arch != "gemma3":
        return {}

    def get(key, default=None):
        f = r.fields.get(f"gemma3.{key}")
        return f.contents() if f is not None else default

    n, period = int(get("block_count")), int(get("attention.sliding_window_pattern", 6))
    head_dim = int(get("attention.key_length"))
    return {
        "layer_types": ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n)],
        "query_pre_attn_scalar": head_dim,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(get("rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))},
        },
    }


def check_gguf(model_dir: str | Path, gguf_path: str | Path, n_windows: int = 4, seq_len: int = 64, seed: int = 0,
               text: str | None = None) -> dict:
    """Load the GGUF back with transformers' GGUF loader and compare its logits with the folded model's (loaded
    with foldgpt.load) on `n_windows` windows of `seq_len` tokens. Config values the loader does not read from
    GGUF metadata are passed from the file's own keys (`gguf_config_overrides`) and reported. Also reports the
    file size and whether the loader's tokenizer encodes a sample text as the folder's tokenizer does."""
    require(["gguf"], "reading GGUF files", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..api import load

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FoldGPTError(f"GGUF file not found: {gguf_path}")
    overrides = gguf_config_overrides(gguf_path)
    back = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32, **overrides).eval()
    model, tok = load(model_dir)
    ids = tok(text)["input_ids"] if (text and tok is not None) else None
    windows = token_windows(int(model.config.vocab_size), n_windows, seq_len, seed, ids)
    diff = 0.0
    with torch.no_grad():
        for i in range(n_windows):
            a = back(input_ids=windows[i : i + 1], use_cache=False).logits
            b = model(input_ids=windows[i : i + 1], use_cache=False).logits
            diff = max(diff, (a - b).abs().max().item())
    sample = text[:2000] if text else "It is a truth universally acknowledged, that 42 men want 7 wives."
    back_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    same_tokens = (tok is not None and back_tok(sample, add_special_tokens=False)["input_ids"]
                   == tok(sample, add_special_tokens=False)["input_ids"])
    return {
        "max_abs_diff": diff,
        "file_bytes": file_bytes(gguf_path),
        "loaded_params": sum(p.numel() for p in back.parameters()),
        "config_overrides": sorted(overrides),
        "same_tokens": bool(same_tokens),
        "windows": n_windows,
        "seq_len": seq_len,
    }
