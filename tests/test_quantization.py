"""Weight-only int8: logits close to the same model run in float32 with the dequantized weights."""

import copy

import pytest
import torch

from minillm import Configs, MiniLLM
from minillm.quantization import Int8WeightOnlyLinear, quantize_model

# bf16 activations inside each int8 matmul: measured 1.2 % of the largest logit on SmolLM2 (30 layers).
RELATIVE_TOL = 0.03


def dequantized_reference(model: MiniLLM, quantized: MiniLLM) -> MiniLLM:
    ref = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, Int8WeightOnlyLinear):
            target = ref.get_submodule(name)
            target.weight = torch.nn.Parameter(module.dequantized_weight(), requires_grad=False)
    return ref


def check(model: MiniLLM, ids: torch.Tensor) -> tuple[float, float]:
    quantized = quantize_model(copy.deepcopy(model), "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    ref = dequantized_reference(model, quantized)
    with torch.no_grad():
        q, r, full = quantized(ids), ref(ids), model(ids)
    rel = ((q - r).abs().max() / r.abs().max()).item()
    agree = (q.argmax(-1) == full.argmax(-1)).float().mean().item()
    return rel, agree


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_tiny_model(overrides):
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny(**overrides)).eval()
    rel, _ = check(model, torch.randint(0, 512, (2, 30)))
    assert rel <= RELATIVE_TOL


def test_smollm(smollm):
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    rel, agree = check(smollm.model, ids)
    print(f"int8 vs dequantized float32: {rel:.2%} of the largest logit; top-1 agreement with float32 {agree:.0%}")
    assert rel <= RELATIVE_TOL
    assert agree >= 0.9


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(MiniLLM(Configs.tiny()), "int3")
