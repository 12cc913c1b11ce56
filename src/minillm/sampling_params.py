"""`SamplingParams`: how one request is decoded (the vLLM names), validated up front.

Every numeric rule lives here; the server and the CLI build a `SamplingParams` and report its
ValueError, whose message starts with the field's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .excerpt import excerpt
from .text.unicode import check_text

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's rule): logits / 1e-300 overflow
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it every seen token is banned or forced anyway
MAX_STOP_STRINGS = 16
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Grammar sizes: past these, compiling (and every step's token mask) takes long enough to stall the batch
# (measured: 10k choices compile in 0.1 s and mask in 50 ms a step; 100k break llguidance's own limits).
MAX_GUIDED_CHOICES = 1024
MAX_GRAMMAR_CHARS = 64 << 10  # a schema's JSON text, a regex, or all choices together


@dataclass
class SamplingParams:
    """max_tokens: new tokens at most. temperature 0 is greedy (and so is anything below 1e-5).
    top_k None/0/-1 and top_p 1.0 disable those filters. seed makes sampling reproducible.
    stop: up to 16 strings that end the output (not included in it); stop_token_ids: extra ids
    that end it like EOS; ignore_eos: keep going past the model's EOS ids (for benchmarks).
    repetition_penalty: HF's, in [0.01, 100]. presence_penalty / frequency_penalty: OpenAI's
    penalties on tokens already generated (once / per occurrence), in [-2, 2]. logprobs: return
    the sampled token's log-probability and this many top alternatives (0-20), from the model's
    raw distribution. guided_json (a JSON schema, dict or text), guided_regex, guided_choice (a list
    of strings): at most one; the output is constrained to match it (generation/guided.py).
    speculative: False keeps this request out of the engine's speculative decoding (its tokens are the
    same either way; guided requests never speculate)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    speculative: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.speculative, bool):
            raise ValueError(f"speculative must be true or false, got {self.speculative!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _check_number("temperature", self.temperature, 0, math.inf, "a number >= 0 (0 is greedy)")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        _check_number("top_p", self.top_p, 0, 1, "in (0, 1]", low_open=True)
        if self.top_k in (0, -1):
            self.top_k = None
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer (or 0 / -1 / None to disable), got {self.top_k!r}")
        low, high = REPETITION_PENALTY_RANGE
        _check_number("repetition_penalty", self.repetition_penalty, low, high, f"in [{low}, {high:g}] (1 is none)")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), -2, 2, "in [-2, 2]")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {excerpt(self.stop)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for i, s in enumerate(self.stop):
            check_text(s, f"stop[{i}]")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {excerpt(self.stop_token_ids)}")
        self._check_guided()

    @property
    def guided(self) -> bool:
        return self.guided_json is not None or self.guided_regex is not None or self.guided_choice is not None

    def _check_guided(self) -> None:
        """Shapes only; whether a schema or regex compiles is the grammar engine's to say (guided.py)."""
        given = [name for name in ("guided_json", "guided_regex", "guided_choice") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: only one of guided_json, guided_regex and guided_choice may be given")
        if self.guided_json is not None and not isinstance(self.guided_json, (dict, str)):
            raise ValueError(f"guided_json must be a JSON schema (an object or its text), got {type(self.guided_json).__name__}")
        if self.guided_regex is not None and not (isinstance(self.guided_regex, str) and self.guided_regex):
            raise ValueError(f"guided_regex must be a non-empty string, got {excerpt(repr(self.guided_regex))}")
        if self.guided_choice is not None and not (isinstance(self.guided_choice, list) and self.guided_choice
                                                   and all(isinstance(c, str) and c for c in self.guided_choice)):
            raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, got {excerpt(self.guided_choice)}")
        if self.guided_choice is not None and len(self.guided_choice) > MAX_GUIDED_CHOICES:
            raise ValueError(f"guided_choice has {len(self.guided_choice)} entries; at most {MAX_GUIDED_CHOICES} are allowed")
        if given and _grammar_chars(getattr(self, given[0])) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{given[0]} is longer than {MAX_GRAMMAR_CHARS} characters (the size limit of a grammar)")


def _grammar_chars(spec: dict | str | list[str]) -> int:
    """A schema's JSON text, a regex, or all choices together, in characters."""
    if isinstance(spec, dict):
        return len(json.dumps(spec))
    return len(spec) if isinstance(spec, str) else sum(map(len, spec))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: object, low: float, high: float, rule: str, low_open: bool = False) -> None:
    """A finite real in [low, high] (or (low, high]); NaN and infinities are refused by name."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
