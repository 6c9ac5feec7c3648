#!/usr/bin/env python3
"""Write pico_llm.ipynb, the presentation walkthrough, from the cells below.

The notebook is generated so that a review reads this file, not JSON. Run
`python tools/make_notebook.py` after editing; outputs are left empty (the
figures land in artefacts/presentation/figures/ when the notebook runs).
"""

from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent

CELLS = [
    ("markdown", """\
# pico-llm: a presentation walkthrough

Every number and figure below is read from JSON files; nothing is typed in by hand. The
committed results live in `artefacts/presentation/`, made by
`python pico-llm.py --sweep presentation --artefacts_dir artefacts/presentation` (six to seven
minutes on a 2-core CPU, character tokenizer, small widths). A missing file shows a note and the
notebook goes on; figures are saved as PNG into `artefacts/presentation/figures/`.

To plot a run of your own, set `RUN_LOG` below to its run log (for example
`artefacts/runs/<run>.json`); the last section, *Your run*, then shows its loss curves, final
losses and samples."""),
    ("code", """\
# Parameters: edit these two lines, then run all cells.
from pathlib import Path

ARTEFACTS_DIR = Path("artefacts/presentation")  # the sweeps' JSON files, read by every section
RUN_LOG = None  # a run log for "Your run", e.g. Path("artefacts/runs/<run>.json"); None skips it"""),
    ("code", """\
import json
import math

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

FIGURES = ARTEFACTS_DIR / "figures"
SWEEP_SCHEMA, RUNLOG_SCHEMA = 1, 1
NATS = "nats per token"
MAKE_PRESENTATION = f"python pico-llm.py --sweep presentation --artefacts_dir {ARTEFACTS_DIR}"
pd.set_option("display.precision", 3)
pd.set_option("display.max_colwidth", 120)


def note(message):
    display(Markdown(f"> **Note:** {message}"))


def load(path, kind, remedy=f"run `{MAKE_PRESENTATION}` to make it"):
    \"\"\"One JSON file as a dict, or None with a visible note when it is missing or not
    the expected kind (sweep, run, attention, monosemantic) and schema version.\"\"\"
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        note(f"`{path}` is missing; {remedy}.")
        return None
    except (OSError, ValueError) as error:
        note(f"`{path}` could not be read ({error}).")
        return None
    expected = RUNLOG_SCHEMA if kind == "run" else SWEEP_SCHEMA
    if data.get("kind") != kind or data.get("schema_version") != expected:
        note(f"`{path}` is not a {kind} file of schema {expected}; skipped.")
        return None
    return data


def save(fig, name, folder=FIGURES):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
    except OSError as error:
        note(f"figure {name}.png not saved ({error}).")
    plt.show()


def model_family(config):
    \"\"\"Transformer, LSTM or k-gram MLP, told apart by the keys of a model's config.\"\"\"
    if "d_model" in config:
        return "Transformer"
    return "LSTM" if "lstm_layers" in config else "k-gram MLP"


def width_text(config):
    \"\"\"A model's width and depth in a few words, for axis labels.\"\"\"
    if "d_model" in config:
        return f"d_model {config['d_model']}, {plural(config['n_blocks'], 'block')}"
    if "lstm_layers" in config:
        return f"embedding {config['embed_size']}, {plural(config['lstm_layers'], 'layer')}"
    return f"k {config['kgram_k']}, embedding {config['embed_size']}"


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def plot_run_losses(run, title):
    \"\"\"Train loss per step (line) and test loss after each epoch (dots) from a run log,
    one panel per model family, all panels on one loss axis.\"\"\"
    families = {}
    for index, (name, record) in enumerate(run["models"].items()):
        family = model_family(record.get("config", {}))
        families.setdefault(family, []).append((index, name, record))
    ratios = [1 + 0.25 * (len(models) - 1) for models in families.values()]
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * sum(ratios) + 1.5, 4.4), sharey=True,
                             squeeze=False, width_ratios=ratios, layout="constrained")
    for ax, (family, models) in zip(axes[0], families.items()):
        for index, name, record in models:
            color = f"C{index % 10}"  # one colour per model across all panels
            history, tests = record["history"], record["test_history"]
            ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], color=color,
                    lw=0.9, alpha=0.75, label=name)
            ax.plot([t["step"] for t in tests], [t["test_loss"] for t in tests], "o--", color=color,
                    ms=3.5, lw=1)
        if len(models) == 1:
            panel_title = f"{family}, {width_text(models[0][2].get('config', {}))}"
        else:
            widths = {record.get("config", {}).get("d_model") for _, _, record in models}
            shared = family == "Transformer" and len(widths) == 1
            panel_title = f"{family}s" + (f", d_model {widths.pop()}" if shared else "")
        ax.set(title=panel_title, xlabel="step")
        ax.legend(fontsize=9, loc="upper right")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"loss ({NATS})")
    styles = [Line2D([], [], color="0.3", lw=1, label="train loss, every step"),
              Line2D([], [], color="0.3", ls="--", marker="o", ms=3.5,
                     label="test loss, after each epoch")]
    fig.legend(handles=styles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(title)
    return fig


def run_summary(run):
    \"\"\"Per model: parameters, steps, last train and test loss, throughput, training time.
    A run cut short has no `final` summary; its histories give the same figures.\"\"\"
    rows = []
    for name, record in run["models"].items():
        history, tests = record["history"], record["test_history"]
        last = history[-1] if history else {}
        last_test = tests[-1] if tests else {}
        final = record.get("final") or {}
        rows.append({"model": name, "parameters": record["parameters"],
                     "steps": final.get("steps", len(history)),
                     f"train loss ({NATS})": final.get("train_loss", last.get("train_loss")),
                     f"test loss ({NATS})": final.get("test_loss", last_test.get("test_loss")),
                     "test bits per byte": final.get("test_bits_per_byte",
                                                     last_test.get("test_bits_per_byte")),
                     "tokens/s": round(final.get("tokens_per_s", last.get("tokens_per_s", 0))),
                     "training time (s)": final.get("train_time_s", last.get("elapsed_s"))})
    return pd.DataFrame(rows).set_index("model")


architectures = load(ARTEFACTS_DIR / "sweep_architectures.json", "sweep")
architectures_run = load(ARTEFACTS_DIR / "sweep_architectures_run.json", "run")"""),
    ("markdown", """\
## The models and their parameters

Each Transformer preset at a reduced width (d_model 96; the presets' head counts, feed-forward
types, norms and position encodings are kept), beside the LSTM and the k-gram MLP. All trained
for the same number of steps on the same data, in the same run. Losses in nats per token."""),
    ("code", """\
def shape_text(config):
    if "d_model" not in config:
        return ", ".join(f"{key}={value}" for key, value in config.items())
    return (f"d_model {config['d_model']}, {config['n_blocks']} blocks, {config['n_heads']} heads, "
            f"{config['ffn']}, {config['norm']}, {config['pos_emb']}")


if architectures:
    display(pd.DataFrame([{
        "model": p["model"], "parameters": p["parameters"],
        "shape": shape_text(p.get("config", {})), "train loss": p["train_loss"],
        "test loss": p["test_loss"],
        "test bits per byte": p.get("test_bits_per_byte"), "tokens/s": round(p["tokens_per_s"]),
        "seconds": p["wall_time_s"]} for p in architectures["points"]]).set_index("model"))
    print("environment:", architectures["environment"])
    print("tokenizer:", architectures["config"]["tokenizer"])"""),
    ("markdown", "## The data"),
    ("code", """\
if architectures_run:
    data = architectures_run["data"]
    display(pd.DataFrame([{"source": name, **sizes} for name, sizes in data["sources"].items()])
            .set_index("source"))
    print(f"tokenizer {data['tokenizer']}, vocabulary {data['vocab_size']}")"""),
    ("markdown", """\
## Loss curves

Train loss at every step (line) and test loss after each epoch (dots), from the run log the
architecture sweep writes beside itself: one panel per model family, one shared loss axis.
Where a test curve turns up while its train curve keeps falling, the model is memorising."""),
    ("code", """\
if architectures_run:
    save(plot_run_losses(architectures_run, "Train and test loss of each architecture"),
         "loss_curves")"""),
    ("markdown", """\
## Throughput

Training tokens per second, measured in the same run, on a log axis with the measured value
written on each bar; each label gives the model's width and depth."""),
    ("code", """\
if architectures:
    points = architectures["points"]
    scale, environment = architectures["config"]["scale"], architectures["environment"]
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(points) + 1.6))
    labels = [f"{p['model']}\\n({width_text(p.get('config', {}))})" for p in points]
    family_colours = {"Transformer": "C0", "LSTM": "C1", "k-gram MLP": "C2"}
    bars = ax.barh(labels, [p["tokens_per_s"] for p in points],
                   color=[family_colours[model_family(p.get("config", {}))] for p in points])
    ax.bar_label(bars, [f"{p['tokens_per_s']:,.0f}" for p in points], padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(10 ** math.floor(math.log10(min(p["tokens_per_s"] for p in points))),
                max(p["tokens_per_s"] for p in points) * 3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", labelsize=9)
    ax.set(xlabel="training tokens per second (log scale; higher is faster)",
           title=(f"Training throughput: {architectures['config']['tokenizer']} tokenizer, "
                  f"block {scale['block_size']}, batch {scale['batch_size']}\\n"
                  f"{environment['device']} ({environment.get('device_name', '')}), "
                  f"{environment['threads']} threads"))
    save(fig, "throughput")"""),
    ("markdown", """\
## Overfitting

A small training subset for many epochs. The train loss keeps falling; the test loss stops
and turns up: the gap between them is what the model memorised."""),
    ("code", """\
overfit = load(ARTEFACTS_DIR / "sweep_overfit.json", "sweep")
if overfit:
    points = overfit["points"]
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 3.6), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, point in zip(axes[0], points):
        epochs = point["epochs"]
        x = [e["epoch"] for e in epochs]
        ax.plot(x, [e["train_loss"] for e in epochs], label="train")
        ax.plot(x, [e["test_loss"] for e in epochs], label="test")
        ax.fill_between(x, [e["train_loss"] for e in epochs], [e["test_loss"] for e in epochs],
                        alpha=0.15, color="C3", label="gap")
        ax.set(title=f"{point['model']}, {point['settings']['train_examples']} training examples",
               xlabel="epoch")
        ax.legend()
    axes[0][0].set_ylabel(f"loss ({NATS})")
    save(fig, "overfitting")
    display(pd.DataFrame([{"model": p["model"], "epoch": c["epoch"], "rule": s["rule"],
                           "generation at the checkpoint": repr(s["text"])[:90],
                           "distinct-2 (all rules)": c["diversity"]["distinct_2"]}
                          for p in points for c in p.get("checkpoints", [])
                          for s in c["samples"][:1]]))"""),
    ("markdown", """\
## How much data?

Final train and test loss against the number of training examples, at a fixed step budget and
a fixed test set. With three examples the model memorises; more data closes the gap."""),
    ("code", """\
custom = load(ARTEFACTS_DIR / "sweep_custom_data.json", "sweep")
if custom:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, model in enumerate(sorted({p["model"] for p in custom["points"]})):
        points = sorted((p for p in custom["points"] if p["model"] == model),
                        key=lambda p: p["train_examples"])
        x = [p["train_examples"] for p in points]
        ax.plot(x, [p["train_loss"] for p in points], "o:", color=f"C{index}", label=f"{model} train")
        ax.plot(x, [p["test_loss"] for p in points], "s-", color=f"C{index}", label=f"{model} test")
    ax.set(xlabel="training examples", ylabel=f"final loss ({NATS})",
           title="Final loss against training-set size")
    ax.legend()
    save(fig, "custom_data")"""),
    ("markdown", """\
## Training budget

The course starter's `--max_steps_per_epoch` at 1, 3 and 6 steps, 60/40 train/test split."""),
    ("code", """\
budget = load(ARTEFACTS_DIR / "sweep_budget.json", "sweep")
if budget:
    models = sorted({p["model"] for p in budget["points"]})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, model in enumerate(models):
        points = sorted((p for p in budget["points"] if p["model"] == model),
                        key=lambda p: p["settings"]["max_steps_per_epoch"])
        x = [p["settings"]["max_steps_per_epoch"] for p in points]
        ax.plot(x, [p["train_loss"] for p in points], "o:", color=f"C{index}", label=f"{model} train")
        ax.plot(x, [p["test_loss"] for p in points], "s-", color=f"C{index}", label=f"{model} test")
    ax.set(xlabel="steps per epoch", ylabel=f"final loss ({NATS})", xticks=[1, 3, 6],
           title=f"Training budget ({points[0]['settings']['epochs']} epochs)")
    ax.legend(fontsize=8)
    save(fig, "budget")"""),
    ("markdown", """\
## Hyperparameters

Three small grids, one heatmap each, all on one colour scale: final test loss in nats per token,
darker is lower (better). The best cell of each grid is written in bold."""),
    ("code", """\
hyper = load(ARTEFACTS_DIR / "sweep_hyperparams.json", "sweep")
if hyper:
    grids = {}
    for point in hyper["points"]:
        grids.setdefault((point["model"], tuple(point["settings"])), []).append(point)
    losses = [p["test_loss"] for p in hyper["points"] if p["test_loss"] is not None]
    colours = ScalarMappable(Normalize(min(losses), max(losses)), "viridis")
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids) + 1.2, 3.6), squeeze=False,
                             layout="constrained")
    for ax, ((model, (row_name, col_name)), points) in zip(axes[0], grids.items()):
        rows = sorted({p["settings"][row_name] for p in points})
        cols = sorted({p["settings"][col_name] for p in points})
        grid = [[float("nan")] * len(cols) for _ in rows]
        for p in points:
            if p["test_loss"] is not None:
                row, col = rows.index(p["settings"][row_name]), cols.index(p["settings"][col_name])
                grid[row][col] = p["test_loss"]
        best = min(value for row in grid for value in row if value == value)
        ax.imshow(grid, cmap=colours.cmap, norm=colours.norm)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                dark = value == value and colours.norm(value) < 0.55
                ax.text(j, i, "n/a" if value != value else f"{value:.2f}", ha="center", va="center",
                        fontsize=10, color="white" if dark else "black",
                        fontweight="bold" if value == best else "normal")
        ax.set(xticks=range(len(cols)), xticklabels=cols, yticks=range(len(rows)),
               yticklabels=rows, xlabel=col_name, ylabel=row_name,
               title=f"{model}: {row_name} by {col_name}")
    fig.colorbar(colours, ax=axes[0].tolist(), shrink=0.85,
                 label=f"test loss ({NATS}; darker is better)")
    fig.suptitle("Final test loss per hyperparameter grid, on one colour scale")
    save(fig, "hyperparams")"""),
    ("markdown", "## k-gram variants\n\nOne-hot, embedding and convolutional contexts at equal settings."),
    ("code", """\
kgram = load(ARTEFACTS_DIR / "sweep_kgram_variants.json", "sweep")
if kgram:
    display(pd.DataFrame([{"variant": p["settings"]["kgram_variant"], "parameters": p["parameters"],
                           "train loss": p["train_loss"], "test loss": p["test_loss"],
                           "tokens/s": round(p["tokens_per_s"]), "seconds": p["wall_time_s"]}
                          for p in kgram["points"]]).set_index("variant"))"""),
    ("markdown", """\
## Ablations: what each Transformer component buys

The pico Transformer (pre-norm RMSNorm, RoPE, SwiGLU) with one component changed at a time,
all at the same step budget. The figure plots each change's test loss minus the baseline's
(nats per token; right of zero is worse). The table gives the losses themselves, also in bits per
byte (total nats over the test text's UTF-8 bytes / ln 2), which compares fairly across
tokenizers."""),
    ("code", """\
ablations = load(ARTEFACTS_DIR / "sweep_ablations.json", "sweep")
baseline = next((p for p in ablations["points"] if p["settings"]["ablation"] == "baseline"),
                None) if ablations else None
if ablations and not baseline:
    note("the ablation sweep has no baseline point to compare against.")
if baseline:
    points = [p for p in ablations["points"] if p is not baseline]
    changes = [p["test_loss"] - baseline["test_loss"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(points) + 1.4))
    bars = ax.barh([p["settings"]["ablation"] for p in points], changes,
                   color=["C3" if change > 0 else "C2" for change in changes])
    ax.bar_label(bars, [f"{change:+.2f} (= {p['test_loss']:.2f})"
                        for change, p in zip(changes, points)], padding=3, fontsize=9)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlim(min(0, *changes) * 1.4 - 0.05, max(0, *changes) * 1.35 + 0.05)
    ax.set(xlabel=f"change in test loss against the baseline ({NATS}; right of 0 is worse)",
           title=f"Ablations at equal budget (baseline: {baseline['test_loss']:.2f} {NATS})")
    save(fig, "ablations")
    display(pd.DataFrame([{"change": p["settings"]["ablation"], "train loss": p["train_loss"],
                           "test loss": p["test_loss"],
                           "test bits per byte": p["test_bits_per_byte"],
                           "tokens/s": round(p["tokens_per_s"])}
                          for p in ablations["points"]]).set_index("change"))"""),
    ("markdown", """\
## Learning rate and batch size

Left: the Transformer's test loss against a constant learning rate, without gradient clipping.
Runs whose loss exploded were stopped early and are marked with a cross at the top. Right: batch
sizes from 1 upward, all seeing the same number of training examples."""),
    ("code", """\
rates = load(ARTEFACTS_DIR / "sweep_learning_rate.json", "sweep")
batches = load(ARTEFACTS_DIR / "sweep_batch_size.json", "sweep")
if rates or batches:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    if rates:
        ok = [p for p in rates["points"] if not p.get("diverged")]
        bad = [p for p in rates["points"] if p.get("diverged")]
        ax = axes[0]
        ax.plot([p["settings"]["learning_rate"] for p in ok], [p["test_loss"] for p in ok], "o-",
                label="test loss")
        ax.plot([p["settings"]["learning_rate"] for p in ok], [p["train_loss"] for p in ok], "o:",
                label="train loss")
        if bad:
            top = max([p["test_loss"] for p in ok], default=1.0)
            ax.plot([p["settings"]["learning_rate"] for p in bad], [top] * len(bad), "rx", ms=10,
                    label="diverged (stopped)")
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"final loss ({NATS})",
               title="Learning-rate sweep")
        ax.legend(fontsize=8)
    if batches:
        points = sorted(batches["points"], key=lambda p: p["settings"]["batch_size"])
        ax = axes[1]
        x = [p["settings"]["batch_size"] for p in points]
        ax.plot(x, [p["test_loss"] for p in points], "o-", label="test loss")
        ax.plot(x, [p["train_loss"] for p in points], "o:", label="train loss")
        twin = ax.twinx()
        twin.plot(x, [p["tokens_per_s"] for p in points], "s--", color="C3",
                  label="tokens/s (right axis)")
        twin.set_ylabel("training tokens per second", color="C3")
        ax.set(xscale="log", xlabel="batch size", ylabel=f"final loss ({NATS})",
               title=f"Batch size at {points[0]['settings']['examples']} training examples")
        ax.set_xticks(x, [str(b) for b in x])
        ax.minorticks_off()
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, ncol=3,
                  loc="upper center", bbox_to_anchor=(0.5, -0.16))
    save(fig, "learning_rate_batch_size")"""),
    ("markdown", """\
## Sampling: top-p and temperature

The same trained Transformer, several samples per rule. distinct-n: distinct word n-grams over
all n-grams (higher = more varied); repeated 3-grams: the share of a sample's 3-grams it
already produced (higher = looping). A measure that is zero for every rule is named below the
figure instead of drawn."""),
    ("code", """\
sampling = load(ARTEFACTS_DIR / "sweep_sampling.json", "sweep")
if sampling:
    points = sampling["points"]
    names = {"distinct_1": "distinct-1", "distinct_2": "distinct-2",
             "repeated_3gram_fraction": "repeated 3-grams"}
    drawn = [m for m in names if any(p["diversity"][m] for p in points)]
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    width = 0.8 / len(drawn)
    for index, metric in enumerate(drawn):
        ax.bar([i + index * width for i in range(len(points))],
               [p["diversity"][metric] for p in points], width, label=names[metric])
    ax.set_xticks([i + width * (len(drawn) - 1) / 2 for i in range(len(points))],
                  [p["label"] for p in points], rotation=20)
    zero = [names[m] for m in names if m not in drawn]
    ax.set(ylabel="share of the samples' n-grams", ylim=(0, 1.05),
           title="Diversity of generations per sampling rule"
                 + "".join(f"\\n({name}: 0 for every rule, not drawn)" for name in zero))
    ax.legend(loc="upper left", fontsize=9)
    save(fig, "sampling_diversity")
    display(pd.DataFrame([{"rule": p["label"], "sample": repr(p["samples"][0])[:110]}
                          for p in points]).set_index("rule"))"""),
    ("markdown", """\
## Attention maps

Every layer's and head's attention weights over the prompt (rows: the query token, columns:
the keys it may see; ␣ is a space). The triangle is the causal mask."""),
    ("code", """\
attention_files = sorted(ARTEFACTS_DIR.glob("attention_*.json")) if ARTEFACTS_DIR.is_dir() else []
if not attention_files:
    note(f"no attention_*.json in `{ARTEFACTS_DIR}`; `--sweep presentation` or `--attention_maps` "
         "writes them.")
for path in attention_files:
    maps = load(path, "attention")
    if not maps:
        continue
    layers = maps["layers"]
    tokens = ["␣" if t == " " else repr(t)[1:-1] for t in maps["tokens"]]
    heads = len(layers[0])
    fig, axes = plt.subplots(len(layers), heads, figsize=(2.3 * heads + 0.8, 2.3 * len(layers)),
                             squeeze=False, layout="constrained")
    for layer, row in enumerate(axes):
        for head, ax in enumerate(row):
            image = ax.imshow(layers[layer][head], cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(tokens)), tokens, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6,
                 label="attention weight (rows sum to 1)")
    fig.suptitle(f"{maps['model']}: attention over {maps['prompt']!r}")
    save(fig, f"attention_{maps['model']}")"""),
    ("markdown", """\
## What the embeddings group together

k-means over the token embeddings of the sampled Transformer, and a greedy sample where
each token carries its cluster (and, once generated, its nearest neighbours)."""),
    ("code", """\
clusters = load(ARTEFACTS_DIR / "monosemantic_transformer.json", "monosemantic")
if clusters:
    display(pd.DataFrame([{"cluster": c, "tokens": repr("".join(members))[1:-1]}
                          for c, members in clusters["clusters"].items()]).set_index("cluster"))
    print(clusters["annotated"])"""),
    ("markdown", """\
## Your run

The run log named by `RUN_LOG` in the parameter cell: its loss curves (saved beside the run log
as `<run>_loss_curves.png`), each model's final figures, and the samples it generated. A run
that was cut short is plotted up to its last step."""),
    ("code", """\
if RUN_LOG is None:
    display(Markdown("*`RUN_LOG` is None: set it in the parameter cell to plot your own run.*"))
else:
    own_path = Path(RUN_LOG)
    own = load(own_path, "run",
               remedy="check the path; `python pico-llm.py` says where its run log went")
    if own:
        data, environment = own["data"], own["environment"]
        display(Markdown(f"**{own['run_name']}** ({own.get('status', 'no status')}), created "
                         f"{own['created']}: {data['tokenizer']} tokenizer, vocabulary "
                         f"{data['vocab_size']}, {environment['device']}, "
                         f"{environment['threads']} threads"))
        save(plot_run_losses(own, f"Run {own['run_name']}: train and test loss"),
             f"{own_path.stem}_loss_curves", own_path.parent)
        display(run_summary(own))
        display(pd.DataFrame([{"model": name, "step": s["step"], "rule": s["rule"],
                               "text": s["text"]}
                              for name, record in own["models"].items()
                              for s in record["samples"]]))"""),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell(source) if kind == "markdown"
                      else nbformat.v4.new_code_cell(source) for kind, source in CELLS]
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index:02d}"  # stable ids keep the diff of a regenerated notebook small
        if cell.source.startswith("# Parameters:"):
            cell.metadata["tags"] = ["parameters"]  # where papermill-style tools inject values
    return notebook


if __name__ == "__main__":
    nbformat.write(build(), REPO / "pico_llm.ipynb")
    print(f"wrote {REPO / 'pico_llm.ipynb'}")
