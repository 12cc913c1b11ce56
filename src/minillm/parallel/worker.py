"""A tensor-parallel worker: `python -m minillm.parallel.worker`, with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in its environment (rank 0 starts its local ones so; on another machine, start it so by hand).

It joins rank 0's group, loads its shard of the model rank 0 names (or `--model PATH`, where the file lies
elsewhere on this machine), allocates its shard of the KV cache (its KV heads) as rank 0 sizes it, then runs
every step rank 0 sends until told to stop. Any failure ends the process, which closes its sockets: the other
ranks' collectives fail at once and rank 0 fails the requests in flight."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from ..attention import select_attention
from ..config import resolve_dtype
from ..engine.model_runner import ModelRunner
from ..engine.settings import StepSettings
from ..model_loader import load_model
from ..runtime import freeze_heap
from .group import Channel, read, report
from .shard import TensorShard

logger = logging.getLogger("minillm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.parallel.worker",
                                     description="a tensor-parallel rank of a MiniLLM engine (docs/scale_out.md)")
    parser.add_argument("--model", default=None, help="the model file here, if not at rank 0's path")
    args = parser.parse_args(argv)
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as err:
        print(f"minillm worker: error: set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT ({err})", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s: rank {rank}: %(message)s")
    store = Channel.connect(addr, port, size)
    start = read(store, "start")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', rank)}" if start["device"] == "cuda" else "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(start["threads"])
    channel = Channel(store, rank, size, device)
    try:
        model = load_model(args.model or start["model"], start["dtype"], device, start["quantization"], progress=False,
                           shard=TensorShard(rank, size), with_tokenizer=False).model
    except Exception as err:
        report(store, "loaded", rank, f"{type(err).__name__}: {err}")
        return 1
    report(store, "loaded", rank)
    cache = read(store, "cache")
    try:
        attention = select_attention(cache["attention"], device, model.dtype, head_dim=model.config.head_dim)
        settings = StepSettings(attention, resolve_dtype(cache["kv_dtype"]), fused_decoder=False, compile=False,
                                fast_prefill=False, cuda_graphs=False)
        runner = ModelRunner(model, cache["num_blocks"], cache["block_size"], settings)
    except Exception as err:
        report(store, "cache", rank, f"{type(err).__name__}: {err}")
        return 1
    report(store, "cache", rank)
    freeze_heap()
    with torch.inference_mode():
        while (inputs := channel.receive_step()) is not None:
            runner.execute(inputs)
    channel.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # a failed collective (rank 0 or another rank died): one line, then exit
        logger.error("stopping: %s: %s", type(error).__name__, (str(error).splitlines() or [""])[0][:300])
        sys.exit(1)
