"""The `minillm` command: generate and chat with a model (the bundled SmolLM2 by default)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from .argtypes import positive_int
from .engine import RequestFailed
from .quantization import QUANTIZATION_MODES
from .sampling_params import SamplingParams
from .text.chat_formats import BUILTIN, resolve_chat_template
from .text.unicode import check_text


def _weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a GGUF file or a Hugging Face folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dequantize every weight to this dtype (float32: the setting that matches HF transformers "
                             "exactly). Default: a GGUF file computes with its own quantized blocks (our C++ kernels, "
                             "the fastest), other checkpoints in float32; bfloat16 on a GPU")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), or cuda / cuda:N: a GPU, with our Triton kernels and CUDA graphs "
                             "(pip install -e \".[gpu]\")")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="on a GPU: the fraction of its memory the engine may take; the KV cache gets what the "
                             "weights and one step leave of it (default 0.9)")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATION_MODES,
                        help="gguf: insist on a GGUF file's own blocks (the default for GGUF files); int8/int4: "
                             "weight-only, re-quantized from float")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the engine step at start-up (1-2.5 min on 2 cores; faster once cached)")
    parser.add_argument("--fast-prefill", action="store_true",
                        help="GGUF blocks on an AVX512-BF16 CPU: prompt chunks of 64+ tokens as bf16 GEMMs (about 2x "
                             "faster prefill; a prompt's bits then depend on its batch, decode tokens stay exact)")
    parser.add_argument("--speculative", default=None, type=_speculative, metavar="ngram|draft:PATH",
                        help="speculative decoding: ngram (drafts looked up in the prompt and output: pays when the "
                             "answer repeats its input) or draft:PATH (a smaller model with the same tokenizer); the "
                             "tokens are the same as without")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="the KV cache's dtype. Default: float16 for a GGUF file on its own blocks (llama.cpp's "
                             "default: half the memory, and half the bytes a decode token reads), else the model's")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                        help="shard the model over N processes (torch.distributed: gloo on the CPU, NCCL on GPUs), "
                             "each with its share of the cores; N must divide the query and KV heads. Other machines "
                             "join through MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK (docs/scale_out.md)")


def _speculative(text: str) -> str:
    from .engine.speculative import SpeculativeConfig

    try:
        SpeculativeConfig.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _chat_template_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                        help=f"the chat template: a built-in one ({', '.join(BUILTIN)}) or a Jinja file. Default: the "
                             "model's own; a model without one gets its family's built-in template, named in the log")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A shell gives `--stop "\\n\\n"` as backslash, n, backslash, n: read those as the characters meant."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {value}")
    return value


def _model_options(parser: argparse.ArgumentParser) -> None:
    _weights_options(parser)
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=None, type=unescape,
                        help=r"a stop string (repeatable); \n, \t, \r and \\ are read as escapes, as llama.cpp does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="MiniLLM: run Llama-family models on CPU or GPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete a prompt, streaming the text")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")
    _model_options(gen)
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server")
    _weights_options(serve)
    _chat_template_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every path but /health and the chat page's "
                            "(/metrics and /docs too)")
    serve.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--stream-timeout", type=float, default=30.0,
                       help="abort a stream whose client has read nothing for this many seconds once its buffer "
                            "(64 outputs) is full; it is paused meanwhile (default 30)")
    serve.add_argument("--read-timeout", type=float, default=30.0,
                       help="seconds a client has to send a request's head, and then its body, before its "
                            "connection is closed (the body: 408); idle keep-alive connections close after 5 s "
                            "(default 30)")
    serve.add_argument("--engine-timeout", type=float, default=60.0,
                       help="seconds the engine process may go without answering a ping (it answers between "
                            "steps) before it is killed and restarted, its requests failed (default 60)")
    serve.add_argument("--max-queue-wait", type=float, default=None,
                       help="seconds a request may wait for the engine to start it before it gets 503 "
                            "(default: no limit)")
    serve.add_argument("--max-concurrency", type=positive_int, default=None,
                       help="sequences batched at once; more wait (default 64 on CPU, 256 on a GPU)")
    serve.add_argument("--replicas", type=int, default=1,
                       help="engine replicas behind Ray Serve, this machine's cores shared between them (default 1: "
                            "one server, no Ray; more: pip install 'minillm[serve]'; docs/scale_out.md)")
    serve.add_argument("--router", default="prefix", choices=["prefix", "pow2"],
                       help="with --replicas: prefix (a prompt's start picks the replica that caches it; the least "
                            "loaded one when that one is far busier) or pow2 (the less loaded of two random replicas: "
                            "Ray Serve's default policy) (default prefix)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: the file name)")
    serve.add_argument("--no-web-ui", action="store_true", help="no chat page at / (it answers 404)")
    bench = commands.add_parser("bench", help="benchmarks (default: prefill/decode speed vs HF transformers)",
                                add_help=False)
    bench.add_argument("--throughput", action="store_true",
                       help="offline throughput of the batching engine vs HF transformers")
    bench.add_argument("--serve", action="store_true", help="load test of `minillm serve` on loopback")
    chat = commands.add_parser("chat", help="interactive chat (reads lines from stdin; /reset, /exit)")
    chat.add_argument("--system", default=None, help="a system message")
    _chat_template_option(chat)
    _model_options(chat)
    tokenize = commands.add_parser("tokenize", help="print a text's token ids and pieces (no weights are loaded)")
    tokenize.add_argument("text", help="the text (\\n, \\t, \\\\ are unescaped)")
    tokenize.add_argument("--model", default=None, help="a GGUF file (vocabulary-only too) or a Hugging Face folder "
                                                        "(default: the bundled SmolLM2-135M-Instruct)")
    tokenize.add_argument("--no-special", action="store_true",
                          help="neither BOS/EOS nor special-token text as control tokens (llama.cpp's test suite)")
    return parser


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=args.stop)


def _load(args: argparse.Namespace):
    from .llm import LLM
    from .runtime import freeze_heap

    llm = LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
              progress=sys.stderr.isatty(), compile=args.compile, fast_prefill=args.fast_prefill,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
              chat_template=getattr(args, "chat_template", None), speculative=args.speculative,
              tensor_parallel_size=args.tensor_parallel_size)
    freeze_heap()
    return llm


def _generate(args: argparse.Namespace) -> None:
    params = _sampling(args)
    check_text(args.prompt, "the prompt")
    llm = _load(args)
    if args.no_stream:
        out = llm.generate(args.prompt, params)[0]
        if out.error is not None:
            raise RequestFailed(out.error)
        print(out.text)
        return
    sys.stdout.write(args.prompt)
    for delta in llm.stream(args.prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _chat(args: argparse.Namespace) -> None:
    params = _sampling(args)
    if args.system is not None:
        check_text(args.system, "--system")
    llm = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        reply = []
        try:
            for delta in llm.stream_chat([*history, {"role": "user", "content": line}], params):
                reply.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except (ValueError, RequestFailed) as err:  # this turn fails (say, past the context); the chat goes on
            sys.stdout.write("\n")
            print(f"minillm: error: {err}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(reply)}]


def _serve(args: argparse.Namespace) -> int:
    import logging
    import socket
    from pathlib import Path

    import uvicorn

    from .loading import check_device, default_model_path
    from .parallel import preflight
    from .server.app import create_app
    from .server.connection import head_deadline_protocol

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        path = Path(args.model) if args.model else default_model_path()
    except ValueError as err:
        print(f"minillm: error: {err}", file=sys.stderr)
        return 1
    if not path.exists():
        print(f"minillm: error: no such model file or folder: {path}", file=sys.stderr)
        return 1
    if args.replicas < 1:
        print(f"minillm: error: --replicas must be a positive integer, got {args.replicas}", file=sys.stderr)
        return 1
    if args.replicas > 1 and args.tensor_parallel_size > 1:  # each replica's group would want the same port
        print("minillm: error: --replicas and --tensor-parallel-size cannot be combined (each replica would start its "
              "own tensor-parallel group, on the same port)", file=sys.stderr)
        return 1
    if args.api_key is not None and not args.api_key.strip():
        print("minillm: error: --api-key must not be empty", file=sys.stderr)
        return 1
    for flag in ("stream_timeout", "read_timeout", "engine_timeout", "max_queue_wait"):
        if getattr(args, flag) is not None and not 0 < getattr(args, flag) < float("inf"):
            print(f"minillm: error: --{flag.replace('_', '-')} must be a positive number of seconds, got "
                  f"{getattr(args, flag)}", file=sys.stderr)
            return 1
    name = args.served_model_name or path.stem
    try:
        check_device(args.device)
        if args.chat_template is not None:
            resolve_chat_template(args.chat_template)  # refused here, not by /health once the server runs
        preflight(path, args.tensor_parallel_size, args.device)
    except ValueError as err:
        print(f"minillm: error: {err}", file=sys.stderr)
        return 1
    options = {"dtype": args.dtype, "device": args.device, "quantization": args.quantization,
               "max_num_seqs": args.max_concurrency, "compile": args.compile, "fast_prefill": args.fast_prefill,
               "gpu_memory_utilization": args.gpu_memory_utilization, "kv_cache_dtype": args.kv_cache_dtype,
               "chat_template": args.chat_template, "speculative": args.speculative,
               "tensor_parallel_size": args.tensor_parallel_size}
    server = {"api_key": args.api_key, "public_metrics": args.public_metrics, "stream_timeout": args.stream_timeout,
              "read_timeout": args.read_timeout, "engine_timeout": args.engine_timeout,
              "max_queue_wait": args.max_queue_wait, "web_ui": not args.no_web_ui}
    if args.replicas > 1:
        return _serve_replicas(args, str(path), name, options, server)
    app = create_app(str(path), name, options, **server)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as err:
        print(f"minillm: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
    # Accepted connections inherit this: a stream's unread output waits in at most ~64 KiB of kernel
    # buffer (Linux would grow it to 4 MiB), then backs up into the engine, which pauses the stream.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", http=head_deadline_protocol(args.read_timeout),
                                  timeout_keep_alive=5)).run(sockets=[sock])
    return 0


def _serve_replicas(args: argparse.Namespace, model: str, name: str, options: dict, server: dict) -> int:
    """`minillm serve --replicas N`: the same app in N replicas behind Ray Serve (server/replicas.py)."""
    try:
        from .server.replicas import run
    except ImportError as err:  # the [serve] extra is not installed
        print(f"minillm: error: --replicas needs Ray Serve ({err}): pip install 'minillm[serve]'", file=sys.stderr)
        return 1
    return run(model, name, options, server, args.replicas, args.host, args.port, args.router == "prefix")


def _tokenize(args: argparse.Namespace) -> None:
    """One line per token: its id and its piece as the vocabulary writes it ("▁" or "Ġ" for a space, <0xXX>
    for a byte), since a piece alone may be part of a character."""
    from .loading import open_tokenizer

    tokenizer = open_tokenizer(args.model)
    special = not args.no_special
    for token_id in tokenizer.encode(unescape(args.text), add_special_tokens=special, parse_special=special):
        print(f"{token_id:>7} {tokenizer.backend.id_to_token(token_id)!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "bench":
        if args.throughput and args.serve:
            print("minillm bench: choose one of --throughput and --serve", file=sys.stderr)
            return 2
        if args.serve:
            from .bench.serving import main as run
        elif args.throughput:
            from .bench.throughput import main as run
        else:  # prefill, decode and batched decode vs HF transformers
            from .bench.speed import main as run
        try:
            run(rest)
        except (ValueError, OSError) as err:
            print(f"minillm bench: error: {err}", file=sys.stderr)
            return 1
        return 0
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        return _serve(args)
    try:
        {"generate": _generate, "chat": _chat, "tokenize": _tokenize}[args.command](args)
    except (ValueError, OSError, RequestFailed) as err:  # one line, no traceback
        print(f"minillm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
