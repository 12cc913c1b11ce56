"""The HTTP process's side of the engine process (engine_core.py): start it, submit and abort requests,
hand every output to its request's asyncio queue, hold back streams whose readers fall behind, and
notice when the engine process dies.

A receiver thread reads the pipe (blocking reads release the GIL) and delivers outputs to the event
loop. Backpressure: a stream whose reader falls `max_buffered` outputs behind is paused (it keeps its
blocks but gets no decode steps) until its backlog halves; one paused for `stall_timeout` seconds is
aborted, so a client that never reads cannot hold a batch slot and KV blocks for ever.

Supervision: the engine process answers a ping within `engine_timeout` seconds (it is pinged after every
second of silence, and answers between steps). If it exits, or stops answering (stopped, deadlocked, a
step that never ends: it is killed), every request in flight fails with the reason, /health says 503
with it, and a new engine process is started after a backoff (1 s, doubling to 60 s while it keeps
failing within a minute of starting). A model that fails to load is not retried.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
import uuid

from ..engine import PromptLimits, RequestFailed, StepOutput
from ..sampling_params import SamplingParams
from .engine_core import run_engine

logger = logging.getLogger("minillm")


class EngineClient:
    def __init__(self, model: str | None, llm_options: dict, max_buffered: int = 64, stall_timeout: float = 30.0,
                 engine_timeout: float = 60.0, max_queue_wait: float | None = None) -> None:
        self.max_buffered, self.stall_timeout, self.engine_timeout = max_buffered, stall_timeout, engine_timeout
        self.limits: PromptLimits | None = None  # set once the engine process has loaded the model
        self.error: str | None = None  # why the engine process cannot serve now (load failure, exit, restart)
        self.stats: dict | None = None  # the engine's latest published snapshot, for /metrics
        self.restarts = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._paused: dict[str, float] = {}  # request id -> when it was paused (receiver thread only)
        self._closing = threading.Event()
        self._args = (model, llm_options, max_queue_wait)
        self._send_lock = threading.Lock()
        self._start()
        self._thread = threading.Thread(target=self._supervise, name="minillm-engine-client", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.limits is not None and self.error is None

    def submit(self, prompt_ids: list[int], params: SamplingParams, group: str) -> tuple[str, asyncio.Queue]:
        """Queue a request (already checked against `limits`); outputs arrive on the returned queue. The
        engine shares its capacity fairly between groups (a server request's choices form one)."""
        if self.error is not None:
            raise RequestFailed(self.error)
        request_id = uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._send(("add", request_id, prompt_ids, params, group))
        return request_id, outputs

    def embed(self, prompts: list[list[int]], pooling: str) -> asyncio.Queue:
        """Embed prompts in the engine process (server/embeddings.py); the vectors, or the RequestFailed that
        ended them, arrive on the returned queue."""
        if self.error is not None:
            raise RequestFailed(self.error)
        request_id = uuid.uuid4().hex
        result: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), result)
        self._send(("embed", request_id, prompts, pooling))
        return result

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def close(self) -> None:
        """Stop the engine process (server shutdown)."""
        self._closing.set()
        self._send(("stop",))
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or OpenMP state
        self._conn, child = context.Pipe()
        self._process = context.Process(target=run_engine, args=(child, *self._args), name="minillm-engine",
                                        daemon=True)
        self._process.start()
        child.close()
        logger.info("engine process started (pid %d)", self._process.pid)

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the engine process is gone; the receiver thread reports it
            pass

    def _deliver(self, request_id: str, item: StepOutput | BaseException, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _supervise(self) -> None:
        """Serve one engine process after another: fail what was in flight when one ends, then restart it."""
        backoff = 1.0
        while True:
            started = time.monotonic()
            reason = self._serve()
            self.limits, self.stats = None, None
            for request_id in list(self._streams):
                self._deliver(request_id, RequestFailed(reason or "the server is shutting down"), last=True)
            self._paused.clear()
            if reason is None or self._closing.is_set():
                return
            backoff = 1.0 if time.monotonic() - started > 60 else backoff
            self.error = f"{reason}; restarting it in {backoff:g} s (restart {self.restarts + 1})"
            logger.error("%s", self.error)
            if self._closing.wait(backoff):
                return
            backoff = min(backoff * 2, 60.0)
            self.restarts += 1
            self._start()

    def _serve(self) -> str | None:
        """Relay one engine process until it ends; why it ended, or None if it will not serve (its model
        failed to load: `error` says why) or the server is closing."""
        try:
            kind, payload = self._conn.recv()
            if kind == "failed":
                self.error = payload
                return None
            self.limits, self.error = payload, None
            heard = pinged = time.monotonic()
            while True:
                now = time.monotonic()
                if self._conn.poll(0.05):
                    self._handle(self._conn.recv())
                    heard = now
                elif now - heard > self.engine_timeout:
                    self._process.kill()
                    self._process.join(timeout=5)
                    return f"the engine process stopped responding for {self.engine_timeout:g} s and was killed"
                elif now - max(heard, pinged) > 1.0:
                    self._send(("ping",))
                    pinged = now
                self._throttle()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            return None if self._closing.is_set() else f"the engine process exited (exit code {self._process.exitcode})"

    def _handle(self, message: tuple) -> None:
        if message[0] == "outputs":
            for out in message[1]:
                self._deliver(out.request_id, out, last=out.finished)
            self.stats = message[2]
        elif message[0] == "stats":
            self.stats = message[1]
        elif message[0] == "rejected":
            self._deliver(message[1], ValueError(message[2]), last=True)
        elif message[0] == "embedded":
            vectors = message[2]
            self._deliver(message[1], RequestFailed(vectors) if isinstance(vectors, str) else vectors, last=True)

    def _throttle(self) -> None:
        """Pause streams whose readers fell behind, resume those that caught up, drop stalled ones."""
        now = time.monotonic()
        for request_id, (_, outputs) in list(self._streams.items()):
            backlog = outputs.qsize()  # a length read: safe from this thread
            since = self._paused.get(request_id)
            if since is None:
                if backlog >= self.max_buffered:
                    self._paused[request_id] = now
                    self._send(("pause", request_id, True))
            elif backlog <= self.max_buffered // 2:
                del self._paused[request_id]
                self._send(("pause", request_id, False))
            elif now - since > self.stall_timeout:
                del self._paused[request_id]
                logger.warning("request %s aborted: its client read nothing for %.0f s", request_id, self.stall_timeout)
                self._deliver(request_id, RequestFailed(f"aborted: the client read nothing for {self.stall_timeout:g} s "
                                                        f"with {backlog} outputs waiting"), last=True)
                self._send(("abort", request_id))
        for request_id in [r for r in self._paused if r not in self._streams]:
            del self._paused[request_id]
