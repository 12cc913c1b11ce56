"""Tensor parallelism (src/minillm/parallel/): each rank's shard is exactly its slice of the whole model, and two
ranks over gloo on loopback generate what one does.

The bundled SmolLM2-135M has 9 query heads and 3 KV heads: two ranks cannot split them, and are refused with
a message naming both counts (as vLLM refuses). The two-rank runs use a model written here with the bundled
model's tokenizer and 4 query / 2 KV heads, on real GGUF blocks (Q4_K, Q6_K, Q8_0, Q4_0: rows and whole blocks
of rows sharded), and the same file dequantized to float32. Its MLP's 768 hidden features are 3 blocks of 256,
so the ranks get 512 and 256 of them (an uneven split); its weights are random, its greedy text diverse."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch

from minillm import LLM, RequestFailed, SamplingParams
from minillm.cli import main as cli_main
from minillm.kernels.ggml import GGMLEmbedding
from minillm.loading import default_model_path, load_checkpoint
from minillm.loading.gguf_reader import GGUFFile
from minillm.engine.model_runner import StepInputs
from minillm.parallel import TensorShard, driver
from minillm.parallel.group import MESSAGE, _decode, _encode

T = gguf.GGMLQuantizationType
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land", "1, 2, 3, 4,",
           "Dear Sir or Madam,", "import numpy as np", "The mitochondria is", "Q: What is 7 times 8?\nA:"]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
# 10 prompts of 400 tokens in a step of 4,096: their inputs outgrow one broadcast (group.MESSAGE)
LONG = [[int(t) for t in torch.randint(100, 49000, (400,), generator=torch.Generator().manual_seed(i))]
        for i in range(10)]


@pytest.fixture(autouse=True)
def passive_waits(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the workers inherit it: ranks share the 2 cores with pytest


def random_tensor(kind: T, rows: int, cols: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian weights quantized by the gguf package (Q8_0, Q4_0), or, for the K-quants it cannot write, random
    blocks whose fp16 scales are set so that the weights' standard deviation is `std`."""
    if kind in (T.Q8_0, T.Q4_0):
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * std).astype(np.float32), kind)
    per, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    offsets = {T.Q4_K: [0, 2], T.Q6_K: [208]}[kind]  # the fp16 scales (Q4_K: d, dmin; Q6_K: d)
    draws = [rng.standard_normal((rows, cols // per, 1)) for _ in offsets]

    def with_scale(factor: float) -> np.ndarray:
        for offset, draw in zip(offsets, draws):
            raw[..., offset:offset + 2] = (draw * factor).astype(np.float16).view(np.uint8)
        return raw.reshape(rows, -1)

    measured = gguf.quants.dequantize(with_scale(1.0), kind).std()  # the weights are linear in the scales
    return with_scale(std / measured).copy()


def write_test_model(path, layers: int = 4, dim: int = 256, heads: int = 4, kv_heads: int = 2, hidden: int = 768):
    """A Llama GGUF with the bundled model's tokenizer; llama's converter permutes Q/K rows per head, which the
    loader undoes for each rank's heads."""
    rng = np.random.default_rng(0)
    reader = GGUFFile(default_model_path())
    fields = {key: reader.field(key) for key in reader.fields}
    vocab, head_dim = len(fields["tokenizer.ggml.tokens"]), dim // heads
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in fields.items():
        if key.startswith("tokenizer."):
            add = (writer.add_bool if isinstance(value, bool) else writer.add_uint32 if isinstance(value, int)
                   else writer.add_string if isinstance(value, str) else writer.add_array)
            add(key, value)
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)

    def add(name: str, kind: T, rows: int, cols: int, std: float) -> None:
        writer.add_tensor(name, random_tensor(kind, rows, cols, std, rng), raw_dtype=kind)

    add("token_embd.weight", T.Q4_K, vocab, dim, 1.0)
    add("output.weight", T.Q6_K, vocab, dim, 0.2)
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(layers):
        block = f"blk.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(block + norm + ".weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        add(block + "attn_q.weight", T.Q4_K, heads * head_dim, dim, dim ** -0.5)
        add(block + "attn_k.weight", T.Q4_K, kv_heads * head_dim, dim, dim ** -0.5)
        add(block + "attn_v.weight", T.Q6_K, kv_heads * head_dim, dim, dim ** -0.5)
        add(block + "attn_output.weight", (T.Q8_0, T.Q4_0)[i % 2], dim, heads * head_dim, dim ** -0.5)
        add(block + "ffn_gate.weight", T.Q4_K, hidden, dim, dim ** -0.5)
        add(block + "ffn_up.weight", T.Q8_0, hidden, dim, dim ** -0.5)
        add(block + "ffn_down.weight", (T.Q6_K, T.Q4_K)[i % 2], dim, hidden, hidden ** -0.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_test_model(tmp_path_factory.mktemp("tp") / "tp-test.gguf")


def greedy(path, dtype=None, prompts=PROMPTS, params=GREEDY, **options) -> list[list[int]]:
    with LLM(path, dtype=dtype, progress=False, **options) as llm:
        return [out.token_ids for out in llm.generate(prompts, params)]


def forced_prompts(llm: LLM, outputs: list[list[int]]) -> list[list[int]]:
    """Teacher forcing: each prompt followed by every prefix of its greedy output."""
    return [llm.tokenizer.encode(p) + row[:k] for p, row in zip(PROMPTS, outputs) for k in range(len(row))]


def next_tokens(llm: LLM, prompts: list[list[int]]) -> list[int]:
    return [out.token_ids[0] for out in llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))]


@pytest.fixture(scope="module")
def reference(model_path) -> dict:
    """One rank's greedy tokens, on the file's blocks and in float32; on the blocks, also its next token after
    every teacher-forced prefix."""
    result = {"float32": greedy(model_path, "float32")}
    with LLM(model_path, progress=False) as llm:
        result[None] = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
        result["forced"] = next_tokens(llm, forced_prompts(llm, result[None]))
        result["long"] = next_tokens(llm, LONG)
    return result


# ---------------------------------------------------------------- shards (no processes)

def weight(module) -> torch.Tensor:
    """A module's float weight [out, in], whatever it computes on (dense, GGUF blocks, a collective's wrapper)."""
    module = getattr(module, "linear", None) or getattr(module, "embedding", None) or getattr(module, "head", module)
    if isinstance(module, GGMLEmbedding):
        return module(torch.arange(module.num_embeddings))
    return module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight.detach().float()


def check_shards(load, size: int = 2) -> None:
    """Every rank's weights are exactly its rows / columns of the whole model's (and zero padding rows)."""
    whole, shards = load(None), [load(TensorShard(rank, size)) for rank in range(size)]
    config, hd = whole.config, whole.config.head_dim
    vocab_rows = -(-config.vocab_size // size)
    for rank, shard in enumerate(shards):
        assert shard.config.vocab_size == config.vocab_size and shard.config.num_kv_heads == config.num_kv_heads // size
        for name in ("tok_embeddings", "output"):
            rows = weight(getattr(shard, name))
            expected = weight(getattr(whole, name))[rank * vocab_rows:(rank + 1) * vocab_rows]
            assert torch.equal(rows[:len(expected)], expected) and not rows[len(expected):].any()
        q, kv = config.num_heads * hd // size, config.num_kv_heads * hd // size
        full_q = config.num_heads * hd
        hidden = [s.config.hidden_dim for s in shards]
        h0, h1 = sum(hidden[:rank]), sum(hidden[:rank + 1])
        for mine, full in zip(shard.layers, whole.layers):
            wqkv = weight(full.attention.wqkv)
            k0, v0 = full_q, full_q + config.num_kv_heads * hd
            assert torch.equal(weight(mine.attention.wqkv), torch.cat(
                [wqkv[rank * q:(rank + 1) * q], wqkv[k0 + rank * kv:k0 + (rank + 1) * kv],
                 wqkv[v0 + rank * kv:v0 + (rank + 1) * kv]]))
            if full.attention.wqkv.bias is not None:
                bias = full.attention.wqkv.bias
                assert torch.equal(mine.attention.wqkv.bias, torch.cat(
                    [bias[rank * q:(rank + 1) * q], bias[k0 + rank * kv:k0 + (rank + 1) * kv],
                     bias[v0 + rank * kv:v0 + (rank + 1) * kv]]))
            assert torch.equal(weight(mine.attention.wo), weight(full.attention.wo)[:, rank * q:(rank + 1) * q])
            w13, n = weight(full.feed_forward.w13), config.hidden_dim
            assert torch.equal(weight(mine.feed_forward.w13), torch.cat([w13[h0:h1], w13[n + h0:n + h1]]))
            assert torch.equal(weight(mine.feed_forward.w2), weight(full.feed_forward.w2)[:, h0:h1])
    assert sum(s.config.hidden_dim for s in shards) == config.hidden_dim


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_gguf_shards_are_slices_of_the_whole_model(model_path, dtype):
    """On the file's blocks (Q4_K/Q6_K/Q8_0/Q4_0 rows and whole blocks of rows, repacked per rank) and
    dequantized to float32; the MLP split unevenly (2 and 1 blocks of 256)."""
    check_shards(lambda shard: load_checkpoint(model_path, dtype, progress=False, shard=shard,
                                               with_tokenizer=False).model)


@pytest.mark.parametrize("kind,overrides", [("llama", {"vocab_size": 301}), ("qwen2", {}), ("phi3", {})])
def test_safetensors_shards_are_slices_of_the_whole_model(tmp_path, kind, overrides):
    """Hugging Face folders: a vocabulary that does not divide (padded with a zero row), q/k/v biases (Qwen2),
    q/k/v and gate/up stored stacked in one tensor each (Phi-3)."""
    from checkpoints import hf_model

    hf_model(kind, **overrides).save_pretrained(tmp_path, safe_serialization=True)
    check_shards(lambda shard: load_checkpoint(tmp_path, progress=False, shard=shard, with_tokenizer=False).model)


# ---------------------------------------------------------------- bad settings

def test_sizes_that_cannot_split_the_model_are_refused(model_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide SmolLM2-135M-Instruct.Q4_1.gguf's "
                                         r"9 query heads and 3 KV heads .*sizes that divide both: 1, 3"):
        LLM(progress=False, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide tp-test.gguf's 4 query heads and 2 KV"):
        LLM(model_path, progress=False, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer, got 0"):
        LLM(model_path, progress=False, tensor_parallel_size=0)
    monkeypatch.setattr(driver, "_cores", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2: one rank per core at least, and this process may "
                                         "use 1 cores"):
        LLM(model_path, progress=False, tensor_parallel_size=2)
    for command in (["generate", "hi"], ["serve"]):  # one line, exit 1, before any weight is loaded
        assert cli_main([*command, "--tensor-parallel-size", "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["minillm: error: tensor_parallel_size=2 does not divide SmolLM2-135M-Instruct.Q4_1.gguf's 9 "
                       "query heads and 3 KV heads (each rank computes whole heads); sizes that divide both: 1, 3"]


def test_a_port_in_use_and_a_mismatched_environment_are_refused(model_path, monkeypatch, capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(ValueError, match=f"MASTER_PORT={port}: rank 0 cannot listen on port {port}"):
            LLM(model_path, progress=False, tensor_parallel_size=2)
        assert cli_main(["generate", "hi", "--model", str(model_path), "--tensor-parallel-size", "2"]) == 1
        assert capsys.readouterr().err.startswith(f"minillm: error: MASTER_PORT={port}: rank 0 cannot listen")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="tensor_parallel_size=2, but WORLD_SIZE=4 in the environment"):
        LLM(model_path, progress=False, tensor_parallel_size=2)


# ---------------------------------------------------------------- two ranks over gloo on loopback

def test_two_ranks_in_float32_give_one_ranks_greedy_tokens(model_path, reference):
    threads = torch.get_num_threads()
    with LLM(model_path, dtype="float32", progress=False, tensor_parallel_size=2) as llm:
        assert llm.config.num_heads == 2 and llm.config.num_kv_heads == 1  # rank 0's shard: half the heads
        tokens = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert tokens == reference["float32"]
    assert len({t for row in tokens for t in row}) > 40  # diverse text: a broken shard would show
    assert torch.get_num_threads() == threads  # rank 0 ran on its share of the cores, given back at close


def test_two_ranks_on_gguf_blocks(model_path, reference):
    """Teacher-forced: after every prefix of one rank's greedy output, two ranks pick the token one rank picks
    (at least 99 %: the partial sums of o and down are added in another order); and a batch gives each prompt
    the tokens it gets alone."""
    with LLM(model_path, progress=False, tensor_parallel_size=2, max_num_batched_tokens=4096) as llm:
        sent = spy_on_steps(llm)
        long = next_tokens(llm, LONG)  # a step whose inputs took two broadcasts
        assert max(sent) > MESSAGE and sum(a == b for a, b in zip(long, reference["long"])) >= 9
        picked, wanted = next_tokens(llm, forced_prompts(llm, reference[None])), reference["forced"]
        assert len(picked) == 256 and sum(a == b for a, b in zip(picked, wanted)) >= 0.99 * len(wanted)
        batched = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
        alone = [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]
        assert batched == alone
        assert llm.engine.stats()["num_blocks"] > 0 and llm.engine.runner.cache.k[0].shape[2] == 1  # 1 of 2 KV heads


def spy_on_steps(llm: LLM) -> list[int]:
    """The number of integers in each step's inputs rank 0 sends."""
    channel, sizes = llm.engine.runner.parallel.channel, []
    send = channel.send_step
    channel.send_step = lambda inputs: sizes.append(len(_encode(inputs)) + 1) or send(inputs)
    return sizes


def test_step_inputs_survive_their_encoding():
    inputs = StepInputs([5, 6, 7, 8, 9], [[3, 4], [], [9]], [0, 4, 2], [2, 1, 2], [2, 5, 4], None)
    assert _decode(_encode(inputs)) == inputs
    inputs.logit_counts = [1, 1, 2]
    assert _decode(_encode(inputs)) == inputs


def test_a_killed_worker_fails_the_requests_in_flight_without_a_hang(model_path, reference):
    with LLM(model_path, progress=False, tensor_parallel_size=2) as llm:
        worker = llm.engine.runner.parallel.procs[1]
        stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        next(stream)
        other = llm.engine.add_request(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
        start = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(RequestFailed, match=rf"tensor-parallel rank 1 \(pid {worker.pid}\) was killed by signal 9; "
                                                "the tensor-parallel group is shut down"):
            for _ in stream:
                pass
        assert time.monotonic() - start < 30
        assert other not in llm.engine.requests and not llm.engine.has_unfinished()  # failed with it
        out = llm.generate(PROMPTS[2], GREEDY)[0]  # later requests fail at once, saying why
        assert out.finish_reason == "error" and "killed by signal 9" in out.error
        assert llm.engine.failure is not None
    # the group is gone: another tensor-parallel engine can start in this process
    assert greedy(model_path, tensor_parallel_size=2, prompts=PROMPTS[:1]) == reference[None][:1]


def test_a_rank_started_by_hand_joins_through_the_environment(model_path, reference, monkeypatch):
    """Multi-machine, on loopback: WORLD_SIZE / RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them; rank 1 is
    `python -m minillm.parallel.worker` started separately (as on another machine), rank 0 the LLM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK", "0")
    worker = subprocess.Popen([sys.executable, "-m", "minillm.parallel.worker"],
                              env={**os.environ, **env, "RANK": "1", "OMP_NUM_THREADS": "1"})
    try:
        assert greedy(model_path, tensor_parallel_size=2) == reference[None]
        assert worker.wait(timeout=30) == 0  # told to stop at close
    finally:
        worker.kill()
