import pytest
import torch

from minillm import TextGenerator


def naive_greedy(model, prompt, steps):
    """Reference: recompute the whole sequence every step, standard attention, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), use_flash_attention=False)[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 300, 42], [1], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17], [100, 200]]


@pytest.mark.parametrize("backend", ["flash", "sdpa", "standard"])
def test_greedy_with_cache_equals_greedy_without(tiny_model, backend):
    gen = TextGenerator(tiny_model, attention_backend=backend)
    for prompt in PROMPTS[:2]:
        out = gen.generate(prompt, max_new_tokens=20, temperature=0)
        assert out.token_ids == naive_greedy(tiny_model, prompt, 20)
        assert out.finish_reason == "length"


def test_batch_of_different_lengths_equals_each_alone(tiny_model):
    gen = TextGenerator(tiny_model)
    batched = gen.generate(PROMPTS, max_new_tokens=16, temperature=0)
    assert isinstance(batched, list) and len(batched) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, batched):
        assert result.token_ids == gen.generate(prompt, max_new_tokens=16, temperature=0).token_ids


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_model):
    gen = TextGenerator(tiny_model)
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    alone = gen.generate(PROMPTS[0], seed=1234, **kwargs).token_ids
    assert gen.generate(PROMPTS[0], seed=1234, **kwargs).token_ids == alone
    batch = gen.generate(PROMPTS, seed=[1234, 1, 2, 3], **kwargs)
    assert batch[0].token_ids == alone
    assert gen.generate(PROMPTS[0], seed=99, **kwargs).token_ids != alone


def test_eos_stops_each_row_on_its_own(tiny_model):
    gen = TextGenerator(tiny_model)
    free = gen.generate(PROMPTS[:2], max_new_tokens=12, temperature=0)
    eos = free[0].token_ids[3]
    assert eos not in free[0].token_ids[:3]
    out = gen.generate(PROMPTS[:2], max_new_tokens=12, temperature=0, eos_token_ids=[eos])
    assert out[0].token_ids == free[0].token_ids[:4] and out[0].finish_reason == "stop"
    # row 1 runs on to its own first eos, if any
    cut = free[1].token_ids.index(eos) + 1 if eos in free[1].token_ids else len(free[1].token_ids)
    assert out[1].token_ids == free[1].token_ids[:cut]
    assert out[1].finish_reason == ("stop" if eos in free[1].token_ids else "length")


def test_tokenizer_text_in_and_out(tiny_model):
    class Bytes:
        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(i % 256 for i in ids).decode(errors="replace")

    out = TextGenerator(tiny_model, tokenizer=Bytes()).generate("hello", max_new_tokens=5, temperature=0)
    assert out.text == Bytes().decode(out.token_ids)


@pytest.mark.parametrize("prompt,kwargs,message", [
    ([], {}, "no prompt given"),
    ([[]], {}, "prompt 0: the prompt is empty"),
    ([[1, 2], []], {}, "prompt 1: the prompt is empty"),
    ([1, 2, 99999], {}, "outside the vocabulary"),
    ([1, -1], {}, "outside the vocabulary"),
    ([1] * 250, dict(max_new_tokens=10), "beyond the model's context of 256 tokens"),
    # one validator for every API: SamplingParams (max_new_tokens is its max_tokens)
    ([1], dict(temperature=-0.1), "temperature must be a number >= 0"),
    ([1], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([1], dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ([1], dict(top_k=-5), "top_k must be a positive integer"),
    ([1], dict(repetition_penalty=0), r"repetition_penalty must be in \[0.01, 100\]"),
    ([1], dict(max_new_tokens=0), "max_tokens must be a positive integer"),
    ("text", {}, "needs a tokenizer"),
    ([[1], [2]], dict(seed=[1]), "seed has 1 entries for 2 rows"),
])
def test_invalid_arguments(tiny_model, prompt, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        TextGenerator(tiny_model).generate(prompt, **kwargs)
