"""ONNX export of a folded model, each shared matrix stored once.

The graph is a causal LM without a KV cache: (input_ids, attention_mask) -> logits for every position, batch
and sequence length dynamic. Generation with it recomputes the whole prefix at each step; a graph with past
key/values inputs is not exported yet.

torch's exporter (torch.export + onnxscript) lifts each parameter once, so a parent's Linear that its children
run by reference is one graph input; its optimizer then folds each Linear's transpose into a new constant at each
use, which can copy a shared matrix once per position that runs it (whether onnxscript's optimizer merges the
copies again depends on its version and on how the export is saved). `dedup_initializers` merges constants of equal
type, shape and bytes into one initializer, so each unique matrix is stored once whatever the exporter did (merging
two equal constants never changes what the graph computes). `fold_shared_transposes` gives shared weights' MatMuls
a constant operand. Node metadata (source stack traces, which the exporter attaches to every node) is dropped: it is
larger than the weights of a small model and no runtime reads it.

`int8=True` writes onnxruntime's dynamic quantization on top: weights stored as int8 (per tensor), activations
quantized on the fly (per tensor) at each MatMul. Each matrix is stored once: a tied embedding is one uint8 table
that the lookup gathers from (then dequantizes) and the LM head reads through a transpose and a dequantize (an
fp32 MatMul). Judge it by perplexity (`check_onnx`'s `ppl`): per-tensor activation quantization moves SmolLM2's a
lot (docs/runtimes.md)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import FoldGPTError
from . import check_output_file, file_bytes, perplexity, require, token_windows, unique_param_bytes

log = logging.getLogger(__name__)

EXTERNAL_DATA_LIMIT = 2 * 1024**3  # protobuf's limit on one file: larger models keep their weights beside it
EXPORT_MODULES = ["onnx", "onnxscript"]
RUN_MODULES = ["onnxruntime", "psutil"]


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits, without a KV cache (the graph the export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _rename_inputs(graph, rename: dict[str, str]) -> None:
    """Point every node input named in `rename` (in `graph` and its subgraphs) at its new name."""
    for g in _subgraphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]


def _subgraphs(graph):
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def dedup_initializers(model) -> int:
    """Merge initializers of equal data type, shape and content into the first of them (in place, in every
    subgraph too). Returns the number of bytes saved."""
    from onnx import numpy_helper

    graph = model.graph
    owner: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep, saved = [], 0
    for init in graph.initializer:
        data = init.raw_data if init.raw_data else numpy_helper.to_array(init).tobytes()
        key = (init.data_type, tuple(init.dims), len(data), hashlib.sha256(data).digest())
        if key in owner:
            rename[init.name] = owner[key]
            saved += len(data)
        else:
            owner[key] = init.name
            keep.append(init)
    if not rename:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _rename_inputs(graph, rename)
    for g in _subgraphs(graph):
        for out in g.output:
            if out.name in rename:  # an initializer that is also a graph output keeps its name through an Identity
                raise FoldGPTError(f"cannot merge initializer {out.name}: it is a graph output")
    kept_vi = [vi for vi in graph.value_info if vi.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    return saved


def fold_shared_transposes(model) -> int:
    """Replace each Transpose of a 2-D initializer by one transposed initializer, shared by all its uses.

    onnxscript's optimizer folds the transpose of a Linear's weight into a constant only where the weight has one
    consumer; a shared parent's weight keeps a runtime Transpose at each position that runs it. Those MatMuls then
    have no constant weight: onnxruntime folds each transpose into its own copy when the session starts (one copy
    per position in memory) and its int8 quantizer skips them. After this pass every such MatMul reads one
    constant, stored once. Returns the number of Transpose nodes removed."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    transposed: dict[str, str] = {}  # weight -> its transposed initializer
    rename: dict[str, str] = {}  # Transpose output -> transposed initializer
    drop = []

    def is_transpose(node) -> bool:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        return node.op_type == "Transpose" and perm == [1, 0]

    consumers: dict[str, list] = {}
    for g in _subgraphs(graph):
        for node in g.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
    for node in graph.node:
        w = node.input[0] if node.input else None
        if (w not in inits or len(inits[w].dims) != 2 or not is_transpose(node)
                or not all(is_transpose(c) for c in consumers[w])):  # e.g. a tied embedding: its Gather reads W
            continue
        if w not in transposed:
            name = w + "_T"
            t = numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(), name)
            graph.initializer.append(t)
            transposed[w] = name
        rename[node.output[0]] = transposed[w]
        drop.append(node)
    if not drop:
        return 0
    for node in drop:
        graph.node.remove(node)
    _rename_inputs(graph, rename)
    used = {name for g in _subgraphs(graph) for node in g.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    kept_vi = [vi for vi in graph.value_info if vi.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    return len(drop)


def strip_node_metadata(model) -> None:
    """Drop what the exporter attaches to each node for debugging (stack traces, module paths, FX names)."""
    for g in _subgraphs(model.graph):
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime's quantizer advises a pre-processing pass on every call (a warning on the root logger); the
    graph it would shape-infer is already fully typed by the exporter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _save(proto, path: Path) -> None:
    import onnx

    if proto.ByteSize() > EXTERNAL_DATA_LIMIT:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _move_into_place(tmp: Path, out: Path) -> None:
    """The external-data file first (if any), then the graph: a reader never finds a graph without its data."""
    data = tmp.with_name(tmp.name + ".data")
    out_data = out.with_name(out.name + ".data")
    if data.exists():
        os.replace(data, out_data)
    elif out_data.exists():
        out_data.unlink()
    os.replace(tmp, out)


def _quantize(path: Path) -> None:
    """Replace the fp32 ONNX file at `path` (in a staging folder) by onnxruntime's dynamic int8 version of it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qdir = path.parent / "int8"
    qdir.mkdir()
    quiet = _DropPreprocessAdvice()
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(path, qdir / path.name, weight_type=QuantType.QInt8,
                         use_external_data_format=file_bytes(path) > EXTERNAL_DATA_LIMIT // 2)
    finally:
        logging.getLogger().removeFilter(quiet)
    path.unlink()
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    _save(onnx.load(str(qdir / path.name)), path)  # under the output's name, its data file (if any) beside it


def quantize_onnx(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """onnxruntime's dynamic int8 quantization of an fp32 ONNX file `src`, written atomically to `out`."""
    require(["onnx", "onnxruntime"], "the ONNX int8 quantization", "onnx")
    out = check_output_file(out, overwrite, ".onnx")
    src = Path(src)
    if not src.is_file():
        raise FoldGPTError(f"ONNX file not found: {src}")
    import shutil

    from ..fileio import staging_dir

    with staging_dir(out.parent, f".{out.name}.tmp-") as tmp:
        shutil.copyfile(src, tmp / out.name)
        if src.with_name(src.name + ".data").exists():
            raise FoldGPTError("quantize the export itself (export --onnx OUT --int8) for models with external data")
        _quantize(tmp / out.name)
        _move_into_place(tmp / out.name, out)
    return out


def model_to_onnx(model: nn.Module, out: str | Path, overwrite: bool = False, int8: bool = False,
                  seq_len: int = 16) -> Path:
    """Export any causal LM module (folded or dense) to `out` (.onnx); see the module docstring."""
    require(EXPORT_MODULES + (["onnxruntime"] if int8 else []), "the ONNX export", "onnx")
    out = check_output_file(out, overwrite, ".onnx")
    from ..fileio import staging_dir

    model = model.eval()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    t = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on unused axis names and deprecated pytree types
        program = torch.onnx.export(LogitsOnly(model), (ids, mask), dynamo=True, optimize=True, verbose=False,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}})
    proto = program.model_proto
    del program
    strip_node_metadata(proto)
    folded = fold_shared_transposes(proto)
    saved = dedup_initializers(proto)
    log.info("ONNX graph traced in %.1f s; %d initializers (%d runtime transposes of shared weights folded, "
             "%.1f MB of repeated constants merged)", time.perf_counter() - t, len(proto.graph.initializer), folded,
             saved / 1e6)
    with staging_dir(out.parent, f".{out.name}.tmp-") as tmp:
        fp32 = tmp / out.name
        _save(proto, fp32)
        del proto
        if int8:
            _quantize(fp32)
        _move_into_place(fp32, out)
    log.info("ONNX model (%s) written to %s (%.1f MB)", "int8 weights" if int8 else "fp32", out,
             file_bytes(out) / 1e6)
    return out


def export_onnx(model_dir: str | Path, out: str | Path, overwrite: bool = False, int8: bool = False) -> Path:
    """Export the folded model in `model_dir` to the ONNX file `out` (a causal LM without KV cache:
    input_ids, attention_mask -> logits), each shared matrix stored once; `int8`: onnxruntime's dynamic int8
    quantization on top. Written atomically: `out` appears whole or not at all."""
    require(EXPORT_MODULES + (["onnxruntime"] if int8 else []), "the ONNX export", "onnx")
    check_output_file(out, overwrite, ".onnx")
    from ..checkpoint.folded import load_folded

    model, _ = load_folded(model_dir)
    return model_to_onnx(model, out, overwrite, int8)


_MEASURE = """
import json, os, sys, time
import numpy as np
import onnxruntime as ort
import psutil
path, windows_file, out_file, threads, prepack = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
windows = np.load(windows_file)
proc = psutil.Process(os.getpid())
rss0 = proc.memory_info().rss
opts = ort.SessionOptions()
if threads:
    opts.intra_op_num_threads = threads
if prepack == "0":
    opts.add_session_config_entry("session.disable_prepacking", "1")
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
def run(w):
    return sess.run(["logits"], {"input_ids": w[None], "attention_mask": np.ones_like(w)[None]})[0][0]
outs = [run(windows[0])]
rss = proc.memory_info().rss - rss0
t = time.perf_counter()
outs += [run(w) for w in windows[1:]] + [run(windows[0])]
elapsed = time.perf_counter() - t
np.save(out_file, np.stack(outs[: len(windows)]))
print(json.dumps({"rss_bytes": rss, "seconds": elapsed, "tokens": windows.size + windows.shape[1]}))
"""


def measure_session(onnx_path: str | Path, windows: torch.Tensor, threads: int | None = None,
                    prepack: bool = True) -> tuple[torch.Tensor, dict]:
    """Run the file in a fresh process (so that its resident memory is the session's alone): the logits of each
    window (batch 1), the RSS growth from creating the session and running the first window, and tokens/s over
    the other windows and the first one again."""
    import json
    import subprocess
    import sys
    import tempfile

    import numpy as np

    require(RUN_MODULES, "running the ONNX model", "onnx")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "windows.npy", windows.numpy())
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(onnx_path), str(Path(tmp) / "windows.npy"),
                               str(Path(tmp) / "logits.npy"), str(threads or 0), "1" if prepack else "0"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise FoldGPTError(f"onnxruntime could not run {onnx_path}: {proc.stderr.strip().splitlines()[-1:]}")
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        logits = torch.from_numpy(np.load(Path(tmp) / "logits.npy"))
    return logits, {"rss_bytes": stats["rss_bytes"], "tokens_per_s": stats["tokens"] / stats["seconds"]}


def check_onnx(model_dir: str | Path, onnx_path: str | Path, n_windows: int = 4, seq_len: int = 64,
               seed: int = 0, text: str | None = None, threads: int | None = None, prepack: bool = True,
               reference: nn.Module | None = None) -> dict:
    """Run the ONNX file with onnxruntime on the CPU and measure it against the model in `model_dir`
    (loaded with foldgpt.load, or `reference` when given): max-abs logit difference over `n_windows` windows of
    `seq_len` tokens (from `text`, tokenized with the folder's tokenizer, when given; else seeded random ids), the
    next-token perplexity within the windows of the file and of the model (`ppl`, `ppl_reference`: the measure for
    int8, whose logits move a lot), file size, the folder's unique-parameter bytes at fp32 (and at 1 byte per
    parameter: `unique_param_bytes_int8`), and, from a fresh process (`measure_session`), the session's resident
    memory (RSS growth from creating it and running the first window) and tokens/s (prompt processing: one full
    forward per window)."""
    require(RUN_MODULES, "running the ONNX model", "onnx")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FoldGPTError(f"ONNX file not found: {onnx_path}")
    from ..api import load

    model, tok = (reference, None) if reference is not None else load(model_dir)
    if text and tok is None:
        from ..models import load_tokenizer

        tok = load_tokenizer(model_dir)
    ids = tok(text)["input_ids"] if text else None
    windows = token_windows(int(model.config.vocab_size), n_windows, seq_len, seed, ids)
    logits, stats = measure_session(onnx_path, windows, threads, prepack)
    with torch.no_grad():
        ref = torch.cat([model(input_ids=windows[i : i + 1], use_cache=False).logits.float()
                         for i in range(n_windows)])
    unique = unique_param_bytes(model_dir)
    return {
        "max_abs_diff": (logits - ref).abs().max().item(),
        "ppl": perplexity(logits, windows),
        "ppl_reference": perplexity(ref, windows),
        "file_bytes": file_bytes(onnx_path),
        "unique_param_bytes": unique,
        "unique_param_bytes_int8": unique // 4,
        **stats,
        "windows": n_windows,
        "seq_len": seq_len,
    }
