"""A Hugging Face folder's tokenizer (tokenizer.json + tokenizer_config.json), as transformers' AutoTokenizer
reads it.

The text pipeline (normalizer, pre-tokenizer, model, added tokens) is tokenizer.json's, run by the `tokenizers`
library that transformers runs too. What `add_special_tokens` puts around a text is what tokenizer.json's
post-processor puts there (BOS for Llama 3, [CLS] ... [SEP] for BERT, nothing for Qwen); tokenizer_config.json's
`add_bos_token` / `add_eos_token` are ignored, as transformers 5 ignores them beside a tokenizer.json. Not
followed: a transformers class named in `tokenizer_class` that rebuilds the pipeline from its own code
(LlamaTokenizer's Metaspace where a legacy tokenizer.json prepends "▁" with a normalizer); the file is what the
model was published with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

# tokenizer.json models `tokenizers` runs
MODELS = ("BPE", "Unigram", "WordPiece", "WordLevel")
_PROBE = "a"  # a text whose ids show what the post-processor puts before and after


def hf_tokenizer_args(folder: Path, config: dict[str, Any], extra_eos_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `Tokenizer` for `folder`, `config` its tokenizer_config.json ({} where there is none),
    `extra_eos_ids` more ids that end a generation (generation_config.json's)."""
    backend = read_tokenizer_json(folder / "tokenizer.json")

    def token_id(key: str) -> int | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return backend.token_to_id(value) if isinstance(value, str) else None

    bos, eos = token_id("bos_token"), token_id("eos_token")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    eos_ids = [*extra_eos_ids, *([eos] if eos is not None else [])]
    return {"backend": backend, "bos_token_id": bos, "eos_token_ids": eos_ids,
            "affixes": _post_processor_affixes(backend), "chat_template": template}


def read_tokenizer_json(path: Path) -> Backend:
    """The file as a `tokenizers` backend; a model `tokenizers` does not run, or a file it cannot read, is refused
    in one line."""
    try:
        text = path.read_text(encoding="utf-8")
        model = json.loads(text).get("model") or {}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    kind = model.get("type")
    if kind is not None and kind not in MODELS:
        raise ValueError(f"{path.parent.name}/tokenizer.json: tokenizer model {kind!r} is not supported "
                         f"(supported: {', '.join(MODELS)})")
    try:
        return Backend.from_str(text)
    except Exception as err:  # the Rust side raises plain Exception
        raise ValueError(f"{path.parent.name}/tokenizer.json is not a tokenizer `tokenizers` can read: {err}") from None


def _post_processor_affixes(backend: Backend) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after a text's own."""
    plain = backend.encode(_PROBE, add_special_tokens=False).ids
    full = backend.encode(_PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []
