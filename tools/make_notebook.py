#!/usr/bin/env python3
"""Write pico_llm.ipynb, the presentation walkthrough, from the cells below.

The notebook is generated so that a review reads this file, not JSON. Run
`python tools/make_notebook.py` after editing; outputs are left empty (the
figures land in artefacts/figures/ when the notebook runs).
"""

from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent

CELLS = [
    ("markdown", """\
# pico-llm: a presentation walkthrough

Every number and figure below is read from the JSON files that
`python pico-llm.py --sweep presentation` writes into `artefacts/` (six to seven minutes on a
2-core CPU, character tokenizer, small widths). Nothing here is typed in by hand. A missing
file shows a note and the notebook goes on; figures are saved as PNG into
`artefacts/figures/`."""),
    ("code", """\
# Parameters: the artefacts directory (the environment variable PICO_ARTEFACTS overrides it).
import os
from pathlib import Path

ARTEFACTS = Path(os.environ.get("PICO_ARTEFACTS", "artefacts"))"""),
    ("code", """\
import json

import matplotlib
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

FIGURES = ARTEFACTS / "figures"
SWEEP_SCHEMA, RUNLOG_SCHEMA = 1, 1


def note(message):
    display(Markdown(f"> **Note:** {message}"))


def load(name, kind):
    \"\"\"One artefact as a dict, or None with a visible note when it is missing or not
    the expected kind (sweep, run, attention, monosemantic) and schema version.\"\"\"
    path = ARTEFACTS / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        note(f"`{path}` is missing; run `python pico-llm.py --sweep presentation` to make it.")
        return None
    except (OSError, ValueError) as error:
        note(f"`{path}` could not be read ({error}).")
        return None
    expected = RUNLOG_SCHEMA if kind == "run" else SWEEP_SCHEMA
    if data.get("kind") != kind or data.get("schema_version") != expected:
        note(f"`{path}` is not a {kind} file of schema {expected}; skipped.")
        return None
    return data


def save(fig, name):
    try:
        FIGURES.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURES / f"{name}.png", dpi=110, bbox_inches="tight")
    except OSError as error:
        note(f"figure {name}.png not saved ({error}).")
    plt.show()


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    display(Markdown("\\n".join(lines)))


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def settings_text(settings):
    return ", ".join(f"{key}={value}" for key, value in settings.items())


architectures = load("sweep_architectures.json", "sweep")
run = load("sweep_architectures_run.json", "run")"""),
    ("markdown", """\
## The models and their parameters

Each Transformer preset at a reduced width (d_model 96; the presets' head counts, feed-forward
types, norms and position encodings are kept), beside the LSTM and the k-gram MLP. All trained
for the same number of steps on the same data, in the same run."""),
    ("code", """\
if architectures:
    rows = []
    for point in architectures["points"]:
        config = point.get("config", {})
        shape = (f"d_model {config['d_model']}, {config['n_blocks']} blocks, {config['n_heads']} heads, "
                 f"{config['ffn']}, {config['norm']}, {config['pos_emb']}" if "d_model" in config
                 else settings_text(config))
        rows.append([point["model"], f"{point['parameters']:,}", shape, fmt(point["train_loss"]),
                     fmt(point["test_loss"]), fmt(point.get("test_bits_per_byte")),
                     f"{point['tokens_per_s']:,.0f}", fmt(point["wall_time_s"], 1)])
    table(["model", "parameters", "shape", "train loss", "test loss", "test bits/byte", "tokens/s",
           "seconds"], rows)
    print("environment:", architectures["environment"])
    print("tokenizer:", architectures["config"]["tokenizer"])"""),
    ("markdown", "## The data"),
    ("code", """\
if run:
    data = run["data"]
    rows = [[name, s["examples"], s["train"], s["test"], f"{s['tokens']:,}", f"{s['bytes']:,}"]
            for name, s in data["sources"].items()]
    table(["source", "examples", "train", "test", "tokens", "bytes"], rows)
    print(f"tokenizer {data['tokenizer']}, vocabulary {data['vocab_size']}")"""),
    ("markdown", """\
## Loss curves

Train loss per step (thin line) and test loss after each epoch (dots), from the run log the
architecture sweep writes beside itself."""),
    ("code", """\
if run:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, (name, record) in enumerate(run["models"].items()):
        color = f"C{index % 10}"
        history = record["history"]
        ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], color=color,
                lw=0.8, alpha=0.7, label=f"{name} train")
        tests = record["test_history"]
        ax.plot([t["step"] for t in tests], [t["test_loss"] for t in tests], "o--", color=color,
                ms=4, label=f"{name} test")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="Train and test loss per model")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "loss_curves")"""),
    ("markdown", "## Throughput\n\nTraining tokens per second, measured in the same run."),
    ("code", """\
if architectures:
    points = architectures["points"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([p["model"] for p in points], [p["tokens_per_s"] for p in points], color="C0")
    ax.set(ylabel="training tokens / s", title=f"Throughput ({architectures['environment']['device']})")
    ax.tick_params(axis="x", rotation=30)
    save(fig, "throughput")"""),
    ("markdown", """\
## Overfitting

A small training subset for many epochs. The train loss keeps falling; the test loss stops
and turns up: the gap between them is what the model memorised."""),
    ("code", """\
overfit = load("sweep_overfit.json", "sweep")
if overfit:
    points = overfit["points"]
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 3.5), squeeze=False)
    for ax, point in zip(axes[0], points):
        epochs = point["epochs"]
        x = [e["epoch"] for e in epochs]
        ax.plot(x, [e["train_loss"] for e in epochs], label="train")
        ax.plot(x, [e["test_loss"] for e in epochs], label="test")
        ax.fill_between(x, [e["train_loss"] for e in epochs], [e["test_loss"] for e in epochs],
                        alpha=0.15, color="C3", label="gap")
        ax.set(title=f"{point['model']}, {point['settings']['train_examples']} examples",
               xlabel="epoch", ylabel="loss")
        ax.legend()
    save(fig, "overfitting")
    rows = [[p["model"], c["epoch"], s["rule"], repr(s["text"])[:90], fmt(c["diversity"]["distinct_2"], 2)]
            for p in points for c in p.get("checkpoints", []) for s in c["samples"][:1]]
    table(["model", "epoch", "rule", "generation at the checkpoint", "distinct-2 (all rules)"], rows)"""),
    ("markdown", """\
## How much data?

Final train and test loss against the number of training examples, at a fixed step budget and
a fixed test set. With three examples the model memorises; more data closes the gap."""),
    ("code", """\
custom = load("sweep_custom_data.json", "sweep")
if custom:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, model in enumerate(sorted({p["model"] for p in custom["points"]})):
        points = sorted((p for p in custom["points"] if p["model"] == model),
                        key=lambda p: p["train_examples"])
        x = [p["train_examples"] for p in points]
        ax.plot(x, [p["train_loss"] for p in points], "o:", color=f"C{index}", label=f"{model} train")
        ax.plot(x, [p["test_loss"] for p in points], "s-", color=f"C{index}", label=f"{model} test")
    ax.set(xlabel="training examples", ylabel="final loss", title="Custom-data size sweep")
    ax.legend()
    save(fig, "custom_data")"""),
    ("markdown", """\
## Training budget

The course starter's `--max_steps_per_epoch` at 1, 3 and 6 steps, 60/40 train/test split."""),
    ("code", """\
budget = load("sweep_budget.json", "sweep")
if budget:
    models = sorted({p["model"] for p in budget["points"]})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, model in enumerate(models):
        points = sorted((p for p in budget["points"] if p["model"] == model),
                        key=lambda p: p["settings"]["max_steps_per_epoch"])
        x = [p["settings"]["max_steps_per_epoch"] for p in points]
        ax.plot(x, [p["train_loss"] for p in points], "o:", color=f"C{index}", label=f"{model} train")
        ax.plot(x, [p["test_loss"] for p in points], "s-", color=f"C{index}", label=f"{model} test")
    ax.set(xlabel="steps per epoch", ylabel="final loss", xticks=[1, 3, 6], title="Training budget")
    ax.legend(fontsize=8)
    save(fig, "budget")"""),
    ("markdown", """\
## Hyperparameters

Three small grids, one heatmap each (test loss; darker is better)."""),
    ("code", """\
hyper = load("sweep_hyperparams.json", "sweep")
if hyper:
    grids = {}
    for point in hyper["points"]:
        axes_names = tuple(point["settings"])
        grids.setdefault((point["model"], axes_names), []).append(point)
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.6), squeeze=False)
    for ax, ((model, (row_name, col_name)), points) in zip(axes[0], grids.items()):
        rows = sorted({p["settings"][row_name] for p in points})
        cols = sorted({p["settings"][col_name] for p in points})
        grid = [[float("nan")] * len(cols) for _ in rows]
        for p in points:
            grid[rows.index(p["settings"][row_name])][cols.index(p["settings"][col_name])] = p["test_loss"]
        image = ax.imshow(grid, cmap="viridis_r")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=9)
        ax.set(xticks=range(len(cols)), xticklabels=cols, yticks=range(len(rows)),
               yticklabels=rows, xlabel=col_name, ylabel=row_name, title=f"{model}: test loss")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    save(fig, "hyperparams")"""),
    ("markdown", "## k-gram variants\n\nOne-hot, embedding and convolutional contexts at equal settings."),
    ("code", """\
kgram = load("sweep_kgram_variants.json", "sweep")
if kgram:
    table(["variant", "parameters", "train loss", "test loss", "tokens/s", "seconds"],
          [[p["settings"]["kgram_variant"], f"{p['parameters']:,}", fmt(p["train_loss"]),
            fmt(p["test_loss"]), f"{p['tokens_per_s']:,.0f}", fmt(p["wall_time_s"], 1)]
           for p in kgram["points"]])"""),
    ("markdown", """\
## Ablations: what each Transformer component buys

The pico Transformer (pre-norm RMSNorm, RoPE, SwiGLU) with one component changed at a time,
all at the same step budget. Test loss in nats per token and in bits per byte (total nats over
the test text's UTF-8 bytes / ln 2), which compares fairly across tokenizers."""),
    ("code", """\
ablations = load("sweep_ablations.json", "sweep")
if ablations:
    points = ablations["points"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [p["settings"]["ablation"] for p in points]
    ax.barh(labels, [p["test_loss"] for p in points],
            color=["C2" if label == "baseline" else "C0" for label in labels])
    ax.invert_yaxis()
    ax.set(xlabel="test loss (nats per token; lower is better)", title="Ablations at equal budget")
    low = min(p["test_loss"] for p in points)
    ax.set_xlim(low * 0.95, max(p["test_loss"] for p in points) * 1.02)
    save(fig, "ablations")
    table(["change", "train loss", "test loss", "test bits/byte", "tokens/s"],
          [[p["settings"]["ablation"], fmt(p["train_loss"]), fmt(p["test_loss"]),
            fmt(p["test_bits_per_byte"]), f"{p['tokens_per_s']:,.0f}"] for p in points])"""),
    ("markdown", """\
## Learning rate and batch size

Left: the Transformer's test loss against a constant learning rate, without gradient clipping.
Runs whose loss exploded were stopped early and are marked with a cross at the top. Right: batch
sizes from 1 upward, all seeing the same number of training examples."""),
    ("code", """\
rates = load("sweep_learning_rate.json", "sweep")
batches = load("sweep_batch_size.json", "sweep")
if rates or batches:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    if rates:
        ok = [p for p in rates["points"] if not p.get("diverged")]
        bad = [p for p in rates["points"] if p.get("diverged")]
        ax = axes[0]
        ax.plot([p["settings"]["learning_rate"] for p in ok], [p["test_loss"] for p in ok], "o-",
                label="test loss")
        ax.plot([p["settings"]["learning_rate"] for p in ok], [p["train_loss"] for p in ok], "o:",
                label="train loss")
        top = max([p["test_loss"] for p in ok], default=1.0)
        ax.plot([p["settings"]["learning_rate"] for p in bad], [top] * len(bad), "rx", ms=10,
                label="diverged (stopped)")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final loss", title="Learning-rate sweep")
        ax.legend(fontsize=8)
    if batches:
        points = sorted(batches["points"], key=lambda p: p["settings"]["batch_size"])
        ax = axes[1]
        x = [p["settings"]["batch_size"] for p in points]
        ax.plot(x, [p["test_loss"] for p in points], "o-", label="test loss")
        ax.plot(x, [p["train_loss"] for p in points], "o:", label="train loss")
        twin = ax.twinx()
        twin.plot(x, [p["tokens_per_s"] for p in points], "s--", color="C3", label="tokens/s")
        twin.set_ylabel("training tokens / s", color="C3")
        ax.set(xscale="log", xlabel="batch size", ylabel="final loss",
               title=f"Batch size at {points[0]['settings']['examples']} examples")
        ax.set_xticks(x, [str(b) for b in x])
        ax.minorticks_off()
        ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    save(fig, "learning_rate_batch_size")"""),
    ("markdown", """\
## Sampling: top-p and temperature

The same trained Transformer, several samples per rule. distinct-n: distinct word n-grams over
all n-grams (higher = more varied); repeated 3-grams: the share of a sample's 3-grams it
already produced (higher = looping)."""),
    ("code", """\
sampling = load("sweep_sampling.json", "sweep")
if sampling:
    points = sampling["points"]
    labels = [p["label"] for p in points]
    metrics = ["distinct_1", "distinct_2", "repeated_3gram_fraction"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(metrics)
    for index, metric in enumerate(metrics):
        ax.bar([i + index * width for i in range(len(points))],
               [p["diversity"][metric] for p in points], width, label=metric)
    ax.set_xticks([i + width for i in range(len(points))], labels, rotation=20)
    ax.set(ylabel="fraction", title="Diversity of generations per sampling rule")
    ax.legend()
    save(fig, "sampling_diversity")
    table(["rule", "sample"], [[p["label"], repr(p["samples"][0])[:110]] for p in points])"""),
    ("markdown", """\
## Attention maps

Every layer's and head's attention weights over the prompt (rows: the query token, columns:
the keys it may see). The triangle is the causal mask."""),
    ("code", """\
attention_files = sorted(ARTEFACTS.glob("attention_*.json")) if ARTEFACTS.is_dir() else []
if not attention_files:
    note(f"no attention_*.json in `{ARTEFACTS}`; `--sweep presentation` or `--attention_maps` writes them.")
for path in attention_files:
    maps = load(path.name, "attention")
    if not maps:
        continue
    layers, tokens = maps["layers"], [repr(t)[1:-1] for t in maps["tokens"]]
    heads = len(layers[0])
    fig, axes = plt.subplots(len(layers), heads, figsize=(2.3 * heads, 2.3 * len(layers)),
                             squeeze=False)
    for layer, row in enumerate(axes):
        for head, ax in enumerate(row):
            ax.imshow(layers[layer][head], cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(tokens)), tokens, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.suptitle(f"{maps['model']}: attention over {maps['prompt']!r}")
    fig.tight_layout()
    save(fig, f"attention_{maps['model']}")"""),
    ("markdown", """\
## What the embeddings group together

k-means over the token embeddings of the sampled Transformer, and a greedy sample where
each token carries its cluster (and, once generated, its nearest neighbours)."""),
    ("code", """\
clusters = load("monosemantic_transformer.json", "monosemantic")
if clusters:
    table(["cluster", "tokens"], [[c, repr("".join(members))[1:-1]]
                                  for c, members in clusters["clusters"].items()])
    print(clusters["annotated"])"""),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell(source) if kind == "markdown"
                      else nbformat.v4.new_code_cell(source) for kind, source in CELLS]
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index:02d}"  # stable ids keep the diff of a regenerated notebook small
    return notebook


if __name__ == "__main__":
    nbformat.write(build(), REPO / "pico_llm.ipynb")
    print(f"wrote {REPO / 'pico_llm.ipynb'}")
