"""`foldgpt` command line: a thin layer over foldgpt.api. The options and the configurations they make are in
cli_parser.py; this module runs the commands."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .cli_parser import build_parser, compress_config, eval_config, settings


def _compress(args) -> int:
    from .api import compress

    cfg = compress_config(args)
    with _distributed(cfg.cure.fsdp, cfg.device) as device:
        cfg.device = device
        res = compress(args.model, args.text, args.out, cfg, plan=args.plan, overwrite=args.overwrite,
                       convert_cache=args.convert_cache, fresh=args.fresh)
    print(res.table)
    print(f"\nwrote {res.out}")
    return 0


@contextmanager
def _distributed(fsdp: bool, device: str):
    """Under torchrun (WORLD_SIZE > 1): one process group for the data-parallel (or --fsdp) cure, each process on
    its own GPU (cuda:LOCAL_RANK) with NCCL, or on the CPU with gloo; only rank 0 logs at INFO and writes.
    Yields the device this process runs on."""
    from .errors import FoldGPTError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        if fsdp:
            raise FoldGPTError("--fsdp shards the cure across processes: launch with "
                               "torchrun --nproc-per-node N -m foldgpt.cli compress ... (N >= 2)")
        yield device
        return
    import torch
    import torch.distributed as dist

    gpu = device.startswith("cuda")
    if gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if gpu else "gloo")
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _eval(args) -> int:
    from .api import evaluate
    from .report import eval_table

    rows = evaluate(args.models, args.text, eval_config(args), json_out=args.json, **settings(args, "api"))
    print(eval_table(rows))
    return 0


def _bench(args) -> int:
    from .bench import bench, split_methods

    targets = args.target_size or args.targets  # byte budgets (--target-size) or parameter fractions
    bench(args.model, split_methods(args.methods), targets, args.text, args.eval_text, args.out, args.cure,
          compress_config(args), eval_config(args), overwrite=args.overwrite, resume=args.resume)
    print((Path(args.out) / "results.md").read_text())
    return 0


def _export(args) -> int:
    from .api import export
    from .errors import FoldGPTError

    if args.int8 and not (args.onnx or args.executorch):
        raise FoldGPTError("--int8 applies to --onnx and --executorch only; drop it or use one of them")
    if args.seq_len is not None and not args.executorch:
        raise FoldGPTError("--seq-len applies to --executorch only; drop it or use --executorch")
    fmt, out = next((f, getattr(args, f)) for f in ("dense", "onnx", "gguf", "executorch") if getattr(args, f))
    path = export(args.model_dir, out, fmt, overwrite=args.overwrite, int8=args.int8, gguf_dtype=args.gguf_dtype,
                  seq_len=args.seq_len)
    print(f"wrote {path}")
    return 0


def _info(args) -> int:
    from .api import info
    from .report import info_text

    data = info(args.model_dir)
    print(json.dumps(data, indent=2) if args.json else info_text(data))
    return 0


def _generate(args) -> int:
    from .api import generate

    print(generate(args.model_dir, args.prompt, chat=not args.no_chat, **settings(args, "api")))
    return 0


def _analyze(args) -> int:
    from .api import analyze

    res = analyze(args.models, args.text, **settings(args, "api"))
    print(json.dumps({m: [round(x, 4) for x in r["cosine"]] for m, r in res.items()}))
    return 0


COMMANDS = {"compress": _compress, "eval": _eval, "bench": _bench, "export": _export, "info": _info,
            "generate": _generate, "analyze": _analyze}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Ctrl-C or SIGTERM at any point, even while torch is being imported, ends with one line and
    exit 130 / 143 once the `finally` blocks on the way have removed what the run made (signals.py); a full disk
    anywhere ends with one line and exit 2."""
    from . import signals
    from .fileio import disk_full, disk_full_error

    with signals.terminate_raises():
        try:
            from .checkpoint.auto import register_auto_classes  # `import foldgpt` leaves it to the command line

            register_auto_classes()
            return _main(argv)
        except (KeyboardInterrupt, signals.Terminated) as exc:
            return signals.report(exc, argv)
        except Exception as exc:
            if not disk_full(exc):
                raise
            print(f"foldgpt: error: {disk_full_error(getattr(exc, 'filename', None) or 'its files')}", file=sys.stderr)
            return 2


def _main(argv: list[str] | None = None) -> int:
    from .errors import FoldGPTError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.cmd](args)
    except FoldGPTError as exc:
        print(f"foldgpt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
