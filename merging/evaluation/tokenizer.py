"""CLIP's byte-pair tokenizer without importing open_clip.

open_clip's ``SimpleTokenizer`` (OpenAI's CLIP tokenizer) is all a CLIP text tower needs, but
``import open_clip`` pulls in torchvision, torch._dynamo, transformers and timm: about two
seconds of a command-line run spent before the first text is tokenized. This module
reproduces that tokenizer token for token (open_clip_torch 3.3.0, default ``clean="lower"``,
no reduction mask, no additional special tokens) from the same BPE vocabulary file, which it
finds inside the installed open_clip package without executing it.

:func:`tokenizer_for` decides, from an open_clip model config's ``text_cfg``, whether that
model's tokenizer is this plain one; when it is not (a Hugging Face tokenizer, tokenizer
options, another vocabulary) it answers ``None`` and the caller keeps using open_clip.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import ftfy
import regex
import torch

from merging.errors import MergingError

DEFAULT_CONTEXT_LENGTH = 77
"""OpenAI CLIP's context length, and open_clip's default when a config names none."""
VOCAB_SIZE = 49408
"""256 bytes, 256 word-final bytes, 48,894 merges and the two special tokens."""
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# open_clip reads the merges file's lines 1..48894 (line 0 is a version header): the
# 49,152-entry vocabulary of OpenAI's training less the 256 bytes and the two special tokens.
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)


def bpe_path() -> Path:
    """The BPE merges file shipped inside the installed open_clip package.

    ``find_spec`` of a top-level package locates it without running its ``__init__``, so
    nothing of open_clip (nor torchvision, transformers, timm) is imported.
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / BPE_FILE
        if path.is_file():
            return path
    raise MergingError(f"cannot find CLIP's BPE vocabulary {BPE_FILE}: is open_clip_torch installed?")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 bytes to printable characters (the BPE works on
    these, so that no byte maps to whitespace or a control character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(2**8):
        if byte not in printable:
            printable.append(byte)
            chars.append(2**8 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@dataclass
class _Vocabulary:
    """The BPE tables and the word cache, shared by every tokenizer of the process.

    Built exactly as open_clip builds them (including which index a repeated entry keeps),
    so that ids agree. The cache maps a byte-encoded word to its token ids; open_clip keeps
    the same word-level cache (of BPE strings) per tokenizer, because most words recur.
    """

    encoder: dict[str, int]
    bpe_ranks: dict[tuple[str, ...], int]
    byte_encoder: dict[int, str]
    pattern: Any
    cache: dict[str, tuple[int, ...]] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _vocabulary() -> _Vocabulary:
    """Read the merges file once per process, on the first tokenization (not at import)."""
    with gzip.open(bpe_path()) as file:
        lines = file.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[_MERGE_LINES]]
    byte_encoder = _bytes_to_unicode()
    vocab = list(byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(merge) for merge in merges)
    vocab.extend(SPECIAL_TOKENS)
    encoder = {token: index for index, token in enumerate(vocab)}  # a repeat keeps its last index
    if len(encoder) != VOCAB_SIZE or [encoder[t] for t in SPECIAL_TOKENS] != [VOCAB_SIZE - 2, VOCAB_SIZE - 1]:
        # ClipTokenizer's start/end ids are these constants (so constructing one reads nothing).
        raise MergingError(f"{bpe_path()} is not CLIP's {VOCAB_SIZE}-token BPE vocabulary")
    # open_clip's word splitter: the special tokens, English contractions, runs of letters,
    # single digits, runs of anything else but whitespace.
    pattern = regex.compile(
        "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    # open_clip seeds its cache with the special tokens mapped to themselves (no "</w>"), so
    # "<start_of_text>" written in a text becomes the start token.
    cache = {token: (encoder[token],) for token in SPECIAL_TOKENS}
    return _Vocabulary(encoder, {merge: rank for rank, merge in enumerate(merges)}, byte_encoder, pattern, cache)


def clean_text(text: str) -> str:
    """open_clip's default cleaning (``clean="lower"``): fix mojibake with ftfy, unescape HTML
    entities twice (captions are often double-escaped), collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def _bpe(word: str, ranks: Mapping[tuple[str, ...], int]) -> list[str]:
    """Merge a byte-encoded word's symbols, lowest-ranked pair first, as open_clip does; the
    last symbol carries the end-of-word mark ``</w>``."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pair = min(pairwise(symbols), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        first, second = pair
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


class ClipTokenizer:
    """CLIP's tokenizer: ``[sot, BPE tokens..., eot]`` per text, truncated (keeping eot last)
    or zero-padded to ``context_length``; equal to open_clip's
    ``SimpleTokenizer(context_length=...)``."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        self.context_length = context_length
        self.vocab_size = VOCAB_SIZE
        self.sot_token_id = VOCAB_SIZE - 2
        self.eot_token_id = VOCAB_SIZE - 1

    def encode(self, text: str) -> list[int]:
        """The text's BPE token ids, without the start and end tokens."""
        vocabulary = _vocabulary()
        cache, byte_encoder = vocabulary.cache, vocabulary.byte_encoder
        ids: list[int] = []
        for token in vocabulary.pattern.findall(clean_text(text)):
            word = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            word_ids = cache.get(word)
            if word_ids is None:
                encoder = vocabulary.encoder
                word_ids = tuple(encoder[symbol] for symbol in _bpe(word, vocabulary.bpe_ranks))
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """A LongTensor [len(texts), context_length] (a single str counts as one text).

        ``context_length`` overrides the tokenizer's own for this call, as open_clip's does.
        """
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if not context_length or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        rows = []
        for text in texts:
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > context_length:
                # open_clip truncates and then overwrites the last kept token with eot, so the
                # text tower's argmax (eot has the highest id) still finds an end token.
                tokens = tokens[:context_length]
                tokens[-1] = self.eot_token_id
            rows.append(tokens + [0] * (context_length - len(tokens)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length})"


def tokenizer_for(text_cfg: Mapping[str, Any]) -> ClipTokenizer | None:
    """The tokenizer an open_clip model config's ``text_cfg`` implies, when it is the plain
    ``SimpleTokenizer``; ``None`` when open_clip would build anything else, so that the caller
    falls back to ``open_clip.get_tokenizer``.

    Mirrors ``open_clip.get_tokenizer`` (3.3.0), whose choice depends on these keys only:

    - ``hf_tokenizer_name``: when truthy, a Hugging Face tokenizer (open_clip tests truthiness,
      so ``""`` or ``null`` still means SimpleTokenizer, despite its comment saying otherwise);
    - ``tokenizer_kwargs``: passed to the tokenizer's constructor (``clean="canonicalize"``,
      ``reduction_mask``, ``additional_special_tokens``, ... change the tokens); only absent or
      ``{}`` is the plain tokenizer (``null`` makes open_clip fail);
    - ``context_length``: the padded length (default 77);
    - ``tokenizer_mode`` matters only with ``hf_tokenizer_name``.

    open_clip's SimpleTokenizer ignores ``vocab_size``, but a text tower whose vocabulary is
    not CLIP's 49,408 tokens (CoCa's 64,000) is not one this tokenizer was made for, so that
    is left to open_clip too. What the config cannot say is left to the caller: open_clip also
    picks a SigLIP tokenizer for *built-in* model names containing "siglip", and for an
    ``hf-hub:`` name whose config lacks ``model_cfg`` it uses the repository's HF tokenizer.
    """
    if text_cfg.get("hf_tokenizer_name"):
        return None
    if "tokenizer_kwargs" in text_cfg and text_cfg["tokenizer_kwargs"] != {}:
        return None
    if text_cfg.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        return None
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        return None
    return ClipTokenizer(context_length)
