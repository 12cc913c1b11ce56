"""Structured output: token masks from a grammar engine, so that a request's text always fits its JSON
schema, regular expression or list of choices.

The engine is llguidance (the grammar library vLLM and llama.cpp use): no dependencies of its own (xgrammar
pulls in transformers and triton), it reads this project's `tokenizers` JSON as it is, and it compiles a
schema and computes a mask fast enough to run at every decode step (benchmarks/bench_guided.py). A
grammar is compiled once per distinct spec and cached; each request gets its own matcher, which the
engine advances with every token it accepts. A grammar that admits no string at all is refused when it
is compiled, so a request never runs (and ends "stop" with nothing) on one.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from ..excerpt import excerpt
from .json_schema_check import requires_itself

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

    def __init__(self, backend: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        """backend: the `tokenizers.Tokenizer` of the model's tokenizer."""
        self._backend, self.vocab_size, self._eos = backend, vocab_size, eos_token_ids
        self._tokenizer = None  # llguidance's view of the vocabulary: built on first use (it is slow to build)
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        import llguidance

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._backend.to_str(), n_vocab=self.vocab_size,
                                                         eos_token=self._eos)
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
