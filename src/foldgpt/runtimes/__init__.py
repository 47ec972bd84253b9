"""On-device runtimes: exports of a folded model that other programs run.

onnx         an ONNX causal-LM graph in which each shared matrix is one initializer (onnxruntime runs it)
gguf_export  a dense GGUF (llama.cpp's format) of the folded model expanded to its base architecture
executorch_export  an ExecuTorch program (.pte, XNNPACK delegate) in which each shared matrix is stored once

Each runtime's packages are optional (extras `foldgpt[onnx]`, `foldgpt[gguf]`, `foldgpt[executorch]`): `require`
turns a missing one
into one clear line before anything is written."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import FoldGPTError


def require(modules: list[str], what: str, extra: str) -> None:
    """Raise a one-line FoldGPTError naming the missing packages (and the extra that installs them)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FoldGPTError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                           f"installed; pip install 'foldgpt[{extra}]'")


def check_output_file(out: str | Path, overwrite: bool, suffix: str, inputs: tuple = ()) -> Path:
    """The output file as a Path, after the checks every export makes before it starts (fileio.check_output:
    writable place, not the input, not an existing file without `overwrite`)."""
    from ..fileio import check_output

    out = Path(out)
    option = "--" + suffix.lstrip(".")
    if out.suffix.lower() != suffix:
        raise FoldGPTError(f"the output file must end in {suffix}: {out}; give {option} a name like model{suffix}")
    return check_output(out, overwrite, option=option, file=True, inputs=inputs)


def file_bytes(path: str | Path) -> int:
    """Bytes on disk of an exported file together with its external-data file, if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def rss_bytes() -> int:
    """This process's resident memory."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def unique_param_bytes(model_dir: str | Path, bytes_per_param: int = 4) -> int:
    """Bytes of the parameters a model folder stores (each shared tensor once in a folded folder), at
    `bytes_per_param` bytes each (4: fp32), read from the safetensors headers without loading the tensors."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FoldGPTError(f"{model_dir} holds no .safetensors weights; give a model folder")
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n += count
    return n * bytes_per_param


def perplexity(logits, windows) -> float:
    """Next-token perplexity of `logits` (n, length, vocab) within `windows` (n, length) of token ids: the measure
    that matters for a quantized export, where max-abs logit differences mislead."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            windows[:, 1:].reshape(-1))
    return float(nll.exp())


def token_windows(vocab_size: int, n: int, seq_len: int, seed: int = 0, ids=None):
    """`n` windows of `seq_len` token ids, shape (n, seq_len): evenly spaced slices of `ids` (a tokenized text)
    when it is long enough, else seeded random ids below `vocab_size`."""
    import torch

    if ids is not None:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() >= seq_len:
            starts = torch.linspace(0, ids.numel() - seq_len, n).long().tolist()
            return torch.stack([ids[s : s + seq_len] for s in starts])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq_len), generator=g)
