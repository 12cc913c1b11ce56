"""One background thread owns the engine; HTTP handlers talk to it through queues.

Handlers submit requests and aborts from the event loop; the thread drains them between steps,
runs `engine.step()` while there is work, and hands every output back to its request's
asyncio queue. So all requests share the continuous-batching engine, and nothing torch-related
runs on the event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid

from ..engine import LLMEngine, StepOutput
from ..sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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

    def _run(self) -> None:
        while True:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "add":
                    _, request_id, prompt_ids, params = command
                    if request_id not in self._streams:
                        continue  # aborted before it started
                    try:
                        self.engine.add_request(prompt_ids, params, request_id)
                    except ValueError as err:
                        self._deliver(request_id, err, last=True)
                else:
                    self.engine.abort(command[1])
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a bug, not user input: fail every request in flight, keep serving
                for request_id in list(self._streams):
                    self.engine.abort(request_id)
                    self._deliver(request_id, err, last=True)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)
