"""ExecuTorch export of a folded model (XNNPACK delegate), each shared matrix stored once.

The program is a causal LM **without a KV cache**: `input_ids` (batch 1) -> `logits` for every position, in fp32.
By default the length is **fixed** (`seq_len`, 128): a shorter prompt is right-padded to it (with causal attention,
tokens after position i do not change the logits at i) and the logits are read at its own positions. With
`dynamic=True` the length may be anything from 1 to `seq_len` (lowering then takes about twice as long). Either way
ExecuTorch plans activation memory for `seq_len` tokens (the logits alone take seq_len x vocab x 4 bytes), and
generating recomputes the prefix at each step. The program also answers the constant methods `get_max_seq_len`,
`enable_dynamic_shape`, `use_kv_cache` (False), `get_vocab_size` and `foldgpt_int8`.

How the sharing survives: torch.export lifts each parameter once, so a parent's Linear that its folded children run
by reference is one constant. The XNNPACK delegate stores the constants of the graph parts it takes in ExecuTorch's
named data store under the sha256 of their bytes, so a parent matrix used at several positions (in several
delegated parts) is stored once. Two things would still copy a matrix, and the export handles both:
- a constant used both by a delegated op and by a non-delegated one is duplicated by ExecuTorch's lowering (the
  delegate keeps its own copy): the tied embedding of SmolLM2 or Gemma-3 is read by the (non-delegated) embedding
  lookup and by the (delegated) LM head. `SharedConstantPartitioner` leaves such constants outside the delegate: the
  LM head then receives the embedding matrix as a runtime input (XNNPACK packs it at each run instead of once), and
  the matrix is stored once, in the program's constants.
- a folded child's low-rank delta `x A^T B^T` traces as `mm(x, permute(A))`, which the XNNPACK partitioner leaves
  to the portable kernels and which splits the delegated graph at each child Linear; the export runs the same
  product as two linears (`linear(linear(x, A), B)`), which XNNPACK takes.
Likewise each RMSNorm's mean over the last dim is rewritten as a 4-D average XNNPACK runs (`pool_last_dim_means`,
fixed length only), which halves the number of delegated parts (faster lowering, fewer hand-offs at run time).

`int8=True`: torchao's `Int8DynamicActivationIntxWeightConfig` (int8 weights per output channel, activations
quantized per token at run time: XNNPACK's dynamically quantized GEMM, ExecuTorch's "8da8w") on every nn.Linear
(the shared parents once) and on each folded child's low-rank factors (the two linears of `linear_form`), and
`IntxWeightOnlyConfig` (int8 per row) on the token embedding, run by ExecuTorch's quantized `embedding_byte` kernel.
A tied LM head reads that same int8 table (`TiedInt8Head`): the table is converted to fp32 outside the delegate at
each run (ExecuTorch's portable kernel), and XNNPACK runs an fp32 GEMM with it as a run-time weight and scales the
logits' columns by the rows' scales. The matrix is stored once, in int8, at a cost per run: the conversion, XNNPACK's
packing of the head's weight at each call (instead of once at load), an fp32 GEMM instead of the int8 one, and two
table-sized fp32 buffers (the converted table, its packed copy). On SmolLM2 (a 49152 x 576 table), against
`tie_int8_head=False`, which gives the head its own 8da8w copy (28 MB more on disk): 420 MB resident instead of 200
MB, about two thirds of the tokens/s (docs/runtimes.md). ExecuTorch's quantized-op fusion is run
without the constant propagation that usually follows it, which would fold the conversion into an fp32 copy of the
embedding. Norms, alpha scalars and the per-channel scales stay fp32.

`check_executorch` runs a .pte with ExecuTorch's Python runtime in a fresh process (its resident memory is the
program's alone): logits against `foldgpt.load`, file size against the folder's unique-parameter bytes at the
file's precision, RSS growth, tokens/s; with `dense=True`, the same for the dense model (`to_dense`) exported the
same way."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import types
from pathlib import Path

import torch
from torch import nn

from ..errors import FoldGPTError
from . import check_output_file, file_bytes, perplexity, require, token_windows, unique_param_bytes

log = logging.getLogger(__name__)

EXPORT_MODULES = ["executorch", "torchao"]  # executorch's lowering imports torchao (also --int8's quantizer)
RUN_MODULES = ["executorch", "psutil"]
EXTRA = "executorch"
DEFAULT_SEQ_LEN = 128


class LogitsOnly(nn.Module):
    """input_ids (1, length) -> logits (1, length, vocab), without a KV cache (the graph the export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _linear_form_forward(self, x: torch.Tensor) -> torch.Tensor:
    """SharedLinear.forward with the low-rank delta as two linears (the same product, an XNNPACK-friendly graph)."""
    if self.mode == "shared":
        y = self.base(x)
    elif self.mode == "alpha":
        y = self.alpha.to(x.dtype) * self.base(x)
    else:
        y = None
    if self.rank > 0:  # (int8 factors are torchao tensors, which F.linear runs as 8da8w)
        a, b = (w if w.dtype == x.dtype else w.to(x.dtype) for w in (self.lora_A, self.lora_B))
        low = nn.functional.linear(nn.functional.linear(x, a), b)
        y = low if y is None else y + low
    if self.mode != "shared" and getattr(self, "bias", None) is not None:
        y = y + self.bias.to(y.dtype)
    return y


@contextlib.contextmanager
def linear_form(model: nn.Module):
    """Within the block, every SharedLinear of `model` runs its low-rank delta as two linears."""
    from ..checkpoint.modeling_foldgpt import SharedLinear

    patched = [m for m in model.modules() if isinstance(m, SharedLinear)]
    for m in patched:
        m.forward = types.MethodType(_linear_form_forward, m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


def _partitioner(tied_int8_head: bool = False):
    """XNNPACK's partitioner, except that a constant read both by a delegated op and by a non-delegated one stays a
    program constant (passed to the delegate at run time) instead of being copied into the delegate. In an int8
    program with a TiedInt8Head the only fp32 Linear left is that head, whose weight (the int8 embedding, converted
    outside the delegate) XNNPACK must take at run time: `force_non_static_weights_for_f32_linear`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class SharedConstantPartitioner(XnnpackPartitioner):
        def partition(self, exported_program):
            res = super().partition(exported_program)
            program = res.tagged_exported_program
            sig = program.graph_signature
            derived = {*sig.inputs_to_parameters, *sig.inputs_to_buffers, *sig.inputs_to_lifted_tensor_constants}
            for node in program.graph.nodes:  # (topological order) values computed from constants alone
                if node.op == "call_function" and node.all_input_nodes and all(
                        i.name in derived for i in node.all_input_nodes):
                    derived.add(node.name)
            changed = True
            while changed:
                changed = False
                for node in program.graph.nodes:
                    if "delegation_tag" not in node.meta or node.name not in derived:
                        continue
                    # a constant read by a non-delegated op too (several delegates' copies are merged by the
                    # sha256 keys) stays one program constant; a delegated computation from such constants alone
                    # (the LM head's dequantization of a tied int8 embedding) runs outside too, so that the delegate
                    # receives its result at run time as it receives a shared fp32 constant
                    if (any(user.meta.get("delegation_tag") is None for user in node.users) or (
                            node.op == "call_function" and any(i.op == "placeholder" and "delegation_tag" not in
                                                               i.meta for i in node.all_input_nodes))):
                        log.debug("%s is read outside its delegate: kept out of it", node.name)
                        del node.meta["delegation_tag"]
                        changed = True
            return res

    return SharedConstantPartitioner(force_non_static_weights_for_f32_linear=tied_int8_head)


def pool_last_dim_means(program) -> int:
    """In place, on an exported program: each mean over the last dim of a contiguous tensor (keepdim, as RMSNorm
    takes it) becomes the same mean over a (1, rows, dim, 1) view's two last dims, which XNNPACK runs (it averages
    only 4-D tensors over their inner dims); left as it was, each norm would split the delegated graph. Returns the
    number of means rewritten."""
    graph = program.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.mean.dim:
            continue
        x, val = node.args[0], node.args[0].meta.get("val")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if (val is None or val.dim() < 2 or not keepdim or node.kwargs.get("dtype") is not None
                or not val.is_contiguous() or [d % val.dim() for d in node.args[1]] != [val.dim() - 1]):
            continue
        shape = [int(s) for s in val.shape]
        rows = 1
        for s in shape[:-1]:
            rows *= s
        with graph.inserting_before(node):
            view = graph.call_function(torch.ops.aten.view.default, (x, [1, rows, shape[-1], 1]))
            view.meta["val"] = val.view(1, rows, shape[-1], 1)
            mean = graph.call_function(torch.ops.aten.mean.dim, (view, [2, 3], True))
            mean.meta["val"] = view.meta["val"].mean(dim=[2, 3], keepdim=True)
            back = graph.call_function(torch.ops.aten.view.default, (mean, shape[:-1] + [1]))
            back.meta["val"] = mean.meta["val"].view(*shape[:-1], 1)
        for new in (view, mean, back):
            new.meta.update({k: node.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack")
                             if k in node.meta})
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        done += 1
    program.graph_module.recompile()
    return done


class TiedInt8Head(nn.Module):
    """The LM head of an int8 program whose head is tied to the token embedding: `linear(h, int8 rows) x row scales`
    on the embedding's own int8 table (torchao's IntxUnpackedToInt8Tensor, int8 per row), so that the program stores
    the matrix once. The lookup reads the int8 table with ExecuTorch's `embedding_byte` kernel; for the head the table
    is converted to fp32 outside the delegate at each run and XNNPACK runs an fp32 GEMM on it, packing the weight at
    each run (see the module docstring for what that costs)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding  # the same module (its weight is listed once by parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embedding.weight  # symmetric: zero points are 0; a row's scale scales its output column
        return nn.functional.linear(h, w.qdata.to(h.dtype)) * w.scale.reshape(-1).to(h.dtype)


def _quantize_int8(model: nn.Module, tie_head: bool = True) -> bool:
    """In place: 8da8w on every nn.Linear and on every folded child's low-rank factors, int8 weight-only on the
    token embedding, and a tied LM head reading that int8 table (TiedInt8Head; with `tie_head=False` it gets its own
    8da8w copy instead); see the module docstring. Returns whether a TiedInt8Head was set."""
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    from ..checkpoint.modeling_foldgpt import SharedLinear

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    if tied and not tie_head:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        tied = False
    if emb is not None:  # padding_idx only masks gradients; without it the lookup matches the int8 kernel's pattern
        emb.padding_idx = None
    seen: set[int] = {id(head)} if tied else set()

    def once(kind):  # quantize_ walks the module tree by name: a parent's Linear is reached again from each child
        def keep(m, fqn):
            if not isinstance(m, kind) or id(m) in seen:
                return False
            seen.add(id(m))
            return True
        return keep

    dynamic = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    quantize_(model, dynamic, filter_fn=once(nn.Linear))
    for m in model.modules():  # the factors as the weights of the two linears `linear_form` runs
        if isinstance(m, SharedLinear) and m.rank > 0 and id(m) not in seen:
            seen.add(id(m))
            for name in ("lora_A", "lora_B"):
                w = getattr(m, name)
                shell = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                shell.weight = nn.Parameter(w.detach().float(), requires_grad=False)
                quantize_(shell, dynamic)
                m._parameters[name] = shell.weight
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=once(nn.Embedding))
    if tied:
        if bool((emb.weight.zero_point != 0).any()):
            raise FoldGPTError("the int8 embedding has non-zero zero points; the tied LM head cannot read it")
        name = next(n for n, m in model.named_modules() if m is head)
        model.set_submodule(name, TiedInt8Head(emb))
    return tied


class _DropRootInfo(logging.Filter):
    """ExecuTorch's lowering logs each constant it copies between delegated parts on the root logger, at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _quiet():
    """Within the block: no Python warnings (ExecuTorch's lowering warns about each deprecated pytree type and
    experimental API it touches), no INFO lines on the root logger, and no warnings from torchao's import (the CUDA
    kernels it cannot load on a CPU machine)."""
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    root, drop = logging.getLogger(), _DropRootInfo()
    root.addFilter(drop)
    stack.callback(root.removeFilter, drop)
    torchao_log = logging.getLogger("torchao")
    stack.callback(torchao_log.setLevel, torchao_log.level)
    torchao_log.setLevel(logging.ERROR)
    return stack


def to_program(model: nn.Module, int8: bool = False, seq_len: int = DEFAULT_SEQ_LEN, dynamic: bool = False,
               tie_int8_head: bool = True) -> bytes:
    """The .pte bytes of a causal LM module (folded or dense), lowered to XNNPACK (see the module docstring).
    With `int8`, `model` is quantized in place; `tie_int8_head=False` gives a tied LM head its own int8 copy (the
    matrix twice in the file, no conversion and packing of the head at each run)."""
    with _quiet():
        from executorch.backends.xnnpack.utils.configs import get_xnnpack_edge_compile_config
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    model = model.eval()
    vocab = int(model.config.vocab_size)
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if seq_len < 2 or (max_pos and seq_len > max_pos):
        raise FoldGPTError(f"the ExecuTorch program's length {seq_len} must be between 2 and the model's {max_pos} "
                           "positions; give another --seq-len")
    example = torch.randint(0, vocab, (1, min(16, seq_len) if dynamic else seq_len),
                            generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with _quiet(), torch.no_grad(), linear_form(model):
        tied = _quantize_int8(model, tie_int8_head) if int8 else False
        shapes = {"input_ids": {1: torch.export.Dim("sequence", min=1, max=seq_len)}} if dynamic else None
        program = torch.export.export(LogitsOnly(model), (example,), dynamic_shapes=shapes, strict=False)
        if not dynamic:  # (a dynamic length has no fixed row count to view)
            pool_last_dim_means(program)
        t_export = time.perf_counter() - t
        edge = to_edge_transform_and_lower(program, partitioner=[_partitioner(tied)],
                                           compile_config=get_xnnpack_edge_compile_config(),
                                           constant_methods={"get_max_seq_len": seq_len,
                                                             "enable_dynamic_shape": bool(dynamic),
                                                             "use_kv_cache": False, "get_vocab_size": vocab,
                                                             "foldgpt_int8": bool(int8)})
        del program
        if int8:
            _fuse_quantized_ops(edge)
        et = edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True))
        buffer = et.buffer
    log.info("ExecuTorch program traced in %.1f s and lowered to XNNPACK in %.1f s (%s, %s %d tokens)", t_export,
             time.perf_counter() - t - t_export, "int8" if int8 else "fp32", "up to" if dynamic else "",
             seq_len)
    return buffer


def _fuse_quantized_ops(edge) -> None:
    """ExecuTorch's quantized-op fusion (the int8 embedding's dequantize + lookup -> `embedding_byte`) on the lowered
    program, in place, without the constant propagation that `do_quant_fusion_and_const_prop` runs after it: that
    would fold the tied LM head's int8 -> fp32 conversion (TiedInt8Head) into a second, fp32 copy of the embedding."""
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass, _get_node_value_dict

    program = edge.exported_program()
    QuantFusionPass(_fix_node_meta_val=True, node_value_dict=_get_node_value_dict(program))(program.graph_module)


def model_to_executorch(model: nn.Module, out: str | Path, overwrite: bool = False, int8: bool = False,
                        seq_len: int = DEFAULT_SEQ_LEN, dynamic: bool = False, tie_int8_head: bool = True) -> Path:
    """Export any causal LM module (folded or dense) to the .pte file `out`, atomically. With `int8`, `model` is
    quantized in place (pass a copy to keep it); `tie_int8_head`: see to_program."""
    require(EXPORT_MODULES, "the ExecuTorch export", EXTRA)
    out = check_output_file(out, overwrite, ".pte")
    from ..fileio import staging_dir

    buffer = to_program(model, int8, seq_len, dynamic, tie_int8_head)
    with staging_dir(out.parent, f".{out.name}.tmp-") as tmp:
        (tmp / out.name).write_bytes(buffer)
        os.replace(tmp / out.name, out)
    log.info("ExecuTorch program (%s) written to %s (%.1f MB)", "int8" if int8 else "fp32", out,
             file_bytes(out) / 1e6)
    return out


def export_executorch(model_dir: str | Path, out: str | Path, overwrite: bool = False, int8: bool = False,
                      seq_len: int = DEFAULT_SEQ_LEN, dynamic: bool = False) -> Path:
    """Export the folded model in `model_dir` to the ExecuTorch program `out` (.pte, XNNPACK delegate): a causal
    LM without KV cache, input_ids of `seq_len` tokens (any length up to it with `dynamic`) -> logits, each shared
    matrix stored once; `int8`: torchao's 8da8w on the Linears and an int8 embedding. Written atomically."""
    require(EXPORT_MODULES, "the ExecuTorch export", EXTRA)
    check_output_file(out, overwrite, ".pte")
    from ..checkpoint.folded import load_folded

    model, _ = load_folded(model_dir)
    return model_to_executorch(model, out, overwrite, int8, seq_len, dynamic)


def _load_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (`embedding_byte` of int8 programs) with its runtime: the wheel ships
    them as a separate library that the Python runtime does not load by itself."""
    import ctypes

    import executorch

    lib = Path(executorch.__path__[0]) / "lib" / "libexecutorch_kernels_quantized.so"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def program_info(pte_path: str | Path) -> dict:
    """What the program says about itself (its constant methods): seq_len, dynamic, vocab_size, int8."""
    require(EXPORT_MODULES, "reading the ExecuTorch program", EXTRA)
    with _quiet():
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(str(pte_path))
        names = program.method_names
        value = {n: program.load_method(n).execute([])[0] for n in
                 ("get_max_seq_len", "enable_dynamic_shape", "get_vocab_size", "foldgpt_int8") if n in names}
    if "get_max_seq_len" not in value:
        raise FoldGPTError(f"{pte_path} was not written by foldgpt export --executorch (no get_max_seq_len method)")
    return {"seq_len": int(value["get_max_seq_len"]), "dynamic": bool(value.get("enable_dynamic_shape", False)),
            "vocab_size": int(value.get("get_vocab_size", 0)), "int8": bool(value.get("foldgpt_int8", False))}


_MEASURE = """
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import psutil
import torch
from foldgpt.runtimes.executorch_export import _load_quantized_kernels
path, windows_file, out_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
windows = torch.from_numpy(np.load(windows_file))
proc = psutil.Process(os.getpid())
from executorch.runtime import Runtime
from executorch.extension.pybindings import portable_lib
_load_quantized_kernels()
if threads:
    portable_lib._unsafe_reset_threadpool(threads)
runtime = Runtime.get()
rss0 = proc.memory_info().rss
method = runtime.load_program(path).load_method("forward")
def run(w):
    return method.execute([w[None].contiguous()])[0][0].clone()
outs = [run(windows[0])]
rss = proc.memory_info().rss - rss0
t = time.perf_counter()
outs += [run(w) for w in windows[1:]] + [run(windows[0])]
elapsed = time.perf_counter() - t
np.save(out_file, torch.stack(outs[: len(windows)]).numpy())
print(json.dumps({"rss_bytes": rss, "seconds": elapsed, "tokens": windows.numel() + windows.shape[1]}))
"""


def measure_program(pte_path: str | Path, windows: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor,
                                                                                                   dict]:
    """Run the .pte in a fresh process (so that its resident memory is the program's alone): the logits of each
    window (batch 1, of the program's length), the RSS growth from loading the program and running the first
    window, and tokens/s over the other windows and the first one again (`threads`: ExecuTorch's thread pool size;
    default: its own)."""
    import subprocess
    import sys
    import tempfile

    import numpy as np

    require(RUN_MODULES, "running the ExecuTorch program", EXTRA)
    src = str(Path(__file__).resolve().parents[2])  # this package's root, for the fresh process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "windows.npy", windows.numpy())
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(pte_path), str(Path(tmp) / "windows.npy"),
                               str(Path(tmp) / "logits.npy"), str(threads or 0)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise FoldGPTError(f"the ExecuTorch runtime could not run {pte_path}: "
                               f"{proc.stderr.strip().splitlines()[-1:]}")
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        logits = torch.from_numpy(np.load(Path(tmp) / "logits.npy"))
    return logits, {"rss_bytes": stats["rss_bytes"], "tokens_per_s": stats["tokens"] / stats["seconds"]}


def _measure_against(model: nn.Module, pte: Path, windows: torch.Tensor, threads: int | None, unique: int,
                     int8: bool) -> dict:
    logits, stats = measure_program(pte, windows, threads)
    with torch.no_grad():
        ref = torch.cat([model(input_ids=windows[i : i + 1], use_cache=False).logits.float()
                         for i in range(len(windows))])
    return {"max_abs_diff": (logits - ref).abs().max().item(), "file_bytes": file_bytes(pte),
            "unique_param_bytes": unique // 4 if int8 else unique, "unique_param_bytes_fp32": unique,
            "ppl": perplexity(logits, windows), "ppl_reference": perplexity(ref, windows), **stats}


def check_executorch(model_dir: str | Path, pte_path: str | Path, n_windows: int = 4, seq_len: int | None = None,
                     seed: int = 0, text: str | None = None, threads: int | None = None,
                     reference: nn.Module | None = None, dense: bool = False) -> dict:
    """Run the .pte with ExecuTorch's runtime and measure it against the model in `model_dir` (loaded with
    foldgpt.load, or `reference` when given): max-abs logit difference over `n_windows` windows of `seq_len`
    tokens (default: the program's length; from `text` when given, else seeded random ids), file size, the
    folder's unique-parameter bytes at the file's precision (1 byte per parameter for an int8 program, 4 for fp32;
    `unique_param_bytes_fp32` too), the next-token perplexity within the windows of the program and of the model
    (`ppl`, `ppl_reference`), and, from a fresh process (`measure_program`), the resident memory (RSS growth
    from loading the program and running the first window) and tokens/s (prompt processing: one full forward per
    window).

    `dense=True` also exports the dense model (`to_dense` of the folded one, at the file's precision and length)
    the same way to a temporary file and adds its measurements under "dense"."""
    require(RUN_MODULES, "running the ExecuTorch program", EXTRA)
    pte_path = Path(pte_path)
    if not pte_path.is_file():
        raise FoldGPTError(f"ExecuTorch program not found: {pte_path}")
    info = program_info(pte_path)
    seq_len = seq_len or info["seq_len"]
    if seq_len > info["seq_len"] or (seq_len != info["seq_len"] and not info["dynamic"]):
        raise FoldGPTError(f"windows of {seq_len} tokens do not fit the program ({'up to ' if info['dynamic'] else ''}"
                           f"{info['seq_len']} tokens)")
    from ..api import load

    model, tok = (reference, None) if reference is not None else load(model_dir)
    if text and tok is None:
        from ..models import load_tokenizer

        tok = load_tokenizer(model_dir)
    ids = tok(text)["input_ids"] if text else None
    windows = token_windows(int(model.config.vocab_size), n_windows, seq_len, seed, ids)
    res = {**_measure_against(model, pte_path, windows, threads, unique_param_bytes(model_dir), info["int8"]),
           **info, "windows": n_windows, "window_len": seq_len}
    if dense:
        import tempfile

        from ..checkpoint.export import to_dense

        dense_model = to_dense(model).eval()
        n_dense = sum(p.numel() for p in dense_model.parameters()) * 4  # parameters() lists a tied matrix once
        with tempfile.TemporaryDirectory() as tmp:
            d = model_to_executorch(to_dense(model).eval(), Path(tmp) / "dense.pte", int8=info["int8"],
                                    seq_len=info["seq_len"], dynamic=info["dynamic"])
            res["dense"] = _measure_against(dense_model, d, windows, threads, n_dense, info["int8"])
    return res
