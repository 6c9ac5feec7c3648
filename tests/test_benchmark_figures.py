"""tools/benchmark.py's arithmetic and order, with its measurements stubbed: each figure is
the median of the timed calls after untimed warm-up ones, A and B are timed in turn, a ratio
is the slower over the faster as its name says, tokens are counted per step with the batch,
and a full report is marked full so that a --quick run never replaces it."""
import json
import types

import pytest
import torch

CPU = torch.device("cpu")


def sequence_seconds(values, log=None):
    """A stand-in for median_seconds: calls function once (so it runs) and returns the next value."""
    values = list(values)

    def fake(function, repeats, warmup, device):
        function()
        if log is not None:
            log.append(getattr(function, "__name__", "fn"))
        return values.pop(0)
    return fake


# --- median_seconds: median of the timed calls, warm-up untimed ----------------------------------
def test_median_seconds_is_the_median_of_the_timed_calls_after_untimed_warmup(bench, monkeypatch):
    clock = {"now": 0.0}
    durations = iter([100.0, 1.0, 2.0, 9.0])         # the first call is the warm-up

    def function():
        clock["now"] += next(durations)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    assert bench.median_seconds(function, 3, 1, CPU) == 2.0


# --- matmul probe, ceiling, bandwidth: the FLOP and byte counts ----------------------------------
def test_matmul_probe_counts_2_size_cubed_flops_a_product(bench, monkeypatch):
    monkeypatch.setattr(bench, "median_seconds", lambda function, r, w, d: 1.0)
    probe = bench.matmul_probe(CPU, torch.float32, 16)
    assert probe() == pytest.approx(2 * 16 ** 3 * 4 / 1e9)      # 4 products a call on a CPU


def test_matmul_gflops_is_the_median_of_the_probes_after_a_warmup_probe(bench, monkeypatch):
    values = iter([100.0, 1.0, 2.0])
    monkeypatch.setattr(bench, "matmul_probe", lambda *a, **k: (lambda: next(values)))
    assert bench.matmul_gflops(CPU, torch.float32, 16, 2) == 1.5


def test_memory_bandwidth_counts_four_bytes_a_float(bench, monkeypatch):
    monkeypatch.setattr(bench, "median_seconds", lambda function, r, w, d: 0.5)
    assert bench.memory_gb_per_s(CPU, 8.0, 1) == pytest.approx(8e6 / 0.5 / 1e9)


def test_peak_text_says_why_there_is_no_peak(bench):
    assert bench.peak_text(None, torch.device("cuda"), "float32") == "none for float32"
    assert bench.peak_text(None, torch.device("cuda"), "bfloat16") == "unknown peak"
    assert bench.peak_text(None, CPU, "float32") == "unknown peak"
    assert bench.peak_text(989.0, torch.device("cuda"), "bfloat16") == 989.0


# --- benchmark_training: tokens a step, medians, the ceiling probed in turn, warm-up ----------
def test_training_counts_block_times_batch_tokens_medians_and_probes_in_turn(bench, pico, monkeypatch):
    sizes = bench.dataclasses.replace(bench.BenchmarkSizes.quick(), repeats=3, warmup=2)
    config = bench.benchmark_configs(sizes)[1]                     # the LSTM: cheap
    log = []
    real_step = pico.training_step
    monkeypatch.setattr(bench.pico, "training_step",
                        lambda *a, **k: log.append("step") or real_step(*a, **k))
    monkeypatch.setattr(bench, "median_seconds", sequence_seconds([1.0, 2.0, 9.0]))
    ceilings = iter([10.0, 20.0, 90.0])
    row = bench.benchmark_training(config, sizes, CPU, "float32",
                                   lambda: log.append("probe") or next(ceilings), pico.SpeedConfig())
    assert log == ["step"] * 2 + ["step", "probe"] * 3              # warm-up, then in turn
    assert row["step_s"] == 2.0 and row["ceiling_gflops"] == 20.0
    assert row["tokens_per_s"] == pytest.approx(config["block_size"] * sizes.batch_size / 2.0)
    assert row["mfu"] == pytest.approx(row["training_flops_per_token"] * row["tokens_per_s"] / 20e9)


# --- run_benchmark's wiring, every measurement stubbed (cheap even at full size) -----------------
def test_run_benchmark_wires_each_figure_to_its_source(bench, monkeypatch, tmp_path):
    probes = []
    monkeypatch.setattr(bench, "matmul_ceiling", lambda device, sizes: {
        "matmul_gflops": 5.0, "matmul_gflops_by_kernel": {"torch": 1.0, "onednn": 5.0}})
    monkeypatch.setattr(bench, "matmul_probe", lambda device, dtype, size, kernel="torch":
                        probes.append(kernel) or (lambda: 5.0))
    monkeypatch.setattr(bench, "datasheet_peak_tflops", lambda device, dtype: 2.0)
    rows = {}

    def training(config, sizes, device, dtype, probe, speed):
        mfu = 0.1 + 0.01 * len(rows)
        rows.setdefault(config["name"], mfu)
        return {"model": config["model"], "parameters": 1, "training_flops_per_token": 1e6,
                "step_s": 1.0, "tokens_per_s": 1.0, "achieved_gflops": 1000.0,
                "ceiling_gflops": 5.0, "mfu": mfu}
    monkeypatch.setattr(bench, "benchmark_training", training)
    monkeypatch.setattr(bench, "benchmark_kgram_vs_starter", lambda *a: {
        "kgram_vs_starter_loop": 3.0, **{f"{v}_{k}": 1.0 for v in ("onehot", "embedding")
                                         for k in ("vs_starter_loop", "vectorized_tokens_per_s",
                                                   "starter_loop_tokens_per_s")}})
    monkeypatch.setattr(bench, "benchmark_generation", lambda *a: {
        "new_tokens": 8, "transformer_weight_bytes": 1e9, "transformer_cached_tokens_per_s": 2.0,
        "transformer_recompute_tokens_per_s": 1.0, "kv_cache_vs_recompute": 2.0,
        "kv_cache_vs_recompute_last_position": 1.0,
        "transformer_recompute_last_position_tokens_per_s": 2.0, "lstm_state_vs_recompute": 1.0,
        "lstm_cached_tokens_per_s": 1.0, "lstm_recompute_tokens_per_s": 1.0})
    monkeypatch.setattr(bench, "memory_gb_per_s", lambda *a: 4.0)
    monkeypatch.setattr(bench, "benchmark_tokenization", lambda *a: {
        "megabytes": 1.0, "examples": 1, "tokenize_mb_per_s": 1.0, "encode_batch_per_example_mb_per_s": 1.0})
    monkeypatch.setattr(bench, "benchmark_memmap_rss", lambda *a: {
        "tokens": 1, "token_file_gb": 1.0, "steps": 1, "model": "transformer", "memmapped": True,
        "peak_rss_gb_100m_tokens": 1.0})
    out = tmp_path / "benchmark.json"
    assert bench.main(["--device_id", "cpu", "--quiet", "--dtype", "float32", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is False                                 # a full run, guarded as one
    assert set(probes) == {"onednn"}                                # MFU against the best kernel
    assert report["transformer_mfu"] == rows["transformer"]
    assert report["training"]["transformer"]["mfu_vs_datasheet_peak"] == pytest.approx(1000.0 / 2e3)
    assert report["generation"]["transformer_cached_bandwidth_utilisation"] == pytest.approx(1e9 * 2 / 4e9)
    # and a --quick run may not replace it
    assert bench.main(["--quick", "--device_id", "cpu", "--quiet", "--output", str(out)]) == 2


# --- k-gram vs starter: ratio direction, medians, interleaving, the starter's warm-up -----------
def test_kgram_vs_starter_ratio_medians_and_turns(bench, monkeypatch):
    sizes = bench.dataclasses.replace(bench.BenchmarkSizes.quick(), repeats=6)   # 3 rounds
    log, starter_calls = [], []
    real_loop = bench.starter_kgram_loop_logits
    monkeypatch.setattr(bench, "starter_kgram_loop_logits",
                        lambda *a: starter_calls.append(1) or real_loop(*a))
    # per variant: rounds of (starter, vectorized)
    values = [4.0, 1.0, 5.0, 2.0, 40.0, 9.0] + [8.0, 1.0, 10.0, 2.0, 80.0, 9.0]
    monkeypatch.setattr(bench, "median_seconds", sequence_seconds(values, log))
    result = bench.benchmark_kgram_vs_starter(sizes, CPU)
    assert log == ["starter_step", "vectorized_step"] * 6
    assert len(starter_calls) == 2 * (1 + 3)                          # a warm-up call each variant
    tokens = result["block_size"] * sizes.starter_batch_size
    for variant, starter in (("onehot", 5.0), ("embedding", 10.0)):
        assert result[f"{variant}_starter_loop_tokens_per_s"] == pytest.approx(tokens / starter)
        assert result[f"{variant}_vectorized_tokens_per_s"] == pytest.approx(tokens / 2.0)
        assert result[f"{variant}_vs_starter_loop"] == pytest.approx(starter / 2.0)
    assert result["kgram_vs_starter_loop"] == result["onehot_vs_starter_loop"]


# --- generation: medians, interleaving, warm-up, ratios -----------------------------------------
def test_generation_medians_turns_and_ratios(bench, monkeypatch):
    sizes = bench.dataclasses.replace(bench.BenchmarkSizes.quick(), generation_tokens=5,
                                      generation_repeats=3)
    log = []
    monkeypatch.setattr(bench.pico, "generate_ids",
                        lambda model, prompt, n, rule, use_cache, device: log.append((use_cache, n)))
    monkeypatch.setattr(bench, "greedy_recompute_last_position",
                        lambda model, prompt, n, device: log.append(("last", n)))
    # per model: rounds of (cached, recompute[, last])
    t_values = [1.0, 10.0, 4.0, 2.0, 20.0, 5.0, 9.0, 90.0, 6.0]
    l_values = [1.0, 3.0, 2.0, 6.0, 9.0, 1.0]
    monkeypatch.setattr(bench, "median_seconds", sequence_seconds(t_values + l_values))
    r = bench.benchmark_generation(sizes, CPU)
    turn = [(True, 5), (False, 5)]
    assert log == [(True, 8), (False, 8)] + (turn + [("last", 5)]) * 3 + [(True, 8), (False, 8)] + turn * 3
    assert r["transformer_cached_tokens_per_s"] == pytest.approx(5 / 2.0)
    assert r["transformer_recompute_tokens_per_s"] == pytest.approx(5 / 20.0)
    assert r["transformer_recompute_last_position_tokens_per_s"] == pytest.approx(5 / 5.0)
    assert r["kv_cache_vs_recompute"] == pytest.approx(10.0)
    assert r["kv_cache_vs_recompute_last_position"] == pytest.approx(2.5)
    assert r["lstm_state_vs_recompute"] == pytest.approx(3.0 / 2.0)


# --- tokenization: MB are UTF-8 bytes, the data path's time -------------------------------------
def test_tokenization_counts_utf8_megabytes_over_the_data_paths_time(bench, monkeypatch):
    sizes = bench.BenchmarkSizes.quick()
    monkeypatch.setattr(bench, "median_seconds", sequence_seconds([0.5, 4.0]))
    r = bench.benchmark_tokenization(sizes, CPU)
    texts = bench.synthetic_corpus(sizes.tokenize_mb * 1e6)
    assert r["megabytes"] == pytest.approx(sum(len(t.encode("utf-8")) for t in texts) / 1e6)
    assert r["megabytes"] > sum(len(t) for t in texts) / 1e6          # é, ï: two bytes each
    assert r["tokenize_mb_per_s"] == pytest.approx(r["megabytes"] / 0.5)
    assert r["encode_batch_per_example_mb_per_s"] == pytest.approx(r["megabytes"] / 4.0)


# --- memory: VmHWM kB -> bytes -> GB ------------------------------------------------------------
def test_peak_rss_reads_vmhwm_kibibytes(bench, monkeypatch):
    monkeypatch.setattr(bench.Path, "read_text", lambda self, *a, **k: "VmRSS:\t 1 kB\nVmHWM:\t    2048 kB\n")
    assert bench.peak_rss_bytes() == 2048 * 1024


def test_memmap_probe_reports_gigabytes(bench, monkeypatch, tmp_path):
    path = tmp_path / "tokens.npy"
    bench.write_random_token_memmap(path, 10_000, 64, seed=0)
    monkeypatch.setattr(bench, "peak_rss_bytes", lambda: 3_000_000_000)
    r = bench.memmap_training_probe(str(path), 1, 8, 2, 64)
    assert r == {"peak_rss_gb": 3.0, "memmapped": True}


# --- GPT-2: with_mfu, tokens a step, turns in decoding, warm-ups, ratios ------------------------
def test_with_mfu(bench):
    row = bench.with_mfu({"step_s": 2.0}, 100, 1e9, 25.0, 0.1)
    assert row["tokens_per_s"] == 50.0 and row["achieved_gflops"] == pytest.approx(50.0)
    assert row["mfu_vs_measured_ceiling"] == pytest.approx(2.0)
    assert row["mfu_vs_datasheet_peak"] == pytest.approx(0.5)


def test_gpt2_training_counts_block_times_batch_tokens(bench, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench, "pico_gpt2_training", lambda sizes, *a: {"step_s": 1.0, "first_step_s": 1.0,
                                                                       "peak_memory_gb": None, "flops_per_token": 10})
    monkeypatch.setattr(bench, "with_mfu", lambda row, tokens, *a: seen.append(tokens) or {**row, "tokens_per_s": 1.0})
    monkeypatch.setattr(bench, "gpt2_optimizer_steps", lambda *a: {"muon_foreach_vs_loops": 1.0})
    monkeypatch.setattr(bench, "gpt2_decoding", lambda *a: {})
    monkeypatch.setattr(bench, "gpt2_table", lambda report: "")
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a: 1.0)
    assert bench.main(["--gpt2", "--quick", "--quiet", "--device_id", "cpu", "--output", str(tmp_path / "g.json")]) == 0
    sizes = bench.GPT2Sizes.quick()
    assert seen == [sizes.block_size * sizes.batch_size]


def test_gpt2_full_report_is_marked_full_and_kept_from_a_quick_run(bench, monkeypatch, tmp_path):
    quick = bench.GPT2Sizes.quick
    monkeypatch.setattr(bench, "GPT2Sizes", lambda: quick())
    monkeypatch.setattr(bench, "refuse_gpu_size_on_a_cpu", lambda *a: None)
    monkeypatch.setattr(bench, "pico_gpt2_training", lambda sizes, *a: {"step_s": 1.0, "first_step_s": 1.0,
                                                                       "peak_memory_gb": None, "flops_per_token": 10})
    monkeypatch.setattr(bench, "gpt2_optimizer_steps", lambda *a: {"muon_foreach_vs_loops": 1.0})
    monkeypatch.setattr(bench, "gpt2_decoding", lambda *a: {})
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a: 1.0)
    out = tmp_path / "g.json"
    assert bench.main(["--gpt2", "--quiet", "--device_id", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["quick"] is False


def test_pico_vs_nanogpt_is_pico_over_nanogpt(bench, monkeypatch, tmp_path):
    (tmp_path / "nanogpt").mkdir()
    (tmp_path / "nanogpt" / "model.py").write_text("class GPT: pass\nclass GPTConfig: pass\n")
    monkeypatch.setattr(bench, "pico_gpt2_training", lambda *a: {"step_s": 1.0, "first_step_s": 1.0,
                                                                 "peak_memory_gb": None, "flops_per_token": 10})
    monkeypatch.setattr(bench, "nanogpt_training", lambda *a: {"step_s": 4.0, "first_step_s": 1.0,
                                                               "peak_memory_gb": None})
    monkeypatch.setattr(bench, "gpt2_optimizer_steps", lambda *a: {"muon_foreach_vs_loops": 1.0})
    monkeypatch.setattr(bench, "gpt2_decoding", lambda *a: {})
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a: 1.0)
    out = tmp_path / "g.json"
    assert bench.main(["--gpt2", "--quick", "--quiet", "--device_id", "cpu", "--output", str(out),
                       "--nanogpt_dir", str(tmp_path / "nanogpt")]) == 0
    assert json.loads(out.read_text())["training"]["pico_vs_nanogpt_eager"] == pytest.approx(4.0)


def test_gpt2_decoding_counts_batch_tokens_and_times_the_ways_in_turn(bench, monkeypatch):
    sizes = bench.GPT2Sizes.quick()
    log = []
    monkeypatch.setattr(bench, "decode_seconds", lambda model, prompt, n, device:
                        log.append((type(model).__name__, prompt.shape[1])) or 0.5)
    monkeypatch.setattr(bench, "timed_hf_generate", lambda hf, ids, n, device:
                        log.append(("hf", ids.shape[0])) or 0.5)
    r = bench.gpt2_decoding(sizes, CPU)
    for dtype in ("fp32", "bf16"):
        for batch in sizes.decode_batches:
            assert r[f"pico_plain_{dtype}_batch{batch}_tokens_per_s"] == pytest.approx(
                batch * sizes.decode_tokens / 0.5)
    ways = len(log) // (2 * len(sizes.decode_batches) * (1 + sizes.decode_repeats))
    first = log[:ways * (1 + sizes.decode_repeats)]
    assert first[ways:] == first[:ways] * sizes.decode_repeats       # each round: every way once


def test_time_steps_warms_up_then_times_repeats(bench):
    calls = []
    sizes = bench.dataclasses.replace(bench.GPT2Sizes.quick(), warmup=3, repeats=2)
    bench.time_steps(lambda: calls.append(1), sizes, CPU)
    assert len(calls) == 1 + 2 + 2                 # the first step, warmup - 1 more, repeats


def test_optimizer_steps_time_after_warmup_and_ratio_is_loops_over_foreach(bench, monkeypatch):
    sizes = bench.dataclasses.replace(bench.GPT2Sizes.quick(), warmup=3, repeats=2)
    clock = {"now": 0.0}

    def optimizer_class(seconds):
        class Fake:
            calls = 0

            def step(self):
                type(self).calls += 1
                clock["now"] += 100.0 if type(self).calls <= sizes.warmup else seconds
        return Fake
    adamw, loops, foreach = optimizer_class(1.0), optimizer_class(4.0), optimizer_class(2.0)
    monkeypatch.setattr(bench.pico, "build_optimizer", lambda model, training, device: adamw())
    monkeypatch.setattr(bench.pico, "Muon", loops)
    monkeypatch.setattr(bench.pico, "ForeachMuon", foreach)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    r = bench.gpt2_optimizer_steps(sizes, CPU)
    assert (r["adamw_fused_step_s"], r["muon_loops_step_s"], r["muon_foreach_step_s"]) == (1.0, 4.0, 2.0)
    assert r["muon_foreach_vs_loops"] == pytest.approx(2.0)


def test_decode_seconds_makes_exactly_new_tokens(bench):
    class Counting:
        calls = 0

        def forward_incremental(self, tokens, state):
            Counting.calls += 1
            return torch.zeros(tokens.shape[0], tokens.shape[1], 5), None
    bench.decode_seconds(Counting(), torch.zeros(4, 1, dtype=torch.long), 6, CPU)
    assert Counting.calls == 6          # the prompt's step makes the first token
