#!/usr/bin/env python3
"""The recipe sweep's question at GPT-2 small's shape, for a GPU: does the modern recipe reach
the nanoGPT recipe's held-out loss sooner? Three recipes, each trained for the same seconds
of training on running text (stream mode, character tokens, context 1024, batch 16, 12 blocks
of 12 heads, 768 wide, bf16 on a GPU, eager):

    nanoGPT recipe       the GPT2-small preset (GELU, LayerNorm, learned positions, tied
                         output) without dropout, PyTorch's AdamW
    + Muon               the same, Muon for the hidden matrices
    speedrun + Muon      the speedrun preset's blocks (SwiGLU, RMSNorm, RoPE, QK-norm) at the
                         same shape, with Muon

The text is docstrings: `--write_corpus DIR` writes, as a new directory, the standard library's
and those of the installed torch, transformers, numpy, scipy, pandas and sympy (tens of MB
where all are installed; a run of a minute per recipe reads less than one pass), then

    python tools/recipe_gpt2.py --input_dir DIR --device_id cuda:0 --seconds 60 --output OUT.json
    python tools/recipe_gpt2.py --tiny --device_id cpu --input_dir DIR --output OUT.json   # tests

As `--sweep recipe` does, each recipe's seconds per step is measured first (a short run, its
first 4 steps left out), then it trains for as many steps as --seconds allows, scoring the
held-out text (2% of the files) RECIPE_EVALUATIONS times. Writes a JSON report (atomically):
per recipe its curve of held-out bits per byte against training seconds, and the seconds it
needed to reach the nanoGPT recipe's final loss (null if it did not); and first, what Muon's
Newton-Schulz iterations cost a step over GPT-2 small's hidden matrices in float32 and in
bfloat16, one matrix at a time and stacked by shape (what a GPU uses: bfloat16, stacked).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from benchmark import synchronize
from pico_module import (OneLineErrorParser, load_pico, path_text, positive_float, seconds_type,
                         refuse_gpu_size_on_a_cpu, run_tool, tool_description)
from stream_vs_lines import is_new_or_empty_directory, write_python_docs

PACKAGES = ("torch", "transformers", "numpy", "scipy", "pandas", "sympy")
GPT2_SMALL = {"d_model": 768, "n_heads": 12, "n_blocks": 12}
RECIPES = {
    "nanoGPT recipe": {"transformer_variant": "GPT2-small", "dropout": 0.0},
    "+ Muon": {"transformer_variant": "GPT2-small", "dropout": 0.0, "optimizer": "muon"},
    "speedrun + Muon": {"transformer_variant": "speedrun", **GPT2_SMALL, "optimizer": "muon"},
}
TINY = {"d_model": 32, "n_heads": 2, "n_blocks": 2}
CALIBRATION_STEPS = 10


def seconds_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds at which the held-out curve first comes down to `target`, read
    linearly between the two evaluations around the crossing; None if it never does."""
    previous = None
    for point in curve:
        if point["test_bits_per_byte"] <= target:
            if previous is None:
                return point["train_time_s"]
            share = ((previous["test_bits_per_byte"] - target)
                     / (previous["test_bits_per_byte"] - point["test_bits_per_byte"]))
            return previous["train_time_s"] + share * (point["train_time_s"] - previous["train_time_s"])
        previous = point
    return None


def orthogonalization_seconds(pico, model, device, rounds: int = 5) -> dict:
    """Seconds per optimizer step that Muon's Newton-Schulz iterations take over the model's
    hidden matrices: in float32 and in bfloat16, one matrix at a time and the matrices of one
    shape stacked (as ForeachMuon does on a GPU); the four timed in turns, the median of `rounds`."""
    matrices = [torch.randn_like(p) for p in pico.muon_matrices(model)]
    by_shape = {}
    for matrix in matrices:
        by_shape.setdefault(matrix.shape, []).append(matrix)
    ways = {"one at a time": lambda: [[m] for m in matrices], "stacked": lambda: by_shape.values()}
    seconds = {f"{dtype}, {way}": [] for dtype in ("float32", "bfloat16") for way in ways}
    for _ in range(rounds):
        for name in seconds:
            dtype, way = name.split(", ")
            synchronize(device)
            started = time.perf_counter()
            for group in ways[way]():
                pico.newton_schulz_orthogonalize(torch.stack(group), 5, getattr(torch, dtype))
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/recipe_gpt2.py", description=tool_description(__doc__))
    parser.add_argument("--write_corpus", metavar="DIR", type=path_text,
                        help="write the docstring corpus as DIR (a new directory) and stop")
    parser.add_argument("--input_dir", help="running text (a directory of .txt files)")
    parser.add_argument("--device_id", default="auto")
    parser.add_argument("--seconds", type=seconds_type, default=60.0, help="training seconds per recipe")
    parser.add_argument("--learning_rate", type=positive_float, default=6e-4,
                        help="peak rate for every recipe (GPT-2 small's, as nanoGPT trains it)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and context (the tests)")
    parser.add_argument("--output", type=path_text, help="where the JSON report goes")
    args = parser.parse_args(argv)
    if args.write_corpus:
        if not is_new_or_empty_directory(Path(args.write_corpus)):
            parser.error(f"--write_corpus {args.write_corpus} already exists and is not an empty "
                         "directory; give a new directory")
        try:
            written = write_python_docs(Path(args.write_corpus), PACKAGES)
        except OSError as error:
            print(f"recipe_gpt2: error: --write_corpus {args.write_corpus}: {error.strerror or error}; "
                  "give a new directory where it can write", file=sys.stderr)
            return 2
        print(f"{written / 1e6:.1f} MB of docstrings in {args.write_corpus}")
        return 0
    if not (args.input_dir and args.output):
        parser.error("give --input_dir and --output (or --write_corpus DIR)")
    pico = load_pico()
    shape = ["--block_size", "32", "--batch_size", "4"] if args.tiny else ["--block_size", "1024",
                                                                          "--batch_size", "16"]
    try:
        pico.check_writable_directory(Path(args.output).parent, "--output")
        pico.check_replaceable_report(Path(args.output), ("recipe_gpt2",), "--output",
                                      ("tiny", args.tiny))
        config = pico.config_from_command_line([
            f"--input_dir={args.input_dir}", f"--device_id={args.device_id}", "--tokenizer", "char",
            "--data_format", "stream", "--test_fraction", "0.02", "--models", "transformer",
            "--learning_rate", str(args.learning_rate), "--warmup_steps", "50", "--beta2", "0.95",
            "--max_new_tokens", "16", "--quiet", *shape])
        device = pico.resolve_device(config.device_id)
        if not args.tiny:
            refuse_gpu_size_on_a_cpu(pico, device, "--tiny", "recipe_gpt2.py")
        tokenizer = pico.build_tokenizer(config.data.tokenizer)
        data = pico.sweep_data(config, tokenizer, held_out=False)   # said below, as --input_dir
        if not data.has_test_set:      # each recipe is scored on held-out text
            raise pico.UserError(f"--input_dir {args.input_dir} is too little text to hold any "
                                 "out for testing; add text")
        points = {label: pico.with_flags(config, **{**overrides, **(TINY if args.tiny else {})})
                  for label, overrides in RECIPES.items()}
    except pico.UserError as error:
        print(f"recipe_gpt2: error: {error}", file=sys.stderr)
        return 2
    report = {"kind": "recipe_gpt2", "device": str(device), "seconds": args.seconds,
              "learning_rate": args.learning_rate, "tiny": args.tiny,
              "train_tokens": int(data.num_train_examples) * config.data.block_size,
              "recipes": {}}
    hidden = pico.build_model(points["+ Muon"].models.transformer, tokenizer.vocab_size, 0).to(device)
    report["orthogonalization_s"] = orthogonalization_seconds(pico, hidden, device)
    del hidden
    print("Muon's orthogonalization per step: " + ", ".join(
        f"{name} {seconds * 1e3:.1f} ms" for name, seconds in report["orthogonalization_s"].items()),
        flush=True)
    for label, point in points.items():
        try:
            _, record = pico.train_sweep_model(label, "transformer", pico.with_step_budget(
                point, data, CALIBRATION_STEPS + 3), device, tokenizer, data)
            times = [pico.train_time_s(h) for h in record["history"]]
            seconds_per_step = statistics.fmean(after - before for before, after in zip(times[3:], times[4:]))
            steps = max(1, round(args.seconds / seconds_per_step))
            try:
                budget = pico.with_step_budget(point, data, steps, pico.RECIPE_EVALUATIONS)
            except pico.UserError as error:     # more passes over a short text than pico-llm runs
                print(f"recipe_gpt2: error: --input_dir {args.input_dir} is too little text for "
                      f"--seconds {args.seconds:g} of {label} ({steps} steps: {error}); add text or "
                      "lower --seconds", file=sys.stderr)
                return 2
            _, record = pico.train_sweep_model(label, "transformer", budget, device, tokenizer, data)
        except pico.TrainingDiverged as error:   # pico-llm's advice names flags this tool lacks
            print(f"recipe_gpt2: error: {label} diverged at step {error.step} (its loss or gradient "
                  f"was not finite, or exploded); lower --learning_rate ({args.learning_rate:g})",
                  file=sys.stderr)
            return 2
        times = {h["step"]: pico.train_time_s(h) for h in record["history"]}
        curve = [{"step": test["step"], "train_time_s": round(times[test["step"]], 3),
                  "test_bits_per_byte": test["test_bits_per_byte"]} for test in record["test_history"]]
        report["recipes"][label] = {"parameters": record["parameters"],
                                    "calibrated_seconds_per_step": seconds_per_step,
                                    "tokens_per_s": record["final"]["tokens_per_s"], "curve": curve}
        print(f"{label}: {curve[-1]['step']} steps in {curve[-1]['train_time_s']:.1f} s, "
              f"{record['final']['tokens_per_s']:,.0f} tokens/s, held-out bits per byte "
              + ", ".join(f"{p['test_bits_per_byte']:.3f}" for p in curve), flush=True)
        pico.atomic_write_json(Path(args.output), report)   # a cut-short run keeps its recipes
    recipes = report["recipes"]
    target = recipes["nanoGPT recipe"]["curve"][-1]["test_bits_per_byte"]
    baseline_s = recipes["nanoGPT recipe"]["curve"][-1]["train_time_s"]
    for label, recipe in recipes.items():
        recipe["seconds_to_baseline_final"] = seconds_to_reach(recipe["curve"], target)
        reached = recipe["seconds_to_baseline_final"]
        print(f"{label}: final {recipe['curve'][-1]['test_bits_per_byte']:.3f} bits per byte; "
              + (f"the nanoGPT recipe's final {target:.3f} after {reached:.1f} s "
                 f"({reached / baseline_s:.0%} of its time)" if reached is not None
                 else f"did not reach the nanoGPT recipe's final {target:.3f}"))
    pico.atomic_write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "recipe_gpt2"))
