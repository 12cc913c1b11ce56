"""Drafters: where speculative decoding's draft tokens come from (verification: engine/speculative.py).

`NgramDrafter` (prompt lookup): the sequence's own tokens (prompt and output) are indexed by n-gram; when
the last n tokens occurred before, the tokens that followed that occurrence are the draft. Free: no model
runs, and a sequence without a match feeds no draft. It pays where the answer repeats its input (code
edits, quoting summaries, JSON extraction).

`DraftModelDrafter`: a smaller model with the same vocabulary guesses greedily, one token per forward.
It runs through the engine's own machinery (a `ModelRunner` with its own K/V pools, addressed by the
target's block tables, so it needs no block manager of its own).

Both adapt each sequence's draft length to what it gets accepted (`DraftState`): twice as long after a
wholly accepted draft, one past the accepted part otherwise; and a sequence whose acceptance rate falls
below what a draft row costs stops drafting for a while (8 steps, then 16, ... up to 256), since a
rejected draft row only costs. The cost model: a step of R rows takes T0 + r R (T0: reading the weights,
r: one row's compute); measured on the bundled SmolLM2-135M (fused decoder, 2 cores of an EPYC), a row
costs c = r / (T0 + r) = 0.3 of a one-row step. An accepted draft token saves the step's cost per token,
T0 / B + r at B decoding sequences, a draft row costs r, so drafts pay above an acceptance rate of
c B / (c B + 1 - c): 30 % at batch 1, 87 % at batch 16 (where a step is nearly all compute).
"""

from __future__ import annotations

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

logger = logging.getLogger("minillm")

# a draft row's cost as a fraction of a one-row step (c above): measured for the n-gram drafter's rows; a
# draft model's also cost its own forward
ROW_COST = {"ngram": 0.3, "draft": 0.5}
MAX_PAUSE = 256  # steps a sequence goes without drafting at most, once its drafts stopped paying
RATE_DECAY = 0.75  # weight of the past in a sequence's acceptance rate (recent steps count most)


@dataclass
class DraftState:
    """A sequence's drafting: how many tokens to draft next, and whether drafting pays for it."""

    k: int  # draft length asked for next
    drafted: float = 0.0  # recent drafted and accepted tokens (exponentially decayed)
    accepted: float = 0.0
    checks: int = 0  # verifications since drafting last resumed
    pause: int = 0  # steps left without drafting
    next_pause: int = 8  # the next pause's length (doubles up to MAX_PAUSE)
    # n-gram drafter: n-gram -> where its latest occurrence ends, for positions < `indexed`; the match found
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    match: list[int] = field(default_factory=list)
    # draft model: tokens whose K/V its pools hold, valid while the sequence was never preempted since
    computed: int = 0
    preemptions: int = 0


class Drafter:
    """Proposes draft tokens for decoding sequences and adapts their lengths (the shared part)."""

    def __init__(self, config: SpeculativeConfig, max_seq_len: int) -> None:
        self.config = config
        self.max_seq_len = max_seq_len
        self.row_cost = ROW_COST[config.method]
        self.batch = 1  # decoding sequences in the latest step
        self.num_drafted = self.num_accepted = self.num_steps = 0  # totals, for the engine's stats

    def state(self, seq: Sequence) -> DraftState:
        if seq.spec is None:
            seq.spec = DraftState(k=min(2, self.config.num_speculative_tokens))
        return seq.spec

    @property
    def min_acceptance(self) -> float:
        """The acceptance rate below which a sequence's drafts do not pay at the current batch (module doc)."""
        if self.config.min_acceptance is not None:
            return self.config.min_acceptance
        cost = self.row_cost * self.batch
        return cost / (cost + 1 - self.row_cost)

    def draft_len(self, seq: Sequence, batch: int = 1) -> int:
        """Draft tokens a decoding sequence asks for in its next step (0: none), among `batch` decoding
        sequences. Called once per decode step by the scheduler. Never past max_tokens (the step's last
        token is the target's own) or the context."""
        self.batch = batch
        params = seq.params
        if not params.speculative or params.guided:  # a grammar's matcher cannot take back rejected drafts
            return 0
        state = self.state(seq)
        if state.pause:
            state.pause -= 1
            return 0
        room = min(params.max_tokens - seq.num_outputs - 1, self.max_seq_len - len(seq))
        return max(0, min(state.k, room, self.available(seq, state)))

    def available(self, seq: Sequence, state: DraftState) -> int:
        """How many draft tokens this drafter can offer the sequence now (at most its `state.k`)."""
        return state.k

    def propose(self, seqs: list[Sequence], slots: list[int]) -> list[list[int]]:
        """Draft tokens for each sequence, at most `slots` each (0: none)."""
        raise NotImplementedError

    def update(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """After a verification: adapt the sequence's draft length, pause it if drafting stopped paying."""
        if not drafted:
            return
        state = self.state(seq)
        self.num_drafted += drafted
        self.num_accepted += accepted
        self.num_steps += 1
        top = self.config.num_speculative_tokens
        state.k = min(top, max(state.k, 2 * accepted)) if accepted == drafted else max(1, accepted + 1)
        state.drafted = state.drafted * RATE_DECAY + drafted
        state.accepted = state.accepted * RATE_DECAY + accepted
        state.checks += 1
        if state.checks >= 4 and state.accepted < self.min_acceptance * state.drafted:  # 4: a fair sample first
            state.pause, state.next_pause = state.next_pause, min(2 * state.next_pause, MAX_PAUSE)
            state.drafted = state.accepted = 0.0
            state.checks = 0

    def stats(self) -> dict[str, float]:
        return {"spec_drafted_tokens": self.num_drafted, "spec_accepted_tokens": self.num_accepted,
                "spec_acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else 0.0,
                "spec_verify_steps": self.num_steps}


class NgramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n from prompt_lookup_max down to prompt_lookup_min), as llama.cpp's and vLLM's n-gram speculators."""

    def available(self, seq: Sequence, state: DraftState) -> int:
        self._index(seq, state)
        tokens, config = seq.token_ids, self.config
        state.match = []
        for n in range(min(config.prompt_lookup_max, len(tokens) - 1), config.prompt_lookup_min - 1, -1):
            end = state.ngrams.get(tuple(tokens[-n:]))
            if end is not None:
                state.match = tokens[end + 1:end + 1 + state.k]
                break
        return len(state.match)

    def _index(self, seq: Sequence, state: DraftState) -> None:
        """Index the n-grams ending before the last token (the suffix itself must match an earlier one);
        incremental: a sequence's tokens only grow (a preempted one keeps them)."""
        tokens, low, high = seq.token_ids, self.config.prompt_lookup_min, self.config.prompt_lookup_max
        for end in range(state.indexed, len(tokens) - 1):
            for n in range(low, min(high, end + 1) + 1):
                state.ngrams[tuple(tokens[end - n + 1:end + 1])] = end
        state.indexed = max(state.indexed, len(tokens) - 1)

    def propose(self, seqs: list[Sequence], slots: list[int]) -> list[list[int]]:
        return [self.state(seq).match[:k] if k else [] for seq, k in zip(seqs, slots)]


class DraftModelDrafter(Drafter):
    """A smaller model's greedy guesses, run through a `ModelRunner` of its own: one step catches each
    sequence's draft K/V up to its last token (prompt-chunk rows) and drafts the first token, then one
    decode step per further draft token."""

    def __init__(self, config: SpeculativeConfig, target: MiniLLM, draft: MiniLLM, num_blocks: int,
                 block_size: int, engine_config: EngineConfig) -> None:
        super().__init__(config, target.config.max_seq_len)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"speculative: the draft model's vocabulary has {draft.config.vocab_size} tokens, the "
                             f"target's {target.config.vocab_size}; a draft model must share the target's tokenizer")
        if draft.device != target.device:
            raise ValueError(f"speculative: the draft model is on {draft.device}, the target on {target.device}")
        # eager steps (compiled steps and CUDA graphs are the target's business), on the target's block tables
        settings = resolve(draft, replace(engine_config, compile=False, cuda_graphs=False, fast_prefill=False,
                                          kv_cache_dtype=None))
        self.runner = ModelRunner(draft, num_blocks, block_size, settings)

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


def make_drafter(config: SpeculativeConfig, target: MiniLLM, tokenizer: Tokenizer | None, num_blocks: int,
                 block_size: int, engine_config: EngineConfig) -> Drafter:
    """The drafter `config` names; a draft model given as a path is loaded here, on the target's device, with
    the target's setting (its own quantized blocks for a GGUF file on the CPU)."""
    if config.method == "ngram":
        return NgramDrafter(config, target.config.max_seq_len)
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
    return DraftModelDrafter(config, target, draft, num_blocks, block_size, engine_config)
