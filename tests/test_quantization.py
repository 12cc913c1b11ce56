"""Weight-only int8 / int4 and GGUF blocks: logits close to the same model run in float32 with the dequantized weights."""

import copy
import re

import pytest
import torch
from checkpoints import hf_model, write_gguf

from minillm import Configs, MiniLLM, SamplingParams
from minillm.kernels.ggml import GGMLEmbedding, GGMLLinear
from minillm.loading import default_model_path, load_checkpoint
from minillm.loading.gguf_reader import GGUFFile
from minillm.model.onednn_linear import OneDNNLinear, use_onednn_linears
from minillm.quantization import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_model,
)

# bf16 activations inside each int8 / int4 matmul: measured 1.4 % (int8) and 2.5 % (int4) of the
# largest logit on SmolLM2 (30 layers). The GGUF kernels quantize activations to 8-bit blocks of 32,
# as llama.cpp does: measured 4.3 % on SmolLM2 (below), hence a looser bound for them.
RELATIVE_TOL = 0.04
GGUF_RELATIVE_TOL = 0.05


def dequantized_reference(model: MiniLLM, quantized: MiniLLM) -> MiniLLM:
    ref = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            target = ref.get_submodule(name)
            target.weight = torch.nn.Parameter(module.dequantized_weight(), requires_grad=False)
    return ref


def check(model: MiniLLM, ids: torch.Tensor, mode: str) -> tuple[float, float, float]:
    """The quantized model's largest logit error relative to the largest logit, against the same model on its
    dequantized weights; top-1 agreement with the float model; the relative error against the float model."""
    quantized = quantize_model(copy.deepcopy(model), mode)
    assert not any(isinstance(m, (torch.nn.Linear, OneDNNLinear)) for m in quantized.modules())
    ref = dequantized_reference(model, quantized)
    with torch.no_grad():
        q, r, full = quantized(ids), ref(ids), model(ids)
    rel = ((q - r).abs().max() / r.abs().max()).item()
    agree = (q.argmax(-1) == full.argmax(-1)).float().mean().item()
    return rel, agree, ((q - full).abs().max() / full.abs().max()).item()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_tiny_model(mode, overrides):
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny(**overrides)).eval()
    rel, _, to_float = check(model, torch.randint(0, 512, (2, 30)), mode)
    assert rel <= RELATIVE_TOL
    # and the quantized weights are near the float ones (a quantizer whose kernel and dequantization agree
    # on wrong values passes the line above): measured 0.5-0.6 % (int8), 4-7 % (int4)
    assert to_float <= {"int8": 0.02, "int4": 0.15}[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.slow
def test_smollm(smollm_f32, mode):
    ids = torch.tensor([smollm_f32.tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    rel, agree, _ = check(smollm_f32.model, ids, mode)
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


def check_gguf(path, ids: torch.Tensor) -> tuple[float, float, dict[str, str]]:
    """The default load of a GGUF file (its own blocks, our kernels) against the same file dequantized
    to float32: largest logit error relative to the largest logit, top-1 agreement, layer kinds."""
    quantized = load_checkpoint(path, progress=False)
    reference = load_checkpoint(path, dtype="float32", progress=False)
    assert quantized.quantized and not reference.quantized
    kinds = {name: type(m).__name__ for name, m in quantized.model.named_modules()
             if isinstance(m, (GGMLLinear, GGMLEmbedding, torch.nn.Linear, torch.nn.Embedding))}
    for name, module in quantized.model.named_modules():
        if isinstance(module, GGMLLinear):  # the stored values themselves, exactly
            assert torch.equal(module.dequantized_weight(), reference.model.get_submodule(name).weight), name
    with torch.no_grad():
        q, r = quantized.model(ids), reference.model(ids)
    rel = ((q - r).abs().max() / r.abs().max()).item()
    return rel, (q.argmax(-1) == r.argmax(-1)).float().mean().item(), kinds


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "F16", "BF16"])
def test_gguf_default_computes_on_the_files_blocks(tmp_path, qtype):
    hf = hf_model("llama", intermediate_size=128, vocab_size=320)
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype=qtype)
    rel, _, kinds = check_gguf(path, torch.randint(0, 320, (2, 20)))
    assert kinds.pop("tok_embeddings") == "GGMLEmbedding"
    assert set(kinds.values()) == {"GGMLLinear"}
    # F16 / BF16: the file's values in float32 arithmetic, only summed in another order
    assert rel <= (1e-5 if qtype.endswith("F16") else GGUF_RELATIVE_TOL)
    if qtype.endswith("F16"):  # kept in 16 bits: the weights take the file's bytes
        model = load_checkpoint(path, progress=False).model
        held = {w.data_ptr(): w.nbytes for m in model.modules()
                for w in (m.weights if isinstance(m, GGMLLinear) else [m.weight] if isinstance(m, GGMLEmbedding) else [])}
        assert sum(held.values()) == sum(t.data.nbytes for t in GGUFFile(path).tensors.values() if len(t.shape) == 2)


@pytest.mark.parametrize("qtype", ["Q4_0", "F16"])
def test_tensors_repacked_in_chunks_equal_those_repacked_whole(tmp_path, monkeypatch, qtype):
    """A load repacks a tensor in chunks of whole groups of 16 rows (the file's pages of one chunk mapped in at a
    time): chunks of 16 rows, with a short last one, give the bytes one chunk gives."""
    from minillm.loading import builder

    path = write_gguf(tmp_path / "tiny.gguf", hf_model("llama", hidden_size=256, intermediate_size=512, vocab_size=300),
                      qtype=qtype)

    def weights() -> list[torch.Tensor]:
        model = load_checkpoint(path, progress=False).model
        return [w for m in model.modules() if isinstance(m, GGMLLinear) for w in m.weights]

    whole = weights()
    monkeypatch.setattr(builder, "REPACK_CHUNK", 1)
    chunked = weights()
    assert len(whole) == len(chunked) >= 8 and all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert whole[-1].shape[0] == 300  # the tied LM head: 18 chunks of 16 rows and one of 12


@pytest.mark.slow
def test_gguf_default_on_smollm():
    """Q4_1 layers and the Q8_0 tied LM head run on the file's own blocks; the reference is the file
    dequantized to float32 (what transformers computes with)."""
    path = default_model_path()
    tokenizer = load_checkpoint(path, progress=False).tokenizer
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    rel, agree, kinds = check_gguf(path, ids)
    print(f"gguf kernels vs float32: {rel:.2%} of the largest logit; top-1 agreement {agree:.0%}")
    assert set(kinds.values()) == {"GGMLLinear", "GGMLEmbedding"}
    assert rel <= GGUF_RELATIVE_TOL
    assert agree >= 0.9


@pytest.mark.slow
def test_gguf_default_top1_agrees_with_float32_over_256_greedy_steps(smollm, smollm_f32):
    """The default setting generates 256 greedy tokens for several prompts; both settings then read
    those sequences (teacher forcing) and must pick the same next token at >= 97 % of the positions."""
    prompts = ["The history of the Roman Empire", "def quicksort(items):", "Ten tips for better sleep:",
               "Once upon a time, in a small village,"]
    params = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    agree, total = 0, 0
    for out in smollm.generate(prompts, params):
        ids = torch.tensor([out.prompt_token_ids + out.token_ids])
        start = len(out.prompt_token_ids) - 1  # the positions whose next token was generated
        with torch.no_grad():
            q = smollm.model(ids)[0, start:-1].argmax(-1)
            f = smollm_f32.model(ids)[0, start:-1].argmax(-1)
        agree += (q == f).sum().item()
        total += len(q)
    print(f"top-1 agreement with float32 over {total} positions: {agree / total:.2%}")
    assert total == 256 * len(prompts) and agree / total >= 0.97


def test_gguf_types_without_a_kernel_are_dequantized_with_one_warning(tmp_path, monkeypatch, caplog):
    import minillm.loading.builder as builder

    hf = hf_model("llama", intermediate_size=128, vocab_size=320)
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype="Q8_0")
    monkeypatch.setattr(builder, "KERNEL_TYPES", {"Q4_0": 2})  # as if Q8_0 had no kernel
    with caplog.at_level("WARNING", logger="minillm"):
        loaded = load_checkpoint(path, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "no quantized kernel" in r.getMessage()]
    # one line, with the count and the memory it costs (15 matrices and the embedding; 4.25x their file bytes)
    assert len(warnings) == 1 and re.fullmatch(r"tiny\.gguf: 16 Q8_0 tensors have no quantized kernel: dequantized "
                                               r"to float32, ([\d.]+) MB instead of ([\d.]+) MB", warnings[0]), warnings
    assert not any(isinstance(m, (GGMLLinear, GGMLEmbedding)) for m in loaded.model.modules())
    reference = load_checkpoint(path, dtype="float32", progress=False).model
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), reference(ids), rtol=1e-4, atol=1e-4)


def test_gguf_mode_needs_a_gguf_file():
    with pytest.raises(ValueError, match="gguf"):
        quantize_model(MiniLLM(Configs.tiny()), "gguf")


def test_int4_falls_back_to_int8_where_the_kernel_cannot_pack():
    model = quantize_model(MiniLLM(Configs.tiny(vocab_size=300)), "int4")  # 300 outputs: not a multiple of 16
    assert isinstance(model.output, Int8WeightOnlyLinear)
    assert isinstance(model.layers[0].feed_forward.w13, Int4WeightOnlyLinear)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(MiniLLM(Configs.tiny()), "int3")


def test_onednn_linears_equal_the_originals():
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny(qkv_bias=True, tie_embeddings=True)).eval()
    fast = use_onednn_linears(copy.deepcopy(model))
    swapped = [m for m in fast.modules() if isinstance(m, OneDNNLinear)]
    assert len(swapped) == 1 + 4 * model.config.num_layers  # LM head; wqkv, wo, w13, w2
    assert fast.output.weight is fast.tok_embeddings.weight  # still tied
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert (fast(ids) - model(ids)).abs().max() <= 1e-5
