"""Does MiniLLM read every architecture's GGUF file as llama.cpp does? Logits of both engines on the same
files, for each architecture and RoPE variant we load.

    python benchmarks/bench_llama_cpp_parity.py [--out benchmarks/results/cpu_default]

The files are tiny random models (tests/checkpoints.py: transformers builds them, the writer stores them as
llama.cpp's converter does), float32, then re-quantized by llama.cpp itself (`llama_model_quantize`) to
Q8_0, Q4_K_M, Q6_K and IQ4_XS. Both engines read 100 random tokens (past Gemma's 16-token window);
reported: the largest logit difference over the largest logit (on the module path, float32 and on the
file's blocks), and, through the engine (the default setting: fused decoder, paged attention, one token
per step), the top-1 agreement with llama.cpp's argmax over 64 greedy tokens, teacher-forced, and the
largest gap between llama.cpp's top logit and its logit of our token (a reading that differs in kind shows
as gaps near the logits' own spread; near-ties of random models as small ones). Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' model writer
import checkpoints  # noqa: E402

from minillm import LLM, SamplingParams  # noqa: E402
from minillm.bench.common import environment  # noqa: E402
from minillm.bench.report import heading, table, write_report  # noqa: E402
from minillm.loading import load_checkpoint  # noqa: E402
from quantize_with_llama_cpp import quantize  # noqa: E402

VOCAB = 300  # tests/checkpoints.py's tiny models
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)  # K-quant rows
TOKENS, GENERATED = 100, 64
LONGROPE = {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(32)],
                             "long_factor": [2.0 + i for i in range(32)]},
            "original_max_position_embeddings": 256, "max_position_embeddings": 1024}
# (name, transformers kind, GGUF architecture, model overrides, extra metadata, llama.cpp context)
CASES = [
    ("llama", "llama", "llama", {}, {}, 128),
    ("llama, Llama 3.1 rope_freqs", "llama", "llama",
     {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, {}, 128),
    ("llama, linear RoPE x4", "llama", "llama", {}, {"{arch}.rope.scaling.type": "linear",
                                                     "{arch}.rope.scaling.factor": 4.0}, 128),
    ("qwen2 (biases)", "qwen2", "qwen2", {}, {}, 128),
    ("qwen2, YaRN x4", "qwen2", "qwen2", {}, {"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
                                              "{arch}.rope.scaling.original_context_length": 32}, 128),
    ("qwen3 (q/k norms)", "qwen3", "qwen3", {"head_dim": 64}, {}, 128),
    ("phi3 (fused QKV, gate/up)", "phi3", "phi3", {}, {}, 128),
    # llama.cpp takes Phi-3's long factors when its context exceeds the original one, transformers (and we)
    # when the sequence does: compared where both pick the same
    ("phi3, LongRoPE short factors", "phi3", "phi3", LONGROPE, {}, 256),
    ("gemma2 (soft-caps, window)", "gemma2", "gemma2", {"head_dim": 64}, {}, 128),
    ("gemma3 (window, local RoPE)", "gemma3", "gemma3", {"head_dim": 64}, {}, 128),
    ("gemma3, linear RoPE x8 (global layers)", "gemma3", "gemma3", {"head_dim": 64},
     {"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 8.0}, 128),
]
QUANTIZED = ("Q8_0", "Q4_K_M", "Q6_K", "IQ4_XS")


def write_case(folder: Path, name: str, kind: str, arch: str, overrides: dict, metadata: dict) -> Path:
    hf = checkpoints.hf_model(kind, **{**WIDE, **overrides})
    llama3 = (overrides.get("rope_scaling") or {}).get("rope_type") == "llama3"
    freqs = checkpoints.llama3_rope_freqs(hf) if llama3 else None
    return checkpoints.write_gguf(folder / f"{_stem(name)}.gguf", hf, arch=arch, metadata=metadata,
                                  rope_freqs=freqs, vocabulary=True)


def compare(path: Path, n_ctx: int, threads: int) -> dict:
    import llama_cpp

    ids = torch.randint(3, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    cpp = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    cpp.eval(ids)
    reference = np.asarray(cpp.scores[:TOKENS])
    scale = float(np.abs(reference).max())
    row = {"logit scale": scale}
    for dtype in ("float32", None):
        model = load_checkpoint(path, dtype=dtype, progress=False).model
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].float().numpy()
        row[f"max diff / scale, {dtype or 'blocks'}"] = float(np.abs(ours - reference).max()) / scale
    # the engine's default setting, decoding one token per step
    prompt = ids[:TOKENS - GENERATED]
    llm = LLM(str(path), progress=False)
    out = llm.generate([prompt], SamplingParams(max_tokens=GENERATED, temperature=0, ignore_eos=True))[0].token_ids
    cpp.reset()
    cpp.eval(prompt + out)
    scores = np.asarray(cpp.scores[len(prompt) - 1:len(prompt) - 1 + len(out)])
    chosen = scores[np.arange(len(out)), out]
    row["engine top-1 agreement"] = float((scores.argmax(-1) == np.asarray(out)).mean())
    row["largest gap / scale"] = float((scores.max(-1) - chosen).max()) / scale
    return row


def _stem(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cpu_default")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("minillm").setLevel(logging.ERROR)  # "no chat template" for every tiny file
    threads = torch.get_num_threads()
    rows = []
    with TemporaryDirectory() as tmp:
        for name, kind, arch, overrides, metadata, n_ctx in CASES:
            source = write_case(Path(tmp), name, kind, arch, overrides, metadata)
            for ftype in ("F32",) + QUANTIZED:
                path = source if ftype == "F32" else source.with_name(f"{source.stem}.{ftype}.gguf")
                if ftype != "F32":
                    quantize(str(source), str(path), ftype)
                rows.append({"case": name, "type": ftype, **compare(path, n_ctx, threads)})
                print(rows[-1], flush=True)
    result = {"environment": environment(), "tokens": TOKENS, "generated": GENERATED, "rows": rows}
    keys = [k for k in rows[0] if k not in ("case", "type", "logit scale")]
    lines = [*heading("Architectures: MiniLLM and llama.cpp on the same GGUF files",
                      __doc__.split("\n\n")[2].replace("\n", " "), result["environment"],
                      "python benchmarks/bench_llama_cpp_parity.py"),
             *table(["file", "type", *keys],
                    [[r["case"], r["type"], *(f"{r[k]:.1%}" if "agreement" in k else f"{r[k]:.4f}" for k in keys)]
                     for r in rows])]
    write_report(Path(args.out), "llama_cpp_parity", result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
