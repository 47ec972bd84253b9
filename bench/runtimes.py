"""On-device formats of one folded model next to its dense base: file size, max-abs logit difference, resident
memory and tokens/s.

    python bench/runtimes.py runs/smol-fold-075 --base smollm2-135m --text novel.txt --out bench/results/runtimes.md

Rows: the folded safetensors folder (torch, the reference), its ONNX export (fp32, each shared matrix once; with and
without onnxruntime's per-MatMul weight prepacking; int8), the dense base exported the same way, and the dense
GGUF (f16 and f32) read back by transformers' GGUF loader (its size; no llama.cpp run here). ONNX rows run in a
fresh process each (foldgpt.runtimes.onnx.measure_session): RSS is the growth from creating the session and running
the first window; tokens/s is prompt processing, one full forward of `--seq-len` tokens per window, batch 1, no KV
cache. Logit differences are against the model the file was made from (the folded model, or the dense base for its
rows). Torch's tokens/s is measured in this process with the same windows.

ExecuTorch rows (`--formats executorch`): the folded model, the dense base and the folded model expanded to its base
architecture (what `export --dense` writes: the same function without the sharing), each as an XNNPACK program of
`--seq-len` tokens in fp32 and int8 (foldgpt.runtimes.executorch_export), run by ExecuTorch's Python runtime in a
fresh process (RSS: growth from loading the program and running the first window; thread pool: `--threads`). A tied
LM head reads the int8 embedding's table (stored once); the extra row "LM head untied" gives it its own int8 copy,
for what the tie costs per run.
`unique MB` is the unique-parameter bytes of the source at the file's precision (4 or 1 byte per parameter);
`perplexity` is next-token perplexity within the windows (ONNX and ExecuTorch rows; the fp32 model's is in the torch
rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def torch_row(model, windows, folder: Path) -> dict:
    import torch

    with torch.no_grad():
        model(input_ids=windows[:1], use_cache=False)
        t = time.perf_counter()
        logits = [model(input_ids=windows[i : i + 1], use_cache=False).logits for i in range(len(windows))]
        elapsed = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    logits = torch.cat(logits)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return {"file_bytes": size, "max_abs_diff": 0.0, "rss_bytes": None, "tokens_per_s": windows.numel() / elapsed,
            "ppl": nll.exp().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folded", help="a folded model folder (foldgpt compress --out)")
    p.add_argument("--base", required=True, help="its dense base: alias, folder or .gguf")
    p.add_argument("--text", help="text to take the token windows from (default: random ids)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--work", default=None, help="folder for the exported files (default: a temporary one)")
    p.add_argument("--formats", default="onnx,gguf", help="comma-separated: onnx, gguf, executorch")
    p.add_argument("--reuse", action="store_true", help="ExecuTorch: run the .pte files already in --work")
    p.add_argument("--out", help="write the table (markdown) here, and the rows as JSON beside it")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import tempfile

    import torch

    import foldgpt
    from foldgpt.models import resolve
    from foldgpt.runtimes import token_windows, unique_param_bytes
    from foldgpt.runtimes.gguf_export import check_gguf, export_gguf
    from foldgpt.runtimes.onnx import check_onnx, model_to_onnx, quantize_onnx

    formats = set(a.formats.split(","))
    if not formats <= {"onnx", "gguf", "executorch"}:
        p.error(f"--formats: unknown {sorted(formats - {'onnx', 'gguf', 'executorch'})}")
    torch.set_num_threads(a.threads or torch.get_num_threads())
    work = Path(a.work or tempfile.mkdtemp(prefix="foldgpt-runtimes-"))
    work.mkdir(parents=True, exist_ok=True)
    folded_dir, base_dir = Path(a.folded), Path(resolve(a.base))
    text = Path(a.text).read_text() if a.text else None
    folded, tok = foldgpt.load(folded_dir)
    base, _ = foldgpt.load(base_dir)
    ids = tok(text[:200_000])["input_ids"] if text else None
    windows = token_windows(int(folded.config.vocab_size), a.windows, a.seq_len, 0, ids)
    kw = dict(n_windows=a.windows, seq_len=a.seq_len, text=text[:200_000] if text else None, threads=a.threads)
    rows = [("folded safetensors (torch)", torch_row(folded, windows, folded_dir)),
            ("dense safetensors (torch)", torch_row(base, windows, base_dir))]

    if "onnx" in formats:
        f32 = model_to_onnx(folded, work / "folded.onnx", overwrite=True)
        rows.append(("folded ONNX fp32", check_onnx(folded_dir, f32, reference=folded, **kw)))
        rows.append(("folded ONNX fp32, no prepacking", check_onnx(folded_dir, f32, reference=folded, prepack=False,
                                                                   **kw)))
        q = quantize_onnx(f32, work / "folded-int8.onnx", overwrite=True)
        rows.append(("folded ONNX int8", check_onnx(folded_dir, q, reference=folded, **kw)))
        d32 = model_to_onnx(base, work / "dense.onnx", overwrite=True)
        rows.append(("dense ONNX fp32", check_onnx(base_dir, d32, reference=base, **kw)))
        dq = quantize_onnx(d32, work / "dense-int8.onnx", overwrite=True)
        rows.append(("dense ONNX int8", check_onnx(base_dir, dq, reference=base, **kw)))
    if "gguf" in formats:
        for dtype in ("f16", "f32"):
            g = export_gguf(folded_dir, work / f"folded-{dtype}.gguf", overwrite=True, dtype=dtype)
            res = check_gguf(folded_dir, g, n_windows=a.windows, seq_len=a.seq_len, text=kw["text"])
            rows.append((f"folded GGUF {dtype} (dense, transformers load-back)",
                         {**res, "rss_bytes": None, "tokens_per_s": None}))
    if "executorch" in formats:
        from foldgpt.checkpoint.export import to_dense
        from foldgpt.runtimes.executorch_export import check_executorch, model_to_executorch

        ekw = dict(n_windows=a.windows, text=kw["text"], threads=a.threads)
        n_expanded = sum(p.numel() for p in to_dense(folded).parameters())  # a tied matrix counted once

        def pte_of(name: str, make, int8: bool, **kw) -> Path:
            """work/NAME-fp32|int8.pte, exported from make() (a fresh module: --int8 quantizes it in place), or
            the existing file with --reuse."""
            out = work / f"{name}-{'int8' if int8 else 'fp32'}.pte"
            if a.reuse and out.is_file():
                return out
            return model_to_executorch(make(), out, overwrite=True, int8=int8, seq_len=a.seq_len, **kw)

        for int8 in (False, True):
            tag = "int8" if int8 else "fp32"
            pte = pte_of("folded", lambda: foldgpt.load(folded_dir)[0], int8)
            rows.append((f"folded ExecuTorch {tag}", check_executorch(folded_dir, pte, reference=folded, **ekw)))
            if int8 and folded.get_output_embeddings().weight is folded.get_input_embeddings().weight:
                pte = pte_of("folded-untied", lambda: foldgpt.load(folded_dir)[0], int8, tie_int8_head=False)
                rows.append(("folded ExecuTorch int8, LM head untied (embedding twice)",
                             check_executorch(folded_dir, pte, reference=folded, **ekw)))
            pte = pte_of("expanded", lambda: to_dense(folded), int8)
            res = check_executorch(folded_dir, pte, reference=folded, **ekw)  # the same function as the folded model
            res["unique_param_bytes"] = n_expanded * (1 if int8 else 4)
            rows.append((f"folded expanded to dense (export --dense) ExecuTorch {tag}", res))
            pte = pte_of("dense", lambda: foldgpt.load(base_dir)[0], int8)
            rows.append((f"dense ExecuTorch {tag}", check_executorch(base_dir, pte, reference=base, **ekw)))

    unique = unique_param_bytes(folded_dir)
    lines = [f"folded: `{folded_dir}` ({unique / 1e6:.1f} MB of unique fp32 parameters); dense base: `{a.base}` "
             f"({unique_param_bytes(base_dir) / 1e6:.1f} MB); {a.windows} windows of {a.seq_len} tokens"
             f"{' from ' + a.text if a.text else ' (random ids)'}, runtime threads: {a.threads or 'default'}",
             "", "| format | file MB | unique MB | max-abs logit diff | perplexity | RSS MB | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for name, r in rows:
        rss = None if r.get("rss_bytes") is None else r["rss_bytes"] / 1e6
        uniq = None  # at the file's precision
        if "ExecuTorch" in name or "ONNX" in name:
            uniq = r["unique_param_bytes_int8" if "ONNX int8" in name else "unique_param_bytes"] / 1e6
        lines.append(f"| {name} | {r['file_bytes'] / 1e6:.1f} | {fmt(uniq, '.1f')} | {fmt(r['max_abs_diff'], '.2e')} "
                     f"| {fmt(r.get('ppl'), '.2f')} | {fmt(rss, '.0f')} | {fmt(r.get('tokens_per_s'), '.0f')} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(table + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(dict(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
