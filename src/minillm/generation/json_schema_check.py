"""Whether a JSON schema can be met by any finite value, checked before it is compiled: a schema that
requires itself (an object whose required property is the schema again, directly or through `$ref`s)
compiles, but every output runs on until max_tokens. The grammar engine itself refuses the other empty
grammars (a `$ref` to itself, a `$ref` loop, a regex that matches nothing) when a matcher is made."""

from __future__ import annotations

from typing import Any

_BUDGET = 10_000  # schema nodes visited at most; past it the schema is given the benefit of the doubt


def requires_itself(schema: Any) -> bool:
    """True when no finite JSON value satisfies `schema` because every way to satisfy it leads back into
    itself through required properties, non-empty arrays, allOf or local `$ref`s. Conservative: only
    schemas that pin their type ("object" / "array") are judged; anything unsure counts as satisfiable."""
    if not isinstance(schema, dict):
        return False
    satisfiable: set[int] = set()  # nodes known to have a finite instance, whatever the path to them
    path: set[int] = set()
    budget = [_BUDGET]

    def resolve(ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return True  # remote or anchor refs: not judged
        node: Any = schema
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return True  # a dangling pointer is the grammar engine's to report
        return node

    def finite(node: Any) -> bool:
        # A shortest instance never revisits a node on its own path, so a node met again on the path
        # contributes nothing: the least fixpoint of "has a finite instance".
        if node is False:
            return False
        if not isinstance(node, dict) or id(node) in satisfiable:
            return True
        if id(node) in path:
            return False
        budget[0] -= 1
        if budget[0] < 0:
            return True
        path.add(id(node))
        try:
            result = meets(node)
        finally:
            path.discard(id(node))
        if result:
            satisfiable.add(id(node))
        return result

    def meets(node: dict) -> bool:
        if "$ref" in node and not finite(resolve(node["$ref"])):
            return False
        if isinstance(node.get("allOf"), list) and not all(finite(s) for s in node["allOf"]):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key] and not any(finite(s) for s in node[key]):
                return False
        kind = node.get("type")
        if kind == "object" or kind == ["object"]:
            properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            other = node.get("additionalProperties", True)
            required = node.get("required") if isinstance(node.get("required"), list) else []
            return all(finite(properties.get(name, other)) for name in required if isinstance(name, str))
        if kind == "array" or kind == ["array"]:
            least = node.get("minItems", 0)
            if not isinstance(least, int) or least <= 0:
                return True
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            needed = prefix[:least] + ([node.get("items", True)] if least > len(prefix) else [])
            return all(finite(s) for s in needed)
        return True

    return not finite(schema)
