"""The engine's own process: it loads the model and runs the step loop; the HTTP process (engine_client.py)
talks to it over a pipe, so tokenizing, streaming and HTTP never share a GIL with the model's steps.

In:  ("add", request_id, prompt_ids, params, group), ("abort", request_id), ("pause", request_id, paused), ("ping",),
     ("embed", request_id, [prompt_ids], pooling), ("stop",)
Out: ("ready", PromptLimits) or ("failed", message) once; then ("outputs", [StepOutput], stats) after every
     step that produced something or followed a command, ("stats", stats) when it falls idle, and
     ("rejected", request_id, message) for a request the engine refuses; ("embedded", request_id, vectors or
     the error's text) for an embedding request, run at once (between two steps).
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection

from ..engine import LLMEngine
from ..runtime import freeze_heap
from .pooling import pooled

logger = logging.getLogger("minillm")


def run_engine(conn: Connection, model: str | None, llm_options: dict, max_queue_wait: float | None) -> None:
    """The engine process's main: load, say ready (or why not), then serve commands until told to stop
    or the HTTP process goes away; requests waiting more than `max_queue_wait` seconds to start end then."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from ..llm import LLM

    try:
        engine = LLM(model, progress=False, **llm_options).engine
    except Exception as err:  # reported by /health
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    freeze_heap()
    conn.send(("ready", engine.limits))
    try:
        _serve(conn, engine, max_queue_wait)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the HTTP process is gone: nothing to serve
        pass


def _serve(conn: Connection, engine: LLMEngine, max_queue_wait: float | None) -> None:
    while True:
        running = engine.has_unfinished()
        # idle: sleep until a command; only paused streams (readers behind): look again soon
        timeout = None if not running else 0.05 if engine.stalled else 0
        commanded = False
        while conn.poll(timeout):
            message = conn.recv()
            if message[0] == "stop":
                return
            _apply(conn, engine, message)
            commanded, timeout = True, 0
        if not engine.has_unfinished():
            if commanded:
                conn.send(("stats", engine.stats()))
            continue
        expired = engine.expire(max_queue_wait) if max_queue_wait is not None else []
        try:
            outputs = expired + engine.step()
        except Exception as err:  # outside any one request (a scheduler bug): fail those in flight, keep serving
            logger.exception("engine step failed")
            failed = (engine.fail(r, f"internal error: {type(err).__name__}: {err}") for r in list(engine.requests))
            outputs = expired + [out for out in failed if out is not None]
        if outputs or commanded:
            conn.send(("outputs", outputs, engine.stats()))
        if engine.failure is not None:  # a tensor-parallel rank died: end, and the HTTP process starts a new engine
            return


def _apply(conn: Connection, engine: LLMEngine, message: tuple) -> None:
    """A command; a ping needs nothing but the reply every command gets (outputs or stats)."""
    kind, request_id = message[0], message[1] if len(message) > 1 else None
    if kind == "add":
        try:
            engine.add_request(message[2], message[3], request_id, group=message[4])
        except ValueError as err:
            conn.send(("rejected", request_id, str(err)))
    elif kind == "abort":
        engine.abort(request_id)
    elif kind == "pause":
        engine.pause(request_id, message[2])
    elif kind == "embed":
        if engine.config.tensor_parallel_size > 1:  # pooled() runs the model outside the ranks' common steps
            conn.send(("embedded", request_id, "embeddings are not computed under tensor parallelism yet; serve the "
                                               "model with --tensor-parallel-size 1 for them"))
            return
        try:
            vectors: list | str = [pooled(engine.model, ids, message[3]) for ids in message[2]]
        except Exception as err:  # this request fails (a 500), the engine goes on
            logger.exception("embedding failed")
            vectors = f"{type(err).__name__}: {err}"
        conn.send(("embedded", request_id, vectors))
