"""Drafters: where speculative decoding's draft tokens come from, and how many each step feeds
(verification: engine/speculative.py).

`NgramDrafter` (prompt lookup): the sequence's own tokens (prompt and output) are searched for the longest
earlier occurrence of its last tokens (at least prompt_lookup_min, by default 1, as llama-cpp-python's
prompt lookup goes down to one token; compared up to prompt_lookup_max; the most recent among equally long
ones); the tokens that followed it are the draft. Free: no model runs. It pays where the answer repeats its
input (code edits, quoting summaries, JSON extraction, whose keys and punctuation recur token by token:
there single-token matches took the bundled model's three prompts from 1.11 / 1.40 / 1.23x to 1.36 / 1.64
/ 1.38x on 2 Zen 2 cores).

`DraftModelDrafter`: a smaller model with the same vocabulary guesses greedily, one token per forward.
It runs through the engine's own machinery (a `ModelRunner` with its own K/V pools, addressed by the
target's block tables, so it needs no block manager of its own).

How many draft tokens (`Drafter.draft_lens`, once per step for the whole batch). Each candidate token has
a probability P of being accepted along with every draft before it: the product of per-token chances,
the drafter's prior (n-gram: from the match's length L, since a longer match more likely goes on; measured
on the bundled model's greedy answers to grounded and free prompts: `MATCH_PRIOR`, 20 % after 1 matching
token, 45 % after 2, 70 % after 4, 88 % after 8, 94 % from 16 on, the first token's moved towards how many
of several equally long matches went on with it; a draft model: `MODEL_PRIOR` per token) times the
sequence's own calibration, (accepted + W) / (expected + W) over its recent drafts (a sequence whose
drafts fall far short pauses drafting, for longer each time: `MIN_CALIBRATION`). Tokens are taken in
order of P while each one's expected saving beats its cost: P > (1 + MARGIN) lambda dT, lambda the step's
expected decode tokens per second, dT what one more row adds to the step (`StepCost`, measured at
start-up, and a draft model's own forward). That holds while every decoding sequence has a first draft
token worth its row, so that the batch takes fewer steps; where one has none, an accepted token spares its
sequence only a row of a later step that the others keep running, so 1 / lambda becomes what a row adds to
a step (on the CPU a draft row never pays for that: batch 4 with one free-generation prompt among three
grounded ones went from 0.97x to 1.00x of plain decoding). On 2 Zen 2 cores with the bundled model (a row
costs 0.13-0.3 of a one-row step) a draft token needs P above ~0.15-0.38 at batch 1, and from ~6 decoding
sequences on the first one would need more than SATURATED, so the step drafts nothing. `min_acceptance`
replaces the cost model by a fixed threshold on P.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field, replace

import torch

from ..generation.sampler import greedy_tokens
from ..model.transformer import MiniLLM
from ..text.tokenizer import Tokenizer
from .model_runner import ModelRunner
from .sequence import Sequence
from .settings import EngineConfig, resolve
from .speculative import SpeculativeConfig
from .step_cost import StepCost

logger = logging.getLogger("minillm")

# the chance that an n-gram draft's next token is accepted after L matching tokens (index L, the last for
# longer matches): SmolLM2-135M's greedy answers to 20 prompts (code edits, summaries, extraction, free text;
# 16 written to tune it, 4 the benchmark's), rounded down; each sequence's calibration corrects it
MATCH_PRIOR = (0.0, 0.2, 0.45, 0.6, 0.7, 0.78, 0.83, 0.86, 0.88, 0.9, 0.9, 0.9, 0.92, 0.92, 0.92, 0.92, 0.94)
AGREEMENT_WEIGHT = 2.0  # pseudo-occurrences of the prior beside what equally long matches were followed by
MODEL_PRIOR = 0.7  # a draft model's token, before the sequence's own record says otherwise
CALIBRATION_WEIGHT = 4.0  # W: pseudo-tokens of prior belief in a sequence's calibration
DECAY = 0.9  # per verification, the weight of a sequence's past drafts in its calibration
# a sequence whose drafts are accepted at under this share of the expected rate pauses drafting (8 steps,
# then 16, ... up to MAX_PAUSE) and starts afresh: a probe of its drafts now and then costs little
MIN_CALIBRATION = 0.5
MAX_PAUSE = 256
MAX_P = 0.98  # no draft token is ever sure
MARGIN = 0.1  # a draft token's expected saving must beat its cost by this much (the estimates are rough)
# no drafts at all in a step whose first draft token would need a chance above this: the batch saturates the
# device, and the little a sure draft could still win is lost when the sequence it speeds up is not the one
# that finishes last
SATURATED = 0.8


@dataclass
class DraftState:
    """A sequence's drafting: its calibration, and what the drafter found for it this step."""

    accepted: float = 0.0  # recent accepted draft tokens, and their expected number (exponentially decayed)
    expected: float = 0.0
    pause: int = 0  # steps left without drafting
    next_pause: int = 8
    chances: list[float] = field(default_factory=list)  # this step's candidates: prior chance of each
    # n-gram drafter: n-gram (prompt_lookup_min tokens, and one more) -> where its occurrences end, for
    # positions < `indexed`; the continuation found this step
    ngrams: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    indexed: int = 0
    match: list[int] = field(default_factory=list)
    # draft model: tokens whose K/V its pools hold, valid while the sequence was never preempted since
    computed: int = 0
    preemptions: int = 0

    @property
    def calibration(self) -> float:
        return (self.accepted + CALIBRATION_WEIGHT) / (self.expected + CALIBRATION_WEIGHT)


class Drafter:
    """Proposes draft tokens for decoding sequences and decides how many each step feeds (the shared part)."""

    def __init__(self, config: SpeculativeConfig, max_seq_len: int, cost: StepCost) -> None:
        self.config = config
        self.max_seq_len = max_seq_len
        self.cost = cost
        self.num_drafted = self.num_accepted = self.num_steps = 0  # totals, for the engine's stats

    def state(self, seq: Sequence) -> DraftState:
        if seq.spec is None:
            seq.spec = DraftState()
        return seq.spec

    def draft_lens(self, seqs: list[Sequence], rows: int, budget: int) -> list[int]:
        """Draft tokens each decoding sequence feeds this step (0: none), at most `budget` in all; `rows`: the
        step's rows without drafts (one per decoding sequence, prompt chunks). Called once per step by the
        scheduler. Never past max_tokens (the step's last token is the target's own) or the context."""
        lens = [0] * len(seqs)
        fixed = self.config.min_acceptance
        # the step's expected decode tokens, its draft rows, and the seconds drafting adds beyond its rows
        tokens, drafted, extra = float(len(seqs)), 0, 0.0
        needed_first = self._needed(len(seqs), rows, tokens, 0, 0.0, self.extra_cost(lens, 0), shared=True)
        if fixed is None and needed_first > SATURATED:
            return lens  # a saturated batch: no drafts, and no time spent looking for them
        chances = [self.chances(seq) for seq in seqs]
        # the batch ends sooner only if every sequence can go faster (its first candidate pays for its row):
        # else an accepted draft spares its sequence a row of a later step, while the others keep those running
        shared = all(c and c[0] >= needed_first for c in chances)
        # P of each sequence's next candidate, best first (a sequence's P only falls along its draft)
        heap = [(-c[0], i, 0) for i, c in enumerate(chances) if c]
        heapq.heapify(heap)
        while heap and drafted < budget:
            neg_p, i, j = heap[0]
            more = self.extra_cost(lens, j)
            if -neg_p < (fixed if fixed is not None else self._needed(len(seqs), rows, tokens, drafted, extra, more,
                                                                      shared)):
                break
            heapq.heappop(heap)
            lens[i] += 1
            drafted += 1
            tokens += -neg_p
            extra += more
            if j + 1 < len(chances[i]):
                heapq.heappush(heap, (neg_p * chances[i][j + 1], i, j + 1))
        return lens

    def _needed(self, decoding: int, rows: int, tokens: float, drafted: int, extra: float, more: float,
                shared: bool) -> float:
        """The chance one more draft token must have to pay for its row and `more` seconds: (1 + MARGIN) x the
        seconds it adds / the seconds an accepted token saves. `shared`: every decoding sequence may go faster,
        so the batch takes fewer steps: a token saves its share of the step, the step's time per expected
        decode token so far (prompt chunks aside); else it saves only a row of a later step."""
        added = self.cost.spec_time(rows + drafted + 1) - self._time(rows + drafted, drafted) + more
        if shared:
            saved = (self._time(decoding + drafted, drafted) + extra) / tokens
        else:
            saved = self.cost.time(rows) - self.cost.time(rows - 1)
        return (1 + MARGIN) * added / max(saved, 1e-9)

    def _time(self, rows: int, drafted: int) -> float:
        """A step's seconds: a plain decode step's without drafts, a verification step's with."""
        return self.cost.spec_time(rows) if drafted else self.cost.time(rows)

    def chances(self, seq: Sequence) -> list[float]:
        """The per-token chances of the sequence's candidate draft tokens, each given the ones before it
        accepted (calibrated); empty if it drafts nothing this step."""
        params = seq.params
        if not params.speculative or params.guided:  # a grammar's matcher cannot take back rejected drafts
            return []
        state = self.state(seq)
        if state.pause:
            state.pause -= 1
            return []
        room = min(params.max_tokens - seq.num_outputs - 1, self.max_seq_len - len(seq),
                   self.config.num_speculative_tokens)
        state.chances = self.prior_chances(seq, state, room) if room > 0 else []
        calibration = state.calibration
        return [min(MAX_P, p * calibration) for p in state.chances]

    def prior_chances(self, seq: Sequence, state: DraftState, room: int) -> list[float]:
        """The drafter's own per-token chances for up to `room` draft tokens (fewer: what it can offer)."""
        raise NotImplementedError

    def extra_cost(self, lens: list[int], depth: int) -> float:
        """Seconds that drafting a sequence's token number `depth` + 1 adds beyond its row (`lens`: the
        tokens the step's sequences draft so far)."""
        return 0.0

    def propose(self, seqs: list[Sequence], slots: list[int]) -> list[list[int]]:
        """Draft tokens for each sequence, at most `slots` each (0: none)."""
        raise NotImplementedError

    def update(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """After a verification: the tokens tried (up to the first rejected) enter the calibration, and a
        sequence whose drafts fall far short of it pauses."""
        if not drafted:
            return
        state = self.state(seq)
        self.num_drafted += drafted
        self.num_accepted += accepted
        self.num_steps += 1
        state.accepted = state.accepted * DECAY + accepted
        state.expected = state.expected * DECAY + sum(state.chances[:min(accepted + 1, drafted)])
        if state.calibration < MIN_CALIBRATION:
            state.pause, state.next_pause = state.next_pause, min(2 * state.next_pause, MAX_PAUSE)
            state.accepted = state.expected = 0.0

    def stats(self) -> dict[str, float]:
        return {"spec_drafted_tokens": self.num_drafted, "spec_accepted_tokens": self.num_accepted,
                "spec_acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else 0.0,
                "spec_verify_steps": self.num_steps}


class NgramDrafter(Drafter):
    """Prompt lookup, as llama.cpp's and vLLM's n-gram speculators, with the longest match preferred: the
    tokens that followed the earlier occurrence of the sequence's suffix that matches it longest."""

    # occurrences compared, most recent first: of the last prompt_lookup_min tokens, and of one more (a long
    # match ending in a common token, as `"` in JSON, may be older than its recent occurrences)
    CANDIDATES = 16

    def prior_chances(self, seq: Sequence, state: DraftState, room: int) -> list[float]:
        self._index(seq, state)
        tokens, low, high = seq.token_ids, self.config.prompt_lookup_min, self.config.prompt_lookup_max
        state.match = []
        ends = sorted({end for n in self._lengths() if len(tokens) > n
                       for end in state.ngrams.get(tuple(tokens[-n:]), [])[-self.CANDIDATES:]})
        matched = []  # (match length, end) of the recent occurrences
        for end in reversed(ends):
            n = low
            while n < high and end - n >= 0 and tokens[end - n] == tokens[-1 - n]:
                n += 1
            matched.append((n, end))
        if not matched:
            return []
        best, where = max(matched, key=lambda m: m[0])  # the longest, the most recent among equals
        state.match = tokens[where + 1:where + 1 + room]
        chances = [MATCH_PRIOR[min(best + j, len(MATCH_PRIOR) - 1)] for j in range(len(state.match))]
        # several equally long matches: how many went on with the drafted token says more than the prior
        equal = [end for n, end in matched if n == best]
        if len(equal) > 1 and chances:
            agree = sum(tokens[end + 1] == state.match[0] for end in equal)
            chances[0] = (agree + AGREEMENT_WEIGHT * chances[0]) / (len(equal) + AGREEMENT_WEIGHT)
        return chances

    def _index(self, seq: Sequence, state: DraftState) -> None:
        """Index the n-grams of prompt_lookup_min tokens and of one more ending before the last token (the
        suffix itself must match an earlier one); incremental: a sequence's tokens only grow (a preempted one
        keeps them)."""
        tokens = seq.token_ids
        for end in range(max(state.indexed, self.config.prompt_lookup_min - 1), len(tokens) - 1):
            for n in self._lengths():
                if end - n + 1 >= 0:
                    state.ngrams.setdefault(tuple(tokens[end - n + 1:end + 1]), []).append(end)
        state.indexed = max(state.indexed, len(tokens) - 1)

    def _lengths(self) -> set[int]:
        """The n-gram lengths indexed and looked up: prompt_lookup_min, and one more (at most the max)."""
        low = self.config.prompt_lookup_min
        return {low, min(low + 1, self.config.prompt_lookup_max)}

    def propose(self, seqs: list[Sequence], slots: list[int]) -> list[list[int]]:
        return [self.state(seq).match[:k] if k else [] for seq, k in zip(seqs, slots)]


class DraftModelDrafter(Drafter):
    """A smaller model's greedy guesses, run through a `ModelRunner` of its own: one step catches each
    sequence's draft K/V up to its last token (prompt-chunk rows) and drafts the first token, then one
    decode step per further draft token."""

    def __init__(self, config: SpeculativeConfig, target: MiniLLM, draft: MiniLLM, num_blocks: int,
                 block_size: int, engine_config: EngineConfig, cost: StepCost) -> None:
        super().__init__(config, target.config.max_seq_len, cost)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"speculative: the draft model's vocabulary has {draft.config.vocab_size} tokens, the "
                             f"target's {target.config.vocab_size}; a draft model must share the target's tokenizer")
        if draft.device != target.device:
            raise ValueError(f"speculative: the draft model is on {draft.device}, the target on {target.device}")
        # eager steps (compiled steps and CUDA graphs are the target's business), on the target's block tables
        settings = resolve(draft, replace(engine_config, compile=False, cuda_graphs=False, fast_prefill=False,
                                          kv_cache_dtype=None))
        self.runner = ModelRunner(draft, num_blocks, block_size, settings)
        self.draft_cost = StepCost.measure(self.runner, engine_config.max_num_seqs)

    def prior_chances(self, seq: Sequence, state: DraftState, room: int) -> list[float]:
        return [MODEL_PRIOR] * room

    def extra_cost(self, lens: list[int], depth: int) -> float:
        """The draft model's step at this depth gets one more row (or starts: its first)."""
        rows = sum(k > depth for k in lens)
        return self.draft_cost.time(rows + 1) - (self.draft_cost.time(rows) if rows else 0.0)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], slots: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        states = {i: self.state(seqs[i]) for i, k in enumerate(slots) if k}
        for i, state in states.items():
            if state.preemptions != seqs[i].num_preemptions:  # its blocks were freed: the draft K/V went with them
                state.computed, state.preemptions = 0, seqs[i].num_preemptions
        # what each sequence feeds next: first the tokens the draft pools lack, up to its last one (whose
        # logits give draft 1), then its newest draft token while it wants more
        pending = {i: seqs[i].token_ids[state.computed:] for i, state in states.items()}
        runner = self.runner
        while pending:
            rows = list(pending)
            plan = runner.cache.plan([seqs[i].block_table for i in rows], [states[i].computed for i in rows],
                                     [len(pending[i]) for i in rows], runner.attention)
            ids = torch.tensor([t for i in rows for t in pending[i]], device=runner.model.device)
            tokens = greedy_tokens(runner.forward(ids, plan, last_token_only=True)).tolist()
            for i, token in zip(rows, tokens):
                states[i].computed += len(pending[i])
                if token >= 0:
                    drafts[i].append(token)
                if token < 0 or len(drafts[i]) == slots[i]:
                    del pending[i]
                else:
                    pending[i] = [token]
        return drafts

    def update(self, seq: Sequence, drafted: int, accepted: int) -> None:
        super().update(seq, drafted, accepted)
        state = self.state(seq)
        # the draft pools hold the fed drafts' K/V; those past the accepted ones were rejected
        state.computed = min(state.computed, seq.num_computed)


def make_drafter(config: SpeculativeConfig, target: MiniLLM, tokenizer: Tokenizer | None, runner: ModelRunner,
                 num_blocks: int, block_size: int, engine_config: EngineConfig) -> Drafter:
    """The drafter `config` names, with the target's step costs timed on `runner` (its fresh cache); a draft
    model given as a path is loaded here, on the target's device, with the target's setting (its own
    quantized blocks for a GGUF file on the CPU)."""
    cost = StepCost.measure(runner, engine_config.max_num_batched_tokens)
    if config.method == "ngram":
        return NgramDrafter(config, target.config.max_seq_len, cost)
    draft = config.model
    if config.model_path is not None:
        from ..loading import load_checkpoint

        loaded = load_checkpoint(config.model_path, device=target.device, progress=False)
        if tokenizer is not None and loaded.tokenizer is not None and \
                loaded.tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
            raise ValueError(f"speculative: the draft model {config.model_path} has another vocabulary than the "
                             "target; a draft model must share the target's tokenizer")
        draft = loaded.model
    if not isinstance(draft, MiniLLM):
        raise ValueError(f"speculative: model must be a path or a loaded MiniLLM, got {type(draft).__name__}")
    logger.info("speculative decoding with a draft model of %d layers", draft.config.num_layers)
    return DraftModelDrafter(config, target, draft, num_blocks, block_size, engine_config, cost)
