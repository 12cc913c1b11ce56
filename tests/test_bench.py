"""`minillm bench`: its arguments, and the reports it writes (bench/report.py) from given results."""

import argparse
import json

import pytest

from minillm.bench import serving, speed, throughput
from minillm.bench.report import table, write_report

ENV = {"date": "2026-12-04", "cpu": "test cpu", "cpu_flags": None, "threads": 2}


def test_bench_engine_specs():
    assert speed.parse_engine("float32") == ("float32", set())
    assert speed.parse_engine("default:compile") == ("default", {"compile"})
    assert speed.parse_engine("default:fast_prefill:compile") == ("default", {"compile", "fast_prefill"})
    assert speed.parse_engine("gguf") == ("default", set())  # the old name of the default
    for bad in ("int3", "default:fast"):
        with pytest.raises(Exception, match="not an engine"):
            speed.parse_engine(bad)


def test_bench_refuses_an_unknown_engine(capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--engines", "int3"])
    assert exit_info.value.code == 2
    assert "not an engine: 'int3'" in capsys.readouterr().err


def test_report_writes_json_markdown_and_plot(tmp_path):
    def plot(plt):
        fig, ax = plt.subplots()
        ax.plot([1, 2], [3, 4])
        return fig

    write_report(tmp_path, "x", {"a": 1}, ["# X", *table(["k", "v"], [["a", 1]])], plot)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert (tmp_path / "x.md").read_text() == "# X\n| k | v |\n|---|---|\n| a | 1 |\n\n![x](x.png)\n"
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("batch_sizes", [[1, 16], [16, 64], [64, 16, 1]])
def test_speed_report_has_one_column_per_batch_size(tmp_path, batch_sizes):
    """`--batch-sizes 1 16` once printed "decode b1" twice."""
    batches = speed.decode_batches(batch_sizes)
    figures = {"prefill_tok_s": 400.0, "ttft_s": 0.03, "weight_bytes": 97e6, "bandwidth_gb_s": 11.0,
               **{f"decode_b{b}_tok_s": 100.0 * b for b in batches}}
    batch_1_only = {k: v for k, v in figures.items() if not k.startswith("decode_") or k == "decode_b1_tok_s"}
    results = {"env": ENV, "model": "m.gguf", "threads": 2, "machine_bandwidth_gb_s": 36.6,
               "engines": {"MiniLLM default": figures, "llama.cpp": batch_1_only}}
    args = argparse.Namespace(batch_sizes=batch_sizes, runs=3, engines=["default"])
    speed._write(tmp_path, results, args)
    lines = (tmp_path / "speed.md").read_text().split("\n")
    start = lines.index(next(line for line in lines if line.startswith("| engine")))
    header, _, ours, theirs = lines[start:start + 4]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert [c for c in columns if c.startswith("decode")] == [f"decode b{b} (tok/s)" for b in batches]
    assert len(ours.strip("|").split("|")) == len(columns) == len(theirs.strip("|").split("|"))
    assert theirs.count("—") == len(batches) - 1 + 1  # its missing batch sizes, and no compile time


def test_throughput_and_serving_reports(tmp_path):
    run = {"seconds": 10.0, "runs": [10.0, 11.0, 9.0], "tok_s": 300.0}
    pc = {"requests": 8, "system_tokens": 256, "output_tokens": 16, "speedup": 1.5,
          "off": {"seconds": 3.0, "hit_rate": 0.0}, "on": {"seconds": 2.0, "hit_rate": 0.9}}
    results = {"env": ENV, "dtype": "float32", "variant": "", "variants": [], "requests": 64, "input_len": [32, 256],
               "output_len": [32, 128], "model": "m", "repeats": 3, "minillm": run, "prefix_cache": pc,
               "hf": [{**run, "dtype": "float32", "batch_size": 16, "tok_s": 100.0, "minillm_speedup": 3.0}]}
    throughput.write_results(tmp_path, results, ["--repeats", "3"])
    text = (tmp_path / "throughput.md").read_text()
    assert "| MiniLLM (continuous batching) | 10.0 | 10.0, 11.0, 9.0 | 300.0 |" in text
    assert "**3.00x**" in text and "| on | 2.0 | 90.0% |" in text and (tmp_path / "throughput.png").exists()

    stats = {"mean": 0.1, "median": 0.05, "p99": 0.3}
    level = {"concurrency": 4, "request_throughput": 1.5, "output_tok_s": 96.0,
             **{k: stats for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s")}}
    results = {"env": ENV, "requests_per_level": 8, "input_len": [32, 64], "output_len": 16, "omp_wait_policy": "PASSIVE",
               "levels": [level, {**level, "concurrency": 8}],
               "offline": {"requests": 8, "max_num_seqs": 8, "wall_s": 1.0, "output_tok_s": 120.0}}
    serving._write(tmp_path, results, ["--concurrency", "4", "8"])
    text = (tmp_path / "serving.md").read_text()
    assert "| 4 | 1.50 | 96.0 | 80% | 100 / 50 / 300 |" in text and (tmp_path / "serving.png").exists()
    assert "**120.0** output tok/s" in text


def test_paired_rounds_take_turns_and_report_the_bandwidth_share(tmp_path):
    order = []
    runners = {name: (lambda name: lambda batch, length, new: order.append(name))(name) for name in ("default", "llama.cpp")}
    rounds = speed.paired_decode(runners, 2, bandwidth=lambda: order.append("machine") or 40e9)
    # each round: both engines (TTFT run, then decode run; each after a warm-up), then the machine
    assert order == (["default"] * 4 + ["llama.cpp"] * 4 + ["machine"]) * 2
    assert rounds["machine"] == [40.0, 40.0] and len(rounds["default"]) == 2
    figures = {"prefill_tok_s": 400.0, "ttft_s": 0.03, "weight_bytes": 97e6, "bandwidth_gb_s": 11.0, "decode_b1_tok_s": 100.0}
    results = {"env": ENV, "model": "m.gguf", "threads": 2, "machine_bandwidth_gb_s": 36.6, "engines": {"MiniLLM default": figures},
               "paired_b1": {"default": [200.0, 210.0], "llama.cpp": [100.0, 150.0], "machine": [30.0, 40.0],
                             "ratio_median": 2.0, "bandwidth_fraction_median": 0.65}}
    speed._write(tmp_path, results, argparse.Namespace(batch_sizes=[16], runs=3, engines=["default"]))
    text = (tmp_path / "speed.md").read_text()
    assert "median ratio of a round **2.00x**" in text and "30.0, 40.0 GB/s" in text and "**65%**" in text
