"""Rank 0's side of tensor parallelism (`start_tensor_parallel`, called by `LLM`): check that the ranks can share
the model, start the local workers, join the group with them, send them each step (`DriverRunner`), notice
when one dies, and stop them.

A local worker is `python -m minillm.parallel.worker` with its rank in its environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, as torchrun sets them): the same command joins from another machine
(docs/scale_out.md). Workers are not multiprocessing children: the server's engine process is daemonic, and
a daemonic process may have none. Each rank on this machine takes an equal share of its cores."""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ..engine.model_runner import ModelRunner, RunnerFailed, StepInputs
from ..engine.settings import StepSettings
from ..loading import ModelLoadError, check_device, default_model_path, open_checkpoint
from ..model.transformer import MiniLLM
from .group import START_TIMEOUT, Channel, publish
from .shard import TensorShard, check_tensor_parallel

logger = logging.getLogger("minillm")

_current: weakref.ref[TensorParallel] | None = None  # torch.distributed has one default group per process


def preflight(model: str | Path | None, size: int, device: str | torch.device) -> Path | None:
    """The model's path if `size` ranks can start (None for one rank), else a ValueError naming the setting: a
    size that is not a positive integer or does not divide the heads, more ranks than this machine's cores or
    GPUs, a MASTER_PORT in use, an environment for remote ranks that does not add up."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if size == 1:
        return None
    if _current is not None and _current() is not None and not _current().closed:
        raise ValueError("another tensor-parallel LLM is running in this process (torch.distributed has one default "
                         "process group per process); close() it first")
    check_device(device)
    path = default_model_path() if model is None else Path(model)
    check_tensor_parallel(open_checkpoint(path).model_config("float32"), size, path.name)
    env, kind = os.environ, torch.device(device).type
    if "WORLD_SIZE" in env:  # the other ranks are started by hand (another machine, docs/scale_out.md)
        _check_environment(env, size)
    elif kind == "cpu" and size > _cores():
        raise ValueError(f"tensor_parallel_size={size}: one rank per core at least, and this process may use "
                         f"{_cores()} cores")
    elif kind == "cuda" and size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={size}: one GPU per rank, and this machine has "
                         f"{torch.cuda.device_count()}")
    if "MASTER_PORT" in env:
        port = _port(env["MASTER_PORT"])
        try:
            with socket.create_server(("", port)):  # rank 0's store listens on every address
                pass
        except OSError as err:
            raise ValueError(f"MASTER_PORT={port}: rank 0 cannot listen on port {port} ({err.strerror or err}); "
                             "set MASTER_PORT to a free port, or unset it (a free one is picked)") from None
    return path


def start_tensor_parallel(model: str | Path | None, size: int, dtype: str | torch.dtype | None, device: str | torch.device,
                          quantization: str | None) -> TensorParallel | None:
    """The started group for `LLM(model, ..., tensor_parallel_size=size)`, this process its rank 0 (None for one
    rank), once `preflight` allows it."""
    path = preflight(model, size, device)
    if path is None:
        return None
    dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # rank r computes on GPU r (LOCAL_RANK elsewhere)
        device = torch.device("cuda", torch.cuda.current_device())
    return TensorParallel(size, device, {"model": str(path.resolve()), "dtype": dtype_name, "device": device.type,
                                         "quantization": quantization})


class TensorParallel:
    """Rank 0's handle on the group."""

    def __init__(self, size: int, device: torch.device, load: dict) -> None:
        global _current
        self.size, self.shard = size, TensorShard(0, size)
        self.procs: dict[int, subprocess.Popen] = {}
        self.failure: str | None = None  # why the group is down
        self.closed = self.serving = False
        self.channel: Channel | None = None
        self.saved_threads = torch.get_num_threads()
        env = os.environ
        remote = "WORLD_SIZE" in env
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _port(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port(addr)
        try:
            self.store = dist.TCPStore(addr, port, size, is_master=True, timeout=START_TIMEOUT, wait_for_workers=False)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"MASTER_PORT={port}: rank 0 cannot listen on {addr}:{port} "
                             f"({str(err).splitlines()[0][-80:]}); set MASTER_PORT to a free port") from None
        threads = max(1, _cores() // (1 if remote else size))
        publish(self.store, "start", {**load, "threads": threads})
        _current = weakref.ref(self)
        try:
            for rank in [] if remote else range(1, size):
                worker_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                              "MASTER_ADDR": addr, "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
                self.procs[rank] = subprocess.Popen([sys.executable, "-m", "minillm.parallel.worker"], env=worker_env)
            if remote:
                logger.info("tensor parallelism: waiting for ranks 1..%d to join at %s:%d", size - 1, addr, port)
            self.wait_for("joined", "join the group")
            torch.set_num_threads(threads)
            self.channel = Channel(self.store, 0, size, device)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallelism: %d ranks (%s), %d threads each here", size,
                    "gloo" if device.type == "cpu" else "nccl", threads)

    def wait_loaded(self) -> None:
        """Once rank 0 has its shard: until every worker has its own (a ModelLoadError says what failed)."""
        self.wait_for("loaded", "load its shard")

    def runner(self, model: MiniLLM, num_blocks: int, block_size: int, settings: StepSettings,
               max_batch: int = 64) -> DriverRunner:
        return DriverRunner(self, model, num_blocks, block_size, settings, max_batch)

    def wait_for(self, stage: str, what: str) -> None:
        """Until every worker has reported `stage` (parallel/group.py `report`): a worker's error is raised as a
        ModelLoadError, a worker that exited as a ChildProcessError, a rank that never reports as a TimeoutError."""
        pending, deadline = set(range(1, self.size)), time.monotonic() + START_TIMEOUT.total_seconds()
        while pending:
            for rank in sorted(pending):
                if self.store.check([f"{stage}/{rank}"]):
                    pending.discard(rank)
                    error = self.store.get(f"{stage}/{rank}").decode()
                    if error:
                        raise ModelLoadError(f"tensor-parallel rank {rank} could not {what}: {error}")
            dead = self._dead()
            if dead is not None:
                raise ChildProcessError(f"{dead} before it could {what}")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks {sorted(pending)} did not {what} within "
                                   f"{START_TIMEOUT.total_seconds():.0f} s")
            time.sleep(0.02)

    def check_alive(self) -> None:
        """Before a step: a RunnerFailed if the group is down or a local worker has exited."""
        if self.failure is not None:
            raise RunnerFailed(self.failure)
        dead = self._dead()
        if dead is not None:
            raise self.fail(dead)

    def fail(self, error: BaseException | str) -> RunnerFailed:
        """Shut the group down after a failed step; the error every request in flight then gets."""
        reason = self._dead() or (error if isinstance(error, str) else
                                  f"a tensor-parallel step failed ({type(error).__name__}: "
                                  f"{(str(error).splitlines() or [''])[0][:200]})")
        self.failure = f"{reason}; the tensor-parallel group is shut down: restart the engine"
        logger.error("%s", self.failure)
        self.close()
        return RunnerFailed(self.failure)

    def close(self) -> None:
        """Stop the workers (told to, when they can still hear it; else killed) and leave the group."""
        if self.closed:
            return
        self.closed = True
        stopping = self.serving and self.failure is None
        if stopping:
            try:
                self.channel.send_step(None)
            except Exception:  # a worker died meanwhile: it is killed below
                stopping = False
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10 if stopping else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.channel is not None:
            self.channel.close()
        self.store = None
        torch.set_num_threads(self.saved_threads)

    def __del__(self) -> None:
        self.close()

    def _dead(self) -> str | None:
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}"
        return None


class DriverRunner(ModelRunner):
    """Rank 0's model runner: each step's inputs go to every worker, then every rank runs the step on its shard
    (the collectives inside); any failure there fails the group (RunnerFailed), since the ranks are then out of
    step."""

    def __init__(self, parallel: TensorParallel, model: MiniLLM, num_blocks: int, block_size: int,
                 settings: StepSettings, max_batch: int = 64) -> None:
        publish(parallel.store, "cache", {"num_blocks": num_blocks, "block_size": block_size,
                                          "attention": settings.attention.name,
                                          "kv_dtype": str(settings.kv_dtype).removeprefix("torch.")})
        super().__init__(model, num_blocks, block_size, settings, max_batch)
        parallel.wait_for("cache", "allocate its KV cache")
        parallel.serving = True
        self.parallel = parallel

    @property
    def failure(self) -> str | None:
        return self.parallel.failure

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        self.parallel.check_alive()
        try:
            self.parallel.channel.send_step(inputs)
            return super().execute(inputs)
        except Exception as err:
            raise self.parallel.fail(err) from None

    def close(self) -> None:
        self.parallel.close()


def _check_environment(env: os._Environ, size: int) -> None:
    """A group whose other ranks are started by hand: WORLD_SIZE is the size, this process is rank 0, and the
    others are told where to find it."""
    if env.get("WORLD_SIZE") != str(size):
        raise ValueError(f"tensor_parallel_size={size}, but WORLD_SIZE={env.get('WORLD_SIZE')} in the environment; "
                         "they must agree (or unset WORLD_SIZE to start the ranks on this machine)")
    if env.get("RANK", "0") != "0":
        raise ValueError(f"RANK={env['RANK']}: the engine's process is rank 0; start the others with "
                         "`python -m minillm.parallel.worker`")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE is set: set {' and '.join(missing)} too (where rank 0 listens for the others)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={text!r} is not a port number")
    return port


def _free_port(addr: str) -> int:
    with socket.socket() as probe:
        probe.bind((addr, 0))
        return probe.getsockname()[1]


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@atexit.register
def _close_at_exit() -> None:
    parallel = None if _current is None else _current()
    if parallel is not None:
        parallel.close()
