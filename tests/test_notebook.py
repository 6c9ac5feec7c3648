"""The presentation notebook runs headless against fresh tiny artefacts, the committed
artefacts, and no artefacts at all."""

import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

FIGURES = {"loss_curves", "throughput", "overfitting", "custom_data", "budget", "hyperparams",
           "sampling_diversity", "attention_transformer", "ablations", "learning_rate_batch_size"}


def execute_notebook(artefacts, monkeypatch):
    monkeypatch.setenv("PICO_ARTEFACTS", str(artefacts))
    notebook = nbformat.read(REPO / "pico_llm.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/markdown", ""))
                     for cell in notebook.cells for output in cell.get("outputs", []))


def test_the_notebook_file_is_what_the_generator_writes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_notebook", REPO / "tools" / "make_notebook.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = nbformat.read(REPO / "pico_llm.ipynb", as_version=4)
    assert [c.source for c in written.cells] == [c.source for c in generator.build().cells]


def test_notebook_runs_on_a_tiny_presentation_sweep(run_main, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the robot met the cat {i % 7} times." for i in range(40)))
    artefacts = tmp_path / "artefacts"
    status, _, _ = run_main("--sweep", "presentation", "--sweep_scale", "tiny",
                            "--input_files", str(corpus))
    assert status == 0
    text = execute_notebook(artefacts, monkeypatch)
    assert "Note:" not in text
    assert {p.stem for p in (artefacts / "figures").glob("*.png")} == FIGURES


def test_notebook_runs_on_the_committed_artefacts(tmp_path, monkeypatch):
    committed = REPO / "artefacts"
    if not (committed / "sweep_sampling.json").exists():
        pytest.skip("no committed presentation artefacts")
    copy = tmp_path / "artefacts"
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("figures"))
    text = execute_notebook(copy, monkeypatch)
    assert "Note:" not in text
    assert FIGURES <= {p.stem for p in (copy / "figures").glob("*.png")}


def test_notebook_runs_without_artefacts_and_says_so(tmp_path, monkeypatch):
    text = execute_notebook(tmp_path / "nothing_here", monkeypatch)
    assert "sweep_architectures.json` is missing" in text
    assert "no attention_*.json" in text
    assert not os.path.exists(tmp_path / "nothing_here" / "figures")
