#!/usr/bin/env python3
"""pico-llm against nanoGPT on a laptop CPU: training speed and held-out loss at equal steps.

    python tools/vs_nanogpt.py --nanogpt DIR                 # a few minutes on a 2-core CPU
    python tools/vs_nanogpt.py --nanogpt DIR --steps 8000 --rounds 1
    python tools/vs_nanogpt.py --steps 20 --rounds 1         # pico-llm's side only
    python tools/vs_nanogpt.py --rounds 1 --seed 7 --pico_flags "--bias true"   # pico-llm variants

DIR is a checkout of nanoGPT (github.com/karpathy/nanoGPT): its train.py and model.py are
run from there, never copied into this repository. Without --nanogpt only pico-llm's side
runs.

Both train the shape of nanoGPT's README for a CPU ("I only have a macbook": its
train_shakespeare_char config with 4 blocks of 4 heads, 128 wide, context 64, batch 12,
dropout 0, no biases, the exact GELU (nn.GELU(), with erf), learning rate 1e-3 with 100
warm-up steps and a cosine to 1e-4, weight decay 0.1, clipping at 1.0, Adam's beta2 0.99) on
the same running text: the standard library's docstrings and pydoc's topics
(tools/stream_vs_lines.py writes them; generated offline), every tenth file held out from
both. pico-llm runs its command line (`pico-llm.py`, the whole training loop, the minGPT
preset at that shape made nanoGPT's model with --bias false and --ffn gelu_exact,
--data_format stream, with its --random_offsets so that an epoch's windows are not the last
epoch's again) and nanoGPT its train.py, each as a fresh process, one after the other,
--rounds times (the order swapped each round), so that a slow spell of a shared machine falls
on both.

Measured in the run and printed: each side's training-loop tokens/s (from the loop's own
per-step times, the first --warmup steps not counted; pico-llm's run log, nanoGPT's
"iter" lines), the whole process's tokens/s, and, after the same number of steps, the loss
in nats per character of each model on the held-out text, in consecutive 64-character
windows, computed here from each one's final checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pico_module import (OneLineErrorParser, PICO_PATH, check_flags_left_alone, load_pico,
                         non_negative_int, path_text, pico_flags_checked, positive_int, run_tool,
                         seed_int, too_many_passes, tool_description)
from stream_vs_lines import python_docs_unless_text_in

# nanoGPT's README, "I only have a macbook", with its train_shakespeare_char config.
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
NANOGPT_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
                 "--dropout=0.0", "--always_save_checkpoint=True"] + [
                    f"--{name}={value}" for name, value in SHAPE.items()]
PICO_FLAGS = ["--models", "transformer", "--transformer_variant", "minGPT",
              "--n_blocks", str(SHAPE["n_layer"]), "--n_heads", str(SHAPE["n_head"]),
              "--d_model", str(SHAPE["n_embd"]), "--d_ff", str(4 * SHAPE["n_embd"]),
              "--block_size", str(SHAPE["block_size"]), "--batch_size", str(SHAPE["batch_size"]),
              "--dropout", "0", "--bias", "false", "--ffn", "gelu_exact", "--tie_weights", "true",
              # pico-llm's default --min_lr_ratio, 0.1, is train.py's min_lr = learning_rate / 10;
              # left to the default, --pico_flags "--lr_schedule constant" can turn it off
              "--learning_rate", "1e-3", "--warmup_steps", "100", "--weight_decay", "0.1",
              "--beta2", "0.99", "--grad_clip", "1.0", "--data_format", "stream",
              "--random_offsets", "--test_fraction", "0", "--tokenizer", "char",
              "--device_id", "cpu", "--max_new_tokens", "20"]


def running_text(pico, corpus_dir: Path) -> tuple[str, str]:
    """(training text, held-out text): every tenth file held out, each file read as pico-llm's
    stream mode reads a document (read_document), so that both train on the same characters."""
    python_docs_unless_text_in(pico, corpus_dir)
    documents = []
    for path in sorted(corpus_dir.glob("*.txt")):
        # no text (or, as pico-llm skips them, no regular file: a folder, a pipe, a broken
        # link), but it keeps its place
        empty = not path.is_file() or not path.read_bytes().strip()
        documents.append("" if empty else pico.read_document(path))
    train = [d for index, d in enumerate(documents) if d and index % 10 != 5]
    held_out = [d for index, d in enumerate(documents) if d and index % 10 == 5]
    return "\n".join(train), "\n".join(held_out)


def token_ids(pico, text: str) -> np.ndarray:
    """pico-llm's char ids of `text` as it streams a one-document file: UTF-8 bytes, then
    <|endoftext|> (256)."""
    return pico.tokenize_examples([text], pico.ByteTokenizer(), None).tokens.astype(np.int64)


def total_steps(num_train_tokens: int, steps: int) -> tuple[int, int, int]:
    """(epochs, steps per epoch, total) for pico-llm near `steps`: an epoch is one pass over
    the training windows, and --max_steps_per_epoch cuts each epoch to the same length."""
    windows = math.ceil((num_train_tokens - 1) / SHAPE["block_size"])
    per_pass = math.ceil(windows / SHAPE["batch_size"])
    epochs = math.ceil(steps / per_pass)
    per_epoch = math.ceil(steps / epochs)
    return epochs, per_epoch, epochs * per_epoch


def loop_tokens_per_s(step_seconds: list[float], warmup: int) -> float:
    """Tokens per second over the steps after the first `warmup` ones."""
    timed = step_seconds[warmup:]
    return SHAPE["block_size"] * SHAPE["batch_size"] * len(timed) / sum(timed)


def run_or_stop(command: list[str], **options) -> subprocess.CompletedProcess:
    """subprocess.run; a program that fails ends the comparison with one line and status 1
    (its own last line of stderr where that was captured, else above), not a traceback."""
    result = subprocess.run(command, **options)
    if result.returncode != 0:
        said = (result.stderr or "").strip().splitlines()[-1:] if options.get("capture_output") else []
        sys.exit(f"vs_nanogpt: error: {Path(command[1]).name} stopped with status "
                 f"{result.returncode}" + (f": {said[0]}" if said else " (its message is above)"))
    return result


# What run_pico sets after --pico_flags, what the held-out nats per character need (character
# tokens of --corpus_dir's text), and the flags that would make pico-llm do other than train:
# refused in --pico_flags
OWNED_FLAGS = ["models", "input_files", "input_dir", "epochs", "max_steps_per_epoch", "seed",
               "cache_dir", "artefacts_dir", "run_name", "save_dir", "resume", "accounting",
               "sweep", "generate", "checkpoint", "export_hf", "init_from", "tokenizer",
               "tinystories_weight", "tinystories_path"]


def run_pico(work: Path, name: str, epochs: int, per_epoch: int, warmup: int, seed: int = 1337,
             extra: list[str] = ()) -> dict:
    """pico-llm's command line; per-step times from its run log, weights from its checkpoint."""
    flags = PICO_FLAGS + [*extra, "--input_files", str(work / "train.txt"), "--epochs", str(epochs),
                          "--max_steps_per_epoch", str(per_epoch), "--seed", str(seed),
                          "--cache_dir", str(work / "cache"), "--artefacts_dir", str(work),
                          "--run_name", name, "--save_dir", str(work / name)]
    started = time.perf_counter()
    run_or_stop([sys.executable, str(PICO_PATH), *flags], stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    history = json.loads((work / f"{name}.json").read_text())["models"]["transformer"]["history"]
    elapsed = [0.0] + [entry["elapsed_s"] for entry in history]
    steps = len(history)
    return dict(step_seconds=[b - a for a, b in zip(elapsed, elapsed[1:])], wall_s=wall,
                steps=steps, train_losses=[entry["train_loss"] for entry in history],
                checkpoint=work / name / "transformer" / f"step_{steps:06d}.pt")


def run_nanogpt(nanogpt: Path, work: Path, name: str, steps: int) -> dict:
    """nanoGPT's train.py as its README runs it on a CPU, in a directory of its own where
    data/pico/ holds the same token ids (train.py reads data/ and configurator.py from
    the working directory)."""
    run_dir = work / name
    run_dir.mkdir()
    (run_dir / "data").symlink_to(work / "nanogpt_data")
    (run_dir / "configurator.py").symlink_to(nanogpt / "configurator.py")
    command = [sys.executable, str(nanogpt / "train.py"),
               str(nanogpt / "config" / "train_shakespeare_char.py"), *NANOGPT_FLAGS,
               "--dataset=pico", f"--out_dir={run_dir / 'out'}", f"--max_iters={steps}",
               f"--lr_decay_iters={steps}", f"--eval_interval={steps}"]
    started = time.perf_counter()
    output = run_or_stop(command, cwd=run_dir, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    iterations = [(int(i), float(loss), float(ms)) for i, loss, ms in
                  re.findall(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", output)]
    # Iteration `steps` evaluates, saves the checkpoint of `steps` steps, and trains one more.
    done = [entry for entry in iterations if entry[0] < steps]
    return dict(step_seconds=[ms / 1e3 for _, _, ms in done], wall_s=wall, steps=len(done),
                train_losses=[loss for _, loss, _ in done], checkpoint=run_dir / "out" / "ckpt.pt")


def windows(ids: np.ndarray, length: int) -> torch.Tensor:
    """Consecutive windows of length + 1 tokens, each window's last token the next one's
    first: (num_windows, length + 1)."""
    count = (len(ids) - 1) // length
    starts = np.arange(count) * length
    return torch.from_numpy(np.stack([ids[s: s + length + 1] for s in starts]))


@torch.no_grad()
def held_out_loss(logits_of, ids: np.ndarray, batch: int = 64) -> float:
    """Mean nats per target over consecutive block_size windows. logits_of: (B, T) -> (B, T, V)."""
    all_windows = windows(ids, SHAPE["block_size"])
    total = 0.0
    for start in range(0, len(all_windows), batch):
        chunk = all_windows[start: start + batch]
        logits = logits_of(chunk[:, :-1].contiguous())
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return total / all_windows[:, 1:].numel()


def pico_held_out(pico, checkpoint: Path, ids: np.ndarray) -> float:
    model, _, _ = pico.model_from_checkpoint(checkpoint, "--checkpoint")
    model.eval()
    return held_out_loss(lambda x: model(x.t()).transpose(0, 1), ids)


def nanogpt_held_out(nanogpt: Path, checkpoint: Path, ids: np.ndarray) -> float:
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):     # its parameter count, printed again
        spec.loader.exec_module(module)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    with contextlib.redirect_stdout(io.StringIO()):
        model = module.GPT(module.GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    return held_out_loss(lambda x: model(x, x)[0], ids)   # with targets, logits at every position


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/vs_nanogpt.py", description=tool_description(__doc__))
    parser.add_argument("--nanogpt", type=path_text, default=None, metavar="DIR",
                        help="a nanoGPT checkout (train.py, model.py); without it only pico-llm runs")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps of each run")
    parser.add_argument("--rounds", type=positive_int, default=2, help="runs of each, in turn")
    parser.add_argument("--warmup", type=non_negative_int, default=20,
                        help="first steps of each run left out of its loop tokens/s")
    parser.add_argument("--seed", type=seed_int, default=1337,
                        help="pico-llm's seed (nanoGPT's train.py fixes its own, 1337)")
    parser.add_argument("--pico_flags", default="",
                        help="more pico-llm flags, e.g. \"--bias true\" (the comparison's own "
                             "come first, so these override them)")
    parser.add_argument("--corpus_dir", type=path_text, default="/tmp/pico-python-docs",
                        help="the running text (written there if it is new or empty)")
    args = parser.parse_args(argv)
    nanogpt = Path(args.nanogpt).resolve() if args.nanogpt else None
    if nanogpt is not None and not (nanogpt / "train.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt} has no train.py (a nanoGPT checkout); drop "
                     "--nanogpt to time pico-llm alone")
    try:
        extra = shlex.split(args.pico_flags)
    except ValueError as error:
        parser.error(f"--pico_flags {args.pico_flags!r}: {error}")
    pico = load_pico()
    try:
        config = pico_flags_checked(pico, lambda: pico.config_from_command_line(   # before
            PICO_FLAGS + extra + ["--input_files", "train.txt"]), "--pico_flags")  # minutes of work
        pico.check_models_fit_in_memory(config.models, pico.ByteTokenizer().vocab_size,
                                        config.data.block_size, torch.device("cpu"))
        check_flags_left_alone(pico, extra, OWNED_FLAGS, "--pico_flags",
                               "it trains pico-llm's transformer on --corpus_dir, with "
                               "--steps, --seed and files of its own")
        train_text, held_out_text = running_text(pico, Path(args.corpus_dir))
        if min(len(train_text.encode()), len(held_out_text.encode())) < SHAPE["block_size"]:
            raise pico.UserError(f"--corpus_dir {args.corpus_dir} is too little text: the held-out "
                                 "files (every tenth: the sixth, the 16th, ...) and the others need "
                                 f"{SHAPE['block_size']} bytes each at least; add files of text")
        train_ids, held_out_ids = token_ids(pico, train_text), token_ids(pico, held_out_text)
        epochs, per_epoch, steps = total_steps(len(train_ids), args.steps)
        if epochs > pico.MAX_EPOCHS:
            raise too_many_passes(pico, args.steps,
                                  f"training text in --corpus_dir {args.corpus_dir}")
    except pico.UserError as error:
        print(f"vs_nanogpt: error: {error}", file=sys.stderr)
        return 2
    warmup = min(args.warmup, steps // 2)
    print(f"training text {len(train_text.encode()) / 1e6:.2f} MB, held-out {len(held_out_text.encode()) / 1e6:.2f} MB "
          f"({args.corpus_dir}); {steps} steps ({epochs} epoch(s) of {per_epoch} for pico-llm), "
          f"{steps * SHAPE['block_size'] * SHAPE['batch_size'] / len(train_ids):.2f} passes over "
          f"the training text; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    results: dict[str, list[dict]] = {"pico-llm": [], "nanoGPT": []}
    with tempfile.TemporaryDirectory(prefix="pico-vs-nanogpt-") as directory:
        work = Path(directory)
        (work / "train.txt").write_text(train_text + "\n", encoding="utf-8")
        data = work / "nanogpt_data" / "pico"
        data.mkdir(parents=True)
        train_ids.astype(np.uint16).tofile(data / "train.bin")
        held_out_ids.astype(np.uint16).tofile(data / "val.bin")   # only for its own eval lines
        (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": pico.ByteTokenizer.vocab_size}))
        for round_index in range(args.rounds):
            sides = ["pico-llm", "nanoGPT"] if nanogpt is not None else ["pico-llm"]
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                name = f"{'pico' if side == 'pico-llm' else 'nanogpt'}_{round_index}"
                if side == "pico-llm":
                    result = run_pico(work, name, epochs, per_epoch, warmup, args.seed,
                                      extra)
                    result["held_out"] = pico_held_out(pico, result["checkpoint"], held_out_ids)
                else:
                    result = run_nanogpt(nanogpt, work, name, steps)
                    result["held_out"] = nanogpt_held_out(nanogpt, result["checkpoint"], held_out_ids)
                result["loop_tokens_per_s"] = loop_tokens_per_s(result["step_seconds"], warmup)
                result["wall_tokens_per_s"] = steps * SHAPE["block_size"] * SHAPE["batch_size"] / result["wall_s"]
                tail = result["train_losses"][-max(len(result["train_losses"]) // 10, 1):]
                result["train_loss"] = statistics.mean(tail)
                results[side].append(result)
                print(f"round {round_index + 1} {side:8s}: {result['steps']} steps, loop "
                      f"{result['loop_tokens_per_s']:,.0f} tokens/s, process {result['wall_s']:.0f} s "
                      f"({result['wall_tokens_per_s']:,.0f} tokens/s); train loss (last tenth) "
                      f"{result['train_loss']:.3f}, held-out {result['held_out']:.3f} nats/char",
                      flush=True)
    print(f"\nafter {steps} steps, median of {args.rounds} round(s):")
    for side, runs in results.items():
        if runs:
            print(f"  {side:8s}: loop {statistics.median(r['loop_tokens_per_s'] for r in runs):,.0f} "
                  f"tokens/s, held-out {statistics.median(r['held_out'] for r in runs):.3f} nats/char, "
                  f"train loss {statistics.median(r['train_loss'] for r in runs):.3f}")
    if results["nanoGPT"]:
        pairs = list(zip(results["pico-llm"], results["nanoGPT"]))
        loop = statistics.median(p["loop_tokens_per_s"] / n["loop_tokens_per_s"] for p, n in pairs)
        wall = statistics.median(n["wall_s"] / p["wall_s"] for p, n in pairs)
        print(f"  pico-llm / nanoGPT: training loop tokens/s {loop:.2f}x (rounds: "
              + ", ".join(f"{p['loop_tokens_per_s'] / n['loop_tokens_per_s']:.2f}" for p, n in pairs)
              + f"), whole process {wall:.2f}x; held-out loss difference "
              f"{statistics.median(p['held_out'] - n['held_out'] for p, n in pairs):+.3f} nats/char")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "vs_nanogpt"))
