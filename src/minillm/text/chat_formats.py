"""Chat templates for checkpoints that ship none: the built-in templates (templates/*.jinja, one per model
family, like Ollama's), which one a checkpoint gets, and `--chat-template NAME|FILE`.

A checkpoint's own template always wins unless one is given explicitly. Without one, the family is read
from the vocabulary's special tokens (the turn markers a model was trained with: <|im_start|>,
<start_of_turn>, [INST], ...), then from the architecture; the choice is logged at load, since a wrong
template degrades a model without a word.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from .chat_template import ChatTemplateError, check_template

logger = logging.getLogger("minillm")

TEMPLATES = Path(__file__).with_name("templates")

# name -> (file, settings set at the template's top): families that differ only in spaces share a file.
BUILTIN: dict[str, tuple[str, dict[str, str | bool]]] = {
    "chatml": ("chatml.jinja", {}),
    "qwen3": ("qwen3.jinja", {}),
    "llama2": ("llama2.jinja", {}),
    "llama3": ("llama3.jinja", {}),
    "mistral-v1": ("mistral.jinja", {"lead": " ", "space": " ", "trim_reply": False}),
    "mistral-v3": ("mistral.jinja", {"lead": "", "space": " ", "trim_reply": True}),
    "mistral-v3-tekken": ("mistral.jinja", {"lead": "", "space": "", "trim_reply": False}),
    "mistral-v7": ("mistral-v7.jinja", {"space": " "}),
    "mistral-v7-tekken": ("mistral-v7.jinja", {"space": ""}),
    "gemma": ("gemma.jinja", {}),
    "phi3": ("phi3.jinja", {}),
    "zephyr": ("zephyr.jinja", {}),
    "deepseek": ("deepseek.jinja", {}),
    "deepseek3": ("deepseek3.jinja", {"think": False}),
    "deepseek-r1": ("deepseek3.jinja", {"think": True}),
    "command-r": ("command-r.jinja", {}),
}

# Families known by architecture alone (GGUF general.architecture or HF model_type), when no token tells.
_BY_ARCHITECTURE = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma", "phi3": "phi3",
                    "mistral": "mistral-v1", "qwen2": "chatml", "qwen3": "chatml", "command-r": "command-r",
                    "cohere": "command-r", "cohere2": "command-r"}


@lru_cache(maxsize=None)
def builtin_template(name: str) -> str:
    """A built-in template's Jinja text, its settings written at the top."""
    if name not in BUILTIN:
        raise ChatTemplateError(f"no built-in chat template {name!r} (built-in: {', '.join(BUILTIN)})")
    file, settings = BUILTIN[name]
    header = "".join(f"{{%- set {key} = {json.dumps(value)} -%}}\n" for key, value in settings.items())
    return header + (TEMPLATES / file).read_text(encoding="utf-8")


def detect_family(architecture: str | None, has_token: Callable[[str], bool]) -> tuple[str, str]:
    """The built-in template for a checkpoint without one, and why: (name, reason)."""
    def holds(*tokens: str) -> bool:
        return all(has_token(t) for t in tokens)

    # Tekken (Mistral's byte-level BPE) has no SentencePiece "▁" piece; the formats differ in spaces.
    tekken = "-tekken" if not has_token("▁") else ""
    for name, tokens in (("qwen3", ("<|im_start|>", "<think>")), ("chatml", ("<|im_start|>",)),
                         ("llama3", ("<|start_header_id|>",)), ("gemma", ("<start_of_turn>",)),
                         ("phi3", ("<|assistant|>", "<|end|>")), ("mistral-v7" + tekken, ("[SYSTEM_PROMPT]",)),
                         ("mistral-v3" + tekken, ("[INST]",)), ("deepseek-r1", ("<｜Assistant｜>", "<think>")),
                         ("deepseek3", ("<｜Assistant｜>",)), ("deepseek", ("<|EOT|>",)),
                         ("command-r", ("<|START_OF_TURN_TOKEN|>",)), ("zephyr", ("<|user|>", "<|assistant|>"))):
        if holds(*tokens):
            return name, f"its vocabulary holds {', '.join(tokens)}"
    if architecture in _BY_ARCHITECTURE:
        return _BY_ARCHITECTURE[architecture], f"its architecture is {architecture}"
    if architecture == "llama" and has_token("▁"):
        return "llama2", "a llama architecture with a SentencePiece vocabulary"
    return "chatml", "no family recognised (ChatML, as llama.cpp falls back to)"


def resolve_chat_template(spec: str) -> tuple[str, str]:
    """`--chat-template` / `LLM(chat_template=...)`: a built-in name, a Jinja file, or Jinja text itself ->
    (the template, where it came from); a template that does not compile is refused here."""
    if spec in BUILTIN:
        template, source = builtin_template(spec), f"built-in {spec!r}"
    elif "{{" in spec or "{%" in spec:
        template, source = spec, "given as text"
    elif Path(spec).is_file():
        try:
            template, source = Path(spec).read_text(encoding="utf-8"), f"file {spec}"
        except (OSError, UnicodeDecodeError) as err:
            raise ChatTemplateError(f"chat template {spec}: cannot read it ({err})") from None
    else:
        raise ChatTemplateError(f"chat template {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) "
                                "nor a file")
    check_template(template)
    return template, source


def select_chat_template(own: str | None, architecture: str | None, has_token: Callable[[str], bool],
                         name: str, override: str | None = None) -> str:
    """The template a checkpoint `name` is used with: `override` if given, else its own, else its family's
    built-in one; said in the log."""
    if override is not None:
        template, source = resolve_chat_template(override)
        logger.info("%s: chat template %s (given; the checkpoint's own is %s)", name, source,
                    "set aside" if own else "absent")
        return template
    if own:
        return own
    family, reason = detect_family(architecture, has_token)
    logger.warning("%s has no chat template; using the built-in %r, since %s (--chat-template to choose another)",
                   name, family, reason)
    return builtin_template(family)
