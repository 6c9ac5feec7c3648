"""Robustness: bad input is refused with one line (exit 2) and writes nothing; runs claim
their files; caches heal; checkpoints are checked; failures come before training.

Grouped by the kind of robustness each test pins down. Each bad-input test asserts: exit
status 2, exactly one line on stderr, no traceback, and no file added, removed or changed.
"""

import copy
import dataclasses
import errno
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SCRIPT, run_script

HANG_TIMEOUT = 60          # a command that should fail at once but hangs fails the test instead
MEMORY_LIMIT = 4 << 30     # address-space cap for runs that would otherwise eat all memory

TINY = ["--models", "lstm_seq", "--embed_size", "16", "--tokenizer", "char", "--block_size", "16",
        "--epochs", "1", "--max_steps_per_epoch", "2", "--batch_size", "4", "--max_new_tokens", "4",
        "--device_id", "cpu", "--quiet"]
TINY_TRANSFORMER = ["--models", "transformer", "--d_model", "16", "--n_heads", "2", "--n_blocks", "1"]


# --- shared helpers: "one-line error, exit 2, nothing written" -----------------------------

class Snapshot:
    """Every file (recursively, dot-files included) under some directories, with size and
    modification time, so a test can assert that a refused command wrote nothing."""

    def __init__(self, *directories: Path) -> None:
        self.directories = [Path(d) for d in directories]
        self.files = self.take()

    def take(self) -> dict:
        files = {}
        for directory in self.directories:
            if directory.is_dir():
                for path in directory.rglob("*"):
                    if path.is_file() or path.is_symlink():
                        stat = path.lstat()
                        files[str(path)] = (stat.st_size, stat.st_mtime_ns)
            elif directory.exists():
                stat = directory.lstat()
                files[str(directory)] = (stat.st_size, stat.st_mtime_ns)
        return files

    def changes(self) -> list[str]:
        now = self.take()
        return ([f"new {p}" for p in sorted(now.keys() - self.files.keys())]
                + [f"removed {p}" for p in sorted(self.files.keys() - now.keys())]
                + [f"changed {p}" for p in sorted(now.keys() & self.files.keys())
                   if now[p] != self.files[p]])


def describe(result) -> str:
    """What the command did, for assertion messages."""
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode("utf-8", "replace")
    out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    elapsed = getattr(result, "elapsed", None)
    return (f"exit {result.returncode}"
            + (f" after {elapsed:.1f} s" if elapsed is not None else "")
            + f"; stderr {len(lines)} line(s), first {lines[0] if lines else ''!r}"
            + (f", last {lines[-1]!r}" if len(lines) > 1 else "")
            + f"; stdout tail {out.strip()[-200:]!r}")


def text_of(stream) -> str:
    return stream if isinstance(stream, str) else stream.decode("utf-8", "replace")


def assert_refused(result, *keywords, unchanged: Snapshot | None = None) -> str:
    """Exit status 2, exactly one line on stderr, no traceback, every keyword in that line
    (a tuple keyword: any one of its words), and nothing written under `unchanged`'s
    directories. Returns the line."""
    info = describe(result)
    err = text_of(result.stderr)
    assert "Traceback" not in err, info
    assert result.returncode == 2, info
    lines = err.strip().splitlines()
    assert len(lines) == 1, info
    line = lines[0].lower()
    for keyword in keywords:
        choices = keyword if isinstance(keyword, tuple) else (keyword,)
        assert any(choice.lower() in line for choice in choices), f"{choices} not in: {info}"
    if unchanged is not None:
        assert unchanged.changes() == [], info
    return lines[0]


def run(*argv, timeout=HANG_TIMEOUT, prefix=(), **kwargs):
    """run_script, timed; a hang fails the test rather than blocking it. With kwargs
    (bytes arguments, preexec_fn, a command prefix) it calls the script the same way itself."""
    started = time.perf_counter()
    try:
        if prefix or kwargs or any(isinstance(a, bytes) for a in argv):
            args = [*map(os.fsencode, prefix), os.fsencode(sys.executable), os.fsencode(str(SCRIPT)),
                    *(a if isinstance(a, bytes) else os.fsencode(str(a)) for a in argv)]
            result = subprocess.run(args, cwd=REPO, capture_output=True, timeout=timeout, **kwargs)
        else:
            result = run_script(*map(str, argv), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: no exit within {timeout} s (pico-llm.py {' '.join(map(str, argv))})")
    result.elapsed = time.perf_counter() - started
    return result


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def trained_before_failing(result) -> bool:
    """Whether the run got as far as building a model (run without --quiet)."""
    return "parameters" in text_of(result.stdout) or "test loss" in text_of(result.stdout)


class Workspace:
    """A private corpus, artefacts dir, cache dir and save dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corpus = root / "corpus.txt"
        words = "the cat sat on a mat and the dog ran far away in the sun".split()
        self.corpus.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(8))
                                         for i in range(40)) + "\n", encoding="utf-8")
        self.art, self.cache, self.save = root / "artefacts", root / "cache", root / "ckpt"

    def io(self, *, corpus=True) -> list[str]:
        files = ["--input_files", str(self.corpus)] if corpus else []
        return [*files, "--artefacts_dir", str(self.art), "--cache_dir", str(self.cache)]

    def snapshot(self) -> Snapshot:
        return Snapshot(self.art, self.cache, self.save)


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path)


def committed_sweep_file(name: str) -> Path:
    """A full-scale sweep file shipped with the repository (artefacts/ or a subfolder)."""
    for path in sorted((REPO / "artefacts").rglob(f"sweep_{name}.json")):
        if json.loads(path.read_text(encoding="utf-8")).get("scale") == "full":
            return path
    pytest.skip(f"no committed full-scale sweep_{name}.json under artefacts/")


def ok(result):
    assert result.returncode == 0, describe(result)
    return result


# --- resume: the same command plus --resume --------------------------------------------------

@pytest.mark.slow
def test_bare_resume_with_run_name_continues_the_run(ws):
    """A run killed after step 3 of 4 (its newest checkpoint deleted, as kill -9 before
    the step-4 checkpoint would leave it) continues with the same command plus --resume."""
    command = [*TINY, "--epochs", "2", *ws.io(), "--run_name", "r1", "--save_dir", str(ws.save),
               "--checkpoint_every", "1"]
    ok(run(*command, timeout=300))
    (ws.save / "lstm_seq" / "step_000004.pt").unlink()
    result = run(*command, "--resume", timeout=300)
    assert result.returncode == 0, describe(result)
    assert (ws.save / "lstm_seq" / "step_000004.pt").exists()
    assert json.loads((ws.art / "r1.json").read_text())["status"] == "finished"


def test_bare_resume_with_run_name_continues_the_run_in_process(run_main, ws):
    command = [*TINY, "--epochs", "2", "--input_files", str(ws.corpus), "--run_name", "r1",
               "--save_dir", str(ws.save), "--checkpoint_every", "1"]
    assert run_main(*command, artefacts=ws.art)[0] == 0
    (ws.save / "lstm_seq" / "step_000004.pt").unlink()
    status, _, err = run_main(*command, "--resume", artefacts=ws.art)
    assert status == 0, err
    assert (ws.save / "lstm_seq" / "step_000004.pt").exists()
    assert json.loads((ws.art / "r1.json").read_text())["status"] == "finished"


# --- concurrent runs claim their files -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("shared", ["run_name", "save_dir"])
def test_two_runs_started_together_do_not_share_files(ws, shared):
    commands = []
    for index in range(2):
        name = "same" if shared == "run_name" else f"run{index}"
        save = ws.save if shared == "save_dir" else ws.root / f"ckpt{index}"
        commands.append([sys.executable, str(SCRIPT), *TINY, *ws.io(), "--run_name", name,
                         "--save_dir", str(save)])
    processes = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in commands]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    statuses = sorted(r.returncode for r in results)
    info = " | ".join(describe(r) for r in results)
    assert statuses == [0, 2], info
    loser = next(r for r in results if r.returncode == 2)
    assert_refused(loser, ("already", "in use", "another run", "locked"))


def test_a_run_is_refused_while_another_process_holds_its_save_dir(run_main, ws):
    ws.save.mkdir()
    hold = ("import fcntl, os, sys, time; handle = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(handle, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(ws.save)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = ws.snapshot()
        status, _, err = run_main(*TINY, "--input_files", str(ws.corpus), "--save_dir",
                                  str(ws.save), artefacts=ws.art)
    finally:
        holder.kill()
        holder.wait()
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "in use by another pico-llm run" in lines[0], err
    assert before.changes() == []


def test_a_claim_is_exclusive_and_a_directory_made_for_it_goes_if_nothing_was_written(pico, tmp_path):
    save = tmp_path / "new" / "ckpt"
    with pico.claim_directory(save, "--save_dir"):
        assert save.is_dir()
        with pytest.raises(pico.UserError, match="--save_dir .* is in use by another pico-llm run"):
            with pico.claim_directory(save, "--save_dir"):
                pass
    assert not (tmp_path / "new").exists()       # no lock file, no directory left behind
    with pico.claim_directory(save, "--save_dir"):
        (save / "step_000001.pt").write_bytes(b"")
    assert [p.name for p in save.iterdir()] == ["step_000001.pt"]
    with pico.claim_directory(save, "--save_dir"):   # free again once the claim ends
        pass


def test_a_new_run_log_is_created_only_where_none_exists(pico, tmp_path):
    path = tmp_path / "same.json"
    first, second = (pico.RunLog(path, {"epochs": epochs}, torch.device("cpu"), {})
                     for epochs in (1, 2))
    first.start(create=True)
    with pytest.raises(pico.UserError, match="same.json already exists: another run"):
        second.start(create=True)
    assert json.loads(path.read_text())["args"] == {"epochs": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]   # no temporary file left
    second.start(create=False)                                      # a resumed run carries it on
    assert json.loads(path.read_text())["args"] == {"epochs": 2}


def test_run_logs_are_created_exclusively_without_hard_links_too(pico, tmp_path, monkeypatch):
    def no_hard_links(source, target):
        raise PermissionError(1, "Operation not permitted")   # what FAT answers

    monkeypatch.setattr(os, "link", no_hard_links)
    path = tmp_path / "same.json"
    pico.atomic_create_bytes(path, b"first\n")
    with pytest.raises(FileExistsError):
        pico.atomic_create_bytes(path, b"second\n")
    assert path.read_bytes() == b"first\n" and [p.name for p in tmp_path.iterdir()] == ["same.json"]


# --- a sweep never replaces another scale's or other data's sweep file -----------------------

def test_tiny_sweep_does_not_replace_a_full_scale_sweep_file(ws):
    ws.art.mkdir()
    shutil.copy2(committed_sweep_file("custom_data"), ws.art / "sweep_custom_data.json")
    before = ws.snapshot()
    result = run("--sweep", "custom_data", "--sweep_scale", "tiny", "--custom_sweep_sizes", "3",
                 "--device_id", "cpu", *ws.io(corpus=False), timeout=300)
    assert_refused(result, "sweep_custom_data.json", unchanged=before)


# --- only regular files are read -------------------------------------------------------------

def test_fifo_as_input_file_is_refused(ws):
    fifo = ws.root / "fifo.txt"
    os.mkfifo(fifo)
    before = ws.snapshot()
    assert_refused(run(*TINY, *ws.io(corpus=False), "--input_files", str(fifo)),
                   str(fifo.name), unchanged=before)


def test_fifo_as_checkpoint_is_refused(ws):
    fifo = ws.root / "fifo.pt"
    os.mkfifo(fifo)
    before = ws.snapshot()
    assert_refused(run("--generate", "--checkpoint", str(fifo), "--device_id", "cpu", *ws.io()),
                   str(fifo.name), unchanged=before)


def test_dev_zero_as_input_file_is_refused(ws):
    before = ws.snapshot()
    result = run(*TINY, *ws.io(corpus=False), "--input_files", "/dev/zero", preexec_fn=limit_memory)
    assert_refused(result, "/dev/zero", unchanged=before)


@pytest.mark.skipif(not os.access("/proc/kmsg", os.R_OK), reason="only root may read /proc/kmsg")
def test_a_kernel_file_that_waits_for_data_is_not_waited_on(ws):
    """/proc/kmsg is a regular file by its type, but a read waits for the kernel's next message.
    With none queued it is refused at once, in one line; with some queued they are read (and
    taken from the queue, as any reader of it takes them) like any text. Either way the run
    ends: before, it waited forever."""
    before = ws.snapshot()
    result = run(*TINY, *ws.io(corpus=False), "--input_files", "/proc/kmsg")
    if result.returncode != 0:
        assert_refused(result, "/proc/kmsg", "waits for data", unchanged=before)
    else:                                       # messages were queued: read and trained on
        assert "run log written to" in result.stdout


# --- one line instead of a traceback ---------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2 ** 70)])
def test_seed_out_of_range_is_one_line(ws, seed):
    before = ws.snapshot()
    assert_refused(run(*TINY, *ws.io(), "--seed", seed), "--seed", unchanged=before)


def test_prompt_with_invalid_utf8_is_one_line(ws):
    before = ws.snapshot()
    result = run(*TINY, *ws.io(), "--prompt", b"abc\xff")
    assert_refused(result, "--prompt", unchanged=before)


def test_transformer_block_size_too_large_is_refused_before_training(ws):
    before = ws.snapshot()
    result = run(*[a for a in TINY if a != "--quiet"], *TINY_TRANSFORMER, "--block_size", "1000000000",
                 *ws.io(), preexec_fn=limit_memory, timeout=300)
    line = assert_refused(result, "block_size", unchanged=before)
    assert "1000000000" in line.replace(",", "").replace("_", ""), line
    assert not trained_before_failing(result), describe(result)


def test_kgram_k_too_large_is_refused_before_training(ws):
    before = ws.snapshot()
    result = run("--models", "kgram_mlp_seq", "--kgram_k", "1000000", "--block_size", "1000001",
                 "--tokenizer", "char", "--epochs", "1", "--max_steps_per_epoch", "2",
                 "--batch_size", "4", "--device_id", "cpu", *ws.io(), preexec_fn=limit_memory,
                 timeout=300)
    line = assert_refused(result, "kgram_k", unchanged=before)
    assert "1000000" in line.replace(",", "").replace("_", ""), line
    assert not trained_before_failing(result), describe(result)


NESTED = b"[" * 20_000 + b"]" * 20_000     # pyarrow's JSON reader crashed on it (a segfault)


@pytest.mark.parametrize("kind", ["malformed_json", "non_utf8_txt", "nul_txt", "corrupt_parquet",
                                  "empty_jsonl", "directory", "nested_json", "nested_jsonl"])
def test_bad_tinystories_file_is_one_line(ws, kind):
    path = ws.root / {"malformed_json": "stories.json", "non_utf8_txt": "stories.txt",
                      "nul_txt": "stories.txt", "corrupt_parquet": "stories.parquet",
                      "empty_jsonl": "stories.jsonl", "directory": "stories.txt",
                      "nested_json": "stories.json", "nested_jsonl": "stories.jsonl"}[kind]
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes({"malformed_json": b'{"text": "Once upon a time", ',
                          "non_utf8_txt": b"Once upon a time\n\xff\xfe bad bytes\n",
                          "nul_txt": b"Once upon a time\n\x00\x01\x02 a binary part\n",
                          "corrupt_parquet": b"PAR1" + os.urandom(256), "empty_jsonl": b"",
                          "nested_json": b'{"text": ' + NESTED + b"}",
                          "nested_jsonl": b'{"text": "Once"}\n{"a": {"b": ' + NESTED + b"}}\n"}[kind])
    before = ws.snapshot()
    result = run(*TINY, *ws.io(corpus=False), "--tinystories_weight", "1.0",
                 "--tinystories_path", str(path), timeout=120)
    line = assert_refused(result, path.name, unchanged=before)
    assert "StopIteration" not in line


def test_non_utf8_input_file_is_one_line(ws):
    bad = ws.root / "bad.txt"
    bad.write_bytes(b"hello\n\xff\xfe world\n")
    before = ws.snapshot()
    assert_refused(run(*TINY, *ws.io(corpus=False), "--input_files", str(bad)), "bad.txt",
                   unchanged=before)


def test_checkpoint_missing_its_keys_is_one_line(ws):
    path = ws.root / "hollow.pt"
    torch.save({"format": "pico-llm checkpoint", "version": 1}, path)
    before = ws.snapshot()
    assert_refused(run("--generate", "--checkpoint", str(path), "--device_id", "cpu", *ws.io()),
                   "hollow.pt", unchanged=before)


def test_a_truncated_token_cache_is_rebuilt_in_process(pico, tmp_path, capsys):
    texts = ["the cat sat on the mat", "a dog ran far away"]
    first = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    tokens = next(tmp_path.glob("*.tokens.npy"))
    size = tokens.stat().st_size
    tokens.write_bytes(tokens.read_bytes()[: size // 2])
    again = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "token cache" in lines[0] and "rebuilding" in lines[0]
    assert list(again.tokens) == list(first.tokens) and tokens.stat().st_size == size


def test_a_truncated_bpe_cache_is_trained_again_in_process(pico, tmp_path, capsys):
    texts = [f"the quick brown fox number {i} jumps" for i in range(50)]
    first = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    merges = next(tmp_path.glob("bpe-*/merges.json"))
    text = merges.read_text()
    merges.write_text(text[: len(text) // 2])
    again = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "BPE cache" in lines[0]
    assert again.encode("number 7 jumps") == first.encode("number 7 jumps")
    assert merges.read_text() == text


def test_a_token_cache_whose_offsets_do_not_increase_is_rebuilt(pico, tmp_path, capsys):
    """Offsets of the right count and total but out of order would cut examples wrongly (and
    a stream's windows past their document): the cache is rebuilt, not used."""
    texts = ["the cat sat on the mat", "a dog ran far away", "and back"]
    first = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    offsets = next(tmp_path.glob("*.offsets.npy"))
    import numpy as np
    np.save(offsets, np.array([0, 30, 23, len(first.tokens)], dtype=np.int64))
    again = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "offsets do not increase" in lines[0] and "rebuilding" in lines[0]
    assert list(again.offsets) == list(first.offsets)


def test_a_token_cache_of_fewer_examples_than_the_texts_is_rebuilt(pico, tmp_path, capsys):
    """Offsets that join two examples into one (increasing, ending where the ids end, every
    example ending in the end of text) still hold one example fewer than there are texts."""
    texts = ["the cat sat on the mat", "a dog ran far away", "and back"]
    first = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    offsets = next(tmp_path.glob("*.offsets.npy"))
    import numpy as np
    np.save(offsets, np.delete(first.offsets, 1))
    again = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "sizes do not match" in lines[0] and "rebuilding" in lines[0]
    assert list(again.offsets) == list(first.offsets) and len(again) == 3


def test_a_token_cache_of_other_ids_in_the_same_shape_is_rebuilt(pico, tmp_path, capsys):
    """Ids overwritten in place (every one made "A", or one example's last) keep the sizes and
    the id range: each example's last id, the end of text, says they are not what was
    written."""
    texts = ["the cat sat on the mat", "a dog ran far away", "and back"]
    first = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    tokens = next(tmp_path.glob("*.tokens.npy"))
    import numpy as np
    for damaged in (np.full(len(first.tokens), 65, dtype=first.tokens.dtype),   # every id
                    first.tokens.copy()):
        if damaged[-1] != 65:          # the second: only the middle example's last id
            damaged[first.offsets[2] - 1] = 65
        np.save(tokens, damaged)
        again = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "do not each end in the end-of-text id" in lines[0]
        assert list(again.tokens) == list(first.tokens)


@pytest.mark.parametrize("bad_id", ["99999999", "-1", "300"])    # 300: one past the last id
def test_a_bpe_cache_with_ids_outside_its_vocabulary_is_trained_again(pico, tmp_path, capsys,
                                                                       bad_id):
    """An id beyond the vocabulary's size would make an embedding table of that size (100M
    rows: all the memory there is): the cache is trained again instead."""
    texts = [f"the quick brown fox number {i} jumps" for i in range(50)]
    first = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    vocab = next(tmp_path.glob("bpe-*/vocab.json"))
    entries = json.loads(vocab.read_text())
    last = max(entries, key=int)
    entries[bad_id] = entries.pop(last)
    vocab.write_text(json.dumps(entries))
    again = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "BPE cache" in lines[0] and "ids outside 0..299" in lines[0]
    assert again.vocab_size == first.vocab_size == 300


@pytest.mark.slow
def test_truncated_token_cache_is_rebuilt_with_a_note(ws):
    ok(run(*TINY, *ws.io(), "--run_name", "first", timeout=300))
    tokens = next(ws.cache.glob("*.tokens.npy"))
    size = tokens.stat().st_size
    tokens.write_bytes(tokens.read_bytes()[: size // 2])
    result = run(*TINY, *ws.io(), "--run_name", "second", timeout=300)
    assert result.returncode == 0, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cache" in lines[0] and "Traceback" not in result.stderr, describe(result)
    assert tokens.stat().st_size == size


@pytest.mark.slow
def test_truncated_bpe_cache_is_rebuilt_with_a_note(ws):
    command = [*TINY, "--tokenizer", "bpe:300", *ws.io()]
    ok(run(*command, "--run_name", "first", timeout=300))
    merges = next(ws.cache.glob("bpe-*/merges.json"))
    text = merges.read_text()
    merges.write_text(text[: len(text) // 2])
    result = run(*command, "--run_name", "second", timeout=300)
    assert result.returncode == 0, describe(result)
    lines = result.stderr.strip().splitlines()   # and, trained again, how many ids it has
    assert "cache" in lines[0] and "Traceback" not in result.stderr, describe(result)
    assert all(line.startswith("pico-llm: note: ") for line in lines), describe(result)
    json.loads(merges.read_text())


def test_truncated_sweep_file_is_refused_and_kept(ws):
    """Decision: a sweep file holds finished points (minutes to hours of work), so a
    corrupt one is refused with one line naming it, and left for the user to inspect or
    delete; it is never silently replaced."""
    ws.art.mkdir()
    text = committed_sweep_file("custom_data").read_text()
    (ws.art / "sweep_custom_data.json").write_text(text[: len(text) // 2])
    before = ws.snapshot()
    result = run("--sweep", "custom_data", "--sweep_scale", "tiny", "--custom_sweep_sizes", "3",
                 "--device_id", "cpu", *ws.io(corpus=False), timeout=300)
    assert_refused(result, "sweep_custom_data.json", unchanged=before)


# --- stale temporary files are removed -------------------------------------------------------

def plant(path: Path, age_s: float = 3600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_stale_temp_files_of_this_run_are_removed_on_start(ws):
    stale = [plant(ws.save / "lstm_seq" / ".step_000002.pt.k3j4h5g6.tmp"),
             plant(ws.art / ".r1.json.a1b2c3d4.tmp")]
    unrelated = [plant(ws.save / "lstm_seq" / "notes.txt"),
                 plant(ws.art / ".other_run.json.a1b2c3d4.tmp"),
                 plant(ws.art / "keep.tmp")]
    ok(run(*TINY, *ws.io(), "--run_name", "r1", "--save_dir", str(ws.save), timeout=300))
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in unrelated)


def test_only_the_temporary_files_of_the_named_target_are_removed(pico, tmp_path):
    removed = [".r1.json.a1b2c3d4.tmp", ".step_000002.pt.k3j4h5g6.tmp"]
    kept = [".r1.json.x.json.a1b2c3d4.tmp",   # run "r1.json.x", whose live writer may own it
            ".r10.json.a1b2c3d4.tmp", "r1.json", "step_000002.pt", "keep.tmp", "notes.txt"]
    for name in removed + kept:
        plant(tmp_path / name)
    pico.remove_stale_temporary_files(tmp_path, re.escape("r1.json"))
    pico.remove_stale_temporary_files(tmp_path, pico.CHECKPOINT_NAME.pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_young_temporary_file_may_be_a_live_writers_and_stays(pico, tmp_path):
    """Two runs started together with one --run_name: the one that creates the log first must
    not delete the other's temporary file mid-write (that one is then refused, in one line)."""
    young = plant(tmp_path / ".r1.json.a1b2c3d4.tmp", age_s=0)
    old = plant(tmp_path / ".r1.json.e5f6g7h8.tmp", age_s=2 * pico.LIVE_WRITE_S)
    pico.remove_stale_temporary_files(tmp_path, re.escape("r1.json"), older_than_s=pico.LIVE_WRITE_S)
    assert young.exists() and not old.exists()


@pytest.mark.slow
def test_stale_checkpoint_temp_files_are_removed_on_resume(ws):
    ok(run(*TINY, *ws.io(), "--save_dir", str(ws.save), timeout=300))
    stale = plant(ws.save / "lstm_seq" / ".step_000001.pt.zz9y8x7w.tmp")
    unrelated = plant(ws.save / "lstm_seq" / "notes.txt")
    ok(run(*TINY, *ws.io(), "--save_dir", str(ws.save), "--resume", timeout=300))
    assert not stale.exists()
    assert unrelated.exists()


# --- checkpoint integrity --------------------------------------------------------------------

def flip_a_weight_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data inside torch.save's zip
    (stored uncompressed; torch does not check the zip CRC, so only a checksum of our own notices it)."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename and
                     not i.filename.endswith("serialization_id")), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length = int.from_bytes(raw[entry.header_offset + 26: entry.header_offset + 28], "little")
    extra_length = int.from_bytes(raw[entry.header_offset + 28: entry.header_offset + 30], "little")
    start = entry.header_offset + 30 + name_length + extra_length
    raw[start + entry.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def trained_save_dir(tmp_path_factory):
    """A save dir with a 2-step run's checkpoints, trained once for the module."""
    trained = Workspace(tmp_path_factory.mktemp("trained"))
    ok(run(*TINY, *trained.io(), "--save_dir", str(trained.save), "--checkpoint_every", "1",
           timeout=300))
    return trained.save


@pytest.fixture
def two_checkpoints(ws, trained_save_dir):
    shutil.copytree(trained_save_dir, ws.save)
    newest = ws.save / "lstm_seq" / "step_000002.pt"
    assert newest.exists() and (ws.save / "lstm_seq" / "step_000001.pt").exists()
    flip_a_weight_byte(newest)
    return newest


def test_flipped_byte_in_checkpoint_is_refused_by_generate(ws, two_checkpoints):
    before = ws.snapshot()
    result = run("--generate", "--checkpoint", str(two_checkpoints), "--device_id", "cpu", *ws.io())
    assert_refused(result, "step_000002.pt", ("checksum", "corrupt", "integrity", "damaged"),
                   "step_000001.pt", unchanged=before)


def test_flipped_byte_in_checkpoint_is_refused_by_resume(ws, two_checkpoints):
    before = ws.snapshot()
    result = run(*TINY, *ws.io(), "--save_dir", str(ws.save), "--resume", timeout=300)
    assert_refused(result, "step_000002.pt", ("checksum", "corrupt", "integrity", "damaged"),
                   "step_000001.pt", unchanged=before)


def test_a_version_1_checkpoint_loads_with_a_note(pico, ws, two_checkpoints, capsys):
    older = ws.save / "lstm_seq" / "step_000001.pt"
    checkpoint = torch.load(older, weights_only=True)
    del checkpoint["sha256"]
    checkpoint["version"] = 1
    torch.save(checkpoint, older)
    assert pico.load_checkpoint(older, "--checkpoint")["progress"]["step"] == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "predates checkpoint checksums" in lines[0]
    with pytest.raises(pico.UserError, match="step_000002.pt is damaged.*before it is .*step_000001"):
        pico.load_checkpoint(two_checkpoints, "--checkpoint")   # a version-1 file is still good


# --- a checkpoint that would run code --------------------------------------------------------

class Payload:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("callable_name", ["os.system", "subprocess.call", "subprocess.run"])
def test_checkpoint_that_runs_code_is_refused_with_a_clean_line(ws, callable_name):
    marker = ws.root / "ran"
    function = {"os.system": os.system, "subprocess.call": subprocess.call,
                "subprocess.run": subprocess.run}[callable_name]
    argument = f"touch {marker}" if callable_name == "os.system" else ["touch", str(marker)]
    path = ws.root / "evil.pt"
    torch.save({"format": "pico-llm checkpoint", "version": 1, "x": Payload(function, argument)}, path)
    before = ws.snapshot()
    result = run("--generate", "--checkpoint", str(path), "--device_id", "cpu", *ws.io())
    line = assert_refused(result, "evil.pt", "code", unchanged=before)
    assert not marker.exists()
    # names the callable (pickle records os.system as posix.system) ...
    short = callable_name.split(".")[-1]
    assert f".{short}" in line and ("subprocess" in line or "system" in line), describe(result)
    # ... says it was not loaded, and is not torch's advice cut mid-sentence
    assert "not loaded" in line.lower() or "refused" in line.lower(), describe(result)
    assert "weights_only" not in line and "truncated" not in line, describe(result)


# --- values validated before training --------------------------------------------------------

@pytest.mark.parametrize("flags, keyword", [
    ([*TINY_TRANSFORMER, "--rope_theta", "0"], "rope_theta"),
    ([*TINY_TRANSFORMER, "--rope_theta", "-1"], "rope_theta"),
    (["--min_lr_ratio", "-5"], "min_lr_ratio"),
    ([*TINY_TRANSFORMER, "--d_ff", "0"], "d_ff"),
    (["--models", "lstm_seq,lstm_seq"], "lstm_seq"),
    (["--grad_accum_steps", "8"], "grad_accum_steps"),   # TINY has --batch_size 4
    ([*TINY_TRANSFORMER, "--sliding_window", str(10 ** 29)], "sliding_window"),
], ids=["rope_theta_0", "rope_theta_-1", "min_lr_ratio_-5", "d_ff_0", "duplicate_models",
        "grad_accum_gt_batch", "sliding_window_huge"])
def test_invalid_value_is_refused(ws, flags, keyword):
    before = ws.snapshot()
    result = run(*TINY, *flags, *ws.io(), timeout=300)
    assert_refused(result, keyword, unchanged=before)


# --- outputs checked before training ---------------------------------------------------------

VERBOSE = [a for a in TINY if a != "--quiet"]


@pytest.mark.parametrize("flags, keyword", [
    (["--run_name", "r" * 300], "run_name"),
    (["--artefacts_dir", "/proc/pico"], "artefacts_dir"),
    (["--artefacts_dir", "/sys/pico"], "artefacts_dir"),
    (["--save_dir", "/proc/x"], "save_dir"),
], ids=["run_name_300", "artefacts_proc", "artefacts_sys", "save_dir_proc"])
def test_unwritable_output_fails_before_training(ws, flags, keyword):
    before = ws.snapshot()
    result = run(*VERBOSE, "--input_files", str(ws.corpus), "--cache_dir", str(ws.cache),
                 *(["--artefacts_dir", str(ws.art)] if "--artefacts_dir" not in flags else []),
                 *flags, timeout=300)
    assert_refused(result, keyword, unchanged=before)
    assert not trained_before_failing(result), describe(result)
    assert result.elapsed < 30, describe(result)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_a_directory_that_makes_no_files_is_not_reported_as_missing(pico):
    """/proc answers "no such file" to a new file in it, which said nothing about why."""
    with pytest.raises(pico.UserError) as refused:
        pico.check_writable_directory(Path("/proc/pico"), "--artefacts_dir")
    assert "no file can be created in /proc)" in str(refused.value)
    assert "No such file" not in str(refused.value)


# --- messages --------------------------------------------------------------------------------

# lr 10 with clipping: a finite "loss exploded to 632.9 at step 2" (seed 1337, this corpus);
# lr 100 or more turns the gradient norm into NaN instead.
DIVERGING = [*VERBOSE, *TINY_TRANSFORMER, "--learning_rate", "10", "--lr_schedule", "constant",
             "--warmup_steps", "0", "--max_steps_per_epoch", "6"]


def test_divergence_message_does_not_ask_for_save_dir_when_given(ws):
    result = run(*DIVERGING, *ws.io(), "--save_dir", str(ws.save), timeout=300)
    line = assert_refused(result, ("exploded", "became"))
    assert "pass --save_dir" not in line, describe(result)


def test_finite_explosion_does_not_suggest_skip_nonfinite(ws):
    result = run(*DIVERGING, *ws.io(), timeout=300)
    line = assert_refused(result, "exploded")
    assert "skip_nonfinite" not in line, describe(result)
    assert "lower --learning_rate" in line, describe(result)       # it exploded after updates


@pytest.mark.parametrize("flags", [["--router_aux_loss_coef", "1e300", "--n_experts", "2"]])
def test_a_loss_gone_wrong_before_any_update_is_not_blamed_on_the_learning_rate(ws, flags):
    """The first step's loss is the initial model's: settings that make it NaN or infinite
    are what to change."""
    result = run(*VERBOSE, *TINY_TRANSFORMER, *flags, *ws.io(), timeout=300)
    line = assert_refused(result, "at step 1 ", "learning rate is not the cause")
    assert "lower --learning_rate" not in line, describe(result)


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
@pytest.mark.parametrize("step, skipped_before, blamed", [
    (1, 0, False), (2, 1, False),     # the first loss, and a step after only skipped ones
    (2, 0, True), (3, 1, True)])      # after an update
def test_a_bad_loss_is_blamed_on_the_learning_rate_only_after_an_update(pico, kind, step,
                                                                        skipped_before, blamed):
    model = (pico.build_model(pico.LSTMConfig(embed_size=8), 20, 0) if kind == "lstm" else
             pico.build_model(pico.TransformerConfig(d_model=16, n_heads=2, n_blocks=1), 20, 0))
    guard = pico.FaultTolerance("m", pico.TrainingConfig())
    guard.model, guard.record, guard.tokenizer = model, {}, pico.build_tokenizer("char")
    guard.progress = pico.TrainingProgress(step=step, nonfinite_steps=skipped_before)
    for go_wrong in (lambda: guard.skip_step(pico.NonFiniteStep("loss", math.nan), 1e-3, None),
                     lambda: guard.check_loss(1e6, 1e-3)):
        with pytest.raises(pico.TrainingDiverged) as stopped:
            go_wrong()
        guard.progress.nonfinite_steps = skipped_before
        line = str(stopped.value)
        assert ("lower --learning_rate" in line) == blamed, line
        assert ("learning rate is not the cause" in line) == (not blamed), line
        # only a Transformer reads these flags; a CPU run is in float32 already
        assert ("--rope_theta" in line) == (kind == "transformer" and not blamed), line
        assert "--dtype float32" not in line, line
    guard.training = pico.TrainingConfig(dtype="bfloat16")
    with pytest.raises(pico.TrainingDiverged) as stopped:
        guard.check_loss(1e6, 1e-3)
    assert ("--dtype float32" in str(stopped.value)) == (not blamed)


def bound_by_permissions(probe: list[str], what: str) -> tuple[str, ...]:
    """The command prefix under which file permissions bind this test's script: none for a
    plain user; for root, setpriv dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. Skips
    the test where `probe`, a command that permissions should make fail, still succeeds."""
    prefix = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip(f"running as root and setpriv is missing: cannot {what} here")
        drop = "-dac_override,-dac_read_search"
        prefix = (setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}")
    if subprocess.run([*prefix, *probe], capture_output=True).returncode == 0:
        pytest.skip(f"cannot {what} here")
    return prefix


def test_an_input_file_in_a_folder_that_cannot_be_searched_is_one_line(ws):
    """Without search (x) permission on its folder a file cannot even be looked at: Python's
    Path.exists() raises rather than saying False, and pico-llm answers in one line."""
    folder = ws.root / "closed"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world\n" * 50)
    folder.chmod(0o600)
    try:
        prefix = bound_by_permissions(["cat", str(folder / "a.txt")], "close a folder")
        before = ws.snapshot()
        result = run(*TINY, *ws.io(corpus=False), "--input_files", str(folder / "a.txt"),
                     prefix=prefix)
        assert_refused(result, "a.txt", "permission denied", unchanged=before)
    finally:
        folder.chmod(0o755)


def test_resuming_into_a_read_only_model_folder_fails_before_training(ws):
    """A resumed run writes its checkpoints into <save_dir>/<model>/: a folder it cannot write
    is refused before training, as an unwritable --save_dir is, not after the first epoch."""
    trained = run(*TINY, *ws.io(), "--save_dir", str(ws.save), timeout=300)
    assert trained.returncode == 0, describe(trained)
    model_dir = ws.save / "lstm_seq"
    model_dir.chmod(0o555)
    try:
        prefix = bound_by_permissions(["touch", str(model_dir / "probe")], "make a folder read-only")
        before = ws.snapshot()
        result = run(*VERBOSE, *ws.io(), "--save_dir", str(ws.save), "--resume", "--epochs", "2",
                     prefix=prefix, timeout=300)
        assert_refused(result, "save_dir", unchanged=before)
        assert not trained_before_failing(result), describe(result)
    finally:
        model_dir.chmod(0o755)


def test_unreadable_input_dir_is_not_reported_as_empty(ws):
    """chmod 000 binds root only without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so under
    root the script runs through setpriv with those capabilities dropped."""
    locked = ws.root / "corpus"
    locked.mkdir()
    (locked / "a.txt").write_text("hello world\n")
    locked.chmod(0)
    try:
        prefix = bound_by_permissions(["ls", str(locked)], "make a directory unreadable")
        before = ws.snapshot()
        result = run(*TINY, "--input_dir", str(locked), *ws.io(corpus=False), prefix=prefix)
        line = assert_refused(result, "corpus", ("permission", "cannot read", "not readable"),
                              unchanged=before)
        assert "no .txt files" not in line, describe(result)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("variable, value, keywords", [
    # libgomp, which importing torch loads, looped forever on it, deaf to SIGTERM and Ctrl-C
    ("GOMP_CPU_AFFINITY", "0:", ("GOMP_CPU_AFFINITY", "not a list of CPUs")),
    ("GOMP_CPU_AFFINITY", "zz", ("GOMP_CPU_AFFINITY", "not a list of CPUs")),
    ("GOMP_CPU_AFFINITY", "\u0663", ("GOMP_CPU_AFFINITY", "not a list of CPUs")),  # an Arabic 3
    # torch raised a ValueError as it loaded: a traceback
    ("TORCH_LOGS", "bogus", ("importing numpy and torch failed", "Invalid log settings")),
    # libgomp wrote a line of its own ("Invalid value for environment variable") and went on
    *[("OMP_NUM_THREADS", value, ("OMP_NUM_THREADS", "is not a number of threads"))
      for value in ("0", "junk", "-3", "", "2,", "3.5")]])
def test_an_environment_variable_that_breaks_importing_torch_is_one_line(ws, variable, value,
                                                                          keywords):
    before = ws.snapshot()
    result = run(*TINY, *ws.io(), env={**os.environ, variable: value}, timeout=HANG_TIMEOUT)
    assert_refused(result, *keywords, unchanged=before)


@pytest.mark.parametrize("variable, value, flags", [
    ("TORCHINDUCTOR_COMPILE_THREADS", "abc", TINY),     # building the fused AdamW loads it
    ("TORCHDYNAMO_REPRO_LEVEL", "2.5", ["--accounting", "--device_id", "cpu"])])
def test_a_number_pytorchs_compiler_cannot_read_from_the_environment_is_one_line(ws, variable,
                                                                                 value, flags):
    """Dynamo's and Inductor's settings modules read these with int() as they load, and every
    run loads them, compiled or not: a ValueError's traceback from inside PyTorch."""
    before = ws.snapshot()
    result = run(*flags, *ws.io(), env={**os.environ, variable: value})
    assert_refused(result, "pytorch's compiler", f"{variable}='{value}' is not a number",
                   unchanged=before)


def test_the_compilers_settings_are_loaded_to_check_them_only_where_one_is_set():
    """Loading Dynamo's and Inductor's settings takes a second, which a run that builds no
    optimizer (--accounting) had paid for nothing."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import pico_module; "
             "pico = pico_module.load_script(pico_module.PICO_PATH, 'pico'); "
             "pico.check_compiler_settings(); print('torch._dynamo' in sys.modules)")
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith(("TORCHINDUCTOR_", "TORCHDYNAMO_", "AOTINDUCTOR_"))}
    for extra, loaded in (({}, "False"), ({"TORCHINDUCTOR_COMPILE_THREADS": "2"}, "True")):
        result = subprocess.run([sys.executable, "-c", probe, str(REPO / "tools")],
                                capture_output=True, text=True, timeout=HANG_TIMEOUT,
                                env={**clean, **extra})
        assert result.stdout.strip() == loaded, describe(result)


def test_gomp_cpu_affinity_in_libgomps_own_forms_is_taken(ws):
    for value in ("0", "0-1", "0 - 1, 0", "0-1:1", "", "0x0", "+0"):   # C's numbers too
        result = run("--help", env={**os.environ, "GOMP_CPU_AFFINITY": value})
        assert result.returncode == 0, describe(result)


def test_a_run_from_a_folder_deleted_under_the_shell_says_so_in_one_line(tmp_path):
    """Importing torch there had failed with oneMKL's "Cannot load libtorch_cpu.so"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess.run(["bash", "-c", 'cd "$1" && rmdir "$1" && exec "$2" "$3" --help', "-",
                             str(gone), sys.executable, str(SCRIPT)],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, ""), describe(result)
    assert result.stderr == ("pico-llm: error: the current folder was deleted; cd to a folder "
                             "that exists and run again\n")


def test_omp_num_threads_in_openmps_own_forms_is_taken_without_a_word(pico):
    for value in ("1", "+3", " 2 ", "2,1", "007"):
        assert pico.omp_num_threads_readable(value), value
    result = run("--help", env={**os.environ, "OMP_NUM_THREADS": "1, 1"})
    assert result.returncode == 0 and not result.stderr, describe(result)


def wait_for_start_up_handlers(process, timeout: float = HANG_TIMEOUT) -> None:
    """Wait until `process` catches SIGTERM and SIGHUP (those not ignored here, which it leaves
    ignored), as its start-up lines make it, after SIGINT's; Linux's /proc says which signals
    a process catches. (SIGINT's own mark tells nothing: Python catches it from its start.)
    Elsewhere, or with both ignored, half a second."""
    status = Path(f"/proc/{process.pid}/status")
    awaited = [number for number in (signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(number) is not signal.SIG_IGN]
    if not status.exists() or not awaited:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status.read_text(), re.MULTILINE)
        if caught and all(int(caught.group(1), 16) & (1 << (number - 1)) for number in awaited):
            return
        time.sleep(0.005)
    pytest.fail("the script never set its start-up signal handlers")


@pytest.mark.parametrize("signal_number, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                        (signal.SIGTERM, 143, "terminated"),
                                                        (signal.SIGHUP, 129, "hung up")])
def test_a_signal_during_start_up_prints_one_line(ws, signal_number, status, word):
    """Sent once the script's first lines have set their handlers, while numpy and torch
    import (seconds). Sooner, Python itself is still starting (longer than a fixed wait on a
    loaded machine), and the signal's default action is all there is. A signal ignored here
    (SIGHUP under nohup) is ignored by the script too, by design: nothing to test."""
    if signal.getsignal(signal_number) is signal.SIG_IGN:
        pytest.skip(f"signal {signal_number} is ignored in this process, and so in the script")
    process = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, *ws.io()], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_start_up_handlers(process)
    process.send_signal(signal_number)
    try:
        out, err = process.communicate(timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"hung after signal {signal_number}")
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    info = describe(result)
    assert "Traceback" not in err, info
    assert result.returncode == status, info
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], info
    assert not ws.art.exists() and not ws.cache.exists(), info


# --- damaged caches and oversized input: rebuilt, or refused before reading ------------------

@pytest.mark.parametrize("tamper, problem", [
    (lambda tokens: tokens.astype(np.float32), "its ids are float32, not integers"),
    (lambda tokens: np.where(tokens == tokens.max(), 300, tokens).astype(tokens.dtype),
     "outside the tokenizer's 0..256")])
def test_a_token_cache_with_ids_no_model_could_embed_is_rebuilt(pico, tmp_path, capsys, tamper,
                                                                problem):
    """Ids that are not integers, or past the vocabulary, would fail deep in training (an
    IndexError in the embedding): the cache is rebuilt with a note and the same ids come back."""
    texts, char = ["the cat sat", "on the mat"], pico.ByteTokenizer()
    first = pico.tokenize_examples(texts, char, tmp_path)
    expected = np.array(first.tokens)
    (path,) = tmp_path.glob("*.tokens.npy")
    np.save(path, tamper(np.load(path)))
    again = pico.tokenize_examples(texts, char, tmp_path)
    assert np.array_equal(np.array(again.tokens), expected)
    err = capsys.readouterr().err
    assert "token cache" in err and "is damaged" in err and problem in err and "rebuilding" in err


@pytest.mark.parametrize("name, tamper, problem", [
    ("offsets", lambda offsets: offsets.astype(np.float64), "offsets are float64, not integers"),
    ("offsets", lambda offsets: offsets[:, None], "have 1 and 2 dimensions, not 1"),
    ("tokens", lambda tokens: np.array(7, dtype=tokens.dtype), "have 0 and 1 dimensions, not 1"),
    ("tokens", lambda tokens: np.stack([tokens, tokens], axis=1), "have 2 and 1 dimensions"),
    ("offsets", lambda offsets: offsets[[0, 2, 1, 3]].astype(np.uint64),
     "its example offsets do not increase")])
def test_a_token_cache_of_other_shapes_or_types_is_rebuilt(pico, tmp_path, capsys, name, tamper,
                                                           problem):
    """Arrays numpy reads back well but that are no cache's (offsets of floats, a column, ids
    as one number or a table, offsets going back, which unsigned differences would hide) are
    rebuilt with a note, not an IndexError or TypeError in the middle of training."""
    texts, char = ["the cat sat", "on a mat", "far away"], pico.ByteTokenizer()
    first = pico.tokenize_examples(texts, char, tmp_path)
    expected = np.array(first.tokens)
    (path,) = tmp_path.glob(f"*.{name}.npy")
    np.save(path, tamper(np.load(path)))
    again = pico.tokenize_examples(texts, char, tmp_path)
    assert np.array_equal(np.array(again.tokens), expected)
    assert np.array_equal(np.array(again.offsets), np.array(first.offsets))
    err = capsys.readouterr().err
    assert "token cache" in err and "is damaged" in err and problem in err and "rebuilding" in err


def test_a_trained_tokenizer_that_cannot_be_cached_only_costs_a_note(pico, tmp_path,
                                                                     monkeypatch, capsys):
    """BPE training's result is kept in the cache to spare the next run minutes; a full disk
    there leaves this run's tokenizer as trained, with a note."""
    def full_disk(self, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pico.TrainedBPETokenizer, "save", full_disk)
    texts = ["the cat sat on the mat", "the dog sat on the log"]
    tokenizer = pico.train_bpe_tokenizer(texts, 270, tmp_path)
    assert tokenizer.decode(tokenizer.encode(texts[0])) == texts[0]
    assert tokenizer.vocab_size > 256
    assert "pico-llm: note: trained tokenizer not cached (No space left on device)" in \
        capsys.readouterr().err


def test_a_cache_dir_the_file_system_refuses_or_that_fills_up_only_costs_a_note(
        pico, tmp_path, monkeypatch, capsys):
    """The cache is optional: a path longer than the file system takes was an error before
    tokenizing, and numpy's short write on a full disk said only "8304725 requested and
    1048512 written"."""
    deep = str(tmp_path)
    while len(deep) < 4060:
        deep = os.path.join(deep, "d" * 200)
    os.makedirs(deep[:4060])
    texts = ["the cat sat on the mat", "a dog ran far away"]
    assert len(pico.tokenize_examples(texts, pico.ByteTokenizer(), Path(deep[:4060]))) == 2
    assert "token cache not written (File name too long)" in capsys.readouterr().err

    def short_write(path, write):
        raise OSError("8304725 requested and 1048512 written")

    monkeypatch.setattr(pico, "atomic_write_bytes", short_write)
    assert len(pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)) == 2
    assert "written: is the disk full?)" in capsys.readouterr().err

    def read_only(path, write):       # a new --cache_dir on a read-only file system
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(pico, "atomic_write_bytes", read_only)   # had said "is not a folder"
    assert len(pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path / "new")) == 2
    assert "token cache not written (Read-only file system)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--save_dir", "--artefacts_dir"])
def test_a_folder_too_deep_for_the_files_a_run_writes_is_refused_before_training(ws, flag):
    """The writability probe's short name fit where a checkpoint's temporary file, in its
    model's folder, did not: the run trained, then failed at its first checkpoint."""
    deep = str(ws.root)
    while len(deep) < 4060:
        deep = os.path.join(deep, "d" * 200)
    os.makedirs(deep[:4060])
    before = ws.snapshot()
    result = run(*[a for a in TINY if a != "--quiet"], *ws.io(), "--run_name", "r",   # its log fits
                 flag, deep[:4060])                                                 # (the last wins)
    assert_refused(result, flag, "too long a path", unchanged=before)
    assert not trained_before_failing(result), describe(result)


def test_a_token_cache_with_ids_out_of_range_is_rebuilt(pico, tmp_path, capsys):
    """Right sizes, wrong ids (another tokenizer's, or flipped bits): an embedding lookup
    would fail with an IndexError mid-training; the cache is checked when opened instead."""
    import numpy as np
    texts = ["the cat sat on the mat", "a dog ran far away"]
    first = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    tokens_path = next(tmp_path.glob("*.tokens.npy"))
    bad = np.load(tokens_path)
    bad[3] = 60000                                   # fits uint16, beyond the 257 char ids
    np.save(tokens_path, bad)
    again = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "token cache" in lines[0] and "60000" in lines[0], lines
    assert list(again.tokens) == list(first.tokens)
    assert list(np.load(tokens_path)) == list(first.tokens)


@pytest.mark.parametrize("which", ["tokens", "offsets"])
def test_a_fifo_in_the_token_cache_is_not_read_but_replaced(pico, tmp_path, capsys, which):
    """Reading a FIFO waits for a writer forever; the note names the file that is wrong."""
    texts = ["the cat sat on the mat", "a dog ran far away"]
    first = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    path = next(tmp_path.glob(f"*.{which}.npy"))
    path.unlink()
    os.mkfifo(path)
    again = pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{path.name}: not a regular file" in lines[0], lines
    assert list(again.tokens) == list(first.tokens) and path.is_file()


def test_a_fifo_in_the_bpe_cache_is_not_read_but_replaced(pico, tmp_path, capsys):
    texts = [f"the quick brown fox number {i} jumps" for i in range(50)]
    first = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    merges = next(tmp_path.glob("bpe-*/merges.json"))
    merges.unlink()
    os.mkfifo(merges)
    again = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "BPE cache" in lines[0] and "not regular files" in lines[0], lines
    assert again.encode("number 7 jumps") == first.encode("number 7 jumps") and merges.is_file()


def test_a_bpe_cache_with_merges_cut_at_a_json_boundary_is_trained_again(pico, tmp_path, capsys):
    """Valid JSON, fewer merges than its vocabulary was built from: encoding would differ."""
    texts = [f"the quick brown fox number {i} jumps" for i in range(50)]
    first = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    merges = next(tmp_path.glob("bpe-*/merges.json"))
    merges.write_text(json.dumps(json.loads(merges.read_text())[:-5]))
    again = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "BPE cache" in lines[0] and "merges for 300 ids" in lines[0], lines
    assert again.encode("number 7 jumps") == first.encode("number 7 jumps")


def test_token_caches_of_two_bpes_of_one_size_are_kept_apart(pico, tmp_path):
    """A BPE is trained on the training split, which --seed and --test_fraction change; its
    name (bpe:300) is the same, its ids are not, and the cache must not mix them up."""
    texts = ["the quick brown fox: ab abc, xy xyz"] * 3     # each BPE merges its own pairs
    one = pico.train_bpe_tokenizer([f"ab{i} ab ab abc" for i in range(40)], 300, None)
    other = pico.train_bpe_tokenizer([f"xy{i} xy xy xyz" for i in range(40)], 300, None)
    assert one.name == other.name and one.fingerprint != other.fingerprint
    assert one.encode(texts[0]) != other.encode(texts[0])
    first = pico.tokenize_examples(texts, one, tmp_path)
    second = pico.tokenize_examples(texts, other, tmp_path)
    assert list(first.tokens) == [i for t in texts for i in one.encode(t) + [one.eot_id]]
    assert list(second.tokens) == [i for t in texts for i in other.encode(t) + [other.eot_id]]


def test_a_bpe_smaller_than_asked_for_says_so_when_trained(pico, capsys, tmp_path):
    tokenizer = pico.build_tokenizer("bpe:5000", ["the cat sat on the mat"] * 3, tmp_path)
    assert tokenizer.vocab_size < 5000
    note = capsys.readouterr().err.strip()
    assert note == (f"pico-llm: note: the training text has pairs to merge for only "
                    f"{tokenizer.vocab_size:,} ids, so bpe:5000's vocabulary is that size")
    pico.build_tokenizer("bpe:5000", ["the cat sat on the mat"] * 3, tmp_path)   # from the cache
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("vocab", ["[]", "42", '"text"', "null"])
def test_a_bpe_cache_whose_vocab_is_not_an_object_is_trained_again(pico, tmp_path, capsys, vocab):
    texts = [f"the quick brown fox number {i} jumps" for i in range(50)]
    first = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    vocab_path = next(tmp_path.glob("bpe-*/vocab.json"))
    vocab_path.write_text(vocab)
    again = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "BPE cache" in lines[0], lines
    assert again.encode("number 7 jumps") == first.encode("number 7 jumps")
    assert isinstance(json.loads(vocab_path.read_text()), dict)


def test_an_input_file_larger_than_the_limit_is_refused_before_reading(pico, tmp_path, monkeypatch):
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as handle:             # sparse: 30 GiB long, no disk used
        handle.truncate(30 << 30)
    monkeypatch.setattr(Path, "read_bytes", refuse_to_read)      # refused before any read
    with pytest.raises(pico.UserError) as error:
        pico.read_text_lines(huge)
    line = str(error.value)
    assert "huge.txt" in line and "30.0 GiB" in line and "2 GiB" in line and "head -n" in line
    small = tmp_path / "small.txt"
    small.write_text("one line of text\n")
    monkeypatch.setattr(pico, "MAX_INPUT_FILE_BYTES", 8)          # the limit is one constant
    with pytest.raises(pico.UserError, match="small.txt is 0.0 GiB, over the"):
        pico.read_text_lines(small)


def refuse_to_read(self):
    raise AssertionError(f"{self} was read")


def test_a_fifo_and_blank_files_inside_input_dir_are_skipped_with_one_note(pico, tmp_path, capsys):
    (tmp_path / "story.txt").write_text("once upon a time\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "spaces.txt").write_text("  \n\t\n")
    os.mkfifo(tmp_path / "pipe.txt")
    assert pico.read_text_files_in(tmp_path, pico.read_text_lines) == [["once upon a time"]]
    assert pico.read_text_files_in(tmp_path, pico.read_document) == ["once upon a time"]
    for line in capsys.readouterr().err.strip().split("\n"):    # one note per read
        assert "skipped 3 .txt file(s)" in line and "empty.txt" in line, line
    os.remove(tmp_path / "spaces.txt")
    pico.read_text_files_in(tmp_path, pico.read_document)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "skipped 2" in lines[0], lines


def test_an_input_dir_of_only_blank_files_and_a_fifo_is_refused_in_one_line(ws):
    folder = ws.root / "documents"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "spaces.txt").write_text("\n   \n")
    os.mkfifo(folder / "pipe.txt")
    before = ws.snapshot()
    result = run(*TINY, "--input_dir", str(folder), *ws.io(corpus=False))
    assert_refused(result, "--input_dir", "no .txt files with text", "skipped 3", unchanged=before)


# --- checkpoints: what a refusal names --------------------------------------------------------

def test_a_checkpoint_that_would_call_eval_names_builtins_eval(pico, tmp_path):
    for function in (eval, exec):
        path = tmp_path / f"{function.__name__}.pt"
        torch.save({"format": "pico-llm checkpoint", "x": Payload(function, "1 + 1")}, path)
        with pytest.raises(pico.UserError) as error:
            pico.load_checkpoint(path, "--checkpoint")
        assert f"would call builtins.{function.__name__}," in str(error.value)


def test_a_damaged_checkpoint_with_only_newer_good_ones_names_them(pico, ws, trained_save_dir):
    shutil.copytree(trained_save_dir, ws.save)
    older = ws.save / "lstm_seq" / "step_000001.pt"
    flip_a_weight_byte(older)
    with pytest.raises(pico.UserError) as error:
        pico.load_checkpoint(older, "--checkpoint")
    line = str(error.value)
    assert "step_000001.pt is damaged" in line and "no earlier checkpoint" in line
    assert f"use --checkpoint {ws.save / 'lstm_seq' / 'step_000002.pt'}" in line, line


# --- a full disk: one line, and no partial output --------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failure", ["OSError", "SafetensorError"])
def test_a_full_disk_during_export_hf_is_one_line_and_leaves_nothing(pico, tmp_path, monkeypatch,
                                                                      failure):
    import safetensors.torch

    def save_file(*args, **kwargs):
        if failure == "OSError":
            no_space()
        from safetensors import SafetensorError  # what safetensors raises for a failed write
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    model = pico.TransformerModel(pico.TransformerConfig(vocab_size=257, block_size=16, d_model=32))
    with pytest.raises(pico.UserError) as error:
        pico.export_hf(model, pico.ByteTokenizer(), tmp_path / "out")
    line = str(error.value)
    assert "\n" not in line and "No space left on device" in line and "free disk space" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, target", [
    (["--attention_maps", *TINY_TRANSFORMER], "attention_transformer"),
    (["--monosemantic_enabled"], "monosemantic_lstm_seq"),
])
def test_a_full_disk_while_writing_interpretability_files_is_one_line(run_main, ws, monkeypatch,
                                                                      pico, flags, target):
    real_write = pico.atomic_write_bytes

    def full_for_target(path, data):
        if target in path.name:
            no_space()
        real_write(path, data)

    monkeypatch.setattr(pico, "atomic_write_bytes", full_for_target)
    status, _, err = run_main(*TINY, "--input_files", str(ws.corpus), *flags, artefacts=ws.art)
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and target in lines[0], err
    assert not [p for p in ws.art.iterdir() if target in p.name]


@pytest.mark.parametrize("sweep, flag", [(["--sweep", "kgram_variants"], "--artefacts_dir"),
                                         (["--sweep", "custom_data"], "--artefacts_dir"),
                                         (["--custom_sweep_log", "{art}/sweep_custom.json",
                                           "--custom_sweep_sizes", "20"], "--custom_sweep_log")])
def test_a_full_disk_while_writing_a_sweep_file_is_one_line(run_main, ws, monkeypatch, pico,
                                                            sweep, flag):
    """One line naming the file and the flag that chose its place."""
    real_write = pico.atomic_write_bytes

    def full_for_sweeps(path, data):
        if path.name.startswith("sweep_"):
            no_space()
        real_write(path, data)

    monkeypatch.setattr(pico, "atomic_write_bytes", full_for_sweeps)
    ws.art.mkdir()
    status, _, err = run_main(*[a.format(art=ws.art) for a in sweep], "--sweep_scale", "tiny",
                              "--input_files", str(ws.corpus), artefacts=ws.art)
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "sweep_" in lines[0], err
    assert f"choose another {flag}" in lines[0]
    assert not list(ws.art.glob("*sweep_*"))


@pytest.mark.parametrize("content", ['[1, 2]', '{"args": [1], "status": "running"}',
                                     '{"args": {"save_dir": 5}, "models": 7, "status": "running"}',
                                     '{"process": [1], "status": "running"}',
                                     '{"args": {"models": 5}, "status": "interrupted"}',
                                     '{"args": {"models": "lstm_seq"}, "status": "interrupted"}',
                                     '{"args": {"models": [null]}, "status": "interrupted"}'])
def test_a_run_log_of_another_shape_is_kept_with_one_line(pico, ws, capsys, content):
    """A file in a run log's place whose parts have other types than pico-llm writes (edited,
    or not a run log): a new run with that --run_name is refused in one line and the file
    kept; resuming into it is refused too."""
    ws.art.mkdir()
    path = ws.art / "shaped.json"
    path.write_text(content)
    for extra in ([], ["--save_dir", str(ws.save), "--resume"]):
        status = pico.main([*TINY, *ws.io(), "--run_name", "shaped", *extra])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert path.read_text() == content
    with pytest.raises(pico.UserError, match="is not a pico-llm run log"):
        pico.load_runlog(path)


@pytest.mark.parametrize("record", [7, {"name": "kgram_mlp_seq"},
                                    {"parameters": 10, "history": 5, "test_history": []},
                                    {"parameters": 10, "history": [{"step": 1}], "test_history": []},
                                    {"parameters": 10, "history": [], "test_history": [],
                                     "final": [1]}])
def test_a_run_log_with_a_record_of_another_shape_is_refused_before_training(pico, ws, capsys,
                                                                           record):
    """An edited run log whose record of a model not being resumed has other types than
    pico-llm writes: refused in one line when the run is resumed, not after training, when
    the summary table read it; the log and the checkpoints are kept."""
    command = [*TINY, "--models", "lstm_seq,kgram_mlp_seq", *ws.io(), "--run_name", "edited",
               "--save_dir", str(ws.save)]
    assert pico.main(command) == 0
    capsys.readouterr()
    path = ws.art / "edited.json"
    log = json.loads(path.read_text())
    log["models"]["kgram_mlp_seq"] = record
    path.write_text(json.dumps(log))
    before = ws.snapshot()
    status = pico.main([*command, "--resume", "--epochs", "2"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "is not a run log as pico-llm writes it: model 'kgram_mlp_seq'" in err
    assert "so it cannot be continued; resume with a new --run_name" in err
    assert before.changes() == []
    with pytest.raises(pico.UserError, match="model 'kgram_mlp_seq'"):
        pico.load_runlog(path)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 32212275200 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.80 GB, other allocations: "
                 "1.2 MB, max allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool."),
    MemoryError()])
def test_running_out_of_memory_while_training_is_one_line(pico, ws, capsys, monkeypatch, error):
    """An allocation that fails mid-run (a block size whose activations do not fit, which
    the memory check before training does not count): one line naming the flags to lower,
    status 2, and the run log records the failure; any other error stays a traceback."""
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(pico, "train_models", fail)
    status = pico.main([*TINY, *ws.io(), "--run_name", "oom"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("pico-llm: error: out of memory") and "--batch_size or --block_size" in err
    assert json.loads((ws.art / "oom.json").read_text())["status"] == "failed"
    monkeypatch.setattr(pico, "train_models", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        pico.main([*TINY, *ws.io(), "--run_name", "other"])


def test_a_checkpoint_this_user_may_not_read_is_said_to_be_unreadable_not_corrupt(pico, tmp_path,
                                                                                  monkeypatch):
    """Permission denied is not damage: the line says so (root reads any file, so the denial is
    simulated at torch.load)."""
    path = tmp_path / "step_000001.pt"
    path.write_bytes(b"PK")
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(pico.UserError) as refused:
        pico.read_checkpoint(path, "--checkpoint")
    assert not isinstance(refused.value, pico.DamagedCheckpoint)
    assert str(refused.value).startswith(f"cannot read --checkpoint {path} (Permission denied)")


@pytest.mark.parametrize("flag", ["--save_dir", "--artefacts_dir", "--input_files", "--input_dir",
                                  "--resume", "--export_hf"])
def test_a_path_no_file_system_call_can_take_is_one_line(run_main, tmp_path, flag):
    """A name longer than the file system allows, or a symbolic link looping on the way: each
    path flag answers in one line, before training, whichever check first touches the path
    (Python's Path.exists() raises for these rather than saying False)."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, says in [(tmp_path / ("c" * 300), "longer than"),
                       (tmp_path / "loop" / "x", str(tmp_path / "loop"))]:
        flags = [*TINY, *TINY_TRANSFORMER, flag, str(path)]
        if flag not in ("--input_files", "--input_dir"):
            flags += ["--input_files", str(REPO / "3seqs.txt")]
        if flag == "--artefacts_dir":         # run_main's own comes last
            status, _, err = run_main(*flags[:-4], *flags[-2:], artefacts=path)
        else:
            status, _, err = run_main(*flags)
        assert status == 2 and err.count("\n") == 1 and says in err, err
        assert "Traceback" not in err


def test_a_cache_dir_that_is_a_file_costs_the_cache_and_says_why(pico, ws, capsys):
    """--cache_dir naming a file: the run trains without a token cache and its note says the
    path is no folder (it said only "File exists"); the file is left as it was."""
    ws.root.mkdir(exist_ok=True)
    cache = ws.root / "not_a_folder"
    cache.write_text("kept\n")
    status = pico.main([*TINY, "--input_files", str(ws.corpus), "--artefacts_dir", str(ws.art),
                        "--cache_dir", str(cache)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"pico-llm: note: token cache not written (--cache_dir {cache} is not a folder)" in err
    assert cache.read_text() == "kept\n"


# --- odd places and damaged values, met before they cost a run ------------------------------

@pytest.mark.parametrize("flag", ["--save_dir", "--artefacts_dir"])
@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_directory_flag_that_is_a_broken_symbolic_link_is_one_line(ws, flag, link):
    """mkdir on a link to nothing fails with "File exists"; the link is named as what it is."""
    target = ws.root / "links" / "here"
    target.parent.mkdir()
    if link == "dangling":
        target.symlink_to(ws.root / "nowhere")
    else:
        (ws.root / "links" / "there").symlink_to(target)
        target.symlink_to(ws.root / "links" / "there")
    before = ws.snapshot()
    io = ws.io() if flag == "--save_dir" else ["--input_files", str(ws.corpus), "--cache_dir",
                                                str(ws.cache)]
    result = run(*TINY, *io, flag, str(target), timeout=300)
    assert_refused(result, flag, "symbolic link to nothing", unchanged=before)
    assert target.is_symlink() and not target.exists()


def test_standard_error_on_a_full_disk_still_ends_with_status_2(ws):
    """The one line cannot be written there; the exit status still says bad input."""
    for argv in (["--learning_rate", "nan"], ["--no_such_flag"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, str(SCRIPT), *argv], stderr=full,
                                    stdout=subprocess.PIPE, timeout=HANG_TIMEOUT)
        assert result.returncode == 2, argv


@pytest.mark.parametrize("buffered", [True, False])
def test_help_on_a_full_disk_is_not_reported_as_shown(ws, buffered):
    """Whether Python buffers standard output or not (PYTHONUNBUFFERED), a help that could not
    be written is said so, with status 2."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(SCRIPT), "--help"], stdout=full,
                                stderr=subprocess.PIPE, timeout=HANG_TIMEOUT, text=True,
                                env=env if buffered else {**env, "PYTHONUNBUFFERED": "1"})
    result.stdout = ""                                     # it went to /dev/full
    assert_refused(result, "cannot write the output")


def test_generated_text_on_an_ascii_console_is_escaped_not_a_crash(ws, trained_save_dir):
    """Python takes a console's encoding (PYTHONIOENCODING, a cp1252 console); a model's text
    may hold any character, which is written as an escape instead."""
    checkpoint = trained_save_dir / "lstm_seq" / "step_000002.pt"
    result = run("--generate", "--checkpoint", str(checkpoint), "--prompt", "h\u00e9llo",
                 "--max_new_tokens", "3", "--device_id", "cpu", *ws.io(corpus=False),
                 env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, describe(result)
    assert text_of(result.stdout).startswith("h\\xe9llo"), describe(result)


def test_a_run_log_that_is_a_fifo_is_refused_not_read(pico, tmp_path):
    """Reading a pipe waits for a writer that never comes."""
    import threading
    fifo = tmp_path / "run.json"
    os.mkfifo(fifo)
    said = []
    def read():
        try:
            pico.load_runlog(fifo)
        except pico.UserError as error:
            said.append(str(error))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(HANG_TIMEOUT)
    if reader.is_alive():
        with open(fifo, "w"):     # a writer that closes at once: the reader goes on, and fails
            pass
        pytest.fail("opened the pipe and waited for a writer")
    assert said and "not a regular file" in said[0], said


@pytest.mark.parametrize("reader", ["load_runlog", "load_sweep"])
def test_a_run_log_or_sweep_file_nested_too_deeply_is_one_line(pico, tmp_path, reader):
    """Python's JSON parser recurses once a level: 100,000 levels were a RecursionError."""
    path = tmp_path / "nested.json"
    path.write_text('{"kind": "sweep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(pico.UserError, match="maximum recursion depth") as refused:
        getattr(pico, reader)(path)
    assert "\n" not in str(refused.value) and "nested.json" in str(refused.value)


def test_a_full_temporary_folder_during_bpe_training_names_it(pico, tmp_path, monkeypatch):
    """The scratch copy of the text went unnamed, and the one line blamed standard output."""
    write_text = pico.Path.write_text

    def full(path, *args, **kwargs):
        if path.name == "corpus.txt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(pico.Path, "write_text", full)
    with pytest.raises(pico.UserError, match="BPE training in .*No space left on device; free "
                                             "disk space or set TMPDIR to a folder with room"):
        pico.train_bpe_tokenizer(["the cat sat on the mat"] * 5, 270, None)


def test_a_bpe_cache_nested_too_deeply_is_trained_again(pico, tmp_path, capsys):
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 5
    trained = pico.train_bpe_tokenizer(texts, 270, tmp_path)
    (cached,) = tmp_path.glob("bpe-*")
    (cached / "merges.json").write_text("[" * 100_000 + "]" * 100_000)
    again = pico.train_bpe_tokenizer(texts, 270, tmp_path)
    assert again.bpe.merges == trained.bpe.merges
    assert "is damaged (maximum recursion depth" in capsys.readouterr().err


def test_a_deeply_nested_safetensors_header_is_one_line(pico, tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(pico.UserError, match="cannot read"):
        pico.read_hf_shapes(tmp_path)


def test_json_files_larger_than_any_pico_llm_reads_are_refused_before_reading(
        pico, tmp_path, monkeypatch, capsys):
    """json holds a file a few times over in memory: a sparse 5 GB sweep file cost 10 GB before
    its refusal. Each reader checks the size first (here against a limit of 64 bytes, and files
    that would otherwise be read)."""
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 5
    trained = pico.train_bpe_tokenizer(texts, 270, tmp_path)
    monkeypatch.setattr(pico, "MAX_JSON_FILE_BYTES", 64)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"text": "x" * 100}))
    for read in (pico.load_runlog, pico.load_sweep, pico.read_json_object):
        with pytest.raises(pico.UserError, match="of any JSON file pico-llm reads"):
            read(big)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"eos_token_id": 256}))
    big.rename(tmp_path / "model" / "tokenizer.json")
    with pytest.raises(pico.UserError, match="of any JSON file pico-llm reads"):
        pico.tokenizer_from_hf(tmp_path / "model", pico.TransformerConfig(vocab_size=300))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "__metadata__": {"x": "y" * 100}}).encode()
    (tmp_path / "model" / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(pico.UserError, match="header is"):
        pico.read_hf_shapes(tmp_path / "model")
    assert pico.train_bpe_tokenizer(texts, 270, tmp_path).bpe.merges == trained.bpe.merges
    assert "of any JSON file pico-llm reads" in capsys.readouterr().err


def test_pruning_checkpoints_passes_over_a_folder_named_like_one(pico, tmp_path):
    series = pico.CheckpointSeries(tmp_path, "lstm_seq", keep=1)
    (tmp_path / "lstm_seq").mkdir()
    (tmp_path / "lstm_seq" / "step_000000.pt").mkdir()
    (tmp_path / "lstm_seq" / "step_000009.pt").mkdir()      # numbered past the steps saved
    for step in (1, 2):
        series.save({"progress": {"step": step}})
    assert sorted(p.name for p in (tmp_path / "lstm_seq").iterdir()) == [
        "step_000000.pt", "step_000002.pt", "step_000009.pt"]
    assert series.latest().name == "step_000002.pt"


@pytest.mark.parametrize("content", ["", "my notes\n"])
def test_a_lock_file_is_removed_at_the_end_only_if_it_is_as_pico_llm_leaves_it(pico, tmp_path,
                                                                                 content):
    """pico-llm's lock files are empty; a file of that name with content is someone's."""
    lock = tmp_path / "sweep.json.lock"
    lock.write_text(content)
    with pico.claim_file(tmp_path / "sweep.json", "--custom_sweep_log"):
        pass
    assert lock.exists() == bool(content)
    if content:
        assert lock.read_text() == content


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_lock_file_that_is_no_regular_file_is_refused_and_kept(ws, kind):
    """Opening a FIFO named like the sweep's lock file waited for a writer forever; neither it
    nor a folder of that name is pico-llm's to lock or remove."""
    ws.art.mkdir()
    lock = ws.art / "sweep_kgram_variants.json.lock"
    os.mkfifo(lock) if kind == "fifo" else lock.mkdir()
    before = ws.snapshot()
    result = run("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--device_id", "cpu",
                 *ws.io())
    assert_refused(result, "sweep_kgram_variants.json.lock", ("not a regular file", "directory"),
                   unchanged=before)
    assert lock.exists() and lock.is_dir() == (kind == "directory")


@pytest.mark.parametrize("kind", ["attention", "monosemantic"])
def test_a_new_run_does_not_replace_a_file_where_its_interpretability_file_goes(run_main, ws,
                                                                                 kind):
    """The run log is created exclusively; so the files beside it are checked before training."""
    ws.art.mkdir()
    there = ws.art / f"x.{kind}_transformer.json"
    there.write_text('{"someone": "else"}')
    flag = "--attention_maps" if kind == "attention" else "--monosemantic_enabled"
    status, out, err = run_main(*TINY, *TINY_TRANSFORMER, "--input_files", str(ws.corpus),
                                "--run_name", "x", flag, artefacts=ws.art)
    assert status == 2 and f"{there} already exists" in err, err
    assert there.read_text() == '{"someone": "else"}'
    assert sorted(p.name for p in ws.art.iterdir()) == [there.name]


def test_a_file_named_like_maps_no_model_of_the_run_writes_is_left_alone(run_main, ws):
    """Attention maps are a softmax Transformer's; the LSTM of a run writes none, so a file
    named like its maps is neither refused nor touched."""
    ws.art.mkdir()
    there = ws.art / "x.attention_lstm_seq.json"
    there.write_text('{"someone": "else"}')
    status, out, err = run_main(*TINY, *TINY_TRANSFORMER, "--models", "lstm_seq,transformer",
                                "--input_files", str(ws.corpus), "--run_name", "x",
                                "--attention_maps", artefacts=ws.art)
    assert status == 0, err
    assert there.read_text() == '{"someone": "else"}'
    assert (ws.art / "x.attention_transformer.json").exists()


@pytest.mark.parametrize("field, value", [("step", -5), ("epoch", 0), ("batches_done", -7),
                                          ("lr_scale", -1.0), ("lr_scale", float("nan")),
                                          ("lr_scale", 2.0),
                                          ("tokens_seen", -1),
                                          # early stopping at the first evaluation
                                          ("best_test_loss", float("nan")),
                                          ("best_test_loss", -float("inf")),
                                          # "Infinity" in the run log, which is no JSON
                                          ("train_time_s", float("inf")),
                                          ("elapsed_s", float("inf"))])
def test_a_checkpoints_progress_out_of_range_is_refused(pico, field, value):
    """A negative step would be written as step_-00003.pt, a negative scale climb the loss."""
    fields = {**pico.dataclasses.asdict(pico.TrainingProgress()), field: value}
    with pytest.raises(ValueError, match=field):
        pico.progress_from(fields)
    assert pico.progress_from({**fields, field: 1}).best_test_loss in (math.inf, 1)  # as written


def narrowed(key):
    return lambda state: state.update({key: torch.zeros(2)})


@pytest.mark.parametrize("optimizer, damage, message", [
    ("torch", lambda state: state.pop("exp_avg"), "has no exp_avg"),
    ("scratch", lambda state: state.pop("exp_avg_sq"), "has no exp_avg_sq"),
    ("torch", narrowed("exp_avg_sq"), "of shape"),
    ("scratch", narrowed("exp_avg"), "of shape"),
    ("muon", narrowed("momentum_buffer"), "of shape"),
    ("torch", lambda state: state.update(step=torch.tensor(-1.0)), "step count"),
    ("torch", lambda state: state.update(step=torch.tensor(float("nan"))), "step count"),
    ("scratch", lambda state: state.update(step=-1), "step count")])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_an_optimizer_state_a_step_could_not_use_is_refused_when_restored(pico, optimizer,
                                                                           damage, message,
                                                                           device):
    """load_state_dict checks only the sizes of the groups: a missing moment failed at the
    first step, one of another shape crashed the process (the fused AdamW). On the meta device
    too, where --resume checks every checkpoint before training (and the fused AdamW moves the
    step counts there)."""
    config = pico.TransformerConfig(d_model=16, n_heads=2, n_blocks=1, block_size=8)
    trained, training = pico.build_model(config, 20, 0), pico.TrainingConfig(optimizer=optimizer)
    optimizer = pico.build_optimizer(trained, training, torch.device("cpu"))
    sum(p.sum() for p in trained.parameters()).backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    with torch.device(device):
        model = pico.build_model(config, 20, 0)
    restored = pico.build_optimizer(model, training, torch.device(device))
    settings = pico.group_settings(restored)
    restored.load_state_dict(saved)
    pico.check_optimizer_state(restored, settings, saved)     # as a step leaves it
    index = {id(p): i for group, stored in zip(optimizer.param_groups, saved["param_groups"])
             for p, i in zip(group["params"], stored["params"])}
    damage(saved["state"][index[id(pico.muon_matrices(trained)[0])]])   # a hidden matrix's
    restored = pico.build_optimizer(model, training, torch.device(device))
    restored.load_state_dict(saved)
    with pytest.raises(ValueError, match=message):
        pico.check_optimizer_state(restored, settings, saved)


def stepped_optimizer(pico, kind: str):
    """A tiny Transformer, its TrainingConfig with --optimizer `kind`, and its optimizer after
    one step (every parameter has its state)."""
    model = pico.build_model(pico.TransformerConfig(d_model=16, n_heads=2, n_blocks=1,
                                                    block_size=8), 20, 0)
    training = pico.TrainingConfig(optimizer=kind)
    optimizer = pico.build_optimizer(model, training, torch.device("cpu"))
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    return model, training, optimizer


@pytest.mark.parametrize("group, setting", [(0, "momentum"), (0, "ns_steps"), (1, "betas"),
                                            (2, "weight_decay")])
def test_a_restored_optimizer_group_without_a_setting_a_step_reads_is_refused(pico, group,
                                                                              setting):
    """Muon's groups: its own (momentum, ns_steps), then AdamW's for the rest, whose 1-D
    parameters' moments are checked as AdamW's are."""
    model, training, optimizer = stepped_optimizer(pico, "muon")
    saved = optimizer.state_dict()
    del saved["param_groups"][group][setting]
    restored = pico.build_optimizer(model, training, torch.device("cpu"))
    settings = pico.group_settings(restored)
    restored.load_state_dict(saved)
    with pytest.raises(ValueError, match=f"a parameter group has no {setting}"):
        pico.check_optimizer_state(restored, settings, saved)
    intact = pico.build_optimizer(model, training, torch.device("cpu"))
    intact.load_state_dict(optimizer.state_dict())
    gain = next(p for p in model.parameters() if p.dim() == 1)      # an AdamW parameter
    intact.state[gain].pop("exp_avg_sq")
    with pytest.raises(ValueError, match="has no exp_avg_sq"):
        pico.check_optimizer_state(intact, settings, optimizer.state_dict())


@pytest.mark.parametrize("group, setting, value, message", [
    (0, "momentum", "x", "momentum is 'x', where the flags make it 0.95"),
    (0, "ns_steps", 10**9, "ns_steps is 1000000000, where the flags make it 5"),  # a step for ever
    (0, "nesterov", 1, "nesterov is 1, where the flags make it True"),
    (0, "muon", False, "muon is False"),
    (1, "betas", ("a", "b"), r"betas is \('a', 'b'\)"),
    (2, "weight_decay", "x", "weight_decay is 'x'"),
    (2, "eps", -1.0, "eps is -1.0, where the flags make it 1e-08"),
    (1, "betas", [0.9], r"betas is \[0.9\]"), (1, "betas", (0.9, 0.999, 0.5), "betas is"),
    # a tensor equal to the flag's number, but not it: bfloat16's 0.95 holds 0.9492
    (0, "momentum", torch.tensor(0.95, dtype=torch.bfloat16), "momentum is tensor"),
    # the same step: a list for the tuple it was (a state that went through JSON), 0 for 0.0
    (1, "betas", [0.9, 0.999], None), (2, "weight_decay", 0, None)])
def test_a_restored_optimizer_setting_other_than_the_flags_make_is_refused(pico, group, setting,
                                                                           value, message):
    """load_state_dict takes each group's settings from the checkpoint. A resumed run has the
    flags that made them, so one that differs is damage: a step would fail on it, compute
    something else, or (a billion Newton-Schulz iterations) never end."""
    model, training, optimizer = stepped_optimizer(pico, "muon")
    saved = optimizer.state_dict()
    saved["param_groups"][group][setting] = value
    restored = pico.build_optimizer(model, training, torch.device("cpu"))
    settings = pico.group_settings(restored)
    restored.load_state_dict(saved)
    if message is None:
        pico.check_optimizer_state(restored, settings, saved)
        return
    with pytest.raises(ValueError, match=f"a parameter group's {message}"):
        pico.check_optimizer_state(restored, settings, saved)


def test_a_restored_optimizer_takes_its_implementation_as_built_and_the_rest_as_stored(pico):
    """How PyTorch computes a step (fused, foreach, capturable) follows the device a run resumes
    on, not its checkpoint's; the learning rate is set before each step. The moments and step
    counts are the checkpoint's."""
    model, training, optimizer = stepped_optimizer(pico, "torch")
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0].update(fused=None, foreach=True, capturable=True, lr=0.5)
    restored = pico.build_optimizer(model, training, torch.device("cpu"))
    settings = pico.group_settings(restored)
    restored.load_state_dict(saved)
    pico.check_optimizer_state(restored, settings, saved)
    assert pico.group_settings(restored) == pico.group_settings(optimizer)
    assert restored.param_groups[0]["fused"] is True and not restored.param_groups[0]["capturable"]
    for p in model.parameters():
        assert torch.equal(restored.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


@pytest.mark.parametrize("change", [{"d_model": 16.0}, {"block_size": 0}, {"block_size": 16.5},
                                    {"pos_emb": "bogus"}, {"attention": "bogus"},
                                    {"yarn_factor": float("nan")}, {"rope_theta": float("inf")},
                                    {"logit_softcap": float("-inf")}])
def test_a_checkpoints_transformer_config_of_the_wrong_type_or_kind_is_refused(pico, change):
    config = pico.TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_blocks=1,
                                    block_size=16)
    # a kind is checked as the config is made; a size by check_model_config
    with pytest.raises((pico.UserError, ValueError), match=next(iter(change))):
        pico.check_model_config(pico.dataclasses.replace(config, **change))
    pico.check_model_config(config)


@pytest.mark.parametrize("field, typo", [("norm", "layer_norm"), ("ffn", "relu"),
                                         ("norm_position", "Pre"), ("pos_emb", "rotary"),
                                         ("attention", "flash"), ("rope_scaling", "Yarn")])
def test_a_transformer_config_with_a_kind_misspelled_is_refused_as_it_is_made(pico, field, typo):
    """It had built another model without a word: no norms, a SiLU feed-forward, post-norm."""
    with pytest.raises(ValueError, match=f"{field} '{typo}' is not one of"):
        pico.TransformerConfig(**{field: typo})


def test_a_kgram_config_of_an_unknown_variant_is_refused_as_it_is_made(pico):
    """An unknown variant had built the convolutional model."""
    with pytest.raises(ValueError, match="variant 'bogus' is not one of onehot, embedding, conv"):
        pico.KGramConfig(variant="bogus")


@pytest.mark.parametrize("option", ["attention_sinks", "sliding_window", "qk_norm", "head_size",
                                    "value_embeddings"])
@pytest.mark.parametrize("attention", ["linear", "gated_linear"])
def test_a_softmax_option_given_to_linear_attention_is_refused_as_it_is_made(pico, attention, option):
    """Built in Python, not through the flags: value embeddings had failed in the forward pass
    with a TypeError; a window, sinks, a head size or QK-norm were ignored without a word."""
    value = 4 if option in ("sliding_window", "head_size") else True
    with pytest.raises(ValueError, match=f"{option}: options of softmax attention, not of "
                                         f"{attention} attention"):
        pico.TransformerConfig(attention=attention, **{option: value})
    pico.TransformerConfig(attention="softmax", **{option: value})


def test_flags_of_a_kind_no_flag_offers_describe_no_transformer_for_a_run_without_one(pico):
    """A checkpoint of an LSTM stores all the flags; a Transformer kind damaged there is not
    the LSTM's to meet (the kind is a ValueError of TransformerConfig now)."""
    flags = {**pico.default_flags(), "norm": "layer_norm", "models": ["lstm_seq"]}
    assert pico.transformer_config_if_valid(flags, "transformer") is None
    with pytest.raises(ValueError, match="norm 'layer_norm'"):
        pico.transformer_config_if_valid({**flags, "models": ["transformer"]}, "transformer")


def test_a_norm_or_feed_forward_of_an_unknown_kind_is_refused(pico):
    """Built alone, as a student might: an unknown norm had been the identity, an unknown
    feed-forward SiLU."""
    with pytest.raises(ValueError, match="norm 'layer_norm' is not one of"):
        pico.make_norm("layer_norm", 8, bias=False)
    with pytest.raises(ValueError, match="ffn 'relu' is not one of"):
        pico.FeedForward(8, 16, "relu", bias=False, dropout=0.0)


def test_a_stored_tokenizer_json_that_is_not_one_is_a_value_error(pico):
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        pico.HFTokenizer.from_json("{bad", 10, 0, "broken")


def test_a_step_makes_no_more_micro_batches_than_it_has_examples(pico, configure, ws):
    """A typo of many digits in --batch_size and --grad_accum_steps had made a list of that many
    micro-batches (stand-ins that weigh nothing) and run the machine out of memory; a step of
    n examples makes at most n, the same update."""
    config = configure(*TINY, "--input_files", str(ws.corpus))
    tokenizer = pico.build_tokenizer("char")
    data = pico.load_training_data(config.data, tokenizer, pico.read_sources(config.data))
    slots = next(iter(data.train_step_slots(4, 1, 1, skip=0)))
    batches = pico.rank_micro_batches(data, slots, 1000, pico.Distributed(), torch.device("cpu"))
    assert len(slots) == 4 and len(batches) == 4 and all(active for _, active in batches)


def test_help_with_standard_output_closed_goes_to_standard_error():
    result = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(str(SCRIPT))} --help >&-",
                            shell=True, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0 and "usage: pico-llm.py" in result.stderr, describe(result)


@pytest.mark.parametrize("flag", ["--resume", "--checkpoint"])
def test_a_checkpoint_flag_naming_a_symbolic_link_loop_says_so(ws, flag):
    loop = ws.root / "loop.pt"
    loop.symlink_to(loop)
    argv = ([*TINY, *ws.io(), "--resume", str(loop)] if flag == "--resume"
            else ["--generate", "--checkpoint", str(loop), "--device_id", "cpu", *ws.io()])
    assert_refused(run(*argv), flag, "symbolic link to nothing")


@pytest.mark.parametrize("damage", ["seed", "vocab_size", "tokenizer", "bpe_merges", "bpe_vocab",
                                    "spec", "dropout", "rope_theta", "norm_eps"])
def test_a_checkpoint_with_a_seed_or_tokenizer_it_cannot_have_is_one_line(pico, trained_save_dir,
                                                                          damage, capsys):
    """Values the command line would refuse, in a file behind a valid checksum (another
    version's, or edited): one line naming the file, not a traceback from torch, tokenizers or
    the model's constructor. A trained BPE without its merges is not trained again on no text
    (a note, then a mismatch)."""
    path = trained_save_dir / "lstm_seq" / "step_000002.pt"
    checkpoint = torch.load(path, weights_only=True)
    transformer = dataclasses.asdict(pico.TransformerConfig())     # as an imported model stores
    if damage == "seed":
        checkpoint["args"]["seed"] = 2 ** 70
    elif damage == "vocab_size":
        del checkpoint["tokenizer"]["vocab_size"]
    elif damage == "tokenizer":
        checkpoint["tokenizer"] = ["char"]
    elif damage == "bpe_merges":
        checkpoint["tokenizer"] = {"spec": "bpe:300", "name": "bpe", "vocab_size": 300}
    elif damage == "bpe_vocab":                                    # a list where ids map to hex
        checkpoint["tokenizer"] = {"spec": "bpe:300", "name": "bpe", "vocab_size": 300,
                                   "bpe_vocab": ["61"], "bpe_merges": []}
    elif damage == "spec":
        checkpoint["tokenizer"]["spec"] = None
    else:
        checkpoint["transformer_config"] = {**transformer, **{
            "dropout": {"dropout": 2.0}, "rope_theta": {"rope_theta": "10000"},
            "norm_eps": {"norm_eps": float("nan")}}[damage]}
    with pytest.raises(pico.UserError, match="cannot be rebuilt"):
        pico.checkpoint_contents(path, checkpoint)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage, message", [
    ({"transformer_config": {"d_model": 10 ** 12}}, r"step_000002.pt's lstm_seq needs about "
     r"[0-9,.]+ GiB \([0-9,]+ parameters in float32\), more than the [0-9,.]+ [GM]iB of memory "
     r"here; the file is damaged, or needs a machine with more memory"),
    ({"transformer_config": {"d_ff": 10 ** 19}}, r"needs about [0-9,.]+ GiB \([0-9,]+ parameters"),
    ({"transformer_config": {"n_blocks": 10 ** 9}}, r"cannot be rebuilt \(n_blocks 1000000000 is "
                                                    r"more than 1000\)"),
    ({"args": {"embed_size": 10 ** 8}}, r"size mismatch for"),    # torch can describe this one
    ({"args": {"lstm_layers": 10 ** 6}}, r"cannot be rebuilt \(num_layers 1000000 is more than "
                                         r"1000\)"),
    ({"transformer_config": {"n_experts": 10 ** 6, "d_model": 8, "d_ff": 8,
                             "experts_per_token": 1}},
     r"cannot be rebuilt \(n_experts 1000000 is more than 1024\)")],
    ids=["wide", "past_int64", "deep", "lstm_wide", "lstm_deep", "experts"])
def test_a_checkpoint_whose_sizes_memory_cannot_hold_is_one_line_before_building(
        pico, trained_save_dir, tmp_path, damage, message):
    """Sizes behind a valid checksum (edited, or another version's) that --generate and
    --export_hf would build the model from: a width past torch's storage sizes was a traceback
    from nn.Linear, a billion blocks a build that never ended. A size torch can describe is
    compared with the stored weights first, and named by them."""
    checkpoint = torch.load(trained_save_dir / "lstm_seq" / "step_000002.pt", weights_only=True)
    for key, change in damage.items():
        base = (checkpoint["args"] if key == "args" else
                dataclasses.asdict(pico.TransformerConfig(vocab_size=257, block_size=16)))
        checkpoint[key] = {**base, **change}
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    path = tmp_path / "step_000002.pt"
    torch.save(checkpoint, path)
    started = time.perf_counter()
    with pytest.raises(pico.UserError, match=message) as error:
        pico.model_from_checkpoint(path, "--checkpoint")
    assert "\n" not in str(error.value) and time.perf_counter() - started < 60


def test_a_sound_checkpoint_too_large_for_this_machine_is_one_line(pico, trained_save_dir,
                                                                   monkeypatch):
    """Sizes that match the weights, on a machine with less memory than the model needs in
    float32 (trained on a larger one): refused in one line before the model is built."""
    monkeypatch.setattr(pico, "memory_available", lambda device: 1000)
    with pytest.raises(pico.UserError, match=r"step_000002.pt's lstm_seq needs about .* "
                                             r"parameters in float32\), more than the "
                                             r"0.0 MiB of memory here") as error:
        pico.model_from_checkpoint(trained_save_dir / "lstm_seq" / "step_000002.pt",
                                   "--checkpoint")
    assert "\n" not in str(error.value)


def test_a_checkpoint_model_torch_cannot_build_otherwise_is_one_line(pico, trained_save_dir,
                                                                     monkeypatch):
    """A size that fits in memory but that torch refuses as the model is built (here any error
    it raises) is the file's fault, said in one line."""
    def build_model(*args):
        raise RuntimeError("something torch could not describe")
    monkeypatch.setattr(pico, "build_model", build_model)
    path = trained_save_dir / "lstm_seq" / "step_000002.pt"
    with pytest.raises(pico.UserError, match=r"step_000002.pt: its lstm_seq cannot be rebuilt "
                                             r"\(something torch could not describe\); use a "
                                             r"checkpoint this version wrote"):
        pico.model_from_checkpoint(path, "--checkpoint")


def test_heads_too_wide_to_fit_name_head_size(pico, configure):
    config = configure("--models", "transformer", "--d_model", "16", "--n_heads", "2",
                       "--n_blocks", "1", "--head_size", str(10 ** 9), "--tokenizer", "char")
    with pytest.raises(pico.UserError, match="lower --head_size"):
        pico.check_models_fit_in_memory(config.models, 256, 64, torch.device("cpu"))


def test_a_run_log_keeps_the_first_error_that_stopped_the_run(pico, tmp_path):
    """The first error is the cause; a later one is the clean-up's, and must not replace it."""
    log = pico.RunLog(tmp_path / "run.json", {"models": []}, torch.device("cpu"), {})
    log.record_failure(pico.UserError("the first cause"))
    log.record_failure(RuntimeError("a later one, in the clean-up"))
    assert (log.data["status"], log.data["error"]) == ("failed", "the first cause")
    assert pico.load_runlog(tmp_path / "run.json")["error"] == "the first cause"


@pytest.mark.parametrize("stop", ["KeyboardInterrupt", "Terminated"])
def test_a_run_log_stopped_by_a_signal_says_interrupted_not_failed(pico, tmp_path, stop):
    """Ctrl-C or SIGTERM is no error of the run's: the notebook shows it as interrupted."""
    log = pico.RunLog(tmp_path / "run.json", {"models": []}, torch.device("cpu"), {})
    log.record_failure(KeyboardInterrupt() if stop == "KeyboardInterrupt" else pico.Terminated())
    written = pico.load_runlog(tmp_path / "run.json")
    assert written["status"] == "interrupted" and "error" not in written


def test_a_run_log_of_another_schema_version_is_refused_naming_it(pico, tmp_path):
    path = tmp_path / "run.json"
    pico.RunLog(path, {"models": []}, torch.device("cpu"), {}).write()
    log = json.loads(path.read_text())
    pico.load_runlog(path)
    path.write_text(json.dumps(log | {"schema_version": pico.RUNLOG_SCHEMA_VERSION + 1}))
    with pytest.raises(pico.UserError, match="schema"):
        pico.load_runlog(path)


def test_a_sweep_file_with_a_negative_wall_time_is_refused(pico, tmp_path):
    path = tmp_path / "sweep_sampling.json"
    sweep = {"kind": "sweep", "schema_version": pico.SWEEP_SCHEMA_VERSION, "sweep": "sampling",
             "scale": "tiny", "created": "2026-01-01", "points": [], "config": {"scale": {}}}
    path.write_text(json.dumps(sweep | {"wall_time_s": 5.0}))
    pico.load_sweep(path)
    path.write_text(json.dumps(sweep | {"wall_time_s": -5.0}))
    with pytest.raises(pico.UserError, match="wall_time_s"):
        pico.load_sweep(path)


def test_a_model_record_needs_its_throughput_but_not_a_test_loss(pico):
    """summary_table formats tokens/s as a number; a run without held-out text has no test loss."""
    record = {"parameters": 10, "history": [], "test_history": [],
              "final": {"tokens_per_s": 5.0, "test_loss": None}}
    assert pico.model_record_problem(record) is None
    assert pico.model_record_problem(record | {"final": {"tokens_per_s": None}}) is not None


def test_an_empty_kgram_variant_is_refused_as_it_is_made(pico):
    with pytest.raises(ValueError, match="variant '' is not one of"):
        pico.KGramConfig(variant="")


@pytest.mark.parametrize("reader", ["load_runlog", "load_sweep", "read_json_object"])
def test_a_json_number_of_more_digits_than_python_converts_is_named_in_one_line(pico, tmp_path,
                                                                              reader):
    """Python refuses to convert an integer of more than 4,300 digits and advises calling
    sys.set_int_max_str_digits(), a programmer's setting: the line says what is in the file."""
    path = tmp_path / "file.json"
    path.write_text('{"n": ' + "9" * 5000 + "}")
    with pytest.raises(pico.UserError) as refused:
        getattr(pico, reader)(path)
    message = str(refused.value)
    assert f"a number in it has more than {sys.get_int_max_str_digits():,} digits" in message
    assert "set_int_max_str_digits" not in message and "\n" not in message


def test_a_safetensors_header_number_of_too_many_digits_is_named_in_one_line(pico, tmp_path):
    header = ('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}')
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header.encode() + bytes(4))
    with pytest.raises(pico.UserError) as refused:
        pico.read_hf_shapes(tmp_path)
    message = str(refused.value)
    assert f"a number in it has more than {sys.get_int_max_str_digits():,} digits" in message
    assert "set_int_max_str_digits" not in message


def test_the_digit_limit_named_is_the_one_python_holds(pico, tmp_path):
    """PYTHONINTMAXSTRDIGITS (or -X int_max_str_digits) moves Python's limit: the line says
    the limit in force, and an integer past it is still counted without being written out."""
    path = tmp_path / "file.json"
    path.write_text('{"n": ' + "9" * 1000 + "}")
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        with pytest.raises(pico.UserError, match="a number in it has more than 640 digits"):
            pico.load_runlog(path)
        assert pico.digits_of(10**1000) == "a number of more than 639 digits"
        assert pico.digits_of(-10**400) == "a 401-digit negative number"
        assert pico.digits_of(-10**1000) == "a negative number of more than 639 digits"
    finally:
        sys.set_int_max_str_digits(before)
