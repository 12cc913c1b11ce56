"""Structured output: token masks from a grammar engine, so that a request's text always fits its JSON
schema, regular expression or list of choices.

The engine is llguidance (the grammar library vLLM and llama.cpp use): no dependencies of its own (xgrammar
pulls in transformers and triton), it takes a vocabulary as each token's bytes with our tokenizer beside them
(`token_bytes`), and it compiles a schema and computes a mask fast enough to run at every decode step
(benchmarks/bench_guided.py). A grammar is compiled once per distinct spec and cached; each request gets
its own matcher, which the engine advances with every token it accepts. A grammar that admits no string at
all is refused when it is compiled, so a request never runs (and ends "stop" with nothing) on one.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..excerpt import excerpt
from .json_schema_check import requires_itself

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

GRAMMAR_CACHE_BYTES = 64 << 20  # compiled grammars kept, by the size of their spec and grammar texts
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def spec_of(params: Any) -> tuple[str, str] | None:
    """A request's constraint as (field, canonical text), or None when it has none."""
    if params.guided_json is not None:
        schema = params.guided_json
        return "guided_json", schema if isinstance(schema, str) else json.dumps(schema)  # property order matters
    if params.guided_regex is not None:
        return "guided_regex", params.guided_regex
    if params.guided_choice is not None:
        return "guided_choice", json.dumps(params.guided_choice)
    return None


class GuidedDecoding:
    """Grammars and matchers for one tokenizer and vocabulary; safe to share between threads (the server
    compiles in worker threads)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._source, self.vocab_size, self._eos = tokenizer, vocab_size, eos_token_ids
        self._tokenizer = None  # llguidance's view of the vocabulary: built on first use (it is slow to build)
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        import llguidance
        from llguidance import TokenizerWrapper

        with self._lock:
            if self._tokenizer is None:
                tokens = token_bytes(self._source.backend)
                # (a tokenizer.json read by llguidance builds a second tokenizer: Gemma's 262k pieces ~5 s and
                # 340 MiB, against ~2 s and 85 MiB from the bytes; Zen 3. Its error names a decoder it cannot read)
                source = (self._source.backend.to_str() if tokens is None
                          else TokenizerWrapper(_Vocabulary(self._source, tokens, self._eos)))
                self._tokenizer = llguidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=self._eos)
        return self._tokenizer

    def grammar(self, params: Any) -> str | None:
        """The compiled grammar of a request's constraint; a ValueError starting with the field's name
        when it is not a valid schema, regex or choice list."""
        spec = spec_of(params)
        if spec is None:
            return None
        with self._lock:
            if spec in self._grammars:
                self._grammars.move_to_end(spec)
                return self._grammars[spec]
        grammar = self._compile(*spec)
        with self._lock:
            if spec not in self._grammars:
                self._grammars[spec] = grammar
                self._cached_bytes += len(spec[1]) + len(grammar)
            while self._cached_bytes > GRAMMAR_CACHE_BYTES and self._grammars:
                (_, text), old = self._grammars.popitem(last=False)
                self._cached_bytes -= len(text) + len(old)
        return grammar

    def _compile(self, field: str, text: str) -> str:
        """A checked grammar: it compiles, and it admits some string (a matcher made from it is not in
        error before its first token); library errors are cut to one short line."""
        import llguidance

        def refused(why: str) -> ValueError:
            return ValueError(f"{field}: {excerpt(' '.join(why.split()))}")  # one line (it comes with caret drawings)

        try:
            if field == "guided_json":
                # one fixed spacing (", ", ": "), no free whitespace: small models otherwise pad with
                # newlines until max_tokens (seen with SmolLM2); a schema's "x-guidance" may override it
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
            else:
                grammar = llguidance.grammar_from("regex" if field == "guided_regex" else "choice", text)
        except ValueError as err:
            raise refused(str(err)) from None
        if field == "guided_json" and requires_itself(json.loads(text)):
            raise ValueError(f"{field}: the schema requires itself (through required properties or $ref), so no "
                             "finite JSON value satisfies it")
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise refused(messages[0])
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        matcher.compute_bitmask()
        if matcher.is_error():
            raise ValueError(f"{field}: admits no string ({excerpt(matcher.get_error().split(chr(10))[0], 80)})")
        return grammar

    def matcher(self, params: Any):
        """A fresh matcher for a request (None without a constraint)."""
        import llguidance

        grammar = self.grammar(params)
        return None if grammar is None else llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: the ids' bytes, and the tokenizer for pieces of text."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], eos_token_ids: list[int]) -> None:
        self.tokens, self._tokenizer = tokens, tokenizer
        self.eos_token_id, self.bos_token_id = eos_token_ids[0] if eos_token_ids else None, tokenizer.bos_token_id
        self.special_token_ids = sorted(_special_ids(tokenizer.backend.get_added_tokens_decoder()))

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # the wrapper tries bytes once, to learn which we take
            raise TypeError("text, not bytes")
        return self._tokenizer.fragment_ids(text)


def token_bytes(backend: Any) -> list[bytes] | None:
    """Each id's bytes as llguidance reads a tokenizer.json (its toktrie_hf_tokenizers): special added tokens
    (flagged, or any of the form <...>) behind its marker byte 0xFF; under a ByteFallback decoder <0xXX> tokens
    as their byte and the decoder's space character as " "; under a ByteLevel one GPT-2's byte alphabet undone
    (an added token outside it: its text; another token: no bytes). None for a tokenizer with neither decoder."""
    decoders = _decoder_steps(json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {})
    kinds = {step["type"] for step in decoders}
    if not kinds & {"ByteFallback", "ByteLevel"}:
        return None
    added = backend.get_added_tokens_decoder()
    texts = [backend.id_to_token(i) or "" for i in range(backend.get_vocab_size(with_added_tokens=True))]
    if "ByteFallback" in kinds:
        space = next((step["pattern"]["String"] for step in decoders if step["type"] == "Replace"
                      and step["content"] == " " and len(step["pattern"].get("String", "")) == 1), " ")
        tokens = [bytes([int(t[3:5], 16)]) if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                  else t.replace(space, " ").encode() for t in texts]
    else:
        table = str.maketrans(_BYTE_LEVEL)
        tokens = []
        for i, text in enumerate(texts):
            try:
                tokens.append(text.translate(table).encode("latin-1"))
            except UnicodeEncodeError:
                tokens.append(added[i].content.encode() if i in added else b"")
    for i in _special_ids(added):
        tokens[i] = b"\xff" + texts[i].encode()
    return tokens


def _special_ids(added: dict[int, Any]) -> set[int]:
    """Of a backend's added tokens (id -> AddedToken), those llguidance takes as special: flagged so, or of the
    form <...>."""
    return {i for i, t in added.items() if t.special or t.content.startswith("<") and t.content.endswith(">")}


def _decoder_steps(decoder: dict[str, Any]) -> list[dict[str, Any]]:
    """A decoder's JSON and, through Sequences, every step in it."""
    return [decoder, *(step for inner in decoder.get("decoders", []) for step in _decoder_steps(inner))]


def _byte_level_alphabet() -> dict[str, str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte -> that byte as a Latin-1 character."""
    shown = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = [b for b in range(256) if b not in shown]
    return {chr(b): chr(b) for b in shown} | {chr(0x100 + i): chr(b) for i, b in enumerate(hidden)}


_BYTE_LEVEL = _byte_level_alphabet()


def allowed_tokens(matchers: list[Any], vocab_size: int) -> Tensor | None:
    """[B, V] bool: the tokens each row's matcher allows next (every token for rows without one)."""
    if all(m is None for m in matchers):
        return None
    words = (vocab_size + 31) // 32
    bits = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            bits[row] = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[:words]
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(len(matchers), -1)[:, :vocab_size]
