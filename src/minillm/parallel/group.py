"""The tensor-parallel process group as every rank joins it: torch.distributed's rendezvous store at
MASTER_ADDR:MASTER_PORT (rank 0 hosts it), then the default process group (gloo on the CPU, NCCL on GPUs),
whose collectives time out after COLLECTIVE_TIMEOUT.

Start-up messages (what to load, the KV cache's size, each rank's "loaded") are JSON in the store. Each
step's inputs go from rank 0 to every worker as integers in one broadcast on a gloo group of their own, which
a worker waits on for as long as the engine idles (IDLE_TIMEOUT; a rank that dies closes its sockets, and
the others' waits end at once). Nothing is pickled."""

from __future__ import annotations

import json
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine.model_runner import StepInputs

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a step's collective that a rank never joins fails after this
IDLE_TIMEOUT = timedelta(days=365)  # a worker waits for rank 0's next step while the engine idles
START_TIMEOUT = timedelta(minutes=10)  # each rank loads its shard; start-up messages wait this long at most
MESSAGE = 4096  # integers in a step's broadcast; a step whose inputs need more sends the rest in a second one


class Channel:
    """One rank's membership: the store, the process group, the step broadcasts."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device) -> None:
        """Join the group (every rank must, together): `store` is rank 0's TCPStore or a client of it."""
        self.store, self.rank, self.size = store, rank, size
        report(store, "joined", rank)  # rank 0 watches its workers come up before it blocks in the group's start
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT)
        self.steps = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.buffer = torch.empty(MESSAGE, dtype=torch.long)

    @staticmethod
    def connect(addr: str, port: int, size: int) -> dist.TCPStore:
        """A worker's client of rank 0's store."""
        return dist.TCPStore(addr, port, size, is_master=False, timeout=START_TIMEOUT)

    def send_step(self, inputs: StepInputs | None) -> None:
        """Rank 0: the next step's inputs to every worker (None: stop)."""
        ints = _encode(inputs) if inputs is not None else []
        message = torch.tensor([len(ints) if inputs is not None else -1, *ints], dtype=torch.long)
        dist.broadcast(message[:MESSAGE] if len(message) > MESSAGE else _fill(self.buffer, message), 0,
                       group=self.steps)
        if len(message) > MESSAGE:
            dist.broadcast(message[MESSAGE:], 0, group=self.steps)

    def receive_step(self) -> StepInputs | None:
        """A worker: the next step's inputs, once rank 0 sends them; None when told to stop."""
        dist.broadcast(self.buffer, 0, group=self.steps)
        length = int(self.buffer[0])
        if length < 0:
            return None
        if length + 1 <= MESSAGE:
            return _decode(self.buffer[1:length + 1].tolist())
        rest = torch.empty(length + 1 - MESSAGE, dtype=torch.long)
        dist.broadcast(rest, 0, group=self.steps)
        return _decode(self.buffer[1:].tolist() + rest.tolist())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def publish(store: dist.Store, key: str, value: dict) -> None:
    """Rank 0: a start-up message for every worker."""
    store.set(key, json.dumps(value))


def read(store: dist.Store, key: str) -> dict:
    """A worker: what rank 0 published under `key`, once it has (START_TIMEOUT at most)."""
    return json.loads(store.get(key))


def report(store: dist.Store, stage: str, rank: int, error: str = "") -> None:
    """A worker's outcome of a start-up stage: "" or why it failed (rank 0 waits for them: driver.py)."""
    store.set(f"{stage}/{rank}", error)


def _fill(buffer: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    buffer[:len(message)] = message
    return buffer


def _encode(inputs: StepInputs) -> list[int]:
    """[sequences, tokens, has logit counts, starts, counts, totals, (logit counts), table lengths, token ids,
    block tables]."""
    logit_counts = inputs.logit_counts or []
    return [len(inputs.starts), len(inputs.token_ids), int(inputs.logit_counts is not None), *inputs.starts,
            *inputs.counts, *inputs.totals, *logit_counts, *map(len, inputs.block_tables), *inputs.token_ids,
            *(block for table in inputs.block_tables for block in table)]


def _decode(ints: list[int]) -> StepInputs:
    batch, tokens, has_logit_counts = ints[:3]
    fields, at = [], 3
    for size in (batch, batch, batch, batch if has_logit_counts else 0, batch, tokens):
        fields.append(ints[at:at + size])
        at += size
    starts, counts, totals, logit_counts, lengths, token_ids = fields
    tables = []
    for length in lengths:
        tables.append(ints[at:at + length])
        at += length
    return StepInputs(token_ids, tables, starts, counts, totals, logit_counts if has_logit_counts else None)
