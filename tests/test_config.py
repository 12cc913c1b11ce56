import pytest
import torch

from minillm import Configs, MiniLLM, ModelConfig


def test_seed_fields_are_enough():
    cfg = ModelConfig(dim_model=128, num_heads=4, num_layers=2, max_seq_len=64, vocab_size=100)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 32 and cfg.hidden_dim == 512
    assert cfg.torch_dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim_model=130, num_heads=4), "divisible by num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(max_seq_len=0), "max_seq_len must be a positive integer"),
    (dict(hidden_dim=0), "hidden_dim must be positive"),
    (dict(num_kv_heads=0), "num_kv_heads must be positive"),
    (dict(rope_theta=0.0), "rope_theta must be positive"),
    (dict(dtype="int8"), "unknown dtype"),
])
def test_inconsistent_values_are_rejected(kwargs, message):
    base = dict(dim_model=128, num_heads=4, num_layers=2, max_seq_len=64, vocab_size=100)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **kwargs})


@pytest.mark.parametrize("overrides", [
    {}, dict(tie_embeddings=True), dict(qkv_bias=True), dict(num_kv_heads=1, head_dim=24),
])
def test_parameter_count_matches_the_module(overrides):
    cfg = Configs.tiny(**overrides)
    model = MiniLLM(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_presets():
    expected = {"small": (512, 8), "medium": (1024, 16), "large": (2048, 32)}
    for name, (dim, heads) in expected.items():
        cfg = getattr(Configs, name)()
        assert (cfg.dim_model, cfg.num_heads) == (dim, heads)
        assert cfg.num_layers >= 8
    assert round(Configs.small().num_parameters() / 1e6, 1) == 60.0
    assert round(Configs.large().num_parameters() / 1e9, 2) == 1.12
