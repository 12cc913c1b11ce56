"""llama.cpp's own tokenizer test suite: every vocabulary in it, every case.

The suite (`vendor/llama.cpp/models/ggml-vocab-*.gguf` with `.inp` texts and `.out` ids, inside the
llama-cpp-python 0.3.36 sdist) is what llama.cpp's `test-tokenizer-0` checks: texts encoded without BOS/EOS
and without parsing special-token text. `.ci/run` extracts it into .cache/ggml-vocab; MINILLM_VOCAB_SUITE
names another folder. In CI (CI=true) a missing suite fails rather than skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minillm.loading.gguf_file import GGUFMetadata
from minillm.text import Tokenizer

SUITE = Path(os.environ.get("MINILLM_VOCAB_SUITE", Path(__file__).parent.parent / ".cache" / "ggml-vocab"))
_SEPARATOR = "\n__ggml_vocab_test__\n"
# SentencePiece ("llama") and byte-level BPE ("gpt2") vocabularies must pass every case; Gemma 4's BPE too
SUPPORTED = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe", "llama-spm",
             "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
# Vocabularies of other kinds, refused by name
REFUSED = {"bert-bge": "WPM", "nomic-bert-moe": "UGM"}


def _suite() -> Path:
    if not (SUITE / "ggml-vocab-llama-spm.gguf.out").is_file():
        message = f"llama.cpp's tokenizer suite is not in {SUITE} (.ci/run fetches it; or set MINILLM_VOCAB_SUITE)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SUITE


def read_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs, read as test-tokenizer-0 reads them: texts between separators (the last
    one may end the file), one line of ids per text."""
    raw = Path(f"{vocab}.inp").read_text(encoding="utf-8")
    texts = raw.split(_SEPARATOR)
    if raw.endswith(_SEPARATOR):
        texts.pop()
    ids = [[int(i) for i in line.split()] for line in Path(f"{vocab}.out").read_text().splitlines()]
    assert len(texts) == len(ids), vocab.name
    return list(zip(texts, ids))


def load(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFMetadata(_suite() / f"ggml-vocab-{name}.gguf"))


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_case_of_the_suite(name):
    tokenizer = load(name)
    cases = read_cases(_suite() / f"ggml-vocab-{name}.gguf")
    failed = [(text, ids, got) for text, ids in cases
              if (got := tokenizer.encode(text, add_special_tokens=False, parse_special=False)) != ids]
    assert not failed, f"{len(failed)} of {len(cases)} cases differ, the first: {failed[0]!r}"


def test_the_suite_lists_no_vocabulary_we_do_not_know():
    names = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in _suite().glob("ggml-vocab-*.gguf")}
    with_cases = {n for n in names if (_suite() / f"ggml-vocab-{n}.gguf.inp").is_file()}
    assert with_cases <= set(SUPPORTED) | set(REFUSED), with_cases - set(SUPPORTED) - set(REFUSED)


@pytest.mark.parametrize("name, kind", sorted(REFUSED.items()))
def test_other_tokenizer_kinds_are_refused_by_name(name, kind):
    with pytest.raises(ValueError, match=f"{kind}.*is not supported"):
        load(name)


def test_metadata_rules():
    spm, llama3, qwen2 = load("llama-spm"), load("llama-bpe"), load("qwen2")
    assert spm.encode(" ", add_special_tokens=False) == [259]  # llama.cpp's space prefix before a space
    assert spm.encode("Hello")[0] == spm.bos_token_id and spm.encode("Hello")[1:] == spm.encode("Hello", False)
    assert llama3.add_bos and not qwen2.add_bos  # llama3's pre-tokenizer adds BOS where the file does not say
    # special text is parsed in a prompt unless asked not to; user-defined tokens always are
    assert qwen2.encode("<|im_start|>", add_special_tokens=False) == [qwen2.token_to_id("<|im_start|>")]
    assert len(qwen2.encode("<|im_start|>", add_special_tokens=False, parse_special=False)) > 1
    assert qwen2.encode("[PAD151646]", add_special_tokens=False, parse_special=False) == [151646]


def test_load_tokenizer_and_the_tokenize_command_need_no_supported_architecture(capsys):
    import minillm
    from minillm.cli import main

    path = _suite() / "ggml-vocab-falcon.gguf"  # vocabulary only, and an architecture MiniLLM does not run
    assert minillm.load_tokenizer(path).encode("Hello world") == [9856, 1079]
    assert main(["tokenize", "--model", str(path), "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["9856", "'Hello'", "1079", "'Ġworld'"]
    assert main(["tokenize", "--model", str(_suite() / "ggml-vocab-bert-bge.gguf"), "x"]) == 1
    assert "'bert' (WPM" in capsys.readouterr().err
