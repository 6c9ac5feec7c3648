#!/usr/bin/env python3
"""pico-llm's benchmark: how fast training and generation run on this machine, and how close
to its ceiling. A developer's tool; the lesson (pico-llm.py) does not need it.

    python tools/benchmark.py            # a few minutes on a 2-core CPU
    python tools/benchmark.py --quick    # the same code at tiny sizes (seconds; the tests use it)

It measures, in one run so that ratios hold on a noisy machine, the machine's matmul ceiling
and what pico-llm makes of it: training tokens/s and MFU through the real training_step and
speed_up, the vectorized k-gram model against the course starter's per-position loop,
generation with and without KV cache / carried state, tokenization MB/s, and peak memory
while training from a 100M-token memmap. Every figure is the median of several timed repeats
after warm-up. It prints a table and writes a JSON report (atomically). docs/performance.md
keeps the measured record.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pico_module import (TOOLS_DIR, OneLineErrorParser, load_pico, load_script, path_text,
                         refuse_gpu_size_on_a_cpu, run_tool, seed_int, tool_description)

pico = load_pico()

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, by a pattern matching
# whole words of the name torch.cuda.get_device_name gives ("H100 80GB HBM3" is the SXM part;
# the PCIe one and the H200 NVL are slower; "RTX A1000" is no A100). Any other GPU is measured
# against the matmul ceiling alone, and so is every GPU in float32 (a bf16 peak says nothing
# of float32 steps).
GPU_BF16_PEAK_TFLOPS = {r"H100 80GB HBM3": 989.0, r"G?H200(?! NVL)": 989.0, r"A100": 312.0}


@dataclasses.dataclass(frozen=True)
class BenchmarkSizes:
    """How big each measurement is; `quick` keeps the same code paths at tiny sizes."""

    repeats: int = 5
    warmup: int = 3   # untimed calls first: the allocator's heap grows over the first 3 steps
    gpt2_vocab_size: int = 50257      # the configs "with the GPT-2 vocabulary"
    small_vocab_size: int = 4096
    matmul_size: int = 2048
    batch_size: int = 16
    kgram_block_size: int = 32
    transformer_block_size: int = 128
    starter_batch_size: int = 16
    generation_tokens: int = 200
    generation_block_size: int = 256   # >= prompt + 200, so the window never slides
    generation_repeats: int = 3
    bandwidth_mb: float = 1024.0
    tokenize_mb: float = 20.0
    rss_tokens: int = 100_000_000
    rss_steps: int = 3

    @classmethod
    def quick(cls) -> "BenchmarkSizes":
        return cls(repeats=2, warmup=1, gpt2_vocab_size=512, small_vocab_size=128, matmul_size=256,
                   batch_size=2, kgram_block_size=8, transformer_block_size=16,
                   starter_batch_size=2, generation_tokens=8, generation_block_size=32,
                   generation_repeats=2, bandwidth_mb=64.0, tokenize_mb=0.2,
                   rss_tokens=1_000_000, rss_steps=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `function()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def matmul_probe(device: torch.device, dtype: torch.dtype, size: int, kernel: str = "torch"):
    """A function that measures, each time it is called, the GFLOP/s of a few square
    (size x size) matmuls (2 size^3 FLOPs each) by PyTorch's default kernel ("torch") or
    by oneDNN ("onednn", CPU float32). On a GPU, about 2e13 FLOPs a call (18 products at
    8192, tens of milliseconds), so that one launch and one synchronization weigh little."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    product = (lambda: pico.onednn_matmul(a, b)) if kernel == "onednn" else (lambda: a @ b)
    calls = min(max(1, int(2e13 / (2 * size ** 3))), 1000) if device.type == "cuda" else 4
    run = lambda: [product() for _ in range(calls)]
    return lambda: 2 * size ** 3 * calls / median_seconds(run, 1, 0, device) / 1e9


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int,
                  kernel: str = "torch") -> float:
    """Sustained GFLOP/s of square matmuls: the median of `repeats` probes after a warm-up
    (one probe; on a GPU, probes for half a second, so that its clocks rise from idle)."""
    probe = matmul_probe(device, dtype, size, kernel)
    warm_until = time.perf_counter() + (0.5 if device.type == "cuda" else 0.0)
    probe()
    while time.perf_counter() < warm_until:
        probe()
    return float(np.median([probe() for _ in range(repeats)]))


def memory_gb_per_s(device: torch.device, megabytes: float, repeats: int) -> float:
    """Sustained read bandwidth: summing a float32 tensor far larger than the caches."""
    data = torch.ones(int(megabytes * 1e6 / 4), device=device)
    seconds = median_seconds(lambda: data.sum(), repeats, 1, device)
    return data.numel() * 4 / seconds / 1e9


def matmul_ceiling(device: torch.device, sizes: "BenchmarkSizes") -> dict:
    """The machine's float32 ceiling: the best of the kernels PyTorch offers here, each
    reported (MFU against a slower kernel's figure would flatter the training numbers)."""
    kernels = ["torch"] + (["onednn"] if device.type == "cpu" and pico.onednn_available() else [])
    by_kernel = {kernel: matmul_gflops(device, torch.float32, sizes.matmul_size, sizes.repeats, kernel)
                 for kernel in kernels}
    ceiling = {"matmul_gflops": max(by_kernel.values()), "matmul_gflops_by_kernel": by_kernel}
    if pico.has_bf16_units(device):
        ceiling["matmul_gflops_bf16"] = matmul_gflops(device, torch.bfloat16, sizes.matmul_size,
                                                      sizes.repeats)
    return ceiling


def datasheet_peak_tflops(device: torch.device, dtype: str = "bfloat16") -> float | None:
    """The bf16 peak of `device` for bf16 steps; None for float32 ones, a CPU or another GPU."""
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK_TFLOPS.items()
                 if re.search(rf"\b{key}\b", name)), None)


def peak_text(peak: float | None, device: torch.device, dtype: str) -> float | str:
    """The report's datasheet peak: the number, or why there is none."""
    if peak is not None:
        return peak
    return "none for float32" if device.type == "cuda" and dtype != "bfloat16" else "unknown peak"


def random_batch(vocab_size: int, block_size: int, batch_size: int, seed: int) -> pico.Batch:
    """Uniform random tokens: a step costs the same whatever the tokens are."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (block_size + 1, batch_size), generator=generator)
    return pico.Batch(tokens[:-1].contiguous(), tokens[1:].contiguous(),
                 torch.ones(block_size, batch_size, dtype=torch.bool))


def benchmark_model_config(model_name: str, block_size: int, batch_size: int,
                           extra: list[str] = ()):
    """The Config the real command line would give for one benchmark config."""
    return pico.config_from_command_line(["--models", model_name, "--block_size", str(block_size),
                                          "--batch_size", str(batch_size), *extra])


def benchmark_configs(sizes: BenchmarkSizes) -> list[dict]:
    """The standard configs (those docs/performance.md reports): name, model, vocabulary and flags."""
    small = ["--kgram_k", "3", "--embed_size", "64"]
    transformer = ["--transformer_variant", "pico", "--n_blocks", "4", "--n_heads", "4",
                   "--d_model", "256"]
    return [
        dict(name="kgram_mlp", model="kgram_mlp_seq", vocab_size=sizes.gpt2_vocab_size,
             block_size=sizes.kgram_block_size, flags=small + ["--kgram_variant", "embedding"]),
        dict(name="lstm", model="lstm_seq", vocab_size=sizes.gpt2_vocab_size,
             block_size=sizes.kgram_block_size,
             flags=small),
        dict(name="transformer", model="transformer", vocab_size=sizes.gpt2_vocab_size,
             block_size=sizes.transformer_block_size, flags=transformer),
        dict(name="transformer_vocab4096", model="transformer", vocab_size=sizes.small_vocab_size,
             block_size=sizes.transformer_block_size, flags=transformer),
    ]


def build_benchmark_model(config: dict, sizes: BenchmarkSizes, device: torch.device,
                          block_size: int | None = None, speed=None):
    """(model, its Config, the loss module training would call): the model built as the
    command line builds it, with speed_up applied as the training loop applies it."""
    run = benchmark_model_config(config["model"], block_size or config["block_size"],
                                 sizes.batch_size, config["flags"])
    model = pico.build_model(run.models.config_of(config["model"]), config["vocab_size"],
                             run.training.seed).to(device)
    loss_model = pico.speed_up(model, speed or pico.SpeedConfig(), device)
    return model, run, loss_model


def benchmark_training(config: dict, sizes: BenchmarkSizes, device: torch.device, dtype: str,
                       ceiling_probe, speed) -> dict:
    """Tokens/s and MFU of the real training step (training_step, AdamW) on random batches.

    The ceiling is measured again in turn with the steps (ceiling_probe: matmul_probe of
    the run's best kernel), a probe after each step, and MFU is taken against it: a slow
    spell of a shared machine then falls on both sides of the ratio, not on one."""
    model, run, loss_model = build_benchmark_model(config, sizes, device, speed=speed)
    block_size = run.data.block_size
    optimizer = pico.build_optimizer(model, run.training, device)
    batch = random_batch(config["vocab_size"], block_size, sizes.batch_size, run.training.seed).to(device)
    step_tokens = batch.num_target_tokens
    step = lambda: pico.training_step(loss_model, optimizer, [(batch, True)], step_tokens,  # noqa: E731
                                      run.training.grad_clip, dtype=dtype)
    for _ in range(sizes.warmup):
        step()
    step_seconds, ceiling_gflops = [], []
    for _ in range(sizes.repeats):
        step_seconds.append(median_seconds(step, 1, 0, device))
        ceiling_gflops.append(ceiling_probe())
    seconds, ceiling = float(np.median(step_seconds)), float(np.median(ceiling_gflops))
    tokens_per_s = block_size * sizes.batch_size / seconds
    flops_per_token = pico.training_flops_per_token(model, block_size)
    return {"model": config["model"], "vocab_size": config["vocab_size"],
            "block_size": block_size, "batch_size": sizes.batch_size,
            "parameters": pico.count_parameters(model), "training_flops_per_token": flops_per_token,
            "step_s": seconds, "tokens_per_s": tokens_per_s,
            "achieved_gflops": flops_per_token * tokens_per_s / 1e9,
            "ceiling_gflops": ceiling, "mfu": flops_per_token * tokens_per_s / (ceiling * 1e9)}


def starter_kgram_loop_logits(model: pico.KGramMLPSeqModel, tokens: torch.Tensor) -> torch.Tensor:
    """The course starter's k-gram forward, kept as a small reference: for every example
    and every position, build that position's k-token context and run the MLP on it
    alone. Same weights and outputs as model(tokens); tokens (T, B) -> logits (T, B, V).
    For the one-hot variant it builds the (k * vocab)-wide one-hot input and multiplies
    it by the first layer, as the starter did. Only the benchmark uses it, to show what
    vectorizing is worth."""
    T, B = tokens.shape
    padded = torch.cat([model._padding_context(tokens), tokens], dim=0)   # (k-1+T, B)
    columns = []
    for b in range(B):
        rows = []
        for t in range(T):
            context = padded[t: t + model.k, b]                            # (k,)
            if model.variant == "onehot":
                one_hot = F.one_hot(context, model.vocab_size + 1).float().flatten()
                features = one_hot @ model.onehot_weight + model.onehot_bias
            else:
                features = model.context_proj(model.embedding(context).flatten())
            rows.append(model.unembedding(model.mlp(features)))           # (V,)
        columns.append(torch.stack(rows))                                 # (T, V)
    return torch.stack(columns, dim=1)                                    # (T, B, V)


def benchmark_kgram_vs_starter(sizes: BenchmarkSizes, device: torch.device, speed=None) -> dict:
    """Forward + backward tokens/s of the starter's per-position loop against the
    vectorized model, same weights, same batch (the loop with full-logits cross-entropy,
    as the starter). The headline uses the one-hot variant, the starter's own model;
    the embedding variant is measured too. The two ways are timed in turn, rounds of one
    loop step (seconds) and `repeats` vectorized steps (tens of ms), so a slow spell of a
    shared machine falls on both rather than on one."""
    config = benchmark_configs(sizes)[0]
    results = {"measured": "forward + backward", "batch_size": sizes.starter_batch_size}
    for variant in ("onehot", "embedding"):
        flags = config["flags"] + ["--kgram_variant", variant]  # the later flag wins
        model, run, loss_model = build_benchmark_model({**config, "flags": flags}, sizes, device,
                                                       speed=speed)
        block_size = run.data.block_size
        batch = random_batch(config["vocab_size"], block_size, sizes.starter_batch_size,
                             run.training.seed).to(device)
        mask = batch.mask.float()

        def starter_step():
            model.zero_grad(set_to_none=True)
            logits = starter_kgram_loop_logits(model, batch.inputs)
            pico.masked_cross_entropy(logits, batch.targets, batch.mask).backward()

        def vectorized_step():
            model.zero_grad(set_to_none=True)
            loss_model(batch.inputs, batch.targets, mask / mask.sum()).backward()

        starter_step()                                                      # warm-up
        for _ in range(sizes.warmup):
            vectorized_step()
        starter_times, vectorized_times = [], []
        for _ in range(max(2, sizes.repeats // 2)):
            starter_times.append(median_seconds(starter_step, 1, 0, device))
            vectorized_times.append(median_seconds(vectorized_step, sizes.repeats, 0, device))
        tokens = block_size * sizes.starter_batch_size
        starter = tokens / float(np.median(starter_times))
        vectorized = tokens / float(np.median(vectorized_times))
        results.update({"block_size": block_size,
                        f"{variant}_starter_loop_tokens_per_s": starter,
                        f"{variant}_vectorized_tokens_per_s": vectorized,
                        f"{variant}_vs_starter_loop": vectorized / starter})
    results["kgram_vs_starter_loop"] = results["onehot_vs_starter_loop"]
    return results


@torch.no_grad()
def greedy_recompute_last_position(model: nn.Module, prompt_ids: list[int], num_tokens: int,
                                   device: torch.device) -> list[int]:
    """Greedy generation that re-reads the whole context each token, as use_cache=False
    does, but unembeds only the last position: the cheapest way to go without a cache.
    The context must fit the model's block size (no sliding window here)."""
    model.eval()
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        context = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(1)   # (T, 1)
        last_hidden = model.features(context)[-1]                                  # (1, d)
        ids.append(int(model.unembedding(last_hidden).argmax(dim=-1)[0]))
    return ids


def benchmark_generation(sizes: BenchmarkSizes, device: torch.device, speed=None) -> dict:
    """Tokens/s generating `generation_tokens` greedy tokens from a 4-token prompt with
    use_cache True (KV cache / carried LSTM state) and False (re-read the context, the
    starter's way: logits at every position, the last one used). For the Transformer
    also against a recompute that unembeds only the last position: with GPT-2's
    vocabulary most of the starter-style recompute is spent on logits it throws away.
    The ways are timed in turn within each repeat, so a slow spell of a shared machine
    falls on all of them rather than on one."""
    results = {"new_tokens": sizes.generation_tokens, "prompt_tokens": 4,
               "transformer_block_size": sizes.generation_block_size}
    prompt = [i % sizes.gpt2_vocab_size for i in (464, 3797, 3332, 319)]  # "The cat sat on"
    configs = {c["name"]: c for c in benchmark_configs(sizes)}
    for key, config, block in (("transformer", configs["transformer"], sizes.generation_block_size),
                               ("lstm", configs["lstm"], None)):
        model, _, _ = build_benchmark_model(config, sizes, device, block, speed=speed)

        def generate(use_cache: bool, num_tokens: int = sizes.generation_tokens):
            pico.generate_ids(model, prompt, num_tokens, pico.SamplingRule(0.0),
                              use_cache=use_cache, device=device)

        ways = {"cached": lambda: generate(True), "recompute": lambda: generate(False)}
        if key == "transformer":
            ways["recompute_last_position"] = lambda: greedy_recompute_last_position(
                model, prompt, sizes.generation_tokens, device)
            results["transformer_weight_bytes"] = sum(p.numel() * p.element_size()
                                                      for p in model.parameters())
        generate(True, 8), generate(False, 8)  # warm-up
        seconds = {way: [] for way in ways}
        for _ in range(sizes.generation_repeats):
            for way, run in ways.items():
                seconds[way].append(median_seconds(run, 1, 0, device))
        for way, times in seconds.items():
            results[f"{key}_{way}_tokens_per_s"] = sizes.generation_tokens / float(np.median(times))
    results["kv_cache_vs_recompute"] = (results["transformer_cached_tokens_per_s"]
                                        / results["transformer_recompute_tokens_per_s"])
    results["kv_cache_vs_recompute_last_position"] = (
        results["transformer_cached_tokens_per_s"]
        / results["transformer_recompute_last_position_tokens_per_s"])
    results["lstm_state_vs_recompute"] = (results["lstm_cached_tokens_per_s"]
                                          / results["lstm_recompute_tokens_per_s"])
    return results


def synthetic_corpus(num_bytes: float, seed: int = 0) -> list[str]:
    """Short story-like lines (5 to 80 words) of about `num_bytes` UTF-8 bytes in all."""
    words = ("Once upon a time there was a little girl named Lily . She loved to play outside "
             "with her dog , Max ! The sun was warm and the sky was blue ? They found 3 red "
             "apples and 42 shiny stones near the café ; it's a naïve dream , don't you think").split()
    rng = np.random.default_rng(seed)
    texts, total = [], 0
    while total < num_bytes:
        line = " ".join(rng.choice(words, int(rng.integers(5, 81))))
        texts.append(line)
        total += len(line.encode("utf-8"))
    return texts


def benchmark_tokenization(sizes: BenchmarkSizes, device: torch.device) -> dict:
    """MB/s of the data path (tokenize_examples, no cache) on many short examples, and,
    for comparison, of tiktoken's encode_batch called with one document per example."""
    texts = synthetic_corpus(sizes.tokenize_mb * 1e6)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokenizer = pico.GPT2Tokenizer()
    data_path = median_seconds(lambda: pico.tokenize_examples(texts, tokenizer, None),
                               sizes.repeats, 1, device)
    per_example = median_seconds(lambda: tokenizer.encode_batch(texts), sizes.repeats, 1, device)
    return {"megabytes": megabytes, "examples": len(texts),
            "tokenize_mb_per_s": megabytes / data_path,
            "encode_batch_per_example_mb_per_s": megabytes / per_example}


def write_random_token_memmap(path: Path, num_tokens: int, vocab_size: int, seed: int) -> None:
    """A uint16 .npy of random ids, written a slice at a time (never whole in memory)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(num_tokens,))
    rng = np.random.default_rng(seed)
    for start in range(0, num_tokens, 1 << 24):
        stop = min(start + (1 << 24), num_tokens)
        array[start: stop] = rng.integers(0, vocab_size, stop - start, dtype=np.uint16)
    array.flush()
    del array


def memmap_training_probe(token_path: str, steps: int, block_size: int, batch_size: int,
                          vocab_size: int) -> dict:
    """Run in a fresh process: train the standard Transformer a few steps on get_batch
    windows of a memory-mapped token file; returns the process's peak RSS. Memory is
    managed as in a real run (speed_up keeps freed memory, as training does)."""
    device = torch.device("cpu")
    tokens = np.load(token_path, mmap_mode="r")
    config = benchmark_configs(BenchmarkSizes())[2]
    sizes = dataclasses.replace(BenchmarkSizes(), batch_size=batch_size)
    model, run, loss_model = build_benchmark_model({**config, "vocab_size": vocab_size}, sizes,
                                                   device, block_size)
    optimizer = pico.build_optimizer(model, run.training, device)
    rng = np.random.default_rng(run.training.seed)
    for _ in range(steps):
        inputs, targets = pico.get_batch(tokens, batch_size, block_size, device, rng)
        batch = pico.Batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool))
        pico.training_step(loss_model, optimizer, [(batch, True)], batch.num_target_tokens,
                           run.training.grad_clip)
    return {"peak_rss_gb": peak_rss_bytes() / 1e9, "memmapped": isinstance(tokens, np.memmap)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the process's own
    address space; getrusage's ru_maxrss survives fork and exec, so a child started by a
    large parent would report the parent's size (on Linux it is the fallback only)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        import resource
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def benchmark_memmap_rss(sizes: BenchmarkSizes) -> dict:
    """Peak resident memory of training from a token cache of `rss_tokens` tokens,
    measured in a fresh subprocess so this process's memory does not count."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="pico-bench-") as directory:
        token_path = Path(directory) / "tokens.npy"
        write_random_token_memmap(token_path, sizes.rss_tokens, sizes.gpt2_vocab_size, seed=0)
        probe = ("import json, sys\n"
                 f"sys.path.insert(0, {str(TOOLS_DIR)!r})\n"
                 "from pico_module import load_script\n"
                 f"bench = load_script({str(Path(__file__))!r}, 'pico_benchmark')\n"
                 f"print(json.dumps(bench.memmap_training_probe({str(token_path)!r}, {sizes.rss_steps}, "
                 f"{sizes.transformer_block_size}, {sizes.batch_size}, {sizes.gpt2_vocab_size})))\n")
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"memory probe failed: {result.stderr.strip()[-500:]}")
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        file_gb = token_path.stat().st_size / 1e9
    return {"tokens": sizes.rss_tokens, "token_file_gb": file_gb, "steps": sizes.rss_steps,
            "model": "transformer", "memmapped": measured["memmapped"],
            "peak_rss_gb_100m_tokens": measured["peak_rss_gb"]}


def run_benchmark(args: argparse.Namespace) -> int:
    """Measure, print a table, write the JSON report to args.output."""
    device = pico.resolve_device(args.device_id)
    dtype = pico.resolve_dtype(args.dtype, device)
    sizes = BenchmarkSizes.quick() if args.quick else BenchmarkSizes()
    out_path = Path(args.output)
    pico.check_writable_directory(out_path.parent, "--output")
    speed = pico.SpeedConfig(cpu_matmul=args.cpu_matmul, compile=args.compile)
    onednn = device.type == "cpu" and args.cpu_matmul == "onednn" and pico.onednn_available()
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    def note(message: str) -> None:
        if not args.quiet:
            print(f"benchmark: {message} ({time.perf_counter() - started:.0f} s)", flush=True)

    ceiling = matmul_ceiling(device, sizes)
    by_kernel = ceiling["matmul_gflops_by_kernel"]
    ceiling_probe = (matmul_probe(device, torch.bfloat16, sizes.matmul_size)
                     if dtype == "bfloat16" and "matmul_gflops_bf16" in ceiling else
                     matmul_probe(device, torch.float32, sizes.matmul_size,
                                  max(by_kernel, key=by_kernel.get)))
    peak = datasheet_peak_tflops(device, dtype)
    note(f"matmul ceiling {ceiling['matmul_gflops']:.1f} GFLOP/s fp32")
    training = {}
    for config in benchmark_configs(sizes):
        training[config["name"]] = benchmark_training(config, sizes, device, dtype,
                                                      ceiling_probe, speed)
        if peak is not None:
            training[config["name"]]["mfu_vs_datasheet_peak"] = (
                training[config["name"]]["achieved_gflops"] / (peak * 1e3))
        note(f"trained {config['name']}")
    # The same Transformer through PyTorch's default kernels (what --cpu_matmul buys), and on
    # Part I's plain path, cross-entropy on the full logits (what Appendix A's CPU pieces buy;
    # attention stays on PyTorch's fused kernel and the optimizer is PyTorch's AdamW).
    config = next(c for c in benchmark_configs(sizes) if c["name"] == "transformer")
    if onednn:
        training["transformer_torch_matmul"] = benchmark_training(
            config, sizes, device, dtype, ceiling_probe,
            dataclasses.replace(speed, cpu_matmul="torch"))
        note("trained transformer with --cpu_matmul torch")
    training["transformer_plain_path"] = benchmark_training(
        config, sizes, device, dtype, ceiling_probe,
        dataclasses.replace(speed, cpu_matmul="torch", loss="plain"))
    note("trained transformer with --loss plain --cpu_matmul torch")
    starter = benchmark_kgram_vs_starter(sizes, device, speed)
    note("k-gram vs starter loop")
    generation = benchmark_generation(sizes, device, speed)
    # A cached batch-1 step reads every weight once, so weight bytes x tokens/s over the
    # memory's bandwidth says how close generation is to its bound, as MFU does for training.
    generation["memory_gb_per_s"] = memory_gb_per_s(device, sizes.bandwidth_mb, sizes.repeats)
    generation["transformer_cached_bandwidth_utilisation"] = (
        generation["transformer_weight_bytes"] * generation["transformer_cached_tokens_per_s"]
        / (generation["memory_gb_per_s"] * 1e9))
    note("generation")
    tokenization = benchmark_tokenization(sizes, device)
    note("tokenization")
    memory = benchmark_memmap_rss(sizes)
    note("memory")
    report = {
        "kind": "benchmark",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "dtype": dtype,
        "environment": pico.environment_info(device),
        "sizes": dataclasses.asdict(sizes),
        "datasheet_bf16_peak_tflops": peak_text(peak, device, dtype),
        "mfu_reference": f"{dtype} matmul ceiling, measured in turn with each config's steps",
        "matmul_gflops": ceiling["matmul_gflops"],
        "matmul_gflops_by_kernel": ceiling["matmul_gflops_by_kernel"],
        "cpu_matmul": "onednn" if onednn else "torch",
        **({"matmul_gflops_bf16": ceiling["matmul_gflops_bf16"]}
           if "matmul_gflops_bf16" in ceiling else {}),
        "transformer_mfu": training["transformer"]["mfu"],
        "kgram_vs_starter_loop": starter["kgram_vs_starter_loop"],
        "kv_cache_vs_recompute": generation["kv_cache_vs_recompute"],
        "lstm_state_vs_recompute": generation["lstm_state_vs_recompute"],
        "tokenize_mb_per_s": tokenization["tokenize_mb_per_s"],
        "peak_rss_gb_100m_tokens": memory["peak_rss_gb_100m_tokens"],
        "training": training,
        "kgram_starter_loop": starter,
        "generation": generation,
        "tokenization": tokenization,
        "memory": memory,
        "elapsed_s": time.perf_counter() - started,
    }
    return publish(report, benchmark_table(report), out_path)


def publish(report: dict, table: str, out_path: Path) -> int:
    """Write the JSON report atomically and print its table."""
    pico.atomic_write_json(out_path, report)
    print(table)
    print(f"\nbenchmark written to {out_path}")
    return 0


def benchmark_table(report: dict) -> str:
    env = report["environment"]
    peak = report["datasheet_bf16_peak_tflops"]
    lines = [f"device {env['device']} ({env['device_name']}), {env['threads']} threads, "
             f"dtype {report['dtype']}, datasheet peak: "
             + (f"{peak:g} TFLOP/s bf16" if isinstance(peak, float) else peak),
             f"matmul ceiling {report['matmul_gflops']:.1f} GFLOP/s fp32 ("
             + ", ".join(f"{kernel} {gflops:.1f}" for kernel, gflops in report["matmul_gflops_by_kernel"].items())
             + ")" + (f", {report['matmul_gflops_bf16']:.1f} bf16" if "matmul_gflops_bf16" in report else "")
             + f"; CPU linears: {report['cpu_matmul']}",
             "",
             f"{'config':<24} {'params':>11} {'MFLOP/tok':>10} {'tokens/s':>10} {'GFLOP/s':>8} "
             f"{'ceiling':>8} {'MFU':>6}"]
    for name, row in report["training"].items():
        lines.append(f"{name:<24} {row['parameters']:>11,} {row['training_flops_per_token'] / 1e6:>10.1f} "
                     f"{row['tokens_per_s']:>10,.0f} {row['achieved_gflops']:>8.1f} "
                     f"{row['ceiling_gflops']:>8.1f} {row['mfu']:>6.1%}")
    starter, generation = report["kgram_starter_loop"], report["generation"]
    tokens, memory = report["tokenization"], report["memory"]
    lines += ["",
              f"k-gram vectorized vs the starter's loop (fwd+bwd), one-hot: "
              f"{report['kgram_vs_starter_loop']:.0f}x ({starter['onehot_vectorized_tokens_per_s']:,.0f} vs "
              f"{starter['onehot_starter_loop_tokens_per_s']:,.0f} tokens/s); embedding: "
              f"{starter['embedding_vs_starter_loop']:.0f}x ({starter['embedding_vectorized_tokens_per_s']:,.0f} vs "
              f"{starter['embedding_starter_loop_tokens_per_s']:,.0f} tokens/s)",
              f"Transformer KV cache vs recompute, {generation['new_tokens']} tokens: "
              f"{report['kv_cache_vs_recompute']:.1f}x ({generation['transformer_cached_tokens_per_s']:,.0f} vs "
              f"{generation['transformer_recompute_tokens_per_s']:,.0f} tokens/s)",
              f"Transformer cached step: {generation['transformer_weight_bytes'] / 1e6:.0f} MB of weights "
              f"per token at {generation['memory_gb_per_s']:.1f} GB/s measured read bandwidth: "
              f"{generation['transformer_cached_bandwidth_utilisation']:.0%} of the memory bound",
              f"Transformer KV cache vs recompute unembedding only the last position: "
              f"{generation['kv_cache_vs_recompute_last_position']:.1f}x "
              f"({generation['transformer_recompute_last_position_tokens_per_s']:,.0f} tokens/s)",
              f"LSTM carried state vs recompute, {generation['new_tokens']} tokens: "
              f"{report['lstm_state_vs_recompute']:.1f}x ({generation['lstm_cached_tokens_per_s']:,.0f} vs "
              f"{generation['lstm_recompute_tokens_per_s']:,.0f} tokens/s)",
              f"tokenization (tokenize_examples, {tokens['megabytes']:.1f} MB in {tokens['examples']:,} "
              f"examples): {report['tokenize_mb_per_s']:.1f} MB/s "
              f"(encode_batch per example: {tokens['encode_batch_per_example_mb_per_s']:.1f} MB/s)",
              f"peak RSS training from a {memory['tokens']:,}-token memmap ({memory['token_file_gb']:.2f} GB): "
              f"{report['peak_rss_gb_100m_tokens']:.2f} GB",
              f"elapsed {report['elapsed_s']:.0f} s"]
    return "\n".join(lines)


# --- GPT-2 small on a GPU: pico-llm against nanoGPT and transformers, in one run -------------

@dataclasses.dataclass(frozen=True)
class GPT2Sizes:
    """GPT-2 small's shape (12 blocks of 12 heads, 768 wide, 1024-token context, GPT-2's
    vocabulary) at nanoGPT's batch of 16; `quick` keeps every code path at a tiny size."""

    n_blocks: int = 12
    n_heads: int = 12
    d_model: int = 768
    block_size: int = 1024
    batch_size: int = 16
    vocab_size: int = 50257
    matmul_size: int = 8192
    warmup: int = 3
    repeats: int = 10
    decode_prompt: int = 4
    decode_tokens: int = 256
    decode_batches: tuple[int, ...] = (1, 16)
    decode_repeats: int = 3        # timed runs of each way, interleaved, after one warm-up run

    @classmethod
    def quick(cls) -> "GPT2Sizes":
        return cls(n_blocks=2, n_heads=2, d_model=32, block_size=32, batch_size=2, vocab_size=256,
                   matmul_size=256, warmup=1, repeats=2, decode_tokens=8, decode_batches=(1, 2),
                   decode_repeats=2)


def gpt2_flags(sizes: GPT2Sizes) -> list[str]:
    """pico-llm's GPT2-small preset at these sizes, without dropout (as nanoGPT's benchmark)."""
    return ["--transformer_variant", "GPT2-small", "--n_blocks", str(sizes.n_blocks),
            "--n_heads", str(sizes.n_heads), "--d_model", str(sizes.d_model),
            "--d_ff", str(4 * sizes.d_model), "--dropout", "0"]


def time_steps(step, sizes: GPT2Sizes, device: torch.device, profile: Path | None = None) -> dict:
    """Median seconds of `step()`, the seconds of its first call (with compile: compilation
    included) and the peak GPU memory it took (None on a CPU); with `profile`, then a
    profile of 3 more steps written there (profile_table)."""
    if device.type == "cuda":
        gc.collect()                                # what the last configuration left in cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    step()                                          # compiled: the compilation is in this one
    synchronize(device)
    first_step_s = time.perf_counter() - started
    seconds = median_seconds(step, sizes.repeats, max(sizes.warmup - 1, 0), device)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    if profile is not None:
        profile_table(step, device, profile)
    return {"step_s": seconds, "first_step_s": first_step_s, "peak_memory_gb": peak}


PROFILE_HEADER = "tools/benchmark.py --gpt2 profile: "   # a profile's first line begins so


def profile_table(step, device: torch.device, path: Path, steps: int = 3) -> None:
    """torch.profiler over `steps` calls of an already warm `step`: the operators and kernels
    by their own device time (CPU time on a CPU), and the kernel launches per step, as text
    (written atomically)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    events = profiler.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(event.count for event in events
                  if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA)
    text = (f"{PROFILE_HEADER}{steps} steps; device kernels per step: {kernels / steps:.0f}\n"
            + events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
    path.parent.mkdir(parents=True, exist_ok=True)
    pico.atomic_write_bytes(path, text.encode())


def check_replaceable_profile(path: Path) -> None:
    """A profile goes to a new file or over an earlier profile of this tool's (its first line
    begins PROFILE_HEADER), never over anything else."""
    if path.exists() and not (path.is_file()      # reading a FIFO's start would block
                              and pico.file_start(path).startswith(PROFILE_HEADER.encode())):
        raise pico.UserError(f"--profile {path} already exists and is no profile of this tool's, "
                             "which is all it writes over; choose another --profile")


def with_mfu(row: dict, tokens: int, flops_per_token: int, ceiling_gflops: float,
             peak_tflops: float | None) -> dict:
    """Adds tokens/s and MFU against the measured ceiling and, where known, the datasheet peak."""
    tokens_per_s = tokens / row["step_s"]
    achieved = flops_per_token * tokens_per_s / 1e9
    return {**row, "tokens_per_s": tokens_per_s, "achieved_gflops": achieved,
            "mfu_vs_measured_ceiling": achieved / ceiling_gflops,
            "mfu_vs_datasheet_peak": None if peak_tflops is None else achieved / (peak_tflops * 1e3)}


def pico_gpt2_training(sizes: GPT2Sizes, device: torch.device, dtype: str, compile: bool,
                       profile: Path | None = None) -> dict:
    """pico-llm's real training_step on its GPT2-small preset, speed_up as the training loop
    applies it (compile: model, output layer and loss compiled together on a GPU)."""
    config = {"name": "gpt2", "model": "transformer", "vocab_size": sizes.vocab_size,
              "block_size": sizes.block_size, "flags": gpt2_flags(sizes)}
    bench_sizes = dataclasses.replace(BenchmarkSizes(), batch_size=sizes.batch_size)
    model, run, loss_model = build_benchmark_model(config, bench_sizes, device,
                                                   speed=pico.SpeedConfig(compile=compile))
    optimizer = pico.build_optimizer(model, run.training, device)
    batch = random_batch(sizes.vocab_size, sizes.block_size, sizes.batch_size, 0).to(device)
    step_tokens = batch.num_target_tokens   # counted once: the training loop reads no GPU for it
    step = lambda: pico.training_step(loss_model, optimizer, [(batch, True)],  # noqa: E731
                                      step_tokens, run.training.grad_clip, dtype=dtype)
    return {**time_steps(step, sizes, device, profile),
            "flops_per_token": pico.training_flops_per_token(model, sizes.block_size)}


def gpt2_optimizer_steps(sizes: GPT2Sizes, device: torch.device) -> dict:
    """Seconds of an optimizer step alone over GPT-2 small's parameters (random gradients):
    PyTorch's fused AdamW (--optimizer torch), section 5's Muon (its loops: a launch per tensor
    and operation) and Appendix A's ForeachMuon (what --optimizer muon takes on a GPU), timed
    in turns, the median of sizes.repeats rounds after sizes.warmup."""
    run = benchmark_model_config("transformer", sizes.block_size, sizes.batch_size, gpt2_flags(sizes))
    steps = {}
    for name, kind, optimizer_class in (("adamw_fused", "torch", None), ("muon_loops", "muon", pico.Muon),
                                        ("muon_foreach", "muon", pico.ForeachMuon)):
        model = pico.build_model(run.models.transformer, sizes.vocab_size, 0).to(device)
        optimizer = pico.build_optimizer(model, dataclasses.replace(run.training, optimizer=kind), device)
        if optimizer_class is not None:
            optimizer.__class__ = optimizer_class       # the same groups, this class's step
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(device)
        steps[name] = optimizer.step
    seconds = {name: [] for name in steps}
    for round_index in range(sizes.warmup + sizes.repeats):
        for name, step in steps.items():
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            if round_index >= sizes.warmup:
                seconds[name].append(time.perf_counter() - started)
    result = {f"{name}_step_s": float(np.median(times)) for name, times in seconds.items()}
    result["muon_foreach_vs_loops"] = result["muon_loops_step_s"] / result["muon_foreach_step_s"]
    return result


def load_nanogpt(directory: Path):
    """nanoGPT's model.py (its GPT and GPTConfig), loaded from a checkout given on the command
    line; never copied into this repository."""
    path = Path(directory) / "model.py"
    if not path.is_file():
        raise pico.UserError(f"--nanogpt_dir {directory}: no model.py there (a nanoGPT checkout)")
    try:
        module = load_script(path, "nanogpt_model")
    except Exception as error:           # whatever a broken or foreign model.py raises
        raise pico.UserError(f"--nanogpt_dir {directory}: its model.py cannot be loaded "
                             f"({type(error).__name__}: {error}); give a nanoGPT checkout") from None
    if not all(hasattr(module, name) for name in ("GPT", "GPTConfig")):
        raise pico.UserError(f"--nanogpt_dir {directory}: its model.py has no GPT and GPTConfig; "
                             "give a nanoGPT checkout")
    return module


def nanogpt_training(nanogpt, sizes: GPT2Sizes, device: torch.device, dtype: str, compile: bool,
                     profile: Path | None = None) -> dict:
    """nanoGPT's train.py step at the same shape: its fused AdamW (configure_optimizers), bf16
    autocast, gradient clipping at 1, and its loss read once a step (as pico-llm's step does)."""
    config = nanogpt.GPTConfig(block_size=sizes.block_size, vocab_size=sizes.vocab_size,
                               n_layer=sizes.n_blocks, n_head=sizes.n_heads, n_embd=sizes.d_model,
                               dropout=0.0, bias=True)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):       # its parameter-count prints
        model = nanogpt.GPT(config).to(device)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    forward = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, sizes.vocab_size, (sizes.batch_size, sizes.block_size + 1),
                           generator=generator).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        with pico.autocast_context(device, dtype):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return time_steps(step, sizes, device, profile)


@torch.no_grad()
def decode_seconds(step_model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Seconds for greedy decoding of `new_tokens` after `prompt` (T, B) through a model's
    forward_incremental (the KV cache), the next tokens fed back on the device."""
    synchronize(device)
    started = time.perf_counter()
    logits, state = step_model.forward_incremental(prompt, None)
    for _ in range(new_tokens - 1):
        logits, state = step_model.forward_incremental(logits[-1].argmax(dim=-1)[None], state)
    logits[-1].argmax(dim=-1).tolist()
    synchronize(device)
    return time.perf_counter() - started


def gpt2_decoding(sizes: GPT2Sizes, device: torch.device, measured=lambda results: None,
                  note=lambda message: None) -> dict:
    """Greedy decode tokens/s at each batch size, fp32 and bf16: pico-llm's plain KV-cache path
    (Part I), its static decoder (Appendix A; CUDA graphs on a GPU) and transformers'
    GPT2LMHeadModel.generate, all with the same shape, prompt length and new tokens; on a GPU
    in bf16 also the static decoder compiled (torch.compile's kernels inside the graph).
    `measured(results so far)` is called after each batch size."""
    run = benchmark_model_config("transformer", sizes.decode_prompt + sizes.decode_tokens, 1,
                                 gpt2_flags(sizes))
    model = pico.build_model(run.models.transformer, sizes.vocab_size, 0).to(device).eval()
    try:
        import transformers
    except ImportError:
        transformers = None
    results = {"prompt_tokens": sizes.decode_prompt, "new_tokens": sizes.decode_tokens}
    graphs = device.type == "cuda"
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        plain = copy.deepcopy(model).to(dtype)          # learned positions: no float buffers to keep
        hf = None
        if transformers is not None:
            hf_config = transformers.GPT2Config(
                n_layer=sizes.n_blocks, n_head=sizes.n_heads, n_embd=sizes.d_model,
                n_positions=sizes.decode_prompt + sizes.decode_tokens, vocab_size=sizes.vocab_size,
                bos_token_id=0, eos_token_id=0)            # min_new_tokens keeps it from stopping
            hf = transformers.GPT2LMHeadModel(hf_config).to(device, dtype).eval()
        for batch in sizes.decode_batches:
            prompt = torch.randint(0, sizes.vocab_size, (sizes.decode_prompt, batch),
                                   generator=torch.Generator().manual_seed(batch)).to(device)
            decoder = pico.StaticDecoder(model, batch=batch, dtype=dtype, graphs=graphs)
            ways = {"pico_plain": lambda: decode_seconds(plain, prompt, sizes.decode_tokens, device),
                    "pico_static": lambda: decode_seconds(decoder, prompt, sizes.decode_tokens, device)}
            if graphs and dtype == torch.bfloat16:     # torch.compile's fused kernels in the graph
                compiled = pico.StaticDecoder(model, batch=batch, dtype=dtype, graphs=True, compile=True)
                ways["pico_static_compiled"] = lambda: decode_seconds(compiled, prompt,
                                                                      sizes.decode_tokens, device)
            if hf is not None:
                ways["transformers"] = lambda: timed_hf_generate(hf, prompt.t().contiguous(),
                                                                 sizes.decode_tokens, device)
            seconds = {way: [] for way in ways}
            for name, way in ways.items():
                way()                                                   # warm-up (graph recorded)
                note(f"decoding {dtype_name} batch {batch}: {name} warmed up")
            for _ in range(sizes.decode_repeats):
                for way, run_way in ways.items():
                    seconds[way].append(run_way())
            for way, times in seconds.items():
                results[f"{way}_{dtype_name}_batch{batch}_tokens_per_s"] = (
                    batch * sizes.decode_tokens / float(np.median(times)))
            measured(results)
    if transformers is None:
        results["transformers"] = "not installed"
    return results


@torch.no_grad()
def timed_hf_generate(hf_model, input_ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Seconds for transformers' greedy generate of exactly `new_tokens` tokens; input_ids (B, T)."""
    synchronize(device)
    started = time.perf_counter()
    hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    synchronize(device)
    return time.perf_counter() - started


def run_gpt2_benchmark(args: argparse.Namespace) -> int:
    """GPT-2 small: training tokens/s, MFU (against the datasheet peak and a bf16 matmul
    ceiling measured here) and peak memory, eager and compiled, for pico-llm and, given
    --nanogpt_dir, nanoGPT; an optimizer step alone (AdamW, Muon's two forms); greedy
    decoding against transformers. Writes a JSON report."""
    device = pico.resolve_device(args.device_id)
    if not args.quick:
        refuse_gpu_size_on_a_cpu(pico, device, "--quick", "--gpt2")
    dtype = pico.resolve_dtype(args.dtype, device)
    sizes = GPT2Sizes.quick() if args.quick else GPT2Sizes()
    out_path = Path(args.output)
    pico.check_writable_directory(out_path.parent, "--output")
    # Compiling costs minutes on a CPU: there only with --compile.
    modes = {"eager": False, **({"compiled": True} if device.type == "cuda" or args.compile else {})}
    profile = (lambda who, mode: Path(args.profile) / f"profile_{who}_{mode}.txt") if args.profile \
        else (lambda who, mode: None)
    if args.profile is not None:   # else every measurement records the failed write as its result
        pico.check_writable_directory(Path(args.profile), "--profile")
        for who in ["pico"] + (["nanogpt"] if args.nanogpt_dir else []):
            for mode in modes:
                check_replaceable_profile(profile(who, mode))
    nanogpt = load_nanogpt(Path(args.nanogpt_dir)) if args.nanogpt_dir else None
    started = time.perf_counter()
    note = (lambda message: None) if args.quiet else (
        lambda message: print(f"benchmark: {message} ({time.perf_counter() - started:.0f} s)", flush=True))
    matmul_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    ceiling = matmul_gflops(device, matmul_dtype, sizes.matmul_size, sizes.repeats)
    peak = datasheet_peak_tflops(device, dtype)
    note(f"{dtype} matmul ceiling {ceiling:.0f} GFLOP/s")
    tokens = sizes.block_size * sizes.batch_size
    training, decoding = {}, {}
    report = {"kind": "gpt2_benchmark",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "dtype": dtype, "environment": pico.environment_info(device),
              "sizes": dataclasses.asdict(sizes),
              "datasheet_bf16_peak_tflops": peak_text(peak, device, dtype),
              "matmul_ceiling_gflops": ceiling, "matmul_ceiling_dtype": dtype,
              "training": training, "decoding": decoding}

    def save() -> None:      # after each measurement: a run cut short keeps what it measured
        pico.atomic_write_json(out_path, {**report, "elapsed_s": time.perf_counter() - started})
    for mode, compile in modes.items():
        try:
            pico_row = pico_gpt2_training(sizes, device, dtype, compile, profile("pico", mode))
        except Exception as error:   # noqa: BLE001  a failed configuration is a result too
            training[f"pico_{mode}"] = {"error": f"{type(error).__name__}: {error}"[:500]}
            note(f"pico-llm {mode} training failed: {error}")
            continue
        flops_per_token = pico_row.pop("flops_per_token")
        training[f"pico_{mode}"] = with_mfu(pico_row, tokens, flops_per_token, ceiling, peak)
        note(f"pico-llm {mode} training")
        save()
        if nanogpt is not None:
            training[f"nanogpt_{mode}"] = with_mfu(
                nanogpt_training(nanogpt, sizes, device, dtype, compile, profile("nanogpt", mode)),
                tokens, flops_per_token, ceiling, peak)
            training[f"pico_vs_nanogpt_{mode}"] = (training[f"pico_{mode}"]["tokens_per_s"]
                                                   / training[f"nanogpt_{mode}"]["tokens_per_s"])
            note(f"nanoGPT {mode} training")
            save()
    report["optimizer"] = gpt2_optimizer_steps(sizes, device)
    note("optimizer steps")
    save()

    def measured(results: dict) -> None:
        decoding.update(results)
        note("decoding, one batch size")
        save()

    decoding.update(gpt2_decoding(sizes, device, measured, note))
    report["elapsed_s"] = time.perf_counter() - started
    return publish(report, gpt2_table(report), out_path)


def gpt2_table(report: dict) -> str:
    peak = report["datasheet_bf16_peak_tflops"]
    lines = [f"GPT-2 small shape {report['sizes']['n_blocks']}x{report['sizes']['d_model']}, context "
             f"{report['sizes']['block_size']}, batch {report['sizes']['batch_size']}, {report['dtype']}, "
             f"on {report['environment']['device_name']}; matmul ceiling "
             f"{report['matmul_ceiling_gflops']:,.0f} GFLOP/s; datasheet peak "
             + (f"{peak:g} TFLOP/s" if isinstance(peak, float) else peak),
             f"{'training':<18} {'tokens/s':>10} {'MFU/ceiling':>12} {'MFU/peak':>9} {'peak GB':>8} "
             f"{'1st step s':>10}"]
    for name, row in report["training"].items():
        if isinstance(row, dict) and "error" in row:
            lines.append(f"{name:<18} failed: {row['error']}")
        elif isinstance(row, dict):
            vs_peak = row["mfu_vs_datasheet_peak"]
            memory = row["peak_memory_gb"]
            lines.append(f"{name:<18} {row['tokens_per_s']:>10,.0f} {row['mfu_vs_measured_ceiling']:>12.1%} "
                         + (f"{vs_peak:>9.1%}" if vs_peak is not None else f"{'-':>9}")
                         + (f" {memory:>8.1f}" if memory is not None else f" {'-':>8}")
                         + f" {row['first_step_s']:>10.1f}")
    if "optimizer" in report:
        steps = report["optimizer"]
        lines.append("optimizer step alone, ms: " + ", ".join(
            f"{key.removesuffix('_step_s')} {value * 1e3:.1f}" for key, value in steps.items()
            if key.endswith("_step_s")) + f" (Muon foreach {steps['muon_foreach_vs_loops']:.2f}x the loops)")
    lines.append("decoding, tokens/s: " + ", ".join(
        f"{key.removesuffix('_tokens_per_s')} {value:,.0f}"
        for key, value in report["decoding"].items() if key.endswith("_tokens_per_s")))
    return "\n".join(lines)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="tools/benchmark.py", description=tool_description(__doc__))
    parser.add_argument("--quick", action="store_true",
                        help="the same code paths at tiny sizes (seconds; the tests use it)")
    parser.add_argument("--output", type=path_text, default=argparse.SUPPRESS,
                        help="where the JSON report goes (default: artefacts/runs/benchmark.json, "
                             "with --quick benchmark_quick.json)")
    parser.add_argument("--device_id", default="auto",
                        help="auto (CUDA, else MPS, else cpu), cpu, mps or cuda:N, as pico-llm's flag "
                             "(default: auto)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="training precision (default: bfloat16 on a GPU with bf16 units, "
                             "float32 elsewhere)")
    parser.add_argument("--cpu_matmul", choices=pico.CPU_MATMUL_KERNELS, default="onednn",
                        help="kernel for float32 linears on the CPU, as pico-llm's flag (default: "
                             "onednn)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--gpt2", action="store_true",
                        help="instead: GPT-2 small at context 1024 (training eager and compiled, "
                             "an optimizer step alone, decoding against transformers' generate); "
                             "for GPUs")
    parser.add_argument("--nanogpt_dir", type=path_text, default=None,
                        help="with --gpt2: a nanoGPT checkout whose model.py is timed beside pico-llm")
    parser.add_argument("--profile", type=path_text, default=None, metavar="DIR",
                        help="with --gpt2: also write a torch.profiler table of each training step "
                             "there (profile_<who>_<mode>.txt)")
    parser.add_argument("--seed", type=seed_int, default=1337, help="(default: 1337)")
    parser.add_argument("--quiet", action="store_true", help="no progress notes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    # a --quick run (seconds) never replaces a full one (minutes), so its report has a name
    # of its own by default
    args.output = getattr(args, "output", None) or str(pico.DEFAULT_ARTEFACTS_DIR / (
        "benchmark_quick.json" if args.quick else "benchmark.json"))
    try:
        # Checked before minutes of measuring; the default --output is the previous report.
        pico.check_replaceable_report(Path(args.output), ("benchmark", "gpt2_benchmark"), "--output",
                                      ("quick", args.quick))
        for flag in ("nanogpt_dir", "profile"):
            if getattr(args, flag) is not None and not args.gpt2:
                raise pico.UserError(f"--{flag} is read by the --gpt2 benchmark only; add --gpt2")
        return run_gpt2_benchmark(args) if args.gpt2 else run_benchmark(args)
    except pico.UserError as error:
        print(f"benchmark: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_tool(main, "benchmark"))
