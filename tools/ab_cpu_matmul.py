#!/usr/bin/env python3
"""The CPU's two float32 matmul kernels timed in turn: --cpu_matmul onednn (speed_up's
FastLinear and the chunked loss's oneDNN products) against --cpu_matmul torch (PyTorch's
default, MKL), on the 2048x2048 product and on whole training steps.

    python tools/ab_cpu_matmul.py                   # every config (a few minutes on 2 cores)
    python tools/ab_cpu_matmul.py --configs lstm,mainjob_transformer --rounds 9
    python tools/ab_cpu_matmul.py --quick           # the same code at tiny sizes (seconds)

The configs are the benchmark's (tools/benchmark.py: GPT-2's vocabulary but for
transformer_vocab4096) and the main job's three models at their default flags over the
character vocabulary (257 tokens). For each, both kernels' models are built side by side
(same seed, same random batch) and stepped in turn, round after round, so that a slow spell
of a shared machine falls on both; prints the median step of each and oneDNN's time over
PyTorch's. docs/performance.md keeps the measured record.
"""

from __future__ import annotations

import statistics
import time

import torch

from pico_module import OneLineErrorParser, positive_int, run_tool, tool_description

import benchmark as bench

pico = bench.pico
CPU = torch.device("cpu")
KERNELS = ("onednn", "torch")


def configs(sizes: bench.BenchmarkSizes, quick: bool) -> dict[str, dict]:
    """The benchmark's configs and the main job's models (its block size 64), by name."""
    chosen = {config["name"]: config for config in bench.benchmark_configs(sizes)}
    block_size = 8 if quick else 64
    for model in ("kgram_mlp_seq", "lstm_seq", "transformer"):
        chosen[f"mainjob_{model}"] = dict(name=f"mainjob_{model}", model=model,
                                          vocab_size=257, block_size=block_size, flags=[])
    return chosen


def matmul_gflops(size: int, rounds: int) -> dict[str, float]:
    """Median GFLOP/s of size x size float32 products by each kernel (the benchmark's probe),
    in turn."""
    probes = {kernel: bench.matmul_probe(CPU, torch.float32, size, kernel) for kernel in KERNELS}
    for probe in probes.values():
        probe()                                                            # warm-up
    rates = {kernel: [] for kernel in KERNELS}
    for _ in range(rounds):
        for kernel, probe in probes.items():
            rates[kernel].append(probe())
    return {kernel: statistics.median(values) for kernel, values in rates.items()}


def step_milliseconds(config: dict, sizes: bench.BenchmarkSizes, rounds: int) -> dict[str, float]:
    """Median ms of a training step (AdamW, the config's flags) with each kernel, in turn."""
    steps = {}
    for kernel in KERNELS:
        speed = pico.SpeedConfig(cpu_matmul=kernel)
        model, run, loss_model = bench.build_benchmark_model(config, sizes, CPU, speed=speed)
        optimizer = pico.build_optimizer(model, run.training, CPU)
        batch = bench.random_batch(config["vocab_size"], run.data.block_size, sizes.batch_size, 0)
        tokens = batch.num_target_tokens

        def step(loss_model=loss_model, optimizer=optimizer, batch=batch, tokens=tokens,
                 clip=run.training.grad_clip) -> None:
            pico.training_step(loss_model, optimizer, [(batch, True)], tokens, clip)

        for _ in range(sizes.warmup):
            step()
        steps[kernel] = step
    times = {kernel: [] for kernel in KERNELS}
    for _ in range(rounds):
        for kernel, step in steps.items():
            started = time.perf_counter()
            step()
            times[kernel].append((time.perf_counter() - started) * 1e3)
    return {kernel: statistics.median(values) for kernel, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/ab_cpu_matmul.py", description=tool_description(__doc__))
    parser.add_argument("--configs", default=None,
                        help="comma-separated config names (default: all; see the docstring)")
    parser.add_argument("--rounds", type=positive_int, default=7,
                        help="timed rounds, each one training step, or one matmul probe (four "
                             "products on a CPU), of each kernel")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the code, not the figures")
    args = parser.parse_args(argv)
    sizes = bench.BenchmarkSizes.quick() if args.quick else bench.BenchmarkSizes()
    available = configs(sizes, args.quick)
    names = list(available) if args.configs is None else [
        name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        what = f"{', '.join(unknown)} is not a config" if unknown else "names no config"
        parser.error(f"argument --configs: {what}; choose from {', '.join(available)}")
    if not pico.onednn_available():
        parser.error("this PyTorch build has no oneDNN linear op: there is nothing to compare")
    print(f"PyTorch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds in turn")
    rates = matmul_gflops(sizes.matmul_size, args.rounds)
    print(f"  {sizes.matmul_size}x{sizes.matmul_size} product: oneDNN {rates['onednn']:.0f} GFLOP/s, "
          f"PyTorch {rates['torch']:.0f}, oneDNN / PyTorch {rates['onednn'] / rates['torch']:.2f}")
    for name in names:
        medians = step_milliseconds(available[name], sizes, args.rounds)
        print(f"  {name}: oneDNN {medians['onednn']:.1f} ms a step, PyTorch {medians['torch']:.1f}, "
              f"oneDNN / PyTorch time {medians['onednn'] / medians['torch']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "ab_cpu_matmul"))
