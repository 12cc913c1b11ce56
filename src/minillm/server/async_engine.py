"""One background thread owns the engine; HTTP handlers talk to it through queues.

Handlers submit requests and aborts from the event loop; the thread drains them between steps,
runs `engine.step()` while there is work, and hands every output back to its request's
asyncio queue. So all requests share the continuous-batching engine, and nothing torch-related
runs on the event loop.

Backpressure: a stream whose reader falls `max_buffered` outputs behind is paused (it keeps its
blocks but gets no decode steps) until its backlog halves; one paused for `stall_timeout` seconds
is aborted, so a client that never reads cannot hold a batch slot and KV blocks for ever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from ..engine import LLMEngine, RequestFailed, StepOutput
from ..sampling_params import SamplingParams

logger = logging.getLogger("minillm")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_buffered: int = 64, stall_timeout: float = 30.0) -> None:
        self.engine = engine
        self.max_buffered, self.stall_timeout = max_buffered, stall_timeout
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._paused: dict[str, float] = {}  # request id -> when it was paused (engine thread only)
        self._thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request (already validated); outputs arrive on the returned queue."""
        request_id = uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return request_id, outputs

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    def _deliver(self, request_id: str, item: StepOutput | BaseException, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, params = command
                if request_id not in self._streams:
                    continue  # aborted before it started
                try:
                    self.engine.add_request(prompt_ids, params, request_id)
                except ValueError as err:
                    self._deliver(request_id, err, last=True)
            else:
                self._paused.pop(command[1], None)
                self.engine.abort(command[1])

    def _throttle(self) -> None:
        """Pause streams whose readers fell behind, resume those that caught up, drop stalled ones."""
        now = time.monotonic()
        for request_id, (_, outputs) in list(self._streams.items()):
            backlog = outputs.qsize()  # a length read: safe from this thread
            since = self._paused.get(request_id)
            if since is None:
                if backlog >= self.max_buffered:
                    self._paused[request_id] = now
                    self.engine.pause(request_id)
            elif backlog <= self.max_buffered // 2:
                del self._paused[request_id]
                self.engine.pause(request_id, False)
            elif now - since > self.stall_timeout:
                del self._paused[request_id]
                self.engine.abort(request_id)
                logger.warning("request %s aborted: its client read nothing for %.0f s", request_id, self.stall_timeout)
                self._deliver(request_id, RequestFailed(f"aborted: the client read nothing for {self.stall_timeout:g} s "
                                                        f"with {backlog} outputs waiting"), last=True)
        for request_id in [r for r in self._paused if r not in self._streams]:
            del self._paused[request_id]

    def _run(self) -> None:
        while True:
            self._apply_commands()
            self._throttle()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # outside any one request (a scheduler bug): fail those in flight, keep serving
                logger.exception("engine step failed")
                for request_id in list(self._streams):
                    self.engine.abort(request_id)
                    self._deliver(request_id, err, last=True)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)
            if self.engine.stalled:  # only paused streams (or blocked prompts): wait for readers
                self._wake.wait(0.05)
                self._wake.clear()
