#!/usr/bin/env python3
"""RoPE's two formulations timed in turn: rotate_pairs_complex (one complex product, what
speed_up gives eager code) against RotaryEmbedding.rotate (section 1.2's real formula, what
compiled code and the plain path run).

    python tools/ab_rope.py                    # forward + backward, eager, one thread
    python tools/ab_rope.py --step --vocab 256  # whole training steps of the benchmark's
                                                # standard Transformer, each rotation in turn

Samples of each alternate, so that a slow spell of a shared machine falls on both; prints the
median milliseconds per call and the ratio. docs/performance.md keeps the measured record.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from pico_module import OneLineErrorParser, load_pico, positive_int, run_tool, tool_description

pico = load_pico()


MAX_VOCAB = 262_144
WAYS = {"complex": pico.rotate_pairs_complex, "real": pico.RotaryEmbedding.rotate}


def milliseconds_per_call(rotate, x, cos, sin, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        rotate(x, cos, sin).sum().backward()
    return (time.perf_counter() - started) / calls * 1e3


def step_milliseconds(vocab: int, samples: int, threads: int) -> dict[str, float]:
    """Median ms of a training step of the benchmark's standard Transformer (4 blocks, d_model
    256, context 128, batch 16) after speed_up, every attention layer's rotation set to each
    formulation in turn before its step."""
    flags = ["--models", "transformer", "--transformer_variant", "pico", "--n_blocks", "4",
             "--n_heads", "4", "--d_model", "256", "--block_size", "128", "--batch_size", "16",
             "--device_id", "cpu"]
    config = pico.config_from_command_line(flags)
    cpu = torch.device("cpu")
    model = pico.build_model(config.models.config_of("transformer"), vocab, config.training.seed)
    loss_model = pico.speed_up(model, config.speed, cpu)
    optimizer = pico.build_optimizer(model, config.training, cpu)
    tokens = torch.randint(0, vocab, (129, 16), generator=torch.Generator().manual_seed(0))
    batch = pico.Batch(tokens[:-1].contiguous(), tokens[1:].contiguous(),
                       torch.ones(128, 16, dtype=torch.bool))
    attention = [m for m in model.modules() if isinstance(m, pico.CausalSelfAttention)]

    def step(rotate) -> float:
        for module in attention:
            module.rotate = rotate
        started = time.perf_counter()
        pico.training_step(loss_model, optimizer, [(batch, True)], batch.num_target_tokens, 1.0)
        return (time.perf_counter() - started) * 1e3

    times = {name: [] for name in WAYS}
    for rotate in WAYS.values():
        step(rotate)                                                        # warm-up
    for _ in range(samples):
        for name, rotate in WAYS.items():
            times[name].append(step(rotate))
    print(f"Training steps, the standard Transformer with a vocabulary of {vocab}, {threads} "
          f"thread(s), {samples} of each in turn")
    return {name: statistics.median(samples) for name, samples in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/ab_rope.py", description=tool_description(__doc__))
    parser.add_argument("--shape", type=positive_int, nargs=4, default=(16, 4, 64, 32),
                        metavar=("B", "H", "T", "D"), help="queries' shape (pico's, context 64)")
    parser.add_argument("--samples", type=positive_int, default=7)
    parser.add_argument("--calls", type=positive_int, default=20, help="calls timed per sample")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--step", action="store_true",
                        help="time whole training steps instead (--samples of each; --shape unused)")
    parser.add_argument("--vocab", type=positive_int, default=256,
                        help="with --step: the vocabulary (50257 for GPT-2's)")
    args = parser.parse_args(argv)
    B, H, T, D = args.shape
    if D % 2:
        parser.error(f"argument --shape: D, a head's width, must be even (RoPE turns pairs), got {D}")
    if args.vocab > MAX_VOCAB:
        parser.error(f"argument --vocab: at most {MAX_VOCAB:,} (the largest vocabularies in use; "
                     f"each token costs the model about 8 KB with AdamW), got {args.vocab:,}")
    if args.threads > (os.cpu_count() or 1):   # thousands of OpenMP threads fail to start
        parser.error(f"argument --threads: {args.threads} is more than the {os.cpu_count()} CPUs here")
    torch.set_num_threads(args.threads)
    if args.step:
        medians = step_milliseconds(args.vocab, args.samples, args.threads)
        for name, median in medians.items():
            print(f"  {name}: {median:.0f} ms a step")
        print(f"  real / complex: {medians['real'] / medians['complex']:.3f}")
        return 0
    generator = torch.Generator().manual_seed(0)
    # float32 queries past the memory here (or past int64 sizes, which torch cannot even take)
    fits = 4 * B * H * T * D <= (pico.memory_available(torch.device("cpu")) or 2**62)
    try:
        if not fits:
            raise MemoryError
        x = torch.randn(B, H, T, D, generator=generator).requires_grad_()
    except (RuntimeError, MemoryError):     # more memory than there is
        parser.error(f"argument --shape: queries of {B * H * T * D:,} numbers do not fit in memory "
                     "here; give a smaller shape")
    cos, sin = pico.RotaryEmbedding(D).angles(torch.arange(T))
    ways = WAYS
    difference = (ways["complex"](x, cos, sin) - ways["real"](x, cos, sin)).abs().max().item()
    times = {name: [] for name in ways}
    for rotate in ways.values():
        milliseconds_per_call(rotate, x, cos, sin, args.calls)              # warm-up
    for _ in range(args.samples):
        for name, rotate in ways.items():
            times[name].append(milliseconds_per_call(rotate, x, cos, sin, args.calls))
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    print(f"RoPE forward + backward, q {tuple(args.shape)}, {args.threads} thread(s), "
          f"{args.samples} samples of {args.calls} calls in turn; largest difference {difference:.1e}")
    for name, median in medians.items():
        print(f"  {name}: {median:.3f} ms a call")
    print(f"  real / complex: {medians['real'] / medians['complex']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "ab_rope"))
