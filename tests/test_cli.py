"""The `minillm` command, run as a user would (python -m minillm)."""

import socket
import subprocess
import sys

import pytest
import torch

from minillm import SamplingParams


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minillm", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_generate_streams_from_the_bundled_model(smollm):
    result = run("generate", "The capital of France is", "--max-tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    expected = smollm.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0]
    assert result.stdout == "The capital of France is" + expected.text + "\n"


@pytest.mark.slow
def test_chat_reads_piped_lines_and_keeps_history(smollm):
    result = run("chat", "--temperature", "0", "--max-tokens", "16", stdin="My name is Ada.\nWhat is my name?\n")
    assert result.returncode == 0, result.stderr
    # The same two turns through the API: the second reply must be the one generated *with* history.
    params = SamplingParams(max_tokens=16, temperature=0)
    history = [{"role": "user", "content": "My name is Ada."}]
    first = smollm.chat(history, params).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
    second = smollm.chat(history, params).text
    assert result.stdout == first + "\n" + second + "\n"
    assert second != smollm.chat(history[-1:], params).text  # history changes the answer


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--model", "/no/such.gguf"], "no such model file"),
    (["generate", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--max-tokens", "9000"], "beyond the model's context"),
    (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'"),
    *([(["generate", "hi", "--device", "cuda"], "PyTorch sees no CUDA GPU here")] if not torch.cuda.is_available() else []),
    (["serve", "--device", "cuda:7"], "cuda" if not torch.cuda.is_available() else "CUDA GPU(s)"),
    (["serve", "--replicas", "0"], "--replicas must be a positive integer, got 0"),
])
@pytest.mark.slow
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    result = run(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_replicas_need_ray_a_free_port_and_a_model(tmp_path):
    """`serve --replicas 2` refuses with one line, before Ray starts: Ray not installed, the port taken, a
    file that is not a model."""
    no_ray = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None  # as if not installed\n"
                             "from minillm.cli import main; sys.exit(main(['serve', '--replicas', '2']))"],
                            capture_output=True, text=True, timeout=300)
    assert no_ray.returncode == 1 and "Traceback" not in no_ray.stderr, no_ray.stderr
    assert no_ray.stderr.strip().endswith("--replicas needs Ray Serve (import of ray halted; None in sys.modules): "
                                          "pip install 'minillm[serve]'")
    pytest.importorskip("ray.serve")
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in ((["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                              (["--model", str(bad), "--port", "0"], "not a readable GGUF file")):
            result = run("serve", "--replicas", "2", *args)
            assert result.returncode == 1 and message in result.stderr, result.stderr
            assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    result = run("generate", "hi", "--model", str(bad))
    assert result.returncode == 1 and "not a readable GGUF file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_freeze_heap_moves_live_objects_out_of_collections():
    """The CLI, server and benchmarks freeze the loaded heap (runtime.freeze_heap), and a later call still frees
    a cycle dropped in between (an engine the benchmarks are done with); in a fresh process, as freezing here
    would keep this test session's garbage."""
    code = ("import gc, weakref; from minillm.runtime import freeze_heap\n"
            "class Engine: pass\n"
            "e = Engine(); e.me = e; alive = weakref.ref(e); before = gc.get_freeze_count()\n"
            "freeze_heap(); frozen = gc.get_freeze_count(); del e; freeze_heap()\n"
            "print(before, frozen, int(alive() is None))")
    before, frozen, freed = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout.split())
    assert before == 0 and frozen > 1000 and freed == 1


def test_stop_strings_read_backslash_escapes():
    """`--stop "\\n\\n"` as the README writes it reaches the CLI as backslash-n twice: it must stop at a blank line."""
    from minillm.cli import build_parser

    args = build_parser().parse_args(["generate", "hi", "--stop", r"\n\n", "--stop", r"a\\n", "--stop", "é\\t"])
    assert args.stop == ["\n\n", "a\\n", "é\t"]


@pytest.mark.slow
def test_chat_template_option():
    result = run("chat", "--chat-template", "llama3", "--temperature", "0", "--max-tokens", "4", stdin="Hi\n")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    for command in ("chat", "serve"):  # refused before the model loads (or the server starts)
        result = run(command, "--chat-template", "no-such-template", stdin="")
        assert result.returncode == 1 and "neither a built-in template" in result.stderr, result.stderr
