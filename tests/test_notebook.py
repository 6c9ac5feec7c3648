"""The presentation notebook runs headless against fresh tiny artefacts, the committed
artefacts, no artefacts at all, and a student's own run log; the requirements install it."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from schemas import runlog_schema

pytestmark = pytest.mark.usefixtures("one_thread")   # the sweeps run in this process

FIGURES = {"loss_curves", "throughput", "overfitting", "custom_data", "budget", "hyperparams",
           "sampling_diversity", "attention_transformer", "ablations", "learning_rate_batch_size"}
# The "New architectures" figures and the file each is drawn from. Artefacts made before these
# sweeps existed lack the files (or, for expert usage, the field); the notebook then shows a note
# naming the file instead of the figure.
NEW_FIGURES = {"expert_usage": "sweep_architectures_run.json",
               "sliding_window_sinks": "architectures_attention_GPT-oss.json",
               "linear_attention": "sweep_attention.json", "recipe": "sweep_recipe.json"}


def new_figures_expected(artefacts):
    """The NEW_FIGURES whose input is in `artefacts`."""
    expected = {figure for figure, source in NEW_FIGURES.items() if (artefacts / source).exists()}
    run_log = artefacts / NEW_FIGURES["expert_usage"]
    if run_log.exists() and not (json.loads(run_log.read_text())["models"].get("GPT-oss", {})
                                 .get("expert_usage")):
        expected.discard("expert_usage")
    return expected


def execute_notebook(artefacts, run_log=None):
    """Run the notebook with its parameter cell overridden, as papermill would; returns the
    text of every output (streams, markdown and tables as HTML)."""
    notebook = nbformat.read(REPO / "pico_llm.ipynb", as_version=4)
    parameters = next(index for index, cell in enumerate(notebook.cells)
                      if "parameters" in cell.metadata.get("tags", []))
    run_log_source = "None" if run_log is None else f"Path({str(run_log)!r})"
    artefacts_source = repr(artefacts) if isinstance(artefacts, str) else f"Path({str(artefacts)!r})"
    notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(
        f"ARTEFACTS_DIR = {artefacts_source}\nRUN_LOG = {run_log_source}"))
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/markdown", ""))
                     + str(output.get("data", {}).get("text/html", ""))
                     for cell in notebook.cells for output in cell.get("outputs", []))


def notebook_helpers(artefacts):
    """The namespace of the notebook's code cells, run in this process up to the one that
    defines its plotting helpers, against `artefacts`."""
    import matplotlib
    matplotlib.use("Agg")
    notebook = nbformat.read(REPO / "pico_llm.ipynb", as_version=4)
    namespace = {}
    for cell in (cell for cell in notebook.cells if cell.cell_type == "code"):
        exec(compile(cell.source, "cell", "exec"), namespace)
        if "parameters" in cell.metadata.get("tags", []):
            namespace["ARTEFACTS_DIR"] = artefacts
        if "def plot_attention" in cell.source:
            return namespace
    raise AssertionError("no cell defines plot_attention")


def test_attention_figures_keep_to_six_layers_and_eight_heads_labelled_at_the_edges(tmp_path):
    """A 12 x 12 model's maps drew 144 panels, every one labelled with every token (58 s for a
    57-token prompt): the figure keeps the first and last three layers and the first eight
    heads, says which it leaves out, and writes the tokens along its bottom row and left
    column only."""
    import numpy as np
    namespace = notebook_helpers(tmp_path)
    figures = []
    namespace["save"] = lambda fig, name, folder=None: figures.append(fig)
    weights = np.tril(np.ones((20, 20)))
    weights /= weights.sum(axis=1, keepdims=True)
    maps = {"model": "big", "prompt": "p" * 20, "tokens": list("abcdefghijklmnopqrst"),
            "layers": [[weights.tolist()] * 12] * 12}
    namespace["plot_attention"](maps, "attention_big")
    panels = [ax for ax in figures[0].axes if ax.get_title()]
    assert [ax.get_title() for ax in panels[::8]] == [f"layer {n} head 0" for n in (0, 1, 2, 9, 10, 11)]
    assert len(panels) == 6 * 8
    assert "(layers 3-8 and heads 8-11 not shown)" in figures[0].get_suptitle()
    labelled_x = [ax for ax in panels if [t.get_text() for t in ax.get_xticklabels()]]
    labelled_y = [ax for ax in panels if [t.get_text() for t in ax.get_yticklabels()]]
    assert labelled_x == panels[-8:] and labelled_y == panels[::8]
    assert [t.get_text() for t in labelled_x[0].get_xticklabels()] == maps["tokens"]
    for layers, heads, options, shown, note in [
            (7, 9, {}, (0, 1, 2, 4, 5, 6), " (layer 3 and head 8 not shown)"),
            (12, 4, {"max_layers": 5}, (0, 1, 2, 10, 11), " (layers 3-9 not shown)"),
            (3, 4, {}, (0, 1, 2), "")]:
        figures.clear()
        namespace["plot_attention"]({**maps, "layers": [[weights.tolist()] * heads] * layers},
                                    "attention_big", **options)
        panels = [ax for ax in figures[0].axes if ax.get_title()]
        assert [ax.get_title() for ax in panels[::min(heads, 8)]] == [f"layer {n} head 0" for n in shown]
        assert figures[0].get_suptitle() == f"big: attention over {maps['prompt']!r}{note}"


def test_the_notebook_file_is_what_the_generator_writes():
    import make_notebook as generator          # tools/ is on the path (conftest.py)
    written = nbformat.read(REPO / "pico_llm.ipynb", as_version=4)
    assert [c.source for c in written.cells] == [c.source for c in generator.build().cells]
    assert written.metadata["pico_llm"] == generator.build().metadata["pico_llm"]
    code = [cell for cell in written.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


MAKE_NOTEBOOK = REPO / "tools" / "make_notebook.py"


def make_notebook_process(*argv):
    """tools/make_notebook.py run as its command line runs it."""
    return subprocess.run([sys.executable, str(MAKE_NOTEBOOK), *argv], capture_output=True,
                          text=True, timeout=120)


def make_notebook(*argv):
    """tools/make_notebook.py's main() in this process, its status and output returned as a
    process's (a process of its own spends about 2 s importing nbformat). The command line
    itself, run_tool's exit status included, is run as a process above."""
    import contextlib
    import io
    import make_notebook as generator          # tools/ is on the path (conftest.py)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = generator.main(list(argv))
        except SystemExit as exit:             # argparse's --help and usage errors
            status = exit.code
    return subprocess.CompletedProcess(list(argv), status, stdout.getvalue(), stderr.getvalue())


def test_make_notebook_reads_its_flags(tmp_path):
    result = make_notebook_process("--help")
    assert result.returncode == 0 and "--force" in result.stdout
    result = make_notebook_process("--output", str(tmp_path / "x.ipynb"), "--nonsense")
    assert result.returncode == 2 and "--nonsense" in result.stderr
    assert not (tmp_path / "x.ipynb").exists()
    result = make_notebook_process("--output", str(tmp_path / "x.ipynb"))
    assert result.returncode == 0
    assert (tmp_path / "x.ipynb").read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()


def test_make_notebook_keeps_a_users_edit_unless_forced(tmp_path):
    import make_notebook as generator
    notebook = tmp_path / "pico_llm.ipynb"
    shutil.copy(REPO / "pico_llm.ipynb", notebook)
    edited = notebook.read_text().replace("RUN_LOG = None", "RUN_LOG = Path(\\\"my_run.json\\\")")
    assert edited != notebook.read_text()                        # as the README suggests
    notebook.write_text(edited)
    result = make_notebook("--output", str(notebook))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "has cells edited" in result.stderr and "--force" in result.stderr
    assert notebook.read_text() == edited
    assert make_notebook("--output", str(notebook), "--force").returncode == 0
    assert notebook.read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()
    # A notebook this tool wrote from other cells (before an edit of the tool) is its own.
    older = generator.build()
    older.cells[0].source += "\n\nA sentence since removed."
    older.metadata["pico_llm"]["generated_cells_sha256"] = generator.cells_digest(older)
    nbformat.write(older, notebook)
    assert make_notebook("--output", str(notebook)).returncode == 0
    assert notebook.read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()


def test_make_notebook_reads_a_notebook_whose_metadata_it_did_not_write(tmp_path):
    """Metadata under this tool's key that is no object (edited, or another tool's) had
    given an AttributeError: the notebook is judged by its cells alone."""
    import make_notebook as generator
    notebook = tmp_path / "pico_llm.ipynb"
    for cells, status in ((generator.build().cells, 0), ([], 2)):
        nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"pico_llm": "x"}), notebook)
        before = notebook.read_bytes()
        result = make_notebook("--output", str(notebook))
        assert result.returncode == status and result.stderr.count("\n") == status // 2, result.stderr
        if status:
            assert "has cells edited" in result.stderr and notebook.read_bytes() == before
    assert make_notebook("--output", str(notebook), "--force").returncode == 0
    assert notebook.read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()


def test_make_notebook_never_replaces_a_file_that_is_no_notebook_even_forced(tmp_path):
    """--force replaces a notebook's edits or outputs; a run log or a corpus given as --output
    by mistake is refused either way, and the message does not offer --force."""
    for name, content in (("main_job.json", '{"kind": "runlog"}\n'), ("corpus.txt", "a story\n")):
        target = tmp_path / name
        target.write_text(content)
        for force in ([], ["--force"]):
            result = make_notebook("--output", str(target), *force)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
            assert "is not a notebook this tool can read" in result.stderr
            assert "--force" not in result.stderr and target.read_text() == content


def test_make_notebook_keeps_a_runs_outputs_unless_forced(tmp_path):
    notebook = tmp_path / "pico_llm.ipynb"
    shutil.copy(REPO / "pico_llm.ipynb", notebook)
    assert make_notebook("--output", str(notebook)).returncode == 0      # its own, unchanged
    assert notebook.read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()
    for output in ([nbformat.v4.new_output("stream", text="a figure's caption\n")], []):
        ran = nbformat.read(REPO / "pico_llm.ipynb", as_version=4)
        first_code = next(cell for cell in ran.cells if cell.cell_type == "code")
        first_code.outputs, first_code.execution_count = output, 1
        nbformat.write(ran, notebook)
        before = notebook.read_bytes()
        result = make_notebook("--output", str(notebook))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "holds the outputs of a run" in result.stderr and "--force" in result.stderr
        assert notebook.read_bytes() == before
    # The command the message suggests clears them; the notebook is then this tool's own.
    clear = re.search(r"`jupyter nbconvert (.*?)`", result.stderr).group(1)
    cleared = subprocess.run([sys.executable, "-m", "nbconvert", *shlex.split(clear)],
                             capture_output=True, text=True, timeout=120)
    assert cleared.returncode == 0, cleared.stderr
    assert make_notebook("--output", str(notebook)).returncode == 0
    assert notebook.read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()
    nbformat.write(ran, notebook)
    assert make_notebook("--output", str(notebook), "--force").returncode == 0
    assert notebook.read_bytes() == (REPO / "pico_llm.ipynb").read_bytes()


def test_notebook_runs_on_a_tiny_presentation_sweep(run_main, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the robot met the cat {i % 7} times." for i in range(40)))
    artefacts = tmp_path / "artefacts"
    status, _, _ = run_main("--sweep", "presentation", "--sweep_scale", "tiny",
                            "--input_files", str(corpus))
    assert status == 0
    assert not (artefacts / "sweep_recipe.json").exists()     # it reads a text of its own
    status, _, _ = run_main("--sweep", "recipe", "--sweep_scale", "tiny", "--input_files", str(corpus))
    assert status == 0
    text = execute_notebook(artefacts)
    assert "Note:" not in text
    assert "`RUN_LOG` is None: set it" in text
    assert new_figures_expected(artefacts) == set(NEW_FIGURES)  # the presentation makes them all
    assert {p.stem for p in (artefacts / "figures").glob("*.png")} == FIGURES | set(NEW_FIGURES)


def test_the_committed_presentation_is_every_sweep_at_the_current_full_scale(pico):
    """What the notebook shows must be what `--sweep presentation` makes with this code: every
    sweep, each at today's full scale, none stopped part-way."""
    import dataclasses
    committed = REPO / "artefacts" / "presentation"
    scale = json.loads(json.dumps(dataclasses.asdict(pico.SWEEP_SCALES["full"])))
    for name in pico.SWEEP_NAMES:
        sweep = pico.load_sweep(committed / f"sweep_{name}.json")
        assert sweep["config"]["scale"] == scale, name
        assert sweep["status"] == "finished" and sweep["points"], name


def test_notebook_runs_on_the_committed_artefacts_and_plots_their_run_log(tmp_path):
    committed = REPO / "artefacts" / "presentation"
    copy = tmp_path / "presentation"
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("figures"))
    text = execute_notebook(copy, run_log=copy / "sweep_architectures_run.json")
    assert "Note:" not in text
    assert "pico-python-docs/ (" in text and "shipped corpus (" in text   # each sweep's text
    figures = {p.stem for p in (copy / "figures").glob("*.png")}
    assert FIGURES | set(NEW_FIGURES) <= figures
    assert "**sweep_architectures_run** (finished)" in text
    assert (copy / "sweep_architectures_run_loss_curves.png").exists()


def presentation_cut_to(points, folder):
    """A copy of the committed presentation with every sweep cut to its first `points`
    points and still running, as a sweep stopped part-way leaves its file."""
    shutil.copytree(REPO / "artefacts" / "presentation", folder,
                    ignore=shutil.ignore_patterns("figures"))
    for path in folder.glob("sweep_*.json"):
        sweep = json.loads(path.read_text())
        if sweep["kind"] == "sweep":
            sweep["points"], sweep["status"] = sweep["points"][:points], "running"
            path.write_text(json.dumps(sweep))
    return folder


def test_notebook_notes_sweeps_stopped_after_their_first_point_and_nan_losses(tmp_path):
    artefacts = presentation_cut_to(1, tmp_path / "presentation")
    log = cut_short_run_log()
    log["models"]["lstm_seq"]["history"][-1]["train_loss"] = float("nan")   # diverged
    run_log = tmp_path / "my_run.json"
    run_log.write_text(json.dumps(log))
    text = execute_notebook(artefacts, run_log=run_log)   # raises if a cell fails
    for sweep in ("attention", "ablations"):          # each compares points with a first one
        assert (f"the {sweep} sweep has 1 point to show; this section needs 2 (the sweep is "
                f"not finished: `python pico-llm.py --sweep {sweep} --artefacts_dir") in text
    assert "NaN or infinite losses in my_run, not drawn: lstm_seq 1 of 5." in text
    assert text.count("Note:") == 3
    figures = {p.stem for p in (artefacts / "figures").glob("*.png")}
    assert figures == (FIGURES | set(NEW_FIGURES)) - {"ablations", "linear_attention"}
    assert (tmp_path / "my_run_loss_curves.png").exists()


def test_notebook_notes_sweeps_without_points(pico, tmp_path):
    artefacts = presentation_cut_to(0, tmp_path / "presentation")
    text = execute_notebook(artefacts)
    for sweep in pico.SWEEP_NAMES:
        assert f"the {sweep} sweep has 0 points to show" in text, sweep
    figures = {p.stem for p in (artefacts / "figures").glob("*.png")}
    assert figures == {"loss_curves", "attention_transformer", "expert_usage",
                       "sliding_window_sinks"}    # drawn from the run log and attention files


def test_notebook_runs_without_artefacts_and_says_so(tmp_path):
    text = execute_notebook(str(tmp_path / "nothing_here"))    # a string, as papermill's -p gives
    assert "sweep_architectures.json` is missing" in text
    assert "no attention_*.json" in text
    assert "architectures_attention_GPT-oss.json` is missing" in text
    assert "sweep_attention.json` is missing" in text
    assert "sweep_recipe.json` is missing" in text
    assert "`python pico-llm.py --sweep recipe --input_dir" in text   # how to make it
    assert not os.path.exists(tmp_path / "nothing_here" / "figures")


def cut_short_run_log():
    """A run log as pico-llm writes it when a run is interrupted after four steps: one
    epoch's test loss, one sample, and no final summary."""
    history = [{"step": step, "epoch": 1 + step // 3, "train_loss": 5.0 - step, "lr": 1e-3,
                "tokens_seen": 64 * step, "elapsed_s": 0.1 * step, "tokens_per_s": 640.0}
               for step in range(1, 5)]
    return {
        "schema_version": 1, "kind": "run", "run_name": "my_run", "status": "interrupted",
        "created": "2025-01-01T00:00:00+00:00", "args": {},
        "environment": {"torch": "2.13.0", "python": "3.11", "device": "cpu", "threads": 2},
        "data": {"tokenizer": "char", "vocab_size": 257,
                 "sources": {"custom": {"examples": 3, "train": 2, "test": 1}}},
        "models": {"lstm_seq": {
            "parameters": 1234, "training_flops_per_token": 7404,
            "config": {"embed_size": 16, "lstm_layers": 1},
            "history": history,
            "test_history": [{"epoch": 1, "step": 2, "test_loss": 3.5, "test_bits_per_byte": 5.05,
                              "test_tokens": 100}],
            "samples": [{"step": 4, "final": False, "rule": "greedy", "prompt": "Once",
                         "text": "Once upon a robot"}]}},
    }


def test_notebook_plots_a_run_log_that_was_cut_short(pico, tmp_path):
    import jsonschema
    log = cut_short_run_log()
    jsonschema.validate(log, runlog_schema(pico))
    run_log = tmp_path / "runs" / "my_run.json"
    run_log.parent.mkdir()
    run_log.write_text(json.dumps(log))
    text = execute_notebook(tmp_path / "no_presentation", run_log=run_log)
    assert "**my_run** (interrupted)" in text
    assert "Once upon a robot" in text  # the samples table
    summary = re.search(r"<th>lstm_seq</th>(.*?)</tr>", text.split("training time (s)")[1], re.S)
    cells = [float(cell) for cell in re.findall(r"<td>(.*?)</td>", summary.group(1))]
    # parameters, steps, last train loss, last test loss, its bits per byte, tokens/s, time
    assert cells == [1234, 4, 1.0, 3.5, 5.05, 640, 0.4]
    assert (tmp_path / "runs" / "my_run_loss_curves.png").exists()


def test_notebook_shows_the_attention_maps_and_clusters_a_run_log_names(run_main, tmp_path):
    """A run's interpretability files carry its name; the notebook finds them through its log."""
    status, _, err = run_main("--input_files", str(REPO / "3seqs.txt"), "--limit_custom_examples",
                              "30", "--models", "transformer", "--block_size", "16", "--d_model",
                              "16", "--n_blocks", "1", "--epochs", "1", "--max_steps_per_epoch",
                              "1", "--max_new_tokens", "3", "--quiet", "--attention_maps",
                              "--monosemantic_enabled", "--monosemantic_clusters", "2",
                              "--run_name", "mine")
    assert status == 0, err
    run_log = tmp_path / "artefacts" / "mine.json"
    text = execute_notebook(tmp_path / "no_presentation", run_log=run_log)
    assert "**mine** (finished)" in text and "**transformer**: embedding clusters" in text
    assert "mine.attention_transformer.json` is missing" not in text
    assert (run_log.parent / "mine_attention_transformer.png").exists()


def test_notebook_notes_a_run_log_without_models(tmp_path):
    log = cut_short_run_log()
    log["models"], log["status"] = {}, "failed"   # it failed before building its first model
    run_log = tmp_path / "my_run.json"
    run_log.write_text(json.dumps(log))
    text = execute_notebook(tmp_path / "no_presentation", run_log=run_log)
    assert "**my_run** (failed)" in text and "my_run.json` has no model in it" in text


def test_notebook_reports_a_missing_run_log(tmp_path):
    text = execute_notebook(tmp_path / "no_presentation", run_log=tmp_path / "runs" / "typo.json")
    assert "typo.json` is missing; check the path" in text


def test_notebook_skips_json_files_that_hold_no_object(tmp_path):
    (tmp_path / "sweep_budget.json").write_text("[]")
    (tmp_path / "my_run.json").write_text('"a string"')
    os.mkfifo(tmp_path / "sweep_ablations.json")        # read, it would wait for a writer
    text = execute_notebook(tmp_path, run_log=tmp_path / "my_run.json")
    assert "sweep_budget.json` is not a sweep file of schema 1; skipped" in text
    assert "my_run.json` is not a run file of schema 1; skipped" in text
    assert "sweep_ablations.json` is not a regular file (a pipe, socket or device)" in text

def test_notebook_notes_files_edited_by_hand_and_draws_the_rest(tmp_path):
    """A field deleted or given another type by hand stops only the section that reads it: a
    note names the file and the error, and every other figure is still drawn."""
    artefacts = presentation_cut_to(100, tmp_path / "presentation")

    def edit(name, change):
        data = json.loads((artefacts / name).read_text())
        change(data)
        (artefacts / name).write_text(json.dumps(data))

    edits = {   # file: (the edit, the figure its section no longer draws)
        "sweep_attention.json": (lambda d: d["points"][0].pop("generation"), "linear_attention"),
        "sweep_overfit.json": (lambda d: d["points"][0].update(epochs="three"), "overfitting"),
        "sweep_budget.json": (lambda d: d.update(points={"first": 1}), "budget"),
        "sweep_recipe.json": (lambda d: d["points"][0].pop("curve"), "recipe"),
        "sweep_architectures_run.json": (lambda d: d["models"]["GPT-oss"]["config"].pop("n_experts"),
                                         "expert_usage"),
        "architectures_attention_GPT-oss.json": (lambda d: d.update(layers=[]),
                                                 "sliding_window_sinks"),
        "monosemantic_transformer.json": (lambda d: d.update(clusters=[]), None),
        "sweep_sampling.json": (lambda d: d["points"][0]["diversity"].update(distinct_1=10**400),
                                "sampling_diversity"),    # an integer too large for a float
    }
    for name, (change, _) in edits.items():
        edit(name, change)
    log = cut_short_run_log()
    log["models"]["lstm_seq"]["samples"][0].pop("text")
    run_log = tmp_path / "my_run.json"
    run_log.write_text(json.dumps(log))
    # Relative paths, as the parameter cell's defaults are: each note names the file as given.
    relative = Path(os.path.relpath(tmp_path, REPO))     # the notebook runs in the repository
    text = execute_notebook(relative / "presentation", run_log=relative / "my_run.json")
    for name in edits:
        assert f"`{relative / 'presentation' / name}` is not as pico-llm writes it (" in text, name
    assert f"`{relative / 'my_run.json'}` is not as pico-llm writes it (KeyError: 'text', at `" in text
    # the notebook's line that met the edit, which names the field it read
    assert "string indices must be integers, not 'str', at `x = [e[\"epoch\"] for e in epochs]`" in text
    assert text.count("Note:") == len(edits) + 2     # the budget file's twice: the inventory too
    figures = {p.stem for p in (artefacts / "figures").glob("*.png")}
    assert figures == (FIGURES | set(NEW_FIGURES)) - {figure for _, figure in edits.values()}
    assert (tmp_path / "my_run_loss_curves.png").exists()   # drawn before the samples table


def requirement_names(path):
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.split(r"[<>=!~;\[ ]", line)[0].lower())
    return names


def test_the_requirements_install_what_the_notebook_needs():
    names = requirement_names(REPO / "requirements.txt")
    assert {"notebook", "nbconvert", "pandas", "matplotlib", "ipykernel"} <= names


def test_the_suite_bounds_each_tests_time(pytestconfig):
    """pytest-timeout, installed with the requirements, stops a hung test after pytest.ini's
    limit (the thread method: a test's own SIGALRM would cancel the signal method's timer)."""
    assert {"pytest-timeout", "pytest-xdist"} <= requirement_names(REPO / "requirements.txt")
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 0 < float(pytestconfig.getini("timeout")) <= 900
    assert pytestconfig.getini("timeout_method") == "thread"


def test_make_notebook_refuses_an_output_that_is_no_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")          # reading it to look for edits would block
    result = make_notebook_process("--output", str(tmp_path / "fifo"))   # a hang is a timeout
    assert result.returncode == 2 and "is not a regular file" in result.stderr
