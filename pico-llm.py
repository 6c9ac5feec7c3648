#!/usr/bin/env python3
"""pico-llm: a single-file playground for learning how language models work.

It trains and compares small next-token models on a laptop CPU in minutes (and
on a GPU at full speed): a k-gram MLP (one-hot, embedding or convolutional
context), an LSTM, and decoder-only Transformers built from explicit blocks
(RMSNorm, rotary embeddings, SwiGLU, causal attention) in the presets minGPT,
GPT2-small, GPT-oss and Llama3-lite. Every run writes a JSON log into
`artefacts/` that the companion notebook `pico_llm.ipynb` plots.

Run it:
    pip install -r requirements.txt
    python pico-llm.py                      # offline main job on data/custom_corpus
    python -m pytest -q                     # the test suite

Every model follows one contract: `model(tokens)` with tokens of shape
(seq_len, batch) returns logits of shape (seq_len, batch, vocab); the logits at
position t predict token t+1. For generation every model also implements
`forward_incremental(tokens, state) -> (logits, state)`, so a Transformer feeds
its KV cache and an LSTM carries its hidden state instead of re-reading the
whole context for each new token.

Contents (the section banners below carry the same numbers):
    1. Command line and configuration
    2. Tokenizers (offline GPT-2 BPE through tiktoken, byte-level characters)
    3. Data (text files, TinyStories, token cache, splits, batches with masks)
    4. Building blocks (RMSNorm, rotary embedding, attention, feed-forward)
    5. Models (k-gram MLP, LSTM, Transformer and its preset table)
    6. Loss and optimisation (cross-entropy, AdamW, schedule, clipping)
    7. Generation (sampling rules, KV cache / carried state, generate_text)
    8. Training and evaluation (train_one_model, evaluate, RunLog)
    9. Checkpoints and fault tolerance
   10. Experiments (sweeps, benchmark, accounting)
   11. Distributed training (torchrun / DDP)
   12. main()
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"
DEFAULT_CUSTOM_CORPUS = DATA_DIR / "custom_corpus"
RUNLOG_SCHEMA_VERSION = 1


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...).

    `main()` prints it as one line and exits with status 2, without a traceback.
    """


# =============================================================================
# 1. Command line and configuration
# =============================================================================

MODEL_NAMES = ("kgram_mlp_seq", "lstm_seq", "transformer", "transformer_gptoss")
KGRAM_VARIANTS = ("onehot", "embedding", "conv")
MAX_TRANSFORMER_BLOCKS = 10  # the course project asks for 2 to 10 blocks


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; we print one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"pico-llm: error: {message} (see --help)\n")
        raise SystemExit(2)


def str_to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="pico-llm.py",
        description="Train and compare small language models (k-gram MLP, LSTM, Transformer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--input_files", nargs="*", default=None,
                      help="text files; each non-empty line is one training example "
                           "(default: data/custom_corpus when no other source is given)")
    data.add_argument("--input_dir", default=None,
                      help="directory searched recursively for *.txt files (one example per line)")
    data.add_argument("--limit_custom_examples", type=int, default=None,
                      help="use at most this many examples from the custom files")
    data.add_argument("--tinystories_weight", type=float, default=0.0,
                      help="probability that a training example comes from TinyStories "
                           "(0 skips it; the default keeps the run offline)")
    data.add_argument("--tinystories_max_stories", type=int, default=20000,
                      help="stream only this many TinyStories stories from the hub")
    data.add_argument("--tinystories_path", default=None,
                      help="local TinyStories copy (json, jsonl, parquet or txt) instead of the hub")
    data.add_argument("--block_size", type=int, default=64,
                      help="context length in tokens; longer examples are truncated")
    data.add_argument("--test_fraction", type=float, default=0.1,
                      help="fraction of examples held out as a fixed test set")
    data.add_argument("--tokenizer", default="gpt2",
                      help="gpt2 (tiktoken, shipped offline) or char (UTF-8 bytes)")
    data.add_argument("--cache_dir", default=str(REPO_DIR / ".cache"),
                      help="where tokenized data is cached, keyed by content and tokenizer")

    models = parser.add_argument_group("models")
    models.add_argument("--models", default="kgram_mlp_seq,lstm_seq,transformer",
                        help=f"comma-separated models to train, from {', '.join(MODEL_NAMES)}")
    models.add_argument("--kgram_k", type=int, default=3, help="k-gram context length in tokens")
    models.add_argument("--kgram_variant", default="embedding",
                        help=f"k-gram context encoder: {', '.join(KGRAM_VARIANTS)}")
    models.add_argument("--kgram_chunk_size", type=int, default=0,
                        help="k-gram: process this many positions at a time to bound activation "
                             "memory (0 = all positions at once)")
    models.add_argument("--num_inner_mlp_layers", type=int, default=1,
                        help="k-gram: hidden layers after the first")
    models.add_argument("--embed_size", type=int, default=128,
                        help="embedding / hidden size of the k-gram MLP and the LSTM")
    models.add_argument("--lstm_layers", type=int, default=1, help="stacked LSTM layers")

    tf = parser.add_argument_group(
        "transformer (a preset fills every field; a flag given here overrides it)")
    tf.add_argument("--transformer_variant", default="pico",
                    help="preset: " + ", ".join(TRANSFORMER_PRESETS))
    tf.add_argument("--enable_transformer_gptoss", action="store_true",
                    help="also train the GPT-oss preset (model name transformer_gptoss)")
    tf.add_argument("--d_model", type=int, default=None, help="residual stream width")
    tf.add_argument("--n_heads", type=int, default=None, help="attention heads")
    tf.add_argument("--n_kv_heads", type=int, default=None,
                    help="key/value heads (fewer than n_heads = grouped-query attention)")
    tf.add_argument("--n_blocks", type=int, default=None, help="Transformer blocks (1 to 10)")
    tf.add_argument("--d_ff", type=int, default=None, help="feed-forward hidden width")
    tf.add_argument("--ffn", choices=("gelu", "swiglu", "silu"), default=None,
                    help="feed-forward type")
    tf.add_argument("--norm", choices=("rmsnorm", "layernorm", "none"), default=None,
                    help="normalization layer")
    tf.add_argument("--norm_position", choices=("pre", "post"), default=None,
                    help="normalize before each sub-layer (pre) or after the residual add (post)")
    tf.add_argument("--pos_emb", choices=("learned", "rope", "sinusoidal", "none"), default=None,
                    help="position information (none = NoPE)")
    tf.add_argument("--rope_theta", type=float, default=None, help="RoPE base frequency")
    tf.add_argument("--tie_weights", type=str_to_bool, default=None, metavar="true|false",
                    help="share the unembedding matrix with the token embedding")
    tf.add_argument("--attention_impl", choices=("sdpa", "math"), default="sdpa",
                    help="scaled_dot_product_attention (fast) or the explicit softmax formula")
    tf.add_argument("--dropout", type=float, default=None, help="dropout probability")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training examples")
    train.add_argument("--batch_size", type=int, default=16, help="examples per step")
    train.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW weight decay (matrices and embeddings only)")
    train.add_argument("--grad_clip", type=float, default=1.0,
                       help="clip the global gradient L2 norm to this (0 = off)")
    train.add_argument("--lr_schedule", choices=("constant", "cosine"), default="cosine",
                       help="learning-rate schedule after warm-up")
    train.add_argument("--warmup_steps", type=int, default=10, help="linear warm-up steps")
    train.add_argument("--min_lr_ratio", type=float, default=0.1,
                       help="cosine schedule ends at learning_rate * this")
    train.add_argument("--max_steps_per_epoch", type=int, default=None,
                       help="stop each epoch after this many steps")
    train.add_argument("--seed", type=int, default=1337, help="seed for data order, init, sampling")
    train.add_argument("--device_id", default="cuda:0",
                       help="cpu, mps or cuda:N (falls back to cpu when CUDA is absent)")
    train.add_argument("--log_interval", type=int, default=10, help="print train loss every N steps")
    train.add_argument("--quiet", action="store_true", help="no progress bars, fewer messages")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default="Once upon a time", help="prompt for the samples")
    gen.add_argument("--max_new_tokens", type=int, default=20, help="tokens generated per sample")
    gen.add_argument("--temperature", type=float, default=1.0,
                     help="softmax temperature for sampling (0 = greedy)")
    gen.add_argument("--top_k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    gen.add_argument("--top_p", type=float, default=0.95,
                     help="nucleus sampling mass for the configurable sample, in (0, 1]")
    gen.add_argument("--sample_interval", type=int, default=0,
                     help="also print samples every N training steps (0 = only at the end)")

    out = parser.add_argument_group("output")
    out.add_argument("--run_name", default=None,
                     help="name of the run log artefacts/<run_name>.json (default: time + models)")
    out.add_argument("--artefacts_dir", default=str(REPO_DIR / "artefacts"),
                     help="directory for JSON run logs")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true",
                       help="measure matmul ceiling, training tokens/s and MFU, generation, "
                            "tokenization and memory; writes artefacts/benchmark.json")
    bench.add_argument("--benchmark_quick", action="store_true",
                       help="--benchmark at tiny sizes (seconds; used by the tests)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                       help="training precision: bf16 autocast or fp32 (default: bfloat16 on "
                            "CUDA, float32 elsewhere)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile each model's features (worth it on GPUs)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; raises UserError on a bad combination."""
    args = build_arg_parser().parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if args.enable_transformer_gptoss and "transformer_gptoss" not in args.models:
        args.models.append("transformer_gptoss")
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    def positive(name: str) -> None:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")

    if not args.models:
        raise UserError("--models is empty; choose from " + ", ".join(MODEL_NAMES))
    for name in args.models:
        if name not in MODEL_NAMES:
            raise UserError(f"unknown model {name!r} in --models; choose from {', '.join(MODEL_NAMES)}")
    if args.kgram_variant not in KGRAM_VARIANTS:
        raise UserError(f"unknown --kgram_variant {args.kgram_variant!r}; "
                        f"choose from {', '.join(KGRAM_VARIANTS)}")
    for name in ("epochs", "batch_size", "block_size", "kgram_k", "embed_size", "lstm_layers",
                 "max_steps_per_epoch", "max_new_tokens", "limit_custom_examples",
                 "tinystories_max_stories", "log_interval"):
        positive(name)
    for name in ("learning_rate", "weight_decay", "grad_clip", "temperature", "rope_theta",
                 "test_fraction", "tinystories_weight", "min_lr_ratio"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    for name in ("weight_decay", "grad_clip", "temperature", "warmup_steps", "sample_interval",
                 "kgram_chunk_size", "num_inner_mlp_layers", "top_k"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0.0 <= args.tinystories_weight <= 1.0:
        raise UserError(f"--tinystories_weight is a probability in [0, 1], got {args.tinystories_weight}")
    if not 0.0 <= args.test_fraction < 1.0:
        raise UserError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    if "kgram_mlp_seq" in args.models and args.block_size <= args.kgram_k:
        raise UserError(f"--block_size ({args.block_size}) must be larger than --kgram_k "
                        f"({args.kgram_k})")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    parse_tokenizer_spec(args.tokenizer)
    for name in args.models:
        if name.startswith("transformer"):
            transformer_config_from_args(args, name, vocab_size=256)  # validates the fields


# =============================================================================
# 2. Tokenizers
# =============================================================================
# GPT-2's byte-pair encoding runs through tiktoken. Its merge ranks ship in
# data/gpt2.tiktoken so nothing is downloaded; the hash below is r50k_base's.

GPT2_RANKS_PATH = DATA_DIR / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"


def load_gpt2_encoding(ranks_path: Path = GPT2_RANKS_PATH):
    """Build tiktoken's GPT-2 (r50k_base) encoding from the shipped ranks file."""
    import tiktoken
    import base64

    try:
        raw = Path(ranks_path).read_bytes()
    except OSError as error:
        raise UserError(f"cannot read the GPT-2 ranks file {ranks_path}: {error.strerror}; "
                        "restore data/gpt2.tiktoken from the repository") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise UserError(f"{ranks_path} has sha256 {digest[:12]}..., expected {GPT2_RANKS_SHA256[:12]}...; "
                        "restore data/gpt2.tiktoken from the repository")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={END_OF_TEXT: 50256}, explicit_n_vocab=50257)


class GPT2Tokenizer:
    """GPT-2 BPE (50257 ids, <|endoftext|> = 50256) through tiktoken."""

    name = "gpt2"

    def __init__(self) -> None:
        self.encoding = load_gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    ENCODE_GROUP_BYTES = 64 * 1024

    def encode_examples(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """All texts' ids, each text followed by <|endoftext|>, flat, with start offsets
        (len(texts) + 1); None when a text itself contains "<|endoftext|>".

        tiktoken's threads pay off on large pieces of work, not on many short lines, so
        consecutive texts are joined with the <|endoftext|> marker into ~64 KB groups.
        tiktoken splits at special tokens before its regex runs, so each text encodes
        exactly as it would alone."""
        if any(END_OF_TEXT in text for text in texts):
            return None
        groups, current, current_bytes = [], [], 0
        for text in texts:
            current.append(text)
            current_bytes += len(text)
            if current_bytes >= self.ENCODE_GROUP_BYTES:
                groups.append(current)
                current, current_bytes = [], 0
        if current:
            groups.append(current)
        joined = [END_OF_TEXT.join(group) + END_OF_TEXT for group in groups]
        id_lists = self.encoding.encode_batch(joined, num_threads=os.cpu_count() or 1,
                                              allowed_special={END_OF_TEXT})
        tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in id_lists] or
                                [np.zeros(0, dtype=np.int64)])
        ends = np.flatnonzero(tokens == self.eot_id) + 1
        return tokens, np.concatenate([[0], ends]).astype(np.int64)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for <|endoftext|>), for bits per byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token_id in range(self.vocab_size):
            if token_id != self.eot_id:
                lengths[token_id] = len(self.encoding.decode_single_token_bytes(token_id))
        return lengths


class ByteTokenizer:
    """Characters as UTF-8 bytes: ids 0..255 are bytes, 256 is <|endoftext|>.

    A 257-token vocabulary makes the output layer ~200x cheaper than GPT-2's,
    so small models train much faster on a CPU.
    """

    name = "char"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eot_id] = 0
        return lengths


def parse_tokenizer_spec(spec: str) -> str:
    if spec in ("gpt2", "char"):
        return spec
    raise UserError(f"unknown --tokenizer {spec!r}; choose gpt2 or char")


def build_tokenizer(spec: str):
    return GPT2Tokenizer() if parse_tokenizer_spec(spec) == "gpt2" else ByteTokenizer()


# =============================================================================
# 3. Data
# =============================================================================
# Sources give lists of example strings. They are tokenized once and cached on
# disk as two .npy files (all ids concatenated, and each example's start
# offset), memory-mapped on later runs. Examples are split into a fixed
# train/test set, then batched as (seq_len, batch) tensors with a loss mask so
# that padding never counts.


def read_text_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file; UserError on anything else."""
    if not path.exists():
        raise UserError(f"input file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass directories with --input_dir")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    if b"\x00" in raw:
        raise UserError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {error.start}); "
                        "re-save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path} is empty (no non-blank lines)")
    return lines


def text_files_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise UserError(f"--input_dir {directory} is not a directory")
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"--input_dir {directory} contains no .txt files")
    return files


def load_custom_examples(args: argparse.Namespace) -> list[str]:
    """Examples from --input_files and --input_dir (or the shipped corpus)."""
    paths = [Path(p) for p in (args.input_files or [])]
    if args.input_dir:
        paths += text_files_in(Path(args.input_dir))
    if not paths and args.tinystories_weight < 1.0:
        paths = text_files_in(DEFAULT_CUSTOM_CORPUS)
    examples = [line for path in paths for line in read_text_lines(path)]
    if args.limit_custom_examples is not None:
        examples = examples[: args.limit_custom_examples]
    return examples


TINYSTORIES_HUB_NAME = "roneneldan/TinyStories"


def huggingface_hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether huggingface.co answers within a few seconds (datasets would hang longer)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_tinystories(max_stories: int, local_path: str | None) -> list[str]:
    """The first `max_stories` TinyStories stories, from a local copy or streamed from the hub."""
    import datasets

    datasets.logging.set_verbosity_error()
    if local_path:
        path = Path(local_path)
        if not path.exists():
            raise UserError(f"--tinystories_path {path} does not exist")
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}.get(
            path.suffix.lower())
        if builder is None:
            raise UserError(f"--tinystories_path {path}: expected .json, .jsonl, .parquet or .txt")
        try:
            stream = datasets.load_dataset(builder, data_files=str(path), split="train",
                                           streaming=True)
        except Exception as error:  # datasets raises many types for unreadable files
            raise UserError(f"cannot load --tinystories_path {path}: {error}".splitlines()[0]) from None
    else:
        if not huggingface_hub_reachable():
            raise UserError("cannot reach the Hugging Face hub for TinyStories; download it once "
                            "(e.g. TinyStories-valid.txt) and pass --tinystories_path FILE, "
                            "or use --tinystories_weight 0")
        stream = datasets.load_dataset(TINYSTORIES_HUB_NAME, split="train", streaming=True)
    stories = []
    for record in stream:
        text = (record.get("text") or "").strip()
        if text:
            stories.append(text)
        if len(stories) >= max_stories:
            break
    if not stories:
        raise UserError(f"TinyStories source {local_path or TINYSTORIES_HUB_NAME} has no 'text' records")
    return stories


@dataclasses.dataclass
class TokenizedExamples:
    """Token ids of many examples, stored flat: example i is tokens[offsets[i]:offsets[i+1]].

    Each example ends with <|endoftext|>, so models also learn where text stops.
    """

    tokens: np.ndarray   # (total_tokens,) uint16 or uint32, often memory-mapped
    offsets: np.ndarray  # (num_examples + 1,) int64
    num_bytes: int       # UTF-8 bytes of the source text

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]: self.offsets[index + 1]]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tokenize_examples(texts: list[str], tokenizer, cache_dir: Path | None) -> TokenizedExamples:
    """Tokenize `texts` once; later runs memory-map the cached ids (key: content + tokenizer)."""
    digest = hashlib.sha256(tokenizer.name.encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    key = digest.hexdigest()[:24]
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    if cache_dir is not None:
        tokens_path = cache_dir / f"{key}.tokens.npy"
        offsets_path = cache_dir / f"{key}.offsets.npy"
        if tokens_path.exists() and offsets_path.exists():
            return TokenizedExamples(np.load(tokens_path, mmap_mode="r"),
                                     np.load(offsets_path), num_bytes)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    flat = tokenizer.encode_examples(texts) if hasattr(tokenizer, "encode_examples") else None
    if flat is not None:  # the fast path: one flat array, no list per example
        tokens, offsets = flat[0].astype(dtype), flat[1]
    else:
        id_lists = tokenizer.encode_batch(texts)
        lengths = np.array([len(ids) + 1 for ids in id_lists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.empty(int(offsets[-1]), dtype=dtype)
        for index, ids in enumerate(id_lists):
            tokens[offsets[index]: offsets[index + 1] - 1] = ids
            tokens[offsets[index + 1] - 1] = tokenizer.eot_id
    if cache_dir is not None:
        try:
            atomic_write_bytes(tokens_path, _npy_bytes(tokens))
            atomic_write_bytes(offsets_path, _npy_bytes(offsets))
        except OSError as error:  # a cache we cannot write only costs time
            print(f"pico-llm: note: token cache not written ({error.strerror})", file=sys.stderr)
    return TokenizedExamples(tokens, offsets, num_bytes)


def split_indices(num_examples: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (train, test) split of example indices, deterministic given the seed."""
    order = np.random.default_rng(seed).permutation(num_examples)
    num_test = int(round(num_examples * test_fraction)) if test_fraction > 0 else 0
    if test_fraction > 0 and num_examples >= 2:
        num_test = min(max(num_test, 1), num_examples - 1)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


@dataclasses.dataclass
class DataSource:
    """One tokenized source with its train and test example indices."""

    name: str
    examples: TokenizedExamples
    train: np.ndarray
    test: np.ndarray


@dataclasses.dataclass
class Batch:
    """A padded batch. inputs/targets: (seq_len, batch) int64; mask: (seq_len, batch) bool,
    True where the target is a real token (padding never enters the loss)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        """On CUDA, copy from pinned (page-locked) host memory without blocking, so the
        copy overlaps the previous step's GPU work."""
        if device.type != "cuda":
            return Batch(*(t.to(device) for t in (self.inputs, self.targets, self.mask)))
        return Batch(*((t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True)
                       for t in (self.inputs, self.targets, self.mask)))

    @property
    def num_target_tokens(self) -> int:
        return int(self.mask.sum())


def make_batch(sequences: list[np.ndarray], block_size: int, pad_id: int) -> Batch:
    """Batch token sequences: each is truncated to block_size + 1 tokens, so the model
    reads up to block_size inputs and predicts the next token at every position."""
    pieces = [np.asarray(seq[: block_size + 1], dtype=np.int64) for seq in sequences]
    seq_len = max(max(len(p) for p in pieces) - 1, 1)
    padded = np.full((len(pieces), seq_len + 1), pad_id, dtype=np.int64)
    valid = np.zeros((len(pieces), seq_len + 1), dtype=bool)
    for row, piece in enumerate(pieces):
        padded[row, : len(piece)] = piece
        valid[row, : len(piece)] = True
    tokens = torch.from_numpy(padded).t()  # (seq_len + 1, batch)
    mask = torch.from_numpy(valid[:, 1:]).t().contiguous()
    return Batch(tokens[:-1].contiguous(), tokens[1:].contiguous(), mask)


class TrainingData:
    """Training and test examples drawn from one or two sources.

    An epoch visits as many examples as the sources hold for training. Each slot
    picks TinyStories with probability `tinystories_weight`, then takes that
    source's next example from its own shuffled order (reshuffled when used up).
    With one source an epoch is exactly one pass without replacement.
    """

    def __init__(self, sources: list[DataSource], weights: list[float], block_size: int,
                 pad_id: int, seed: int) -> None:
        self.sources = sources
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.block_size = block_size
        self.pad_id = pad_id
        self.rng = np.random.default_rng(seed)

    @property
    def num_train_examples(self) -> int:
        return sum(len(source.train) for source in self.sources)

    def steps_per_epoch(self, batch_size: int, max_steps: int | None) -> int:
        steps = math.ceil(self.num_train_examples / batch_size)
        return min(steps, max_steps) if max_steps else steps

    def epoch_order(self) -> list[tuple[int, int]]:
        """(source index, example index) for every slot of one epoch."""
        choices = self.rng.choice(len(self.sources), size=self.num_train_examples, p=self.weights)
        orders = [list(self.rng.permutation(source.train)) for source in self.sources]
        positions = [0] * len(self.sources)
        slots = []
        for source_index in choices:
            order = orders[source_index]
            if positions[source_index] == len(order):
                order[:] = self.rng.permutation(self.sources[source_index].train)
                positions[source_index] = 0
            slots.append((int(source_index), int(order[positions[source_index]])))
            positions[source_index] += 1
        return slots

    def train_batches(self, batch_size: int, max_steps: int | None) -> Iterator[Batch]:
        slots = self.epoch_order()
        for step in range(self.steps_per_epoch(batch_size, max_steps)):
            chunk = slots[step * batch_size: (step + 1) * batch_size]
            yield self._batch(chunk)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        slots = [(i, int(e)) for i, source in enumerate(self.sources) for e in source.test]
        for start in range(0, len(slots), batch_size):
            yield self._batch(slots[start: start + batch_size])

    @property
    def has_test_set(self) -> bool:
        return any(len(source.test) for source in self.sources)

    def _batch(self, slots: list[tuple[int, int]]) -> Batch:
        sequences = [self.sources[s].examples.example(e) for s, e in slots]
        return make_batch(sequences, self.block_size, self.pad_id)


def load_training_data(args: argparse.Namespace, tokenizer) -> TrainingData:
    """Read, tokenize (cached) and split every source the flags name."""
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    sources, weights = [], []
    custom_texts = load_custom_examples(args) if args.tinystories_weight < 1.0 else []
    if custom_texts:
        examples = tokenize_examples(custom_texts, tokenizer, cache_dir)
        train, test = split_indices(len(examples), args.test_fraction, args.seed)
        sources.append(DataSource("custom", examples, train, test))
        weights.append(1.0 - args.tinystories_weight)
    if args.tinystories_weight > 0:
        stories = load_tinystories(args.tinystories_max_stories, args.tinystories_path)
        examples = tokenize_examples(stories, tokenizer, cache_dir)
        train, test = split_indices(len(examples), args.test_fraction, args.seed)
        sources.append(DataSource("tinystories", examples, train, test))
        weights.append(args.tinystories_weight)
    return TrainingData(sources, weights, args.block_size, tokenizer.eot_id, args.seed)


# =============================================================================
# 4. Building blocks
# =============================================================================
# The pieces a Transformer is made of, each written out. Shapes use B = batch,
# T = new tokens, S = tokens attended to (cache + new), H = heads, D = head size.


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight.

    Computed in float32 and cast back, so bf16 activations do not lose the mean.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    return nn.Identity()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021, RoFormer).

    Rotates each adjacent pair of dimensions (2i, 2i+1) of a query or key by the
    angle position * theta^(-2i/D). The dot product of a rotated query and key
    then depends only on their position difference. Positions are explicit, so
    a KV cache rotates new tokens at their true position.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inverse_frequency = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int -> cos, sin of shape (T, D/2)."""
        angle = positions.float()[:, None] * self.inverse_frequency[None, :]
        return angle.cos(), angle.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D) -> the same shape, each (2i, 2i+1) pair rotated."""
        pairs = x.float().unflatten(-1, (-1, 2))          # (B, H, T, D/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)


def sinusoidal_position_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) fixed positions: (T,) -> (T, dim), sin on even dims, cos on odd."""
    frequency = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angle = positions.float()[:, None] * frequency[None, :]
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[:, :dim]


class KVCache:
    """Keys and values of one attention layer for the tokens seen so far.

    Preallocated to the model's block size, so each new token writes in place.
    """

    def __init__(self, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.keys = torch.empty(batch, n_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: (B, H_kv, T, D) -> all cached (B, H_kv, S, D), S = length + T."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache holds {self.keys.shape[2]} tokens; {end} requested")
        self.keys[:, :, self.length: end] = keys
        self.values[:, :, self.length: end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query attention.

    With n_kv_heads < n_heads, each key/value head serves n_heads / n_kv_heads
    query heads (Ainslie et al., 2023), shrinking the KV cache.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool,
                 dropout: float, impl: str) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.dropout = dropout
        self.impl = impl
        self.last_attention: torch.Tensor | None = None  # (B, H, T, S), kept when record_attention
        self.record_attention = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model). rope: (cos, sin) of the T new positions."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = RotaryEmbedding.rotate(q, *rope), RotaryEmbedding.rotate(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)                                                   # (B, Hkv, S, D)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "math" or self.record_attention:
            y = self._math_attention(q, k, v, past, dropout)
        else:
            y = self._sdpa_attention(q, k, v, past, dropout)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))                      # (B, T, d_model)

    def _sdpa_attention(self, q, k, v, past: int, dropout: float) -> torch.Tensor:
        """Fused kernel (flash attention on GPUs). The mask must know about the cache:
        new token i sits at position past + i and may see keys 0..past + i."""
        T, S = q.shape[2], k.shape[2]
        gqa = self.n_kv_heads != self.n_heads
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                  enable_gqa=gqa)
        mask = None if T == 1 else causal_mask(T, S, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              enable_gqa=gqa)

    def _math_attention(self, q, k, v, past: int, dropout: float) -> torch.Tensor:
        """The explicit formula softmax(Q K^T / sqrt(D) + causal mask) V."""
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)                  # (B, H, T, S)
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if self.record_attention:
            self.last_attention = weights.detach()
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return weights @ v                                                              # (B, H, T, D)


def causal_mask(num_new: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S - T + i) may attend to key j."""
    return torch.ones(num_new, num_keys, dtype=torch.bool, device=device).tril(
        diagonal=num_keys - num_new)


class FeedForward(nn.Module):
    """Position-wise MLP: GELU (tanh approximation, as GPT-2), SiLU, or SwiGLU.

    SwiGLU (Shazeer, 2020) is w2(silu(w1 x) * w3 x): a gated MLP with three matrices.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.w3 = nn.Linear(d_model, d_ff, bias=bias) if kind == "swiglu" else None
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_model) -> (B, T, d_model)
        if self.kind == "swiglu":
            hidden = F.silu(self.w1(x)) * self.w3(x)
        elif self.kind == "gelu":
            hidden = F.gelu(self.w1(x), approximate="tanh")
        else:
            hidden = F.silu(self.w1(x))
        return self.dropout(self.w2(hidden))


def default_ffn_width(d_model: int, kind: str) -> int:
    """4 d_model for plain MLPs; about 8/3 d_model (same parameter count) for SwiGLU,
    rounded up to a multiple of 64 for efficient matrix shapes."""
    if kind == "swiglu":
        return 64 * math.ceil(8 * d_model / 3 / 64)
    return 4 * d_model


# =============================================================================
# 5. Models
# =============================================================================
# Every model maps tokens (seq_len, batch) to logits (seq_len, batch, vocab),
# and implements forward_incremental(tokens, state) -> (logits, state) for
# generation: state=None starts from scratch.


class KGramMLPSeqModel(nn.Module):
    """Predicts each next token from the k tokens ending at the current one.

    The logits at position t use tokens t-k+1..t. (The course starter's window
    stopped at t-1, so it never saw the token it was continuing: an off-by-one
    fixed here.) Positions before the start of the text read a dedicated padding
    id (vocab_size), not a real token. All positions are computed at once.

    Variants of the context encoder:
      onehot    - a Linear layer on the k concatenated one-hot vectors, computed as
                  a sum of k looked-up weight rows (embedding_bag), never building
                  the (k * vocab)-wide one-hot input.
      embedding - concatenated k token embeddings.
      conv      - a causal 1-D convolution of width k over token embeddings.
    """

    def __init__(self, vocab_size: int, k: int = 3, embed_size: int = 128,
                 num_inner_layers: int = 1, variant: str = "embedding", chunk_size: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.k, self.variant, self.chunk_size = vocab_size, k, variant, chunk_size
        self.pad_id = vocab_size
        table_size = vocab_size + 1
        if variant == "onehot":
            # Row j * table_size + token holds the first-layer weights of slot j's one-hot input.
            self.onehot_weight = nn.Parameter(torch.randn(k * table_size, embed_size) * 0.02)
            self.onehot_bias = nn.Parameter(torch.zeros(embed_size))
        elif variant == "embedding":
            self.embedding = nn.Embedding(table_size, embed_size)
            self.context_proj = nn.Linear(k * embed_size, embed_size)
        else:
            self.embedding = nn.Embedding(table_size, embed_size)
            self.conv = nn.Conv1d(embed_size, embed_size, kernel_size=k)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(num_inner_layers):
            layers += [nn.Linear(embed_size, embed_size), nn.SiLU()]
        self.mlp = nn.Sequential(*layers)
        self.unembedding = nn.Linear(embed_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembedding(self.features(tokens))

    def features(self, tokens: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (T, B) -> last hidden layer (T, B, embed_size); state as below."""
        if state is None:
            state = self._padding_context(tokens)
        padded = torch.cat([state, tokens], dim=0)                       # (k-1+T, B)
        T = tokens.shape[0]
        step = self.chunk_size or T
        chunks = [self.mlp(self._encode_context(padded[start: start + step + self.k - 1]))
                  for start in range(0, T, step)]
        return torch.cat(chunks, dim=0)

    def forward_incremental(self, tokens: torch.Tensor, state: torch.Tensor | None):
        """tokens: (T, B); state: the previous k-1 tokens (k-1, B) or None.
        Returns logits (T, B, vocab) and the new state."""
        if state is None:
            state = self._padding_context(tokens)
        logits = self.unembedding(self.features(tokens, state))
        return logits, torch.cat([state, tokens], dim=0)[tokens.shape[0]:]

    def _padding_context(self, tokens: torch.Tensor) -> torch.Tensor:
        """(k-1, B) padding ids: what the window reads before the text starts."""
        return torch.full((self.k - 1, tokens.shape[1]), self.pad_id, dtype=tokens.dtype,
                          device=tokens.device)

    def _encode_context(self, padded: torch.Tensor) -> torch.Tensor:
        """(k-1+T, B) token ids -> (T, B, embed_size) context features."""
        if self.variant == "conv":
            embedded = self.embedding(padded).permute(1, 2, 0)              # (B, E, k-1+T)
            return self.conv(embedded).permute(2, 0, 1)                     # (T, B, E)
        windows = padded.unfold(0, self.k, 1)                                # (T, B, k)
        if self.variant == "embedding":
            return self.context_proj(self.embedding(windows).flatten(-2))   # (T, B, E)
        slot_offsets = torch.arange(self.k, device=padded.device) * (self.vocab_size + 1)
        rows = (windows + slot_offsets).flatten(0, 1)                        # (T*B, k)
        summed = F.embedding_bag(rows, self.onehot_weight, mode="sum")       # (T*B, E)
        return (summed + self.onehot_bias).view(*windows.shape[:2], -1)


class LSTMSeqModel(nn.Module):
    """Token embedding -> stacked LSTM (Hochreiter & Schmidhuber, 1997) -> unembedding.

    For generation the (h, c) state is carried, so each new token costs one step.
    """

    def __init__(self, vocab_size: int, embed_size: int = 128, hidden_size: int = 128,
                 num_layers: int = 1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers=num_layers)
        self.unembedding = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembedding(self.features(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T, B) -> LSTM outputs (T, B, hidden)."""
        return self.lstm(self.embedding(tokens))[0]

    def forward_incremental(self, tokens: torch.Tensor, state):
        """tokens: (T, B) -> logits (T, B, vocab), state (h, c) each (layers, B, hidden)."""
        hidden, state = self.lstm(self.embedding(tokens), state)          # (T, B, hidden)
        return self.unembedding(hidden), state


@dataclasses.dataclass
class TransformerConfig:
    """Every field of a decoder-only Transformer; presets fill it, flags override it."""

    vocab_size: int
    block_size: int
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None     # None = n_heads (plain multi-head attention)
    n_blocks: int = 3
    d_ff: int | None = None           # None = default_ffn_width(d_model, ffn)
    ffn: str = "swiglu"
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    tie_weights: bool = True
    attention_impl: str = "sdpa"
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.d_ff = self.d_ff or default_ffn_width(self.d_model, self.ffn)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# One table of presets (as in minGPT); a preset is only a set of config fields.
TRANSFORMER_PRESETS: dict[str, dict] = {
    # Small enough to train in a minute or two on a laptop CPU; used by the default run.
    "pico": dict(d_model=128, n_heads=4, n_blocks=3, ffn="swiglu", norm="rmsnorm",
                 pos_emb="rope", tie_weights=True),
    # Karpathy's minGPT "gpt-mini"-like width with 6 blocks, GPT-2 style.
    "minGPT": dict(d_model=384, n_heads=6, n_blocks=6, ffn="gelu", d_ff=1536, norm="layernorm",
                   pos_emb="learned", tie_weights=True, bias=True),
    # GPT-2 small (Radford et al., 2019) trimmed from 12 to 8 blocks.
    "GPT2-small": dict(d_model=768, n_heads=12, n_blocks=8, ffn="gelu", d_ff=3072,
                       norm="layernorm", pos_emb="learned", tie_weights=True, bias=True),
    # The modern recipe used by open-weight models such as gpt-oss: RoPE, SwiGLU, RMSNorm.
    "GPT-oss": dict(d_model=512, n_heads=8, n_blocks=8, ffn="swiglu", d_ff=2048, norm="rmsnorm",
                    pos_emb="rope", tie_weights=False),
    # Llama 3 (Grattafiori et al., 2024) in miniature: grouped-query attention, theta 500000.
    "Llama3-lite": dict(d_model=1024, n_heads=16, n_kv_heads=4, n_blocks=8, ffn="swiglu",
                        norm="rmsnorm", pos_emb="rope", rope_theta=500000.0, tie_weights=False),
}

TRANSFORMER_OVERRIDE_FLAGS = ("d_model", "n_heads", "n_kv_heads", "n_blocks", "d_ff", "ffn", "norm",
                              "norm_position", "pos_emb", "rope_theta", "tie_weights", "dropout")


def find_preset(name: str) -> str:
    for preset in TRANSFORMER_PRESETS:
        if preset.lower() == name.lower():
            return preset
    raise UserError(f"unknown --transformer_variant {name!r}; choose from "
                    + ", ".join(TRANSFORMER_PRESETS))


def transformer_config_from_args(args: argparse.Namespace, model_name: str,
                                 vocab_size: int) -> TransformerConfig:
    """The preset for `model_name`, with every explicitly given flag applied on top."""
    preset = "GPT-oss" if model_name == "transformer_gptoss" else find_preset(args.transformer_variant)
    fields = dict(TRANSFORMER_PRESETS[preset])
    for flag in TRANSFORMER_OVERRIDE_FLAGS:
        if getattr(args, flag, None) is not None:
            fields[flag] = getattr(args, flag)
    if args.d_model is not None and args.d_ff is None:
        fields.pop("d_ff", None)  # a preset's width belongs to its own d_model
    config = TransformerConfig(vocab_size=vocab_size, block_size=args.block_size,
                               attention_impl=args.attention_impl, **fields)
    validate_transformer_config(config, preset)
    return config


def validate_transformer_config(config: TransformerConfig, preset: str = "") -> None:
    where = f" (preset {preset})" if preset else ""
    for name in ("d_model", "n_heads", "n_kv_heads", "n_blocks", "d_ff"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name} must be positive{where}, got {getattr(config, name)}")
    if config.d_model % config.n_heads:
        raise UserError(f"--n_heads {config.n_heads} must divide --d_model {config.d_model}{where}")
    if config.n_heads % config.n_kv_heads:
        raise UserError(f"--n_kv_heads {config.n_kv_heads} must divide --n_heads {config.n_heads}{where}")
    if not 1 <= config.n_blocks <= MAX_TRANSFORMER_BLOCKS:
        raise UserError(f"--n_blocks must be between 1 and {MAX_TRANSFORMER_BLOCKS} "
                        f"(the course caps Transformers at 10 blocks), got {config.n_blocks}")
    if config.pos_emb == "rope" and config.head_dim % 2:
        raise UserError(f"RoPE needs an even head size; d_model / n_heads = {config.head_dim}{where}")


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)) (pre-norm, as GPT-2 and Llama);
    or norm(x + attn(x)), then norm(x + ffn(x)) (post-norm, as the 2017 Transformer)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention_norm = make_norm(config.norm, config.d_model, config.bias)
        self.attention = CausalSelfAttention(config.d_model, config.n_heads, config.n_kv_heads,
                                             config.bias, config.dropout, config.attention_impl)
        self.ffn_norm = make_norm(config.norm, config.d_model, config.bias)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.ffn, config.bias, config.dropout)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model)."""
        if self.pre_norm:
            x = x + self.residual_dropout(self.attention(self.attention_norm(x), rope, cache))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attention_norm(x + self.residual_dropout(self.attention(x, rope, cache)))
        return self.ffn_norm(x + self.ffn(x))


@dataclasses.dataclass
class TransformerState:
    """Generation state: one KV cache per block and the position of the next token."""

    caches: list[KVCache]
    position: int = 0


class TransformerModel(nn.Module):
    """Decoder-only Transformer: token embedding (+ positions), n blocks, final norm,
    unembedding (tied to the embedding or not)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (nn.Embedding(config.block_size, config.d_model)
                                   if config.pos_emb == "learned" else None)
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta)
                       if config.pos_emb == "rope" else None)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_blocks))
        # Post-norm blocks already end in a norm; a final norm belongs to pre-norm stacks.
        self.final_norm = make_norm(config.norm if config.norm_position == "pre" else "none",
                                    config.d_model, config.bias)
        self.unembedding = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.unembedding.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the stream stays O(1).
        for name, parameter in self.named_parameters():
            if name.endswith(("out_proj.weight", "w2.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_blocks))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_context(self) -> int:
        return self.config.block_size

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> TransformerState:
        c = self.config
        return TransformerState([KVCache(batch, c.n_kv_heads, c.block_size, c.head_dim, device, dtype)
                                 for _ in range(c.n_blocks)])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembedding(self.features(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T, B) -> final normalized residual stream (T, B, d_model)."""
        return self._residual_stream(tokens, None)

    def forward_incremental(self, tokens: torch.Tensor, state: TransformerState | None):
        """tokens: (T, B) -> logits (T, B, vocab). New tokens sit after the cached ones
        (positions state.position ..) and their keys/values join the cache."""
        if state is None:
            state = self.new_state(tokens.shape[1], tokens.device, self.token_embedding.weight.dtype)
        return self.unembedding(self._residual_stream(tokens, state)), state

    def _residual_stream(self, tokens: torch.Tensor, state: TransformerState | None) -> torch.Tensor:
        idx = tokens.t()                                                   # (B, T)
        B, T = idx.shape
        start = state.position if state is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.config.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.token_embedding(idx)                                      # (B, T, d_model)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        elif self.config.pos_emb == "sinusoidal":
            x = x + sinusoidal_position_embedding(positions, self.config.d_model).to(x.dtype)
        x = self.embedding_dropout(x)
        rope = self.rotary.angles(positions) if self.rotary is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, state.caches[layer] if state is not None else None)
        if state is not None:
            state.position = start + T
        return self.final_norm(x).transpose(0, 1)                          # (T, B, d_model)


def build_model(model_name: str, args: argparse.Namespace, vocab_size: int) -> nn.Module:
    """The model named on the command line, initialised from --seed."""
    torch.manual_seed(args.seed)
    if model_name == "kgram_mlp_seq":
        return KGramMLPSeqModel(vocab_size, args.kgram_k, args.embed_size, args.num_inner_mlp_layers,
                                args.kgram_variant, args.kgram_chunk_size)
    if model_name == "lstm_seq":
        return LSTMSeqModel(vocab_size, args.embed_size, args.embed_size, args.lstm_layers)
    return TransformerModel(transformer_config_from_args(args, model_name, vocab_size))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_flops_per_token(model: nn.Module, context_length: int) -> int:
    """Training FLOPs per token: 6 N (forward 2 N, backward 4 N) over the N weights that
    enter matrix multiplications, plus attention's 12 * layers * d_model * context
    (Kaplan et al. 2020, PaLM appendix B). Embedding lookups are free; a tied
    unembedding still costs its matmul, so it is counted once as a matmul."""
    lookup_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookup_tables.add(id(getattr(model, "onehot_weight", None)))  # one-hot rows are gathered
    matmul_weights = {id(p): p.numel() for p in model.parameters()
                      if id(p) not in lookup_tables and p.dim() >= 2}
    unembedding = getattr(model, "unembedding", None)
    if isinstance(unembedding, nn.Linear):
        matmul_weights[id(unembedding.weight)] = unembedding.weight.numel()
    flops = 6 * sum(matmul_weights.values())
    if isinstance(model, TransformerModel):
        flops += 12 * model.config.n_blocks * model.config.d_model * context_length
    return int(flops)


# =============================================================================
# 6. Loss and optimisation
# =============================================================================
# Written out from their definitions so each can be read and tested against
# PyTorch's own; the training loop uses these.


def softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)): subtracting the max keeps exp from overflowing."""
    shifted = logits - logits.amax(dim=dim, keepdim=True)
    exponentials = shifted.exp()
    return exponentials / exponentials.sum(dim=dim, keepdim=True)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats. logits (..., V), targets (...) -> (...).

    -log softmax(x)[y] = logsumexp(x) - x[y], with logsumexp computed stably
    as max + log(sum(exp(x - max))). Computed in float32.
    """
    logits = logits.float()
    maximum = logits.amax(dim=-1, keepdim=True)
    log_sum_exp = maximum.squeeze(-1) + (logits - maximum).exp().sum(dim=-1).log()
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return log_sum_exp - target_logit


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over any leading dimensions."""
    return token_cross_entropy(logits, targets).mean()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is True (padding excluded).
    logits (T, B, V), targets (T, B), mask (T, B)."""
    losses = token_cross_entropy(logits, targets)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


class LinearCrossEntropy(torch.autograd.Function):
    """Weighted sum of cross-entropies of `hidden @ weight.T + bias`, computed a chunk of
    positions at a time so the (positions x vocab) logits never exist in full.

    With GPT-2's 50257-token vocabulary the output layer dominates a small model, and
    a fresh 100 MB-scale logits tensor every step costs as much in page faults as in
    arithmetic. The gradient is computed during the forward pass, chunk by chunk
    (d loss / d logits = weight * (softmax - onehot)), and only scaled in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, position_weights, chunk_size: int):
        """hidden (N, d), weight (V, d), bias (V,) or None, targets (N,), position_weights (N,).

        Matmuls run in the autocast dtype when autocast is on (bf16 on a GPU), the softmax
        always in float32. One logits buffer is reused for every chunk and every step is
        in place: a fresh (chunk x vocab) tensor per operation costs page faults and
        memory passes comparable to the matmuls themselves on a CPU."""
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type)
                         if torch.is_autocast_enabled(device_type) else weight.dtype)
        with torch.autocast(device_type, enabled=False):
            h_all = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            rows = min(chunk_size, hidden.shape[0])
            logits_buffer = torch.empty(rows, weight.shape[0], device=hidden.device,
                                        dtype=torch.float32)
            low_precision = compute_dtype != torch.float32
            matmul_buffer = torch.empty_like(logits_buffer, dtype=compute_dtype) if low_precision else logits_buffer
            grad_hidden = torch.empty_like(h_all) if wants_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_grad else None
            grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                         if wants_grad and bias is not None else None)
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk_size):
                h = h_all[start: start + chunk_size]                                # (n, d)
                n = h.shape[0]
                y = targets[start: start + chunk_size]
                position_weight = position_weights[start: start + chunk_size].float()
                mm_out = matmul_buffer[:n]
                if b is None:
                    torch.mm(h, w.t(), out=mm_out)                                  # (n, V)
                else:
                    torch.addmm(b, h, w.t(), out=mm_out)
                logits = logits_buffer[:n]
                if low_precision:
                    logits.copy_(mm_out)
                target_logit = logits.gather(1, y[:, None]).squeeze(1)              # (n,)
                maximum = logits.amax(dim=-1)
                probabilities = logits.sub_(maximum[:, None]).exp_()                # unnormalised
                sum_exp = probabilities.sum(dim=-1)
                log_sum_exp = maximum + sum_exp.log()
                total += ((log_sum_exp - target_logit) * position_weight).sum()
                if wants_grad:
                    # d loss / d logits = weight * (softmax - onehot), in place.
                    grad_logits = probabilities.mul_((position_weight / sum_exp)[:, None])
                    grad_logits[torch.arange(n, device=y.device), y] -= position_weight
                    if low_precision:
                        grad_logits = mm_out.copy_(grad_logits)
                    torch.mm(grad_logits, w, out=grad_hidden[start: start + n])
                    if low_precision:
                        grad_weight += (grad_logits.t() @ h).float()
                    else:
                        grad_weight.addmm_(grad_logits.t(), h)
                    if grad_bias is not None:
                        grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
        if wants_grad:
            ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                                  *(() if grad_bias is None else (grad_bias.to(bias.dtype),)))
        ctx.has_bias = grad_bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, *grad_bias = ctx.saved_tensors
        grad_bias = grad_bias[0] * grad_total if ctx.has_bias else None
        return grad_hidden * grad_total, grad_weight * grad_total, grad_bias, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, layer: nn.Linear, targets: torch.Tensor,
                         position_weights: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """sum_i position_weights[i] * CE(layer(hidden[i]), targets[i]) over positions i.
    hidden (..., d), targets and position_weights (...)."""
    return LinearCrossEntropy.apply(hidden.flatten(0, -2), layer.weight, layer.bias,
                                    targets.flatten(), position_weights.flatten(), chunk_size)


def sequence_loss(model: nn.Module, batch: "Batch", reduction: str = "mean") -> torch.Tensor:
    """The masked next-token loss of `model` on `batch` (mean or sum over real targets).

    Equal to masked_cross_entropy(model(batch.inputs), ...), but through the
    model's features and unembedding so the full logits are never built."""
    mask = batch.mask.float()
    weights = mask / mask.sum().clamp(min=1) if reduction == "mean" else mask
    return linear_cross_entropy(model.features(batch.inputs), model.unembedding,
                                batch.targets, weights)


@torch.no_grad()
def gradient_clipping(parameters: Iterable[nn.Parameter], max_l2_norm: float) -> float:
    """Scale all gradients by max_norm / (norm + 1e-6) when their one global L2 norm
    exceeds max_norm. Returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if total_norm > max_l2_norm:
        scale = max_l2_norm / (total_norm + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return float(total_norm)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), written out.

    Per parameter, with gradient g at step t:
        p <- p - lr * weight_decay * p                  (decay, independent of g)
        m <- beta1 m + (1 - beta1) g,  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    which is exactly the update of torch.optim.AdamW.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** t))
        return loss


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device):
    """AdamW with decay on matrices and embeddings only; norms' gains and biases are
    not pulled towards zero. PyTorch's fused (CUDA) or foreach kernel by default."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    if getattr(args, "optimizer", "torch") == "scratch":
        return AdamW(groups, lr=args.learning_rate)
    fast = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    return torch.optim.AdamW(groups, lr=args.learning_rate, **fast)


def get_lr_cosine_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int,
                           cosine_cycle_iters: int) -> float:
    """Linear warm-up from 0 to max_lr over warmup_iters, cosine decay to min_lr at
    cosine_cycle_iters, then min_lr."""
    if it < warmup_iters:
        return max_lr * it / warmup_iters
    if it <= cosine_cycle_iters:
        progress = (it - warmup_iters) / max(cosine_cycle_iters - warmup_iters, 1)
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return min_lr


def learning_rate_at(step: int, total_steps: int, args: argparse.Namespace) -> float:
    """The learning rate for 0-based training step `step` (warm-up counts from step 1,
    so the first update is not wasted at lr 0)."""
    if args.lr_schedule == "cosine":
        return get_lr_cosine_schedule(step + 1, args.learning_rate,
                                      args.learning_rate * args.min_lr_ratio,
                                      args.warmup_steps, total_steps)
    warmup = min((step + 1) / args.warmup_steps, 1.0) if args.warmup_steps else 1.0
    return args.learning_rate * warmup


def get_batch(tokens_1d: np.ndarray, batch_size: int, context_length: int, device,
              rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random windows of a (memory-mapped) token array.

    Returns inputs and targets of shape (context_length, batch_size), targets
    shifted by one token. Only the sampled windows are read from disk.
    """
    rng = rng or np.random.default_rng()
    if len(tokens_1d) <= context_length:
        raise ValueError(f"need more than {context_length} tokens, got {len(tokens_1d)}")
    starts = rng.integers(0, len(tokens_1d) - context_length, size=batch_size)
    windows = np.stack([np.asarray(tokens_1d[s: s + context_length + 1], dtype=np.int64)
                        for s in starts])                                  # (B, T + 1)
    windows = torch.from_numpy(windows).t()                                # (T + 1, B)
    return (windows[:-1].contiguous().to(device), windows[1:].contiguous().to(device))


# =============================================================================
# 7. Generation
# =============================================================================


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf. logits (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def nucleus_probabilities(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p filtering (Holtzman et al., 2020). logits (B, V) -> probabilities (B, V).

    Keeps the smallest set of most probable tokens whose cumulative probability
    reaches p (the token that crosses p included), zeroes the rest, renormalizes.
    """
    probs = softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True                      # the most likely token always stays
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def nucleus_sampling(logits: torch.Tensor, p: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from the top-p nucleus. logits (B, V) -> ids (B,)."""
    probs = nucleus_probabilities(logits, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclasses.dataclass(frozen=True)
class SamplingRule:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def label(self) -> str:
        if self.temperature == 0:
            return "greedy"
        parts = [f"top-p {self.top_p:g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.temperature != 1.0:
            parts.append(f"T {self.temperature:g}")
        return ", ".join(parts)


def sample_next_token(logits: torch.Tensor, rule: SamplingRule,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,): temperature, then top-k, then top-p."""
    if rule.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits.float() / rule.temperature, rule.top_k)
    return nucleus_sampling(logits, rule.top_p, generator)


def window_start(num_tokens: int, start: int, max_context: int | None) -> int:
    """First token of the context the model reads. A Transformer only knows
    block_size positions: when the context would overflow, it slides forward to
    keep the last half block, and the KV cache is rebuilt from those tokens.
    Sliding by half a block (not one token) keeps most steps on the cache."""
    if max_context is None or num_tokens - start <= max_context:
        return start
    return num_tokens - max(1, max_context // 2)


@dataclasses.dataclass
class Generation:
    text: str            # the prompt followed by the generated text
    new_text: str
    token_ids: list[int]  # prompt and generated ids
    num_prompt_tokens: int


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, rule: SamplingRule,
                 *, eot_id: int | None = None, seed: int | None = None, use_cache: bool = True,
                 device: torch.device | str = "cpu") -> list[int]:
    """Extend `prompt_ids` by up to max_new_tokens ids, stopping after eot_id.

    use_cache=True feeds only each new token to forward_incremental (KV cache or
    carried LSTM state); use_cache=False re-reads the whole context every token.
    Both read exactly the same context, so greedy outputs are identical.
    """
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids) or [eot_id if eot_id is not None else 0]
    max_context = getattr(model, "max_context", None)
    start = window_start(len(ids), 0, max_context)
    state, pending = None, ids[start:]
    for _ in range(max_new_tokens):
        new_start = window_start(len(ids), start, max_context)
        if new_start != start or not use_cache:
            start, state, pending = new_start, None, ids[new_start:]
        tokens = torch.tensor(pending, dtype=torch.long, device=device).unsqueeze(1)  # (T, 1)
        logits, state = model.forward_incremental(tokens, state)
        next_id = int(sample_next_token(logits[-1], rule, generator)[0])
        ids.append(next_id)
        pending = [next_id]
        if next_id == eot_id:
            break
    model.train(was_training)
    return ids


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                  rule: SamplingRule = SamplingRule(), *, seed: int | None = None,
                  use_cache: bool = True, device: torch.device | str = "cpu") -> Generation:
    """Continue `prompt` with the model; one path for every model."""
    prompt_ids = tokenizer.encode(prompt)
    ids = generate_ids(model, prompt_ids, max_new_tokens, rule, eot_id=tokenizer.eot_id, seed=seed,
                       use_cache=use_cache, device=device)
    new_ids = [i for i in ids[len(prompt_ids):] if i != tokenizer.eot_id]
    new_text = tokenizer.decode(new_ids)
    return Generation(prompt + new_text, new_text, ids, len(prompt_ids))


STARTER_SAMPLING_RULES = (SamplingRule(temperature=0.0), SamplingRule(top_p=0.95),
                          SamplingRule(top_p=1.0))


def sampling_rules(args: argparse.Namespace) -> list[SamplingRule]:
    """The starter's greedy / top-p 0.95 / top-p 1.0, plus the flags' rule if it differs."""
    configured = SamplingRule(args.temperature, args.top_k, args.top_p)
    rules = list(STARTER_SAMPLING_RULES)
    return rules if configured in rules else rules + [configured]


# =============================================================================
# 8. Training and evaluation
# =============================================================================

RUNLOG_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pico-llm run log",
    "type": "object",
    "required": ["schema_version", "kind", "run_name", "created", "args", "environment", "data",
                 "models"],
    "properties": {
        "schema_version": {"const": RUNLOG_SCHEMA_VERSION},
        "kind": {"const": "run"},
        "run_name": {"type": "string"},
        "created": {"type": "string"},
        "status": {"enum": ["running", "finished", "failed"]},
        "args": {"type": "object"},
        "environment": {
            "type": "object",
            "required": ["torch", "python", "device", "threads"],
        },
        "data": {
            "type": "object",
            "required": ["tokenizer", "vocab_size", "sources"],
        },
        "models": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["parameters", "training_flops_per_token", "history", "test_history",
                             "samples"],
                "properties": {
                    "parameters": {"type": "integer", "minimum": 1},
                    "training_flops_per_token": {"type": "integer", "minimum": 0},
                    "config": {"type": "object"},
                    "history": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["step", "epoch", "train_loss", "lr", "tokens_seen",
                                         "elapsed_s", "tokens_per_s"],
                            "properties": {
                                "step": {"type": "integer", "minimum": 1},
                                "epoch": {"type": "integer", "minimum": 1},
                                "train_loss": {"type": "number"},
                                "lr": {"type": "number", "minimum": 0},
                                "tokens_seen": {"type": "integer", "minimum": 0},
                                "elapsed_s": {"type": "number", "minimum": 0},
                                "tokens_per_s": {"type": "number", "minimum": 0},
                            },
                        },
                    },
                    "test_history": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["epoch", "step", "test_loss", "test_bits_per_byte",
                                         "test_tokens"],
                        },
                    },
                    "samples": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["step", "rule", "prompt", "text"],
                        },
                    },
                    "final": {"type": "object"},
                },
            },
        },
    },
}


def environment_info(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


class RunLog:
    """Everything a run measured, rewritten atomically to artefacts/<run_name>.json
    after every epoch, so a crash leaves the last complete version on disk."""

    def __init__(self, path: Path, args: argparse.Namespace, device: torch.device,
                 data_info: dict) -> None:
        self.path = path
        self.data = {
            "schema_version": RUNLOG_SCHEMA_VERSION,
            "kind": "run",
            "run_name": path.stem,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "args": {key: value for key, value in vars(args).items()},
            "environment": environment_info(device),
            "data": data_info,
            "models": {},
        }

    def add_model(self, name: str, record: dict) -> dict:
        self.data["models"][name] = record
        return record

    def write(self) -> None:
        atomic_write_json(self.path, self.data)


def load_runlog(path: Path | str) -> dict:
    """Read a run log and check its schema version (the notebook uses this too)."""
    with open(path, encoding="utf-8") as handle:
        log = json.load(handle)
    if log.get("schema_version") != RUNLOG_SCHEMA_VERSION:
        raise UserError(f"{path}: run log schema {log.get('schema_version')!r}, "
                        f"this pico-llm reads {RUNLOG_SCHEMA_VERSION}")
    return log


def choose_run_path(args: argparse.Namespace) -> Path:
    """artefacts/<run_name>.json; a default name never reuses an existing file."""
    directory = Path(args.artefacts_dir)
    if args.run_name:
        if any(ch in args.run_name for ch in "/\\") or args.run_name.startswith("."):
            raise UserError(f"--run_name {args.run_name!r} must be a plain file name")
        return directory / f"{args.run_name}.json"
    stem = time.strftime("%Y%m%d-%H%M%S") + "_" + "+".join(args.models)
    path, counter = directory / f"{stem}.json", 2
    while path.exists():
        path, counter = directory / f"{stem}-{counter}.json", counter + 1
    return path


def check_writable_directory(directory: Path, flag: str) -> None:
    """Fail before training, not after it, when results could not be saved."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {directory} is not writable; choose another with {flag}")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device,
             token_bytes: torch.Tensor, dtype: str | None = None) -> dict:
    """Per-token test loss in nats, and bits per byte (total nats / UTF-8 bytes of the
    predicted text / ln 2), which compares fairly across tokenizers."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast_context(device, dtype):
            total_nats += float(sequence_loss(model, batch, reduction="sum"))
        total_tokens += batch.num_target_tokens
        total_bytes += int(token_bytes[batch.targets][batch.mask].sum())
    model.train(was_training)
    return {"test_loss": total_nats / max(total_tokens, 1),
            "test_bits_per_byte": total_nats / max(total_bytes, 1) / math.log(2),
            "test_tokens": total_tokens}


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """--dtype: bfloat16 on CUDA and float32 elsewhere unless given."""
    return dtype or ("bfloat16" if device.type == "cuda" else "float32")


def autocast_context(device: torch.device, dtype: str | None = None):
    """bf16 autocast (weights and optimizer stay fp32) or plain fp32. Default per
    resolve_dtype: fp32 on the CPU, where fp32 training is the reference (and bf16
    only pays off on CPUs with bf16 matrix units)."""
    if resolve_dtype(dtype, device) == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext()


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def progress_bar(total: int, description: str, quiet: bool):
    """A tqdm bar on a terminal; None when quiet or when stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def say(message: str, bar=None) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)


def train_one_model(name: str, model: nn.Module, data: TrainingData, args: argparse.Namespace,
                    device: torch.device, tokenizer, record: dict, runlog: RunLog | None) -> dict:
    """Train `model` for args.epochs epochs, evaluating after each; fills `record`."""
    optimizer = build_optimizer(model, args, device)
    steps_per_epoch = data.steps_per_epoch(args.batch_size, args.max_steps_per_epoch)
    total_steps = steps_per_epoch * args.epochs
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(device)
    bar = progress_bar(total_steps, name, args.quiet)
    step, tokens_seen, train_time = 0, 0, 0.0
    started = time.perf_counter()
    model.train()
    for epoch in range(1, args.epochs + 1):
        for batch in data.train_batches(args.batch_size, args.max_steps_per_epoch):
            step_started = time.perf_counter()
            lr = learning_rate_at(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = training_step(model, optimizer, batch.to(device), args.grad_clip,
                                 getattr(args, "dtype", None))
            step += 1
            tokens_seen += batch.num_target_tokens
            train_time += time.perf_counter() - step_started
            if not math.isfinite(loss):
                raise TrainingDiverged(f"{name}: loss became {loss} at step {step} (lr {lr:.3g}); "
                                       "lower --learning_rate or raise --warmup_steps")
            record["history"].append({
                "step": step, "epoch": epoch, "train_loss": loss, "lr": lr,
                "tokens_seen": tokens_seen, "elapsed_s": round(time.perf_counter() - started, 4),
                "tokens_per_s": tokens_seen / train_time})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            if not args.quiet and (step % args.log_interval == 0 or step == total_steps):
                say(f"[{name}] epoch {epoch} step {step}/{total_steps} loss {loss:.4f} "
                    f"lr {lr:.2e} {tokens_seen / train_time:,.0f} tok/s", bar)
            if args.sample_interval and step % args.sample_interval == 0 and step < total_steps:
                record_samples(model, tokenizer, args, device, step, record, bar)
        if data.has_test_set:
            result = evaluate(model, data.test_batches(args.batch_size), device, token_bytes,
                              getattr(args, "dtype", None))
            record["test_history"].append({"epoch": epoch, "step": step, **result})
            if not args.quiet:
                say(f"[{name}] epoch {epoch} test loss {result['test_loss']:.4f} "
                    f"({result['test_bits_per_byte']:.3f} bits/byte)", bar)
        if runlog is not None:
            runlog.write()
    if bar is not None:
        bar.close()
    record_samples(model, tokenizer, args, device, step, record, None, final=True)
    record["final"] = final_summary(record, train_time, time.perf_counter() - started)
    return record["final"]


def training_step(model: nn.Module, optimizer, batch: Batch, grad_clip: float,
                  dtype: str | None = None) -> float:
    """One optimizer update on one batch; returns the batch's mean train loss.
    dtype: None, "float32" or "bfloat16" (see autocast_context)."""
    with autocast_context(batch.inputs.device, dtype):
        loss = sequence_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        gradient_clipping(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def final_summary(record: dict, train_time: float, wall_time: float) -> dict:
    history, tests = record["history"], record["test_history"]
    return {
        "steps": len(history),
        "train_loss": history[-1]["train_loss"] if history else None,
        "test_loss": tests[-1]["test_loss"] if tests else None,
        "test_bits_per_byte": tests[-1]["test_bits_per_byte"] if tests else None,
        "tokens_seen": history[-1]["tokens_seen"] if history else 0,
        "tokens_per_s": history[-1]["tokens_per_s"] if history else 0.0,
        "train_time_s": round(train_time, 3),
        "wall_time_s": round(wall_time, 3),
    }


def record_samples(model: nn.Module, tokenizer, args: argparse.Namespace, device: torch.device,
                   step: int, record: dict, bar, final: bool = False) -> None:
    """Generate from --prompt with each sampling rule; print and store the texts."""
    if not args.quiet or final:
        say(f"[{record['name']}] samples after step {step}:", bar)
    for rule in sampling_rules(args):
        sample = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, rule,
                               seed=args.seed, device=device)
        record["samples"].append({"step": step, "final": final, "rule": rule.label,
                                  "prompt": args.prompt, "text": sample.text})
        if not args.quiet or final:
            say(f"    {rule.label:>12}: {sample.text!r}", bar)


def model_record(name: str, model: nn.Module, args: argparse.Namespace) -> dict:
    config = (dataclasses.asdict(model.config) if isinstance(model, TransformerModel) else
              {"kgram_k": args.kgram_k, "kgram_variant": args.kgram_variant,
               "embed_size": args.embed_size, "num_inner_mlp_layers": args.num_inner_mlp_layers}
              if isinstance(model, KGramMLPSeqModel) else
              {"embed_size": args.embed_size, "lstm_layers": args.lstm_layers})
    return {"name": name, "parameters": count_parameters(model),
            "training_flops_per_token": training_flops_per_token(model, args.block_size),
            "config": config, "history": [], "test_history": [], "samples": []}


# =============================================================================
# 9. Checkpoints and fault tolerance
# =============================================================================


# =============================================================================
# 10. Experiments (sweeps, benchmark, accounting)
# =============================================================================


# --- 10.2 Benchmark
# `--benchmark` measures, in one run so that ratios hold on a noisy machine, the
# machine's matmul ceiling and what pico-llm makes of it: training tokens/s and MFU
# through the real training_step, the vectorized k-gram model against the course
# starter's per-position loop, generation with and without KV cache / carried state,
# tokenization MB/s, and peak memory while training from a 100M-token memmap.
# Every figure is the median of several timed repeats after warm-up.

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
GPU_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclasses.dataclass(frozen=True)
class BenchmarkSizes:
    """How big each measurement is; `quick` keeps the same code paths at tiny sizes."""

    repeats: int = 5
    warmup: int = 1
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
    tokenize_mb: float = 20.0
    rss_tokens: int = 100_000_000
    rss_steps: int = 3

    @classmethod
    def quick(cls) -> "BenchmarkSizes":
        return cls(repeats=2, warmup=1, gpt2_vocab_size=512, small_vocab_size=128, matmul_size=256, batch_size=2, kgram_block_size=8,
                   transformer_block_size=16, starter_batch_size=2, generation_tokens=8,
                   generation_block_size=32, generation_repeats=2, tokenize_mb=0.2,
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


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Sustained GFLOP/s of a square (size x size) @ (size x size) matmul (2 size^3 FLOPs)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    calls = max(1, int(2e10 / (2 * size ** 3)) if device.type == "cuda" else 4)
    seconds = median_seconds(lambda: [a @ b for _ in range(calls)], repeats, 1, device)
    return 2 * size ** 3 * calls / seconds / 1e9


def datasheet_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK_TFLOPS.items() if key in name), None)


def compile_model(model: nn.Module) -> nn.Module:
    """--compile: torch.compile the part training runs (features; the chunked loss stays eager)."""
    model.features = torch.compile(model.features)
    return model


def random_batch(vocab_size: int, block_size: int, batch_size: int, seed: int) -> Batch:
    """Uniform random tokens: a step costs the same whatever the tokens are."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (block_size + 1, batch_size), generator=generator)
    return Batch(tokens[:-1].contiguous(), tokens[1:].contiguous(),
                 torch.ones(block_size, batch_size, dtype=torch.bool))


def benchmark_model_args(model_name: str, block_size: int, batch_size: int,
                         extra: Sequence[str] = ()) -> argparse.Namespace:
    """The Namespace the real command line would give for one benchmark config."""
    return parse_args(["--models", model_name, "--block_size", str(block_size),
                       "--batch_size", str(batch_size), *extra])


def benchmark_configs(sizes: BenchmarkSizes) -> list[dict]:
    """The standard configs (issue 5): name, model, vocabulary and flags."""
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
                          block_size: int | None = None):
    args = benchmark_model_args(config["model"], block_size or config["block_size"],
                                sizes.batch_size, config["flags"])
    return build_model(config["model"], args, config["vocab_size"]).to(device), args


def benchmark_training(config: dict, sizes: BenchmarkSizes, device: torch.device, dtype: str,
                       ceiling_gflops: float, compile_it: bool) -> dict:
    """Tokens/s and MFU of the real training step (training_step, AdamW) on random batches."""
    model, args = build_benchmark_model(config, sizes, device)
    if compile_it:
        compile_model(model)
    optimizer = build_optimizer(model, args, device)
    batch = random_batch(config["vocab_size"], args.block_size, sizes.batch_size, args.seed).to(device)
    seconds = median_seconds(lambda: training_step(model, optimizer, batch, args.grad_clip, dtype),
                             sizes.repeats, sizes.warmup, device)
    tokens_per_s = args.block_size * sizes.batch_size / seconds
    flops_per_token = training_flops_per_token(model, args.block_size)
    return {"model": config["model"], "vocab_size": config["vocab_size"],
            "block_size": args.block_size, "batch_size": sizes.batch_size,
            "parameters": count_parameters(model), "training_flops_per_token": flops_per_token,
            "step_s": seconds, "tokens_per_s": tokens_per_s,
            "achieved_gflops": flops_per_token * tokens_per_s / 1e9,
            "mfu": flops_per_token * tokens_per_s / (ceiling_gflops * 1e9)}


def starter_kgram_loop_logits(model: KGramMLPSeqModel, tokens: torch.Tensor) -> torch.Tensor:
    """The course starter's k-gram forward, kept as a small reference: for every example
    and every position, build that position's k-token context and run the MLP on it
    alone. Same weights and outputs as model(tokens); tokens (T, B) -> logits (T, B, V).
    Only the benchmark uses it, to show what vectorizing is worth."""
    assert model.variant == "embedding", "the reference loop is written for the embedding variant"
    T, B = tokens.shape
    padded = torch.cat([model._padding_context(tokens), tokens], dim=0)   # (k-1+T, B)
    columns = []
    for b in range(B):
        rows = []
        for t in range(T):
            context = padded[t: t + model.k, b]                            # (k,)
            features = model.context_proj(model.embedding(context).flatten())
            rows.append(model.unembedding(model.mlp(features)))           # (V,)
        columns.append(torch.stack(rows))                                 # (T, V)
    return torch.stack(columns, dim=1)                                    # (T, B, V)


def benchmark_kgram_vs_starter(sizes: BenchmarkSizes, device: torch.device) -> dict:
    """Forward + backward tokens/s of the starter's loop against the vectorized model,
    same model, same batch (the loop with full-logits cross-entropy, as the starter)."""
    config = benchmark_configs(sizes)[0]
    model, args = build_benchmark_model(config, sizes, device)
    batch = random_batch(config["vocab_size"], args.block_size, sizes.starter_batch_size,
                         args.seed).to(device)

    def starter_step():
        model.zero_grad(set_to_none=True)
        logits = starter_kgram_loop_logits(model, batch.inputs)
        masked_cross_entropy(logits, batch.targets, batch.mask).backward()

    def vectorized_step():
        model.zero_grad(set_to_none=True)
        sequence_loss(model, batch).backward()

    tokens = args.block_size * sizes.starter_batch_size
    starter = tokens / median_seconds(starter_step, max(2, sizes.repeats // 2), 1, device)
    vectorized = tokens / median_seconds(vectorized_step, sizes.repeats, sizes.warmup, device)
    return {"measured": "forward + backward", "block_size": args.block_size,
            "batch_size": sizes.starter_batch_size, "starter_loop_tokens_per_s": starter,
            "vectorized_tokens_per_s": vectorized, "kgram_vs_starter_loop": vectorized / starter}


def benchmark_generation(sizes: BenchmarkSizes, device: torch.device) -> dict:
    """Seconds to generate `generation_tokens` greedy tokens from a 4-token prompt with
    use_cache True (KV cache / carried LSTM state) and False (re-read the context)."""
    results = {"new_tokens": sizes.generation_tokens, "prompt_tokens": 4,
               "transformer_block_size": sizes.generation_block_size}
    prompt = [i % sizes.gpt2_vocab_size for i in (464, 3797, 3332, 319)]  # "The cat sat on"
    configs = {c["name"]: c for c in benchmark_configs(sizes)}
    for key, config, block in (("transformer", configs["transformer"], sizes.generation_block_size),
                               ("lstm", configs["lstm"], None)):
        model, _ = build_benchmark_model(config, sizes, device, block)
        timings = {}
        for use_cache in (True, False):
            def generate(num_tokens=sizes.generation_tokens):
                generate_ids(model, prompt, num_tokens, SamplingRule(0.0), use_cache=use_cache,
                             device=device)

            generate(8)  # warm-up; a full recompute run costs tens of seconds on a CPU
            repeats = sizes.generation_repeats if use_cache else max(2, sizes.generation_repeats - 1)
            timings[use_cache] = median_seconds(generate, repeats, 0, device)
        results[f"{key}_cached_tokens_per_s"] = sizes.generation_tokens / timings[True]
        results[f"{key}_recompute_tokens_per_s"] = sizes.generation_tokens / timings[False]
    results["kv_cache_vs_recompute"] = (results["transformer_cached_tokens_per_s"]
                                        / results["transformer_recompute_tokens_per_s"])
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
    tokenizer = GPT2Tokenizer()
    data_path = median_seconds(lambda: tokenize_examples(texts, tokenizer, None),
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
    windows of a memory-mapped token file; returns the process's peak RSS."""
    import resource

    device = torch.device("cpu")
    tokens = np.load(token_path, mmap_mode="r")
    config = benchmark_configs(BenchmarkSizes())[2]
    args = benchmark_model_args(config["model"], block_size, batch_size, config["flags"])
    model = build_model(config["model"], args, vocab_size)
    optimizer = build_optimizer(model, args, device)
    rng = np.random.default_rng(args.seed)
    for _ in range(steps):
        inputs, targets = get_batch(tokens, batch_size, block_size, device, rng)
        training_step(model, optimizer, Batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool)),
                      args.grad_clip)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_rss_gb": peak_kb * 1024 / 1e9, "memmapped": isinstance(tokens, np.memmap)}


def benchmark_memmap_rss(sizes: BenchmarkSizes) -> dict:
    """Peak resident memory of training from a token cache of `rss_tokens` tokens,
    measured in a fresh subprocess so this process's memory does not count."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="pico-bench-") as directory:
        token_path = Path(directory) / "tokens.npy"
        write_random_token_memmap(token_path, sizes.rss_tokens, sizes.gpt2_vocab_size, seed=0)
        probe = ("import importlib.util, json, sys\n"
                 f"spec = importlib.util.spec_from_file_location('pico_llm', {str(Path(__file__))!r})\n"
                 "pico = importlib.util.module_from_spec(spec); sys.modules['pico_llm'] = pico\n"
                 "spec.loader.exec_module(pico)\n"
                 f"print(json.dumps(pico.memmap_training_probe({str(token_path)!r}, {sizes.rss_steps}, "
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
    """--benchmark: measure, print a table, write artefacts/benchmark.json."""
    device = resolve_device(args.device_id)
    dtype = resolve_dtype(args.dtype, device)
    sizes = BenchmarkSizes.quick() if args.benchmark_quick else BenchmarkSizes()
    out_path = Path(args.artefacts_dir) / "benchmark.json"
    check_writable_directory(out_path.parent, "--artefacts_dir")
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    def note(message: str) -> None:
        if not args.quiet:
            print(f"benchmark: {message} ({time.perf_counter() - started:.0f} s)", flush=True)

    ceiling = {"matmul_gflops": matmul_gflops(device, torch.float32, sizes.matmul_size, sizes.repeats)}
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        ceiling["matmul_gflops_bf16"] = matmul_gflops(device, torch.bfloat16, sizes.matmul_size,
                                                      sizes.repeats)
    training_ceiling = ceiling.get("matmul_gflops_bf16", ceiling["matmul_gflops"]) \
        if dtype == "bfloat16" else ceiling["matmul_gflops"]
    peak = datasheet_peak_tflops(device)
    note(f"matmul ceiling {ceiling['matmul_gflops']:.1f} GFLOP/s fp32")
    training = {}
    for config in benchmark_configs(sizes):
        training[config["name"]] = benchmark_training(config, sizes, device, dtype,
                                                      training_ceiling, args.compile)
        if peak is not None:
            training[config["name"]]["mfu_vs_datasheet_peak"] = (
                training[config["name"]]["achieved_gflops"] / (peak * 1e3))
        note(f"trained {config['name']}")
    starter = benchmark_kgram_vs_starter(sizes, device)
    note("k-gram vs starter loop")
    generation = benchmark_generation(sizes, device)
    note("generation")
    tokenization = benchmark_tokenization(sizes, device)
    note("tokenization")
    memory = benchmark_memmap_rss(sizes)
    note("memory")
    report = {
        "kind": "benchmark",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.benchmark_quick,
        "dtype": dtype,
        "environment": environment_info(device),
        "sizes": dataclasses.asdict(sizes),
        "datasheet_bf16_peak_tflops": peak if peak is not None else "unknown peak",
        "mfu_reference": f"measured {dtype} matmul ceiling",
        "matmul_gflops": ceiling["matmul_gflops"],
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
    atomic_write_json(out_path, report)
    print(benchmark_table(report))
    print(f"\nbenchmark written to {out_path}")
    return 0


def benchmark_table(report: dict) -> str:
    env = report["environment"]
    peak = report["datasheet_bf16_peak_tflops"]
    lines = [f"device {env['device']} ({env['device_name']}), {env['threads']} threads, "
             f"dtype {report['dtype']}, datasheet peak: "
             + (f"{peak:g} TFLOP/s bf16" if isinstance(peak, float) else peak),
             f"matmul ceiling {report['matmul_gflops']:.1f} GFLOP/s fp32"
             + (f", {report['matmul_gflops_bf16']:.1f} bf16" if "matmul_gflops_bf16" in report else ""),
             "",
             f"{'config':<24} {'params':>11} {'MFLOP/tok':>10} {'tokens/s':>10} {'GFLOP/s':>8} {'MFU':>6}"]
    for name, row in report["training"].items():
        lines.append(f"{name:<24} {row['parameters']:>11,} {row['training_flops_per_token'] / 1e6:>10.1f} "
                     f"{row['tokens_per_s']:>10,.0f} {row['achieved_gflops']:>8.1f} {row['mfu']:>6.1%}")
    starter, generation = report["kgram_starter_loop"], report["generation"]
    tokens, memory = report["tokenization"], report["memory"]
    lines += ["",
              f"k-gram vectorized vs starter loop (fwd+bwd): {report['kgram_vs_starter_loop']:.0f}x "
              f"({starter['vectorized_tokens_per_s']:,.0f} vs {starter['starter_loop_tokens_per_s']:,.0f} tokens/s)",
              f"Transformer KV cache vs recompute, {generation['new_tokens']} tokens: "
              f"{report['kv_cache_vs_recompute']:.1f}x ({generation['transformer_cached_tokens_per_s']:,.0f} vs "
              f"{generation['transformer_recompute_tokens_per_s']:,.0f} tokens/s)",
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


# =============================================================================
# 11. Distributed training (torchrun / DDP)
# =============================================================================


# =============================================================================
# 12. main()
# =============================================================================


def resolve_device(device_id: str) -> torch.device:
    """cpu, mps or cuda:N; a CUDA request on a machine without CUDA falls back to cpu."""
    try:
        device = torch.device(device_id)
    except RuntimeError:
        raise UserError(f"unknown --device_id {device_id!r}; use cpu, mps or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"pico-llm: note: CUDA is not available, using cpu instead of {device_id}",
                  file=sys.stderr)
            return torch.device("cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device_id {device_id}: only {torch.cuda.device_count()} CUDA "
                            "device(s) present")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device_id mps: Apple's MPS backend is not available here; use cpu")
        return device
    if device.type != "cpu":
        raise UserError(f"unsupported --device_id {device_id!r}; use cpu, mps or cuda:N")
    return device


def summary_table(records: dict) -> str:
    """One line per model: parameters, final losses, throughput."""
    lines = [f"{'model':<20} {'params':>12} {'train loss':>11} {'test loss':>10} {'tok/s':>10}"]
    for name, record in records.items():
        final = record.get("final", {})
        test = final.get("test_loss")
        lines.append(f"{name:<20} {record['parameters']:>12,} {final.get('train_loss', float('nan')):>11.4f} "
                     f"{test if test is not None else float('nan'):>10.4f} "
                     f"{final.get('tokens_per_s', 0):>10,.0f}")
    return "\n".join(lines)


def prepare_data(args: argparse.Namespace):
    """The tokenizer and the tokenized, split training data the flags describe."""
    tokenizer = build_tokenizer(args.tokenizer)
    prompt_tokens = len(tokenizer.encode(args.prompt))
    if prompt_tokens > args.block_size:
        raise UserError(f"--prompt is {prompt_tokens} tokens, longer than --block_size "
                        f"{args.block_size}; shorten it or raise --block_size")
    data = load_training_data(args, tokenizer)
    if not args.quiet:
        for source in data.sources:
            print(f"data: {source.name}: {len(source.examples)} examples ({len(source.train)} train, "
                  f"{len(source.test)} test), {int(source.examples.offsets[-1]):,} tokens "
                  f"[{tokenizer.name}]")
    return tokenizer, data


def data_summary(tokenizer, data: TrainingData) -> dict:
    return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "sources": {s.name: {"examples": len(s.examples), "train": len(s.train),
                                 "test": len(s.test), "tokens": int(s.examples.offsets[-1]),
                                 "bytes": s.examples.num_bytes} for s in data.sources}}


def train_models(args: argparse.Namespace, device: torch.device, tokenizer, data: TrainingData,
                 runlog: RunLog | None) -> dict:
    """Build and train every model in args.models; returns {name: record}."""
    records = {}
    for name in args.models:
        model = build_model(name, args, tokenizer.vocab_size).to(device)
        if getattr(args, "compile", False):
            compile_model(model)
        record = model_record(name, model, args)
        if runlog is not None:
            runlog.add_model(name, record)
        if not args.quiet:
            print(f"model {name}: {record['parameters']:,} parameters, "
                  f"{record['training_flops_per_token'] / 1e6:,.1f} MFLOP per training token")
        train_one_model(name, model, data, args, device, tokenizer, record, runlog)
        records[name] = record
    return records


def run_training(args: argparse.Namespace) -> int:
    """The main job: train the models, print a summary, write the run log."""
    device = resolve_device(args.device_id)
    run_path = choose_run_path(args)
    check_writable_directory(run_path.parent, "--artefacts_dir")
    tokenizer, data = prepare_data(args)
    runlog = RunLog(run_path, args, device, data_summary(tokenizer, data))
    train_models(args, device, tokenizer, data, runlog)
    runlog.data["status"] = "finished"
    runlog.write()
    print()
    print(summary_table(runlog.data["models"]))
    print(f"\nrun log written to {run_path}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Each mode of the script is one function; training is the default."""
    if args.benchmark or args.benchmark_quick:
        return run_benchmark(args)
    return run_training(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exit_request:  # argparse: --help, or a one-line usage error
            return int(exit_request.code or 0)
        return run_command(args)
    except UserError as error:
        print(f"pico-llm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pico-llm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
