"""A real `python -m minillm serve` on a free loopback port, and raw-HTTP helpers for the server tests."""

import os
import re
import socket
import subprocess
import sys
import time

import httpx

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str):
    """Start the server and wait until /health says 200; yields {"base", "seen_loading", "port"}."""
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # the server shares 2 cores with the test clients
    proc = subprocess.Popen([sys.executable, "-m", "minillm", "serve", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    seen_loading = False
    while time.time() < deadline:
        try:
            status = httpx.get(f"{base}/health", timeout=2).status_code
            if status == 200:
                break
            seen_loading |= status == 503
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("server did not become healthy")
    try:
        yield {"base": base, "seen_loading": seen_loading, "port": port, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(server, path, body, key=API_KEY, raw=None, headers=None):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if raw is not None:
        headers.setdefault("Content-Type", "application/json")
        return httpx.post(server["base"] + path, content=raw, headers=headers, timeout=120)
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=120)


def metric(server, name) -> float:
    """A metric's value, summed over its series (a server with replicas labels each replica's)."""
    text = httpx.get(server["base"] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert values, f"{name} missing from /metrics"
    return sum(map(float, values))


def wait_until_idle(server, timeout: float = 30) -> None:
    """Until nothing runs or waits; then every KV block must be free."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(server, "minillm_num_requests_running") == 0 and metric(server, "minillm_num_requests_waiting") == 0:
            break
        time.sleep(0.2)
    assert metric(server, "minillm_num_requests_running") == 0
    assert metric(server, "minillm_num_requests_waiting") == 0
    assert metric(server, "minillm_kv_cache_free_blocks") == metric(server, "minillm_kv_cache_blocks")
