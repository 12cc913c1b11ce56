"""The bundled SmolLM2-135M-Instruct: MiniLLM against HF transformers on the same GGUF weights."""

import pytest
import torch

from minillm import SamplingParams

pytestmark = pytest.mark.slow  # transformers loads the same file in float32 beside ours

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "Water boils at 100 degrees",
    "Translate to French: Good morning, my friend.",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primary colors."}],
]
TEXTS = [
    "Hello, world! This is a test.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\twith tabs",
    "   leading, trailing and    inner   whitespace runs   \n\n\n",
    "Numbers: 3.14159, 2024, 1,000,000 and 0x1F",
    "Emoji: 😀🎉👨‍👩‍👧‍👦🇫🇷 and more",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "Accents: café, naïve, Ünïcödé, Øresund, señor",
    "Special tokens: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "I'm sure you'll see they've DON'T",
    "Привет, мир! Γειά σου Κόσμε",
]


def test_tokenizer_matches_transformers(smollm_f32, hf_smollm):
    _, hf_tok = hf_smollm
    for text in TEXTS:
        ids = smollm_f32.tokenizer.encode(text)
        assert ids == hf_tok.encode(text), text
        assert smollm_f32.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(smollm_f32, hf_smollm):
    _, hf_tok = hf_smollm
    for chat in CHATS:
        ours = smollm_f32.tokenizer.encode_chat(chat)
        theirs = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert ours == list(theirs)


def test_last_position_logits_match(smollm_f32, hf_smollm):
    hf, _ = hf_smollm
    worst = 0.0
    for text in PROMPTS + [smollm_f32.tokenizer.apply_chat_template(c) for c in CHATS]:
        ids = torch.tensor([smollm_f32.tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            ours = smollm_f32.model(ids, attention_backend="flash")[0, -1]
            theirs = hf(ids).logits[0, -1]
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"max |logit difference| vs transformers: {worst:.2e}")
    assert worst <= 1e-3


def test_greedy_continuations_match(smollm_f32, hf_smollm):
    hf, _ = hf_smollm
    prompts = [smollm_f32.tokenizer.encode(p) for p in PROMPTS] + [smollm_f32.tokenizer.encode_chat(c) for c in CHATS]
    ours = smollm_f32.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    for ids, out in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=smollm_f32.eos_token_ids, pad_token_id=2)[0, len(ids):].tolist()
        assert out.token_ids == theirs, smollm_f32.tokenizer.decode(ids)
