"""tools/vs_nanogpt.py: pico-llm's side runs end to end without nanoGPT (speed is never asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def test_pico_side_trains_the_nanogpt_shape_and_scores_held_out_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(10):        # file 5 is held out from both
        (corpus / f"doc{index}.txt").write_text(
            "".join(f"  Document {index} says line {line}.\n\n" for line in range(60)))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "vs_nanogpt.py"),
         "--steps", "6", "--rounds", "1", "--warmup", "1", "--corpus_dir", str(corpus)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line, = [l for l in result.stdout.splitlines() if l.startswith("round 1 pico-llm")]
    steps, held_out = re.search(r"(\d+) steps, .* held-out ([\d.]+) nats/char", line).groups()
    assert int(steps) == 6 and 0 < float(held_out) < np.log(257) + 1   # near uniform at most
    assert "nanoGPT" not in result.stdout.split("median")[-1]


def test_held_out_windows_cover_the_text_once(monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    import vs_nanogpt
    ids = np.arange(200)
    windows = vs_nanogpt.windows(ids, 64)
    assert windows.shape == (3, 65)
    assert windows[:, 1:].flatten().tolist() == list(range(1, 193))    # every target once
    epochs, per_epoch, total = vs_nanogpt.total_steps(64 * 12 * 10 + 1, 25)
    assert (epochs, per_epoch, total) == (3, 9, 27)                    # 10 steps a pass


def test_the_comparisons_pico_flags_take_any_schedule_and_end_at_nanogpts_min_lr(pico):
    """train.py's cosine ends at learning_rate / 10: pico-llm's too, and --pico_flags can
    still choose a constant rate (an explicit --min_lr_ratio would then be refused unread)."""
    sys.path.insert(0, str(REPO / "tools"))
    import vs_nanogpt
    for extra, ratio in ([], 0.1), (["--lr_schedule", "constant"], None):
        config = pico.config_from_command_line([*vs_nanogpt.PICO_FLAGS, *extra,
                                                "--input_files", "train.txt"])
        assert ratio is None or config.training.min_lr_ratio == ratio


def test_nanogpt_gets_the_characters_pico_llm_reads(pico, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import vs_nanogpt
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"doc{index:02d}.txt").write_text(
            f"\n\ndef f{index}(x):   \n    return x\n\n\nA paragraph {index}.\n\n")
    train, held_out = vs_nanogpt.running_text(pico, corpus)
    assert "def f5(" in held_out and "def f5(" not in train and "def f11(" in train
    assert "\n    return x\n\n\nA paragraph 0." in train           # indentation, blank lines kept
    (tmp_path / "train.txt").write_text(train + "\n")               # as the tool writes it
    data = pico.config_from_command_line(["--input_files", str(tmp_path / "train.txt"),
                                          "--data_format", "stream"]).data
    assert pico.custom_documents(data) == [train]                   # what pico-llm trains on


def test_a_run_that_fails_midway_ends_the_comparison_in_one_line(monkeypatch, tmp_path, capsys):
    """pico-llm (or nanoGPT) failing after the comparison started, out of memory say: one line
    naming it and its status, not a CalledProcessError traceback."""
    sys.path.insert(0, str(REPO / "tools"))
    import vs_nanogpt
    failing = tmp_path / "failing.py"
    failing.write_text("import sys\nsys.exit('pico-llm: error: out of memory')\n")
    monkeypatch.setattr(vs_nanogpt, "PICO_PATH", failing)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(10):
        (corpus / f"doc{index}.txt").write_text(f"Document {index} says a line.\n" * 60)
    with pytest.raises(SystemExit) as stop:
        vs_nanogpt.main(["--steps", "4", "--rounds", "1", "--corpus_dir", str(corpus)])
    assert stop.value.code == ("vs_nanogpt: error: failing.py stopped with status 1 "
                               "(its message is above)")
    with pytest.raises(SystemExit) as stop:          # nanoGPT's words are captured: quoted
        vs_nanogpt.run_or_stop([sys.executable, str(failing)], capture_output=True, text=True)
    assert stop.value.code.endswith("status 1: pico-llm: error: out of memory")
