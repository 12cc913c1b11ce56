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
from minillm.engine.drafters import DraftState, Drafter, NgramDrafter
from minillm.engine.sequence import Sequence
from minillm.engine.speculative import SpeculativeConfig, verify

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
    eng = engine(smollm, speculative="ngram")
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
    eng = engine(smollm_f32, attention_backend="sdpa", speculative="ngram")
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
    eng = LLMEngine(tiny_model, None, [], replace(config, speculative="ngram"))
    assert run_all(eng, prompts, params) == plain
    assert eng.stats()["spec_accepted_tokens"] > 0
    assert_all_free(eng)


@pytest.mark.slow
def test_draft_model(smollm, tasks, plain):
    """The bundled model drafting for itself accepts nearly everything; a draft of its first 10 layers far
    less: the tokens are plain decoding's either way."""
    eng = engine(smollm, speculative={"model": smollm.model, "num_speculative_tokens": 4})
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

def test_ngram_drafter_proposes_what_followed_and_adapts():
    config = SpeculativeConfig("ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=3)
    drafter = NgramDrafter(config, max_seq_len=1000)
    seq = Sequence([5, 6, 7, 8, 9, 1, 2, 5, 6, 7], SamplingParams(max_tokens=100))
    seq.num_computed = len(seq) - 1
    assert drafter.draft_len(seq) == 2  # starts at 2 tokens
    assert drafter.propose([seq], [2]) == [[8, 9]]  # after the earlier "5 6 7"
    drafter.update(seq, 2, 2)
    assert seq.spec.k == 4  # doubled after a whole acceptance
    drafter.update(seq, 4, 1)
    assert seq.spec.k == 2
    for _ in range(4):  # nothing accepted: drafting pauses
        drafter.update(seq, 2, 0)
    assert seq.spec.pause > 0 and drafter.draft_len(seq) == 0
    done = Sequence([1, 2, 1, 2, 1], SamplingParams(max_tokens=1))
    assert drafter.draft_len(done) == 0  # the last token is the target's own


def test_draft_state_is_per_sequence():
    assert DraftState(k=3).ngrams is not DraftState(k=3).ngrams
    drafter = Drafter(SpeculativeConfig("ngram"), 100)
    assert drafter.min_acceptance == pytest.approx(0.3)  # a draft row costs 0.3 of a step at batch 1
    drafter.draft_len(Sequence([1, 2], SamplingParams()), batch=16)
    assert drafter.min_acceptance == pytest.approx(4.8 / 5.5)  # nearly all compute at batch 16


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
