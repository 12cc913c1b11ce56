"""Speculative decoding (engine/speculative.py, engine/drafters.py): the tokens are those of plain decoding,
greedy on every backend (our C++ kernels on the bundled GGUF file, float32 SDPA, Triton under the
interpreter), batched and alone, seeded sampling too; the sampling rule's distribution is the target's
(chi-square, and the same test fails wrong rules); blocks and prefix-cache hashes stay right; bad settings
are refused by name."""

import copy
import os
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from minillm import SamplingParams
from minillm.engine import EngineConfig, LLMEngine
from minillm.engine import speculative
from minillm.engine.drafters import MATCH_PRIOR, NgramDrafter
from minillm.engine.sequence import Sequence
from minillm.engine.speculative import SpeculativeConfig, verify
from minillm.engine.step_cost import StepCost

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel runs (as test_triton_kernels.py)

GREEDY = SamplingParams(max_tokens=48, temperature=0)
ACCEPT = speculative.accept
CODE = '''Rewrite this function with type hints, keeping everything else:

def add_numbers(first_number, second_number):
    result = first_number + second_number
    print("The result is", result)
    return result
'''
QUOTE = ("Quote the sentence about the river from this text, word for word:\n\nThe village sits at the foot of "
         "the hills. The river that runs through the village is wide and slow in summer, and it floods in spring. "
         "Most people there are farmers.")
JSON = ('Extract the name, age and city as JSON.\n\nText: "Maria Gonzalez is a 34 year old engineer who lives in '
        'Valencia and works on bridges."')
FREE = "Write a short poem about the sea."


def chat(llm, text):
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def engine(llm, **options):
    return LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, replace(llm.engine.config, **options))


def run_all(eng, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {i: [] for i in ids}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def assert_all_free(eng):
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert all(b.ref_count == 0 for b in eng.blocks.blocks)


@pytest.fixture(scope="module")
def tasks(smollm):
    return [chat(smollm, text) for text in (CODE, QUOTE, JSON, FREE)]


@pytest.fixture(scope="module")
def plain(smollm, tasks):
    eng = engine(smollm)
    return [run_all(eng, [p], GREEDY)[0] for p in tasks]


def test_greedy_equals_plain_decoding_on_the_gguf_kernels(smollm, tasks, plain):
    eng = engine(smollm, speculative="ngram")
    assert [run_all(eng, [p], GREEDY)[0] for p in tasks] == plain
    stats = eng.stats()
    assert stats["spec_accepted_tokens"] > 20 and stats["spec_verify_steps"] > 0  # drafts were taken, not only made
    assert_all_free(eng)


def test_batched_equals_alone_with_speculation(smollm, tasks, plain):
    eng = engine(smollm, speculative={"method": "ngram", "num_speculative_tokens": 5}, max_num_batched_tokens=64)
    assert run_all(eng, tasks + tasks[:2], GREEDY) == plain + plain[:2]  # prompts chunked beside draft rows
    assert_all_free(eng)


def test_seeded_sampling_gives_the_same_tokens(smollm, tasks):
    params = [SamplingParams(max_tokens=40, temperature=t, top_p=0.95, seed=s, repetition_penalty=r)
              for t, s, r in ((0.3, 1, 1.0), (0.8, 2, 1.0), (0.5, 3, 1.1), (1.0, 4, 1.0))]
    plain = run_all(engine(smollm), tasks, params)
    # a fixed threshold, not the cost model: whether 4 sampling sequences draft must not hang on this machine's timing
    eng = engine(smollm, speculative={"method": "ngram", "min_acceptance": 0.3})
    assert run_all(eng, tasks, params) == plain
    assert eng.stats()["spec_accepted_tokens"] > 0


def test_logprobs_and_per_request_opt_out(smollm, tasks):
    lp = SamplingParams(max_tokens=24, temperature=0, logprobs=2)
    eng = engine(smollm, speculative="ngram")
    ref = engine(smollm).generate([tasks[0]], [lp])
    rid = eng.add_request(tasks[0], lp)
    got = []
    while eng.has_unfinished():
        got += [o for o in eng.step() if o.request_id == rid]
    logprobs = [entry for o in got for entry in o.logprobs]
    assert [e.token_id for e in logprobs] == ref[0].token_ids and any(len(o.token_ids) > 1 for o in got)
    off = engine(smollm, speculative="ngram")
    assert off.generate([tasks[0]], [replace(lp, speculative=False)])[0].token_ids == ref[0].token_ids
    assert off.stats()["spec_drafted_tokens"] == 0


@pytest.mark.slow
def test_float32_sdpa_path(smollm_f32):
    prompts = [chat(smollm_f32, text) for text in (CODE, JSON)]
    params = SamplingParams(max_tokens=32, temperature=0)
    plain = run_all(engine(smollm_f32, attention_backend="sdpa"), prompts, params)
    eng = engine(smollm_f32, attention_backend="sdpa", speculative={"method": "ngram", "min_acceptance": 0.5})
    assert run_all(eng, prompts, params) == plain
    assert eng.stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("triton", marks=pytest.mark.slow)])
def test_tiny_model_backends(tiny_model, backend):
    """A random model loops, so prompt lookup drafts often; Triton runs under the interpreter."""
    if backend == "triton":
        pytest.importorskip("triton")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8] * 3, [9, 10, 11, 9, 10, 11, 12]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    config = EngineConfig(attention_backend=backend, block_size=4, kv_cache_memory=1 << 20)
    plain = run_all(LLMEngine(tiny_model, None, [], config), prompts, params)
    # drafts whenever there is a match (a fixed threshold): the cost model may find the interpreter's rows dear
    eng = LLMEngine(tiny_model, None, [], replace(config, speculative={"method": "ngram", "min_acceptance": 0}))
    assert run_all(eng, prompts, params) == plain
    assert eng.stats()["spec_accepted_tokens"] > 0
    assert_all_free(eng)


@pytest.mark.slow
def test_draft_model(smollm, tasks, plain):
    """The bundled model drafting for itself accepts nearly everything; a draft of its first 10 layers far
    less: the tokens are plain decoding's either way."""
    eng = engine(smollm, speculative={"model": smollm.model, "num_speculative_tokens": 4, "min_acceptance": 0})
    assert run_all(eng, tasks[:2], GREEDY) == plain[:2]
    assert eng.stats()["spec_acceptance_rate"] > 0.9
    assert_all_free(eng)
    shallow = copy.deepcopy(smollm.model)
    shallow.layers = shallow.layers[:10]
    shallow.config = replace(shallow.config, num_layers=10)
    eng = engine(smollm, speculative={"model": shallow, "num_speculative_tokens": 3, "min_acceptance": 0})
    assert run_all(eng, tasks[1:3], GREEDY) == plain[1:3]
    assert eng.stats()["spec_verify_steps"] > 0
    assert_all_free(eng)


def test_prefix_cache_after_rejected_drafts(smollm, tasks, plain):
    """Blocks holding rejected drafts are never hashed: a request whose prompt is an earlier request's prompt
    and output hits the cached blocks and gets plain decoding's tokens."""
    eng = engine(smollm, speculative="ngram")
    first = run_all(eng, [tasks[0]], GREEDY)[0]
    follow = tasks[0] + first
    ref = run_all(engine(smollm), [follow], GREEDY)
    hits = eng.blocks.prefix_hits
    assert run_all(eng, [follow], GREEDY) == ref
    assert eng.blocks.prefix_hits - hits >= (len(follow) // 16 - 1) * 16  # everything but the last block reused
    assert_all_free(eng)


def test_preemption_with_drafts(smollm, tasks, plain):
    from minillm.cache.paged_cache import bytes_per_block

    size = bytes_per_block(smollm.model.config, 16, smollm.engine.runner.cache.k[0].dtype)
    eng = engine(smollm, speculative="ngram", kv_cache_memory=16 * size, max_num_batched_tokens=128)
    assert run_all(eng, tasks, GREEDY) == plain
    assert eng.stats()["num_preemptions"] > 0
    assert_all_free(eng)


# -- the acceptance rule's distribution ---------------------------------------------------------------------

VOCAB = 6
DRAFT = 2
TRIALS = 6000


def emitted_counts() -> list[int]:
    """How often each outcome of one draft token's verification comes up: the first token when it is not the
    draft (5 outcomes), else the draft and the next token (6)."""
    logits = torch.tensor([[0.5, 0.1, 0.9, -0.3, 0.2, 0.0], [1.2, -0.5, 0.3, 0.8, -1.0, 0.1]])
    params = SamplingParams(temperature=1.0)
    counts = [0] * (2 * VOCAB)
    for seed in range(TRIALS):
        generator = torch.Generator().manual_seed(seed)
        tokens = [t for t, _ in verify(logits, [params], [[1]], [[]], [generator], [[DRAFT]])[0]]
        counts[VOCAB + tokens[1] if tokens[0] == DRAFT else tokens[0]] += 1
    return counts


def expected_counts() -> list[float]:
    p0, p1 = torch.softmax(torch.tensor([[0.5, 0.1, 0.9, -0.3, 0.2, 0.0], [1.2, -0.5, 0.3, 0.8, -1.0, 0.1]]), -1)
    return [TRIALS * (0.0 if x == DRAFT else p0[x].item()) for x in range(VOCAB)] + \
        [TRIALS * p0[DRAFT].item() * p1[x].item() for x in range(VOCAB)]


def p_value(counts: list[int]) -> float:
    expected = expected_counts()
    keep = [i for i, e in enumerate(expected) if e > 0]
    assert all(counts[i] == 0 for i in range(len(counts)) if i not in keep)
    return chisquare([counts[i] for i in keep], [expected[i] for i in keep]).pvalue


def resample_from_target(draft, target):
    """Wrong: on a rejection, draw again from the target's whole distribution (not the residual)."""
    emitted = []
    for j in range(len(draft) + 1):
        token = target(j)
        if j < len(draft) and token != draft[j]:
            token = target(j)
        emitted.append(token)
        if j == len(draft) or token != draft[j]:
            break
    return emitted


def first_row_only(draft, target):
    """Wrong: every row drawn from the first row's distribution (an off-by-one in the rows)."""
    return ACCEPT(draft, lambda j: target(0))


def test_sampling_matches_the_target_distribution(monkeypatch):
    assert p_value(emitted_counts()) > 1e-3
    for wrong in (resample_from_target, first_row_only):
        monkeypatch.setattr(speculative, "accept", wrong)
        assert p_value(emitted_counts()) < 1e-6, wrong.__name__


# -- drafters, settings -------------------------------------------------------------------------------------

def decoding(tokens, max_tokens=100):
    seq = Sequence(tokens, SamplingParams(max_tokens=max_tokens))
    seq.num_computed = len(seq) - 1
    return seq


def drafter_for(cost):
    return NgramDrafter(SpeculativeConfig("ngram"), 1000, cost)


CPU = StepCost.linear(first=7e-3, per_row=2.4e-3)  # the bundled model's steps on 2 Zen 2 cores (rounded)
GPU = StepCost.linear(first=7e-3, per_row=0.05e-3)  # rows nearly free: the weights' reading dominates


def test_ngram_drafter_takes_the_longest_match():
    config = SpeculativeConfig("ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=8)
    drafter = NgramDrafter(config, 1000, CPU)
    # "1 2" occurs twice; the older occurrence matches the suffix "9 1 2" longer, so its continuation wins
    seq = decoding([9, 1, 2, 3, 3, 3, 7, 1, 2, 4, 4, 4, 9, 1, 2])
    assert drafter.chances(seq) == [MATCH_PRIOR[3], MATCH_PRIOR[4], MATCH_PRIOR[5], MATCH_PRIOR[6]]
    assert seq.spec.match == [3, 3, 3, 7]
    k = drafter.draft_lens([seq], 1, 64)[0]
    assert k >= 1 and drafter.propose([seq], [k]) == [[3, 3, 3, 7][:k]]
    assert drafter.chances(decoding([5, 6, 7, 8])) == []  # no earlier occurrence: no draft
    # equally long matches: the first token's chance follows how many of them went on with it
    agreeing = decoding([1, 2, 5, 0, 1, 2, 5, 3, 1, 2, 5, 4, 1, 2])
    split = decoding([1, 2, 6, 0, 1, 2, 7, 3, 1, 2, 5, 4, 1, 2])
    assert drafter.chances(agreeing)[0] > MATCH_PRIOR[2] > drafter.chances(split)[0]
    assert drafter.chances(decoding([1, 2, 1, 2, 1], max_tokens=1)) == []  # the last token is the target's own


def test_a_long_match_ending_in_a_common_token_is_found():
    """Single-token matches are looked up (prompt_lookup_min 1) without hiding a long match that ends in a token
    which recurs often since: its occurrences of the last two tokens are searched too."""
    drafter = drafter_for(CPU)
    noise = [t for k in range(30) for t in (200 + k, 5)]  # the token 5 thirty times since the long match
    seq = decoding([1, 2, 3, 4, 5, 99, 98, 97] + noise + [1, 2, 3, 4, 5])
    chances = drafter.chances(seq)
    assert seq.spec.match[:3] == [99, 98, 97] and chances[0] == MATCH_PRIOR[5]
    assert drafter.chances(decoding([7, 8, 9, 7])) == [MATCH_PRIOR[1], MATCH_PRIOR[2], MATCH_PRIOR[3]]


def test_draft_lengths_follow_the_match_and_the_record():
    """A long match drafts more than a short one; a sequence whose drafts fail pauses drafting, longer each
    time."""
    drafter = drafter_for(CPU)
    text = list(range(100, 140))
    long, short = decoding(text + [1, 2] + text[:20]), decoding(text[:10] + [7, 7, 3, 4, 5, 1, 2, 3, 4])
    assert drafter.draft_lens([long], 1, 64)[0] >= 4  # 20 tokens match: each next one nearly sure
    assert drafter.draft_lens([short], 1, 64) == [1]  # 2 tokens match ("3 4"): worth one token at most
    for pause in (8, 16):
        rejected = 0
        while (k := drafter.draft_lens([long], 1, 64)[0]) and rejected < 30:
            drafter.update(long, k, 0)
            rejected += 1
        assert 3 <= rejected < 30  # a fair sample, then a pause
        waited = 1
        while not (k := drafter.draft_lens([long], 1, 64)[0]) and waited < 100:
            waited += 1
        assert waited == pause
    drafter.update(long, k, k)
    assert long.spec.calibration > 1  # accepted beyond the prior: its chances rise


def test_a_saturated_batch_drafts_nothing():
    """At batch 16 a CPU step is nearly all compute: no draft row is scheduled however sure the drafts; with a
    GPU's nearly free rows the same batch drafts, and so does the CPU at batch 1 and 2."""
    text = list(range(100, 140))
    batch = [decoding(text + [1, 2] + text[:20]) for _ in range(16)]
    assert drafter_for(CPU).draft_lens(batch, 16, 512) == [0] * 16
    assert min(drafter_for(GPU).draft_lens(batch, 16, 512)) >= 4
    assert drafter_for(CPU).draft_lens(batch[:1], 1, 512)[0] >= 4
    assert min(drafter_for(CPU).draft_lens(batch[:2], 2, 512)) >= 1
    assert sum(drafter_for(GPU).draft_lens(batch, 16, 20)) == 20  # the step's token budget bounds them
    fixed = NgramDrafter(SpeculativeConfig("ngram", min_acceptance=0), 1000, CPU)
    assert fixed.draft_lens(batch, 16, 512) == [8] * 16  # a fixed threshold instead of the costs


def test_a_batch_drafts_only_where_every_sequence_can_go_faster():
    """With one sequence that has nothing to draft, the batch takes as many steps whatever the others accept:
    their drafts would spare them rows of steps that run anyway, so on the CPU none is fed."""
    text = list(range(100, 140))
    sure = [decoding(text + [1, 2] + text[:20]) for _ in range(2)]
    nothing = decoding(list(range(200, 240)))
    assert drafter_for(CPU).draft_lens([sure[0], nothing], 2, 512) == [0, 0]
    assert min(drafter_for(CPU).draft_lens(sure, 2, 512)) >= 1


def test_step_cost_is_measured_on_the_engine(smollm):
    cost = StepCost.measure(engine(smollm).runner, 64)
    rows = [r for r, _ in cost.points]
    assert rows[:2] == [1, 2] and len(rows) >= 3
    times = [t for _, t in cost.points]
    assert times == sorted(times) and times[0] > 0
    (r0, t0), (r1, t1) = cost.points[-2:]
    assert cost.time(r1 + 10) == pytest.approx(t1 + (t1 - t0) / (r1 - r0) * 10)  # beyond: the last slope
    assert cost.spec_time(3) == cost.time(3)  # no CUDA graphs: a verification step runs as any step


def test_batch_16_schedules_no_draft_rows(smollm, tasks, plain, monkeypatch):
    """16 sequences with the CPU's cost model: the same steps as without speculation (no draft row), the same
    tokens; the same engine drafts for a sequence alone."""
    monkeypatch.setattr(StepCost, "measure", classmethod(lambda cls, runner, rows: CPU))

    def counted(eng):
        run, steps = eng.runner.run, []
        eng.runner.run = lambda step: steps.append(sum(map(len, step.drafts))) or run(step)
        return eng, steps

    (eng, steps), (ref, ref_steps) = counted(engine(smollm, speculative="ngram")), counted(engine(smollm))
    assert run_all(eng, tasks * 4, GREEDY) == run_all(ref, tasks * 4, GREEDY) == plain * 4
    assert len(steps) == len(ref_steps) and not any(steps)
    assert run_all(eng, tasks[:1], GREEDY) == plain[:1] and any(steps)
    assert_all_free(eng)


@pytest.mark.parametrize("value,message", [
    ("eagle", "speculative: unknown method 'eagle'"),
    ("draft:", "needs the draft model's path"),
    ("ngram:x", "only 'draft' takes a path"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in \\[1, 32\\]"),
    ({"method": "ngram", "num_speculative_tokens": 33}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min and prompt_lookup_max"),
    ({"method": "ngram", "min_acceptance": 2}, "min_acceptance must be a number in \\[0, 1\\]"),
    ({"method": "ngram", "k": 3}, "unknown setting\\(s\\) \\['k'\\]"),
    ({"method": "draft"}, "a draft model"),
    (3, "speculative must be 'ngram', 'draft:PATH' or a dict"),
])
def test_bad_settings_are_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_bad_combinations_are_refused(smollm, tiny_model):
    with pytest.raises(ValueError, match="speculative and fast_prefill cannot be combined"):
        engine(smollm, speculative="ngram", fast_prefill=True)
    with pytest.raises(ValueError, match="speculative and compile cannot be combined"):
        engine(smollm, speculative="ngram", compile=True)
    with pytest.raises(ValueError, match="the draft model's vocabulary has 512 tokens"):
        engine(smollm, speculative={"model": tiny_model})
    with pytest.raises(ValueError, match="speculative must be true or false"):
        SamplingParams(speculative="no")
