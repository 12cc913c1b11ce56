"""Checkpoint loading against transformers on the same (tiny, random) weights; bad files."""

import json
import shutil

import numpy as np
import pytest
import torch

from checkpoints import dequantized_copy, hf_model, write_gguf, write_sentencepiece_gguf
from minillm.loading import ModelLoadError, load_checkpoint
from minillm.loading.gguf_file import GGUFCheckpoint

IDS = torch.tensor([[1, 17, 42, 99, 250, 3, 7, 7, 120, 64, 5, 280]])


def max_logit_diff(ours, hf) -> float:
    with torch.no_grad():
        return (ours(IDS) - hf(IDS).logits).abs().max().item()


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {}),
])
def test_hf_folder_matches_transformers(tmp_path, kind, overrides):
    hf = hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_checkpoint(tmp_path, progress=False)
    assert loaded.model.config.qkv_bias == (kind == "qwen2")
    assert max_logit_diff(loaded.model, hf) <= 1e-4


def test_sharded_safetensors(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert max_logit_diff(load_checkpoint(tmp_path, progress=False).model, hf) <= 1e-4


def test_generation_config_eos_ids(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_checkpoint(tmp_path, progress=False).eos_token_ids == [2, 7]


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_llama_matches_transformers_on_the_same_weights(tmp_path, qtype):
    """Q/K rows are permuted as llama.cpp does on the way in; the loader must undo it."""
    hf = hf_model("llama")
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", hf, qtype=qtype)
    loaded = load_checkpoint(path, dtype="float32", progress=False)
    assert max_logit_diff(loaded.model, dequantized_copy(hf, qtype)) <= 1e-4


def test_gguf_qwen2_with_bias_and_tied_embeddings(tmp_path):
    hf = hf_model("qwen2", tie_word_embeddings=True)
    path = write_gguf(tmp_path / "qwen.gguf", hf, arch="qwen2")
    loaded = load_checkpoint(path, dtype="float32", progress=False)
    assert loaded.model.config.qkv_bias and loaded.model.config.tie_embeddings
    assert max_logit_diff(loaded.model, hf) <= 1e-4


@pytest.mark.parametrize("qtype,block_bytes,scale_offsets", [
    ("Q2_K", 84, (80, 82)), ("Q3_K", 110, (108,)), ("Q4_K", 144, (0, 2)), ("Q5_K", 176, (0, 2)), ("Q6_K", 210, (208,)),
])
def test_k_quant_tensors_are_dequantized_by_gguf(tmp_path, qtype, block_bytes, scale_offsets):
    """gguf-py cannot quantize K-quants, so write random blocks with finite fp16 scales and check that
    the loader reads them as the gguf package dequantizes them."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    rows, cols = 8, 256  # one 256-wide super-block per row
    raw = rng.integers(0, 256, size=(rows, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        raw[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ck = GGUFCheckpoint(tmp_path / "k.gguf")
    got = ck.tensor("blk.0.ffn_up.weight", config=None)
    expected = gguf.quants.dequantize(raw, kind)
    assert got.shape == (rows, cols) and np.isfinite(expected).all()
    assert torch.equal(got, torch.from_numpy(expected.astype(np.float32)))


def test_bad_gguf_files(tmp_path):
    hf = hf_model("llama")
    good = write_gguf(tmp_path / "good.gguf", hf)
    data = good.read_bytes()

    wrong_magic = tmp_path / "magic.gguf"
    wrong_magic.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_checkpoint(wrong_magic, progress=False)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_checkpoint(truncated, progress=False)

    cut = write_gguf(tmp_path / "cut.gguf", hf, qtype="Q8_0")  # the last tensor's blocks end early
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"tensor \S+ \(Q8_0, \d+ bytes\) runs past the end of the file"):
        load_checkpoint(cut, progress=False)

    missing = write_gguf(tmp_path / "missing.gguf", hf, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError, match="layers.1.feed_forward.w3.weight"):
        load_checkpoint(missing, progress=False)

    falcon = write_gguf(tmp_path / "falcon.gguf", hf, arch="falcon")
    with pytest.raises(ModelLoadError, match="architecture 'falcon' is not supported"):
        load_checkpoint(falcon, progress=False)

    with pytest.raises(ModelLoadError, match="no such model file"):
        load_checkpoint(tmp_path / "nowhere.gguf", progress=False)


def test_bad_hf_folders(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "ok", safe_serialization=True)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tmp_path / "ok" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        load_checkpoint(pickled, progress=False)

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "ok", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        load_checkpoint(other, progress=False)

    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(tmp_path, progress=False)


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    from minillm.text import Tokenizer

    path = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf(GGUFCheckpoint(path))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.add_bos and ours.bos_token_id == 1
    for text in ["hello world", " hello  world", "abc", "héllo wörld", "ab c", "hello\nworld", "xyz 😀"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
