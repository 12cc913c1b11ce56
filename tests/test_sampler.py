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
