"""The compiled engine step (EngineConfig.compile) against the eager one, and no recompiles."""

import pytest
import torch

from minillm import Configs, MiniLLM
from minillm.engine import EngineConfig
from minillm.engine.model_runner import ModelRunner
from minillm.engine.settings import resolve

pytestmark = pytest.mark.slow  # torch.compile at start-up


@pytest.fixture(scope="module")
def compiled_runner():
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny()).eval()
    settings = resolve(model, EngineConfig(attention_backend="paged_cpu", compile=True))
    runner = ModelRunner(model, num_blocks=64, block_size=16, settings=settings)
    for pool in (*runner.cache.k, *runner.cache.v):  # earlier tokens' keys and values
        pool.normal_()
    runner.warmup()
    return runner


@pytest.mark.parametrize("starts,counts", [
    ([0], [1]), ([39], [1]), ([2, 16, 49], [1, 1, 1]), ([15, 32, 6, 89, 1, 63, 127, 30], [1] * 8),  # decode
    ([0], [5]), ([3, 0], [1, 9]), ([10, 20, 0, 40], [1, 1, 30, 17]),  # prompts and chunks beside decode rows
])
def test_compiled_step_equals_eager_without_recompiling(compiled_runner, starts, counts):
    runner, model = compiled_runner, compiled_runner.model
    batch = len(starts)
    tables = [[b * 8 + p for p in range(8)] for b in range(batch)]  # 8 pages of 16 per sequence, no sharing
    with torch.inference_mode():  # as the engine runs (inference tensors have their own guards)
        plan = runner.cache.plan(tables, starts, counts, runner.attention)
        ids = torch.randint(0, model.config.vocab_size, (sum(counts),))  # packed
        eager = model(ids, plan, last_token_only=True)
        with torch.compiler.set_stance("fail_on_recompile"):  # one graph for every step
            compiled = runner.forward(ids, plan, last_token_only=True)
    assert compiled.shape == (batch, model.config.vocab_size)
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_compile_needs_the_paged_kernel():
    model = MiniLLM(Configs.tiny()).eval()
    with pytest.raises(ValueError, match="compile=True needs the 'paged_cpu' attention backend"):
        resolve(model, EngineConfig(attention_backend="sdpa", compile=True))
