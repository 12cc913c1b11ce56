"""The model's own tokenizer, on the `tokenizers` library: from tokenizer.json or from GGUF metadata."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from .chat_template import ChatTemplateError, render_chat_template
from .unicode import check_text, find_invalid_text

# Pre-tokenizer split patterns, by llama.cpp's `tokenizer.ggml.pre` name.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    # digits one by one, then GPT-2's rule
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"), ["\\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"), [_LLAMA3_SPLIT]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), [_QWEN2_SPLIT]),
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), [_GPT2_SPLIT]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """Encode/decode text, with the checkpoint's BOS rule, EOS ids and chat template.

    `encode` adds BOS only where the checkpoint asks for it (`add_bos`), and never a second one.
    """

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_ids: Sequence[int], add_bos: bool,
                 chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text, "the prompt")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """`template_kwargs`: the template's own arguments (enable_thinking, ...), as transformers takes them."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools,
                                    template_kwargs, bos_token=self.bos_token, eos_token=self.eos_token)

    @property
    def template_renders_tools(self) -> bool:
        """Whether the chat template shows a `tools` list to the model (Qwen's, Llama 3.1's do; SmolLM2's not)."""
        return "tools" in (self.chat_template or "")

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> list[int]:
        """Template-rendered ids; the template decides where BOS goes, so none is added twice."""
        bad = find_invalid_text(messages, "messages")
        if bad is not None:
            raise ValueError(f"{bad} is not valid Unicode (it holds a lone surrogate)")
        prompt = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(prompt, add_special_tokens=True)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, checkpoint) -> "Tokenizer":
        meta = checkpoint.meta
        kind = meta("tokenizer.ggml.model")
        tokens: list[str] = meta("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ValueError(f"{checkpoint.path.name} has no tokenizer in its metadata")
        types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, meta("tokenizer.ggml.merges") or [], meta("tokenizer.ggml.pre"))
            default_bos = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, meta("tokenizer.ggml.scores"), types, meta("tokenizer.ggml.unknown_token_id", 0))
            default_bos = True
        else:
            raise ValueError(f"{checkpoint.path.name}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
        backend.add_special_tokens(special)
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
        eos = [meta(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return cls(backend, bos_token_id=meta("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=[e for e in eos if e is not None],
                   add_bos=bool(meta("tokenizer.ggml.add_bos_token", default_bos)),
                   chat_template=meta("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, folder: Path, config: dict[str, Any], extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
        """From the folder's tokenizer.json, with `config` its tokenizer_config.json as the loader read it
        ({} where there is none)."""
        backend = Backend.from_file(str(folder / "tokenizer.json"))

        def token_id(key: str) -> int | None:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos = token_id("bos_token")
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # ask the tokenizer's own post-processor whether it prepends BOS
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and with_special[:1] == [bos] != backend.encode("a", add_special_tokens=False).ids[:1]
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos = [*extra_eos_ids, *([token_id("eos_token")] if token_id("eos_token") is not None else [])]
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos, chat_template=template)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Backend:
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                 merges=[tuple(m.split(" ", 1)) for m in merges]))
    splits = _SPLITS.get(pre or "default")
    if splits is None:
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}; splitting text with GPT-2's rule", stacklevel=3)
        splits = [_GPT2_SPLIT]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, types: list[int], unk_id: int) -> Backend:
    """A SentencePiece-style BPE vocabulary (llama.cpp's "llama" model) as a `tokenizers` BPE.

    Merges are recovered from the scores: every split of a token into two known pieces is a merge,
    ranked by the merged token's score (SentencePiece merges the best-scoring pair first).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = scores or [-float(i) for i in range(len(tokens))]
    merges = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    backend = Backend(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=tokens[unk_id],
                                 fuse_unk=True, byte_fallback=True))
    # Spaces become "▁", and one "▁" leads the text unless it starts with a space (as HF's Llama tokenizer).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return backend
