"""Weight-only int8 / int4 / gguf: logits close to the same model run in float32 with the dequantized weights."""

import copy

import pytest
import torch
from checkpoints import hf_model, write_gguf

from minillm import Configs, MiniLLM
from minillm.loading import load_checkpoint
from minillm.model.transposed_linear import TransposedLinear, transpose_widening_linears
from minillm.quantization import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_model,
)

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
    rebuilt = Int4WeightOnlyLinear.from_linear(linear).dequantized_weight()
    assert (rebuilt - linear.weight).abs().max() <= 0.01 * linear.weight.abs().max()


def check_gguf(loaded, ids: torch.Tensor) -> tuple[float, float, dict[str, str]]:
    """Quantize a loaded GGUF model with its own blocks; compare with the file's float32 weights."""
    reference = loaded.model
    quantized = quantize_model(copy.deepcopy(reference), "gguf", loaded.stored)
    kinds = {name: type(m).__name__ for name, m in quantized.named_modules()
             if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear, torch.nn.Linear))}
    for name, module in quantized.named_modules():
        if isinstance(module, Int4WeightOnlyLinear):  # the stored grid itself, up to bf16 scales
            stored = reference.get_submodule(name).weight
            assert (module.dequantized_weight() - stored).abs().max() <= 0.01 * stored.abs().max(), name
    with torch.no_grad():
        q, r = quantized(ids), reference(ids)
    rel = ((q - r).abs().max() / r.abs().max()).item()
    return rel, (q.argmax(-1) == r.argmax(-1)).float().mean().item(), kinds


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_mode_uses_the_files_4_bit_blocks(tmp_path, qtype):
    hf = hf_model("llama", intermediate_size=128, vocab_size=320)
    loaded = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", hf, qtype=qtype), progress=False)
    rel, _, kinds = check_gguf(loaded, torch.randint(0, 320, (2, 20)))
    assert set(kinds.values()) == {"Int4WeightOnlyLinear"}
    assert rel <= RELATIVE_TOL


def test_gguf_mode_on_smollm():
    """Q4_1 layers run on their own codes; the Q8_0 tied LM head gets int8; the reference is the
    file dequantized to float32 (what transformers computes with)."""
    loaded = load_checkpoint(progress=False)
    ids = torch.tensor([loaded.tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    rel, agree, kinds = check_gguf(loaded, ids)
    print(f"gguf vs float32: {rel:.2%} of the largest logit; top-1 agreement {agree:.0%}")
    assert kinds.pop("output") == "Int8WeightOnlyLinear"
    assert set(kinds.values()) == {"Int4WeightOnlyLinear"}
    assert rel <= RELATIVE_TOL
    assert agree >= 0.9


def test_gguf_mode_needs_a_gguf_file():
    with pytest.raises(ValueError, match="GGUF"):
        quantize_model(MiniLLM(Configs.tiny()), "gguf")


def test_int4_falls_back_to_int8_where_the_kernel_cannot_pack():
    model = quantize_model(MiniLLM(Configs.tiny(vocab_size=300)), "int4")  # 300 outputs: not a multiple of 16
    assert isinstance(model.output, Int8WeightOnlyLinear)
    assert isinstance(model.layers[0].feed_forward.w1, Int4WeightOnlyLinear)


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
