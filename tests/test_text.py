"""Tokenizer wrapper, chat templates and incremental detokenisation (on the bundled tokenizer)."""

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from minillm.text import IncrementalDetokenizer, Tokenizer, render_chat_template
from minillm.text.chat_template import ChatTemplateError

TRICKY = "Emoji 😀🎉👨‍👩‍👧‍👦, CJK 日本語のテキスト, accents café naïve — done."


def stream(tokenizer, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finish())
    return pieces, detok


def test_stream_never_splits_characters_and_equals_decode(smollm):
    tok = smollm.tokenizer
    ids = tok.encode(TRICKY)
    assert len(ids) > len(TRICKY.split())  # multi-byte characters span several tokens
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TRICKY
    assert not any("\ufffd" in p for p in pieces)
    # byte tokens of one emoji arrive one at a time: nothing is released until the character completes
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["😀"]


def test_cut_in_the_middle_of_a_character_matches_decode(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("ab😀")[:-1]  # the last byte of the emoji is missing
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("stop", ["Paris", "is Par", " capital", "\n\n"])
def test_stop_strings_split_across_tokens(smollm, stop):
    tok = smollm.tokenizer
    text = "The capital of France is Paris.\n\nIt is big."
    ids = tok.encode(text)
    pieces, detok = stream(tok, ids, stop=[stop, "never-there"])
    assert detok.stopped
    expected = text[: text.index(stop)]
    assert "".join(pieces) == detok.text == expected
    # no piece ever leaked part of the stop string beyond what stays in the output
    released = ""
    for piece in pieces:
        released += piece
        assert expected.startswith(released)


def test_held_back_prefix_is_released_when_no_stop_follows(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("The cat sat on the mat")
    pieces, detok = stream(tok, ids, stop=["mat!"])
    assert not detok.stopped and "".join(pieces) == "The cat sat on the mat"
    assert pieces[-1].endswith("mat")  # "mat" was held (it starts "mat!") until the end


def test_chat_template_sandbox_and_errors():
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="only user"):
        render_chat_template("{{ raise_exception('only user') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        render_chat_template("{{ messages }}", [])
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat_template("{{ messages[0].content }}", parts) == "ab"


def _word_tokenizer(add_bos: bool, template: str) -> Tokenizer:
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hi": 3, "[": 4, "]": 5, "user": 6, ":": 7}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[1], add_bos=add_bos, chat_template=template)


def test_bos_is_added_once():
    template = "{{ bos_token }}{% for m in messages %}[ {{ m.role }} : {{ m.content }} ]{% endfor %}"
    tok = _word_tokenizer(add_bos=True, template=template)
    assert tok.encode("hi") == [0, 3]
    assert tok.encode("hi", add_special_tokens=False) == [3]
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids == [0, 4, 6, 7, 3, 5]  # the template's BOS, and no second one
    no_bos_template = _word_tokenizer(add_bos=True, template="{% for m in messages %}{{ m.content }}{% endfor %}")
    assert no_bos_template.encode_chat([{"role": "user", "content": "hi"}]) == [0, 3]
    assert _word_tokenizer(add_bos=False, template=template).encode("hi") == [3]


def test_smollm_tokenizer_metadata(smollm):
    tok = smollm.tokenizer
    assert tok.add_bos is False and tok.bos_token_id == 1
    assert tok.eos_token_ids == [2] and tok.eos_token == "<|im_end|>"
    assert tok.encode("<|im_start|>") == [1]  # special tokens stay whole


def test_sentencepiece_merges_equal_every_split_into_two_tokens():
    """The vectorized merges against their definition, split by split: a vocabulary of short random texts over
    a few characters (so that most splits are tokens), with astral and NUL characters, a text given twice
    (its last id is the one merged) and tied scores (ranked by the pieces' ids)."""
    import random

    from minillm.text.spm import merges_from_scores

    rng = random.Random(0)
    alphabet = ["a", "b", "▁", "é", "😀", "\x00"]
    tokens = list(dict.fromkeys(alphabet + ["".join(rng.choices(alphabet, k=rng.randint(2, 6))) for _ in range(3000)]))
    tokens += [tokens[40], tokens[41]]  # two texts given twice
    scores = [float(rng.randint(-50, 0)) for _ in tokens]  # many ties
    ids = {t: i for i, t in enumerate(tokens)}
    expected = sorted(((-scores[i], ids[t[:k]], ids[t[k:]]) for i, t in enumerate(tokens) for k in range(1, len(t))
                       if t[:k] in ids and t[k:] in ids), key=lambda m: m)
    merges = merges_from_scores(tokens, scores)
    assert len(merges) > 4000
    assert merges == [(tokens[left], tokens[right]) for _, left, right in expected]
