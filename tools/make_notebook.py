#!/usr/bin/env python3
"""Write pico_llm.ipynb, the presentation walkthrough, from the cells below.

The notebook is generated so that a review reads this file, not JSON. Run
`python tools/make_notebook.py` after editing; outputs are left empty (the
figures land in artefacts/presentation/figures/ when the notebook runs).
A notebook whose cells someone edited since this tool wrote it (the README
asks students to set RUN_LOG there), or that holds the outputs of a run, is
replaced only with --force.
"""

import hashlib
import json
import shlex
import sys
from pathlib import Path

import nbformat

from pico_module import (OneLineErrorParser, path_text, run_tool, write_text_atomically,
                         tool_description)

REPO = Path(__file__).resolve().parent.parent

CELLS = [
    ("markdown", """\
# pico-llm: a presentation walkthrough

Every number and figure below is read from JSON files; nothing is typed in by hand. The
committed results live in `artefacts/presentation/`, made by
`python pico-llm.py --sweep presentation --artefacts_dir artefacts/presentation --overwrite`
(with `--loss chunked`, the default then: each file records its flags; character tokenizer,
small widths; the first table says how long each sweep took, and on what
machine), all but the recipe sweep, which reads a larger text (its section says which). A
missing file, a sweep with too few finite points to draw (one stopped part-way), or a file
edited by hand into a shape pico-llm does not write shows a note, and the notebook goes on;
figures are saved as PNG into `artefacts/presentation/figures/`.

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
import traceback
from contextlib import contextmanager

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, PowerNorm, TwoSlopeNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

ARTEFACTS_DIR = Path(ARTEFACTS_DIR)  # a string too, as papermill's -p gives it
FIGURES = ARTEFACTS_DIR / "figures"
SWEEP_SCHEMA, RUNLOG_SCHEMA = 1, 1
NATS = "nats per token"
MAKE_PRESENTATION = f"python pico-llm.py --sweep presentation --artefacts_dir {ARTEFACTS_DIR} --overwrite"
MAKE_RECIPE = ("python tools/stream_vs_lines.py --corpus_dir /tmp/pico-python-docs --corpus_only`, "
               "then `python pico-llm.py --sweep recipe --input_dir /tmp/pico-python-docs "
               f"--artefacts_dir {ARTEFACTS_DIR} --overwrite")
pd.set_option("display.precision", 3)
pd.set_option("display.max_colwidth", 120)


def note(message):
    display(Markdown(f"> **Note:** {message}"))


def load(path, kind, remedy=f"run `{MAKE_PRESENTATION}` to make it"):
    \"\"\"One JSON file as a dict, or None with a visible note when it is missing or not
    the expected kind (sweep, run, attention, monosemantic) and schema version.\"\"\"
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):   # reading a pipe would wait
        note(f"`{path}` is not a regular file (a pipe, socket or device); skipped.")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        note(f"`{path}` is missing; {remedy}.")
        return None
    except (OSError, ValueError, RecursionError) as error:   # RecursionError: nested too deep
        note(f"`{path}` could not be read ({error}).")
        return None
    expected = RUNLOG_SCHEMA if kind == "run" else SWEEP_SCHEMA
    if not isinstance(data, dict) or (data.get("kind"), data.get("schema_version")) != (kind, expected):
        note(f"`{path}` is not a {kind} file of schema {expected}; skipped.")
        return None
    points = data.get("points")
    if kind == "sweep" and not (isinstance(points, list) and all(isinstance(p, dict) for p in points)):
        note(f"`{path}` is not as pico-llm writes it (its points are not a list of objects; "
             "edited by hand?), so it is skipped.")
        return None
    return data


@contextmanager
def drawn_from(*names):
    \"\"\"Runs one section on the files it reads (a name in ARTEFACTS_DIR, or a Path).
    pico-llm writes every field a section reads, but a file edited by hand may lack one or hold
    another type: the section then stops with a note naming its files, the error and the
    notebook's line that met it (which names the fields it read), and the notebook goes on.\"\"\"
    try:
        yield
    except (ArithmeticError, AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        plt.close("all")  # a figure drawn half-way is not shown
        detail = next((line for line in str(error).splitlines() if line.strip()), "")[:160]
        cells = [frame.line for frame in traceback.extract_tb(error.__traceback__)   # not a
                 if "ipykernel" in frame.filename or frame.filename.startswith("<")]  # library's
        if cells and cells[-1]:
            detail += f", at `{cells[-1].strip()[:100]}`"
        note(" and ".join(f"`{ARTEFACTS_DIR / name if isinstance(name, str) else name}`"
                          for name in names)
             + f" {'is' if len(names) == 1 else 'are'} not as pico-llm writes "
             f"{'it' if len(names) == 1 else 'them'} ({type(error).__name__}: {detail}; "
             "edited by hand?), so this section is skipped.")


def finite(value):
    \"\"\"A number that is neither NaN nor infinite (a diverged run records None or NaN).\"\"\"
    try:
        return isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:   # an integer too large for a float (JSON allows any)
        return False


def usable_points(sweep, *fields, needed=1):
    \"\"\"The points of a loaded sweep (or None) that did not diverge and whose `fields` are
    finite numbers. A note says how many were left out; when fewer than `needed` remain (a
    sweep stopped part-way holds only the points it finished), it says so instead and the
    list comes back empty, so that the section shows nothing else.\"\"\"
    if not sweep:
        return []
    name = sweep.get("sweep", "")
    trained = [p for p in sweep["points"] if not p.get("diverged")]
    points = [p for p in trained if all(finite(p.get(field)) for field in fields)]
    without = (f"{plural(len(trained) - len(points), 'point')} without a finite "
               f"{' or '.join(fields)}")
    if len(points) >= needed:
        if len(points) < len(trained):
            note(f"the {name} sweep has {without}, left out here.")
        return points
    left_out = []
    if len(trained) < len(sweep["points"]):
        left_out.append(f"{len(sweep['points']) - len(trained)} diverged")
    if len(points) < len(trained):
        left_out.append(without)
    note(f"the {name} sweep has {plural(len(points), 'point')} to show"
         + (f" ({', '.join(left_out)})" if left_out else "") + f"; this section needs {needed}"
         + ("" if sweep.get("status") == "finished" else
            f" (the sweep is not finished: `python pico-llm.py --sweep {name} --artefacts_dir "
            f"{ARTEFACTS_DIR}`, with the flags it was started with, runs the rest of it)") + ".")
    return []


def save(fig, name, folder=FIGURES):
    if fig is None:  # nothing to draw, and a note said why
        return
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
    one panel per model family, all panels on one loss axis. A NaN or infinite loss (a run
    that diverged) cannot be drawn: a note counts them, and None comes back when no loss is
    left to draw.\"\"\"
    losses = {name: [h["train_loss"] for h in record["history"]]
                    + [t["test_loss"] for t in record["test_history"]]
              for name, record in run["models"].items()}
    if not any(finite(loss) for values in losses.values() for loss in values):
        note(f"the run log of {run['run_name']} has no finite loss to plot.")
        return None
    not_finite = {name: sum(not finite(loss) for loss in values) for name, values in losses.items()}
    if any(not_finite.values()):
        note(f"NaN or infinite losses in {run['run_name']}, not drawn: "
             + ", ".join(f"{name} {count} of {len(losses[name])}"
                         for name, count in not_finite.items() if count) + ".")
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


def plot_attention(maps, figure_name, folder=FIGURES, max_layers=6, max_heads=8, max_labels=64):
    \"\"\"Each layer's and head's attention weights over the prompt, one panel each: at most
    max_layers layers (the first and the last ones) and the first max_heads heads, the
    tokens written along the bottom row and the left column when there are at most
    max_labels of them. Labels on every panel took most of the time: 58 s for 12 x 12 heads
    over 57 tokens.\"\"\"
    layers = maps["layers"]
    tokens = ["␣" if t == " " else repr(t)[1:-1] for t in maps["tokens"]]
    first = (max_layers + 1) // 2                     # layers from the start; the rest the end
    shown_layers = (list(range(len(layers))) if len(layers) <= max_layers else
                    [*range(first), *range(len(layers) - (max_layers - first), len(layers))])
    heads = min(len(layers[0]), max_heads)
    fig, axes = plt.subplots(len(shown_layers), heads,
                             figsize=(2.3 * heads + 0.8, 2.3 * len(shown_layers)),
                             squeeze=False, layout="constrained")
    labels = tokens if len(tokens) <= max_labels else []
    for layer, row in zip(shown_layers, axes):
        for head, ax in enumerate(row):
            image = ax.imshow(layers[layer][head], cmap="Blues", vmin=0, vmax=1)
            bottom, left = layer == shown_layers[-1], head == 0
            ax.set_xticks(range(len(labels)) if bottom else [], labels if bottom else [], fontsize=6)
            ax.set_yticks(range(len(labels)) if left else [], labels if left else [], fontsize=6)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6,
                 label="attention weight (rows sum to 1)")

    def span(word, start, end):                       # "layers 3-8", "layer 3", or nothing
        return "" if start > end else f"{word} {start}" if start == end else f"{word}s {start}-{end}"

    left_out = [span("layer", first, len(layers) - (max_layers - first) - 1)
                if len(shown_layers) < len(layers) else "", span("head", heads, len(layers[0]) - 1)]
    left_out = " and ".join(part for part in left_out if part)
    fig.suptitle(f"{maps['model']}: attention over {maps['prompt']!r}"
                 + (f" ({left_out} not shown)" if left_out else ""))
    save(fig, figure_name, folder)


def show_clusters(clusters):
    \"\"\"The k-means clusters of the token embeddings, and the annotated greedy sample.\"\"\"
    display(pd.DataFrame([{"cluster": c, "tokens": repr("".join(members))[1:-1]}
                          for c, members in clusters["clusters"].items()]).set_index("cluster"))
    print(clusters["annotated"])


architectures = load(ARTEFACTS_DIR / "sweep_architectures.json", "sweep")
architectures_run = load(ARTEFACTS_DIR / "sweep_architectures_run.json", "run")"""),
    ("markdown", """\
## What was run

Each sweep file records the text it trained on (a digest of its examples), when it was made, on
what machine, with how many threads, and how long its points took in all (`wall_time_s`, summed
over every run that added points)."""),
    ("code", """\
inventory = []
for path in sorted(ARTEFACTS_DIR.glob("sweep_*.json")):
    if path.stem.endswith("_run"):     # the architectures sweep's run log, not a sweep
        continue
    sweep = load(path, "sweep")
    with drawn_from(path):
        if sweep and sweep.get("sweep"):
            environment = sweep.get("environment", {})
            args = sweep.get("config", {}).get("args", {})
            text = (Path(args["input_dir"]).name + "/" if args.get("input_dir") else
                    ", ".join(Path(f).name for f in args.get("input_files") or []) or "shipped corpus")
            digest = sweep.get("config", {}).get("data_sha256", "")
            inventory.append({"sweep": sweep["sweep"], "points": len(sweep["points"]),
                              "text (sha256)": f"{text} ({digest[:8]})" if digest else text,
                              "minutes": round(sweep.get("wall_time_s", 0) / 60, 1),
                              "made": sweep.get("created", "")[:10],
                              "device": environment.get("device_name") or environment.get("device"),
                              "cores": environment.get("cpu_count"),
                              "threads": environment.get("threads")})
if inventory:
    inventory = pd.DataFrame(inventory).set_index("sweep")
    display(inventory)
    display(Markdown(f"{len(inventory)} sweeps, {inventory['minutes'].sum():.0f} minutes of "
                     "training and measuring in all."))
else:
    note(f"no sweep files in `{ARTEFACTS_DIR}`; run `{MAKE_PRESENTATION}` to make them.")"""),
    ("markdown", """\
## The models and their parameters

Each Transformer preset at a reduced size (d_model 96 and at most 6 blocks; the presets' head
counts, feed-forward types, norms and position encodings are kept), beside the LSTM and the
k-gram MLP. All trained for the same number of steps on the same data, in the same run. Losses in nats per token."""),
    ("code", """\
def shape_text(config):
    if "d_model" not in config:
        return ", ".join(f"{key}={value}" for key, value in config.items())
    return (f"d_model {config['d_model']}, {config['n_blocks']} blocks, {config['n_heads']} heads, "
            f"{config['ffn']}, {config['norm']}, {config['pos_emb']}")


architecture_points = usable_points(architectures, "train_loss", "test_loss", "tokens_per_s")
with drawn_from("sweep_architectures.json"):
    if architecture_points:
        display(pd.DataFrame([{
            "model": p["model"], "parameters": p["parameters"],
            "shape": shape_text(p.get("config", {})), "train loss": p["train_loss"],
            "test loss": p["test_loss"],
            "test bits per byte": p.get("test_bits_per_byte"), "tokens/s": round(p["tokens_per_s"]),
            "seconds": p["wall_time_s"]} for p in architecture_points]).set_index("model"))
        print("environment:", architectures["environment"])
        print("tokenizer:", architectures["config"]["tokenizer"])"""),
    ("markdown", "## The data"),
    ("code", """\
with drawn_from("sweep_architectures_run.json"):
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
with drawn_from("sweep_architectures_run.json"):
    if architectures_run:
        save(plot_run_losses(architectures_run, "Train and test loss of each architecture"),
             "loss_curves")"""),
    ("markdown", """\
## Throughput

Training tokens per second, measured in the same run, on a log axis with the measured value
written on each bar; each label gives the model's width and depth."""),
    ("code", """\
with drawn_from("sweep_architectures.json"):
    if architecture_points:
        points = architecture_points
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
## New architectures

Three ideas beyond GPT-2, each measured in the sweeps: GPT-oss's mixture of experts (which
experts the router picks), its alternation of sliding-window and full attention with a learned
*sink* per head (a logit that takes part of each softmax's weight and brings no value), and
linear attention (no preset's: the attention sweep switches the pico Transformer to it), which
replaces the growing KV cache by a state of fixed size."""),
    ("markdown", """\
### Expert usage per layer

The share of GPT-oss's routing choices each expert took in the last epoch, per layer (each
row sums to 1; a token counts once for each expert it is routed to). White is the even share,
1 / number of experts; red experts take more than it, blue ones less. The counts are over every
position the epoch's training steps routed, padding included."""),
    ("code", """\
with drawn_from("sweep_architectures_run.json"):
    gpt_oss = architectures_run["models"].get("GPT-oss") if architectures_run else None
    if architectures_run and not (gpt_oss and gpt_oss.get("expert_usage")):
        note(f"`{ARTEFACTS_DIR / 'sweep_architectures_run.json'}` has no expert usage for GPT-oss; "
             f"`python pico-llm.py --sweep architectures --artefacts_dir {ARTEFACTS_DIR}` records it.")
    elif gpt_oss:
        usage, config = gpt_oss["expert_usage"], gpt_oss["config"]
        shares = usage[-1]["fractions"]                                   # [layer][expert]
        n_experts = config["n_experts"]
        even = 1 / n_experts
        norm = TwoSlopeNorm(vmin=0, vcenter=even, vmax=max(2 * even, *map(max, shares)))
        fig, ax = plt.subplots(figsize=(0.75 * n_experts + 2.6, max(3.2, 0.5 * len(shares) + 1.6)),
                               layout="constrained")
        image = ax.imshow(shares, cmap="RdBu_r", norm=norm, aspect="auto")
        for layer, row in enumerate(shares):
            for expert, share in enumerate(row):
                ax.text(expert, layer, f"{share:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if abs(norm(share) - 0.5) > 0.35 else "black")
        ax.set(xticks=range(n_experts), yticks=range(len(shares)), xlabel="expert",
               ylabel="layer (block)",
               title=(f"GPT-oss expert usage in epoch {usage[-1]['epoch']}: {n_experts} experts, "
                      f"{config['experts_per_token']} per token\\n(white: the even share, {even:.1%})"))
        colour_bar = fig.colorbar(image, ax=ax, format=PercentFormatter(1, decimals=1))
        colour_bar.set_label("share of tokens routed")
        colour_bar.set_ticks(sorted({0, even, 2 * even, norm.vmax}))
        save(fig, "expert_usage")
        display(Markdown("The busiest expert's share as a multiple of the even share "
                         "(1 = perfectly balanced), per epoch and layer:"))
        display(pd.DataFrame([{"epoch": entry["epoch"],
                               **{f"layer {layer}": max(row) * n_experts
                                  for layer, row in enumerate(entry["fractions"])}}
                              for entry in usage]).set_index("epoch"))"""),
    ("markdown", """\
### Sliding windows and attention sinks

GPT-oss's even layers see only the last few tokens (a sliding window), its odd layers the whole
context. Top: one head's attention over the first test example in a sliding layer beside a full
one (rows: the query token, columns: the keys; keys left of the red line are outside the
window). Because of the sink, a row of weights sums to less than 1. Bottom: per layer and head,
the share of attention the sink took (1 minus a row's sum, averaged over the queries) beside the
sink logit it learned. The sink's weight in a row is exp(logit) / (exp(logit) + the sum of
exp(score) over the keys), so one logit takes a larger share where a head's scores are low."""),
    ("code", """\
HEAD = 0  # the head whose attention maps are drawn
oss_maps = load(ARTEFACTS_DIR / "architectures_attention_GPT-oss.json", "attention",
                remedy="`python pico-llm.py --sweep architectures --artefacts_dir "
                       f"{ARTEFACTS_DIR}` writes it")
with drawn_from("architectures_attention_GPT-oss.json"):
    if oss_maps:
        layers, windows, sinks = oss_maps["layers"], oss_maps["windows"], oss_maps["sinks"]
        tokens = ["␣" if t == " " else repr(t)[1:-1] for t in oss_maps["tokens"]]
        n_tokens, n_heads = len(tokens), len(layers[0])
        sink_share = [[1 - sum(map(sum, head)) / len(head) for head in layer] for layer in layers]
        sliding = [layer for layer, window in enumerate(windows) if window is not None]
        full = [layer for layer, window in enumerate(windows) if window is None]
        shown = sliding[:1] + full[:1]  # the first sliding layer beside the first full one
        fig = plt.figure(figsize=(12, 10.5), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.35, 1])
        map_axes = top.subplots(1, 2)
        peak = max(max(map(max, layers[layer][HEAD])) for layer in shown)
        for ax, kind, of_kind in zip(map_axes, ("sliding-window", "full-attention"), (sliding, full)):
            if not of_kind:
                ax.axis("off")
                ax.text(0.5, 0.5, f"this model has no {kind} layer", ha="center", va="center")
        for ax, layer in zip(map_axes, shown):
            # A square-root scale: most weights are small, and the window's shape is in them.
            image = ax.imshow(layers[layer][HEAD], cmap="Blues", norm=PowerNorm(0.5, 0, peak))
            ax.set_xticks(range(n_tokens), tokens, fontsize=5)
            ax.set_yticks(range(n_tokens), tokens, fontsize=5)
            ax.set(xlabel="key token", ylabel="query token")
            window = windows[layer]
            if window is None:
                ax.set_title(f"layer {layer}, head {HEAD}: full causal attention")
            elif window >= n_tokens:
                ax.set_title(f"layer {layer}, head {HEAD}: sliding window of {window} tokens\\n"
                             f"(no narrower than the {n_tokens} tokens shown)")
            else:
                ax.set_title(f"layer {layer}, head {HEAD}: sliding window of {window} tokens")
                edge = [(query - window + 0.5 + step, query - 0.5 + step)
                        for query in range(window, n_tokens) for step in (0, 1)]
                ax.plot(*zip(*edge), color="C3", lw=1)
        top.colorbar(image, ax=map_axes.tolist(), shrink=0.8,
                     label="attention weight (square-root scale;\\n"
                           "a row sums to 1 minus the sink's share)")
        top.suptitle(f"GPT-oss: attention over {oss_maps['prompt'][:60]!r}")
        share_ax, logit_ax = bottom.subplots(1, 2)
        positions = [layer * (n_heads + 1) + head for layer in range(len(layers))
                     for head in range(n_heads)]
        colours = ["C0" if windows[layer] is not None else "C1"
                   for layer in range(len(layers)) for head in range(n_heads)]
        share_ax.bar(positions, [share for row in sink_share for share in row], color=colours)
        with_sinks = [layer for layer, logits in enumerate(sinks) if logits is not None]
        logit_ax.bar([layer * (n_heads + 1) + head for layer in with_sinks for head in range(n_heads)],
                     [logit for layer in with_sinks for logit in sinks[layer]],
                     color=["C0" if windows[layer] is not None else "C1"
                            for layer in with_sinks for head in range(n_heads)])
        logit_ax.axhline(0, color="black", lw=0.8)
        share_ax.yaxis.set_major_formatter(PercentFormatter(1, decimals=0))
        share_ax.set(ylabel="sink's share of attention (mean over queries)",
                     title="Measured: 1 minus a row's sum")
        logit_ax.set(ylabel="sink logit (on the scale of q·k / √d)",
                     title="Learned: the sink's logit" + ("" if len(with_sinks) == len(layers) else
                                                          " (layers without a sink: no bar)"))
        for ax in (share_ax, logit_ax):
            ax.set_xticks([layer * (n_heads + 1) + (n_heads - 1) / 2 for layer in range(len(layers))],
                          [f"layer {layer}" for layer in range(len(layers))], fontsize=8)
            ax.set_xlabel(f"layer; within a layer, heads 0 to {n_heads - 1} from left to right")
            ax.grid(axis="y", alpha=0.3)
        kinds = [Patch(color="C0", label="sliding-window layer"), Patch(color="C1", label="full layer")]
        bottom.legend(handles=[kind for kind, layers_of_kind in zip(kinds, (sliding, full))
                               if layers_of_kind],
                      loc="outside lower center", ncol=2, frameon=False)
        save(fig, "sliding_window_sinks")
        display(pd.DataFrame([{"layer": layer, "window (tokens)": windows[layer] or "full",
                               "sink share, mean over heads": sum(row) / n_heads,
                               "sink share, largest head": max(row),
                               "sink logit, mean over heads": (sum(sinks[layer]) / n_heads
                                                               if sinks[layer] else None)}
                              for layer, row in enumerate(sink_share)]).set_index("layer"))"""),
    ("markdown", """\
### Linear attention against softmax

The pico Transformer with softmax, linear and gated linear attention, all trained for the same
number of steps, then generating a batch of sequences after prompts of growing length. Softmax
attention reads a KV cache that grows with the context; linear attention keeps one state of
fixed size, so its speed and memory stay flat."""),
    ("code", """\
attention_sweep = load(ARTEFACTS_DIR / "sweep_attention.json", "sweep",
                       remedy="`python pico-llm.py --sweep attention --artefacts_dir "
                              f"{ARTEFACTS_DIR}` makes it")
with drawn_from("sweep_attention.json"):
    points = usable_points(attention_sweep, "test_loss", "tokens_per_s", needed=2)
    softmax = next((p for p in points if p["settings"]["attention_kind"] == "softmax"), None)
    if points and not softmax:
        note("the attention sweep has no softmax point to compare against.")
    if softmax:
        kind_colour = {p["settings"]["attention_kind"]: f"C{index}" for index, p in enumerate(points)}
        # Each kind its own marker, smaller in turn: lines that coincide (two linear states of one
        # size) stay visible one inside the other.
        kind_marker = {p["settings"]["attention_kind"]: (marker, 8 - 1.5 * index)
                       for index, (p, marker) in enumerate(zip(points, "osD^v<>ph*"))}
        display(pd.DataFrame([{"attention": p["settings"]["attention_kind"],
                               "parameters": p["parameters"], "steps": p["steps"],
                               f"train loss ({NATS})": p["train_loss"],
                               f"test loss ({NATS})": p["test_loss"],
                               f"test loss minus softmax's ({NATS})":
                                   p["test_loss"] - softmax["test_loss"],
                               "training tokens/s": round(p["tokens_per_s"])}
                              for p in points]).set_index("attention"))
        fig, axes = plt.subplot_mosaic([["loss", "loss"], ["speed", "state"]], figsize=(12, 8),
                                       height_ratios=[0.3 * len(points) + 0.3, 3],
                                       layout="constrained")
        ax = axes["loss"]
        others = [p for p in points if p is not softmax]
        changes = [p["test_loss"] - softmax["test_loss"] for p in others]
        bars = ax.barh([p["settings"]["attention_kind"] for p in others], changes,
                       color=[kind_colour[p["settings"]["attention_kind"]] for p in others])
        reach = max(1e-4, *map(abs, changes))
        decimals = max(3, 1 - math.floor(math.log10(reach)))  # enough to tell the bars apart
        ax.bar_label(bars, [f"{change:+.{decimals}f} (= {p['test_loss']:.{decimals}f})"
                            for change, p in zip(changes, others)], padding=3, fontsize=9)
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlim(min(changes) - 0.45 * reach if min(changes) < 0 else -0.05 * reach,
                    max(changes) + 0.45 * reach if max(changes) > 0 else 0.05 * reach)
        steps = sorted({p["steps"] for p in points})
        ax.set(xlabel=f"test loss minus softmax's ({NATS}; right of 0 is worse)",
               title=(f"(a) Test loss against softmax's {softmax['test_loss']:.3f} {NATS}, "
                      + (f"all after {steps[0]} steps" if len(steps) == 1 else
                         f"after {', '.join(map(str, steps))} steps")))
        batch = softmax["generation"][0]["batch"]
        for p in points:
            kind, generation = p["settings"]["attention_kind"], p["generation"]
            contexts = [g["context"] for g in generation]
            marker, size = kind_marker[kind]
            for panel, field in (("speed", "tokens_per_s"), ("state", "state_bytes")):
                axes[panel].plot(contexts, [g[field] for g in generation], marker=marker,
                                 ms=max(size, 3), color=kind_colour[kind], label=kind)
        ax = axes["speed"]
        ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
        reference = softmax["generation"][-1]
        ends = sorted(((p["generation"][-1]["tokens_per_s"], p) for p in others
                       if p["generation"][-1]["context"] == reference["context"]),
                      key=lambda end: end[0])
        label_y = []  # in axes fractions, at least 0.05 apart so that no two labels overlap
        for speed, p in ends:
            label_y.append(max(speed / ax.get_ylim()[1], label_y[-1] + 0.05 if label_y else 0))
        for (speed, p), y in zip(ends, label_y):
            ax.annotate(f"{speed / reference['tokens_per_s']:.2f}× softmax",
                        (reference["context"], speed), xytext=(reference["context"] * 1.12, y),
                        textcoords=ax.get_xaxis_transform(), va="center", fontsize=8,
                        color=kind_colour[p["settings"]["attention_kind"]])
        ax.set(ylabel=f"generated tokens per second (batch {batch})",
               title=f"(b) Generation speed after a prompt (ratios at {reference['context']} tokens)")
        ax = axes["state"]
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda value, _: next(f"{value / 2 ** (10 * power):g} {unit}" for power, unit in
                                  ((3, "GiB"), (2, "MiB"), (1, "KiB"), (0, "B"))
                                  if value >= 2 ** (10 * power) or power == 0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set(ylabel=f"bytes the caches hold after generating (batch {batch}; log2 scale)",
               title="(c) Memory of the KV cache or the linear state")
        contexts = [g["context"] for g in softmax["generation"]]
        for ax in (axes["speed"], axes["state"]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [str(c) for c in contexts])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(contexts[0] / 1.3, contexts[-1] * 2.2)
            ax.set_xlabel("prompt length (tokens, log2 scale)")
            ax.grid(alpha=0.3)
        fig.legend(*axes["speed"].get_legend_handles_labels(), loc="outside lower center",
                   ncol=len(points), frameon=False)
        save(fig, "linear_attention")
        for field, unit, title in (("tokens_per_s", 1, "Generated tokens per second"),
                                   ("state_bytes", 1024, "KiB the caches hold after generating")):
            display(Markdown(f"{title} (batch {batch}), by prompt length:"))
            display(pd.DataFrame([{"attention": p["settings"]["attention_kind"],
                                   **{f"{g['context']} tokens": g[field] / unit
                                      for g in p["generation"]}}
                                  for p in points]).set_index("attention").round(1))"""),
    ("markdown", """\
## Overfitting

A small training subset for many epochs. The train loss keeps falling; the test loss stops
and turns up: the gap between them is what the model memorised."""),
    ("code", """\
overfit = load(ARTEFACTS_DIR / "sweep_overfit.json", "sweep")
with drawn_from("sweep_overfit.json"):
    points = usable_points(overfit, "train_loss", "test_loss")
    if points:
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
with drawn_from("sweep_custom_data.json"):
    custom = usable_points(load(ARTEFACTS_DIR / "sweep_custom_data.json", "sweep"),
                           "train_loss", "test_loss")
    if custom:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for index, model in enumerate(sorted({p["model"] for p in custom})):
            points = sorted((p for p in custom if p["model"] == model),
                            key=lambda p: p["train_examples"])
            x = [p["train_examples"] for p in points]
            ax.plot(x, [p["train_loss"] for p in points], "o:", color=f"C{index}",
                    label=f"{model} train")
            ax.plot(x, [p["test_loss"] for p in points], "s-", color=f"C{index}",
                    label=f"{model} test")
        ax.set(xlabel="training examples", ylabel=f"final loss ({NATS})",
               title="Final loss against training-set size")
        ax.legend()
        save(fig, "custom_data")"""),
    ("markdown", """\
## Training budget

The course starter's `--max_steps_per_epoch` at 1, 3 and 6 steps, 60/40 train/test split."""),
    ("code", """\
with drawn_from("sweep_budget.json"):
    budget = usable_points(load(ARTEFACTS_DIR / "sweep_budget.json", "sweep"),
                           "train_loss", "test_loss")
    if budget:
        models = sorted({p["model"] for p in budget})
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for index, model in enumerate(models):
            points = sorted((p for p in budget if p["model"] == model),
                            key=lambda p: p["settings"]["max_steps_per_epoch"])
            x = [p["settings"]["max_steps_per_epoch"] for p in points]
            ax.plot(x, [p["train_loss"] for p in points], "o:", color=f"C{index}",
                    label=f"{model} train")
            ax.plot(x, [p["test_loss"] for p in points], "s-", color=f"C{index}",
                    label=f"{model} test")
        ax.set(xlabel="steps per epoch", ylabel=f"final loss ({NATS})", xticks=[1, 3, 6],
               title=f"Training budget ({points[0]['settings']['epochs']} epochs)")
        ax.legend(fontsize=8)
        save(fig, "budget")"""),
    ("markdown", """\
## Hyperparameters

Three small grids, one heatmap each, all on one colour scale: final test loss in nats per token,
darker is lower (better). The best cell of each grid is written in bold."""),
    ("code", """\
with drawn_from("sweep_hyperparams.json"):
    hyper = usable_points(load(ARTEFACTS_DIR / "sweep_hyperparams.json", "sweep"), "test_loss")
    if hyper:
        grids = {}
        for point in hyper:
            grids.setdefault((point["model"], tuple(point["settings"])), []).append(point)
        losses = [p["test_loss"] for p in hyper]
        colours = ScalarMappable(Normalize(min(losses), max(losses)), "viridis")
        fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids) + 1.2, 3.6), squeeze=False,
                                 layout="constrained")
        for ax, ((model, (row_name, col_name)), points) in zip(axes[0], grids.items()):
            rows = sorted({p["settings"][row_name] for p in points})
            cols = sorted({p["settings"][col_name] for p in points})
            grid = [[float("nan")] * len(cols) for _ in rows]
            for p in points:
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
with drawn_from("sweep_kgram_variants.json"):
    kgram = usable_points(load(ARTEFACTS_DIR / "sweep_kgram_variants.json", "sweep"),
                          "train_loss", "test_loss", "tokens_per_s")
    if kgram:
        display(pd.DataFrame([{"variant": p["settings"]["kgram_variant"], "parameters": p["parameters"],
                               "train loss": p["train_loss"], "test loss": p["test_loss"],
                               "tokens/s": round(p["tokens_per_s"]), "seconds": p["wall_time_s"]}
                              for p in kgram]).set_index("variant"))"""),
    ("markdown", """\
## Ablations: what each Transformer component buys

The pico Transformer (pre-norm RMSNorm, RoPE, SwiGLU) with one component changed at a time,
all at the same step budget. The figure plots each change's test loss minus the baseline's
(nats per token; right of zero is worse). The table gives the losses themselves, also in bits per
byte (total nats over the test text's UTF-8 bytes / ln 2), which compares fairly across
tokenizers."""),
    ("code", """\
ablations = load(ARTEFACTS_DIR / "sweep_ablations.json", "sweep")
with drawn_from("sweep_ablations.json"):
    points = usable_points(ablations, "test_loss", needed=2)
    baseline = next((p for p in points if p["settings"]["ablation"] == "baseline"), None)
    if points and not baseline:
        note("the ablation sweep has no baseline point to compare against.")
    if baseline:
        points = [p for p in points if p is not baseline]
        diverged = [p["settings"]["ablation"] for p in ablations["points"] if p.get("diverged")]
        if diverged:
            display(Markdown("Diverged, so not plotted (the loss exploded during training): "
                             + ", ".join(diverged) + "."))
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
                               "test bits per byte": p.get("test_bits_per_byte"),
                               "tokens/s": (round(p["tokens_per_s"]) if finite(p["tokens_per_s"])
                                            else None)}
                              for p in ablations["points"]]).set_index("change"))"""),
    ("markdown", """\
## The modern recipe: what the nanoGPT speedrun's ideas buy at pico scale

The nanoGPT recipe at the pico shape (LayerNorm, learned positions, a GELU MLP, a tied output
layer, AdamW), each idea of the nanoGPT speedrun added to it alone (QK-norm, a ReLU² MLP, logit
soft-capping, zero-initialised output projections, value embeddings, U-net skips, the Muon
optimizer), the pico preset (RMSNorm, RoPE, SwiGLU), and the `speedrun` preset (the pico preset
with QK-norm, the block that helped on top of it with Muon) trained with Muon. Every recipe trains for about the same number of seconds on running text (its steps
set from its speed measured beforehand, so a slower step buys fewer steps; on a shared machine
the speed drifts, so the table also compares every recipe after the shortest run's time) and is
evaluated on the held-out text at least 8 times (after every pass, or more often where a pass
does not fit the time). The text is Python's documentation (written offline from the installed
Python), about 2 MB: the shipped corpus would be read tens of times over. The figure plots
held-out bits per byte against training seconds (evaluations excluded); the table gives the time and steps each needed to
reach the nanoGPT recipe's final loss. One seed each, on a shared CPU: differences of a few
percent are within the noise."""),
    ("code", """\
def time_to_reach(curve, target):
    \"\"\"(training seconds, steps) at which a curve's held-out bits per byte first reach `target`,
    interpolated linearly between evaluations; (None, None) if it never does.\"\"\"
    previous = None
    for c in curve:
        if c["test_bits_per_byte"] <= target:
            if previous is None:
                return c["train_time_s"], c["step"]
            f = ((previous["test_bits_per_byte"] - target)
                 / (previous["test_bits_per_byte"] - c["test_bits_per_byte"]))
            return (previous["train_time_s"] + f * (c["train_time_s"] - previous["train_time_s"]),
                    previous["step"] + f * (c["step"] - previous["step"]))
        previous = c
    return None, None


NOISE = 0.05   # bits per byte: the seed alone moved a held-out loss by up to 0.03 nats per
               # character, 0.043 bits per byte (docs/performance.md)


def loss_at(curve, seconds):
    \"\"\"A curve's held-out bits per byte after `seconds` of training, interpolated linearly
    between evaluations.\"\"\"
    previous = curve[0]
    for c in curve:
        if c["train_time_s"] >= seconds:
            f = (seconds - previous["train_time_s"]) / max(c["train_time_s"] - previous["train_time_s"], 1e-9)
            return previous["test_bits_per_byte"] + f * (c["test_bits_per_byte"] - previous["test_bits_per_byte"])
        previous = c
    return curve[-1]["test_bits_per_byte"]


recipe = load(ARTEFACTS_DIR / "sweep_recipe.json", "sweep", remedy=f"run `{MAKE_RECIPE}` to make it")
with drawn_from("sweep_recipe.json"):
    recipes = {p["settings"]["recipe"]: p
               for p in usable_points(recipe, "test_bits_per_byte", "train_time_s")}
    reference = recipes.get("nanoGPT recipe")
    if recipes and not reference:
        note("the recipe sweep has no nanoGPT recipe point to compare against.")
    if reference:
        target = reference["test_bits_per_byte"]
        reference_time, _ = time_to_reach(reference["curve"], target)
        fig, ax = plt.subplots(figsize=(9.5, 5))
        for label, p in recipes.items():
            style = (dict(color="black", lw=2.5) if p is reference else
                     dict(color="black", ls="--", lw=2.5) if label.startswith("speedrun") else
                     dict(lw=1.2))
            ax.plot([c["train_time_s"] for c in p["curve"]],
                    [c["test_bits_per_byte"] for c in p["curve"]], label=label, **style)
        ax.axhline(target, color="grey", ls=":", label="the nanoGPT recipe's final loss")
        lowest = min(c["test_bits_per_byte"] for p in recipes.values() for c in p["curve"])
        ax.set_ylim(lowest - 0.1, target + 1.5)
        ax.set(xlabel="training seconds (evaluations excluded)", ylabel="held-out bits per byte",
               title=f"Held-out loss against training time, "
                     f"{recipe['points'][0]['settings']['train_seconds']:.0f} s per recipe")
        ax.legend(fontsize=8, ncol=2)
        save(fig, "recipe")
        # The budgets are equal only as far as each recipe's measured speed held on a shared
        # machine: every recipe is also compared at the time the shortest run trained for.
        common = min(p["train_time_s"] for p in recipes.values())
        reference_at_common = loss_at(reference["curve"], common)
        rows, helped, unclear, hurt, rose = [], [], [], [], []
        for label, p in recipes.items():
            seconds, steps = time_to_reach(p["curve"], target)
            share = seconds / reference_time if seconds is not None and reference_time else None
            best = min(c["test_bits_per_byte"] for c in p["curve"])
            rows.append({"recipe": label, "steps": p["steps"], "training seconds": p["train_time_s"],
                         "final bits per byte": p["test_bits_per_byte"], "best bits per byte": best,
                         f"bits per byte at {common:.1f} s": loss_at(p["curve"], common),
                         "seconds to the nanoGPT recipe's final loss": seconds,
                         "share of its time": f"{share:.0%}" if share is not None else "not reached",
                         "steps to it": round(steps) if steps is not None else None})
            if label.startswith("+ "):   # a few hundredths either way is within one seed's spread
                change = loss_at(p["curve"], common) - reference_at_common
                (helped if change < -NOISE else hurt if change > NOISE else unclear).append(label[2:])
            if p["test_bits_per_byte"] > best + 0.02:
                rose.append(label)
        display(pd.DataFrame(rows).set_index("recipe"))
        preset = recipes.get("speedrun preset + Muon")
        preset_time, _ = time_to_reach(preset["curve"], target) if preset else (None, None)
        display(Markdown(
            f"**Helped** at pico scale (a held-out loss over {NOISE} bits per byte lower than the "
            f"nanoGPT recipe's after the same {common:.1f} s of training): "
            + (", ".join(helped) or "none") + ". **No clear difference** (within "
            f"{NOISE}): " + (", ".join(unclear) or "none")
            + ". **Hurt**: " + (", ".join(hurt) or "none") + ". "
            + ("The `speedrun` preset with Muon reached that loss in "
               f"{preset_time:.1f} s, {preset_time / reference_time:.0%} of the nanoGPT "
               f"recipe's {reference_time:.1f} s, and ended at "
               f"{preset['test_bits_per_byte']:.3f} bits per byte against {target:.3f}. "
               if preset_time is not None else
               "The `speedrun` preset did not reach that loss in its time. ")
            + ("Held-out loss rising again before the end (final above best by over 0.02 bits per "
               "byte: the recipe learns fast enough to overfit the small training text): "
               + ", ".join(rose) + "." if rose else "")))"""),
    ("markdown", """\
## Learning rate and batch size

Left: the Transformer's test loss against a constant learning rate, without gradient clipping.
Runs whose loss exploded were stopped early and are marked with a cross at the top. Right: batch
sizes from 1 upward, all seeing about the same number of training examples (the steps rounded
to whole passes over the training text)."""),
    ("code", """\
rates = load(ARTEFACTS_DIR / "sweep_learning_rate.json", "sweep")
ok = usable_points(rates, "train_loss", "test_loss")
batches = usable_points(load(ARTEFACTS_DIR / "sweep_batch_size.json", "sweep"),
                        "train_loss", "test_loss", "tokens_per_s")
with drawn_from("sweep_learning_rate.json", "sweep_batch_size.json"):
    if ok or batches:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
        if ok:
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
            points = sorted(batches, key=lambda p: p["settings"]["batch_size"])
            ax = axes[1]
            x = [p["settings"]["batch_size"] for p in points]
            ax.plot(x, [p["test_loss"] for p in points], "o-", label="test loss")
            ax.plot(x, [p["train_loss"] for p in points], "o:", label="train loss")
            twin = ax.twinx()
            twin.plot(x, [p["tokens_per_s"] for p in points], "s--", color="C3",
                      label="tokens/s (right axis)")
            twin.set_ylabel("training tokens per second", color="C3")
            ax.set(xscale="log", xlabel="batch size", ylabel=f"final loss ({NATS})",
                   title=f"Batch size at about {points[0]['settings']['examples']} training examples")
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
with drawn_from("sweep_sampling.json"):
    points = usable_points(load(ARTEFACTS_DIR / "sweep_sampling.json", "sweep"))
    names = {"distinct_1": "distinct-1", "distinct_2": "distinct-2",
             "repeated_3gram_fraction": "repeated 3-grams"}
    drawn = [m for m in names if any(p["diversity"][m] for p in points)]
    if points and not drawn:
        note("every diversity measure is 0 for every sampling rule (the samples hold no words).")
    if drawn:
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
    note(f"no attention_*.json in `{ARTEFACTS_DIR}`; `--sweep presentation` writes them (a run's "
         "own, from `--attention_maps`, are shown under *Your run*).")
for path in attention_files:
    maps = load(path, "attention")
    with drawn_from(path):
        if maps:
            plot_attention(maps, f"attention_{maps['model']}")"""),
    ("markdown", """\
## What the embeddings group together

k-means over the token embeddings of the sampled Transformer, and a greedy sample where
each token carries its cluster (and, once generated, its nearest neighbours)."""),
    ("code", """\
clusters = load(ARTEFACTS_DIR / "monosemantic_transformer.json", "monosemantic")
with drawn_from("monosemantic_transformer.json"):
    if clusters:
        show_clusters(clusters)"""),
    ("markdown", """\
## Your run

The run log named by `RUN_LOG` in the parameter cell: its loss curves (saved beside the run log
as `<run>_loss_curves.png`), each model's final figures, and the samples it generated. A run
that was cut short is plotted up to its last step; NaN losses are left out, with a note. The
attention maps and embedding clusters of a run with `--attention_maps` or
`--monosemantic_enabled` follow, from the files its log names."""),
    ("code", """\
if RUN_LOG is None:
    display(Markdown("*`RUN_LOG` is None: set it in the parameter cell to plot your own run.*"))
else:
    own_path = Path(RUN_LOG)
    own = load(own_path, "run",
               remedy="check the path; `python pico-llm.py` says where its run log went")
    with drawn_from(own_path):
        if own:
            data, environment = own["data"], own["environment"]
            display(Markdown(f"**{own['run_name']}** ({own.get('status', 'no status')}), created "
                             f"{own['created']}: {data['tokenizer']} tokenizer, vocabulary "
                             f"{data['vocab_size']}, {environment['device']}, "
                             f"{environment['threads']} threads"))
        if own and not own["models"]:
            note(f"`{own_path}` has no model in it: the run stopped before building one.")
        elif own:
            save(plot_run_losses(own, f"Run {own['run_name']}: train and test loss"),
                 f"{own_path.stem}_loss_curves", own_path.parent)
            display(run_summary(own))
            display(pd.DataFrame([{"model": name, "step": s["step"], "rule": s["rule"],
                                   "text": s["text"]}
                                  for name, record in own["models"].items()
                                  for s in record["samples"]]))
            for name, record in own["models"].items():
                for field, kind in (("attention_maps", "attention"), ("monosemantic", "monosemantic")):
                    if not record.get(field):
                        continue
                    path = own_path.parent / record[field]
                    beside = load(path, kind, remedy="it is written beside the run log")
                    with drawn_from(path):
                        if beside and kind == "attention":
                            plot_attention(beside, f"{own_path.stem}_attention_{name}",
                                           own_path.parent)
                        elif beside:
                            display(Markdown(f"**{name}**: embedding clusters"))
                            show_clusters(beside)"""),
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
    # What this tool wrote, so that it can tell its own notebook from one edited since.
    notebook.metadata["pico_llm"] = {"generated_cells_sha256": cells_digest(notebook)}
    return notebook


def cells_digest(notebook: nbformat.NotebookNode) -> str:
    """The cells' kinds and sources, what an edit changes (a run's outputs are looked at
    apart, by work_lost_by_writing)."""
    cells = [[cell.cell_type, cell.source] for cell in notebook.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


MOVE_OR_FORCE = "move it away, or pass --force to replace it"


def work_lost_by_writing(path: Path, new: nbformat.NotebookNode, force: bool) -> str | None:
    """Why writing `new` over `path` would lose someone's work, and what to do instead, or
    None. Work is cells that are neither those this tool last wrote into it nor `new`'s, and
    the outputs of a run (its figures and tables), which `new` is written without; with
    `force` those go. A file that is no notebook (a run log, a corpus) is never replaced."""
    try:
        existing = nbformat.read(path, as_version=4)
    except Exception as error:  # OSError, invalid JSON, not a notebook: nbformat raises several
        return (f"is not a notebook this tool can read ({str(error).splitlines()[0][:100]}); "
                "choose another --output, or move it away")
    if force:
        return None
    ours = existing.metadata.get("pico_llm")          # an object where this tool wrote the file
    recorded = ours.get("generated_cells_sha256") if isinstance(ours, dict) else None
    if cells_digest(existing) not in (recorded, cells_digest(new)):
        return f"has cells edited since this tool wrote it; {MOVE_OR_FORCE}"
    if any(cell.cell_type == "code"
           and (cell.get("outputs") or cell.get("execution_count") is not None)
           for cell in existing.cells):
        return ("holds the outputs of a run, which this tool would drop; clear them with "
                f"`jupyter nbconvert --clear-output --inplace {shlex.quote(str(path))}`, "
                + MOVE_OR_FORCE)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/make_notebook.py", description=tool_description(__doc__))
    parser.add_argument("--output", type=path_text, default=str(REPO / "pico_llm.ipynb"),
                        help="where the notebook goes (default: the committed pico_llm.ipynb)")
    parser.add_argument("--force", action="store_true",
                        help="replace the notebook even where its cells were edited or it "
                             "holds the outputs of a run")
    args = parser.parse_args(argv)
    path, notebook = Path(args.output), build()
    if path.exists() and not path.is_file():     # a directory; a FIFO would block the read
        problem = "is not a regular file; move it away, or choose another --output"
    else:
        problem = work_lost_by_writing(path, notebook, args.force) if path.exists() else None
    if problem:
        print(f"make_notebook: error: {path} {problem}", file=sys.stderr)
        return 2
    text = nbformat.writes(notebook)
    try:
        write_text_atomically(path, text if text.endswith("\n") else text + "\n")
    except OSError as error:
        print(f"make_notebook: error: cannot write {path} ({error.strerror}); choose another "
              "--output", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "make_notebook"))
