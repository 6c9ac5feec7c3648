"""The tools' command lines (tools/*.py): bad input gets one line on stderr, named after the
tool, and exit status 2, as pico-llm.py's own; --help still prints the whole help."""

import ast
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TOOLS

# Each tool with what its command line requires, so that the flag under test is what it reads.
TOOL_ARGUMENTS = {
    "ab_cpu_matmul": [], "ab_rope": [], "ab_training_speed": ["HEAD"], "benchmark": [],
    "compile_presets": ["--output", "{tmp}/out.json"], "make_3seqs": ["--out", "{tmp}/3seqs.txt"],
    "make_notebook": ["--output", "{tmp}/pico_llm.ipynb"],
    "recipe_ablation": ["--input_dir", "{tmp}"], "recipe_gpt2": [], "stream_vs_lines": [],
    "vs_nanogpt": [],
}


def run_tool(name, argv, tmp_path):
    return subprocess.run([sys.executable, str(TOOLS / f"{name}.py"),
                           *(a.format(tmp=tmp_path) for a in argv)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def run_tool_here(name, argv, tmp_path, monkeypatch, capsys):
    """run_tool in this process: the script run as `python tools/NAME.py` runs it (its
    __main__ block, run_tool and all, by runpy), its status and output returned as a
    process's. A process of its own spends 2 s importing torch; every tool is run as a
    process by the unknown-flag test above."""
    import runpy
    import signal
    import torch
    script = str(TOOLS / f"{name}.py")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *(a.format(tmp=tmp_path) for a in argv)])
    capsys.readouterr()
    threads, status = torch.get_num_threads(), 0

    def too_long(signum, frame):                    # run_tool's timeout: a value taken by
        raise TimeoutError(f"tools/{name}.py still running after 120 s")   # mistake runs

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)
    with torch.random.fork_rng(devices=[]):         # the process's state left as it was
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:                  # as the interpreter turns it into a status
            status = exit.code if isinstance(exit.code, int) or exit.code is None else 1
            if status == 1:
                print(exit.code, file=sys.stderr)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, status or 0, out, err)


def assert_one_line_error(result, name, message):
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{name}: error: ") and message in result.stderr, result.stderr


def test_every_tool_with_a_command_line_is_checked_here():
    assert set(TOOL_ARGUMENTS) == {path.stem for path in TOOLS.glob("*.py")   # but the tools'
                                   if "parse_args(" in path.read_text()     # shared module
                                   and path.stem != "pico_module"}


@pytest.mark.parametrize("name", sorted(TOOL_ARGUMENTS))
def test_a_tool_refuses_an_unknown_flag_in_one_line_and_still_prints_its_help(name, tmp_path):
    result = run_tool(name, [*TOOL_ARGUMENTS[name], "--no_such_flag"], tmp_path)
    assert_one_line_error(result, name, "unrecognized arguments: --no_such_flag (see --help)")
    assert list(tmp_path.iterdir()) == []
    result = run_tool(name, ["--help"], tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"usage: tools/{name}.py") and "options:" in result.stdout
    # the description: the docstring's first sentence, whole (not its first line)
    description = " ".join(result.stdout.split("\n\n")[1].split())
    docstring = " ".join(ast.get_docstring(ast.parse((TOOLS / f"{name}.py").read_text())).split())
    assert docstring.startswith(description) and description[-1] in ".?", description
    options = " ".join(result.stdout.split("options:")[1].split()).split(" -")
    assert [o for o in options if o.count("(default:") > 1] == []   # one default, said once


@pytest.mark.parametrize("name, argv, message", [
    ("ab_cpu_matmul", ["--configs", "lstm,nope"], "argument --configs: nope is not a config; choose from kgram_mlp, lstm"),
    ("ab_cpu_matmul", ["--configs", ","], "argument --configs: names no config"),
    ("ab_cpu_matmul", ["--rounds", "0"], "argument --rounds: expected at least 1, got 0"),
    ("ab_rope", ["--shape", "2", "2"], "argument --shape: expected 4 arguments"),
    ("ab_training_speed", ["HEAD", "--model", "gru"], "argument --model: invalid choice: 'gru'"),
    ("ab_training_speed", ["no_such_rev"], "no pico-llm.py at the git revision 'no_such_rev' "
                                           "(invalid object name 'no_such_rev')"),
    ("ab_training_speed", [""], "the git revision is empty; give a commit, branch or tag"),
    ("ab_training_speed", ["--", "--output={tmp}/diff"],    # git show would have written it
     "the git revision '--output={tmp}/diff' begins with '-'; give a commit, branch or tag"),
    ("benchmark", ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    ("compile_presets", ["--configs", "GPT-5", "--output", "{tmp}/out.json"],
     "--configs: unknown GPT-5"),
    ("make_3seqs", ["--out", "{tmp}/missing/3seqs.txt"], "cannot write {tmp}/missing/3seqs.txt"),
    ("recipe_ablation", ["--input_dir", "{tmp}", "--steps", "many"],
     "argument --steps: expected an integer, got 'many'"),
    ("recipe_gpt2", ["--output", "{tmp}/out.json"], "give --input_dir and --output"),
    ("recipe_gpt2", ["--input_dir", str(REPO / "data" / "custom_corpus"), "--device_id", "cpu",
                     "--output", "{tmp}/out.json"],
     "recipe_gpt2.py is sized for a GPU (GPT-2 small takes minutes a step on a CPU); add --tiny"),
    ("benchmark", ["--gpt2", "--device_id", "cpu", "--output", "{tmp}/out.json"],
     "--gpt2 is sized for a GPU (GPT-2 small takes minutes a step on a CPU); add --quick"),
    ("stream_vs_lines", ["--seconds", "soon"], "argument --seconds: expected a number, got 'soon'"),
    ("stream_vs_lines", ["--seconds", "nan"], "expected a finite number above 0, got nan"),
    ("stream_vs_lines", ["--seconds", "1e7"],          # a step count made of it would overflow
     "argument --seconds: expected at most 1000000 seconds (11 days), got 1e7"),
    ("recipe_gpt2", ["--seconds", "1e308"],
     "argument --seconds: expected at most 1000000 seconds (11 days), got 1e308"),
    ("recipe_gpt2", ["--tiny", "--device_id", "cpu", "--input_dir", str(REPO / "data" / "custom_corpus"),
                     "--learning_rate", "1e30", "--output", "{tmp}/out.json"],
     "nanoGPT recipe diverged at step 2 (its loss or gradient was not finite, or exploded); "
     "lower --learning_rate (1e+30)"),
    ("vs_nanogpt", ["--rounds", "two"], "argument --rounds: expected an integer, got 'two'"),
    ("ab_rope", ["--samples", "0"], "argument --samples: expected at least 1, got 0"),
    ("ab_rope", ["--shape", "1", "1", "4", "3"], "argument --shape: D, a head's width, must be even"),
    ("ab_rope", ["--shape", *["10000"] * 4], "queries of 10,000,000,000,000,000 numbers do not fit"),
    ("ab_rope", ["--shape", "1", "1", "1", str(2**70)],        # past int64: not even tried
     f"queries of {2**70:,} numbers do not fit"),
    ("ab_rope", ["--threads", "100000"], "argument --threads: 100000 is more than the"),
    ("ab_rope", ["--step", "--vocab", "10000000000"], "argument --vocab: at most 262,144"),
    ("ab_training_speed", ["HEAD", "--rounds", "0"], "argument --rounds: expected at least 1, got 0"),
    ("compile_presets", ["--timeout", "-1", "--output", "{tmp}/out.json"],
     "argument --timeout: expected a finite number above 0, got -1"),
    ("compile_presets", ["--timeout", "1e308", "--output", "{tmp}/out.json"],
     "--timeout is at most 1000000 seconds (11 days), got 1e+308"),
    ("compile_presets", ["--device_id", "gpu", "--output", "{tmp}/out.json"],
     "unknown --device_id 'gpu'; use auto, cpu, mps or cuda:N"),
    # checked as pico-llm checks them before the first run, not by each run in turn
    ("compile_presets", ["--batch_size", str(2**70), "--output", "{tmp}/out.json"],
     "--batch_size is a 22-digit number, beyond any size or count pico-llm can hold"),
    ("compile_presets", ["--batch_size", str(10**14), "--steps", "2", "--output", "{tmp}/out.json"],
     "3seqs.txt makes 1 step(s) of --batch_size 100000000000000, fewer than --steps 2; lower either"),
    ("recipe_gpt2", ["--tiny", "--input_dir", str(REPO / "data" / "custom_corpus"),
                     "--output", "{tmp}"], "--output {tmp} is a directory"),
    ("recipe_ablation", ["--input_dir", str(REPO / "data" / "custom_corpus"), "--sweep_scale",
                         "tiny", "--steps", "1000000000"],
     "--steps 1000000000 would read the text in --input_dir"),
    ("vs_nanogpt", ["--pico_flags", '"--bias'], "--pico_flags '\"--bias': No closing quotation"),
    ("vs_nanogpt", ["--pico_flags", "--d_model 0"], "--d_model must be positive"),
    ("vs_nanogpt", ["--pico_flags", "--d_model 1000000000"],    # not left to the child run
     "transformer needs about 238,418,646,961.5 GiB"),
    ("vs_nanogpt", ["--pico_flags=--bogus 3"],
     "--pico_flags: unrecognized arguments: --bogus 3; see python pico-llm.py --help"),
    ("vs_nanogpt", ["--corpus_dir", str(REPO / "data" / "custom_corpus"), "--steps", "1000000000"],
     "--steps 1000000000 would read the training text in --corpus_dir"),
    ("vs_nanogpt", ["--pico_flags=--models lstm_seq"],     # would end in a KeyError, late
     "--pico_flags: --models cannot be given here (it trains pico-llm's transformer"),
    ("vs_nanogpt", ["--pico_flags=--accounting GPT2-small --seed 1337"],   # the default, too
     "--pico_flags: --seed, --accounting cannot be given here"),
    ("vs_nanogpt", ["--pico_flags=--tokenizer=gpt2"], "--pico_flags: --tokenizer cannot be given"),
    ("ab_training_speed", ["HEAD", "--flags=--models lstm_seq"],   # was timed as transformer
     "--flags: --models cannot be given here (it times --model on the CPU); drop it"),
    ("ab_training_speed", ["HEAD", "--flags", "'"], "--flags \"'\": No closing quotation"),
    ("ab_training_speed", ["HEAD", "--flags", "--d_model 0"], "--d_model must be positive"),
    ("ab_training_speed", ["HEAD", "--flags=--d_model x"],
     "--flags: argument --d_model: invalid int value: 'x'; see python pico-llm.py --help"),
    ("ab_training_speed", ["HEAD", "--model", "lstm_seq", "--vocab_size", "1000000000000"],
     "a training step of lstm_seq at --batch_size 16 and --vocab_size 1000000000000 does not fit"),
    ("ab_training_speed", ["HEAD", "--model", "kgram_mlp_seq", "--vocab_size", str(2**62)],
     f"a training step of kgram_mlp_seq at --batch_size 16 and --vocab_size {2**62} does not fit"),
    ("benchmark", ["--seed", "99999999999999999999999"],
     "argument --seed: expected at most 4294967295, got 99999999999999999999999"),
    ("vs_nanogpt", ["--seed", "4294967296"], "argument --seed: expected at most 4294967295, got "
     "4294967296"),
    ("benchmark", ["--seed", "-1"], "argument --seed: expected at least 0, got -1"),
    ("vs_nanogpt", ["--seed", "-1"], "argument --seed: expected at least 0, got -1"),
    ("vs_nanogpt", ["--warmup", "-1"], "argument --warmup: expected at least 0, got -1"),
    ("vs_nanogpt", ["--nanogpt", "{tmp}/nanoGPT"], "--nanogpt {tmp}/nanoGPT has no train.py (a "
                                                   "nanoGPT checkout); drop --nanogpt to time"),
    ("compile_presets", ["--configs", "pico,minGPT,pico", "--output", "{tmp}/out.json"],
     "--configs names pico twice; name each once"),
    ("compile_presets", ["--configs", "", "--output", "{tmp}/out.json"],
     "--configs '' has an empty name; give names among: GPT-oss"),
    ("ab_training_speed", ["HEAD", "--flags", "--compile"], "argument --flags: expected one "
     "argument (give it one; a value that begins with '-' is written --flags=VALUE)"),
    ("vs_nanogpt", ["--pico_flags", "--random_offsets"], "argument --pico_flags: expected one "
     "argument (give it one; a value that begins with '-' is written --pico_flags=VALUE)"),
])
def test_a_tool_refuses_a_bad_value_in_one_line(name, argv, message, tmp_path, monkeypatch, capsys):
    result = run_tool_here(name, argv, tmp_path, monkeypatch, capsys)
    assert_one_line_error(result, name, message.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, argv, message", [
    ("recipe_ablation", ["--input_dir=-docs", "--sweep_scale", "tiny", "--steps", "2"],
     "--input_dir -docs is too little text to hold some out"),
    ("recipe_gpt2", ["--tiny", "--input_dir=-docs", "--output", "r.json", "--seconds", "1",
                     "--device_id", "cpu"], "--input_dir -docs is too little text to hold any out"),
    ("stream_vs_lines", ["--corpus_dir=-docs", "--seconds", "1", "--d_model", "16",
                         "--block_size", "16"], "--corpus_dir -docs is too little text to time"),
    ("compile_presets", ["--device_id=-x", "--output", "o.json", "--tiny"],
     "unknown --device_id '-x'"),
])
def test_a_tool_passes_a_value_that_begins_with_a_dash_on_as_a_value(name, argv, message,
                                                                      tmp_path):
    """A folder named -docs, given as --input_dir=-docs: the tool had passed it on to pico-llm
    as two words, whose parser took -docs for a flag and said, as "pico-llm", that
    --input_dir (or --cache_dir, never given) expected an argument."""
    (tmp_path / "-docs").mkdir()
    (tmp_path / "-docs" / "a.txt").write_text("Just a short line of text.\n")
    result = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), *argv],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert_one_line_error(result, name, message)


@pytest.mark.parametrize("name, flag", [
    ("benchmark", "--output"), ("benchmark", "--profile"), ("benchmark", "--nanogpt_dir"),
    ("compile_presets", "--output"), ("make_3seqs", "--out"), ("make_notebook", "--output"),
    ("recipe_gpt2", "--output"), ("recipe_gpt2", "--write_corpus"),
    ("stream_vs_lines", "--corpus_dir"), ("vs_nanogpt", "--corpus_dir"), ("vs_nanogpt", "--nanogpt"),
])
def test_a_tool_refuses_an_empty_path_rather_than_the_current_directory(name, flag, tmp_path,
                                                                       monkeypatch, capsys):
    result = run_tool_here(name, [*TOOL_ARGUMENTS[name], flag, ""], tmp_path, monkeypatch, capsys)
    assert_one_line_error(result, name, f"argument {flag}: is empty; give a path")


def test_ab_training_speed_names_what_an_older_pico_llm_lacks(tmp_path):
    if subprocess.run(["git", "cat-file", "-e", "83ec3ed"], cwd=REPO).returncode != 0:
        pytest.skip("a clone without the first commit")
    result = run_tool("ab_training_speed", ["83ec3ed", "--model", "lstm_seq"], tmp_path)
    assert_one_line_error(result, "ab_training_speed", "pico-llm.py at 83ec3ed predates what this "
                                                       "tool times: it has no keep_freed_memory")


def test_make_3seqs_writes_over_its_own_corpus_or_an_empty_file_only(tmp_path):
    (tmp_path / "results.json").write_text('{"loss": 1}\n')
    result = run_tool("make_3seqs", ["--out", "{tmp}/results.json"], tmp_path)
    assert_one_line_error(result, "make_3seqs", f"--out {tmp_path}/results.json already exists "
                                                "and is not a 3seqs corpus; choose another --out")
    assert (tmp_path / "results.json").read_text() == '{"loss": 1}\n'
    (tmp_path / "3seqs.txt").write_text("")
    for _ in range(2):             # into the empty file, then over its own corpus
        assert run_tool("make_3seqs", ["--out", "{tmp}/3seqs.txt"], tmp_path).returncode == 0
        assert (tmp_path / "3seqs.txt").read_bytes() == (REPO / "3seqs.txt").read_bytes()


def test_recipe_gpt2_writes_its_corpus_as_a_new_directory_only(tmp_path):
    (tmp_path / "os.txt").write_text("mine\n")
    result = run_tool("recipe_gpt2", ["--write_corpus", "{tmp}"], tmp_path)
    assert_one_line_error(result, "recipe_gpt2", f"--write_corpus {tmp_path} already exists and "
                                                 "is not an empty directory; give a new directory")
    assert [p.name for p in tmp_path.iterdir()] == ["os.txt"]
    assert (tmp_path / "os.txt").read_text() == "mine\n"


@pytest.mark.parametrize("name", ["stream_vs_lines", "vs_nanogpt"])
def test_a_corpus_tool_writes_python_docs_into_no_directory_of_other_files(name, tmp_path):
    (tmp_path / "notes.md").write_text("mine\n")
    result = run_tool(name, ["--corpus_dir", "{tmp}"], tmp_path)
    assert_one_line_error(result, name, f"--corpus_dir {tmp_path} holds no .txt files, but other "
                                        "files; give a directory of .txt files, or a new or empty")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


def test_corpus_only_writes_the_text_and_trains_nothing(tmp_path):
    """The recipe sweep's text, written by the README's command: a directory of text is left as
    it is, and a new one gets Python's documentation (the slow half, 14 s, is left to the
    whole-or-nothing test below)."""
    (tmp_path / "mine.txt").write_text("mine\n")
    result = run_tool("stream_vs_lines", ["--corpus_dir", "{tmp}", "--corpus_only"], tmp_path)
    assert result.returncode == 0 and "already holds .txt files" in result.stdout, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    (tmp_path / "mine.txt").unlink()
    (tmp_path / "notes.md").write_text("mine\n")
    result = run_tool("stream_vs_lines", ["--corpus_dir", "{tmp}", "--corpus_only"], tmp_path)
    assert_one_line_error(result, "stream_vs_lines", "holds no .txt files, but other files")


@pytest.mark.parametrize("text, block_size, message", [
    ("one\ntwo\nthree\n", "8", "an epoch of lines mode is 1 step(s) of 16 lines, and timing needs "
                                "11; add text\n"),
    ("".join(f"line {i}\n" for i in range(200)), "64",
     "an epoch of stream mode is 2 step(s) of 16 windows of --block_size 64, and timing needs 11; "
     "add text or lower --block_size\n")], ids=["three lines", "200 lines"])
def test_stream_vs_lines_says_what_would_give_enough_steps_to_time(tmp_path, text, block_size,
                                                                    message):
    """Lines mode reads 16 lines a step, whatever the block: only a stream of windows gains
    steps from a smaller --block_size."""
    (tmp_path / "text.txt").write_text(text)
    result = run_tool("stream_vs_lines", ["--corpus_dir", "{tmp}", "--block_size", block_size,
                                          "--d_model", "8", "--seconds", "1"], tmp_path)
    assert_one_line_error(result, "stream_vs_lines", message)


def test_python_docs_appear_whole_or_not_at_all(monkeypatch, tmp_path):
    import stream_vs_lines
    failures = [KeyboardInterrupt()]

    def write_one_file(directory, packages):
        (directory / "os.txt").write_text("documentation\n")
        if failures:
            raise failures.pop()
        return 14

    monkeypatch.setattr(stream_vs_lines, "write_python_docs_into", write_one_file)
    with pytest.raises(KeyboardInterrupt):
        stream_vs_lines.write_python_docs(tmp_path / "docs")
    assert list(tmp_path.iterdir()) == []              # no half corpus, no temporary directory
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "os.txt").write_text("mine\n")
    with pytest.raises(OSError):                       # a directory of files is never written into
        stream_vs_lines.write_python_docs(tmp_path / "mine")
    assert (tmp_path / "mine" / "os.txt").read_text() == "mine\n"
    (tmp_path / "empty").mkdir()
    for new in tmp_path / "empty", tmp_path / "new" / "docs":
        assert stream_vs_lines.write_python_docs(new) == 14
        assert (new / "os.txt").read_text() == "documentation\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "new"]


@pytest.mark.parametrize("name, argv", [("vs_nanogpt", ["--pico_flags=--help"]),
                                        ("ab_training_speed", ["HEAD", "--flags=--help"])])
def test_pico_llms_help_through_a_tool_is_printed_not_refused(name, argv, tmp_path):
    result = run_tool(name, argv, tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: pico-llm"), result.stderr


def test_stream_vs_lines_names_its_own_flag_for_a_corpus_of_blank_files(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    result = run_tool("stream_vs_lines", ["--corpus_dir", "{tmp}"], tmp_path)
    assert_one_line_error(result, "stream_vs_lines",
                          f"--corpus_dir {tmp_path} contains no .txt files with text")


def test_stream_vs_lines_refuses_a_model_past_the_memory_here_before_building_it(
        tmp_path, monkeypatch, capsys):
    """As pico-llm's main() does: --d_model 2**62 had failed in the embedding's allocation
    with a traceback."""
    for text in (REPO / "data" / "custom_corpus").glob("*.txt"):
        (tmp_path / text.name).write_text(text.read_text())
    result = run_tool_here("stream_vs_lines", ["--corpus_dir", "{tmp}", "--d_model", str(2**62),
                                               "--block_size", "8"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(result, "stream_vs_lines", "transformer needs about 10^")
    assert "lower --d_model" in result.stderr


@pytest.mark.parametrize("name", ["stream_vs_lines", "vs_nanogpt"])
def test_a_corpus_tool_refuses_a_file_or_too_little_text_as_its_corpus(name, tmp_path):
    (tmp_path / "notes.txt").write_text("a few words\n")
    result = run_tool(name, ["--corpus_dir", "{tmp}/notes.txt"], tmp_path)
    assert_one_line_error(result, name, f"--corpus_dir {tmp_path}/notes.txt is not a directory")
    result = run_tool(name, ["--corpus_dir", "{tmp}"], tmp_path)
    assert_one_line_error(result, name, f"--corpus_dir {tmp_path} is too little text")
    assert (tmp_path / "notes.txt").read_text() == "a few words\n"


def test_recipe_gpt2_writes_over_no_file_but_its_own_report(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    result = run_tool("recipe_gpt2", ["--tiny", "--input_dir", str(REPO / "data" / "custom_corpus"),
                                      "--output", "{tmp}/notes.txt"], tmp_path)
    assert_one_line_error(result, "recipe_gpt2", "notes.txt already exists and is no recipe_gpt2 "
                                                 "report, which is all this writes over")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_recipe_gpt2_refuses_more_seconds_than_its_text_has_passes_for(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world\nthis is a line\n")
    result = run_tool("recipe_gpt2", ["--tiny", "--device_id", "cpu", "--input_dir", "{tmp}/text",
                                      "--seconds", "1e6", "--output", "{tmp}/out.json"], tmp_path)
    assert_one_line_error(result, "recipe_gpt2", "/text is too little text for --seconds 1e+06 of "
                                                 "nanoGPT recipe")
    assert "add text or lower --seconds" in result.stderr


def test_run_tool_answers_a_closed_or_full_output_in_one_line(capsys, monkeypatch):
    """Every tool's command runs its main() through run_tool: a pipe closed early stops it
    with a line and 141, as pico-llm's runs; a full disk is one line and 2; any other OSError
    stays the error it is."""
    import errno
    from pico_module import run_tool as run_main_of_tool
    monkeypatch.setattr(sys, "stdout", sys.stdout)        # run_tool points it at /dev/null

    def raising(error):
        def main():
            raise error
        return main

    assert run_main_of_tool(raising(BrokenPipeError()), "benchmark") == 141
    assert capsys.readouterr().err == ("benchmark: stopped: the output was closed (piped into "
                                       "head?) before it finished; send it to a file, or through tail\n")
    full = OSError(errno.ENOSPC, "No space left on device", "/out/results.json")
    assert run_main_of_tool(raising(full), "benchmark") == 2
    assert capsys.readouterr().err == ("benchmark: error: cannot write '/out/results.json' (No "
                                       "space left on device); free some space, or send the "
                                       "output elsewhere\n")
    with pytest.raises(PermissionError):
        run_main_of_tool(raising(PermissionError(errno.EPERM, "not permitted")), "benchmark")
    assert run_main_of_tool(lambda: 0, "benchmark") == 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_tool_whose_standard_output_is_full_says_so_in_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(TOOLS / "ab_rope.py"), "--shape", "2", "2",
                                 "8", "8", "--samples", "1", "--calls", "1"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO)
    assert_one_line_error(result, "ab_rope", "cannot write the output (No space left on device)")


def test_recipe_gpt2_refuses_text_too_short_to_hold_some_out_before_training(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("abc")
    result = run_tool("recipe_gpt2", ["--tiny", "--device_id", "cpu", "--input_dir", "{tmp}/text",
                                      "--output", "{tmp}/out.json"], tmp_path)
    assert_one_line_error(result, "recipe_gpt2", "/text is too little text to hold any out")
    assert result.stdout == ""                      # refused before any recipe trained


def test_benchmark_refuses_a_nanogpt_dir_whose_model_py_is_not_nanogpts(tmp_path):
    for source, message in (("def broken(:\n", "its model.py cannot be loaded (SyntaxError"),
                            ("import no_such_module_here\n", "(ModuleNotFoundError"),
                            ("x = 1\n", "its model.py has no GPT and GPTConfig")):
        (tmp_path / "model.py").write_text(source)
        result = run_tool("benchmark", ["--gpt2", "--quick", "--device_id", "cpu", "--nanogpt_dir",
                                        "{tmp}", "--output", "{tmp}/out.json"], tmp_path)
        assert_one_line_error(result, "benchmark", message)
        assert not (tmp_path / "out.json").exists()


def test_vs_nanogpt_passes_over_names_of_txt_files_that_are_not_files(tmp_path):
    """As pico-llm's --input_dir does: a folder, a broken link or a pipe named *.txt is no text
    (a pipe's read would wait for a writer)."""
    import os
    from conftest import TOOLS
    from pico_module import load_pico, load_script
    vs_nanogpt = load_script(TOOLS / "vs_nanogpt.py", "pico_vs_nanogpt")
    for index in range(12):
        (tmp_path / f"{index:02d}.txt").write_text(f"document {index}\n")
    (tmp_path / "03.txt").unlink()
    (tmp_path / "03.txt").mkdir()
    (tmp_path / "04.txt").unlink()
    (tmp_path / "04.txt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "06.txt").unlink()
    os.mkfifo(tmp_path / "06.txt")
    train, held_out = vs_nanogpt.running_text(load_pico(), tmp_path)
    assert held_out == "document 5"
    assert train.split("\n") == [f"document {i}" for i in (0, 1, 2, 7, 8, 9, 10, 11)]


def test_recipe_ablation_refuses_text_too_short_to_hold_some_out(tmp_path):
    (tmp_path / "a.txt").write_text("one line only\n")
    result = run_tool("recipe_ablation", ["--input_dir", "{tmp}", "--sweep_scale", "tiny",
                                          "--steps", "2"], tmp_path)
    assert_one_line_error(result, "recipe_ablation", f"--input_dir {tmp_path} is too little text "
                                                     "to hold some out for testing")



# A tool in miniature: a temporary folder, named on standard output once its child process
# has started, and that child, waited for until a signal comes.
TOOL_WITH_A_TEMPORARY_FOLDER = """
import subprocess, sys, tempfile
sys.path.insert(0, {tools!r})
from pico_module import run_tool

def main():
    with tempfile.TemporaryDirectory(prefix="tool-") as folder:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            print(folder, flush=True)
            child.wait()
        finally:
            child.kill()
            child.wait()
    return 0

sys.exit(run_tool(main, "tool"))
"""


@pytest.mark.parametrize("signal_number, said", [
    (signal.SIGTERM, "stopped by a signal"), (signal.SIGHUP, "stopped by a signal"),
    (signal.SIGINT, "stopped by Ctrl-C")], ids=["TERM", "HUP", "INT"])
def test_a_tool_stopped_by_a_signal_cleans_up_as_on_ctrl_c(signal_number, said):
    """vs_nanogpt stopped by SIGTERM had left its temporary folder behind (Python's default
    ends a process where it stands); as an exit, `with` blocks and subprocess clean up. Ctrl-C
    ends in one line too, not KeyboardInterrupt's traceback."""
    process = subprocess.Popen([sys.executable, "-c",
                                TOOL_WITH_A_TEMPORARY_FOLDER.format(tools=str(TOOLS))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # as from a terminal: a background job's shell ignores SIGINT
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    folder = Path(process.stdout.readline().strip())
    assert folder.is_dir()
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (128 + signal_number, f"tool: {said}\n")
    assert not folder.exists()


def test_run_tool_takes_sigterm_only_while_the_tool_runs(monkeypatch):
    """A tool run in the test process (as some tests run them) leaves its signals as they were;
    one that exits with 143 itself is not said to be stopped by a signal."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import pico_module
    during = []
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)     # as a tool's process starts
    try:
        assert pico_module.run_tool(lambda: during.append(signal.getsignal(signal.SIGTERM)) or 0,
                                    "tool") == 0
        assert during == [pico_module.stopped_by_signal]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with pytest.raises(SystemExit) as stop:
            pico_module.run_tool(lambda: sys.exit(143), "tool")
        assert stop.value.code == 143 and not isinstance(stop.value, pico_module.StoppedBySignal)
    finally:
        signal.signal(signal.SIGTERM, previous)
