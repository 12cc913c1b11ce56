import pytest
import torch

from minillm import LLM, Configs, MiniLLM
from minillm.loading import default_model_path
from serving import API_KEY, start_server


@pytest.fixture(scope="session")
def tiny_model() -> MiniLLM:
    """A seeded random 2-layer GQA model in float32 (PyTorch's default init gives well-separated logits)."""
    torch.manual_seed(0)
    return MiniLLM(Configs.tiny(num_layers=3)).eval()


@pytest.fixture(scope="session")
def smollm() -> LLM:
    """The bundled SmolLM2-135M-Instruct in the default setting (its own quantized blocks), loaded once."""
    return LLM(progress=False)


@pytest.fixture(scope="session")
def smollm_f32() -> LLM:
    """The same file dequantized to float32: the HF-parity setting, loaded once."""
    return LLM(dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' own loading of the same GGUF file (float32): the correctness reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def server():
    """One `minillm serve` (bundled model, --api-key) for every server test module."""
    yield from start_server("--api-key", API_KEY, "--served-model-name", "smollm2")
