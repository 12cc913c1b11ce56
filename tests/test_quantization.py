"""Weight-only int8 / int4: logits close to the same model run in float32 with the dequantized weights."""

import copy

import pytest
import torch

from minillm import Configs, MiniLLM
from minillm.model.transposed_linear import TransposedLinear, transpose_widening_linears
from minillm.quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_model

# bf16 activations inside each quantized matmul: measured 1.4 % (int8) and 2.5 % (int4) of the
# largest logit on SmolLM2 (30 layers).
RELATIVE_TOL = 0.04


def dequantized_reference(model: MiniLLM, quantized: MiniLLM) -> MiniLLM:
    ref = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            target = ref.get_submodule(name)
            if isinstance(target, TransposedLinear):
                target.weight_t = torch.nn.Parameter(module.dequantized_weight().t().contiguous(), requires_grad=False)
            else:
                target.weight = torch.nn.Parameter(module.dequantized_weight(), requires_grad=False)
    return ref


def check(model: MiniLLM, ids: torch.Tensor, mode: str) -> tuple[float, float]:
    quantized = quantize_model(copy.deepcopy(model), mode)
    assert not any(isinstance(m, (torch.nn.Linear, TransposedLinear)) for m in quantized.modules())
    ref = dequantized_reference(model, quantized)
    with torch.no_grad():
        q, r, full = quantized(ids), ref(ids), model(ids)
    rel = ((q - r).abs().max() / r.abs().max()).item()
    agree = (q.argmax(-1) == full.argmax(-1)).float().mean().item()
    return rel, agree


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_tiny_model(mode, overrides):
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny(**overrides)).eval()
    rel, _ = check(model, torch.randint(0, 512, (2, 30)), mode)
    assert rel <= RELATIVE_TOL


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_smollm(smollm, mode):
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    rel, agree = check(smollm.model, ids, mode)
    print(f"{mode} vs dequantized float32: {rel:.2%} of the largest logit; top-1 agreement with float32 {agree:.0%}")
    assert rel <= RELATIVE_TOL
    assert agree >= 0.9


def test_int4_is_exact_on_a_4_bit_grid():
    """Weights already on a 16-level grid per group of 32 (as GGUF Q4_1 blocks are) come back unchanged,
    up to the kernel's bf16 scale and zero."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (48, 64)).float()
    codes[:, ::32] = 0  # every group holds its minimum ...
    codes[:, 1::32] = 15  # ... and maximum code, as Q4_1 quantization guarantees
    scale = torch.rand(48, 2).repeat_interleave(32, dim=1) * 0.1 + 0.01
    low = torch.randn(48, 2).repeat_interleave(32, dim=1) * 0.1
    linear = torch.nn.Linear(64, 48, bias=False)
    linear.weight.data = codes * scale + low
    rebuilt = Int4WeightOnlyLinear(linear).dequantized_weight()
    assert (rebuilt - linear.weight).abs().max() <= 0.01 * linear.weight.abs().max()


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(MiniLLM(Configs.tiny()), "int3")


def test_transposed_linears_equal_the_originals():
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny(qkv_bias=True, tie_embeddings=True)).eval()
    fast = transpose_widening_linears(copy.deepcopy(model))
    swapped = [m for m in fast.modules() if isinstance(m, TransposedLinear)]
    assert len(swapped) == 1 + 3 * model.config.num_layers  # LM head, wqkv, w1, w3 (they widen)
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert (fast(ids) - model(ids)).abs().max() <= 1e-5
