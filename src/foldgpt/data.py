"""Text for calibration and evaluation: files, directories, named datasets, and a built-in default."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FoldGPTError

log = logging.getLogger(__name__)

NAMED_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "c4": ("allenai/c4", "en", "text"),
    "pg19": ("pg19", None, "text"),
}
DEFAULT_TEXT = "python-docs"


@dataclass
class Corpus:
    """Loaded text with where it came from."""

    text: str
    sources: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _read_file(path: Path) -> list[str]:
    from .checks import decode_text_file

    text = decode_text_file(path)  # UTF-8 and not binary, else one line
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.split("\n")):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                raise FoldGPTError(
                    f"{path}:{i + 1} is not valid JSON; each line must be an object with 'text'"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise FoldGPTError(f"{path}:{i + 1} has no string field 'text'; each line must be a JSON object "
                                   "with the text in 'text'")
            docs.append(row["text"])
        return docs
    return [text]


def builtin_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())


def _named_dataset(name: str, split: str) -> list[str]:
    repo, subset, field = NAMED_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise FoldGPTError(f"text '{name}' needs the 'datasets' package: pip install 'foldgpt[data]'") from None
    try:
        ds = datasets.load_dataset(repo, subset, split=split, streaming=name != "wikitext2")
    except Exception as exc:  # noqa: BLE001 - network / hub errors come in many types
        raise FoldGPTError(
            f"cannot load dataset '{name}' ({type(exc).__name__}); the hub may be unreachable: pass local .txt/.jsonl"
        ) from None
    docs = []
    total = 0
    for row in ds:
        docs.append(row[field])
        total += len(row[field])
        if total > 20_000_000:
            break
    return docs


def load_text(specs: list[str] | str | None, split: str = "train") -> Corpus:
    """Load text from files, directories (all .txt/.jsonl inside, sorted) or named datasets.

    With no text given, use Python's own documentation (shipped with every Python installation).
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        log.warning(
            "no --text given: using Python's built-in documentation (pydoc topics) as calibration text; "
            "pass your own domain text (--text FILE/DIR) for better results"
        )
        return Corpus(builtin_text(), [DEFAULT_TEXT])
    docs: list[str] = []
    sources: list[str] = []
    for spec in specs:
        if spec == DEFAULT_TEXT:
            docs.append(builtin_text())
            sources.append(spec)
            continue
        if spec in NAMED_DATASETS and not Path(spec).exists():
            docs.extend(_named_dataset(spec, split))
            sources.append(spec)
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise FoldGPTError(f"directory {spec} contains no .txt or .jsonl files; give a folder of text "
                                   "files, or the files themselves")
            for f in files:
                docs.extend(_read_file(f))
                sources.append(str(f))
        elif path.is_file():
            docs.extend(_read_file(path))
            sources.append(str(path))
        else:
            raise FoldGPTError(
                f"text not found: '{spec}' (give a .txt/.jsonl file, a directory, "
                f"or one of {', '.join(NAMED_DATASETS)})"
            )
    text = "\n\n".join(d for d in docs if d)
    if not text.strip():
        raise FoldGPTError(f"the text given ({', '.join(specs)}) is empty; give text to work on")
    return Corpus(text, sources)


def byte_level_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained offline on `texts` (with <unk>, <s>, </s>): enough to turn text
    into ids for random or tiny models built from configs, which ship no tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a long text once, without special tokens, in chunks (fast and memory-safe)."""
    ids: list[int] = []
    chunk = 200_000
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk)
        if end < len(text):  # cut at whitespace so no word is split across chunks
            cut = text.rfind("\n", start, end)
            if cut <= start:
                cut = text.rfind(" ", start, end)
            end = cut if cut > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return torch.tensor(ids, dtype=torch.long)


def mixed_calibration(ids: torch.Tensor, general_ids: torch.Tensor | None, n_seqs: int, seq_len: int, seed: int,
                      share: float, bos_id: int | None = None) -> torch.Tensor:
    """Calibration windows of which round(share * n_seqs) come from `general_ids`, shuffled among the user's so that
    every prefix of the windows (the analysis and fit subsets) holds about the same share."""
    n_general = round(share * n_seqs) if general_ids is not None else 0
    n_general = min(n_general, n_seqs - 1)
    user = calibration_batches(ids, n_seqs - n_general, seq_len, seed, bos_id)
    if n_general <= 0:
        return user
    general = calibration_batches(general_ids, n_general, seq_len, seed + 1, bos_id)
    order = torch.randperm(n_seqs, generator=torch.Generator().manual_seed(seed + 2))
    return torch.cat([user, general])[order]


def needs_bos(tokenizer, adapter_needs_bos: bool) -> bool:
    """True when windows should start with BOS: the model family needs it, or the tokenizer adds it."""
    if tokenizer.bos_token_id is None:
        return False
    if adapter_needs_bos:
        return True
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def calibration_batches(
    ids: torch.Tensor, n_seqs: int, seq_len: int, seed: int, bos_id: int | None = None
) -> torch.Tensor:
    """Draw `n_seqs` random windows of `seq_len` tokens (BOS first when given); returns (N, T)."""
    body = seq_len - (1 if bos_id is not None else 0)
    if ids.numel() < body + 1:
        raise FoldGPTError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; give more text "
            "or a smaller --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    n_windows = ids.numel() // body
    if n_seqs <= n_windows:  # non-overlapping windows, random subset
        starts = torch.randperm(n_windows, generator=g)[:n_seqs] * body
    else:
        starts = torch.randint(0, ids.numel() - body, (n_seqs,), generator=g)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])  # (N, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows
