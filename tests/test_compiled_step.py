"""The compiled engine step (EngineConfig.compile) against the eager one, and no recompiles."""

import pytest
import torch

from minillm import Configs, MiniLLM
from minillm.engine.model_runner import ModelRunner


@pytest.fixture(scope="module")
def compiled_runner():
    torch.manual_seed(0)
    model = MiniLLM(Configs.tiny()).eval()
    runner = ModelRunner(model, num_blocks=64, block_size=16, attention_backend="paged", compile=True)
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
        plan = runner.cache.plan(tables, starts, counts)
        ids = torch.randint(0, model.config.vocab_size, (1, sum(counts)))  # packed
        eager = model.forward_step(ids, plan, "paged", last_token_only=True)
        with torch.compiler.set_stance("fail_on_recompile"):  # one graph for every step
            compiled = runner.forward(ids, plan, "paged", last_token_only=True)
    assert compiled.shape == (batch, 1, model.config.vocab_size)
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_compile_needs_the_paged_kernel():
    model = MiniLLM(Configs.tiny()).eval()
    with pytest.raises(ValueError, match="compile=True needs the 'paged' attention backend"):
        ModelRunner(model, num_blocks=8, block_size=16, attention_backend="sdpa", compile=True)


def test_bench_engine_specs():
    from minillm.bench.speed import parse_engine

    assert parse_engine("float32") == ("float32", set())
    assert parse_engine("default:compile") == ("default", {"compile"})
    assert parse_engine("default:fast_prefill:compile") == ("default", {"compile", "fast_prefill"})
    assert parse_engine("gguf") == ("default", set())  # the old name of the default
    for bad in ("int3", "default:fast"):
        with pytest.raises(Exception, match="not an engine"):
            parse_engine(bad)


def test_bench_refuses_an_unknown_engine(capsys):
    from minillm.bench.speed import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--engines", "int3"])
    assert exit_info.value.code == 2
    assert "not an engine: 'int3'" in capsys.readouterr().err
