"""A LAMBADA-style cloze task built from any text: predict a sentence's last word from the text before it."""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass

from torch import nn

from ..errors import FoldGPTError
from .scoring import score_requests

logger = logging.getLogger(__name__)


@dataclass
class ClozeExample:
    context: str
    target: str


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LAST_WORD = re.compile(r"(\S+?)[\"'.,;:!?)\]]*$")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if e > s]


def _cloze_at(text: str, span: tuple[int, int], context_chars: int) -> ClozeExample | None:
    s, e = span
    m = _LAST_WORD.search(text, s, e)
    if m is None or not m.group(1).isalpha() or len(m.group(1)) < 3:
        return None
    word_start = m.start(1)
    start = max(0, word_start - context_chars)
    if start > 0:  # begin at a word boundary, never inside the sentence
        nxt = text.find(" ", start)
        start = nxt + 1 if 0 <= nxt < word_start else start
    context = text[min(start, s) : word_start].rstrip()
    return ClozeExample(context, " " + m.group(1)) if context else None


def cloze_examples(text: str, n: int = 200, seed: int = 0, context_chars: int = 600) -> list[ClozeExample]:
    """LAMBADA-style examples: predict a sentence's last word from up to ~context_chars of preceding text.

    Whitespace is collapsed to single spaces; sentences end at . ! or ? followed by whitespace. A sentence
    qualifies if its last word (trailing punctuation stripped) is alphabetic and at least 3 characters
    long; `n` of them are drawn with random.Random(seed) and returned in text order."""
    text = " ".join(text.split())
    candidates = [ex for span in _sentence_spans(text) if (ex := _cloze_at(text, span, context_chars))]
    if not candidates:
        raise FoldGPTError("the text has no sentence ending in an alphabetic word of 3+ letters for a cloze task")
    picked = sorted(random.Random(seed).sample(range(len(candidates)), min(n, len(candidates))))
    return [candidates[i] for i in picked]


def evaluate_cloze(model: nn.Module, tokenizer, examples: list[ClozeExample], bos: bool = False,
                   batch_size: int = 8, max_length: int = 1024) -> dict:
    """{"n", "acc", "ppl", "tokens"}: greedy accuracy of the whole target word, and target perplexity."""
    if not examples:
        raise FoldGPTError("no cloze examples to evaluate")
    requests = [(ex.context, ex.target) for ex in examples]
    scores = score_requests(model, tokenizer, requests, bos, batch_size, max_length, desc="Cloze")
    tokens = sum(s.tokens for s in scores)
    nll = -sum(s.logprob for s in scores) / max(1, tokens)
    result = {"n": len(examples), "acc": sum(s.greedy for s in scores) / len(examples),
              "ppl": math.exp(nll), "tokens": tokens}
    logger.info("cloze: acc %.4f ppl %.3f (n=%d)", result["acc"], result["ppl"], result["n"])
    return result
