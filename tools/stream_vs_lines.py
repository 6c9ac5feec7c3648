#!/usr/bin/env python3
"""Lines or a token stream: the same Transformer, the same running text, the same training time.

    python tools/stream_vs_lines.py                       # about 10 minutes on a 2-core CPU
    python tools/stream_vs_lines.py --seconds 60 --corpus_dir DIR
    python tools/stream_vs_lines.py --corpus_dir DIR --corpus_only   # only write the text

The running text is, by default, the documentation that ships with this Python: every
docstring of the standard library (one file per module) and pydoc's topic pages, a few MB of
English prose wrapped at about 72 columns, written as --corpus_dir where that is a new or
empty directory. Each data format trains the pico Transformer (character tokens) for about
--seconds of training time (steps are calibrated from a short first run of each), then both
models are scored on the same held-out text: the stream test set (whole files held out, or
with fewer than 20 files the last tenth of each), which neither model trained on: lines mode
reads only the stream split's training text, written one file per document into a temporary
directory. The held-out text keeps its indentation and blank lines, as stream mode reads a
file; lines mode, which strips every line, never trains on either, and that is part of what
the comparison measures. Each also reports its own format's test set, and samples from a
prompt.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from pico_module import (OneLineErrorParser, current_umask, load_pico, path_text,
                         positive_int, run_tool, seconds_type, tool_description)


def is_new_or_empty_directory(directory: Path) -> bool:
    """Whether `directory` can be written into without touching a file that is there."""
    return not directory.exists() or directory.is_dir() and not any(directory.iterdir())


def write_python_docs(directory: Path, packages: tuple[str, ...] = ()) -> int:
    """The standard library's docstrings, one file per module, and pydoc's topics; with
    `packages`, the docstrings of those installed packages too (the ones not installed are
    left out), written as a new `directory` (or over an empty one). Bytes written.

    The files go into a temporary directory beside it, renamed into place when all are
    written: an interrupted write leaves no half corpus, and the rename fails (OSError) where
    `directory` has gained a file meanwhile, so that no file is ever written over."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        written = write_python_docs_into(temporary, packages)
        os.chmod(temporary, 0o777 & ~current_umask())   # mkdtemp makes it private (0700)
        os.rename(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return written


def write_python_docs_into(directory: Path, packages: tuple[str, ...]) -> int:
    """write_python_docs's files, written into the existing, empty `directory`."""
    import importlib.util
    import pydoc_data.topics

    roots = [(Path(sysconfig.get_paths()["stdlib"]), "")]
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            roots.append((Path(list(spec.submodule_search_locations)[0]), package + "_"))
    written = 0
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).parts
            if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = [ast.get_docstring(node) for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            text = "\n\n".join(d for d in docs if d and len(d) > 40)
            if len(text) > 2000:
                (directory / (prefix + "_".join(parts)[:-3] + ".txt")).write_text(text + "\n", encoding="utf-8")
                written += len(text.encode("utf-8"))
    topics = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    (directory / "pydoc_topics.txt").write_text(topics + "\n", encoding="utf-8")
    return written + len(topics.encode("utf-8"))


def python_docs_unless_text_in(pico, directory: Path) -> None:
    """Python's documentation written as `directory` (--corpus_dir) where it holds no .txt
    files; a directory that is a file, holds other files or cannot be written is pico-llm's
    UserError."""
    if directory.exists() and not directory.is_dir():
        raise pico.UserError(f"--corpus_dir {directory} is not a directory; give a directory of "
                             ".txt files, or a new one to write Python's documentation into")
    if not any(directory.glob("*.txt")):
        if not is_new_or_empty_directory(directory):
            raise pico.UserError(f"--corpus_dir {directory} holds no .txt files, but other files; "
                                 "give a directory of .txt files, or a new or empty one to write "
                                 "Python's documentation into")
        try:
            written = write_python_docs(directory)
        except OSError as error:
            raise pico.UserError(f"cannot write Python's documentation into --corpus_dir "
                                 f"{directory}: {error.strerror or error}; give a writable "
                                 "directory, or one of .txt files") from None
        print(f"wrote Python's documentation into {directory}: {written / 1e6:.1f} MB")


def train(pico, flags: list[str], steps_per_epoch: int | None, epochs: int):
    """Train the pico Transformer as the command line with these flags would; returns
    (config, tokenizer, data, model, record)."""
    config = pico.config_from_command_line(flags + ["--epochs", str(epochs)] + (
        ["--max_steps_per_epoch", str(steps_per_epoch)] if steps_per_epoch else []))
    tokenizer = pico.build_tokenizer(config.data.tokenizer)
    pico.check_models_fit_in_memory(config.models, tokenizer.vocab_size, config.data.block_size,
                                    torch.device("cpu"))      # as pico-llm's main() does
    data = pico.load_training_data(config.data, tokenizer, pico.read_sources(config.data))
    model_config = config.models.config_of("transformer")
    model = pico.build_model(model_config, tokenizer.vocab_size, config.training.seed)
    record = pico.model_record("transformer", model, model_config, config.data.block_size)
    with contextlib.redirect_stdout(io.StringIO()):   # the samples are printed once, at the end
        pico.train_one_model("transformer", model, data, config.training, config.sampling,
                             torch.device("cpu"), tokenizer, record, speed=config.speed)
    return config, tokenizer, data, model, record


def main() -> int:
    parser = OneLineErrorParser(prog="tools/stream_vs_lines.py", description=tool_description(__doc__))
    parser.add_argument("--corpus_dir", type=path_text, default="/tmp/pico-python-docs")
    parser.add_argument("--seconds", type=seconds_type, default=240.0, help="training time per format")
    parser.add_argument("--d_model", type=positive_int, default=128)
    parser.add_argument("--block_size", type=positive_int, default=128)
    parser.add_argument("--corpus_only", action="store_true",
                        help="write Python's documentation as --corpus_dir and stop (the text "
                             "pico-llm's recipe sweep reads, with --input_dir)")
    args = parser.parse_args()
    pico = load_pico()
    try:
        if args.corpus_only:
            corpus = Path(args.corpus_dir)
            if corpus.is_dir() and any(corpus.glob("*.txt")):
                print(f"{corpus} already holds .txt files: left as they are")
            python_docs_unless_text_in(pico, corpus)
            return 0
        return compare(pico, args)
    except pico.UserError as error:
        print(f"stream_vs_lines: error: {error}", file=sys.stderr)
        return 2


def compare(pico, args) -> int:
    """Train and score both formats as the module docstring says; print the results."""
    corpus = Path(args.corpus_dir)
    python_docs_unless_text_in(pico, corpus)
    common = ["--models", "transformer", "--tokenizer", "char",
              "--d_model", str(args.d_model), "--block_size", str(args.block_size),
              "--batch_size", "16", "--lr_schedule", "constant", "--warmup_steps", "20",
              "--prompt", "The", "--max_new_tokens", "300", "--quiet", "--device_id", "cpu",
              f"--cache_dir={corpus / '.cache'}"]   # one word each: a folder -docs is a name
    # Lines mode splits lines at random, stream mode whole documents: so that the held-out
    # documents stay unseen by both, lines mode trains on the stream split's training text.
    stream_flags = common + [f"--input_dir={corpus}", "--data_format", "stream"]
    try:
        source, = pico.read_sources(pico.config_from_command_line(stream_flags).data)
    except pico.UserError as error:   # pico-llm's --input_dir is this tool's --corpus_dir
        raise pico.UserError(str(error).replace("--input_dir", "--corpus_dir")) from None
    results = {}
    with tempfile.TemporaryDirectory(prefix="pico-training-text-") as training_text:
        for index in source.train:
            (Path(training_text) / f"document_{index:05d}.txt").write_text(
                source.texts[index] + "\n", encoding="utf-8")
        flags_of = {"lines": common + ["--input_dir", training_text, "--data_format", "lines"],
                    "stream": stream_flags}
        for data_format, flags in flags_of.items():
            # Time 40 steps, the first 10 (the allocator and kernels warming up) not counted.
            _, _, data, _, calibration = train(pico, flags, 40, 1)
            elapsed = [h["elapsed_s"] for h in calibration["history"]]
            if len(elapsed) < 11:
                # a step reads 16 lines, or 16 windows: only a stream's count moves with the block
                step, shorter = (("16 lines", "") if data_format == "lines" else
                                 (f"16 windows of --block_size {args.block_size}",
                                  " or lower --block_size"))
                raise pico.UserError(
                    f"--corpus_dir {corpus} is too little text to time: an epoch of {data_format} "
                    f"mode is {len(elapsed)} step(s) of {step}, and timing needs 11; add text"
                    + shorter)
            seconds_per_step = (elapsed[-1] - elapsed[9]) / (len(elapsed) - 10)
            steps = max(20, round(args.seconds / seconds_per_step))
            # An epoch is one pass over the training text; the budget may take several.
            epochs = math.ceil(steps / data.steps_per_epoch(16, None))
            config, tokenizer, data, model, record = train(pico, flags, math.ceil(steps / epochs),
                                                           epochs)
            results[data_format] = dict(config=config, tokenizer=tokenizer, data=data,
                                        model=model, record=record)
    stream = results["stream"]
    token_bytes = torch.from_numpy(stream["tokenizer"].token_byte_lengths())
    print(f"corpus {corpus}: {sum(p.stat().st_size for p in corpus.glob('*.txt')) / 1e6:.1f} MB in "
          f"{len(list(corpus.glob('*.txt')))} files, {len(source.test)} of {len(source.texts)} "
          f"documents held out from both; pico Transformer d_model {args.d_model}, "
          f"block {args.block_size}, batch 16, char tokens")
    for data_format, result in results.items():
        final = result["record"]["final"]
        common_test = pico.evaluate(pico.NextTokenLoss(result["model"]),
                                    stream["data"].test_batches(16), torch.device("cpu"), token_bytes)
        sample = [s["text"] for s in result["record"]["samples"] if s["rule"] == "top-p 0.95"][-1]
        print(f"\n{data_format}: {final['steps']} steps in {result['config'].training.epochs} "
              f"epoch(s), {final['train_time_s']:.0f} s training, "
              f"{final['tokens_seen']:,} target tokens seen")
        print(f"  own test set: {final['test_bits_per_byte']:.3f} bits/byte; "
              f"held-out running text (stream test set): {common_test['test_bits_per_byte']:.3f} "
              f"bits/byte")
        print(f"  top-p 0.95 sample: {sample.count(chr(10)) + 1} lines: {sample[:240]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "stream_vs_lines"))
