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


# The preset table as published (README's "Configs" table and the Configs docstring): shape, then
# parameter count in the units shown there.
PUBLISHED = {
    "small": (dict(dim_model=512, num_heads=8, num_kv_heads=8, num_layers=8, hidden_dim=1536), 60.0, 1e6, 1),
    "medium": (dict(dim_model=1024, num_heads=16, num_kv_heads=16, num_layers=16, hidden_dim=2816), 271.1, 1e6, 1),
    "large": (dict(dim_model=2048, num_heads=32, num_kv_heads=8, num_layers=22, hidden_dim=5632), 1.12, 1e9, 2),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_the_published_table(name):
    """Each preset has the published shape, and the real module (built on the meta device: shapes, no memory)
    has the published parameter count; num_parameters() agrees with the module."""
    shape, published, unit, digits = PUBLISHED[name]
    cfg = getattr(Configs, name)()
    assert {key: getattr(cfg, key) for key in shape} == shape
    assert cfg.vocab_size == 32000 and not cfg.tie_embeddings
    with torch.device("meta"):
        model = MiniLLM(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / unit, digits) == published
    assert cfg.num_parameters() == count


def test_small_preset_parameters_by_hand():
    """Llama arithmetic for Configs.small(): untied embedding and LM head, per layer q/k/v/o (4 d^2), the
    SwiGLU's three matrices (3 d h) and two RMSNorm weights, plus the final norm."""
    d, h, layers, vocab = 512, 1536, 8, 32000
    expected = 2 * vocab * d + layers * (4 * d * d + 3 * d * h + 2 * d) + d  # 60,039,680
    with torch.device("meta"):
        model = MiniLLM(Configs.small())
    assert sum(p.numel() for p in model.parameters()) == expected
