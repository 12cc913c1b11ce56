"""Chat templates (Jinja2, as shipped with checkpoints), rendered in a sandbox."""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A conversation the template rejects, or a template that cannot be rendered."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: marks an assistant's reply for training masks (TRL's
    assistant-only loss); transformers renders the body as it is, and so do we."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


@lru_cache(maxsize=8)
def _compile(template: str):
    # The same environment HF transformers uses: sandboxed, whitespace-trimmed, with loop controls and the
    # generation tag.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise ChatTemplateError(f"the model's chat template does not compile: {err}") from None


def check_template(template: str) -> None:
    """Refuse a template that does not compile (a ChatTemplateError naming the problem)."""
    _compile(template)


# Names a message's reasoning comes under; transformers gives a template all of them (reasoning_content is
# what Qwen3's reads, thinking what gpt-oss's reads).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation's shape and give it to the template as transformers does: fields that are None
    dropped, the reasoning under each of its names; text-part lists ([{"type": "text", "text": ...}]) become
    strings, and a missing content an empty one (templates concatenate it)."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("a conversation must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} must be a dict with a string 'role'")
        content = message.get("content", "")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ChatTemplateError(f"message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        if not isinstance(content, str):
            raise ChatTemplateError(f"message {i}: content must be a string or a list of text parts")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append({**message, "content": content})
    return out


# Variables the renderer sets itself; a template argument may not replace them.
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                         **special_tokens: Any) -> str:
    """Render `messages` with a chat template, as transformers' apply_chat_template does: `tools` (OpenAI's
    tool list) as it passes them; `special_tokens` (bos_token, eos_token, ...) and then `template_kwargs`,
    the template's own arguments (enable_thinking, ...), as variables."""
    variables = {**special_tokens, **(template_kwargs or {})}
    reserved = [name for name in RESERVED if name in variables]
    if reserved:
        raise ChatTemplateError(f"{reserved[0]} is set by the renderer; it cannot be a template argument")
    try:
        return _compile(template).render(messages=normalise_messages(messages), tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except TemplateError as err:
        raise ChatTemplateError(f"the chat template failed to render: {err}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as err:  # the messages' shape, in the template
        raise ChatTemplateError(f"the chat template failed to render these messages: {type(err).__name__}: {err}") from None
