"""A GGUF file's tokenizer from its `tokenizer.ggml.*` metadata alone, as llama.cpp reads it.

Nothing here looks at the model's architecture: a vocabulary-only file tokenizes as well as a full one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from .bpe_pretokenize import GEMMA4_PRE, SPM_STYLE_BPE, pre_tokenizer
from .spm import sentencepiece_backend, spm_style_bpe_backend

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Tokenizer models llama.cpp has and MiniLLM does not implement
_REFUSED = {"bert": "WPM (BERT's WordPiece)", "t5": "UGM (T5's Unigram)", "rwkv": "RWKV", "plamo2": "PLaMo-2",
            "hybriddna": "HybridDNA", "whitespace": "whitespace-split"}


Metadata = Callable[[str, Any], Any]  # a GGUF file's value of a key, or the default given


class GGUFMetadataSource(Protocol):
    """What a tokenizer needs of a GGUF file (loading's GGUFMetadata is one): its name and its metadata."""

    name: str

    def meta(self, key: str, default: Any = None) -> Any: ...


def gguf_tokenizer_args(metadata: Metadata, name: str) -> dict[str, Any]:
    """Keyword arguments of `Tokenizer` for a GGUF file's metadata (`name` for messages)."""
    def meta(key: str, default: Any = None) -> Any:
        return metadata(f"tokenizer.ggml.{key}", default)

    def array(key: str, item: type | tuple[type, ...], what: str) -> list[Any] | None:
        """tokenizer.ggml.<key> where it is an array of `item`s; absent: None; anything else is refused."""
        values = meta(key)
        # by the values' types (a few, for 150k values) rather than value by value
        if values is not None and (not isinstance(values, list)
                                   or not all(issubclass(kind, item) for kind in set(map(type, values)))):
            raise ValueError(f"{name}: tokenizer.ggml.{key} is not an array of {what}")
        return values

    kind = meta("model")
    tokens: list[str] = array("tokens", str, "strings") or []
    if kind is None or not tokens:
        raise ValueError(f"{name} has no tokenizer in its metadata")
    if kind in _REFUSED:
        raise ValueError(f"{name}: tokenizer model {kind!r} ({_REFUSED[kind]}) is not supported "
                         "(supported: 'llama' SentencePiece and 'gpt2' byte-level BPE vocabularies)")
    scores, types = array("scores", (int, float), "numbers"), array("token_type", int, "integers")
    for key, values in (("scores", scores), ("token_type", types)):  # one per token: a merge would read past them
        if values is not None and len(values) != len(tokens):
            raise ValueError(f"{name}: tokenizer.ggml.{key} has {len(values)} values for {len(tokens)} tokens")
    # llama.cpp renames empty tokens so that every text names one id
    if "" in tokens:
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = types or [NORMAL] * len(tokens)
    pre = meta("pre")
    if kind == "llama":
        backend = sentencepiece_backend(tokens, scores, meta("unknown_token_id", 0),
                                        add_space_prefix=bool(meta("add_space_prefix", True)))
        default_bos, default_ids = True, (1, 2)
    elif kind == "gemma4" or (kind == "gpt2" and pre in SPM_STYLE_BPE):
        backend = spm_style_bpe_backend(tokens, _merges(array("merges", str, "strings"), name))
        default_bos, default_ids = True, (None, None)
    elif kind == "gpt2":
        if pre is None:
            warnings.warn(f"{name} names no pre-tokenizer (tokenizer.ggml.pre); splitting text with llama.cpp's "
                          "default rule, which may not be the one the model was trained with", stacklevel=3)
        try:
            split = pre_tokenizer(pre)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        merges = _merges(array("merges", str, "strings"), name)
        backend = _byte_level_bpe(tokens, merges, split.splits, split.ignore_merges)
        default_bos, default_ids = split.add_bos, (11, 11)  # llama.cpp's defaults for a BPE file
    else:
        raise ValueError(f"{name}: unknown tokenizer model {kind!r} (supported: llama, gpt2)")
    _add_special_tokens(backend, tokens, types, metadata)

    def token_id(key: str, default: int | None) -> int | None:
        value = meta(key, default)
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    bos = token_id("bos_token_id", default_ids[0])
    eos = [token_id(key, default) for key, default in (("eos_token_id", default_ids[1]), ("eot_token_id", None),
                                                       ("eom_token_id", None))]
    # llama.cpp adds BOS for Gemma 4 whatever the file says
    add_bos = bool(meta("add_bos_token", default_bos)) or kind == "gemma4" or pre in GEMMA4_PRE
    return {"backend": backend, "bos_token_id": bos, "eos_token_ids": [e for e in eos if e is not None],
            "add_bos": add_bos, "add_eos": bool(meta("add_eos_token", False)),
            "chat_template": metadata("tokenizer.chat_template", None)}


def _merges(merges: list[str] | None, name: str) -> list[tuple[str, str]]:
    """"left right" strings as pairs, cut at the first space after the first character (a left piece may
    be a space), the first of duplicates kept."""
    if not merges:
        raise ValueError(f"{name}: a BPE vocabulary without tokenizer.ggml.merges")
    pairs: dict[tuple[str, str], None] = {}
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut > 0:
            pairs.setdefault((merge[:cut], merge[cut + 1:]))
    return list(pairs)


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], splits: tuple[str, ...],
                    ignore_merges: bool) -> Backend:
    backend = Backend(models.BPE(vocab=dict(zip(tokens, range(len(tokens)))), merges=merges,
                                 ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int], metadata: Metadata) -> None:
    """Control and unknown tokens are special: matched in text only where special text is parsed. User-defined
    tokens are matched in any text, before it is split, as llama.cpp does."""
    strip = _stripped_sides(tokens, types, metadata)
    special, user = [], []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            lstrip, rstrip = strip.get(i, (False, False))
            added = AddedToken(token, special=kind != USER_DEFINED, normalized=False, lstrip=lstrip, rstrip=rstrip)
            (user if kind == USER_DEFINED else special).append(added)
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _stripped_sides(tokens: list[str], types: list[int], metadata: Metadata) -> dict[int, tuple[bool, bool]]:
    """(lstrip, rstrip) of the tokens llama.cpp gives them to by model name (GGUF does not store them):
    Phi-3's special tokens eat the spaces after them, a mask token those before it."""
    name = str(metadata("general.name", "")).lower()
    pre = metadata("tokenizer.ggml.pre", None) or ""
    def ids(*texts: str) -> list[int]:  # the last id of each text in the vocabulary (a search only if asked)
        found = {t: i for i, t in enumerate(tokens) if t in texts}
        return [found[t] for t in texts if t in found]

    if "phi-3" in name or "phi3" in name:
        sides = {i: (False, True) for i, k in enumerate(types) if k in (CONTROL, UNKNOWN, USER_DEFINED)}
        sides |= {i: (False, True) for i in ids("</s>")}
        return sides | {i: (False, False) for i in ids("<unk>", "<s>", "<|endoftext|>")}
    if pre in ("jina-v2-de", "jina-v2-es", "jina-v2-code"):
        return {i: (True, False) for i in ids("<mask>")}
    if "modern-bert" in name:
        return {i: (True, False) for i in ids("[MASK]")}
    return {}
