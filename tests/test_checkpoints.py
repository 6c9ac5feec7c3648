"""Appendix B: checkpoints, resume, signals, non-finite steps, plateaus and bad checkpoints."""

import dataclasses
import errno
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from importlib.util import find_spec as importlib_find
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPT

TINY = ["--input_files", str(REPO / "3seqs.txt"), "--limit_custom_examples", "60",
        "--block_size", "16", "--embed_size", "16", "--max_steps_per_epoch", "3", "--epochs", "2",
        "--batch_size", "4", "--max_new_tokens", "4", "--tokenizer", "char", "--quiet",
        "--device_id", "cpu"]
TWO_MODELS = ["--models", "kgram_mlp_seq,lstm_seq"]


def losses(log: dict) -> dict:
    return {name: [h["train_loss"] for h in record["history"]]
            for name, record in log["models"].items()}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def uninterrupted(pico, tmp_path_factory):
    """The run log of a two-model run that nothing interrupts."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert pico.main([*TINY, *TWO_MODELS, "--artefacts_dir", str(root), "--cache_dir",
                      str(root / "cache"), "--run_name", "full"]) == 0
    return pico.load_runlog(root / "full.json")


@pytest.mark.parametrize("interrupt_at_call", [3, 5, 8])
def test_an_interrupted_and_resumed_run_gives_the_same_losses(pico, run_main, tmp_path, monkeypatch,
                                                               uninterrupted, interrupt_at_call):
    """Call 3 ends epoch 1 before its evaluation, 5 is mid epoch 2 of the k-gram model,
    8 is mid epoch 1 of the LSTM (after the k-gram model finished)."""
    calls, real_step = [], pico.training_step

    def step_then_ctrl_c(*args):
        loss = real_step(*args)
        calls.append(loss)
        if len(calls) == interrupt_at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(pico, "training_step", step_then_ctrl_c)
    save = tmp_path / "ckpt"
    status, out, err = run_main(*TINY, *TWO_MODELS, "--save_dir", str(save), "--run_name", "cut")
    assert status == 130
    assert f"--resume {save}" in one_error_line(err)
    assert pico.load_runlog(tmp_path / "artefacts" / "cut.json")["status"] == "interrupted"
    monkeypatch.setattr(pico, "training_step", real_step)
    status, out, err = run_main(*TINY, *TWO_MODELS, "--save_dir", str(save), "--resume",
                                "--run_name", "resumed")
    assert status == 0, err
    assert f"checkpoints written to {save}/<model>/ (continue with --resume)" in out
    resumed = pico.load_runlog(tmp_path / "artefacts" / "resumed.json")
    assert resumed["status"] == "finished"
    assert losses(resumed) == losses(uninterrupted)
    for name, record in uninterrupted["models"].items():
        assert resumed["models"][name]["test_history"] == record["test_history"]
        assert [h["step"] for h in resumed["models"][name]["history"]] == list(range(1, 7))
        elapsed = [h["elapsed_s"] for h in resumed["models"][name]["history"]]
        assert elapsed == sorted(elapsed)        # the clock goes on from the checkpoint's time


def test_a_signal_during_evaluation_stops_it_and_the_resume_evaluates_again(
        pico, run_main, tmp_path, monkeypatch, uninterrupted):
    """Ctrl-C after the first test batch of epoch 1: the run stops before the next batch, not
    after the whole evaluation, with the checkpoint of the epoch's last step; the resume
    evaluates epoch 1 again and ends as the uninterrupted run did."""
    real_evaluate, seen = pico.evaluate, []

    def ctrl_c_after_one_test_batch(loss_model, batches, *args, **kwargs):
        def batches_then_ctrl_c():
            for batch in batches:
                seen.append(batch)
                yield batch
                os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(loss_model, batches_then_ctrl_c(), *args, **kwargs)

    monkeypatch.setattr(pico, "evaluate", ctrl_c_after_one_test_batch)
    save = tmp_path / "ckpt"
    status, _, err = run_main(*TINY, *TWO_MODELS, "--save_dir", str(save), "--run_name", "cut")
    assert status == 130 and "at step 3 of kgram_mlp_seq" in one_error_line(err)
    one_batch_at_most = 4 * 16                            # --batch_size x --block_size targets
    assert len(seen) == 1
    assert uninterrupted["models"]["kgram_mlp_seq"]["test_history"][0]["test_tokens"] > one_batch_at_most
    cut = pico.load_runlog(tmp_path / "artefacts" / "cut.json")["models"]["kgram_mlp_seq"]
    assert cut["test_history"] == [] and len(cut["history"]) == 3
    monkeypatch.setattr(pico, "evaluate", real_evaluate)
    status, _, err = run_main(*TINY, *TWO_MODELS, "--save_dir", str(save), "--resume",
                              "--run_name", "resumed")
    assert status == 0, err
    resumed = pico.load_runlog(tmp_path / "artefacts" / "resumed.json")
    assert losses(resumed) == losses(uninterrupted)
    for name, record in uninterrupted["models"].items():
        assert resumed["models"][name]["test_history"] == record["test_history"]


DROPOUT_TRANSFORMER = ["--models", "transformer", "--d_model", "32", "--n_heads", "2",
                       "--n_blocks", "2", "--dropout", "0.1"]


@pytest.mark.parametrize("optimizer", ["torch", "muon"])
def test_a_resumed_run_with_dropout_draws_the_same_random_numbers(pico, run_main, tmp_path,
                                                                 monkeypatch, optimizer):
    """Dropout draws from the global generator, which a resume restores; nothing else may
    draw from it in between (the oneDNN probe once did, on its first use after the restore).
    The probe's cache is cleared so that it runs again in each of the three runs. With Muon
    the checkpoint also carries its momentum buffers and the AdamW moments of the rest."""
    pico.onednn_available.cache_clear()
    flags = [*TINY, *DROPOUT_TRANSFORMER, "--optimizer", optimizer]
    assert run_main(*flags, "--run_name", "whole")[0] == 0
    whole = pico.load_runlog(tmp_path / "artefacts" / "whole.json")
    calls, real_step = [], pico.training_step

    def step_then_ctrl_c(*args):
        loss = real_step(*args)
        calls.append(loss)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(pico, "training_step", step_then_ctrl_c)
    save = tmp_path / "ckpt"
    pico.onednn_available.cache_clear()
    assert run_main(*flags, "--save_dir", str(save), "--run_name", "cut")[0] == 130
    monkeypatch.setattr(pico, "training_step", real_step)
    pico.onednn_available.cache_clear()
    status, _, err = run_main(*flags, "--save_dir", str(save), "--resume", "--run_name", "resumed")
    assert status == 0, err
    resumed = pico.load_runlog(tmp_path / "artefacts" / "resumed.json")
    assert losses(resumed) == losses(whole)
    assert (resumed["models"]["transformer"]["test_history"]
            == whole["models"]["transformer"]["test_history"])


def test_output_only_flags_may_change_on_resume(pico, run_main, tmp_path):
    """--attention_maps and the embedding clusters only write files after training: a run
    made with them resumes without them (and a refused combination needs no dead end)."""
    flags = [*TINY, "--models", "transformer", "--d_model", "16", "--n_heads", "2",
             "--n_blocks", "1", "--save_dir", str(tmp_path / "ckpt")]
    status, _, err = run_main(*flags, "--epochs", "1", "--attention_maps", "--monosemantic_enabled",
                              "--run_name", "first")
    assert status == 0, err
    status, _, err = run_main(*flags, "--resume", "--run_name", "second")
    assert status == 0, err


def test_a_resumed_run_writes_over_its_own_interpretability_files(pico, run_main, tmp_path):
    """A new run refuses a file where its attention maps go; the run that wrote them, resumed
    for another epoch under the same --run_name, replaces them with its newer model's."""
    flags = [*TINY, "--models", "transformer", "--d_model", "16", "--n_heads", "2",
             "--n_blocks", "1", "--save_dir", str(tmp_path / "ckpt"), "--attention_maps",
             "--monosemantic_enabled", "--run_name", "same"]
    assert run_main(*flags, "--epochs", "1")[0] == 0
    files = [tmp_path / "artefacts" / f"same.{kind}_transformer.json"
             for kind in ("attention", "monosemantic")]
    first = [path.read_text() for path in files]
    status, _, err = run_main(*flags, "--epochs", "2", "--resume")
    assert status == 0, err
    assert pico.load_runlog(tmp_path / "artefacts" / "same.json")["models"]["transformer"][
        "test_history"][-1]["epoch"] == 2
    assert all(path.read_text() != before for path, before in zip(files, first))


def test_the_newest_checkpoints_are_kept_and_hold_plain_data(pico, run_main, tmp_path):
    save = tmp_path / "ckpt"
    status, _, err = run_main(*TINY, "--models", "lstm_seq", "--save_dir", str(save),
                              "--checkpoint_every", "1", "--keep_checkpoints", "2")
    assert status == 0, err
    assert sorted(p.name for p in (save / "lstm_seq").iterdir()) == ["step_000005.pt",
                                                                     "step_000006.pt"]
    checkpoint = torch.load(save / "lstm_seq" / "step_000006.pt", weights_only=True)
    assert checkpoint["progress"]["finished"] and checkpoint["progress"]["step"] == 6
    assert checkpoint["tokenizer"] == {"spec": "char", "name": "char", "vocab_size": 257}
    assert checkpoint["args"]["block_size"] == 16 and set(checkpoint["rng"]) >= {"torch", "numpy"}
    assert [h["step"] for h in checkpoint["record"]["history"]] == list(range(1, 7))


def test_pruning_deletes_only_files_torch_saved(pico, tmp_path):
    """A file that only has a checkpoint's name (notes kept beside them) is never pruned."""
    series = pico.CheckpointSeries(tmp_path, "m", keep=1)
    series.directory.mkdir()
    notes = series.directory / "step_000000.pt"
    notes.write_text("my notes on this run\n")
    for step in (1, 2):
        series.save({"progress": {"step": step}})
    assert sorted(p.name for p in series.directory.iterdir()) == ["step_000000.pt", "step_000002.pt"]
    assert notes.read_text() == "my notes on this run\n"


def test_checkpoints_are_ordered_by_step_past_six_digits(pico, tmp_path):
    """step_1000000.pt sorts before step_999999.pt by name: pruning by name would delete the
    newest, and --resume would take the older."""
    series = pico.CheckpointSeries(tmp_path, "m", keep=1)
    for step in (999_999, 1_000_000):
        series.save({"progress": {"step": step}})
    assert [p.name for p in series.directory.iterdir()] == ["step_1000000.pt"]
    assert series.latest().name == "step_1000000.pt"


def test_the_checksum_covers_every_part_of_a_checkpoint(pico):
    """A changed loss in the stored record, a flag or the progress is damage the checksum
    sees, as a flipped weight is."""
    def checkpoint():
        return {"model": {"w": torch.zeros(2)}, "record": {"history": [{"train_loss": 1.0}]},
                "args": {"seed": 0}, "progress": {"step": 3}, "sha256": ""}
    digest = pico.checkpoint_digest(checkpoint())
    for part, change in [("model", lambda c: c["model"]["w"].add_(1e-7)),
                         ("record", lambda c: c["record"]["history"][0].update(train_loss=1.5)),
                         ("args", lambda c: c["args"].update(seed=1)),
                         ("progress", lambda c: c["progress"].update(step=4))]:
        changed = checkpoint()
        change(changed)
        assert pico.checkpoint_digest(changed) != digest, part
    assert pico.checkpoint_digest(checkpoint() | {"sha256": "anything"}) == digest


def test_a_flat_test_loss_is_no_improvement_and_a_gain_below_min_delta_neither(pico):
    training = pico.TrainingConfig(early_stop_patience=2)
    progress = pico.TrainingProgress(best_test_loss=1.0)
    pico.after_evaluation(progress, 1.0, training)
    assert progress.epochs_without_improvement == 1
    training = pico.TrainingConfig(early_stop_patience=5, early_stop_min_delta=0.25)
    progress = pico.TrainingProgress(best_test_loss=1.0)
    pico.after_evaluation(progress, 0.75, training)
    assert progress.epochs_without_improvement == 1 and progress.best_test_loss == 1.0


def test_a_plateau_cuts_the_learning_rate_once_every_patience_epochs(pico):
    """With --plateau_patience 2 a loss that stays flat halves the rate every second epoch,
    not every epoch once the patience has run out."""
    training = pico.TrainingConfig(plateau_patience=2, plateau_factor=0.5)
    progress = pico.TrainingProgress(best_test_loss=1.0)
    scales = []
    for _ in range(4):
        pico.after_evaluation(progress, 1.0, training)
        scales.append(progress.lr_scale)
    assert scales == [1.0, 0.5, 0.5, 0.25]


def test_a_model_stopped_early_by_the_same_patience_is_not_trained_again(pico):
    """Stopped after one epoch without improvement under --early_stop_patience 1, epochs left
    or not: the same command with --resume finds it done."""
    progress = pico.TrainingProgress(finished=True, epoch=3, epochs_without_improvement=1)
    assert pico.nothing_left_to_train(progress, pico.TrainingConfig(epochs=5,
                                                                    early_stop_patience=1))
    assert not pico.nothing_left_to_train(progress, pico.TrainingConfig(epochs=5))


def test_a_second_signal_under_torchrun_keeps_the_first_ones_number(pico):
    """Each rank hears Ctrl-C twice (from the terminal, and from torchrun): the stop, and the
    exit status, are the first signal's."""
    stop = pico.StopRequest(repeat_acts_at_once=False)
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)
    assert stop.signal_number == signal.SIGINT


def test_only_rank_0_writes_checkpoints(pico, tmp_path):
    """Under torchrun every rank holds the same weights; a rank other than 0 writing them too
    would race rank 0 for the same file, with its own random-number states in it."""
    series = pico.CheckpointSeries(tmp_path, "lstm_seq", 3)
    guard = pico.FaultTolerance("lstm_seq", pico.TrainingConfig(), checkpoints=series,
                                context=pico.Distributed(rank=1, world_size=2))
    assert guard.checkpoints is None and guard.save_checkpoint() is None
    assert list(tmp_path.iterdir()) == []


def test_pruning_and_resuming_read_only_the_names_save_writes(pico, tmp_path):
    """step_1.pt (a copy kept by hand) is no name save writes: neither pruned nor resumed."""
    series = pico.CheckpointSeries(tmp_path, "m", keep=1)
    for step in (1, 2):
        series.save({"progress": {"step": step}})
    kept = series.directory / "step_1.pt"
    kept.write_bytes((series.directory / "step_000002.pt").read_bytes())
    series.save({"progress": {"step": 3}})
    assert sorted(p.name for p in series.directory.iterdir()) == ["step_000003.pt", "step_1.pt"]
    assert [pico.checkpoint_step(tmp_path / name) for name in
            ("step_000003.pt", "step_1234567.pt", "step_1.pt", "step_0000003.pt")] == [3, 1234567, -1, -1]


def test_a_checkpoint_copied_under_a_newer_steps_name_is_not_resumed(pico, run_main, tmp_path):
    """--resume takes the newest name: a backup of step 3 kept as step_000099.pt would be
    resumed from, and training on would write over step 6. It is refused, and nothing changes."""
    save = tmp_path / "ckpt"
    flags = [*TINY, "--models", "lstm_seq", "--save_dir", str(save), "--checkpoint_every", "3"]
    assert run_main(*flags)[0] == 0
    folder = save / "lstm_seq"
    (folder / "step_000099.pt").write_bytes((folder / "step_000003.pt").read_bytes())
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    status, out, err = run_main(*flags, "--epochs", "3", "--resume")
    assert status == 2 and err.count("\n") == 1, err
    assert err.endswith("step_000099.pt holds step 3, but its name says step 99 (a copy renamed?); "
                        "rename it step_000003.pt if it belongs to this run, or move it away\n")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    status, _, err = run_main(*flags, "--epochs", "3", "--resume", str(folder / "step_000099.pt"))
    assert status == 2 and "its name says step 99" in err
    (folder / "step_000099.pt").rename(folder / "step_000000.pt")     # named as step 0 too
    status, _, err = run_main(*flags, "--epochs", "3", "--resume", str(folder / "step_000000.pt"))
    assert status == 2 and "holds step 3, but its name says step 0" in err, err


def test_a_resumed_checkpoint_is_held_to_its_own_kind_of_models_flags(pico, run_main, tmp_path):
    """An LSTM's checkpoint resumes whatever the Transformer's flags say now (the LSTM reads
    none of them), and is refused, naming only that flag, when one it reads changed."""
    save = tmp_path / "ckpt"
    first = ["--models", "lstm_seq", "--save_dir", str(save), "--run_name", "kinds"]
    assert run_main(*TINY, *first, "--d_model", "32", "--n_blocks", "1")[0] == 0
    resumed = [*first, "--resume", "--epochs", "3"]
    status, _, err = run_main(*TINY, *resumed, "--embed_size", "32", "--d_model", "64")
    assert status == 2 and "--embed_size 16 there, 32 now" in err and "--d_model" not in err, err
    status, _, err = run_main(*TINY, *resumed, "--d_model", "64", "--n_heads", "4",
                              "--transformer_variant", "minGPT")
    assert status == 0, err


def test_resuming_into_a_run_log_cut_short_says_it_cannot_be_continued(pico, run_main, tmp_path):
    save = tmp_path / "ckpt"
    first = [*TINY, "--models", "lstm_seq", "--save_dir", str(save), "--run_name", "cut"]
    assert run_main(*first)[0] == 0
    log = tmp_path / "artefacts" / "cut.json"
    log.write_text(log.read_text()[:100])
    status, _, err = run_main(*first, "--resume", "--epochs", "3")
    assert status == 2 and err.count("\n") == 1, err
    assert f"cannot read run log {log}" in err and "so it cannot be continued" in err
    assert "resume with a new --run_name" in err
    assert len(log.read_text()) == 100


def test_generate_from_a_checkpoint_repeats_the_runs_greedy_sample(pico, run_main, tmp_path):
    save = tmp_path / "ckpt"
    assert run_main(*TINY, "--models", "lstm_seq", "--save_dir", str(save), "--run_name", "r")[0] == 0
    samples = pico.load_runlog(tmp_path / "artefacts" / "r.json")["models"]["lstm_seq"]["samples"]
    greedy = [s["text"] for s in samples if s["rule"] == "greedy"][-1]
    status, out, err = run_main("--generate", "--checkpoint", str(save / "lstm_seq" / "step_000006.pt"),
                                "--prompt", "Once upon a time", "--temperature", "0",
                                "--max_new_tokens", "4")
    assert status == 0, err
    assert out == greedy + "\n"


@pytest.mark.parametrize("terminal", [True, False])
def test_generate_escapes_control_characters_on_a_terminal_only(pico, run_main, tmp_path,
                                                                monkeypatch, terminal):
    """A model can emit any byte: on a terminal, an escape sequence or a carriage return in
    its text would clear the screen or rewrite the line, so they are shown as escapes; into a
    file or pipe the text goes as generated. Newlines and tabs stay as they are."""
    save = tmp_path / "ckpt"
    assert run_main(*TINY, "--models", "lstm_seq", "--save_dir", str(save), "--run_name", "r")[0] == 0
    controls = iter(b"\x1b[2J\tdone\r\nnext\x07")        # the model "samples" these bytes
    monkeypatch.setattr(pico, "sample_next_token", lambda *args: torch.tensor([next(controls)]))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    status, out, err = run_main("--generate", "--checkpoint", str(save / "lstm_seq" / "step_000006.pt"),
                                "--max_new_tokens", "16")
    assert status == 0, err
    tail = "\\x1b[2J\tdone\\r\nnext\\x07\n" if terminal else "\x1b[2J\tdone\r\nnext\x07\n"
    assert out.endswith(tail), repr(out)


def test_the_digest_covers_tensor_shapes_and_key_names(pico):
    """A bit flipped in a tensor's recorded shape or in a state_dict key must not pass."""
    weights = torch.arange(6.0)
    assert (pico.checkpoint_digest({"w": weights.reshape(2, 3)})
            != pico.checkpoint_digest({"w": weights.reshape(3, 2)}))
    assert pico.checkpoint_digest({"a": 1, "c": 2}) != pico.checkpoint_digest({"b": 1, "c": 2})


def test_restoring_random_states_replays_every_generator(pico):
    import numpy as np
    saved = pico.rng_states()
    first = (torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random())
    pico.restore_rng_states(saved)
    assert (torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()) == first


@pytest.mark.parametrize("change", [
    {"position": 625}, {"position": 100_000_000},                     # past numpy's 624 keys
    {"keys": torch.full((624,), -1, dtype=torch.int64)},              # read as 4294967295
    {"keys": torch.full((624,), 2**32, dtype=torch.int64)}])
def test_a_numpy_state_numpy_would_take_and_then_crash_on_is_refused(pico, change):
    """numpy's set_state takes these, and a draw past its keys then ends the interpreter with
    a segmentation fault, whenever it comes; a key out of range wraps round unseen."""
    saved = pico.rng_states()
    saved["numpy"] = {**saved["numpy"], **change}
    with pytest.raises(ValueError, match="numpy's generator state is not one numpy writes"):
        pico.restore_rng_states(saved)


def test_checkpoints_come_every_checkpoint_every_steps(pico):
    """The fast tests checkpoint every step; every 3rd is steps 3 and 6 of 7, not 2 and 5."""
    tolerance = pico.FaultTolerance("m", pico.TrainingConfig(), checkpoint_every=3)
    saved = []
    tolerance.save_checkpoint = lambda: saved.append(tolerance.progress.step)
    for step in range(1, 8):
        tolerance.progress = pico.TrainingProgress(step=step)
        tolerance.after_step()
    assert saved == [3, 6]


def test_checkpoints_ask_for_gpu_random_states_only_where_cuda_is_in_use(pico, monkeypatch):
    """A CPU run on a machine with a GPU must not start CUDA to save its random states: a
    context of a few hundred MB in every process (each test worker, each gloo rank)."""
    def starts_cuda():
        raise AssertionError("started CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", starts_cuda)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert pico.rng_states()["cuda"] == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(3, dtype=torch.uint8)])
    assert len(pico.rng_states()["cuda"]) == 1


def test_checkpoints_carry_the_apple_gpus_random_state(pico, monkeypatch):
    """Dropout on Apple's GPU (MPS) draws from its own generator, which build_model's seeding
    resets: unsaved, a resumed run would replay the first steps' dropout masks."""
    state = torch.arange(8, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *args: state)
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda new, *args: restored.append(new))
    saved = pico.rng_states()
    assert saved["mps"] is state
    pico.restore_rng_states(saved)
    assert restored == [state]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    pico.restore_rng_states(saved)                     # written on a Mac, resumed elsewhere
    assert restored == [state] and "mps" not in pico.rng_states()


def test_a_bpe_checkpoint_carries_its_tokenizer(pico, run_main, tmp_path):
    save = tmp_path / "ckpt"
    argv = [a if a != "char" else "bpe:300" for a in TINY]
    assert "bpe:300" in argv
    status, _, err = run_main(*argv, "--models", "lstm_seq", "--save_dir", str(save),
                              "--run_name", "b")
    assert status == 0, err
    samples = pico.load_runlog(tmp_path / "artefacts" / "b.json")["models"]["lstm_seq"]["samples"]
    greedy = [s["text"] for s in samples if s["rule"] == "greedy"][-1]
    import shutil
    shutil.rmtree(tmp_path / "cache")            # generation must not need the training cache
    status, out, err = run_main("--generate", "--checkpoint", str(save / "lstm_seq" / "step_000006.pt"),
                                "--prompt", "Once upon a time", "--temperature", "0",
                                "--max_new_tokens", "4")
    assert status == 0, err
    assert out == greedy + "\n"


def test_a_bpe_run_resumes_only_on_the_text_its_tokenizer_was_trained_on(run_main, tmp_path):
    """Its tokenizer is trained again from the text on --resume: from edited text, other merges
    would give the same ids to other tokens, and the weights would be read as nonsense."""
    corpus = tmp_path / "stories.txt"
    corpus.write_text((REPO / "3seqs.txt").read_text())
    argv = [a if a != "char" else "bpe:300" for a in TINY]
    argv[argv.index("--input_files") + 1] = str(corpus)
    save = tmp_path / "ckpt"
    common = [*argv, "--models", "lstm_seq", "--save_dir", str(save), "--run_name", "b"]
    assert run_main(*common)[0] == 0
    resume = [*common, "--resume", "--epochs", "3", "--run_name", "b2"]
    corpus.write_text("\n".join(f"a quite different story, number {i}" for i in range(60)))
    status, _, err = run_main(*resume)
    assert status == 2 and "was trained on other text than this run's" in err, err
    corpus.write_text((REPO / "3seqs.txt").read_text())
    status, _, err = run_main(*resume)
    assert status == 0, err


def test_an_imported_tokenizers_other_text_may_be_an_earlier_versions_key(pico):
    """An imported tokenizer's token cache is keyed on its end-of-text id too since
    2026-12-07: a fine-tune checkpoint written before reads as trained on other text, and the
    refusal says that this may be why."""
    import types
    checkpoint = {"data_sha256": "before", "tokenizer": {"spec": "hf", "tokenizer_json": "{}"}}
    with pytest.raises(pico.UserError, match=r"\(a data file changed since, or an earlier "
                                             r"pico-llm version wrote the checkpoint\)"):
        pico.check_same_data(Path("step.pt"), checkpoint, types.SimpleNamespace(fingerprint="now"))


def test_a_run_resumes_only_on_the_text_it_was_trained_on(run_main, tmp_path):
    """With the same flags a data file may still have changed: characters keep their ids, but
    the resumed run would train on other examples than the run it continues."""
    corpus = tmp_path / "stories.txt"
    text = (REPO / "3seqs.txt").read_text()
    corpus.write_text(text)
    argv = list(TINY)
    argv[argv.index("--input_files") + 1] = str(corpus)
    common = [*argv, "--models", "lstm_seq", "--save_dir", str(tmp_path / "ckpt"), "--run_name", "c"]
    assert run_main(*common)[0] == 0
    resume = [*common, "--resume", "--epochs", "3", "--run_name", "c2"]
    corpus.write_text(text.replace("1", "7", 1))              # one digit of the first example
    status, _, err = run_main(*resume)
    assert status == 2 and "was trained on other text than this run reads (a data file " \
        "changed since); resume" in err, err
    assert not (tmp_path / "artefacts" / "c2.json").exists()
    corpus.write_text(text)
    status, _, err = run_main(*resume)
    assert status == 0, err


def test_a_checkpoint_older_than_the_data_digest_resumes_unchecked(pico):
    """Checkpoints written before they held the digest of their text carry none: nothing to
    compare, so they resume; one that holds another digest is refused."""
    data = object.__new__(pico.TrainingData)
    data.fingerprint = "abc"
    pico.check_same_data(Path("old.pt"), {}, data)
    pico.check_same_data(Path("same.pt"), {"data_sha256": "abc"}, data)
    with pytest.raises(pico.UserError, match="other text than this run reads"):
        pico.check_same_data(Path("other.pt"), {"data_sha256": "xyz"}, data)


class RunsCode:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("flags", [["--generate", "--checkpoint"], [*TINY, "--resume"]],
                         ids=["generate", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused(run_main, tmp_path, writer, flags):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"format": "pico-llm checkpoint", "model": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    status, _, err = run_main(*flags, str(evil))
    assert status == 2
    # torch's own format names the callable; a bare pickle fails on its first opcode
    expected = "refused to load" if writer == "torch.save" else "not a readable checkpoint"
    assert expected in one_error_line(err)
    assert not marker.exists()


def nan_on_training_call(pico, monkeypatch, bad_call: int):
    """Make the loss of the bad_call-th training forward pass NaN (whichever loss module
    Appendix A's loss_kind chose)."""
    calls = []

    def nan_at_bad_call(real_forward):
        def forward(self, inputs, targets, position_weights):
            value = real_forward(self, inputs, targets, position_weights)
            calls.append(1)
            return value * float("nan") if len(calls) == bad_call else value
        return forward

    for loss_class in (pico.ChunkedNextTokenLoss, pico.FusedNextTokenLoss):
        monkeypatch.setattr(loss_class, "forward", nan_at_bad_call(loss_class.forward))


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(pico, run_main, tmp_path,
                                                                           monkeypatch):
    nan_on_training_call(pico, monkeypatch, 3)
    save = tmp_path / "ckpt"
    status, _, err = run_main(*TINY, "--models", "lstm_seq", "--save_dir", str(save),
                              "--checkpoint_every", "1", "--run_name", "nan")
    assert status == 2
    line = one_error_line(err)
    assert "loss became nan at step 3 (lr " in line and "step_000002.pt" in line
    assert sorted(p.name for p in (save / "lstm_seq").iterdir())[-1] == "step_000002.pt"
    assert pico.load_runlog(tmp_path / "artefacts" / "nan.json")["status"] == "failed"


def test_skip_nonfinite_skips_a_bad_step_and_finishes(pico, run_main, tmp_path, monkeypatch):
    nan_on_training_call(pico, monkeypatch, 3)
    status, out, err = run_main(*TINY, "--models", "lstm_seq", "--skip_nonfinite", "1",
                                "--run_name", "skip")
    assert status == 0, err
    record = pico.load_runlog(tmp_path / "artefacts" / "skip.json")["models"]["lstm_seq"]
    assert record["skipped_steps"] == [3]
    assert [h["step"] for h in record["history"]] == [1, 2, 4, 5, 6]
    assert "step 3 skipped: loss became nan" in out


def test_training_step_refuses_an_infinite_gradient_without_updating(pico):
    model = pico.LSTMSeqModel(vocab_size=5, embed_size=4, hidden_size=4)
    first = next(model.parameters())
    first.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    batch = pico.make_batch([torch.tensor([0, 1, 2, 1]).numpy()], 8, 0)
    with pytest.raises(pico.NonFiniteStep, match="gradient norm became"):
        pico.training_step(pico.NextTokenLoss(model), optimizer, [(batch, True)],
                           batch.num_target_tokens, grad_clip=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_early_stopping_ends_training_when_the_test_loss_stalls(pico, run_main, tmp_path):
    status, _, err = run_main(*TINY, "--models", "kgram_mlp_seq", "--epochs", "5",
                              "--early_stop_patience", "1", "--early_stop_min_delta", "10",
                              "--run_name", "early")
    assert status == 0, err
    record = pico.load_runlog(tmp_path / "artefacts" / "early.json")["models"]["kgram_mlp_seq"]
    assert [t["epoch"] for t in record["test_history"]] == [1, 2]
    assert record["stopped_early_after_epoch"] == 2 and len(record["history"]) == 6


def test_a_resume_at_the_default_verbosity_says_where_each_model_stands(run_main, tmp_path):
    """Without --quiet (every other resume test is quiet): a model with steps left says which
    checkpoint and step it resumes from, one already finished that it is not retrained."""
    loud = [flag for flag in TINY if flag != "--quiet"]
    save = ["--save_dir", str(tmp_path / "save"), "--run_name", "r"]
    assert run_main(*loud, *TWO_MODELS, *save)[0] == 0
    status, out, err = run_main(*loud, *TWO_MODELS, *save, "--resume", "--epochs", "3")
    assert status == 0, err
    step_6 = tmp_path / "save" / "lstm_seq" / "step_000006.pt"
    assert f"[lstm_seq] resuming from {step_6}: step 6, epoch 3" in out
    assert "[kgram_mlp_seq] resuming from" in out and "epoch 3 step 9/9" in out
    status, out, err = run_main(*loud, *TWO_MODELS, *save, "--resume", "--epochs", "3")
    assert status == 0, err
    assert (f"model lstm_seq: finished in {tmp_path / 'save' / 'lstm_seq' / 'step_000009.pt'}, "
            "not retrained") in out


def test_a_damaged_checkpoint_names_the_newest_good_one_past_other_damaged_ones(run_main,
                                                                              tmp_path):
    """Steps 4, 5 and 6 kept: with 6 cut short, --checkpoint step 6 names step 5, the newest
    good one before it, not the oldest; with 5 cut short too, it looks past step 5 to step 4;
    with step 4 cut short too, it says no other checkpoint there is good."""
    save = tmp_path / "save"
    assert run_main(*TINY, "--models", "lstm_seq", "--save_dir", str(save), "--checkpoint_every",
                    "1", "--keep_checkpoints", "3")[0] == 0
    series = save / "lstm_seq"
    assert sorted(p.name for p in series.iterdir()) == [f"step_00000{i}.pt" for i in (4, 5, 6)]

    def cut_short(step):
        path = series / f"step_00000{step}.pt"
        path.write_bytes(path.read_bytes()[:1000])
    cut_short(6)
    argv = ["--generate", "--checkpoint", str(series / "step_000006.pt")]
    status, _, err = run_main(*argv)
    newest = f"the newest good checkpoint before it is {series / 'step_000005.pt'}"
    assert status == 2 and newest in err, err
    cut_short(5)
    status, _, err = run_main(*argv)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the newest good checkpoint before it is {series / 'step_000004.pt'}" in err
    cut_short(4)
    status, _, err = run_main(*argv)
    assert status == 2 and f"no other checkpoint in {series} is good" in err


def test_patience_counts_each_stalled_epoch_before_it_acts(pico):
    """Early-stop patience 3 and plateau patience 2: the first stalled epoch changes nothing,
    the second halves the learning rate, the third stops; an improvement resets the count."""
    training = pico.TrainingConfig(early_stop_patience=3, plateau_patience=2, plateau_factor=0.5,
                                   early_stop_min_delta=0.1)
    progress = pico.TrainingProgress(best_test_loss=1.0)
    assert pico.after_evaluation(progress, 0.95, training) is None      # a gain below min_delta
    assert (progress.lr_scale, progress.finished, progress.epochs_without_improvement) == (1, False, 1)
    assert "learning rate x0.5" in pico.after_evaluation(progress, 1.0, training)
    assert progress.lr_scale == 0.5 and not progress.finished
    assert "stopping early" in pico.after_evaluation(progress, 1.0, training)
    assert progress.finished and progress.epochs_without_improvement == 3
    progress = pico.TrainingProgress(best_test_loss=1.0, epochs_without_improvement=2)
    assert pico.after_evaluation(progress, 0.5, training) is None
    assert (progress.best_test_loss, progress.epochs_without_improvement) == (0.5, 0)


@pytest.mark.parametrize("patience", ["--early_stop_patience", "--plateau_patience"])
def test_patience_on_a_text_that_leaves_no_test_set_is_refused(run_main, tmp_path, patience):
    """One line of text holds out nothing, as --test_fraction 0 does (refused for these flags):
    the run trained to its end and the flag never acted."""
    (tmp_path / "one.txt").write_text("hi there\n")
    status, _, err = run_main("--input_files", str(tmp_path / "one.txt"), "--models", "lstm_seq",
                              "--epochs", "2", patience, "1")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "this text leaves no example for the test set" in err
    assert not (tmp_path / "artefacts").exists()


def test_a_plateau_lowers_the_learning_rate_down_to_lr_min(pico, run_main, tmp_path):
    status, _, err = run_main(*TINY, "--models", "kgram_mlp_seq", "--epochs", "4",
                              "--plateau_patience", "1", "--plateau_factor", "0.5",
                              "--early_stop_min_delta", "10", "--lr_schedule", "constant",
                              "--warmup_steps", "0", "--learning_rate", "0.004", "--lr_min", "0.0015",
                              "--run_name", "plateau")
    assert status == 0, err
    history = pico.load_runlog(tmp_path / "artefacts" / "plateau.json")["models"]["kgram_mlp_seq"]["history"]
    per_epoch = {h["epoch"]: h["lr"] for h in history}
    assert per_epoch == pytest.approx({1: 0.004, 2: 0.004, 3: 0.002, 4: 0.0015})


def test_a_full_disk_is_one_error_line_and_keeps_the_last_checkpoint(pico, run_main, tmp_path,
                                                                     monkeypatch):
    real_write, saves = pico.atomic_write_bytes, []

    def disk_fills_after_one_checkpoint(path, data):
        if path.suffix == ".pt":
            saves.append(path)
            if len(saves) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(pico, "atomic_write_bytes", disk_fills_after_one_checkpoint)
    save = tmp_path / "ckpt"
    status, _, err = run_main(*TINY, "--models", "lstm_seq", "--save_dir", str(save),
                              "--checkpoint_every", "1")
    assert status == 2
    line = one_error_line(err)
    assert "cannot write checkpoint" in line and "No space left" in line and "step_000001.pt" in line
    assert [p.name for p in (save / "lstm_seq").iterdir()] == ["step_000001.pt"]
    pico.load_checkpoint(save / "lstm_seq" / "step_000001.pt", "--resume")


def test_a_file_size_limit_hit_inside_torch_save_is_one_error_line(tmp_path):
    """torch.save's writer reports the file's OSError inside a RuntimeError of its own; the
    save must still end in the one line a full disk gets, not a traceback."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    argv = [a for a in TINY if a != "--quiet"]
    result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--models", "lstm_seq",
                             "--save_dir", str(tmp_path / "ckpt"), "--checkpoint_every", "1",
                             "--artefacts_dir", str(tmp_path / "art"), "--cache_dir", "",
                             "--quiet"], capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "cannot write checkpoint" in line and "File too large" in line
    assert list((tmp_path / "ckpt" / "lstm_seq").iterdir()) == []      # no temporary file left


def test_a_checkpoint_streams_to_disk_without_a_copy_in_memory(pico, tmp_path):
    """torch.save writes into the file: a 16 MB checkpoint once took a 16 MB bytes copy first
    (for a 1B-parameter model with AdamW, 12 GB more at every save)."""
    weights = {"weight": torch.zeros(4_000_000)}                          # 16 MB
    series = pico.CheckpointSeries(tmp_path, "model", keep=2)
    tracemalloc.start()
    try:
        path = series.save({"progress": {"step": 1}, "model": weights})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak
    assert torch.equal(torch.load(path, weights_only=True)["model"]["weight"], weights["weight"])


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(pico, tmp_path):
    target = tmp_path / "step_000001.pt"
    target.write_bytes(b"the previous checkpoint")

    def writes_half_then_fails(file):
        file.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        pico.atomic_write_bytes(target, writes_half_then_fails)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001.pt"]
    assert target.read_bytes() == b"the previous checkpoint"
    pico.atomic_write_bytes(target, lambda file: file.write(b"new"))
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("how", ["bytes", "writer"])
def test_a_file_is_replaced_whole_after_its_new_contents_reach_the_disk(pico, tmp_path, monkeypatch,
                                                                        how):
    """atomic_write_bytes renames a finished file over the old one: a reader holding the old
    file still reads it whole (a rewrite in place would change it under the reader), the name
    points to a new file, and the new contents were flushed to the disk (fsync) before the
    rename, so that a power cut cannot leave the name on an empty file."""
    target = tmp_path / "run.json"
    target.write_bytes(b"the previous run log")
    events = []                                            # (call, inode of the file)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", os.stat(source).st_ino))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with open(target, "rb") as reader:
        old_inode = os.fstat(reader.fileno()).st_ino
        pico.atomic_write_bytes(target, b"new" if how == "bytes" else (lambda f: f.write(b"new")))
        assert reader.read() == b"the previous run log"
    assert target.read_bytes() == b"new" and target.stat().st_ino != old_inode
    renamed = target.stat().st_ino                   # the new file: synced, then renamed
    assert ("fsync", renamed) in events and ("replace", renamed) in events
    assert events.index(("fsync", renamed)) < events.index(("replace", renamed))
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_checkpoint_from_before_run_ids_continues_the_log_of_its_run_name(pico, tmp_path):
    """Checkpoints written before runs had ids are matched to a run log by the --run_name and
    --artefacts_dir they were trained with: those continue it, another name is refused."""
    run_path = tmp_path / "art" / "r.json"
    log = {"run_id": "a-later-run", "created": "then", "args": {"save_dir": "s"}}
    (tmp_path / "art" / "sub").mkdir(parents=True)     # the folder however it was written
    old = {"args": {"run_name": "r", "artefacts_dir": str(tmp_path / "art" / "sub" / "..")}}
    pico.check_run_log_is_the_checkpoints(run_path, log, {"m": (Path("c.pt"), old)})
    other = {"args": {"run_name": "q", "artefacts_dir": str(tmp_path / "art")}}
    with pytest.raises(pico.UserError, match="records another run .* \\(run q\\)"):
        pico.check_run_log_is_the_checkpoints(run_path, log, {"m": (Path("c.pt"), other)})
    with pytest.raises(pico.UserError, match="records another run"):   # an id decides alone
        pico.check_run_log_is_the_checkpoints(run_path, log, {"m": (Path("c.pt"),
                                                                    {**old, "run_id": "x"})})


def test_a_rename_that_fails_leaves_no_temporary_file(pico, tmp_path):
    """The new contents are written beside the target, then renamed over it: where the rename
    fails (here the target is a folder with files), the error goes up and the finished
    temporary file is removed, not left to fill the folder."""
    (tmp_path / "run.json").mkdir()
    (tmp_path / "run.json" / "inside").write_text("kept\n")
    with pytest.raises(OSError):
        pico.atomic_write_bytes(tmp_path / "run.json", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    assert (tmp_path / "run.json" / "inside").read_text() == "kept\n"


@pytest.mark.parametrize("relative", [False, True])
def test_a_file_named_through_a_symbolic_link_is_written_through_it(pico, tmp_path, monkeypatch,
                                                                   relative):
    """A run log, sweep file or notebook given as a link: the file it names gets the new
    contents and the link stays. Renamed over, the link had become a new file of its own and
    the file it named stayed as it was (a sweep continued from its points, then wrote elsewhere).
    A relative link is read from its own folder, wherever the run started."""
    from pico_module import write_text_atomically
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name, write in (("log.json", lambda path: pico.atomic_write_json(path, {"points": 4})),
                        ("n.ipynb", lambda path: write_text_atomically(path, "new\n"))):
        target, link = tmp_path / "real" / name, tmp_path / f"link_{name}"
        target.write_text("old\n")
        link.symlink_to(Path("real") / name if relative else target)
        write(link)
        assert link.is_symlink() and link.resolve() == target
        assert target.read_text() != "old\n" and link.read_text() == target.read_text()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["log.json", "n.ipynb"]
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_default_run_names_of_two_processes_differ_even_in_the_same_second(pico, monkeypatch):
    output = pico.OutputConfig(artefacts_dir="/nonexistent")
    monkeypatch.setattr(time, "strftime", lambda fmt: "20250101-000000")
    first = pico.choose_run_path(output, ["lstm_seq"])
    monkeypatch.setattr(os, "getpid", lambda: 424242)
    assert pico.choose_run_path(output, ["lstm_seq"]) != first


def test_a_second_ctrl_c_interrupts_at_once(pico):
    with pico.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; this gives it one


def test_a_second_signal_arriving_with_the_first_stops_at_once_and_a_third_kills(pico):
    """SIGINT then SIGTERM at once (both waiting when Python runs the first's handler): the
    second is raised where the program stands (main() says so in one line), rather than being
    dropped with an "ignored due to race condition" traceback; a third, during the clean-up,
    ends the process with the system's default action."""
    from conftest import probe_loading
    probe = (probe_loading("pico", SCRIPT, "pico_llm") + "import os, signal, time\n"
             "both = {signal.SIGINT, signal.SIGTERM}\n"
             "with pico.StopRequest() as stop:\n"
             "    try:\n"
             "        signal.pthread_sigmask(signal.SIG_BLOCK, both)\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n"
             "        os.kill(os.getpid(), signal.SIGTERM)\n"
             "        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)\n"
             "        print('still running after', stop.signal_number)\n"
             "    except pico.Terminated as second:\n"
             "        print('terminated by', second.signal_number, flush=True)\n"
             "        os.kill(os.getpid(), signal.SIGTERM)\n"
             "        time.sleep(5)\n"
             "        print('still running after a third')\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGTERM, (result.stdout, result.stderr)
    assert result.stdout == f"terminated by {int(signal.SIGTERM)}\n" and result.stderr == ""


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGINT)])
def test_two_signals_during_training_stop_it_at_once_in_one_line(pico, tmp_path, first, second):
    """Two different signals at once had ended the run without a word, killed by SIGTERM: now
    the second says so, as a second Ctrl-C does. (Both wait until Python runs their handlers,
    which take them in the order of their numbers, SIGINT first, whatever order they came.)"""
    process = start_long_run(tmp_path)
    wait_for_first_step(process)
    process.send_signal(first)
    process.send_signal(second)
    _, err = process.communicate(timeout=60)
    said = {130: "pico-llm: interrupted", 143: "pico-llm: terminated"}.get(process.returncode)
    assert said is not None, (process.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == said, err


def test_under_torchrun_a_repeated_signal_is_the_same_request(pico):
    """Ctrl-C reaches a rank from the terminal and again from torchrun: one request."""
    before = signal.getsignal(signal.SIGINT)
    with pico.StopRequest(repeat_acts_at_once=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)                      # no KeyboardInterrupt, no termination
        assert stop.signal_number == signal.SIGINT   # the first one is reported
    assert signal.getsignal(signal.SIGINT) is before                       # restored on exit


def test_a_hangup_silences_only_a_terminal_and_nohup_still_ignores_it(pico, monkeypatch):
    """After SIGHUP the terminal is gone, and writing to it fails: standard output and error
    go nowhere from then on where they were a terminal (a pipe or a file keeps them)."""
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP here")
    moved, missed = [], []
    monkeypatch.setattr(pico.os, "isatty", lambda descriptor: descriptor == 2)
    monkeypatch.setattr(pico.os, "dup2", lambda source, target: moved.append(target))
    before = signal.signal(signal.SIGHUP, lambda *frame: missed.append(1))   # not this process's end
    try:
        with pico.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.5)
        assert stop.signal_number == signal.SIGHUP and moved == [2] and not missed
        signal.signal(signal.SIGHUP, signal.SIG_IGN)                # as nohup starts it
        with pico.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.5)
        assert stop.signal_number is None
    finally:
        signal.signal(signal.SIGHUP, before)


def start_long_run(tmp_path, *extra):
    """A training subprocess with thousands of steps, logging every step. It hears SIGHUP
    even where the tests run under nohup, whose ignoring of it a child inherits (and a run
    rightly keeps, test_a_hangup_silences_only_a_terminal_and_nohup_still_ignores_it)."""
    argv = [a for a in TINY if a not in ("--quiet",)]
    argv[argv.index("--epochs") + 1] = "1000"
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv, "--models", "lstm_seq", "--log_interval", "1",
         "--save_dir", str(tmp_path / "ckpt"), "--artefacts_dir", str(tmp_path / "artefacts"),
         "--cache_dir", str(tmp_path / "cache"), "--run_name", "long", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))


def wait_for_first_step(process) -> None:
    """Read the run's output until it logs a training step (a resumed run starts past 1; its
    "resuming from ...: step N" line comes before its first step, seconds before on a busy
    machine)."""
    for line in process.stdout:
        if re.search(r"\] epoch \d+ step \d+/", line):
            return
    pytest.fail("the run ended before its first step: " + process.stderr.read())


@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                                   (signal.SIGHUP, 129)])   # a dropped ssh connection
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(pico, tmp_path,
                                                                               signal_number, status):
    process = start_long_run(tmp_path)
    wait_for_first_step(process)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert "--resume" in one_error_line(err)
    saved = list((tmp_path / "ckpt" / "lstm_seq").glob("step_*.pt"))
    assert len(saved) == 1
    checkpoint = pico.load_checkpoint(saved[0], "--resume")
    log = pico.load_runlog(tmp_path / "artefacts" / "long.json")
    assert log["status"] == "interrupted"
    assert len(log["models"]["lstm_seq"]["history"]) == checkpoint["progress"]["step"] >= 1


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_every_file_valid(pico, tmp_path):
    """Kill a checkpointing run 5 times at random moments, resuming each time: every
    checkpoint and run log on disk stays loadable; only hidden temporary files may be left."""
    rng = random.Random(6)
    for attempt in range(5):
        resume = ["--resume"] if list(tmp_path.glob("ckpt/lstm_seq/step_*.pt")) else []
        process = start_long_run(tmp_path, "--checkpoint_every", "1", "--keep_checkpoints", "2",
                                 "--run_name", f"long{attempt}", *resume)  # a log never replaced
        wait_for_first_step(process)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.communicate(timeout=60)
        files = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts]
        for path in files:
            if path.name.startswith("."):
                assert path.name.endswith(".tmp"), path
            elif path.suffix == ".pt":
                pico.load_checkpoint(path, "--resume")
            else:
                json.loads(path.read_text())
    steps = sorted(int(p.stem[5:]) for p in tmp_path.glob("ckpt/lstm_seq/step_*.pt"))
    # A checkpoint is written before the oldest is deleted (never fewer than --keep_checkpoints
    # good ones), so a kill between the two leaves one extra: 2 or 3 files, both fine.
    assert len(steps) in (2, 3) and steps[-1] >= 5


# --- bad input: one line, status 2, no traceback, no file changed -------------------------
CHECKPOINT_RUN = [*TINY, "--models", "kgram_mlp_seq", "--epochs", "1", "--max_steps_per_epoch", "2"]
LONG_PROMPT = "word " * 40

BAD_CHECKPOINT_INPUTS = [
    (["--resume", "{truncated}"], "not a readable checkpoint (truncated, corrupt"),
    (["--resume", "{random_bytes}"], "not a readable checkpoint"),
    (["--resume", "{text}"], "not a readable checkpoint (truncated, corrupt or not from "
                             "pico-llm: not a file written by torch.save)"),
    (["--resume", "{pickled}"], "a plain Python pickle (protocol 4), not a file written by torch.save"),
    (["--resume", "{evil}"], "refused to load"),
    (["--resume", "{not_pico}"], "not a pico-llm checkpoint"),
    (["--resume", "{future}"], "is checkpoint version 99; this pico-llm reads versions 1 and"),
    (["--generate", "--checkpoint", "{future}"], "is checkpoint version 99"),
    (["--generate", "--checkpoint", "{boolean_version}"], "is checkpoint version True"),
    (["--resume", "{empty_save}"], "no checkpoints of kgram_mlp_seq"),
    (["--resume", "{save}/kgram_mlp_seq"], "is one model's folder of a --save_dir; give that "
                                            "--save_dir, {save}, or one checkpoint file in it"),
    (["--resume", "{save}/missing"], "does not exist"),
    (["--resume", "{misplaced_save}", "--models", "lstm_seq"],   # had been called an unfit lstm
     "{misplaced_save}/lstm_seq/step_000002.pt holds model kgram_mlp_seq, not the lstm_seq of "
     "the folder it is in; move it to {misplaced_save}/kgram_mlp_seq, or away"),
    (["--resume"], "--resume without a path resumes from --save_dir"),
    (["--resume", "{ckpt}", "--models", "lstm_seq"], "holds model kgram_mlp_seq"),
    (["--resume", "{ckpt}", "--block_size", "24"], "--block_size 16 there, 24 now"),
    (["--resume", "{ckpt}", "--tokenizer", "gpt2"], "--tokenizer 'char' there, 'gpt2' now"),
    (["--resume", "{save}", "--embed_size", "32"], "--embed_size 16 there, 32 now"),
    (["--resume", "{save}", "--seed", "1"], "--seed 1337 there, 1 now"),
    (["--resume", "{save}", "--learning_rate", "0.01"], "--learning_rate 0.003 there, 0.01 now"),
    (["--save_dir", "{text}"], "is not a directory"),
    (["--save_dir", "{save}"], "already holds checkpoints of kgram_mlp_seq (step_000002.pt)"),
    (["--save_dir", "{save}", "--resume", "{other_save}"], "already holds checkpoints"),
    (["--run_name", "earlier"], "earlier.json already exists"),
    (["--checkpoint_every", "5"], "--checkpoint_every needs --save_dir"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be at least 1"),
    (["--generate"], "--generate needs --checkpoint"),
    (["--checkpoint", "{ckpt}"], "--checkpoint is read by --generate"),
    (["--generate", "--checkpoint", "{folder}"], "is a directory"),
    (["--generate", "--checkpoint", "{save}"],                # the newest checkpoint, named
     "is a directory; give a checkpoint file, such as {save}/kgram_mlp_seq/step_000002.pt"),
    (["--checkpoint", "{save}/kgram_mlp_seq", "--export_hf", "{folder}/hf"],
     "is a directory; give a checkpoint file, such as {save}/kgram_mlp_seq/step_000002.pt"),
    (["--generate", "--checkpoint", "{save}/nope.pt"], "does not exist"),
    (["--generate", "--checkpoint", "{evil}"], "refused to load"),
    (["--generate", "--checkpoint", "{truncated}"], "not a readable checkpoint"),
    (["--generate", "--checkpoint", "{ckpt}", "--resume", "{save}"], "--generate does not train"),
    (["--generate", "--checkpoint", "{ckpt}", "--save_dir", "{save}", "--checkpoint_every", "5"],
     "--generate does not train; drop --save_dir and --checkpoint_every"),
    (["--generate", "--checkpoint", "{ckpt}", "--prompt", LONG_PROMPT],
     "longer than the checkpoint's --block_size 16"),
    (["--generate", "--checkpoint", "{ckpt}", "--models", "lstm_seq"],
     "holds model kgram_mlp_seq, which --models lstm_seq does not name; drop --models"),
    (["--generate", "--checkpoint", "{ckpt}", "--tokenizer", "gpt2"],
     "whose model was trained with --tokenizer char; drop --tokenizer"),
    (["--checkpoint", "{ckpt}", "--export_hf", ""], "--export_hf is empty"),
    (["--generate", "--checkpoint", "{ckpt}", "--embed_size", "32"],
     "holds a model trained with --embed_size 16, and --generate takes it as trained; drop --embed_size 32"),
    (["--generate", "--checkpoint", "{ckpt}", "--kgram_k", "5"], "trained with --kgram_k 3"),
    (["--generate", "--checkpoint", "{ckpt}", "--block_size", "24"], "trained with --block_size 16"),
    (["--generate", "--checkpoint", "{ckpt}", "--block_size", "64"],       # typed at its default
     "trained with --block_size 16, and --generate takes it as trained; drop --block_size 64"),
    (["--generate", "--checkpoint", "{ckpt}", "--embed_size=128"], "drop --embed_size 128"),
    (["--checkpoint", "{ckpt}", "--export_hf", "{folder}/hf", "--kgram_k", "5"],
     "--export_hf takes it as trained; drop --kgram_k 5"),
    (["--checkpoint", "{ckpt}", "--export_hf", "{folder}/hf", "--models", "lstm_seq"],
     "holds model kgram_mlp_seq, which --models lstm_seq does not name; drop --models"),
    (["--checkpoint", "{ckpt}", "--export_hf", "{folder}/hf", "--tokenizer", "gpt2"],
     "whose model was trained with --tokenizer char; drop --tokenizer"),
    (["--resume", "{ckpt_elsewhere}"], "is not in a <save_dir>/kgram_mlp_seq/ folder, so the "
                                       "run has nowhere to write its checkpoints; add --save_dir"),
    (["--resume", "{newer_save}/kgram_mlp_seq/step_000002.pt"],
     "kgram_mlp_seq/step_000003.pt is newer and training on would write over it"),
    (["--save_dir", "{file_save}"], "file_save/kgram_mlp_seq, where kgram_mlp_seq's checkpoints "
                                    "go, is not a directory"),
    (["--save_dir", "{folder_save}", "--resume"],    # an export there had failed the run at step 4
     "{folder_save}/kgram_mlp_seq/step_000004.pt is a folder with a checkpoint's name"),
]


@pytest.fixture(scope="module")
def trained_save_dir(pico, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    assert pico.main([*CHECKPOINT_RUN, "--save_dir", str(root / "save"), "--artefacts_dir",
                      str(root / "artefacts"), "--cache_dir", str(root / "cache")]) == 0
    return root / "save"


def test_generate_counts_its_tokens_on_a_bar_where_its_text_goes_to_a_file(
        pico, run_main, trained_save_dir, monkeypatch):
    """Text written into a file or a pipe: a bar on a terminal's standard error counts the
    tokens as they are drawn (here a stand-in bar; the tests' standard error is no terminal),
    and the text is the same. Text written on a terminal shows its own progress: no bar."""
    class Bar:
        def __init__(self, total):
            self.total, self.count, self.closed = total, 0, False

        def update(self, n):
            self.count += n

        def close(self):
            self.closed = True

    checkpoint = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    argv = ["--generate", "--checkpoint", str(checkpoint), "--temperature", "0",
            "--max_new_tokens", "12"]
    status, plain, _ = run_main(*argv)                   # no terminal: no bar
    bars, asked_quiet = [], []
    monkeypatch.setattr(pico, "progress_bar", lambda total, description, quiet: asked_quiet.append(
        quiet) or bars.append(Bar(total)) or bars[-1])
    status_with_bar, out, _ = run_main(*argv)
    assert status == status_with_bar == 0 and out == plain
    drawn = len(out) - 1 - len("Once upon a time")       # characters; no end-of-text drawn here
    assert [(bar.total, bar.count, bar.closed) for bar in bars] == [(12, drawn, True)]
    assert drawn == 12
    assert run_main(*argv, "--quiet")[1] == plain and asked_quiet == [False, True]   # --quiet: none
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_main(*argv)[0] == 0 and len(bars) == 2                             # no third bar


def test_generate_notes_the_training_and_data_flags_it_does_not_read(run_main, trained_save_dir):
    """The training command with --generate added still works, and says which of its flags
    sampling has no use for (a missing --input_files too: no text is read), where they were
    silently ignored; the sampling flags and the model's own get no note."""
    checkpoint = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    argv = ["--generate", "--checkpoint", str(checkpoint), "--max_new_tokens", "3"]
    status, plain, err = run_main(*argv, "--temperature", "0", "--seed", "3")
    assert status == 0 and err == ""
    status, out, err = run_main(*argv, "--temperature", "0", "--seed", "3", "--epochs", "3",
                                "--learning_rate", "0.1", "--input_files", "/nonexistent.txt",
                                "--test_fraction", "0.2")
    assert status == 0 and out == plain
    assert err == ("pico-llm: note: --generate trains nothing and reads no text, so --epochs, "
                   "--learning_rate, --input_files, --test_fraction are not read\n")


@pytest.mark.parametrize("signal_raised", ["KeyboardInterrupt", "Terminated"])
def test_an_interrupted_generate_prints_the_text_sampled_so_far(pico, run_main, trained_save_dir,
                                                               monkeypatch, signal_raised):
    """Ctrl-C (or SIGTERM) in a long --generate: the prompt and the tokens drawn before it are
    printed, as a shorter run would have printed them, then the one line and 130 (143); all
    the text sampled was lost before."""
    checkpoint = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    argv = ["--generate", "--checkpoint", str(checkpoint), "--temperature", "0"]
    status, five_tokens, _ = run_main(*argv, "--max_new_tokens", "5")
    assert status == 0
    real_sample, drawn = pico.sample_next_token, []

    def interrupted_after_five(*args):
        if len(drawn) == 5:
            raise KeyboardInterrupt if signal_raised == "KeyboardInterrupt" else pico.Terminated()
        drawn.append(1)
        return real_sample(*args)
    monkeypatch.setattr(pico, "sample_next_token", interrupted_after_five)
    status, out, err = run_main(*argv, "--max_new_tokens", "1000")
    assert status == (130 if signal_raised == "KeyboardInterrupt" else 143)
    assert out == five_tokens and err.strip() in ("pico-llm: interrupted", "pico-llm: terminated")


def test_generate_writes_the_text_as_it_is_sampled(pico, run_main, trained_save_dir, monkeypatch):
    """The prompt at once, then each token's text as it is drawn, not all at the end."""
    checkpoint = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    real_sample, seen = pico.sample_next_token, []

    def watched(*args):
        seen.append(sys.stdout.getvalue())
        return real_sample(*args)
    monkeypatch.setattr(pico, "sample_next_token", watched)
    status, out, _ = run_main("--generate", "--checkpoint", str(checkpoint), "--temperature", "0",
                              "--prompt", "Once", "--max_new_tokens", "8")
    assert status == 0 and out.startswith("Once") and out.endswith("\n")
    assert seen[0] == "Once" and len(seen) == 8
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:] + [out]))
    assert len(set(seen)) > 2, (seen, out)                 # it grew while tokens were drawn


def test_an_error_while_generating_comes_on_a_line_of_its_own(pico, run_main, trained_save_dir,
                                                               monkeypatch):
    """The prompt and the tokens drawn are written as they come: an error after them ends
    that line first, so that standard output is whole lines and the error is not glued on."""
    checkpoint = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    real_sample, drawn = pico.sample_next_token, []

    def failing_after_two(*args):
        if len(drawn) == 2:
            raise pico.UserError("the model produced non-finite logits")
        drawn.append(1)
        return real_sample(*args)
    monkeypatch.setattr(pico, "sample_next_token", failing_after_two)
    status, out, err = run_main("--generate", "--checkpoint", str(checkpoint), "--prompt", "Once",
                                "--max_new_tokens", "8")
    assert status == 2 and out.startswith("Once") and out.endswith("\n") and out.count("\n") == 1
    assert err == "pico-llm: error: the model produced non-finite logits\n"


def test_generate_notes_a_prompt_its_tokenizer_does_not_cover(pico, run_main, trained_save_dir,
                                                               monkeypatch):
    """A tokenizer that drops part of the prompt (here the letter u, as an imported
    tokenizer.json without byte fallback drops what it lacks): a note says what the model
    reads; a prompt it covers, whitespace aside, gets none."""
    assert pico.prompt_coverage_note(pico.ByteTokenizer(), "Once upon  a time") is None

    class Collapsing:           # a tokenizer that reads runs of white space as one space
        encode = staticmethod(lambda text: list(" ".join(text.split()).encode()))
        decode = staticmethod(lambda ids: bytes(ids).decode())
    assert pico.prompt_coverage_note(Collapsing(), "Once upon  a\ttime") is None
    decode = pico.ByteTokenizer.decode
    monkeypatch.setattr(pico.ByteTokenizer, "decode",
                        lambda self, ids: decode(self, ids).replace("u", ""))
    ckpt = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    status, out, err = run_main("--generate", "--checkpoint", str(ckpt), "--max_new_tokens", "2",
                                "--prompt", "Once upon a time")
    assert status == 0 and out.startswith("Once upon a time"), err
    assert err == ("pico-llm: note: this model's tokenizer does not cover all of --prompt; the "
                   "model reads 'Once pon a time'\n")


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_generate_decodes_in_the_precision_dtype_names(pico, run_main, trained_save_dir,
                                                       monkeypatch, dtype):
    """--generate --dtype sets the decoder's precision on a GPU (its default: bf16 where the
    GPU has bf16 units), as it sets training's."""
    asked = []

    def decoding_model(model, device, compile=False, num_tokens=None, dtype=None):
        asked.append(dtype)
        return model

    monkeypatch.setattr(pico, "decoding_model", decoding_model)
    ckpt = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    flags = [] if dtype is None else ["--dtype", dtype]
    status, out, err = run_main("--generate", "--checkpoint", str(ckpt), "--max_new_tokens", "2",
                                *flags)
    assert status == 0 and asked == [dtype], err


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_training_samples_decode_in_the_training_precision(pico, run_main, monkeypatch, dtype):
    """The samples a training run takes decode in its --dtype, as --generate's do, all its
    sampling rules through one decoder (on a GPU each would copy the weights and record a graph)."""
    asked = []

    def decoding_model(model, device, compile=False, num_tokens=None, dtype=None):
        asked.append(dtype)
        return model

    monkeypatch.setattr(pico, "decoding_model", decoding_model)
    flags = [] if dtype is None else ["--dtype", dtype]
    status, _, err = run_main(*TINY, "--models", "lstm_seq", "--epochs", "1",
                              "--max_steps_per_epoch", "1", *flags)
    assert status == 0, err
    assert asked == [dtype]       # one decoder for the starter's three sampling rules


def test_generate_compile_on_a_gpu_without_triton_says_so_in_one_line(pico, run_main, tmp_path,
                                                                      monkeypatch):
    """A Transformer's decoder compiles on a GPU only with Triton: without it, one line names
    the package before any weight moves, as training's --compile does, not Inductor's trace."""
    save = tmp_path / "save"
    assert pico.main([*TINY, "--models", "transformer", "--epochs", "1", "--max_steps_per_epoch",
                      "1", "--save_dir", str(save), "--artefacts_dir", str(tmp_path / "a"),
                      "--cache_dir", str(tmp_path / "cache")]) == 0
    checkpoint = next((save / "transformer").glob("*.pt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(pico.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "triton" else importlib_find(name, *rest))
    status, out, err = run_main("--generate", "--checkpoint", str(checkpoint), "--compile",
                                "--device_id", "cuda:0", "--max_new_tokens", "2")
    assert status == 2 and err.count("\n") == 1, err
    assert "--compile cannot run here: torch.compile needs the triton package on a GPU" in err


@pytest.mark.parametrize("models", [["--models", "kgram_mlp_seq,lstm_seq"],
                                    ["--enable_transformer_gptoss"]])
def test_generate_takes_a_models_list_that_names_the_checkpoints_model(pico, trained_save_dir,
                                                                       models, capsys):
    """--models may still name the checkpoint's model among others (or be the default list,
    widened by --enable_transformer_gptoss): only a list without it is refused (above)."""
    ckpt = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    assert pico.main(["--generate", "--checkpoint", str(ckpt), *models, "--max_new_tokens", "2",
                      "--device_id", "cpu"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("change, refused", [
    ({"epochs": 20000, "kgram_k": 3, "dist_timeout": -1.0}, None),  # not the model's to meet
    ({"kgram_k": 0}, "(k 0 is not an integer of at least 1)"),
    ({"kgram_variant": "fourier"}, "variant 'fourier' is not one of onehot, embedding, conv"),
])
def test_only_what_rebuilds_a_checkpoints_model_is_checked(pico, run_main, trained_save_dir,
                                                            tmp_path, change, refused):
    """A checkpoint's stored flags are held to what builds its model, not to every limit of
    the command line (a later version's limits, a run's length): an older checkpoint stays
    usable; sizes the model cannot have are refused in one line."""
    checkpoint = torch.load(trained_save_dir / "kgram_mlp_seq" / "step_000002.pt",
                            weights_only=True)
    checkpoint["args"] = {**checkpoint["args"], **change}
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    torch.save(checkpoint, tmp_path / "step_000002.pt")
    status, out, err = run_main("--generate", "--checkpoint", str(tmp_path / "step_000002.pt"),
                                "--max_new_tokens", "2", "--device_id", "cpu")
    if refused is None:
        assert status == 0, err
    else:
        assert status == 2 and refused in one_error_line(err)


@pytest.fixture
def bad_checkpoints(tmp_path, trained_save_dir):
    save = tmp_path / "save"
    shutil.copytree(trained_save_dir, save)
    ckpt = save / "kgram_mlp_seq" / "step_000002.pt"
    good = ckpt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "random_bytes.pt").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save({"format": "pico-llm checkpoint", "model": RunsCode(tmp_path / "pwned")},
               tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "not_pico.pt")
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"weights": [0.0]}, protocol=4))
    future = torch.load(ckpt, weights_only=False)      # a later pico-llm's format
    future["version"] = 99
    torch.save(future, tmp_path / "future.pt")
    future["version"] = True                           # not version 1, which has no checksum
    torch.save(future, tmp_path / "boolean_version.pt")
    (tmp_path / "empty_save").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "file_save").mkdir()
    (tmp_path / "file_save" / "kgram_mlp_seq").write_text("a file, not a model's checkpoints\n")
    shutil.copytree(trained_save_dir, tmp_path / "other_save")
    shutil.copytree(trained_save_dir, tmp_path / "newer_save")     # a later step beside step 2
    shutil.copy(save / "kgram_mlp_seq" / "step_000002.pt",
                tmp_path / "newer_save" / "kgram_mlp_seq" / "step_000003.pt")
    shutil.copy(ckpt, tmp_path / "folder" / "downloaded.pt")
    (tmp_path / "misplaced_save" / "lstm_seq").mkdir(parents=True)    # another model's folder
    shutil.copy(ckpt, tmp_path / "misplaced_save" / "lstm_seq" / "step_000002.pt")
    shutil.copytree(trained_save_dir, tmp_path / "folder_save")    # a folder where step 4 goes
    (tmp_path / "folder_save" / "kgram_mlp_seq" / "step_000004.pt").mkdir()
    (tmp_path / "artefacts").mkdir()
    (tmp_path / "artefacts" / "earlier.json").write_text('{"an": "earlier run log"}\n')
    names = ["truncated", "random_bytes", "text", "evil", "not_pico", "pickled", "future",
             "boolean_version"]
    return {"save": str(save), "ckpt": str(ckpt), "empty_save": str(tmp_path / "empty_save"),
            "other_save": str(tmp_path / "other_save"), "newer_save": str(tmp_path / "newer_save"),
            "folder": str(tmp_path / "folder"), "file_save": str(tmp_path / "file_save"),
            "misplaced_save": str(tmp_path / "misplaced_save"),
            "folder_save": str(tmp_path / "folder_save"),
            "ckpt_elsewhere": str(tmp_path / "folder" / "downloaded.pt"),
            **{name: str(tmp_path / f"{name}.pt") for name in names}}


def snapshot(directory) -> dict:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", BAD_CHECKPOINT_INPUTS,
                         ids=[" ".join(a)[:40] for a, _ in BAD_CHECKPOINT_INPUTS])
def test_bad_checkpoint_input_gives_one_line_status_2_and_changes_nothing(
        run_main, tmp_path, bad_checkpoints, argv, message):
    before = snapshot(tmp_path)
    argv = [a.format(**bad_checkpoints) for a in argv]
    status, out, err = run_main(*CHECKPOINT_RUN, *argv)
    assert status == 2
    line = one_error_line(err)
    assert line.startswith("pico-llm: error:") and message.format(**bad_checkpoints) in line
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


# --- run logs on resume: continued only by their own run, extended, replaced after a death ----

ONE_MODEL = [*TINY, "--models", "lstm_seq"]


def test_resume_into_another_runs_log_is_refused_naming_both(pico, run_main, tmp_path):
    artefacts = tmp_path / "artefacts"
    assert run_main(*ONE_MODEL, "--run_name", "a", "--save_dir", str(tmp_path / "save_a"))[0] == 0
    assert run_main(*ONE_MODEL, "--run_name", "b", "--save_dir", str(tmp_path / "save_b"),
                    "--seed", "7")[0] == 0
    before = (artefacts / "a.json").read_bytes()
    status, _, err = run_main(*ONE_MODEL, "--run_name", "a", "--save_dir", str(tmp_path / "save_b"),
                              "--seed", "7", "--resume")
    assert status == 2
    line = one_error_line(err)
    assert "a.json" in line and str(tmp_path / "save_a") in line   # the log's run ...
    assert "save_b" in line and "run b" in line                    # ... and the checkpoint's
    assert (artefacts / "a.json").read_bytes() == before
    status, _, err = run_main(*ONE_MODEL, "--run_name", "b", "--save_dir", str(tmp_path / "save_b"),
                              "--seed", "7", "--resume")           # its own run continues it
    assert status == 0, err


def test_resuming_a_finished_run_with_more_epochs_trains_one_more_epoch(pico, run_main, tmp_path,
                                                                        configure):
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    assert run_main(*ONE_MODEL, "--epochs", "1", "--save_dir", str(save), "--run_name", "r")[0] == 0
    first = pico.load_runlog(log_path)["models"]["lstm_seq"]
    status, _, err = run_main(*ONE_MODEL, "--epochs", "2", "--save_dir", str(save), "--run_name",
                              "r", "--resume")
    assert status == 0, err
    log = pico.load_runlog(log_path)
    record = log["models"]["lstm_seq"]
    assert log["status"] == "finished" and log["args"]["epochs"] == 2
    assert [(h["step"], h["epoch"]) for h in record["history"]] == [(1, 1), (2, 1), (3, 1),
                                                                   (4, 2), (5, 2), (6, 2)]
    assert record["history"][:3] == first["history"]
    assert [t["epoch"] for t in record["test_history"]] == [1, 2]
    assert record["length_changes"] == [{"step": 3, "flag": "epochs", "old": 1, "new": 2}]
    assert record["final"]["steps"] == 6
    # the cosine schedule, recomputed for 6 steps, from step 3 on
    training = configure(*ONE_MODEL, "--epochs", "2").training
    assert [h["lr"] for h in record["history"][3:]] == pytest.approx(
        [pico.learning_rate_at(step, 6, training) for step in (3, 4, 5)])
    assert (save / "lstm_seq" / "step_000006.pt").exists()
    # the same length again: nothing left to train
    status, out, err = run_main(*ONE_MODEL, "--epochs", "2", "--save_dir", str(save),
                                "--run_name", "r", "--resume")
    assert status == 0 and len(pico.load_runlog(log_path)["models"]["lstm_seq"]["history"]) == 6
    # longer epochs, but none left: nothing trains, and it says so even with --quiet (a run
    # asked to be longer had ended silently, its log recording a change that did nothing)
    status, out, err = run_main(*ONE_MODEL, "--epochs", "2", "--max_steps_per_epoch", "9",
                                "--save_dir", str(save), "--run_name", "r", "--resume")
    assert status == 0 and err == (
        "pico-llm: note: lstm_seq had finished, and --max_steps_per_epoch changes only epochs "
        "still to come: nothing was trained; raise --epochs (now 2) to train it longer\n"), err
    record = pico.load_runlog(log_path)["models"]["lstm_seq"]
    assert len(record["history"]) == 6 and len(record["length_changes"]) == 1
    # a flag that changes the model is still refused
    status, _, err = run_main(*ONE_MODEL, "--epochs", "3", "--embed_size", "32", "--save_dir",
                              str(save), "--run_name", "r", "--resume")
    assert status == 2 and "--embed_size" in one_error_line(err)
    # a second extension adds its one change to the first (restored twice: once checked
    # before any model trains, once at the model's turn)
    status, _, err = run_main(*ONE_MODEL, "--epochs", "3", "--save_dir", str(save), "--run_name",
                              "r", "--resume")
    assert status == 0, err
    assert pico.load_runlog(log_path)["models"]["lstm_seq"]["length_changes"] == [
        {"step": 3, "flag": "epochs", "old": 1, "new": 2},
        {"step": 6, "flag": "epochs", "old": 2, "new": 3}]


def test_an_early_stopped_run_resumed_without_early_stopping_trains_on(pico, run_main, tmp_path):
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    flags = [*ONE_MODEL, "--epochs", "4", "--save_dir", str(save), "--run_name", "r"]
    assert run_main(*flags, "--early_stop_patience", "1", "--early_stop_min_delta", "100")[0] == 0
    stopped = pico.load_runlog(log_path)["models"]["lstm_seq"]
    assert stopped["stopped_early_after_epoch"] == 2 and len(stopped["history"]) == 6
    status, _, err = run_main(*flags, "--early_stop_patience", "1", "--early_stop_min_delta",
                              "100", "--max_steps_per_epoch", "9", "--resume")   # still stops
    assert status == 0 and err.endswith("nothing was trained; it stopped early: raise "
                                        "--early_stop_patience, or set it to 0, to train it on\n")
    status, _, err = run_main(*flags, "--resume")
    assert status == 0, err
    record = pico.load_runlog(log_path)["models"]["lstm_seq"]
    assert [h["step"] for h in record["history"]] == list(range(1, 13))
    assert {c["flag"] for c in record["length_changes"]} == {"early_stop_patience",
                                                             "early_stop_min_delta"}


def test_a_run_that_fails_says_so_in_its_log_with_the_error(pico, run_main, tmp_path, monkeypatch):
    def broken_step(*args):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(pico, "training_step", broken_step)
    with pytest.raises(RuntimeError):
        run_main(*ONE_MODEL, "--run_name", "broken")
    log = pico.load_runlog(tmp_path / "artefacts" / "broken.json")
    assert log["status"] == "failed" and log["error"] == "RuntimeError: the device fell over"


def full_disk_for_checkpoints(pico, monkeypatch):
    real_write = pico.atomic_write_bytes

    def write(path, data):
        if path.suffix == ".pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(pico, "atomic_write_bytes", write)


def test_a_run_log_that_cannot_be_written_mid_run_is_one_line(pico, run_main, tmp_path,
                                                               monkeypatch):
    """The disk fills after the run log's first write (it is written at the start and after
    every epoch): one line naming the log and what to do, status 2; the failure's own attempt
    to mark the log failed meets the same full disk and stays quiet."""
    real_write, writes = pico.atomic_write_bytes, []

    def fills_up(path, data):
        if path.suffix == ".json" and writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        writes.append(path)
        real_write(path, data)
    monkeypatch.setattr(pico, "atomic_write_bytes", fills_up)
    status, _, err = run_main(*ONE_MODEL, "--run_name", "r")
    line = one_error_line(err)
    assert status == 2 and f"cannot write run log {tmp_path / 'artefacts' / 'r.json'}" in line
    assert "No space left on device; free disk space or choose another --artefacts_dir" in line


def test_the_same_command_after_a_death_before_the_first_checkpoint_just_works(
        pico, run_main, tmp_path, monkeypatch):
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    command = [*ONE_MODEL, "--save_dir", str(save), "--run_name", "r", "--checkpoint_every", "1"]
    full_disk_for_checkpoints(pico, monkeypatch)
    status, _, err = run_main(*command)
    assert status == 2 and "No space left on device" in one_error_line(err)
    failed = pico.load_runlog(log_path)
    assert failed["status"] == "failed" and "No space left on device" in failed["error"]
    monkeypatch.undo()
    status, _, err = run_main(*command)                          # the disk has room again
    assert status == 0, err
    assert "replacing run log" in err
    assert pico.load_runlog(log_path)["status"] == "finished"
    # a finished run's log is never replaced
    status, _, err = run_main(*command)
    assert status == 2 and "already exists" in one_error_line(err)


def test_a_stopped_runs_log_is_not_replaced_by_another_command(pico, run_main, tmp_path,
                                                                monkeypatch):
    """A run that failed before its first checkpoint (a diverged curve is a result) is replaced
    by its own command again, not by another experiment given the same --run_name."""
    log_path = tmp_path / "artefacts" / "r.json"
    command = [*ONE_MODEL, "--save_dir", str(tmp_path / "ckpt"), "--run_name", "r",
               "--checkpoint_every", "1"]
    full_disk_for_checkpoints(pico, monkeypatch)
    assert run_main(*command)[0] == 2
    monkeypatch.undo()
    failed = log_path.read_bytes()
    for other in (["--learning_rate", "0.01"], ["--models", "kgram_mlp_seq"]):
        status, _, err = run_main(*command, *other)
        assert status == 2, err
        line = one_error_line(err)
        assert "already exists" in line and f"--{other[0][2:]}" in line and "failed" in line
        assert log_path.read_bytes() == failed
    # what only changes where the run writes, or what it prints, is the same command
    status, _, err = run_main(*command, "--save_dir", str(tmp_path / "elsewhere"), "--quiet")
    assert status == 0 and "replacing run log" in err


def test_a_stopped_runs_log_with_checkpoints_sends_its_command_to_resume(pico, run_main,
                                                                         tmp_path):
    """The log of a run stopped after writing checkpoints holds the history a --resume
    continues: the same command without --resume is refused, the log kept. Once that
    --save_dir is gone, nothing is left to continue and the command replaces the log."""
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    command = [*ONE_MODEL, "--save_dir", str(save), "--run_name", "r"]
    assert run_main(*command)[0] == 0
    log_path.write_text(log_path.read_text().replace('"status": "finished"',
                                                     '"status": "interrupted"'))
    stopped = log_path.read_bytes()
    status, _, err = run_main(*command)
    assert status == 2 and "continue the run with --resume" in one_error_line(err)
    assert log_path.read_bytes() == stopped
    shutil.rmtree(save)
    status, _, err = run_main(*command)
    assert status == 0 and "replacing run log" in err
    assert pico.load_runlog(log_path)["status"] == "finished"


def test_a_killed_runs_log_is_replaced_only_when_its_run_is_gone(pico, run_main, tmp_path):
    """kill -9 leaves a log saying "running": the same command replaces it once no process
    holds the run's --save_dir, and refuses while one does."""
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    command = [*ONE_MODEL, "--save_dir", str(save), "--run_name", "r"]
    assert run_main(*command)[0] == 0
    killed = pico.load_runlog(log_path)
    killed.update(status="running", created="2000-01-01T00:00:00+00:00")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    killed["process"]["pid"] = int(gone.stdout)                  # a process that has ended
    shutil.rmtree(save)                                          # no checkpoint written yet
    log_path.write_text(json.dumps(killed))
    save.mkdir()
    hold = ("import fcntl, os, sys, time; handle = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(handle, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(save)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        status, _, err = run_main(*command, "--save_dir", str(tmp_path / "elsewhere"))
        assert status == 2 and "still running" in one_error_line(err)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(log_path.read_text())["created"] == "2000-01-01T00:00:00+00:00"
    status, _, err = run_main(*command)
    assert status == 0, err
    assert pico.load_runlog(log_path)["created"] != "2000-01-01T00:00:00+00:00"


def test_a_run_without_save_dir_is_alive_while_its_process_is(pico):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        log = {"status": "running", "process": {"host": socket.gethostname(), "pid": sleeper.pid}}
        assert pico.run_is_alive(log, None, None)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not pico.run_is_alive(log, None, None)                       # it has ended
    assert not pico.run_is_alive({**log, "status": "failed"}, None, None)
    elsewhere = {"status": "running", "process": {"host": "another-machine", "pid": 1}}
    assert pico.run_is_alive(elsewhere, None, None)                   # cannot tell: assume so
    assert not pico.run_is_alive({**elsewhere, "status": "failed"}, None, None)  # said it ended
    # this process's own pid: a run an earlier main() in it left (a notebook's), not alive
    here = {"status": "running", "process": {"host": socket.gethostname(), "pid": os.getpid()}}
    assert not pico.run_is_alive(here, None, None)


@pytest.mark.parametrize("pid", [10**30, 2**31, -(2**31 - 1), 0, -1, True, 1.0])
def test_a_pid_that_names_no_process_is_taken_as_the_logs_status_says(pico, pid):
    """A hand-edited pid: past a C int, os.kill had failed with OverflowError (a traceback); 0
    and below name process groups (-(2**31 - 1) none: kill found no process, though the log
    says its run is running)."""
    log = {"status": "interrupted", "process": {"host": socket.gethostname(), "pid": pid}}
    assert not pico.run_is_alive(log, None, None)
    assert pico.run_is_alive({**log, "status": "running"}, None, None)


def test_a_pid_of_another_users_process_is_alive_only_for_a_running_log(pico, monkeypatch):
    """kill(pid, 0) refused (PermissionError): the pid lives, but a log that says its run
    stopped was written by that run as it ended, so the pid was reused; that stopped run's
    log had been taken for a run still running."""
    def refused(pid, signal_number):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(pico.os, "kill", refused)
    log = {"status": "running", "process": {"host": socket.gethostname(), "pid": 1}}
    assert pico.run_is_alive(log, None, None)
    assert not pico.run_is_alive({**log, "status": "failed"}, None, None)


def test_resuming_some_of_a_runs_models_keeps_the_others_records(pico, run_main, tmp_path):
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    flags = [*TINY, "--save_dir", str(save), "--run_name", "r", "--epochs", "1"]
    assert run_main(*flags, *TWO_MODELS)[0] == 0
    before = pico.load_runlog(log_path)["models"]
    status, _, err = run_main(*flags, "--models", "lstm_seq", "--epochs", "2", "--resume")
    assert status == 0, err
    log = pico.load_runlog(log_path)
    assert list(log["models"]) == ["kgram_mlp_seq", "lstm_seq"]
    assert log["args"]["models"] == ["kgram_mlp_seq", "lstm_seq"]
    assert log["models"]["kgram_mlp_seq"] == before["kgram_mlp_seq"]          # untouched
    assert len(log["models"]["lstm_seq"]["history"]) == 6                      # trained on
    assert log["models"]["lstm_seq"]["history"][:3] == before["lstm_seq"]["history"]


def test_resuming_a_finished_model_whose_checkpoints_are_gone_is_refused(pico, run_main, tmp_path):
    """A model the run log records as finished, with no checkpoint left in --save_dir (its
    folder moved away), had been trained again from the start without a word, replacing its
    record: refused, naming it, and nothing is written. One that stopped before its first
    checkpoint (no final record) still starts afresh."""
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    flags = [*TINY, *TWO_MODELS, "--save_dir", str(save), "--run_name", "r", "--epochs", "1"]
    assert run_main(*flags)[0] == 0
    (save / "lstm_seq").rename(tmp_path / "elsewhere")
    before = log_path.read_bytes()
    status, _, err = run_main(*flags[:-1], "2", "--resume")
    assert status == 2 and err.count("\n") == 1, err
    assert (f"run log {log_path} records lstm_seq as finished, but {save / 'lstm_seq'} holds no "
            "checkpoint of it; put its checkpoints back, or drop lstm_seq from --models") in err
    assert log_path.read_bytes() == before
    assert [p.name for p in (save / "kgram_mlp_seq").iterdir()] == ["step_000003.pt"]
    elsewhere = [*flags[:flags.index("--save_dir")], *flags[flags.index("--save_dir") + 2:-1]]
    status, _, err = run_main(*elsewhere, "2", "--resume", str(save), "--save_dir",
                              str(tmp_path / "new"))        # the folder read is the one named
    assert status == 2 and f"but {save / 'lstm_seq'} holds no checkpoint" in err, err
    log = pico.load_runlog(log_path)
    del log["models"]["lstm_seq"]["final"]                  # as a run killed in its training
    log_path.write_text(json.dumps(log))
    assert run_main(*flags[:-1], "2", "--resume")[0] == 0


@pytest.mark.parametrize("target", ["loop", "missing"])
def test_a_run_log_that_is_a_link_to_nothing_is_refused_and_kept(run_main, tmp_path, target):
    """A link to nothing where the run log goes had been told "another run started first", and
    under --resume was replaced by a log of its own: it says what it is, and stays."""
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    flags = [*TINY, "--models", "lstm_seq", "--save_dir", str(save), "--run_name", "r",
             "--epochs", "1"]
    assert run_main(*flags)[0] == 0
    log_path.unlink()
    log_path.symlink_to(log_path if target == "loop" else tmp_path / "nowhere" / "r.json")
    for resume in ([], ["--resume"]):
        status, _, err = run_main(*flags[:-1], "2", *resume)
        assert status == 2 and err.count("\n") == 1, err
        assert f"run log {log_path} is a symbolic link to nothing (broken, or a loop)" in err
        assert log_path.is_symlink() and not log_path.exists()


def test_a_damaged_newest_checkpoint_in_a_save_dir_says_how_to_resume_it(pico, run_main, tmp_path):
    """The advice, followed to the letter, resumes every model of the save directory."""
    save, log_path = tmp_path / "ckpt", tmp_path / "artefacts" / "r.json"
    flags = [*TINY, *TWO_MODELS, "--save_dir", str(save), "--run_name", "r", "--epochs", "1",
             "--checkpoint_every", "1"]
    assert run_main(*flags)[0] == 0
    newest = save / "lstm_seq" / "step_000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    status, _, err = run_main(*flags, "--epochs", "2", "--resume")
    assert status == 2
    line = one_error_line(err)
    move = re.search(r"\(mv (\S+) (\S+)\) and --resume (\S+) again", line)
    assert move and move.group(1) == str(newest) and move.group(3) == str(save), line
    os.rename(move.group(1), move.group(2))
    status, _, err = run_main(*flags, "--epochs", "2", "--resume")
    assert status == 0, err
    log = pico.load_runlog(log_path)
    assert [h["step"] for h in log["models"]["lstm_seq"]["history"]] == [1, 2, 3, 4, 5, 6]
    assert len(log["models"]["kgram_mlp_seq"]["history"]) == 6


@pytest.fixture(scope="module")
def transformer_checkpoint(pico, tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer")
    assert pico.main([*TINY, "--models", "transformer", "--d_model", "32", "--n_heads", "2",
                      "--n_blocks", "1", "--epochs", "1", "--max_steps_per_epoch", "1",
                      "--save_dir", str(root / "save"), "--artefacts_dir", str(root / "artefacts"),
                      "--cache_dir", str(root / "cache")]) == 0
    return torch.load(root / "save" / "transformer" / "step_000001.pt", weights_only=True)


def changed_transformer_config(**fields):
    return lambda checkpoint: checkpoint["transformer_config"].update(fields)


# What a checkpoint of another pico-llm version (a field this one lacks), or one damaged before
# its checksum was computed, may hold.
CHECKPOINTS_OF_ANOTHER_VERSION = {
    "unknown config field": changed_transformer_config(bogus=1),
    "no heads": changed_transformer_config(n_heads=0),
    "a norm of another name": changed_transformer_config(norm="layer_norm"),
    "negative width": changed_transformer_config(d_model=-32),
    "a width past a float's range": changed_transformer_config(d_model=10**400, d_ff=10**400),
    # no d_ff: its default, worked out from d_model, overflows a float before any check
    "a default width past a float's range": changed_transformer_config(d_model=10**400,
                                                                       d_ff=None, ffn="swiglu"),
    "args a list": lambda checkpoint: checkpoint.update(args=[1]),
    "block size a string": lambda checkpoint: checkpoint["args"].update(block_size="abc"),
    "tokenizer a string": lambda checkpoint: checkpoint.update(tokenizer="char"),
    "model a list": lambda checkpoint: checkpoint.update(model=[1]),
    "config a string": lambda checkpoint: checkpoint.update(transformer_config="abc"),
}


@pytest.mark.parametrize("change", CHECKPOINTS_OF_ANOTHER_VERSION)
@pytest.mark.parametrize("command", [["--generate"], ["--export_hf", "{tmp}/exported"]])
def test_a_checkpoint_of_another_version_is_one_line_naming_it(pico, run_main, tmp_path,
                                                               transformer_checkpoint, change,
                                                               command):
    checkpoint = {key: (dict(value) if isinstance(value, dict) else value)
                  for key, value in transformer_checkpoint.items()}
    CHECKPOINTS_OF_ANOTHER_VERSION[change](checkpoint)
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)   # it passes its checksum
    path = tmp_path / "step_000001.pt"
    torch.save(checkpoint, path)
    status, _, err = run_main("--checkpoint", str(path),
                              *[a.format(tmp=tmp_path) for a in command])
    assert status == 2
    line = one_error_line(err)
    assert str(path) in line and "made by another pico-llm version, or is damaged" in line
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("command", [["--generate"], ["--export_hf", "{tmp}/exported"]])
def test_sizes_that_do_not_fit_the_stored_weights_are_refused_before_the_model_is_built(
        pico, run_main, tmp_path, transformer_checkpoint, command):
    """A feed-forward layer 2**36 wide would need terabytes: its shape is compared with the
    weights the file holds first, on the meta device."""
    checkpoint = dict(transformer_checkpoint,
                      transformer_config=dict(transformer_checkpoint["transformer_config"],
                                              d_ff=2**36))
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    path = tmp_path / "step_000001.pt"
    torch.save(checkpoint, path)
    status, _, err = run_main("--checkpoint", str(path), *[a.format(tmp=tmp_path) for a in command])
    assert status == 2, err
    line = one_error_line(err)
    assert str(path) in line and "size mismatch for blocks.0." in line and "more)" in line
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("command", [["--generate"], ["--export_hf", "{tmp}/exported"]])
def test_a_checkpoint_of_nan_weights_is_neither_sampled_nor_exported(
        pico, run_main, tmp_path, transformer_checkpoint, command):
    """--init_from refuses an export of NaN weights: --export_hf does not write one."""
    checkpoint = dict(transformer_checkpoint)
    nan_weights(checkpoint)
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    path = tmp_path / "step_000001.pt"
    torch.save(checkpoint, path)
    status, _, err = run_main("--checkpoint", str(path), *[a.format(tmp=tmp_path) for a in command])
    assert status == 2, err
    assert "holds NaN or infinite weights" in one_error_line(err)
    assert not (tmp_path / "exported").exists()


def changed_optimizer_moments(change):
    """A change to the optimizer state of the checkpoint's first parameter (on a copy)."""
    def apply(checkpoint):
        optimizer = {"state": {index: dict(state) for index, state in
                               checkpoint["optimizer"]["state"].items()},
                     "param_groups": checkpoint["optimizer"]["param_groups"]}
        change(next(iter(optimizer["state"].values())))
        checkpoint.update(optimizer=optimizer)
    return apply


def changed_optimizer_group(change):
    """A change to the settings of the checkpoint's first parameter group (on a copy)."""
    def apply(checkpoint):
        groups = [dict(group) for group in checkpoint["optimizer"]["param_groups"]]
        change(groups[0])
        checkpoint.update(optimizer={"state": checkpoint["optimizer"]["state"],
                                     "param_groups": groups})
    return apply


# What a checkpoint's resume state (past the parts that rebuild the model) may hold when another
# pico-llm version, or damage before its checksum was computed, made it.
RESUME_STATES_OF_ANOTHER_VERSION = {
    "optimizer state": lambda checkpoint: checkpoint.update(
        optimizer={"state": {}, "param_groups": []}),
    # load_state_dict takes these; the first step would fail on them
    "optimizer state ": changed_optimizer_moments(lambda state: state.pop("exp_avg")),
    "optimizer state  ": changed_optimizer_moments(
        lambda state: state.update(exp_avg_sq=torch.zeros(3))),
    "optimizer state   ": changed_optimizer_moments(
        lambda state: state.update(step=torch.tensor(-1.0))),
    # settings the flags make, made otherwise: the step fails, or computes something else
    "optimizer state    ": changed_optimizer_group(lambda group: group.update(betas=("a", "b"))),
    "optimizer state     ": changed_optimizer_group(lambda group: group.update(amsgrad=True)),
    "optimizer state      ": changed_optimizer_group(lambda group: group.update(eps=-1.0)),
    "random generators' states": lambda checkpoint: checkpoint.update(rng={}),
    "random generators' states ": lambda checkpoint: checkpoint["rng"].update(
        torch=torch.zeros(3, dtype=torch.uint8)),
    # numbers past a C integer (OverflowError); a position past numpy's keys, which it takes
    # and a draw then crashes the interpreter on
    "random generators' states  ": lambda checkpoint: checkpoint["rng"].update(
        numpy={**checkpoint["rng"]["numpy"], "position": 2**63}),
    "random generators' states   ": lambda checkpoint: checkpoint["rng"].update(
        numpy={**checkpoint["rng"]["numpy"], "position": -100_000_000}),
    "random generators' states    ": lambda checkpoint: checkpoint["rng"].update(
        python=(3, (2**70, *checkpoint["rng"]["python"][1][1:]), None)),
    "progress": lambda checkpoint: checkpoint["progress"].update(step="x"),
    "progress ": lambda checkpoint: checkpoint["progress"].update(unknown=1),
    "run-log record": lambda checkpoint: checkpoint["record"].update(length_changes=5),
    # what training appends to, or the summary reads, of another type
    "run-log record ": lambda checkpoint: checkpoint["record"].update(history="x"),
    "run-log record  ": lambda checkpoint: checkpoint["record"].update(test_history=5),
    "run-log record   ": lambda checkpoint: checkpoint["record"].update(history=[{"x": 1}]),
    "run-log record     ": lambda checkpoint: checkpoint["record"].update(samples=3),
    # the summary prints these as numbers
    "run-log record      ": lambda checkpoint: checkpoint["record"].update(
        final={**checkpoint["record"]["final"], "test_loss": "x"}),
}


@pytest.mark.parametrize("change, epochs", [*((change, "2") for change in
                                                RESUME_STATES_OF_ANOTHER_VERSION),
                                              ("run-log record", "1"), ("run-log record ", "1"),
                                              ("run-log record      ", "1"), ("progress", "1")])
def test_resuming_a_checkpoint_whose_state_cannot_be_restored_is_one_line(
        pico, run_main, tmp_path, transformer_checkpoint, change, epochs):
    """--epochs 2 trains on from the checkpoint; --epochs 1 finds its model finished and
    takes only its weights and run-log record (a path of its own)."""
    assert transformer_checkpoint["progress"]["finished"]
    checkpoint = {key: (dict(value) if isinstance(value, dict) else value)
                  for key, value in transformer_checkpoint.items()}
    RESUME_STATES_OF_ANOTHER_VERSION[change](checkpoint)
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)   # it passes its checksum
    path = tmp_path / "save" / "transformer" / "step_000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    status, _, err = run_main(*TINY, "--models", "transformer", "--d_model", "32", "--n_heads",
                              "2", "--n_blocks", "1", "--epochs", epochs, "--max_steps_per_epoch",
                              "1", "--resume", str(tmp_path / "save"), "--artefacts_dir",
                              str(tmp_path / "artefacts"), "--cache_dir", str(tmp_path / "cache"))
    assert status == 2, err
    line = one_error_line(err)
    assert str(path) in line and "made by another pico-llm version, or is damaged" in line
    assert f"its {change.strip()} cannot be restored" in line
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_000001.pt"]


def test_a_resumed_run_logs_the_model_it_built_not_the_one_its_checkpoint_names(
        pico, tmp_path, transformer_checkpoint):
    """A record edited behind the checksum had the run log call a 32-wide Transformer an LSTM
    of 123,456,789 parameters; its training history is the checkpoint's."""
    checkpoint = dict(transformer_checkpoint, record=dict(
        transformer_checkpoint["record"], name="lstm_seq", parameters=123_456_789,
        training_flops_per_token=-1, config={"d_model": 999}))
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    path = tmp_path / "save" / "transformer" / "step_000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    assert pico.main([*TINY, "--models", "transformer", "--d_model", "32", "--n_heads", "2",
                      "--n_blocks", "1", "--epochs", "2", "--max_steps_per_epoch", "1",
                      "--resume", str(tmp_path / "save"), "--run_name", "r", "--artefacts_dir",
                      str(tmp_path / "artefacts"), "--cache_dir", str(tmp_path / "cache")]) == 0
    record = pico.load_runlog(tmp_path / "artefacts" / "r.json")["models"]["transformer"]
    stored = transformer_checkpoint["record"]
    assert (record["name"], record["config"]["d_model"]) == ("transformer", 32)
    assert (record["parameters"], record["training_flops_per_token"]) == (
        stored["parameters"], stored["training_flops_per_token"])
    assert record["history"][0] == stored["history"][0] and len(record["history"]) == 2


def test_a_checkpoint_resumes_under_another_dist_timeout(pico, tmp_path, transformer_checkpoint):
    """How long ranks wait computes nothing: a run resumes with a longer one, and a checkpoint of
    a run given less than the 1 s now required resumes at all."""
    checkpoint = dict(transformer_checkpoint,
                      args=dict(transformer_checkpoint["args"], dist_timeout=0.5))
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    path = tmp_path / "save" / "transformer" / "step_000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    flags = [*TINY, "--models", "transformer", "--d_model", "32", "--n_heads", "2", "--n_blocks",
             "1", "--max_steps_per_epoch", "1", "--resume", str(tmp_path / "save"),
             "--artefacts_dir", str(tmp_path / "artefacts"), "--cache_dir", str(tmp_path / "cache")]
    assert pico.main([*flags, "--epochs", "2", "--run_name", "a"]) == 0
    assert pico.main([*flags, "--epochs", "3", "--run_name", "b", "--dist_timeout", "600"]) == 0


def nan_weights(checkpoint):
    checkpoint["model"] = {key: torch.full_like(value, math.nan) if value.is_floating_point()
                           else value for key, value in checkpoint["model"].items()}


@pytest.mark.parametrize("change", ["random generators' states", "optimizer state ",
                                    "optimizer state   ", "progress", "run-log record ",
                                    "NaN weights"])
def test_a_checkpoint_that_cannot_be_restored_stops_the_run_before_any_model_trains(
        pico, run_main, tmp_path, change):
    """The second model's checkpoint is restored at its turn; one that cannot be is refused
    before the first model trains on, prunes its checkpoints and rewrites the run log."""
    flags = [*TINY, "--models", "lstm_seq,transformer", "--d_model", "32", "--n_heads", "2",
             "--n_blocks", "1", "--max_steps_per_epoch", "1", "--checkpoint_every", "1",
             "--keep_checkpoints", "1", "--save_dir", str(tmp_path / "save"), "--run_name", "r",
             "--artefacts_dir", str(tmp_path / "artefacts"), "--cache_dir", str(tmp_path / "cache")]
    assert pico.main([*flags, "--epochs", "1"]) == 0
    path = tmp_path / "save" / "transformer" / "step_000001.pt"
    checkpoint = torch.load(path, weights_only=True)
    (nan_weights if change == "NaN weights" else RESUME_STATES_OF_ANOTHER_VERSION[change])(checkpoint)
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    torch.save(checkpoint, path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    status, _, err = run_main(*flags, "--epochs", "2", "--resume")
    assert status == 2, err
    line = one_error_line(err)
    assert str(path) in line
    assert ("NaN or infinite weights" if change == "NaN weights"
            else f"its {change.strip()} cannot be restored") in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*")
            if p.is_file() and "cache" not in p.parts} == files


def test_the_check_before_training_leaves_every_generator_and_warning_filter_as_it_was(
        pico, run_main, tmp_path, monkeypatch):
    """It seeds model builds and restores each checkpoint's generators: all are put back, so a
    model that starts afresh beside resumed ones draws what it would have drawn."""
    flags = [*TINY, "--models", "lstm_seq,transformer", "--d_model", "32", "--n_heads", "2",
             "--n_blocks", "1", "--max_steps_per_epoch", "1", "--save_dir", str(tmp_path / "save"),
             "--artefacts_dir", str(tmp_path / "artefacts"), "--cache_dir", str(tmp_path / "cache")]
    assert pico.main([*flags, "--epochs", "1", "--run_name", "r"]) == 0
    check, seen = pico.check_resume_points, []

    def checked(*args):
        random.seed(5)
        pico.np.random.seed(5)
        torch.manual_seed(5)
        before, filters = pico.rng_states(), list(pico.warnings.filters)
        check(*args)
        after = pico.rng_states()
        seen.append(torch.equal(before["torch"], after["torch"])
                    and torch.equal(before["numpy"]["keys"], after["numpy"]["keys"])
                    and before["python"] == after["python"]
                    and list(pico.warnings.filters) == filters)

    monkeypatch.setattr(pico, "check_resume_points", checked)
    status, _, err = run_main(*flags, "--epochs", "2", "--run_name", "r", "--resume")
    assert status == 0, err
    assert seen == [True]


def test_init_from_is_the_same_directory_however_written(pico, tmp_path, monkeypatch):
    (tmp_path / "models" / "llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    stored = {"init_from": str(tmp_path / "models" / "llama"), "seed": 1}
    for spelling in ("llama/", "./llama", "../models/llama", str(tmp_path / "models" / "llama")):
        assert pico.flag_differences(stored, {**stored, "init_from": spelling}, frozenset()) == []
    assert pico.flag_differences(stored, {**stored, "init_from": "other"}, frozenset()) == [
        f"--init_from {stored['init_from']!r} there, 'other' now"]


def test_a_checkpoint_that_stored_an_unread_tinystories_path_resumes_without_it(
        pico, run_main, trained_save_dir, tmp_path):
    """Older versions accepted --tinystories_path with a weight of 0, and never read it; the
    path is now refused without a weight, so such a checkpoint resumes without the path."""
    save = tmp_path / "save"
    shutil.copytree(trained_save_dir, save)
    path = save / "kgram_mlp_seq" / "step_000002.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert not checkpoint["args"]["tinystories_weight"]
    checkpoint["args"]["tinystories_path"] = str(tmp_path / "TinyStories-valid.txt")
    checkpoint["sha256"] = pico.checkpoint_digest(checkpoint)
    torch.save(checkpoint, path)
    status, _, err = run_main(*CHECKPOINT_RUN, "--epochs", "2", "--resume", str(save),
                              "--save_dir", str(save))
    assert status == 0, err
    assert (save / "kgram_mlp_seq" / "step_000004.pt").exists()


def test_generate_takes_the_training_command_with_the_same_model_flags(run_main, trained_save_dir):
    """Model flags equal to the checkpoint's, as in the training command with --generate
    added, are accepted: only a flag that differs is refused (above)."""
    ckpt = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    status, out, err = run_main(*CHECKPOINT_RUN, "--generate", "--checkpoint", str(ckpt))
    assert status == 0 and out.strip(), err


@pytest.mark.parametrize("compiler", [True, False])
def test_generate_compile_says_when_nothing_is_compiled(pico, run_main, trained_save_dir,
                                                       monkeypatch, compiler):
    """--generate --compile compiles a softmax Transformer's decoder on a GPU; elsewhere it
    samples as without the flag, and says so rather than leave the flag silently unused; a
    device that cannot compile at all (no C++ compiler here; Apple's GPU) samples too, and is
    not then refused after that note."""
    if not compiler:
        monkeypatch.setattr(pico.shutil, "which", lambda name: None)
        monkeypatch.delenv("CXX", raising=False)
    ckpt = trained_save_dir / "kgram_mlp_seq" / "step_000002.pt"
    status, out, err = run_main("--generate", "--checkpoint", str(ckpt), "--compile",
                                "--max_new_tokens", "2")
    assert status == 0 and out.strip(), err
    assert "pico-llm: note: --compile compiles the decoding" in err and err.count("\n") == 1


def test_resuming_a_fine_tune_without_its_init_from_names_init_from_alone(pico):
    """A run started with --init_from (which brings its tokenizer, so --tokenizer stayed None)
    resumed without it differs in --init_from; the tokenizer that then defaults to char is a
    consequence, not a second flag for the user to find."""
    stored = {**pico.default_flags(), "models": ["transformer"], "init_from": "/models/llama",
              "tokenizer": None}
    now = {**pico.default_flags(), "models": ["transformer"]}
    with pytest.raises(pico.UserError) as refused:
        pico.check_same_flags({"model_name": "transformer", "args": stored}, pico.Path("step.pt"), now)
    assert "--init_from '/models/llama' there, not given now" in str(refused.value)
    assert "--tokenizer" not in str(refused.value)


def test_a_transformer_is_held_on_resume_to_the_model_it_builds_not_to_the_flags_typed(pico):
    """A preset's value typed out on resuming (--d_model 128 for pico's 128) is the same
    setting as the preset's left untyped; a different model is still refused, and the
    message names the fields it changes (a wider model has wider feed-forward layers and
    heads too). --head_size 0 is d_model / n_heads; preset names are read in any case."""
    def check(stored: dict, now: dict, model_name: str = "transformer"):
        pico.check_same_flags({"model_name": model_name, "args": {**pico.default_flags(), **stored}},
                              pico.Path("step.pt"), {**pico.default_flags(), **now})
    check({}, {"d_model": 128, "n_heads": 4, "zero_init_proj": False, "head_size": 32,
               "transformer_variant": "PICO"})
    check({"transformer_variant": "GPT-oss", "sliding_window": 16}, {"transformer_variant": "GPT-oss"})
    check({}, {"n_experts": 8, "sliding_window": 16}, "transformer_gptoss")
    with pytest.raises(pico.UserError) as refused:
        check({}, {"d_model": 64})
    assert ("(--d_ff 384 there, 192 now; --d_model 128 there, 64 now; --head_size 32 there, "
            "16 now)") in str(refused.value)
    with pytest.raises(pico.UserError, match=r"\(--zero_init_proj False there, True now\)"):
        check({"zero_init_proj": False}, {"zero_init_proj": True})
    with pytest.raises(pico.UserError, match=r"\(--qk_norm False there, True now; "
                                             r"--transformer_variant 'pico' there, 'speedrun' now\)"):
        check({}, {"transformer_variant": "speedrun"})


def test_older_checkpoint_flags_that_build_no_transformer_are_compared_as_typed(pico):
    """A checkpoint whose flags lack one that building a Transformer reads (an older version's)
    is compared flag by flag, as before: not as thirty fields filled in on one side only."""
    stored = {**pico.default_flags(), "models": ["transformer"]}
    del stored["attention_impl"]
    now = {**pico.default_flags(), "models": ["transformer"]}
    pico.check_same_flags({"model_name": "transformer", "args": stored}, pico.Path("step.pt"), now)
    with pytest.raises(pico.UserError, match=r"\(--d_model not given there, 64 now\)$|"
                                             r"\(--d_model not given there, 64 now\);"):
        pico.check_same_flags({"model_name": "transformer", "args": stored}, pico.Path("step.pt"),
                              {**now, "d_model": 64})


def test_generate_takes_a_presets_value_typed_out_as_the_checkpoints(pico, configure):
    """--generate --checkpoint with --d_model 128 typed for a pico preset model (what the
    training command said, with --generate added) is that model; --d_model 64 is refused."""
    trained = {**pico.default_flags(), "models": ["transformer"]}
    pico.check_model_flags_fit(configure("--d_model", "128"), trained,
                               "transformer", "step.pt", "--generate")
    with pytest.raises(pico.UserError, match=r"holds a model trained with --d_model 128, and "
                                             r"--generate takes it as trained; drop --d_model 64"):
        pico.check_model_flags_fit(configure("--d_model", "64"), trained,
                                   "transformer", "step.pt", "--generate")
    with pytest.raises(pico.UserError, match=r"trained with --head_size 16, .* drop --head_size 0$"):
        pico.check_model_flags_fit(configure("--head_size", "0"), {**trained, "head_size": 16},
                                   "transformer", "step.pt", "--generate")   # the flag as typed
    # fine-tuned from a Hugging Face model: config.json, not the preset, gave its shape
    for width in ("32", "128"):
        with pytest.raises(pico.UserError, match=r"holds a model trained with the shape of "
                           r"--init_from hf_dir, .* drop --d_model " + width):
            pico.check_model_flags_fit(configure("--d_model", width), {**trained, "init_from": "hf_dir"},
                                       "transformer", "step.pt", "--generate")
    gptoss = {key: value for key, value in trained.items() if key != "transformer_variant"}
    pico.check_model_flags_fit(configure("--models", "transformer_gptoss", "--d_model", "512"),
                               gptoss, "transformer_gptoss", "step.pt", "--generate")
