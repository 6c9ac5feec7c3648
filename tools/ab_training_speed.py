#!/usr/bin/env python3
"""Training speed of two versions of pico-llm.py, measured in one process, in turn.

    python tools/ab_training_speed.py OLD_REV            # e.g. a commit before a change
    python tools/ab_training_speed.py OLD_REV --rounds 8 --model transformer
    python tools/ab_training_speed.py OLD_REV --flags "--attention linear --compile"

Loads pico-llm.py as it was at OLD_REV (through `git show`) and as it is in the working
tree, builds the benchmark's standard model with each (same flags, same seed, same random
batch; --flags adds command-line flags to both) and times one training step of each
alternately, round after round, so that a slow spell of a shared machine falls on both.
Prints each version's first step (with --compile, mostly compilation: the second version
compiled may reuse some of the first's kernels), median step time, tokens/s and MFU against a
float32 matmul ceiling probed between the rounds, and the ratio new/old.
Versions before the lesson-first layout take the argparse namespace; both APIs are handled.
A version older still, without a function this times it with, is refused, naming the function.
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pico_module import (OneLineErrorParser, check_flags_left_alone, load_pico, load_script,
                         pico_flags_checked, positive_int, run_tool, tool_description)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # the benchmark's standard configs (tools/benchmark.py)
    "transformer": ["--models", "transformer", "--transformer_variant", "pico", "--n_blocks", "4",
                    "--n_heads", "4", "--d_model", "256", "--block_size", "128"],
    "kgram_mlp_seq": ["--models", "kgram_mlp_seq", "--kgram_k", "3", "--embed_size", "64",
                      "--kgram_variant", "embedding", "--block_size", "32"],
    "lstm_seq": ["--models", "lstm_seq", "--embed_size", "64", "--block_size", "32"],
}


def step_function(pico, model_name: str, vocab_size: int, batch_size: int, extra: list[str]):
    """A closure running one real training step of `model_name` with this version's API."""
    flags = CONFIGS[model_name] + ["--batch_size", str(batch_size), "--device_id", "cpu", *extra]
    device = torch.device("cpu")
    if hasattr(pico, "config_from_command_line"):            # lesson-first layout
        config = pico.config_from_command_line(flags)
        model = pico.build_model(config.models.config_of(model_name), vocab_size, config.training.seed)
        loss_model = pico.speed_up(model, config.speed, device)
        optimizer = pico.build_optimizer(model, config.training, device)
        block_size, grad_clip = config.data.block_size, config.training.grad_clip
    else:                                                    # argparse namespace throughout
        args = pico.parse_args(flags)
        pico.keep_freed_memory()
        pico.set_cpu_matmul(args.cpu_matmul)
        model = pico.build_model(model_name, args, vocab_size)
        loss_model = pico.NextTokenLoss(model)
        optimizer = pico.build_optimizer(model, args, device)
        block_size, grad_clip = args.block_size, args.grad_clip
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (block_size + 1, batch_size), generator=generator)
    batch = pico.Batch(tokens[:-1].contiguous(), tokens[1:].contiguous(),
                       torch.ones(block_size, batch_size, dtype=torch.bool))
    flops = pico.training_flops_per_token(model, block_size)

    def step() -> float:
        started = time.perf_counter()
        pico.training_step(loss_model, optimizer, [(batch, True)], batch.num_target_tokens, grad_clip)
        return time.perf_counter() - started

    return step, block_size * batch_size, flops


def matmul_gflops(size: int = 2048) -> float:
    """fp32 ceiling probe: the best of torch's and (if present) oneDNN's 2048^2 product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    for product in (lambda: a @ b, lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")):
        try:
            product()
            started = time.perf_counter()
            product()
            best = max(best, 2 * size ** 3 / (time.perf_counter() - started) / 1e9)
        except (AttributeError, RuntimeError):
            pass
    return best


def main() -> int:
    parser = OneLineErrorParser(prog="tools/ab_training_speed.py",
                                description=tool_description(__doc__))
    parser.add_argument("old_rev", help="git revision of the old pico-llm.py")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="transformer")
    parser.add_argument("--rounds", type=positive_int, default=6)
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--vocab_size", type=positive_int, default=50257)
    parser.add_argument("--flags", default="", help="more pico-llm flags for both versions, "
                        "e.g. \"--attention linear --compile\"")
    args = parser.parse_args()
    if not args.old_rev.strip():   # git show :pico-llm.py would read the staged file instead
        parser.error("the git revision is empty; give a commit, branch or tag, e.g. HEAD")
    if args.old_rev.startswith("-"):   # git show would take it as an option (--output=FILE writes)
        parser.error(f"the git revision {args.old_rev!r} begins with '-'; give a commit, branch "
                     "or tag, e.g. HEAD")
    try:
        extra = shlex.split(args.flags)
    except ValueError as error:
        parser.error(f"--flags {args.flags!r}: {error}")
    pico = load_pico()
    try:   # the new version's check of the flags both get, before the old one is loaded
        pico_flags_checked(pico, lambda: pico.config_from_command_line(
            CONFIGS[args.model] + ["--device_id", "cpu", *extra]), "--flags")
        check_flags_left_alone(pico, extra, ["models", "device_id"], "--flags",
                               "it times --model on the CPU")
    except pico.UserError as error:
        print(f"ab_training_speed: error: {error}", file=sys.stderr)
        return 2
    shown = subprocess.run(["git", "show", f"{args.old_rev}:pico-llm.py"], cwd=REPO,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        reason = (shown.stderr.strip() or "git failed").splitlines()[0].removeprefix("fatal: ")
        parser.error(f"no pico-llm.py at the git revision {args.old_rev!r} ({reason.rstrip('.')}); "
                     "give a commit, branch or tag of this repository that has it")
    old_source = shown.stdout
    with tempfile.TemporaryDirectory() as directory:
        old_path = Path(directory) / "pico_llm_old.py"
        old_path.write_text(old_source)
        versions = {"old": load_script(old_path, "pico_llm_old"), "new": pico}
        first = {}
        try:
            steps = {name: step_function(version, args.model, args.vocab_size, args.batch_size,
                                         extra) for name, version in versions.items()}
            for name, (step, _, _) in steps.items():
                first[name] = step()
                for _ in range(2):                           # warm-up: the heap grows over 3 steps
                    step()
        except (RuntimeError, MemoryError) as error:
            past_any_memory = "Storage size calculation overflowed" in str(error)   # 2**63 bytes
            if not (pico.out_of_memory(error) or past_any_memory):
                raise
            parser.error(f"a training step of {args.model} at --batch_size {args.batch_size} and "
                         f"--vocab_size {args.vocab_size} does not fit in memory here")
        except AttributeError as error:    # a function the old version does not have yet
            if error.obj is not versions["old"]:
                raise
            parser.error(f"pico-llm.py at {args.old_rev} predates what this tool times: it has "
                         f"no {error.name}; give a later revision")
        times, ceilings = {name: [] for name in steps}, []
        for _ in range(args.rounds):
            for name, (step, _, _) in steps.items():
                times[name].append(step())
            ceilings.append(matmul_gflops())
    ceiling = statistics.median(ceilings)
    print(f"{args.model} {args.flags}, batch {args.batch_size}, vocab {args.vocab_size}, {args.rounds} "
          f"rounds in turn, {torch.get_num_threads()} threads; fp32 matmul ceiling {ceiling:.0f} GFLOP/s (median)")
    rates = {}
    for name, (step, tokens, flops) in steps.items():
        seconds = statistics.median(times[name])
        rates[name] = tokens / seconds
        print(f"  {name} ({args.old_rev if name == 'old' else 'working tree'}): first step "
              f"{first[name]:.1f} s, step ({tokens} tokens) {seconds * 1e3:.0f} ms, "
              f"{rates[name]:,.0f} tokens/s, MFU {flops * rates[name] / (ceiling * 1e9):.1%}")
    print(f"  new / old tokens/s: {rates['new'] / rates['old']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "ab_training_speed"))
