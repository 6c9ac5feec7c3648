"""What the notebook's figures, tables and notes say, not only that it runs: the cells that
tools/make_notebook.py builds are executed in this process, on the committed presentation
artefacts or hand-made files, with `save`, `note` and `display` replaced by collectors."""
import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import matplotlib
import pytest

from conftest import REPO, load_script
from test_notebook import cut_short_run_log

matplotlib.use("Agg")
MAKE_NOTEBOOK = REPO / "tools" / "make_notebook.py"
COMMITTED = REPO / "artefacts" / "presentation"


def make_notebook_module():
    return load_script(MAKE_NOTEBOOK, "make_notebook_under_test")


def run_cells(artefacts, run_log=None, upto=None):
    """Run the notebook's code cells on `artefacts` (up to the helpers cell with `upto`):
    (the cells' namespace, figures by name, notes, displayed tables)."""
    ns, figures, notes, shown = {}, {}, [], []
    for cell in make_notebook_module().build().cells:
        if cell.cell_type != "code":
            continue
        exec(compile(cell.source, "cell", "exec"), ns)
        if "parameters" in cell.metadata.get("tags", []):
            ns["ARTEFACTS_DIR"], ns["RUN_LOG"] = Path(artefacts), run_log
        if "def plot_attention" in cell.source:
            ns["save"] = lambda fig, name, folder=None: figures.__setitem__(name, fig)
            ns["note"] = notes.append
            ns["display"] = shown.append
            ns["plt"].show = lambda *a, **k: None
            if upto == "helpers":
                break
    return ns, figures, notes, shown


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    copy = tmp_path_factory.mktemp("p") / "presentation"
    shutil.copytree(COMMITTED, copy, ignore=shutil.ignore_patterns("figures"))
    return run_cells(copy, run_log=copy / "sweep_architectures_run.json")


def load(name):
    return json.loads((COMMITTED / name).read_text())


# --- helpers cell -----------------------------------------------------------------------------

def test_load_skips_a_file_of_another_schema_version(tmp_path):
    ns, _, notes, _ = run_cells(tmp_path, upto="helpers")
    sweep = load("sweep_budget.json")
    sweep["schema_version"] = 2
    (tmp_path / "future.json").write_text(json.dumps(sweep))
    assert ns["load"](tmp_path / "future.json", "sweep") is None
    assert any("is not a sweep file of schema 1; skipped" in n for n in notes)


def test_a_section_that_fails_half_way_leaves_no_figure_open(tmp_path):
    ns, _, notes, _ = run_cells(tmp_path, upto="helpers")
    plt = ns["plt"]
    plt.close("all")
    with ns["drawn_from"]("x.json"):
        plt.subplots()
        raise KeyError("a" * 150)
    assert plt.get_fignums() == []                      # the inline backend would show it
    assert "a" * 150 in notes[-1]                        # the error's first line, up to 160 chars


def test_usable_points_leaves_out_infinite_and_diverged_points_and_says_so(tmp_path):
    ns, _, notes, _ = run_cells(tmp_path, upto="helpers")
    assert not ns["finite"](math.inf) and not ns["finite"](-math.inf)
    sweep = {"sweep": "demo", "status": "finished", "points": [
        {"test_loss": 1.0}, {"test_loss": math.inf}, {"test_loss": 2.0, "diverged": True}]}
    assert ns["usable_points"](sweep, "test_loss") == [sweep["points"][0]]
    assert notes == ["the demo sweep has 1 point without a finite test_loss, left out here."]


def test_save_says_when_a_figure_cannot_be_written(tmp_path):
    ns, _, notes, _ = run_cells(tmp_path, upto="helpers")
    (tmp_path / "file").write_text("")
    fig, _ = ns["plt"].subplots()
    exec_ns = dict(ns)    # the cell's own save (run_cells replaced it): run the helpers again
    mn = make_notebook_module()
    helper = next(c for c in mn.build().cells if "def plot_attention" in c.source)
    exec(compile(helper.source.split("\narchitectures = load")[0], "cell", "exec"), exec_ns)
    exec_ns["note"], exec_ns["plt"].show = notes.append, (lambda *a, **k: None)
    exec_ns["save"](fig, "x", tmp_path / "file" / "sub")
    assert notes and "figure x.png not saved" in notes[-1]


def test_run_loss_figure_plots_train_and_test_loss_against_steps(tmp_path):
    ns, _, _, _ = run_cells(tmp_path, upto="helpers")
    log = cut_short_run_log()
    fig = ns["plot_run_losses"](log, "t")
    ax = fig.axes[0]
    assert ax.get_title() == "LSTM, embedding 16, 1 layer"
    train, test = ax.get_lines()[:2]
    assert list(train.get_xdata()) == [1, 2, 3, 4] and list(train.get_ydata()) == [4.0, 3.0, 2.0, 1.0]
    assert list(test.get_xdata()) == [2] and list(test.get_ydata()) == [3.5]


def test_nan_losses_of_one_model_among_several_are_noted(tmp_path):
    ns, _, notes, _ = run_cells(tmp_path, upto="helpers")
    log = cut_short_run_log()
    log["models"]["other"] = json.loads(json.dumps(log["models"]["lstm_seq"]))
    log["models"]["lstm_seq"]["history"][-1]["train_loss"] = float("nan")
    ns["plot_run_losses"](log, "t")
    assert notes == ["NaN or infinite losses in my_run, not drawn: lstm_seq 1 of 5."]


def test_run_summary_of_a_finished_run_gives_its_final_figures(tmp_path):
    ns, _, _, _ = run_cells(tmp_path, upto="helpers")
    run = load("sweep_architectures_run.json")
    table = ns["run_summary"](run)
    for name, record in run["models"].items():
        final = record["final"]
        assert table.loc[name, "test loss (nats per token)"] == final["test_loss"]
        assert table.loc[name, "train loss (nats per token)"] == final["train_loss"]
        assert table.loc[name, "training time (s)"] == final["train_time_s"]


# --- sections, on the committed artefacts ----------------------------------------------------

def test_inventory_gives_each_sweeps_minutes(committed):
    ns = committed[0]
    table = ns["inventory"]
    recipe = load("sweep_recipe.json")
    assert table.loc["recipe", "minutes"] == round(recipe["wall_time_s"] / 60, 1)


def test_throughput_bars_are_tokens_per_second_on_a_log_axis(committed):
    figures = committed[1]
    ax = figures["throughput"].axes[0]
    points = load("sweep_architectures.json")["points"]
    assert ax.get_xscale() == "log"
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([p["tokens_per_s"] for p in points])


def test_expert_usage_is_the_last_epochs(committed):
    ax = committed[1]["expert_usage"].axes[0]
    usage = load("sweep_architectures_run.json")["models"]["GPT-oss"]["expert_usage"]
    assert ax.get_images()[0].get_array().tolist() == usage[-1]["fractions"]
    assert f"epoch {usage[-1]['epoch']}" in ax.get_title()


def test_a_run_log_without_expert_usage_is_noted(tmp_path):
    shutil.copy(COMMITTED / "sweep_architectures_run.json", tmp_path)
    run = load("sweep_architectures_run.json")
    del run["models"]["GPT-oss"]["expert_usage"]
    (tmp_path / "sweep_architectures_run.json").write_text(json.dumps(run))
    _, figures, notes, _ = run_cells(tmp_path)
    assert any("has no expert usage for GPT-oss" in n for n in notes)
    assert "expert_usage" not in figures


def test_sink_shares_are_one_minus_the_row_sums(committed):
    fig = committed[1]["sliding_window_sinks"]
    maps = load("architectures_attention_GPT-oss.json")
    titles = [ax.get_title() for ax in fig.axes]
    full = [layer for layer, w in enumerate(maps["windows"]) if w is None]
    assert any(t == f"layer {full[0]}, head 0: full causal attention" for t in titles)
    share_ax = next(ax for ax in fig.axes if ax.get_title() == "Measured: 1 minus a row's sum")
    expected = [1 - sum(map(sum, head)) / len(head) for layer in maps["layers"] for head in layer]
    assert [bar.get_height() for bar in share_ax.patches] == pytest.approx(expected)


def test_linear_attention_is_compared_with_softmax(committed):
    fig = committed[1]["linear_attention"]
    points = load("sweep_attention.json")["points"]
    softmax = points[0]
    loss_ax = next(ax for ax in fig.axes if ax.get_title().startswith("(a)"))
    assert f"{softmax['test_loss']:.3f}" in loss_ax.get_title()
    assert [t.get_text() for t in loss_ax.get_yticklabels()] == [
        p["settings"]["attention_kind"] for p in points[1:]]
    speed_ax = next(ax for ax in fig.axes if ax.get_title().startswith("(b)"))
    last = softmax["generation"][-1]
    assert f"ratios at {last['context']} tokens" in speed_ax.get_title()


def test_overfitting_panels_plot_train_and_test_loss_per_epoch(committed):
    fig = committed[1]["overfitting"]
    point = load("sweep_overfit.json")["points"][0]
    train, test = fig.axes[0].get_lines()[:2]
    assert list(test.get_ydata()) == [e["test_loss"] for e in point["epochs"]]
    assert list(train.get_ydata()) == [e["train_loss"] for e in point["epochs"]]


def test_hyperparameter_heatmaps_bold_the_lowest_loss_darker_is_lower(committed):
    fig = committed[1]["hyperparams"]
    for ax in fig.axes[:-1]:
        if not ax.texts:
            continue
        values = {float(t.get_text()): t.get_fontweight() for t in ax.texts if t.get_text() != "n/a"}
        assert [v for v, w in values.items() if w == "bold"] == [min(values)]
        image = ax.get_images()[0]
        low, high = image.to_rgba(min(values)), image.to_rgba(max(values))
        assert sum(low[:3]) < sum(high[:3])          # darker is lower (better)


def test_ablation_bars_red_where_worse_and_table_keeps_every_point(committed):
    ns, figures, _, shown = committed
    ax = figures["ablations"].axes[0]
    sweep = load("sweep_ablations.json")
    base = sweep["points"][0]["test_loss"]
    plotted = [p for p in sweep["points"][1:] if not p.get("diverged")]
    colours = [bar.get_facecolor() for bar in ax.patches]
    import matplotlib.colors as mc
    assert colours == [mc.to_rgba("C3" if p["test_loss"] > base else "C2") for p in plotted]
    texts = [getattr(s, "data", "") for s in shown]
    assert any(t.startswith("Diverged, so not plotted") and "no normalization" in t for t in texts)
    import pandas as pd
    table = next(s for s in shown if isinstance(s, pd.DataFrame) and s.index.name == "change")
    assert list(table.index) == [p["settings"]["ablation"] for p in sweep["points"]]


def test_recipe_verdicts_and_time_to_reach(committed):
    ns, _, _, shown = committed
    curve = [{"test_bits_per_byte": 3.0, "train_time_s": 0, "step": 0},
             {"test_bits_per_byte": 2.0, "train_time_s": 10, "step": 100}]
    assert ns["time_to_reach"](curve, 2.0) == (10, 100)
    sweep = load("sweep_recipe.json")
    recipes = {p["settings"]["recipe"]: p for p in sweep["points"]}
    common = min(p["train_time_s"] for p in recipes.values())
    text = next(s.data for s in shown if getattr(s, "data", "").startswith("**Helped**"))
    assert f"after the same {common:.1f} s" in text
    ref = ns["loss_at"](recipes["nanoGPT recipe"]["curve"], common)
    for label, p in recipes.items():
        if label.startswith("+ ") and ns["loss_at"](p["curve"], common) - ref < -ns["NOISE"]:
            helped = text.split("**No clear difference**")[0]
            assert label[2:] in helped


def test_learning_rate_crosses_mark_the_diverged_rates_and_batch_twin_is_speed(committed):
    fig = committed[1]["learning_rate_batch_size"]
    rates = load("sweep_learning_rate.json")["points"]
    crosses = next(l for l in fig.axes[0].get_lines() if l.get_label() == "diverged (stopped)")
    assert list(crosses.get_xdata()) == [p["settings"]["learning_rate"] for p in rates if p.get("diverged")]
    twin = next(l for ax in fig.axes for l in ax.get_lines() if l.get_label() == "tokens/s (right axis)")
    batches = sorted(load("sweep_batch_size.json")["points"], key=lambda p: p["settings"]["batch_size"])
    assert list(twin.get_ydata()) == [p["tokens_per_s"] for p in batches]


def test_sampling_draws_a_measure_that_is_zero_for_only_some_rules(tmp_path):
    sweep = load("sweep_sampling.json")
    sweep["points"][0]["diversity"]["distinct_1"] = 0      # greedy may repeat one word
    (tmp_path / "sweep_sampling.json").write_text(json.dumps(sweep))
    _, figures, _, _ = run_cells(tmp_path)
    labels = [t.get_text() for t in figures["sampling_diversity"].axes[0].get_legend().get_texts()]
    assert "distinct-1" in labels


def test_an_empty_artefacts_folder_says_no_sweep_files(tmp_path):
    _, _, notes, _ = run_cells(tmp_path / "nothing_here")
    assert any(n.startswith("no sweep files in `") for n in notes)


def test_make_notebook_replaces_a_notebook_whose_cells_are_already_its_own(tmp_path):
    """A notebook that lost the tool's metadata (stripped by a clean-up tool, or written before
    it was recorded) but whose cells are what the tool writes holds no edit to protect."""
    import nbformat
    mn = make_notebook_module()
    notebook = mn.build()
    del notebook.metadata["pico_llm"]
    path = tmp_path / "pico_llm.ipynb"
    nbformat.write(notebook, path)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert mn.main(["--output", str(path)]) == 0
    assert "pico_llm" in nbformat.read(path, as_version=4).metadata


def test_make_notebook_fails_when_it_cannot_write(tmp_path):
    mn = make_notebook_module()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = mn.main(["--output", str(tmp_path / "missing" / "pico_llm.ipynb")])
    assert status == 2 and "cannot write" in err.getvalue()
