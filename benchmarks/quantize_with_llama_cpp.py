"""Re-quantize a GGUF file with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`), e.g. the
bundled SmolLM2 Q4_1 file to Q4_K_M: a file of real weights with llama.cpp's per-tensor type mix, to measure
agreement with llama.cpp on (benchmarks/bench_agreement.py --model OUT).

    python benchmarks/quantize_with_llama_cpp.py OUT.gguf --type Q4_K_M [--model IN.gguf]
"""

from __future__ import annotations

import argparse

import llama_cpp

from minillm.loading import default_model_path


def quantize(source: str, out: str, ftype: str) -> None:
    """llama.cpp re-quantizes the GGUF file `source` into `out` as file type `ftype` (Q4_K_M, ...)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True  # the input may be quantized already
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {ftype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--model", default=None, help="the GGUF file to re-quantize (default: the bundled model)")
    parser.add_argument("--type", default="Q4_K_M", help="llama.cpp's file type name: Q4_K_M, Q5_K_M, Q6_K, IQ4_XS, ...")
    args = parser.parse_args()
    quantize(args.model or str(default_model_path()), args.out, args.type)


if __name__ == "__main__":
    main()
