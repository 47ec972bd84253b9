"""`foldgpt` command line: a thin layer over foldgpt.api."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager

from .config import CureConfig

EPILOG = """quick start:
  foldgpt compress smollm2-135m --text my_corpus/ --target-params 0.75 --out small/
  foldgpt eval smollm2-135m small/ --text held_out.txt --seq-len 512 --json ppl.json
  foldgpt analyze smollm2-135m gemma3-270m --text my_corpus/ --out analysis/
"""


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foldgpt", description="Compress LLMs in depth: gated removal + folding + cure.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("analyze", help="block redundancy: cosine, BI, similarity matrix, plots")
    a.add_argument("models", nargs="+")
    a.add_argument("--text", nargs="*", default=None)
    a.add_argument("--out", default="analysis")
    a.add_argument("--seq-len", type=int, default=256)
    a.add_argument("--n-seqs", type=int, default=32)
    a.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("compress", help="compress a model into a folder")
    c.add_argument("model", help="alias (smollm2-135m, gemma3-270m), local folder, .gguf file or hub id")
    c.add_argument("--text", nargs="*", default=None, help=".txt/.jsonl files, directories or dataset names")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--method", default="foldgpt")
    c.add_argument("--target-params", type=float, default=None, help="fraction of unique parameters kept (0.75)")
    c.add_argument("--remove-rate", type=float, default=None, help="fraction of layers removed")
    c.add_argument("--group-size", type=int, default=2)
    c.add_argument("--remove-share", type=float, default=0.5, help="with only a target: share of savings by removal")
    c.add_argument("--plan", default=None, help="re-apply a plan.json instead of learning one")
    c.add_argument("--ranking", choices=["search", "greedy", "gates"], default="search",
                   help="foldgpt's joint ranking: search (default: one search over keep / delete a sub-block / "
                        "delete / fitted low-rank child, by calibration-loss rise per parameter saved), greedy "
                        "(whole-layer or sub-block NLL removal, then children fold back) or learned gates")
    c.add_argument("--child-fractions", default="0.125,0.25", metavar="F,F",
                   help="search: the fitted children's sizes, as fractions of a block's parameters")
    c.add_argument("--rescore", type=int, default=6,
                   help="search: after the first step re-score only this many best actions (0: all, every step)")
    c.add_argument("--search-score", choices=["nll", "topk"], default="topk",
                   help="search: calibration NLL through the vocabulary head, or restricted to the teacher's top-k "
                        "tokens and the target (default; bench/search_agreement.py compares them)")
    c.add_argument("--confirm", type=int, default=0,
                   help="search: re-score this many best actions of each step with the exact NLL (default 0: off)")
    c.add_argument("--actions", default="attn,mlp,layer,child",
                   help="search: what it may do to a layer: delete its attention (attn) or MLP (mlp), delete it "
                        "(layer), make it a fitted child (child)")
    c.add_argument("--per-step", type=int, default=3,
                   help="search: actions taken per step (the best, then the next best of other layers)")
    c.add_argument("--no-alpha", dest="alpha", action="store_false",
                   help="search: fitted children never add alpha * parent (own low-rank factors only)")
    c.add_argument("--no-child-gates", dest="child_gates", action="store_false",
                   help="children run their parent's block at full weight (no measured branch gate)")
    c.add_argument("--unit", choices=["auto", "layer", "sublayer"], default="auto",
                   help="ranking unit: whole layers, or attention/MLP sub-blocks (greedy: BlockPruner's search, "
                        "then removed whole layers fold back as children); auto (default): greedy runs both "
                        "searches and folds sub-blocks only when their calibration NLL rise is clearly smaller "
                        "(<= 0.6 x the layer search's), else layers; gates rank whole layers")
    c.add_argument("--protect-ends", action="store_true", help="never remove the first and last layer")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--calib-seqs", type=int, default=512)
    c.add_argument("--gate-steps", type=int, default=40)
    c.add_argument("--gate-rounds", type=int, default=5)
    c.add_argument("--gate-budget", choices=["project", "penalty"], default="project")
    c.add_argument("--adapter-rank", type=int, default=8)
    c.add_argument("--adapter-init", choices=["zero", "svd"], default="zero",
                   help="greedy/gates rankings: how children's deltas start (the search always fits them)")
    c.add_argument("--fold-select", choices=["loss", "adjacent"], default="loss")
    c.add_argument("--fold-across-kinds", action="store_true",
                   help="a folded child may borrow a kept layer of another attention kind (Gemma-3 sliding-window "
                        "and global layers; same weight shapes) when measurement says it helps")
    c.add_argument("--cure-steps", type=int, default=CureConfig.steps)
    c.add_argument("--cure-lr", type=float, default=2e-3)
    c.add_argument("--child-lr-scale", type=float, default=CureConfig.child_lr_scale,
                   help="learning-rate factor for the fitted children's factors in the cure")
    c.add_argument("--tail-layers", type=int, default=2)
    cure = c.add_mutually_exclusive_group()
    cure.add_argument("--cure", dest="cure", action="store_true", default=None, help="cure any method")
    cure.add_argument("--no-cure", dest="cure", action="store_false")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--cure-seed", type=int, default=None,
                   help="the cure's own seed (data order, adapter init; default: --seed), to measure cure noise")
    _add_run_args(c)
    c.add_argument("--convert-cache", default=None, help="where GGUF conversions are cached")

    e = sub.add_parser("eval", help="perplexity of one or more models on the same text")
    e.add_argument("models", nargs="+")
    e.add_argument("--text", nargs="*", default=None)
    e.add_argument("--tasks", default="", help="comma list of BIG-bench task.json (or folders) / JSONL files")
    e.add_argument("--task-limit", type=int, default=None, help="first N examples of each task")
    e.add_argument("--cloze", type=int, default=0, help="a LAMBADA-style cloze task of N examples from --text")
    e.add_argument("--lm-eval", default="", help="comma list of lm-evaluation-harness tasks (optional extra)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", default=None)
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    e.add_argument("--device-map", choices=["auto", "offload"], default=None,
                   help="auto: layers spread over the GPUs (the rest offloaded); offload: layers copied to --device "
                        "as they run")
    e.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="with --device-map auto, e.g. cuda:0=30GiB,cpu=64GiB")

    b = sub.add_parser("bench", help="every method at every target on the same data: one table")
    b.add_argument("model")
    b.add_argument("--methods", default="shortgpt,foldgpt",
                   help="comma list of methods, ablation variants, or METHOD[key=value;...] config overrides")
    b.add_argument("--targets", default="0.75,0.6", help="fractions of unique parameters kept")
    b.add_argument("--text", nargs="*", default=None)
    b.add_argument("--eval-text", nargs="+", required=True)
    b.add_argument("--tasks", default="", help="comma list of BIG-bench task.json / JSONL paths")
    b.add_argument("--task-limit", type=int, default=None)
    b.add_argument("--cloze", type=int, default=0, help="also a LAMBADA-style cloze task of N examples")
    b.add_argument("--cure", action="store_true", help="also run every peer followed by the same cure")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--eval-seq-len", type=int, default=512)
    b.add_argument("--eval-max-tokens", type=int, default=None)
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--calib-seqs", type=int, default=512)
    b.add_argument("--gate-steps", type=int, default=40)
    b.add_argument("--cure-steps", type=int, default=CureConfig.steps)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--resume", action="store_true",
                   help="keep the rows already finished in OUT.rows.jsonl (same command) and run the rest")
    _add_run_args(b)

    x = sub.add_parser("export", help="export a folded model as a plain base-architecture checkpoint")
    x.add_argument("model_dir")
    x.add_argument("--dense", required=True, metavar="OUT", help="output folder")
    x.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("info", help="what was removed and folded, and the sizes")
    i.add_argument("model_dir")
    i.add_argument("--json", action="store_true", help="print JSON")

    g = sub.add_parser("generate", help="generate text (chat template when the tokenizer has one)")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample (default greedy)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--seed", type=int, default=0)
    return p


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by compress and bench: where and in what precision the training stages run."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--streaming", action="store_true",
                   help="analysis and SLEB/BlockPruner scores layer by layer on --device, model kept on the CPU")
    p.add_argument("--device-map", choices=["auto", "offload"], default=None,
                   help="auto: spread the layers over the GPUs (what does not fit is offloaded to the CPU); "
                        "offload: every layer stays on the CPU and is copied to --device while it runs")
    p.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="with --device-map auto: memory per device for the layers, e.g. cuda:0=30GiB,cpu=200GiB "
                        "(cpu present: offload the rest; default: 90%% of each GPU's free memory)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast for gate training and fold costs (auto: bf16 on a GPU or a CPU with bf16 "
                        "instructions, else fp32)")
    p.add_argument("--cure-precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast for the cure")
    p.add_argument("--cure-lora-rank", type=int, default=8,
                   help="rank of the cure's adapters on every unique Linear (merged afterwards; 0: none)")
    p.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the teacher's top-k log-probs and tail outputs once, on disk, before the cure "
                        "(default; --no-teacher-cache runs the teacher inside the cure loop)")
    p.add_argument("--teacher-topk", type=int, default=64, help="k of the cached teacher distribution")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard each shared frozen matrix of the student across the processes in the "
                        "cure (FSDP2); without it the cure is data-parallel with replicated weights")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="gate training and cure micro-batch (gradient accumulation; less memory)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in gate training and the cure (less memory)")
    p.add_argument("--compensate", choices=["none", "replaceme", "linearpatch"], default="none",
                   help="training-free compensation of each deleted span of layers, merged into the last kept "
                        "layer's MLP down projection (no parameter added): replaceme (least-squares linear map) or "
                        "linearpatch (channel scale in a Hadamard basis); any method")


def _run_kwargs(args) -> tuple[dict, dict, dict]:
    """(CompressConfig, GateConfig, CureConfig) keyword arguments from _add_run_args' options."""
    memory = {"micro_batch": args.micro_batch, "grad_checkpointing": args.grad_checkpointing}
    return ({"device": args.device, "precision": args.precision, "streaming": args.streaming,
             "device_map": args.device_map, "max_memory": args.max_memory, "compensate": args.compensate}, memory,
            {"precision": args.cure_precision, "lora_rank": args.cure_lora_rank, "teacher_cache": args.teacher_cache,
             "teacher_topk": args.teacher_topk, "fsdp": args.fsdp, **memory})


def _floats(text: str) -> list[float]:
    from .errors import FoldGPTError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FoldGPTError(f"expected comma-separated numbers, got '{text}'") from None


def _compress(args) -> int:
    from .api import compress
    from .config import CompressConfig, CureConfig, FoldConfig, GateConfig

    target = args.target_params
    if target is None and args.remove_rate is None and args.plan is None:
        target = 0.75
    run_kw, gate_kw, cure_kw = _run_kwargs(args)
    cure_cfg = CureConfig(steps=args.cure_steps, lr=args.cure_lr, tail_layers=args.tail_layers, seed=args.cure_seed,
                          child_lr_scale=args.child_lr_scale,
                          **cure_kw)
    cfg = CompressConfig(
        method=args.method, target_params=target, remove_rate=args.remove_rate, remove_share=args.remove_share,
        ranking=args.ranking, protect_ends=args.protect_ends, seq_len=args.seq_len, calib_seqs=args.calib_seqs,
        seed=args.seed, cure=args.cure,
        gate=GateConfig(unit=args.unit, steps=args.gate_steps, rounds=args.gate_rounds, budget=args.gate_budget,
                        **gate_kw),
        fold=FoldConfig(group_size=args.group_size, adapter_rank=args.adapter_rank, adapter_init=args.adapter_init,
                        select=args.fold_select, child_gates=args.child_gates,
                        across_kinds=args.fold_across_kinds, child_fractions=_floats(args.child_fractions),
                        rescore=args.rescore, score=args.search_score, alpha=args.alpha,
                        confirm=args.confirm, per_step=args.per_step,
                        actions=[a.strip() for a in args.actions.split(",") if a.strip()]),
        cure_cfg=cure_cfg, **run_kw,
    ) if target is not None or args.remove_rate is not None else CompressConfig(
        method=args.method, target_params=None, remove_rate=0.0, seed=args.seed, cure=args.cure,
        cure_cfg=cure_cfg, **run_kw)
    res = compress(args.model, args.text, args.out, cfg, plan=args.plan, overwrite=args.overwrite,
                   convert_cache=args.convert_cache)
    print(res.table)
    print(f"\nwrote {res.out}")
    return 0


@contextmanager
def _distributed(args):
    """Under torchrun (WORLD_SIZE > 1): one process group for the data-parallel (or --fsdp) cure, each process on
    its own GPU (cuda:LOCAL_RANK) with NCCL, or on the CPU with gloo; only rank 0 logs at INFO and writes."""
    from .errors import FoldGPTError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        if getattr(args, "fsdp", False):
            raise FoldGPTError("--fsdp shards the cure across processes: launch with "
                               "torchrun --nproc-per-node N -m foldgpt.cli compress ... (N >= 2)")
        yield
        return
    import torch
    import torch.distributed as dist

    gpu = args.device.startswith("cuda")
    if gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if gpu else "gloo")
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from .errors import FoldGPTError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.cmd == "compress":
            with _distributed(args):
                return _compress(args)
        if args.cmd == "eval":
            from .api import evaluate
            from .report import eval_table

            rows = evaluate(args.models, args.text, args.seq_len, args.max_tokens, args.json, args.batch_size,
                            [t for t in args.tasks.split(",") if t], args.task_limit, args.cloze,
                            [t for t in args.lm_eval.split(",") if t], device=args.device,
                            device_map=args.device_map, max_memory=args.max_memory)
            print(eval_table(rows))
            return 0
        if args.cmd == "bench":
            from .bench import bench
            from .config import CompressConfig, CureConfig, GateConfig

            run_kw, gate_kw, cure_kw = _run_kwargs(args)
            base = CompressConfig(seq_len=args.seq_len, calib_seqs=args.calib_seqs, seed=args.seed,
                                  gate=GateConfig(steps=args.gate_steps, **gate_kw),
                                  cure_cfg=CureConfig(steps=args.cure_steps, **cure_kw), **run_kw)
            from .bench import split_methods

            bench(args.model, split_methods(args.methods), _floats(args.targets), args.text,
                  args.eval_text, args.out, [t for t in args.tasks.split(",") if t], args.cure, base,
                  args.eval_seq_len, args.eval_max_tokens, args.task_limit, args.cloze, args.overwrite,
                  resume=args.resume)
            print((__import__("pathlib").Path(args.out) / "results.md").read_text())
            return 0
        if args.cmd == "export":
            from .export import export_dense

            print(f"wrote {export_dense(args.model_dir, args.dense, args.overwrite)}")
            return 0
        if args.cmd == "info":
            from .api import info
            from .report import info_text

            data = info(args.model_dir)
            print(json.dumps(data, indent=2) if args.json else info_text(data))
            return 0
        if args.cmd == "generate":
            from .api import generate

            print(generate(args.model_dir, args.prompt, args.max_new_tokens, args.sample, args.temperature,
                           chat=not args.no_chat, seed=args.seed))
            return 0
        if args.cmd == "analyze":
            from .api import analyze

            res = analyze(args.models, args.text, args.out, args.seq_len, args.n_seqs, args.seed)
            print(json.dumps({m: [round(x, 4) for x in r["cosine"]] for m, r in res.items()}))
            return 0
    except FoldGPTError as exc:
        print(f"foldgpt: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
