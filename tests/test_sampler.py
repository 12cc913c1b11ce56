import pytest
import torch

from minillm.generation.sampler import apply_repetition_penalty, filter_top_k, filter_top_p, sample


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[True, False, True, False]]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(filter_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_top_p(probs.log(), 0.8))  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_top_p(probs.log(), 0.1))  # the top token always stays
    assert kept.tolist() == [[True, False, False, False]]


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0]).log_softmax(-1).expand(20000, 3).clone()
    draws = sample(logits, temperature=1.0, generators=[torch.Generator().manual_seed(0)] * 1 + [None] * 19999)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), atol=0.02)
    assert sample(logits[:2], temperature=0).tolist() == [2, 2]


def test_greedy_kernel_matches_argmax():
    """Our greedy kernel against torch.argmax: first index on ties (within and across its lanes, and in the
    tail past the last 16), -1 for a NaN, a +inf, or only -inf; vocabularies that are not a multiple of 16."""
    from minillm import kernels
    from minillm.generation.sampler import greedy_tokens

    if not kernels.ops_available():
        pytest.skip("the C++ kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    for vocab in (49152, 1003, 7, 1):
        logits = torch.randn(9, vocab, generator=g)
        if vocab > 20:
            logits[1, [3, 900 if vocab > 900 else 20]] = 10.0  # a tie across lanes: index 3 wins
            logits[2, [17, 1]] = 10.0  # a tie in one lane order: index 1 wins
            logits[3, -1] = 10.0  # the last logit (in the scalar tail when vocab is not a multiple of 16)
        logits[4, vocab // 2] = float("nan")
        logits[5, 0] = float("inf")
        logits[6] = float("-inf")
        logits[7, -1] = float("nan")
        expected = logits.argmax(dim=-1)
        expected[~torch.isfinite(logits.gather(-1, expected.view(-1, 1)).view(-1))] = -1
        assert greedy_tokens(logits).tolist() == expected.tolist(), vocab
        assert expected[[4, 5, 6, 7]].tolist() == [-1] * 4
