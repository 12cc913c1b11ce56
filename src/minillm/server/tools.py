"""Tool calls in the chat endpoint (OpenAI's `tools` / `tool_choice`; the Responses and Messages APIs'
tools arrive here as chat tools). Replies are parsed for calls as they stream, in the format of the model's
family (tool_stream.py: Hermes `<tool_call>` blocks, Llama 3 JSON, Mistral `[TOOL_CALLS]`).

- The tools reach the model through its chat template (`tools=` is passed to the Jinja template, as
  transformers does); a template that ignores them (SmolLM2's) gets them in a system message instead.
- `tool_choice` "auto": the reply is parsed for tool calls (tool_stream.py); "none": the tools are not shown;
  "required" or a named function: the reply is forced by a grammar (a JSON schema over the allowed
  functions' parameters) to be exactly one call, so it always parses and validates.
- Earlier turns: an assistant message's `tool_calls` are written back in the same format and `tool`
  messages are passed to the template with their content.
"""

from __future__ import annotations

import json
from typing import Any

from ..excerpt import excerpt

SYSTEM_PROMPT = ("You can call these functions (JSON schemas of their parameters):\n<tools>\n{tools}\n</tools>\n"
                 "To call one, reply with nothing but\n<tool_call>\n{{\"name\": <function name>, \"arguments\": "
                 "<arguments as a JSON object>}}\n</tool_call>")


def check_tools(tools: list[Any] | None, tool_choice: Any) -> list[dict[str, Any]]:
    """The functions of a request's `tools`, checked; a ValueError starting with `tools` or `tool_choice` otherwise."""
    functions = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             "'parameters': {...}}}}")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append(function)
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ValueError("tools has two functions of the same name")
    if tool_choice in (None, "auto", "none"):
        return functions
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs tools")
        return functions
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                         "'function': {'name': ...}}")
    if name not in names:
        raise ValueError(f"tool_choice names {excerpt(repr(name))}, which is not in tools")
    return functions


def forced_call_schema(functions: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a reply must follow for tool_choice "required" or a named function, else None."""
    if tool_choice != "required" and not isinstance(tool_choice, dict):
        return None
    if isinstance(tool_choice, dict):
        functions = [f for f in functions if f["name"] == tool_choice["function"]["name"]]
    # Each function's parameters go under the root's $defs, their local $refs rewritten to point there:
    # nested under "arguments" as they are, "#/$defs/City" (what pydantic emits) would point nowhere.
    defs = {f"function_{i}": _rebased(f.get("parameters") or {"type": "object"}, f"#/$defs/function_{i}")
            for i, f in enumerate(functions)}
    options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 "arguments": {"$ref": f"#/$defs/function_{i}"}},
                "required": ["name", "arguments"], "additionalProperties": False} for i, f in enumerate(functions)]
    return {**(options[0] if len(options) == 1 else {"anyOf": options}), "$defs": defs}


def _rebased(schema: Any, root: str) -> Any:
    """`schema` with every local `$ref` ("#", "#/...") made relative to `root` instead of the document's root."""
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: root + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _rebased(value, root) for key, value in schema.items()}


def template_messages(messages: list[dict[str, Any]], functions: list[dict[str, Any]], tool_choice: Any,
                      template_knows_tools: bool) -> list[dict[str, Any]]:
    """The conversation as the template gets it: earlier tool calls written out in the Hermes format and,
    for a template that does not render `tools`, the functions described in a system message."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls and not template_knows_tools:
            text = "\n".join(f"<tool_call>\n{json.dumps(_call_json(c))}\n</tool_call>" for c in calls)
            message = {"role": "assistant", "content": ((message.get("content") or "") + "\n" + text).strip()}
        out.append(message)
    if not functions or tool_choice == "none" or template_knows_tools:
        return out
    described = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(f) for f in functions))
    if out and out[0].get("role") == "system":
        return [{**out[0], "content": f"{out[0].get('content') or ''}\n\n{described}".strip()}, *out[1:]]
    return [{"role": "system", "content": described}, *out]


def _call_json(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass
    return {"name": function.get("name"), "arguments": arguments}
