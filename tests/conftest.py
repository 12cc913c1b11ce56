import pytest
import torch

from minillm import Configs, MiniLLM


@pytest.fixture(scope="session")
def tiny_model() -> MiniLLM:
    """A seeded random 2-layer GQA model in float32 (PyTorch's default init gives well-separated logits)."""
    torch.manual_seed(0)
    return MiniLLM(Configs.tiny(num_layers=3)).eval()
