"""Section 7: sweeps, their JSON files and resume, diversity metrics, the terminal loss
plot, and the interpretability tools (attention maps, k-means over embeddings)."""

import json
import os
import signal
import subprocess
import sys
import types

import jsonschema
import pytest
import torch

from conftest import REPO, SCRIPT
from schemas import runlog_schema, sweep_schema

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the fox the lantern a harbor boat rain wind garden robot cat sock".split()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """40 short lines of made-up text, one example per line."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 5)) + "."
             for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_diversity_metrics_on_hand_made_strings(pico):
    metrics = pico.diversity_metrics(["a b c d", "a b e f"])
    assert metrics["distinct_1"] == pytest.approx(6 / 8)        # a, b repeat across texts
    assert metrics["distinct_2"] == pytest.approx(5 / 6)        # "a b" twice
    assert metrics["repeated_3gram_fraction"] == 0.0            # nothing repeats inside a text
    looping = pico.diversity_metrics(["x y z x y z x y z"])
    assert looping["distinct_1"] == pytest.approx(3 / 9)
    assert looping["repeated_3gram_fraction"] == pytest.approx(4 / 7)  # 7 trigrams, 3 distinct
    assert pico.diversity_metrics(["", "one"]) == {
        "distinct_1": 1.0, "distinct_2": 0.0, "repeated_3gram_fraction": 0.0}
    # a repeat is one within a text: two samples that agree are distinct-n's to count
    assert pico.diversity_metrics(["a b c", "a b c"])["repeated_3gram_fraction"] == 0.0


def test_epoch_losses_pair_each_epochs_own_mean_train_loss_with_its_test_loss(pico):
    record = {"history": [{"epoch": e, "train_loss": loss} for e, loss in
                          [(1, 4.0), (1, 4.0), (2, 2.0), (2, 1.0)]],
              "test_history": [{"epoch": 1, "step": 2, "test_loss": 3.5},
                               {"epoch": 2, "step": 4, "test_loss": 2.5}]}
    assert pico.epoch_losses(record) == [
        {"epoch": 1, "step": 2, "train_loss": 4.0, "test_loss": 3.5},
        {"epoch": 2, "step": 4, "train_loss": 1.5, "test_loss": 2.5}]


def test_a_sweeps_data_fingerprint_sees_where_one_example_ends(pico):
    """A sweep resumes only on its own examples: the same characters cut into other lines are
    other data."""
    assert pico.examples_fingerprint(["ab", "c"]) != pico.examples_fingerprint(["a", "bc"])


def test_corpus_size_subsets_are_nested_and_the_same_each_run(pico, configure, tiny_corpus):
    """The custom_data sweep's sizes score ever larger subsets of one training split: each
    holds the smaller ones, and a resumed sweep draws the same."""
    config = configure("--input_files", str(tiny_corpus))
    char = pico.ByteTokenizer()
    subset = lambda size: pico.sweep_data(config, char, size).sources[0].train.tolist()  # noqa
    assert subset(5) == subset(5) and len(subset(5)) == 5
    assert set(subset(5)) < set(subset(12)) < set(subset(30))


def test_a_step_budget_below_one_epoch_stops_inside_the_epoch(pico, configure):
    data = types.SimpleNamespace(steps_per_epoch=lambda batch_size, limit: 20)
    training = pico.with_step_budget(configure(), data, 3).training
    assert (training.epochs, training.max_steps_per_epoch) == (1, 3)


def test_tiny_sweep_writes_a_valid_sweep_file(pico, run_main, tmp_path, tiny_corpus):
    status, out, _ = run_main("--sweep", "budget", "--sweep_scale", "tiny",
                              "--input_files", str(tiny_corpus))
    assert status == 0
    sweep = pico.load_sweep(tmp_path / "artefacts" / "sweep_budget.json")
    jsonschema.validate(sweep, sweep_schema(pico))
    assert sweep["status"] == "finished" and sweep["config"]["tokenizer"] == "char"
    assert {p["model"] for p in sweep["points"]} == {"kgram_mlp_seq", "lstm_seq", "transformer"}
    assert sorted({p["settings"]["max_steps_per_epoch"] for p in sweep["points"]}) == [1, 3, 6]
    for point in sweep["points"]:
        assert point["tokens_per_s"] > 0 and point["test_loss"] > 0
    assert "sweep budget: 9 points (0 already done)" in out


def test_an_interrupted_sweep_skips_the_points_it_finished(pico, run_main, tmp_path, tiny_corpus):
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    sweep = json.loads(path.read_text())
    finished = sweep["points"][:2]
    sweep["points"], sweep["status"] = finished, "running"     # as if killed after two points
    sweep["created"], sweep["wall_time_s"] = "2026-01-01T00:00:00+00:00", 1000.0
    path.write_text(json.dumps(sweep))
    status, out, _ = run_main(*argv)
    assert status == 0 and "3 points (2 already done)" in out
    resumed = pico.load_sweep(path)
    assert resumed["points"][:2] == finished                   # not retrained
    assert [p["settings"]["kgram_variant"] for p in resumed["points"]] == ["onehot", "embedding", "conv"]
    # The file keeps its creation time and counts the earlier run's time with this one's.
    assert resumed["created"] == "2026-01-01T00:00:00+00:00" and resumed["wall_time_s"] > 1000.0


def test_a_custom_sweep_log_that_is_a_directory_is_said_so(run_main, tmp_path, tiny_corpus):
    """Not Python's "[Errno 21] Is a directory: ..." inside the message."""
    (tmp_path / "folder").mkdir()
    status, _, err = run_main("--custom_sweep_log", str(tmp_path / "folder"), "--sweep_scale",
                              "tiny", "--input_files", str(tiny_corpus))
    assert status == 2 and err == (f"pico-llm: error: sweep file {tmp_path / 'folder'} is a "
                                   "directory; move it away, or give the sweep another path "
                                   "(--custom_sweep_log, or another --artefacts_dir)\n")
    assert list((tmp_path / "folder").iterdir()) == []


def test_custom_sweep_log_and_sizes(pico, run_main, tmp_path, tiny_corpus):
    """--custom_sweep_log alone writes its own file and nothing in --artefacts_dir, which is
    not held to be a folder then (a file of that name had stopped the sweep)."""
    log = tmp_path / "elsewhere" / "sizes.json"
    (tmp_path / "a_file").write_text("kept\n")
    status, _, err = run_main("--custom_sweep_log", str(log), "--custom_sweep_sizes", "2,5",
                              "--sweep_scale", "tiny", "--input_files", str(tiny_corpus),
                              artefacts=tmp_path / "a_file")
    assert status == 0, err
    assert (tmp_path / "a_file").read_text() == "kept\n"
    assert sorted(p.name for p in log.parent.iterdir()) == ["sizes.json"]
    sweep = pico.load_sweep(log)
    assert sweep["sweep"] == "custom_data"
    assert sorted((p["model"], p["train_examples"]) for p in sweep["points"]) == [
        ("lstm_seq", 2), ("lstm_seq", 5), ("transformer", 2), ("transformer", 5)]
    assert all(p["test_loss"] > 0 for p in sweep["points"])
    # one size of the two again: its 2 points were done (the file's 4 had been counted)
    status, out, err = run_main("--custom_sweep_log", str(log), "--custom_sweep_sizes", "5",
                                "--sweep_scale", "tiny", "--input_files", str(tiny_corpus),
                                artefacts=tmp_path / "a_file")
    assert status == 0 and "sweep custom_data: all 2 points were already done" in out, err
    status, _, err = run_main("--custom_sweep_log", str(log), "--custom_sweep_sizes", "2,x")
    assert status == 2 and "--custom_sweep_sizes" in err


def test_collect_transformer_metrics_alone_needs_a_folder_for_its_files(run_main, tmp_path,
                                                                       tiny_corpus):
    """It writes the architectures sweep's files in --artefacts_dir: a file of that name is
    refused in one line naming the flag, before anything trains, and kept."""
    (tmp_path / "a_file").write_text("kept\n")
    status, out, err = run_main("--collect_transformer_metrics", "--sweep_scale", "tiny",
                                "--input_files", str(tiny_corpus), artefacts=tmp_path / "a_file")
    assert status == 2 and err.count("\n") == 1 and "--artefacts_dir" in err, err
    assert (tmp_path / "a_file").read_text() == "kept\n" and "trained" not in out


def test_load_sweep_rejects_a_run_log(pico, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"kind": "run", "schema_version": 1}))
    with pytest.raises(pico.UserError, match="not a sweep file"):
        pico.load_sweep(path)


def test_ascii_loss_plot_marks_train_and_test_of_each_model(pico):
    records = {name: {"history": [{"step": s, "train_loss": start - s * 0.1} for s in range(1, 21)],
                      "test_history": [{"step": 20, "test_loss": start - 2.5}]}
               for name, start in (("lstm_seq", 5.0), ("transformer", 4.0))}
    plot = pico.ascii_loss_plot(records, width=40, height=10)
    lines = plot.splitlines()
    assert lines[0].startswith("   4.900 |") and lines[9].startswith("   1.500 |")
    assert "a" in lines[0] and "B" in lines[9]                 # highest train, lowest test
    assert "a/A = lstm_seq train/test" in plot and "b/B = transformer train/test" in plot
    assert pico.ascii_loss_plot({}) == "(no losses to plot)"


def test_the_summary_shows_a_dash_and_a_note_for_a_loss_not_measured(pico):
    records = {"lstm_seq": {"parameters": 1234, "final": {"train_loss": 1.5, "test_loss": None,
                                                          "tokens_per_s": 640.0}},
               "transformer": {"parameters": 99, "final": {"train_loss": 2.0, "test_loss": 2.25,
                                                           "test_bits_per_byte": 3.24614,
                                                           "tokens_per_s": 10.0}}}
    lines = pico.summary_table(records).splitlines()
    assert lines[0].split() == ["model", "params", "train", "loss", "test", "loss", "bits/byte",
                                "tok/s"]
    assert lines[1].split() == ["lstm_seq", "1,234", "1.5000", "-", "-", "640"]
    assert lines[2].split() == ["transformer", "99", "2.0000", "2.2500", "3.246", "10"]
    assert lines[3] == "(test loss -: no held-out text to score lstm_seq)"
    records["lstm_seq"]["final"]["test_loss"] = float("nan")          # a diverged run says nan
    assert "nan" in pico.summary_table(records).splitlines()[1]


def test_kmeans_separates_two_obvious_clusters(pico):
    torch.manual_seed(0)
    points = torch.cat([torch.randn(20, 3) * 0.1, torch.randn(20, 3) * 0.1 + 5])
    assignment, centroids = pico.kmeans(points, 2)
    assert len(set(assignment[:20].tolist())) == 1 and len(set(assignment[20:].tolist())) == 1
    assert assignment[0] != assignment[20]
    assert sorted(centroids.norm(dim=1).round().tolist())[0] == 0.0


def test_kmeans_with_more_clusters_than_distinct_points_keeps_finite_centroids(pico):
    """A cluster no point chose keeps its centroid (a mean of nothing would be NaN)."""
    points = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    assignment, centroids = pico.kmeans(points, 4)
    assert centroids.isfinite().all() and len(set(assignment.tolist())) == 2


def test_embedding_clusters_label_a_lone_byte_by_its_value(pico):
    """Byte tokens of "é" and "ü" are clustered as two tokens each, four labels apart, not as
    one repeated U+FFFD."""
    char = pico.ByteTokenizer()
    examples = pico.tokenize_examples(["é ü é ü"] * 4, char, None)
    source = pico.DataSource("custom", examples, *pico.split_indices(len(examples), 0.0, 0))
    data = pico.TrainingData([source], [1.0], 8, char.eot_id, 0)
    model = pico.build_model(pico.LSTMConfig(embed_size=8), 257, seed=0)
    result = pico.embedding_clusters(model, char, data, char.encode("é"), 0, clusters=2, seed=0)
    labels = sorted(label for members in result["clusters"].values() for label in members)
    assert labels == [" ", "<0xA9>", "<0xBC>", "<0xC3>", "<eot>"]
    assert result["annotated"].startswith("<0xC3>[c")


def test_embedding_clusters_mark_generated_tokens_with_their_nearest_other_tokens(pico):
    """Each token after the prompt is marked generated, and its neighbours are other tokens
    (every token is its own nearest)."""
    char = pico.ByteTokenizer()
    examples = pico.tokenize_examples(["abc abd bcd"] * 4, char, None)
    source = pico.DataSource("custom", examples, *pico.split_indices(len(examples), 0.0, 0))
    data = pico.TrainingData([source], [1.0], 8, char.eot_id, 0)
    model = pico.build_model(pico.LSTMConfig(embed_size=8), 257, seed=0)
    result = pico.embedding_clusters(model, char, data, char.encode("ab cd"), 2, clusters=2,
                                     seed=0)
    assert [t["generated"] for t in result["tokens"]] == [False, False, True, True, True]
    for token in result["tokens"]:
        assert token["token"] not in token["neighbours"] and len(token["neighbours"]) == 3


def test_each_kind_of_model_gives_a_row_per_token_to_cluster(pico):
    """The clusters read the input embedding table, a row per token; a one-hot k-gram has
    none (its first layer reads k one-hot vectors at once), so the output layer's rows stand in."""
    vocab = 257
    for config in (pico.KGramConfig(variant="embedding", embed_size=8), pico.LSTMConfig(embed_size=8),
                   pico.TransformerConfig(block_size=16, d_model=16, n_heads=2, n_blocks=1),
                   pico.KGramConfig(variant="onehot", embed_size=8)):
        model = pico.build_model(config, vocab, seed=0)
        rows = pico.token_embeddings(model)
        assert rows.shape[0] == vocab and rows.dtype == torch.float32
        if isinstance(config, pico.KGramConfig) and config.variant == "onehot":
            assert torch.equal(rows, model.unembedding.weight.detach())


def test_attention_maps_are_causal_distributions(pico):
    config = pico.TransformerConfig(block_size=16, d_model=32, n_heads=2, n_blocks=2)
    model = pico.build_model(config, 257, seed=0)
    maps = torch.tensor(pico.attention_maps(model, list(b"hello"), "cpu"))  # (layers, H, T, T)
    assert maps.shape == (2, 2, 5, 5)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 5))
    assert torch.all(maps.triu(diagonal=1) == 0)
    assert all(not block.attention.record_attention for block in model.blocks)


def test_more_clusters_than_the_text_has_tokens_are_noted(run_main, tmp_path):
    """k-means makes at most a cluster per token: asked for more, the run says how many, once
    for all its models."""
    corpus = tmp_path / "ab.txt"
    corpus.write_text("abab abba\n" * 40)
    status, _, err = run_main("--input_files", str(corpus), "--models", "lstm_seq,kgram_mlp_seq",
                              "--embed_size", "16", "--block_size", "8", "--prompt", "ab",
                              "--epochs", "1",
                              "--max_steps_per_epoch", "1", "--max_new_tokens", "3", "--quiet",
                              "--monosemantic_enabled", "--monosemantic_clusters", "50")
    assert status == 0, err
    # a, b, the space and <|endoftext|> (each line is an example: no newline)
    assert err.splitlines() == ["pico-llm: note: --monosemantic_clusters 50 is more than the 4 "
                                "distinct tokens the text uses: k-means makes at most 4 clusters"]
    status, _, err = run_main("--input_files", str(corpus), "--models", "kgram_mlp_seq",
                              "--embed_size", "16", "--block_size", "8", "--prompt", "ab",
                              "--epochs", "1", "--max_steps_per_epoch", "1", "--max_new_tokens",
                              "3", "--quiet", "--monosemantic_enabled", "--monosemantic_clusters",
                              "4", "--run_name", "as_many")
    assert status == 0 and err == "", err        # as many clusters as tokens: nothing to say


def test_a_normal_run_prints_the_loss_plot_and_writes_interpretability_files(run_main, tmp_path,
                                                                              tiny_corpus):
    status, out, _ = run_main("--input_files", str(tiny_corpus), "--tokenizer", "char",
                              "--models", "lstm_seq,transformer", "--block_size", "16",
                              "--d_model", "32", "--embed_size", "32", "--max_steps_per_epoch", "2",
                              "--max_new_tokens", "5", "--quiet", "--attention_maps",
                              "--monosemantic_enabled", "--monosemantic_clusters", "4",
                              "--run_name", "first")
    assert status == 0
    assert "a/A = lstm_seq train/test" in out and "step 1" in out
    artefacts = tmp_path / "artefacts"
    written = (artefacts / "first.attention_transformer.json").read_text()
    assert written.count("\n") == 1                             # compact: maps are large
    attention = json.loads(written)
    assert attention["tokens"][:4] == ["O", "n", "c", "e"] and len(attention["layers"]) == 3
    last_row = attention["layers"][-1][0][-1]                 # the last query's weights, rounded
    assert sum(last_row) == pytest.approx(1.0, abs=1e-4) and all(round(w, 5) == w for w in last_row)
    assert not (artefacts / "first.attention_lstm_seq.json").exists()
    clusters = json.loads((artefacts / "first.monosemantic_lstm_seq.json").read_text())
    assert len(clusters["clusters"]) == 4
    generated = [t for t in clusters["tokens"] if t["generated"]]
    assert all(len(t["neighbours"]) == 3 for t in generated)
    assert "each token with [its cluster" in out
    models = json.loads((artefacts / "first.json").read_text())["models"]
    assert models["transformer"]["attention_maps"] == "first.attention_transformer.json"
    assert "attention_maps" not in models["lstm_seq"]
    assert models["lstm_seq"]["monosemantic"] == "first.monosemantic_lstm_seq.json"


def test_the_interpretability_greedy_sample_decodes_in_the_runs_dtype(run_main, pico, tiny_corpus,
                                                                      monkeypatch):
    """As the run's own samples do: on a GPU, --dtype bfloat16 decodes with bf16 weights."""
    dtypes = []

    def decoding_model(model, device, compile=False, num_tokens=None, dtype=None):
        dtypes.append(dtype)
        return model

    monkeypatch.setattr(pico, "decoding_model", decoding_model)
    status, _, err = run_main("--input_files", str(tiny_corpus), "--models", "transformer",
                              "--block_size", "16", "--d_model", "16", "--n_blocks", "1",
                              "--max_steps_per_epoch", "1", "--epochs", "1", "--max_new_tokens",
                              "3", "--quiet", "--monosemantic_enabled", "--monosemantic_clusters",
                              "2", "--dtype", "bfloat16")
    assert status == 0, err
    assert dtypes == ["bfloat16"] * 2    # the run's samples, then the greedy sample it clusters


def test_a_second_run_with_interpretability_flags_keeps_the_first_runs_files(run_main, tmp_path,
                                                                            tiny_corpus):
    artefacts = tmp_path / "artefacts"
    for run_name, prompt in (("one", "the fox"), ("two", "a cat")):
        status, _, err = run_main("--input_files", str(tiny_corpus), "--models", "transformer",
                                  "--block_size", "16", "--d_model", "16", "--n_blocks", "1",
                                  "--max_steps_per_epoch", "1", "--epochs", "1",
                                  "--max_new_tokens", "3", "--quiet", "--attention_maps",
                                  "--monosemantic_enabled", "--monosemantic_clusters", "2",
                                  "--prompt", prompt, "--run_name", run_name)
        assert status == 0, err
    for run_name, prompt in (("one", "the fox"), ("two", "a cat")):
        record = json.loads((artefacts / f"{run_name}.json").read_text())["models"]["transformer"]
        maps = json.loads((artefacts / record["attention_maps"]).read_text())
        clusters = json.loads((artefacts / record["monosemantic"]).read_text())
        assert maps["prompt"] == prompt and clusters["text"].startswith(prompt)


def test_a_sweep_continued_with_other_flags_is_refused_and_keeps_its_file(run_main, tmp_path,
                                                                         tiny_corpus):
    """The file's points were run with its recorded flags: new values of a flag the points
    depend on neither reuse them nor relabel them."""
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    before = path.read_bytes()
    for flag, value in (("--seed", "7"), ("--learning_rate", "0.01"), ("--weight_decay", "0.5")):
        status, out, err = run_main(*argv, flag, value)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and "other flags" in lines[0], err
        assert f"{flag} " in lines[0] and "--overwrite" in lines[0]
        assert path.read_bytes() == before
    status, out, _ = run_main(*argv, "--quiet", "--log_interval", "3")   # flags no point uses
    assert status == 0 and "all 3 points were already done" in out


@pytest.mark.parametrize("sweep, expected", [
    ("ablations", 7), ("learning_rate", 2), ("batch_size", 2)])
def test_issue7_sweeps_write_their_points(pico, run_main, tmp_path, tiny_corpus, sweep, expected):
    status, out, err = run_main("--sweep", sweep, "--sweep_scale", "tiny",
                                "--input_files", str(tiny_corpus))
    assert status == 0, err
    result = pico.load_sweep(tmp_path / "artefacts" / f"sweep_{sweep}.json")
    jsonschema.validate(result, sweep_schema(pico))
    assert len(result["points"]) == expected
    if sweep == "ablations":
        changes = {p["settings"]["ablation"]: p["settings"] for p in result["points"]}
        assert changes["post-norm"]["norm_position"] == "post"
        assert changes["no position embedding (NoPE)"]["pos_emb"] == "none"
        assert all(p["test_bits_per_byte"] > 0 for p in result["points"])
    if sweep == "batch_size":
        steps = {p["settings"]["batch_size"]: p["steps"] for p in result["points"]}
        assert steps[1] == 4 * steps[4]          # equal examples: 4x the steps at batch 1


def test_attention_sweep_measures_loss_and_generation_speed_against_context(pico, run_main, tmp_path,
                                                                            tiny_corpus):
    status, out, err = run_main("--sweep", "attention", "--sweep_scale", "tiny",
                                "--input_files", str(tiny_corpus))
    assert status == 0, err
    sweep = pico.load_sweep(tmp_path / "artefacts" / "sweep_attention.json")
    jsonschema.validate(sweep, sweep_schema(pico))
    points = {p["settings"]["attention_kind"]: p for p in sweep["points"]}
    assert list(points) == list(pico.ATTENTION_SWEEP_POINTS)
    scale = pico.SWEEP_SCALES["tiny"]
    for kind, point in points.items():
        assert point["test_loss"] > 0 and point["steps"] == sweep["points"][0]["steps"]
        assert [g["context"] for g in point["generation"]] == list(scale.generation_contexts)
        assert all(g["tokens_per_s"] > 0 for g in point["generation"])
        held = [g["state_bytes"] for g in point["generation"]]
        if kind == "softmax":   # keys and values of every token so far: 3 blocks, 4 heads of 4
            assert held == [2 * 3 * scale.generation_batch * 4 * 4 * 4
                            * (context + scale.generation_new_tokens)
                            for context in scale.generation_contexts]
        else:                   # one matrix per block and head, whatever the context
            assert held[0] == held[-1] > 0


def test_recipe_sweep_trains_every_recipe_for_the_same_time_with_a_curve(pico, run_main, tmp_path,
                                                                       tiny_corpus):
    """Each point's steps come from its own measured speed and the time budget; the curve is
    the held-out loss after each pass, against the training seconds and steps so far."""
    status, out, err = run_main("--sweep", "recipe", "--sweep_scale", "tiny",
                                "--input_files", str(tiny_corpus))
    assert status == 0, err
    sweep = pico.load_sweep(tmp_path / "artefacts" / "sweep_recipe.json")
    jsonschema.validate(sweep, sweep_schema(pico))
    points = {p["settings"]["recipe"]: p for p in sweep["points"]}
    assert list(points) == list(pico.RECIPE_SWEEP_POINTS)
    budget = pico.RECIPE_BUDGETS["tiny"][0]
    for label, point in points.items():
        assert point["settings"]["train_seconds"] == budget
        wanted = max(1, round(budget / point["calibrated_seconds_per_step"]))
        per_pass = -(-point["train_examples"] // pico.SWEEP_SCALES["tiny"].batch_size)
        assert abs(point["steps"] - wanted) <= per_pass / 2        # whole passes over the text
        curve = point["curve"]
        assert curve[-1]["step"] == point["steps"] and curve[-1]["test_loss"] == point["test_loss"]
        assert [c["step"] for c in curve] == sorted({c["step"] for c in curve})
        assert all(a["train_time_s"] < b["train_time_s"] for a, b in zip(curve, curve[1:]))
    assert points["+ Muon"]["settings"]["optimizer"] == "muon"
    assert points["speedrun preset + Muon"]["settings"]["transformer_variant"] == "speedrun"


def test_the_sampling_sweep_takes_the_largest_seed(pico, run_main, tmp_path, tiny_corpus):
    """Its samples draw with seeds seed, seed + 1, ...: from the largest seed --seed takes,
    2**32 - 1, too (from 2**64 - 1, the largest before, it was an overflow in torch.Generator)."""
    status, _, err = run_main("--sweep", "sampling", "--sweep_scale", "tiny", "--input_files",
                              str(tiny_corpus), "--seed", str(2**32 - 1))
    assert status == 0, err
    sweep = pico.load_sweep(tmp_path / "artefacts" / "sweep_sampling.json")
    assert sweep["points"]
    # each sample draws with a seed of its own, and generation speed counts new tokens only
    drawn = next(p for p in sweep["points"] if p["settings"]["top_p"] == 1.0
                 and p["settings"]["temperature"] > 0)
    assert len(set(drawn["samples"])) > 1
    scale = sweep["config"]["scale"]
    most = scale["samples_per_rule"] * scale["max_new_tokens"]
    for point in sweep["points"]:
        assert point["tokens_per_s"] * point["wall_time_s"] <= most * 1.01


@pytest.mark.parametrize("per_epoch", [1, 2, 3, 4, 5, 7, 20])
def test_a_step_budget_that_must_be_met_makes_no_fewer_steps(pico, configure, per_epoch):
    """The recipe sweep times a point's steps after 3 warm-up steps. On a text of 2 steps a
    pass, its budget of 5 steps rounded to 2 passes made 4, and left no step to time."""
    data = types.SimpleNamespace(steps_per_epoch=lambda batch_size, limit: per_epoch)
    config = configure("--models", "transformer")
    for steps in range(1, 25):
        training = pico.with_step_budget(config, data, steps, at_least=True).training
        made = training.epochs * training.max_steps_per_epoch
        assert steps <= made < steps + per_epoch, (steps, made)


@pytest.mark.parametrize("sweep", ["recipe", "budget", "overfit", "hyperparams", "custom_data",
                                   "learning_rate", "architectures"])
def test_a_sweep_of_held_out_loss_on_a_text_too_short_to_hold_out_is_one_line(run_main, tmp_path,
                                                                              sweep):
    """Each point's result is a held-out loss (the recipe's, a curve of them): with nothing held
    out there is none (the recipe sweep's was an IndexError after every point had trained; the
    others wrote files whose test losses were all null, and exited 0)."""
    one_line = tmp_path / "one.txt"
    one_line.write_text("just one line\n")
    status, _, err = run_main("--sweep", sweep, "--sweep_scale", "tiny", "--input_files",
                              str(one_line))
    assert status == 2 and err.count("\n") == 1, err
    assert "the sweep compares held-out loss, and the text is too short to hold any out" in err
    assert not (tmp_path / "artefacts" / f"sweep_{sweep}.json").exists()


def test_the_sampling_sweep_needs_no_held_out_text(run_main, tmp_path, pico):
    """Its results are samples: a text too short to hold any out still gives them."""
    text = tmp_path / "one.txt"
    text.write_text("just one line of text, the only one\n")
    status, _, err = run_main("--sweep", "sampling", "--sweep_scale", "tiny", "--input_files",
                              str(text))
    assert status == 0, err
    assert pico.load_sweep(tmp_path / "artefacts" / "sweep_sampling.json")["points"]


def test_recipe_ablation_tool_trains_each_variant_on_the_given_text(tiny_corpus, capsys):
    from pico_module import load_script
    from conftest import TOOLS
    ablation = load_script(TOOLS / "recipe_ablation.py", "recipe_ablation")
    assert ablation.main(["--input_dir", str(tiny_corpus.parent), "--steps", "4",
                          "--sweep_scale", "tiny"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "held-out bits per byte" in line]
    assert [line.split(":")[0] for line in lines] == list(ablation.VARIANTS)
    assert all(line.count(" after ") >= 2 for line in lines)
    assert ablation.main(["--input_dir", str(tiny_corpus.parent / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "missing" in err


def test_recipe_at_gpt2_shape_tool_times_each_recipe_and_reads_the_crossing(tmp_path, capsys):
    """tools/recipe_gpt2.py at tiny size on the CPU: every recipe trains for about the same
    seconds with a held-out curve; the nanoGPT recipe reaches its own final loss at its last
    point; the orthogonalization is timed both ways; a missing corpus is one line, status 2."""
    from pico_module import load_script
    from conftest import TOOLS
    tool = load_script(TOOLS / "recipe_gpt2.py", "recipe_gpt2")
    curve = [{"train_time_s": 1.0, "test_bits_per_byte": 4.0},
             {"train_time_s": 2.0, "test_bits_per_byte": 3.0},
             {"train_time_s": 3.0, "test_bits_per_byte": 2.0}]
    assert tool.seconds_to_reach(curve, 2.5) == pytest.approx(2.5)
    assert tool.seconds_to_reach(curve, 5.0) == 1.0 and tool.seconds_to_reach(curve, 1.0) is None
    output = tmp_path / "recipe.json"
    assert tool.main(["--tiny", "--device_id", "cpu", "--seconds", "0.3", "--input_dir",
                      str(REPO / "data" / "custom_corpus"), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert list(report["recipes"]) == list(tool.RECIPES)
    assert set(report["orthogonalization_s"]) == {f"{dtype}, {way}" for dtype in ("float32", "bfloat16")
                                                  for way in ("one at a time", "stacked")}
    for label, recipe in report["recipes"].items():
        times = [point["train_time_s"] for point in recipe["curve"]]
        assert len(times) >= 2 and times == sorted(times)
    baseline = report["recipes"]["nanoGPT recipe"]
    assert baseline["seconds_to_baseline_final"] == baseline["curve"][-1]["train_time_s"]
    capsys.readouterr()
    assert tool.main(["--tiny", "--device_id", "cpu", "--input_dir", str(tmp_path / "missing"),
                      "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "missing" in err
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "a_file").write_text("kept")
    assert tool.main(["--write_corpus", str(tmp_path / "a_file" / "corpus")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--write_corpus" in err
    assert (tmp_path / "a_file").read_text() == "kept"


@pytest.mark.parametrize("flags", [["--sweep", "architectures"],
                                   ["--collect_transformer_metrics"]],   # its other name
                         ids=["sweep", "collect_transformer_metrics"])
def test_architectures_sweep_logs_expert_usage_and_the_presets_attention(pico, run_main, tmp_path,
                                                                         tiny_corpus, flags):
    status, _, err = run_main(*flags, "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert status == 0, err
    artefacts = tmp_path / "artefacts"
    sweep = pico.load_sweep(artefacts / "sweep_architectures.json")
    assert [p["model"] for p in sweep["points"]] == [*pico.TRANSFORMER_PRESETS, "lstm_seq", "kgram_mlp_seq"]
    run = pico.load_runlog(artefacts / "sweep_architectures_run.json")
    jsonschema.validate(run, runlog_schema(pico))
    usage = run["models"]["GPT-oss"]["expert_usage"][-1]["fractions"]
    assert len(usage) == 1 and len(usage[0]) == 8 and sum(usage[0]) == pytest.approx(1.0)
    attention = json.loads((artefacts / "architectures_attention_GPT-oss.json").read_text())
    assert attention["windows"] == [16] and len(attention["sinks"][0]) == 8
    assert len(attention["tokens"]) == pico.SWEEP_SCALES["tiny"].block_size
    pico_attention = json.loads((artefacts / "architectures_attention_pico.json").read_text())
    assert pico_attention["windows"] == [None] and pico_attention["sinks"] == [None]


def test_a_diverging_learning_rate_is_recorded_not_raised(pico, tmp_path, tiny_corpus):
    config = pico.config_from_command_line([
        "--input_files", str(tiny_corpus), "--tokenizer", "char", "--models", "transformer",
        "--d_model", "32", "--n_heads", "2", "--learning_rate", "3.0", "--grad_clip", "0",
        "--lr_schedule", "constant", "--warmup_steps", "0", "--epochs", "3", "--quiet",
        "--cache_dir", str(tmp_path / "cache")])
    tokenizer = pico.ByteTokenizer()
    data = pico.sweep_data(config, tokenizer)
    scale = pico.SWEEP_SCALES["tiny"]
    log = pico.SweepLog(tmp_path / "lr.json", "learning_rate", scale, config, torch.device("cpu"))
    pico.train_or_diverge(log, "transformer", {"learning_rate": 3.0}, config, torch.device("cpu"),
                          tokenizer, data)
    point = log.data["points"][0]
    assert point["diverged"] is True and point["train_loss"] is None
    assert point["diverged_at_step"] >= 2


def test_has_diverged(pico):
    import math
    assert pico.has_diverged(float("nan"), 100) and pico.has_diverged(float("inf"), 100)
    assert pico.has_diverged(3 * math.log(100) + 0.1, 100)
    assert not pico.has_diverged(math.log(100) + 1, 100)


def test_a_sweep_on_changed_data_is_refused_unless_overwritten(pico, run_main, tmp_path, tiny_corpus):
    """The old points were measured on other data: neither reused nor silently replaced."""
    copy = tmp_path / "corpus.txt"
    copy.write_text(tiny_corpus.read_text())
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(copy))
    assert run_main(*argv)[0] == 0
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    before = path.read_bytes()
    copy.write_text("a brand new first line about the harbor.\n" + tiny_corpus.read_text())
    status, _, err = run_main(*argv)
    assert status == 2 and "on other data" in err and "--overwrite" in err
    assert path.read_bytes() == before
    status, out, _ = run_main(*argv, "--overwrite")
    assert status == 0 and "3 points (0 already done)" in out


def test_a_tiny_sweep_never_replaces_a_full_scale_one_even_with_overwrite(pico, run_main, tmp_path,
                                                                          tiny_corpus):
    """Seconds of a test-sized sweep must not wipe out half an hour of full-scale points (the
    committed results): refused in one line, --overwrite or not, the files beside it kept.
    --overwrite names every file it replaces, the sweep's own and those beside it, once all
    are checked."""
    argv = ("--sweep", "sampling", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    artefacts = tmp_path / "artefacts"
    path = artefacts / "sweep_sampling.json"
    beside = [artefacts / "attention_transformer.json", artefacts / "monosemantic_transformer.json"]
    full = path.read_text().replace('"scale": "tiny"', '"scale": "full"', 1)
    path.write_text(full)
    before = {file: file.read_bytes() for file in [path, *beside]}
    status, _, err = run_main(*argv, "--overwrite")
    assert status == 2 and err.count("\n") == 1, err
    assert "holds a sweep at scale full, which a tiny one never replaces, even with --overwrite" in err
    assert {file: file.read_bytes() for file in [path, *beside]} == before
    path.write_text(full.replace('"scale": "full"', '"scale": "tiny"', 1))
    status, _, err = run_main(*argv, "--overwrite", "--seed", "7")
    assert status == 0, err
    assert f"pico-llm: note: --overwrite replaces {path}, {beside[0]}, {beside[1]}\n" in err, err


def test_overwrite_never_replaces_another_sweeps_file(run_main, tmp_path, tiny_corpus):
    """--overwrite starts this sweep afresh; --custom_sweep_log naming another sweep's file
    (a slip of the path) is refused with --overwrite or without, and the file is kept."""
    argv = ("--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main("--sweep", "kgram_variants", *argv)[0] == 0
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    before = path.read_bytes()
    status, _, err = run_main("--custom_sweep_log", str(path), *argv, "--overwrite")
    assert status == 2 and err.count("\n") == 1, err
    assert ("holds the kgram_variants sweep, which --overwrite never replaces with the "
            "custom_data sweep; move that file away, or give the sweep another "
            "--custom_sweep_log") in err
    status, _, err = run_main("--custom_sweep_log", str(path), *argv)
    assert status == 2 and err.count("\n") == 1, err
    assert "points of the kgram_variants sweep" in err and "--overwrite" not in err
    assert "give the sweep another --custom_sweep_log" in err
    assert path.read_bytes() == before


def test_a_sweep_with_every_point_done_says_where_they_are(pico, run_main, tmp_path, tiny_corpus):
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    status, out, _ = run_main(*argv)
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    assert status == 0 and f"all 3 points were already done; they are in {path}" in out
    assert "--overwrite" in out


def test_overwrite_replaces_only_sweep_files(pico, run_main, tmp_path, tiny_corpus):
    """--overwrite starts a sweep afresh over an earlier sweep file, even one cut short, but
    never over another file given as the sweep's path: a checkpoint, a run log or any text
    are left as they were, with a one-line refusal."""
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus),
            "--overwrite")
    strangers = {"model.pt": b"PK\x03\x04" + bytes(range(256)) * 8,
                 "main_job.json": json.dumps({"schema_version": 3, "kind": "run", "models": {}}).encode(),
                 "notes.txt": b"kind: sweep, but not a sweep file\n"}
    for name, content in strangers.items():
        path = tmp_path / name
        path.write_bytes(content)
        status, _, err = run_main(*argv, "--custom_sweep_log", str(path))
        assert status == 2 and err.count("\n") == 1, err
        assert "not a sweep file" in err and "--overwrite replaces only sweep files" in err
        assert path.read_bytes() == content
    fifo = tmp_path / "pipe.json"               # its start is never read: that would block
    os.mkfifo(fifo)
    status, _, err = run_main(*argv, "--custom_sweep_log", str(fifo))
    assert status == 2 and err.count("\n") == 1 and "not a regular file" in err, err
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{\n  "schema_version": 1,\n  "kind": "sweep",\n  "sweep": "kgram_varia')
    status, out, _ = run_main(*argv)
    assert status == 0 and "3 points (0 already done)" in out
    assert pico.load_sweep(path)["sweep"] == "kgram_variants"


@pytest.mark.parametrize("change", [{"points": 5}, {"points": [1, 2]}, {"points": [{"model": "x"}]},
                                    {"points": [{"key": ["unhashable"], "train_loss": "x"}]},
                                    {"points": [{"key": "{}", "model": "lstm_seq", "settings": {}}]},
                                    {"config": []}, {"config": {"scale": {}, "args": [1]}},
                                    {"config": {"args": {}}}])
def test_a_sweep_file_with_parts_of_other_types_is_refused_and_kept(pico, run_main, tmp_path,
                                                                    tiny_corpus, change):
    """A sweep file whose kind and schema are right but whose points or config are not as
    SweepLog writes them (edited by hand): one line, the file kept."""
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    path.parent.mkdir(parents=True)
    content = json.dumps({"schema_version": pico.SWEEP_SCHEMA_VERSION, "kind": "sweep",
                          "sweep": "kgram_variants", "config": {"scale": {}, "args": {}},
                          "points": [], **change})
    path.write_text(content)
    status, _, err = run_main(*argv)
    assert status == 2 and err.count("\n") == 1 and "not as pico-llm writes them" in err, err
    assert path.read_text() == content


def test_custom_sweep_sizes_beyond_the_data_are_refused_before_training(run_main, tmp_path, tiny_corpus):
    """A corpus size the data does not have would be recorded as that size while training on
    all there is: refused before the first point, nothing written."""
    path = tmp_path / "custom.json"
    status, _, err = run_main("--custom_sweep_log", str(path), "--sweep_scale", "tiny",
                              "--input_files", str(tiny_corpus), "--custom_sweep_sizes", "3,1000000")
    assert status == 2 and err.count("\n") == 1 and "asks for 1,000,000 training examples" in err, err
    assert not path.exists()


def files_in(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


@pytest.mark.parametrize("sweep", ["custom_data", "budget", "overfit", "hyperparams", "attention"])
def test_a_sweep_run_again_skips_every_point_it_has(run_main, tmp_path, tiny_corpus, sweep):
    """The sweeps that no other test runs twice: the second run finds each point done, trains
    nothing and leaves the file as it was (a broken skip would retrain every point, hours at
    full scale)."""
    argv = ("--sweep", sweep, "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    status, out, err = run_main(*argv)
    assert status == 0 and "(0 already done)" in out, err
    if sweep == "overfit":   # a sample at step s is of the epoch that step s belongs to
        for point in json.loads((tmp_path / "artefacts" / "sweep_overfit.json").read_text())["points"]:
            per_epoch = point["epochs"][0]["step"]                  # the first epoch's end
            for checkpoint in point["checkpoints"]:
                epoch = checkpoint["epoch"]
                assert (epoch - 1) * per_epoch < checkpoint["step"] <= epoch * per_epoch
    before = files_in(tmp_path / "artefacts")
    status, out, err = run_main(*argv)
    assert status == 0 and f"sweep {sweep}: all " in out and "points were already done" in out, err
    assert "parameters" not in out and files_in(tmp_path / "artefacts") == before


def test_a_sweep_that_adds_no_points_writes_nothing(pico, run_main, tmp_path, tiny_corpus):
    """A finished sweep's files keep the flags, machine and times of the runs that made its
    points: a run that finds every point done leaves them byte for byte, the architectures
    sweep's run log included. A file cut off after its last point is only marked finished."""
    argv = ("--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    for sweep in ("kgram_variants", "architectures"):
        assert run_main("--sweep", sweep, *argv)[0] == 0
    artefacts = tmp_path / "artefacts"
    before = files_in(artefacts)
    for sweep in ("kgram_variants", "architectures"):
        status, out, _ = run_main("--sweep", sweep, *argv, "--log_interval", "3")
        assert status == 0 and "points were already done" in out
    assert files_in(artefacts) == before
    for sweep in ("kgram_variants", "architectures"):
        for path in artefacts.glob(f"sweep_{sweep}*.json"):    # the run log too, cut off as well
            path.write_text(path.read_text().replace('"status": "finished"', '"status": "running"'))
        path = artefacts / f"sweep_{sweep}.json"
        assert run_main("--sweep", sweep, *argv)[0] == 0
        assert json.loads(path.read_text())["status"] == "finished"
    run_log = pico.load_runlog(artefacts / "sweep_architectures_run.json")
    assert run_log["status"] == "finished"     # as its sweep file, though no point was added


def test_an_architectures_sweep_cut_short_in_its_first_point_continues(pico, run_main, tmp_path,
                                                                      tiny_corpus, monkeypatch):
    """Its run log is written during the first point, before the point joins the sweep file:
    the sweep file is written when the sweep starts, so it owns that run log and the rerun
    continues (and the run log ends finished)."""
    argv = ("--sweep", "architectures", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    real_add = pico.SweepLog.add

    def ctrl_c_instead(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pico.SweepLog, "add", ctrl_c_instead)
    assert run_main(*argv)[0] == 130
    artefacts = tmp_path / "artefacts"
    assert pico.load_sweep(artefacts / "sweep_architectures.json")["points"] == []
    assert (artefacts / "sweep_architectures_run.json").exists()
    monkeypatch.setattr(pico.SweepLog, "add", real_add)
    status, _, err = run_main(*argv)
    assert status == 0, err
    assert pico.load_sweep(artefacts / "sweep_architectures.json")["status"] == "finished"
    assert pico.load_runlog(artefacts / "sweep_architectures_run.json")["status"] == "finished"


def test_a_flag_the_sweep_file_predates_is_held_to_its_default(run_main, tmp_path, tiny_corpus):
    """A flag missing from a sweep file's args did not exist when its points ran, so they ran
    with what is now its default: another value is refused, the default continues the file."""
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    sweep = json.loads(path.read_text())
    for flag in ("beta2", "qk_norm"):
        del sweep["config"]["args"][flag]
    path.write_text(json.dumps(sweep))
    before = path.read_bytes()
    status, _, err = run_main(*argv, "--beta2", "0.95", "--qk_norm", "true")
    assert status == 2 and err.count("\n") == 1, err
    assert "--beta2 0.999 there, 0.95 now" in err and "--qk_norm not given there, True now" in err
    assert path.read_bytes() == before
    status, out, _ = run_main(*argv, "--beta2", "0.999")
    assert status == 0 and "all 3 points were already done" in out
    assert path.read_bytes() == before


@pytest.mark.parametrize("sweep, kept", [("architectures", "sweep_architectures_run.json"),
                                         ("sampling", "attention_transformer.json")])
def test_a_new_sweep_refuses_to_replace_an_earlier_ones_files(run_main, tmp_path, tiny_corpus,
                                                              sweep, kept):
    """The files a sweep writes beside its sweep file belong to that file's points: moving
    the sweep file away (as its refusal suggests) does not free them for a new run."""
    argv = ("--sweep", sweep, "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    artefacts = tmp_path / "artefacts"
    (artefacts / f"sweep_{sweep}.json").rename(tmp_path / "moved.json")
    before = files_in(artefacts)
    status, _, err = run_main(*argv, "--seed", "7")
    assert status == 2 and err.count("\n") == 1 and kept in err, err
    assert "move them away" in err and "--overwrite" in err
    assert files_in(artefacts) == before
    status, _, err = run_main(*argv, "--seed", "7", "--overwrite")
    assert status == 0, err
    assert "pico-llm: note: --overwrite replaces " in err and str(artefacts / kept) in err
    assert (artefacts / kept).read_bytes() != before[kept]


@pytest.mark.parametrize("flag, value", [
    ("--tokenizer", "gpt2"), ("--block_size", "8"), ("--batch_size", "2"), ("--test_fraction", "0.5"),
    ("--limit_custom_examples", "10"), ("--embed_size", "8"), ("--d_model", "32"),
    ("--transformer_variant", "minGPT"), ("--epochs", "3"), ("--max_steps_per_epoch", "1"),
    ("--tinystories_weight", "0.5"), ("--models", "lstm_seq")])
def test_a_flag_every_sweep_point_sets_itself_is_refused(run_main, tmp_path, tiny_corpus, flag,
                                                         value):
    """The sweep's scale and design set these for every point: a value given would be
    silently ignored, and recorded as if it had been used."""
    status, _, err = run_main("--sweep", "kgram_variants", "--sweep_scale", "tiny",
                              "--input_files", str(tiny_corpus), flag, value)
    assert status == 2 and err.count("\n") == 1, err
    assert f"--sweep kgram_variants sets {flag} itself" in err and f"drop {flag}" in err
    assert not (tmp_path / "artefacts").exists()


def test_a_sweep_file_records_only_the_flags_its_points_ran_with(pico, run_main, tmp_path,
                                                                tiny_corpus):
    """The flags a sweep sets itself are in its scale (test_fraction 0.2 there, while the
    command line's default is 0.1), not among the args."""
    assert run_main("--sweep", "kgram_variants", "--sweep_scale", "tiny",
                    "--input_files", str(tiny_corpus), "--seed", "5")[0] == 0
    sweep = pico.load_sweep(tmp_path / "artefacts" / "sweep_kgram_variants.json")
    assert not set(sweep["config"]["args"]) & set(pico.SWEEP_SET_FLAGS)
    assert sweep["config"]["args"]["seed"] == 5 and sweep["config"]["scale"]["test_fraction"] == 0.2


def test_an_architectures_sweep_without_its_run_log_writes_none(run_main, tmp_path, tiny_corpus):
    """The run log holds the finished points' loss curves: gone, it is not replaced by an
    empty one (a note says what to do); damaged, it is refused with a remedy."""
    argv = ("--sweep", "architectures", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    assert run_main(*argv)[0] == 0
    run_log = tmp_path / "artefacts" / "sweep_architectures_run.json"
    text = run_log.read_text()
    run_log.unlink()
    status, _, err = run_main(*argv)
    assert status == 0 and err.count("\n") == 1 and "is gone" in err and "--overwrite" in err, err
    assert not run_log.exists()
    run_log.write_text(text[: len(text) // 2])
    status, _, err = run_main(*argv)
    assert status == 2 and err.count("\n") == 1 and "cannot read run log" in err, err
    assert "restore it, or pass --overwrite" in err
    assert run_log.read_text() == text[: len(text) // 2]


@pytest.mark.parametrize("key, value", [("created", ...), ("sweep", ...), ("wall_time_s", None),
                                        ("wall_time_s", "12 s"), ("wall_time_s", 10 ** 400)],
                         ids=["no created", "no sweep", "wall_time_s null", "wall_time_s text",
                              "wall_time_s 401 digits"])
def test_a_sweep_file_without_its_keys_is_refused_before_training(pico, run_main, tmp_path,
                                                                  tiny_corpus, key, value):
    """A sweep file edited by hand (... = the key removed) is checked when it is read, not
    after its pending points have trained."""
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    path.parent.mkdir(parents=True)
    sweep = {"schema_version": pico.SWEEP_SCHEMA_VERSION, "kind": "sweep", "sweep": "kgram_variants",
             "scale": "tiny", "created": "2026-01-01T00:00:00+00:00", "status": "running",
             "config": {"scale": {}, "args": {}}, "points": [], "wall_time_s": 3.0}
    if value is ...:
        del sweep[key]
    else:
        sweep[key] = value
    path.write_text(json.dumps(sweep))
    content = path.read_text()
    status, _, err = run_main(*argv)
    assert status == 2 and err.count("\n") == 1 and f"'{key}'" in err and str(path) in err, err
    assert path.read_text() == content


@pytest.mark.parametrize("field, value, shape", [
    ("test_loss", "x", "a number or null"), ("parameters", True, "a number or null"),
    ("samples", 5, "a list of strings"), ("diversity", [1], "an object of numbers"),
    ("samples", ["a", 5], "a list of strings"), ("diversity", {"distinct_1": "x"}, "an object of numbers"),
    ("diverged", 1, "a boolean"), ("curve", [3], "a list of objects")])
def test_a_sweep_point_measured_as_pico_llm_never_writes_is_refused_before_training(
        pico, run_main, tmp_path, tiny_corpus, field, value, shape):
    """A point edited by hand: a resumed sweep keeps its finished points as they are, and
    would have marked the file finished with a test loss of "x" in it."""
    argv = ("--sweep", "kgram_variants", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    path = tmp_path / "artefacts" / "sweep_kgram_variants.json"
    path.parent.mkdir(parents=True)
    point = {"model": "kgram_mlp_seq", "settings": {"kgram_variant": "onehot"}, "test_loss": 2.5,
             "train_loss": 2.4, "tokens_per_s": None, "samples": ["a b"], field: value}
    point["key"] = pico.point_key(point["model"], point["settings"])
    sweep = {"schema_version": pico.SWEEP_SCHEMA_VERSION, "kind": "sweep", "sweep": "kgram_variants",
             "scale": "tiny", "created": "2026-01-01T00:00:00+00:00", "status": "running",
             "config": {"scale": {}, "args": {}}, "points": [point]}
    path.write_text(json.dumps(sweep))
    content = path.read_text()
    status, _, err = run_main(*argv)
    assert status == 2 and err.count("\n") == 1, err
    assert f"point {point['key']} has a {field} of {value!r} where {shape} belongs" in err, err
    assert path.read_text() == content


def test_every_point_of_the_presentation_sweeps_is_as_pico_llm_writes_it(pico):
    files = sorted((REPO / "artefacts" / "presentation").glob("sweep_*.json"))
    points = [point for file in files for point in json.loads(file.read_text()).get("points", [])]
    assert len(points) > 50
    assert [pico.sweep_point_problem(point) for point in points] == [None] * len(points)


@pytest.mark.parametrize("kind", ["empty", "directory"])
def test_an_unreadable_non_sweep_file_is_not_offered_overwrite(run_main, tmp_path, tiny_corpus,
                                                               kind):
    """--overwrite replaces only what begins as a sweep file, so the advice for an empty file
    or a directory in a sweep file's place is another path."""
    path = tmp_path / "custom.json"
    path.mkdir() if kind == "directory" else path.write_text("")
    argv = ("--custom_sweep_log", str(path), "--sweep_scale", "tiny", "--input_files", str(tiny_corpus))
    status, _, err = run_main(*argv)
    assert status == 2 and err.count("\n") == 1 and "another path" in err, err
    assert "--overwrite" not in err


def test_custom_sweep_sizes_given_twice_are_refused(run_main, tmp_path, tiny_corpus):
    path = tmp_path / "custom.json"
    status, _, err = run_main("--custom_sweep_log", str(path), "--sweep_scale", "tiny",
                              "--input_files", str(tiny_corpus), "--custom_sweep_sizes", "3,3")
    assert status == 2 and err.count("\n") == 1 and "give each size once" in err, err
    assert not path.exists()


def test_a_sampling_sweep_with_linear_attention_says_it_draws_no_map_and_is_done_once(
        run_main, tmp_path, tiny_corpus):
    """Linear attention has no weights to draw: the sweep says so, writes the embedding
    clusters alone, and a rerun finds it done rather than training its model again."""
    argv = ("--sweep", "sampling", "--sweep_scale", "tiny", "--input_files", str(tiny_corpus),
            "--attention", "linear")
    status, out, err = run_main(*argv)
    assert status == 0, err
    assert "writes no attention map" in err and err.count("\n") == 1, err
    artefacts = tmp_path / "artefacts"
    assert (artefacts / "monosemantic_transformer.json").exists()
    assert not (artefacts / "attention_transformer.json").exists()
    status, out, err = run_main(*argv)
    assert status == 0 and "were already done" in out, out + err
    assert "embedding clusters" not in out      # the model was not trained and sampled again


@pytest.mark.parametrize("signal_number, status, said", [
    (signal.SIGTERM, 143, "pico-llm: terminated"),
    (signal.SIGHUP, 129, "pico-llm: hung up (the terminal closed)")])
def test_sigterm_during_a_sweep_says_so_in_one_line_and_leaves_its_files_valid(
        pico, tmp_path, tiny_corpus, signal_number, status, said):
    """A sweep trains no checkpointed run, so SIGTERM, or SIGHUP from a closed terminal (it
    had ended the process where it stood, leaving its temporary files), stops it where it
    stands: one line, status 128 + the signal, no traceback, and the sweep file holds the
    points finished so far."""
    artefacts = tmp_path / "artefacts"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--sweep", "presentation", "--sweep_scale", "tiny",
         "--input_files", str(tiny_corpus), "--artefacts_dir", str(artefacts),
         "--cache_dir", str(tmp_path / "cache"), "--device_id", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))   # heard under nohup too
    for line in process.stdout:
        if line.startswith("[sweep "):     # a point is in: the presentation has dozens more
            break
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == said, err
    sweeps = list(artefacts.glob("sweep_*.json"))
    assert sweeps and not [p for p in artefacts.iterdir() if p.name.endswith(".tmp")]
    for path in sweeps:
        if not path.name.endswith("_run.json"):
            assert pico.load_sweep(path)["points"]


@pytest.mark.parametrize("sweep, name", [("kgram_variants", "sweep_kgram_variants.json"),
                                         ("sampling", "attention_transformer.json"),
                                         ("architectures", "sweep_architectures_run.json")])
def test_a_custom_sweep_log_on_another_sweeps_file_is_refused_before_training(run_main, tmp_path,
                                                                              sweep, name):
    """--custom_sweep_log naming a file that the run's other sweep writes (its sweep file or a
    file beside it): one line before any training, where the later write replaced the first
    sweep's results."""
    art = tmp_path / "artefacts"
    art.mkdir()
    status, _, err = run_main("--sweep", sweep, "--sweep_scale", "tiny", "--custom_sweep_log",
                              str(art / name), "--custom_sweep_sizes", "3", artefacts=art)
    assert status == 2 and err.count("\n") == 1, err
    assert (f"--custom_sweep_log {art / name} is a file that the {sweep} sweep of this run "
            "writes; give --custom_sweep_log a path of its own") in err
    assert list(art.iterdir()) == []


def test_sweeps_on_a_corpus_smaller_than_their_sizes_record_the_examples_they_train_on(
        pico, run_main, tmp_path):
    """The custom_data and overfit sweeps' tiny sizes (3 to 16 examples) on a 3-line corpus
    (2 for training): each point records the 2 it trained on, not a size the data lacks, and
    the custom_data sweep says which sizes it kept."""
    corpus = tmp_path / "three.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ran in the sun\na bird flew over the hill\n")
    for sweep in ("custom_data", "overfit"):
        status, _, err = run_main("--sweep", sweep, "--sweep_scale", "tiny", "--input_files",
                                  str(corpus))
        assert status == 0, err
        points = json.loads((tmp_path / "artefacts" / f"sweep_{sweep}.json").read_text())["points"]
        assert points and {p["settings"]["train_examples"] for p in points} == {2}
        noted = ("pico-llm: note: this data has 2 training examples, so the custom_data sweep "
                 "trains on 2\n")
        assert (noted in err) == (sweep == "custom_data"), err


@pytest.mark.parametrize("sweep, name", [("sampling", "attention_transformer.json"),
                                         ("sampling", "monosemantic_transformer.json"),
                                         ("architectures", "sweep_architectures_run.json"),
                                         ("architectures", "architectures_attention_pico.json")])
def test_a_sweep_refuses_to_write_over_a_file_beside_it_that_it_did_not_write(
        run_main, tmp_path, tiny_corpus, sweep, name):
    """A user's own file under the name of one that a sweep writes beside its sweep file:
    refused before training, with --overwrite too (which replaces only the sweep's files)."""
    art = tmp_path / "artefacts"
    art.mkdir()
    (art / name).write_text('{"mine": 1}\n')
    status, _, err = run_main("--sweep", sweep, "--sweep_scale", "tiny", "--input_files",
                              str(tiny_corpus), "--overwrite", artefacts=art)
    assert status == 2 and err.count("\n") == 1, err
    assert f"{art / name} is not a file that a {sweep} sweep writes" in err
    assert (art / name).read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in art.iterdir()) == [name]


def test_a_sweep_is_refused_while_another_process_writes_its_file(pico, run_main, tmp_path,
                                                                   tiny_corpus):
    """Two sweeps into one file would each write the points it holds, the later writer's
    replacing the other's: the second is refused in one line, and the file is left as it was."""
    art = tmp_path / "art"
    art.mkdir()
    path = art / "sweep_kgram_variants.json"
    path.write_text("{}")   # whatever the other process has written so far
    with pico.claim_file(path, "--artefacts_dir"):
        status, _, err = run_main("--sweep", "kgram_variants", "--sweep_scale", "tiny",
                                  "--input_files", str(tiny_corpus), "--overwrite",
                                  artefacts=art)
    assert status == 2 and err.count("\n") == 1, err
    assert (f"--artefacts_dir: {path} is being written by another pico-llm process; wait for "
            "it to finish, or choose another --artefacts_dir") in err
    assert path.read_text() == "{}"
    assert sorted(p.name for p in art.iterdir()) == ["sweep_kgram_variants.json"]   # no lock left


def test_a_file_claim_is_exclusive_per_file_and_outlives_no_process(pico, tmp_path):
    path, other = tmp_path / "sweep_budget.json", tmp_path / "sweep_overfit.json"
    with pico.claim_file(path, "--artefacts_dir"):
        with pytest.raises(pico.UserError, match="is being written by another pico-llm process"):
            with pico.claim_file(path, "--artefacts_dir"):
                pass
        with pico.claim_file(other, "--artefacts_dir"):   # another sweep's file is free
            pass
    assert list(tmp_path.iterdir()) == []
    with pico.claim_file(tmp_path / "new" / "sweep_budget.json", "--artefacts_dir"):
        assert (tmp_path / "new").is_dir()
    assert list(tmp_path.iterdir()) == []    # the folder made for it, empty, is gone again
    # A lock file left by a process killed while it held the claim holds no lock any more.
    holder = subprocess.run([sys.executable, "-c", "import fcntl, os, sys; fcntl.flock(os.open("
                             "sys.argv[1], os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX); os._exit(9)",
                             str(tmp_path / "sweep_budget.json.lock")])
    assert holder.returncode == 9 and (tmp_path / "sweep_budget.json.lock").exists()
    with pico.claim_file(path, "--artefacts_dir"):
        pass
    assert list(tmp_path.iterdir()) == []
    # A lock file that cannot be made: one line, and the folder made for it is gone again.
    long_name = tmp_path / "new" / ("x" * 250 + ".json")      # its .lock is past NAME_MAX
    with pytest.raises(pico.UserError, match="cannot write .*: File name too long"):
        with pico.claim_file(long_name, "--artefacts_dir"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_locks_gives_no_claim_and_no_error(pico, tmp_path, monkeypatch):
    import errno

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(pico.fcntl, "flock", no_locks)
    with pico.claim_file(tmp_path / "sweep_budget.json", "--artefacts_dir"):
        pass
    with pico.claim_directory(tmp_path / "save", "--save_dir"):
        pass
    assert list(tmp_path.iterdir()) == []
