"""How a byte-level BPE vocabulary splits text before merging, by llama.cpp's `tokenizer.ggml.pre` name.

A GGUF file names its pre-tokenizer instead of carrying the regexes of its tokenizer.json; this table gives,
for every name llama.cpp knows, the split regexes (applied in turn, each piece matched or not kept as its
own piece, as `tokenizers`' Split "isolated" does), whether a piece that is itself a token skips the merges
(`ignore_merges`), and whether BOS is added when the file does not say. The regexes are the ones of the
original tokenizer.json files (the references llama.cpp's test suite was made with), in Oniguruma syntax.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# GPT-2's rule; its last `\s+` only names a piece the other branches leave between matches anyway.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Upper/lower-case runs (o200k style), with or without trailing contractions
_CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}")
_GPT4O = (_CASED.replace("{c}", _CONTRACTIONS + "?")
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[一-龥ࠀ-一가-\ud7ff]+"  # CJK ideographs and Hangul (U+D7FF is the last Hangul syllable block)
# DeepSeek LLM's letters: Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee, Glagolitic, Coptic and more
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
    "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_PUNCT_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+")
_SENTENCE = r" ?[^(\s|.,!?…。，、।۔،)]+"  # BLOOM-style: words and their leading space

_KINDS: dict[str, PreTokenizer] = {
    # llama.cpp's fallback for files without a name: punctuation runs first, then GPT-2's rule, then digits
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "gpt2": PreTokenizer((GPT2,)),
    "llama3": PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "llama3-split": PreTokenizer((_LLAMA3,)),  # the same regex without llama3's merge and BOS rules
    # llama3's, with runs of spaces cut into powers of two
    "jais2": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                           r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
                           r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",)),
    "deepseek-llm": PreTokenizer(("[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~" "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                                  _CJK, r"\p{N}+")),
    "deepseek-coder": PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")),
    "deepseek3": PreTokenizer((r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                               _PUNCT_WORDS + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
    "spark2_5": PreTokenizer((r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _PUNCT_WORDS + r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}")),
    "youtu": PreTokenizer(("[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
                           _CASED.replace("{c}", _CONTRACTIONS + "?")
                           + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")),
    "starcoder": PreTokenizer((r"\p{N}", GPT2)),  # digits one by one, then GPT-2's rule
    "qwen2": PreTokenizer((_QWEN2,)),
    "qwen35": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                            r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    "bloom": PreTokenizer((_SENTENCE,)),
    "viking": PreTokenizer((_SENTENCE, r"\p{N}")),
    "glm4": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "tekken": PreTokenizer((_CASED.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
                           ignore_merges=True, add_bos=True),
    "chameleon": PreTokenizer(("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\t\n]|    |  )", r"\p{N}",
                               r"[\p{P}!-/:-@\[-`{-~]", GPT2), add_bos=True),
    "gpt4o": PreTokenizer((_GPT4O,)),
    "granite-embed-multi-97m": PreTokenizer((_GPT4O,), ignore_merges=True),
    "tiny_aya": PreTokenizer((r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O)),
    "superbpe": PreTokenizer((r"\p{N}+", r"(?=(\d{3})+(?!\d))")),
    "bailingmoe": PreTokenizer((r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                                r"|\s*[\r\n]|\s+(?!\S)|\s+",)),
    "seed-coder": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                                r"|\s+(?!\S)|\s+",)),
    "ufakzeka": PreTokenizer((_QWEN2.removeprefix(_CONTRACTIONS + "|"),)),
    "laguna": PreTokenizer(("[^\n]+|[\n]+", _QWEN2)),
    "exaone-moe": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                                r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",)),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                                                     r"|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True),
}

# Every `tokenizer.ggml.pre` name llama.cpp accepts for a byte-level BPE vocabulary, by the kind above.
_NAMES: dict[str, str] = {
    **dict.fromkeys(("default",), "default"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), "llama3"),
    **dict.fromkeys(("dbrx", "smaug-bpe"), "llama3-split"),
    **dict.fromkeys(("jais-2",), "jais2"),
    **dict.fromkeys(("deepseek-llm",), "deepseek-llm"),
    **dict.fromkeys(("deepseek-coder",), "deepseek-coder"),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), "deepseek3"),
    **dict.fromkeys(("spark2_5",), "spark2_5"),
    **dict.fromkeys(("youtu",), "youtu"),
    **dict.fromkeys(("falcon",), "falcon"),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    "starcoder"),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
                     "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "exaone4",
                     "trillion", "granite-docling"), "gpt2"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez", "hunyuan", "solar-open",
                     "grok-2"), "qwen2"),
    **dict.fromkeys(("qwen35",), "qwen35"),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), "bloom"),
    **dict.fromkeys(("viking",), "viking"),
    **dict.fromkeys(("chatglm-bpe",), "llama3-split"),
    **dict.fromkeys(("glm4", "glm5"), "glm4"),
    **dict.fromkeys(("tekken",), "tekken"),
    **dict.fromkeys(("chameleon",), "chameleon"),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "gpt4o"),
    **dict.fromkeys(("granite-embed-multi-97m",), "granite-embed-multi-97m"),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), "tiny_aya"),
    **dict.fromkeys(("superbpe",), "superbpe"),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), "bailingmoe"),
    **dict.fromkeys(("seed-coder",), "seed-coder"),
    **dict.fromkeys(("ufakzeka",), "ufakzeka"),
    **dict.fromkeys(("laguna",), "laguna"),
    **dict.fromkeys(("exaone-moe",), "exaone-moe"),
    **dict.fromkeys(("minicpm5",), "minicpm5"),
}
# Names llama.cpp splits with code of its own rather than a regex: refused rather than approximated.
_CUSTOM = {"kimi-k2": "Kimi-K2's Han-aware splitter", "afmoe": "AFMoE's digit grouping"}
# SentencePiece-style BPE inside a gpt2 file: spaces as "▁", raw UTF-8 pieces, lines split apart
GEMMA4_PRE = {"gemma4", "granite-embed-multi-311m"}
SPM_STYLE_BPE = GEMMA4_PRE | {"sarvam-moe"}


def pre_tokenizer(name: str | None) -> PreTokenizer:
    """The split rule of a GGUF file's `tokenizer.ggml.pre` (None: llama.cpp's default, as it does)."""
    name = name or "default"
    if name in _CUSTOM:
        raise ValueError(f"pre-tokenizer {name!r} ({_CUSTOM[name]}) is not supported")
    if name not in _NAMES:
        raise ValueError(f"unknown pre-tokenizer {name!r} (llama.cpp refuses it too)")
    return _KINDS[_NAMES[name]]
