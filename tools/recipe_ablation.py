#!/usr/bin/env python3
"""What the `speedrun` preset keeps: the pico preset trained with Muon, alone and with the
nanoGPT speedrun's blocks that helped somewhere in `--sweep recipe`, at the sweep's shape and
on its data, for the same number of steps; held-out bits per byte at four points of each run.

    OMP_NUM_THREADS=1 python tools/recipe_ablation.py --input_dir /tmp/pico-python-docs

(`write_python_docs` in tools/stream_vs_lines.py writes that text; docs/performance.md has the
figures.) A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import sys

import torch

from pico_module import (OneLineErrorParser, load_pico, positive_int, run_tool,
                         too_many_passes, tool_description)

VARIANTS = {
    "pico + Muon": {"optimizer": "muon"},
    "pico + QK-norm + Muon (the speedrun preset)": {"transformer_variant": "speedrun",
                                                    "optimizer": "muon"},
    "pico + ReLU² + value embeddings + Muon": {"ffn": "relu2", "value_embeddings": True,
                                               "optimizer": "muon"},
    "pico + QK-norm + ReLU² + value embeddings + Muon": {"transformer_variant": "speedrun",
                                                         "ffn": "relu2", "value_embeddings": True,
                                                         "optimizer": "muon"},
}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="tools/recipe_ablation.py", description=tool_description(__doc__))
    parser.add_argument("--input_dir", required=True, help="running text, as --sweep recipe takes it")
    parser.add_argument("--steps", type=positive_int, default=600)
    parser.add_argument("--sweep_scale", default="full", choices=("full", "tiny"))
    args = parser.parse_args(argv)
    pico = load_pico()
    device = torch.device("cpu")
    scale = pico.SWEEP_SCALES[args.sweep_scale]
    try:
        # --input_dir=VALUE, one word: a folder named -docs is a value, not a flag
        config = pico.config_from_command_line([f"--input_dir={args.input_dir}", "--device_id", "cpu"])
        base = pico.with_flags(pico.sweep_base_config(config, scale),
                               test_fraction=scale.test_fraction, data_format="stream")
        tokenizer = pico.build_tokenizer(scale.tokenizer)
        data = pico.sweep_data(base, tokenizer, held_out=False)   # said below, as --input_dir
        if not data.has_test_set:   # the comparison is of held-out bits per byte
            raise pico.UserError(f"--input_dir {args.input_dir} is too little text to hold some "
                                 "out for testing; give more text")
        if args.steps > pico.MAX_EPOCHS * data.steps_per_epoch(base.training.batch_size, None):
            raise too_many_passes(pico, args.steps, f"text in --input_dir {args.input_dir}")
    except pico.UserError as error:
        print(f"recipe_ablation: error: {error}", file=sys.stderr)
        return 2
    for label, overrides in VARIANTS.items():
        run = pico.with_step_budget(pico.with_flags(base, **overrides), data, args.steps, 4)
        _, record = pico.train_sweep_model(label, "transformer", run, device, tokenizer, data)
        curve = ", ".join(f"{h['test_bits_per_byte']:.3f} after {h['step']}"
                          for h in record["test_history"])
        print(f"{label}: {record['final']['train_time_s']:.1f} s of training; held-out bits per "
              f"byte {curve}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main, "recipe_ablation"))
