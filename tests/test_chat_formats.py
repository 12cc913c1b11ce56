"""Chat templates: every built-in template renders a corpus (system prompts, multi-turn histories, tools,
tool calls and results, reasoning) exactly as transformers' apply_chat_template renders the same template;
which built-in a checkpoint without a template gets; `chat_template=` / `--chat-template`."""

from __future__ import annotations

import json
import logging

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from minillm.text.chat_formats import BUILTIN, builtin_template, detect_family, resolve_chat_template, \
    select_chat_template
from minillm.text.chat_template import ChatTemplateError, render_chat_template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
DICT_CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
CORPUS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "history": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
    "no system, ends with a reply": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    "spaces and unicode": [{"role": "system", "content": "  Réponds en français.\n"},
                           {"role": "user", "content": "\n  Où est 東京 ?  "}],
    "developer": [{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": "x"}],
    "tool call and result": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."}, {"role": "user", "content": "Thanks"}],
    "two tool results": [
        {"role": "user", "content": "Both?"},
        {"role": "assistant", "content": "Calling.", "tool_calls": [CALL, DICT_CALL]},
        {"role": "tool", "content": "21"}, {"role": "tool", "content": "3"}],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                  {"role": "user", "content": "3+3?"},
                  {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}],
}


def _hf_tokenizer(template: str):
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=template)


def _both(template: str, messages, **options) -> tuple[str, str]:
    """(ours, transformers') for one rendering; an error on either side is its message's type."""
    hf = _hf_tokenizer(template)
    tools, kwargs = options.pop("tools", None), options.pop("kwargs", {})
    try:
        theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False, **options, **kwargs)
    except Exception as err:  # noqa: BLE001 - compared with ours below
        theirs = f"error: {type(err).__name__}"
    try:
        ours = render_chat_template(template, messages, tools=tools, template_kwargs=kwargs, bos_token="<s>",
                                    eos_token="</s>", unk_token="<unk>", **options)
    except ChatTemplateError:
        ours = "error: TemplateError"
    return ours, theirs


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_templates_render_as_transformers_does(name):
    template = builtin_template(name)
    for label, messages in CORPUS.items():
        for tools in (None, TOOLS):
            for add_generation_prompt in (True, False):
                for kwargs in ({}, {"enable_thinking": False}):
                    ours, theirs = _both(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         kwargs=kwargs)
                    assert ours == theirs, (label, tools is not None, add_generation_prompt, kwargs)
                    assert not ours.startswith("error"), (label, ours)  # every built-in takes the whole corpus


# Templates in the styles checkpoints ship (namespace, tojson options, loop controls, documents, errors)
HUB_STYLE = [
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    "{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- if m.role == 'tool' -%}{%- continue -%}{%- endif -%}"
    "{%- set ns.n = ns.n + 1 -%}{{ ns.n }}{{ m.content | tojson }}{%- if m.tool_calls is defined -%}"
    "{{ m.tool_calls | tojson(indent=2, sort_keys=true) }}{%- endif -%}{%- endfor -%}"
    "{{ tools | tojson(separators=(',', ':')) if tools else '' }}{{ documents is none }}",
    "{{ bos_token }}{% for m in messages %}{{ m.thinking if m.thinking is defined else '-' }}"
    "{{ m.reasoning_content | default('none') }}{{ m.content | trim }}{{ eos_token }}{% endfor %}"
    "{% if enable_thinking is defined %}{{ enable_thinking }}{% endif %}{{ unk_token }}",
    # TRL's assistant-only-loss markers, as fine-tunes ship them
    "{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|end|>"
    "{% endgeneration %}{% else %}{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
]


@pytest.mark.parametrize("template", HUB_STYLE)
def test_hub_style_templates_render_as_transformers_does(template):
    for messages in CORPUS.values():
        for kwargs in ({}, {"enable_thinking": True}):
            ours, theirs = _both(template, messages, tools=TOOLS, add_generation_prompt=True, kwargs=kwargs)
            assert ours == theirs


def test_qwen3_thinking_switch_and_tools():
    template = builtin_template("qwen3")
    user = [{"role": "user", "content": "Hi"}]
    assert render_chat_template(template, user).endswith("<|im_start|>assistant\n")
    assert render_chat_template(template, user, template_kwargs={"enable_thinking": False}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with_tools = render_chat_template(template, user, tools=TOOLS)
    assert with_tools.startswith("<|im_start|>system\n# Tools") and json.dumps(TOOLS[0]) in with_tools
    history = render_chat_template(template, CORPUS["reasoning"], add_generation_prompt=False)
    assert "Two and two" not in history  # reasoning before the last user message is dropped
    assert "<think>\nThree and three.\n</think>\n\n6<|im_end|>" in history


def test_reserved_template_arguments_are_refused():
    for name in ("messages", "documents"):
        with pytest.raises(ChatTemplateError, match=f"{name} is set by the renderer"):
            render_chat_template("{{ messages }}", CORPUS["user"], template_kwargs={name: []})


class _Vocab:
    def __init__(self, *tokens: str) -> None:
        self.tokens = set(tokens)

    def __call__(self, token: str) -> bool:
        return token in self.tokens


SP = "▁"  # a SentencePiece vocabulary holds it
DETECTION = [
    ("qwen3", _Vocab("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "qwen3"),
    ("chatml", _Vocab("<|im_start|>", "<|im_end|>"), "llama"),
    ("llama3", _Vocab("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama"),
    ("gemma", _Vocab("<start_of_turn>", "<end_of_turn>", SP), "gemma3"),
    ("gemma", _Vocab(SP), "gemma2"),  # by architecture
    ("phi3", _Vocab("<|assistant|>", "<|end|>", "<|user|>", SP), "phi3"),
    ("mistral-v7", _Vocab("[INST]", "[SYSTEM_PROMPT]", SP), "llama"),
    ("mistral-v7-tekken", _Vocab("[INST]", "[SYSTEM_PROMPT]"), "llama"),
    ("mistral-v3", _Vocab("[INST]", "[AVAILABLE_TOOLS]", SP), "llama"),
    ("mistral-v3-tekken", _Vocab("[INST]"), "llama"),
    ("mistral-v1", _Vocab(SP), "mistral"),
    ("deepseek-r1", _Vocab("<｜User｜>", "<｜Assistant｜>", "<think>"), "qwen2"),
    ("deepseek3", _Vocab("<｜User｜>", "<｜Assistant｜>"), "llama"),
    ("deepseek", _Vocab("<|EOT|>"), "llama"),
    ("command-r", _Vocab("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>"), "command-r"),
    ("zephyr", _Vocab("<|user|>", "<|assistant|>", "<|system|>"), "llama"),
    ("llama2", _Vocab(SP), "llama"),
    ("chatml", _Vocab(), "gpt2"),  # nothing recognised
]


@pytest.mark.parametrize("expected,vocab,architecture", DETECTION)
def test_family_detection(expected, vocab, architecture):
    assert detect_family(architecture, vocab)[0] == expected


def test_selection_logs_and_override(tmp_path, caplog):
    own = "{{ messages[0].content }}"
    with caplog.at_level(logging.INFO, logger="minillm"):
        assert select_chat_template(own, "llama", _Vocab(), "m.gguf") == own
        assert not caplog.records
        assert select_chat_template(None, "gemma3", _Vocab(), "m.gguf") == builtin_template("gemma")
        assert "m.gguf has no chat template; using the built-in 'gemma'" in caplog.text
        assert select_chat_template(own, "llama", _Vocab(), "m.gguf", override="llama3") == builtin_template("llama3")
        assert "built-in 'llama3' (given; the checkpoint's own is set aside)" in caplog.text
    file = tmp_path / "t.jinja"
    file.write_text("{{ 'X' + messages[0].content }}")
    assert resolve_chat_template(str(file)) == (file.read_text(), f"file {file}")
    assert resolve_chat_template("{{ 'inline' }}")[1] == "given as text"
    with pytest.raises(ChatTemplateError, match="neither a built-in template .*chatml.* nor a file"):
        resolve_chat_template("no-such-family")
    file.write_text("{% if %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        resolve_chat_template(str(file))


def test_a_file_without_a_template_gets_its_family_at_load(tmp_path, caplog):
    from checkpoints import write_sentencepiece_gguf

    from minillm.loading import load_tokenizer

    path = write_sentencepiece_gguf(tmp_path / "spm.gguf")  # architecture llama, SentencePiece, no template
    with caplog.at_level(logging.WARNING, logger="minillm"):
        tokenizer, _ = load_tokenizer(path)
    assert tokenizer.chat_template == builtin_template("llama2") and "built-in 'llama2'" in caplog.text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]) == "<s>[INST] hello [/INST]"
    assert load_tokenizer(path, chat_template="zephyr")[0].chat_template == builtin_template("zephyr")
    with pytest.raises(ChatTemplateError, match="neither a built-in"):
        load_tokenizer(path, chat_template="nope")


def test_a_hf_folder_without_a_template_gets_its_family_by_model_type(tmp_path):
    from checkpoints import hf_model

    from minillm.loading import load_tokenizer

    hf_model("gemma2").save_pretrained(tmp_path)  # config.json (model_type gemma2) + model.safetensors
    vocab = Backend(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2}, unk_token="<unk>"))
    vocab.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    tokenizer, _ = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == builtin_template("gemma")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_the_bundled_models_own_template_renders_as_transformers_does():
    from minillm.loading import load_tokenizer

    template = load_tokenizer()[0].chat_template
    for messages in CORPUS.values():
        for add_generation_prompt in (True, False):
            ours, theirs = _both(template, messages, tools=TOOLS, add_generation_prompt=add_generation_prompt)
            assert ours == theirs
