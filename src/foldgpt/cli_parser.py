"""The `foldgpt` command line's options, and the configurations they make.

Every option that sets a configuration field has no default of its own: left out, the field keeps its dataclass
default (config.py), which its help shows. An option's `dest` names the field(s) it sets: "cfg:fold.group_size"
(CompressConfig), "eval:seq_len" (EvalConfig), "api:seed" (a keyword of the API function the command calls)."""

from __future__ import annotations

import argparse
import inspect

from .config import (
    COMPENSATIONS,
    DEVICE_MAPS,
    FOLD_SELECTS,
    GATE_BUDGETS,
    PRECISIONS,
    QUANT_LEVELS,
    RANKINGS,
    SEARCH_SCORES,
    UNITS,
    CompressConfig,
    EvalConfig,
    with_settings,
)

EPILOG = """quick start:
  foldgpt compress smollm2-135m --text my_corpus/ --target-params 0.75 --out small/
  foldgpt eval smollm2-135m small/ --text held_out.txt --seq-len 512 --json ppl.json
  foldgpt analyze smollm2-135m gemma3-270m --text my_corpus/ --out analysis/
"""
_FLAGS = ("store_true", "store_false", argparse.BooleanOptionalAction)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one `foldgpt: error:` line (no usage block), exit code 2."""

    def error(self, message: str):
        line = " ".join(message.split())
        self.exit(2, f"foldgpt: error: {line}; see '{self.prog} --help'\n")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _setting(p, flag: str, *paths: str, help: str = "", **kw) -> None:
    """An option setting the configuration field(s) at `paths` ("cfg:fold.group_size", "eval:seq_len"); the help
    shows the field's default (flags, and fields whose default is None, show none)."""
    kind, _, path = paths[0].partition(":")
    default = _lookup(CompressConfig() if kind == "cfg" else EvalConfig(), path)
    if kw.get("action") not in _FLAGS and default is not None and default != []:
        help = f"{help} (default: {_shown(default)})" if help else f"default: {_shown(default)}"
    if kw.get("action") not in _FLAGS and "choices" not in kw:  # the dest is no name to show
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    p.add_argument(flag, dest="|".join(paths), default=None, help=help or None, **kw)


def _lookup(cfg, path: str):
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _api(p, flag: str, fn: str, param: str, help: str = "", **kw) -> None:
    """An option passed to the API function `fn` as `param` only when given; the help shows that function's
    default for it."""
    from . import api

    default = inspect.signature(getattr(api, fn)).parameters[param].default
    if kw.get("action") not in _FLAGS and default is not None:
        help = f"{help} (default: {_shown(default)})" if help else f"default: {_shown(default)}"
        if "choices" not in kw:
            kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    p.add_argument(flag, dest=f"api:{param}", default=argparse.SUPPRESS, help=help, **kw)


def settings(args: argparse.Namespace, kind: str) -> dict[str, object]:
    """The fields the given options of `kind` ("cfg", "eval", "api") set: {dotted path: value}."""
    out = {}
    for dest, value in vars(args).items():
        for target in dest.split("|"):
            k, sep, path = target.partition(":")
            if sep and k == kind and value is not None:
                out[path] = value
    return out


def compress_config(args: argparse.Namespace) -> CompressConfig:
    """The CompressConfig of `foldgpt compress` or `foldgpt bench`: the dataclass defaults, then the options given.
    compress without --target-params: --remove-rate alone sets the split, --plan alone re-applies a plan (no target);
    neither: the default target."""
    given = settings(args, "cfg")
    if "target_size" in given:  # a byte budget instead of a parameter target (size.py)
        if "target_params" in given or getattr(args, "plan", None) is not None:
            from .errors import FoldGPTError

            raise FoldGPTError("--target-size chooses the parameter target; give --target-size or "
                               f"{'--plan' if 'target_params' not in given else '--target-params'}, not both")
        given["target_params"] = None
    if "target_params" not in given and ("remove_rate" in given or getattr(args, "plan", None) is not None):
        given["target_params"] = None
        given.setdefault("remove_rate", 0.0)
    return with_settings(CompressConfig(), given)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return with_settings(EvalConfig(), settings(args, "eval"))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="foldgpt", description="Compress LLMs in depth: gated removal + folding + cure.",
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("analyze", help="block redundancy: cosine, BI, similarity matrix, plots")
    a.add_argument("models", nargs="+")
    a.add_argument("--text", nargs="*", default=None)
    _api(a, "--out", "analyze", "out")
    _api(a, "--seq-len", "analyze", "seq_len", type=int)
    _api(a, "--n-seqs", "analyze", "n_seqs", type=int)
    _api(a, "--seed", "analyze", "seed", type=int)

    _compress_parser(sub)
    _eval_parser(sub)
    _bench_parser(sub)

    x = sub.add_parser("export", help="export a folded model: a plain base-architecture checkpoint, ONNX, GGUF or "
                      "ExecuTorch")
    x.add_argument("model_dir")
    fmt = x.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--dense", metavar="OUT", help="output folder: a plain checkpoint of the base architecture")
    fmt.add_argument("--onnx", metavar="OUT.onnx", help="ONNX causal LM (no KV cache), each shared matrix stored once")
    fmt.add_argument("--gguf", metavar="OUT.gguf", help="dense GGUF for llama.cpp (Llama and Gemma-3 families)")
    fmt.add_argument("--executorch", metavar="OUT.pte",
                     help="ExecuTorch program (XNNPACK, no KV cache), each shared matrix stored once")
    x.add_argument("--int8", action="store_true", help="with --onnx: onnxruntime's dynamic int8 quantization on top; "
                   "with --executorch: torchao's int8 weights, activations quantized at run time")
    x.add_argument("--seq-len", type=int, default=None,
                   help="with --executorch: the program's input length in tokens (default: 128)")
    x.add_argument("--gguf-dtype", choices=("f16", "f32"), default="f16",
                   help="with --gguf: weight precision (default: f16; norms stay f32)")
    x.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("info", help="what was removed and folded, and the sizes")
    i.add_argument("model_dir")
    i.add_argument("--json", action="store_true", help="print JSON")

    g = sub.add_parser("generate", help="generate text (chat template when the tokenizer has one)")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    _api(g, "--max-new-tokens", "generate", "max_new_tokens", type=int)
    _api(g, "--sample", "generate", "sample", action="store_true", help="sample (default greedy)")
    _api(g, "--temperature", "generate", "temperature", type=float)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _api(g, "--seed", "generate", "seed", type=int)
    return p


def _compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="compress a model into a folder")
    c.add_argument("model", help="alias (smollm2-135m, gemma3-270m), local folder, .gguf file or hub id")
    c.add_argument("--text", nargs="*", default=None, help=".txt/.jsonl files, directories or dataset names")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    _setting(c, "--method", "cfg:method")
    _setting(c, "--target-params", "cfg:target_params", type=float, help="fraction of unique parameters kept")
    _setting(c, "--target-size", "cfg:target_size", metavar="SIZE",
             help="byte budget for the weights file (e.g. 60MB, 0.5GB, 100MiB): chooses the unique-parameter target "
                  "and the quantization level together (docs/size.md)")
    _setting(c, "--quantize", "cfg:quantize", choices=QUANT_LEVELS,
             help="weight-only quantization of the result after the cure (torchao: int8 per row, int4 in groups)")
    _setting(c, "--remove-rate", "cfg:remove_rate", type=float, help="fraction of layers removed")
    _setting(c, "--group-size", "cfg:fold.group_size", type=int)
    _setting(c, "--remove-share", "cfg:remove_share", type=float,
             help="with only a target: share of savings by removal")
    c.add_argument("--plan", default=None, help="re-apply a plan.json instead of learning one")
    _setting(c, "--ranking", "cfg:ranking.kind", choices=RANKINGS,
             help="foldgpt's joint ranking: search (one search over keep / delete a sub-block / delete / fitted "
                  "low-rank child, by calibration-loss rise per parameter saved), greedy (whole-layer or sub-block "
                  "NLL removal, then children fold back) or learned gates")
    _setting(c, "--child-fractions", "cfg:ranking.child_fractions", type=_floats, metavar="F,F",
             help="search: the fitted children's sizes, as fractions of a block's parameters")
    _setting(c, "--search-general", "cfg:ranking.search_general", type=int, metavar="N",
             help="search: also score actions on N windows of built-in general text, so what an action costs off "
                  "the calibration text counts too (fits and cure still use only your text)")
    _setting(c, "--rescore", "cfg:ranking.rescore", type=int,
             help="search: after the first step re-score only this many best actions (0: all, every step)")
    _setting(c, "--search-score", "cfg:ranking.score", choices=SEARCH_SCORES,
             help="search: calibration NLL through the vocabulary head, or restricted to the teacher's top-k tokens "
                  "and the target (bench/search_agreement.py compares them)")
    _setting(c, "--confirm", "cfg:ranking.confirm", type=int,
             help="search: re-score this many best actions of each step with the exact NLL (0: off)")
    _setting(c, "--actions", "cfg:ranking.actions", type=_names,
             help="search: what it may do to a layer: delete its attention (attn) or MLP (mlp), delete it (layer), "
                  "make it a fitted child (child)")
    _setting(c, "--refine", "cfg:ranking.refine", type=int, metavar="N",
             help="search: up to N exchange rounds after it reaches the target (give a layer back parameters, take "
                  "the cheapest actions elsewhere, keep the exchange where the calibration loss falls; 0: off)")
    _setting(c, "--per-step", "cfg:ranking.per_step", type=int,
             help="search: actions taken per step (the best, then the next best of other layers)")
    _setting(c, "--no-alpha", "cfg:fold.alpha", action="store_false",
             help="search: fitted children never add alpha * parent (own low-rank factors only)")
    _setting(c, "--no-child-gates", "cfg:fold.child_gates", action="store_false",
             help="children run their parent's block at full weight (no measured branch gate)")
    _setting(c, "--unit", "cfg:ranking.unit", choices=UNITS,
             help="greedy and gates rankings: whole layers, or attention/MLP sub-blocks (greedy: BlockPruner's "
                  "search, then removed whole layers fold back as children); auto: greedy runs both searches and "
                  "folds sub-blocks only when their calibration NLL rise is clearly smaller, else layers; gates rank "
                  "whole layers")
    _setting(c, "--protect-ends", "cfg:protect_ends", action="store_true",
             help="never remove the first and last layer")
    _calibration_settings(c)
    _setting(c, "--gate-rounds", "cfg:gate.rounds", type=int)
    _setting(c, "--gate-budget", "cfg:gate.budget", choices=GATE_BUDGETS)
    _setting(c, "--adapter-rank", "cfg:fold.adapter_rank", type=int)
    _setting(c, "--adapter-init", "cfg:fold.adapter_init", choices=["zero", "svd"],
             help="greedy/gates rankings: how children's deltas start (the search always fits them)")
    _setting(c, "--fold-select", "cfg:fold.select", choices=FOLD_SELECTS)
    _setting(c, "--fold-across-kinds", "cfg:fold.across_kinds", action="store_true",
             help="a folded child may borrow a kept layer of another attention kind (Gemma-3 sliding-window and "
                  "global layers; same weight shapes) when measurement says it helps")
    _setting(c, "--cure-steps", "cfg:cure.steps", type=int)
    _setting(c, "--cure-lr", "cfg:cure.lr", type=float)
    _setting(c, "--child-lr-scale", "cfg:cure.child_lr_scale", type=float,
             help="learning-rate factor for the fitted children's factors in the cure")
    _setting(c, "--tail-layers", "cfg:cure.tail_layers", type=int)
    cure = c.add_mutually_exclusive_group()
    _setting(cure, "--cure", "cfg:cure.enabled", action="store_true",
             help="cure any method (default: foldgpt cures, the peers do not)")
    _setting(cure, "--no-cure", "cfg:cure.enabled", action="store_false")
    _setting(c, "--seed", "cfg:seed", type=int)
    _setting(c, "--cure-seed", "cfg:cure.seed", type=int,
             help="the cure's own seed (data order, adapter init; default: --seed), to measure cure noise")
    _setting(c, "--cure-checkpoint-every", "cfg:cure.checkpoint_every", type=int,
             help="save the cure's state every N steps beside the output, so a stopped run continues (0: never)")
    c.add_argument("--fresh", action="store_true",
                   help="start over: delete the state a stopped run saved beside the output (.OUT.resume) instead "
                        "of continuing from it")
    _run_options(c)
    c.add_argument("--convert-cache", default=None, help="where GGUF conversions are cached")


def _calibration_settings(p) -> None:
    """The calibration options compress and bench share."""
    _setting(p, "--seq-len", "cfg:seq_len", type=int)
    _setting(p, "--calib-seqs", "cfg:calib_seqs", type=int)
    _setting(p, "--general-share", "cfg:general_share", type=float,
             help="share of calibration windows taken from built-in general text, so the result keeps what the "
                  "model does on text unlike yours")
    _setting(p, "--gate-steps", "cfg:gate.steps", type=int)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of one or more models on the same text")
    e.add_argument("models", nargs="+")
    e.add_argument("--text", nargs="*", default=None)
    _setting(e, "--tasks", "eval:tasks", type=_names,
             help="comma list of BIG-bench task.json (or folders) / JSONL files")
    _setting(e, "--task-limit", "eval:task_limit", type=int, help="first N examples of each task")
    _setting(e, "--cloze", "eval:cloze", type=int, help="a LAMBADA-style cloze task of N examples from --text")
    _setting(e, "--lm-eval", "eval:lm_eval", type=_names, help="comma list of lm-evaluation-harness tasks (optional)")
    _setting(e, "--seq-len", "eval:seq_len", type=int)
    _setting(e, "--max-tokens", "eval:max_tokens", type=int)
    _setting(e, "--batch-size", "eval:batch_size", type=int)
    e.add_argument("--json", default=None)
    _api(e, "--device", "evaluate", "device", help="cpu, cuda, cuda:1, mps")
    _api(e, "--device-map", "evaluate", "device_map", choices=DEVICE_MAPS,
         help="auto: layers spread over the GPUs (the rest offloaded); offload: layers copied to --device as they run")
    _api(e, "--max-memory", "evaluate", "max_memory", metavar="SPEC",
         help="with --device-map auto, e.g. cuda:0=30GiB,cpu=64GiB")


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="every method at every target on the same data: one table")
    b.add_argument("model")
    b.add_argument("--methods", default="shortgpt,foldgpt",
                   help="comma list of methods, ablation variants, or METHOD[key=value;...] config overrides "
                        "(default: %(default)s)")
    goal = b.add_mutually_exclusive_group()
    goal.add_argument("--targets", default="0.75,0.6", type=_floats,
                      help="fractions of unique parameters kept (default: %(default)s)")
    goal.add_argument("--target-size", default=None, type=_names, metavar="SIZE,SIZE",
                      help="byte budgets for the weights file instead (e.g. 100MB,60MB): each row chooses its "
                           "parameter target and quantization level (docs/size.md)")
    b.add_argument("--text", nargs="*", default=None)
    b.add_argument("--eval-text", nargs="+", required=True)
    _setting(b, "--tasks", "eval:tasks", type=_names, help="comma list of BIG-bench task.json / JSONL paths")
    _setting(b, "--task-limit", "eval:task_limit", type=int)
    _setting(b, "--cloze", "eval:cloze", type=int, help="also a LAMBADA-style cloze task of N examples")
    b.add_argument("--cure", action="store_true", help="also run every peer followed by the same cure")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true")
    _setting(b, "--eval-seq-len", "eval:seq_len", type=int)
    _setting(b, "--eval-max-tokens", "eval:max_tokens", type=int)
    _calibration_settings(b)
    _setting(b, "--cure-steps", "cfg:cure.steps", type=int)
    _setting(b, "--seed", "cfg:seed", type=int)
    b.add_argument("--resume", action="store_true",
                   help="keep the rows already finished in OUT.rows.jsonl (same command) and run the rest")
    _run_options(b)


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by compress and bench: where and in what precision the training stages run."""
    _setting(p, "--device", "cfg:device", help="cpu, cuda, cuda:1, mps")
    _setting(p, "--streaming", "cfg:streaming", action="store_true",
             help="analysis and SLEB/BlockPruner scores layer by layer on --device, model kept on the CPU")
    _setting(p, "--device-map", "cfg:device_map", choices=DEVICE_MAPS,
             help="auto: spread the layers over the GPUs (what does not fit is offloaded to the CPU); offload: every "
                  "layer stays on the CPU and is copied to --device while it runs")
    _setting(p, "--max-memory", "cfg:max_memory", metavar="SPEC",
             help="with --device-map auto: memory per device for the layers, e.g. cuda:0=30GiB,cpu=200GiB (cpu "
                  "present: offload the rest; default: 90%% of each GPU's free memory)")
    _setting(p, "--precision", "cfg:precision", choices=PRECISIONS,
             help="autocast for gate training and fold costs (auto: bf16 on a GPU or a CPU with bf16 instructions, "
                  "else fp32)")
    _setting(p, "--cure-precision", "cfg:cure.precision", choices=PRECISIONS, help="autocast for the cure")
    _setting(p, "--cure-lora-rank", "cfg:cure.lora_rank", type=int,
             help="rank of the cure's adapters on every unique Linear (merged afterwards; 0: none)")
    _setting(p, "--teacher-cache", "cfg:cure.teacher_cache", action=argparse.BooleanOptionalAction,
             help="compute the teacher's top-k log-probs and tail outputs once, on disk, before the cure (default; "
                  "--no-teacher-cache runs the teacher inside the cure loop)")
    _setting(p, "--teacher-topk", "cfg:cure.teacher_topk", type=int, help="k of the cached teacher distribution")
    _setting(p, "--fsdp", "cfg:cure.fsdp", action="store_true",
             help="under torchrun: shard each shared frozen matrix of the student across the processes in the cure "
                  "(FSDP2); without it the cure is data-parallel with replicated weights")
    _setting(p, "--micro-batch", "cfg:gate.micro_batch", "cfg:cure.micro_batch", type=int,
             help="gate training and cure micro-batch (gradient accumulation; less memory)")
    _setting(p, "--grad-checkpointing", "cfg:gate.grad_checkpointing", "cfg:cure.grad_checkpointing",
             action="store_true", help="recompute activations in gate training and the cure (less memory)")
    _setting(p, "--compensate", "cfg:compensate", choices=COMPENSATIONS,
             help="training-free compensation of each deleted span of layers, merged into the last kept layer's MLP "
                  "down projection (no parameter added): replaceme (least-squares linear map) or linearpatch "
                  "(channel scale in a Hadamard basis); any method")

