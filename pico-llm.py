#!/usr/bin/env python3
"""pico-llm: a single-file playground for learning how language models work.

It trains and compares small next-token models on a laptop CPU in minutes (and
on a GPU at full speed): a k-gram MLP (one-hot, embedding or convolutional
context), an LSTM, and decoder-only Transformers built from explicit blocks
(RMSNorm, rotary embeddings, SwiGLU, causal attention with sinks and sliding
windows, a mixture of experts, linear attention) in the presets pico (the
default), minGPT, GPT2-small, GPT-oss, Llama3-lite and speedrun. Every run writes
a JSON log that the companion notebook `pico_llm.ipynb` plots.

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

The file reads as a book. Part I is the lesson: read it top to bottom. It sometimes
calls ahead: to Appendix A's fast kernels (through `speed_up`, and PyTorch's fused
attention and AdamW, which are the defaults), to Appendices B and C at named points of
the training loop, and to Part II's data and run log. Each call names where it leads;
you can read on without following it. Part II runs experiments; Part III, the
appendices, holds the machinery.

Contents (the section banners below carry the same numbers):
  Part I. The lesson
    1. Building blocks: 1.1 norms, 1.2 positions (sinusoidal, rotary, and RoPE
       stretched past training's context), 1.3 attention and the KV
       cache, 1.4 feed-forward, 1.5 mixture of experts, 1.6 linear attention
    2. Models: 2.1 k-gram MLP, 2.2 LSTM, 2.3 Transformer and its preset table
    3. The loss (a batch: inputs, targets one token on, mask; masked next-token
       cross-entropy on the logits)
    4. Sampling and generation (greedy, temperature, top-k, nucleus; each new
       token through the KV cache or the LSTM's state)
    5. Training and evaluation (AdamW, Muon, schedule, clipping, the training loop)
  Part II. Running experiments
    6. Data and tokenizers: 6.1 tokenizers, 6.2 text sources, 6.3 token cache,
       splits and batches
    7. Run logs, sweeps and interpretability: 7.1 run logs, 7.2 sweeps,
       7.3 interpretability
    8. The command line and main()
  Part III. Appendices
    A. Speed (oneDNN linears, RoPE as complex products, the float32 LSTM, freed
       memory kept, the chunked or fused loss):
       A.1 compiled training (static shapes, experts block by block,
       linear attention's chunks at once),
       A.2 fused attention and decoding on a GPU (static shapes, CUDA graphs),
       A.3 Muon on a GPU (one launch per operation)
    B. Fault tolerance (checkpoints, exact resume, signals, non-finite steps,
       early stopping and reduce-on-plateau)
    C. Distributed training (torchrun / DDP)
    D. Training your own BPE tokenizer; resource accounting: D.1 byte-level BPE,
       D.2 resource accounting
    E. Hugging Face interop (start from a GPT-2, Llama, Qwen, SmolLM or GPT-oss
       model, export to transformers): E.1 configs, E.2 weights, E.3 model
       directories and the hub, E.4 tokenizers, E.5 export, E.6 the command line
"""

from __future__ import annotations

import os
import re
import signal
import sys

# Start-up machinery, needed before `import torch`: Appendix B's signal handling begins here,
# and a GOMP_CPU_AFFINITY that would hang the import, or an OMP_NUM_THREADS OpenMP cannot
# read, is refused. Skip to Part I.


def interrupted_while_starting(signal_number, frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP while numpy and torch are still importing (seconds): one
    line, status 128 + the signal, and no traceback from the middle of a half-imported library."""
    said = {signal.SIGINT: b"interrupted", signal.SIGTERM: b"terminated"}.get(
        signal_number, b"hung up (the terminal closed)")
    try:
        os.write(2, b"pico-llm: " + said + b"\n")
    except OSError:       # a closed terminal's hang-up: nobody is left to read it
        pass
    os._exit(128 + signal_number)


def gomp_cpu_affinity_readable(value: str) -> bool:
    """Whether libgomp reads GOMP_CPU_AFFINITY: CPUs as C reads numbers (12, 0x1f, +3), alone
    or as ranges N-M and N-M:stride (spaces around - and : allowed), separated by spaces or
    commas. Split and checked item by item, in time linear in its length."""
    number = r"\+?(?:0[xX][0-9a-fA-F]+|[0-9]+)"
    text = " ".join(re.split(r"[ \t\n\v\f\r,]+", value)).strip()
    for mark in "-:":
        text = text.replace(f" {mark}", mark).replace(f"{mark} ", mark)
    return all(re.fullmatch(rf"{number}(?:-{number}(?::{number})?)?", item, re.ASCII)
               for item in text.split(" ") if item)


def omp_num_threads_readable(value: str) -> bool:
    """Whether libgomp, the OpenMP of PyTorch's Linux builds, reads OMP_NUM_THREADS: positive
    whole numbers of a C long (spaces around each allowed), one per nesting level, separated
    by commas. It writes a line of its own about anything else (0, "", "junk", "4.0") as torch
    loads it, and then ignores it. (LLVM's OpenMP, macOS's, also takes "all".)"""
    return all(re.fullmatch(r"\s*\+?[0-9]{1,19}\s*", item, re.ASCII) and 0 < int(item) < 2**63
               for item in value.split(","))


# As a script (not when imported), unless a signal is ignored (Ctrl-C in a background job):
# main() takes the signals over once the imports are done.
if __name__ == "__main__":
    for _number, _default in ((signal.SIGINT, signal.default_int_handler),
                              (signal.SIGTERM, signal.SIG_DFL),
                              (getattr(signal, "SIGHUP", None), signal.SIG_DFL)):  # not on Windows
        if _number is not None and signal.getsignal(_number) is _default:
            signal.signal(_number, interrupted_while_starting)
    # libgomp, the OpenMP library that importing torch loads, loops forever on a
    # GOMP_CPU_AFFINITY it cannot read ("zz", "0:"), in native code, where no signal handler
    # of Python's runs (nor Ctrl-C): one line instead.
    if not gomp_cpu_affinity_readable(os.environ.get("GOMP_CPU_AFFINITY", "")):
        sys.stderr.write(f"pico-llm: error: GOMP_CPU_AFFINITY="
                         f"{os.environ['GOMP_CPU_AFFINITY'][:40]!r} is not a list of CPUs such "
                         "as 0-3,6 or 0-7:2; fix it, or unset it\n")
        sys.exit(2)
    try:   # in a folder deleted under the shell, importing torch fails with oneMKL's own line
        os.getcwd()
    except FileNotFoundError:
        sys.stderr.write("pico-llm: error: the current folder was deleted; cd to a folder that "
                         "exists and run again\n")
        sys.exit(2)
    # An OMP_NUM_THREADS it cannot read, it notes in a line of its own and ignores: one line here.
    if sys.platform.startswith("linux") and not omp_num_threads_readable(
            os.environ.get("OMP_NUM_THREADS", "1")):
        sys.stderr.write(f"pico-llm: error: OMP_NUM_THREADS="
                         f"{os.environ['OMP_NUM_THREADS'][:40]!r} is not a number of threads "
                         "(a positive whole number, such as 2); fix it, or unset it\n")
        sys.exit(2)

import _compat_pickle
import argparse
import base64
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import errno
import faulthandler
import functools
import hashlib
import heapq
import importlib.util
import inspect
import io
import json
import math
import multiprocessing
import platform
import random
import shlex
import shutil
import socket
import stat
import statistics
import subprocess
import sysconfig
import tempfile
import textwrap
import threading
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: runs do not lock their --save_dir
    fcntl = None

try:
    import numpy as np
    import regex
    import tiktoken
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ModuleNotFoundError as missing:      # a fresh machine: one line, as for any bad input
    if __name__ != "__main__":
        raise
    sys.stderr.write(f"pico-llm: error: the package {missing.name} is not installed; pip "
                     "install -r requirements.txt (GPU users: see README.md)\n")
    sys.exit(2)
except Exception as failed:  # a setting torch reads as it loads (TORCH_LOGS=bogus); a bad install
    if __name__ != "__main__":
        raise
    reason = (str(failed).strip().splitlines() or [type(failed).__name__])[0]
    sys.stderr.write(f"pico-llm: error: importing numpy and torch failed ({reason[:160]}); check "
                     "the TORCH_* environment variables, or reinstall: pip install -r "
                     "requirements.txt\n")
    sys.exit(2)

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...).

    `main()` prints it as one line and exits with status 2, without a traceback.
    """


def quoted(path) -> str:
    """A path (or any name a user typed) as an error message shows it: as given, unless it
    holds a character such as a newline that would break the message's one line; then as
    Python writes the string."""
    text = str(path)
    return text if text.isprintable() else repr(text)


# #############################################################################
# PART I. THE LESSON
# #############################################################################

# =============================================================================
# 1. Building blocks
# =============================================================================
# The pieces a Transformer is made of, each written out. Shapes use B = batch,
# T = new tokens, S = tokens attended to (cache + new), H = heads, Hkv = key/value
# heads (grouped-query attention), D = head size, N = positions a feed-forward sees
# (B T), E = experts, k = experts per token, C = a chunk's tokens, Dv = a value's
# width, V = vocabulary. Inside a model the blocks work batch-first, (B, T, d_model),
# as nanoGPT's do; the models themselves take (T, B) (section 2).

# --- 1.1 Norms ------------------------------------------------------------------------

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


NORM_KINDS = ("rmsnorm", "layernorm", "none")


def make_norm(kind: str, dim: int, bias: bool, eps: float = 1e-5) -> nn.Module:
    """kind: rmsnorm | layernorm | none (the identity)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm {kind!r} is not one of {', '.join(NORM_KINDS)}")


# --- 1.2 Positions --------------------------------------------------------------------

def sinusoidal_position_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) fixed positions: (T,) -> (T, dim), sin on even dims, cos on odd.
    Values lie in [-1, 1]; TransformerModel scales them to its embeddings' size."""
    frequency = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angle = positions.float()[:, None] * frequency[None, :]
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[:, :dim]


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/D) for each pair i < D/2, (D/2,): the radians pair i turns per position,
    from 1 (i = 0) down to theta^(-(D-2)/D), about 1/theta for a wide head: wavelengths from
    2 pi to about 2 pi theta."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021, RoFormer).

    Rotates each adjacent pair of dimensions (2i, 2i+1) of a query or key by the
    angle position * theta^(-2i/D). The dot product of a rotated query and key
    then depends only on their position difference. Positions are explicit, so
    a KV cache rotates new tokens at their true position. yarn_factor > 1 takes
    YaRN's frequencies (yarn_frequencies), or another `scaling` (rope_frequencies), for
    contexts longer than training's.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, yarn_factor: float = 1.0,
                 yarn_original_context: int = 4096, scaling: str = "yarn") -> None:
        super().__init__()
        if yarn_factor == 1.0:   # plain RoPE
            inverse_frequency, self.attention_factor = rope_inverse_frequencies(head_dim, theta), 1.0
        else:                    # stretched past training's context (below)
            inverse_frequency, self.attention_factor = rope_frequencies(
                head_dim, theta, scaling, yarn_factor, yarn_original_context)
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int -> cos, sin of shape (T, D/2), times YaRN's attention factor."""
        angle = positions.float()[:, None] * self.inverse_frequency[None, :]
        return angle.cos() * self.attention_factor, angle.sin() * self.attention_factor

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D), cos and sin: (T, D/2) -> (B, H, T, D). Each pair (a, b) of
        dimensions (2i, 2i+1), a point in the plane, is turned by its angle:
        (a cos - b sin, a sin + b cos). In float32 whatever x's precision, for the angles'
        sake. (Read as the complex number a + ib, the turn is a product with cos + i sin:
        Appendix A's faster form, rotate_pairs_complex, equal to float32 rounding.)"""
        pairs = x.float().unflatten(-1, (-1, 2))                                # (B, H, T, D/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]                                     # (B, H, T, D/2)
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


# RoPE past the context a model was trained on: the frequencies of the long-context models
# that Appendix E imports (GPT-oss's YaRN, Llama 3.1's scaling, linear interpolation).

def yarn_frequencies(head_dim: int, theta: float, factor: float, original_context: int,
                     beta_fast: float = 32.0, beta_slow: float = 1.0,
                     truncate: bool = False) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies theta^(-2i/D), (D/2,), and an attention factor: 1 and the plain
    frequencies for factor 1, YaRN's (Peng et al., 2023, as GPT-oss uses it) for factor > 1.

    A pair that turns more than beta_fast times over the original context keeps its frequency (it
    saw every angle in training); one turning fewer than beta_slow times is slowed by `factor`, so
    positions up to factor x original_context map to angles seen in training; a linear ramp blends
    the pairs between. cos and sin are multiplied by the attention factor 0.1 ln(factor) + 1 (so
    q.k by its square), sharpening attention to offset the longer context. As in GPT-oss the
    scaling is static: it applies at every length, not only past original_context. `truncate`
    widens the ramp to whole pairs (floor of its start, ceiling of its end), as transformers'
    YaRN does unless a config says truncate: false (GPT-oss's does).
    """
    inverse_frequency = rope_inverse_frequencies(head_dim, theta)
    if factor == 1.0:
        return inverse_frequency, 1.0

    def pair_turning(rotations: float) -> float:  # the (fractional) pair that turns this many times
        return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, head_dim - 1.0)
    ramp = ((torch.arange(head_dim // 2) - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0 keep, 1 slow
    inverse_frequency = inverse_frequency * (1 - ramp) + inverse_frequency / factor * ramp
    return inverse_frequency, 0.1 * math.log(factor) + 1.0


def llama3_frequencies(head_dim: int, theta: float, factor: float, original_context: int,
                       low_frequency_factor: float = 1.0, high_frequency_factor: float = 4.0
                       ) -> torch.Tensor:
    """Llama 3.1's RoPE frequencies (D/2,) for a context `factor` times original_context (Meta's
    reference model.py, apply_scaling; Grattafiori et al., 2024). A pair whose wavelength
    2 pi / frequency is shorter than original_context / high_frequency_factor keeps its frequency;
    one longer than original_context / low_frequency_factor is slowed by `factor`; between them
    the frequency blends the two, linearly in original_context / wavelength. Unlike YaRN's,
    cos and sin keep their scale."""
    inverse_frequency = rope_inverse_frequencies(head_dim, theta)
    turns = original_context * inverse_frequency / (2 * math.pi)  # turns over the original context
    span = high_frequency_factor - low_frequency_factor
    blend = ((turns - low_frequency_factor) / span).clamp(0, 1)   # 0 slowed, 1 kept
    return inverse_frequency / factor * (1 - blend) + inverse_frequency * blend


ROPE_SCALINGS = ("yarn", "yarn_truncated", "llama3", "linear")


def rope_frequencies(head_dim: int, theta: float, scaling: str, factor: float,
                     original_context: int) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (D/2,) and cos/sin factor, for a context stretched `factor`
    times past original_context in one of ROPE_SCALINGS: YaRN (yarn_frequencies, with or
    without truncation), Llama 3.1's (llama3_frequencies), or linear position interpolation
    (Chen et al., 2023: every frequency divided by `factor`). factor 1 is plain RoPE."""
    if scaling in ("yarn", "yarn_truncated") or factor == 1.0:
        return yarn_frequencies(head_dim, theta, factor, original_context,
                                truncate=scaling == "yarn_truncated")
    if scaling == "llama3":
        return llama3_frequencies(head_dim, theta, factor, original_context), 1.0
    return rope_inverse_frequencies(head_dim, theta) / factor, 1.0


# --- 1.3 Attention and the KV cache ---------------------------------------------------

def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) over the keys: q k^T / sqrt(D) in q's dtype, the mask
    and the softmax in float32.

    q: (..., H, T, D), k: (..., H, S, D) -> weights (..., H, T, S). mask: bool, broadcastable
    to (..., H, T, S), True where a query may attend to a key. sinks: (H,), GPT-oss's attention
    sinks: one logit per head that joins every softmax's denominator but brings no value, so a
    head can put weight "nowhere" rather than spread a whole unit over the keys (its weights
    then sum to less than 1). A query that may attend to no key (a fully masked row) gets zero
    weights, as PyTorch's fused kernel gives such a row the output 0.
    """
    scores = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).float()     # (..., H, T, S)
    if mask is not None:
        # A row of -inf has a NaN softmax and NaN gradients: fully masked rows see every key
        # here and get zero weights below.
        no_key = ~mask.any(dim=-1, keepdim=True)                               # (..., T, 1)
        scores = scores.masked_fill(~(mask | no_key), float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(-1, 1, 1).expand(*scores.shape[:-1], 1)     # (..., H, T, 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1)
    return weights if mask is None else weights.masked_fill(no_key, 0.0)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                                 dropout: float = 0.0) -> torch.Tensor:
    """The attention formula written out: softmax(q k^T / sqrt(D) + mask) v, with dropout on the
    weights. q: (..., H, T, D); k, v: (..., H, S, D) -> (..., H, T, D); mask and sinks as in
    attention_weights. Equal to torch.nn.functional.scaled_dot_product_attention with the same
    boolean attn_mask (which has no sinks)."""
    weights = F.dropout(attention_weights(q, k, mask, sinks), p=dropout, training=dropout > 0)
    return weights.to(v.dtype) @ v


def causal_mask(num_new: int, num_keys: int, device: torch.device,
                window: int | None = None) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S - T + i) may attend to key j: j <= S - T + i,
    and with a sliding window also j > S - T + i - window (the last `window` tokens, itself
    included, as transformers' sliding_window counts them)."""
    ones = torch.ones(num_new, num_keys, dtype=torch.bool, device=device)
    mask = ones.tril(diagonal=num_keys - num_new)
    return mask if window is None else mask & ones.triu(diagonal=num_keys - num_new - window + 1)


class KVCache:
    """Keys and values of one attention layer for the tokens seen so far, at most `capacity`
    (the model's block size). `append` returns the keys and values so far with the new ones
    after them, as torch.cat along the tokens would (a sliding window's, its last window - 1
    and the new ones); the rest of the class is memory management.

    Its room doubles when full (up to capacity), so most new tokens are
    written in place, and a model made for long texts (131,072 positions for Llama 3.2) holds
    memory only for the tokens it has seen, not gigabytes for all it could. A sliding-window
    layer keeps only its last window - 1 tokens between calls, all that a later query can see,
    so its cache is made that size and stays so however long the text grows.
    """

    def __init__(self, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, window: int | None = None) -> None:
        room = 0 if window is None else min(capacity, window - 1)
        self.keys = torch.empty(batch, n_kv_heads, room, head_dim, device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.length = 0
        self.capacity = capacity
        self.window = window

    # Which returned keys each new token may see: None, as append returns exactly the keys up
    # to the newest token (causal_mask). Appendix A's static cache, which returns all its
    # slots, gives a (T, S) mask instead.
    attention_mask: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: (B, Hkv, T, D) -> the cached ones followed by these, (B, Hkv, S, D)."""
        if self.window is not None:
            return self._slide(keys, values)
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} tokens; {end} requested")
        if end > self.keys.shape[2]:
            self._grow(min(max(end, 2 * self.keys.shape[2]), self.capacity))
        self.keys[:, :, self.length: end] = keys
        self.values[:, :, self.length: end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, room: int) -> None:
        """Move the cached keys and values into new tensors with `room` token slots."""
        keys = self.keys.new_empty(*self.keys.shape[:2], room, self.keys.shape[3])
        values = torch.empty_like(keys)
        keys[:, :, :self.length] = self.keys[:, :, :self.length]
        values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values

    @property
    def bytes_held(self) -> int:
        """Memory of the keys and values of the tokens it holds."""
        return 2 * self.keys[:, :, :self.length].numel() * self.keys.element_size()

    def _slide(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """append for a sliding-window layer: the kept tokens and the new ones go to attention,
        the last window - 1 of them stay."""
        keys = torch.cat([self.keys[:, :, :self.length], keys], dim=2)        # (B, Hkv, S, D)
        values = torch.cat([self.values[:, :, :self.length], values], dim=2)
        self.length = min(keys.shape[2], self.keys.shape[2])
        first = keys.shape[2] - self.length
        self.keys[:, :, :self.length] = keys[:, :, first:]
        self.values[:, :, :self.length] = values[:, :, first:]
        return keys, values


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query attention.

    With n_kv_heads < n_heads, each key/value head serves n_heads / n_kv_heads
    query heads (Ainslie et al., 2023), shrinking the KV cache. GPT-oss's two options:
    `sinks`, one learned logit per head in the softmax's denominator (attention_weights),
    and a sliding `window` (Beltagy et al., 2020): each token sees only the last `window`
    tokens, itself included.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool,
                 dropout: float, impl: str,   # impl: sdpa (PyTorch's fused kernel) | math (the formula)
                 sinks: bool = False, window: int | None = None,
                 head_dim: int | None = None, qk_norm: bool = False, norm_eps: float = 1e-5,
                 qkv_bias: bool = False, value_embeddings: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        # QK-norm (Dehghani et al., 2023; Qwen3, the nanoGPT speedrun): each head's query and
        # key are RMS-normalized before RoPE, so their dot products no longer grow with the
        # activations' scale, only with the norms' learned gains (kept out of weight decay).
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        qkv_bias = bias or qkv_bias  # Qwen2 biases q, k and v but not the output projection
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        # Value embeddings (the nanoGPT speedrun): how much of the token's value embedding
        # (TransformerModel.value_embedding) this block adds to its values.
        self.value_embedding_weight = nn.Parameter(torch.ones(1)) if value_embeddings else None
        # Logits of 0 to start: as if each head had one more key, scoring 0, with a zero value.
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        self.window = window
        self.dropout = dropout
        self.impl = impl
        # How RoPE turns the queries and keys: section 1.2's formula; Appendix A's speed_up
        # swaps in its complex product, equal to float32 rounding and faster.
        self.rotate = RotaryEmbedding.rotate
        # Section 7.3's attention maps set record_attention to keep the weights (B, H, T, S),
        # which only the written-out formula has
        self.last_attention: torch.Tensor | None = None
        self.record_attention = False

    def new_cache(self, batch: int, capacity: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, capacity, self.head_dim, device, dtype, self.window)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model). rope: (cos, sin) of the T new positions,
        each (T, D/2) (RotaryEmbedding.angles), or None: no rotation. value_embedding:
        (B, T, Hkv D), the new tokens' value embeddings, or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x)                                                              # (B, T, Hkv D)
        if self.value_embedding_weight is not None:
            v = v + self.value_embedding_weight * value_embedding
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)               # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.rotate(q, *rope), self.rotate(k, *rope)
        mask = None
        if cache is not None:
            k, v = cache.append(k, v)                                                   # (B, Hkv, S, D)
            mask = cache.attention_mask                                                 # None or (T, S)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "math" or self.record_attention or self.sinks is not None:
            # (the fused kernel returns no weights and takes no sinks)
            y = self._math_attention(q, k, v, dropout, mask)
        else:   # PyTorch's fused kernels: the same attention (tested), no sinks; Appendix A.2
            y = fused_attention(q, k, v, dropout, mask, self.window)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))                      # (B, T, d_model)

    def _math_attention(self, q, k, v, dropout: float, mask=None) -> torch.Tensor:
        """The explicit formula, scaled_dot_product_attention above, each key/value head
        repeated for the query heads it serves. q (B, H, T, D), k and v (B, Hkv, S, D),
        mask None (causal) or (T, S) bool -> (B, H, T, D)."""
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        if mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], q.device, self.window)           # (T, S)
        if self.record_attention:
            self.last_attention = attention_weights(q, k, mask, self.sinks).detach()
        return scaled_dot_product_attention(q, k, v, mask, self.sinks, dropout)        # (B, H, T, D)


# --- 1.4 Feed-forward -----------------------------------------------------------------

FFN_KINDS = ("gelu", "gelu_exact", "swiglu", "silu", "relu2", "clamped_swiglu")
GATED_FFNS = ("swiglu", "clamped_swiglu")   # feed-forwards with a gate matrix w3


class FeedForward(nn.Module):
    """Position-wise MLP: GELU (tanh approximation, as GPT-2; gelu_exact: with erf, as
    nanoGPT's nn.GELU()), SiLU, ReLU², SwiGLU or clamped SwiGLU.

    SwiGLU (Shazeer, 2020) is w2(silu(w1 x) * w3 x): a gated MLP with three matrices;
    clamped SwiGLU (GPT-oss's experts) is w2(clamped_swiglu(w1 x, w3 x)). ReLU² (So et al.,
    2021, "Primer"; the nanoGPT speedrun's MLP) is w2(relu(w1 x)^2): GELU's two matrices, a
    cheaper activation, and sparse hidden units.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool, dropout: float) -> None:
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"ffn {kind!r} is not one of {', '.join(FFN_KINDS)}")
        self.kind = kind
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.w3 = nn.Linear(d_model, d_ff, bias=bias) if kind in GATED_FFNS else None
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_model) -> (..., d_model)
        if self.kind == "swiglu":
            hidden = F.silu(self.w1(x)) * self.w3(x)
        elif self.kind == "clamped_swiglu":
            hidden = clamped_swiglu(self.w1(x), self.w3(x))
        elif self.kind == "gelu":
            hidden = F.gelu(self.w1(x), approximate="tanh")
        elif self.kind == "gelu_exact":
            hidden = F.gelu(self.w1(x))
        elif self.kind == "relu2":
            hidden = F.relu(self.w1(x)).square()
        else:                                                  # silu
            hidden = F.silu(self.w1(x))
        return self.dropout(self.w2(hidden))


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702,
                   limit: float = 7.0) -> torch.Tensor:
    """GPT-oss's expert activation: gate * sigmoid(alpha * gate) * (up + 1), gate clamped above
    at `limit` and up to [-limit, limit]. x sigmoid(1.702 x) is the sigmoid approximation of GELU
    (Hendrycks & Gimpel, 2016); the clamps bound what an expert can emit; with the + 1 an expert
    whose up path is 0 is still a GELU-like MLP."""
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def default_ffn_width(d_model: int, kind: str, multiplier: float | None = None) -> int:
    """The feed-forward width when a preset or flag gives none. 4 d_model for plain MLPs;
    about 8/3 d_model for SwiGLU (the same parameters with its third matrix), rounded up to a
    multiple of 64 for efficient matrix shapes; d_model for clamped SwiGLU, as GPT-oss's
    experts. A SwiGLU with a `multiplier` follows Llama 3's rule (Meta's reference model.py):
    int(multiplier * int(8 d_model / 3)) rounded up to a multiple of d_model / 4, which is what
    Llama 3 8B's multiple_of (1024) is to its width (4096): 14336 there, 3584 at 1024 wide."""
    if kind == "swiglu" and multiplier is not None:
        multiple = max(d_model // 4, 1)
        return multiple * math.ceil(int(multiplier * (8 * d_model // 3)) / multiple)
    if kind == "swiglu":
        return 64 * math.ceil(8 * d_model / 3 / 64)
    return d_model if kind == "clamped_swiglu" else 4 * d_model


# --- 1.5 Mixture of experts -----------------------------------------------------------

class MixtureOfExperts(nn.Module):
    """Sparse feed-forward (Shazeer et al., 2017), as GPT-oss: a linear router with bias scores
    the E experts for each position, the top k run, and a softmax over those k logits weights
    their outputs. A position pays for k experts while the layer holds E experts' parameters.

    Same interface as FeedForward, x (..., d_model) -> (..., d_model). The routing of the last
    call stays in `routing`, for the load-balancing loss (section 3); `usage` counts the choices
    of training calls, padding positions included, for the run log (record_expert_usage,
    section 7.1).
    """

    def __init__(self, d_model: int, d_ff: int, kind: str, n_experts: int, experts_per_token: int,
                 bias: bool, dropout: float) -> None:
        super().__init__()
        self.experts_per_token = experts_per_token
        self.router = nn.Linear(d_model, n_experts, bias=True)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff, kind, bias, dropout)
                                     for _ in range(n_experts))
        self.routing: Routing | None = None
        self.usage: torch.Tensor | None = None          # (E,) choices since the run log read them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])                                    # (N, d_model)
        logits = self.router(tokens)                                           # (N, E)
        top_logits, chosen = logits.topk(self.experts_per_token, dim=-1)       # (N, k)
        weights = torch.softmax(top_logits, dim=-1).flatten()                  # (N k,)
        # The N k choices sorted by expert, so that each expert runs its positions as one batch.
        # (On a GPU, counts.tolist() is the one wait for the device: index_add_, not bincount,
        # which would first wait to find the largest id.)
        choices = chosen.flatten()                     # (N k,): entry n k + slot holds an expert
        counts = choices.new_zeros(len(self.experts)).index_add_(0, choices,
                                                                 torch.ones_like(choices))  # (E,)
        out = torch.zeros_like(tokens)
        for expert, picks in zip(self.experts, choices.argsort(stable=True).split(counts.tolist())):
            # An expert that no position chose still runs, on zero rows, so that its parameters
            # get a (zero) gradient, as DDP expects of every parameter.
            position = picks // self.experts_per_token                         # (n,)
            out.index_add_(0, position, (weights[picks, None] * expert(tokens[position])).to(out.dtype))
        self.routing = Routing(torch.softmax(logits.float(), dim=-1), chosen)
        if self.training:
            self.usage = counts if self.usage is None else self.usage + counts
        return out.view_as(x)

    def take_usage(self) -> torch.Tensor | None:
        """The (E,) choices counted since the last call, or None if none; counting starts again."""
        usage, self.usage = self.usage, None
        return usage


@dataclasses.dataclass
class Routing:
    """What a mixture-of-experts layer did with its N positions in its last forward."""

    probabilities: torch.Tensor   # (N, E) softmax over all E router logits (with its gradient)
    chosen: torch.Tensor          # (N, k) the experts each position went to

    def load_balancing_loss(self, real: torch.Tensor | None = None) -> torch.Tensor:
        """Switch Transformer's auxiliary loss (Fedus et al., 2022, eq. 4) over the positions
        where real (N,) is True (all by default): E * sum_e f_e P_e, with f_e the fraction of
        positions that chose expert e (k choices each) and P_e e's mean router probability.
        Only P carries a gradient; it pushes probability away from over-used experts. k when
        the load is even, as transformers' load_balancing_loss_func counts top-k choices."""
        N, E = self.probabilities.shape
        weight = self.probabilities.new_ones(N) if real is None else real.float()   # (N,)
        positions = weight.sum().clamp(min=1)
        # Weighted sums over the positions, not `weight @ ...`: autocast would run a matmul in
        # bfloat16, whose 8 significant bits round a count of choices past 256
        chosen = F.one_hot(self.chosen, E).sum(dim=1).float()                         # (N, E)
        fraction = (weight[:, None] * chosen).sum(dim=0) / positions                   # (E,)
        probability = (weight[:, None] * self.probabilities).sum(dim=0) / positions    # (E,)
        return E * (fraction * probability).sum()


# --- 1.6 Linear attention -------------------------------------------------------------

# The causal mixing of the tokens with a state of fixed size, instead of a cache that grows
# with every token (softmax attention's KV cache).

LINEAR_ATTENTION_CHUNK = 16


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             log_decay: torch.Tensor, state: torch.Tensor,
                             chunk_size: int = LINEAR_ATTENTION_CHUNK) -> tuple[torch.Tensor, ...]:
    """Parallel (training) form of y_t = q_t S_t, S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t.

    q, k: (B, H, T, D); v: (B, H, T, Dv); log_decay: (B or 1, H or 1, T, D or 1), <= 0; state: (B, H, D, Dv),
    S before the first token -> y (B, H, T, Dv), S after the last. Within a chunk of C tokens the
    sum over earlier tokens is written out as a (C, C, D) tensor; across chunks the state carries
    it (Yang et al., 2024, GLA's chunkwise form). Decays enter only as exp(b_t - b_s) with s <= t,
    never as exp(-b_s) alone, so nothing overflows however fast a head forgets. Chunks stay short
    because b_t - b_s is a difference of running sums that grow along the chunk, and float32's
    error with them (log decays down to -20 a token: 16-token chunks within 1e-4 of the
    recurrence in float64, 37-token ones up to 3e-4). Appendix A.1 swaps in every chunk at once
    for compiled code (all_chunks_linear_attention): a loop over the chunks compiles once for
    every length.
    """
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        qc, kc, vc, gc = (t[:, :, start:start + chunk_size] for t in (q, k, v, log_decay))
        C = qc.shape[2]
        b = gc.cumsum(dim=2)                                          # (B, H, C, D) log decay so far
        from_state = (qc * b.exp()) @ state                           # (B, H, C, Dv) earlier chunks
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[..., None]
        gap = (b[:, :, :, None] - b[:, :, None]).masked_fill(~causal, float("-inf"))  # (B, H, C, C, D)
        scores = (qc[:, :, :, None] * kc[:, :, None] * gap.exp()).sum(-1)             # (B, H, C, C)
        outputs.append(from_state + scores @ vc)
        end = b[:, :, -1:]                                            # (B, H, 1, D) decay over the chunk
        state = end.exp().transpose(-2, -1) * state + (kc * (end - b).exp()).transpose(-2, -1) @ vc
    return torch.cat(outputs, dim=2), state


def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               log_decay: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Recurrent (generation) form of the same, a token at a time; shapes as the chunked form."""
    outputs = []
    for t in range(q.shape[2]):
        state = log_decay[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(q[:, :, t, None, :] @ state)                   # (B, H, 1, Dv)
    return torch.cat(outputs, dim=2), state


@dataclasses.dataclass
class LinearAttentionState:
    """A linear-attention layer's generation state: the matrix S, (B, H, D, Dv), as big after a
    thousand tokens as after one; None before the first."""

    matrix: torch.Tensor | None = None

    @property
    def bytes_held(self) -> int:
        return 0 if self.matrix is None else self.matrix.numel() * self.matrix.element_size()


class LinearAttention(nn.Module):
    """Causal attention as a recurrence over one (D, Dv) matrix per head, its whole state however
    long the text (Katharopoulos et al., 2020): y_t = q_t S_t, S_t = diag(a_t) S_{t-1} + k_t^T v_t.
    `gate` chooses the forget gate a_t:

    - None, linear attention: a_t = 1, and scores phi(q).phi(k) with phi = elu + 1, positive,
      normalized as softmax's are: y_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s).
      The denominator is the same prefix sum with v = 1: a column of ones appended to v carries it.
    - "fixed", RetNet's decay (Sun et al., 2023), without its rotation of q and k by position:
      a_t = gamma_h for head h, gamma_h = 1 - 2^(-5-h): head 0 looks back about 32 tokens,
      later heads further.
    - "data", gated linear attention, GLA (Yang et al., 2024): a_t = sigmoid(W x_t)^(1/16) per head
      and key dimension, W of rank 16: the token decides what to forget.
    The gated kinds, as in both papers, normalize each head's output (RMSNorm here, where RetNet
    has GroupNorm) and gate it with silu(W_g x) rather than divide by a key sum. Positions reach
    these layers only through the forget gate (plain linear attention has none, like NoPE), so
    `rope` is accepted, as by any attention, and not used.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool,
                 gate: str | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.gate = n_heads, n_kv_heads, gate
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        # The training form, chunk after chunk; compiled training (Appendix A.1) swaps in the
        # same arithmetic without the loop.
        self.chunked = chunked_linear_attention
        if gate is not None:
            self.output_gate = nn.Linear(d_model, d_model, bias=bias)
            self.head_norm = RMSNorm(self.head_dim)
        if gate == "fixed":
            gamma = 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float32))
            self.register_buffer("head_log_decay", gamma.log(), persistent=False)
        if gate == "data":
            self.forget_gate = nn.Sequential(nn.Linear(d_model, 16, bias=False), nn.Linear(16, d_model))

    def new_cache(self, batch: int, capacity: int, device: torch.device,
                  dtype: torch.dtype) -> LinearAttentionState:
        return LinearAttentionState()

    def forward(self, x: torch.Tensor, rope=None,
                cache: LinearAttentionState | None = None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model); a cache's state is continued and updated."""
        B, T, _ = x.shape
        H, D, repeats = self.n_heads, self.head_dim, self.n_heads // self.n_kv_heads
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)                              # (B, H, T, D)
        k, v = (proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2).repeat_interleave(repeats, dim=1)
                for proj in (self.k_proj, self.v_proj))                                  # (B, H, T, D)
        if self.gate is None:
            q, k = F.elu(q) + 1, F.elu(k) + 1
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)                  # (B, H, T, D + 1)
            log_decay = q.new_zeros(1, 1, T, 1)                            # (1, 1, T, 1): none
        elif self.gate == "fixed":
            q = q / math.sqrt(D)
            log_decay = self.head_log_decay.view(1, H, 1, 1).expand(1, H, T, 1)   # (1, H, T, 1)
        else:  # the 1/16 keeps a_t near 1 (slow forgetting) for any gate logit near 0
            q = q / math.sqrt(D)
            log_decay = F.logsigmoid(self.forget_gate(x).float()).view(B, T, H, D).transpose(1, 2) / 16
            # (B, H, T, D): a decay per token and per key dimension
        state = cache.matrix if cache is not None else None
        if state is None:   # float32 even when q is bf16 (autocast): it sums over the whole text
            state = q.new_zeros(B, H, D, v.shape[-1],
                                dtype=torch.promote_types(q.dtype, torch.float32))       # (B, H, D, Dv)
        q, k, v = (t.to(state.dtype) for t in (q, k, v))   # a bf16 model's too: one dtype throughout
        with torch.autocast(x.device.type, enabled=False):   # which would run the products in bf16
            if cache is not None and T == 1:
                y, state = recurrent_linear_attention(q, k, v, log_decay, state)
            else:
                y, state = self.chunked(q, k, v, log_decay, state)
        if cache is not None:
            cache.matrix = state
        if self.gate is None:
            y = y[..., :-1] / y[..., -1:]                                                # (B, H, T, D)
        else:
            y = self.head_norm(y)
        y = y.transpose(1, 2).reshape(B, T, H * D).to(x.dtype)                      # (B, T, d_model)
        if self.gate is not None:
            y = y * F.silu(self.output_gate(x))
        return self.out_proj(y)


# =============================================================================
# 2. Models
# =============================================================================
# Every model maps tokens (seq_len, batch) to logits (seq_len, batch, vocab), as
# the course code does (the Transformer turns to batch-first for its blocks on the
# way in and back on the way out), and implements
# forward_incremental(tokens, state) -> (logits, state) for
# generation: state=None starts from scratch. Each also exposes `features`
# (the last hidden states) and `unembedding` (the output layer), so that
# forward(tokens) = unembedding(features(tokens)), soft-capped where a
# Transformer's config asks for it (logit_softcap); Appendix A's chunked loss
# uses the two halves.

KGRAM_VARIANTS = ("onehot", "embedding", "conv")

# --- 2.1 k-gram MLP ------------------------------------------------------------


@dataclasses.dataclass
class KGramConfig:
    """The k-gram MLP's shape: context length k, context encoder, widths."""

    k: int = 3
    variant: str = "embedding"   # onehot | embedding | conv
    embed_size: int = 128
    num_inner_layers: int = 1    # hidden layers after the first
    chunk_size: int = 0          # positions per chunk (bounds activation memory); 0 = all

    def __post_init__(self) -> None:   # a typo would build another model
        if self.variant not in KGRAM_VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {', '.join(KGRAM_VARIANTS)}")


class KGramMLPSeqModel(nn.Module):
    """Predicts each next token from the k tokens ending at the current one.

    The logits at position t use tokens t-k+1..t. (The course starter's window
    stopped at t-1, so it never saw the token it was continuing: an off-by-one
    fixed here.) Positions before the start of the text read a dedicated padding
    id (vocab_size), not a real token. All positions are computed in one pass (or
    chunk_size at a time, which bounds the activations' memory).

    Variants of the context encoder:
      onehot    - a Linear layer on the k concatenated one-hot vectors, computed as
                  a sum of k looked-up weight rows (embedding_bag), never building
                  the (k * (vocab + 1))-wide one-hot input (the padding id has a slot).
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
        step = self.chunk_size or T   # all T positions at once, or chunks of them (less memory)
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
            embedded = self.embedding(padded).permute(1, 2, 0)              # (B, embed, k-1+T)
            return self.conv(embedded).permute(2, 0, 1)                     # (T, B, embed)
        windows = padded.unfold(0, self.k, 1)                                # (T, B, k)
        if self.variant == "embedding":
            return self.context_proj(self.embedding(windows).flatten(-2))   # (T, B, embed)
        # onehot: Linear(k (V+1) -> embed) of the k one-hot vectors laid end to end, computed
        # without them: that product only adds up the k weight rows their ones select
        slot_offsets = torch.arange(self.k, device=padded.device) * (self.vocab_size + 1)
        rows = (windows + slot_offsets).flatten(0, 1)                        # (T*B, k)
        summed = F.embedding_bag(rows, self.onehot_weight, mode="sum")       # (T*B, embed)
        return (summed + self.onehot_bias).view(*windows.shape[:2], -1)


# --- 2.2 LSTM --------------------------------------------------------------------


@dataclasses.dataclass
class LSTMConfig:
    """The LSTM's shape: embedding and hidden width (the same), stacked layers."""

    embed_size: int = 128
    num_layers: int = 1


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
        """tokens: (T, B) -> logits (T, B, vocab), state (h, c) each (layers, B, hidden).
        A single new token goes through `step`, the LSTM's equations written out (for one
        time step faster than nn.LSTM's call, which spends longer setting up than computing:
        docs/performance.md)."""
        x = self.embedding(tokens)                                          # (T, B, embed)
        if tokens.shape[0] == 1 and state is not None:
            hidden, state = self.step(x[0], state)
            return self.unembedding(hidden)[None], state
        hidden, state = self.lstm(x, state)                                 # (T, B, hidden)
        return self.unembedding(hidden), state

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One time step through every layer, with nn.LSTM's weights (gates i, f, g, o):
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g),  h' = sigmoid(o) * tanh(c').
        x (B, embed), state (h, c) each (layers, B, hidden) -> top h' (B, hidden), state."""
        h, c = state
        new_h, new_c = [], []
        for layer in range(self.lstm.num_layers):
            weights = [getattr(self.lstm, f"{name}_l{layer}")
                       for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")]
            gates = F.linear(x, weights[0], weights[1]) + F.linear(h[layer], weights[2], weights[3])
            i, f, g, o = gates.chunk(4, dim=-1)                             # each (B, hidden)
            new_c.append(torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g))
            new_h.append(torch.sigmoid(o) * torch.tanh(new_c[-1]))
            x = new_h[-1]
        return x, (torch.stack(new_h), torch.stack(new_c))


# --- 2.3 Transformer and its preset table ----------------------------------------

ATTENTION_KINDS = ("softmax", "linear", "gated_linear")
LINEAR_ATTENTION_GATES = ("fixed", "data")
# The Transformer fields that name one of a few kinds, and the kinds (the choices of the flags
# that set them; rope_scaling has no flag: --yarn_factor means "yarn", an imported config the rest).
TRANSFORMER_CHOICES = {
    "ffn": FFN_KINDS, "norm": NORM_KINDS, "norm_position": ("pre", "post"),
    "pos_emb": ("learned", "rope", "sinusoidal", "none"), "attention": ATTENTION_KINDS,
    "linear_attention_gate": LINEAR_ATTENTION_GATES, "attention_impl": ("sdpa", "math"),
    "rope_scaling": ROPE_SCALINGS}
# What only softmax attention has: linear attention keeps no sinks, window, per-head norms, head
# size of its own or value embeddings.
SOFTMAX_ATTENTION_OPTIONS = ("attention_sinks", "sliding_window", "qk_norm", "head_size",
                             "value_embeddings")


@dataclasses.dataclass
class TransformerConfig:
    """Every field of a decoder-only Transformer; presets and imported configs fill it, a flag
    (where the field has one) overrides it.
    ValueError for a kind not in TRANSFORMER_CHOICES: a typo would build another model."""

    vocab_size: int = 0               # set from the tokenizer when the model is built
    block_size: int = 64              # the longest context, in tokens
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None     # None = n_heads (plain multi-head attention)
    head_size: int = 0                # each head's width; 0 = d_model / n_heads
    n_blocks: int = 3
    d_ff: int | None = None           # None = default_ffn_width(d_model, ffn, ffn_dim_multiplier)
    ffn: str = "swiglu"               # gelu | gelu_exact | silu | relu2 | swiglu | clamped_swiglu
    ffn_dim_multiplier: float | None = None  # Llama 3's width rule for SwiGLU (default_ffn_width)
    n_experts: int = 0                # > 0: a mixture of this many ffn experts (MixtureOfExperts)
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01  # weight of the routers' load-balancing loss (section 3)
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5            # the norms' epsilon: GPT-2's, Llama 3's; Qwen's is 1e-6
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    yarn_factor: float = 1.0          # > 1: RoPE stretched past yarn_original_context
    yarn_original_context: int = 4096
    rope_scaling: str = "yarn"        # how yarn_factor > 1 stretches RoPE (rope_frequencies)
    nope_interval: int = 0            # > 0: every nope_interval-th block has no RoPE (SmolLM3)
    tie_weights: bool = True
    attention: str = "softmax"        # softmax | linear | gated_linear (LinearAttention)
    linear_attention_gate: str = "data"  # gated_linear's forget gate: fixed (RetNet) | data (GLA)
    attention_sinks: bool = False     # softmax: a learned logit per head (GPT-oss)
    qk_norm: bool = False             # softmax: RMSNorm on each head's query and key (Qwen3)
    sliding_window: int = 0           # softmax: > 0 = blocks 0, 2, 4, ... see this many tokens
    # The nanoGPT speedrun's building blocks (section 1 and TransformerModel), all off by default:
    value_embeddings: bool = False    # softmax: a second token embedding added to every block's values
    unet_skips: bool = False          # the first half's block outputs feed the second half's inputs
    zero_init_proj: bool = False      # out_proj and w2 at zero: pre-norm blocks start as identity
    logit_softcap: float = 0.0        # > 0: logits = cap tanh(logits / cap) (soft_cap)
    attention_impl: str = "sdpa"
    dropout: float = 0.0
    bias: bool = False
    qkv_bias: bool = False            # biases on the query, key and value projections alone (Qwen2)

    def __post_init__(self) -> None:
        for field, kinds in TRANSFORMER_CHOICES.items():
            if getattr(self, field) not in kinds:
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of {', '.join(kinds)}")
        softmax_only = [name for name in SOFTMAX_ATTENTION_OPTIONS if getattr(self, name)]
        if self.attention != "softmax" and softmax_only:   # linear attention would ignore them
            raise ValueError(f"{', '.join(softmax_only)}: options of softmax attention, not of "
                             f"{self.attention} attention")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = default_ffn_width(self.d_model, self.ffn, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    def window(self, block: int) -> int | None:
        """GPT-oss's alternation: blocks 0, 2, 4, ... slide, blocks 1, 3, ... see the whole context."""
        return self.sliding_window if self.sliding_window and block % 2 == 0 else None

    def uses_rope(self, block: int) -> bool:
        """SmolLM3's NoPE layers: with nope_interval n, blocks n - 1, 2n - 1, ... rotate nothing."""
        no_rope = self.nope_interval and (block + 1) % self.nope_interval == 0
        return self.pos_emb == "rope" and not no_rope


INIT_STD = 0.02   # GPT-2's initial weight scale, for embeddings and linear layers

# One table of presets (as in minGPT); a preset is only a set of config fields.
TRANSFORMER_PRESETS: dict[str, dict] = {
    # Small enough to train in a minute or two on a laptop CPU; used by the default run.
    "pico": dict(d_model=128, n_heads=4, n_blocks=3, ffn="swiglu", norm="rmsnorm",
                 pos_emb="rope", tie_weights=True),
    # minGPT's "gpt-mini" (Karpathy): 6 blocks of 6 heads, 192 wide, a GELU MLP 4x as wide,
    # LayerNorm, learned positions, biases, an output layer of its own and dropout 0.1.
    "minGPT": dict(d_model=192, n_heads=6, n_blocks=6, ffn="gelu", d_ff=768, norm="layernorm",
                   pos_emb="learned", tie_weights=False, bias=True, dropout=0.1),
    # GPT-2 small (Radford et al., 2019), dropout 0.1 as its config: 124,439,808 parameters
    # with its 50257-token vocabulary at --block_size 1024.
    "GPT2-small": dict(d_model=768, n_heads=12, n_blocks=12, ffn="gelu", d_ff=3072,
                       norm="layernorm", pos_emb="learned", tie_weights=True, bias=True, dropout=0.1),
    # gpt-oss (OpenAI, 2025) in miniature, its structure kept: a mixture of 8 clamped-SwiGLU
    # experts as wide as the model, 2 per token; grouped-query attention with biases and sinks;
    # blocks alternating a sliding window with full attention; RoPE theta 150000; untied output.
    # The released 20B model: 2880 wide, 24 blocks, 32 experts (4 per token), a 128-token window,
    # YaRN to 131072 tokens. The window here, 16, is a quarter of the default 64-token block.
    "GPT-oss": dict(d_model=512, n_heads=8, n_kv_heads=2, n_blocks=8, ffn="clamped_swiglu",
                    d_ff=512, n_experts=8, experts_per_token=2, attention_sinks=True,
                    sliding_window=16, bias=True, norm="rmsnorm", pos_emb="rope",
                    rope_theta=150000.0, tie_weights=False),
    # Llama 3 (Grattafiori et al., 2024) in miniature: grouped-query attention, theta 500000,
    # SwiGLU as wide as Llama 3's rule makes it (ffn_dim_multiplier 1.3, default_ffn_width).
    "Llama3-lite": dict(d_model=1024, n_heads=16, n_kv_heads=4, n_blocks=8, ffn="swiglu",
                        ffn_dim_multiplier=1.3, norm="rmsnorm", pos_emb="rope",
                        rope_theta=500000.0, tie_weights=False),
    # The pico preset plus QK-norm: of the speedrun's blocks, the one that helped pico trained
    # with Muon (tools/recipe_ablation.py, docs/recipe.md; on section 7.2's nanoGPT recipe other
    # ideas led). The others stay switches. A preset fixes the model, not the optimizer: train
    # it with --optimizer muon.
    "speedrun": dict(d_model=128, n_heads=4, n_blocks=3, ffn="swiglu", norm="rmsnorm",
                     pos_emb="rope", tie_weights=True, qk_norm=True),
}


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)) (pre-norm, as GPT-2 and Llama);
    or norm(x + attn(x)), then norm(x + ffn(x)) (post-norm, as the 2017 Transformer).
    `index` counts from 0; with a sliding window the even blocks slide; with nope_interval
    some blocks ignore the rope they are given (TransformerConfig.uses_rope)."""

    def __init__(self, config: TransformerConfig, index: int) -> None:
        super().__init__()
        c = config
        self.pre_norm = c.norm_position == "pre"
        self.uses_rope = c.uses_rope(index)
        self.attention_norm = make_norm(c.norm, c.d_model, c.bias, c.norm_eps)
        if c.attention == "softmax":
            self.attention = CausalSelfAttention(
                c.d_model, c.n_heads, c.n_kv_heads, bias=c.bias, dropout=c.dropout,
                impl=c.attention_impl, sinks=c.attention_sinks, window=c.window(index),
                head_dim=c.head_dim, qk_norm=c.qk_norm, norm_eps=c.norm_eps,
                qkv_bias=c.qkv_bias, value_embeddings=c.value_embeddings)
        else:
            gate = c.linear_attention_gate if c.attention == "gated_linear" else None
            self.attention = LinearAttention(c.d_model, c.n_heads, c.n_kv_heads, c.bias, gate)
        self.ffn_norm = make_norm(c.norm, c.d_model, c.bias, c.norm_eps)
        if c.n_experts:
            self.ffn = MixtureOfExperts(c.d_model, c.d_ff, c.ffn, c.n_experts, c.experts_per_token,
                                        c.bias, c.dropout)
        else:
            self.ffn = FeedForward(c.d_model, c.d_ff, c.ffn, c.bias, c.dropout)
        self.residual_dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, rope, cache=None, value_embedding=None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model). cache: the attention's KVCache or
        LinearAttentionState. value_embedding: (B, T, Hkv D) or None (CausalSelfAttention)."""
        rope = rope if self.uses_rope else None
        extra = {} if value_embedding is None else {"value_embedding": value_embedding}
        if self.pre_norm:
            x = x + self.residual_dropout(self.attention(self.attention_norm(x), rope, cache, **extra))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attention_norm(x + self.residual_dropout(self.attention(x, rope, cache, **extra)))
        return self.ffn_norm(x + self.ffn(x))


@dataclasses.dataclass
class TransformerState:
    """Generation state: one cache per block (a KVCache, or a LinearAttentionState) and the
    position of the next token."""

    caches: list
    position: int = 0


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2; the nanoGPT speedrun, at 30 and later 15): cap tanh(logits /
    cap) squashes every logit smoothly into (-cap, cap), so the model cannot buy lower loss with
    ever larger logits; about the identity for |logits| << cap. cap 0 = off. (..., V) -> (..., V)."""
    return cap * torch.tanh(logits / cap) if cap else logits


class TransformerModel(nn.Module):
    """Decoder-only Transformer, as GPT-2: token embedding (+ positions), n blocks, final
    norm, unembedding (tied to the embedding or not). tokens (T, B) -> logits (T, B, vocab).

    Options of the nanoGPT speedrun (modded-nanogpt, Jordan et al., 2024), off by default:
    - value embeddings: a second embedding table whose rows every block adds, with a learned
      weight, to its attention values, so each token's identity reaches every layer's values
      (the speedrun has three tables, for its first and last three layers; here one serves all);
    - U-net skips: the output of block i in the first half is added, with a learned weight
      starting at 1, to the input of block L-1-i;
    - zero-initialized output projections (out_proj and w2): every pre-norm block starts as
      the identity, and the loss starts at the embeddings' own prediction;
    - logit soft-capping (soft_cap, in `logits`).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (nn.Embedding(config.block_size, config.d_model)
                                   if config.pos_emb == "learned" else None)
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.yarn_factor,
                                       config.yarn_original_context, config.rope_scaling)
                       if config.pos_emb == "rope" else None)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.value_embedding = (nn.Embedding(config.vocab_size, config.n_kv_heads * config.head_dim)
                                if config.value_embeddings else None)
        self.blocks = nn.ModuleList(TransformerBlock(config, index) for index in range(config.n_blocks))
        self.skip_weights = nn.Parameter(torch.ones(config.n_blocks // 2)) if config.unet_skips else None
        # Post-norm blocks already end in a norm; a final norm belongs to pre-norm stacks.
        self.final_norm = make_norm(config.norm if config.norm_position == "pre" else "none",
                                    config.d_model, config.bias, config.norm_eps)
        self.unembedding = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.unembedding.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the stream stays O(1).
        for name, parameter in self.named_parameters():
            if name.endswith(("out_proj.weight", "w2.weight")):
                nn.init.normal_(parameter, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_blocks))
                if config.zero_init_proj:
                    nn.init.zeros_(parameter)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_context(self) -> int:
        return self.config.block_size

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> TransformerState:
        return TransformerState([block.attention.new_cache(batch, self.config.block_size, device, dtype)
                                 for block in self.blocks])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(tokens))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., vocab): the unembedding, soft-capped if the config says so."""
        return soft_cap(self.unembedding(features), self.config.logit_softcap)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T, B) -> final normalized residual stream (T, B, d_model)."""
        return self._residual_stream(tokens, None)

    def forward_incremental(self, tokens: torch.Tensor, state: TransformerState | None):
        """tokens: (T, B), state or None -> logits (T, B, vocab) and the state (a
        TransformerState: each block's cache and the next position). New tokens sit after the
        cached ones (positions state.position ..) and join the caches."""
        if state is None:
            state = self.new_state(tokens.shape[1], tokens.device, self.token_embedding.weight.dtype)
        return self.logits(self._residual_stream(tokens, state)), state

    def _residual_stream(self, tokens: torch.Tensor, state: TransformerState | None) -> torch.Tensor:
        """tokens (T, B), placed after the state's cached tokens (none without a state) ->
        (T, B, d_model); the state's position moves on by T."""
        idx = tokens.t()                                                   # (B, T)
        T = idx.shape[1]
        start = state.position if state is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.config.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.residual_stream_at(idx, positions, state.caches if state is not None else None)
        if state is not None:
            state.position = start + T
        return x

    def residual_stream_at(self, idx: torch.Tensor, positions: torch.Tensor,
                           caches: list | None) -> torch.Tensor:
        """idx (B, T) at positions (T,), each block with its cache or none -> final normalized
        residual stream (T, B, d_model). (Appendix A.2's decoder calls it with caches and
        positions of its own.)"""
        x = self.token_embedding(idx)                                      # (B, T, d_model)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        elif self.config.pos_emb == "sinusoidal":
            # Unit-amplitude sinusoids on embeddings of std 0.02 would drown the tokens (the
            # 2017 Transformer scaled its embeddings up instead); at the embeddings' scale
            # they start as learned positions do.
            sinusoids = sinusoidal_position_embedding(positions, self.config.d_model)
            x = x + INIT_STD * sinusoids.to(x.dtype)
        x = self.embedding_dropout(x)
        rope = self.rotary.angles(positions) if self.rotary is not None else None
        value_embedding = self.value_embedding(idx) if self.value_embedding is not None else None
        half, skips = self.config.n_blocks // 2, []                        # U-net skips
        for layer, block in enumerate(self.blocks):
            if self.skip_weights is not None and layer >= self.config.n_blocks - half:
                x = x + self.skip_weights[layer - (self.config.n_blocks - half)] * skips.pop()
            x = block(x, rope, caches[layer] if caches is not None else None, value_embedding)
            if self.skip_weights is not None and layer < half:
                skips.append(x)
        return self.final_norm(x).transpose(0, 1)                          # (T, B, d_model)


def build_model(config: KGramConfig | LSTMConfig | TransformerConfig, vocab_size: int,
                seed: int) -> nn.Module:
    """The model a config describes, for a `vocab_size`-token vocabulary, initialized
    from `seed` (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    if isinstance(config, KGramConfig):
        return KGramMLPSeqModel(vocab_size, config.k, config.embed_size, config.num_inner_layers,
                                config.variant, config.chunk_size)
    if isinstance(config, LSTMConfig):
        return LSTMSeqModel(vocab_size, config.embed_size, config.embed_size, config.num_layers)
    return TransformerModel(dataclasses.replace(config, vocab_size=vocab_size))


# =============================================================================
# 3. The loss
# =============================================================================
# Next-token prediction is classification at every position: the logits at
# position t score every vocabulary entry as token t+1, and the loss is the
# cross-entropy of the true next token, -log softmax(logits)[target], in nats.
# Padding positions (mask False) never count. Written out from the definitions
# so each can be read and tested against PyTorch's own. Training calls this loss
# through `speed_up` (Appendix A), which by default swaps in PyTorch's
# F.cross_entropy, or on a CPU with a large vocabulary a chunked loss that never
# holds all the logits at once; both give the same values (tested), and
# `--loss plain` trains with this one. A batch holds the inputs, the targets (the
# same tokens one position on) and the mask of real targets. `softmax` and
# `cross_entropy` are the textbook definitions (sampling, section 4, uses the first);
# training reads token_cross_entropy through NextTokenLoss, and masked_cross_entropy
# is the definition NextTokenLoss is tested against.

@dataclasses.dataclass
class Batch:
    """A padded batch. inputs/targets: (seq_len, batch) int64; mask: (seq_len, batch) bool,
    True where the target is a real token (padding never enters the loss)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        """On CUDA, copy from pinned (page-locked) host memory without blocking the host,
        which goes on to queue the step's kernels behind the copy. (It overlaps little GPU
        work: training_step waits for its loss before the optimizer's update, the only work
        still queued when the next step's batch is made.)"""
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
    padded = np.full((len(pieces), seq_len + 1), pad_id, dtype=np.int64)   # (batch, seq_len + 1)
    valid = np.zeros((len(pieces), seq_len + 1), dtype=bool)               # True: a real token
    for row, piece in enumerate(pieces):
        padded[row, : len(piece)] = piece
        valid[row, : len(piece)] = True
    tokens = torch.from_numpy(padded).t()                    # (seq_len + 1, batch), as models read
    mask = torch.from_numpy(valid[:, 1:]).t().contiguous()   # (seq_len, batch): target t is real
    return Batch(tokens[:-1].contiguous(), tokens[1:].contiguous(), mask)   # each (seq_len, batch)


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
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return log_sum_exp(logits) - target_logit


def log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dimension, as max + log(sum(exp(x - max)))
    so that large logits do not overflow. (..., V) -> (...). The max is only a shift: the
    result does not depend on it, so its gradient is 0 and autograd is told not to trace it
    (which would cost another pass over all the logits)."""
    maximum = logits.amax(dim=-1, keepdim=True).detach()
    return maximum.squeeze(-1) + (logits - maximum).exp().sum(dim=-1).log()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over any leading dimensions."""
    return token_cross_entropy(logits, targets).mean()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is True (padding excluded).
    logits (T, B, V), targets (T, B), mask (T, B). The definition; training computes the
    same through NextTokenLoss, weighted for a whole optimizer step."""
    losses = token_cross_entropy(logits, targets)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


class NextTokenLoss(nn.Module):
    """A model and its next-token loss in one module: the sum over positions of weight x
    cross-entropy. With weights mask / (number of real targets) that is masked_cross_entropy,
    the mean over real tokens. (Section 5 passes weights scaled to the whole optimizer step,
    so that a step split into micro-batches, or across processes, adds up to the same update;
    under torchrun, DistributedDataParallel wraps this module's forward.) A mixture of
    experts adds its routers' load-balancing loss (router_balance_term)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                position_weights: torch.Tensor) -> torch.Tensor:
        """inputs, targets, position_weights: (T, B) -> sum of weighted nats (a scalar)."""
        logits = self.model(inputs)                                        # (T, B, V)
        nats = (token_cross_entropy(logits, targets) * position_weights).sum()
        return nats + router_balance_term(self.model, position_weights)


def router_balance_term(model: nn.Module, position_weights: torch.Tensor) -> torch.Tensor | float:
    """router_aux_loss_coef x the routers' load-balancing loss (Routing) for the forward just
    run, over the positions with a weight, and weighted as those positions' cross-entropy is:
    times the sum of their weights. 0 for a model without experts. position_weights: (T, B).

    Returned as loss - loss.detach(): its gradient counts, its value is 0, so the loss a step
    reports stays the cross-entropy, comparable with the test loss. (A step's weights, over its
    micro-batches and ranks, come to 1 once DDP averages the ranks' gradients, so a step adds
    coef x the token-weighted mean of their balancing losses, each on its own positions, as
    Switch computes it on each device.)"""
    if not isinstance(model, TransformerModel) or not model.config.n_experts:
        return 0.0          # asked first: walking an LSTM's modules breaks a compiled graph
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    real = position_weights.t().reshape(-1) > 0                 # (B T,): the order the layers see
    balance = sum(layer.routing.load_balancing_loss(real) for layer in layers)
    loss = model.config.router_aux_loss_coef * balance * position_weights.sum()
    return loss - loss.detach()


# =============================================================================
# 4. Sampling and generation
# =============================================================================
# A model gives logits for the next token; a sampling rule turns them into one
# token (greedy: the most likely; otherwise drawn at random after temperature,
# top-k and top-p filtering), which is appended and fed back in.

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (and any tied with the k-th), set the rest to -inf.
    logits (B, V)."""
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
    if p >= 1.0:       # every token: the running sum, rounded, could reach 1 before the tail
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # The mass of the tokens ranked above each one: the running sum shifted by one place
    # (not cumsum - p, whose rounding can put a token that starts exactly at p inside).
    mass_before = F.pad(sorted_probs.cumsum(dim=-1)[..., :-1], (1, 0))
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
    # Shifted so that the largest is 0 before dividing: the same probabilities, and a tiny
    # temperature gives 0 and -inf (greedy) instead of inf - inf = NaN in the softmax. Below
    # float32's smallest subnormal a temperature rounds to 0 (0 / 0 = NaN): clamped at the
    # smallest normal number, well clear of that.
    logits = logits.float()
    temperature = max(rule.temperature, torch.finfo(torch.float32).tiny)
    logits = top_k_filter((logits - logits.max(dim=-1, keepdim=True).values) / temperature,
                          rule.top_k)
    return nucleus_sampling(logits, rule.top_p, generator)


@dataclasses.dataclass
class SamplingConfig:
    """What the samples printed during and after training continue, and how."""

    prompt: str = "Once upon a time"
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 1337


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
                 device: torch.device | str = "cpu",
                 on_token: Callable[[int], None] | None = None,
                 stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Extend `prompt_ids` by up to max_new_tokens ids, stopping after eot_id (or one of
    stop_ids: an imported model's further end ids, a chat model's end of turn); on_token,
    if given, is called with each new id as it is drawn (a progress bar).

    use_cache=True feeds only each new token to forward_incremental (KV cache or
    carried LSTM state); use_cache=False re-reads the whole context every token.
    Both read exactly the same context, so greedy outputs agree: the logits differ only by
    float rounding, which could change a token only at an exact near-tie.
    """
    was_training = model.training
    model.eval()
    try:
        draw_on = sampling_device(device)   # the model's device, except Apple's GPU (Appendix A)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=draw_on).manual_seed(seed)
        ids = list(prompt_ids) or [eot_id if eot_id is not None else 0]
        max_context = getattr(model, "max_context", None)
        start = window_start(len(ids), 0, max_context)
        state = None
        for _ in range(max_new_tokens):
            new_start = window_start(len(ids), start, max_context)
            if new_start != start or not use_cache:
                start, state = new_start, None
            read_afresh = state is None
            if read_afresh:   # the whole window; otherwise only the token sampled last
                tokens = torch.tensor(ids[start:], dtype=torch.long, device=device).unsqueeze(1)
            logits, state = model.forward_incremental(tokens, state)   # tokens (T, 1)
            # A broken model (NaN weights) shows in its first logits, so those are checked, not
            # every token's; unchecked, multinomial fails on them, or argmax picks id 0
            if read_afresh and not logits[-1].isfinite().all():
                raise UserError("the model produced non-finite logits (NaN or inf): its weights or "
                                "settings are broken, so it cannot be sampled")
            next_token = sample_next_token(logits[-1].to(draw_on), rule, generator)   # (1,)
            # It goes back in as it is, already on the device; the host reads it only to keep
            # the list and to stop at eot_id (on a GPU, greedy decoding's one wait per token;
            # sampling adds torch.multinomial's two, which check its probabilities on the host)
            tokens = next_token.view(1, 1).to(device)
            next_id = int(next_token[0])
            ids.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if next_id == eot_id or next_id in stop_ids:
                break
        return ids
    finally:
        model.train(was_training)


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                  rule: SamplingRule = SamplingRule(), *, seed: int | None = None,
                  use_cache: bool = True, device: torch.device | str = "cpu",
                  decoder: nn.Module | None = None,
                  on_token: Callable[[int], None] | None = None) -> Generation:
    """Continue `prompt` with the model; one path for every model. decoder: what runs
    forward_incremental in the model's place, by default the model itself (on a GPU the
    run's callers pass Appendix A.2's prompt_decoder, the same outputs faster)."""
    prompt_ids = tokenizer.encode(prompt)
    ids = generate_ids(model if decoder is None else decoder, prompt_ids, max_new_tokens, rule,
                       eot_id=tokenizer.eot_id, seed=seed, use_cache=use_cache, device=device,
                       on_token=on_token, stop_ids=getattr(tokenizer, "stop_ids", frozenset()))
    new_ids = [i for i in ids[len(prompt_ids):] if i != tokenizer.eot_id]
    new_text = decode_continuation(tokenizer, prompt_ids, new_ids)
    return Generation(prompt + new_text, new_text, ids, len(prompt_ids))


# How far back decode_continuation looks for context ids that read as whole characters
CONTEXT_IDS = 16


def decode_continuation(tokenizer, context_ids: list[int], new_ids: list[int]) -> str:
    """The text of new_ids as it reads after context_ids: decoded with the last context ids
    before them, whose own text is then cut off. Some decoders (SentencePiece's: Llama 2,
    Mistral) drop the leading space of a text's first token, which after a prompt is part of
    the token ("the cat sat" + " on" must not read "the cat saton"). The context goes back
    (CONTEXT_IDS at most) past ids that read as nothing (special tokens) or as part of a
    character (U+FFFD: a byte-fallback decoder would read those bytes and the next ones as
    one broken run)."""
    context = ""
    for n in range(1, min(len(context_ids), CONTEXT_IDS) + 1):
        context = tokenizer.decode(context_ids[-n:])
        if context and "\ufffd" not in context:
            break
    if not context:
        return tokenizer.decode(new_ids)
    text = tokenizer.decode(context_ids[-n:] + new_ids)
    return text[len(context):] if text.startswith(context) else tokenizer.decode(new_ids)


STARTER_SAMPLING_RULES = (SamplingRule(temperature=0.0), SamplingRule(top_p=0.95),
                          SamplingRule(top_p=1.0))


def sampling_rules(sampling: SamplingConfig) -> list[SamplingRule]:
    """The starter's greedy / top-p 0.95 / top-p 1.0, plus the configured rule if it differs."""
    configured = SamplingRule(sampling.temperature, sampling.top_k, sampling.top_p)
    if configured.temperature == 0:  # greedy whatever top_k and top_p say: the starter's own
        configured = STARTER_SAMPLING_RULES[0]
    rules = list(STARTER_SAMPLING_RULES)
    return rules if configured in rules else rules + [configured]


# =============================================================================
# 5. Training and evaluation
# =============================================================================
# One optimizer step: the loss of a batch, its gradient, clipping, AdamW (or Muon
# for the hidden matrices, as the nanoGPT speedrun trains them). One
# training run: steps over shuffled batches with a warm-up and a cosine learning
# rate, and an evaluation on the held-out test set after every epoch. The loop
# calls the appendices at named points: `speed_up` (A) picks the kernels and the
# loss, `guard` (B) resumes, checkpoints, stops on a signal and deals with a
# non-finite step, `context` (C) hands this process its share of each batch
# under torchrun. Left at their defaults, C does nothing and B only stops a run
# whose loss explodes or becomes NaN. `data` is section 6.3's TrainingData; log_step,
# record_samples, record_expert_usage and final_summary write the run log, and say and
# progress_bar the console (section 7.1).

@torch.no_grad()
def gradient_clipping(parameters: Iterable[nn.Parameter], max_l2_norm: float) -> torch.Tensor:
    """Scale all gradients by max_l2_norm / (norm + 1e-6) when their one global L2 norm
    exceeds max_l2_norm. Returns the norm before clipping, a 0-dim tensor: comparing it on the
    host here would make the CPU wait for a GPU, so the scale is capped at 1 on the device
    instead (torch.nn.utils.clip_grad_norm_'s way)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # The global norm is the norm of the tensors' norms. torch._foreach_norm is
    # [torch.linalg.vector_norm(g) for g in grads] (and _foreach_mul_ the loop of mul_ below)
    # in one kernel launch for all the tensors, where a GPU would otherwise launch one each.
    total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if math.isfinite(max_l2_norm):
        scale = (max_l2_norm / (total_norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale)          # for grad in grads: grad.mul_(scale)
    return total_norm


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
            self.adamw_step(group)
        return loss

    def adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.next_step_state(p)
            t = state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = state["exp_avg_sq"].sqrt().div_(math.sqrt(1 - beta2 ** t)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** t))

    def next_step_state(self, p: torch.Tensor) -> dict:
        """p's state with its step count advanced: at the first step, step 1 and zero moments."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        return state


# The quintic's coefficients (Keller Jordan's Muon): a large slope at 0 (3.4445) lifts small
# singular values to about 1 in a few steps; the price is that they end anywhere in about
# [0.68, 1.21] instead of converging to exactly 1, which costs the update nothing measurable.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_orthogonalize(matrix: torch.Tensor, steps: int = 5,
                                dtype: torch.dtype | None = None) -> torch.Tensor:
    """About U V^T for matrix = U S V^T (r, c): every singular value pushed towards 1.

    Each step is X <- a X + b (X X^T) X + c (X X^T)^2 X, which applies the odd polynomial
    p(s) = a s + b s^3 + c s^5 to every singular value and keeps the singular vectors.
    Scaled to Frobenius norm 1 first, all singular values lie in [0, 1], where five
    applications of p take any value above 3e-3 into [0.68, 1.21]. A wide product X X^T is
    the cheaper one, so a tall matrix is transposed. Only matmuls, so it runs fast on a GPU.
    dtype None: bfloat16 on a GPU with bf16 units (has_bf16_units, Appendix A), as the reference
    runs it (the result need only be roughly orthogonal), else float32. matrix may also be a
    stack of one shape, (N, r, c), each orthogonalized alone (Appendix A.3)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    if dtype is None:
        dtype = torch.bfloat16 if has_bf16_units(matrix.device) else torch.float32
    x = matrix.float()
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT                                                   # (r, r), r <= c
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(matrix.dtype)


class Muon(AdamW):
    """Muon (Jordan et al., 2024): momentum, then the update orthogonalized, for the hidden
    weight matrices; section 5's AdamW for every group without "muon": True.

    Per matrix W (r, c) with gradient g, momentum beta, in a group marked "muon":
        m <- beta m + (1 - beta) g;  u = (1 - beta) g + beta m  (Nesterov)
        W <- W - lr * weight_decay * W - lr * 0.2 sqrt(max(r, c)) newton_schulz_orthogonalize(u)
    The orthogonalized update has every singular value about 1: each direction the gradient
    spans moves by the same amount, so rare directions are not drowned by the dominant ones.
    That geometry suits matrices that map a hidden vector to another, not embeddings (a row
    per token: a lookup, not a map), the output layer, nor 1-D gains and biases; those stay
    with AdamW. The scale 0.2 sqrt(max(r, c)) (Liu et al., 2025, "Muon is Scalable for LLM
    Training") gives an exactly orthogonal update an RMS of 0.2 per entry (0.17 to 0.19 after
    the five quintic steps below), about AdamW's, so Muon shares AdamW's learning rate, weight
    decay and schedule; Keller Jordan's max(1, r / c)^0.5 instead needs a
    learning rate of its own (0.02 to 0.05). Under DDP every rank orthogonalizes the same
    all-reduced gradient, so the ranks stay identical.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, **adamw) -> None:
        super().__init__(params, lr=lr, **adamw)
        for group in self.param_groups:
            group.setdefault("muon", False)
            group.setdefault("momentum", momentum)
            group.setdefault("nesterov", nesterov)
            group.setdefault("ns_steps", ns_steps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (self.muon_step if group["muon"] else self.adamw_step)(group)
        return loss

    def muon_step(self, group: dict) -> None:
        beta = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            momentum = state["momentum_buffer"].lerp_(p.grad, 1 - beta)
            update = p.grad.lerp(momentum, beta) if group["nesterov"] else momentum
            update = newton_schulz_orthogonalize(update, group["ns_steps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))


@dataclasses.dataclass
class TrainingConfig:
    """How a model is trained (the flags of the training group)."""

    epochs: int = 12
    batch_size: int = 16                 # examples per optimizer step (all ranks together)
    learning_rate: float = 3e-3          # peak, after warm-up
    weight_decay: float = 0.01
    beta2: float = 0.999                 # Adam's second-moment decay (beta1 stays 0.9)
    optimizer: str = "torch"             # torch (fused kernel) | scratch (section 5's AdamW) | muon
    grad_clip: float = 1.0               # global L2 norm; 0 = off
    lr_schedule: str = "cosine"          # cosine | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1            # the cosine ends at learning_rate * this
    grad_accum_steps: int = 1            # micro-batches per step (same update, less memory)
    max_steps_per_epoch: int | None = None
    seed: int = 1337
    dtype: str | None = None             # float32 | bfloat16; None = per device
    log_interval: int = 10
    sample_interval: int = 0             # also sample every N steps (0 = only at the end)
    quiet: bool = False
    # Appendix B: what to do about non-finite steps and a stalling test loss.
    skip_nonfinite: int = 0
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    plateau_patience: int = 0
    plateau_factor: float = 0.5
    lr_min: float = 0.0                  # reduce-on-plateau's floor (min_lr_ratio is the cosine's)


def build_optimizer(model: nn.Module, training: TrainingConfig, device: torch.device):
    """AdamW with decay on matrices and embeddings only; norms' gains and biases are
    not pulled towards zero. PyTorch's fused kernel on CUDA, the CPU and Apple's GPU (one pass
    over the parameters: on a CPU several times the foreach kernel's speed, docs/performance.md;
    MPS has no foreach kernels, so foreach there is a loop over the tensors).
    beta2 0.999 averages squared gradients over ~1000 steps; small, noisy batches do better
    with a shorter memory (nanoGPT's character-level config uses 0.99, GPT-2 runs 0.95).
    --optimizer muon: Muon for the hidden matrices (muon_matrices), AdamW for the rest, one
    learning rate for all (Muon's update is scaled to AdamW's size); on a CUDA GPU Appendix A.3's
    ForeachMuon, the same steps in fewer launches."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=training.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    if training.optimizer == "muon":
        hidden = {id(p) for p in muon_matrices(model)}
        muon_group = dict(params=[p for p in params if id(p) in hidden],
                          weight_decay=training.weight_decay, muon=True)
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in hidden]
        muon = ForeachMuon if device.type == "cuda" else Muon        # Appendix A.3
        return muon([muon_group, *groups], lr=training.learning_rate, betas=(0.9, training.beta2))
    if training.optimizer == "scratch":
        return AdamW(groups, lr=training.learning_rate, betas=(0.9, training.beta2))
    fast = dict(fused=True) if device.type in ("cuda", "cpu", "mps") else dict(foreach=True)
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, training.beta2), **fast)


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights Muon trains: every matrix except embedding tables (the one-hot k-gram's
    first layer is one: a row per token) and the output layer (and, tied to it, the token
    embedding), whose rows belong to tokens, not to directions of the hidden space."""
    token_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if getattr(model, "unembedding", None) is not None:
        token_tables.add(id(model.unembedding.weight))
    if getattr(model, "onehot_weight", None) is not None:
        token_tables.add(id(model.onehot_weight))
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2
            and id(p) not in token_tables]


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


def learning_rate_at(step: int, total_steps: int, training: TrainingConfig) -> float:
    """The learning rate for 0-based training step `step` (warm-up counts from step 1,
    so the first update is not wasted at lr 0)."""
    if training.lr_schedule == "cosine":
        return get_lr_cosine_schedule(step + 1, training.learning_rate,
                                      training.learning_rate * training.min_lr_ratio,
                                      training.warmup_steps, total_steps)
    warmup = min((step + 1) / training.warmup_steps, 1.0) if training.warmup_steps else 1.0
    return training.learning_rate * warmup


class NonFiniteStep(Exception):
    """training_step found a NaN or infinite loss or gradient norm and did not update."""

    def __init__(self, quantity: str, value: float) -> None:
        super().__init__(f"{quantity} became {value}")


def training_step(loss_model: nn.Module, optimizer, micro_batches: list[tuple[Batch, bool]],
                  step_tokens: int, grad_clip: float, context: "Distributed | None" = None,
                  dtype: str | None = None) -> float:
    """One optimizer update; returns the step's mean train loss over all its tokens.

    Each position's loss weighs 1 / step_tokens (the real targets of the whole step,
    over all ranks and micro-batches), so the update is the same token mean whatever
    the split. DDP averages gradients over ranks, so each rank scales by world_size.
    Only the last micro-batch synchronizes gradients across ranks. Raises
    NonFiniteStep, before updating anything, when the loss or gradient norm is NaN or inf.
    micro_batches: (batch, active) pairs; active is False only for a stand-in batch that a
    torchrun rank with nothing left runs so as to join the gradient sync (Appendix C), and
    weighs nothing. dtype: None, "float32" or "bfloat16" (see autocast_context).
    """
    context = context or Distributed()
    scale = context.world_size / max(step_tokens, 1)
    optimizer.zero_grad(set_to_none=True)
    local_loss = 0.0
    for index, (batch, active) in enumerate(micro_batches):
        weights = batch.mask.float() * (scale if active else 0.0)
        last = index == len(micro_batches) - 1
        with context.gradient_sync(loss_model, last):           # C: ranks sync the last only
            with autocast_context(batch.inputs.device, dtype):  # A: bf16 where it pays
                loss = loss_model(batch.inputs, batch.targets, weights)
            loss.backward()
        local_loss = local_loss + loss.detach()    # a tensor: no wait for the device per micro-batch
    # an infinite limit only measures the norm, so a bad gradient is caught without clipping
    grad_norm = gradient_clipping(loss_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # The step's one wait for the device: the loss summed over the ranks where it lies (C), then
    # read with the gradient norm in one copy, both checked before the update.
    summed_loss = context.sum_in_place(local_loss.float())
    summed_loss, grad_norm = torch.stack([summed_loss, grad_norm.to(summed_loss.device).float()]).tolist()
    step_loss = summed_loss / context.world_size
    if not math.isfinite(step_loss):
        raise NonFiniteStep("loss", step_loss)
    if not math.isfinite(grad_norm):
        raise NonFiniteStep("gradient norm", grad_norm)
    optimizer.step()
    return step_loss


@torch.no_grad()
def evaluate(loss_model: nn.Module, batches: Iterable[Batch], device: torch.device,
             token_bytes: torch.Tensor, context: "Distributed | None" = None,
             dtype: str | None = None) -> dict:
    """Per-token test loss in nats, and bits per byte (total nats / UTF-8 bytes of the
    predicted text / ln 2), which compares fairly across tokenizers. loss_model is a
    NextTokenLoss or one of Appendix A's. Under torchrun each rank passes its
    share of the batches and the totals are summed over ranks."""
    was_training = loss_model.training
    loss_model.eval()
    nats, counts = [], []                               # per batch; counts: tokens, bytes
    for batch in batches:
        batch = batch.to(device)
        with autocast_context(device, dtype):
            nats.append(loss_model(batch.inputs, batch.targets, batch.mask.float()).float())
        counts.append(torch.stack([batch.mask.sum(), (token_bytes[batch.targets] * batch.mask).sum()]))
    loss_model.train(was_training)
    # Read at the end, in two copies (the nats, the counts): a number read per batch would make
    # the host wait for a GPU each time
    total_nats = float(torch.stack(nats).cpu().double().sum()) if nats else 0.0
    total_tokens, total_bytes = torch.stack(counts).sum(dim=0).tolist() if counts else (0, 0)
    if context is not None:
        total_nats, total_tokens, total_bytes = context.sum([total_nats, total_tokens, total_bytes],
                                                            device)
        total_tokens, total_bytes = int(total_tokens), int(total_bytes)
    return {"test_loss": total_nats / max(total_tokens, 1),
            "test_bits_per_byte": total_nats / max(total_bytes, 1) / math.log(2),
            "test_tokens": total_tokens}


@dataclasses.dataclass
class TrainingProgress:
    """Where one model's training stands; stored in every checkpoint."""

    step: int = 0                  # optimizer steps taken, skipped non-finite ones included
    epoch: int = 1                 # the 1-based epoch in progress
    batches_done: int = 0          # batches of `epoch` already trained on
    tokens_seen: int = 0
    train_time_s: float = 0.0      # seconds inside training steps
    elapsed_s: float = 0.0         # wall-clock seconds since training started
    nonfinite_steps: int = 0       # steps skipped under --skip_nonfinite
    lr_scale: float = 1.0          # reduce-on-plateau factor applied to the schedule
    best_test_loss: float = math.inf
    epochs_without_improvement: int = 0
    finished: bool = False         # trained all epochs or stopped early


def train_one_model(name: str, model: nn.Module, data: TrainingData, training: TrainingConfig,
                    sampling: SamplingConfig, device: torch.device, tokenizer, record: dict,
                    runlog: "RunLog | None" = None, *, speed: "SpeedConfig | None" = None,
                    guard: "FaultTolerance | None" = None,
                    context: "Distributed | None" = None) -> dict:
    """Train `model` for training.epochs epochs, evaluating on the test set after each;
    fills `record` (this model's part of the run log) and returns its final summary."""
    context = context or Distributed()                          # C: one process unless torchrun
    guard = guard or FaultTolerance(name, training)             # B: by default, only stops
    optimizer = build_optimizer(model, training, device)
    progress = guard.start(model, optimizer, record, tokenizer)  # B: resume, or a fresh start
    loss_model = speed_up(model, speed or SpeedConfig(), device,   # A: the fast-path switch
                          lengths_vary=data.data_format == "lines")
    step_model = wrap_for_training(loss_model, context, device)  # C: DDP under torchrun
    total_steps = data.steps_per_epoch(training.batch_size, training.max_steps_per_epoch) * training.epochs
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(device)
    bar = progress_bar(total_steps, name, training.quiet, done=progress.step)
    started = time.perf_counter() - progress.elapsed_s
    model.train()
    while progress.epoch <= training.epochs and not progress.finished:
        epoch = progress.epoch
        # slots: this step's examples, as (source, example) index pairs (section 6.3)
        for slots in data.train_step_slots(training.batch_size, training.max_steps_per_epoch,
                                           epoch, skip=progress.batches_done):
            step_started = time.perf_counter()
            lr = learning_rate_at(progress.step, total_steps, training) * progress.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            progress.step += 1
            progress.batches_done += 1
            micro_batches = rank_micro_batches(data, slots, training.grad_accum_steps, context, device)
            step_tokens = data.target_tokens(slots)
            context.own_dropout_masks(training.seed, progress.step, device)  # C: per-rank dropout
            try:
                loss = training_step(step_model, optimizer, micro_batches, step_tokens,
                                     training.grad_clip, context, training.dtype)
                guard.check_loss(loss, lr)                      # B: an exploded loss stops the run
            except NonFiniteStep as problem:
                guard.skip_step(problem, lr, bar)               # B: --skip_nonfinite, else stop
                loss = None                                     # a skipped step is not logged
            progress.train_time_s += time.perf_counter() - step_started
            progress.elapsed_s = time.perf_counter() - started
            if loss is not None:
                progress.tokens_seen += step_tokens
                log_step(name, record, progress, epoch, loss, lr, total_steps, training, bar)
                if (training.sample_interval and progress.step % training.sample_interval == 0
                        and progress.step < total_steps and context.is_main):
                    record_samples(model, tokenizer, sampling, device, progress.step, record, bar,
                                   quiet=training.quiet, dtype=training.dtype)
            guard.after_step()                                  # B: checkpoint every N steps; signals
        if data.has_test_set:
            batches = data.test_batches(training.batch_size, context.rank, context.world_size)
            batches = guard.stoppable(batches)                  # B: Ctrl-C stops between batches
            result = evaluate(loss_model, batches, device, token_bytes, context, training.dtype)
            record["test_history"].append({"epoch": epoch, "step": progress.step, **result})
            if not training.quiet:
                say(f"[{name}] epoch {epoch} test loss {result['test_loss']:.4f} "
                    f"({result['test_bits_per_byte']:.3f} bits/byte)", bar)
            guard.after_evaluation(result["test_loss"], bar)    # B: early stopping, plateau
        record_expert_usage(model, record, epoch, context, device)
        progress.epoch, progress.batches_done = epoch + 1, 0
        if runlog is not None:
            runlog.write()
        guard.stop_if_requested()                               # B: Ctrl-C or SIGTERM
    if bar is not None:
        bar.close()
    if context.is_main:
        record_samples(model, tokenizer, sampling, device, progress.step, record, None, final=True,
                       quiet=training.quiet, dtype=training.dtype)
    progress.finished = True
    record["final"] = final_summary(record, progress.train_time_s, time.perf_counter() - started)
    guard.stop_if_requested()
    guard.save_checkpoint()
    context.barrier()                    # C: the others wait for rank 0's final checkpoint
    return record["final"]


def rank_micro_batches(data: TrainingData, slots: list[tuple[int, int]], accumulation: int,
                       context: "Distributed", device: torch.device) -> list[tuple[Batch, bool]]:
    """This rank's share of one step's examples, as `accumulation` micro-batches (as many as
    the step has examples, if fewer).

    Returns (batch, active) pairs. Every rank runs the same number of micro-batches
    (DDP needs each rank in each gradient sync); a rank whose share is empty at the
    end of an epoch runs a stand-in batch with active=False, which weighs nothing."""
    share = context.shard(slots)
    accumulation = min(accumulation, len(slots))   # no more micro-batches than examples
    pieces = [share[i::accumulation] for i in range(accumulation)]
    return [(data.batch_of(piece or slots[:1]).to(device), bool(piece)) for piece in pieces]


# #############################################################################
# PART II. RUNNING EXPERIMENTS
# #############################################################################

# =============================================================================
# 6. Data and tokenizers
# =============================================================================
# --- 6.1 Tokenizers -----------------------------------------------------------------
# A tokenizer turns text into ids and back: GPT-2's byte-pair encoding (through
# tiktoken; its merge ranks ship in data/gpt2.tiktoken, so nothing is downloaded),
# plain UTF-8 bytes, or a BPE trained on the run's own text (Appendix D). Each
# has name, vocab_size, eot_id, encode, encode_batch, decode and token_byte_lengths.

GPT2_RANKS_PATH = DATA_DIR / "gpt2.tiktoken"

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

END_OF_TEXT = "<|endoftext|>"

GPT2_VOCAB_SIZE = 50257   # 50000 merges, 256 bytes and <|endoftext|>

def load_gpt2_encoding(ranks_path: Path = GPT2_RANKS_PATH):
    """Build tiktoken's GPT-2 (r50k_base) encoding from the shipped ranks file."""
    try:
        digest = hashlib.sha256(Path(ranks_path).read_bytes()).hexdigest()
    except OSError as error:
        raise UserError(f"cannot read the GPT-2 ranks file {ranks_path}: {error.strerror}; "
                        "restore data/gpt2.tiktoken from the repository") from None
    if digest != GPT2_RANKS_SHA256:
        raise UserError(f"{ranks_path} has sha256 {digest[:12]}..., expected {GPT2_RANKS_SHA256[:12]}...; "
                        "restore data/gpt2.tiktoken from the repository")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                             mergeable_ranks=load_tiktoken_ranks(ranks_path),
                             special_tokens={END_OF_TEXT: 50256}, explicit_n_vocab=GPT2_VOCAB_SIZE)


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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (part of a character, for some)."""
        return self.encoding.decode_single_token_bytes(token_id)

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
                lengths[token_id] = len(self.token_bytes(token_id))
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

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eot_id] = 0
        return lengths


def is_count(text: str) -> bool:
    """Whether `text` is a whole number written in the digits 0-9 (str.isdigit alone also
    takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()


MAX_BPE_VOCAB = 2**32   # the token cache holds ids as uint32 past 65,536 (section 6.3)


def parse_tokenizer_spec(spec: str) -> tuple[str, int]:
    """'gpt2' | 'char' | 'bpe:N' -> (kind, N); UserError otherwise."""
    if spec in ("gpt2", "char"):
        return spec, 0
    kind, _, size = spec.partition(":")
    digits = size.lstrip("0") or "0"
    if kind == "bpe" and is_count(size) and (len(digits) > 10 or int(digits) > MAX_BPE_VOCAB):
        shown = f"{int(digits):,}" if len(digits) <= 20 else f"a {len(digits)}-digit number"
        raise UserError(f"--tokenizer bpe:N takes N up to {MAX_BPE_VOCAB:,} (the token cache "
                        f"holds ids as 32-bit numbers), got {shown}")
    if kind == "bpe" and is_count(size) and int(digits) >= 257:
        return "bpe", int(digits)
    raise UserError(f"unknown --tokenizer {spec!r}; choose gpt2, char or bpe:N with N >= 257 "
                    "(256 bytes + <|endoftext|>)")


def tokenizer_vocab_size(spec: str) -> int:
    """The vocabulary size a --tokenizer spec gives (bpe:N: at most N), without building it."""
    kind, size = parse_tokenizer_spec(spec)
    return {"gpt2": GPT2_VOCAB_SIZE, "char": ByteTokenizer.vocab_size}.get(kind, size)


def build_tokenizer(spec: str, training_texts: list[str] | None = None,
                    cache_dir: Path | None = None):
    kind, size = parse_tokenizer_spec(spec)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return ByteTokenizer()
    return train_bpe_tokenizer(training_texts or [], size, cache_dir)


# --- 6.2 Text sources -----------------------------------------------------------------
# Text comes from custom files and from TinyStories (a local copy, or streamed from
# the Hugging Face hub), in one of two formats:
#   lines   every non-empty line is one example, cut at --block_size + 1 tokens and
#           ending in <|endoftext|>: the course's format (3seqs.txt holds one sequence a
#           line). The model never sees across a line break.
#   stream  every document (a file, a story) joins one token stream, documents separated
#           by <|endoftext|>; training reads windows of --block_size + 1 tokens from it,
#           so the model learns what follows a line. How nanoGPT and most trainers read text.

DEFAULT_CUSTOM_CORPUS = DATA_DIR / "custom_corpus"


@dataclasses.dataclass
class DataConfig:
    """Where the examples come from, how they are tokenized, cut and split."""

    input_files: list[str] | None = None
    input_dir: str | None = None
    limit_custom_examples: int | None = None
    tinystories_weight: float = 0.0      # probability that an example comes from TinyStories
    tinystories_max_stories: int = 20000
    tinystories_path: str | None = None
    data_format: str = "auto"            # lines | stream | auto (see resolved_data_format)
    random_offsets: bool = False         # stream: each epoch moves every training window
    block_size: int = 64                 # context length in tokens
    test_fraction: float = 0.1
    tokenizer: str = "char"              # char | gpt2 | bpe:N
    cache_dir: str | None = None
    seed: int = 1337


def check_regular_file(path: Path, what: str) -> None:
    """Only regular files are read: a FIFO blocks until something writes to it, and a
    device such as /dev/zero never ends."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise UserError(f"{what} {path} is not a regular file (a pipe, socket or device); "
                        "give a file")


# A text file is read whole into memory, and held there a few times over (bytes, text, lines,
# the joined document) before it is tokenized; a larger file is refused before it is read.
MAX_INPUT_FILE_BYTES = 2 << 30

# pico-llm's JSON files (run logs, sweep files, tokenizers, a model's config) are megabytes;
# json holds a file a few times over in memory, so a larger one is refused before it is read.
MAX_JSON_FILE_BYTES = 512 << 20


def check_json_size(path: Path) -> None:
    """ValueError, which every reader of a JSON file here turns into its one line already, if
    `path` is larger than any JSON file pico-llm reads."""
    size = os.stat(path).st_size
    if size > MAX_JSON_FILE_BYTES:
        raise ValueError(f"it is {memory_size(size)}, more than the "
                         f"{memory_size(MAX_JSON_FILE_BYTES)} of any JSON file pico-llm reads")


def load_json(path: Path):
    """A JSON file's value. ValueError, which every reader here turns into its one line, if it
    is larger than any JSON file pico-llm reads, not UTF-8 or not JSON (json_value)."""
    check_json_size(path)
    with open(path, encoding="utf-8") as handle:
        return json_value(handle.read())


def json_value(text: str | bytes):
    """json.loads, but a number of more digits than Python converts to an integer
    (sys.get_int_max_str_digits: 4,300 unless set) is said as that, where Python's own
    message advises a programmer's setting (sys.set_int_max_str_digits)."""
    try:
        return json.loads(text)
    except ValueError as error:
        if "integer string conversion" in str(error):
            raise ValueError(f"a number in it has more than {sys.get_int_max_str_digits():,} "
                             "digits") from None
        raise


def digits_of(value: int) -> str:
    """An integer too long to write out in a message, as "a 400-digit number" (str() itself
    refuses past sys.get_int_max_str_digits())."""
    magnitude, limit = abs(value), sys.get_int_max_str_digits()
    sign = "negative " if value < 0 else ""
    if limit and magnitude.bit_length() * math.log10(2) >= limit - 1:
        return f"a {sign}number of more than {limit - 1:,} digits"
    return f"a {len(str(magnitude))}-digit {sign}number"


def read_without_waiting(path: Path) -> bytes:
    """A file's bytes. Opened non-blocking, which changes nothing for a file on disk, so that a
    kernel file that waits for data to come (/proc/kmsg) fails at once instead of hanging."""
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
        raw = handle.read()
    if raw is None:        # nothing to read yet, and a non-blocking read does not wait for it
        raise BlockingIOError(errno.EAGAIN, "it waits for data to be written, as a kernel file "
                                            "does; give a file of text")
    return raw


def read_text(path: Path) -> str:
    """The contents of a UTF-8 text file (without a byte-order mark); UserError on anything
    else."""
    if not path.exists():
        if path.is_symlink():                  # exists() follows links: a broken or looping one
            raise UserError(f"input file {path} is a symbolic link to nothing readable (broken, "
                            "or a loop); give the file it should point to")
        raise UserError(f"input file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass directories with --input_dir")
    check_regular_file(path, "input file")
    size = path.stat().st_size
    if size > MAX_INPUT_FILE_BYTES:
        raise UserError(f"input file {path} is {size / 2**30:.1f} GiB, over the "
                        f"{MAX_INPUT_FILE_BYTES / 2**30:g} GiB pico-llm reads into memory; train "
                        f"on a part of it (e.g. head -n 1000000 {path} > part.txt)")
    try:
        raw = read_without_waiting(path)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        wide = "UTF-32" if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) else "UTF-16"
        raise UserError(f"{path} is {wide} (it starts with a byte-order mark); save it as UTF-8")
    if b"\x00" in raw:
        raise UserError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not valid UTF-8 (bad byte at offset {error.start}); "
                        "re-save it as UTF-8") from None
    return text.removeprefix("\ufeff")       # the byte-order mark some editors write first


class BlankFileError(UserError):
    """A text file with no non-blank line: refused where it was named (--input_files),
    skipped where a folder holds it (--input_dir)."""


def read_text_lines(path: Path) -> list[str]:
    """Lines mode's examples: the non-empty lines of a UTF-8 text file, stripped."""
    lines = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise BlankFileError(f"{path} is empty (no non-blank lines)")
    return lines


def read_document(path: Path) -> str:
    """Stream mode's document: a UTF-8 text file's text as written, its indentation and the
    blank lines between paragraphs kept (code and prose need both), with only its line
    endings made "\n", white space at line ends dropped, and blank lines at the start and end."""
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    document = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    if not document:
        raise BlankFileError(f"{path} is empty (no non-blank lines)")
    return document


def text_files_in(directory: Path) -> list[Path]:
    """The *.txt names under `directory`, sorted; a subdirectory that cannot be read is an
    error, not a directory without text files."""
    if not directory.is_dir() and directory == DEFAULT_CUSTOM_CORPUS:   # no data flag was given
        raise UserError(f"the shipped corpus {directory} is missing (an incomplete checkout?); "
                        "restore it, or give --input_files or --input_dir")
    if not directory.is_dir():
        raise UserError(f"--input_dir {directory} is not a directory")

    def unreadable(error: OSError):
        raise UserError(f"--input_dir: cannot read {quoted(error.filename)} ({error.strerror}); "
                        "check its permissions")

    return sorted(Path(folder) / name
                  for folder, _, names in os.walk(directory, onerror=unreadable)
                  for name in names if name.endswith(".txt"))


def read_text_files_in(directory: Path, read) -> list:
    """What `read` (read_text_lines or read_document) makes of each *.txt file under
    `directory`. A name that is not a regular file (a FIFO would block the read, a device
    never end) and a blank file (a folder of documents may well hold an empty one) are
    skipped, counted in one note; a folder left with no text is refused in one line."""
    texts, skipped = [], []
    for path in text_files_in(directory):
        if not path.is_file():
            skipped.append(path)
            continue
        try:
            texts.append(read(path))
        except BlankFileError:
            skipped.append(path)
    reason = "blank, or not regular files such as pipes, devices or broken links"
    if not texts:
        raise UserError(f"--input_dir {directory} contains no .txt files"
                        + (f" with text (skipped {len(skipped)}: {reason})" if skipped else ""))
    if skipped:
        warn(f"pico-llm: note: --input_dir: skipped {len(skipped)} .txt file(s) ({reason}), "
             f"e.g. {quoted(skipped[0])}")
    return texts


DATA_FORMATS = ("auto", "lines", "stream")
MIN_DOCUMENTS_FOR_HOLDOUT = 20   # fewer documents: each one's tail is its test text


def resolved_data_format(data: DataConfig) -> str:
    """"lines" or "stream". auto: lines for --input_files (the course's one-example-a-line
    files), stream for --input_dir, the shipped corpus and TinyStories (running text)."""
    if data.data_format != "auto":
        return data.data_format
    return "lines" if data.input_files else "stream"


def read_custom_files(data: DataConfig, read) -> list:
    """What `read` (read_text_lines or read_document) makes of each custom text file:
    --input_files as named, then --input_dir's (read_text_files_in), or else the shipped
    corpus's. One file under two names (a hard or symbolic link, a file of --input_dir also
    named in --input_files) is refused: its lines would be in both the test and training sets."""
    seen = {}                                     # (device, inode) -> the name first read

    def read_once(path: Path):
        try:
            status = path.stat()
        except OSError:
            return read(path)                     # which says what is wrong with it
        identity = (status.st_dev, status.st_ino)
        if status.st_ino == 0:                    # a file system without inode numbers
            return read(path)
        if identity in seen:
            twice = (f"{path} would be read twice (in --input_files, and in --input_dir)"
                     if seen[identity] == path else
                     f"{path} and {seen[identity]} are one file (a link, or the same file named "
                     "twice)")
            raise UserError(f"{twice}; give each file once (a link inside --input_dir: move "
                            "it out of the folder)")
        seen[identity] = path
        return read(path)

    texts = [read_once(Path(p)) for p in data.input_files or []]
    if data.input_dir:
        texts += read_text_files_in(Path(data.input_dir), read_once)
    if not texts and data.tinystories_weight < 1.0:
        texts = read_text_files_in(DEFAULT_CUSTOM_CORPUS, read)
    return texts


def custom_documents(data: DataConfig) -> list[str]:
    """Stream mode: one document per file (read_document); with --limit_custom_examples N,
    only the first N non-blank lines of all files count."""
    documents, budget = [], data.limit_custom_examples
    for document in read_custom_files(data, read_document):
        if budget is not None:
            lines = document.split("\n")
            ends = [index + 1 for index, line in enumerate(lines) if line.strip()][:budget]
            document, budget = "\n".join(lines[: ends[-1] if ends else 0]), budget - len(ends)
        if document:
            documents.append(document)
    return documents


def split_documents(documents: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stream mode's fixed split into training and test text, given the seed. With many
    documents (MIN_DOCUMENTS_FOR_HOLDOUT or more), whole documents are held out, as in
    lines mode; with few (say six files), the last test_fraction of each document's lines
    is its test text, so that every document is seen in training and tested on."""
    if len(documents) >= MIN_DOCUMENTS_FOR_HOLDOUT:
        train, test = split_indices(len(documents), test_fraction, seed)
        return [documents[i] for i in train], [documents[i] for i in test]
    heads, tails = [], []
    for document in documents:
        lines = document.split("\n")
        num_test = int(round(len(lines) * test_fraction)) if test_fraction > 0 else 0
        if test_fraction > 0 and len(lines) >= 2:
            num_test = min(max(num_test, 1), len(lines) - 1)
        # A cut next to a blank line leaves it to neither part (a document's first and last
        # lines are never blank, so neither part is empty).
        heads.append("\n".join(lines[: len(lines) - num_test]).strip("\n"))
        if num_test:
            tails.append("\n".join(lines[len(lines) - num_test:]).strip("\n"))
    return heads, tails


def load_custom_examples(data: DataConfig) -> list[str]:
    """Lines mode: the examples (lines) of --input_files and --input_dir (or the shipped corpus)."""
    examples = [line for lines in read_custom_files(data, read_text_lines) for line in lines]
    if data.limit_custom_examples is not None:
        examples = examples[: data.limit_custom_examples]
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
    """The first `max_stories` TinyStories stories, from a local copy or streamed from the hub.
    A local .txt holds a story a line, or, as TinyStories' own TinyStories-valid.txt does,
    stories of several lines with <|endoftext|> between them (stories_between_markers)."""
    import datasets

    # datasets logs a damaged file's error itself; ours is the one line the user sees
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    stories = []
    if local_path:
        path = Path(local_path)
        if not path.exists():
            raise UserError(f"--tinystories_path {path} does not exist")
        if path.is_dir():
            raise UserError(f"--tinystories_path {path} is a directory; give one .json, .jsonl, "
                            ".parquet or .txt file of stories")
        check_regular_file(path, "--tinystories_path")
        if path.stat().st_size == 0:
            raise UserError(f"--tinystories_path {path} is empty; give a file of stories")
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}.get(
            path.suffix.lower())
        if builder is None:
            raise UserError(f"--tinystories_path {path}: expected .json, .jsonl, .parquet or .txt")
        separated = False          # stories between <|endoftext|> lines (TinyStories' .txt)?
        if builder == "text":      # as --input_files: text with NUL bytes is not text
            marker_line = re.compile(rb"\n" + re.escape(END_OF_TEXT.encode()) + rb"\r?\n")
            tail = b"\n"           # the file's start is a line's start
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    if b"\x00" in chunk:
                        raise UserError(f"--tinystories_path {path} looks binary (it contains NUL "
                                        "bytes); give a UTF-8 text file")
                    if not separated:
                        data = tail + chunk              # a marker line cut in two by chunks too
                        separated = marker_line.search(data) is not None
                        tail = data[-(len(END_OF_TEXT) + 2):]
            separated = separated or marker_line.search(tail + b"\n") is not None   # last line
        if builder == "json":
            depth = json_nesting_depth(path, MAX_JSON_NESTING)
            if depth > MAX_JSON_NESTING:
                raise UserError(f"--tinystories_path {path} nests [ and {{ more than "
                                f"{MAX_JSON_NESTING:,} levels deep, where records of stories "
                                "need two (is it JSON?); give a file of records with a 'text' "
                                "string")
        try:  # the file is read while it is iterated, so a damaged one fails in the loop
            stream = datasets.load_dataset(builder, data_files=str(path), split="train",
                                           streaming=True)
            read_stories(stories_between_markers(stream) if separated else stream, max_stories,
                         stories)
        except Exception as error:  # datasets raises many types for unreadable files
            reason = " ".join(str(error).split()) or type(error).__name__
            raise UserError(f"cannot read --tinystories_path {path} as {builder}: "
                            f"{reason[:160]}") from None
    else:
        if not huggingface_hub_reachable():
            raise UserError("cannot reach the Hugging Face hub for TinyStories; download it once "
                            "(e.g. TinyStories-valid.txt) and pass --tinystories_path FILE, "
                            "or use --tinystories_weight 0")
        stream = datasets.load_dataset(TINYSTORIES_HUB_NAME, split="train", streaming=True)
        read_stories(stream, max_stories, stories)
    if not stories:
        raise UserError(f"TinyStories source {local_path or TINYSTORIES_HUB_NAME} has no 'text' records")
    return stories


# pyarrow's JSON reader, which datasets reads .json and .jsonl files with, recurses once a
# level: a file nested some 20,000 levels deep overflows the C stack, and the process dies
# without a word (a segmentation fault). Deeper than this is refused before it is read.
MAX_JSON_NESTING = 1000


def json_nesting_depth(path: Path, stop_above: int, chunk_bytes: int = 1 << 22) -> int:
    """The deepest nesting of [ and { in a JSON (or JSON Lines) file, outside its strings;
    the scan stops once it passes `stop_above`. Read in chunks with numpy, and only the
    brackets and quotes looked at one by one: 0.6 s for 100 MB of stories on a 2-core CPU,
    where a loop over the bytes in Python takes 4.6 s (docs/performance.md). What one
    chunk leaves open (the depth, a string, a run of backslashes) carries to the next."""
    step = np.zeros(256, np.int32)                 # +1 for an opening bracket, -1 a closing one
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    deepest = depth = 0
    in_string, escaping = False, b""
    with open(path, "rb") as handle:
        while deepest <= stop_above and (chunk := handle.read(chunk_bytes)):
            data = escaping + chunk                # an odd run of backslashes from the chunk before
            b = np.frombuffer(data, np.uint8)
            quotes = np.flatnonzero(b == ord('"'))
            slashes = np.flatnonzero(b == ord("\\"))
            if len(slashes):   # a quote after an odd run of backslashes is part of a string
                first = np.diff(slashes, prepend=-2) != 1                # a run's first one
                run_start = np.maximum.accumulate(np.where(first, np.arange(len(slashes)), 0))
                last = np.maximum(np.searchsorted(slashes, quotes) - 1, 0)  # before each quote
                run = np.where(slashes[last] == quotes - 1, last - run_start[last] + 1, 0)
                quotes = quotes[run % 2 == 0]
            brackets = np.flatnonzero(step[b])
            # a bracket is inside a string after an odd number of quotes (and the one open)
            inside = (np.searchsorted(quotes, brackets) + in_string) % 2 == 1
            levels = depth + np.cumsum(step[b[brackets[~inside]]])
            if len(levels):
                deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
            in_string = (len(quotes) + in_string) % 2 == 1
            trailing = len(data) - len(data.rstrip(b"\\"))
            escaping = b"\\" * (trailing % 2)
    return deepest


def stories_between_markers(lines: Iterable[dict]) -> Iterator[dict]:
    """A text file's lines (datasets' "text" records, one a line) regrouped into the stories
    between <|endoftext|> markers, as TinyStories' own .txt files hold them: a story runs over
    several lines, a marker line ends it. Read line by line, those files gave every line as a
    story of its own and the markers as stories too. (A text with no marker on a line of its
    own keeps a story a line.) Yields {"text": story}, its lines joined by newlines."""
    story: list[str] = []
    for record in lines:
        *ended, rest = record["text"].split(END_OF_TEXT)   # a marker may also end a line
        for piece in ended:
            yield {"text": "\n".join(story + [piece])}
            story = []
        story.append(rest)
    if story:
        yield {"text": "\n".join(story)}


def read_stories(stream, max_stories: int, stories: list[str]) -> None:
    """Append the non-empty 'text' of the stream's records to `stories`, up to max_stories."""
    for number, record in enumerate(stream, start=1):
        text = record.get("text") if isinstance(record, dict) else None
        if text is not None and not isinstance(text, str):
            # datasets reads a JSON array of bare values ([1, 2]) as records whose 'text' they
            # are, so the message names the value read, not a field the file may lack
            raise UserError(f"TinyStories record {number} has no 'text' string (read as "
                            f"{type(text).__name__}); each record needs one, as in "
                            '{"text": "Once upon a time..."}')
        text = (text or "").strip()
        if text:
            stories.append(text)
        if len(stories) >= max_stories:
            break


@dataclasses.dataclass
class SourceTexts:
    """The raw texts of one source, its sampling weight and its fixed split: in lines mode
    the examples; in stream mode the documents (or their heads and tails), the training
    ones first, so that each part is one contiguous stretch of the token stream."""

    name: str
    texts: list[str]
    weight: float
    train: np.ndarray
    test: np.ndarray


def read_sources(data: DataConfig) -> list[SourceTexts]:
    """Every source the config names, read and split."""
    stream = resolved_data_format(data) == "stream"
    named = []
    if data.tinystories_weight < 1.0:
        texts = custom_documents(data) if stream else load_custom_examples(data)
        named.append(("custom", texts, 1.0 - data.tinystories_weight))
    if data.tinystories_weight > 0:
        named.append(("tinystories", load_tinystories(data.tinystories_max_stories,
                                                      data.tinystories_path),
                      data.tinystories_weight))
    sources = []
    for name, texts, weight in named:
        if stream:
            train, test = split_documents(texts, data.test_fraction, data.seed)
            texts = train + test
            split = (np.arange(len(train)), np.arange(len(train), len(texts)))
        else:
            split = split_indices(len(texts), data.test_fraction, data.seed)
        sources.append(SourceTexts(name, texts, weight, *split))
    return sources


# --- 6.3 Token cache, splits and batches ----------------------------------------------
# Tokenized examples are cached on disk as two .npy files (all ids concatenated,
# and each example's start offset), memory-mapped on later runs. Examples are
# split into a fixed train/test set, then batched as (seq_len, batch) tensors
# with a loss mask so that padding never counts.

@dataclasses.dataclass
class TokenizedExamples:
    """Token ids of many examples, stored flat: example i is tokens[offsets[i]:offsets[i+1]].

    Each example ends with <|endoftext|>, so models also learn where text stops.
    """

    tokens: np.ndarray   # (total_tokens,) uint16 or uint32, often memory-mapped
    offsets: np.ndarray  # (num_examples + 1,) int64
    num_bytes: int       # UTF-8 bytes of the source text
    key: str = ""        # the cache's key: a digest of the texts and the tokenizer

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]: self.offsets[index + 1]]

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


@dataclasses.dataclass
class TokenWindows:
    """Stream mode's examples: windows of a token stream. Window i is
    tokens[starts[i]: ends[i]], at most block_size + 1 tokens, and windows follow each
    other every block_size tokens (window i's last token is window i+1's first), so
    every token of a stretch is a target exactly once. A window never crosses from one
    stretch (the training part, the test part) into another.

    With shifts (TrainingData.shift_windows, --random_offsets), window i is read
    shifts[i] tokens later: 0 <= shifts[i] <= slack[i] < block_size, the room it has
    before its stretch ends, so it keeps its length and its stretch."""

    tokens: np.ndarray   # (total_tokens,), often memory-mapped
    starts: np.ndarray   # (num_windows,) int64
    ends: np.ndarray     # (num_windows,) int64
    num_bytes: int
    slack: np.ndarray | None = None    # (num_windows,) int64
    shifts: np.ndarray | None = None   # (num_windows,) int64, or None: no shift

    @classmethod
    def over(cls, tokens: np.ndarray, stretches: list[tuple[int, int]], block_size: int,
             num_bytes: int) -> tuple["TokenWindows", list[np.ndarray]]:
        """Windows over each [start, end) stretch; returns them and each stretch's indices."""
        starts, ends, slack, indices = [], [], [], []
        for begin, end in stretches:
            first = sum(len(s) for s in starts)
            window_starts = np.arange(begin, max(end - 1, begin), block_size, dtype=np.int64)
            starts.append(window_starts)
            ends.append(np.minimum(window_starts + block_size + 1, end))
            slack.append(np.minimum(end - ends[-1], block_size - 1))
            indices.append(np.arange(first, first + len(window_starts)))
        return cls(tokens, np.concatenate(starts), np.concatenate(ends), num_bytes,
                   np.concatenate(slack)), indices

    def __len__(self) -> int:
        return len(self.starts)

    def example(self, index: int) -> np.ndarray:
        shift = 0 if self.shifts is None else self.shifts[index]
        return self.tokens[self.starts[index] + shift: self.ends[index] + shift]

    def length(self, index: int) -> int:
        return int(self.ends[index] - self.starts[index])

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def write_temporary_file(path: Path, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """`data`, written and flushed to disk in a new file beside `path` (.NAME.XXXXXXXX.tmp).
    `data` is bytes, or a function that writes into the open file: torch.save and np.save
    then stream to disk, rather than build a second copy of a checkpoint in memory first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp_file:
            if callable(data):
                try:
                    data(temp_file)
                except RuntimeError as error:   # torch.save's C++ writer wraps a full disk's
                    if isinstance(error.__context__, OSError):   # OSError in its own error
                        raise error.__context__ from None
                    raise
            else:
                temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.chmod(temp_name, 0o666 & ~current_umask())  # mkstemp makes files private (0600)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return Path(temp_name)


def atomic_write_bytes(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write to a temporary file in the same directory, then rename over `path`. `data`: as
    write_temporary_file's. A symbolic link is written through, as by `>`: the file it names
    is replaced, and the link stays (renamed over, the link would go and its file stay old)."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else path
    temp = write_temporary_file(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_create_bytes(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """As atomic_write_bytes, but only where no file has that name yet (FileExistsError
    otherwise): link() fails when `path` exists, where a rename would replace it."""
    temp = write_temporary_file(path, data)
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links (FAT, some network file systems): claim the name, then fill it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_temporary_files(directory: Path, name_pattern: str,
                                  older_than_s: float = 0.0) -> None:
    """Delete the temporary files atomic_write_bytes left in `directory`, when a kill came
    mid-write, for targets whose names match the regex `name_pattern` and last written over
    `older_than_s` seconds ago. Only for files this run owns (see claim_directory), or with an
    age no live writer's file has: a live writer's temporary file would go too."""
    stale = re.compile(rf"\.(?:{name_pattern})\.[a-z0-9_]{{8}}\.tmp")   # mkstemp's 8 characters
    if directory.is_dir():
        for path in directory.iterdir():
            if stale.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.stat().st_mtime >= older_than_s:
                        path.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_bytes(obj, compact: bool = False) -> bytes:
    """`obj` as JSON, indented to be read, or compact (large arrays such as attention maps)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    return (text + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj, compact: bool = False) -> None:
    atomic_write_bytes(Path(path), json_bytes(obj, compact))


def file_start(path: Path, size: int = 4096) -> bytes:
    """The first `size` bytes of a file (b"" where it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def begins_as(path: Path, kinds: Sequence[str]) -> bool:
    """Whether `path` begins as a JSON object whose "kind", among its first keys, is one of
    `kinds` (as the files pico-llm and its tools write do), read from its start alone: such a
    file may be replaced by another of its kind even cut short."""
    start = file_start(path)
    kind = re.search(rb'"kind":\s*"([^"]*)"', start)
    return start.lstrip().startswith(b"{") and kind is not None and kind.group(1).decode(
        errors="replace") in kinds


def check_replaceable_report(path: Path, kinds: Sequence[str], flag: str,
                             small: tuple[str, bool] = ("quick", False)) -> None:
    """A tool's report goes to a new file or over an earlier report of its own `kinds`,
    never over anything else (a run log, committed results), nor a report at full size by one
    at the tests' small size: small is (its flag, as the report names it, and whether it is
    given), such as ("quick", True), for a smoke test must not wipe out minutes of measuring."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give the report's file name")
    if path.exists() and not path.is_file():     # reading a FIFO's start would block
        raise UserError(f"{flag} {path} is not a regular file; give the report's file name")
    if path.exists() and not begins_as(path, kinds):
        raise UserError(f"{flag} {path} already exists and is no {kinds[0]} report, which is "
                        f"all this writes over; choose another {flag}")
    name, given = small
    if path.exists() and given and re.search(rb'"%s":\s*false' % name.encode(), file_start(path)):
        raise UserError(f"{flag} {path} holds a full-size {kinds[0]} report, which a --{name} "
                        f"one would replace; choose another {flag}, or move that file away")


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind a failed write: the error itself, or the one that a Rust library
    (safetensors, tokenizers) reports only as text, "... (os error 28)"; None otherwise."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"\(os error (\d+)\)", str(error))
    if isinstance(error, Exception) and found:
        number = int(found.group(1))
        return OSError(number, os.strerror(number))
    return None


def cannot_write(what: str, error: OSError, elsewhere: str) -> UserError:
    """The one line for a write that failed: what, the system's reason and what to do, which
    on a full disk starts with freeing space."""
    advice = "free disk space or " if error.errno == errno.ENOSPC else ""
    return UserError(f"cannot write {what}: {error.strerror or error}; {advice}{elsewhere}")


def load_cached_array(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A cached .npy array; ValueError naming the file for one that is damaged or is no
    regular file (reading a FIFO would wait forever)."""
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        return np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path.name}: {str(error) or type(error).__name__}") from None


def tokenize_examples(texts: list[str], tokenizer, cache_dir: Path | None) -> TokenizedExamples:
    """Tokenize `texts` once; later runs memory-map the cached ids (key: content + tokenizer).
    A trained BPE's name says only its size, and two trained on different splits share it: its
    key is its merges' fingerprint."""
    digest = hashlib.sha256(getattr(tokenizer, "fingerprint", tokenizer.name).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    key = digest.hexdigest()[:24]
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    if cache_dir is not None:
        tokens_path = cache_dir / f"{key}.tokens.npy"
        offsets_path = cache_dir / f"{key}.offsets.npy"
        try:
            found = tokens_path.exists() and offsets_path.exists()
        except OSError:          # a path the file system refuses (too long): no cache, as below
            found = False
        if found:
            try:
                cached = TokenizedExamples(load_cached_array(tokens_path, mmap_mode="r"),
                                           load_cached_array(offsets_path), num_bytes, key)
                problem = token_cache_problem(cached, len(texts), tokenizer)
            except ValueError as error:                     # truncated or not a .npy file
                problem = textwrap.shorten(str(error), 100)
            if not problem:
                return cached
            warn(f"pico-llm: note: token cache {cache_dir / key}.* is damaged ({problem}); "
                 "rebuilding it")
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
    if isinstance(tokenizer, HFTokenizer):   # Appendix E: a tokenizer.json may drop characters
        check_tokenizer_covers(tokenizer, texts, tokens, offsets)
    if cache_dir is not None:
        try:
            atomic_write_bytes(tokens_path, lambda file: np.save(file, tokens))
            atomic_write_bytes(offsets_path, lambda file: np.save(file, offsets))
        except OSError as error:  # a cache we cannot write only costs time
            # numpy reports a write cut short (a full disk) with no reason of the system's
            reason = error.strerror or f"{error}: is the disk full?"
            with contextlib.suppress(OSError):   # one that could not be made says why itself
                if cache_dir.exists() and not cache_dir.is_dir():
                    reason = f"--cache_dir {quoted(cache_dir)} is not a folder"
            warn(f"pico-llm: note: token cache not written ({reason})")
    return TokenizedExamples(tokens, offsets, num_bytes, key)


def token_cache_problem(cached: TokenizedExamples, num_texts: int, tokenizer) -> str:
    """What is wrong with a token cache read back for `num_texts` texts ("" if nothing): a
    damaged or edited file would otherwise fail deep in training, or train on other text."""
    tokens, offsets = cached.tokens, cached.offsets
    if tokens.ndim != 1 or offsets.ndim != 1:
        return f"its arrays have {tokens.ndim} and {offsets.ndim} dimensions, not 1"
    if offsets.dtype.kind not in "ui":
        return f"its example offsets are {offsets.dtype}, not integers"
    if len(cached) != num_texts or offsets[-1] != len(tokens):
        return "its sizes do not match"
    if offsets[0] != 0 or np.any(np.diff(offsets.astype(np.int64)) < 1):   # unsigned: no wrap
        return "its example offsets do not increase"          # each example ends in eot
    problem = token_ids_problem(tokens, tokenizer.vocab_size)
    if not problem and np.any(tokens[offsets[1:] - 1] != tokenizer.eot_id):
        problem = "its examples do not each end in the end-of-text id"   # ids overwritten
    return problem


def token_ids_problem(tokens: np.ndarray, vocab_size: int) -> str:
    """What is wrong with cached ids that a model of `vocab_size` could not embed ("" if
    nothing): a min and a max over the memory map (0.1 s for 200 million cached uint16 ids,
    docs/performance.md), against an IndexError in the middle of training."""
    if tokens.dtype.kind not in "ui":
        return f"its ids are {tokens.dtype}, not integers"
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        return (f"its ids span {int(tokens.min())}..{int(tokens.max())}, outside the "
                f"tokenizer's 0..{vocab_size - 1}")
    return ""


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


class TrainingData:
    """Training and test examples drawn from one or two sources.

    An epoch visits as many examples as the sources hold for training. Each slot
    picks TinyStories with probability `tinystories_weight`, then takes that
    source's next example from its own shuffled order (reshuffled when used up).
    With one source an epoch is exactly one pass without replacement. In stream mode
    with random_offsets, each epoch also moves every training window (shift_windows).
    """

    def __init__(self, sources: list[DataSource], weights: list[float], block_size: int,
                 pad_id: int, seed: int, data_format: str = "lines",
                 random_offsets: bool = False, fingerprint: str = "") -> None:
        self.sources = sources
        self.fingerprint = fingerprint        # of the texts and tokenizer: resume checks it (B)
        self.data_format = data_format        # lines: examples are lines; stream: windows
        self.random_offsets = random_offsets
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.block_size = block_size
        self.pad_id = pad_id
        self.seed = seed

    @property
    def num_train_examples(self) -> int:
        return sum(len(source.train) for source in self.sources)

    def steps_per_epoch(self, batch_size: int, max_steps: int | None) -> int:
        steps = math.ceil(self.num_train_examples / batch_size)
        return min(steps, max_steps) if max_steps else steps

    def epoch_order(self, epoch: int = 1) -> list[tuple[int, int]]:
        """(source index, example index) for every slot of 1-based `epoch`. The shuffle
        depends only on (seed, epoch), so a resumed run sees the same batches."""
        rng = np.random.default_rng([self.seed, epoch])
        choices = rng.choice(len(self.sources), size=self.num_train_examples, p=self.weights)
        orders = [list(rng.permutation(source.train)) for source in self.sources]
        positions = [0] * len(self.sources)
        slots = []
        for source_index in choices:
            order = orders[source_index]
            if positions[source_index] == len(order):
                order[:] = rng.permutation(self.sources[source_index].train)
                positions[source_index] = 0
            slots.append((int(source_index), int(order[positions[source_index]])))
            positions[source_index] += 1
        return slots

    def train_step_slots(self, batch_size: int, max_steps: int | None, epoch: int = 1,
                         skip: int = 0) -> Iterator[list[tuple[int, int]]]:
        """The (source, example) slots of each optimizer step of `epoch`, after the first
        `skip` steps (already trained on before a resume)."""
        if self.random_offsets:
            self.shift_windows(epoch)
        slots = self.epoch_order(epoch)
        for step in range(skip, self.steps_per_epoch(batch_size, max_steps)):
            yield slots[step * batch_size: (step + 1) * batch_size]

    def train_batches(self, batch_size: int, max_steps: int | None, epoch: int = 1,
                      skip: int = 0) -> Iterator[Batch]:
        for slots in self.train_step_slots(batch_size, max_steps, epoch, skip):
            yield self.batch_of(slots)

    def shift_windows(self, epoch: int) -> None:
        """Move each training window of the stream sources 0 to block_size - 1 tokens later
        (as far as its stretch allows), drawn from (seed, epoch): each epoch reads other
        windows of the same text, as nanoGPT's random windows do, rather than the same ones
        again, while every window keeps its length; test windows stay where they are."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        for source in self.sources:
            windows = source.examples
            if isinstance(windows, TokenWindows):
                windows.shifts = np.zeros(len(windows), dtype=np.int64)
                windows.shifts[source.train] = rng.integers(0, windows.slack[source.train] + 1)

    def test_slots(self) -> list[tuple[int, int]]:
        return [(i, int(e)) for i, source in enumerate(self.sources) for e in source.test]

    def test_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Test batches; with several ranks, each evaluates its own share."""
        slots = self.test_slots()[rank::world_size]
        for start in range(0, len(slots), batch_size):
            yield self.batch_of(slots[start: start + batch_size])

    @property
    def has_test_set(self) -> bool:
        return any(len(source.test) for source in self.sources)

    def batch_of(self, slots: list[tuple[int, int]]) -> Batch:
        sequences = [self.sources[s].examples.example(e) for s, e in slots]
        return make_batch(sequences, self.block_size, self.pad_id)

    def target_tokens(self, slots: list[tuple[int, int]]) -> int:
        """How many real (unpadded) targets the batch of these slots holds."""
        return sum(min(self.sources[s].examples.length(e), self.block_size + 1) - 1
                   for s, e in slots)


def load_training_data(data: DataConfig, tokenizer, sources: list[SourceTexts]) -> TrainingData:
    """Tokenize (cached) every source; in stream mode, cut its stream into windows."""
    cache_dir = Path(data.cache_dir) if data.cache_dir else None
    tokenized, fingerprint = [], hashlib.sha256()
    for source in sources:
        examples = tokenize_examples(source.texts, tokenizer, cache_dir)
        fingerprint.update(f"{source.name}:{examples.key}\n".encode())
        if resolved_data_format(data) == "lines":
            tokenized.append(DataSource(source.name, examples, source.train, source.test))
            continue
        boundary = int(examples.offsets[len(source.train)])       # training text comes first
        windows, (train, test) = TokenWindows.over(
            examples.tokens, [(0, boundary), (boundary, examples.num_tokens)], data.block_size,
            examples.num_bytes)
        tokenized.append(DataSource(source.name, windows, train, test))
    return TrainingData(tokenized, [source.weight for source in sources], data.block_size,
                        tokenizer.eot_id, data.seed, resolved_data_format(data),
                        data.random_offsets, fingerprint.hexdigest())


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
# 7. Run logs, sweeps and interpretability
# =============================================================================
# --- 7.1 Run logs ---------------------------------------------------------------------
# Each run writes artefacts/runs/<run_name>.json, atomically, after every epoch;
# the notebook reads it through load_runlog.

RUNLOG_SCHEMA_VERSION = 1
DEFAULT_ARTEFACTS_DIR = REPO_DIR / "artefacts" / "runs"   # artefacts/presentation holds the committed results


@dataclasses.dataclass
class OutputConfig:
    """Where the run log goes."""

    run_name: str | None = None
    artefacts_dir: str = str(DEFAULT_ARTEFACTS_DIR)


def progress_bar(total: int, description: str, quiet: bool, done: int = 0):
    """A tqdm bar on a terminal; None when quiet or when stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=description, leave=False, dynamic_ncols=True)


def warn(message: str) -> None:
    """Writes `message` and its newline to standard error in one write. print() makes two (the
    text, then the newline) when Python runs unbuffered (PYTHONUNBUFFERED, as in many
    containers), and under torchrun two ranks speaking at once would run their lines together."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def say(message: str, bar=None) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)


def log_step(name: str, record: dict, progress: TrainingProgress, epoch: int, loss: float,
             lr: float, total_steps: int, training: TrainingConfig, bar) -> None:
    """Append one step to the history; print it every training.log_interval steps."""
    step = progress.step
    tokens_per_s = progress.tokens_seen / max(progress.train_time_s, 1e-9)
    record["history"].append({
        "step": step, "epoch": epoch, "train_loss": loss, "lr": lr,
        "tokens_seen": progress.tokens_seen, "elapsed_s": round(progress.elapsed_s, 4),
        "tokens_per_s": tokens_per_s})
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)   # tqdm redraws at its own pace
    if not training.quiet and (step % training.log_interval == 0 or step == total_steps):
        say(f"[{name}] epoch {epoch} step {step}/{total_steps} loss {loss:.4f} "
            f"lr {lr:.2e} {tokens_per_s:,.0f} tok/s", bar)


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


def record_samples(model: nn.Module, tokenizer, sampling: SamplingConfig, device: torch.device,
                   step: int, record: dict, bar, final: bool = False, quiet: bool = False,
                   dtype: str | None = None) -> None:
    """Generate from the prompt with each sampling rule, in the training's precision `dtype`
    (see decoding_model); print and store the texts."""
    if not quiet or final:
        say(f"[{record['name']}] samples after step {step}:", bar)
    # One decoder for every rule: on a GPU each new one copies the weights and records a graph.
    decoder = prompt_decoder(model, tokenizer, sampling.prompt, sampling.max_new_tokens, device,
                             dtype=dtype)
    for rule in sampling_rules(sampling):
        sample = generate_text(model, tokenizer, sampling.prompt, sampling.max_new_tokens, rule,
                               seed=sampling.seed, device=device, decoder=decoder)
        record["samples"].append({"step": step, "final": final, "rule": rule.label,
                                  "prompt": sampling.prompt, "text": sample.text})
        if not quiet or final:
            say(f"    {rule.label:>12}: {sample.text!r}", bar)


def record_expert_usage(model: nn.Module, record: dict, epoch: int, context: "Distributed",
                        device: torch.device) -> None:
    """For a mixture-of-experts model, appends to record["expert_usage"] the epoch's
    {"epoch", "fractions": [[share of the expert choices each expert took] per MoE layer]},
    counted over every position routed in the epoch's training steps (padding included; after
    a resume, the steps since) on all ranks; the layers' counts then start again."""
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    usages = [layer.take_usage() for layer in layers]
    if not layers or any(usage is None for usage in usages):
        return
    counts = context.sum(torch.cat(usages).tolist(), device)
    E = len(layers[0].experts)
    rows = [counts[i: i + E] for i in range(0, len(counts), E)]
    record.setdefault("expert_usage", []).append(
        {"epoch": epoch, "fractions": [[count / max(sum(row), 1) for count in row] for row in rows]})


def model_record(name: str, model: nn.Module, config: KGramConfig | LSTMConfig | TransformerConfig,
                 block_size: int) -> dict:
    """This model's part of the run log, before training: its size and config."""
    described = (dataclasses.asdict(model.config) if isinstance(model, TransformerModel) else
                 {"kgram_k": config.k, "kgram_variant": config.variant,
                  "embed_size": config.embed_size, "num_inner_mlp_layers": config.num_inner_layers}
                 if isinstance(model, KGramMLPSeqModel) else
                 {"embed_size": config.embed_size, "lstm_layers": config.num_layers})
    return {"name": name, "parameters": count_parameters(model),
            "training_flops_per_token": training_flops_per_token(model, block_size),
            "config": described, "history": [], "test_history": [], "samples": []}


def environment_info(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else processor_name()),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def processor_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13") where Linux gives it, in /proc/cpuinfo; else what
    platform knows, often only the architecture ("x86_64", "arm")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("model name"):   # x86's and some ARM kernels' key
                    return line.partition(":")[2].strip() or platform.machine()
    except OSError:
        pass
    return platform.processor() or platform.machine()


LIVE_WRITE_S = 300.0   # a temporary file younger than this may be a live writer's


class RunLog:
    """Everything a run measured, written atomically to <artefacts_dir>/<run_name>.json
    (artefacts/runs/ by default) when training starts, after every epoch and when the run
    ends (finished, failed or stopped), so a crash leaves the last complete version on disk."""

    def __init__(self, path: Path, flags: dict, device: torch.device, data_info: dict,
                 run_id: str | None = None) -> None:
        self.path = path
        self.data = {
            "schema_version": RUNLOG_SCHEMA_VERSION,
            "kind": "run",
            "run_name": path.stem,
            # Which run this is, also in its checkpoints: a log is continued only by its own run.
            "run_id": run_id or os.urandom(8).hex(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "process": {"host": socket.gethostname(), "pid": os.getpid()},
            "args": dict(flags),
            "environment": environment_info(device),
            "data": data_info,
            "models": {},
        }

    def add_model(self, name: str, record: dict) -> dict:
        self.data["models"][name] = record
        return record

    def keep_models_of(self, earlier: dict) -> None:
        """A resumed run continues the log of its own run (check_run_log_is_the_checkpoints),
        which may record more models than this run's --models resumes: their records stay as
        they are, in their places, and args.models names them all. The resumed models'
        records are replaced in add_model by those their checkpoints carry."""
        self.data["models"] = dict(earlier.get("models", {}))
        args = self.data["args"]
        args["models"] = [*self.data["models"], *(name for name in args["models"]
                                                   if name not in self.data["models"])]

    def start(self, create: bool) -> None:
        """The first write, before training. A new run creates its log only where no file
        has that name yet, in one step, so of two runs started with one --run_name the
        second is refused here; a resumed run carries its earlier log on, and a new run
        replaces the log of a run that died before its first checkpoint (see
        check_run_log_is_new)."""
        try:
            self.write(create=create)
        except FileExistsError:
            raise UserError(f"run log {self.path} already exists: another run with this "
                            "--run_name started first; choose another --run_name") from None
        # A run started at the same moment with the same --run_name may be writing its own
        # temporary log file (it will be refused once it tries to create the log): leave
        # files that young alone.
        remove_stale_temporary_files(self.path.parent, re.escape(self.path.name),
                                     older_than_s=LIVE_WRITE_S)

    def record_failure(self, error: BaseException) -> None:
        """A run that stops on an error says so in its log, with the error in one line,
        instead of staying "running"; best effort, as the disk may be what failed."""
        if self.data["status"] not in ("running", "failed") or "error" in self.data:
            return
        if isinstance(error, (KeyboardInterrupt, Terminated, TrainingInterrupted)):
            self.data["status"] = "interrupted"
        else:
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            self.data["status"], self.data["error"] = "failed", " ".join(message.split())[:500]
        try:
            self.write()
        except UserError:
            pass

    def write(self, create: bool = False) -> None:
        try:
            (atomic_create_bytes if create else atomic_write_bytes)(self.path, json_bytes(self.data))
        except FileExistsError:
            raise
        except OSError as error:
            raise cannot_write(f"run log {self.path}", error, "choose another --artefacts_dir") from None


def load_runlog(path: Path | str) -> dict:
    """Read a run log and check its schema version (the notebook uses this too)."""
    check_regular_file(Path(path), "run log")
    try:
        log = load_json(Path(path))
    # ValueError: truncated JSON, or not UTF-8; RecursionError: nested too deeply
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"cannot read run log {path} "
                        f"({textwrap.shorten(str(error), 80)})") from None
    # The parts of a log that pico-llm reads back must have the types it wrote.
    shaped = isinstance(log, dict) and all(isinstance(log.get(key, {}), dict)
                                           for key in ("args", "models", "process"))
    args = log.get("args", {}) if shaped else {}
    models = args.get("models") or []            # the models a stopped run was to train
    if (not shaped or not isinstance(args.get("save_dir") or "", str)
            or not (isinstance(models, list) and all(isinstance(name, str) for name in models))):
        raise UserError(f"{path} is not a pico-llm run log (a JSON object with its args, models "
                        "and process)")
    if log.get("schema_version") != RUNLOG_SCHEMA_VERSION:
        raise UserError(f"{path}: run log schema {log.get('schema_version')!r}, "
                        f"this pico-llm reads {RUNLOG_SCHEMA_VERSION}")
    for name, record in log.get("models", {}).items():
        problem = model_record_problem(record)
        if problem:
            raise UserError(f"{path} is not a run log as pico-llm writes it: model {name!r} "
                            f"{problem}")
    return log


def is_number(value) -> bool:
    """An int or float of JSON's, not a boolean (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_record_problem(record) -> str | None:
    """What in one model's run-log record the summary and the loss plot could not read, or
    None: they read its parameters, each history entry's step and train loss, each
    test_history entry's step and test loss, and the final summary (and training appends to
    the samples too, a resumed run to the length changes)."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not a record"
    if not is_number(record.get("parameters")):
        return "has no parameter count"
    for series, loss in (("history", "train_loss"), ("test_history", "test_loss")):
        entries = record.get(series)
        if not isinstance(entries, list) or not all(
                isinstance(entry, dict) and is_number(entry.get("step")) and is_number(entry.get(loss))
                for entry in entries):
            return f"has a {series} whose entries lack a step or a {loss}"
    if not isinstance(record.get("samples", []), list):
        return "has samples that are no list"
    changes = record.get("length_changes", [])      # a resumed run appends to them
    if not (isinstance(changes, list) and all(isinstance(change, dict) for change in changes)):
        return "has length changes that are no list of objects"
    final = record.get("final", {})
    if not isinstance(final, dict):
        return "has a final summary that is no JSON object"
    for key in ("train_loss", "test_loss", "tokens_per_s"):
        null_allowed = key != "tokens_per_s"          # a loss is null where none was measured
        if key in final and not is_number(final[key]) and not (null_allowed and final[key] is None):
            return f"has a final {key} that is no number"
    return None


# File names hold 255 bytes; a run log's temporary file adds 19 (.NAME.json.XXXXXXXX.tmp).
MAX_RUN_NAME_BYTES = 200


def choose_run_path(output: OutputConfig, model_names: list[str]) -> Path:
    """<artefacts_dir>/<run_name>.json; a default name never reuses an existing file, and
    holds the process id and two random bytes, so that two runs starting in the same second
    do not pick the same name, in containers either (each may be process 1 of its own)."""
    directory = Path(output.artefacts_dir)
    if output.run_name:
        if any(ch in output.run_name for ch in "/\\") or output.run_name.startswith("."):
            raise UserError(f"--run_name {output.run_name!r} must be a plain file name")
        length = len(os.fsencode(output.run_name))
        if length > MAX_RUN_NAME_BYTES:
            raise UserError(f"--run_name is {length} bytes long; use at most {MAX_RUN_NAME_BYTES}")
        reserved = reserved_artefact_name(output.run_name)
        if reserved:
            raise UserError(f"--run_name {output.run_name!r} is the name of {reserved} in "
                            "--artefacts_dir; choose another --run_name")
        return directory / f"{output.run_name}.json"
    stem = (f"{time.strftime('%Y%m%d-%H%M%S')}-p{os.getpid()}-{os.urandom(2).hex()}_"
            + "+".join(model_names))
    path, counter = directory / f"{stem}.json", 2
    while path.exists():
        path, counter = directory / f"{stem}-{counter}.json", counter + 1
    return path


def reserved_artefact_name(stem: str) -> str | None:
    """What else pico-llm writes as <artefacts_dir>/<stem>.json, or None: a run log of that
    name would replace it, or be replaced by it, while both runs believe they wrote theirs
    (the checks that a name is free happen when a run starts, the writes at its end)."""
    if stem in {f"sweep_{name}" for name in SWEEP_NAMES} | {"sweep_architectures_run"}:
        return "a sweep's file"
    if re.search(r"\.(attention|monosemantic)_", stem):
        return "another run's attention maps or embedding clusters"
    if stem.startswith("architectures_attention_") or stem in ("attention_transformer",
                                                                "monosemantic_transformer"):
        return "a sweep's attention maps or embedding clusters"
    return None


def check_side_files_are_new(run_path: Path, config: "Config") -> None:
    """The interpretability files a new run writes beside its log after training
    (<run>.attention_<model>.json, <run>.monosemantic_<model>.json) must not be there yet:
    whatever holds that name (an earlier run's maps, someone's file) would be replaced."""
    kinds = [kind for kind, wanted in (("attention", config.experiments.attention_maps),
                                       ("monosemantic", config.experiments.monosemantic_enabled))
             if wanted]
    for kind in kinds:
        for name in config.models.names:
            model = config.models.config_of(name)
            if kind == "attention" and getattr(model, "attention", None) != "softmax":
                continue                 # write_attention_maps: softmax Transformers only
            path = run_path.parent / f"{run_path.stem}.{kind}_{name}.json"
            if path.exists() or path.is_symlink():
                raise UserError(f"{path} already exists (an earlier run's, of this --run_name?); "
                                "move it away, or choose another --run_name")


# Flags that change where a run writes, what it prints, or how fast it goes, never what it
# computes: a run that differs from a stopped run only in these is that run's command again.
FLAGS_OF_THE_SAME_COMMAND = frozenset({"quiet", "device_id", "attention_impl", "cache_dir",
                                       "run_name", "artefacts_dir", "save_dir",
                                       "checkpoint_every", "keep_checkpoints"})


def check_run_log_is_new(run_path: Path, resume_points: dict | None, save_dir: Path | None,
                         flags: dict) -> bool:
    """Whether this run (of these flags) may write `run_path`, given the checkpoints it
    resumes ({model: (path, checkpoint)}, empty for a new run) and its --save_dir (claimed by
    this run already); UserError if not. Returns True where the same command replaces the log
    of a run that stopped before its first checkpoint and runs no more: the command then just
    works. A finished run's log, a log whose run has checkpoints to --resume, a running run's
    log and a stopped run's log of other flags (a diverged run's curve is a result) are never
    replaced; a resumed run continues only its own run's log."""
    if run_path.is_symlink() and not run_path.exists():   # neither a log nor room for one
        raise UserError(f"run log {quoted(run_path)} is a symbolic link to nothing (broken, or a "
                        "loop); fix the link, or choose another --run_name")
    if not run_path.exists():
        return False
    try:
        log, unreadable = load_runlog(run_path), None
    except UserError as error:
        log, unreadable = None, str(error)
    if resume_points:
        check_run_log_is_the_checkpoints(run_path, log, resume_points, unreadable)
        return False
    refused = (f"run log {run_path} already exists; choose another --run_name, delete that file "
               "to replace it, or continue the run with --resume")
    if not isinstance(log, dict) or log.get("status") in (None, "finished"):
        raise UserError(refused)
    args = log.get("args", {})
    earlier_save_dir = Path(args["save_dir"]) if args.get("save_dir") else None
    models = list(log.get("models") or args.get("models") or [])
    if earlier_save_dir is not None and any(
            CheckpointSeries(earlier_save_dir, name, keep=1).latest() for name in models):
        raise UserError(refused)
    if run_is_alive(log, earlier_save_dir, save_dir):
        raise UserError(f"run log {run_path} already exists and belongs to another run that is "
                        "still running; wait for it to finish, or choose another --run_name")
    differences = flag_differences(args, flags, FLAGS_OF_THE_SAME_COMMAND)
    if differences:
        raise UserError(f"run log {run_path} already exists: a run that stopped "
                        f"({log.get('status')}) with other flags "
                        f"({textwrap.shorten('; '.join(differences), 200)}); "
                        "choose another --run_name, or delete that file to replace it")
    warn(f"pico-llm: note: replacing run log {run_path}: its run stopped "
         f"({log.get('status')}) before writing a checkpoint")
    return True


def run_is_alive(log: dict, earlier_save_dir: Path | None, save_dir: Path | None) -> bool:
    """Whether the run of a run log still runs: one that holds its --save_dir (this run claimed
    its own already), else one whose process lives on this host; a run elsewhere counts as alive."""
    if earlier_save_dir is not None:
        if save_dir is not None and earlier_save_dir.resolve() == save_dir.resolve():
            return False   # this run holds it
        if not earlier_save_dir.is_dir():
            return False
        try:
            with claim_directory(earlier_save_dir, "--save_dir"):
                return False
        except UserError:
            return True
    process = log.get("process") or {}
    pid = process.get("pid")
    if (process.get("host") != socket.gethostname() or type(pid) is not int
            or not 0 < pid < 2**31):            # no process id (0 and below name groups)
        return log.get("status") == "running"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # a process of another user's: the pid lives, as when kill works
        pass
    # a log that says the run stopped was written by that run as it ended: a live pid is reused
    return log.get("status") == "running" and pid != os.getpid()


def check_run_log_is_the_checkpoints(run_path: Path, log: dict | None, resume_points: dict,
                                     unreadable: str | None = None) -> None:
    """A resumed run writes its log over `run_path` only when that log records the run that
    wrote the checkpoints it resumes (its run_id; for checkpoints from before run ids, its
    --run_name and --artefacts_dir). log None: load_runlog refused it, saying `unreadable`."""
    path, checkpoint = next(iter(resume_points.values()))
    checkpoint_run = checkpoint.get("run_id")
    if isinstance(log, dict):
        if checkpoint_run is not None and log.get("run_id") == checkpoint_run:
            return
        args = checkpoint["args"]
        if (checkpoint_run is None and args.get("run_name") == run_path.stem
                and Path(args.get("artefacts_dir", "")).resolve() == run_path.parent.resolve()):
            return
    if not isinstance(log, dict):
        raise UserError(f"{unreadable or f'run log {run_path} cannot be read'}, so it cannot be "
                        "continued; resume with a new --run_name, or move that file away")
    described = (f"the run started {log.get('created')} with --save_dir "
                 f"{log.get('args', {}).get('save_dir')}")
    written_by = checkpoint["args"].get("run_name")
    raise UserError(f"run log {run_path} records another run ({described}) than the one whose "
                    f"checkpoint {path} is resumed (run "
                    f"{written_by if written_by else 'with a default name'}); resume with that "
                    "run's --run_name, or a new --run_name")


def check_writable_directory(directory: Path, flag: str, remedy: str = "",
                             deepest: str = "") -> None:
    """Fail before training, not after it, when results could not be saved. A real file
    (or, where the directory is still to be made, a directory) is created and removed in
    the nearest existing ancestor: os.access says yes to root for /proc and /sys. `deepest`:
    the longest path a run writes under `directory`, which must be one the system takes (a
    probe's shorter name passed where a checkpoint's then failed, after training)."""
    remedy = remedy or f"choose another with {flag}"
    longest = len(os.fsencode(str(directory / deepest))) if deepest else 0
    if longest >= PATH_MAX_BYTES:
        raise UserError(f"{flag} {quoted(directory)} is too long a path for the files a run "
                        f"writes there ({longest:,} bytes, as {deepest}, where the system takes "
                        f"fewer than {PATH_MAX_BYTES:,}); {remedy}")
    existing = directory
    while not existing.exists():
        if existing.is_symlink():   # to a path that does not exist, or a loop: mkdir would fail
            raise UserError(f"{flag} {directory}: {existing} is a symbolic link to nothing "
                            f"(broken, or a loop); fix the link, or {remedy}")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {directory}: {existing} is not a directory; {remedy}")
    try:
        if existing == directory:
            handle, probe = tempfile.mkstemp(dir=existing, prefix=".pico-llm-probe-")
            os.close(handle)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".pico-llm-probe-"))
    except OSError as error:
        # in a directory that exists, "no such file" means no file can be made there (/proc)
        reason = (f"no file can be created in {existing}" if error.errno == errno.ENOENT
                  else error.strerror)
        raise UserError(f"{flag} {directory} is not writable ({reason}); {remedy}") from None


# The longest path, in bytes with its final NUL, that file calls take: PATH_MAX, 4096 on
# Linux and 1024 on macOS.
PATH_MAX_BYTES = 1024 if sys.platform == "darwin" else 4096


def summary_table(records: dict) -> str:
    """One line per model: parameters, final losses (in nats per token, and the test loss in
    bits per byte, which compares models across tokenizers), throughput; "-" for a loss not
    measured (no held-out text: --test_fraction 0, or too little text), with a note saying so."""
    lines = [f"{'model':<20} {'params':>12} {'train loss':>11} {'test loss':>10} "
             f"{'bits/byte':>10} {'tok/s':>10}"]
    loss = lambda value, width, places=4: (  # noqa: E731
        f"{'-':>{width}}" if value is None else f"{value:>{width}.{places}f}")
    untested = []
    for name, record in records.items():
        final = record.get("final", {})
        train, test, bits = (final.get(key) for key in ("train_loss", "test_loss",
                                                        "test_bits_per_byte"))
        lines.append(f"{name:<20} {record['parameters']:>12,} {loss(train, 11)} {loss(test, 10)} "
                     f"{loss(bits, 10, 3)} {final.get('tokens_per_s', 0):>10,.0f}")
        if final and test is None:
            untested.append(name)
    if untested:
        lines.append(f"(test loss -: no held-out text to score {', '.join(untested)})")
    return "\n".join(lines)


def ascii_loss_plot(records: dict, width: int = 60, height: int = 12) -> str:
    """Train loss (lower-case letter, averaged per column) and test loss (upper case)
    of every model against its training step, as text for the terminal."""
    series = [(chr(ord("a") + index), name,
               [(h["step"], h["train_loss"]) for h in record["history"]],
               [(t["step"], t["test_loss"]) for t in record["test_history"]])
              for index, (name, record) in enumerate(records.items())]
    points = [p for _, _, train, test in series for p in train + test if math.isfinite(p[1])]
    if not points:
        return "(no losses to plot)"
    max_step = max(step for step, _ in points)
    low, high = min(loss for _, loss in points), max(loss for _, loss in points)
    span = (high - low) or 1.0
    grid = [[" "] * width for _ in range(height)]
    column = lambda step: min(width - 1, round((step - 1) / max(max_step - 1, 1) * (width - 1)))  # noqa: E731
    row = lambda loss: min(height - 1, round((high - loss) / span * (height - 1)))  # noqa: E731
    for mark, _, train, test in series:
        columns: dict[int, list[float]] = {}
        for step, loss in train:
            if math.isfinite(loss):
                columns.setdefault(column(step), []).append(loss)
        for col, losses in columns.items():
            grid[row(sum(losses) / len(losses))][col] = mark
        for step, loss in test:
            if math.isfinite(loss):
                grid[row(loss)][column(step)] = mark.upper()
    lines = [" " * 8 + " |" + "".join(cells) for cells in grid]
    lines[0] = f"{high:8.3f} |" + "".join(grid[0])
    lines[-1] = f"{low:8.3f} |" + "".join(grid[-1])
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 10 + f"step 1{'':{max(width - 12 - len(str(max_step)), 1)}}step {max_step}")
    lines.append("loss: " + ", ".join(f"{mark}/{mark.upper()} = {name} train/test"
                                      for mark, name, _, _ in series))
    return "\n".join(lines)


# --- 7.2 Sweeps -------------------------------------------------------------------------
# A sweep trains models at several settings through the same train_one_model as
# the main job and writes one JSON file, sweep_<name>.json, rewritten atomically
# after every point. A point is keyed by its model and settings, so a sweep
# started again skips the points it already finished. `--sweep presentation`
# runs all of them but the recipe sweep with the character tokenizer and small widths
# (SWEEP_SCALES); `--sweep_scale tiny` shrinks every sweep to seconds for the tests.

SWEEP_SCHEMA_VERSION = 1

SWEEP_NAMES = ("custom_data", "budget", "overfit", "hyperparams", "kgram_variants",
               "architectures", "sampling", "ablations", "learning_rate", "batch_size", "attention",
               "recipe")
# The recipe sweep runs alone, on a text of its own (--input_dir): in its time budget a model
# reads the shipped corpus tens of times over, and the comparison would measure overfitting.
PRESENTATION_SWEEPS = tuple(name for name in SWEEP_NAMES if name != "recipe")


@dataclasses.dataclass(frozen=True)
class SweepScale:
    """How big every sweep is. Widths are embed_size (k-gram, LSTM) and d_model."""

    name: str
    limit_examples: int | None   # None = the whole corpus
    batch_size: int
    block_size: int
    width: int
    steps: int                   # optimizer steps per point (custom data, grid, k-gram, presets)
    budget_epochs: int
    overfit_examples: int
    overfit_epochs: int
    overfit_checkpoints: int
    architecture_width: int      # 96: every preset's head count divides it, RoPE head sizes even
    architecture_max_blocks: int
    sampling_steps: int
    samples_per_rule: int
    max_new_tokens: int
    custom_sizes: tuple[int, ...]
    generation_contexts: tuple[int, ...]   # prompt lengths the attention sweep generates after
    generation_new_tokens: int
    generation_batch: int        # sequences generated at once, as a server would
    learning_rates: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    test_fraction: float = 0.2
    tokenizer: str = "char"      # 257 ids: the output layer stays cheap on a CPU


SWEEP_SCALES = {
    # full: the presentation, about 21 minutes on 2 CPU cores and the recipe sweep 10 more (the
    # notebook's first table)
    "full": SweepScale("full", None, batch_size=16, block_size=64, width=64, steps=250,
                       budget_epochs=3, overfit_examples=40, overfit_epochs=100,
                       overfit_checkpoints=5, architecture_width=96,
                       architecture_max_blocks=6, sampling_steps=800,
                       samples_per_rule=5, max_new_tokens=60,
                       custom_sizes=(3, 63, 123, 185),
                       generation_contexts=(64, 256, 1024, 2048, 4096), generation_new_tokens=64,
                       generation_batch=16),
    "tiny": SweepScale("tiny", 30, batch_size=4, block_size=16, width=16, steps=2,
                       budget_epochs=1, overfit_examples=6, overfit_epochs=3,
                       overfit_checkpoints=2, architecture_width=96, architecture_max_blocks=1,
                       sampling_steps=2, samples_per_rule=2, max_new_tokens=8,
                       custom_sizes=(3, 8, 16), generation_contexts=(16, 32), generation_new_tokens=4,
                       generation_batch=2, learning_rates=(1e-3, 1e4), batch_sizes=(1, 4)),
}


SAMPLING_SWEEP_RULES = (SamplingRule(temperature=0.0), SamplingRule(top_p=0.5),
                        SamplingRule(top_p=0.8), SamplingRule(top_p=0.95), SamplingRule(top_p=1.0),
                        SamplingRule(temperature=0.7, top_p=1.0),
                        SamplingRule(temperature=1.3, top_p=1.0))


def diversity_metrics(texts: list[str], repeat_n: int = 3) -> dict:
    """Word-level diversity of generated texts. distinct_n (Li et al., 2016): distinct
    n-grams / all n-grams, pooled over the texts (1 = nothing repeats). The repeated
    fraction: share of a text's n-grams already seen earlier in that same text, which
    is high when generation loops ("the cat the cat the cat")."""
    def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
        return [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]

    word_lists = [text.split() for text in texts]
    metrics = {}
    for n in (1, 2):
        grams = [gram for words in word_lists for gram in ngrams(words, n)]
        metrics[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeated = total = 0
    for words in word_lists:
        seen: set[tuple[str, ...]] = set()
        for gram in ngrams(words, repeat_n):
            total += 1
            repeated += gram in seen
            seen.add(gram)
    metrics[f"repeated_{repeat_n}gram_fraction"] = repeated / total if total else 0.0
    return metrics


# Flags that no sweep point depends on (where files go, what is printed, which sweeps run),
# so a sweep file may be continued with them changed; any other flag must be what the file's
# points were run with.
SWEEP_FREE_FLAGS = frozenset({
    "device_id", "quiet", "log_interval", "run_name", "artefacts_dir", "cache_dir", "save_dir",
    "resume", "checkpoint_every", "keep_checkpoints", "generate", "checkpoint", "overwrite",
    "export_hf", "sweep", "sweep_scale", "custom_sweep_log", "custom_sweep_sizes",
    "collect_transformer_metrics", "attention_maps", "monosemantic_enabled", "dist_timeout"})

# Flags whose value every sweep point sets itself, and where from. A value given for one would
# be ignored, so it is refused; the sweep file records the scale and each point's steps instead.
SWEEP_SET_FLAGS = {
    **dict.fromkeys(("tokenizer", "block_size", "batch_size", "embed_size", "d_model",
                     "transformer_variant", "limit_custom_examples", "test_fraction", "epochs",
                     "max_steps_per_epoch", "max_new_tokens", "sample_interval"),
                    "from --sweep_scale"),
    "tinystories_weight": "sweeps train on the custom text alone",
    "models": "each sweep trains its own models",
    "enable_transformer_gptoss": "each sweep trains its own models",
}


def check_sweep_flags(config: Config, command: str) -> None:
    """Refuse a flag that the sweeps set themselves, given with a value of its own."""
    defaults = default_flags()
    for flag, source in SWEEP_SET_FLAGS.items():
        if config.flags[flag] != defaults[flag]:
            raise UserError(f"{command} sets --{flag} itself ({source}); drop --{flag}")


def point_key(model: str, settings: dict) -> str:
    return json.dumps({"model": model, **settings}, sort_keys=True)


def point_key_of(point: dict) -> str | None:
    """The key a point written by SweepLog.add carries (None for one it could not have written)."""
    if not isinstance(point.get("model"), str) or not isinstance(point.get("settings"), dict):
        return None
    return point_key(point["model"], point["settings"])


class SweepLog:
    """One sweep's JSON file. Points already in a file of the same sweep, scale, data and
    flags are kept (and skipped by `done`), with the file's creation time and the wall time
    spent on it so far; the file is rewritten atomically after every point. A file of another
    sweep, scale, data or flags is refused, unless `overwrite` (--overwrite) starts afresh; so
    is a new sweep whose other files (files_beside) are already there. The architectures
    sweep's run log is read here too, before any training."""

    def __init__(self, path: Path, sweep: str, scale: SweepScale, config: Config,
                 device: torch.device, overwrite: bool = False,
                 flag: str = "--artefacts_dir") -> None:
        self.path, self.sweep, self.flag = path, sweep, flag   # flag: the one that named path
        self.run_path = run_log_beside(path) if sweep == "architectures" else None
        self.earlier_run_models: dict = {}     # the run log's records of the kept points
        points = []
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.earlier_wall_time_s = 0.0
        self.finished_before = False
        data_sha256 = examples_fingerprint(load_custom_examples(config.data))
        if overwrite and path.exists():
            check_regular_file(path, "sweep file")          # reading a FIFO's start would block
        if overwrite and path.exists() and not looks_like_a_sweep_file(path):
            raise UserError(f"{path} is not a sweep file, and --overwrite replaces only sweep "
                            "files; give the sweep another path")
        # A tiny sweep (seconds, for the tests) never replaces a larger one's file, --overwrite
        # or not: it may hold the committed results.
        start = file_start(path) if overwrite else b""
        earlier_scale = re.search(rb'"scale":\s*"([^"]*)"', start)
        # --overwrite starts this sweep afresh; another sweep's results are never its to replace
        earlier_sweep = re.search(rb'"sweep":\s*"([^"]*)"', start)
        if earlier_sweep and earlier_sweep.group(1) != sweep.encode():
            raise UserError(f"{path} holds the {earlier_sweep.group(1).decode()} sweep, which "
                            f"--overwrite never replaces with the {sweep} sweep; move that file "
                            f"away, or give the sweep another {flag}")
        if earlier_scale and scale.name == "tiny" and earlier_scale.group(1) != b"tiny":
            raise UserError(f"{path} holds a sweep at scale {earlier_scale.group(1).decode()}, "
                            "which a tiny one never replaces, even with --overwrite; move that "
                            f"file away, or give the sweep another {flag}")
        for file in files_beside(sweep, path):   # written over as the sweep's points run
            if file.exists() and not (file.is_file() and begins_as(file, SIDE_FILE_KINDS)):
                raise UserError(f"{file} is not a file that a {sweep} sweep writes, and the "
                                "sweep would write over it; move it away, or give the sweep "
                                "another --artefacts_dir")
        if not path.exists() and not overwrite:
            check_no_files_beside(sweep, path)
        replaced = [str(file) for file in [path, *files_beside(sweep, path)] if file.exists()]
        self.overwrite_note = (f"pico-llm: note: --overwrite replaces {', '.join(replaced)}"
                               if overwrite and replaced else None)   # said once all are checked
        if path.exists() and not overwrite:
            earlier = load_sweep(path)
            # Points are keyed by their own settings; the scale and the data must match too.
            same_scale = earlier["config"]["scale"] == json.loads(json.dumps(dataclasses.asdict(scale)))
            # A flag the file does not record is newer than the file: its points ran with what
            # is now that flag's default.
            recorded = {**default_flags(), **earlier["config"].get("args", {})}
            if earlier["sweep"] != sweep:
                other = f"the {earlier['sweep']} sweep"
            elif not same_scale:
                other = (f"the {sweep} sweep at scale {earlier['scale']}" if earlier["scale"] != scale.name
                         else f"the {sweep} sweep at another version of scale {scale.name}")
            elif earlier["config"].get("data_sha256") != data_sha256:
                other = f"the {sweep} sweep on other data"
            elif changed := flag_differences(recorded, config.flags,
                                             SWEEP_FREE_FLAGS | frozenset(SWEEP_SET_FLAGS)):
                other = f"the {sweep} sweep run with other flags ({'; '.join(changed)})"
            else:
                other = None
            if other:
                remedy = ("pass --overwrite to replace them, or move the file away"
                          if earlier["sweep"] == sweep else
                          f"move the file away, or give the sweep another {flag}")
                raise UserError(f"{path} holds {len(earlier['points'])} points of {other}, not "
                                f"of {sweep} at scale {scale.name} on this data with these flags; "
                                + remedy)
            points, created = earlier["points"], earlier["created"]
            self.earlier_wall_time_s = earlier.get("wall_time_s", 0.0)
            self.finished_before = earlier.get("status") == "finished"
            if self.run_path and points:
                self.earlier_run_models = read_run_log_beside(self.run_path, path)
        self.data = {
            "schema_version": SWEEP_SCHEMA_VERSION,
            "kind": "sweep",
            "sweep": sweep,
            "scale": scale.name,
            "created": created,
            "status": "running",
            "config": {"tokenizer": scale.tokenizer, "scale": dataclasses.asdict(scale),
                       "data_sha256": data_sha256,
                       "args": {flag: value for flag, value in config.flags.items()
                                if flag not in SWEEP_SET_FLAGS}},
            "environment": environment_info(device),
            "points": points,
        }
        self.skipped = self.added = 0

    def done(self, model: str, settings: dict) -> bool:
        key = point_key(model, settings)
        finished = any(point["key"] == key for point in self.data["points"])
        self.skipped += finished
        return finished

    def add(self, model: str, settings: dict, result: dict) -> None:
        self.data["points"].append({"key": point_key(model, settings), "model": model,
                                    "settings": settings, **result})
        self.added += 1
        self.write()
        outcome = ("diverged" if result.get("diverged") else
                   f"train {result['train_loss']:.3f} test "
                   f"{result['test_loss'] if result['test_loss'] is not None else float('nan'):.3f}")
        say(f"[sweep {self.data['sweep']}] {model} {settings}: {outcome} "
            f"({result['wall_time_s']:.1f} s)")

    def finish(self) -> None:
        self.data["status"] = "finished"
        self.write()

    def write(self) -> None:
        try:
            atomic_write_json(self.path, self.data)
        except OSError as error:
            raise cannot_write(f"sweep file {self.path}", error,
                               f"choose another {self.flag}") from None


def examples_fingerprint(texts: list[str]) -> str:
    """sha256 of the examples, so a sweep resumes only on the data it started with."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    return digest.hexdigest()


def looks_like_a_sweep_file(path: Path) -> bool:
    """Whether `path` begins as SweepLog writes, so that --overwrite may replace it even cut
    short or of an older schema; never a checkpoint, a run log or any other file."""
    return begins_as(path, ("sweep",))


def load_sweep(path: Path | str) -> dict:
    """Read a sweep file and check its kind and schema version (the notebook uses this)."""
    check_regular_file(Path(path), "sweep file")
    if Path(path).is_dir():
        raise UserError(f"sweep file {path} is a directory; move it away, or give the sweep "
                        "another path (--custom_sweep_log, or another --artefacts_dir)")
    # --overwrite replaces a file that begins as a sweep file, and nothing else (a directory).
    remedy = "move it away, or " + ("pass --overwrite to start that sweep afresh"
                                    if looks_like_a_sweep_file(Path(path))
                                    else "give the sweep another path")
    try:
        sweep = load_json(Path(path))
    # ValueError: truncated JSON, or not UTF-8; RecursionError: nested too deeply
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"cannot read sweep file {path} ({textwrap.shorten(str(error), 80)}); "
                        f"{remedy}") from None
    if not isinstance(sweep, dict):
        sweep = {}
    if sweep.get("kind") != "sweep" or sweep.get("schema_version") != SWEEP_SCHEMA_VERSION:
        raise UserError(f"{path}: not a sweep file of schema {SWEEP_SCHEMA_VERSION} "
                        f"(kind {sweep.get('kind')!r}, schema {sweep.get('schema_version')!r}); "
                        f"{remedy}")
    points, config = sweep.get("points"), sweep.get("config")
    if not (isinstance(points, list) and all(isinstance(point, dict)
                                             and isinstance(point.get("key"), str)
                                             and point["key"] == point_key_of(point)
                                             for point in points)
            and isinstance(config, dict) and isinstance(config.get("scale"), dict)
            and isinstance(config.get("args", {}), dict)):
        raise UserError(f"{path}: a sweep file whose points or config are not as pico-llm writes "
                        "them; move it away, or pass --overwrite to start that sweep afresh")
    for point in points:
        problem = sweep_point_problem(point)
        if problem:
            raise UserError(f"{path}: point {point['key']} {problem}, not as pico-llm writes it; "
                            "move the file away, or pass --overwrite to start that sweep afresh")
    wall_time_s = sweep.get("wall_time_s", 0.0)     # absent until the sweep first finishes
    for key, as_written in (("sweep", isinstance(sweep.get("sweep"), str)),
                            ("scale", isinstance(sweep.get("scale"), str)),
                            ("created", isinstance(sweep.get("created"), str)),
                            ("wall_time_s", type(wall_time_s) in (int, float)
                             and 0 <= wall_time_s < 1e12)):   # seconds: 30,000 years
        if not as_written:
            raise UserError(f"{path}: a sweep file whose {key!r} is not as pico-llm writes it; "
                            "move it away, or pass --overwrite to start that sweep afresh")
    return sweep


# The measurements of a sweep point that are not numbers (or null, where none was measured):
# each key's kind as a message says it, and the check of it.
LIST_OF_OBJECTS = ("a list of objects",
                   lambda v: isinstance(v, list) and all(isinstance(item, dict) for item in v))
SWEEP_POINT_SHAPES = {
    "diverged": ("a boolean", lambda v: isinstance(v, bool)),
    "label": ("a string", lambda v: isinstance(v, str)),
    "run_log": ("a string", lambda v: isinstance(v, str)),
    "samples": ("a list of strings",
                lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v)),
    "diversity": ("an object of numbers",
                  lambda v: isinstance(v, dict) and all(map(is_number, v.values()))),
    "config": ("an object", lambda v: isinstance(v, dict)),
    "curve": LIST_OF_OBJECTS, "epochs": LIST_OF_OBJECTS, "checkpoints": LIST_OF_OBJECTS,
    "generation": LIST_OF_OBJECTS}
NUMBER_OR_NULL = ("a number or null", lambda v: v is None or is_number(v))


def sweep_point_problem(point: dict) -> str | None:
    """What in a finished sweep point's measurements is not of the type SweepLog wrote, or
    None: a resumed sweep keeps its points, and marks the file finished with them."""
    for key, value in point.items():
        if key in ("key", "model", "settings"):       # checked with the point's key
            continue
        shape, fits = SWEEP_POINT_SHAPES.get(key, NUMBER_OR_NULL)
        if not fits(value):
            return f"has a {key} of {textwrap.shorten(repr(value), 40)} where {shape} belongs"
    return None


def run_log_beside(path: Path) -> Path:
    """Where the architectures sweep keeps its points' per-step histories."""
    return path.with_name(path.stem + "_run.json")


def files_beside(sweep: str, path: Path) -> list[Path]:
    """The files a sweep writes beside its sweep file `path`, which belong to that file's
    points: the architectures sweep's run log and attention maps, the sampling sweep's
    attention maps and embedding clusters."""
    if sweep == "architectures":
        return [run_log_beside(path), *(path.parent / f"architectures_attention_{preset}.json"
                                        for preset in TRANSFORMER_PRESETS)]
    if sweep == "sampling":
        return [path.parent / "attention_transformer.json",
                path.parent / "monosemantic_transformer.json"]
    return []


def check_sweep_files_apart(paths: dict[str, Path]) -> None:
    """UserError if --custom_sweep_log names a file that another sweep of the same run writes
    (its sweep file, or a file beside it): the later write would replace the earlier results."""
    custom = paths.get("custom_data")
    if custom is None:
        return
    for sweep, path in paths.items():
        if sweep != "custom_data" and custom.resolve() in {
                written.resolve() for written in (path, *files_beside(sweep, path))}:
            raise UserError(f"--custom_sweep_log {custom} is a file that the {sweep} sweep of "
                            "this run writes; give --custom_sweep_log a path of its own")


# What the files beside a sweep file begin as: the architectures sweep's run log, attention
# maps, embedding clusters.
SIDE_FILE_KINDS = ("run", "attention", "monosemantic")


def check_no_files_beside(sweep: str, path: Path) -> None:
    """A new sweep file's sweep would replace the files of an earlier one's points (whose
    sweep file was moved away): refused, as the sweep file itself would be."""
    found = [file for file in files_beside(sweep, path) if file.exists()]
    if found:
        more = f" and {len(found) - 1} more files" if len(found) > 1 else ""
        raise UserError(f"{path.parent} holds {found[0].name}{more} of an earlier {sweep} sweep, "
                        f"whose sweep file {path.name} is gone; move them away, or pass "
                        "--overwrite to replace them")


def read_run_log_beside(run_path: Path, path: Path) -> dict:
    """The models recorded by the run log of the points in the sweep file `path` ({} when
    the run log is gone, with a note: the curves of those points cannot be drawn again)."""
    remedy = "restore it, or pass --overwrite to run the architectures sweep afresh"
    if not run_path.exists():
        warn(f"pico-llm: note: run log {run_path}, the per-step histories of the points in "
             f"{path.name}, is gone; {remedy}")
        return {}
    try:
        check_regular_file(run_path, "run log")
        return load_runlog(run_path)["models"]
    except UserError as error:
        raise UserError(f"{error}; it holds the per-step histories of the points in "
                        f"{path.name}: {remedy}") from None


def sweep_base_config(config: Config, scale: SweepScale) -> Config:
    """The user's flags (data, seed, device, prompt) with the scale's sizes on top."""
    return with_flags(config, tokenizer=scale.tokenizer, batch_size=scale.batch_size,
                      block_size=scale.block_size, embed_size=scale.width, d_model=scale.width,
                      transformer_variant="pico", limit_custom_examples=scale.limit_examples,
                      max_new_tokens=scale.max_new_tokens, quiet=True, sample_interval=0,
                      warmup_steps=min(config.training.warmup_steps, max(1, scale.steps // 4)))


def sweep_data(config: Config, tokenizer, num_train: int | None = None,
               held_out: bool = True) -> TrainingData:
    """The custom text (no TinyStories) split once into train and a fixed test set, in
    the config's data format; num_train keeps a random but nested subset of the training
    examples (lines, or stream windows), so every corpus size is scored on the same test set.
    held_out: the sweep compares held-out loss, so a text too short to hold any out is refused
    (its points' test losses would all be null)."""
    custom = dataclasses.replace(config.data, tinystories_weight=0.0)
    data = load_training_data(custom, tokenizer, read_sources(custom))
    if held_out and not data.has_test_set:
        raise UserError("the sweep compares held-out loss, and the text is too short to hold "
                        "any out; give more text (--input_files or --input_dir)")
    if num_train is not None:
        source = data.sources[0]
        source.train = np.sort(np.random.default_rng(custom.seed).permutation(source.train)[:num_train])
    return data


def with_step_budget(config: Config, data: TrainingData, steps: int,
                     evaluations: int | None = None, at_least: bool = False) -> Config:
    """Epochs and steps per epoch that add up to about `steps` optimizer steps (at_least: not
    fewer); with `evaluations`, epochs short enough (a random share of a pass each) that the
    test set is scored at least that many times, on a corpus that one run does not read
    through."""
    per_epoch = data.steps_per_epoch(config.training.batch_size, None)
    if evaluations:
        per_epoch = min(per_epoch, max(1, math.ceil(steps / evaluations)))
    epochs = math.ceil(steps / per_epoch) if at_least else max(1, round(steps / per_epoch))
    return with_flags(config, epochs=epochs, max_steps_per_epoch=min(per_epoch, steps))


def train_sweep_model(label: str, model_name: str, config: Config, device: torch.device,
                      tokenizer, data: TrainingData, runlog: RunLog | None = None):
    """Build `model_name` as the config says and train it with train_one_model;
    returns (model, record)."""
    model_config = config.models.config_of(model_name)
    model = build_model(model_config, tokenizer.vocab_size, config.training.seed).to(device)
    record = model_record(label, model, model_config, config.data.block_size)
    if runlog is not None:
        runlog.add_model(label, record)
    train_one_model(label, model, data, config.training, config.sampling, device, tokenizer,
                    record, runlog, speed=config.speed)
    return model, record


def point_result(record: dict, data: TrainingData) -> dict:
    final = record["final"]
    return {"parameters": record["parameters"], "train_loss": final["train_loss"],
            "test_loss": final["test_loss"], "test_bits_per_byte": final["test_bits_per_byte"],
            "tokens_per_s": final["tokens_per_s"], "wall_time_s": final["wall_time_s"],
            "steps": final["steps"], "train_examples": int(data.num_train_examples)}


def epoch_losses(record: dict) -> list[dict]:
    """Mean train loss of each epoch beside that epoch's test loss."""
    rows = []
    for test in record["test_history"]:
        losses = [h["train_loss"] for h in record["history"] if h["epoch"] == test["epoch"]]
        rows.append({"epoch": test["epoch"], "step": test["step"],
                     "train_loss": sum(losses) / len(losses), "test_loss": test["test_loss"]})
    return rows


def new_text(sample: dict) -> str:
    return sample["text"][len(sample["prompt"]):]


def sweep_custom_data(log: SweepLog, base, scale, device, tokenizer) -> None:
    """Final train and test loss per corpus size, at a fixed step budget, LSTM vs Transformer."""
    given = base.experiments.custom_sweep_sizes
    sizes = parse_sizes(given) if given is not None else scale.custom_sizes
    config = with_flags(base, test_fraction=scale.test_fraction)
    available = len(sweep_data(config, tokenizer).sources[0].train)
    if given is not None and max(sizes) > available:
        raise UserError(f"--custom_sweep_sizes asks for {max(sizes):,} training examples; "
                        f"this data has {available:,}: give sizes up to that")
    if max(sizes) > available:    # the scale's sizes, for a small corpus: the sizes it has
        sizes = [size for size in sizes if size < available] + [available]
        warn(f"pico-llm: note: this data has {available:,} training examples, so the "
             f"custom_data sweep trains on {', '.join(f'{size:,}' for size in sizes)}")
    for model_name in ("lstm_seq", "transformer"):
        for size in sizes:
            settings = {"train_examples": size}
            if log.done(model_name, settings):
                continue
            data = sweep_data(config, tokenizer, num_train=size)
            point = with_step_budget(config, data, scale.steps)
            _, record = train_sweep_model(model_name, model_name, point, device, tokenizer, data)
            log.add(model_name, settings, point_result(record, data))


def sweep_budget(log: SweepLog, base, scale, device, tokenizer) -> None:
    """Train and test loss after 1, 3 or 6 steps per epoch, at a 60/40 train/test split."""
    config = with_flags(base, test_fraction=0.4, epochs=scale.budget_epochs)
    data = sweep_data(config, tokenizer)
    for model_name in ("kgram_mlp_seq", "lstm_seq", "transformer"):
        for steps_per_epoch in (1, 3, 6):
            settings = {"max_steps_per_epoch": steps_per_epoch, "epochs": scale.budget_epochs}
            if log.done(model_name, settings):
                continue
            point = with_flags(config, max_steps_per_epoch=steps_per_epoch)
            _, record = train_sweep_model(model_name, model_name, point, device, tokenizer, data)
            log.add(model_name, settings, point_result(record, data))


def sweep_overfit(log: SweepLog, base, scale, device, tokenizer) -> None:
    """A small training subset for many epochs: the train/test gap opens, and generations
    at checkpoints start to quote the training text (their diversity falls)."""
    config = with_flags(base, test_fraction=scale.test_fraction, batch_size=8,
                        epochs=scale.overfit_epochs, max_steps_per_epoch=None,
                        lr_schedule="constant")
    data = sweep_data(config, tokenizer, num_train=scale.overfit_examples)
    steps_per_epoch = data.steps_per_epoch(config.training.batch_size, None)
    config = with_flags(config, sample_interval=steps_per_epoch * max(
        1, scale.overfit_epochs // scale.overfit_checkpoints))
    for model_name in ("lstm_seq", "transformer"):   # a small corpus may have fewer examples
        settings = {"train_examples": len(data.sources[0].train), "epochs": scale.overfit_epochs}
        if log.done(model_name, settings):
            continue
        _, record = train_sweep_model(model_name, model_name, config, device, tokenizer, data)
        checkpoints = []
        for step in sorted({sample["step"] for sample in record["samples"]}):
            samples = [s for s in record["samples"] if s["step"] == step]
            checkpoints.append({"step": step, "epoch": math.ceil(step / steps_per_epoch),
                                "samples": [{"rule": s["rule"], "text": s["text"]} for s in samples],
                                "diversity": diversity_metrics([new_text(s) for s in samples])})
        log.add(model_name, settings, {**point_result(record, data), "epochs": epoch_losses(record),
                                       "checkpoints": checkpoints})


def hyperparameter_grid(scale: SweepScale) -> list[tuple[str, dict]]:
    """Three small 2-D grids (one heatmap each): LSTM width x layers, Transformer heads x
    blocks, Transformer learning rate x block size."""
    half_width, half_block = scale.width // 2, scale.block_size // 2
    grid = [("lstm_seq", {"embed_size": e, "lstm_layers": n})
            for e in (half_width, scale.width) for n in (1, 2)]
    grid += [("transformer", {"n_heads": h, "n_blocks": b}) for h in (2, 4) for b in (1, 2)]
    grid += [("transformer", {"learning_rate": lr, "block_size": bs})
             for lr in (1e-3, 3e-3, 1e-2) for bs in (half_block, scale.block_size)]
    return grid


def sweep_hyperparams(log: SweepLog, base, scale, device, tokenizer) -> None:
    config = with_flags(base, test_fraction=scale.test_fraction)
    for model_name, settings in hyperparameter_grid(scale):
        if log.done(model_name, settings):
            continue
        point = with_flags(config, **settings)
        if model_name == "lstm_seq":
            point = with_flags(point, d_model=None)
        data = sweep_data(point, tokenizer)
        point = with_step_budget(point, data, scale.steps)
        _, record = train_sweep_model(model_name, model_name, point, device, tokenizer, data)
        log.add(model_name, settings, point_result(record, data))


def sweep_kgram_variants(log: SweepLog, base, scale, device, tokenizer) -> None:
    """One-hot, embedding and convolutional k-gram contexts at equal settings."""
    config = with_flags(base, test_fraction=scale.test_fraction)
    data = sweep_data(config, tokenizer)
    config = with_step_budget(config, data, scale.steps)
    for variant in KGRAM_VARIANTS:
        settings = {"kgram_variant": variant, "kgram_k": config.models.kgram.k}
        if log.done("kgram_mlp_seq", settings):
            continue
        point = with_flags(config, kgram_variant=variant)
        _, record = train_sweep_model("kgram_mlp_seq", "kgram_mlp_seq", point, device,
                                      tokenizer, data)
        log.add("kgram_mlp_seq", settings, point_result(record, data))


def sweep_architectures(log: SweepLog, base, scale, device, tokenizer) -> None:
    """Every Transformer preset at a reduced width (and at most architecture_max_blocks
    blocks), plus the LSTM and the k-gram MLP, all trained and measured in this run.
    Their per-step histories go to a run log beside the sweep, for the loss curves (and a
    mixture of experts' expert usage); each preset's attention maps over the first test
    example go to architectures_attention_<preset>.json (GPT-oss's sliding windows and sinks
    among them)."""
    config = with_flags(base, test_fraction=scale.test_fraction)
    data = sweep_data(config, tokenizer)
    config = with_step_budget(config, data, scale.steps)
    runlog = RunLog(log.run_path, config.flags, device, data_summary(tokenizer, data))
    runlog.data["models"] = dict(log.earlier_run_models)
    if not log.data["points"]:   # the run log is written during the first point, before the
        log.write()              # point joins the sweep file: a file that owns it comes first
    candidates = [(preset, "transformer", {"transformer_variant": preset})
                  for preset in TRANSFORMER_PRESETS]
    candidates += [("lstm_seq", "lstm_seq", {}), ("kgram_mlp_seq", "kgram_mlp_seq", {})]
    for label, model_name, overrides in candidates:
        settings = dict(overrides)
        if model_name == "transformer":
            preset = TRANSFORMER_PRESETS[overrides["transformer_variant"]]
            settings.update(d_model=scale.architecture_width,
                            n_blocks=min(preset["n_blocks"], scale.architecture_max_blocks))
        if log.done(label, settings):
            continue
        point = with_flags(config, **settings)
        model, record = train_sweep_model(label, model_name, point, device, tokenizer, data, runlog)
        runlog.write()
        source = data.sources[0]
        text = tokenizer.decode(list(source.examples.example(source.test[0])[: data.block_size]))
        write_attention_maps(model, label, tokenizer, text, log.path.parent, device,
                             file_prefix="architectures_attention")
        log.add(label, settings, {**point_result(record, data), "config": record["config"],
                                  "training_flops_per_token": record["training_flops_per_token"],
                                  "run_log": log.run_path.name})
    if log.added or not log.finished_before:   # as run_sweeps finishes the sweep file
        runlog.data["status"] = "finished"
        runlog.write()


def sweep_sampling(log: SweepLog, base, scale, device, tokenizer) -> None:
    """One trained Transformer, sampled with each rule of SAMPLING_SWEEP_RULES several
    times (seeds seed, seed+1, ...). It also gives the attention maps and the
    embedding clusters of the presentation."""
    config = with_flags(base, test_fraction=scale.test_fraction)
    data = sweep_data(config, tokenizer, held_out=False)     # its results are samples
    config = with_step_budget(config, data, scale.sampling_steps)
    directory = log.path.parent
    pending = [rule for rule in SAMPLING_SWEEP_RULES
               if not log.done("transformer", dataclasses.asdict(rule))]
    draws_maps = config.models.transformer.attention == "softmax"
    if not draws_maps:
        warn(f"pico-llm: note: --attention {config.models.transformer.attention} has no "
             "attention weights to draw; the sampling sweep writes no attention map")
    # Done when every rule's point is in, and so are the files written after them.
    written_last = ["monosemantic_transformer.json"] + ["attention_transformer.json"] * draws_maps
    if not pending and all((directory / name).exists() for name in written_last):
        return
    model, record = train_sweep_model("transformer", "transformer", config, device, tokenizer, data)
    trained = point_result(record, data)
    for rule in pending:   # timed as --generate runs: on a GPU, the decoder's setup included
        started = time.perf_counter()
        prompt, max_new_tokens = config.sampling.prompt, config.sampling.max_new_tokens
        samples = [generate_text(model, tokenizer, prompt, max_new_tokens, rule,
                                 seed=(config.training.seed + index) % 2**32,  # a seed's range
                                 device=device,
                                 decoder=prompt_decoder(model, tokenizer, prompt, max_new_tokens,
                                                        device, dtype=config.training.dtype))
                   for index in range(scale.samples_per_rule)]
        elapsed = time.perf_counter() - started
        generated = sum(len(s.token_ids) - s.num_prompt_tokens for s in samples)
        log.add("transformer", dataclasses.asdict(rule), {
            **trained, "label": rule.label, "tokens_per_s": generated / max(elapsed, 1e-9),
            "wall_time_s": round(elapsed, 4), "training_wall_time_s": trained["wall_time_s"],
            "samples": [s.text for s in samples],
            "diversity": diversity_metrics([s.new_text for s in samples])})
    write_attention_maps(model, "transformer", tokenizer, config.sampling.prompt, directory, device)
    write_embedding_clusters(model, "transformer", tokenizer, data, config.sampling,
                             config.experiments.monosemantic_clusters, directory, device,
                             dtype=config.training.dtype)


# Ablations of the pico Transformer (pre-norm RMSNorm, RoPE, SwiGLU): one change each.
ABLATIONS = {
    "baseline": {},
    "no normalization": {"norm": "none"},
    "post-norm": {"norm_position": "post"},
    "no position embedding (NoPE)": {"pos_emb": "none"},
    "learned positions": {"pos_emb": "learned"},
    "sinusoidal positions": {"pos_emb": "sinusoidal"},
    "SiLU MLP (no gate)": {"ffn": "silu"},
}


def sweep_ablations(log: SweepLog, base, scale, device, tokenizer) -> None:
    """The pico Transformer with one component changed at a time, at equal budget."""
    config = with_flags(base, test_fraction=scale.test_fraction)
    data = sweep_data(config, tokenizer)
    config = with_step_budget(config, data, scale.steps)
    for label, overrides in ABLATIONS.items():
        settings = {"ablation": label, **overrides}
        if not log.done("transformer", settings):   # without norms a run may blow up
            train_or_diverge(log, "transformer", settings, with_flags(config, **overrides), device,
                             tokenizer, data)


def train_or_diverge(log: SweepLog, model_name: str, settings: dict, config: Config, device,
                     tokenizer, data: TrainingData) -> None:
    """One sweep point; a run whose loss explodes is stopped and recorded as diverged."""
    started = time.perf_counter()
    try:
        _, record = train_sweep_model(model_name, model_name, config, device, tokenizer, data)
    except TrainingDiverged as error:
        log.add(model_name, settings, {"diverged": True, "diverged_at_step": error.step,
                                       "train_loss": None, "test_loss": None,
                                       "test_bits_per_byte": None, "tokens_per_s": None,
                                       "wall_time_s": round(time.perf_counter() - started, 3)})
        return
    log.add(model_name, settings, {"diverged": False, **point_result(record, data)})


def sweep_learning_rate(log: SweepLog, base, scale, device, tokenizer) -> None:
    """Transformer learning rates from too small to diverging (constant schedule, no
    clipping, so the large rates really blow up and are marked as diverged)."""
    config = with_flags(base, test_fraction=scale.test_fraction, lr_schedule="constant",
                        grad_clip=0.0)
    data = sweep_data(config, tokenizer)
    config = with_step_budget(config, data, scale.steps)
    for learning_rate in scale.learning_rates:
        settings = {"learning_rate": learning_rate}
        if not log.done("transformer", settings):
            train_or_diverge(log, "transformer", settings,
                             with_flags(config, learning_rate=learning_rate), device, tokenizer, data)


def sweep_batch_size(log: SweepLog, base, scale, device, tokenizer) -> None:
    """Batch sizes from 1 upward at about an equal number of training examples (so smaller
    batches take more, noisier steps; the steps are rounded to whole epochs), same learning
    rate."""
    config = with_flags(base, test_fraction=scale.test_fraction)
    data = sweep_data(config, tokenizer)
    examples = scale.steps * scale.batch_size
    for batch_size in scale.batch_sizes:
        settings = {"batch_size": batch_size, "examples": examples}
        if not log.done("transformer", settings):
            point = with_step_budget(with_flags(config, batch_size=batch_size), data,
                                     max(1, examples // batch_size))
            train_or_diverge(log, "transformer", settings, point, device, tokenizer, data)


# The attention sweep's points: the pico Transformer with each kind of token mixing.
ATTENTION_SWEEP_POINTS = {
    "softmax": {"attention": "softmax"},
    "linear": {"attention": "linear"},
    "gated_linear, fixed decay (RetNet)": {"attention": "gated_linear",
                                           "linear_attention_gate": "fixed"},
    "gated_linear, data-dependent (GLA)": {"attention": "gated_linear",
                                           "linear_attention_gate": "data"},
}


def sweep_attention(log: SweepLog, base, scale, device, tokenizer) -> None:
    """The pico Transformer with softmax, linear and gated linear attention: the loss at equal
    budget, and how fast each generates against the context length. The trained weights go
    into a model with a block long enough for the longest context (RoPE and linear attention
    have no parameter tied to the block size), which then generates scale.generation_batch
    sequences at once after prompts of each of scale.generation_contexts tokens: every new
    token reads a softmax KV cache as long as the context, a linear state of one size."""
    config = with_flags(base, test_fraction=scale.test_fraction)
    data = sweep_data(config, tokenizer)
    config = with_step_budget(config, data, scale.steps)
    longest = max(scale.generation_contexts) + scale.generation_new_tokens
    for label, overrides in ATTENTION_SWEEP_POINTS.items():
        settings = {"attention_kind": label, **overrides}
        if log.done("transformer", settings):
            continue
        point = with_flags(config, **overrides)
        model, record = train_sweep_model("transformer", "transformer", point, device, tokenizer, data)
        long_block = build_model(with_flags(point, block_size=longest).models.config_of("transformer"),
                                 tokenizer.vocab_size, point.training.seed).to(device)
        long_block.load_state_dict(model.state_dict())
        speeds = [generation_speed(long_block, context, scale.generation_new_tokens,
                                   scale.generation_batch, device)
                  for context in scale.generation_contexts]
        log.add("transformer", settings, {**point_result(record, data), "generation": speeds})


# The recipe sweep's points: the nanoGPT recipe at the pico shape (GPT-2's LayerNorm, learned
# positions, GELU MLP and tied output layer; no biases, nanoGPT's better option; AdamW), each
# idea of the nanoGPT speedrun added to it alone, the pico preset (RMSNorm, RoPE, SwiGLU), and
# the speedrun preset (the pico preset with QK-norm) trained with Muon: what helped, together.
NANOGPT_RECIPE = {"ffn": "gelu", "norm": "layernorm", "pos_emb": "learned", "tie_weights": True}
RECIPE_SWEEP_POINTS = {
    "nanoGPT recipe": NANOGPT_RECIPE,
    "+ QK-norm": {**NANOGPT_RECIPE, "qk_norm": True},
    "+ ReLU² MLP": {**NANOGPT_RECIPE, "ffn": "relu2"},
    "+ logit soft-cap 15": {**NANOGPT_RECIPE, "logit_softcap": 15.0},
    "+ zero-init projections": {**NANOGPT_RECIPE, "zero_init_proj": True},
    "+ value embeddings": {**NANOGPT_RECIPE, "value_embeddings": True},
    "+ U-net skips": {**NANOGPT_RECIPE, "unet_skips": True},
    "+ Muon": {**NANOGPT_RECIPE, "optimizer": "muon"},
    "pico preset": {},
    "speedrun preset + Muon": {"transformer_variant": "speedrun", "optimizer": "muon"},
}
# Per sweep scale: training seconds per point, and the steps of each of the two short runs
# that measure each point's speed.
RECIPE_BUDGETS = {"full": (30.0, 20), "tiny": (0.5, 2)}
RECIPE_EVALUATIONS = 8   # at least this many points on each held-out curve


def train_time_s(history_entry: dict) -> float:
    """Seconds spent in training steps (evaluations excluded) up to a run-log history entry."""
    return history_entry["tokens_seen"] / max(history_entry["tokens_per_s"], 1e-9)


def sweep_recipe(log: SweepLog, base, scale, device, tokenizer) -> None:
    """The modern training recipe against nanoGPT's, at equal training time on running text
    (stream mode). First every point's speed is measured: two short runs each, taken in turns
    so that other load on the machine weighs on all points alike, the mean of their step
    times (each run's first 4 steps left out as warm-up; the mean, not the median, because a
    loaded machine's rare slow steps count in a run's time too). Each point then trains for as
    many steps as the budget allows at its speed, evaluating on the held-out text after every pass
    over the training text, or more often on a corpus too large for a pass to fit the budget
    (RECIPE_EVALUATIONS): its curve of held-out loss against training seconds and steps. The
    shipped 26 KB of text is read many times over in the budget on a fast machine, so the ideas'
    effects mix with overfitting; docs/performance.md runs it on a larger running text."""
    seconds, calibration_steps = RECIPE_BUDGETS[scale.name]
    config = with_flags(base, test_fraction=scale.test_fraction, data_format="stream")
    data = sweep_data(config, tokenizer)      # each point's result is a curve of held-out loss
    points = {label: ({"recipe": label, **overrides, "train_seconds": seconds},
                      with_flags(config, **overrides))
              for label, overrides in RECIPE_SWEEP_POINTS.items()}
    points = {label: point for label, point in points.items() if not log.done("transformer", point[0])}
    step_times = {label: [] for label in points}
    for _ in range(2):
        for label, (_, point) in points.items():
            _, record = train_sweep_model(label, "transformer", with_step_budget(
                point, data, calibration_steps + 4, at_least=True), device, tokenizer, data)
            times = [train_time_s(h) for h in record["history"]]   # 4 warm-up steps, then timed
            step_times[label] += [after - before for before, after in zip(times[3:], times[4:])]
    for label, (settings, point) in points.items():
        seconds_per_step = statistics.fmean(step_times[label])
        steps = max(1, round(seconds / seconds_per_step))
        _, record = train_sweep_model(label, "transformer",
                                      with_step_budget(point, data, steps, RECIPE_EVALUATIONS),
                                      device, tokenizer, data)
        times = {h["step"]: train_time_s(h) for h in record["history"]}
        curve = [{"step": test["step"], "train_time_s": round(times[test["step"]], 3),
                  "test_loss": test["test_loss"], "test_bits_per_byte": test["test_bits_per_byte"]}
                 for test in record["test_history"]]
        log.add("transformer", settings, {**point_result(record, data),
                                          "calibrated_seconds_per_step": seconds_per_step,
                                          "train_time_s": curve[-1]["train_time_s"], "curve": curve})


@torch.no_grad()
def generation_speed(model: TransformerModel, context: int, new_tokens: int, batch: int,
                     device) -> dict:
    """Greedy generation of `new_tokens` tokens for each of `batch` sequences, one step at a
    time through the model's cache, after prompts of `context` random tokens: {"context",
    "batch", "tokens_per_s" (new tokens of all sequences per second; the prompts' forward pass
    untimed), "state_bytes" (what the caches hold at the end)}."""
    model.eval()
    prompts = torch.randint(0, model.vocab_size, (context, batch), device=device,
                            generator=torch.Generator(device=device).manual_seed(context))
    logits, state = model.forward_incremental(prompts, None)
    int(logits[-1, 0].argmax())                   # the prompts' pass ends before the clock starts
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = model.forward_incremental(logits[-1].argmax(dim=-1)[None], state)  # (1, B)
    int(logits[-1, 0].argmax())                   # waits for a GPU to finish
    elapsed = time.perf_counter() - started
    return {"context": context, "batch": batch,
            "tokens_per_s": batch * new_tokens / max(elapsed, 1e-9),
            "state_bytes": sum(cache.bytes_held for cache in state.caches)}


SWEEPS = {"custom_data": sweep_custom_data, "budget": sweep_budget, "overfit": sweep_overfit,
          "hyperparams": sweep_hyperparams, "kgram_variants": sweep_kgram_variants,
          "architectures": sweep_architectures, "sampling": sweep_sampling,
          "ablations": sweep_ablations, "learning_rate": sweep_learning_rate,
          "batch_size": sweep_batch_size, "attention": sweep_attention, "recipe": sweep_recipe}

# The flags a sweep sets itself at every point it trains (besides SWEEP_SET_FLAGS, which all
# sweeps set): a value given for one would be recorded and never read. A flag that some of
# a sweep's points leave alone (--ffn for the ablations' baseline) is read, and passes.
SWEPT_FLAGS = {
    "overfit": ("lr_schedule",),
    "kgram_variants": ("kgram_variant",),
    "architectures": ("n_blocks",),
    "sampling": ("temperature", "top_k", "top_p"),
    "learning_rate": ("learning_rate", "lr_schedule", "grad_clip"),
    "attention": ("attention",),
}


def check_swept_flags(config: Config, names: list[str]) -> None:
    """Refuse a flag, typed or given a value of its own, that one of the sweeps `names` sets
    itself at every point."""
    defaults = default_flags()
    for name in names:
        for flag in SWEPT_FLAGS.get(name, ()):
            if flag in config.typed or config.flags[flag] != defaults[flag]:
                raise UserError(f"--sweep {name} sets --{flag} itself at each point (it is what "
                                f"the sweep compares, or held fixed for it); drop --{flag}")


def parse_sizes(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\s*[0-9]+\s*(,\s*[0-9]+\s*)*", text, flags=re.ASCII):
        raise UserError(f"--custom_sweep_sizes {text!r}: expected positive integers, "
                        "comma-separated (e.g. 100,300,1000)")
    sizes = tuple(int(part) for part in text.split(","))
    if min(sizes) <= 0:
        raise UserError(f"--custom_sweep_sizes {text!r}: expected positive integers")
    if len(set(sizes)) < len(sizes):
        raise UserError(f"--custom_sweep_sizes {text!r}: give each size once")
    return sizes


def run_sweeps(config: Config) -> int:
    """--sweep NAME|presentation, --custom_sweep_log PATH, --collect_transformer_metrics."""
    experiments = config.experiments
    check_sweep_flags(config, f"--sweep {experiments.sweep}" if experiments.sweep else
                      "--custom_sweep_log" if experiments.custom_sweep_log else
                      "--collect_transformer_metrics")
    if experiments.sweep != "presentation":   # the other sweeps of a presentation read them
        check_swept_flags(config, [experiments.sweep] if experiments.sweep else [])
    device = resolve_device(config.device_id)
    check_dtype_fits(config.training.dtype, device)
    note_apple_gpu_defects(device)
    note_emulated_bf16(config.training.dtype, device)
    if experiments.custom_sweep_sizes is not None:
        parse_sizes(experiments.custom_sweep_sizes)
    directory = Path(config.output.artefacts_dir)
    names = (list(PRESENTATION_SWEEPS) if experiments.sweep == "presentation" else
             [experiments.sweep] if experiments.sweep else [])
    if names or experiments.collect_transformer_metrics:   # --custom_sweep_log alone: its file
        check_writable_directory(directory, "--artefacts_dir")
    paths = {name: directory / f"sweep_{name}.json" for name in names}
    if experiments.custom_sweep_log:
        paths["custom_data"] = Path(experiments.custom_sweep_log)
        check_writable_directory(paths["custom_data"].parent, "--custom_sweep_log")
    if experiments.collect_transformer_metrics:
        paths.setdefault("architectures", directory / "sweep_architectures.json")
    check_sweep_files_apart(paths)
    scale = SWEEP_SCALES[experiments.sweep_scale]
    base = sweep_base_config(config, scale)
    tokenizer = build_tokenizer(scale.tokenizer)
    flags = {name: "--custom_sweep_log" if name == "custom_data" and experiments.custom_sweep_log
             else "--artefacts_dir" for name in paths}   # the flag that named each file
    with contextlib.ExitStack() as claims:
        for name, path in paths.items():   # held until the last sweep ends
            claims.enter_context(claim_file(path, flags[name]))
        run_sweep_logs(paths, flags, scale, base, device, tokenizer, experiments.overwrite)
    return 0


def run_sweep_logs(paths: dict[str, Path], flags: dict[str, str], scale: "SweepScale",
                   base: "Config", device, tokenizer, overwrite: bool) -> None:
    """Each sweep of `paths` in turn, adding its points to its file."""
    # Every file is checked before the first sweep starts, not after hours of the others.
    logs = {name: SweepLog(path, name, scale, base, device, overwrite, flags[name])
            for name, path in paths.items()}
    for log in logs.values():
        if log.overwrite_note:
            warn(log.overwrite_note)
    started = time.perf_counter()
    for name, log in logs.items():
        sweep_started = time.perf_counter()
        SWEEPS[name](log, base, scale, device, tokenizer)
        this_run_s = time.perf_counter() - sweep_started
        if log.added or not log.finished_before:   # else the file stays as its points' run left it
            log.data["wall_time_s"] = round(log.earlier_wall_time_s + this_run_s, 2)   # all runs
            log.finish()
        if log.added == 0 and log.skipped:
            print(f"sweep {name}: all {log.skipped} points were already done; they "   # asked for
                  f"are in {log.path} (pass --overwrite to run the sweep afresh)")
        else:
            print(f"sweep {name}: {len(log.data['points'])} points ({log.skipped} already done) "
                  f"in {this_run_s:.0f} s -> {log.path}")
    print(f"sweeps finished in {time.perf_counter() - started:.0f} s")


# --- 7.3 Interpretability ----------------------------------------------------------------
# Attention maps of a Transformer, and k-means clusters of token embeddings.

@torch.no_grad()
def attention_maps(model: TransformerModel, token_ids: list[int], device) -> list[list]:
    """Attention weights of every layer and head for one prompt: [layer][head][query][key]."""
    attentions = [block.attention for block in model.blocks]
    for attention in attentions:
        attention.record_attention = True
    was_training = model.training
    model.eval()
    try:
        model(torch.tensor(token_ids, dtype=torch.long, device=device).unsqueeze(1))  # (T, 1)
        return [attention.last_attention[0].float().cpu().tolist() for attention in attentions]
    finally:
        for attention in attentions:
            attention.record_attention, attention.last_attention = False, None
        model.train(was_training)


def write_attention_maps(model: nn.Module, name: str, tokenizer, prompt: str, directory: Path,
                         device, file_prefix: str = "attention") -> Path | None:
    """<directory>/<file_prefix>_<name>.json with the prompt's tokens, their attention maps, and
    per layer its sliding window (null: the whole context) and its sink logits (null: no sinks;
    with sinks a row of weights sums to 1 minus the sink's share). Softmax attention only:
    linear attention has no weights to show."""
    if not isinstance(model, TransformerModel) or model.config.attention != "softmax":
        return None
    ids = tokenizer.encode(prompt)[: model.config.block_size]
    attentions = [block.attention for block in model.blocks]
    path = directory / f"{file_prefix}_{name}.json"
    write_interpretability_file(path, {
        "kind": "attention", "schema_version": SWEEP_SCHEMA_VERSION, "model": name,
        "prompt": prompt, "tokens": [tokenizer.decode([i]) for i in ids],
        "layers": rounded(attention_maps(model, ids, device), 5),
        "windows": [attention.window for attention in attentions],
        "sinks": [None if attention.sinks is None else attention.sinks.tolist()
                  for attention in attentions]}, compact=True)
    return path


def write_interpretability_file(path: Path, contents: dict, compact: bool = False) -> None:
    try:
        atomic_write_json(path, contents, compact)
    except OSError as error:
        raise cannot_write(str(path), error, "choose another --artefacts_dir") from None


def rounded(values, digits: int):
    """Nested lists of floats rounded to `digits` decimals (attention weights to 1e-5 are
    more than a plot resolves, in far fewer bytes)."""
    if isinstance(values, list):
        return [rounded(value, digits) for value in values]
    return round(values, digits)


def kmeans(points: torch.Tensor, k: int, iterations: int = 30, seed: int = 0):
    """Lloyd's k-means. points (N, D) -> (assignment (N,), centroids (k, D))."""
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        for cluster in range(len(centroids)):
            members = points[assignment == cluster]
            if len(members):
                centroids[cluster] = members.mean(dim=0)
    return torch.cdist(points, centroids).argmin(dim=1), centroids


def token_embeddings(model: nn.Module) -> torch.Tensor:
    """(vocab, dim): the input embedding table, or the unembedding rows (one-hot k-gram)."""
    for attribute in ("token_embedding", "embedding"):
        table = getattr(model, attribute, None)
        if isinstance(table, nn.Embedding):
            return table.weight[: model.vocab_size].detach().float().cpu()
    return model.unembedding.weight.detach().float().cpu()


def token_label(tokenizer, token_id: int) -> str:
    """One token as the clusters show it: its text, "<eot>" for the end of text, and a byte
    that is part of a character (a byte-level tokenizer's lone first byte of "é") as <0xC3>,
    where decoding the token alone gives U+FFFD, the same for every such byte."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text or "<eot>"
    pieces, rest = [], tokenizer.token_bytes(token_id)
    while rest:
        try:
            pieces.append(rest.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            pieces.append(rest[:error.start].decode("utf-8"))
            pieces.extend(f"<0x{byte:02X}>" for byte in rest[error.start:error.end])
            rest = rest[error.end:]
    return "".join(pieces)


def tokens_the_text_uses(data: TrainingData) -> torch.Tensor:
    """The distinct ids of every source's examples, sorted: (n,) int64."""
    used = np.unique(np.concatenate([np.asarray(s.examples.tokens) for s in data.sources]))
    return torch.from_numpy(used.astype(np.int64))


def embedding_clusters(model: nn.Module, tokenizer, data: TrainingData, text_ids: list[int],
                       num_prompt_tokens: int, clusters: int, seed: int, neighbours: int = 3) -> dict:
    """k-means over the embeddings of the tokens the training data uses, and for each
    token of `text_ids` its cluster and nearest neighbours (cosine similarity). The
    annotated text marks every token with its cluster, generated ones also with their
    neighbours: `e[c3 a|o|i]`."""
    used = tokens_the_text_uses(data)
    vectors = token_embeddings(model)[used]
    assignment, _ = kmeans(vectors, min(clusters, len(used)), seed=seed)
    cluster_of = {int(t): int(c) for t, c in zip(used, assignment)}
    normalized = F.normalize(vectors, dim=1)
    label = lambda token_id: token_label(tokenizer, int(token_id))  # noqa: E731
    annotated, tokens = [], []
    for position, token_id in enumerate(text_ids):
        if token_id not in cluster_of:
            continue
        row = int((used == token_id).nonzero()[0, 0])
        similarity = normalized @ normalized[row]
        similarity[row] = -2.0
        nearest = [label(used[i]) for i in similarity.topk(min(neighbours, len(used) - 1)).indices]
        generated = position >= num_prompt_tokens
        tokens.append({"token": label(token_id), "cluster": cluster_of[token_id],
                       "neighbours": nearest, "generated": generated})
        annotated.append(f"{label(token_id)}[c{cluster_of[token_id]}"
                         + (" " + "|".join(nearest) if generated else "") + "]")
    members = {c: [label(t) for t, tc in cluster_of.items() if tc == c]
               for c in sorted(set(cluster_of.values()))}
    return {"clusters": {str(c): m for c, m in members.items()}, "tokens": tokens,
            "annotated": "".join(annotated)}


def write_embedding_clusters(model: nn.Module, name: str, tokenizer, data: TrainingData,
                             sampling: SamplingConfig, clusters: int, directory: Path,
                             device, file_prefix: str = "monosemantic",
                             dtype: str | None = None) -> Path:
    """<directory>/<file_prefix>_<name>.json; prints the annotated greedy sample, decoded in
    `dtype` (the run's --dtype, as its samples are)."""
    decoder = prompt_decoder(model, tokenizer, sampling.prompt, sampling.max_new_tokens, device,
                             dtype=dtype)
    sample = generate_text(model, tokenizer, sampling.prompt, sampling.max_new_tokens,
                           SamplingRule(temperature=0.0), seed=sampling.seed, device=device,
                           decoder=decoder)
    result = embedding_clusters(model, tokenizer, data, sample.token_ids, sample.num_prompt_tokens,
                                clusters, sampling.seed)
    path = directory / f"{file_prefix}_{name}.json"
    write_interpretability_file(path, {"kind": "monosemantic", "schema_version": SWEEP_SCHEMA_VERSION,
                                       "model": name, "text": sample.text, **result})
    say(f"[{name}] embedding clusters: " + "; ".join(
        f"c{c}: {''.join(m[:12])!r}" for c, m in result["clusters"].items()))
    say(f"[{name}] greedy sample, each token with [its cluster and, if generated, nearest "
        f"neighbours]: {result['annotated']}")
    return path


def interpret_models(config: Config, device, tokenizer, data: TrainingData, models: dict,
                     runlog: RunLog) -> None:
    """--attention_maps and --monosemantic_enabled after a normal training run: files named
    after the run, <run_name>.attention_<model>.json and <run_name>.monosemantic_<model>.json
    beside its log, which names them in each model's record ("attention_maps",
    "monosemantic"), so a second run in the same --artefacts_dir never replaces them."""
    directory, experiments = runlog.path.parent, config.experiments
    run_name = runlog.path.stem
    used = len(tokens_the_text_uses(data)) if experiments.monosemantic_enabled else 0
    if experiments.monosemantic_enabled and experiments.monosemantic_clusters > used:
        warn(f"pico-llm: note: --monosemantic_clusters {experiments.monosemantic_clusters:,} is "
             f"more than the {used:,} distinct tokens the text uses: k-means makes at most "
             f"{used:,} clusters")
    for name, model in models.items():
        record = runlog.data["models"][name]
        if experiments.attention_maps:
            path = write_attention_maps(model, name, tokenizer, config.sampling.prompt, directory,
                                        device, file_prefix=f"{run_name}.attention")
            if path is not None:
                record["attention_maps"] = path.name
                print(f"attention maps of {name} written to {path}")
        if experiments.monosemantic_enabled:
            path = write_embedding_clusters(model, name, tokenizer, data, config.sampling,
                                            experiments.monosemantic_clusters, directory, device,
                                            file_prefix=f"{run_name}.monosemantic",
                                            dtype=config.training.dtype)
            record["monosemantic"] = path.name
    if experiments.attention_maps or experiments.monosemantic_enabled:
        runlog.write()


# =============================================================================
# 8. The command line and main()
# =============================================================================
# argparse reads the flags in groups; main() turns them once into the config
# objects above (Config), and every function from here on takes those.

MAX_NEW_TOKENS_LIMIT = 100_000  # beyond this a typo, not a wish: minutes of CPU per sample

MAX_BLOCK_SIZE = 1 << 24  # positions are float32 in RotaryEmbedding and the sinusoids: exact to 2**24

# --models' names: section 2's three, and transformer_gptoss, the GPT-oss preset trained beside
# --transformer_variant's Transformer (--enable_transformer_gptoss)
MODEL_NAMES = ("kgram_mlp_seq", "lstm_seq", "transformer", "transformer_gptoss")
DEFAULT_MODELS = "kgram_mlp_seq,lstm_seq,transformer"  # the course's three


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; we print one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.endswith("expected one argument"):   # --temperature -inf, --prompt "-x":
            flag = message.split()[1].rstrip(":")       # a value that looks like a flag
            message += f" (give it one; a value that begins with '-' is written {flag}=VALUE)"
        raise SystemExit(error_line(f"{message} (see --help)"))

    def print_help(self, file=None) -> None:
        """As argparse's, but a failed write is not ignored: main() reports it (a full disk)."""
        (file or sys.stdout or sys.stderr).write(self.format_help())   # stdout closed: stderr


def str_to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def user_path(text: str) -> str:
    """The type of every path flag: ~ and ~user expanded, as the shell does only before a
    word's first = (--save_dir=~/runs reaches pico-llm unexpanded). ~name for a user this
    system does not know is refused: written as it is, it would make a folder named ~name;
    a path of only white space too (a folder named " " is a typo's), and one with a control
    character (a newline pasted in), which no line that names it would print as typed."""
    if text and not text.strip():   # "" is refused with the flag's name (validate_args)
        raise argparse.ArgumentTypeError(f"{text!r} is only white space, not a path; "
                                         "give one")
    if any(unicodedata.category(character) == "Cc" for character in text):
        raise argparse.ArgumentTypeError(f"{text!r} holds a control character (a newline or "
                                         "tab pasted in?); give the path without it")
    path = os.path.expanduser(text)
    if path.startswith("~"):
        raise argparse.ArgumentTypeError(f"{text}: no user {text[1:].split('/')[0]!r} here "
                                         "whose home ~ could mean; write the path out")
    return path


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default once, and "from the preset" where a preset fills it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text + (" (default: from the preset)" if action.dest in TRANSFORMER_OVERRIDE_FLAGS
                           else "")
        if action.default is False:
            return text
        return text + " (default: %(default)s)"


DEFAULT_TOP_P = 0.95


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="pico-llm.py",
        description="Train and compare small language models (k-gram MLP, LSTM, Transformer).",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--input_files", type=user_path, nargs="*", default=None,
                      help="text files; with --data_format lines (their default) each non-empty "
                           "line is one training example (default: data/custom_corpus, read as "
                           "a stream, when no other source is given)")
    data.add_argument("--input_dir", type=user_path, default=None,
                      help="directory searched recursively for *.txt files (a stream of "
                           "documents, one per file, unless --data_format lines); blank files "
                           "and pipes are skipped")
    data.add_argument("--limit_custom_examples", type=int, default=None,
                      help="use at most this many examples (lines mode) or non-blank lines "
                           "(stream mode) from the custom files")
    data.add_argument("--tinystories_weight", type=float, default=0.0,
                      help="probability that a training example comes from TinyStories "
                           "(0 skips it; the default keeps the run offline)")
    data.add_argument("--tinystories_max_stories", type=int, default=20000,
                      help="read only this many TinyStories stories (from the hub or "
                           "--tinystories_path)")
    data.add_argument("--tinystories_path", type=user_path, default=None,
                      help="local TinyStories copy (json, jsonl, parquet or txt) instead of the hub")
    data.add_argument("--data_format", choices=DATA_FORMATS, default="auto",
                      help="lines: each non-empty line is one example (the course's format); "
                           "stream: each file (as written, indentation and blank lines kept) or "
                           "story joins one token stream that training "
                           "reads in --block_size windows; auto: lines for --input_files, "
                           "stream for --input_dir, the shipped corpus and TinyStories")
    data.add_argument("--random_offsets", action="store_true",
                      help="stream mode: every epoch, move each training window a random 0 to "
                           "block_size - 1 tokens later, so that later epochs do not read the "
                           "same windows again (as nanoGPT's random windows)")
    data.add_argument("--block_size", type=int, default=64,
                      help="context length in tokens; longer examples are truncated")
    data.add_argument("--test_fraction", type=float, default=0.1,
                      help="fraction held out as a fixed test set: of the examples, or in "
                           "stream mode of the documents (of each one's lines, with fewer "
                           f"than {MIN_DOCUMENTS_FOR_HOLDOUT} documents)")
    data.add_argument("--tokenizer", default=None,
                      help="char (UTF-8 bytes: 257 ids, a small output layer that trains fast "
                           "on a CPU), gpt2 (GPT-2's 50257-id BPE through tiktoken, shipped "
                           "offline; the course starter's) or bpe:N (a byte-level BPE with N "
                           "ids trained on the training split, Appendix D) (default: char; "
                           "with --init_from, the model's own)")
    data.add_argument("--cache_dir", type=user_path, default=str(REPO_DIR / ".cache"),
                      help="where tokenized data is cached, keyed by content and tokenizer "
                           "('' caches nothing)")

    models = parser.add_argument_group("models")
    models.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated models to train, from {', '.join(MODEL_NAMES)}")
    models.add_argument("--kgram_k", type=int, default=3,
                        help=f"k-gram context length in tokens, at most {MAX_KGRAM_K}")
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
    tf.add_argument("--n_blocks", type=int, default=None,
                    help="Transformer blocks (the course suggests 2 to 10)")
    tf.add_argument("--d_ff", type=int, default=None,
                    help="feed-forward hidden width (of each expert, with --n_experts)")
    tf.add_argument("--ffn", choices=TRANSFORMER_CHOICES["ffn"], default=None,
                    help="feed-forward type (gelu: the tanh approximation, as GPT-2; gelu_exact: "
                         "with erf, as nanoGPT; relu2: relu(x)^2, the nanoGPT speedrun's; "
                         "clamped_swiglu: GPT-oss's experts)")
    tf.add_argument("--n_experts", type=int, default=None,
                    help="mixture of experts: this many feed-forwards per block, a linear router "
                         "picking --experts_per_token of them for each token (0 = one dense "
                         "feed-forward)")
    tf.add_argument("--experts_per_token", type=int, default=None,
                    help="experts each token is routed to (top-k) (default: 2)")
    tf.add_argument("--router_aux_loss_coef", type=float, default=None,
                    help="weight of the Switch load-balancing loss added to the training loss of "
                         "a mixture of experts (0 = off) (default: 0.01)")
    tf.add_argument("--norm", choices=TRANSFORMER_CHOICES["norm"], default=None,
                    help="normalization layer")
    tf.add_argument("--norm_position", choices=TRANSFORMER_CHOICES["norm_position"],
                    default=None,
                    help="normalize before each sub-layer (pre) or after the residual add (post)")
    tf.add_argument("--pos_emb", choices=TRANSFORMER_CHOICES["pos_emb"], default=None,
                    help="position information (none = NoPE)")
    tf.add_argument("--rope_theta", type=float, default=None, help="RoPE base frequency")
    tf.add_argument("--yarn_factor", type=float, default=None,
                    help="YaRN: stretch RoPE to this many times --yarn_original_context "
                         "(default: 1, plain RoPE)")
    tf.add_argument("--yarn_original_context", type=int, default=None,
                    help="YaRN: the context length the RoPE frequencies were trained for "
                         "(default: 4096)")
    tf.add_argument("--tie_weights", type=str_to_bool, default=None, metavar="true|false",
                    help="share the unembedding matrix with the token embedding")
    tf.add_argument("--bias", type=str_to_bool, default=None, metavar="true|false",
                    help="biases in the linear layers and LayerNorms (GPT-2, minGPT; nanoGPT "
                         "trains without)")
    tf.add_argument("--attention", choices=ATTENTION_KINDS, default=None,
                    help="token mixing: softmax attention (KV cache), or linear / gated_linear "
                         "attention (a fixed-size state per layer) (default: softmax)")
    tf.add_argument("--linear_attention_gate", choices=LINEAR_ATTENTION_GATES, default=None,
                    help="gated_linear's forget gate: fixed per head (RetNet) or data-dependent "
                         "(GLA) (default: data)")
    tf.add_argument("--attention_sinks", type=str_to_bool, default=None, metavar="true|false",
                    help="softmax attention: a learned logit per head in the softmax denominator "
                         "(GPT-oss)")
    tf.add_argument("--sliding_window", type=int, default=None,
                    help="softmax attention: blocks 0, 2, 4, ... attend to only the last N tokens "
                         "(0 = every block sees the whole context)")
    tf.add_argument("--qk_norm", type=str_to_bool, default=None, metavar="true|false",
                    help="softmax attention: RMS-normalize each head's query and key before RoPE "
                         "(Qwen3, the nanoGPT speedrun) (default: the preset's, true for "
                         "speedrun, false for the others)")
    tf.add_argument("--head_size", type=int, default=None,
                    help="each attention head's width (default: 0 = d_model / n_heads)")
    tf.add_argument("--value_embeddings", type=str_to_bool, default=None, metavar="true|false",
                    help="softmax attention: a second token embedding added to every block's "
                         "attention values (the nanoGPT speedrun) (default: false)")
    tf.add_argument("--unet_skips", type=str_to_bool, default=None, metavar="true|false",
                    help="add the first half's block outputs, with learned weights, to the second "
                         "half's block inputs (the nanoGPT speedrun) (default: false)")
    tf.add_argument("--zero_init_proj", type=str_to_bool, default=None, metavar="true|false",
                    help="start attention output projections and MLP output matrices at zero "
                         "(the nanoGPT speedrun) (default: false)")
    tf.add_argument("--logit_softcap", type=float, default=None, metavar="C",
                    help="logits = C tanh(logits / C) (Gemma 2, the nanoGPT speedrun; 0 = off) "
                         "(default: 0)")
    tf.add_argument("--attention_impl", choices=TRANSFORMER_CHOICES["attention_impl"],
                    default="sdpa",
                    help="scaled_dot_product_attention (fast) or the explicit softmax formula")
    tf.add_argument("--dropout", type=float, default=None, help="dropout probability")
    tf.add_argument("--accounting", nargs="?", const="configured", default=None, metavar="WHAT",
                    help="print parameters, FLOPs and training memory per component instead of "
                         "training, at --block_size tokens and --batch_size examples: configured "
                         "(the --transformer_variant with overrides), a preset name, "
                         "gpt2-small|medium|large|xl, or all")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=12,
                       help=f"passes over the training examples, at most {MAX_EPOCHS:,}; with "
                            "--resume it may change (as may --max_steps_per_epoch and "
                            "--early_stop_*) to extend a run, the cosine schedule then recomputed "
                            "for the new total from the step reached")
    train.add_argument("--batch_size", type=int, default=16, help="examples per step")
    train.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW weight decay (matrices and embeddings only)")
    train.add_argument("--beta2", type=float, default=0.999,
                       help="AdamW's second-moment decay, in [0, 1) (0.99 suits small batches, "
                            "as nanoGPT's character-level config; GPT-2 runs use 0.95)")
    train.add_argument("--optimizer", choices=("torch", "scratch", "muon"), default="torch",
                       help="AdamW implementation: PyTorch's fused/foreach kernel (fast) or the "
                            "written-out AdamW of section 5 (same updates); or muon: Muon for the "
                            "hidden weight matrices and the written-out AdamW for the rest, at the "
                            "same learning rate (section 5)")
    train.add_argument("--grad_clip", type=float, default=1.0,
                       help="clip the global gradient L2 norm to this (0 = off)")
    train.add_argument("--lr_schedule", choices=("constant", "cosine"), default="cosine",
                       help="learning-rate schedule after warm-up")
    train.add_argument("--warmup_steps", type=int, default=10, help="linear warm-up steps")
    train.add_argument("--min_lr_ratio", type=float, default=0.1,
                       help="cosine schedule ends at learning_rate * this")
    train.add_argument("--grad_accum_steps", type=int, default=1,
                       help="split each step's --batch_size examples into this many micro-batches "
                            "(same update, less memory); under torchrun the ranks share them too")
    train.add_argument("--max_steps_per_epoch", type=int, default=None,
                       help="stop each epoch after this many steps")
    train.add_argument("--seed", type=int, default=1337, help="seed for data order, init, sampling")
    train.add_argument("--device_id", default="auto",
                       help="auto (CUDA if present, else Apple's MPS, else the CPU; the run's "
                            "first line names the choice), cpu, mps or cuda:N (cuda:N falls back "
                            "to cpu, with a note, when CUDA is absent)")
    train.add_argument("--log_interval", type=int, default=10, help="print train loss every N steps")
    train.add_argument("--quiet", action="store_true", help="no progress bars, fewer messages")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default="Once upon a time", help="prompt for the samples")
    gen.add_argument("--max_new_tokens", type=int, default=20, help="tokens generated per sample")
    gen.add_argument("--temperature", type=float, default=1.0,
                     help="softmax temperature for sampling (0 = greedy)")
    gen.add_argument("--top_k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    gen.add_argument("--top_p", type=float, default=DEFAULT_TOP_P,
                     help="nucleus sampling mass for the configurable sample, in (0, 1]")
    gen.add_argument("--sample_interval", type=int, default=0,
                     help="also print samples every N training steps (0 = only at the end)")

    out = parser.add_argument_group("run logs")
    out.add_argument("--run_name", default=None,
                     help="name of the run log <artefacts_dir>/<run_name>.json "
                          "(default: time, process id, a random tag and the models)")
    out.add_argument("--artefacts_dir", type=user_path, default=str(DEFAULT_ARTEFACTS_DIR),
                     help="directory for JSON run logs, sweeps and interpretability files "
                          "(the committed presentation results stay in artefacts/presentation)")

    ckpt = parser.add_argument_group("checkpoints and fault tolerance (Appendix B)")
    ckpt.add_argument("--save_dir", type=user_path, default=None,
                      help="write checkpoints to DIR/<model>/step_NNNNNN.pt (at the end of each "
                           "model's training, every --checkpoint_every steps, and on Ctrl-C)")
    ckpt.add_argument("--checkpoint_every", type=int, default=0,
                      help="also checkpoint every N steps (0 = only at the end and on Ctrl-C)")
    ckpt.add_argument("--keep_checkpoints", type=int, default=3,
                      help="keep the newest K checkpoints of each model")
    ckpt.add_argument("--resume", type=user_path, nargs="?", const="", default=None, metavar="PATH",
                      help="continue from the newest checkpoints in --save_dir, or from PATH "
                           "(a save directory or one checkpoint file); give the same flags, "
                           "except that the training length (--epochs, --max_steps_per_epoch, "
                           "--early_stop_*) may change, e.g. a larger --epochs to train a "
                           "finished run longer")
    ckpt.add_argument("--generate", action="store_true",
                      help="no training: continue --prompt with the model in --checkpoint (or "
                           "--init_from)")
    ckpt.add_argument("--checkpoint", type=user_path, default=None, metavar="PATH",
                      help="checkpoint file that --generate reads (or --export_hf exports)")
    ckpt.add_argument("--skip_nonfinite", type=int, default=0,
                      help="skip up to N steps whose loss or gradients are NaN/inf "
                           "(0 = stop at the first)")
    ckpt.add_argument("--early_stop_patience", type=int, default=0,
                      help="stop when the test loss has not improved for N epochs (0 = off)")
    ckpt.add_argument("--early_stop_min_delta", type=float, default=0.0,
                      help="a test-loss decrease smaller than this is no improvement")
    ckpt.add_argument("--plateau_patience", type=int, default=0,
                      help="multiply the learning rate by --plateau_factor after N epochs "
                           "without test-loss improvement (0 = off)")
    ckpt.add_argument("--plateau_factor", type=float, default=0.5,
                      help="learning-rate factor on a plateau, in (0, 1)")
    ckpt.add_argument("--lr_min", type=float, default=0.0,
                      help="reduce-on-plateau never takes the peak learning rate below this")
    experiments = parser.add_argument_group("experiments (section 7)")
    experiments.add_argument("--sweep", choices=("presentation", *SWEEP_NAMES), default=None,
                             help="run one sweep into <artefacts_dir>/sweep_<name>.json, or every sweep "
                                  "but recipe, which needs a larger text (presentation); finished "
                                  "points are skipped when started again")
    experiments.add_argument("--sweep_scale", choices=("full", "tiny"), default="full",
                             help="sweep size: full (the presentation) or tiny (seconds, for tests)")
    experiments.add_argument("--overwrite", action="store_true",
                             help="start the sweeps afresh, replacing their files (by default a "
                                  "sweep continues its file, and a file of another scale or other "
                                  "data is refused). A file is replaced when the new sweep's first "
                                  "point is saved: stopped early, only the new points are left")
    experiments.add_argument("--custom_sweep_log", type=user_path, default=None, metavar="PATH",
                             help="run the custom-data size sweep into this JSON file")
    experiments.add_argument("--custom_sweep_sizes", default=None, metavar="N,N,...",
                             help="training examples per point of the custom-data sweep "
                                  "(default 3,63,123,185 at full scale)")
    experiments.add_argument("--collect_transformer_metrics", action="store_true",
                             help="run the architectures sweep: every Transformer preset (reduced "
                                  "width), the LSTM and the k-gram MLP, measured in this run")
    experiments.add_argument("--attention_maps", action="store_true",
                             help="after training, write each Transformer's attention weights for "
                                  "--prompt to <artefacts_dir>/<run_name>.attention_<model>.json")
    experiments.add_argument("--monosemantic_enabled", action="store_true",
                             help="after training, cluster each model's token embeddings (k-means), "
                                  "print a greedy sample with each token's cluster and nearest "
                                  "neighbours, and write "
                                  "<artefacts_dir>/<run_name>.monosemantic_<model>.json")
    experiments.add_argument("--monosemantic_clusters", type=int, default=8,
                             help="k of the k-means over token embeddings")
    dist = parser.add_argument_group("distributed training (Appendix C)")
    dist.add_argument("--dist_timeout", type=float, default=300.0,
                      help="torchrun: seconds (1 to a week) a rank waits to join the job, "
                           "and in a training collective, before the job fails (waits for rank "
                           "0's files, and the "
                           "ranks' agreement after each step whether to stop, which can wait "
                           "behind rank 0's checkpoint: an hour, or this if longer)")
    hf = parser.add_argument_group(
        "Hugging Face (Appendix E; needs the safetensors and tokenizers packages)")
    hf.add_argument("--init_from", type=user_path, default=None, metavar="DIR|HUB_ID",
                    help="start the transformer from a GPT-2, Llama, Qwen2/3, SmolLM or "
                         "GPT-oss model in Hugging Face format (a directory with config.json and "
                         "model.safetensors, or a hub id org/name such as Qwen/Qwen3-0.6B, "
                         "downloaded when the hub is reachable) and train it "
                         "(--models transformer) or --generate from it; its config.json sets "
                         "the shape and its tokenizer the ids")
    hf.add_argument("--export_hf", type=user_path, default=None, metavar="DIR",
                    help="after training, write the transformer to the new directory DIR in "
                         "Hugging Face format (the family that computes it: GPT-2, Llama, Qwen2, "
                         "Qwen3, SmolLM3 or GPT-oss), for transformers' "
                         "AutoModelForCausalLM.from_pretrained(DIR); with --checkpoint PATH, "
                         "export that checkpoint without training")

    bench = parser.add_argument_group("speed (Appendix A)")
    bench.add_argument("--loss", choices=LOSS_KINDS, default="auto",
                       help="chunked: the output layer's loss a chunk of positions at a time, "
                            "never building all logits (Appendix A); fused: PyTorch's "
                            "cross-entropy kernel (Appendix A); plain: section 3's written-out "
                            "cross-entropy on the model's logits; auto: chunked on a CPU for a "
                            "vocabulary of 1024 or more, fused otherwise. Same values")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                       help="training precision: bf16 autocast or fp32, and its samples' and "
                            "--generate's on an NVIDIA GPU "
                            "(default: bfloat16 on a GPU with bf16 units, NVIDIA's since Ampere; "
                            "float32 elsewhere). fp32 on an NVIDIA GPU: matrix products in full "
                            "float32 (PyTorch's default, no TF32), but cuDNN's LSTM and "
                            "convolutions in TF32 since Ampere (PyTorch's default too)")
    bench.add_argument("--cpu_matmul", choices=CPU_MATMUL_KERNELS, default="onednn",
                       help="kernel for float32 linear layers on the CPU: onednn, the default "
                            "(oneDNN's; used only "
                            "where this PyTorch build has it; 2x PyTorch's default on an AMD "
                            "EPYC with AVX-512, about even on one without: docs/performance.md) "
                            "or torch (PyTorch's default, MKL)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile the model (on a GPU with its output layer and loss; "
                            "worth it on GPUs, where it fuses kernels; slow to start on a CPU; "
                            "with --generate, a softmax Transformer's decoding on a GPU)")
    return parser


def utf8_argument(value: str) -> str:
    """An argument whose bytes the terminal's encoding could not read (ASCII under LC_ALL=C;
    Python keeps them as surrogates) read as the UTF-8 they are; else as it came."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    try:
        return os.fsencode(value).decode("utf-8")
    except UnicodeError:      # not UTF-8 either: validate_args says so
        return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; raises UserError on a bad combination."""
    args = build_arg_parser().parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if args.enable_transformer_gptoss and "transformer_gptoss" not in args.models:
        args.models.append("transformer_gptoss")
    if args.tokenizer is None and not (args.init_from or args.generate or args.checkpoint):
        args.tokenizer = "char"  # --init_from brings its own, a --checkpoint too
    if args.prompt is not None:  # text, never a path: its UTF-8 read back where the terminal's
        args.prompt = utf8_argument(args.prompt)   # encoding (LC_ALL=C) could not read it
    typed = typed_flags(argv)
    validate_args(args, typed)
    # Only a fresh training run is held to this: a sweep's points change the model under the
    # flags, and a resumed run or a checkpoint's model keeps the flags it was trained with.
    if not (args.resume is not None or args.generate or args.checkpoint or args.sweep
            or args.custom_sweep_log or args.collect_transformer_metrics or args.accounting):
        check_transformer_flags_are_read(vars(args))
        check_schedule_flags_are_read(args, typed)
    return args


MAX_DIST_TIMEOUT_S = 7 * 24 * 3600
# A million k-gram MLP layers of 16 took 20 GB of Python objects and autograd's graph, which
# the memory check (parameters only) does not see, and 100,000 LSTM layers never finished a
# step; a thousand layers is far deeper than any of these models trains.
MAX_LAYERS = 1000
# Each epoch adds a test-loss record (about 140 bytes) to the run log, which is rewritten whole
# after every epoch: 10,000 epochs make a 1.4 MB log and some 7 GB of writes, a million 70 TB.
# The course trains 12.
MAX_EPOCHS = 10_000
# Past 2**64 no count or size means anything (no tensor holds 2**64 bytes), and past about
# 10**308 an integer no longer converts to a float: the size checks' arithmetic would fail.
MAX_INTEGER = 2**64
# Every position of a batch reads its k previous tokens (the embedding variant holds a
# (T, B, k, embed_size) tensor of them), a cost the memory check (parameters only) does not
# see: two steps on 3seqs.txt at --embed_size 16 took 22 s and 1.2 GB at k = 1024 against 7 s
# and 0.4 GB at k = 3, and k = 100,000 ran out of memory. The course's default is 3.
MAX_KGRAM_K = 1024
# A mixture of experts runs its experts one after another (MixtureOfExperts): two steps at
# --d_model 16 took 15 s with 128 experts and 34 s with 1,024, and 100,000 had not finished
# two steps after two minutes. The largest released mixtures have a few hundred.
MAX_EXPERTS = 1024


def validate_args(args: argparse.Namespace, typed: frozenset = frozenset()) -> None:
    """UserError for the first value or combination of flags that cannot run. `typed`: the
    flags written on the command line (typed_flags), one typed at its default value included."""
    def positive(name: str) -> None:
        value = getattr(args, name)
        if value is not None and not value > 0:                  # NaN too
            raise UserError(f"--{name} must be positive, got {value}")

    if not args.models:
        raise UserError("--models is empty; choose from " + ", ".join(MODEL_NAMES))
    for name in args.models:
        if name not in MODEL_NAMES:
            raise UserError(f"unknown model {name!r} in --models; choose from {', '.join(MODEL_NAMES)}")
    repeated = sorted({name for name in args.models if args.models.count(name) > 1})
    if repeated:  # each model has one record in the run log and one checkpoint series
        raise UserError(f"--models names {', '.join(repeated)} more than once; name each model once")
    if args.kgram_variant not in KGRAM_VARIANTS:
        raise UserError(f"unknown --kgram_variant {args.kgram_variant!r}; "
                        f"choose from {', '.join(KGRAM_VARIANTS)}")
    for name in ("epochs", "batch_size", "grad_accum_steps", "dist_timeout", "block_size", "kgram_k", "embed_size", "lstm_layers",
                 "max_steps_per_epoch", "max_new_tokens", "limit_custom_examples",
                 "tinystories_max_stories", "log_interval"):
        positive(name)
    for name in ("learning_rate", "weight_decay", "grad_clip", "temperature", "rope_theta",
                 "test_fraction", "tinystories_weight", "min_lr_ratio", "router_aux_loss_coef",
                 "yarn_factor", "dist_timeout"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    if args.dist_timeout > MAX_DIST_TIMEOUT_S:
        raise UserError(f"--dist_timeout is at most {MAX_DIST_TIMEOUT_S} seconds (a week), "
                        f"got {args.dist_timeout}")
    if args.dist_timeout < 1:     # less, and the ranks time out joining: a failure of torchrun's
        raise UserError(f"--dist_timeout is at least 1 second, got {args.dist_timeout}")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.rope_theta is not None and args.rope_theta <= 0:  # theta ** (-2i/D) needs theta > 0
        raise UserError(f"--rope_theta must be positive, got {args.rope_theta}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise UserError(f"--min_lr_ratio is a fraction of --learning_rate in [0, 1], "
                        f"got {args.min_lr_ratio}")
    # torch.manual_seed takes up to 2**64 - 1, but the CPU's generator keeps only a seed's low 32
    # bits: on a CPU, --seed 1 and --seed 4294967297 gave the same weights and samples. A run
    # resumed keeps the seed it was started with, from before the limit too.
    if args.resume is not None and not 0 <= args.seed < 2**64:    # what torch.manual_seed takes
        raise UserError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")
    if args.resume is None and not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be between 0 and 2**32 - 1 (a CPU's generator keeps only "
                        f"a seed's low 32 bits), got {args.seed}")
    check_torchrun_environment()
    check_code_cache_folder()
    check_compiler_settings()
    ranks = launched_world_size()
    if args.batch_size < ranks:
        raise UserError(f"--batch_size {args.batch_size} is shared among the {ranks} ranks torchrun "
                        "started (WORLD_SIZE), fewer examples than ranks; raise --batch_size to "
                        f"at least {ranks}, or start fewer ranks")
    if args.grad_accum_steps > args.batch_size // ranks:
        shared = f" / {ranks} ranks" if ranks > 1 else ""
        raise UserError(f"--grad_accum_steps ({args.grad_accum_steps}) must not exceed --batch_size "
                        f"({args.batch_size}{shared}): each micro-batch needs an example")
    for name in ("weight_decay", "grad_clip", "temperature", "warmup_steps", "sample_interval",
                 "kgram_chunk_size", "num_inner_mlp_layers", "top_k"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    limits = {"num_inner_mlp_layers": MAX_LAYERS, "lstm_layers": MAX_LAYERS, "n_blocks": MAX_LAYERS,
              "epochs": MAX_EPOCHS, "kgram_k": MAX_KGRAM_K,
              "n_experts": MAX_EXPERTS}  # why each: the MAX_ constants' comments
    for name, limit in limits.items():
        value = getattr(args, name) or 0
        if value > limit:
            shown = value if value <= MAX_INTEGER else digits_of(value)
            raise UserError(f"--{name} is at most {limit}, got {shown}")
    for name, value in vars(args).items():   # past a float, before any float arithmetic
        if type(value) is int and abs(value) > MAX_INTEGER:
            raise UserError(f"--{name} is {digits_of(value)}, beyond any size or count "
                            f"pico-llm can hold (at most {MAX_INTEGER:,}); give a "
                            f"{'smaller' if value > 0 else 'larger'} one")
    if not math.isfinite(args.learning_rate * max(args.warmup_steps, 1)):  # the warm-up's product
        raise UserError(f"--learning_rate {args.learning_rate} is too large: warming it up over "
                        f"--warmup_steps {args.warmup_steps} overflows a float")
    if args.input_files is not None:
        if not args.input_files:
            raise UserError("--input_files names no file; give one or more, or drop the flag")
        seen = {}
        for name in args.input_files:   # a file twice: its lines in the test and training sets
            if name == "":              # "" would be the current folder
                raise UserError("--input_files names an empty path; give a file")
            if os.path.realpath(name) in seen:
                raise UserError(f"--input_files names {seen[os.path.realpath(name)]} twice; "
                                "name each file once")
            seen[os.path.realpath(name)] = name
    for name in ("input_dir", "tinystories_path", "artefacts_dir", "save_dir", "checkpoint",
                 "custom_sweep_log"):  # "" would be the current folder, or no path: ignored
        if getattr(args, name) == "":
            raise UserError(f"--{name} is empty; give a path, or drop the flag")
    if args.accounting == "":
        raise UserError("--accounting is empty; give configured (what a bare --accounting "
                        "reports), all, a preset name or a GPT-2 size")
    for name in ("run_name", "prompt"):
        value = getattr(args, name) or ""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode
            if utf8_argument(value) == value:
                raise UserError(f"--{name} is not valid UTF-8; check the terminal's encoding "
                                "(e.g. LANG=C.UTF-8)") from None
            raise UserError(f"--{name} is UTF-8 that the terminal's encoding "    # a file name
                            f"({sys.getfilesystemencoding()}) does not read; set LC_ALL=C.UTF-8, "
                            "or give a name in ASCII") from None
    control = any(unicodedata.category(ch).startswith("C") for ch in args.run_name or "")
    if args.run_name is not None and (not args.run_name.strip() or control):
        raise UserError(f"--run_name {args.run_name!r} must be a plain file name: not empty, "
                        "no control or formatting characters")
    if (args.run_name or "").lower().endswith(".json"):  # the log would be x.json.json
        stem = args.run_name[:-len(".json")]
        raise UserError(f"--run_name names the run, not its file: --run_name {stem} writes "
                        f"{stem}.json")
    if args.monosemantic_clusters <= 0:
        raise UserError(f"--monosemantic_clusters must be positive, got {args.monosemantic_clusters}")
    tinystories_flags = {"tinystories_path": args.tinystories_path,   # typed (`typed`) or not
                         "tinystories_max_stories": "tinystories_max_stories" in typed or (
                             args.tinystories_max_stories != DataConfig.tinystories_max_stories)}
    for flag, given in tinystories_flags.items():
        if given and not args.tinystories_weight:
            raise UserError(f"--{flag} is read only with --tinystories_weight above 0 (the share "
                            f"of examples from TinyStories); add it, or drop --{flag}")
    if args.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} is too large; "
                        f"use at most {MAX_NEW_TOKENS_LIMIT}")
    if not args.prompt:
        raise UserError("--prompt is empty; give some text to continue, e.g. --prompt 'Once'")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    top_p_given = "top_p" in typed or args.top_p != DEFAULT_TOP_P
    if args.temperature == 0 and (args.top_k or top_p_given):
        raise UserError(f"--temperature 0 is greedy (always the most likely token), which "
                        f"--{'top_k' if args.top_k else 'top_p'} cannot change; drop one")
    if not 0.0 <= args.tinystories_weight <= 1.0:
        raise UserError(f"--tinystories_weight is a probability in [0, 1], got {args.tinystories_weight}")
    if args.random_offsets and (args.data_format == "lines"
                                or (args.data_format == "auto" and args.input_files)):
        raise UserError("--random_offsets moves stream mode's windows; lines mode has none "
                        "(add --data_format stream)")
    if not 0.0 <= args.beta2 < 1.0:   # NaN fails too
        raise UserError(f"--beta2 must be in [0, 1), got {args.beta2}")
    if not 0.0 <= args.test_fraction < 1.0:
        raise UserError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    if args.block_size > MAX_BLOCK_SIZE:
        raise UserError(f"--block_size {args.block_size:,} is beyond the {MAX_BLOCK_SIZE:,}-token "
                        "limit (positions are float32 in the position encodings, exact up to 2**24)")
    if "kgram_mlp_seq" in args.models and args.block_size <= args.kgram_k and not args.accounting:
        raise UserError(f"--block_size ({args.block_size}) must be larger than --kgram_k "
                        f"({args.kgram_k})")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.tokenizer is not None:
        parse_tokenizer_spec(args.tokenizer)
    validate_checkpoint_args(args)
    validate_huggingface_args(args)
    # Each Transformer's fields are validated, and without one the flags' values all the same,
    # as the k-gram's and the LSTM's are in every run: a bad value is never recorded unread.
    # (--accounting reports its own presets.)
    find_preset(args.transformer_variant)        # transformer_gptoss alone does not read it
    transformers = [name for name in args.models if name.startswith("transformer")]
    for name in [] if args.accounting else transformers or ["transformer"]:
        transformer_config_from_flags(vars(args), name)


def validate_checkpoint_args(args: argparse.Namespace) -> None:
    """The checkpoint group's flags and their combinations (called by validate_args)."""
    for name in ("checkpoint_every", "skip_nonfinite", "early_stop_patience", "plateau_patience"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.keep_checkpoints < 1:
        raise UserError(f"--keep_checkpoints must be at least 1, got {args.keep_checkpoints}")
    for name in ("early_stop_min_delta", "plateau_factor", "lr_min"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name} must be a finite number >= 0, got {value}")
    if not 0.0 < args.plateau_factor < 1.0:
        raise UserError(f"--plateau_factor must be in (0, 1), got {args.plateau_factor}")
    if args.lr_min > args.learning_rate:
        raise UserError(f"--lr_min ({args.lr_min}) must not exceed --learning_rate "
                        f"({args.learning_rate})")
    if (args.early_stop_patience or args.plateau_patience) and args.test_fraction == 0:
        raise UserError("--early_stop_patience and --plateau_patience watch the test loss; "
                        "set --test_fraction above 0")
    sweeping = args.sweep or args.custom_sweep_log or args.collect_transformer_metrics
    if args.overwrite and not sweeping:
        raise UserError("--overwrite replaces sweep files; use it with --sweep, --custom_sweep_log "
                        "or --collect_transformer_metrics")
    if args.sweep_scale != "full" and not sweeping:    # the default: not told apart from absent
        raise UserError(f"--sweep_scale {args.sweep_scale} sizes sweeps, and this run is none; use "
                        "it with --sweep, --custom_sweep_log or --collect_transformer_metrics")
    if args.checkpoint and not args.generate and args.export_hf is None:   # "": said below
        raise UserError("--checkpoint is read by --generate and --export_hf; to continue "
                        "training use --resume")
    if args.generate and checkpoint_flags_given(args):
        raise UserError(f"--generate does not train; drop {checkpoint_flags_given(args)}")
    validate_one_command(args)     # first: a sweep's --resume is refused, not sent to --save_dir
    if args.generate and not (args.checkpoint or args.init_from):   # after: not with --accounting
        raise UserError("--generate needs --checkpoint PATH (a .pt file written with --save_dir) "
                        "or --init_from DIR")
    if args.checkpoint_every and not (args.save_dir or args.resume):
        raise UserError("--checkpoint_every needs --save_dir DIR (where checkpoints go)")
    if args.resume == "" and not args.save_dir:
        raise UserError("--resume without a path resumes from --save_dir; "
                        "pass --save_dir DIR or --resume PATH")


def checkpoint_flags_given(args: argparse.Namespace) -> str:
    """The training run's checkpoint flags on this command line, as "--a and --b" ("" if none):
    what a command that trains nothing is told to drop."""
    return " and ".join(flag for flag, given in (
        ("--resume", args.resume is not None), ("--save_dir", args.save_dir),
        ("--checkpoint_every", args.checkpoint_every)) if given)


def validate_one_command(args: argparse.Namespace) -> None:
    """One command a run: training (the default), --accounting, --generate, --export_hf from a
    --checkpoint, or sweeps (--sweep, --custom_sweep_log and --collect_transformer_metrics,
    which run together); a flag that only another command reads is refused, not ignored. Not
    the flags of training itself and its text: a training command with --generate added still
    works (run_generation notes them, NOT_READ_BY_GENERATE)."""
    sweeps = " ".join(flag for flag, given in (
        ("--sweep", args.sweep), ("--custom_sweep_log", args.custom_sweep_log),
        ("--collect_transformer_metrics", args.collect_transformer_metrics)) if given)
    export = args.checkpoint and not args.generate
    commands = [flag for flag, given in (
        ("--accounting", args.accounting is not None), ("--generate", args.generate),
        ("--export_hf with --checkpoint", export), (sweeps, sweeps)) if given]
    if len(commands) > 1:
        raise UserError(f"{commands[0]} and {commands[1]} are two commands; run them one at a time")
    if commands and launched_world_size() > 1:
        raise UserError(f"{commands[0]} runs in one process; start it with python, not torchrun")
    if commands and checkpoint_flags_given(args):
        raise UserError(f"{commands[0]} keeps no checkpoints of its own; drop "
                        f"{checkpoint_flags_given(args)}")
    if commands and args.run_name is not None:
        raise UserError(f"--run_name names a training run's log, and {commands[0]} writes none; "
                        "drop --run_name")
    if commands and (args.attention_maps or args.monosemantic_enabled):
        raise UserError(f"--attention_maps and --monosemantic_enabled describe a training run's "
                        f"models, and {commands[0]} trains none")
    if commands and args.export_hf and not (export or args.generate):  # --generate: see E.6
        raise UserError(f"--export_hf writes the model a training run or a --checkpoint gives, "
                        f"and {commands[0]} gives none to write")
    if args.attention_maps and not any(name.startswith("transformer") for name in args.models):
        raise UserError("--attention_maps draws a Transformer's attention; add transformer to "
                        "--models")
    if args.attention_maps and args.attention not in (None, "softmax"):
        raise UserError(f"--attention_maps draws softmax attention's weights, and --attention "
                        f"{args.attention} has none to draw (it keeps a running state); drop one")
    custom_data_sweep = args.custom_sweep_log or args.sweep in ("custom_data", "presentation")
    if args.custom_sweep_sizes is not None and not custom_data_sweep:
        raise UserError("--custom_sweep_sizes sets the corpus sizes of the custom_data sweep; add "
                        "--custom_sweep_log PATH or --sweep custom_data")


# The Transformer flags: which override a preset's fields, and the checks on the result.

TRANSFORMER_OVERRIDE_FLAGS = ("d_model", "n_heads", "n_kv_heads", "n_blocks", "d_ff", "ffn",
                              "n_experts", "experts_per_token", "router_aux_loss_coef", "norm",
                              "norm_position", "pos_emb", "rope_theta", "yarn_factor",
                              "yarn_original_context", "tie_weights", "attention",
                              "linear_attention_gate", "attention_sinks", "sliding_window",
                              "qk_norm", "head_size", "value_embeddings", "unet_skips",
                              "zero_init_proj", "logit_softcap", "bias", "dropout")


def find_preset(name: str) -> str:
    for preset in TRANSFORMER_PRESETS:
        if preset.lower() == name.lower():
            return preset
    raise UserError(f"unknown --transformer_variant {name!r}; choose from "
                    + ", ".join(TRANSFORMER_PRESETS))


def validate_transformer_config(config: TransformerConfig, preset: str = "") -> None:
    where = f" (preset {preset})" if preset else ""
    for name in ("d_model", "n_heads", "n_kv_heads", "n_blocks", "d_ff", "yarn_original_context"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name} must be positive{where}, got {getattr(config, name)}")
    for name in ("n_experts", "sliding_window", "router_aux_loss_coef", "head_size",
                 "nope_interval", "logit_softcap"):
        if not getattr(config, name) >= 0:                   # NaN too
            kind = "be a number" if math.isnan(getattr(config, name)) else "not be negative"
            raise UserError(f"--{name} must {kind}{where}, got {getattr(config, name)}")
    for name in ("sliding_window", "nope_interval"):   # positions are int64 in the masks
        if getattr(config, name) > 2**31 - 1:
            raise UserError(f"--{name} must be at most {2**31 - 1}{where} (0 = off), got "
                            f"{getattr(config, name)}")
    if not math.isfinite(config.logit_softcap):
        raise UserError(f"--logit_softcap must be a finite number (0 = off){where}, "
                        f"got {config.logit_softcap}")
    if config.logit_softcap > torch.finfo(torch.float32).max:   # inf in float32: inf x 0 = NaN
        raise UserError(f"--logit_softcap {config.logit_softcap}{where} is past float32's largest "
                        f"number, where the cap would be infinite; use 0 (off) or a cap such as "
                        "15 (the speedrun's)")
    if 0 < config.logit_softcap < 1:   # (-cap, cap) leaves no room to prefer a token, and
        # logits / cap overflows for a tiny cap: training would fail on a NaN gradient
        raise UserError(f"--logit_softcap {config.logit_softcap}{where} squashes every logit "
                        "into less than one nat; use 0 (off) or a cap of at least 1 (the "
                        "speedrun's is 15)")
    if config.rope_scaling not in ROPE_SCALINGS:
        raise UserError(f"rope_scaling {config.rope_scaling!r}{where} is not one of "
                        + ", ".join(ROPE_SCALINGS))
    if not config.head_size and config.d_model % config.n_heads:
        raise UserError(f"--n_heads {config.n_heads} must divide --d_model {config.d_model}{where}")
    if config.n_heads % config.n_kv_heads:
        raise UserError(f"--n_kv_heads {config.n_kv_heads} must divide --n_heads "
                        f"{config.n_heads}{where}")
    if not 1 <= config.experts_per_token <= (config.n_experts or config.experts_per_token):
        bound = (f"between 1 and --n_experts ({config.n_experts})" if config.n_experts
                 else "at least 1")
        raise UserError(f"--experts_per_token must be {bound}{where}, got {config.experts_per_token}")
    if config.yarn_factor < 1:
        raise UserError(f"--yarn_factor must be at least 1 (1 = plain RoPE), got {config.yarn_factor}")
    if config.yarn_factor > 1 and config.pos_emb != "rope":
        raise UserError(f"--yarn_factor stretches rotary embeddings, and --pos_emb is "
                        f"{config.pos_emb}{where}; drop --yarn_factor or use --pos_emb rope")
    if config.pos_emb == "rope" and config.head_dim % 2:
        raise UserError(f"RoPE needs an even head size, got {config.head_dim}{where}")


def preset_of(flags: dict, model_name: str) -> str:
    """The preset `model_name` starts from: --transformer_variant's, GPT-oss for
    transformer_gptoss."""
    return "GPT-oss" if model_name == "transformer_gptoss" else find_preset(flags["transformer_variant"])


def transformer_config_from_flags(flags: dict, model_name: str) -> TransformerConfig:
    """The preset for `model_name` (preset_of), with every explicitly given Transformer flag
    applied on top; UserError if invalid."""
    preset = preset_of(flags, model_name)
    fields = dict(TRANSFORMER_PRESETS[preset])
    for flag in TRANSFORMER_OVERRIDE_FLAGS:
        if flags.get(flag) is not None:
            fields[flag] = flags[flag]
    if flags.get("d_model") is not None and flags.get("d_ff") is None:
        fields.pop("d_ff", None)  # a preset's width belongs to its own d_model
    attention = fields.get("attention", "softmax")
    if attention != "softmax":
        for flag in SOFTMAX_ATTENTION_OPTIONS:
            if flags.get(flag):
                raise UserError(f"--{flag} is an option of softmax attention, not of "
                                f"--attention {attention}")
        # a preset's options of softmax attention are left out (note_preset_options_left_out)
        fields.update(attention_sinks=False, sliding_window=0, qk_norm=False, head_size=0,
                      value_embeddings=False)
    if flags.get("linear_attention_gate") is not None and attention != "gated_linear":
        raise UserError(f"--linear_attention_gate is an option of --attention gated_linear, "
                        f"not of {attention}")
    config = TransformerConfig(block_size=flags["block_size"],
                               attention_impl=flags["attention_impl"], **fields)
    validate_transformer_config(config, preset)
    return config


def preset_options_left_out(flags: dict, model_name: str) -> list[str]:
    """The softmax-attention options that `model_name`'s preset sets (GPT-oss's sinks and
    sliding window, the speedrun's QK-norm) and that another --attention leaves out."""
    fields = TRANSFORMER_PRESETS[preset_of(flags, model_name)]
    if (flags.get("attention") or fields.get("attention", "softmax")) == "softmax":
        return []
    return [name for name in SOFTMAX_ATTENTION_OPTIONS if fields.get(name)]


def note_preset_options_left_out(flags: dict, names: Sequence[str]) -> None:
    """A note for each Transformer trained whose preset's softmax options --attention drops,
    so that `--transformer_variant GPT-oss --attention linear` does not read as GPT-oss; and
    for one whose preset's sliding window sees all of --block_size (typed, such a window is
    refused: unread_transformer_flags), so that its windowed blocks attend as the others do."""
    for name in (name for name in names if name.startswith("transformer")):
        preset, left_out = preset_of(flags, name), preset_options_left_out(flags, name)
        if left_out:
            one = len(left_out) == 1
            warn(f"pico-llm: note: the {preset} preset's {' and '.join(left_out)} "
                 f"{'is an option' if one else 'are options'} of softmax attention, so {name} "
                 f"is built without {'it' if one else 'them'} under --attention {flags['attention']}")
        window = TRANSFORMER_PRESETS[preset].get("sliding_window", 0)
        if window >= flags["block_size"] and not left_out and flags.get("sliding_window") is None:
            warn(f"pico-llm: note: the {preset} preset's sliding window of {window} tokens sees "
                 f"all of --block_size {flags['block_size']}, so {name}'s windowed blocks attend "
                 f"as its others do; give --sliding_window below {flags['block_size']} to keep "
                 "them apart")


def check_transformer_flags_are_read(flags: dict) -> None:
    """A flag given for a part that no Transformer of the run has would be recorded in the run
    log and never read: UserError, saying what would make it count."""
    transformers = [transformer_config_from_flags(flags, name) for name in flags["models"]
                    if name.startswith("transformer")]
    unread = [unread_transformer_flags(flags, config) for config in transformers]
    for flag, why in (unread[0] if unread else {}).items():
        if all(flag in others for others in unread):
            raise UserError(f"--{flag} would be ignored: {why}, or drop --{flag}")


def check_weight_decay_leaves_the_weights(training: TrainingConfig) -> None:
    """Each step multiplies every weight matrix by 1 - lr x weight_decay (AdamW's decay and
    Muon's): at 1 or more that zeroes or flips them all. Checked for the main job only: a
    sweep's points may diverge (the learning-rate sweep's largest is there to show it), and a
    tool may train at a learning rate meant to diverge."""
    if training.learning_rate * training.weight_decay >= 1:
        raise UserError(f"--weight_decay {training.weight_decay:g} times --learning_rate "
                        f"{training.learning_rate:g} is at least 1: each step's decay would zero "
                        f"or flip every weight matrix; give a weight decay below "
                        f"{1 / training.learning_rate:.3g}")


def check_schedule_flags_are_read(args: argparse.Namespace, typed: frozenset) -> None:
    """The learning-rate flags of a schedule that is off, typed on the command line (`typed`,
    at any value, the default's included): UserError rather than a value recorded and never
    used."""
    if args.lr_schedule == "constant" and "min_lr_ratio" in typed:
        raise UserError("--min_lr_ratio would be ignored: --lr_schedule constant keeps the "
                        "learning rate; use --lr_schedule cosine, or drop --min_lr_ratio")
    for flag in ("plateau_factor", "lr_min"):
        if not args.plateau_patience and flag in typed:
            raise UserError(f"--{flag} would be ignored: reduce-on-plateau is off; add "
                            f"--plateau_patience N, or drop --{flag}")


def unread_transformer_flags(flags: dict, config: TransformerConfig) -> dict[str, str]:
    """{flag: why `config` does not read it} for each flag given for a part `config` lacks.
    A flag at its "off" value asks for nothing."""
    no_experts = not config.n_experts and "there are no experts; add --n_experts N"
    if config.attention != "softmax":
        no_rope = f"--attention {config.attention} uses no RoPE; use --attention softmax"
    else:
        no_rope = config.pos_emb != "rope" and f"--pos_emb {config.pos_emb} is not RoPE; use --pos_emb rope"
    # (flag, its "off" value, why it would not be read, or False); --yarn_factor without RoPE
    # positions is refused by validate_transformer_config, with linear attention here.
    unread = [
        ("pos_emb", None, config.attention != "softmax" and config.pos_emb == "rope" and no_rope),
        ("norm_position", None, config.norm == "none" and
         "--norm none has no norm to place; use --norm rmsnorm or layernorm"),
        ("experts_per_token", None, no_experts),
        ("router_aux_loss_coef", 0, no_experts),
        ("rope_theta", None, no_rope),
        ("yarn_factor", 1, config.attention != "softmax" and no_rope),
        ("yarn_original_context", None,
         no_rope or config.yarn_factor <= 1 and "YaRN is off; add --yarn_factor above 1"),
        ("unet_skips", False, config.n_blocks == 1 and "one block has no halves to join; raise --n_blocks"),
        ("attention_impl", "sdpa", config.attention != "softmax" and
         f"--attention {config.attention} has no softmax kernel to choose; use --attention softmax"),
        # a query sees at most --block_size keys, in training and in generation alike
        ("sliding_window", 0, config.sliding_window >= config.block_size and
         f"a window of {config.sliding_window} tokens already sees all of --block_size "
         f"{config.block_size}; give a window below {config.block_size}")]
    return {flag: why for flag, off, why in unread if why and flags.get(flag) not in (None, off)}


def transformer_config_if_valid(flags: dict, model_name: str) -> TransformerConfig | None:
    """As transformer_config_from_flags, but None for a Transformer that is not among the
    models to train and that these flags do not describe validly (say --n_heads 6 with
    the 512-wide GPT-oss preset, when only --transformer_variant minGPT is trained)."""
    try:
        return transformer_config_from_flags(flags, model_name)
    except (UserError, ValueError):                  # ValueError: a kind no flag offers
        if model_name in flags["models"] and not flags.get("accounting"):  # which builds its own
            raise
        return None


@dataclasses.dataclass
class ModelsConfig:
    """The models to train, in order, and one config per model family."""

    names: list[str]
    kgram: KGramConfig
    lstm: LSTMConfig
    transformer: TransformerConfig | None         # the --transformer_variant preset, overridden
    transformer_gptoss: TransformerConfig | None  # the GPT-oss preset with the same overrides

    def config_of(self, name: str) -> KGramConfig | LSTMConfig | TransformerConfig:
        config = {"kgram_mlp_seq": self.kgram, "lstm_seq": self.lstm,
                  "transformer": self.transformer, "transformer_gptoss": self.transformer_gptoss}[name]
        if config is None:
            raise UserError(f"the Transformer flags do not describe a valid {name}")
        return config


@dataclasses.dataclass
class ExperimentConfig:
    """Sweeps and interpretability (section 7)."""

    sweep: str | None = None
    sweep_scale: str = "full"
    overwrite: bool = False            # start sweeps afresh, replacing their files
    custom_sweep_log: str | None = None
    custom_sweep_sizes: str | None = None
    collect_transformer_metrics: bool = False
    attention_maps: bool = False
    monosemantic_enabled: bool = False
    monosemantic_clusters: int = 8


@dataclasses.dataclass
class Config:
    """Everything a run is configured with, built once from the command line by main()."""

    models: ModelsConfig
    data: DataConfig
    training: TrainingConfig
    sampling: SamplingConfig
    speed: SpeedConfig
    checkpoints: CheckpointConfig
    experiments: ExperimentConfig
    output: OutputConfig
    huggingface: HuggingFaceConfig
    device_id: str = "auto"
    dist_timeout: float = 300.0
    accounting: str | None = None            # --accounting WHAT: print, do not train
    transformer_variant: str = "pico"
    # The command line as plain values: written into run logs and checkpoints, and compared
    # with a checkpoint's on --resume.
    flags: dict = dataclasses.field(default_factory=dict)
    # The flags written on main()'s command line, whatever their values (a flag typed at its
    # default is still the user's word); empty for configs built otherwise (a sweep's points).
    typed: frozenset = frozenset()


def section_config(cls, flags: dict, **renamed: str):
    """An instance of the dataclass `cls` whose fields are the flags of the same name
    (or, for a field in `renamed`, the flag named there)."""
    return cls(**{field.name: flags[renamed.get(field.name, field.name)]
                  for field in dataclasses.fields(cls)})


def config_from_flags(flags: dict) -> Config:
    """The config objects for a set of command-line values (every flag, as parse_args
    gives them)."""
    return Config(
        models=ModelsConfig(
            names=list(flags["models"]),
            kgram=section_config(KGramConfig, flags, k="kgram_k", variant="kgram_variant",
                                 num_inner_layers="num_inner_mlp_layers",
                                 chunk_size="kgram_chunk_size"),
            lstm=section_config(LSTMConfig, flags, num_layers="lstm_layers"),
            transformer=transformer_config_if_valid(flags, "transformer"),
            transformer_gptoss=transformer_config_if_valid(flags, "transformer_gptoss")),
        data=section_config(DataConfig, flags),
        training=section_config(TrainingConfig, flags),
        sampling=section_config(SamplingConfig, flags),
        speed=section_config(SpeedConfig, flags),
        checkpoints=section_config(CheckpointConfig, flags),
        experiments=section_config(ExperimentConfig, flags),
        output=section_config(OutputConfig, flags),
        huggingface=section_config(HuggingFaceConfig, flags),
        device_id=flags["device_id"], dist_timeout=flags["dist_timeout"],
        accounting=flags["accounting"], transformer_variant=flags["transformer_variant"],
        flags=dict(flags))


def with_flags(config: Config, **changes) -> Config:
    """`config` with some command-line values changed (a sweep's point), through the same
    checks as the command line: a point is what that command line would train."""
    flags = {**config.flags, **changes}
    validate_args(argparse.Namespace(**flags))
    return config_from_flags(flags)


def plain_flags(args: argparse.Namespace) -> dict:
    """The parsed flags as plain values (str, int, float, bool, None, lists of them), the
    only kinds a run log holds and a weights_only checkpoint loads."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return {key: plain(value) for key, value in vars(args).items()}


def default_flags() -> dict:
    """Every flag at its default, as config.flags holds it."""
    return plain_flags(parse_args([]))


def config_from_command_line(argv: Sequence[str] | None = None) -> Config:
    """Parse and validate the command line, then build the config objects once."""
    config = config_from_flags(plain_flags(parse_args(argv)))
    return dataclasses.replace(config, typed=typed_flags(argv))


def typed_flags(argv: Sequence[str] | None) -> frozenset:
    """The names of the flags on a command line (that parse_args accepted), at any value."""
    parser = build_arg_parser()
    # argparse has no public list of what a command line set: parsed again with no defaults,
    # only the flags written there get a value
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def resolve_device(device_id: str) -> torch.device:
    """auto (CUDA, else Apple's MPS, else the CPU), cpu, mps or cuda:N; an explicit CUDA
    request on a machine without CUDA falls back to cpu with a note."""
    if device_id == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device_id)
    except RuntimeError:
        raise UserError(f"unknown --device_id {device_id!r}; use auto, cpu, mps or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            warn(f"pico-llm: note: CUDA is not available, using cpu instead of {device_id}")
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
        raise UserError(f"unsupported --device_id {device_id!r}; use auto, cpu, mps or cuda:N")
    return device


def prepare_data(data_config: DataConfig, prompt: str, quiet: bool, tokenizer=None):
    """The tokenizer and the tokenized, split training data the config describes (or
    tokenized with `tokenizer`, an imported model's). A bpe:N tokenizer is trained on the
    training split only, never the test set."""
    sources = read_sources(data_config)
    if tokenizer is None:
        training_texts = [source.texts[i] for source in sources for i in source.train]
        tokenizer = build_tokenizer(data_config.tokenizer, training_texts,
                                    Path(data_config.cache_dir) if data_config.cache_dir else None)
    prompt_tokens = len(tokenizer.encode(prompt))
    if prompt_tokens > data_config.block_size:
        raise UserError(f"--prompt is {prompt_tokens} tokens, longer than --block_size "
                        f"{data_config.block_size}; shorten it or raise --block_size")
    data = load_training_data(data_config, tokenizer, sources)
    if not quiet:
        for source in data.sources:
            kind = "windows" if data.data_format == "stream" else "examples"
            print(f"data: {source.name}: {len(source.examples)} {kind} ({len(source.train)} train, "
                  f"{len(source.test)} test), {source.examples.num_tokens:,} tokens "
                  f"[{tokenizer.name}]")
    return tokenizer, data


def check_patience_has_a_test_loss(training: TrainingConfig, data: TrainingData) -> None:
    """UserError if --early_stop_patience or --plateau_patience, which watch the test loss,
    would watch none: the text left no example for the test set (one line; a single long one
    in stream mode), as --test_fraction 0 leaves none and is refused for them."""
    if (training.early_stop_patience or training.plateau_patience) and not any(
            len(source.test) for source in data.sources):
        raise UserError("--early_stop_patience and --plateau_patience watch the test loss, and "
                        "this text leaves no example for the test set; give more text (more "
                        "lines, or a larger --test_fraction), or drop them")


def note_batch_past_the_data(training: TrainingConfig, data: TrainingData) -> None:
    """A note where --batch_size is more than the training examples: an epoch is then one step
    of that many examples, fewer than the run log's batch_size says."""
    examples = data.num_train_examples
    if 0 < examples < training.batch_size:
        warn(f"pico-llm: note: --batch_size {training.batch_size:,} is more than the "
             f"{examples:,} training examples; each step takes {examples:,}")


def data_summary(tokenizer, data: TrainingData) -> dict:
    return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "data_format": data.data_format,
            "sources": {s.name: {"examples": len(s.examples), "train": len(s.train),
                                 "test": len(s.test), "tokens": s.examples.num_tokens,
                                 "bytes": s.examples.num_bytes} for s in data.sources}}


def train_models(config: Config, device: torch.device, tokenizer, data: TrainingData,
                 runlog: RunLog | None, *, context: "Distributed | None" = None,
                 trained_models: dict | None = None, resume_points: dict | None = None,
                 stop: StopRequest | None = None, initial_weights: dict | None = None) -> dict:
    """Build and train every model of config.models, continuing those in resume_points
    ({name: (path, checkpoint)}) and starting those in initial_weights ({name: state
    dict}, an imported model's) from those weights; returns {name: record}. The trained
    modules go into `trained_models` when given (for the interpretability flags and export)."""
    records = {}
    training, save_dir = config.training, checkpoint_directory(config.checkpoints)
    for name in config.models.names:
        model_config = config.models.config_of(name)
        model = build_model(model_config, tokenizer.vocab_size, training.seed)
        if name in (initial_weights or {}):
            model.load_state_dict(initial_weights[name])
        model = model.to(device)
        record = model_record(name, model, model_config, config.data.block_size)
        if runlog is not None:
            runlog.add_model(name, record)
        resume_from = (resume_points or {}).get(name)
        if resume_from is not None:
            with unrestorable(resume_from[0], "progress"):
                progress = progress_from(resume_from[1]["progress"])
        if resume_from is not None and nothing_left_to_train(progress, training):
            restore_checkpoint(*resume_from, model, record, tokenizer, training, config.flags)
            if not training.quiet:
                print(f"model {name}: finished in {resume_from[0]}, not retrained")
            note = length_change_unused(name, resume_from[1], progress, training, config.flags)
            if note:      # asked to train longer, and nothing trains: said even with --quiet
                warn(f"pico-llm: note: {note}")
        else:
            if not training.quiet:
                print(f"model {name}: {record['parameters']:,} parameters, "
                      f"{record['training_flops_per_token'] / 1e6:,.1f} MFLOP per training token")
            series = (CheckpointSeries(save_dir, name, config.checkpoints.keep_checkpoints)
                      if save_dir else None)
            guard = FaultTolerance(name, training, checkpoints=series, resume_from=resume_from,
                                   checkpoint_every=config.checkpoints.checkpoint_every,
                                   stop=stop, runlog=runlog, context=context, flags=config.flags,
                                   tokenizer_spec=config.data.tokenizer or tokenizer.name,
                                   data_fingerprint=data.fingerprint)
            train_one_model(name, model, data, training, config.sampling, device, tokenizer,
                            record, runlog, speed=config.speed, guard=guard, context=context)
        records[name] = record
        if trained_models is not None:
            trained_models[name] = model
    return records


def run_training(config: Config) -> int:
    """The main job: train the models, print a summary, write the run log.
    Under torchrun, rank 0 alone prints and writes."""
    check_weight_decay_leaves_the_weights(config.training)
    context, device_id = setup_distributed(config.device_id, config.dist_timeout)
    claims = contextlib.ExitStack()
    try:
        check_ranks_run_one_command(context, config.flags)
        if not context.is_main:
            config = dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                              quiet=True))
        device = resolve_device(device_id)
        check_dtype_fits(config.training.dtype, device)
        if config.speed.compile:   # before any model, tokens or hub download is read
            check_compile_available(device)
        if context.is_main:
            note_apple_gpu_defects(device)
            note_emulated_bf16(config.training.dtype, device)
            note_preset_options_left_out(config.flags, config.models.names)
        if context.is_main and not config.training.quiet:
            ranks = (f" on rank 0, of {context.world_size} ranks ({torch.distributed.get_backend()})"
                     if context.enabled else "")
            print(f"device: {device}{ranks}" + (" (--device_id auto)" if device_id == "auto" else ""))
        run_path = choose_run_path(config.output, config.models.names)
        longest_name = max(config.models.names, key=len)
        save_dir = checkpoint_directory(config.checkpoints)
        # before the checks below make --artefacts_dir and --save_dir, which may lie inside it
        export_dir, init_from = config.huggingface.export_hf, config.huggingface.init_from
        if export_dir:
            check_export_directory(Path(export_dir))
            if init_from and Path(init_from).is_dir() and Path(init_from).resolve() in (
                    Path(export_dir).resolve().parents):
                raise UserError(f"--export_hf {quoted(export_dir)} is inside the --init_from model "
                                f"{quoted(init_from)}; give the export a directory of its own")
            check_export_apart_from(Path(export_dir), {
                "--artefacts_dir": [run_path.parent],
                "--save_dir": [save_dir / name for name in config.models.names] if save_dir else [],
                "--cache_dir": [Path(config.data.cache_dir)] if config.data.cache_dir else []},
                run_path)
        check_writable_directory(run_path.parent, "--artefacts_dir", deepest=max(   # the longest:
            f".{run_path.stem}.monosemantic_{longest_name}.json.XXXXXXXX.tmp",    # a side file's
            f"{run_path.stem}.tokenizer/.merges.json.XXXXXXXX.tmp", key=len))      # or BPE's
        if save_dir is not None:        # a checkpoint's temporary file, of a step up to 10**12
            check_writable_directory(save_dir, "--save_dir",
                                     deepest=f"{longest_name}/.step_{0:012d}.pt.XXXXXXXX.tmp")
            for name in config.models.names:   # a resumed run writes into these
                if (save_dir / name).is_dir():
                    check_writable_directory(save_dir / name, "--save_dir")
                    check_no_folder_named_as_a_checkpoint(save_dir / name)
        resuming = config.checkpoints.resume is not None
        if context.is_main and save_dir is not None:  # rank 0 alone writes; the others stop when it does
            claims.enter_context(claim_directory(save_dir, "--save_dir"))   # held until the run ends
        resume_points = resume_checkpoints(config.checkpoints, config.models.names, config.flags)
        check_ranks_resume_the_same_steps(context, resume_points)
        if context.is_main and not resume_points:
            check_side_files_are_new(run_path, config)
        replace_run_log = context.is_main and check_run_log_is_new(run_path, resume_points,
                                                                   save_dir, config.flags)
        if context.is_main and resume_points:
            check_finished_models_kept_checkpoints(run_path, resume_points, config.models.names,
                                                   Path(config.checkpoints.resume or save_dir))
        if context.is_main and save_dir is not None:
            check_checkpoints_are_ours(save_dir, config.models.names, resume_points)
            for name in config.models.names:
                remove_stale_temporary_files(save_dir / name, CHECKPOINT_NAME.pattern)
        tokenizer = initial_weights = hf_directory = None
        if config.huggingface.init_from:  # Appendix E: the model's shape and tokenizer
            config, tokenizer, hf_directory = init_from_hf(config, resume_points.get("transformer"))
        vocab_size = tokenizer.vocab_size if tokenizer else tokenizer_vocab_size(config.data.tokenizer)
        check_models_fit_in_memory(config.models, vocab_size, config.data.block_size, device,
                                   config.huggingface.init_from)
        if hf_directory is not None:  # its weights, read once the model is known to fit
            initial_weights = {"transformer": load_hf_weights(hf_directory,
                                                              config.models.transformer)}
        tokenizer, data = prepare_data(config.data, config.sampling.prompt, config.training.quiet,
                                       tokenizer)
        check_ranks_read_the_same_text(context, data)
        check_patience_has_a_test_loss(config.training, data)
        if context.is_main:
            note_batch_past_the_data(config.training, data)
        check_resume_points(config, resume_points, tokenizer, data)   # B: before any model trains
        resumed_run = next((checkpoint["run_id"] for _, checkpoint in resume_points.values()
                            if checkpoint.get("run_id")), None)
        runlog = (RunLog(run_path, config.flags, device, data_summary(tokenizer, data), resumed_run)
                  if context.is_main else None)
        if runlog is not None:
            runlog.data["distributed"] = {"world_size": context.world_size,
                                          "grad_accum_steps": config.training.grad_accum_steps}
            tokenizer_dir = run_path.with_suffix(".tokenizer")  # the run's ids mean nothing without it
            if isinstance(tokenizer, TrainedBPETokenizer):
                runlog.data["data"]["tokenizer_files"] = [str(tokenizer_dir / "vocab.json"),
                                                          str(tokenizer_dir / "merges.json")]
            if resuming and run_path.exists():
                runlog.keep_models_of(load_runlog(run_path))
            runlog.start(create=not (resuming or replace_run_log))
            if isinstance(tokenizer, TrainedBPETokenizer):
                tokenizer.save(tokenizer_dir)
        models: dict = {}
        try:
            with StopRequest(repeat_acts_at_once=not context.enabled) as stop:
                train_models(config, device, tokenizer, data, runlog, context=context,
                             trained_models=models, resume_points=resume_points, stop=stop,
                             initial_weights=initial_weights)
        except BaseException as error:
            if runlog is not None:
                runlog.record_failure(error)
            raise
        if runlog is not None:
            runlog.data["status"] = "finished"
            runlog.write()
            print()
            print(summary_table(runlog.data["models"]))
            print()
            print(ascii_loss_plot(runlog.data["models"]))
            interpret_models(config, device, tokenizer, data, models, runlog)
            if export_dir:
                exported = export_hf(models["transformer"], tokenizer, export_dir)
                print(f"\nHugging Face model written to {exported}")
            if save_dir is not None:
                print(f"\ncheckpoints written to {save_dir}/<model>/ (continue with --resume)")
            print(f"\nrun log written to {run_path}")
        if context.enabled:
            # Every rank reaches destroy_process_group together, as PyTorch asks, rather
            # than the others tearing down while rank 0 still writes the log and samples (on
            # the control group, whose wait is not bounded by --dist_timeout).
            context.barrier()
        return 0
    finally:
        claims.close()
        teardown_distributed(context)


# Flags of training and of the text it reads, which --generate has no use for (nor has
# --checkpoint's export, nor --accounting, but for --batch_size). Typed with one of them (the
# training command, the mode added, still works) they get a note, not a refusal.
NOT_READ_BY_GENERATE = (
    "epochs", "batch_size", "learning_rate", "weight_decay", "optimizer", "grad_clip",
    "lr_schedule", "warmup_steps", "min_lr_ratio", "grad_accum_steps", "max_steps_per_epoch",
    "log_interval", "sample_interval", "keep_checkpoints", "skip_nonfinite",
    "early_stop_patience", "early_stop_min_delta", "plateau_patience", "plateau_factor",
    "lr_min", "input_files", "input_dir", "limit_custom_examples", "tinystories_weight",
    "tinystories_max_stories", "tinystories_path", "data_format", "random_offsets",
    "test_fraction")


def note_flags_not_read(config: Config, mode: str, names: Sequence[str]) -> None:
    """A note naming the flags of `names` typed on the command line, which `mode` (a mode that
    trains nothing and reads no text) does not read. Said once nothing is refused, since a
    refusal is one line."""
    unread = [f"--{name}" for name in names if name in config.typed]
    if unread:
        warn(f"pico-llm: note: {mode} trains nothing and reads no text, so "
             f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read")


# The most tokens TextStream holds back before it writes their text as it reads
HELD_TOKENS = 32


class TextStream:
    """Writes a generation to `stream` as its tokens come: the prompt, then each new piece of
    the decoded continuation.

    A token's text is not always final when it comes. A character may span tokens (a
    byte-level BPE's multi-byte ones): the text decoded so far then ends in U+FFFD, held back
    until the last byte comes. A decoder may rewrite a space at a join ("Hello ." read as
    "Hello."), so trailing spaces wait for what follows. Once nothing is held back, decoding
    starts afresh after the last token, with the tokens before as context
    (decode_continuation), so that each token's decoding stays short however long the text;
    so does a text held back for HELD_TOKENS tokens, written out as it reads.

    What is written is then generate_text's text, decoded whole, but where a decoder changes
    text already complete for a later token: a byte-fallback tokenizer (Llama 2's) reads a
    whole run of byte tokens as U+FFFD once one character in it is cut off, as the last one
    is when the tokens run out. There the pieces as written stand, and the text waits for a
    later token to agree, for HELD_TOKENS tokens at most."""

    def __init__(self, tokenizer, prompt: str, stream) -> None:
        self.tokenizer, self.stream = tokenizer, stream
        self.context = tokenizer.encode(prompt)[-CONTEXT_IDS:]  # the ids before ids[start:]
        self.ids: list[int] = []   # the continuation's tokens, end-of-text left out
        self.start = 0             # self.ids[start:] are those whose text is not all written
        self.pending = ""          # what is written of their text
        self.write(prompt)

    def write(self, text: str) -> None:
        if text:
            self.stream.write(as_shown_on(self.stream, text))
            self.stream.flush()

    def unwritten(self) -> str:
        """The text of self.ids[start:] not yet written. Where a decoder rewrote what was
        written, what follows it by length (the pieces written stand)."""
        return decode_continuation(self.tokenizer, self.context,
                                   self.ids[self.start:])[len(self.pending):]

    def add(self, token_id: int) -> None:
        if token_id == self.tokenizer.eot_id:
            return
        self.ids.append(token_id)
        text = decode_continuation(self.tokenizer, self.context, self.ids[self.start:])
        # Past HELD_TOKENS a text held back (a run of spaces, of bytes that make no character,
        # of tokens that read as nothing, or rewritten) is written out as it reads: no
        # decoding grows with it
        long_held = len(self.ids) - self.start >= HELD_TOKENS
        if not text.startswith(self.pending) and not long_held:
            return                       # rewritten: a later token may make the text agree again
        rest = text[len(self.pending):]
        piece = rest if long_held else rest.rstrip("\ufffd \t")
        self.pending += piece            # before writing: an interrupt then writes nothing twice
        if (piece and piece == rest) or long_held:   # nothing held back: start afresh
            self.context = (self.context + self.ids[self.start:])[-CONTEXT_IDS:]
            self.start, self.pending = len(self.ids), ""
        self.write(piece)

    def finish(self) -> None:
        """Ends the text: what is still held back (a trailing space, a character cut off, as a
        shorter run or an interrupt leaves it), then a newline."""
        self.write(self.unwritten() + "\n")


def run_generation(config: Config) -> int:
    """--generate: continue --prompt with a checkpoint's model (or, with --init_from, a
    Hugging Face model's), using the sampling flags."""
    if config.huggingface.init_from:
        source = config.huggingface.init_from
        path = resolve_init_from(source)
        transformer = config_from_hf(read_hf_config(path))
        check_fits_to_sample(transformer, transformer.vocab_size, f"--init_from {quoted(source)}",
                             "choose a smaller model")
        model, tokenizer = import_hf(path)
        check_tokenizer_fits(config.data.tokenizer, tokenizer, source)
        context = model.config.block_size
        limit = f"the {context} positions of --init_from {source}"
        where = f"--init_from {source}"
        check_models_named(config, "transformer", where)
        if "block_size" in config.typed:    # training's window, as a training command gives it
            warn(f"pico-llm: note: --generate reads up to the {context} positions of --init_from "
                 f"{quoted(source)}; --block_size {config.data.block_size} is not used")
    else:
        path = Path(config.checkpoints.checkpoint)
        model, tokenizer, trained = model_from_checkpoint(path, "--checkpoint")
        context = trained.data.block_size
        limit = f"the checkpoint's --block_size {context}"
        where = f"--checkpoint {path}"
        check_checkpoint_named(config, tokenizer, trained, where, "--generate")
    sampling = config.sampling
    prompt_tokens = len(tokenizer.encode(sampling.prompt))
    if prompt_tokens == 0:
        shown = sampling.prompt if len(sampling.prompt) <= 40 else sampling.prompt[:37] + "..."
        raise UserError(f"--prompt {shown!r} is no token at all in this model's tokenizer; "
                        "give a prompt in its vocabulary")
    if prompt_tokens > context:
        raise UserError(f"--prompt is {prompt_tokens} tokens, longer than {limit}; shorten it")
    note = prompt_coverage_note(tokenizer, sampling.prompt)
    if note:
        warn(note)
    device = resolve_device(config.device_id)
    if config.speed.compile and device.type == "cuda" and StaticDecoder.supports(model):
        check_compile_available(device)
    elif config.speed.compile:
        warn("pico-llm: note: --compile compiles the decoding of a softmax-attention "
             "Transformer on a GPU only; this model samples uncompiled")
    model = model.to(device)
    # generation uses the fast kernels too; it compiles only through decoding_model's decoder
    speed_up(model, dataclasses.replace(config.speed, compile=False), device)
    rule = SamplingRule(sampling.temperature, sampling.top_k, sampling.top_p)
    decoder = prompt_decoder(model, tokenizer, sampling.prompt, sampling.max_new_tokens, device,
                             compile=config.speed.compile, dtype=config.training.dtype)
    note_flags_not_read(config, "--generate", NOT_READ_BY_GENERATE)   # once nothing is refused
    # The text is written as it is sampled (TextStream). Where it goes to a file or a pipe, a
    # bar on a terminal's standard error counts the tokens meanwhile. Ctrl-C or SIGTERM ends
    # the text sampled so far, as a shorter run would have printed it.
    bar = (None if sys.stdout.isatty() else
           progress_bar(sampling.max_new_tokens, "generating", config.training.quiet))
    text = TextStream(tokenizer, sampling.prompt, sys.stdout)

    def on_token(token_id: int) -> None:
        text.add(token_id)
        if bar is not None:
            bar.update(1)
    try:
        generate_text(model, tokenizer, sampling.prompt, sampling.max_new_tokens, rule,
                      seed=sampling.seed, device=device, decoder=decoder, on_token=on_token)
    except (KeyboardInterrupt, Terminated):
        if bar is not None:
            bar.close()
            bar = None
        with contextlib.suppress(OSError):       # a closed pipe or terminal: nobody to read it
            text.finish()
        raise
    except Exception:                            # the error's line on a line of its own
        with contextlib.suppress(OSError):
            text.write("\n")
        raise
    finally:
        if bar is not None:
            bar.close()
    text.finish()
    return 0


def prompt_coverage_note(tokenizer, prompt: str) -> str | None:
    """A note when the tokenizer drops or replaces part of the prompt (an imported model's
    tokenizer.json without byte fallback, or with an unknown token), so that the printed text,
    which begins with the whole prompt, does not pass for what the model read. Differences of
    whitespace alone, which some tokenizers normalize, are not noted; nor is a special token
    the prompt names (<|endoftext|>, <|im_end|>), which an imported tokenizer reads as one id
    and its decode leaves out."""
    ids = tokenizer.encode(prompt)
    read = (tokenizer.decode(ids, skip_special_tokens=False) if isinstance(tokenizer, HFTokenizer)
            else tokenizer.decode(ids))
    if "".join(read.split()) == "".join(prompt.split()):
        return None
    return (f"pico-llm: note: this model's tokenizer does not cover all of --prompt; the model "
            f"reads {textwrap.shorten(read, 60, placeholder='...')!r}")


def as_shown_on(stream, text: str) -> str:
    """`text` to write on `stream`: as it is into a file or a pipe; on a terminal, with the
    control characters other than newline and tab written as escapes (\\x1b, \\r, ...), so
    that a model's output cannot move the cursor, clear the screen or rewrite earlier lines."""
    if not stream.isatty():
        return text
    return "".join(char if char in "\n\t" or unicodedata.category(char) != "Cc"
                   else char.encode("unicode_escape").decode("ascii") for char in text)


def run_accounting(config: Config) -> int:
    """--accounting: where parameters, compute and memory go, without training."""
    what, block_size = config.accounting, config.data.block_size
    if what == "all":
        names = list(TRANSFORMER_PRESETS) + list(GPT2_SHAPES)
    elif what == "configured" or what in GPT2_SHAPES or what in TRANSFORMER_PRESETS:
        names = [what]
    elif what.lower() in GPT2_SHAPES and what.lower() in map(str.lower, TRANSFORMER_PRESETS):
        raise UserError(f"--accounting {what} names both the preset {find_preset(what)} and "
                        f"GPT-2's size {what.lower()}; write the one you mean as shown")
    elif what.lower() in (preset.lower() for preset in TRANSFORMER_PRESETS):
        names = [find_preset(what)]
    else:
        raise UserError(f"unknown --accounting {what!r}; use configured, all, a preset "
                        f"({', '.join(TRANSFORMER_PRESETS)}) or {', '.join(GPT2_SHAPES)}")
    vocab_size = tokenizer_vocab_size(config.data.tokenizer)
    for name in names:
        if name in GPT2_SHAPES:
            transformer = gpt2_shape_config(name, block_size)
        else:
            preset = config.transformer_variant if name == "configured" else name
            transformer = dataclasses.replace(transformer_config_from_flags(
                {**config.flags, "transformer_variant": preset}, "transformer"), vocab_size=vocab_size)
        label = f"{config.transformer_variant} (configured)" if name == "configured" else name
        print(format_accounting(label, transformer_accounting(transformer, block_size),
                                config.training.batch_size))
        print()
    # it reads --batch_size (the memory of a step), and no other flag of training or of text
    note_flags_not_read(config, "--accounting",
                        [name for name in NOT_READ_BY_GENERATE if name != "batch_size"])
    return 0


def run_command(config: Config) -> int:
    """Each mode of the script is one function; training is the default."""
    experiments = config.experiments
    if config.accounting:
        return run_accounting(config)
    if config.checkpoints.generate:
        return run_generation(config)
    if config.checkpoints.checkpoint:  # validate_args lets --checkpoint through only to export
        return run_export(config)
    if experiments.sweep or experiments.custom_sweep_log or experiments.collect_transformer_metrics:
        return run_sweeps(config)
    return run_training(config)


def enable_crash_tracebacks() -> None:
    """A crash in native code (SIGSEGV, SIGABRT, ...) prints every thread's Python stack on
    stderr rather than ending the process without a word. Needs a real stderr file (tests
    that capture stderr in memory have none)."""
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass


def standard_error_is_closed() -> bool:
    """Whether nothing can be written on stderr. Started with `2>&-`, Python has no
    sys.stderr, or one on a descriptor 2 that a launcher reopened for reading (pyenv's shim
    script leaves itself there): every message, the one-line errors included, would fail."""
    if sys.stderr is None:
        return True
    if fcntl is None:
        return False
    try:
        flags = fcntl.fcntl(sys.stderr.fileno(), fcntl.F_GETFL)
    except (io.UnsupportedOperation, ValueError):  # an in-memory stream (tests capture so)
        return False
    except OSError:                                 # no such descriptor
        return True
    return flags & os.O_ACCMODE == os.O_RDONLY


def main(argv: Sequence[str] | None = None) -> int:
    prints_only = True   # done when its output is: --help, --accounting, --generate, and
                         # --export_hf from a --checkpoint, which prints after writing
    if standard_error_is_closed():   # messages are lost, but the exit status still says
        sys.stderr = open(os.devnull, "w")   # what happened (2 for bad input, not a crash's 1)
    for stream in (sys.stdout, sys.stderr):  # a model's text on an ASCII or cp1252 console:
        if hasattr(stream, "reconfigure"):   # escapes, not a UnicodeEncodeError after training
            with contextlib.suppress(ValueError, OSError):    # closed by a caller, say
                stream.reconfigure(errors="backslashreplace")
    try:
        try:
            config = config_from_command_line(argv)
        except SystemExit as exit_request:  # argparse: --help, or a one-line usage error
            if not exit_request.code and sys.stdout is not None:
                sys.stdout.flush()          # the help, on a full disk: one line and status 2
            return int(exit_request.code or 0)
        prints_only = bool(config.accounting or config.checkpoints.generate
                            or config.checkpoints.checkpoint)
        if sys.stdout is None:    # started with file descriptor 1 closed (`>&-`)
            raise UserError("standard output is closed, so nothing could be shown; send it to "
                            "a terminal, a file, or /dev/null")
        enable_crash_tracebacks()
        status = run_command(config)
        sys.stdout.flush()   # a closed pipe shows here, not in the interpreter's shutdown
        return status
    except UserError as error:
        return error_line(str(error))
    except TrainingInterrupted as interruption:
        warn(f"pico-llm: {interruption}")
        return interruption.exit_status
    except KeyboardInterrupt:
        warn("pico-llm: interrupted")
        return 130
    except Terminated as stop:
        warn("pico-llm: " + ("hung up (the terminal closed)" if stop.signal_number == HANGUP
                             else "terminated"))
        return 128 + stop.signal_number
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")
        if prints_only:       # head has all it asked for
            return 0
        with contextlib.suppress(OSError):   # stderr may be the same closed pipe
            warn("pico-llm: stopped: the output was closed (piped into head?) before the run "
                 "finished; send it to a file, or through tail")
        return 128 + signal.SIGPIPE
    except (MemoryError, RuntimeError) as error:
        if launched_world_size() > 1 and peer_failure(error):   # in a step, or any collective
            return error_line(another_rank_stopped(error))
        if str(error).startswith("Symlink loop from "):   # pathlib's resolve() of a looping path
            path = str(error).removeprefix("Symlink loop from ").strip("'")
            return error_line(PATH_ERRORS[errno.ELOOP].format(path=path))
        if not out_of_memory(error):
            raise
        detail = textwrap.shorten(str(error), 100) or type(error).__name__
        return error_line(f"out of memory ({detail}); lower "
                          "--batch_size or --block_size, or train a smaller model")
    except OSError as error:   # a path given that no file system call can take, or a full disk
        if error.errno in FULL_DEVICE_ERRORS:     # `> /dev/full`, standard output on a full disk
            sys.stdout = open(os.devnull, "w")    # else Python's exit would try the write again
            what = quoted(error.filename) if error.filename else "the output"
            return error_line(f"cannot write {what} ({error.strerror}); free some space, or "
                              "send the output elsewhere")
        if error.errno not in PATH_ERRORS:
            raise
        path = quoted(error.filename if error.filename is not None else "a path given")
        return error_line(PATH_ERRORS[error.errno].format(path=path))


def error_line(message: str) -> int:
    """Prints `message` as main()'s one error line (naming the rank under torchrun); the
    exit status of bad input, 2."""
    named = launched_world_size() > 1 and os.environ.get("RANK")   # unset: no rank to name
    rank = f" (rank {os.environ['RANK']})" if named else ""
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")   # a path may hold a newline
    try:
        warn(f"pico-llm: error{rank}: {one_line}")
    except OSError:   # standard error on a full disk: the exit status still says what happened
        sys.stderr = open(os.devnull, "w")
    return 2


# Errors of a path itself, whichever flag gave it and wherever it is first touched (Python's
# Path.exists() answers False only for a path that is missing, and raises these).
PATH_ERRORS = {
    errno.ENAMETOOLONG: "{path}: a name in this path is longer than the file system allows; "
                        "choose a shorter path",
    errno.ELOOP: "{path}: a symbolic link on this path leads round in a loop; choose another path",
    errno.EACCES: "{path}: permission denied (a folder on the way may not be searchable); choose "
                  "a path you can read and write, or change its permissions",
}


# Writes that the device refuses: no space, a quota, a file too large, a failing disk. Files
# that pico-llm writes say which flag to change (cannot_write); what reaches main() is mostly
# standard output (a print on a full disk).
FULL_DEVICE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: Python's MemoryError, a GPU's
    torch.OutOfMemoryError, or a RuntimeError of the CPU's allocator ("can't allocate memory")
    or Apple's GPU ("MPS backend out of memory")."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(error) or "out of memory" in str(error))


def exit_process(status: int) -> None:
    """Ends the process with `status`. A torchrun rank, whose work is done and whose files
    are written and closed, leaves at once after flushing its output: about one full test
    run in three, a rank ended cleanly and then died in C++ teardown during interpreter
    shutdown ("terminate called without an active exception", SIGABRT, no Python frame left
    on the stack), and torchrun reported the whole job as failed."""
    if launched_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


# #############################################################################
# PART III. APPENDICES
# #############################################################################

# =============================================================================
# A. Speed
# =============================================================================
# What it adds: the same arithmetic as Part I, faster on a CPU. It matters when
# the output layer dominates (GPT-2's 50257-token vocabulary on a small model)
# and on AMD processors, where PyTorch's default float32 kernel (MKL) runs its
# AVX2 code at about half the machine's AVX-512 peak. Five pieces, switched on
# together by `speed_up`, which the training loop calls:
#   - linear layers through oneDNN (which PyTorch ships) for float32 on the CPU,
#     with the gradients written out (the weight's by PyTorch's own product);
#     2x MKL's throughput on the benchmark machine;
#   - RoPE's turn of each pair as one complex product (equal to float32 rounding);
#   - an LSTM computing in float32 under bf16 autocast (Float32LSTM, on every device:
#     autocast would run cuDNN's LSTM in float16, and oneDNN's bf16 one needs AVX-512);
#   - the C allocator told to keep freed memory, so large per-step buffers do not
#     fault their pages in again every step;
#   - the chunked linear cross-entropy, which never builds the (positions x vocab)
#     logits and computes the output layer's gradient during the forward pass
#     (for a vocabulary under 1024, PyTorch's fused cross-entropy: `loss_kind`).
# Two more are chosen by flags whose defaults are the fast ones: the fused attention kernel
# (A.2; `--attention_impl math` gives section 1.3's formula) and PyTorch's fused AdamW
# (`--optimizer scratch` gives section 5's). `--loss plain --cpu_matmul torch
# --attention_impl math --optimizer scratch` trains with every piece written out in Part I
# (RoPE's complex product and the float32 LSTM aside); the tests check that both paths give
# the same losses and gradients to float32 rounding.
# On a GPU, what matters is different: passes over memory, launches and host syncs,
# not arithmetic. The loss is PyTorch's fused cross-entropy (a kernel forward and
# one backward, where the written-out formula makes a pass per operation);
# `--compile` compiles model, output layer and loss in one region (a model with experts block
# by block, with static-shape experts; all with section 1.2's real RoPE formula, which
# compilers need); and generation goes through `decoding_model` (`prompt_decoder`):
# static-shape caches replayed as one CUDA graph a token; and --optimizer muon updates each
# group's tensors together (`ForeachMuon`, chosen in build_optimizer).
# Each is tested equal to Part I. Measurements: docs/performance.md.

CPU_MATMUL_KERNELS = ("onednn", "torch")
LOSS_KINDS = ("auto", "chunked", "fused", "plain")


@dataclasses.dataclass
class SpeedConfig:
    """Which kernels and which loss implementation training uses."""

    loss: str = "auto"             # auto (loss_kind) | chunked | fused (this appendix) | plain
                                   # (section 3)
    cpu_matmul: str = "onednn"     # onednn | torch, for float32 linears on the CPU
    compile: bool = False          # torch.compile the model, with its loss on GPUs (compile_for_training)


def speed_up(model: nn.Module, speed: SpeedConfig, device: torch.device,
             lengths_vary: bool = False) -> NextTokenLoss:
    """The one switch from Part I's plain path to the fast one. Returns the loss module
    training calls: section 3's NextTokenLoss, or this appendix's chunked or fused one.

    With cpu_matmul "onednn" on a CPU (and a PyTorch build that has oneDNN's op), the
    model's nn.Linear layers become FastLinear in place: same parameters, same
    state_dict, products through oneDNN; and the C allocator keeps freed memory for
    reuse. On every device, attention turns RoPE's pairs with one complex product
    (complex_rope; compiled code and Apple's GPU keep the real formula), and an LSTM
    computes in float32 under bf16 autocast (Float32LSTM). The loss "auto" is
    the chunked one or PyTorch's fused cross-entropy (FusedNextTokenLoss), as loss_kind
    says. With speed.compile, compile_for_training compiles the model with its loss on a GPU,
    the model alone on a CPU or with the chunked loss, and block by block with experts.
    lengths_vary: the training batches' length changes from step to step (lines mode pads a
    batch to its longest line), so compiled code must take any length."""
    onednn = speed.cpu_matmul == "onednn" and device.type == "cpu" and onednn_available()
    if onednn:
        keep_freed_memory()
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = FastLinear
    complex_rope(model)
    float32_lstm(model)
    kind = loss_kind(speed.loss, device, getattr(model, "vocab_size", None))
    if speed.compile:
        check_compile_available(device)
        compiled_loss = compile_for_training(model, device, kind, lengths_vary)
        if compiled_loss is not None:
            return compiled_loss
    return LOSS_MODULES[kind](model)


# Below this vocabulary the chunked loss costs a CPU more than it saves (measured at nanoGPT's
# character-level shape: PyTorch's loss 6% faster a step with 257 tokens, the chunked one 3%
# faster with 2048 and 13% with GPT-2's 50257; docs/performance.md).
CHUNKED_LOSS_MIN_VOCAB = 1024


def loss_kind(requested: str, device: torch.device, vocab_size: int | None) -> str:
    """--loss auto: on a CPU the chunked loss for a large vocabulary (it spares the memory of
    the logits and does the output layer's gradient in the same pass), PyTorch's fused kernel
    for a small one; on a GPU always the fused kernel (the logits fit, and the passes over
    them, not the arithmetic, are what costs). vocab_size None (a module that is no whole
    model) counts as large."""
    if requested != "auto":
        return requested
    chunked = device.type == "cpu" and (vocab_size is None or vocab_size >= CHUNKED_LOSS_MIN_VOCAB)
    return "chunked" if chunked else "fused"


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """--dtype: bfloat16 on a GPU with bf16 units and float32 elsewhere unless given."""
    return dtype or ("bfloat16" if has_bf16_units(device) else "float32")


def check_dtype_fits(dtype: str | None, device: torch.device) -> None:
    """UserError for a precision that PyTorch has computed wrongly on `device`: on Apple's GPU
    (MPS), the fused causal attention kernel in bf16 let some positions see later tokens
    (reported in 2.11 and 2.12, pytorch#195910; that kernel runs where no gradient is kept,
    as in evaluation and generation), and bf16 is still young there."""
    if dtype == "bfloat16" and device.type == "mps":
        raise UserError("--dtype bfloat16 on Apple's GPU (MPS): PyTorch's causal attention "
                        "there has let some positions see later tokens in bf16; use --dtype float32")


def sampling_device(device: torch.device | str) -> torch.device:
    """Where the next token is drawn: the model's device, except Apple's GPU (MPS), whose
    multinomial in PyTorch 2.13 now and then draws a token of probability 0."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def note_emulated_bf16(dtype: str | None, device: torch.device) -> None:
    """A note for --dtype bfloat16 asked of a GPU without bf16 units (has_bf16_units: a T4, a
    V100), which the default would have trained in float32: PyTorch emulates bf16 there."""
    if dtype == "bfloat16" and device.type == "cuda" and not has_bf16_units(device):
        major, minor = torch.cuda.get_device_capability(device)
        warn(f"pico-llm: note: --dtype bfloat16 on {torch.cuda.get_device_name(device)} (compute "
             f"capability {major}.{minor}), which has no bf16 units: PyTorch emulates bf16 there, "
             "more slowly than it computes float32; drop --dtype to train in float32")


def note_apple_gpu_defects(device: torch.device) -> None:
    """A note for training on Apple's GPU with PyTorch before 2.14: there, float32 matrix
    products whose left operand is a transposed view (every linear layer's weight gradient is
    one) have been reported to PyTorch 10-30% off, depending on the allocator's state."""
    release = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if device.type == "mps" and release < (2, 14):
        warn(f"pico-llm: note: PyTorch {torch.__version__} is reported to compute some float32 "
             "matrix products wrongly on Apple's GPU (pytorch#193487); for results to trust, "
             "install torch 2.14 or later, or use --device_id cpu")


def has_bf16_units(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU that computes in bf16 natively: compute capability 8.0
    (Ampere) or later. Older ones (a T4, a V100) emulate bf16, more slowly than they compute
    in float32; torch.cuda.is_bf16_supported() says yes for those too, and of the current GPU."""
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 8)


def autocast_context(device: torch.device, dtype: str | None = None):
    """bf16 autocast (weights and optimizer stay fp32) or plain fp32. Default per
    resolve_dtype: fp32 on the CPU, where fp32 training is the reference (and bf16
    only pays off on CPUs with bf16 matrix units)."""
    if resolve_dtype(dtype, device) == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Float32LSTM(nn.LSTM):
    """nn.LSTM with autocast off, computing in its weights' dtype (float32; TF32 in cuDNN on
    NVIDIA GPUs since Ampere, PyTorch's default), its inputs cast up; the layers around it
    still take bf16. Under autocast, PyTorch's cast for cuDNN's LSTM
    kernel takes float16 whatever dtype autocast names (bf16 here), and float16 without loss
    scaling lets small gradients vanish; on a CPU, oneDNN's bf16 LSTM exists only for AVX-512
    (on an AVX2 processor it fails: "could not create a primitive descriptor"). The same
    parameters and state_dict; speed_up swaps the class in on every device (float32_lstm)."""

    def forward(self, input, hx=None):
        dtype = self.weight_ih_l0.dtype   # float32 for a model trained under autocast
        hx = None if hx is None else tuple(h.to(dtype) for h in hx)
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.to(dtype), hx)


def float32_lstm(model: nn.Module) -> None:
    """Every nn.LSTM of `model` becomes a Float32LSTM, in place."""
    for module in model.modules():
        if type(module) is nn.LSTM:
            module.__class__ = Float32LSTM


class ChunkedNextTokenLoss(NextTokenLoss):
    """NextTokenLoss through the model's features and its output layer, with the chunked
    linear cross-entropy below: the same value, without the (positions x vocab) logits."""

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                position_weights: torch.Tensor) -> torch.Tensor:
        """inputs, targets, position_weights: (T, B) -> sum of weighted nats (a scalar)."""
        nats = linear_cross_entropy(self.model.features(inputs), self.model.unembedding,
                                    targets, position_weights,
                                    softcap=(self.model.config.logit_softcap
                                             if isinstance(self.model, TransformerModel) else 0.0))
        return nats + router_balance_term(self.model, position_weights)


class FusedNextTokenLoss(NextTokenLoss):
    """NextTokenLoss with PyTorch's own cross-entropy (F.cross_entropy): on a GPU one fused
    kernel for the log-softmax forward and one backward, where section 3's written-out formula
    takes a pass per operation. (Under bf16 autocast both read a float32 copy of the logits:
    cross_entropy is among the operations autocast runs in float32.) Compiled, Inductor fuses
    it into the logits' kernels. The same values as NextTokenLoss (to float32 rounding; the
    tests check it)."""

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                position_weights: torch.Tensor) -> torch.Tensor:
        """inputs, targets, position_weights: (T, B) -> sum of weighted nats (a scalar)."""
        logits = self.model(inputs)                                        # (T, B, V)
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (nats * position_weights.flatten()).sum() + router_balance_term(self.model,
                                                                               position_weights)


LOSS_MODULES = {"chunked": ChunkedNextTokenLoss, "fused": FusedNextTokenLoss, "plain": NextTokenLoss}


@functools.cache
def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN's linear op and it agrees with F.linear.
    The op is internal to PyTorch (its compiler uses it), so check rather than assume.
    The probe draws from a generator of its own: drawing from the global one would shift
    every later random number (a resumed run's dropout masks, say) by when it first ran."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        a, w, c = (torch.randn(*shape, generator=generator) for shape in ((3, 8), (5, 8), (3, 5)))
        return (torch.backends.mkldnn.is_available()
                and torch.allclose(op(a, w, None, "none", [], ""), a @ w.t(), atol=1e-5)
                and torch.allclose(op.binary(a, c, w, None, "add"), a @ w.t() + c, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def onednn_matmul(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ w.T (+ bias) by oneDNN: a (N, k), w (M, k) -> (N, M)."""
    return torch.ops.mkldnn._linear_pointwise(dense(a), dense(w), bias, "none", [], "")


def onednn_matmul_add(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a @ w.T + c by oneDNN, the sum done as the product is written (no extra pass over
    c): a (N, k), w (M, k), c (N, M) -> a new (N, M). oneDNN cannot write into c itself."""
    return torch.ops.mkldnn._linear_pointwise.binary(dense(a), c, dense(w), None, "add")


def weight_gradient(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_y.T @ x, a linear layer's weight gradient: grad_y (N, out), x (N, in) -> (out, in).
    PyTorch's own product, not oneDNN's: the sum runs over N, the rows of both, so oneDNN's
    linear op, which wants its left operand row-major, first copies a transposed one, while
    PyTorch's kernel reads both where they lie. On the 2-core VM (two threads) oneDNN's way,
    copy included, took 1.7x as long at 768 x 128 -> 128 and 2x at 2048 x 256 -> 256, and
    within 3% of PyTorch's at the widening and narrowing shapes measured (docs/performance.md)."""
    return grad_y.t() @ x


def dense(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix itself if it is row- or column-major, else a row-major copy. oneDNN
    takes either layout at full speed, but a slice such as m[:, :k] (rows longer than
    they look) sends it to a reference kernel hundreds of times slower."""
    if matrix.is_contiguous() or matrix.t().is_contiguous():
        return matrix
    return matrix.contiguous()


class OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T + b with oneDNN for the forward and the input's gradient (the weight's:
    weight_gradient). x (N, in), W (out, in), b (out,) or None -> y (N, out)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = onednn_matmul(grad_y, weight.t()) if ctx.needs_input_grad[0] else None  # (N, in)
        grad_w = weight_gradient(grad_y, x) if ctx.needs_input_grad[1] else None  # (out, in)
        grad_b = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a FastLinear's x @ weight.T can go through oneDNN: float32 on the CPU,
    outside autocast and torch.compile (those keep PyTorch's own kernels), not empty (an
    expert no token chose gets zero rows; oneDNN has no primitive for them).
    x (..., in), weight (out, in)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


# oneDNN's product costs about 13 us a call more than PyTorch's (it prepares the weight each
# time): a small product does not earn that back. Without gradients (evaluation, sampling),
# products under both limits below go to PyTorch's kernel: 3x faster for one row of a 128 x 384
# weight, 1.2x at 64 rows; from 2**23 multiply-adds, or a 2**18-entry weight (512 x 512), oneDNN
# is as fast or faster (2x for one row of 768 x 3072). docs/performance.md has the table.
SMALL_PRODUCT_MULTIPLY_ADDS, SMALL_WEIGHT_ENTRIES = 1 << 23, 1 << 18


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through the fastest kernel for the device: (..., in) -> (..., out)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad and (weight.numel() < SMALL_WEIGHT_ENTRIES and
                           x.numel() // x.shape[-1] * weight.numel() < SMALL_PRODUCT_MULTIPLY_ADDS):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])                                       # (N, in)
    y = OneDNNLinear.apply(rows, weight, bias) if needs_grad else onednn_matmul(rows, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose product goes through `linear()`:
    oneDNN for float32 on the CPU. speed_up turns a model's nn.Linear layers into these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def rotate_pairs_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RotaryEmbedding.rotate (section 1.2) as one complex product: each pair (a, b) read as
    a + ib and multiplied by cos + i sin. The real formula's values to float32 rounding,
    forward and backward (bit for bit at head widths that are multiples of 16, as every
    preset's, on the machine measured), in one pass where that makes six: 3.7x faster eager
    on a CPU, up to a fifth of a small-vocabulary model's training step (docs/performance.md).
    x (B, H, T, D), cos and sin (T, D/2) -> (B, H, T, D). Compilers cannot generate code for
    complex numbers, and Apple's GPU is young at them (its conjugates have had wrong-result
    bugs), so there the real formula runs; compiled, it is one fused kernel anyway."""
    if torch.compiler.is_compiling() or x.device.type == "mps":
        return RotaryEmbedding.rotate(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))        # (B, H, T, D/2)
    rotated = pairs * torch.complex(cos, sin)                              # (T, D/2) broadcast
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def complex_rope(model: nn.Module) -> None:
    """Every attention layer of `model` turns its queries and keys with rotate_pairs_complex."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.rotate = rotate_pairs_complex


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt() parameters, from glibc's malloc.h

_freed_memory = {"kept": False}

def keep_freed_memory() -> bool:
    """Ask the C allocator to keep freed blocks under 1 GiB for reuse. Returns whether it did.

    glibc serves blocks over 32 MB with fresh mmap()s and unmaps them on free, so an op
    that allocates a 100 MB logits chunk each step pays 25,000 page faults each time
    (about 25 ms per 100 MB on the benchmark machine); oneDNN always allocates its
    output, so reusing our own buffers cannot avoid it. Raising glibc's mmap and trim
    thresholds serves such blocks from the heap and keeps them there when freed. The
    cost is memory: freed blocks stay with the process until it ends, and a block can
    only be reused by requests that fit it, so peak RSS grows (the benchmark's 100M-token
    probe: 0.97 GB before, 1.1-1.4 GB with this and the loss's larger chunks).
    Elsewhere than glibc (macOS, musl) it does nothing and returns False."""
    if not _freed_memory["kept"] and sys.platform.startswith("linux"):
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)    # the process's C library
        _freed_memory["kept"] = bool(mallopt and mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
                                     and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
    return _freed_memory["kept"]


# -log(p) of a float32 probability p is exact to ~1e-7 down to p = 1e-30; float32's normal
# numbers end near 1e-38, and the softmax of a target 104 nats below its row maximum is 0.
UNTRUSTED_SOFTMAX_LOSS = -math.log(1e-30)                                   # 69.08 nats

def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, with_gradient: bool,
                           in_place: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position CE(logits_i, y_i) and, with_gradient, d CE_i / d logits_i = softmax - onehot,
    written over the logits (in place: no second 100 MB-scale tensor per chunk).
    logits (n, V) float32, targets (n,) -> ((n,), (n, V) or None).

    CE_i = -log softmax(logits_i)[y_i]: the loss is read off the softmax the gradient needs
    anyway, with no logsumexp pass over the (n, V) logits (two amax passes took 4.1 ms of a
    k-gram step's 59 ms here). PyTorch's softmax kernel computes exp(x - max) / sum faster than
    its exp alone. A loss above UNTRUSTED_SOFTMAX_LOSS (target probability under 1e-30, where
    float32 runs out of precision and then underflows to 0, giving inf) is not exact: the
    caller recomputes those rows from their logits (exact_cross_entropy_where_untrusted),
    since these have been overwritten here. On the CPU the softmax writes over its input (its
    kernel reads each row before writing it; the tests check the result); a GPU, where that is
    unverified here, gets a fresh tensor from its cache (in_place None: per device). Not in
    place, the logits survive and the losses are read off them exactly, logsumexp(x) - x[y]: no
    rows to recompute, so no wait for the device to say which (a GPU's memory pass is cheap)."""
    in_place = logits.is_cpu if in_place is None else in_place
    probabilities = torch.softmax(logits, dim=-1, out=logits if in_place else None)       # (n, V)
    if in_place:
        losses = probabilities.gather(1, targets[:, None]).squeeze(1).log().neg_()       # (n,)
    else:
        losses = torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None]).squeeze(1)
    if not with_gradient:
        return losses, None
    probabilities[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return losses, probabilities                                                        # softmax - onehot


def exact_cross_entropy_where_untrusted(losses: torch.Tensor, hidden: torch.Tensor,
                                        weight: torch.Tensor, bias: torch.Tensor | None,
                                        targets: torch.Tensor, softcap: float = 0.0) -> None:
    """Recompute in place, as logsumexp(x) - x[y] from their logits, the losses that
    softmax_cross_entropy_ could not give exactly: the rare confidently wrong positions.
    losses, targets (N,); hidden (N, d); weight (V, d); bias (V,) or None."""
    rows = (losses > UNTRUSTED_SOFTMAX_LOSS).nonzero().squeeze(1)          # NaN stays NaN
    if len(rows):
        logits = soft_cap(F.linear(hidden[rows].float(), weight.float(),
                                   None if bias is None else bias.float()), softcap)  # (r, V)
        losses[rows] = torch.logsumexp(logits, -1) - logits.gather(1, targets[rows, None]).squeeze(1)


def loss_chunk_rows(requested: int, onednn: bool) -> int:
    """Positions per chunk of the chunked loss. oneDNN allocates each chunk's logits
    afresh; unless the allocator keeps freed memory (keep_freed_memory), a chunk must
    stay under glibc's 32 MB mmap threshold (128 x 50257 floats) to avoid page faults."""
    return min(requested, 128) if onednn and not _freed_memory["kept"] else requested


class LinearCrossEntropy(torch.autograd.Function):
    """Weighted sum of cross-entropies of `hidden @ weight.T + bias`, computed a chunk of
    positions at a time so the (positions x vocab) logits never exist in full.

    With GPT-2's 50257-token vocabulary the output layer dominates a small model, and
    a fresh 100 MB-scale logits tensor every step costs as much in page faults as in
    arithmetic. The gradient is computed during the forward pass, chunk by chunk
    (d loss / d logits = w * (softmax - onehot) for position weights w), and only scaled
    in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, position_weights, chunk_size: int,
                onednn: bool, softcap: float = 0.0, grad_enabled: bool = True):
        """hidden (N, d), weight (V, d), bias (V,) or None, targets (N,), position_weights (N,);
        onednn: whether the products may use oneDNN (where uses_onednn allows); softcap: the
        logits are soft_cap(logits, softcap), whose slope 1 - tanh^2 the gradient takes on;
        grad_enabled: torch.is_grad_enabled() where the loss is asked for (forward itself
        always runs without gradients; False under evaluate's no_grad).

        Matmuls run in the autocast dtype when autocast is on (bf16 on a GPU), the softmax
        always in float32."""
        # needs_input_grad says which inputs require gradients, also under torch.no_grad():
        # without grad_enabled an evaluation would pay for two gradient products it discards.
        wants_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type)
                         if torch.is_autocast_enabled(device_type) else weight.dtype)
        with torch.autocast(device_type, enabled=False):
            h_all = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            onednn = onednn and uses_onednn(h_all, w)
            head = (OneDNNHeadChunks if onednn else TorchHeadChunks)(
                h_all, w, b, loss_chunk_rows(chunk_size, onednn), wants_grad)
            losses = hidden.new_empty(hidden.shape[0], dtype=torch.float32)       # (N,)
            for start in range(0, hidden.shape[0], head.rows):
                end = min(start + head.rows, hidden.shape[0])
                logits = head.logits(start, end)                                      # (n, V)
                if softcap:
                    tanh = logits.div_(softcap).tanh_()
                    slope = 1 - tanh.square() if wants_grad else None
                    logits = tanh.mul_(softcap)
                losses[start: end], softmax_minus_onehot = softmax_cross_entropy_(
                    logits, targets[start: end], wants_grad)                           # (n, V)
                if wants_grad and softcap:
                    softmax_minus_onehot.mul_(slope)                # d loss / d uncapped logits
                if wants_grad:
                    head.add_gradients(start, end, softmax_minus_onehot,
                                       position_weights[start: end].float())
            if hidden.is_cpu:                   # elsewhere softmax_cross_entropy_ was exact
                exact_cross_entropy_where_untrusted(losses, h_all, w, b, targets, softcap)
            total = losses @ position_weights.float()
        if wants_grad:
            grad_weight, grad_bias = head.weight_and_bias_gradients()
            ctx.save_for_backward(head.grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                                  *(() if grad_bias is None else (grad_bias.to(bias.dtype),)))
        ctx.has_bias = wants_grad and bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        """Scales the saved gradients in place (no second copy of a 50 MB weight gradient;
        oneDNN's transposed one is written out row-major by the same pass); a second backward
        through the same graph is refused by autograd's version check."""
        grad_hidden, grad_weight, *grad_bias = ctx.saved_tensors
        grad_bias = grad_bias[0].mul_(grad_total) if ctx.has_bias else None
        return (grad_hidden.mul_(grad_total), scaled_(grad_weight, grad_total), grad_bias,
                None, None, None, None, None, None)


class TorchHeadChunks:
    """The output layer's products for LinearCrossEntropy with PyTorch's kernels (GPUs,
    autocast, --cpu_matmul torch). Every product writes into buffers made once and
    reused by every chunk: h (N, d), w (V, d), b (V,) or None."""

    def __init__(self, h, w, b, rows: int, wants_grad: bool) -> None:
        self.h, self.w, self.b, self.rows = h, w, b, rows
        self.low_precision = w.dtype != torch.float32
        self.logits_buffer = torch.empty(min(rows, len(h)), len(w), device=h.device,
                                         dtype=torch.float32)
        self.matmul_buffer = (torch.empty_like(self.logits_buffer, dtype=w.dtype)
                              if self.low_precision else self.logits_buffer)
        self.grad_hidden = torch.empty_like(h) if wants_grad else None
        self.grad_weight = torch.zeros_like(w, dtype=torch.float32) if wants_grad else None
        self.grad_bias = torch.zeros_like(b, dtype=torch.float32) if wants_grad and b is not None else None

    def logits(self, start: int, end: int) -> torch.Tensor:
        """(n, V) float32 logits of positions start..end-1, in the reused buffer."""
        h = self.h[start: end]
        logits, mm_out = self.logits_buffer[:len(h)], self.matmul_buffer[:len(h)]
        if self.b is None:
            torch.mm(h, self.w.t(), out=mm_out)
        else:
            torch.addmm(self.b, h, self.w.t(), out=mm_out)
        return logits.copy_(mm_out) if self.low_precision else logits

    def add_gradients(self, start: int, end: int, softmax_minus_onehot: torch.Tensor,
                      weights: torch.Tensor) -> None:
        """Given softmax - onehot (n, V) and position weights (n,) of those positions:
        d loss / d logits is weights[:, None] * softmax_minus_onehot, applied as n x d work."""
        grad = softmax_minus_onehot
        if self.grad_bias is not None:
            self.grad_bias += weights @ grad                                 # (V,)
        # weighted in float32, rounded once to the matmul dtype (not the weights first)
        weighted_h = (self.h[start: end].float() * weights[:, None]).to(self.h.dtype)  # (n, d)
        if self.low_precision:
            grad = self.matmul_buffer[:len(grad)].copy_(grad)
        grad_hidden = self.grad_hidden[start: end]
        torch.mm(grad, self.w, out=grad_hidden)
        grad_hidden.mul_(weights[:, None])
        if self.low_precision:
            self.grad_weight += (grad.t() @ weighted_h).float()
        else:
            self.grad_weight.addmm_(grad.t(), weighted_h)

    def weight_and_bias_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.grad_weight, self.grad_bias


class OneDNNHeadChunks:
    """The output layer's products for LinearCrossEntropy with oneDNN (float32 CPU).
    oneDNN allocates every output (keep_freed_memory makes that cheap) and cannot add
    into an existing tensor in place, so the weight gradient is carried as a running
    sum, grad_weight.T (d, V) = h.T @ grad_logits + previous: oneDNN's fastest layout
    for this product (362 vs 237 GFLOP/s for grad_logits.T @ h at 512 x 50257 x 256).
    Where freed memory is not kept, each new sum would fault its pages in again, so
    the weight gradient is added in place by PyTorch's kernel instead."""

    def __init__(self, h, w, b, rows: int, wants_grad: bool) -> None:
        self.h, self.w, self.b, self.rows = h, w, b, rows
        self.grad_hidden = torch.empty_like(h) if wants_grad else None
        self.grad_weight_t = None                                           # (d, V) running sum
        self.grad_weight = (torch.zeros_like(w) if wants_grad and not _freed_memory["kept"]
                            else None)                                      # (V, d) in place
        self.grad_bias = torch.zeros_like(b) if wants_grad and b is not None else None

    def logits(self, start: int, end: int) -> torch.Tensor:
        return onednn_matmul(self.h[start: end], self.w, self.b)           # (n, V)

    def add_gradients(self, start: int, end: int, softmax_minus_onehot: torch.Tensor,
                      weights: torch.Tensor) -> None:
        """As TorchHeadChunks.add_gradients: the weights scale n x d tensors only."""
        grad = softmax_minus_onehot                                         # (n, V)
        weighted_h = self.h[start: end] * weights[:, None]                  # (n, d)
        torch.mul(onednn_matmul(grad, self.w.t()), weights[:, None],
                  out=self.grad_hidden[start: end])                         # (n, d)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad.t(), weighted_h)
            if self.grad_bias is not None:
                self.grad_bias += weights @ grad                            # (V,)
            return
        if self.b is not None:
            # A column of weights makes the product's last row the bias gradient,
            # sum_i w_i grad_i, at no extra cost (a pass of its own takes 4 ms at 512 x 50257).
            weighted_h = torch.cat([weighted_h, weights[:, None]], dim=1)   # (n, d + 1)
        if self.grad_weight_t is None:
            self.grad_weight_t = onednn_matmul(weighted_h.t(), grad.t())    # (d [+ 1], V)
        else:
            self.grad_weight_t = onednn_matmul_add(weighted_h.t(), grad.t(), self.grad_weight_t)

    def weight_and_bias_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight gradient (V, d), here a column-major view that LinearCrossEntropy's
        backward writes out row-major as it scales it; the bias gradient (V,) or None."""
        if self.grad_weight is not None:
            return self.grad_weight, self.grad_bias
        if self.grad_weight_t is None:                                      # no positions
            return torch.zeros_like(self.w), (None if self.b is None else torch.zeros_like(self.b))
        if self.b is None:
            return self.grad_weight_t.t(), None
        return self.grad_weight_t[:-1].t(), self.grad_weight_t[-1]


def scaled_(gradient: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """gradient * scale: in place when row-major; a transposed view is written out row-major
    in the same pass (PyTorch's multiply transposes twice as fast as its copy: 5.6 vs 9.6 ms
    for 50257 x 256 here), so the weight gradient has its parameter's layout."""
    if gradient.is_contiguous():
        return gradient.mul_(scale)
    return torch.mul(gradient, scale, out=torch.empty(gradient.shape, dtype=gradient.dtype,
                                                      device=gradient.device))


def linear_cross_entropy(hidden: torch.Tensor, layer: nn.Linear, targets: torch.Tensor,
                         position_weights: torch.Tensor, chunk_size: int = 512,
                         softcap: float = 0.0) -> torch.Tensor:
    """sum_i position_weights[i] * CE(soft_cap(layer(hidden[i]), softcap), targets[i]) over
    positions i. hidden (..., d), targets and position_weights (...). The output layer's
    products use oneDNN when the layer does (a FastLinear), PyTorch's kernels otherwise."""
    return LinearCrossEntropy.apply(hidden.flatten(0, -2), layer.weight, layer.bias,
                                    targets.flatten(), position_weights.flatten(), chunk_size,
                                    isinstance(layer, FastLinear), softcap, torch.is_grad_enabled())


# --- A.1 Compiled training: static shapes ---------------------------------------------
# torch.compile (Inductor) turns a model into a few fused kernels, which is what a GPU needs
# (eager GPT-2 small spends much of a step launching kernels); it needs code whose shapes do
# not depend on the data and arithmetic it can generate code for. Two Part I pieces are not
# such code: the mixture of experts (each expert's share of the positions is known only once
# the router ran) and linear attention's loop over chunks (as many as the length needs). Their
# compiled forms follow; Part I takes them while torch.compile traces it, which speed_up starts
# under --compile. (RoPE's complex product, above, likewise keeps the real formula there.)


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) -> (..., N, N): entry [n, m] is x[m+1] + ... + x[n] for m <= n (0 where
    m = n) and -inf for m > n. Each entry adds only its own terms: a difference of two
    running sums would lose the digits of a short sum taken after a long one."""
    N = x.shape[-1]
    before = torch.ones(N, N, dtype=torch.bool, device=x.device).tril(-1)   # [i, m]: m < i
    sums = x[..., :, None].expand(*x.shape, N).masked_fill(~before, 0).cumsum(dim=-2)
    return sums.masked_fill(before.T, float("-inf"))


def all_chunks_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                log_decay: torch.Tensor, state: torch.Tensor,
                                chunk_size: int = LINEAR_ATTENTION_CHUNK) -> tuple[torch.Tensor, ...]:
    """chunked_linear_attention with every chunk at once, for compiled code: the same inputs
    and results (to float32 rounding), and no Python loop over the chunks, whose count
    torch.compile would otherwise fix in the graph (lines mode: one compilation per length).

    The sequence is padded to N whole chunks of C with tokens that change nothing (k = v = 0,
    no decay) and viewed as (B, H, N, C, .). Within each chunk, as before. Across chunks, the
    state after chunk n sums what each chunk m <= n added (U_m), decayed by the chunks after
    it: S_n = sum_m exp(L[n, m]) U_m, L = segment_sums of the chunks' total log decays, with
    the carried-in state as a chunk before the first that adds S_0. That is one (N + 1) x
    (N + 1) product per head and key dimension instead of a loop; its weights grow as N², but
    stay within the memory of the within-chunk (C, C) terms up to N = C² chunks (4,096 tokens
    at C = 16)."""
    T, C = q.shape[2], chunk_size
    # contiguous first: padding by 0 keeps its input's strides, where a graph compiled for
    # any length expects a contiguous result (a length of whole chunks failed in a view)
    q, k, v, log_decay = (F.pad(t.contiguous(), (0, 0, 0, -T % C)) for t in (q, k, v, log_decay))
    qc, kc, vc, gc = (t.unflatten(2, (-1, C)) for t in (q, k, v, log_decay))  # (B, H, N, C, .)
    b = gc.cumsum(dim=3)                                          # (B, H, N, C, D) within a chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[..., None]
    gap = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal, float("-inf"))
    scores = (qc[..., :, None, :] * kc[..., None, :, :] * gap.exp()).sum(-1)   # (B, H, N, C, C)
    end = b[..., -1:, :]                                          # (B, H, N, 1, D) over each chunk
    added = (kc * (end - b).exp()).transpose(-2, -1) @ vc         # (B, H, N, D, E) U_n
    added = torch.cat([state[:, :, None], added], dim=2)          # (B, H, N + 1, D, E) S_0 first
    decays = F.pad(end.squeeze(-2), (0, 0, 1, 0)).transpose(-2, -1)         # (B, H, D, N + 1)
    weights = segment_sums(decays).exp()                          # (B, H, D, N + 1, N + 1)
    states = torch.einsum("bhdnm,bhmde->bhnde", weights, added)   # (B, H, N + 1, D, E) at ends
    y = (qc * b.exp()) @ states[:, :, :-1] + scores @ vc          # (B, H, N, C, E)
    # the first T positions copied out: a slice would be contiguous for whole chunks only, and
    # a graph for any length would be compiled once for each case
    return y.flatten(2, 3).index_select(2, torch.arange(T, device=y.device)), states[:, :, -1]


def loop_free_linear_attention(model: nn.Module) -> None:
    """Every LinearAttention of `model` computes its chunks all at once (same parameters)."""
    for module in model.modules():
        if isinstance(module, LinearAttention):
            module.chunked = all_chunks_linear_attention


class StaticShapeMixtureOfExperts(MixtureOfExperts):
    """MixtureOfExperts with shapes that do not depend on the routing, for compiled code and
    CUDA graphs: every expert runs on every position, weighted by the router's softmax over
    the top k where it was chosen and by 0 elsewhere. The same output and gradients as the
    sparse layer (a 0 weight adds exactly nothing), at E / k times its expert arithmetic: worth
    it where kernel launches and host syncs, not arithmetic, bound the step (a GPU at small
    width). speed_up turns a model's MixtureOfExperts into these when compiling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])                                    # (N, d_model)
        logits = self.router(tokens)                                           # (N, E)
        top_logits, chosen = logits.topk(self.experts_per_token, dim=-1)       # (N, k)
        gates = torch.zeros_like(logits, dtype=torch.float32).scatter(
            1, chosen, torch.softmax(top_logits, dim=-1).float())             # (N, E), k nonzero
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            out = out + (gates[:, index, None] * expert(tokens)).to(out.dtype)
        self.routing = Routing(torch.softmax(logits.float(), dim=-1), chosen)
        if self.training:
            counts = F.one_hot(chosen, len(self.experts)).sum(dim=(0, 1))      # (E,)
            if self.usage is None:            # swapped in without static_experts: counts begin
                self.usage = torch.zeros_like(counts)
            self.usage += counts              # in place: the compiled graph never sees None
        return out.view_as(x)

    def take_usage(self) -> torch.Tensor | None:
        """As MixtureOfExperts.take_usage, but the counter is zeroed in place, never dropped
        (a compiled step guards on it: a counter set back to None would recompile the model)."""
        if self.usage is None or not self.usage.any():
            return None
        usage = self.usage.clone()
        self.usage.zero_()
        return usage


def static_experts(model: nn.Module) -> None:
    """Every MixtureOfExperts of `model` made a StaticShapeMixtureOfExperts in place (same
    parameters), its usage counter a zero tensor from the start."""
    for module in model.modules():
        if type(module) is MixtureOfExperts:
            module.__class__ = StaticShapeMixtureOfExperts
            module.usage = torch.zeros(len(module.experts), dtype=torch.long,
                                       device=module.router.weight.device)


def compiled_while_training(function, dynamic: bool | None):
    """`function` compiled for calls with gradients on (training steps; `dynamic` is
    torch.compile's, as compile_for_training chooses it) and run as it is with them off:
    evaluation (its shorter last batch too) and generation compile nothing more. Compiling
    those as well cost a CPU two recompilations, 17 s, in a minGPT run whose training step
    compiled in 36 s (docs/performance.md)."""
    compiled = torch.compile(function, dynamic=dynamic)

    def call(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else function)(*args, **kwargs)

    return call


def compile_model(model: nn.Module, dynamic: bool | None = False) -> None:
    """--compile on a CPU, or with the chunked loss: the model's features compiled for training,
    in place; the loss stays eager (on a GPU CompiledTrainingLoss compiles the whole loss
    module)."""
    model.features = compiled_while_training(model.features, dynamic)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot generate code for `device` here, or None: Inductor builds C++
    with the system's compiler on a CPU and Triton kernels on a GPU, whose launchers Triton
    builds with the system's C compiler."""
    if device.type == "cpu":
        # Inductor runs `$CXX --version` (CXX whole, as one program's name), or without CXX
        # `g++ --version` (clang++ on macOS), and cannot compile if that fails
        default = "clang++" if sys.platform == "darwin" else "g++"
        compiler = os.environ.get("CXX", default)
        if "CXX" in os.environ and not shutil.which(compiler):
            return f"CXX={compiler!r} names no program that is here (unset CXX or fix it)"
        if not shutil.which(compiler):
            return f"torch.compile needs a C++ compiler ({default}) on the PATH on a CPU"
        try:
            subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return (f"`{compiler} --version` failed, so torch.compile cannot use {compiler} as "
                    "its C++ compiler (" + ("fix or unset CXX" if "CXX" in os.environ else
                                            "fix it, or set CXX to one that works") + ")")
        return None
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs the triton package on a GPU (pip install triton)"
        # Triton takes $CC (whole, as one program's name), or else gcc, or else clang
        if os.environ.get("CC") and not shutil.which(os.environ["CC"]):
            return f"CC={os.environ['CC']!r} names no program that is here (unset CC or fix it)"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "torch.compile's GPU kernels need a C compiler (gcc or clang) on the PATH"
        # and compiles them against Python's C headers, which some systems install apart
        # (Triton reads Debian's posix_local scheme as posix_prefix: either place will do)
        schemes = [{}] + ([{"scheme": "posix_prefix"}]
                          if "posix_prefix" in sysconfig.get_scheme_names() else [])
        places = [Path(sysconfig.get_paths(**scheme)["include"]) / "Python.h" for scheme in schemes]
        if not any(headers.is_file() for headers in places):
            return (f"torch.compile's GPU kernels need Python's C headers, and {places[0]} is "
                    "missing (install python3-dev, or your system's package of them)")
    if device.type == "mps":
        return "torch.compile's code for Apple's GPU (MPS) is a prototype in PyTorch"
    return None


def check_code_cache_folder(variable: str = "TORCHINDUCTOR_CACHE_DIR") -> None:
    """UserError if `variable` names a cache folder for compiled code that cannot be written.
    Inductor's is checked on every run, compiled or not: PyTorch makes that folder when the
    first optimizer is built (its modules load the compiler's)."""
    if os.environ.get(variable):
        check_writable_directory(Path(os.environ[variable]), variable,
                                 remedy=f"set {variable} to another folder, or unset it")


def check_compiler_settings() -> None:
    """UserError if PyTorch's compiler cannot read its settings from the environment. Its
    configuration modules (Dynamo's, Inductor's) read some as numbers with int() as they load
    (TORCHINDUCTOR_COMPILE_THREADS, TORCHDYNAMO_REPRO_LEVEL, ...), and every run loads them,
    compiled or not: building the first optimizer, or a model, does. Loading them takes a
    second, so only where one of their variables is set (a run without them, --accounting say,
    need not load them)."""
    prefixes = ("TORCHINDUCTOR_", "TORCHDYNAMO_", "AOTINDUCTOR_")
    if not any(name.startswith(prefixes) for name in os.environ):
        return
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.config  # noqa: F401
    except ValueError as error:
        named = [f"{name}={value!r}" for name, value in sorted(os.environ.items())
                 if name.startswith(prefixes) and repr(value) in str(error)]
        raise UserError(f"PyTorch's compiler cannot read its settings from the environment: "
                        f"{', '.join(named) or textwrap.shorten(str(error), 80)} is not a number "
                        "it reads; fix it, or unset it") from None


def check_compile_available(device: torch.device) -> None:
    """UserError naming what --compile lacks on `device` (compile_unavailable), if anything,
    or a cache folder named for its code (Inductor's and Triton's) that cannot be written."""
    check_code_cache_folder()
    if device.type == "cuda":                           # Triton's kernels are a GPU's only
        check_code_cache_folder("TRITON_CACHE_DIR")
    problem = compile_unavailable(device)
    if problem:
        raise UserError(f"--compile cannot run here: {problem}; drop --compile")


def compile_for_training(model: nn.Module, device: torch.device, loss: str = "fused",
                         lengths_vary: bool = False) -> nn.Module | None:
    """--compile: the mixtures of experts made static, then on a GPU the whole loss module
    compiled, model, output layer and cross-entropy in one region (nanoGPT's way: Inductor
    fuses the float32 log-softmax into the logits' kernels), returned; `loss` "plain" compiles
    section 3's written-out formula, "fused" PyTorch's (FusedNextTokenLoss). On a CPU, and for
    the chunked loss on any device, the model's features are compiled in place and None
    returned (the chunked loss, which exists to spare the memory of the logits, stays eager:
    compiled whole, the loss would hold them all). A model with a mixture of experts has its
    blocks compiled one by one instead (compile_blocks), on any device, and None returned.
    Shapes are static: a step's batch has one shape, and an epoch's shorter last batch gets a
    compilation of its own rather than turning every later step's kernels into dynamic-shape
    ones. With lengths_vary (lines mode) the first length compiles statically and the second
    with dynamic shapes, which then serve every length: not one compilation per length."""
    # PyTorch keeps compiled code per function, at most 8 versions of one in a process, and
    # every model's loss runs the same FusedNextTokenLoss.forward (every GPT-oss, the same
    # TransformerBlock.forward): a sweep's ninth model would train uncompiled, with only a
    # warning. Each run's model compiles afresh, and the models before it have finished.
    torch.compiler.reset()
    dynamic = None if lengths_vary else False
    static_experts(model)
    loop_free_linear_attention(model)
    if any(isinstance(module, MixtureOfExperts) for module in model.modules()):
        compile_blocks(model, dynamic)
        return None
    if device.type != "cpu" and loss != "chunked":
        loss_module = NextTokenLoss(model) if loss == "plain" else FusedNextTokenLoss(model)
        return CompiledTrainingLoss(loss_module, dynamic)
    compile_model(model, dynamic)
    return None


def compile_blocks(model: nn.Module, dynamic: bool | None = False) -> None:
    """Each Transformer block compiled on its own, in place, for training calls
    (compiled_while_training). A mixture of experts unrolls every expert into the
    graph, so a whole GPT-oss is a large one to compile; its blocks repeat, and one compilation
    serves every block of a kind (with a sliding window or without): 39 s instead of 87 for
    GPT-oss on a 2-core CPU (docs/performance.md). The parameters and state_dict stay the
    block's own."""
    for block in model.blocks:
        if "forward" not in vars(block):              # not compiled already (speed_up twice)
            block.forward = compiled_while_training(block.forward, dynamic)


class CompiledTrainingLoss(nn.Module):
    """A loss module compiled for training steps (torch.compile's `dynamic`, as
    compile_for_training chooses it): with gradients on, the compiled region; with gradients
    off (evaluation, whose last batch is shorter still) the same module eagerly, so evaluating
    does not compile the model a second and third time."""

    def __init__(self, loss: nn.Module, dynamic: bool | None = False) -> None:
        super().__init__()
        self.loss = loss
        self.compiled = torch.compile(loss, dynamic=dynamic)

    def forward(self, *args) -> torch.Tensor:
        return (self.compiled if torch.is_grad_enabled() else self.loss)(*args)


# --- A.2 Fused attention; decoding on a GPU: static shapes and CUDA graphs -------------
# A cached step of a small model at batch 1 is a few hundred tiny kernels: on a GPU the host's
# launches, not the arithmetic, set the pace (3-4 ms of launches per token for GPT-2 small).
# A CUDA graph records one step's kernels once and replays them with a single launch, but only
# a step whose shapes and memory addresses never change: here every cache is preallocated (to
# the prompt and new tokens, at most the block size), written in place at a position held in a device tensor, and attention runs
# over all its slots with a mask for those not yet written (or outside a sliding window).
# First, which of PyTorch's fused attention kernels takes what: section 1.3's attention calls
# fused_attention when training too.


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                    mask: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """CausalSelfAttention's attention on PyTorch's fused kernels (flash attention on GPUs),
    equal to its _math_attention. q (B, H, T, D), k and v (B, Hkv, S, D), mask None or
    (T, S) bool (a cache's own) -> (B, H, T, D).

    The mask must know about the cache: new token i sits at position S - T + i. Without a
    window, T = S (no cache) is plain causal attention and a single new token sees every key:
    no mask to build. Grouped queries under a mask go through attention_with_folded_groups,
    the same attention, and so do float32 ones on a GPU: flash attention, the one fused kernel
    that takes grouped queries, takes no float32."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    flash_refuses = gqa and q.is_cuda and q.dtype == torch.float32
    if mask is None and window is None and T == S and not flash_refuses:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                              enable_gqa=gqa)
    if mask is None and not (window is None and T == 1):   # a single new token sees every key
        mask = causal_mask(T, S, q.device, window)
    if gqa and mask is not None:      # no fused kernel takes both: fold the groups
        return attention_with_folded_groups(q, k, v, mask, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          enable_gqa=gqa)


def attention_with_folded_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Grouped-query attention under a mask, on a fused kernel. Of PyTorch's fused kernels,
    flash attention takes grouped queries but no mask and the memory-efficient one a mask but
    no grouped queries, so a masked grouped step (every static-cache step, a sliding window)
    fell to the unfused math kernel, which also copies each key/value head for every query
    head. Instead, each key/value head's G query heads are laid end to end along the query axis
    as G T queries of one head, each row under its own mask row: the same rows of attention,
    with no copies of the keys and values.
    q (B, H, T, D), k and v (B, Hkv, S, D), mask (T, S) bool -> (B, H, T, D)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]                          # query heads per key/value head, adjacent in q
    y = F.scaled_dot_product_attention(q.reshape(B, -1, G * T, D), k, v,
                                       attn_mask=mask.repeat(G, 1), dropout_p=dropout)
    return y.reshape(B, H, T, D)        # GPU kernels may return (B, Hkv, G T, D) not contiguous


class StaticKVCache:
    """KVCache with fixed shapes: all `capacity` slots, keys and values written at the
    positions of the new tokens (`positions`, (T,) on the device, set before each step), and
    attention over every slot with attention_mask. Zero-filled, so that unwritten slots hold
    numbers (weight 0 times NaN would still be NaN)."""

    def __init__(self, attention: CausalSelfAttention, batch: int, capacity: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.keys = torch.zeros(batch, attention.n_kv_heads, capacity, attention.head_dim,
                                device=device, dtype=dtype)                   # (B, Hkv, S, D)
        self.values = torch.zeros_like(self.keys)
        self.window = attention.window
        self.key_positions = torch.arange(capacity, device=device)           # (S,)
        self.positions = torch.zeros(1, dtype=torch.long, device=device)      # (T,)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: (B, Hkv, T, D) -> every slot, (B, Hkv, S, D)."""
        self.keys.index_copy_(2, self.positions, keys)
        self.values.index_copy_(2, self.positions, values)
        return self.keys, self.values

    @property
    def attention_mask(self) -> torch.Tensor:
        """(T, S) bool: key j is visible to the new token at position p when j <= p (and,
        with a window, j > p - window), as causal_mask says of the plain cache."""
        query, key = self.positions[:, None], self.key_positions[None, :]
        visible = key <= query
        return visible if self.window is None else visible & (key > query - self.window)


class StaticDecoder(nn.Module):
    """A softmax-attention TransformerModel's forward_incremental with static shapes, the same
    interface, so generate_ids drives it as it drives the model: state is the next position (an
    int; None starts again). It holds its own copy of the weights in `dtype` (bf16 weights are
    read at half the bytes, with no cast per step), its mixtures of experts static
    (StaticShapeMixtureOfExperts). A prompt (T > 1) runs eagerly; with `graphs` (CUDA), each
    later single-token step replays one CUDA graph, recorded at the first such step; `compile`
    runs torch.compile on that step first (fused kernels inside the graph). Returns the logits
    of the last new token only, (1, B, V), which is all generation reads; they live in a buffer
    the next step overwrites. Its caches hold `capacity` positions (at most, and by default, the
    block size): every step attends over all of them, so decoding sizes them to the text it
    will write, not to a long-context model's 131,072 positions."""

    def __init__(self, model: "TransformerModel", batch: int = 1, dtype: torch.dtype | None = None,
                 graphs: bool = False, compile: bool = False, capacity: int | None = None) -> None:
        super().__init__()
        device = model.token_embedding.weight.device
        dtype = dtype or model.token_embedding.weight.dtype
        with torch.device("meta"):                    # no memory, no draws from the global RNG
            twin = TransformerModel(model.config)
        for parameter in twin.parameters():           # made in `dtype`: never a float32 copy;
            parameter.data = parameter.data.to(dtype)  # buffers (RoPE's) stay float32
        twin.to_empty(device=device)
        if model.config.tie_weights:                  # to_empty gave the two their own memory
            twin.unembedding.weight = twin.token_embedding.weight
        twin.load_state_dict(model.state_dict())      # each weight cast as it is copied in
        for name, buffer in model.named_buffers():    # non-persistent ones too (RoPE's frequencies)
            twin.get_buffer(name).copy_(buffer)
        static_experts(twin)
        complex_rope(twin)                            # as speed_up gives the model
        self.model = twin.eval()
        self.max_context = model.config.block_size    # where generate_ids slides its window
        self.capacity = min(capacity or self.max_context, self.max_context)
        self.caches = [StaticKVCache(block.attention, batch, self.capacity, device, dtype)
                       for block in twin.blocks]
        self.graphs, self.graph = graphs, None
        # The class's function, called with the decoder: a bound method kept here would make a
        # reference cycle, so a dropped decoder's weight copy and graph memory would wait for
        # Python's cycle collector instead of going at once
        step = StaticDecoder.step
        self.step_function = torch.compile(step, dynamic=False) if compile else step
        self.tokens = torch.zeros(1, batch, dtype=torch.long, device=device)  # (1, B) graph input
        self.positions = torch.zeros(1, dtype=torch.long, device=device)      # (1,) graph input
        self.logits = None                                                    # (B, V) graph output
        self.eval()

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, TransformerModel) and model.config.attention == "softmax"

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (T, B) at positions (T,) -> logits of the last one, (B, V)."""
        for cache in self.caches:
            cache.positions = positions
        hidden = self.model.residual_stream_at(tokens.t(), positions, self.caches)  # (T, B, d)
        return self.model.logits(hidden[-1])

    @torch.no_grad()
    def forward_incremental(self, tokens: torch.Tensor, state: int | None):
        start = state or 0
        T = tokens.shape[0]
        if start + T > self.capacity:
            raise ValueError(f"{start + T} positions exceed the decoder's {self.capacity}")
        if T > 1:
            logits = self.step(tokens, torch.arange(start, start + T, device=tokens.device))
            return logits[None], start + T
        self.tokens.copy_(tokens)
        self.positions.fill_(start)
        if not self.graphs:
            return self.step_function(self, self.tokens, self.positions)[None], start + 1
        # Streams and graph launches go to the current GPU, which need not be this one: only
        # torchrun's ranks set it, so --device_id cuda:1 leaves cuda:0 current.
        with torch.cuda.device(self.tokens.device):
            if self.graph is None:
                logits = self.record_graph()
            else:
                self.graph.replay()
                logits = self.logits
        return logits[None], start + 1

    def record_graph(self) -> torch.Tensor:
        """Record the single-token step as a CUDA graph, after warm-up calls on a side stream
        (compilation and the kernels' first-call setup must not be recorded). The warm-up steps
        are this step itself, so they only write what it writes. Returns its logits."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step_function(self, self.tokens, self.positions)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # a capture stream of this GPU: torch.cuda.graph's default one is made once, on the
        # GPU current at the first recording in the process
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):
            self.logits = self.step_function(self, self.tokens, self.positions)
        self.graph.replay()
        return self.logits


def decoding_model(model: nn.Module, device: torch.device | str, compile: bool = False,
                   num_tokens: int | None = None, dtype: str | None = None) -> nn.Module:
    """Generation's one entry to this appendix (prompt_decoder sizes it to a text): on a GPU, a
    softmax-attention Transformer decodes through a StaticDecoder with CUDA graphs, in `dtype`
    (float32 or bfloat16; by default bf16 when the GPU has bf16 units, resolve_dtype), its step
    compiled first with `compile` (--compile with --generate: seconds of compilation, then
    about 1.3x the tokens/s, docs/performance.md), its caches sized to `num_tokens` (prompt and
    new tokens; compiled, see compiled_capacity); every other model and device gets the model
    itself (Part I's forward_incremental)."""
    device = torch.device(device)
    if device.type != "cuda" or not StaticDecoder.supports(model):
        return model
    if compile and num_tokens is not None:
        num_tokens = compiled_capacity(num_tokens, model.config.block_size)
    return StaticDecoder(model, dtype=getattr(torch, resolve_dtype(dtype, device)), graphs=True,
                         compile=compile, capacity=num_tokens)


def decoded_tokens(prompt_ids: list[int], max_new_tokens: int) -> int:
    """The positions a generation fills, which size a decoder's caches: the prompt (an empty one
    becomes one <|endoftext|>) and the new tokens."""
    return max(len(prompt_ids), 1) + max_new_tokens


def prompt_decoder(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                   device: torch.device | str, compile: bool = False,
                   dtype: str | None = None) -> nn.Module:
    """decoding_model sized to continue `prompt` by max_new_tokens: what section 4's
    generate_text takes as its decoder (samples with several rules can share one)."""
    return decoding_model(model, device, compile, dtype=dtype,
                          num_tokens=decoded_tokens(tokenizer.encode(prompt), max_new_tokens))


def compiled_capacity(num_tokens: int, block_size: int) -> int:
    """The cache size a compiled decoder takes for `num_tokens`: the next power of two from 64,
    at most the block size. Compiled code is made for one shape, and torch.compile gives up
    after 8 of them in a process: a few sizes serve every text length."""
    return min(2 ** math.ceil(math.log2(max(num_tokens, 64))), block_size)


# --- A.3 Muon on a GPU: one launch per operation for all the tensors ---------------------------
# Section 5's AdamW and Muon update one tensor at a time, so each line of their loops is a
# kernel launch per tensor, each costing a GPU a few microseconds of the host's time however
# small the tensor. Under --optimizer muon the GPT2-small preset's 196 tensors take 1,280 such
# launches a step: four element-wise operations for each of the 72 hidden matrices (besides
# their Newton-Schulz products), AdamW's eight for each of the other 124. PyTorch's _foreach_
# operations apply one operation to a list of tensors, on a GPU in one launch or a few.
# (--optimizer torch needs none of this: PyTorch's fused AdamW updates all its tensors at once.)


class ForeachMuon(Muon):
    """Section 5's Muon, each element-wise operation applied to all of a group's tensors at
    once (torch._foreach_*): the same arithmetic in the same order, and the same state, so a
    checkpoint moves between the two (tested equal). build_optimizer takes it on an NVIDIA
    GPU (CUDA)."""

    @staticmethod
    def stack_key(p: torch.Tensor):
        """Which matrices are orthogonalized together, as one stack: on a GPU those of one
        shape, so that each product is one launch for all of them (GPT-2 small's 72 matrices:
        6 ms a step instead of 35); elsewhere each alone (a CPU gains nothing,
        docs/performance.md)."""
        return (p.shape, p.dtype, p.device) if p.is_cuda else id(p)

    def adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        by_step = {}                            # tensors at one step share the bias corrections
        for p in group["params"]:
            if p.grad is not None:
                by_step.setdefault(self.next_step_state(p)["step"], []).append(p)
        for t, params in by_step.items():
            grads = [p.grad for p in params]
            exp_avg = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            denominator = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denominator, math.sqrt(1 - beta2 ** t))
            torch._foreach_add_(denominator, group["eps"])
            torch._foreach_addcdiv_(params, exp_avg, denominator, value=-group["lr"] / (1 - beta1 ** t))

    def muon_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        momentum = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(momentum, grads, 1 - group["momentum"])
        updates = (torch._foreach_lerp(grads, momentum, group["momentum"]) if group["nesterov"]
                   else momentum)
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        stacks = {}
        for p, update in zip(params, updates):
            stacks.setdefault(self.stack_key(p), []).append((p, update))
        for pairs in stacks.values():                   # a stack holds matrices of one shape
            stacked, matrices = [p for p, _ in pairs], [u for _, u in pairs]
            if len(matrices) == 1:                      # alone, as section 5's Muon takes it
                orthogonalized = [newton_schulz_orthogonalize(matrices[0], group["ns_steps"])]
            else:
                orthogonalized = newton_schulz_orthogonalize(torch.stack(matrices),
                                                             group["ns_steps"]).unbind(0)
            torch._foreach_add_(stacked, list(orthogonalized),
                                alpha=-group["lr"] * 0.2 * math.sqrt(max(stacked[0].shape)))


# =============================================================================
# B. Fault tolerance
# =============================================================================
# What it adds: a run that survives. A checkpoint holds everything needed to
# continue one model's training exactly: weights, optimizer moments, progress
# (step, epoch, batches done in the epoch, plateau state), every RNG state, the
# flags, the tokenizer's identity and the model's run-log record so far. It
# contains only tensors and plain Python values, so it loads with
# torch.load(weights_only=True), which refuses any pickle that would run code.
# Files are written atomically, so a kill at any moment leaves the previous
# checkpoint intact. Ctrl-C or SIGTERM stops after the current step (or test
# batch) with a checkpoint; a NaN or exploding loss stops the run (or skips the step); the test
# loss can stop training early or lower the learning rate on a plateau.
# It matters for long runs, shared machines and sweeps.

CHECKPOINT_FORMAT = "pico-llm checkpoint"

CHECKPOINT_VERSION = 2    # 2 adds "sha256"; version 1 files still load, unverified, with a note

# What every checkpoint holds besides its format, version and checksum.
CHECKPOINT_KEYS = ("model_name", "model", "optimizer", "progress", "rng", "args", "tokenizer",
                   "record")

# As CheckpointSeries.save names them: six digits, or more without a leading zero
CHECKPOINT_NAME = re.compile(r"step_(\d{6}|[1-9]\d{6,})\.pt")

# Flags that change what is printed, saved or sampled, never the training
# arithmetic, so a resumed run may set them differently.
FLAGS_FREE_ON_RESUME = frozenset({
    "models", "enable_transformer_gptoss", "device_id", "attention_impl", "quiet",
    "log_interval", "sample_interval", "prompt", "max_new_tokens", "temperature", "top_k",
    "top_p", "run_name", "artefacts_dir", "cache_dir", "save_dir", "resume", "checkpoint_every",
    "keep_checkpoints", "skip_nonfinite", "generate", "checkpoint", "overwrite", "export_hf",
    "attention_maps", "monosemantic_enabled", "monosemantic_clusters", "dist_timeout"})

# Flags that set how long training goes on, which --resume may change to extend (or shorten) a
# run: the change is recorded in the model's run-log record ("length_changes"), and the cosine
# schedule is recomputed for the new total number of steps from the step reached (so the
# learning rate jumps from where the old schedule stood to where the new one stands).
TRAINING_LENGTH_FLAGS = ("epochs", "max_steps_per_epoch", "early_stop_patience",
                         "early_stop_min_delta")


@dataclasses.dataclass
class CheckpointConfig:
    """Where checkpoints go and when (the checkpoint group's flags)."""

    save_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: str | None = None        # "" = the newest checkpoints in save_dir; else a path
    generate: bool = False           # --generate: no training, sample from `checkpoint`
    checkpoint: str | None = None


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT, SIGTERM or SIGHUP after writing a checkpoint and the run log;
    main() prints the message and exits with 128 + the signal number."""

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(message)
        self.exit_status = 128 + signal_number


class Terminated(BaseException):
    """SIGTERM, or SIGHUP (the terminal closed), where no training step is under way to finish
    (a sweep, tokenizing, sampling): raised where the program stands, as Ctrl-C raises
    KeyboardInterrupt, so that temporary files are removed and main() says so in one line
    (torchrun's ranks end at once, as by default). Training itself stops at a step's end
    (StopRequest), with a checkpoint first."""

    def __init__(self, signal_number: int = signal.SIGTERM) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


# A closed terminal (a dropped ssh connection); None where there is no such signal (Windows)
HANGUP = getattr(signal, "SIGHUP", None)


def raise_terminated(signal_number, frame) -> None:
    if signal_number == HANGUP:
        silence_closed_terminal()
    raise Terminated(signal_number)


def silence_closed_terminal() -> None:
    """After SIGHUP the terminal is gone and a write to it fails: standard output and error,
    where they are a terminal, go to /dev/null from then on (files and pipes stay)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for descriptor in (1, 2):
        if os.isatty(descriptor):
            os.dup2(devnull, descriptor)
    os.close(devnull)


class StopRequest:
    """Turns the first SIGINT, SIGTERM or SIGHUP into a request to stop after the current
    step, so that a checkpoint can be written; a second signal acts at once, as usual: raised
    where the program stands (KeyboardInterrupt, or Terminated), and main() says so in one
    line; a third ends the process with the system's default action.
    SIGHUP is a closed terminal (a dropped ssh connection): the run's output to it goes
    nowhere from then on, as writing to a terminal that has gone fails; under nohup, which
    ignores it, it stays ignored.

    Under torchrun a second signal is not a second request: Ctrl-C reaches each rank from
    the terminal and again from torchrun, which forwards it (and kills the ranks itself if
    they have not left 30 s later)."""

    SIGNALS = tuple(number for number in (signal.SIGINT, signal.SIGTERM, HANGUP) if number)

    def __init__(self, repeat_acts_at_once: bool = True) -> None:
        self.signal_number: int | None = None
        self.repeat_acts_at_once = repeat_acts_at_once
        self._previous: dict = {}
        self._acted = False

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals live there only
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS
                              if number != HANGUP or signal.getsignal(number) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            if handler is not None:
                signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        self.signal_number = self.signal_number or number
        if number == HANGUP:
            silence_closed_terminal()
        if self.repeat_acts_at_once:
            # A Python handler, not SIG_DFL: Python drops a signal that arrived before its
            # handler was changed to a default ("ignored due to race condition"), as SIGTERM
            # right after SIGINT was
            for other in self._previous:
                signal.signal(other, self._act_at_once)

    def _act_at_once(self, number: int, frame) -> None:
        """A second signal: SIGINT as Python has it (KeyboardInterrupt), SIGTERM and SIGHUP
        as Terminated; any later one with the system's default (the process ends, killed)."""
        if self._acted:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self._acted = True
        if number == signal.SIGINT:
            signal.default_int_handler(number, frame)
        raise Terminated(number)


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite, or the loss exploded
    (see has_diverged)."""

    def __init__(self, message: str, step: int = 0) -> None:
        super().__init__(message)
        self.step = step


def has_diverged(loss: float, vocab_size: int) -> bool:
    """Non-finite, or over 3x the loss of guessing uniformly (ln vocab): a fresh model
    starts near ln vocab, so only a blow-up gets that far."""
    return not math.isfinite(loss) or loss > 3 * math.log(vocab_size)


def after_evaluation(progress: TrainingProgress, test_loss: float, training: TrainingConfig) -> str | None:
    """Early stopping and reduce-on-plateau from an epoch's test loss; returns a note on
    what changed. A gain below --early_stop_min_delta counts as no improvement."""
    if test_loss < progress.best_test_loss - training.early_stop_min_delta:
        progress.best_test_loss = test_loss
        progress.epochs_without_improvement = 0
        return None
    progress.epochs_without_improvement += 1
    stalled = progress.epochs_without_improvement
    if training.early_stop_patience and stalled >= training.early_stop_patience:
        progress.finished = True
        return f"no test-loss improvement for {stalled} epoch(s): stopping early"
    if training.plateau_patience and stalled % training.plateau_patience == 0:
        progress.lr_scale = max(progress.lr_scale * training.plateau_factor,
                                training.lr_min / training.learning_rate)
        return f"test loss on a plateau for {stalled} epoch(s): learning rate x{progress.lr_scale:.3g}"
    return None


class FaultTolerance:
    """What the training loop (section 5) calls at its named points, for one model: start
    (resume or start afresh), check_loss and skip_step (a step gone wrong), after_step
    (periodic checkpoints, signals), after_evaluation (early stopping, plateau),
    stop_if_requested and save_checkpoint. Made with only a name and a TrainingConfig, it
    writes no checkpoint and watches no signal: it only stops a diverging run."""

    def __init__(self, name: str, training: TrainingConfig, *,
                 checkpoints: CheckpointSeries | None = None, checkpoint_every: int = 0,
                 resume_from: tuple[Path, dict] | None = None, stop: StopRequest | None = None,
                 runlog: "RunLog | None" = None, context: "Distributed | None" = None,
                 flags: dict | None = None, tokenizer_spec: str = "",
                 data_fingerprint: str = "") -> None:
        self.name, self.training = name, training
        self.context = context or Distributed()
        self.checkpoints = checkpoints if self.context.is_main else None  # rank 0 writes
        self.checkpoint_every = checkpoint_every
        self.resume_from, self.stop, self.runlog = resume_from, stop, runlog
        self.flags, self.tokenizer_spec = flags or {}, tokenizer_spec
        self.data_fingerprint = data_fingerprint    # TrainingData's: a resume checks it

    def start(self, model: nn.Module, optimizer, record: dict, tokenizer) -> TrainingProgress:
        """A fresh TrainingProgress, or, resuming, the checkpoint's: weights, optimizer
        moments, the run-log record so far and every RNG state are restored with it."""
        self.model, self.optimizer, self.record, self.tokenizer = model, optimizer, record, tokenizer
        self.progress = TrainingProgress()
        if self.resume_from is not None:
            path, checkpoint = self.resume_from
            self.progress = restore_checkpoint(path, checkpoint, model, record, tokenizer,
                                               self.training, self.flags, optimizer)
            if not self.training.quiet:
                print(f"[{self.name}] resuming from {path}: step {self.progress.step}, "
                      f"epoch {self.progress.epoch}", flush=True)
        return self.progress

    def check_loss(self, loss: float, lr: float) -> None:
        """A finite loss that exploded (has_diverged) stops training."""
        if has_diverged(loss, self.tokenizer.vocab_size):
            self.fail(f"loss exploded to {loss:.4g} at step {self.progress.step} (lr {lr:.3g}); "
                      + self.remedy(updated_before=self.progress.nonfinite_steps + 1 < self.progress.step,
                                    advice="lower --learning_rate or raise --warmup_steps"))

    def skip_step(self, problem: NonFiniteStep, lr: float, bar) -> None:
        """A step whose loss or gradients were NaN or infinite, which training_step did not
        apply: skipped while --skip_nonfinite allows, else training stops."""
        progress = self.progress
        progress.nonfinite_steps += 1
        if progress.nonfinite_steps > self.training.skip_nonfinite:
            self.fail(f"{problem} at step {progress.step} (lr {lr:.3g}); "
                      + self.remedy(updated_before=progress.nonfinite_steps < progress.step,
                                    advice="lower --learning_rate, raise --warmup_steps or allow "
                                           "skips with --skip_nonfinite N"))
        self.record.setdefault("skipped_steps", []).append(progress.step)
        say(f"[{self.name}] step {progress.step} skipped: {problem} ({progress.nonfinite_steps} "
            f"of --skip_nonfinite {self.training.skip_nonfinite})", bar)
        return None

    def remedy(self, updated_before: bool, advice: str) -> str:
        """What to change after a bad loss. Before any update the weights are as initialized
        (or restored), so the learning rate cannot be the cause: the model's settings are."""
        if updated_before:
            return advice
        settings = ("the model's settings (such as --rope_theta, --logit_softcap or "
                    "--router_aux_loss_coef)" if isinstance(self.model, TransformerModel)
                    else "the model's settings")
        device = next(self.model.parameters()).device
        if resolve_dtype(self.training.dtype, device) != "float32":
            settings += " or try --dtype float32"
        return f"no update had been made yet, so the learning rate is not the cause: check {settings}"

    def fail(self, what: str):
        """Stop training; the last checkpoint written stays the newest."""
        self.write_runlog("failed")
        if self.checkpoints is None:
            kept = "none (pass --save_dir to keep checkpoints)"
        else:
            kept = self.checkpoints.last_saved or "none written yet"
        raise TrainingDiverged(f"{self.name}: {what}; last good checkpoint: {kept}",
                               self.progress.step)

    def after_step(self) -> None:
        every = self.checkpoint_every
        if every and self.progress.step % every == 0:
            self.save_checkpoint()
        self.stop_if_requested()

    def after_evaluation(self, test_loss: float, bar) -> None:
        """Early stopping and reduce-on-plateau on this epoch's test loss."""
        change = after_evaluation(self.progress, test_loss, self.training)
        if change:
            say(f"[{self.name}] {change}", bar)
        if self.progress.finished:
            self.record["stopped_early_after_epoch"] = self.progress.epoch

    def save_checkpoint(self) -> Path | None:
        if self.checkpoints is None:
            return None
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_name": self.name,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "progress": dataclasses.asdict(self.progress), "rng": rng_states(),
            "args": self.flags, "tokenizer": tokenizer_identity(self.tokenizer_spec, self.tokenizer),
            "record": self.record}
        if self.runlog is not None:   # the run whose log may be continued from this checkpoint
            payload["run_id"] = self.runlog.data["run_id"]
        if self.data_fingerprint:     # the text it trains on, which a resumed run must read too
            payload["data_sha256"] = self.data_fingerprint
        if isinstance(self.model, TransformerModel):  # an imported model's shape is in no flag
            payload["transformer_config"] = dataclasses.asdict(self.model.config)
        payload["sha256"] = checkpoint_digest(payload)
        return self.checkpoints.save(payload)

    def stop_if_requested(self) -> None:
        """On a pending signal: checkpoint, run log, and a message on how to resume.

        Under torchrun the ranks decide together (one all-reduce, every rank calls this at
        the same points): a signal may reach one rank only, or reach the ranks on either
        side of this check, and a rank that stopped alone would leave the others waiting
        in their next all-reduce until --dist_timeout."""
        if self.stop is None:
            return
        signal_number = self.context.maximum(self.stop.signal_number or 0)
        if not signal_number:
            return
        interrupted = f"interrupted by {signal.Signals(signal_number).name} at step {self.progress.step}"
        if not self.context.is_main:
            # torchrun ends the job when a rank exits: not before rank 0's checkpoint is written
            self.context.barrier()
            raise TrainingInterrupted(signal_number, f"rank {self.context.rank} {interrupted} of "
                                      f"{self.name}, with every rank; rank 0 wrote the checkpoint")
        saved = self.save_checkpoint()
        self.write_runlog("interrupted")
        self.context.barrier()
        written = f"checkpoint {saved}" if saved else "no checkpoint (pass --save_dir DIR to resume runs)"
        if self.runlog is not None:
            written += f", run log {self.runlog.path}"
        how = (f"; to resume, rerun the same command with --resume {self.checkpoints.save_dir}"
               if saved else "")
        raise TrainingInterrupted(signal_number, f"{interrupted} of {self.name}; wrote {written}{how}")

    def stoppable(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The epoch's test batches, checking for a signal before each, so that Ctrl-C does not
        wait for a long evaluation (minutes on a big test set). The checkpoint it writes is the
        one after the epoch's last step, which evaluation does not change, so a resume runs the
        whole evaluation again and goes on as if uninterrupted.

        One process only: under torchrun the ranks hold different numbers of test batches, so
        they could not decide together at each one; they stop after the evaluation."""
        for batch in batches:
            if self.context.world_size == 1:
                self.stop_if_requested()
            yield batch

    def write_runlog(self, status: str) -> None:
        if self.runlog is not None:
            self.runlog.data["status"] = status
            self.runlog.write()


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's name says, -1 for a name save would not write (step_1.pt)."""
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


class CheckpointSeries:
    """One model's checkpoints, <save_dir>/<model>/step_000123.pt; keeps the newest `keep`."""

    def __init__(self, save_dir: Path, model_name: str, keep: int) -> None:
        self.save_dir = Path(save_dir)
        self.directory = self.save_dir / model_name
        self.keep = keep
        self.last_saved = self.latest()

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first (an interrupted write leaves only a dot-file)."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir()   # a folder so named is not one
                       if checkpoint_step(p) >= 0 and not p.is_dir()), key=checkpoint_step)

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, payload: dict) -> Path:
        """Write atomically, then delete all but the newest `keep` checkpoints."""
        path = self.directory / f"step_{payload['progress']['step']:06d}.pt"
        try:
            atomic_write_bytes(path, lambda file: torch.save(payload, file))
        except OSError as error:
            raise cannot_write(f"checkpoint {path}", error, "choose another --save_dir (last good "
                               f"checkpoint: {self.last_saved or 'none'})") from None
        self.last_saved = path
        for old in self.paths()[:-self.keep]:
            if is_torch_save_file(old):   # a file that only has a checkpoint's name stays
                old.unlink(missing_ok=True)
        return path


def check_no_folder_named_as_a_checkpoint(directory: Path) -> None:
    """A folder with a checkpoint's name (an export written there) would stop the run when it
    reached that step: a file cannot replace a folder, and the steps to it would be lost."""
    try:
        entries = list(directory.iterdir())
    except OSError:       # an unreadable folder: checkpoints' paths() will say so
        return
    for path in entries:
        if checkpoint_step(path) >= 0 and path.is_dir():
            raise UserError(f"{path} is a folder with a checkpoint's name, where no checkpoint "
                            "could be written (a run reaching that step would fail there); "
                            "move the folder out of --save_dir")


def is_torch_save_file(path: Path) -> bool:
    """Whether `path` begins as torch.save's files do (a zip archive's first entry)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def rng_states() -> dict:
    """Every random-number generator's state, as tensors and plain values. The GPUs' only
    where this process has used CUDA: asking would start CUDA (a few hundred MB and a second
    or two) in every CPU run on a machine with a GPU."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": random.getstate(),
            # Apple's GPU has one generator of its own (dropout there draws from it)
            **({"mps": torch.mps.get_rng_state()} if torch.backends.mps.is_available() else {})}


def restore_checkpoint(path: Path, checkpoint: dict, model: nn.Module, record: dict, tokenizer,
                       training: TrainingConfig, flags: dict,
                       optimizer: torch.optim.Optimizer | None = None) -> TrainingProgress:
    """Put a checkpoint's state back into a freshly built model, its run-log `record` and, to
    train on (`optimizer` given), the optimizer and every random generator; returns the
    progress it holds. A model that has nothing left to train needs only its weights and its
    record (its optimizer is not restored). UserError naming the first part that cannot be
    restored."""
    with unrestorable(path, "progress"):
        progress = progress_from(checkpoint["progress"])
    progress.finished = nothing_left_to_train(progress, training)
    load_model_weights(model, checkpoint, path, tokenizer)
    with unrestorable(path, "run-log record"):
        restore_record(record, checkpoint["record"])
        if not progress.finished:       # a change that trains nothing is no part of its length
            record_length_changes(record, checkpoint, flags)
    if optimizer is not None and not progress.finished:
        with unrestorable(path, "optimizer state"):
            settings = group_settings(optimizer)
            optimizer.load_state_dict(checkpoint["optimizer"])
            check_optimizer_state(optimizer, settings, checkpoint["optimizer"])
        with unrestorable(path, "random generators' states"):
            restore_rng_states(checkpoint["rng"])
    return progress


def check_resume_points(config: "Config", resume_points: dict[str, tuple[Path, dict]],
                        tokenizer, data: TrainingData | None = None) -> None:
    """Restore every checkpoint that --resume continues ({model: (path, checkpoint)}) once
    before the first model trains, as restore_checkpoint will at its model's turn, so that one
    that cannot be restored (another pico-llm version's, or damaged behind its checksum) stops
    the run before the models ahead of it train, prune their checkpoints and rewrite the run
    log. The models are built on PyTorch's meta device (shapes without memory; copying weights
    into them does nothing), and every random generator is put back as it was. Weights that
    are NaN or infinite are refused too: training would stop at its first step, and so is a
    checkpoint of other training text than `data`'s (same flags, files changed since)."""
    saved = rng_states()
    try:
        for name, (path, checkpoint) in resume_points.items():
            model_config = config.models.config_of(name)
            with torch.device("meta"):
                model = build_model(model_config, tokenizer.vocab_size, config.training.seed)
            record = model_record(name, model, model_config, config.data.block_size)
            optimizer = build_optimizer(model, config.training, torch.device("meta"))
            with warnings.catch_warnings():   # "copying into a meta parameter is a no-op"
                warnings.simplefilter("ignore")
                restore_checkpoint(path, checkpoint, model, record, tokenizer, config.training,
                                   config.flags, optimizer)
            check_finite_weights(path, checkpoint, "resume from an earlier checkpoint, or "
                                                   "train without --resume")
            check_same_data(path, checkpoint, data)
    finally:
        restore_rng_states(saved)


@contextlib.contextmanager
def unrestorable(path: Path, what: str):
    """Turns a checkpoint part that its restore cannot take (a file of another pico-llm
    version, or damaged behind a valid checksum) into one line naming the part."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
            OverflowError) as error:      # OverflowError: a number past a C integer
        detail = textwrap.shorten(" ".join(str(error).split()) or type(error).__name__, 80)
        raise UserError(f"{path} was made by another pico-llm version, or is damaged: its "
                        f"{what} cannot be restored ({detail}); resume from another checkpoint, "
                        "or train without --resume") from None


def restore_record(record: dict, stored) -> None:
    """`record`, a model's fresh run-log record (model_record), takes a checkpoint's record of
    the training so far (a dict: checked with the checkpoint's parts). ValueError if what
    training appends to, or the summary reads back, is not as pico-llm writes it
    (model_record_problem). A copy: training appends to its lists, which stay the checkpoint's.
    What the model is (its name, size, FLOPs and config) stays as measured here: the model
    built for these flags, whatever the file says."""
    described = {key: record[key] for key in ("name", "parameters", "training_flops_per_token",
                                              "config") if key in record}
    record.update(copy.deepcopy(stored))
    record.update(described)
    problem = model_record_problem(record)
    if problem:
        raise ValueError(f"it {problem}")


# The settings of a parameter group that say how PyTorch computes a step, not what: they follow
# the device a run resumes on (fused kernels on one, foreach on another), not its checkpoint's.
OPTIMIZER_IMPLEMENTATION = frozenset({"fused", "foreach", "capturable", "differentiable"})


def same_optimizer_setting(stored, built) -> bool:
    """Whether a stored optimizer setting computes what the built one does: equal, a list
    taken as the tuple it was (betas), 0 as 0.0, but a boolean as no number (nesterov 1 is
    damage) and nothing else (a tensor, a string) as a number."""
    if isinstance(stored, (list, tuple)) and isinstance(built, (list, tuple)):
        return len(stored) == len(built) and all(map(same_optimizer_setting, stored, built))
    return (isinstance(stored, bool) == isinstance(built, bool)
            and type(stored) in (bool, int, float, str, type(None)) and stored == built)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (all but its parameters), as check_optimizer_state
    takes those of the groups as built."""
    return [{key: value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups]


def check_optimizer_state(optimizer: torch.optim.Optimizer, settings: list[dict],
                          stored: dict) -> None:
    """ValueError if a restored optimizer state lacks what a step reads (each group's
    `settings`, those of the groups as built; AdamW's step count and moments, Muon's
    momentum), holds a moment of another shape than its parameter, or a step count
    that is negative or NaN: load_state_dict checks only the sizes of the groups, and the first
    step would fail. load_state_dict also replaces the groups' settings with the checkpoint's.
    A resumed run has the flags that made them, so each setting the flags make (betas, eps,
    weight decay, Muon's momentum and Newton-Schulz steps) must be as built, or a step would
    fail, compute something else, or never end; the learning rate, set before every step, and
    the implementation's settings are put back as built. The counts are read in `stored`, the
    state dict loaded: a fused optimizer moves them to its parameters' device, which holds no
    numbers in check_resume_points (meta)."""
    for state in stored["state"].values():
        if "step" in state and not float(state["step"]) >= 0:
            raise ValueError(f"a parameter's step count is {float(state['step'])}")
    for group, built in zip(optimizer.param_groups, settings):
        if set(built) - set(group):
            raise ValueError(f"a parameter group has no {', '.join(sorted(set(built) - set(group)))}")
        for key, value in built.items():
            if key in OPTIMIZER_IMPLEMENTATION or key == "lr":
                group[key] = value
            elif not same_optimizer_setting(group[key], value):
                raise ValueError(f"a parameter group's {key} is {group[key]!r}, where the flags "
                                 f"make it {value!r}")
        needed = ("momentum_buffer",) if group.get("muon") else ("step", "exp_avg", "exp_avg_sq")
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue                          # no step has reached this parameter yet
            for key in needed:
                value = state.get(key)
                if value is None:
                    raise ValueError(f"a parameter's state has no {key}")
                if key == "step":
                    continue                              # read in `stored`, above
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} has {key} of {shape}")


def progress_from(fields: dict) -> TrainingProgress:
    """A checkpoint's TrainingProgress, each field of its default's type (a float field may
    hold an int); TypeError naming the first that is not."""
    progress = TrainingProgress(**fields)
    for field in dataclasses.fields(progress):
        value, kind = getattr(progress, field.name), type(field.default)
        allowed = (int, float) if kind is float else (kind,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"{field.name} is {value!r}, not of type {kind.__name__}")
        # counts and times are never negative, an epoch counts from 1, and reduce-on-plateau
        # only ever shrinks the learning rate
        smallest = 1 if field.name == "epoch" else 0
        if kind in (int, float) and field.name != "best_test_loss" and not value >= smallest:
            raise ValueError(f"{field.name} is {value!r}, below {smallest}")
        # a time is finite; the best test loss too, or infinite before the first evaluation (NaN
        # or -inf would have every evaluation count as no better: early stopping at once)
        if kind is float and not (math.isfinite(value)
                                  or (field.name == "best_test_loss" and value == math.inf)):
            raise ValueError(f"{field.name} is {value!r}, not a finite number")
    if not 0 < progress.lr_scale <= 1:
        raise ValueError(f"lr_scale is {progress.lr_scale!r}, not in (0, 1]")
    return progress


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
    numpy_state = states["numpy"]
    keys, position = numpy_state["keys"], numpy_state["position"]
    # numpy takes any position and key values, and a draw past its 624 keys then crashes
    # the interpreter (a segmentation fault), whenever it came
    if not (keys.shape == (624,) and bool(((keys >= 0) & (keys < 2**32)).all())
            and type(position) is int and 0 <= position <= 624
            and numpy_state["has_gauss"] in (0, 1)
            and math.isfinite(numpy_state["cached_gaussian"])):
        raise ValueError("numpy's generator state is not one numpy writes")
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position,
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal_state, gauss = states["python"]
    random.setstate((version, tuple(internal_state), gauss))


def tokenizer_identity(spec: str, tokenizer) -> dict:
    """What a checkpoint needs to turn its ids back into text. A trained BPE travels
    whole (bytes as hex, plain types that weights_only loading accepts), and so does an
    imported model's tokenizer.json (Appendix E), as its JSON text."""
    identity = {"spec": spec, "name": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    if isinstance(tokenizer, TrainedBPETokenizer):
        identity["bpe_vocab"] = {str(i): token.hex() for i, token in tokenizer.bpe.vocab.items()}
        identity["bpe_merges"] = [[a.hex(), b.hex()] for a, b in tokenizer.bpe.merges]
    if isinstance(tokenizer, HFTokenizer):
        identity["tokenizer_json"] = tokenizer.tokenizer.to_str()
        identity["eot_id"] = tokenizer.eot_id
        identity["stop_ids"] = sorted(tokenizer.stop_ids)
        identity["cut"] = tokenizer.cut
    return identity


def tokenizer_from_identity(identity: dict):
    """The tokenizer a checkpoint was trained with."""
    if "tokenizer_json" in identity:
        return HFTokenizer.from_json(identity["tokenizer_json"], identity["vocab_size"],
                                     identity["eot_id"], identity["name"],
                                     identity.get("stop_ids", ()),   # none before they were kept
                                     identity.get("cut") is True)
    if "bpe_merges" not in identity:
        if parse_tokenizer_spec(identity["spec"])[0] == "bpe":   # no texts here to train one
            raise ValueError("its trained tokenizer's merges are missing")
        return build_tokenizer(identity["spec"])
    vocab = {int(i): bytes.fromhex(token) for i, token in identity["bpe_vocab"].items()}
    merges = [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in identity["bpe_merges"]]
    return TrainedBPETokenizer(vocab, merges, parse_tokenizer_spec(identity["spec"])[1])


def checkpoint_digest(payload: dict) -> str:
    """sha256 over everything in a checkpoint but its "sha256": each tensor's dtype, shape
    and bytes and each plain value's repr, in a fixed order. torch.load does not check the
    CRC of the zip entries torch.save stores, so a flipped bit in the weights would
    otherwise load without a word."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {value.dtype} {tuple(value.shape)};".encode())
            digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key in sorted(value, key=repr):
                digest.update(f"{key!r}:".encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):   # a tuple may come back as a list, or not
            digest.update(f"sequence {len(value)};".encode())
            for item in value:
                add(item)
        else:
            digest.update(f"{value!r};".encode())

    add({key: value for key, value in payload.items() if key != "sha256"})
    return digest.hexdigest()


class DamagedCheckpoint(UserError):
    """A checkpoint file that cannot be used as written (unreadable, incomplete, or its
    contents no longer match its checksum); load_checkpoint names a good one to use instead."""


def blocked_callable(message: str) -> str | None:
    """The callable a weights_only load refused to import, as Python 3 names it
    ("os.system", "subprocess.call"), from torch's message; None for other errors. Pickles
    written with protocol 2 record Python 2 names (commands.call), os.system is
    posix.system on Linux and macOS, and torch names a builtin without its module ("eval")."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if not found:
        return None
    module, _, name = found.group(1).rpartition(".")
    module = _compat_pickle.IMPORT_MAPPING.get(module, module) or "builtins"
    return f"{'os' if module in ('posix', 'nt') else module}.{name}"


def load_weights_only(path: Path):
    """torch.load running no code from the file, and without torch's warning about newer
    pickle protocols, which would add lines to a one-line error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def unpickling_failure(error: Exception, path: Path) -> str:
    """Why load_weights_only failed, in a few words: torch's own message is paragraphs,
    including advice to load with weights_only=False, which would run the file's code."""
    try:
        with open(path, "rb") as file:
            start = file.read(3)
    except OSError:
        start = b""
    # torch.save writes a zip archive, and reads a bare pickle only as its old format (protocol
    # 2): a bare pickle of protocol 4 or 5 fails on its FRAME opcode, "Unsupported operand 149"
    if start in (b"\x80\x04\x95", b"\x80\x05\x95"):
        return f"a plain Python pickle (protocol {start[1]}), not a file written by torch.save"
    if start and not start.startswith((b"PK", b"\x80")):   # neither a zip archive nor a pickle
        return "not a file written by torch.save"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    reason = detail.group(1) if detail else str(error).split("\n")[0] or type(error).__name__
    return textwrap.shorten(reason, 120)


def checkpoint_in_directory(path: Path) -> str:
    """What to give instead of the directory `path`: its newest checkpoint (a model's folder),
    the newest of its first model (a --save_dir), or --init_from (a Hugging Face model)."""
    if (path / "config.json").is_file():
        return "it looks like a Hugging Face model: load it with --init_from"
    with contextlib.suppress(OSError):
        for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
            newest = CheckpointSeries(folder.parent, folder.name, keep=1).latest()
            if newest is not None:
                return f"give a checkpoint file, such as {newest}"
    return "give a checkpoint file, <save_dir>/<model>/step_NNNNNN.pt"


def read_checkpoint(path: Path, flag: str) -> dict:
    """A checkpoint file, loaded without running any code in it, and checked against its
    checksum; UserError (DamagedCheckpoint for a damaged file) otherwise."""
    if not path.exists():
        raise UserError(f"{flag} {path} " + ("is a symbolic link to nothing (broken, or a loop)"
                                             if path.is_symlink() else "does not exist"))
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; " + checkpoint_in_directory(path))
    check_regular_file(path, flag)
    try:
        checkpoint = load_weights_only(path)
    except PermissionError as error:
        raise UserError(f"cannot read {flag} {path} ({error.strerror}); give a checkpoint "
                        "this user may read") from None
    except Exception as error:  # damaged files raise UnpicklingError, RuntimeError, EOFError, ...
        culprit = blocked_callable(str(error))
        if culprit:
            raise UserError(f"refused to load {path}: unpickling it would call {culprit}, which "
                            "runs code, so it was not loaded; load only checkpoints pico-llm "
                            "wrote") from None
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint (truncated, corrupt or not "
                                f"from pico-llm: {unpickling_failure(error, path)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a pico-llm checkpoint; give a .pt file written with --save_dir")
    version = checkpoint.get("version")
    if type(version) is not int or version not in (1, CHECKPOINT_VERSION):  # True == 1, 2.0 == 2
        raise UserError(f"{path} is checkpoint version {version!r}; "
                        f"this pico-llm reads versions 1 and {CHECKPOINT_VERSION}")
    missing = [key for key in CHECKPOINT_KEYS + (("sha256",) if version >= 2 else ())
               if key not in checkpoint]
    if missing:
        raise DamagedCheckpoint(f"{path} is an incomplete checkpoint (it lacks {', '.join(missing)})")
    if version == 1:
        warn(f"pico-llm: note: {path} predates checkpoint checksums (version 1); loaded "
             "without an integrity check")
    elif checkpoint["sha256"] != checkpoint_digest(checkpoint):
        raise DamagedCheckpoint(f"{path} is damaged: its contents no longer match the checksum "
                                "written with it (a disk or copy error)")
    # The checksum says the file is as written, not that this pico-llm wrote it.
    misshapen = [key for key in (*CHECKPOINT_KEYS, "transformer_config") if key in checkpoint
                 and not isinstance(checkpoint[key], str if key == "model_name" else dict)]
    if misshapen or checkpoint["model_name"] not in MODEL_NAMES:
        what = (f"its {misshapen[0]} is a {type(checkpoint[misshapen[0]]).__name__}" if misshapen
                else f"model {checkpoint['model_name']!r}")
        raise UserError(f"{path} was made by another pico-llm version, or is damaged ({what}); "
                        "use a checkpoint this version wrote")
    return checkpoint


def load_checkpoint(path: Path, flag: str, newest_in: Path | None = None) -> dict:
    """read_checkpoint; for a damaged step file, the error names the newest good checkpoint
    before it in the same series, the one to continue from instead, or else the good ones
    after it. `newest_in`: the save directory that --resume read `path` from as its newest
    checkpoint, where the way on is to move `path` aside (resuming one file would leave the
    save directory's other models behind)."""
    try:
        return read_checkpoint(path, flag)
    except DamagedCheckpoint as damage:
        step = checkpoint_step(path)
        if step < 0:
            raise UserError(f"{damage}; use another checkpoint") from None
        series = CheckpointSeries(path.parent.parent, path.parent.name, keep=1)
        earlier = [p for p in reversed(series.paths()) if checkpoint_step(p) < step]
        later = [p for p in series.paths() if checkpoint_step(p) > step]
        before = next((p for p in earlier if is_good_checkpoint(p, flag)), None)
        if before is not None and newest_in is not None:
            # A name that is no step_NNNNNN.pt is no checkpoint to --resume, nor pruned.
            raise UserError(f"{damage}; the newest good checkpoint before it is {before.name}: "
                            f"rename the damaged file (mv {shlex.quote(str(path))} "
                            f"{shlex.quote(str(path) + '.damaged')}) and --resume "
                            f"{shlex.quote(str(newest_in))} again") from None
        if before is not None:
            raise UserError(f"{damage}; the newest good checkpoint before it is {before}: "
                            f"use {flag} {before}") from None
        good = [p for p in later if is_good_checkpoint(p, flag)]
        if good:
            raise UserError(f"{damage}; no earlier checkpoint in {path.parent} is good, but newer "
                            f"ones are ({', '.join(p.name for p in good)}): use {flag} "
                            f"{good[-1]}") from None
        raise UserError(f"{damage}; no other checkpoint in {path.parent} is good") from None


def is_good_checkpoint(path: Path, flag: str) -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # a version-1 note
            read_checkpoint(path, flag)
    except UserError:
        return False
    return True


def model_from_checkpoint(path: Path, flag: str) -> tuple[nn.Module, object, Config]:
    """(model with the checkpoint's weights, its tokenizer, the config it was trained with),
    for --generate and --export_hf. A Transformer's shape comes from the checkpoint itself
    where it holds one (an imported model's is in no flag), else from its flags."""
    checkpoint = load_checkpoint(path, flag)
    trained, tokenizer, model_config = checkpoint_contents(path, checkpoint)
    # The shapes first, on the meta device (no memory): a model whose stored sizes do not fit
    # the weights it holds is refused before it is built, and named so. Then its size, counted
    # from its config: more than memory holds is damage, or a model from a larger machine.
    fits = functools.partial(check_fits_to_sample, model_config, tokenizer.vocab_size,
                             f"{path}'s {checkpoint['model_name']}",
                             "the file is damaged, or needs a machine with more memory")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")        # "copying into a meta parameter is a no-op"
            load_model_weights(build_model(model_config, tokenizer.vocab_size,
                                           trained.training.seed), checkpoint, path, tokenizer)
    except (RuntimeError, TypeError, ValueError, OverflowError) as error:  # sizes past torch's
        # own: "Storage size calculation overflowed", past int64 "Overflow when unpacking"
        fits()
        raise UserError(f"{path}: its {checkpoint['model_name']} cannot be rebuilt "
                        f"({textwrap.shorten(str(error), 120)}); use a checkpoint this version "
                        "wrote") from None
    fits()
    check_finite_weights(path, checkpoint, "use an earlier checkpoint")
    model = build_model(model_config, tokenizer.vocab_size, trained.training.seed)
    load_model_weights(model, checkpoint, path, tokenizer)
    return model, tokenizer, trained


def check_model_flags_fit(config: Config, trained: dict, model_name: str, where: str,
                          command: str) -> None:
    """`command` takes a checkpoint's model as it was trained: a flag of its shape typed here
    with another value than the checkpoint's is refused, not ignored. The training command
    with --generate added (and --save_dir dropped) still works."""
    flags = config.flags
    if model_name.startswith("transformer"):
        trained, flags = as_built(trained, flags, model_name)
    for key in ("block_size", *MODEL_FLAGS.get(model_name, ())):
        if (key in trained and key in config.typed
                and not same_setting(key, trained[key], flags[key])):
            was = (f"--{key} {trained[key]!r}" if trained[key] is not None else
                   f"the shape of --init_from {trained['init_from']}" if trained.get("init_from")
                   else f"--{key} at its preset's value")
            raise UserError(f"{where} holds a model trained with {was}, and {command} takes it "
                            f"as trained; drop --{key} {config.flags[key]!r}")   # as typed


def checkpoint_contents(path: Path, checkpoint: dict):
    """(the config a checkpoint's model was trained with, its tokenizer, its model's config).
    Only what rebuilds the model is checked: the flags of a run (its length, limits this
    version added since) are not the checkpoint's to meet. A checkpoint that another pico-llm
    version wrote (a config field this one lacks, a size it cannot build) fails here in one
    line. Flags that do not shape the model take this command's defaults."""
    name = checkpoint["model_name"]
    try:
        flags = {**default_flags(),
                 **{key: value for key, value in checkpoint["args"].items()
                    if key not in FLAGS_FREE_ON_RESUME}, "models": [name]}
        trained = config_from_flags(flags)
        # what torch.manual_seed takes: runs from before --seed stopped at 2**32 - 1 still load
        if not 0 <= trained.training.seed < 2**64:
            raise ValueError(f"seed {trained.training.seed} is out of range")
        identity = checkpoint["tokenizer"]
        if not isinstance(identity, dict) or type(identity.get("vocab_size")) is not int:
            raise TypeError("its tokenizer has no vocabulary size")
        tokenizer = tokenizer_from_identity(identity)
        stored = checkpoint.get("transformer_config")
        model_config = TransformerConfig(**stored) if stored is not None else trained.models.config_of(name)
        check_model_config(model_config)
        if type(trained.data.block_size) is not int or trained.data.block_size < 1:  # generation's
            raise UserError(f"block_size {trained.data.block_size!r} is not a positive integer")
    except (UserError, TypeError, ValueError, KeyError, AttributeError,
            OverflowError) as error:   # stored faults; sizes past a float's range
        raise UserError(f"{path} was made by another pico-llm version, or is damaged: its {name} "
                        f"cannot be rebuilt ({textwrap.shorten(str(error), 120)}); use a "
                        "checkpoint this version wrote") from None
    return trained, tokenizer, model_config


def check_model_config(config) -> None:
    """UserError unless `config` (a model's, from a checkpoint) is one build_model can build:
    a Transformer's as the command line checks it; a k-gram's or LSTM's sizes positive (a
    chunk size may be 0: all positions at once); a k-gram's variant was checked as it was made."""
    if isinstance(config, TransformerConfig):
        for field in dataclasses.fields(config):   # the command line gives numbers; a file may not
            value = getattr(config, field.name)
            if field.type in ("int", "int | None") and type(value) is not int:
                raise UserError(f"{field.name} {value!r} is not an integer")
            if type(value) is int and abs(value) > MAX_INTEGER:   # as the command line's
                raise UserError(f"{field.name} is {digits_of(value)}")
            optional = value is None and field.type == "float | None"
            if field.type in ("float", "float | None") and type(value) not in (int, float) \
                    and not optional:
                raise UserError(f"{field.name} {value!r} is not a number")
            if type(value) is float and not math.isfinite(value):   # as the command line's
                raise UserError(f"{field.name} {value!r} is not a finite number")
        if config.block_size < 1:
            raise UserError(f"block_size {config.block_size} is not positive")
        if not 0 <= config.dropout < 1:      # as the command line checks --dropout
            raise UserError(f"dropout {config.dropout} is not in [0, 1)")
        if not (config.rope_theta > 0 and config.norm_eps > 0):   # and --rope_theta; NaN too
            raise UserError(f"rope_theta {config.rope_theta} and norm_eps {config.norm_eps} "
                            "must be positive")
        validate_transformer_config(config)    # its kinds were checked as it was made
        limits = {"n_blocks": MAX_LAYERS, "n_experts": MAX_EXPERTS}
    else:
        for field in dataclasses.fields(config):    # the annotations are strings (__future__)
            value, smallest = getattr(config, field.name), 0 if field.name == "chunk_size" else 1
            if field.type == "int" and (type(value) is not int or value < smallest):
                raise UserError(f"{field.name} {value!r} is not an integer of at least {smallest}")
        limits = {"num_layers": MAX_LAYERS, "num_inner_layers": MAX_LAYERS, "k": MAX_KGRAM_K}
    for name, limit in limits.items():          # as the command line bounds them
        if getattr(config, name, 0) > limit:
            raise UserError(f"{name} {getattr(config, name)} is more than {limit}")


def check_finite_weights(path: Path, checkpoint: dict, remedy: str) -> None:
    """UserError if a checkpoint's weights hold NaN or infinity (a hand edit, or damage before
    its checksum: training never saves a step it did not apply), whatever reads them next."""
    broken = next((key for key, value in checkpoint["model"].items()
                   if value.is_floating_point() and not torch.isfinite(value).all()), None)
    if broken is not None:
        raise UserError(f"{path} holds NaN or infinite weights ({broken}); the model is broken: "
                        f"{remedy}")


def checkpoint_directory(checkpoints: CheckpointConfig) -> Path | None:
    """Where checkpoints go: --save_dir, or else the directory --resume reads."""
    if checkpoints.resume is not None:
        source = Path(checkpoints.resume or checkpoints.save_dir)
        if not source.exists():
            what = ("is a symbolic link to nothing (broken, or a loop)" if source.is_symlink()
                    else "does not exist")
            raise UserError(f"--resume {source} {what}; give a --save_dir or a checkpoint file")
        check_regular_file(source, "--resume")
    if checkpoints.save_dir:
        return Path(checkpoints.save_dir)
    if checkpoints.resume:   # <save_dir>/<model>/step_N.pt, or <save_dir> (resume_checkpoints)
        return Path(os.path.abspath(source)).parent.parent if source.is_file() else source
    return None


def resume_checkpoints(checkpoints: CheckpointConfig, model_names: list[str],
                       flags: dict) -> dict[str, tuple[Path, dict]]:
    """{model name: (path, checkpoint)} for each model --resume continues, checked against
    the flags before anything is written. Models without a checkpoint start afresh."""
    if checkpoints.resume is None:
        return {}
    source = Path(checkpoints.resume or checkpoints.save_dir)
    check_regular_file(source, "--resume")
    if source.is_file():
        checkpoint = load_checkpoint(source, "--resume")
        check_named_for_its_step(source, checkpoint)
        name = checkpoint["model_name"]
        if model_names != [name]:
            raise UserError(f"--resume {source} holds model {name}, but --models is "
                            f"{','.join(model_names)}; pass --models {name}, or --resume the "
                            "whole --save_dir")
        if not checkpoints.save_dir and Path(os.path.abspath(source)).parent.name != name:
            # a file anywhere else (a download) has no <save_dir> for the run's next
            # checkpoints: its grandparent folder may be anything, / or a home directory
            raise UserError(f"--resume {source} is not in a <save_dir>/{name}/ folder, so the "
                            "run has nowhere to write its checkpoints; add --save_dir DIR")
        # Training on from an older step would write its steps over the newer checkpoints
        # (and prune the one resumed from).
        step = checkpoint["progress"].get("step")
        newer = [path for path in CheckpointSeries(checkpoint_directory(checkpoints), name, 1).paths()
                 if isinstance(step, int) and checkpoint_step(path) > step]
        if newer:
            raise UserError(f"--resume {source} is step {step}, but {newer[-1]} is newer and "
                            "training on would write over it; move the newer checkpoints "
                            "away, or give another --save_dir")
        found = {name: (source, checkpoint)}
    elif source.is_dir():
        found = {}
        for name in model_names:
            latest = CheckpointSeries(source, name, keep=1).latest()
            if latest is not None:
                found[name] = (latest, load_checkpoint(latest, "--resume", newest_in=source))
                check_named_for_its_step(*found[name])
                held = found[name][1]["model_name"]
                if held != name:     # copied into another model's folder
                    raise UserError(f"{latest} holds model {held}, not the {name} of the "
                                    f"folder it is in; move it to {source / str(held)}, or away")
        if not found and source.name in model_names and CheckpointSeries(
                source.parent, source.name, keep=1).latest() is not None:
            raise UserError(f"--resume {source} is one model's folder of a --save_dir; give "
                            f"that --save_dir, {source.parent}, or one checkpoint file in it")
        if not found:
            raise UserError(f"--resume {source}: no checkpoints of {', '.join(model_names)} "
                            "there; check --save_dir and --models, or drop --resume")
    else:
        raise UserError(f"--resume {source} does not exist; give a --save_dir or a checkpoint file")
    for path, checkpoint in found.values():
        check_same_flags(checkpoint, path, flags)
    return found


def check_finished_models_kept_checkpoints(run_path: Path, resume_points: dict,
                                           model_names: list[str], source: Path) -> None:
    """--resume trains a model without a checkpoint from the start: one that stopped before
    its first. A model the continued run log records as finished wrote a last checkpoint,
    though; with none in `source` now (the folder --resume reads: moved, deleted, a partial
    copy), training it again would spend its time and replace its record, so it is refused."""
    if not run_path.exists():
        return
    records = load_runlog(run_path).get("models") or {}
    for name in model_names:
        record = records.get(name)
        if name not in resume_points and isinstance(record, dict) and record.get("final"):
            raise UserError(f"--resume: run log {run_path} records {name} as finished, but "
                            f"{source / name} holds no checkpoint of it; put its checkpoints "
                            f"back, or drop {name} from --models")


def check_named_for_its_step(path: Path, checkpoint: dict) -> None:
    """--resume finds the newest checkpoint by its name's step: a copy kept under another
    step's name (a backup as step_000099.pt) would be resumed from, and training on would
    write over the newer checkpoints."""
    named, step = checkpoint_step(path), checkpoint["progress"].get("step")
    if named >= 0 and isinstance(step, int) and named != step:
        raise UserError(f"{path} holds step {step}, but its name says step {named} (a copy "
                        f"renamed?); rename it step_{step:06d}.pt if it belongs to this run, or "
                        "move it away")


@contextlib.contextmanager
def claim_directory(directory: Path, flag: str):
    """Hold an exclusive lock on `directory` (made if missing) for the block, so that a
    second run given the same directory is refused instead of writing over this run's
    files. An flock belongs to the open directory and ends with the process, however it
    ends, so a killed run leaves no stale claim and no lock file. Directories made here
    are removed again if nothing was written into them."""
    made = missing_directories(directory)
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        handle = os.open(directory, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise UserError(f"{flag} {directory} is in use by another pico-llm run; wait for it "
                            f"to finish, or choose another {flag}") from None
        except OSError:   # a file system without locks (some network mounts): no claim
            pass
        if directory.is_dir() and os.path.samestat(os.fstat(handle), os.stat(directory)):
            break
        os.close(handle)  # the run that held it removed it meanwhile: claim the one there now
    try:
        yield
    finally:
        remove_if_empty(made)
        os.close(handle)


def missing_directories(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


def remove_if_empty(directories: list[Path]) -> None:
    """Remove the directories that a claim made (deepest first), up to the first one that
    something was written into."""
    for path in directories:
        try:
            path.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def claim_file(path: Path, flag: str):
    """Hold an exclusive lock on `path` for the block, so that a second process given the same
    file (two sweeps into one --artefacts_dir) is refused instead of the later writer replacing
    the other's points. The file itself is replaced by each atomic write, so the lock is taken
    on <path>.lock beside it (in its folder's real path, however the folder was reached),
    removed again at the end (if still empty, as pico-llm leaves it: a file of that name with
    content is someone's, and stays); one left by a killed process holds no lock (an flock ends
    with its process) and is taken over. A file system that has no locks (some network mounts)
    gives no claim, as Windows does not."""
    if fcntl is None:
        yield
        return
    made = missing_directories(path.parent)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = path.parent.resolve() / (path.name + ".lock")
            # read-only: a lock file left by another user is still one this user can lock;
            # non-blocking: opening a FIFO of that name would otherwise wait for a writer
            handle = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                             | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as error:
            remove_if_empty(made)
            raise cannot_write(str(path.with_name(path.name + ".lock")), error,
                               f"choose another {flag}") from None
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            os.close(handle)
            remove_if_empty(made)
            raise UserError(f"{flag}: {path.name}.lock beside {path} is not a regular file (a "
                            f"pipe, socket or device): remove it, or choose another {flag}")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            remove_if_empty(made)
            raise UserError(f"{flag}: {path} is being written by another pico-llm process; wait "
                            f"for it to finish, or choose another {flag}") from None
        except OSError:   # no locks on this file system
            break
        try:
            if os.path.samestat(os.fstat(handle), os.stat(lock_path)):
                break
        except FileNotFoundError:
            pass
        os.close(handle)  # the process that held it removed it meanwhile: claim the one there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(handle).st_size == 0:   # ours are empty: a file with content is not ours
                lock_path.unlink()
        os.close(handle)
        remove_if_empty(made)


def check_checkpoints_are_ours(save_dir: Path | None, model_names: list[str],
                               resume_points: dict[str, tuple[Path, dict]]) -> None:
    """A run writes into <save_dir>/<model>/ only when that directory holds no checkpoints or
    this run continues them: a fresh run there would replace another run's step files and
    prune the rest."""
    if save_dir is None:
        return
    for name in model_names:
        series = CheckpointSeries(save_dir, name, keep=1)
        if series.directory.exists() and not series.directory.is_dir():
            raise UserError(f"--save_dir {save_dir}: {series.directory}, where {name}'s "
                            "checkpoints go, is not a directory; move it away or choose another "
                            "--save_dir")
        latest = series.latest()
        resumed = resume_points.get(name)
        if latest is None or (resumed is not None
                              and resumed[0].parent.resolve() == series.directory.resolve()):
            continue
        raise UserError(f"--save_dir {save_dir} already holds checkpoints of {name} "
                        f"({latest.name}) from another run; continue them with --resume "
                        f"{save_dir}, or choose another --save_dir")


def flag_differences(stored: dict, current: dict, free: frozenset) -> list[str]:
    """"--flag A there, B now" for each flag both sets hold, outside `free`, that differs (a
    flag left out, None, reads "not given")."""
    def shown(value) -> str:
        return "not given" if value is None else repr(value)
    return [f"--{key} {shown(stored[key])} there, {shown(current[key])} now"
            for key in sorted(stored.keys() & current.keys())
            if key not in free and not same_setting(key, stored[key], current[key])]


def same_setting(key: str, a, b) -> bool:
    """Equal flag values; --init_from's the same directory however written (llama/ and
    llama, ../x/llama): the model, not the spelling, is what a resumed run must keep."""
    if key == "init_from" and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


# The model flags each kind of model reads: a checkpoint of one kind is not held to the others'.
MODEL_FLAGS = {"kgram_mlp_seq": ("kgram_k", "kgram_variant", "kgram_chunk_size",
                                 "num_inner_mlp_layers", "embed_size"),
               "lstm_seq": ("embed_size", "lstm_layers"),
               "transformer": ("transformer_variant", *TRANSFORMER_OVERRIDE_FLAGS),
               "transformer_gptoss": TRANSFORMER_OVERRIDE_FLAGS}


def as_built(stored: dict, flags: dict, model_name: str) -> tuple[dict, dict]:
    """A checkpoint's flags and this command's, each Transformer flag left to the preset set
    to the value `model_name` is built with, so that --d_model 128 typed for a pico preset
    run is the same setting as the preset's 128 left untyped. Both unchanged unless both
    build a Transformer from flags (an older checkpoint's flags may lack one, or name a preset
    gone; --init_from's config.json, not a preset, shapes a fine-tuned one)."""
    if stored.get("init_from") or flags.get("init_from"):
        return stored, flags
    filled = []
    for given in (stored, flags):
        try:
            config = transformer_config_from_flags(given, model_name)
            preset = ({} if model_name == "transformer_gptoss" else   # GPT-oss reads no variant
                      {"transformer_variant": preset_of(given, model_name)})
        except (UserError, ValueError, KeyError):
            return stored, flags
        filled.append(given | {flag: getattr(config, flag) for flag in TRANSFORMER_OVERRIDE_FLAGS
                               if given.get(flag) is None}
                      | {"head_size": config.head_dim} | preset)  # head_size 0: d_model / n_heads
    return filled[0], filled[1]


def check_same_flags(checkpoint: dict, path: Path, flags: dict) -> None:
    """A resumed run must compute what the interrupted one would have: same flags (of the
    model flags, those the checkpoint's kind of model reads; a Transformer's as built)."""
    name = checkpoint["model_name"]
    others = set().union(*MODEL_FLAGS.values()) - set(MODEL_FLAGS.get(name, ()))
    stored = dict(checkpoint["args"])
    if name.startswith("transformer"):
        stored, flags = as_built(stored, flags, name)
    if not stored.get("tinystories_weight"):    # a path without a weight was never read (and is
        stored["tinystories_path"] = None       # now refused, so the run could not repeat it)
    if not same_setting("init_from", stored.get("init_from"), flags.get("init_from")):
        stored["tokenizer"] = flags.get("tokenizer")   # --init_from brings its own: one change
    differences = flag_differences(stored, flags,
                                   FLAGS_FREE_ON_RESUME | frozenset(TRAINING_LENGTH_FLAGS) | others)
    if differences:
        raise UserError(f"{path} was trained with other flags ({'; '.join(differences)}); "
                        "resume with the same flags, or start afresh without --resume")


def nothing_left_to_train(progress: TrainingProgress, training: TrainingConfig) -> bool:
    """Whether a checkpoint's model is done under these flags: finished, with no epoch left
    in --epochs, or stopped early by a patience these flags still have."""
    if not progress.finished:
        return False
    patience = training.early_stop_patience
    return progress.epoch > training.epochs or progress.epochs_without_improvement >= patience > 0


def length_change_unused(name: str, checkpoint: dict, progress: TrainingProgress,
                         training: TrainingConfig, flags: dict) -> str:
    """For a model with nothing left to train, what a changed TRAINING_LENGTH_FLAGS value
    did not do ("" if none changed): --max_steps_per_epoch lengthens only epochs still to
    come, and the run had none left."""
    changed = [f"--{flag}" for flag in changed_length_flags(checkpoint.get("args", {}), flags)]
    if not changed:
        return ""
    patience = training.early_stop_patience     # a stop it still makes comes first
    advice = ("it stopped early: raise --early_stop_patience, or set it to 0, to train it on"
              if progress.epochs_without_improvement >= patience > 0 else
              f"raise --epochs (now {training.epochs}) to train it longer")
    return (f"{name} had finished, and {', '.join(changed)} "
            f"change{'s' if len(changed) == 1 else ''} only epochs still to come: nothing was "
            f"trained; {advice}")


def changed_length_flags(stored: dict, flags: dict) -> list[str]:
    """The TRAINING_LENGTH_FLAGS whose value this resumed run changes from the checkpoint's."""
    return [flag for flag in TRAINING_LENGTH_FLAGS
            if flag in stored and flag in flags and stored[flag] != flags[flag]]


def record_length_changes(record: dict, checkpoint: dict, flags: dict) -> None:
    """Appends to record["length_changes"] each TRAINING_LENGTH_FLAGS value this resumed run
    changes, {"step", "flag", "old", "new"}, so the log says how the run came to its length."""
    stored, step = checkpoint["args"], checkpoint["progress"]["step"]
    record.setdefault("length_changes", []).extend(
        {"step": step, "flag": flag, "old": stored[flag], "new": flags[flag]}
        for flag in changed_length_flags(stored, flags))
    if not record["length_changes"]:
        del record["length_changes"]


def check_same_data(path: Path, checkpoint: dict, data: TrainingData | None) -> None:
    """Refuse to resume on text other than the checkpoint's: the flags match, but a file's
    contents (or the TinyStories copy) changed since, so the resumed run would not be the run
    it continues. Checkpoints written before they held the digest pass unchecked."""
    stored = checkpoint.get("data_sha256")
    if stored and data is not None and data.fingerprint and stored != data.fingerprint:
        why = "a data file changed since"
        if "tokenizer_json" in checkpoint.get("tokenizer", {}):  # an imported tokenizer's text
            # was keyed by its file alone before 2026-12-07, not by its end-of-text id too
            why += ", or an earlier pico-llm version wrote the checkpoint"
        raise UserError(f"{path} was trained on other text than this run reads ({why}); resume "
                        "with the text it was trained on, or start a new run")


def load_model_weights(model: nn.Module, checkpoint: dict, path: Path, tokenizer) -> None:
    """Copy a checkpoint's weights into `model`; UserError naming what does not fit."""
    stored = checkpoint["tokenizer"]
    here = tokenizer_identity(stored["spec"], tokenizer)
    if stored.get("bpe_merges") not in (None, here.get("bpe_merges")):
        raise UserError(f"{path}'s tokenizer ({stored['name']}) was trained on other text than "
                        "this run's, so its ids stand for other tokens here; resume with the "
                        "text it was trained on, or start a new run")
    stored_vocab = stored["vocab_size"]
    if stored_vocab != tokenizer.vocab_size:
        raise UserError(f"{path} has a {stored_vocab}-token vocabulary ({checkpoint['tokenizer']['name']}), "
                        f"the tokenizer here has {tokenizer.vocab_size} ({tokenizer.name})")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:   # "Error(s) in loading state_dict for X:\n\t<one>\n\t<two>"
        problems = [line.strip() for line in str(error).split("\n\t")[1:]] or [str(error)]
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        detail = textwrap.shorten(problems[0].rstrip("."), 240) + more
        raise UserError(f"{path} does not fit a {checkpoint['model_name']} built from these flags "
                        f"({detail})") from None


# =============================================================================
# C. Distributed training (torchrun / DDP)
# =============================================================================
# What it adds: one model trained by several processes (ranks), each on its share
# of every batch, gradients averaged across ranks during backward. It matters
# when one step's compute outweighs the gradient all-reduce: larger models and
# batches on several GPUs. `torchrun --nproc_per_node=N pico-llm.py ...` starts N
# copies of this script with RANK, LOCAL_RANK and WORLD_SIZE set. --batch_size is
# the global batch: the examples of one optimizer step, split across ranks and
# --grad_accum_steps micro-batches, so the learning rate means the same thing on
# 1 process or 64.

@dataclasses.dataclass
class Distributed:
    """Where this process sits in the job (rank 0 of 1 for a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The ranks' agreements outside the steps go through a CPU group (gloo): whether to stop,
    # after every step, costs no wait for a GPU; and its waits are bounded by CONTROL_WAIT_S
    # (or --dist_timeout if longer), for they are waits for rank 0's checkpoints and, at the
    # end, its files (a rank that died is seen at once: its connections close). None: the
    # default group.
    control_group: object = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's disjoint share: every world_size-th item from `rank`."""
        return items[self.rank::self.world_size]

    def gradient_sync(self, step_model: nn.Module, last: bool):
        """The context for one micro-batch's backward: DDP averages the gradients over the
        ranks after the last micro-batch of a step only (no_sync before it); one process has
        nothing to sync."""
        return step_model.no_sync() if self.enabled and not last else contextlib.nullcontext()

    def sum_in_place(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks, on its device: the host waits for nothing (NCCL
        queues the all-reduce on the GPU's stream). The tensor itself on one process."""
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over all ranks (identity on one process)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def own_dropout_masks(self, seed: int, step: int, device: torch.device) -> None:
        """Before each step, a rank other than 0 seeds the CPU's generator and its device's from
        (seed, rank, step): every rank built its model from the same seed, so each would draw
        rank 0's dropout masks for its own examples. Rank 0 draws on as one process does. Drawn
        from the step alone, a resumed run's masks are the same again, on any number of ranks."""
        if self.rank == 0:
            return
        value = int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1, np.uint64)[0])
        torch.default_generator.manual_seed(value)
        if device.type == "cuda":       # this rank's GPU alone (torch.manual_seed seeds them all)
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        elif device.type == "mps":
            torch.mps.manual_seed(value)

    def barrier(self) -> None:
        """Every rank waits here for the others (on the control group): for rank 0's files."""
        if not self.enabled:
            return
        try:
            torch.distributed.barrier(group=self.control_group)
        except RuntimeError as error:   # a rank that failed meanwhile: its own error says why
            raise UserError(another_rank_stopped(error)) from None

    def maximum(self, value: int) -> int:
        """The largest of the ranks' `value` (itself on one process), agreed on the CPU through
        the control group: on GPUs the host does not wait for the step it has queued."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX,
                                     group=self.control_group)
        return int(tensor.item())


PEER_TIMEOUT = re.compile(r"[Tt]imed out|timing out|timeout")   # gloo's, NCCL's watchdog's


def another_rank_stopped(error: BaseException) -> str:
    """The line for a collective whose peer failed (its connections closed), whose own error
    says why, or stopped answering (a timeout: paused, or far behind)."""
    # gloo's message begins with its source line, "[../gloo/pair.cc:534]": dropped
    detail = textwrap.shorten(re.sub(r"^\[[^\]]*\]\s*", "", str(error)), 100)
    if PEER_TIMEOUT.search(str(error)):
        return f"another rank stopped answering ({detail}) within --dist_timeout"
    return f"another rank stopped ({detail}); its error says why"


def peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective's failure for want of a peer (its connections closed,
    or a timeout), not one of this rank's own (NCCL out of GPU memory, say): gloo's and
    NCCL's errors reach Python as RuntimeErrors that say which."""
    return not out_of_memory(error) and (
        isinstance(error, torch.distributed.DistNetworkError)
        or bool(re.search(r"Connection (closed|reset) by peer", str(error)))
        or bool(PEER_TIMEOUT.search(str(error))))


def launched_world_size() -> int:
    """How many ranks torchrun started (its WORLD_SIZE); 1 for a plain `python pico-llm.py`
    (and for a WORLD_SIZE that is not a count, which check_torchrun_environment refuses)."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    return max(int(size), 1) if is_count(size) else 1


def check_torchrun_environment() -> None:
    """UserError unless the variables say either no torchrun (no WORLD_SIZE, or 1) or a rank
    of a torchrun job: a WORLD_SIZE that counts processes, a RANK below it, a LOCAL_RANK, and
    the address where the ranks meet (MASTER_ADDR, MASTER_PORT), all of which torchrun sets."""
    size = os.environ.get("WORLD_SIZE")
    if size is None:
        return
    hint = "start pico-llm with torchrun --nproc_per_node=N, or unset WORLD_SIZE"
    if not is_count(size.strip()) or int(size) < 1:
        raise UserError(f"WORLD_SIZE={size!r} is not a number of processes; {hint}")
    world_size = int(size)
    if world_size == 1:    # a plain run, or torchrun --nproc_per_node=1: rank 0 alone
        rank = (os.environ.get("RANK") or "0").strip()
        if not (is_count(rank) and int(rank) == 0):
            raise UserError(f"RANK={rank!r} with WORLD_SIZE=1: one process is rank 0; unset "
                            "RANK, or start pico-llm with torchrun --nproc_per_node=N")
        return
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if not os.environ.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size} without {', '.join(missing)}; {hint}")
    for name in ("RANK", "LOCAL_RANK"):
        if not is_count(os.environ[name].strip()):
            raise UserError(f"{name}={os.environ[name]!r} is not a rank (0, 1, ...); {hint}")
    if int(os.environ["RANK"]) >= world_size:
        raise UserError(f"RANK={os.environ['RANK']} is not below WORLD_SIZE={world_size}; {hint}")
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"].strip()
    if not (address.isascii() and address.isprintable()):    # bytes that are not UTF-8, too
        raise UserError(f"MASTER_ADDR={address!r} is not a host name or address; {hint}")
    if not is_count(port) or not 0 < int(port) < 65536:
        raise UserError(f"MASTER_PORT={port!r} is not a port number (1 to 65535); {hint}")


@contextlib.contextmanager
def native_stderr_to(file):
    """File descriptor 2, where C++ code writes, pointed at `file` for the block (Python's
    sys.stderr too, flushed first, as it writes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(file.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


DIST_WAIT_NOTE_S = 10.0   # torchrun's ranks meet within seconds; a longer wait is said
DIST_GIVE_UP_GRACE_S = 3.0   # past --dist_timeout, for torch's own reason to come first


def setup_distributed(device_id: str, timeout_s: float) -> tuple[Distributed, str]:
    """Join the torchrun job if there is one: gloo on CPUs, NCCL with one GPU per rank.
    Returns this process's place and the device it trains on (cuda:LOCAL_RANK under
    torchrun on GPUs)."""
    world_size = launched_world_size()
    if world_size == 1:
        return Distributed(), device_id
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = (device_id == "auto" or device_id.startswith("cuda")) and torch.cuda.is_available()
    if use_cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"torchrun started local rank {local_rank} on a machine with {gpus} "
                            f"CUDA device(s), one per rank; start at most --nproc_per_node={gpus}, "
                            "or train on CPUs with --device_id cpu")
        torch.cuda.set_device(local_rank)
    # A rank that fails ends the job: the others give up after the timeout instead of hanging.
    # Until the ranks meet, torch's C++ layer logs every failed attempt to connect, with a C++
    # stack, straight to file descriptor 2: held aside, and shown only if they do meet. A wait
    # of over DIST_WAIT_NOTE_S (the variables set by hand, without torchrun) is said at once.
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    terminal = os.dup(2)
    waiting = threading.Timer(DIST_WAIT_NOTE_S, os.write, (terminal, (
        f"pico-llm: note (rank {os.environ.get('RANK')}): waiting for the other ranks of "
        f"WORLD_SIZE={world_size} at {where}; giving up after --dist_timeout {timeout_s:g} s"
        + ("" if os.environ.get("TORCHELASTIC_RUN_ID") else   # set by torchrun
           ". Start every rank with torchrun, or unset WORLD_SIZE") + "\n").encode()))
    waiting.daemon = True
    # torch gives up by itself only where nobody answers, and then after up to twice the
    # timeout (a client's retries); a listener that never replies (another program on the
    # port, a second process of one rank) holds it for ever. Nothing is written or held yet:
    # past the timeout (and a little more, for torch's own reason to come first) it exits.
    gave_up = (f"pico-llm: error (rank {os.environ.get('RANK')}): cannot join the torchrun job "
               f"at {where} within --dist_timeout {timeout_s:g} s; start every rank with "
               "torchrun (each RANK once), or unset WORLD_SIZE\n")

    def give_up():
        os.write(terminal, gave_up.encode())
        os._exit(2)

    deadline = threading.Timer(timeout_s + DIST_GIVE_UP_GRACE_S, give_up)
    deadline.daemon = True
    with tempfile.TemporaryFile() as native_log:
        try:
            waiting.start()
            deadline.start()
            with native_stderr_to(native_log):
                dist.init_process_group("nccl" if use_cuda else "gloo",
                                        timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as error:   # torch.distributed's errors are RuntimeErrors
            reason, advice = textwrap.shorten(str(error), 120), "start every rank with torchrun"
            if re.search(r"code: -98\b|address already in use", str(error), re.IGNORECASE):
                reason = f"port {os.environ['MASTER_PORT']} is in use by another program"
                advice += " and another --master_port"
            raise UserError(f"cannot join the torchrun job at {where} ({reason}); {advice}, or "
                            "unset WORLD_SIZE") from None
        finally:
            for timer in (waiting, deadline):
                timer.cancel()
                timer.join()
            os.close(terminal)
        native_log.seek(0)
        sys.stderr.write(native_log.read().decode(errors="replace"))
    try:
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=max(timeout_s, CONTROL_WAIT_S)))
    except (RuntimeError, ValueError) as error:
        raise UserError(f"the ranks at {where} joined, but cannot open their CPU group "
                        f"({textwrap.shorten(str(error), 120)}); on several machines, set "
                        "GLOO_SOCKET_IFNAME to the network interface they share") from None
    return (Distributed(dist.get_rank(), world_size, local_rank, control),
            f"cuda:{local_rank}" if use_cuda else "cpu")


def check_ranks_run_one_command(context: Distributed, flags: dict) -> None:
    """UserError on every rank if the ranks were started with other flags (by hand, not by
    torchrun, which gives each the same command): their steps and evaluations would issue
    collectives that do not match, and gloo aborts the process. Flags of where a run writes or
    what runs it (FLAGS_OF_THE_SAME_COMMAND: a rank's own --device_id) may differ."""
    if not context.enabled:
        return
    mine = {key: value for key, value in flags.items() if key not in FLAGS_OF_THE_SAME_COMMAND}
    everyone = [None] * context.world_size
    torch.distributed.all_gather_object(everyone, mine, group=context.control_group)
    for rank, theirs in enumerate(everyone):
        differences = [f"--{key} {theirs.get(key)!r} there, {mine.get(key)!r} here"
                       for key in sorted(theirs.keys() | mine.keys())
                       if not same_setting(key, theirs.get(key), mine.get(key))]
        if differences:
            raise UserError(f"rank {rank} was started with other flags than rank "
                            f"{context.rank} ({textwrap.shorten('; '.join(differences), 160)}); "
                            "start every rank with the same command (torchrun does)")


def check_ranks_read_the_same_text(context: Distributed, data: TrainingData) -> None:
    """UserError on every rank if the ranks read other text under the same flags (a relative
    path from other folders, a stale copy on one machine): each would train on examples of
    its own, silently, or their evaluations of other lengths would issue collectives that do
    not match, and gloo aborts. Compared by the data's digest, examples and tokenizer."""
    if not context.enabled:
        return
    everyone = [None] * context.world_size
    torch.distributed.all_gather_object(everyone, data.fingerprint, group=context.control_group)
    for rank, theirs in enumerate(everyone):
        if theirs != data.fingerprint:
            raise UserError(f"rank {rank} read other text than rank {context.rank} with the same "
                            "flags (its files' contents differ); give every rank the same files")


def check_ranks_resume_the_same_steps(context: Distributed,
                                      resume_points: dict[str, tuple[Path, dict]]) -> None:
    """UserError on every rank if the ranks resume other checkpoints (each reads its own
    --save_dir, which may differ between them): they would train on from other steps, and
    their collectives would not match. Compared by each model's step and checksum."""
    if not context.enabled:
        return
    mine = ", ".join(f"{name} at step {checkpoint['progress'].get('step')} "
                     f"({str(checkpoint.get('sha256'))[:8]})"        # its checksum's start
                     for name, (_, checkpoint) in sorted(resume_points.items())) or "nothing"
    everyone = [None] * context.world_size
    torch.distributed.all_gather_object(everyone, mine, group=context.control_group)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise UserError(f"rank {rank} resumes {theirs}, rank {context.rank} {mine}: other "
                            "checkpoints; give every rank the same --save_dir (on several "
                            "machines, one they share)")


# How long the ranks wait for rank 0 outside the steps (a large model's checkpoint on a slow
# disk; the summary, interpretability files and export at the end), unless --dist_timeout is
# longer; also how long opening the CPU group may take.
CONTROL_WAIT_S = 3600.0


def teardown_distributed(context: Distributed) -> None:
    if context.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_for_training(loss_module: nn.Module, context: Distributed,
                      device: torch.device) -> nn.Module:
    """The loss module as training calls it: itself, or wrapped in DistributedDataParallel
    under torchrun, which then averages the gradients across ranks during backward.
    DistributedDataParallel would also send rank 0's buffers to every rank before each forward;
    the models' buffers are constants every rank computes alike (RoPE's frequencies, linear
    attention's decays; tested unchanged by training), so it sends none: a collective fewer
    in every forward (docs/performance.md)."""
    if not context.enabled:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel
    # the switch is forward_sync_buffers from PyTorch 2.13, broadcast_buffers (deprecated) before
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in parameters
                      else "broadcast_buffers": False}
    return DistributedDataParallel(loss_module, **no_buffer_sync,
                                   device_ids=[device.index] if device.type == "cuda" else None)


# =============================================================================
# D. Training your own BPE tokenizer; resource accounting
# =============================================================================
# What it adds: --tokenizer bpe:N trains a byte-level BPE with N ids on the run's
# training split, and --accounting shows where a Transformer's parameters, FLOPs
# and training memory go. A small vocabulary makes CPU training much cheaper;
# accounting explains why.

# --- D.1 Byte-level BPE -----------------------------------------------------------------

PAT_RE = regex.compile(GPT2_PATTERN)

# A non-space then a space character: PAT always ends a pre-token between the two.
# REVERSE makes search() return the last occurrence, which encode_iterable wants.
SPACE_AFTER_TEXT_RE = regex.compile(r"\S\s", regex.REVERSE)

# Interned single-byte tokens, so a pre-token of n bytes doesn't allocate n new objects.
BYTE_TOKENS = [bytes([b]) for b in range(256)]

def special_tokens_regex(special_tokens, capture=False):
    """Regex matching any special token; longest first, so that when one special token
    is a prefix of another ("<|eot|>" vs "<|eot|><|eot|>") the longer one wins."""
    if not special_tokens:
        return None
    alternatives = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    return regex.compile(f"({alternatives})" if capture else alternatives)


def count_pretokens(text, special_tokens):
    """Counter {pre-token bytes: count} of a text. The text is first cut at the special
    tokens (which are dropped), so no pre-token, hence no merge, ever contains one."""
    splitter = special_tokens_regex(special_tokens)
    pieces = splitter.split(text) if splitter else [text]
    counts = Counter()
    for piece in pieces:
        counts.update(PAT_RE.findall(piece))  # count str first: encode each distinct one once
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def count_pretokens_in_chunk(job):
    """Worker: count the pre-tokens of bytes [start, end) of the file, reading only those.
    Boundaries sit where a character starts, so they never cut a UTF-8 character in two."""
    path, start, end, special_tokens = job
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8", errors="replace")
    return count_pretokens(text, special_tokens)


def find_chunk_boundaries(path, num_chunks, split_token=None, window=4096):
    """Byte offsets [0, ..., file_size] cutting the file into about num_chunks pieces
    that can be pre-tokenized independently with the same result as the whole file.

    With a special token, each boundary is moved forward to the next occurrence of it
    (text is split there anyway). Without one, it moves to the next newline that follows
    a printable non-space ASCII byte: PAT always ends a pre-token between a non-space
    and a space character and has no look-behind, so cutting there changes nothing
    (a plain newline is not safe: "a\\n\\n b" pre-tokenizes as "\\n\\n", " b").
    Only small windows are read, never the whole file."""
    if split_token:
        token = split_token.encode("utf-8")
        window = max(window, 2 * len(token))
        overlap, offset = len(token) - 1, 0
        find = lambda buf: buf.find(token)
    else:
        newline_after_text = regex.compile(rb"[\x21-\x7e]\n")
        overlap, offset = 1, 1  # the boundary is the newline, after the printable byte
        find = lambda buf: (m.start() if (m := newline_after_text.search(buf)) else -1)

    file_size = os.path.getsize(path)
    boundaries = [0]
    with open(path, "rb") as f:
        for i in range(1, num_chunks):
            pos = max(file_size * i // num_chunks, boundaries[-1])
            while True:
                f.seek(pos)
                buf = f.read(window)
                if len(buf) <= overlap:  # reached the end of the file: no more boundary
                    pos = file_size
                    break
                at = find(buf)
                if at >= 0:
                    pos += at + offset
                    break
                pos += len(buf) - overlap  # keep an overlap so a token across windows is found
            boundaries.append(pos)
    boundaries.append(file_size)
    return sorted(set(boundaries))


def pretokenize_file(path, special_tokens, num_workers=None, min_chunk_bytes=1 << 20):
    """Counter of the pre-tokens of a file, counted chunk by chunk (in parallel if the
    file has several chunks), so that no process ever holds the whole file."""
    num_workers = num_workers or min(os.cpu_count() or 1, 8)
    file_size = os.path.getsize(path)
    # ~4 chunks per worker balances the load; chunks of at most ~64 MB bound the memory.
    num_chunks = max(num_workers * 4, file_size // (64 << 20))
    num_chunks = max(1, min(num_chunks, file_size // max(min_chunk_bytes, 1)))
    # Assumes no other special token contains the first one after its own start
    # (e.g. "x<|endoftext|>"): a boundary there would cut that longer token in two.
    split_token = special_tokens[0] if special_tokens else None
    boundaries = find_chunk_boundaries(path, num_chunks, split_token)
    jobs = [(path, start, end, special_tokens) for start, end in zip(boundaries, boundaries[1:])]
    counts = Counter()
    if num_workers == 1 or len(jobs) <= 1:  # small file: a process pool costs more than it saves
        for job in jobs:
            counts.update(count_pretokens_in_chunk(job))
        return counts
    with start_pool(min(num_workers, len(jobs))) as pool:
        for chunk_counts in pool.imap_unordered(count_pretokens_in_chunk, jobs):
            counts.update(chunk_counts)  # merged as they come: only a few chunks in memory
    return counts


def start_pool(workers: int):
    """A process pool whose workers take SIGTERM's default (the pool ends them with it) and
    leave Ctrl-C to the parent, rather than inherit the parent's handlers and print a
    traceback each. They start with SIGTERM blocked until default_signals: a SIGTERM sent to
    a worker still starting (the pool's exit, once the others had done every job) had reached
    the handler inherited from the parent, whose call a fresh child drops; that worker never
    ended, and the exit waited for it for ever (seen once on a loaded machine)."""
    if not CAN_HOLD_SIGNALS:
        return multiprocessing.Pool(workers, initializer=default_signals)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return multiprocessing.Pool(workers, initializer=default_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Windows has no signal masks (nor a SIGTERM that a pool sends)
CAN_HOLD_SIGNALS = hasattr(signal, "pthread_sigmask")


def default_signals() -> None:
    """A pool worker's signals: SIGTERM (and SIGHUP) end it, Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if HANGUP and signal.getsignal(HANGUP) is not signal.SIG_IGN:
        signal.signal(HANGUP, signal.SIG_DFL)
    if CAN_HOLD_SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})   # one sent meanwhile ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MaxPair:
    """Heap key: heapq pops the smallest item, and we want the lexicographically
    greatest pair among pairs of equal count, so the byte comparison is reversed."""
    __slots__ = ("pair",)

    def __init__(self, pair):
        self.pair = pair

    def __lt__(self, other):
        return self.pair > other.pair

    def __eq__(self, other):
        return self.pair == other.pair


def merge_pair(symbols, pair, merged):
    """Replace every occurrence of pair in the list symbols by merged, left to right."""
    first, second = pair
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def pop_best_pair(heap, pair_counts):
    """Pop the most frequent pair (ties: greatest bytes). Entries are never removed when a
    count changes, a new one is pushed; stale ones are skipped here (lazy deletion)."""
    while heap:
        neg_count, key = heapq.heappop(heap)
        if pair_counts.get(key.pair, 0) == -neg_count:
            return key.pair
    return None


# Stale heap entries learn_merges lets pile up (beyond 4 per live pair) before it rebuilds the
# heap from the live counts alone: the rebuild costs a pass over them, the pile memory.
STALE_HEAP_ENTRIES = 10_000


def learn_merges(pretoken_counts, num_merges):
    """The BPE loop: repeatedly merge the most frequent adjacent pair within pre-tokens.

    Counts live in pair_counts and are updated incrementally: merging a pair only changes
    the pre-tokens that contain it, found through the index pair -> {pre-token ids}."""
    words = [[BYTE_TOKENS[b] for b in word] for word in pretoken_counts]
    freqs = list(pretoken_counts.values())
    pair_counts, words_with_pair = defaultdict(int), defaultdict(set)
    for word_id, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[word_id]
            words_with_pair[pair].add(word_id)
    heap = [(-count, MaxPair(pair)) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < num_merges:
        pair = pop_best_pair(heap, pair_counts)
        if pair is None:  # every pre-token is a single token: nothing left to merge
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        delta = defaultdict(int)  # net change of each pair count caused by this merge
        for word_id in words_with_pair.pop(pair):
            old = words[word_id]
            new = merge_pair(old, pair, merged)
            if len(new) == len(old):  # stale index entry: the pair left this word earlier
                continue
            for p in zip(old, old[1:]):
                delta[p] -= freqs[word_id]
            for p in zip(new, new[1:]):
                delta[p] += freqs[word_id]
                words_with_pair[p].add(word_id)
            words[word_id] = new
        for p, change in delta.items():
            if change == 0:
                continue
            count = pair_counts[p] + change
            if count > 0:
                pair_counts[p] = count
                heapq.heappush(heap, (-count, MaxPair(p)))
            else:
                del pair_counts[p]
        if len(heap) > 4 * len(pair_counts) + STALE_HEAP_ENTRIES:  # drop stale ones now and then
            heap = [(-c, MaxPair(p)) for p, c in pair_counts.items()]
            heapq.heapify(heap)
    return merges


def train_bpe(input_path, vocab_size, special_tokens, num_workers=None, min_chunk_bytes=1 << 20):
    """Train a byte-level BPE on a text file.

    Returns vocab {id: bytes} (ids 0..255 the bytes, then the special tokens, then one id
    per merge, in merge order) and merges [(left bytes, right bytes), ...] in merge order.
    Stops early, with a smaller vocab, if no pair is left to merge."""
    special_tokens = list(special_tokens or [])
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)}")
    counts = pretokenize_file(input_path, special_tokens, num_workers, min_chunk_bytes)
    merges = learn_merges(counts, num_merges)
    vocab = {i: BYTE_TOKENS[i] for i in range(256)}
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    for first, second in merges:
        vocab[len(vocab)] = first + second
    return vocab, merges


def assign_special_ids(vocab, special_tokens):
    """{special token: id}: its id in vocab if present, else a new id after the last one."""
    ids_of_bytes = {b: i for i, b in sorted(vocab.items(), reverse=True)}  # smallest id wins
    special_ids, next_id = {}, max(vocab) + 1
    for token in special_tokens or []:
        if token.encode("utf-8") in ids_of_bytes:
            special_ids[token] = ids_of_bytes[token.encode("utf-8")]
        else:
            special_ids[token], next_id = next_id, next_id + 1
    return special_ids


class Tokenizer:
    """Encodes text with a BPE given as vocab {id: bytes} plus ordered merges.

    Ids come from the vocab, whatever they are (GPT-2's don't follow merge order); the
    merges only give the priority: within a pre-token, the earliest merge applies first."""
    CACHE_LIMIT = 100_000

    def __init__(self, vocab, merges, special_tokens=None):
        self.special_ids = assign_special_ids(vocab, special_tokens)
        self.vocab = dict(vocab)
        for token, token_id in self.special_ids.items():
            self.vocab[token_id] = token.encode("utf-8")
        self.merge_ranks = {}
        for rank, pair in enumerate(merges):
            self.merge_ranks.setdefault(tuple(pair), rank)
        # bytes -> id for ordinary tokens; if two ids share the same bytes, the smaller wins
        special = set(self.special_ids.values())
        self.ids_of_bytes = {b: i for i, b in sorted(self.vocab.items(), reverse=True)
                             if i not in special}
        self.special_re = special_tokens_regex(self.special_ids, capture=True)
        self.max_special_len = max(map(len, self.special_ids), default=0)
        self.cache = {}  # pre-token str -> ids: natural text repeats its words a lot

    @property
    def vocab_size(self):
        return len(self.vocab)

    def bpe(self, pretoken):
        """Ids of one pre-token: apply the lowest-ranked merge present, until none applies."""
        symbols = [BYTE_TOKENS[b] for b in pretoken.encode("utf-8")]
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            pair = min(pairs, key=lambda p: self.merge_ranks.get(p, float("inf")))
            if pair not in self.merge_ranks:
                break
            symbols = merge_pair(symbols, pair, pair[0] + pair[1])
        return [self.ids_of_bytes[s] for s in symbols]

    def encode_ordinary(self, text):
        """Encode text that contains no special tokens."""
        ids = []
        for pretoken in PAT_RE.findall(text):
            if pretoken not in self.cache:
                if len(self.cache) >= self.CACHE_LIMIT:  # bounded memory on endless streams
                    self.cache.clear()
                self.cache[pretoken] = self.bpe(pretoken)
            ids.extend(self.cache[pretoken])
        return ids

    def encode(self, text):
        """Ids of text; special tokens in it become their own ids (longest match first)."""
        if not self.special_re:
            return self.encode_ordinary(text)
        ids = []
        # split() with a capture group alternates: ordinary text, special token, ordinary...
        for i, part in enumerate(self.special_re.split(text)):
            ids.extend([self.special_ids[part]] if i % 2 else self.encode_ordinary(part))
        return ids

    def safe_cut(self, text):
        """The last position p found such that encode(text[:p]) + encode(rest) equals encode of
        text[:p] + rest whatever rest follows, or 0 if none is known yet.

        p must sit between a non-space and a space character (PAT ends a pre-token there
        and has no look-behind), must not fall inside a special token, and must be far
        enough from the end that any special token starting before p is fully visible."""
        end = len(text) - max(self.max_special_len, 2) + 2  # search "\S\s" within text[:end]
        match = SPACE_AFTER_TEXT_RE.search(text, 0, max(end, 0))
        if not match:
            return 0
        cut = match.start() + 1
        if self.special_re:
            for special in self.special_re.finditer(text, 0, cut + self.max_special_len):
                if special.start() < cut < special.end():
                    return special.start()
        return cut

    def encode_iterable(self, iterable):
        """Lazily yield the ids of "".join(iterable) (e.g. an open file, line by line),
        holding only a small buffer: text is encoded up to the last safe cut point."""
        buffer = ""
        for chunk in iterable:
            buffer += chunk
            cut = self.safe_cut(buffer)
            if cut:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
        yield from self.encode(buffer)

    def decode(self, ids):
        """Text of the ids; byte sequences that aren't valid UTF-8 become U+FFFD."""
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def save(self, vocab_path, merges_path):
        """JSON files, bytes as hex strings (lossless, readable enough):
        vocab {"id": "hex", ...} and merges [["hex", "hex"], ...] in merge order.
        Special tokens are stored in the vocab; pass their strings again to from_files."""
        merges = sorted(self.merge_ranks, key=self.merge_ranks.get)
        atomic_write_json(Path(vocab_path), {str(i): b.hex() for i, b in sorted(self.vocab.items())})
        atomic_write_json(Path(merges_path), [[a.hex(), b.hex()] for a, b in merges])

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        return sorted(self.merge_ranks, key=self.merge_ranks.get)

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None):
        """Load a Tokenizer written by save()."""
        with open(vocab_path) as f:
            vocab = {int(i): bytes.fromhex(h) for i, h in json.load(f).items()}
        with open(merges_path) as f:
            merges = [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in json.load(f)]
        return cls(vocab, merges, special_tokens)


def load_tiktoken_ranks(path):
    """{token bytes: rank} from a tiktoken file, one "base64(token) rank" per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def recover_merge(token, ranks):
    """The pair that created token: run BPE on its bytes with only the tokens ranked
    below it (as tiktoken would: leftmost lowest rank first) until two parts remain."""
    parts = [BYTE_TOKENS[b] for b in token]
    while len(parts) > 2:
        best, best_rank = None, ranks[token]
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"no merge creates {token!r}: not a BPE vocabulary")
    return parts[0], parts[1]


def gpt2_vocab_and_merges(ranks_path):
    """GPT-2's vocab {id: bytes} (ids = ranks, plus 50256 = <|endoftext|>) and its merges
    in priority order, rebuilt from the r50k_base ranks file."""
    ranks = load_tiktoken_ranks(ranks_path)
    vocab = {rank: token for token, rank in ranks.items()}
    vocab[len(ranks)] = b"<|endoftext|>"
    tokens_by_rank = sorted(ranks, key=ranks.get)
    merges = [recover_merge(token, ranks) for token in tokens_by_rank if len(token) > 1]
    return vocab, merges


def tiktoken_encoding_from_bpe(vocab, merges, special_tokens, name):
    """A tiktoken.Encoding (Rust, much faster) giving the same ids as Tokenizer.

    tiktoken has no merge list: it ranks a pair by the id of the concatenated bytes and
    uses the id as the rank. So the id of each merge's result must grow with merge order
    (true for train_bpe and GPT-2; checked). Ids may have gaps (the special tokens at
    256.. in train_bpe's vocab): ranks only need to be ordered. If two merges produce the
    same bytes, the first id is kept, as Tokenizer does (the later id is never emitted).
    Caveat: with overlapping special tokens, tiktoken does not promise longest-first."""
    special_ids = assign_special_ids(vocab, special_tokens)
    special = set(special_ids.values())
    # reversed so that, for bytes made by two merges, the first (smallest) id wins
    ranks = {b: i for i, b in sorted(vocab.items(), reverse=True) if i not in special}
    if any(BYTE_TOKENS[b] not in ranks for b in range(256)):
        raise ValueError("every single byte must be in the vocab")
    last_rank, seen = -1, set()
    for first, second in merges:
        merged = first + second
        if merged not in seen:  # a duplicate result keeps its first rank
            seen.add(merged)
            if ranks[merged] <= last_rank:
                raise ValueError("the ids of merge results must increase with merge order")
            last_rank = ranks[merged]
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special_ids)


class TrainedBPETokenizer:
    """--tokenizer bpe:N: a byte-level BPE with N ids trained on this run's own text.

    Encoding runs through tiktoken (same ids as Tokenizer.encode_ordinary, much faster).
    A small vocabulary makes the output layer, and so CPU training, much cheaper.
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 requested_size: int) -> None:
        # As train_bpe makes it: the bytes at ids 0-255, then each merge's result in order
        # (the end-of-text token between). The fingerprint below reads only the merges, and a
        # checkpoint's vocabulary with two bytes' ids swapped would read every text swapped.
        merged = [token for i, token in sorted(vocab.items())
                  if i >= 256 and token != END_OF_TEXT.encode()]
        if (any(vocab.get(i) != BYTE_TOKENS[i] for i in range(256))
                or merged != [first + second for first, second in merges]):
            raise ValueError("its vocabulary is not the 256 bytes and then its merges' results "
                             "in order, as BPE training makes it")
        self.name = f"bpe:{requested_size}"
        self.fingerprint = f"{self.name}:" + hashlib.sha256(
            " ".join(f"{a.hex()}.{b.hex()}" for a, b in merges).encode()).hexdigest()[:24]
        self.bpe = Tokenizer(vocab, merges, [END_OF_TEXT])
        self.encoding = tiktoken_encoding_from_bpe(vocab, merges, [END_OF_TEXT], self.name)
        self.vocab_size = max(self.bpe.vocab) + 1
        self.eot_id = self.bpe.special_ids[END_OF_TEXT]

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.bpe.decode([i for i in ids if i in self.bpe.vocab])

    def token_bytes(self, token_id: int) -> bytes:
        return self.bpe.vocab.get(token_id, b"")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token_id, token in self.bpe.vocab.items():
            lengths[token_id] = 0 if token_id == self.eot_id else len(token)
        return lengths

    def save(self, directory: Path) -> None:
        self.bpe.save(directory / "vocab.json", directory / "merges.json")


def train_bpe_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path | None) -> TrainedBPETokenizer:
    """Train (or reuse from the cache) a BPE on `texts`, separated by <|endoftext|> so no
    merge crosses from one example into the next."""
    digest = hashlib.sha256(f"bpe:{vocab_size}".encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    cached = cache_dir / f"bpe-{digest.hexdigest()[:24]}" if cache_dir else None
    if cached is not None and (cached / "merges.json").exists():
        try:
            if not all((cached / name).is_file() for name in ("vocab.json", "merges.json")):
                raise ValueError("not regular files")          # reading a FIFO would wait forever
            for name in ("vocab.json", "merges.json"):
                check_json_size(cached / name)
            loaded = Tokenizer.from_files(cached / "vocab.json", cached / "merges.json", [END_OF_TEXT])
            if not all(0 <= token_id < vocab_size for token_id in loaded.vocab):
                raise ValueError(f"ids outside 0..{vocab_size - 1}")
            if len(loaded.vocab) != 256 + len(loaded.special_ids) + len(loaded.merges):
                raise ValueError(f"{len(loaded.merges)} merges for {len(loaded.vocab)} ids")
            return TrainedBPETokenizer(loaded.vocab, loaded.merges, vocab_size)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            # truncated JSON, bad hex, a list where an object belongs, nesting too deep, ...
            problem = textwrap.shorten(str(error), 80) or type(error).__name__
            warn(f"pico-llm: note: BPE cache {cached} is damaged ({problem}); training the "
                 "tokenizer again")
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        try:
            corpus.write_text(END_OF_TEXT.join(texts), encoding="utf-8")
        except OSError as error:
            raise cannot_write(f"the training text's copy for BPE training in {scratch}", error,
                               "set TMPDIR to a folder with room") from None
        vocab, merges = train_bpe(corpus, vocab_size, [END_OF_TEXT])
    tokenizer = TrainedBPETokenizer(vocab, merges, vocab_size)
    if tokenizer.vocab_size < vocab_size:                 # said once, when it is trained
        warn(f"pico-llm: note: the training text has pairs to merge for only "
             f"{tokenizer.vocab_size:,} ids, so bpe:{vocab_size}'s vocabulary is that size")
    if cached is not None:
        try:
            tokenizer.save(cached)
        except OSError as error:
            warn(f"pico-llm: note: trained tokenizer not cached ({error.strerror})")
    return tokenizer


# --- D.2 Resource accounting ---------------------------------------------------------------

def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_flops_per_token(model: nn.Module, context_length: int) -> int:
    """Training FLOPs per token: 6 N (forward 2 N, backward 4 N) over the N weights that
    enter matrix multiplications, plus attention's 12 * layers * d_model * context
    (PaLM appendix B, the scores and their product with V; Kaplan et al. 2020 count half).
    Embedding lookups are free; a tied unembedding still costs its matmul, so it is counted
    once as a matmul. A token passes through k of a mixture's E experts, so experts count
    k / E of their weights; linear attention reads and updates a head_dim-wide state where
    softmax attention reads the whole context, so its term has head_dim in place of the
    context."""
    lookup_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookup_tables.add(id(getattr(model, "onehot_weight", None)))  # one-hot rows are gathered
    matmul_weights = {id(p): p.numel() for p in model.parameters()
                      if id(p) not in lookup_tables and p.dim() >= 2}
    unembedding = getattr(model, "unembedding", None)
    if isinstance(unembedding, nn.Linear):
        matmul_weights[id(unembedding.weight)] = unembedding.weight.numel()
    for mixture in (m for m in model.modules() if isinstance(m, MixtureOfExperts)):
        for p in mixture.experts.parameters():
            if id(p) in matmul_weights:
                matmul_weights[id(p)] *= mixture.experts_per_token / len(mixture.experts)
    flops = 6 * sum(matmul_weights.values())
    if isinstance(model, TransformerModel):
        c = model.config
        mixed = context_length if c.attention == "softmax" else c.head_dim
        flops += 12 * c.n_blocks * c.n_heads * c.head_dim * mixed
    return int(flops)


# GPT-2's published shapes (Radford et al., 2019), for accounting; gpt2-small is also the
# GPT2-small preset.
GPT2_SHAPES = {
    "gpt2-small": dict(n_blocks=12, d_model=768, n_heads=12),
    "gpt2-medium": dict(n_blocks=24, d_model=1024, n_heads=16),
    "gpt2-large": dict(n_blocks=36, d_model=1280, n_heads=20),
    "gpt2-xl": dict(n_blocks=48, d_model=1600, n_heads=25),
}


def gpt2_shape_config(name: str, context_length: int = 1024) -> TransformerConfig:
    return TransformerConfig(vocab_size=50257, block_size=context_length, ffn="gelu",
                             norm="layernorm", pos_emb="learned", tie_weights=True, bias=True,
                             d_ff=4 * GPT2_SHAPES[name]["d_model"], **GPT2_SHAPES[name])


def transformer_accounting(config: TransformerConfig, context_length: int) -> dict:
    """Where a Transformer's parameters, compute and training memory go.

    Returns per component: parameters, and forward FLOPs for one sequence of
    `context_length` tokens (2 FLOPs per multiply-add); plus fp32 training memory
    with AdamW in bytes: weights, gradients, the two moment buffers, and the
    activations autograd keeps per example (a standard itemization that counts
    every saved intermediate once; fused kernels save less). A mixture of experts
    holds all E experts' parameters and spends the FLOPs of the k each token uses.
    """
    c, T = config, context_length
    d, L, V, F_, D = c.d_model, c.n_blocks, c.vocab_size, c.d_ff, c.head_dim
    q_width, kv_width = c.n_heads * D, c.n_kv_heads * D   # q_width = d unless head_size is set
    bias, qkv_bias = (1 if c.bias else 0), (1 if c.bias or c.qkv_bias else 0)
    norm_params = {"rmsnorm": d, "layernorm": d * (1 + bias), "none": 0}[c.norm]
    ffn_matrices = 3 if c.ffn in GATED_FFNS else 2
    attention_params = (d * (q_width + 2 * kv_width) + q_width * d
                        + qkv_bias * (q_width + 2 * kv_width) + bias * d)
    gate = c.linear_attention_gate if c.attention == "gated_linear" else None
    if c.attention == "softmax" and c.attention_sinks:
        attention_params += c.n_heads                       # one sink logit per head
    if c.attention == "softmax" and c.qk_norm:
        attention_params += 2 * D                           # the query and key norms' gains
    if c.attention == "softmax" and c.value_embeddings:
        attention_params += 1                               # the value embedding's weight
    if gate is not None:
        attention_params += d * d + bias * d + D            # output gate, head norm
    if gate == "data":
        attention_params += d * 16 + 16 * d + d             # the rank-16 forget gate
    ffn_params = ffn_matrices * d * F_ + bias * ((ffn_matrices - 1) * F_ + d)
    experts, active = max(c.n_experts, 1), c.experts_per_token if c.n_experts else 1
    router_params = (d + 1) * c.n_experts if c.n_experts else 0
    final_norm = norm_params if c.norm_position == "pre" else 0
    parameters = {
        "token_embedding": V * d,
        "position_embedding": c.block_size * d if c.pos_emb == "learned" else 0,
        "attention": L * attention_params,
        "feed_forward": L * (experts * ffn_params + router_params),
        "norms": L * 2 * norm_params + final_norm,
        "unembedding": 0 if c.tie_weights else V * d,
        "value_embedding": V * kv_width if c.value_embeddings else 0,
        "unet_skip_weights": L // 2 if c.unet_skips else 0,
    }
    # Softmax attention: Q K^T, then weights @ V, over the whole context (a sliding window's
    # written-out form masks the scores, it does not skip them). Linear attention: the
    # recurrent form's state update and read, 2 D E multiply-adds per token and head (E = D,
    # plus the column of ones that carries plain linear attention's normalizer).
    state_width = D + 1 if gate is None else D
    mixing = (L * 2 * 2 * T * T * q_width if c.attention == "softmax"
              else L * 2 * 2 * T * d * state_width)
    flops = {
        "attention_projections": L * 2 * T * (d * (q_width + 2 * kv_width) + q_width * d
                                              + (d * d if gate is not None else 0)),
        "attention_scores_and_mix": mixing,
        "feed_forward": L * 2 * T * (active * ffn_matrices * d * F_ + d * c.n_experts),
        "unembedding": 2 * T * d * V,
    }
    scores = (2 * c.n_heads * T * T if c.attention == "softmax"
              else c.n_heads * T * LINEAR_ATTENTION_CHUNK * state_width)  # (C, C, D) per chunk
    per_block_activations = (2 * T * d               # inputs of the two norms
                             + T * (q_width + 2 * kv_width)  # q, k, v
                             + scores                  # scores and softmax
                             + 2 * T * d               # attention output, output projection
                             + active * T * F_ * (3 if c.ffn in GATED_FFNS else 2) + T * d)  # FFN
    activation_floats = L * per_block_activations + T * d + 2 * T * V  # final norm, logits, softmax
    total_parameters = sum(parameters.values())
    memory = {
        "parameters": 4 * total_parameters,
        "gradients": 4 * total_parameters,
        "adamw_state": 8 * total_parameters,
        "activations_per_example": 4 * activation_floats,
    }
    return {"parameters": parameters, "total_parameters": total_parameters,
            "forward_flops_per_sequence": flops, "total_forward_flops": sum(flops.values()),
            "context_length": T, "training_memory_bytes": memory}


def parameter_count(config: KGramConfig | LSTMConfig | TransformerConfig, vocab_size: int) -> int:
    """The parameters build_model would make, from the config alone (nothing is allocated)."""
    if isinstance(config, TransformerConfig):
        config = dataclasses.replace(config, vocab_size=vocab_size)
        return transformer_accounting(config, config.block_size)["total_parameters"]
    V, E = vocab_size, config.embed_size
    unembedding = E * V + V
    if isinstance(config, LSTMConfig):  # per layer: 4 gates x (input and hidden weights, 2 biases)
        return V * E + config.num_layers * 4 * (2 * E * E + 2 * E) + unembedding
    table = V + 1                       # the k-gram's padding id has a row of its own
    context = {"onehot": config.k * table * E + E,
               "embedding": table * E + config.k * E * E + E,
               "conv": table * E + config.k * E * E + E}[config.variant]
    return context + config.num_inner_layers * (E * E + E) + unembedding


def memory_available(device: torch.device) -> int | None:
    """Bytes this run may use at most: the GPU's memory, or the machine's physical memory
    (capped by an address-space limit such as `ulimit -v`); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (AttributeError, ValueError, OSError, ImportError):  # not a POSIX system
        return None
    return available if limit == resource.RLIM_INFINITY else min(available, limit)


def check_models_fit_in_memory(models: "ModelsConfig", vocab_size: int, block_size: int,
                               device: torch.device, init_from: str | None = None) -> None:
    """Refuse, before any data (or --init_from's weights) is read, a model whose training
    state alone exceeds the memory here: 16 bytes per parameter (fp32 weights, gradients,
    AdamW's two moments) and, for a Transformer, the KV cache of a sample at --block_size
    positions (fp32 keys and values in every block). Activations are left out: they depend
    on the examples' lengths."""
    available = memory_available(device)
    if available is None:
        return
    for name in models.names:
        config = models.config_of(name)
        parameters = parameter_count(config, vocab_size)
        cache = 0
        if isinstance(config, TransformerConfig):
            cache = 2 * config.n_blocks * config.n_kv_heads * config.head_dim * block_size * 4
        needed = 16 * parameters + cache
        if needed <= available:
            continue
        if not init_from and 16 * parameter_count(config, 256) + cache <= available:
            advice = (f"its {vocab_size:,}-token vocabulary is what does not fit; choose a "
                      "smaller --tokenizer")
        elif isinstance(config, KGramConfig):
            advice = f"lower --kgram_k ({config.k:,}) or --embed_size ({config.embed_size:,})"
        elif isinstance(config, LSTMConfig):
            advice = (f"lower --embed_size ({config.embed_size:,}) or --lstm_layers "
                      f"({config.num_layers})")
        elif cache > 16 * parameters or (config.pos_emb == "learned" and not init_from
                                         and 2 * 16 * block_size * config.d_model > needed):
            # the KV cache, or learned positions (a block_size x d_model table), most of it
            advice = f"lower --block_size ({block_size:,})"
        elif init_from:
            advice = f"--init_from {init_from} is too large to train here; choose a smaller model"
        elif config.head_size:       # heads of a width of their own, not d_model / n_heads
            advice = f"lower --head_size ({config.head_size:,}), --d_model or --n_blocks"
        elif config.n_experts:       # each expert a feed-forward layer of its own
            advice = (f"lower --n_experts ({config.n_experts:,}), --d_ff, --d_model or "
                      "--n_blocks")
        else:
            advice = "lower --d_model, --n_blocks or --d_ff"
        kv = f" and a {memory_size(cache)} KV cache" if cache >= 2**20 // 10 else ""  # 0.1 MiB
        raise UserError(f"{name} needs about {memory_size(needed)} ({parameters:,} parameters "
                        f"at 16 bytes for training{kv}), more than the {memory_size(available)} "
                        f"of memory here; {advice}")


def memory_size(size: int) -> str:
    """Bytes as GiB, or MiB below one GiB; past 10**18 GiB (a damaged file's sizes), to the
    nearest power of ten, which takes integers of any length."""
    if size >= 10**18 * 2**30:
        return f"10^{math.log10(size) - math.log10(2**30):.0f} GiB"
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def format_accounting(name: str, account: dict, batch_size: int) -> str:
    """A readable table of one model's accounting."""
    total_p, total_f = account["total_parameters"], account["total_forward_flops"]
    lines = [f"{name}: {total_p:,} parameters; forward {total_f / 1e9:,.2f} GFLOP per "
             f"{account['context_length']}-token sequence (training about 3x)"]
    for component, count in account["parameters"].items():
        lines.append(f"  params  {component:<26} {count:>15,}  {100 * count / total_p:5.1f}%")
    for component, count in account["forward_flops_per_sequence"].items():
        lines.append(f"  flops   {component:<26} {count / 1e9:>13,.2f} G  {100 * count / total_f:5.1f}%")
    memory = account["training_memory_bytes"]
    fixed = memory["parameters"] + memory["gradients"] + memory["adamw_state"]
    for component, size in memory.items():
        lines.append(f"  memory  {component:<26} {size / 2**30:>13,.3f} GiB")
    total = fixed + batch_size * memory["activations_per_example"]
    lines.append(f"  memory  {'total at batch ' + str(batch_size):<26} {total / 2**30:>13,.3f} GiB")
    return "\n".join(lines)


# =============================================================================
# E. Hugging Face interop
# =============================================================================
# What it adds: models from and for the Hugging Face ecosystem. --init_from DIR
# (or a hub id org/name) starts the Transformer from a model saved in Hugging Face
# format (config.json + model.safetensors) and fine-tunes it, or --generate
# continues a prompt with it; --export_hf DIR writes a pico-llm Transformer back, so
# that transformers.AutoModelForCausalLM.from_pretrained(DIR) computes the same
# logits. Nothing new is computed here: GPT-2 is section 2.3's Transformer with
# learned positions, LayerNorm, GELU and biases; Llama (1-3.x, SmolLM2) the one with
# RoPE, RMSNorm and SwiGLU; Qwen2/2.5 adds biases to q, k and v, Qwen3 QK-norm,
# SmolLM3 blocks without RoPE, GPT-oss experts, sinks and sliding windows; long
# contexts stretch RoPE (rope_frequencies). What differs is how config keys and
# tensors are named and laid out, written down in one config map and one weight
# table per family: a new family is a new table and a parity test. Reading and
# writing needs the safetensors and tokenizers packages (huggingface_hub for hub
# ids), imported only here, so the rest of pico-llm runs without them; transformers
# itself is needed only by the tests that check the results against it.

def hf_package(name: str, purpose: str):
    """The optional package `name`, imported on first use; UserError if it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{purpose} needs the {name.split('.')[0]} package; "
                        "pip install -r requirements-core.txt") from None


@dataclasses.dataclass
class HuggingFaceConfig:
    """This appendix's flags: where a Transformer starts from, where it is exported to."""

    init_from: str | None = None     # a Hugging Face model directory or hub id
    export_hf: str | None = None     # a new directory for the trained Transformer


# --- E.1 Configs ------------------------------------------------------------------------

def json_type(value) -> str:
    """The JSON type of a value json.loads returned, as messages name it."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), "null")


def hf_setting(hf: dict, name: str, default=None, allowed=None, prefix: str = "",
               integer: bool = False, above=None, at_least=None, at_most=None):
    """config.json's value of `name` (absent and null both mean `default`), refused in one
    line naming the key and the value unless it has the JSON type of the default (a string
    is no boolean: "false" would count as true), is one of `allowed`, and, where bounds are
    given, is a finite number (an integer with `integer`) within them: the bounds the
    command line puts on the same setting. `prefix` names the object holding the key."""
    value = hf.get(name)
    value = default if value is None else value
    key = prefix + name
    if value is None:
        raise UserError(f"config.json has no {key}")
    bounds = {"above": above, "at least": at_least, "at most": at_most}
    bounded = integer or any(bound is not None for bound in bounds.values())
    if bounded:
        expected = "number"
    else:       # the default's type; with no default, any
        expected = json_type(default) if default is not None else None
    wrong_type = expected is not None and json_type(value) != expected
    if wrong_type or (integer and not isinstance(value, int)):
        kind = "integer" if integer else expected
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(f"config.json: {key}={value!r} is not {article} {kind}")
    if allowed is not None and value not in allowed:
        raise UserError(f"config.json: {key}={value!r} is not supported (pico-llm computes "
                        f"{key}={allowed[0]!r})")
    # First, before any arithmetic or a message writes it out in full: a size or count past
    # MAX_INTEGER, or a number past a float's range, is named by its count of digits, as the
    # command line names it
    if type(value) is int and abs(value) > (MAX_INTEGER if integer else sys.float_info.max):
        most = f"at most {MAX_INTEGER:,}" if integer else "a float's range"
        raise UserError(f"config.json: {key} is {digits_of(value)}, beyond any number "
                        f"pico-llm can hold ({most})")
    if bounded:
        limits = [f"{words} {bound}" for words, bound in bounds.items() if bound is not None]
        within = ((above is None or value > above) and (at_least is None or value >= at_least)
                  and (at_most is None or value <= at_most))
        if not (within and (isinstance(value, int) or math.isfinite(value))):  # NaN is within none
            kind = "an integer" if integer else "a finite number"
            raise UserError(f"config.json: {key}={value!r} must be {kind} {' and '.join(limits)}")
    return value


def config_from_hf(hf: dict) -> TransformerConfig:
    """A Hugging Face config.json (as a dict) -> TransformerConfig; UserError for anything
    a pico-llm Transformer does not compute. Every size comes from the file; a key the file
    omits means what transformers' config class of that model_type assumes."""
    def setting(name, default=None, allowed=None, **bounds):
        return hf_setting(hf, name, default, allowed, **bounds)

    def size(name, default=None, at_most=None):
        return hf_setting(hf, name, default, integer=True, above=0, at_most=at_most)

    def heads_fit(d_model: int, n_heads: int, n_kv_heads: int) -> None:
        if d_model % n_heads or n_heads % n_kv_heads:
            raise UserError(f"config.json: a width of {d_model} with {n_heads} heads and "
                            f"{n_kv_heads} key/value heads has no pico-llm equivalent")

    kind = hf.get("model_type")
    if kind == "gpt2":
        activation = setting("activation_function", "gelu_new",
                             ("gelu_new", "gelu_pytorch_tanh", "gelu"))
        setting("scale_attn_weights", True, (True,))
        setting("scale_attn_by_inverse_layer_idx", False, (False,))
        setting("add_cross_attention", False, (False,))
        d_model, n_heads = size("n_embd"), size("n_head")
        heads_fit(d_model, n_heads, n_heads)
        return TransformerConfig(
            vocab_size=size("vocab_size"), block_size=size("n_positions", at_most=MAX_BLOCK_SIZE),
            d_model=d_model, n_heads=n_heads, n_blocks=size("n_layer", at_most=MAX_LAYERS),
            d_ff=size("n_inner", 4 * d_model),
            ffn=GPT2_ACTIVATIONS[activation], norm="layernorm", pos_emb="learned",
            tie_weights=setting("tie_word_embeddings", True), bias=True,
            norm_eps=float(setting("layer_norm_epsilon", 1e-5, above=0)))
    if not isinstance(kind, str) or kind not in ROPE_FAMILY_DEFAULTS:
        raise UserError(f"config.json: model_type={kind!r} is not supported; pico-llm imports "
                        + ", ".join(["gpt2", *ROPE_FAMILY_DEFAULTS]))
    defaults = ROPE_FAMILY_DEFAULTS[kind]
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method") if isinstance(
            hf["quantization_config"], dict) else None
        raise UserError(f"config.json: quantization_config (quant_method={method!r}) is not "
                        "supported; pico-llm reads unquantized weights (use a bf16 or fp32 copy)")
    setting("hidden_act", "silu", ("silu",))
    # at most MAX_LAYERS, as --n_blocks: SmolLM3's and GPT-oss's settings below are lists with
    # an entry a block, made before anything else reads the count
    d_model, n_heads = size("hidden_size"), size("num_attention_heads")
    n_blocks = size("num_hidden_layers", at_most=MAX_LAYERS)
    n_kv_heads = size("num_key_value_heads", n_heads)
    head_dim = size("head_dim", defaults["head_dim"] or d_model // n_heads)
    if n_heads % n_kv_heads:
        raise UserError(f"config.json: {n_heads} heads with {n_kv_heads} key/value heads has "
                        "no pico-llm equivalent")
    if head_dim % 2:
        raise UserError(f"config.json: RoPE needs an even head size, got {head_dim}")
    fields = dict(
        vocab_size=size("vocab_size"),
        block_size=size("max_position_embeddings", at_most=MAX_BLOCK_SIZE),
        d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, n_blocks=n_blocks,
        head_size=0 if head_dim * n_heads == d_model else head_dim,
        d_ff=size("intermediate_size"), ffn="swiglu", norm="rmsnorm", pos_emb="rope",
        tie_weights=setting("tie_word_embeddings", defaults["tie_weights"]),
        norm_eps=float(setting("rms_norm_eps", defaults["norm_eps"], above=0)),
        **rope_from_hf(hf, defaults["rope_theta"]))
    if kind in ("qwen2", "qwen3", "smollm3"):  # their windows slide in other layers than GPT-oss's
        setting("use_sliding_window", False, (False,))
        if "sliding_attention" in setting("layer_types", []):
            raise UserError("config.json: layer_types with sliding_attention is not supported for "
                            f"{kind}; pico-llm slides only GPT-oss's alternating layers")
    if kind in ("llama", "smollm3"):
        fields["bias"] = setting("attention_bias", False)
        if setting("mlp_bias", False) != fields["bias"]:  # one bias switch for every linear
            raise UserError(f"config.json: attention_bias={fields['bias']} with mlp_bias="
                            f"{not fields['bias']} is not supported; pico-llm gives every "
                            "linear a bias or none")
    if kind == "smollm3":
        interval = size("no_rope_layer_interval", 4)
        every_interval = [int((i + 1) % interval != 0) for i in range(n_blocks)]
        rope_layers = setting("no_rope_layers", every_interval)  # 1 = the layer uses RoPE
        if rope_layers not in (every_interval, [1] * n_blocks):
            raise UserError(f"config.json: no_rope_layers={rope_layers} is not supported; "
                            f"pico-llm leaves out RoPE in every nope_interval-th block only")
        fields["nope_interval"] = 0 if all(rope_layers) else interval
    if kind == "qwen2":  # biased q, k and v; no other bias
        fields["qkv_bias"] = True
    if kind == "qwen3":
        setting("attention_bias", False, (False,))
        fields["qk_norm"] = True
    if kind == "gpt_oss":
        setting("attention_bias", True, (True,))
        setting("swiglu_alpha", 1.702, (1.702,))  # fixed in clamped_swiglu
        setting("swiglu_limit", 7.0, (7.0,))
        # left out: transformers' default window, 128; null: no window. The bound is far past
        # any context, and keeps the masks' integer arithmetic from overflowing
        window = 0 if hf.get("sliding_window", 128) is None else setting(
            "sliding_window", 128, integer=True, at_least=0, at_most=2**31 - 1)
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention"
                       for i in range(n_blocks)]
        layer_types = setting("layer_types", alternating)
        if not window or "sliding_attention" not in layer_types:
            window = 0
        elif layer_types != alternating:
            raise UserError(f"config.json: layer_types={layer_types} is not supported; "
                            "pico-llm's blocks 0, 2, 4, ... slide, blocks 1, 3, ... do not")
        n_experts = size("num_local_experts")
        fields.update(ffn="clamped_swiglu", bias=True, attention_sinks=True, sliding_window=window,
                      n_experts=n_experts,
                      experts_per_token=setting("num_experts_per_tok", integer=True, above=0,
                                                at_most=n_experts),
                      router_aux_loss_coef=float(setting("router_aux_loss_coef", 0.001,
                                                         at_least=0)))
    return TransformerConfig(**fields)


def rope_from_hf(hf: dict, default_theta: float) -> dict:
    """The RoPE fields of TransformerConfig from config.json: rope_parameters (transformers 5)
    or rope_theta and rope_scaling (older files). Scalings: linear, llama3 and yarn
    (rope_frequencies). dynamic (NTK) is the default RoPE up to max_position_embeddings, where
    a pico-llm model's context ends, so it imports as the default."""
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf_setting(hf, where, {})

    def setting(name, default=None, allowed=None, **bounds):
        return hf_setting(rope, name, default, allowed, prefix=f"{where}.", **bounds)

    kind = setting("rope_type", setting("type", "default"))
    theta = (setting("rope_theta", above=0) if rope.get("rope_theta") is not None  # as --rope_theta
             else hf_setting(hf, "rope_theta", default_theta, above=0))
    fields = dict(rope_theta=float(theta))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor is not None and factor != 1.0:                      # null: the default, 1
        raise UserError("config.json: partial_rotary_factor is not supported; pico-llm rotates "
                        "whole heads")
    fixed = {"default": {}, "dynamic": {}, "linear": {},
             "llama3": dict(low_freq_factor=1.0, high_freq_factor=4.0),
             "yarn": dict(beta_fast=32.0, beta_slow=1.0, attention_factor=None, mscale=None,
                          mscale_all_dim=None)}
    if kind not in fixed:
        raise UserError(f"config.json: rope_type={kind!r} (RoPE scaling) is not supported; "
                        "pico-llm computes " + ", ".join(fixed))
    for name, value in fixed[kind].items():
        if rope.get(name) not in (None, value):
            raise UserError(f"config.json: {kind} RoPE with {name}={rope[name]!r} is not "
                            f"supported (pico-llm computes {name}={value})")
    if kind in ("default", "dynamic"):
        return fields
    factor = setting("factor", at_least=1)  # as --yarn_factor
    truncated = kind == "yarn" and setting("truncate", True)
    return fields | dict(
        rope_scaling="yarn_truncated" if truncated else kind, yarn_factor=float(factor),
        yarn_original_context=setting("original_max_position_embeddings",
                                      hf.get("max_position_embeddings") or 4096,
                                      integer=True, above=0))


def rope_to_hf(config: TransformerConfig) -> dict:
    """rope_parameters for config.json: the inverse of rope_from_hf."""
    if config.yarn_factor == 1.0:
        return dict(rope_type="default", rope_theta=config.rope_theta)
    kind = config.rope_scaling.removesuffix("_truncated")
    extra = {"linear": {},
             "llama3": dict(low_freq_factor=1.0, high_freq_factor=4.0),
             "yarn": dict(beta_fast=32.0, beta_slow=1.0,
                          truncate=config.rope_scaling == "yarn_truncated")}[kind]
    return dict(rope_type=kind, rope_theta=config.rope_theta, factor=config.yarn_factor,
                original_max_position_embeddings=config.yarn_original_context, **extra)


# What transformers' config classes assume for keys a config.json omits.
ROPE_FAMILY_DEFAULTS = {
    "llama": dict(tie_weights=False, norm_eps=1e-6, rope_theta=10000.0, head_dim=None),
    "qwen2": dict(tie_weights=False, norm_eps=1e-6, rope_theta=10000.0, head_dim=None),
    "qwen3": dict(tie_weights=False, norm_eps=1e-6, rope_theta=10000.0, head_dim=128),
    "smollm3": dict(tie_weights=True, norm_eps=1e-6, rope_theta=2000000.0, head_dim=None),
    "gpt_oss": dict(tie_weights=False, norm_eps=1e-5, rope_theta=150000.0, head_dim=64),
}

# What each transformers class computes, in pico-llm settings (None: any value). A family is
# chosen by the first of its marks a config has (hf_family); every other setting must then be
# the family's, or the config has no class.
ROPE_FAMILY = dict(pos_emb="rope", norm="rmsnorm", norm_position="pre", ffn="swiglu",
                   attention="softmax", n_experts=0, attention_sinks=False, sliding_window=0,
                   qk_norm=False, qkv_bias=False, nope_interval=0, value_embeddings=False,
                   unet_skips=False, logit_softcap=0.0)
# GPT-2's activation_function values and the feed-forwards they are: "gelu_new" (what GPT-2
# was trained with) and "gelu_pytorch_tanh" are the tanh approximation, "gelu" the exact form.
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
GPT2_ACTIVATION_OF = {"gelu": "gelu_new", "gelu_exact": "gelu"}      # what an export writes
HF_FAMILIES = {
    "gpt2": ROPE_FAMILY | dict(pos_emb="learned", norm="layernorm", ffn=None, bias=True,
                               yarn_factor=1.0, head_size=0),
    "gpt_oss": ROPE_FAMILY | dict(ffn="clamped_swiglu", n_experts=None, attention_sinks=True,
                                  bias=True, sliding_window=None),
    "qwen3": ROPE_FAMILY | dict(qk_norm=True, bias=False),
    "qwen2": ROPE_FAMILY | dict(qkv_bias=True, bias=False),
    "smollm3": ROPE_FAMILY | dict(nope_interval=None),
    "llama": ROPE_FAMILY,
}
HF_FAMILY_MARKS = (("gpt2", "pos_emb", "learned"), ("gpt_oss", "n_experts", None),
                   ("qwen3", "qk_norm", True), ("qwen2", "qkv_bias", True),
                   ("smollm3", "nope_interval", None))


def hf_family(config: TransformerConfig) -> str:
    """The model_type of the transformers class that computes this config; UserError naming
    the first setting that no class computes."""
    family = next((name for name, field, mark in HF_FAMILY_MARKS
                   if getattr(config, field) == mark or (mark is None and getattr(config, field))),
                  "llama")
    for name, value in HF_FAMILIES[family].items():
        if value is not None and getattr(config, name) != value:
            raise UserError(f"--export_hf: {name}={getattr(config, name)} has no transformers "
                            f"class: this model exports as {family}, which needs {name}={value}")
    if family == "gpt2" and config.ffn not in GPT2_ACTIVATION_OF:
        raise UserError(f"--export_hf: ffn={config.ffn} has no transformers class: this model "
                        f"exports as gpt2, which needs ffn={' or '.join(GPT2_ACTIVATION_OF)}")
    if family == "gpt2" and config.n_kv_heads != config.n_heads:
        raise UserError(f"--export_hf: n_kv_heads={config.n_kv_heads} has no transformers class: "
                        "GPT-2 has no grouped-query attention")
    return family


def config_to_hf(config: TransformerConfig, eot_id: int | None = None,
                 stop_ids: Iterable[int] = ()) -> dict:
    """The config.json of a pico-llm Transformer; eot_id becomes bos, eos and padding (which
    some classes, SmolLM3's, would otherwise take to be an id of their released vocabulary);
    an imported chat model's further stop ids follow it in the eos_token_id list."""
    family = hf_family(config)
    eos = [eot_id, *sorted(stop_ids)] if stop_ids else eot_id
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_weights,
                  bos_token_id=eot_id, eos_token_id=eos, pad_token_id=eot_id, dtype="float32")
    if family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=config.d_model,
                    n_head=config.n_heads, n_layer=config.n_blocks, n_inner=config.d_ff,
                    n_positions=config.block_size,
                    activation_function=GPT2_ACTIVATION_OF[config.ffn],
                    layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout,
                    embd_pdrop=config.dropout, attn_pdrop=config.dropout, **common)
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                    "gpt_oss": "GptOssForCausalLM"}[family]
    hf = dict(model_type=family, architectures=[architecture], hidden_size=config.d_model,
              num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
              head_dim=config.head_dim, num_hidden_layers=config.n_blocks,
              intermediate_size=config.d_ff, hidden_act="silu",
              max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
              rope_theta=config.rope_theta,  # transformers 4 reads this, 5 rope_parameters
              rope_parameters=rope_to_hf(config), attention_dropout=config.dropout, **common)
    if family in ("llama", "smollm3"):
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    if family in ("qwen2", "qwen3", "smollm3"):
        hf.update(use_sliding_window=False)
    if family == "smollm3":
        hf.update(no_rope_layer_interval=config.nope_interval,
                  no_rope_layers=[int(config.uses_rope(i)) for i in range(config.n_blocks)])
    if family == "gpt_oss":
        hf.update(attention_bias=True, num_local_experts=config.n_experts,
                  num_experts_per_tok=config.experts_per_token, swiglu_limit=7.0,
                  router_aux_loss_coef=config.router_aux_loss_coef,
                  # transformers' GPT-oss builds a sliding mask whatever its layers: without a
                  # window, one as long as the context (it refuses none; no layer reads it)
                  sliding_window=config.sliding_window or config.block_size,
                  layer_types=["sliding_attention" if config.window(i) else "full_attention"
                               for i in range(config.n_blocks)])
    return hf


# --- E.2 Weights: one table per family --------------------------------------------------
# Rows: (pico-llm name, Hugging Face name, layout). The layouts:
#   copy      the same tensor.
#   conv1d    GPT-2 stores its linear layers as Conv1D modules, whose weight is (in, out):
#             the transpose of nn.Linear's (out, in).
#   c_attn:i  GPT-2 computes q, k and v with one Conv1D, c_attn, of width 3 d_model: its
#             weight's columns are [q | k | v] (after the transpose, rows), and part i is
#             one of pico-llm's three projections.
#   rope:q/k  Both apply the same rotations, but to different pairs of dimensions: pico-llm
#             rotates adjacent dims (2i, 2i+1) of each head (section 1), Hugging Face's
#             Llama dims (i, i + D/2) ("rotate_half"). Pair i turns at the same frequency in
#             both, so permuting the rows of q_proj and k_proj within each head turns one
#             model into the other: HF row r * D/2 + i becomes pico-llm row 2i + r.
#             Attention scores are dot products of q and k, which the shared permutation
#             leaves unchanged, so v and the output projection are copied as they are.
#   rope:norm Qwen3's query and key norms act on one head's D dims before the rotation:
#             their gains take the same permutation, as one head.
#   gate_up:i GPT-oss keeps a layer's E experts in 3-D tensors applied as x @ W + b:
#             gate_up_proj (E, d_model, 2 d_ff) holds gate and up columns interleaved
#             (gate 0, up 0, gate 1, ...); part i (0 gate = w1, 1 up = w3) of expert e is
#             every other column, transposed to nn.Linear's (out, in).
#   experts   down_proj (E, d_ff, d_model): expert e's w2, transposed.
# A weight's bias (where the model has biases) follows the same row with "bias" (GPT-oss's
# expert biases: "_bias"); {e} in a row stands for each expert.

GPT2_TABLE = (
    [("token_embedding.weight", "transformer.wte.weight", "copy"),
     ("position_embedding.weight", "transformer.wpe.weight", "copy"),
     ("final_norm.weight", "transformer.ln_f.weight", "copy"),
     ("unembedding.weight", "lm_head.weight", "copy")],
    "transformer.h.{}.",
    [("attention_norm.weight", "ln_1.weight", "copy"),
     ("attention.q_proj.weight", "attn.c_attn.weight", "c_attn:0"),
     ("attention.k_proj.weight", "attn.c_attn.weight", "c_attn:1"),
     ("attention.v_proj.weight", "attn.c_attn.weight", "c_attn:2"),
     ("attention.out_proj.weight", "attn.c_proj.weight", "conv1d"),
     ("ffn_norm.weight", "ln_2.weight", "copy"),
     ("ffn.w1.weight", "mlp.c_fc.weight", "conv1d"),
     ("ffn.w2.weight", "mlp.c_proj.weight", "conv1d")])

LLAMA_TOP = [("token_embedding.weight", "model.embed_tokens.weight", "copy"),
             ("final_norm.weight", "model.norm.weight", "copy"),
             ("unembedding.weight", "lm_head.weight", "copy")]
LLAMA_ATTENTION = [
    ("attention_norm.weight", "input_layernorm.weight", "copy"),
    ("attention.q_proj.weight", "self_attn.q_proj.weight", "rope:q"),
    ("attention.k_proj.weight", "self_attn.k_proj.weight", "rope:k"),
    ("attention.v_proj.weight", "self_attn.v_proj.weight", "copy"),
    ("attention.out_proj.weight", "self_attn.o_proj.weight", "copy"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "copy")]
LLAMA_MLP = [("ffn.w1.weight", "mlp.gate_proj.weight", "copy"),   # SwiGLU: w2(silu(w1 x) * w3 x)
             ("ffn.w3.weight", "mlp.up_proj.weight", "copy"),
             ("ffn.w2.weight", "mlp.down_proj.weight", "copy")]
LLAMA_TABLE = (LLAMA_TOP, "model.layers.{}.", LLAMA_ATTENTION + LLAMA_MLP)
QWEN3_TABLE = (LLAMA_TOP, "model.layers.{}.", LLAMA_ATTENTION + LLAMA_MLP + [
    ("attention.q_norm.weight", "self_attn.q_norm.weight", "rope:norm"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight", "rope:norm")])
GPT_OSS_TABLE = (LLAMA_TOP, "model.layers.{}.", LLAMA_ATTENTION + [
    ("attention.sinks", "self_attn.sinks", "copy"),
    ("ffn.router.weight", "mlp.router.weight", "copy"),
    ("ffn.experts.{e}.w1.weight", "mlp.experts.gate_up_proj", "gate_up:0"),
    ("ffn.experts.{e}.w3.weight", "mlp.experts.gate_up_proj", "gate_up:1"),
    ("ffn.experts.{e}.w2.weight", "mlp.experts.down_proj", "experts")])
WEIGHT_TABLES = {"gpt2": GPT2_TABLE, "llama": LLAMA_TABLE, "qwen2": LLAMA_TABLE,
                 "smollm3": LLAMA_TABLE, "qwen3": QWEN3_TABLE, "gpt_oss": GPT_OSS_TABLE}

# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, old RoPE caches).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def pico_tensors(config: TransformerConfig) -> dict[str, torch.Tensor]:
    """The state dict of a pico-llm Transformer for `config`, on the meta device (shapes only)."""
    with torch.device("meta"):
        return TransformerModel(config).state_dict()


def bias_row(row: tuple[str, str, str]) -> tuple[str, str, str]:
    pico_name, hf_name, layout = row
    hf_bias = (hf_name.removesuffix("weight") + "bias" if hf_name.endswith(".weight")
               else hf_name + "_bias")                     # GPT-oss: gate_up_proj_bias
    return pico_name.removesuffix("weight") + "bias", hf_bias, layout


def name_map(config: TransformerConfig) -> list[tuple[str, str, str]]:
    """(pico-llm name, HF name, layout) for every tensor this config's model stores once;
    an expert's layout ends with its index (gate_up:0:3 is expert 3's gate)."""
    top, block_prefix, block = WEIGHT_TABLES[hf_family(config)]
    block = [(pico_name.format(e=e), hf_name, f"{layout}:{e}" if "{e}" in pico_name else layout)
             for pico_name, hf_name, layout in block
             for e in (range(config.n_experts) if "{e}" in pico_name else [None])]
    rows = top + [(f"blocks.{i}.{pico_name}", block_prefix.format(i) + hf_name, layout)
                  for i in range(config.n_blocks) for pico_name, hf_name, layout in block]
    rows += [bias_row(row) for row in rows]
    present = pico_tensors(config)
    return [row for row in rows if row[0] in present
            and not (config.tie_weights and row[0] == "unembedding.weight")]


def rope_rows_to_pico(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * D, ...) rows in HF's order -> pico-llm's: row 2i + r of a head is HF row r * D/2 + i."""
    return tensor.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def rope_rows_to_hf(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rope_rows_to_pico."""
    return tensor.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)


def rope_heads(part: str, config: TransformerConfig) -> int:
    return {"q": config.n_heads, "k": config.n_kv_heads, "norm": 1}[part]


def to_pico(tensor: torch.Tensor, layout: str, config: TransformerConfig) -> torch.Tensor:
    """One HF tensor (for c_attn and experts, the whole stacked one) -> the pico-llm tensor
    of `layout`."""
    kind, _, part = layout.partition(":")
    if kind in ("conv1d", "c_attn") and tensor.dim() == 2:
        tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in); biases stay as they are
    if kind == "c_attn":
        return tensor.chunk(3)[int(part)]
    if kind == "rope":
        return rope_rows_to_pico(tensor, rope_heads(part, config))
    if kind in ("gate_up", "experts"):
        *half, expert = part.split(":")
        tensor = tensor[int(expert)]                            # (d_model, 2 d_ff) or (2 d_ff,)
        if kind == "gate_up":
            tensor = tensor[..., int(half[0])::2]
        return tensor.t() if tensor.dim() == 2 else tensor      # x @ W -> Linear (out, in)
    return tensor


def to_hf(tensor: torch.Tensor, layout: str, config: TransformerConfig) -> torch.Tensor:
    """One pico-llm tensor -> its HF layout (for c_attn and experts, the part to join)."""
    kind, _, part = layout.partition(":")
    if kind == "rope":
        return rope_rows_to_hf(tensor, rope_heads(part, config))
    if kind in ("conv1d", "c_attn", "gate_up", "experts") and tensor.dim() == 2:
        return tensor.t()
    return tensor


def join_hf(parts: list[torch.Tensor], layout: str) -> torch.Tensor:
    """The parts of one HF tensor, in table order, as that tensor: c_attn's q, k, v side by
    side; GPT-oss's experts stacked, gate_up's E gates then E ups interleaved."""
    kind = layout.partition(":")[0]
    if kind == "c_attn":
        return torch.cat(parts, dim=-1)
    if kind == "gate_up":
        experts = len(parts) // 2
        gates, ups = torch.stack(parts[:experts]), torch.stack(parts[experts:])
        return torch.stack([gates, ups], dim=-1).flatten(-2)    # (E, ..., 2 d_ff)
    if kind == "experts":
        return torch.stack(parts)
    return parts[0]


def state_dict_to_hf(config: TransformerConfig, pico_state: dict) -> dict[str, torch.Tensor]:
    """pico-llm state dict -> HF state dict (contiguous tensors; a tied unembedding is left
    out, as transformers saves it)."""
    parts: dict[str, tuple[str, list]] = {}
    for pico_name, hf_name, layout in name_map(config):
        tensor = to_hf(pico_state[pico_name].detach(), layout, config)
        parts.setdefault(hf_name, (layout, []))[1].append(tensor)
    return {name: join_hf(tensors, layout).contiguous()
            for name, (layout, tensors) in parts.items()}


def check_hf_shapes(config: TransformerConfig, shapes: dict[str, tuple]) -> None:
    """UserError naming the first tensor of a checkpoint (name -> shape) that is missing, has
    the wrong shape, or has no place in the model."""
    expected = state_dict_to_hf(config, pico_tensors(config))
    for name, tensor in expected.items():
        if name not in shapes:
            raise UserError(f"the checkpoint has no tensor {name}, which config.json implies")
        if tuple(shapes[name]) != tuple(tensor.shape):
            raise UserError(f"checkpoint tensor {name} has shape {tuple(shapes[name])}; "
                            f"config.json implies {tuple(tensor.shape)}")
    unknown = [name for name in shapes if name not in expected
               and not name.endswith(IGNORED_SUFFIXES)
               and not (config.tie_weights and name == "lm_head.weight")]
    if unknown:
        raise UserError(f"checkpoint tensor {unknown[0]} has no place in a pico-llm Transformer "
                        f"({len(unknown)} such tensors)")


def gpt2_names(config: TransformerConfig, names):
    """Files saved by older transformers omit GPT-2's "transformer." prefix: name -> full name."""
    if hf_family(config) != "gpt2":
        return {name: name for name in names}
    full_names = {name: name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
                  for name in names}
    if len(set(full_names.values())) < len(full_names):   # the later would replace the earlier
        name = next(name for name in full_names if name != full_names[name]
                    and full_names[name] in full_names)
        raise UserError(f"the model's weights hold {full_names[name]} twice, also as {name}; "
                        "download or export the model again")
    return full_names


def state_dict_from_hf(config: TransformerConfig, hf_state: dict) -> dict[str, torch.Tensor]:
    """HF state dict -> pico-llm state dict in float32; UserError naming the first tensor
    that is missing, has the wrong shape, or has no place in the model."""
    hf_state = {full: hf_state[name] for name, full in gpt2_names(config, hf_state).items()}
    check_hf_shapes(config, {name: tensor.shape for name, tensor in hf_state.items()})
    pico_state = {pico_name: to_pico(hf_state[hf_name].float(), layout, config).contiguous()
                  for pico_name, hf_name, layout in name_map(config)}
    if config.tie_weights:
        pico_state["unembedding.weight"] = pico_state["token_embedding.weight"]
        # some exporters write the tied output layer too: it must be the embedding
        written = hf_state.get("lm_head.weight")
        if written is not None and not torch.equal(written.float(), pico_state["unembedding.weight"]):
            raise UserError("config.json ties the output layer to the embedding "
                            "(tie_word_embeddings), but the weights hold an lm_head.weight of its "
                            "own; set tie_word_embeddings to false in config.json to use it")
    return pico_state


# --- E.3 Model directories and the hub -----------------------------------------------------

def read_json_object(file: Path) -> dict:
    """A JSON file of a model directory that must hold an object, as a dict."""
    try:
        document = load_json(file)
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deeply
        raise UserError(f"cannot read {quoted(file)}: {error}".splitlines()[0]) from None
    if not isinstance(document, dict):
        raise UserError(f"{quoted(file)} is not a JSON object")
    return document


def check_not_a_broken_link(file: Path) -> None:
    """UserError for a file of a model directory that is a symbolic link to nothing, as the
    Hugging Face cache's snapshots are links into its blobs, rather than "no such file"."""
    if file.is_symlink() and not file.exists():         # exists() follows the link
        raise UserError(f"{quoted(file)} is a symbolic link to nothing (broken, or a loop); "
                        "download the model again, or put the file there")


def read_hf_config(path: Path) -> dict:
    """config.json of a Hugging Face model directory, as a dict."""
    config = path / "config.json"
    check_not_a_broken_link(config)
    if not config.exists():
        raise UserError(f"{quoted(path)} has no config.json; expected a Hugging Face model "
                        "directory")
    if not config.is_file():     # a folder, or a pipe that would block the read
        raise UserError(f"{quoted(config)} is not a regular file; expected a Hugging Face "
                        "model's config.json")
    return read_json_object(config)


def shard_files(path: Path) -> list[Path]:
    """The shards model.safetensors.index.json names (its weight_map: tensor name -> file).
    Each must be a file name, so that nothing outside the model directory is read (no
    directories, no ".."), and a regular file: a pipe would block the read forever."""
    index = path / "model.safetensors.index.json"
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) for shard in weight_map.values()):
        raise UserError(f"{quoted(index)} has no weight_map from tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if shard in ("", "..") or Path(shard).name != shard:
            raise UserError(f"{quoted(index)} names the shard {shard!r}, which is not a file name; "
                            "shards lie beside the index")
        check_not_a_broken_link(path / shard)
        if not (path / shard).is_file():
            raise UserError(f"{quoted(index)} names the shard {shard!r}, which is missing or not a "
                            "regular file")
    return [path / shard for shard in shards]


def hf_weight_files(path: Path) -> list[Path]:
    """The weight files of a model directory: model.safetensors, its shards, or
    pytorch_model.bin, looked for in transformers' order (one model.safetensors wins over a
    shard index beside it)."""
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        files = shard_files(path)
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            check_not_a_broken_link(path / name)
            if (path / name).exists():                   # a folder, a pipe
                raise UserError(f"{quoted(path / name)} is not a regular file; give the model's "
                                "weights as a file")
        raise UserError(f"{quoted(path)} has no model.safetensors or pytorch_model.bin")
    return files


def check_tensors_new(seen: dict[str, Path], file: Path, names) -> None:
    """UserError if a tensor of `file` was in an earlier file of the model's (`seen`: name ->
    its file, to which `names` are added): the later copy would replace it, silently, and the
    model be another than its index describes."""
    for name in names:
        if name in seen:
            raise UserError(f"tensor {name} is in both {quoted(seen[name].name)} and "
                            f"{quoted(file.name)}; download or export the model again")
        seen[name] = file


def read_hf_shapes(path: Path) -> dict[str, tuple] | None:
    """name -> shape of every tensor of a model directory, from the safetensors headers alone
    (a little-endian 8-byte length, then that many bytes of JSON), so that a model is checked
    before gigabytes are read; None for pytorch_model.bin, which has no header."""
    shapes, seen = {}, {}
    for file in hf_weight_files(path):
        if file.suffix == ".bin":
            return None
        try:
            with open(file, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if length > file.stat().st_size - 8:
                    raise ValueError("not a safetensors file (its header is longer than it)")
                if length > MAX_JSON_FILE_BYTES:
                    raise ValueError(f"its header is {memory_size(length)} of JSON")
                header = json_value(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("not a safetensors file (its header is no JSON object)")
            found = {name: tuple(entry["shape"]) for name, entry in header.items()
                     if name != "__metadata__"}
        except (OSError, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as error:   # RecursionError: a header nested too deep
            if isinstance(error, PermissionError):   # the file is whole: another download won't do
                raise UserError(f"cannot read {quoted(file)}: {error.strerror}; check its "
                                "permissions") from None
            reason = (str(error) or type(error).__name__).splitlines()[0]
            raise UserError(f"cannot read {quoted(file)}: {reason[:160]}; download or export "
                            "the model again") from None
        check_tensors_new(seen, file, found)
        shapes.update(found)
    return shapes


# The weights' types pico-llm reads (cast to float32); float8, integer or boolean weights are
# quantized ones, which a cast would read as nonsense
READABLE_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_hf_tensors(file: Path, tensors) -> None:
    """What a weight file holds must be named tensors (not, say, a training checkpoint with
    the state dict nested inside) of a type in READABLE_WEIGHT_DTYPES, dense and with values
    (a pickle may hold sparse or meta tensors), and finite (a NaN would only show as NaN
    logits)."""
    if not isinstance(tensors, dict):
        raise UserError(f"{quoted(file)} holds a Python {type(tensors).__name__}, not a dict of "
                        "tensor names to tensors")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise UserError(f"{quoted(file)} holds a Python {type(tensor).__name__} under "
                            f"{name!r}, not a tensor; it must be a flat dict of tensor names to "
                            "tensors (a state dict)")
        if name.endswith(IGNORED_SUFFIXES):  # buffers, not weights (GPT-2's mask may be bool)
            continue
        if tensor.dtype not in READABLE_WEIGHT_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise UserError(f"{quoted(file)}: tensor {name} is {dtype}; pico-llm reads float16, "
                            "bfloat16, float32 and float64 weights (use a bf16 or fp32 copy)")
        if tensor.layout != torch.strided or tensor.is_meta:
            kind = "a meta tensor (a shape, no values)" if tensor.is_meta else tensor.layout
            raise UserError(f"{quoted(file)}: tensor {name} is {kind}, not a dense tensor of "
                            "values; use the weights as save_pretrained writes them")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{quoted(file)}: tensor {name} holds NaN or infinite values; the "
                            "model is broken (use another copy of its weights)")


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (pytorch_model.bin is loaded with weights_only, which
    runs no code from the file), checked by check_hf_tensors."""
    tensors, seen = {}, {}
    for file in hf_weight_files(path):
        try:
            if file.suffix == ".bin":
                loaded = load_weights_only(file)
            else:
                safetensors = hf_package("safetensors.torch", "reading model.safetensors")
                loaded = safetensors.load_file(file)
        except UserError:
            raise
        except Exception as error:  # missing shards, truncated files: many error types
            raise UserError(f"cannot read {quoted(file)}: {weights_file_failure(error, file)}"
                            ) from None
        check_hf_tensors(file, loaded)
        check_tensors_new(seen, file, loaded)
        tensors.update(loaded)
    return tensors


def weights_file_failure(error: Exception, file: Path) -> str:
    """Why a model directory's weights file could not be read, in a few words."""
    if isinstance(error, PermissionError):
        return f"{error.strerror}; check its permissions"
    if file.suffix == ".bin":   # a pickle, read by load_weights_only
        culprit = blocked_callable(str(error))
        return (f"unpickling it would call {culprit}, which runs code, so it was not loaded"
                if culprit else f"{unpickling_failure(error, file)}; download or export the "
                "model again")
    detail = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return (f"not a whole safetensors file, truncated or damaged ({textwrap.shorten(detail, 100)});"
            " download or export the model again")


def load_hf_weights(path: Path, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """The pico-llm state dict of a model directory whose config.json gave `config`; the
    tensors' names and shapes are checked from the headers before any is read."""
    shapes = read_hf_shapes(path)
    if shapes is not None:
        check_hf_shapes(config, {gpt2_names(config, shapes)[name]: shape
                                 for name, shape in shapes.items()})
    return state_dict_from_hf(config, read_hf_weights(path))


def load_hf_directory(path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """A Hugging Face model directory -> (TransformerConfig, pico-llm state dict)."""
    path = Path(path)
    config = config_from_hf(read_hf_config(path))
    return config, load_hf_weights(path, config)


def import_hf(path) -> tuple[TransformerModel, object]:
    """(model, tokenizer) from a Hugging Face model directory."""
    config, state = load_hf_directory(path)
    tokenizer = tokenizer_from_hf(path, config)
    model = TransformerModel(config)
    model.load_state_dict(state)
    return model, tokenizer


def hub_fallback(spec: str) -> str:
    return (f"download it once where there is network (hf download {quoted(spec)} config.json "
            f"model.safetensors tokenizer.json --local-dir DIR) and pass --init_from DIR")


# A hub id is org/name: two names joined by one slash, each starting with a letter or digit.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_init_from(spec: str) -> Path:
    """--init_from: a local Hugging Face model directory, or a hub id fetched into the hub
    cache. What exists is a path. What does not is a hub id only where it cannot be a path
    one meant: org/name (HUB_ID; so no leading ./, / or ~, no second slash) with no
    directory org here; anything else is a missing path, refused as one. Without network a
    hub id fails within seconds naming the directory form."""
    path = Path(spec)   # ~ expanded already (user_path)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"--init_from {quoted(spec)} is a file; pass a model directory or a hub id")
    if path.is_symlink():
        raise UserError(f"--init_from {quoted(spec)} is a symbolic link to nothing (broken, or a "
                        "loop); pass a model directory or a hub id")
    if not HUB_ID.fullmatch(spec) or Path(spec.split("/")[0]).exists():
        raise UserError(f"--init_from {quoted(spec)}: no such directory (a hub id has the form "
                        "org/name, such as Qwen/Qwen3-0.6B)")
    if not huggingface_hub_reachable():
        raise UserError(f"--init_from {quoted(spec)}: no such directory, and the Hugging Face hub "
                        f"is unreachable; {hub_fallback(spec)}")
    hub = hf_package("huggingface_hub", f"--init_from {quoted(spec)} (a hub id)")
    try:  # safetensors only: hub repos often hold the same weights in several formats
        return Path(hub.snapshot_download(
            spec, allow_patterns=["config.json", "tokenizer.json", "model*.safetensors*"]))
    except Exception as error:  # the hub raises many types (unknown repo, gated, network)
        reason = (str(error) or type(error).__name__).splitlines()[0]
        raise UserError(f"--init_from {quoted(spec)}: {reason}; {hub_fallback(spec)}") from None


# --- E.4 Tokenizers ------------------------------------------------------------------------
# A model's ids mean what its tokenizer made them mean. An imported GPT-2 uses
# pico-llm's own GPT-2 tokenizer (the same 50257 ids); any other model brings its
# tokenizer.json, read by the `tokenizers` package behind pico-llm's interface. On
# export, pico-llm's tokenizers are written as tokenizer.json (byte-level BPE, GPT-2's
# format) giving the same ids.

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character, so that a
    vocabulary of byte strings can be written as JSON text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(others)) for b in range(256)}


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTES = {char: byte for byte, char in BYTE_CHARS.items()}


def byte_text(token: bytes) -> str:
    return "".join(BYTE_CHARS[b] for b in token)


def byte_level_bpe(vocab: dict[int, bytes], merges, special_ids: dict[str, int]):
    """A `tokenizers` byte-level BPE (GPT-2's format) with pico-llm's ids and merges."""
    tokenizers = hf_package("tokenizers", "--export_hf")
    specials = set(special_ids.values())
    # reversed: when two ids hold the same bytes, the smaller one wins, as in pico-llm
    texts = {byte_text(token): i for i, token in sorted(vocab.items(), reverse=True)
             if i not in specials}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={**texts, **special_ids},  # special tokens keep their ids
        merges=[(byte_text(a), byte_text(b)) for a, b in merges]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True)
                                  for token in special_ids])
    return tokenizer


def tokenizer_to_hf(tokenizer):
    """pico-llm tokenizer -> `tokenizers.Tokenizer` giving the same ids."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab, merges = gpt2_vocab_and_merges(GPT2_RANKS_PATH)
    elif isinstance(tokenizer, ByteTokenizer):
        vocab, merges = {b: bytes([b]) for b in range(256)}, []
    elif isinstance(tokenizer, TrainedBPETokenizer):
        vocab, merges = tokenizer.bpe.vocab, tokenizer.bpe.merges
    else:
        raise UserError(f"tokenizer {tokenizer.name} has no Hugging Face export")
    return byte_level_bpe(vocab, merges, {END_OF_TEXT: tokenizer.eot_id})


def rust_failure(error: BaseException) -> bool:
    """Whether `error`, raised inside the `tokenizers` library, is the library's failure: a
    plain Exception, of no subclass (a file or text it cannot take), or a Rust panic (damage
    it did not foresee), which pyo3 raises as a PanicException derived from BaseException, so
    that `except Exception` lets it through. Others (an OverflowError for a negative id) are
    pico-llm's mistakes, left to say so."""
    return type(error) is Exception or type(error).__name__ == "PanicException"


@contextlib.contextmanager
def tokenizer_failures(what: str, remedy: str):
    """A failure of the `tokenizers` library in the block as UserError("`what` (its words);
    `remedy`"). Rust's panic hook has written the panic to standard error already: the
    probe in HFTokenizer.__init__ keeps those lines back where a tokenizer.json is read."""
    try:
        yield
    except BaseException as error:
        if not rust_failure(error):
            raise
        raise UserError(f"{what} ({textwrap.shorten(str(error), 100)}); {remedy}") from None


# Text a tokenizer.json is tried on as it is read: each kind of character a corpus holds.
PROBE_TEXT = "The cat sat. 42 + 7 = 49!\n\t\"Naïve café\" — 日本語 🙂"


def check_tokenizer_runs(tokenizer) -> None:
    """ValueError if a tokenizer.json panics on plain text (an edited normalizer, a damaged
    precompiled character map): the library would do so on the first text it took. Its panic
    hook's lines, written to the process's standard error, are kept back, so that the refusal
    is one line (and with them whatever else reached standard error meanwhile: nothing runs
    beside it this early). A plain error (a word-level vocabulary without an unknown token) is
    left to the text it fails on, which encode_batch names."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        try:
            saved = os.dup(2)
            os.dup2(held.fileno(), 2)
        except OSError:               # no standard error to redirect (closed): try it as is
            saved = None
        panic = None
        try:
            tokenizer.decode(tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids)
        except Exception:             # left to the text it fails on
            pass
        except BaseException as error:
            if not rust_failure(error):
                raise
            panic = error
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
        if panic is not None:
            raise ValueError(f"its tokenizer fails on plain text: "
                             f"{textwrap.shorten(str(panic), 100)}")
        held.seek(0)
        written = memoryview(held.read() if saved is not None else b"")
        with contextlib.suppress(OSError):     # what the library wrote without failing, as it came
            while written:
                written = written[os.write(2, written):]


class HFTokenizer:
    """A tokenizer.json (Hugging Face `tokenizers`) behind pico-llm's tokenizer interface.
    Like pico-llm's tokenizers, encode adds no BOS token. vocab_size is the model's
    (embedding tables are often padded beyond the tokenizer's ids)."""

    def __init__(self, tokenizer, vocab_size: int, eot_id: int, name: str,
                 stop_ids: Iterable[int] = (), cut: bool | None = None) -> None:
        decoders = hf_package("tokenizers", "a tokenizer.json").decoders
        # A tokenizer.json may keep the truncation and padding of a pipeline that saved it,
        # which would cut every text to its max_length and pad it with pad ids: pico-llm cuts
        # its texts into examples itself. `cut`: whether the file did (None: as it reads now;
        # a checkpoint keeps the tokenizer with them off, and says so)
        self.cut = cut if cut is not None else (tokenizer.truncation is not None
                                                or tokenizer.padding is not None)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        check_tokenizer_runs(tokenizer)
        self.tokenizer, self.vocab_size, self.eot_id, self.name = tokenizer, vocab_size, eot_id, name
        # the further end ids config.json and generation_config.json list (a chat model's
        # end of turn): generation stops at them too; eot_id alone separates documents
        self.stop_ids = frozenset(stop_ids) - {eot_id}
        # Token caches' key: each example ends in eot_id. The ids of a file that cut its texts
        # are whole now; ":uncut" keeps them from the caches of cut ids made before.
        self.fingerprint = f"{name}:{eot_id}" + (":uncut" if self.cut else "")
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)

    @classmethod
    def from_json(cls, text: str, vocab_size: int, eot_id: int, name: str,
                  stop_ids: Iterable[int] = (), cut: bool = False) -> "HFTokenizer":
        tokenizers = hf_package("tokenizers", "a tokenizer.json")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except BaseException as error:    # the Rust library raises a plain Exception, or panics
            if not rust_failure(error):
                raise
            raise ValueError(f"not a tokenizer.json ({error})") from None
        return cls(tokenizer, vocab_size, eot_id, name, stop_ids, cut)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # A WordLevel vocabulary without its unknown token cannot encode a word it lacks
        with tokenizer_failures(f"the model's tokenizer.json ({self.name}) cannot encode this "
                                "text", "use a model whose tokenizer covers it"):
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        with self.decoding():
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decoding(self):
        """A failure of the library as it decodes, as one line (tokenizer_failures)."""
        return tokenizer_failures(f"the model's tokenizer.json ({self.name}) cannot decode its "
                                  "ids", "use the model's own tokenizer.json")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one id stands for. Byte-level BPE: a character per byte
        (BYTE_CHARS). SentencePiece: "▁" is a space, "<0x0A>" a byte."""
        token = self.tokenizer.id_to_token(token_id) or ""   # None past the tokenizer's ids
        if self.byte_level:
            return bytes(CHAR_BYTES.get(char, 0x3F) for char in token)   # "?" for a stray one
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            return bytes([int(token[3:5], 16)])
        return token.replace("▁", " ").encode("utf-8")

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for (0 for special tokens), for bits per byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        specials = {i for i, token in self.tokenizer.get_added_tokens_decoder().items()
                    if token.special}
        for i in self.tokenizer.get_vocab(with_added_tokens=False).values():
            if i not in specials:
                lengths[i] = len(self.token_bytes(i))
        return lengths


def check_tokenizer_covers(tokenizer: HFTokenizer, texts: list[str], tokens: np.ndarray,
                           offsets: np.ndarray) -> None:
    """Whether a tokenizer.json kept every character of `texts`, whose ids (each example's
    ending in eot) tokenize_examples just made: a note if it dropped some, a refusal if it
    dropped most. `tokenizers`' BPE without byte fallback drops a character it has no token
    for, silently, or makes it <unk>, as lost. The check decodes each text's ids (special
    tokens kept: <|im_start|> in a chat text is one token) and counts the characters the text
    has and the decoding has not, both NFKC-normalized (Qwen's tokenizer composes accents)
    and white space aside (SentencePiece's decoders strip a leading space)."""
    lost = Counter()
    for start in range(0, len(texts), 256):        # a few texts' ids at a time as lists
        ids = [tokens[offsets[i]: offsets[i + 1] - 1].tolist()
               for i in range(start, min(start + 256, len(texts)))]
        with tokenizer.decoding():
            decoded = tokenizer.tokenizer.decode_batch(ids, skip_special_tokens=False)
        for text, back in zip(texts[start: start + 256], decoded):
            lost.update(Counter(unicodedata.normalize("NFKC", text))
                        - Counter(unicodedata.normalize("NFKC", back)))
    lost = Counter({character: n for character, n in lost.items() if not character.isspace()})
    if not lost:
        return
    count, total = sum(lost.values()), sum(len(text) for text in texts)
    share = (f"{count:,} of the text's {total:,} characters ({count / total:.1%}; e.g. "
             + ", ".join(repr(character) for character, _ in lost.most_common(5)) + ")")
    if count > total / 2:
        raise UserError(f"the model's tokenizer.json has no token for {share}: it does not cover "
                        "this text; fine-tune a model with a byte-level tokenizer (GPT-2's, Llama "
                        "3's, Qwen's), or train from scratch with --tokenizer gpt2 or bpe:N")
    warn(f"pico-llm: note: the model's tokenizer.json has no token for {share}; training leaves "
         "them out")


def eos_token_ids(eos, where: str) -> list[int]:
    """An eos_token_id of a model directory's JSON (an id, a list of them, or null) as a list;
    UserError where one is no integer (2.0, "2", true)."""
    listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if any(type(i) is not int for i in listed):
        raise UserError(f"{where}'s eos_token_id {eos!r} is not a token id; give it the model's "
                        "end-of-text id (an integer, or a list of them)")
    return listed


def generation_stop_ids(path: Path) -> list[int]:
    """The eos_token_id of generation_config.json, where the model directory has one, as a
    list: the ids transformers' generate stops at (Qwen's chat models list the end of turn
    there and the end of text too; their config.json names one). A file that cannot be read
    is left out with a note, as transformers leaves it out; an id that is no integer is
    refused."""
    file = path / "generation_config.json"
    if not (file.exists() or file.is_symlink()):
        return []
    try:
        check_not_a_broken_link(file)
        if not file.is_file():     # a folder, or a pipe that would block the read
            raise UserError(f"{quoted(file)} is not a regular file")
        eos = read_json_object(file).get("eos_token_id")
    except UserError as error:
        warn(f"pico-llm: note: {error}; generation stops at config.json's end-of-text ids "
             "alone")
        return []
    return eos_token_ids(eos, quoted(file))


def tokenizer_from_hf(path, config: TransformerConfig):
    """The tokenizer of a Hugging Face model directory: pico-llm's own GPT-2 tokenizer when
    the vocabulary and end-of-text id are GPT-2's, otherwise tokenizer.json through
    `tokenizers`; UserError if none fits the model. config.json's eos_token_id (or its first,
    where it lists several) ends each document; generation stops at it and at every further
    id config.json or generation_config.json lists."""
    path = Path(path)
    file = path / "tokenizer.json"
    # Llama 3's chat models list three ids
    listed = eos_token_ids(read_hf_config(path).get("eos_token_id"), quoted(path / "config.json"))
    eos = listed[0] if listed else None
    stop_ids = {i for i in listed + generation_stop_ids(path)   # others are never drawn
                if 0 <= i < config.vocab_size}
    gpt2_ends = config.vocab_size == 50257 and eos in (None, 50256) and stop_ids <= {50256}
    check_not_a_broken_link(file)
    if file.is_dir() or (file.exists() and not file.is_file()):
        raise UserError(f"{quoted(file)} is not a file (a directory, pipe or device); move it "
                        "away, or put the model's tokenizer.json there")
    if not file.is_file():
        if config.vocab_size == 50257 and hf_family(config) == "gpt2":
            if not gpt2_ends:
                ends = sorted(stop_ids | ({eos} - {None}))
                raise UserError(f"{quoted(path)} has no tokenizer.json, and its end-of-text ids "
                                f"{ends} are not GPT-2's 50256 alone; put the model's "
                                "tokenizer.json there")
            return GPT2Tokenizer()
        what = (f"its {config.vocab_size}-token vocabulary is not GPT-2's 50257"
                if config.vocab_size != 50257 else      # GPT-2's is the one tokenizer built in
                f"it is a {hf_family(config)} model, not GPT-2")
        raise UserError(f"{quoted(path)} has no tokenizer.json, and {what}; put the model's "
                        "tokenizer.json there")
    tokenizers = hf_package("tokenizers", "a tokenizer.json")
    try:
        check_json_size(file)
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except BaseException as error:  # tokenizers raises a bare Exception on bad files, or panics
        if not (isinstance(error, (OSError, ValueError)) or rust_failure(error)):
            raise
        raise UserError(f"cannot read {quoted(file)}: "
                        f"{(str(error).splitlines() or [type(error).__name__])[0][:160]}") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if gpt2_ends and len(vocab) == 50257 and vocab == {
            byte_text(token): rank for token, rank in load_tiktoken_ranks(GPT2_RANKS_PATH).items()
            } | {END_OF_TEXT: 50256}:
        return GPT2Tokenizer()  # the same ids, through tiktoken (faster); ends and stops at 50256
    if not vocab:
        raise UserError(f"{quoted(file)} has an empty vocabulary; give the model's own "
                        "tokenizer.json")
    if max(vocab.values()) >= config.vocab_size:
        raise UserError(f"{quoted(file)} has ids up to {max(vocab.values())}, but the model "
                        f"embeds only {config.vocab_size} tokens")
    eot_id = eos if eos is not None else vocab.get(END_OF_TEXT, vocab.get("</s>"))
    if eot_id is None:
        raise UserError(f"{quoted(path)}: config.json has no usable eos_token_id ({eos!r}) and "
                        f"{quoted(file)} no {END_OF_TEXT} or </s>")
    if not 0 <= eot_id < config.vocab_size:
        source = ("config.json's eos_token_id" if eot_id == eos else
                  f"{quoted(file)}'s end-of-text token")
        raise UserError(f"{quoted(path)}: the end-of-text id {eot_id} ({source}) is not among "
                        f"the model's {config.vocab_size} token ids; give config.json the "
                        "eos_token_id of the model's tokenizer")
    try:
        return HFTokenizer(tokenizer, config.vocab_size, eot_id,
                           "hf:" + hashlib.sha256(file.read_bytes()).hexdigest()[:12], stop_ids)
    except ValueError as error:
        raise UserError(f"cannot use {quoted(file)}: {error}; give the model's own "
                        "tokenizer.json") from None


# --- E.5 Export ------------------------------------------------------------------------------

# The longest file name most file systems hold, in bytes; export_hf's staging directory adds
# 10 to the export's name (a dot before, a dot and mkdtemp's 8 characters after).
NAME_MAX = 255


def check_export_directory(directory: Path) -> None:
    """Export writes a new directory (or fills an empty one), never over anything, under a
    name the tokenizers package can write (it takes paths as UTF-8) and the file system holds."""
    try:
        str(directory).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"--export_hf {quoted(directory)} is not valid UTF-8; choose a UTF-8 "
                        "name") from None
    if len(os.fsencode(directory.name)) + 10 > NAME_MAX:
        raise UserError(f"--export_hf {quoted(directory)}: the name {directory.name[:20]!r}... is "
                        f"longer than the {NAME_MAX - 10} bytes an export's name may have; "
                        "choose a shorter one")
    try:
        exists = directory.exists()
    except OSError as error:  # a directory on the way with too long a name
        raise UserError(f"--export_hf {quoted(directory)}: {error.strerror}; choose another "
                        "directory") from None
    if directory.is_symlink():   # the export's directory is renamed into place: over a link
        raise UserError(f"--export_hf {quoted(directory)} is a symbolic link; give the "
                        "directory itself, or a new one")        # it fails, after training
    if exists and not directory.is_dir():
        raise UserError(f"--export_hf {quoted(directory)} is a file, not a directory; choose a "
                        "new directory")
    if exists and any(directory.iterdir()):
        raise UserError(f"--export_hf {quoted(directory)} already exists and is not empty; "
                        "choose a new directory")
    # The export is renamed into place: over `.` that fails (after training), and over the
    # current directory by its full name it leaves the shell in a deleted folder
    if exists and directory.resolve() == Path.cwd().resolve():
        raise UserError(f"--export_hf {quoted(directory)} is the current directory, which the "
                        "export would be renamed into the place of; choose a new directory")
    check_writable_directory(directory.parent, "--export_hf")


def check_export_apart_from(directory: Path, written: dict[str, list[Path]],
                            run_path: Path) -> None:
    """The export, written when training ends, needs its directory still new or empty then:
    not one that the run writes into (per flag, the folders it writes files in), nor one
    holding them, nor one of the names it writes there (the run log and the files beside it,
    named after it; a checkpoint; a cache file), which would be taken when the export comes."""
    target = directory.resolve()
    for flag, folders in written.items():
        resolved = [folder.resolve() for folder in folders]
        if any(target == folder or target in folder.parents for folder in resolved):
            raise UserError(f"--export_hf {quoted(directory)} would hold the files this run writes "
                            f"for {flag}; give the export a directory of its own")
        if flag == "--artefacts_dir":     # the run log, and the files named after it
            taken = target.parent in resolved and (target.name == run_path.name or
                                                   target.name.startswith(run_path.stem + "."))
        else:                             # a model's checkpoints, the token cache: any name
            taken = target.parent in resolved
        if taken:
            raise UserError(f"--export_hf {quoted(directory)} is among the names this run writes "
                            f"for {flag}; give the export a directory of its own")


def export_hf(model: TransformerModel, tokenizer, directory) -> Path:
    """Write config.json, model.safetensors and (with a tokenizer) tokenizer.json and
    tokenizer_config.json into a new directory, atomically: a hidden temporary directory
    beside it, renamed at the end, so a failure leaves nothing half-written."""
    directory = Path(directory)
    check_export_directory(directory)
    config = model.config
    hf_config = config_to_hf(config, tokenizer.eot_id if tokenizer is not None else None,
                             getattr(tokenizer, "stop_ids", ()))
    save_file = hf_package("safetensors.torch", "--export_hf").save_file
    hf_state = {name: tensor.to("cpu", torch.float32).contiguous()
                for name, tensor in state_dict_to_hf(config, model.state_dict()).items()}
    hf_tokenizer = tokenizer_to_hf(tokenizer) if tokenizer is not None else None
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(hf_state, staging / "model.safetensors", metadata={"format": "pt"})
        if hf_tokenizer is not None:
            hf_tokenizer.save(str(staging / "tokenizer.json"))
            eot = hf_tokenizer.id_to_token(tokenizer.eot_id)
            (staging / "tokenizer_config.json").write_text(json.dumps(dict(
                tokenizer_class="PreTrainedTokenizerFast", bos_token=eot, eos_token=eot,
                model_max_length=config.block_size, clean_up_tokenization_spaces=False),
                indent=2) + "\n")
        for file in staging.iterdir():   # safetensors writes its file private (0600)
            os.chmod(file, 0o666 & ~current_umask())
        # mkdtemp makes it private (0700); an empty directory given for it keeps its own mode,
        # less any that would lock its owner out of the export
        os.chmod(staging, (directory.stat().st_mode & 0o7777 | 0o700) if directory.is_dir()
                 else 0o777 & ~current_umask())
        os.rename(staging, directory)  # over an empty directory at most
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.chmod(staging, 0o700)   # its files can be removed whatever mode it was given
        shutil.rmtree(staging, ignore_errors=True)
        failure = os_error_of(error)   # safetensors and tokenizers raise their own types
        if failure is not None:
            raise cannot_write(f"--export_hf {quoted(directory)}", failure,
                               "choose another --export_hf directory") from None
        raise
    return directory


# --- E.6 The command line ----------------------------------------------------------------------
# --init_from replaces the --transformer_variant preset: config.json sets the whole
# architecture of the one model trained (--models transformer), so the flags that
# would change it (--d_model, --pos_emb, ...) are refused rather than ignored;
# --dropout, --attention_impl and --block_size (the training context, at most the
# model's positions) still apply. The tokenizer is
# the model's own; a --tokenizer that names another is refused. Checkpoints of the
# run carry the model's config and tokenizer, so --resume and --generate need
# neither the directory nor the hub again.

def validate_huggingface_args(args: argparse.Namespace) -> None:
    """The combinations --init_from and --export_hf accept (called by validate_args)."""
    for flag in ("init_from", "export_hf"):
        if getattr(args, flag) == "":
            raise UserError(f"--{flag} is empty; give a directory")
        if getattr(args, flag):  # checked now rather than after training
            for package in ("safetensors.torch", "tokenizers"):
                hf_package(package, f"--{flag}")
    own = [f"--{flag}" for flag in ("init_from", "export_hf") if getattr(args, flag)]
    other = [f"--{flag}" for flag in ("accounting", "sweep", "custom_sweep_log",
                                      "collect_transformer_metrics") if getattr(args, flag)]
    if own and other:
        raise UserError(f"{other[0]} builds and reports on its own models; drop {own[0]}")
    if args.accounting and args.models not in (DEFAULT_MODELS.split(","), ["transformer"]):
        raise UserError(f"--accounting reports Transformers (--accounting {args.accounting}), not "
                        f"--models {','.join(args.models)}; drop --models")   # it had been ignored
    if args.init_from:
        if args.checkpoint:
            raise UserError("--init_from and --checkpoint both name the model to start from; "
                            "give one")
        if not args.generate and args.models != ["transformer"]:
            raise UserError(f"--init_from starts one model, the transformer; pass --models "
                            f"transformer (got {','.join(args.models)})")
        shape_flags = [flag for flag in TRANSFORMER_OVERRIDE_FLAGS
                       if flag != "dropout" and getattr(args, flag) is not None]
        if args.transformer_variant != build_arg_parser().get_default("transformer_variant"):
            shape_flags.insert(0, "transformer_variant")
        if shape_flags:
            raise UserError(f"--{shape_flags[0]} is --init_from's to set (its config.json gives "
                            f"the Transformer's shape); drop --{shape_flags[0]}")
    if args.export_hf:
        if args.generate:
            raise UserError("--generate writes no model; drop --export_hf (without --generate, "
                            "--checkpoint PATH --export_hf DIR exports a checkpoint)")
        if args.checkpoint and (args.resume is not None or args.save_dir):
            raise UserError("--checkpoint PATH --export_hf DIR exports without training; "
                            "drop --resume and --save_dir")
        if not (args.checkpoint or args.init_from):
            if "transformer" not in args.models:
                raise UserError("--export_hf writes the model named transformer; add it to "
                                f"--models (got {','.join(args.models)})")
            hf_family(transformer_config_from_flags(vars(args), "transformer"))


def check_tokenizer_fits(spec: str | None, tokenizer, source: str) -> None:
    """A --tokenizer given with --init_from must be the model's own: training or sampling
    with other ids would read embeddings learned for other tokens."""
    if spec is not None and spec != tokenizer.name:
        own = ("GPT-2's 50257 ids (--tokenizer gpt2)" if isinstance(tokenizer, GPT2Tokenizer)
               else f"the {tokenizer.vocab_size} ids of its own tokenizer.json")
        raise UserError(f"--tokenizer {quoted(spec)} does not fit --init_from {quoted(source)}: "
                        f"its weights learned {own}; drop --tokenizer")


def init_from_hf(config: Config, resumed: tuple[Path, dict] | None):
    """--init_from, for training: (config with the model's Transformer in place of the
    preset, its tokenizer, the model directory whose weights to load). Only config.json and
    the tokenizer are read here: main() checks that the model fits in memory before
    load_hf_weights reads it. Resuming, the pico-llm checkpoint holds the config and
    tokenizer, and its weights are loaded later with the optimizer's state, so the directory
    returned is None and the Hugging Face model is not read again."""
    spec, flags = config.huggingface.init_from, config.flags
    path = None
    if resumed is not None and "transformer_config" in resumed[1]:
        _, tokenizer, transformer = checkpoint_contents(*resumed)
    else:
        path = resolve_init_from(spec)
        transformer = config_from_hf(read_hf_config(path))
        tokenizer = tokenizer_from_hf(path, transformer)
    check_tokenizer_fits(config.data.tokenizer, tokenizer, spec)
    if config.data.block_size > transformer.block_size:
        raise UserError(f"--block_size {config.data.block_size} exceeds the "
                        f"{transformer.block_size} positions of --init_from {quoted(spec)}")
    transformer = dataclasses.replace(transformer, attention_impl=flags["attention_impl"],
                                      dropout=flags["dropout"] or 0.0)
    models = dataclasses.replace(config.models, transformer=transformer)
    return dataclasses.replace(config, models=models), tokenizer, path


def check_models_named(config: Config, own: str, where: str) -> None:
    """--models, where given, must name the model `where` holds."""
    named = config.models.names
    if own not in named and named != DEFAULT_MODELS.split(","):
        raise UserError(f"{where} holds model {own}, which --models {','.join(named)} does not "
                        "name; drop --models")


def check_checkpoint_named(config: Config, tokenizer, trained: Config, where: str,
                           command: str) -> None:
    """--generate or --export_hf from a checkpoint: the flags given for its tokenizer, model
    and shape must be the ones it was trained with (it is taken as trained)."""
    if config.data.tokenizer not in (None, tokenizer.name):
        raise UserError(f"--tokenizer {config.data.tokenizer} does not fit {where}, whose "
                        f"model was trained with --tokenizer {tokenizer.name}; drop --tokenizer")
    check_model_flags_fit(config, trained.flags, trained.models.names[0], where, command)
    check_models_named(config, trained.models.names[0], where)


def check_fits_to_sample(config, vocab_size: int, what: str, remedy: str) -> None:
    """Refuse, before they are read, a model's weights (`config`'s, counted without building
    it) that do not fit in memory in float32: 4 bytes a parameter, as they are loaded on the
    CPU first (--generate --init_from; --generate and --export_hf from a checkpoint)."""
    available = memory_available(torch.device("cpu"))
    parameters = parameter_count(config, vocab_size)
    if available is not None and 4 * parameters > available:
        raise UserError(f"{what} needs about {memory_size(4 * parameters)} ({parameters:,} "
                        f"parameters in float32), more than the {memory_size(available)} of "
                        f"memory here; {remedy}")


def run_export(config: Config) -> int:
    """--checkpoint PATH --export_hf DIR: write a checkpoint's Transformer in Hugging Face
    format, without training."""
    directory, path = Path(config.huggingface.export_hf), Path(config.checkpoints.checkpoint)
    check_export_directory(directory)
    model, tokenizer, trained = model_from_checkpoint(path, "--checkpoint")
    check_checkpoint_named(config, tokenizer, trained, f"--checkpoint {quoted(path)}",
                           "--export_hf")
    if not isinstance(model, TransformerModel):
        raise UserError(f"--checkpoint {quoted(path)} holds no Transformer "
                        f"({type(model).__name__}); --export_hf writes Transformers")
    written = export_hf(model, tokenizer, directory)
    note_flags_not_read(config, "--checkpoint with --export_hf", NOT_READ_BY_GENERATE)
    print(f"Hugging Face model written to {written}")
    return 0


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is interrupted_while_starting:
        # A torchrun rank keeps the default (ending at once): torchrun sends SIGTERM to clean
        # up after a failed rank, and a rank held in a collective would not see it for long.
        signal.signal(signal.SIGTERM, raise_terminated if launched_world_size() == 1
                      else signal.SIG_DFL)
    if HANGUP and signal.getsignal(HANGUP) is interrupted_while_starting:  # nohup: ignored
        signal.signal(HANGUP, raise_terminated if launched_world_size() == 1 else signal.SIG_DFL)
    status = main()
    # Done, and said so: a Ctrl-C still arriving (a key held down) must not break into the
    # interpreter's shutdown with a traceback from an exit handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if HANGUP and signal.getsignal(HANGUP) is raise_terminated:
        signal.signal(HANGUP, signal.SIG_DFL)
    exit_process(status)


