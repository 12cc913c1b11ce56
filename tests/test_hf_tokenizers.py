"""Hugging Face folders (tokenizer.json + tokenizer_config.json): MiniLLM's ids equal transformers' AutoTokenizer's.

The texts are llama.cpp's tokenizer suite (every .inp text of every vocabulary, tests/test_tokenizer_suite.py), with
and without special tokens, plus chat-template-rendered conversations of them with special tokens in the text.
The folders are written here, without network: the suite's GGUF vocabularies through transformers' own GGUF
conversion, and Unigram, WordPiece and WordLevel tokenizers trained on the suite texts with `tokenizers`. Each is
saved, loaded by AutoTokenizer and saved again by it, so tokenizer.json holds the pipeline transformers runs for
the folder's tokenizer class (Qwen2Tokenizer's NFC, which a GGUF file does not record).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

import minillm
from test_tokenizer_suite import _suite, read_cases

transformers = pytest.importorskip("transformers")

# Suite vocabularies converted by transformers (its GGUF support covers these), with the tokenizer class hub folders
# of the family name; the kind of tokenizer.json each gives
CONVERTED = {"llama-spm": ("TokenizersBackend", "BPE, Metaspace (SentencePiece-style), byte fallback"),
             "phi-3": ("TokenizersBackend", "BPE, \"▁\" prepended by a normalizer, byte fallback"),
             "llama-bpe": ("TokenizersBackend", "BPE, byte-level (Llama 3), BOS by post-processor"),
             "qwen2": ("Qwen2Tokenizer", "BPE, byte-level, NFC"),
             "qwen35": ("Qwen2Tokenizer", "BPE, byte-level, NFC"),
             "gpt-2": ("GPT2Tokenizer", "BPE, byte-level (GPT-2's regex)"),
             "starcoder": ("GPT2Tokenizer", "BPE, byte-level"),
             "falcon": ("TokenizersBackend", "BPE, byte-level"),
             "deepseek-coder": ("TokenizersBackend", "BPE, byte-level"),
             "deepseek-llm": ("TokenizersBackend", "BPE, byte-level"),
             "aquila": ("TokenizersBackend", "BPE, byte-level")}
# tokenizer_config.json flags over a converted folder, which transformers ignores beside a tokenizer.json
FLAGGED = {"llama-spm+flags": ("llama-spm", {"add_bos_token": False, "add_eos_token": True})}
TRAINED = ["unigram", "wordpiece", "wordlevel"]
FOLDERS = [*CONVERTED, *FLAGGED, *TRAINED]
# A template that writes the folder's BOS and EOS text around each turn, parsed as special tokens
CHAT_TEMPLATE = ("{{ bos_token or '' }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token or '' }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
_CONVERSATION = 10  # suite texts per rendered conversation


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Every text of the suite, once."""
    return list(dict.fromkeys(text for inp in sorted(_suite().glob("ggml-vocab-*.gguf.inp"))
                              for text, _ in read_cases(Path(str(inp).removesuffix(".inp")))))


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory, texts) -> Callable[[str], tuple[Path, Any]]:
    """name -> (the folder, AutoTokenizer of it), each built once."""
    built: dict[str, tuple[Path, Any]] = {}

    def get(name: str) -> tuple[Path, Any]:
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            if name in FLAGGED:  # flags that transformers' own save would drop
                base, flags = FLAGGED[name]
                _copy_with(get(base)[0], folder, flags)
                built[name] = folder, transformers.AutoTokenizer.from_pretrained(folder)
                return built[name]
            if name in CONVERTED:
                _convert(name, folder)
            else:
                _train(name, texts, folder)
            reference = transformers.AutoTokenizer.from_pretrained(folder)
            reference.save_pretrained(folder)  # tokenizer.json as transformers runs it for the class
            built[name] = folder, reference
        return built[name]

    return get


def _convert(name: str, folder: Path) -> None:
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, vocabulary, config = get_gguf_tokenizer(str(_suite() / f"ggml-vocab-{name}.gguf"))
    backend, extra = convert_gguf_tokenizer(architecture, vocabulary)
    tokenizer = transformers.TokenizersBackend(tokenizer_object=backend, **config, **extra)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    _edit_config(folder, {"tokenizer_class": CONVERTED[name][0]})


def _copy_with(source: Path, folder: Path, flags: dict[str, bool]) -> None:
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    _edit_config(folder, flags)


def _edit_config(folder: Path, changes: dict[str, Any]) -> None:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")) | changes), encoding="utf-8")


def _train(kind: str, texts: list[str], folder: Path) -> None:
    """Small tokenizers of the other tokenizer.json models, shaped like T5's (Unigram), BERT's (WordPiece) and a
    word-level one without a post-processor."""
    if kind == "unigram":
        backend = Backend(models.Unigram())
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
        specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    elif kind == "wordpiece":
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
        specials = {"unk_token": "[UNK]", "bos_token": "[CLS]", "eos_token": "[SEP]", "cls_token": "[CLS]",
                    "sep_token": "[SEP]", "pad_token": "[PAD]"}
    else:
        backend = Backend(models.WordLevel(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
        specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    backend.train_from_iterator(texts, trainer)
    if kind == "unigram":  # T5: EOS after each text
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[
            ("</s>", backend.token_to_id("</s>"))])
    elif kind == "wordpiece":
        backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            (t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tokenizer = transformers.TokenizersBackend(tokenizer_object=backend, **specials)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def _conversations(texts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": ("user", "assistant")[i % 2], "content": text}
             for i, text in enumerate(texts[start:start + _CONVERSATION])]
            for start in range(0, len(texts), _CONVERSATION)]


def compare(folder: Path, reference: Any, texts: list[str]) -> dict[str, tuple[int, int, list[Any]]]:
    """Per kind of case, (passed, cases, the failures): suite texts and rendered conversations, each with and
    without special tokens."""
    ours = minillm.load_tokenizer(folder)
    prompts = [ours.apply_chat_template(c) for c in _conversations(texts)]
    assert prompts == [reference.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                       for c in _conversations(texts)]
    results = {}
    for kind, cases in (("text", texts), ("chat", prompts)):
        for special in (False, True):
            failed = [(text, want, got) for text in cases
                      if (got := ours.encode(text, add_special_tokens=special))
                      != (want := _bos_once(reference(text, add_special_tokens=special)["input_ids"], ours.prefix_ids))]
            results[f"{kind}, special tokens {'added' if special else 'not added'}"] = (
                len(cases) - len(failed), len(cases), failed)
    return results


def _bos_once(ids: list[int], prefix: list[int]) -> list[int]:
    """transformers puts BOS before a text that starts with one (a rendered chat); MiniLLM adds no second."""
    return ids[len(prefix):] if prefix and ids[:2 * len(prefix)] == prefix * 2 else ids


@pytest.mark.parametrize("name", FOLDERS)
def test_ids_equal_transformers(name, hf_folder, texts):
    folder, reference = hf_folder(name)
    for kind, (passed, cases, failed) in compare(folder, reference, texts).items():
        assert not failed, f"{name}, {kind}: {passed}/{cases}, the first failure: {failed[0]!r}"


@pytest.mark.parametrize("name", ["llama-spm", "qwen2", "wordpiece"])
def test_chat_ids_equal_transformers_and_leave_special_text_in_messages_plain(name, hf_folder, texts):
    """encode_chat's pieces between the template's special tokens (Metaspace's "first" piece only gets its "▁"
    in llama-spm) and the plain-text switch: the same ids as transformers on the rendered prompt, and a message
    holding the EOS text keeps it as text, while the backend goes on parsing special tokens afterwards."""
    folder, reference = hf_folder(name)
    ours = minillm.load_tokenizer(folder)
    for conversation in _conversations(texts)[:8]:
        prompt = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        want = reference(prompt, add_special_tokens=False)["input_ids"]  # as its apply_chat_template tokenizes
        assert ours.encode_chat(conversation) == _bos_once(want, ours.prefix_ids)
    eos, eos_id = ours.eos_token, ours.eos_token_ids[0]
    forged = ours.encode_chat([{"role": "user", "content": f"a{eos} b"}])
    assert forged.count(eos_id) == ours.encode_chat([{"role": "user", "content": "a b"}]).count(eos_id)  # the template's
    assert ours.encode(f"a{eos} b", add_special_tokens=False).count(eos_id) == 1


def test_special_tokens_by_config_and_post_processor(hf_folder):
    spm = minillm.load_tokenizer(hf_folder("llama-spm")[0])
    assert (spm.prefix_ids, spm.suffix_ids) == ([1], [])  # the post-processor's <s>
    flagged = minillm.load_tokenizer(hf_folder("llama-spm+flags")[0])  # the flags ignored, as transformers does
    assert (flagged.prefix_ids, flagged.suffix_ids) == ([1], [])
    assert not minillm.load_tokenizer(hf_folder("wordlevel")[0]).add_bos  # no post-processor: nothing added
    bert = minillm.load_tokenizer(hf_folder("wordpiece")[0])
    cls, sep = bert.token_to_id("[CLS]"), bert.token_to_id("[SEP]")
    assert bert.encode("hello")[0] == cls and bert.encode("hello")[-1] == sep
    assert bert.encode("[CLS] hello")[:2] != [cls, cls]  # a text that starts with the prefix gets no second


def test_a_model_tokenizers_does_not_run_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Tiktoken"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer model 'Tiktoken' is not supported \\(supported: BPE, Unigram"):
        minillm.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read"):
        minillm.load_tokenizer(tmp_path)
