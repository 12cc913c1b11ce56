"""The compiled decode step (EngineConfig.compile) against the eager one, and no recompiles."""

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


@pytest.mark.parametrize("lengths", [[1], [40], [3, 17, 50], [16, 33, 7, 90, 2, 64, 128, 31]])
def test_compiled_decode_equals_eager_without_recompiling(compiled_runner, lengths):
    runner, model = compiled_runner, compiled_runner.model
    batch = len(lengths)
    tables = [[b * 8 + p for p in range(8)] for b in range(batch)]  # 8 pages of 16 per row, no sharing
    with torch.inference_mode():  # as the engine runs (inference tensors have their own guards)
        plan = runner.cache.plan(tables, [n - 1 for n in lengths], [1] * batch, 1)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1))
        eager = model.forward_step(ids, plan, "paged", last_token_only=True)
        with torch.compiler.set_stance("fail_on_recompile"):  # one graph for every batch and length
            compiled = runner.decode_step(ids, plan, "paged", last_token_only=True)
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_bench_engine_specs():
    from minillm.bench.speed import parse_engine

    assert parse_engine("float32") == (None, False)
    assert parse_engine("gguf:compile") == ("gguf", True)
    with pytest.raises(Exception, match="not an engine"):
        parse_engine("int3:fast")


def test_bench_refuses_an_unknown_engine(capsys):
    from minillm.bench.speed import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--engines", "int3"])
    assert exit_info.value.code == 2
    assert "not an engine: 'int3'" in capsys.readouterr().err
