"""tools/benchmark.py: it runs end to end and writes every figure (speed is never asserted)."""

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

HEADLINE_KEYS = ("transformer_mfu", "kgram_vs_starter_loop", "kv_cache_vs_recompute",
                 "lstm_state_vs_recompute", "tokenize_mb_per_s", "peak_rss_gb_100m_tokens",
                 "matmul_gflops")


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_every_key_as_a_positive_finite_number(bench, tmp_path, capsys):
    status = bench.main(["--quick", "--quiet", "--device_id", "cpu",
                             "--output", str(tmp_path / "benchmark.json")])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((tmp_path / "benchmark.json").read_text())
    for key in HEADLINE_KEYS:
        assert positive_finite(report[key]), (key, report.get(key))
    standard = {"kgram_mlp", "lstm", "transformer", "transformer_vocab4096", "transformer_plain_path"}
    # On a CPU with oneDNN the Transformer is also timed through torch's kernels, for comparison.
    assert set(report["training"]) == standard | ({"transformer_torch_matmul"}
                                                  if report["cpu_matmul"] == "onednn" else set())
    by_kernel = report["matmul_gflops_by_kernel"]
    assert set(by_kernel) == {"torch", report["cpu_matmul"]}
    assert report["matmul_gflops"] == max(by_kernel.values())  # MFU against the best kernel
    for name, row in report["training"].items():
        assert positive_finite(row["tokens_per_s"]) and positive_finite(row["mfu"]), name
        # against the ceiling measured in turn with this config's steps
        assert row["mfu"] == pytest.approx(row["achieved_gflops"] / row["ceiling_gflops"]), name
    generation = report["generation"]
    for key in ("kv_cache_vs_recompute_last_position", "memory_gb_per_s",
                "transformer_cached_bandwidth_utilisation"):
        assert positive_finite(generation[key]), key
    assert generation["transformer_weight_bytes"] == 4 * report["training"]["transformer"]["parameters"]
    assert report["memory"]["memmapped"] is True
    assert report["environment"]["device"] == "cpu"
    assert report["datasheet_bf16_peak_tflops"] == "unknown peak"
    assert report["sizes"]["rss_tokens"] > 0
    assert "matmul ceiling" in out and "benchmark written to" in out


@pytest.mark.parametrize("variant", ["onehot", "embedding"])
def test_starter_kgram_loop_gives_the_vectorized_models_logits(pico, bench, variant):
    torch.manual_seed(0)
    model = pico.KGramMLPSeqModel(vocab_size=23, k=3, embed_size=8, variant=variant)
    tokens = torch.randint(0, 23, (7, 2))
    assert torch.allclose(bench.starter_kgram_loop_logits(model, tokens), model(tokens),
                          atol=1e-5)


def test_grouped_gpt2_encoding_equals_one_document_per_example(gpt2, pico):
    texts = ["Once upon a time.", "it's 42!", "  spaced  ", "café naïve", "x" * 70000, "\nnew line\n"]
    tokens, offsets = gpt2.encode_examples(texts)
    for index, text in enumerate(texts):
        assert tokens[offsets[index]: offsets[index + 1]].tolist() == gpt2.encode(text) + [gpt2.eot_id]
    assert gpt2.encode_examples(["a <|endoftext|> b"]) is None  # falls back to encode_batch
    examples = pico.tokenize_examples(["a <|endoftext|> b", "c"], gpt2, None)
    assert examples.example(0).tolist() == gpt2.encode("a <|endoftext|> b") + [gpt2.eot_id]


def test_bfloat16_autocast_chunked_loss_stays_close_to_float32(pico):
    """The chunked loss under bf16 autocast: its value and every gradient (the hidden states',
    the output layer's weight and bias) within bf16's rounding of float32's, and the layer's
    gradients kept in float32."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    weights = torch.full((9,), 1 / 9)
    results = []
    for dtype in ("float32", "bfloat16"):
        hidden.grad = layer.weight.grad = layer.bias.grad = None
        with pico.autocast_context(torch.device("cpu"), dtype):
            loss = pico.linear_cross_entropy(hidden, layer, targets, weights, chunk_size=4)
        loss.backward()
        results.append((loss.item(), hidden.grad, layer.weight.grad, layer.bias.grad))
    (reference, *reference_grads), (loss, *grads) = results
    assert abs(loss - reference) < 0.05
    for grad, reference_grad in zip(grads, reference_grads):
        assert grad.dtype == torch.float32
        scale = reference_grad.abs().max()
        assert (grad - reference_grad).abs().max() < 0.05 * scale


@pytest.mark.slow
def test_compile_trains_to_the_same_losses(run_main, tmp_path, pico):
    """--compile (torch.compile of the model's features) changes speed, not results."""
    from conftest import TINY_RUN
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        status, _, err = run_main(*TINY_RUN, "--models", "transformer", "--run_name", name, *extra)
        assert status == 0, err
    eager, compiled = ([h["train_loss"] for h in pico.load_runlog(tmp_path / "artefacts" / f"{n}.json")
                        ["models"]["transformer"]["history"]] for n in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_peak_rss_of_a_child_is_its_own_not_its_parents(bench):
    """getrusage's ru_maxrss survives fork + exec, so the memory probe (a child process) once
    reported the benchmark's own size; peak_rss_bytes must not."""
    import subprocess
    import sys

    import numpy as np
    from conftest import BENCHMARK, probe_loading
    held = np.ones(1_500_000_000 // 8)  # 1.5 GB resident in this (parent) process
    probe = probe_loading("bench", BENCHMARK, "pico_benchmark") + "print(bench.peak_rss_bytes())\n"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert 0 < int(child.stdout.split()[-1]) < held.nbytes
    assert bench.peak_rss_bytes() >= held.nbytes


def test_peak_rss_falls_back_to_getrusage_without_proc(bench, monkeypatch):
    """Where /proc/self/status cannot be read (macOS), the figure comes from ru_maxrss,
    kilobytes on Linux and bytes on macOS."""
    import resource
    import sys

    def no_proc(self, *args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(bench.Path, "read_text", no_proc)
    scale = 1 if sys.platform == "darwin" else 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    reported = bench.peak_rss_bytes()
    assert before <= reported <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


FAKE_NANOGPT = '''
import dataclasses, torch, torch.nn as nn, torch.nn.functional as F
@dataclasses.dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte, self.head = nn.Embedding(config.vocab_size, config.n_embd), nn.Linear(config.n_embd, config.vocab_size)
    def forward(self, idx, targets=None):
        logits = self.head(self.wte(idx))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas)
'''


def test_quick_gpt2_benchmark_times_pico_nanogpt_and_transformers(bench, tmp_path, capsys):
    """--gpt2 at tiny size on the CPU: every training and decoding figure measured, nanoGPT's
    model.py loaded from the directory given (a stand-in with its interface here); a profile
    of each, one written over an earlier profile."""
    (tmp_path / "nanogpt").mkdir()
    (tmp_path / "nanogpt" / "model.py").write_text(FAKE_NANOGPT)
    (tmp_path / "profile_pico_eager.txt").write_text(bench.PROFILE_HEADER + "an earlier one\n")
    status = bench.main(["--gpt2", "--quick", "--quiet", "--device_id", "cpu", "--output",
                         str(tmp_path / "gpt2.json"), "--nanogpt_dir", str(tmp_path / "nanogpt"),
                         "--profile", str(tmp_path)])
    assert status == 0
    for who in ("pico", "nanogpt"):
        profile = (tmp_path / f"profile_{who}_eager.txt").read_text()
        assert profile.startswith(bench.PROFILE_HEADER + "3 steps") and "Self CPU" in profile
    report = json.loads((tmp_path / "gpt2.json").read_text())
    assert report["kind"] == "gpt2_benchmark" and report["datasheet_bf16_peak_tflops"] == "unknown peak"
    training = report["training"]
    assert set(training) == {"pico_eager", "nanogpt_eager", "pico_vs_nanogpt_eager"}  # no compile on a CPU
    for name in ("pico_eager", "nanogpt_eager"):
        row = training[name]
        assert positive_finite(row["tokens_per_s"]) and positive_finite(row["mfu_vs_measured_ceiling"])
        assert row["mfu_vs_datasheet_peak"] is None and row["peak_memory_gb"] is None
    optimizer = report["optimizer"]
    assert set(optimizer) == {"adamw_fused_step_s", "muon_loops_step_s", "muon_foreach_step_s",
                              "muon_foreach_vs_loops"}
    assert all(map(positive_finite, optimizer.values()))
    decoding = report["decoding"]
    for way in ("pico_plain", "pico_static", "transformers"):
        for dtype in ("fp32", "bf16"):
            for batch in report["sizes"]["decode_batches"]:
                assert positive_finite(decoding[f"{way}_{dtype}_batch{batch}_tokens_per_s"])
    assert "benchmark written to" in capsys.readouterr().out


def test_gpt2_benchmark_refuses_a_directory_without_nanogpt(bench, tmp_path, capsys):
    status = bench.main(["--gpt2", "--quick", "--quiet", "--device_id", "cpu", "--output",
                         str(tmp_path / "gpt2.json"), "--nanogpt_dir", str(tmp_path)])
    assert status == 2 and "no model.py there" in capsys.readouterr().err
    assert not (tmp_path / "gpt2.json").exists()


def test_datasheet_peaks_are_known_for_h100_sxm_h200_a100_only(bench, monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                       ("NVIDIA H100 PCIe", None), ("NVIDIA L4", None),
                       ("NVIDIA RTX A1000 6GB Laptop GPU", None), ("NVIDIA GH200 480GB", 989.0),
                       ("NVIDIA H200 NVL", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.datasheet_peak_tflops(cuda) == peak, name
        assert bench.datasheet_peak_tflops(cuda, "float32") is None    # a bf16 peak, bf16 steps


GPU_CHECKS = REPO / "tools" / "gpu_checks.sh"


def run_gpu_checks(*argv, steps: str, timeout: int = 900, **env):
    """gpu_checks.sh as on a machine without a GPU (CUDA hidden where there is one: its cuda
    tests skip, as these tests expect, rather than run for minutes); `env`: its settings."""
    return subprocess.run(["bash", str(GPU_CHECKS), *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "STEPS": steps,
                                                "CUDA_VISIBLE_DEVICES": "", **env})


def packed_log(out, name: str) -> str:
    """A log that gpu_checks.sh packed into OUT/logs.tgz."""
    with tarfile.open(out / "logs.tgz") as archive:
        return archive.extractfile(f"logs/{name}").read().decode()


def test_gpu_checks_records_each_step_and_refuses_bad_usage(tmp_path):
    """The cuda-marked tests step at tiny size on the CPU: they skip, and the step is recorded;
    the logs come back packed, beside the summary."""
    result = run_gpu_checks("--tiny", "--device", "cpu", str(tmp_path / "out"), steps="tests")
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    name, status, seconds = (tmp_path / "out" / "summary.txt").read_text().split()
    assert (name, status) == ("tests", "0") and int(seconds) >= 0
    assert "skipped" in packed_log(tmp_path / "out", "cuda_tests.log")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["logs.tgz", "summary.txt"]
    assert run_gpu_checks(str(tmp_path / "a"), str(tmp_path / "b"), steps="tests").returncode == 2
    assert run_gpu_checks("--fast", str(tmp_path / "a"), steps="tests").returncode == 2
    # for a GPU (the default, cuda:0) where there is none: it had trained on the CPU for minutes
    result = run_gpu_checks(str(tmp_path / "a"), steps="tests gptoss")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no CUDA device here for --device cuda:0" in result.stderr
    assert not (tmp_path / "a").exists()


def test_gpu_checks_skips_the_steps_its_total_time_leaves_no_room_for(tmp_path):
    """TOTAL_S bounds the whole run (a lent machine's time is fixed): a step with under 20 s
    left is recorded as skipped, not started."""
    result = subprocess.run(["bash", str(GPU_CHECKS), "--tiny", "--device", "cpu", str(tmp_path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "STEPS": "tests benchmark", "TOTAL_S": "30",
                                 "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "summary.txt").read_text().splitlines() == ["tests skipped 0",
                                                                   "benchmark skipped 0"]
    # said before the first step: the defaults' limits had added up to 890 s against 540
    assert result.stderr == ("gpu_checks.sh: note: the limits of the steps in STEPS add up to "
                             "600 s, more than TOTAL_S=30: the last ones may be cut short or "
                             "skipped; raise TOTAL_S, or run fewer STEPS\n")
    for bad in ("9m", "abc", "1e3"):
        result = subprocess.run(["bash", str(GPU_CHECKS), "--tiny", str(tmp_path / "x")],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "STEPS": "tests", "TOTAL_S": bad})
        assert result.returncode == 2 and result.stderr == (
            f"gpu_checks.sh: TOTAL_S={bad} is not a number of seconds\n")


@pytest.mark.parametrize("argv, settings, message", [
    (["--tiny", "--device"], {}, "--device needs a value"),
    (["{out}"], {"STEPS": "tests bogus"}, "unknown step bogus in STEPS"),
    (["{out}"], {"TOTAL_S": "08"}, "TOTAL_S=08 must be a number of seconds from 1, without a leading zero"),
    (["{out}"], {"TESTS_TIMEOUT": "0"}, "TESTS_TIMEOUT=0 must be a number of seconds from 1"),
    (["{out}"], {"TEST_TIMEOUT": "0"}, "TEST_TIMEOUT=0 must be a number of seconds from 1"),
    (["{out on a GPU}"], {"PYTHON": "no_such_python"}, "no_such_python cannot import torch ("),
])
def test_gpu_checks_refuses_bad_input_in_one_line_before_touching_out(tmp_path, argv, settings,
                                                                      message):
    """Checked before anything in OUT_DIR is removed or written: an unknown step had been
    found only once logs.tgz was deleted and summary.txt emptied, 08 (octal to bash) failed
    there with an arithmetic error, and 0 (no limit at all to timeout) was taken."""
    (tmp_path / "summary.txt").write_text("mine\n")
    (tmp_path / "logs.tgz").write_text("mine\n")
    argv = {"{out}": ["--tiny", "--device", "cpu", str(tmp_path)],
            "{out on a GPU}": [str(tmp_path / "new")]}.get(argv[0], argv)
    result = run_gpu_checks(*argv, **{"steps": "tests", **settings}, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("gpu_checks.sh: ") and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tgz", "summary.txt"]
    assert (tmp_path / "summary.txt").read_text() == (tmp_path / "logs.tgz").read_text() == "mine\n"


def test_gpu_checks_replaces_an_earlier_runs_results_with_replace_only(tmp_path):
    """A second run into an OUT_DIR had replaced the first one's results: it is refused unless
    --replace is given, which replaces this script's own files only (an earlier step's report
    too, so that none is left beside the new results)."""
    out = tmp_path / "out"
    command = ["--tiny", "--device", "cpu", str(out)]
    assert run_gpu_checks(*command, steps="tests").returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_gpu_checks(*command, steps="tests")
    assert result.returncode == 2 and result.stderr == (
        f"gpu_checks.sh: {out} already holds results (summary.txt logs.tgz); choose another "
        "OUT_DIR, or give --replace to replace them\n")
    (out / "gptoss_eager.json").write_text('{"kind": "notes"}\n')     # no run log: not its own
    result = run_gpu_checks("--replace", *command, steps="tests")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{out}/gptoss_eager.json is not this script's output" in result.stderr
    assert (out / "gptoss_eager.json").read_text() == '{"kind": "notes"}\n'
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json"} == first
    (out / "gptoss_eager.json").write_text('{\n "schema_version": 1,\n "kind": "run"\n}\n')
    result = run_gpu_checks("--replace", *command, steps="tests")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "summary.txt"]
    assert (out / "summary.txt").read_text().split()[:2] == ["tests", "0"]
    assert packed_log(out, "cuda_tests.log").startswith("gpu_checks.sh step tests: ")


def test_gpu_checks_cut_short_leaves_the_running_steps_log_and_the_earlier_ones_packed(tmp_path):
    """A run stopped from outside mid-step (a lent machine's time spent) leaves in OUT the step
    in flight's log and the earlier steps' logs in logs.tgz."""
    process = subprocess.Popen(["bash", str(GPU_CHECKS), "--tiny", "--device", "cpu", str(tmp_path)],
                               env={**os.environ, "STEPS": "tests benchmark",
                                    "CUDA_VISIBLE_DEVICES": ""},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "benchmark.log").exists() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert (tmp_path / "summary.txt").read_text().split()[:2] == ["tests", "0"]
    assert "skipped" in packed_log(tmp_path, "cuda_tests.log")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.log", "logs.tgz", "summary.txt"]


def processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:                       # a process that ended meanwhile
            continue
        if text in line:
            found.append(line)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads Linux's /proc")
def test_gpu_checks_stopped_by_a_signal_stops_the_step_in_flight(tmp_path):
    """timeout runs a step in a process group of its own, which outlived the script: a GPT-oss
    run went on training on its own after the script was stopped."""
    out = tmp_path / "out"
    process = subprocess.Popen(["bash", str(GPU_CHECKS), "--tiny", "--device", "cpu", str(out)],
                               env={**os.environ, "STEPS": "tests benchmark",
                                    "CUDA_VISIBLE_DEVICES": ""},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "benchmark.log").exists() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while not processes_naming(f"{out}/gpt2_benchmark.json"):   # the step has started
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert processes_naming(f"{out}/gpt2_benchmark.json") == []
    assert (out / "benchmark.log").exists()                       # the log of the step in flight
    # stopped, not waited for: the script used to stop only once the step was done (seconds
    # at tiny size, minutes on a GPU)
    assert not (out / "gpt2_benchmark.json").exists()
    assert (out / "summary.txt").read_text().split()[:2] == ["tests", "0"]
    assert len((out / "summary.txt").read_text().splitlines()) == 1


@pytest.mark.slow
def test_gpu_checks_runs_every_step_at_tiny_size_on_the_cpu(pico, tmp_path):
    """What a GPU machine runs, at tiny size on the CPU: the GPT-2 benchmark report, GPT-oss's
    eager and compiled run logs (the same losses), the same greedy text generated without and
    with --compile from a saved checkpoint, the recipe comparison's report, each with status
    0 (the tests step: test_gpu_checks_records_each_step_and_refuses_bad_usage)."""
    out = tmp_path / "out"
    result = run_gpu_checks("--tiny", "--device", "cpu", str(out),
                            steps="benchmark gptoss generate recipe")
    assert result.returncode == 0, result.stderr
    summary = {line.split()[0]: line.split()[1] for line in (out / "summary.txt").read_text().splitlines()}
    assert summary == {"benchmark": "0", "gptoss_eager": "0", "gptoss_compiled": "0",
                       "generate_train": "0", "generate_plain": "0", "generate_compiled": "0",
                       "recipe": "0"}
    plain = packed_log(out, "generate_plain.txt")
    assert plain.startswith("Once upon a time") and plain == packed_log(out, "generate_compiled.txt")
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == ["logs.tgz", "summary.txt"]
    assert json.loads((out / "recipe_gpt2.json").read_text())["kind"] == "recipe_gpt2"
    assert json.loads((out / "gpt2_benchmark.json").read_text())["kind"] == "gpt2_benchmark"
    eager, compiled = ([h["train_loss"] for h in pico.load_runlog(out / f"gptoss_{mode}.json")
                        ["models"]["transformer"]["history"]] for mode in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-4)


COMPILE_PRESETS = REPO / "tools" / "compile_presets.py"


def test_compile_presets_refuses_an_unknown_config(tmp_path):
    result = subprocess.run([sys.executable, str(COMPILE_PRESETS), "--configs", "pico,GPT-5",
                             "--output", str(tmp_path / "out.json")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "GPT-5" in result.stderr
    assert not (tmp_path / "out.json").exists()
    (tmp_path / "file").write_text("not a directory")
    result = subprocess.run([sys.executable, str(COMPILE_PRESETS), "--configs", "pico",
                             "--output", str(tmp_path / "file" / "out.json")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--output" in result.stderr


@pytest.mark.slow
def test_compile_presets_times_compiled_against_eager_at_tiny_size(tmp_path):
    """The GPU tool at tiny size on the CPU: both runs of a preset finish, and the report has
    the compilation's seconds and the compiled/eager speed ratio."""
    result = subprocess.run([sys.executable, str(COMPILE_PRESETS), "--tiny", "--device_id", "cpu",
                             "--steps", "6", "--configs", "pico", "--output", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "out.json").read_text())["rows"]["pico"]
    assert row["eager"]["steps"] == row["compiled"]["steps"] == 6
    assert row["compile_s"] > 0 and row["compiled_vs_eager"] > 0 and row["compiled_vs_eager_median_step"] > 0
    assert row["eager"]["recompilations"] == row["eager"]["graph_breaks"] == 0   # nothing compiled
    assert row["compiled"]["graph_breaks"] == 0 and isinstance(row["compiled"]["recompilations"], int)


def test_compile_presets_records_the_batch_its_runs_train_at(pico, monkeypatch, tmp_path):
    """--batch_size with --tiny: --tiny's batch 2 came after it on pico-llm's command line
    and won, while the report recorded the one given. The runs are not started here: their
    command lines are read as pico-llm reads them."""
    from types import SimpleNamespace

    from conftest import load_script
    presets = load_script(COMPILE_PRESETS, "pico_compile_presets")
    commands = []

    def not_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "not run\n")

    monkeypatch.setattr(presets, "subprocess", SimpleNamespace(
        run=not_run, TimeoutExpired=subprocess.TimeoutExpired))
    for argv, batch in ((["--batch_size", "7"], 7), ([], 2)):
        commands.clear()
        assert presets.main(["--tiny", "--device_id", "cpu", "--configs", "pico", *argv,
                             "--output", str(tmp_path / "out.json")]) == 1
        assert json.loads((tmp_path / "out.json").read_text())["batch_size"] == batch
        assert [pico.parse_args(command[2:]).batch_size for command in commands] == [batch, batch]


MAKE_3SEQS = REPO / "tools" / "make_3seqs.py"


def test_make_3seqs_writes_over_its_corpus_or_the_start_of_it_only(tmp_path):
    """A 3seqs.txt with lines added after the corpus had been replaced (its first line alone
    was compared): refused, in one line, and kept. The corpus cut short is written whole."""
    corpus = (REPO / "3seqs.txt").read_bytes()
    out = tmp_path / "3seqs.txt"
    for content, status in ((corpus + b"my own line\n", 2), (corpus[:1000], 0)):
        out.write_bytes(content)
        result = subprocess.run([sys.executable, str(MAKE_3SEQS), "--out", str(out)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == status and result.stderr.count("\n") == (status == 2), result.stderr
        assert out.read_bytes() == (content if status else corpus)


def test_ab_training_speed_passes_its_flags_to_both_versions(tmp_path):
    """tools/ab_training_speed.py, tiny: both versions built with --flags (the block size
    shows in the tokens a step: 8 x 2) and timed."""
    command = [sys.executable, str(REPO / "tools" / "ab_training_speed.py"), "HEAD",
               "--model", "lstm_seq", "--rounds", "1", "--vocab_size", "50", "--batch_size", "2",
               "--flags", "--embed_size 8 --block_size 8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "lstm_seq --embed_size 8 --block_size 8, batch 2" in result.stdout
    assert result.stdout.count("(16 tokens)") == 2 and "new / old tokens/s" in result.stdout


def compile_presets(*argv):
    return subprocess.run([sys.executable, str(COMPILE_PRESETS), "--configs", "pico", "--tiny",
                           "--device_id", "cpu", *argv], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def not_a_report(tmp_path):
    """A file a report must never replace (a run log, say), and a directory."""
    (tmp_path / "run.json").write_text('{"schema_version": 1, "kind": "run", "models": {}}\n')
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "--steps must be at least 2, got 1"),
    (["--timeout", "0"], "argument --timeout: expected a finite number above 0, got 0"),
    (["--output", "{tmp}/folder"], "folder is a directory"),
    (["--output", "{tmp}/run.json"], "run.json already exists and is no compile_presets report"),
])
def test_compile_presets_refuses_bad_input_in_one_line_before_running(not_a_report, argv, message):
    argv = [a.format(tmp=not_a_report) for a in argv]
    before = (not_a_report / "run.json").read_bytes()
    result = compile_presets(*(argv if "--output" in argv
                               else [*argv, "--output", str(not_a_report / "out.json")]))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert (not_a_report / "run.json").read_bytes() == before
    assert not (not_a_report / "out.json").exists()


def test_compile_presets_replaces_its_own_report_and_fails_when_no_config_ran(tmp_path):
    output = tmp_path / "out.json"
    output.write_text('{"kind": "compile_presets", "rows": {}}\n')   # an earlier report
    result = compile_presets("--timeout", "0.01", "--output", str(output))
    assert result.returncode == 1 and "no config ran both ways" in result.stderr
    row = json.loads(output.read_text())["rows"]["pico"]
    assert "not finished" in row["eager"]["error"] and "not finished" in row["compiled"]["error"]


@pytest.mark.parametrize("name", ["run.json", "folder"])
def test_the_benchmark_writes_over_no_file_but_its_own_report(bench, not_a_report, capsys, name):
    before = (not_a_report / "run.json").read_bytes()
    assert bench.main(["--quick", "--quiet", "--device_id", "cpu", "--output",
                       str(not_a_report / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--output" in err and name in err
    assert (not_a_report / "run.json").read_bytes() == before


@pytest.mark.parametrize("flag", ["--nanogpt_dir", "--profile"])
def test_the_gpt2_benchmarks_flags_alone_are_refused(bench, tmp_path, capsys, flag):
    assert bench.main(["--quick", "--device_id", "cpu", flag, str(tmp_path),
                       "--output", str(tmp_path / "b.json")]) == 2
    assert f"{flag} is read by the --gpt2 benchmark only" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_the_gpt2_benchmark_refuses_a_profile_folder_that_is_a_file(bench, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert bench.main(["--quick", "--gpt2", "--device_id", "cpu", "--profile",
                       str(tmp_path / "notes.txt"), "--output", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--profile {tmp_path}/notes.txt" in err and "not a directory" in err
    assert not (tmp_path / "b.json").exists() and (tmp_path / "notes.txt").read_text() == "mine"

@pytest.mark.parametrize("thing", ["file", "directory"])
def test_the_gpt2_benchmark_writes_over_no_file_but_its_own_profiles(bench, tmp_path, capsys,
                                                                     monkeypatch, thing):
    """A profile's name taken by something else (notes, a folder) is refused before anything
    is measured, and kept."""
    mine = tmp_path / "profile_pico_eager.txt"
    mine.write_text("mine") if thing == "file" else mine.mkdir()
    monkeypatch.setattr(bench, "matmul_gflops", lambda *args: pytest.fail("measured"))
    assert bench.main(["--quick", "--gpt2", "--device_id", "cpu", "--profile", str(tmp_path),
                       "--output", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--profile {mine} already exists and is no profile" in err
    assert not (tmp_path / "b.json").exists()
    assert mine.read_text() == "mine" if thing == "file" else mine.is_dir()


def test_a_report_never_replaces_a_fifo(pico, tmp_path):
    os.mkfifo(tmp_path / "fifo")          # reading its start to find its kind would block
    with pytest.raises(pico.UserError, match="is not a regular file"):
        pico.check_replaceable_report(tmp_path / "fifo", ("benchmark",), "--output")


@pytest.mark.parametrize("tool, flag, kind", [("benchmark", "--quick", "benchmark"),
                                              ("compile_presets", "--tiny", "compile_presets")])
def test_a_small_smoke_report_never_replaces_a_full_one(pico, tool, flag, kind, tmp_path):
    """A report measured at full size (minutes, perhaps on a GPU, perhaps committed) is not
    replaced by one at the tests' small size: refused before anything runs, the file kept.
    A small report over a small one, and a full one over either, are fine."""
    import json
    import subprocess
    import sys
    from conftest import TOOLS
    small = flag.removeprefix("--")
    report = tmp_path / "report.json"
    full = json.dumps({"kind": kind, "created": "2026-11-23", small: False}, indent=1)
    report.write_text(full)
    result = subprocess.run([sys.executable, str(TOOLS / f"{tool}.py"), flag, "--device_id", "cpu",
                             "--output", str(report)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"holds a full-size {kind} report, which a {flag} one would replace" in result.stderr
    assert report.read_text() == full
    pico.check_replaceable_report(report, (kind,), "--output", (small, False))
    report.write_text(full.replace("false", "true"))
    pico.check_replaceable_report(report, (kind,), "--output", (small, True))


def test_a_quick_benchmark_has_a_default_report_of_its_own(bench, tmp_path, monkeypatch):
    """After a full run, `tools/benchmark.py --quick` as its docstring shows it must work: its
    report goes to benchmark_quick.json, beside the full one, which it would not replace."""
    import json
    monkeypatch.setattr(bench.pico, "DEFAULT_ARTEFACTS_DIR", tmp_path)
    (tmp_path / "benchmark.json").write_text(json.dumps({"kind": "benchmark", "quick": False}))
    chosen = []
    monkeypatch.setattr(bench, "run_benchmark", lambda args: chosen.append(args.output) or 0)
    assert bench.main(["--quick", "--device_id", "cpu"]) == 0
    assert bench.main(["--device_id", "cpu"]) == 0
    assert chosen == [str(tmp_path / "benchmark_quick.json"), str(tmp_path / "benchmark.json")]
