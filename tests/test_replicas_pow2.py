"""The baseline for tests/test_replicas.py's prefix-affinity test: two replicas behind the power of two
choices (the less loaded of two random replicas, blind to prompts: Ray Serve's default policy). A prefix served once is then found in the cache
only when its next request happens to reach the same replica: about half the time, against every time
with the prefix-aware router."""

import pytest

pytest.importorskip("ray.serve")

from serving import API_KEY, start_server
from test_replicas import shared_prefix_rate

pytestmark = pytest.mark.slow  # Ray, and two `minillm serve` engines


@pytest.fixture(scope="module")
def server():
    yield from start_server("--replicas", "2", "--router", "pow2", "--api-key", API_KEY)


def test_without_prefix_routing_a_prefix_reaches_its_cache_about_half_the_time(server):
    rate, reached = shared_prefix_rate(server)
    print(f"power of two choices: prefix-cache hit rate {rate:.1%}")
    # the prefix-aware router: 99.6 % (512 of 514 tokens). Here each request finds its prefix with
    # probability 1/2; all 12 doing so (rate 99.6 %) has probability 1/4096
    assert rate < 0.95 and any(len(replicas) == 2 for replicas in reached.values()), (rate, reached)
