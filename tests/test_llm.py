"""The LLM API on the bundled model."""

import pytest

from minillm import LLM, ModelLoadError, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def test_generate_text_and_ids_in_order(smollm):
    outs = smollm.generate(["Once upon a time", [1, 2, 3], "The capital of France is"], GREEDY)
    assert len(outs) == 3
    assert outs[0].prompt == "Once upon a time" and outs[1].prompt is None
    assert outs[1].prompt_token_ids == [1, 2, 3]
    for out in outs:
        assert out.finish_reason in ("stop", "length") and out.token_ids
        assert out.text == smollm.tokenizer.decode(out.token_ids)
    alone = smollm.generate("The capital of France is", GREEDY)[0]
    assert alone.token_ids == outs[2].token_ids


def test_eos_stops_and_is_reported(smollm):
    out = smollm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=200, temperature=0))
    assert out.finish_reason == "stop" and out.token_ids[-1] in smollm.eos_token_ids
    assert "<|im_end|>" not in out.text
    ignored = smollm.chat([{"role": "user", "content": "Say hello."}],
                          SamplingParams(max_tokens=len(out.token_ids) + 5, temperature=0, ignore_eos=True))
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == len(out.token_ids) + 5


def test_stop_strings_and_stop_tokens(smollm):
    free = smollm.generate("The capital of France is", GREEDY)[0]
    word = free.text.split()[1]  # a word from the middle of the continuation
    out = smollm.generate("The capital of France is", SamplingParams(max_tokens=24, temperature=0, stop=[word]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.index(word)]
    stop_id = free.token_ids[3]
    out = smollm.generate("The capital of France is",
                          SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]


def test_streaming_equals_non_streaming(smollm):
    params = SamplingParams(max_tokens=40, temperature=0.9, seed=11)
    deltas = list(smollm.stream("Write a haiku about the sea:", params))
    full = smollm.generate("Write a haiku about the sea:", params)[0]
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert [d.finish_reason for d in deltas][-1] == full.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_seeded_sampling_reproduces(smollm):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    a = smollm.generate("Tell me a story", params)[0]
    b = smollm.generate(["Another prompt entirely", "Tell me a story"], params)[1]
    assert a.token_ids == b.token_ids
    assert smollm.generate("Tell me a story", SamplingParams(max_tokens=20, temperature=1.0, seed=4))[0].token_ids != a.token_ids


def test_chat_list_of_conversations(smollm):
    chats = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is 2 + 2?"}]]
    outs = smollm.chat(chats, SamplingParams(max_tokens=8, temperature=0))
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[1].token_ids == smollm.chat(chats[1], SamplingParams(max_tokens=8, temperature=0)).token_ids


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-5), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=[""]), "stop"), (dict(seed="x"), "seed"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_too_long_is_a_clear_error(smollm):
    ids = [200] * 8190
    before = smollm.generate("Hi", SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    with pytest.raises(ValueError, match="prompt 0: the prompt has 8190 tokens; with max_tokens=16 that is 8206, beyond the model's context of 8192"):
        smollm.generate([ids], SamplingParams())
    assert smollm.generate("Hi", SamplingParams(max_tokens=4, temperature=0))[0].token_ids == before  # still usable
    assert smollm.engine.blocks.num_free == smollm.engine.blocks.num_blocks  # nothing held by the refused prompt


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match="no such model file"):
        LLM("/definitely/not/here.gguf")
