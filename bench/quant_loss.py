"""What weight-only quantization costs a model, level by level: calibration loss (the 16 windows of 256 tokens every
compress measures, from the five Austen calibration novels) and held-out perplexity (the first 16,384 tokens of Pride
and Prejudice, 512-token windows), against the bytes of the weights file. The numbers behind `--target-size`'s
rule (docs/size.md).

    python bench/quant_loss.py smollm2-135m --out bench/results/quant_loss_smollm2-135m

MODEL: an alias or a model folder (dense or folded). Rows: the unquantized model, the int8 and int4 levels, and
variants of int4 that the product does not use (other group sizes, an int4 embedding), to show why it uses what
it does. Calibration text as bench/compress_time.py (SHARED_DATA overrides where the data is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CALIB = ["emma", "mansfieldpark", "sensesensibility", "northangerabbey", "persuasion"]
# name -> (level, group size, embedding bits, HQQ scales)
VARIANTS = {
    "none": ("none", 32, 8, True),
    "int8": ("int8", 32, 8, True),
    "int4": ("int4", 32, 8, True),
    "int4, absmax scales (no HQQ)": ("int4", 32, 8, False),
    "int4, groups of 16": ("int4", 16, 8, True),
    "int4, groups of 64": ("int4", 64, 8, True),
    "int4, int4 embedding too": ("int4", 32, 4, True),
}


def data_dir() -> Path:
    return Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "corpora" / "austen"


def weights_bytes(model) -> int:
    """The size of the weights file foldgpt writes for `model` (its unique tensors once)."""
    from safetensors.torch import save_file

    from foldgpt.checkpoint.folded import dedup_state_dict
    from foldgpt.quant import saved_state

    state = saved_state(model) if getattr(model, "fold_quantization", None) else dedup_state_dict(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/w.safetensors")
        return os.path.getsize(f"{tmp}/w.safetensors")


def measure(model, tok, bos: bool, held, eval_ids) -> dict:
    """Calibration loss, and held-out perplexity unless `eval_ids` is None."""
    from foldgpt.config import EvalConfig
    from foldgpt.evaluation.evaluate import evaluate_model
    from foldgpt.pipeline import calibration_loss

    t = time.perf_counter()
    out = {"calib_loss": calibration_loss(model, held)}
    if eval_ids is not None:
        ev = evaluate_model(model, tok, bos, {"pp": eval_ids}, EvalConfig(seq_len=512, max_tokens=16384), None)
        out.update(perplexity=ev.perplexity["pp"].perplexity, nll=ev.perplexity["pp"].nll)
    return {**out, "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True, help="folder for quant_loss.json and quant_loss.md")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--no-ppl", action="store_true", help="calibration loss only (bench/pareto.py has perplexities)")
    args = ap.parse_args()
    from foldgpt.adapters import get_adapter
    from foldgpt.data import load_text, mixed_calibration, needs_bos, tokenize
    from foldgpt.models import load_model
    from foldgpt.quant import quantize_model_, resident_bytes

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    bos = needs_bos(tok, get_adapter(model.config).needs_bos)
    ids = tokenize(tok, load_text([str(data_dir() / f"austen_{n}.txt") for n in CALIB]).text)
    held = mixed_calibration(ids, None, 512, 256, 0, 0.0, tok.bos_token_id if bos else None)[:16]
    eval_ids = None if args.no_ppl else tokenize(
        tok, load_text([str(data_dir() / "austen_prideprejudice.txt")], split="test").text)
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        level, group, emb_bits, hqq = VARIANTS[name]
        m, _ = load_model(args.model)
        if level != "none":
            quantize_model_(m, level, group_size=group, embedding_bits=emb_bits, hqq=hqq)
        row = {"variant": name, "level": level, "group_size": group, "embedding_bits": emb_bits if level != "none"
               else 32, "hqq": hqq, "weights_bytes": weights_bytes(m), "resident_bytes": resident_bytes(m),
               **measure(m, tok, bos, held, eval_ids)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del m
    base = rows[0] if rows and rows[0]["level"] == "none" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_loss.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    lines = [f"# Weight-only quantization of {args.model}", "",
             "| variant | weights MB | resident MB | calib loss | rise (nats) | PPL P&P | rise per MB saved (nats) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rise = r["calib_loss"] - base["calib_loss"] if base else float("nan")
        saved = (base["weights_bytes"] - r["weights_bytes"]) / 1e6 if base else 0
        per = f"{rise / saved:.5f}" if base and saved > 0 else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['variant']} | {r['weights_bytes'] / 1e6:.1f} | {r['resident_bytes'] / 1e6:.1f} | "
                     f"{r['calib_loss']:.4f} | {rise:+.4f} | {ppl} | {per} |")
    (out / "quant_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
