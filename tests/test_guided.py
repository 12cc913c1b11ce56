"""Structured output (generation/guided.py): every output of a constrained request parses and validates
against its schema (checked with `jsonschema`, many seeds), regex and choice constraints hold, constrained
and free requests share steps without changing the free ones, and bad constraints are refused by name."""

import json
import re

import httpx
import jsonschema
import pytest

from minillm import SamplingParams
from serving import post

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
        "required": ["name", "age", "email"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "location": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"], "additionalProperties": False},
        "sights": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3}},
        "required": ["city", "location", "sights"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "maxItems": 4},
        "in_stock": {"type": "boolean"}, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}},
        "required": ["colour", "sizes", "in_stock", "price"], "additionalProperties": False},
}
ASK = {"person": "Give a person as JSON.", "nested": "Describe a city as JSON.", "enums": "Describe a T-shirt as JSON."}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_validates_against_its_schema(smollm, name):
    schema = SCHEMAS[name]
    messages = [[{"role": "user", "content": ASK[name]}]] * 6
    params = [SamplingParams(max_tokens=160, temperature=1.0, seed=seed, guided_json=schema) for seed in range(6)]
    for out in smollm.chat(messages, params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_and_choice(smollm):
    regex = r"(yes|no), because [a-z ]{3,30}\."
    outs = smollm.generate(["Is the sky blue? Answer:"] * 3,
                           [SamplingParams(max_tokens=40, temperature=0.8, seed=s, guided_regex=regex) for s in range(3)])
    assert all(re.fullmatch(regex, o.text) and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    choices = ["red", "green", "blue", "dark blue"]
    outs = smollm.generate(["My favourite colour is"] * 4,
                           [SamplingParams(max_tokens=10, temperature=1.0, seed=s, guided_choice=choices) for s in range(4)])
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs)


def test_constrained_and_free_requests_share_steps(smollm):
    free = SamplingParams(max_tokens=24, temperature=0)
    alone = smollm.generate("The three primary colours are", free)[0].token_ids
    guided = SamplingParams(max_tokens=60, temperature=0, guided_json=SCHEMAS["enums"])
    outs = smollm.generate(["The three primary colours are", "A shirt:"], [free, guided])
    assert outs[0].token_ids == alone
    jsonschema.validate(json.loads(outs[1].text), SCHEMAS["enums"])


def test_a_schema_that_cannot_finish_ends_with_length(smollm):
    out = smollm.generate("x", SamplingParams(max_tokens=5, guided_json=SCHEMAS["nested"]))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize("kwargs,message", [
    ({"guided_json": {"type": "nonsense"}}, "guided_json: .*nonsense"),
    ({"guided_json": "{not json"}, "guided_json: "),
    ({"guided_regex": "a(b"}, "guided_regex: .*unclosed group"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex: only one of"),
    ({"guided_choice": []}, "guided_choice must be a non-empty list"),
    ({"guided_json": 5}, "guided_json must be a JSON schema"),
])
def test_bad_constraints_are_refused_by_name(smollm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        smollm.generate("x", SamplingParams(max_tokens=4, **kwargs))


def test_guided_needs_a_tokenizer(tiny_model):
    from minillm.engine import EngineConfig, LLMEngine

    engine = LLMEngine(tiny_model, None, [], EngineConfig(kv_cache_memory=1 << 20))
    with pytest.raises(ValueError, match="guided decoding needs a tokenizer"):
        engine.add_request([1, 2], SamplingParams(guided_regex="a+"))


# -- the server: response_format and vLLM's guided_* fields ------------------------------------------


@pytest.mark.slow
def test_server_response_format_json_schema(server):
    schema = SCHEMAS["person"]
    body = {"messages": [{"role": "user", "content": "Give a person as JSON."}], "max_tokens": 120, "seed": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                        "strict": True}}}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), schema)
    # json_object bounds no length, and a 135M model often rambles past max_tokens ("length": a JSON prefix);
    # some seed must close its object, and every closed one must parse
    body["response_format"] = {"type": "json_object"}
    finished = []
    for seed in range(8):
        choice = post(server, "/v1/chat/completions", {**body, "seed": seed}).json()["choices"][0]
        content = choice["message"]["content"]
        assert content.startswith("{") and choice["finish_reason"] in ("stop", "length"), choice
        if choice["finish_reason"] == "stop":
            finished.append(json.loads(content))
            break
    assert finished and isinstance(finished[0], dict)
    response = post(server, "/v1/completions", {"prompt": "Colour:", "max_tokens": 8, "guided_choice": ["red", "blue"]})
    assert response.json()["choices"][0]["text"] in ("red", "blue")


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "response_format"),
])
@pytest.mark.slow
def test_server_refuses_bad_constraints_by_field(server, extra, param):
    response = post(server, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.get(server["base"] + "/health").status_code == 200


@pytest.mark.parametrize("kwargs,message", [
    ({"guided_json": {"$ref": "#"}}, "requires itself"),
    ({"guided_json": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
     "requires itself"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}, "requires itself"),
    ({"guided_json": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}}, "requires itself"),
    ({"guided_regex": "[^\\s\\S]"}, "admits no string"),
    ({"guided_choice": ["a"] * 1025}, "at most 1024"),
    ({"guided_regex": "a" * ((64 << 10) + 1)}, "longer than"),
])
def test_grammars_that_cannot_work_are_refused_up_front(kwargs, message):
    from minillm.generation.guided import GuidedDecoding
    from minillm.loading import load_tokenizer

    tokenizer, _ = load_tokenizer(None)
    guided = GuidedDecoding(tokenizer, 49152, tokenizer.eos_token_ids)
    with pytest.raises(ValueError, match=message) as err:
        guided.grammar(SamplingParams(max_tokens=4, **kwargs))
    assert len(str(err.value)) < 400  # never the whole input echoed back


def test_recursive_schemas_with_a_way_out_are_kept():
    from minillm.generation.json_schema_check import requires_itself

    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]}
    optional = {"type": "object", "properties": {"next": {"$ref": "#"}}}
    either = {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["a"]}
    assert not any(requires_itself(s) for s in (tree, optional, either))


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer.json pipeline: Metaspace marking the first piece only, <0xXX> byte fallback,
    a non-special added token outside angle brackets and a special one."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from minillm.text import Tokenizer

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "▁a", "ab", "▁ab"]
    backend = Backend(models.BPE({p: i for i, p in enumerate(pieces)}, [("▁", "a"), ("a", "b"), ("▁a", "b")],
                                 unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken("</s>", special=True), AddedToken("<s>", special=True)])
    backend.add_tokens([AddedToken("[tool]", special=False), AddedToken("<tag>", special=False)])
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=[2])


@pytest.mark.parametrize("kind", ["byte-level (SmolLM2)", "SentencePiece GGUF (Prepend)", "Metaspace first"])
def test_llguidance_reads_the_vocabulary_as_from_its_tokenizer_json(kind, tmp_path):
    """llguidance built from each id's bytes and our tokenizer (no second tokenizer: 4.4 -> 2.2 s, 337 -> 85 MiB
    for Gemma's 262k pieces) sees the same vocabulary as built from the tokenizer.json: every id's bytes and
    special flag, and the same ids for pieces of text (no "▁" prepended inside a longer text)."""
    import llguidance

    from checkpoints import write_sentencepiece_gguf
    from minillm.generation.guided import GuidedDecoding, token_bytes
    from minillm.loading import load_tokenizer
    from minillm.loading.gguf_file import GGUFMetadata
    from minillm.text import Tokenizer

    if kind.startswith("byte-level"):
        tokenizer = load_tokenizer(None)[0]
    elif kind.startswith("SentencePiece"):
        tokenizer = Tokenizer.from_gguf(GGUFMetadata(write_sentencepiece_gguf(tmp_path / "spm.gguf")))
    else:
        tokenizer = _metaspace_tokenizer()
    size = tokenizer.vocab_size
    ours = GuidedDecoding(tokenizer, size, tokenizer.eos_token_ids).tokenizer
    assert token_bytes(tokenizer.backend) is not None  # the bytes' route, not the tokenizer.json's
    reference = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=size, eos_token=tokenizer.eos_token_ids)
    assert [ours.decode_bytes([i]) for i in range(size)] == [reference.decode_bytes([i]) for i in range(size)]
    assert [ours.is_special_token(i) for i in range(size)] == [reference.is_special_token(i) for i in range(size)]
    for text in ["hello world", " hello  world", "abc ab a", "hé\nllo\tworld", "</s> ab", "[tool] <tag>x", "🙂 ab"]:
        assert ours.tokenize_str(text) == reference.tokenize_str(text), text
