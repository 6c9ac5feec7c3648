#!/usr/bin/env python3
"""RoPE's two formulations timed in turn: RotaryEmbedding.rotate (one complex product, what
eager code runs) against rotate_pairs_real (the real formula, what compiled code runs).

    python tools/ab_rope.py                    # forward + backward, eager, one thread

Samples of each alternate, so that a slow spell of a shared machine falls on both; prints the
median milliseconds per call and the ratio. docs/performance.md keeps the measured record.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from pico_module import OneLineErrorParser, load_pico, positive_int

pico = load_pico()


def milliseconds_per_call(rotate, x, cos, sin, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        rotate(x, cos, sin).sum().backward()
    return (time.perf_counter() - started) / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/ab_rope.py", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=positive_int, nargs=4, default=(16, 4, 64, 32),
                        metavar=("B", "H", "T", "D"), help="queries' shape (pico's, context 64)")
    parser.add_argument("--samples", type=positive_int, default=7)
    parser.add_argument("--calls", type=positive_int, default=20, help="calls timed per sample")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    B, H, T, D = args.shape
    if D % 2:
        parser.error(f"argument --shape: D, a head's width, must be even (RoPE turns pairs), got {D}")
    if args.threads > (os.cpu_count() or 1):   # thousands of OpenMP threads fail to start
        parser.error(f"argument --threads: {args.threads} is more than the {os.cpu_count()} CPUs here")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    try:
        x = torch.randn(B, H, T, D, generator=generator).requires_grad_()
    except RuntimeError:     # more memory than there is
        parser.error(f"argument --shape: queries of {B * H * T * D:,} numbers do not fit in memory "
                     "here; give a smaller shape")
    cos, sin = pico.RotaryEmbedding(D).angles(torch.arange(T))
    ways = {"complex": pico.RotaryEmbedding.rotate, "real": pico.rotate_pairs_real}
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
    raise SystemExit(main())
