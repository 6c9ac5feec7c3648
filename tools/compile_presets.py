#!/usr/bin/env python3
"""--compile against eager for every preset and attention kind: how long compilation takes
(the first step's extra seconds), the steady training speed each way, and the recompilations
and graph breaks TORCH_LOGS reports, through pico-llm's own command line. For a GPU, where --compile is meant to pay:

    python tools/compile_presets.py --device_id cuda:0 --output OUT.json     # a few minutes
    python tools/compile_presets.py --tiny --device_id cpu --output OUT.json  # how it is tested

Each run is a fresh process under its own time limit (--timeout), so that one slow compilation
costs only its own row. From each run log's per-step history: the first step's seconds, and
tokens/s over the steps after the first `--steps // 4` (the steady state), in total and for the
median step. Writes a JSON report
(atomically) and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pico_module import (OneLineErrorParser, PICO_PATH, load_pico, path_text, pico_flags_checked,
                         positive_float, positive_int, run_tool, tool_description)

# Every preset, and the attention kinds on the default preset; the ones least like the
# GPT-2 step that tools/benchmark.py measures first, so that a run cut short has them.
CONFIGS = {
    "GPT-oss": ["--transformer_variant", "GPT-oss"],
    "Llama3-lite": ["--transformer_variant", "Llama3-lite"],
    "pico linear": ["--transformer_variant", "pico", "--attention", "linear"],
    "pico gated_linear": ["--transformer_variant", "pico", "--attention", "gated_linear"],
    "speedrun": ["--transformer_variant", "speedrun"],
    "pico": ["--transformer_variant", "pico"],
    "minGPT": ["--transformer_variant", "minGPT"],
    "GPT2-small": ["--transformer_variant", "GPT2-small"],
}
TINY = ["--d_model", "32", "--n_heads", "2", "--n_kv_heads", "1", "--n_blocks", "1", "--d_ff", "32",
        "--block_size", "16"]
TINY_BATCH_SIZE = 2   # --tiny's batch, where --batch_size is not given


def run_label(name: str, compile: bool) -> str:
    return f"{name.replace(' ', '_')}_{'compiled' if compile else 'eager'}"


def pico_flags(name: str, compile: bool, args, work: Path) -> list[str]:
    """pico-llm's command line for one training run of config `name`."""
    return ["--models", "transformer", *CONFIGS[name],
            "--input_files", str(Path(PICO_PATH).parent / "3seqs.txt"), "--tokenizer", "char",
            "--epochs", "1", "--max_steps_per_epoch", str(args.steps), "--max_new_tokens", "4",
            f"--device_id={args.device_id}", "--quiet", "--run_name", run_label(name, compile),
            "--artefacts_dir", str(work), "--cache_dir", str(work / "cache"),
            "--batch_size", str(args.batch_size), *(TINY if args.tiny else []),
            *(["--compile"] if compile else [])]


def run(name: str, compile: bool, args, work: Path) -> dict:
    """One training run of `args.steps` steps; its timings, or why there are none."""
    label = run_label(name, compile)
    command = [sys.executable, str(PICO_PATH), *pico_flags(name, compile, args, work)]
    started = time.perf_counter()
    env = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"}   # counted below
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished in {args.timeout} s"}
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        return {"error": f"exit {result.returncode}: {lines[-1][:300]}"}
    history = json.loads((work / f"{label}.json").read_text())["models"]["transformer"]["history"]
    warm = max(1, args.steps // 4)
    steady = history[warm:]
    tokens = steady[-1]["tokens_seen"] - history[warm - 1]["tokens_seen"]
    seconds = steady[-1]["elapsed_s"] - history[warm - 1]["elapsed_s"]
    # The median step as well: a short run's total is moved by one slow step (a log line's
    # sync, another process), its median step not.
    step_seconds = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(history[warm - 1:], steady)]
    step_tokens = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip(history[warm - 1:], steady)]
    median_tokens_per_s = statistics.median(t / max(s, 1e-9) for t, s in zip(step_tokens, step_seconds))
    return {"first_step_s": history[0]["elapsed_s"], "steady_tokens_per_s": tokens / max(seconds, 1e-9),
            "median_step_tokens_per_s": median_tokens_per_s,
            "steps": len(history), "process_s": time.perf_counter() - started,
            "recompilations": result.stderr.count("Recompiling function"),
            "graph_breaks": result.stderr.count("Graph break in user code")}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/compile_presets.py", description=tool_description(__doc__))
    parser.add_argument("--device_id", default="auto")
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help=f"(default: 16, with --tiny {TINY_BATCH_SIZE})")
    parser.add_argument("--timeout", type=positive_float, default=150.0, help="seconds for each run")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated names among: " + ", ".join(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="tiny widths (seconds; the tests)")
    parser.add_argument("--output", type=path_text, required=True, help="where the JSON report goes")
    args = parser.parse_args(argv)
    if args.batch_size is None:   # the one the runs train at, which the report records
        args.batch_size = TINY_BATCH_SIZE if args.tiny else 16
    names = args.configs.split(",")
    if not all(name.strip() for name in names):
        parser.error(f"--configs {args.configs!r} has an empty name; give names among: "
                     + ", ".join(CONFIGS))
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}")
    for name in names:   # the report keeps one row a config: a second would replace the first
        if names.count(name) > 1:
            parser.error(f"--configs names {name} twice; name each once")
    pico = load_pico()
    try:
        if args.steps < 2:   # the first step is timed apart (compilation), the rest together
            raise pico.UserError(f"--steps must be at least 2, got {args.steps}")
        if args.timeout > 1e6:   # subprocess's wait overflows near 1e10 seconds
            raise pico.UserError(f"--timeout is at most 1000000 seconds (11 days), got {args.timeout:g}")
        device = pico.resolve_device(args.device_id)   # a bad one would fail every run, after minutes
        # each config's runs checked as pico-llm checks them, before any run starts
        configs = [pico_flags_checked(pico, lambda: pico.config_from_command_line(
                       pico_flags(name, True, args, Path("unused"))), f"--configs {name}")
                   for name in names]
        for config in configs:
            pico.check_models_fit_in_memory(config.models, pico.ByteTokenizer().vocab_size,
                                            config.data.block_size, device)
        text = dataclasses.replace(configs[0].data, cache_dir=None)   # every config's, uncached
        data = pico.load_training_data(text, pico.build_tokenizer(text.tokenizer),
                                       pico.read_sources(text))
        steps = data.steps_per_epoch(args.batch_size, None)
        if steps < args.steps:     # a run stops at the end of the text: too few steps to time
            raise pico.UserError(f"3seqs.txt makes {steps} step(s) of --batch_size "
                                 f"{args.batch_size}, fewer than --steps {args.steps}; lower either")
        pico.check_writable_directory(Path(args.output).parent, "--output")
        pico.check_replaceable_report(Path(args.output), ("compile_presets",), "--output",
                                      ("tiny", args.tiny))
    except pico.UserError as error:
        print(f"compile_presets: error: {error}", file=sys.stderr)
        return 2
    report = {"kind": "compile_presets", "device_id": args.device_id, "steps": args.steps,
              "batch_size": args.batch_size, "tiny": args.tiny, "rows": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            row = {mode: run(name, mode == "compiled", args, Path(work))
                   for mode in ("eager", "compiled")}
            eager, compiled = row["eager"], row["compiled"]
            if "error" not in eager and "error" not in compiled:
                row["compile_s"] = compiled["first_step_s"] - eager["first_step_s"]
                row["compiled_vs_eager"] = (compiled["steady_tokens_per_s"]
                                            / eager["steady_tokens_per_s"])
                row["compiled_vs_eager_median_step"] = (compiled["median_step_tokens_per_s"]
                                                        / eager["median_step_tokens_per_s"])
            report["rows"][name] = row
            pico.atomic_write_json(Path(args.output), report)     # a cut-short run keeps its rows
            print(f"{name:<18} " + (
                f"compile {row['compile_s']:6.1f} s, eager {eager['steady_tokens_per_s']:>10,.0f} "
                f"tokens/s, compiled {compiled['steady_tokens_per_s']:>10,.0f} ({row['compiled_vs_eager']:.2f}x; "
                f"median step {row['compiled_vs_eager_median_step']:.2f}x), "
                f"{compiled['recompilations']} recompilations, {compiled['graph_breaks']} graph breaks"
                if "compile_s" in row else
                f"eager: {eager.get('error', 'ok')}; compiled: {compiled.get('error', 'ok')}"), flush=True)
    if not any("compile_s" in row for row in report["rows"].values()):
        print(f"compile_presets: error: no config ran both ways; the errors are in {args.output}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "compile_presets"))
