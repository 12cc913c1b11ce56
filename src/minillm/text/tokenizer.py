"""The model's own tokenizer, on the `tokenizers` library: from tokenizer.json or from GGUF metadata."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import normalizers, pre_tokenizers

from .chat_template import ChatTemplateError, render_chat_template
from .gguf_vocab import GGUFMetadataSource, gguf_tokenizer_args
from .hf_vocab import hf_tokenizer_args
from .special_text import SpecialText, strings_in
from .unicode import check_text, find_invalid_text


class Tokenizer:
    """Encode/decode text, with the checkpoint's BOS rule, EOS ids and chat template.

    `encode` adds BOS only where the checkpoint asks for it (`add_bos`), and never a second one, and EOS where
    it asks for that (`add_eos`). Special-token text is parsed in a prompt (as llama.cpp's completion does), in a
    chat template's own markup, and never inside the messages (unless asked).
    """

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None,
                 affixes: tuple[Sequence[int], Sequence[int]] | None = None) -> None:
        """`affixes`: the ids `add_special_tokens` puts before and after a text, where they are not BOS and EOS by
        `add_bos` / `add_eos` (a Hugging Face folder's post-processor: [CLS] ... [SEP])."""
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        if affixes is None:
            affixes = ([bos_token_id] if add_bos and bos_token_id is not None else [],
                       self.eos_token_ids[:1] if add_eos else [])
        self.prefix_ids, self.suffix_ids = list(affixes[0]), list(affixes[1])
        self.chat_template = chat_template
        # held while `_ids` switches the backend's special-token parsing for one call (server threads share it)
        self._switch = threading.Lock()

    @property
    def add_bos(self) -> bool:
        return bool(self.prefix_ids)

    @property
    def add_eos(self) -> bool:
        return bool(self.suffix_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """`parse_special` False: special-token text ("<|im_start|>") is plain text; user-defined tokens
        are still matched, as in llama.cpp."""
        check_text(text, "the prompt")
        return self._with_special(self._ids(text, parse_special), bos=add_special_tokens, eos=add_special_tokens)

    def _ids(self, text: str, parse_special: bool = True, steps: tuple[Any, Any] | None = None) -> list[int]:
        """The text's ids, no BOS / EOS; special-token text parsed or plain; `steps`: a (normalizer, pre-tokenizer)
        to use instead of the backend's own. The one backend is switched for the call rather than copied:
        copying a 262k-piece vocabulary (Gemma) took the first chat request 5.4 s and 400 MiB (Zen 3)."""
        backend = self.backend
        with self._switch:
            if steps is not None:
                original = backend.normalizer, backend.pre_tokenizer
                backend.normalizer, backend.pre_tokenizer = steps
            backend.encode_special_tokens = not parse_special
            try:
                return backend.encode(text, add_special_tokens=False).ids
            finally:
                backend.encode_special_tokens = False
                if steps is not None:
                    backend.normalizer, backend.pre_tokenizer = original

    def fragment_ids(self, text: str) -> list[int]:
        """The ids of `text` as a piece inside a longer text (llguidance's tokenizer callback), as llguidance
        tokenizes with a tokenizer.json: special-token text parsed, no Prepend normalizer, no Metaspace "▁"."""
        return self._ids(text, steps=self._fragment_steps)

    @cached_property
    def _fragment_steps(self) -> tuple[Any, Any] | None:
        normalizer, cut = _without_prepend(self.backend.normalizer)
        pre, changed = _metaspace_never(self.backend.pre_tokenizer, ("first", "always"))
        return (normalizer, pre) if cut or changed else None

    @cached_property
    def _after_special_steps(self) -> tuple[Any, Any] | None:
        """For plain text after a special token: a Metaspace pre-tokenizer that puts its "▁" before the first
        piece only puts none there, as `tokenizers` treats the pieces between special tokens (Hugging Face
        folders of SentencePiece vocabularies)."""
        pre, changed = _metaspace_never(self.backend.pre_tokenizer, ("first",))
        return (self.backend.normalizer, pre) if changed else None

    def _with_special(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        prefix = self.prefix_ids
        if bos and prefix and ids[:len(prefix)] != prefix:  # a text that starts with BOS gets no second one
            ids = [*prefix, *ids]
        return [*ids, *self.suffix_ids] if eos else ids

    @cached_property
    def _special_text(self) -> SpecialText:
        return SpecialText(self.backend)

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
                    tools: list[dict[str, Any]] | None = None, *, special_in_content: bool = False,
                    **template_kwargs: Any) -> list[int]:
        """Template-rendered ids; the template decides where BOS goes, so none is added twice (nor EOS).

        Special-token text inside the messages, tools and `template_kwargs` is plain text, so a message cannot
        forge a turn; `special_in_content` True parses it as control tokens (the behaviour before)."""
        bad = find_invalid_text(messages, "messages")
        if bad is not None:
            raise ValueError(f"{bad} is not valid Unicode (it holds a lone surrogate)")
        if special_in_content:
            prompt = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
            return self._with_special(self._ids(prompt), bos=True, eos=False)
        special, swaps = self._special_text, {}
        taken = {c for text in strings_in([messages, tools, template_kwargs, self.chat_template, *special.tokens])
                 for c in text if ord(c) >= 0xF0000}
        messages, tools, template_kwargs = special.shield([messages, tools, template_kwargs], swaps, taken)
        prompt = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        originals = {ord(c): text for c, text in swaps.items()}
        ids: list[int] = []
        for piece in special.split(prompt):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                text, offset = piece
                ids += self._ids(text.translate(originals), parse_special=False,
                                 steps=self._after_special_steps if offset > 0 else None)
        return self._with_special(ids, bos=True, eos=False)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf: GGUFMetadataSource) -> "Tokenizer":
        """From a GGUF file's metadata, whatever its architecture."""
        return cls(**gguf_tokenizer_args(gguf.meta, gguf.name))

    @classmethod
    def from_hf_folder(cls, folder: Path, config: dict[str, Any], extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
        """From the folder's tokenizer.json, with `config` its tokenizer_config.json as the loader read it
        ({} where there is none), as transformers' AutoTokenizer reads them (text/hf_vocab.py)."""
        return cls(**hf_tokenizer_args(folder, config, extra_eos_ids))


def _steps(sequence: Any) -> list[Any]:
    """A normalizers / pre_tokenizers Sequence's steps (pre-tokenizer sequences have no len())."""
    steps = []
    while True:
        try:
            steps.append(sequence[len(steps)])
        except IndexError:
            return steps


def _without_prepend(normalizer: Any) -> tuple[Any, bool]:
    """The normalizer less its Prepend steps (None where nothing is left), and whether it had any."""
    if isinstance(normalizer, normalizers.Prepend):
        return None, True
    if isinstance(normalizer, normalizers.Sequence):
        parts = [_without_prepend(step) for step in _steps(normalizer)]
        if any(cut for _, cut in parts):
            kept = [step for step, _ in parts if step is not None]
            return (normalizers.Sequence(kept) if kept else None), True
    return normalizer, False


def _metaspace_never(pre: Any, schemes: tuple[str, ...]) -> tuple[Any, bool]:
    """The pre-tokenizer with each Metaspace step of these prepend schemes never prepending its "▁", and whether
    there was one."""
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme in schemes:
        return pre_tokenizers.Metaspace(pre.replacement, "never", pre.split), True
    if isinstance(pre, pre_tokenizers.Sequence):
        parts = [_metaspace_never(step, schemes) for step in _steps(pre)]
        if any(changed for _, changed in parts):
            return pre_tokenizers.Sequence([step for step, _ in parts]), True
    return pre, False
