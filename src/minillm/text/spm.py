"""SentencePiece-style vocabularies as `tokenizers` BPE models: GGUF "llama" files (Llama 2, Mistral, Phi-3,
Gemma) and the "gemma4" BPE with spaces written as "▁".

llama.cpp's SentencePiece tokenizer puts one space before every piece of text (the start, and after each
special token) when `add_space_prefix` is set, even before a text that starts with spaces (" " is "▁▁", 259 in
Llama 2, not "▁"), turns spaces into "▁", then merges the best-scoring adjacent pair whose join is a token
until none is left, never splitting the text at spaces; characters that end up in no token become their
bytes' <0xXX> tokens.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

SPACE = "▁"


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge, ranked by the joined token's score (SentencePiece
    merges the best-scoring pair first); ties by the pieces' ids, as transformers' converter orders them.
    The ranking is numpy's, on ids: Gemma's 262144 pieces make 514906 merges (3.7 -> 1.6 s, Zen 3)."""
    get = {t: i for i, t in enumerate(tokens)}.get
    lefts, rights, joined = [], [], []
    for i, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left = get(token[:cut])
            if left is not None:
                right = get(token[cut:])
                if right is not None:
                    lefts.append(left)
                    rights.append(right)
                    joined.append(i)
    left_ids, right_ids = np.array(lefts, dtype=np.int64), np.array(rights, dtype=np.int64)
    order = np.lexsort((right_ids, left_ids, -np.asarray(scores, dtype=np.float64)[np.array(joined, dtype=np.int64)]))
    return [(tokens[a], tokens[b]) for a, b in zip(left_ids[order].tolist(), right_ids[order].tolist())]


def sentencepiece_backend(tokens: list[str], scores: list[float] | None, unk_id: int | None,
                          add_space_prefix: bool) -> Backend:
    """A GGUF "llama" vocabulary (tokens with scores, <0xXX> byte tokens)."""
    scores = scores or [-float(i) for i in range(len(tokens))]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges_from_scores(tokens, scores),
                       unk_token=unk, fuse_unk=True, byte_fallback=True)
    return _spaces_as_pieces(Backend(model), add_space_prefix)


def spm_style_bpe_backend(tokens: list[str], merges: list[tuple[str, str]]) -> Backend:
    """Gemma 4's vocabulary: ranked merges over raw UTF-8 text whose spaces are "▁", each line apart from its
    line breaks, <0xXX> tokens for bytes in no token."""
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[^\n]+|[\n]+"), behavior="isolated")
    return _spaces_as_pieces(backend, add_space_prefix=False)


def _spaces_as_pieces(backend: Backend, add_space_prefix: bool) -> Backend:
    # A normalizer, not a pre-tokenizer: it runs on each piece of text between special tokens, which is
    # where llama.cpp adds its space, and it adds one whatever the text starts with.
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    return backend
