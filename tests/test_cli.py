"""Section 12 (main): the command line as a user meets it: the course's commands and bad input."""

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT, TINY_RUN, run_script

HUGE = "9" * 400   # an integer past a float's range (about 1.8e308)
BAD_INPUTS = [
    (["--input_files", "does_not_exist.txt"], "not found"),
    (["--prompt", "-x"], "argument --prompt: expected one argument (give it one; a value that "
                         "begins with '-' is written --prompt=VALUE)"),
    (["--input_files", "{empty}"], "empty"),
    (["--input_files", "{latin1}"], "not valid UTF-8"),
    (["--input_files", "{binary}"], "binary"),
    (["--input_files", "{utf16}"], "is UTF-16 (it starts with a byte-order mark); save it as UTF-8"),
    (["--input_files", "{utf32}"], "is UTF-32 (it starts with a byte-order mark); save it as UTF-8"),
    (["--input_files", "{utf16be}"], "is UTF-16 (it starts with a byte-order mark); save it as UTF-8"),
    (["--input_files", "{utf32be}"], "is UTF-32 (it starts with a byte-order mark); save it as UTF-8"),
    (["--tinystories_weight", "1", "--tinystories_path", "{numbers_json}"],
     "TinyStories record 1 has no 'text' string (read as int)"),
    (["--input_files", "{folder}"], "is a directory"),
    (["--input_files", "{loop}"], "is a symbolic link to nothing readable"),
    (["--input_dir", "{no_txt_folder}"], "no .txt"),
    (["--input_dir", "missing_dir"], "not a directory"),
    (["--block_size", "3", "--kgram_k", "3"], "--block_size (3) must be larger than --kgram_k"),
    (["--models", "gru"], "unknown model 'gru'"),
    (["--kgram_variant", "trigram"], "unknown --kgram_variant"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--beta2", "nan"], "--beta2 must be in [0, 1)"),
    (["--input_files", "3seqs.txt", "--random_offsets"], "lines mode has none"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--learning_rate", "1e308"], "--learning_rate 1e+308 is too large: warming it up over "
                                   "--warmup_steps 10 overflows a float"),
    (["--device_id", "tpu"], "--device_id"),
    (["--cpu_matmul", "blas"], "invalid choice: 'blas'"),
    (["--tinystories_weight", "1.5"], "--tinystories_weight"),
    (["--batch_size", "many"], "invalid int value"),
    (["--run_name", "../escape"], "plain file name"),
    (["--prompt", "word " * 80, "--block_size", "16"], "longer than --block_size"),
    (["--prompt", ""], "--prompt is empty"),
    (["--max_new_tokens", "10000000"], "--max_new_tokens 10000000 is too large"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be positive"),
    (["--checkpoint_every", "-1", "--save_dir", "ckpt"], "--checkpoint_every must not be negative"),
    (["--skip_nonfinite", "-2"], "--skip_nonfinite must not be negative"),
    (["--plateau_factor", "1.5"], "--plateau_factor must be in (0, 1)"),
    (["--lr_min", "nan"], "--lr_min must be a finite number"),
    (["--lr_min", "1.0"], "--lr_min (1.0) must not exceed --learning_rate"),
    (["--early_stop_min_delta", "-1"], "--early_stop_min_delta must be a finite number >= 0"),
    (["--early_stop_patience", "2", "--test_fraction", "0"], "set --test_fraction above 0"),
    (["--keep_checkpoints", "-3"], "--keep_checkpoints must be at least 1"),
    (["--overwrite"], "--overwrite replaces sweep files"),
    (["--sweep_scale", "tiny", *TINY_RUN], "--sweep_scale tiny sizes sweeps, and this run is none"),
    (["--models", "transformer", "--n_kv_heads", "0"], "--n_kv_heads must be positive"),
    (["--models", "transformer", "--logit_softcap", "nan"], "--logit_softcap must be a number"),
    (["--models", "transformer", "--logit_softcap", "inf"], "--logit_softcap must be a finite number"),
    (["--models", "transformer", "--logit_softcap", "1e300"],
     "--logit_softcap 1e+300 (preset pico) is past float32's largest number, where the cap would "
     "be infinite; use 0 (off)"),
    (["--models", "transformer", "--logit_softcap", "1e39"],     # past float32's, not float64's
     "--logit_softcap 1e+39 (preset pico) is past float32's largest number"),
    (["--models", "transformer", "--pos_emb", "learned", "--yarn_factor", "4"],
     "--yarn_factor stretches rotary embeddings"),
    (["--models", "transformer", "--experts_per_token", "-1"], "--experts_per_token must be at least 1"),
    (["--dist_timeout", "nan"], "--dist_timeout must be positive"),
    (["--dist_timeout", "1e300"], "--dist_timeout is at most"),
    (["--num_inner_mlp_layers", "1000000"], "--num_inner_mlp_layers is at most 1000"),
    (["--models", "lstm_seq", "--lstm_layers", "100000"], "--lstm_layers is at most 1000"),
    (["--models", "transformer", "--n_blocks", "5000"], "--n_blocks is at most 1000"),
    # a Transformer's flags are checked without one too, as the k-gram's are without a k-gram
    (["--models", "lstm_seq", "--n_blocks", "5000"], "--n_blocks is at most 1000"),
    (["--models", "lstm_seq", "--d_model", "-5"], "--d_model must be positive"),
    (["--models", "kgram_mlp_seq", "--transformer_variant", "nope"], "unknown --transformer_variant"),
    (["--models", "transformer_gptoss", "--transformer_variant", "nope"],
     "unknown --transformer_variant"),
    (["--epochs", "10001"], "--epochs is at most 10000, got 10001"),
    (["--epochs", "1" + "0" * 30], "--epochs is at most 10000"),
    (["--models", "kgram_mlp_seq", "--kgram_k", "1025", "--block_size", "2048"],
     "--kgram_k is at most 1024, got 1025"),
    (["--run_name", "\u202e"], "must be a plain file name"),
    *[([f"--{flag}", "-1"], f"--{flag} must not be negative") for flag in (
        "weight_decay", "grad_clip", "temperature", "warmup_steps", "sample_interval",
        "kgram_chunk_size", "num_inner_mlp_layers", "top_k")],
    (["--monosemantic_clusters", "0"], "--monosemantic_clusters must be positive"),
    (["--test_fraction", "1"], "--test_fraction must be in [0, 1)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--models", ","], "--models is empty; choose from"),
    (["--sweep", "custom_data", "--sweep_scale", "tiny", "--custom_sweep_sizes", "0"],
     "--custom_sweep_sizes '0': expected positive integers"),
    (["--tie_weights", "maybe"], "argument --tie_weights: expected true or false, got 'maybe'"),
    (["--device_id", "meta"], "unsupported --device_id 'meta'"),
    (["--tinystories_weight", "0.5", "--tinystories_path", "/no/such"], "does not exist"),
    (["--tinystories_weight", "0.5", "--tinystories_path", "{csv}"],
     "expected .json, .jsonl, .parquet or .txt"),
    # bytes a non-UTF-8 terminal could not decode (surrogate escapes, as Python reads them):
    # the name had been called a control character; UTF-8 that an ASCII terminal could not
    # read had been called invalid
    (["--run_name", "r\udcc3\udcbc"], "--run_name is UTF-8 that the terminal's encoding ("),
    (["--run_name", "caf\udce9"], "--run_name is not valid UTF-8; check the terminal's encoding"),
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8; check the terminal's encoding"),
    (["--custom_sweep_log", "c.json", "--custom_sweep_sizes", "3,,5"], "expected positive integers"),
    (["--custom_sweep_log", "c.json", "--custom_sweep_sizes", "3_0"], "expected positive integers"),
    (["--custom_sweep_log", "c.json", "--custom_sweep_sizes", "\u0663"], "expected positive integers"),
    (["--input_files"], "--input_files names no file"),
    (["--input_files", "3seqs.txt", ""], "--input_files names an empty path; give a file"),
    (["--input_files", "3seqs.txt", "./3seqs.txt"], "--input_files names 3seqs.txt twice"),
    (["--run_name", ""], "must be a plain file name"),
    # names of files that others write at their end: two runs at once would replace each other's
    (["--run_name", "sweep_ablations"], "is the name of a sweep's file"),
    (["--run_name", "r.attention_transformer"], "is the name of another run's attention maps"),
    (["--run_name", "monosemantic_transformer"], "is the name of a sweep's attention maps"),
    (["--run_name", "a\nb"], "must be a plain file name"),
    (["--run_name", "baseline.json"], "--run_name baseline writes baseline.json"),
    (["--sweep", "budget", "--accounting"], "--accounting and --sweep are two commands"),
    (["--generate", "--checkpoint", "x.pt", "--sweep", "budget"], "--generate and --sweep are two commands"),
    (["--sweep", "budget", "--save_dir", "ckpt"], "--sweep keeps no checkpoints of its own"),
    (["--accounting", "--resume", "ckpt"], "--accounting keeps no checkpoints of its own"),
    (["--sweep", "budget", "--resume"], "--sweep keeps no checkpoints of its own; drop --resume"),
    (["--sweep", "budget", "--checkpoint_every", "5"],
     "--sweep keeps no checkpoints of its own; drop --checkpoint_every"),
    (["--accounting", "--save_dir", "ckpt", "--checkpoint_every", "5"],
     "--accounting keeps no checkpoints of its own; drop --save_dir and --checkpoint_every"),
    (["--sweep", "budget", "--run_name", "mine"], "--run_name names a training run's log, and --sweep"),
    (["--accounting", "--run_name", "mine"], "and --accounting writes none; drop --run_name"),
    (["--generate", "--checkpoint", "x.pt", "--attention_maps"], "--generate trains none"),
    (["--models", "lstm_seq", "--attention_maps"], "add transformer to --models"),
    (["--tinystories_path", "stories.txt"], "--tinystories_path is read only with --tinystories_weight"),
    (["--models", "transformer", "--attention", "gated_linear", "--attention_maps"],
     "--attention gated_linear has none to draw"),
    (["--sweep", "budget", "--export_hf", "out"], "--sweep gives none to write"),
    *[(["--sweep", sweep, flag, value], f"--sweep {sweep} sets {flag} itself at each point")
      for sweep, flag, value in [("learning_rate", "--learning_rate", "0.1"),
                                 ("attention", "--attention", "linear"),
                                 ("kgram_variants", "--kgram_variant", "onehot"),
                                 ("sampling", "--temperature", "0.5"), ("sampling", "--top_k", "5"),
                                 ("overfit", "--lr_schedule", "cosine")]],
    (["--models", "transformer", *TINY_RUN, "--save_dir", "{folder}/ckpt", "--export_hf", "{folder}/ckpt"],
     "would hold the files this run writes for --save_dir; give the export a directory of its own"),
    # said before the run makes --save_dir or --artefacts_dir inside the export, not as "not empty"
    (["--models", "transformer", *TINY_RUN, "--save_dir", "{folder}/hf/ckpt", "--export_hf", "{folder}/hf"],
     "would hold the files this run writes for --save_dir; give the export a directory of its own"),
    (["--accounting", "--generate", "--checkpoint", "x.pt"], "--accounting and --generate are two commands"),
    (["--accounting", "--models", "lstm_seq"],                       # had been ignored silently
     "--accounting reports Transformers (--accounting configured), not --models lstm_seq; drop --models"),
    (["--custom_sweep_sizes", "3,5"], "--custom_sweep_sizes sets the corpus sizes"),
    (["--custom_sweep_log", "c.json", "--custom_sweep_sizes", ""], "expected positive integers"),
    (["--models", "transformer", "--n_experts", "100000"], "--n_experts is at most 1024"),
    (["--models", "transformer", "--experts_per_token", "3"],
     "--experts_per_token would be ignored: there are no experts; add --n_experts N"),
    (["--models", "transformer", "--router_aux_loss_coef", "0.5"], "--router_aux_loss_coef would be ignored"),
    (["--models", "transformer", "--pos_emb", "learned", "--rope_theta", "500"],
     "--rope_theta would be ignored: --pos_emb learned is not RoPE"),
    (["--models", "transformer", "--yarn_original_context", "8"],
     "--yarn_original_context would be ignored: YaRN is off"),
    (["--models", "transformer", "--attention", "gated_linear", "--yarn_factor", "2"],
     "--yarn_factor would be ignored: --attention gated_linear uses no RoPE"),
    (["--models", "transformer", "--n_blocks", "1", "--unet_skips", "true"],
     "--unet_skips would be ignored: one block has no halves to join"),
    (["--models", "transformer", "--attention", "linear", "--attention_impl", "math"],
     "--attention_impl would be ignored: --attention linear has no softmax kernel to choose"),
    (["--models", "transformer", "--block_size", "32", "--sliding_window", "32"],
     "--sliding_window would be ignored: a window of 32 tokens already sees all of --block_size "
     "32; give a window below 32, or drop --sliding_window"),
    (["--models", "transformer_gptoss", "--block_size", "16", "--sliding_window", "100"],
     "--sliding_window would be ignored: a window of 100 tokens already sees all"),
    (["--lr_schedule", "constant", "--min_lr_ratio", "0.5"],
     "--min_lr_ratio would be ignored: --lr_schedule constant keeps the learning rate"),
    (["--lr_min", "0.001"], "--lr_min would be ignored: reduce-on-plateau is off"),
    (["--accounting", ""], "--accounting is empty; give configured"),
    (["--models", "transformer", "--logit_softcap", "1e-300"],
     "squashes every logit into less than one nat; use 0 (off) or a cap of at least 1"),
    (["--tinystories_max_stories", "5"], "--tinystories_max_stories is read only with "
                                         "--tinystories_weight above 0"),
    (["--accounting", "GPT-oss", "--n_heads", "6"], "--n_heads 6 must divide --d_model 512 (preset GPT-oss)"),
    (["--plateau_factor", "0.3"], "--plateau_factor would be ignored: reduce-on-plateau is off"),
    # typed at its default value, the flag is still the user's and still unread
    (["--lr_schedule", "constant", "--min_lr_ratio", "0.1"],
     "--min_lr_ratio would be ignored: --lr_schedule constant keeps the learning rate"),
    (["--plateau_factor=0.5"], "--plateau_factor would be ignored: reduce-on-plateau is off"),
    (["--temperature", "0", "--top_k", "5"], "--top_k cannot change; drop one"),
    (["--temperature", "0", "--top_p", "0.5"], "--top_p cannot change; drop one"),
    # options that the model built would not read: recorded in the run log, never used
    (["--models", "transformer", "--attention", "linear", "--pos_emb", "rope"],
     "--pos_emb would be ignored: --attention linear uses no RoPE"),
    (["--models", "transformer", "--norm", "none", "--norm_position", "post"],
     "--norm_position would be ignored: --norm none has no norm to place"),
    (["--weight_decay", "1e10"], "--weight_decay 1e+10 times --learning_rate 0.003 is at least 1"),
    (["--weight_decay", "334"],         # times --learning_rate 0.003: 1.002 (333 gives 0.999)
     "each step's decay would zero or flip every weight matrix; give a weight decay below 333"),
    # typed at their defaults: they had been taken as not given
    (["--temperature", "0", "--top_p", "0.95"], "--top_p cannot change; drop one"),
    (["--tinystories_max_stories", "20000"], "--tinystories_max_stories is read only with "
                                             "--tinystories_weight above 0"),
    *[([flag, "", *TINY_RUN], f"{flag} is empty; give a path") for flag in (
        "--input_dir", "--tinystories_path", "--save_dir", "--checkpoint", "--custom_sweep_log")],
    # integers past a float's range had reached the size checks' float arithmetic (OverflowError)
    *[([*TINY_RUN, *flags, HUGE], f"{flags[-1]} is a 400-digit number, beyond any size")
      for flags in (["--models", "lstm_seq", "--embed_size"], ["--models", "transformer", "--d_ff"],
                    ["--models", "transformer", "--n_heads", "1", "--d_model"], ["--warmup_steps"],
                    ["--accounting", "--batch_size"],
                    ["--models", "transformer", "--yarn_factor", "2", "--yarn_original_context"])],
    ([*TINY_RUN, "--n_blocks", "-" + HUGE], "--n_blocks is a 400-digit negative number, beyond any "
     "size or count pico-llm can hold (at most 18,446,744,073,709,551,616); give a larger one"),
    (["--tokenizer", "bpe:" + HUGE], "--tokenizer bpe:N takes N up to 4,294,967,296 (the token "
                                     "cache holds ids as 32-bit numbers), got a 400-digit number"),
    (["--tokenizer", "bpe:" + "9" * 5000], "got a 5000-digit number"),    # past int()'s 4,300
    (["--tokenizer", "bpe:4294967297"], "got 4,294,967,297"),
    # said first: adding the --checkpoint that --generate needs would not help
    (["--accounting", "--generate"], "--accounting and --generate are two commands"),
]


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "utf16.txt").write_text("hello world\n", encoding="utf-16")
    (tmp_path / "utf32.txt").write_text("hello world\n", encoding="utf-32")   # also starts ff fe
    (tmp_path / "utf16be.txt").write_bytes(b"\xfe\xff" + "hello world\n".encode("utf-16-be"))
    (tmp_path / "utf32be.txt").write_bytes(b"\x00\x00\xfe\xff" + "hello world\n".encode("utf-32-be"))
    (tmp_path / "numbers.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "stories.csv").write_text("text\nOnce\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "no_txt_folder").mkdir()
    (tmp_path / "no_txt_folder" / "a.md").write_text("x")
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    return {name: str(tmp_path / file) for name, file in [
        ("empty", "empty.txt"), ("latin1", "latin1.txt"), ("binary", "binary.txt"),
        ("folder", "folder"), ("no_txt_folder", "no_txt_folder"), ("loop", "loop.txt"),
        ("utf16", "utf16.txt"), ("utf32", "utf32.txt"), ("utf16be", "utf16be.txt"),
        ("utf32be", "utf32be.txt"), ("numbers_json", "numbers.jsonl"),
        ("csv", "stories.csv")]}


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_status_2_and_touches_nothing(run_main, tmp_path, bad_files,
                                                               argv, message):
    artefacts = tmp_path / "artefacts"
    artefacts.mkdir()
    (artefacts / "earlier_run.json").write_text('{"keep": true}')
    argv = [a.format(**bad_files) for a in argv]
    status, out, err = run_main(*argv, artefacts=artefacts)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pico-llm: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in artefacts.iterdir()) == ["earlier_run.json"]
    assert (artefacts / "earlier_run.json").read_text() == '{"keep": true}'


EDGES = [  # a command each check accepts and the nearest it refuses: a range's last value and the next
    (["--min_lr_ratio", "1.0"], ["--min_lr_ratio", "1.01"], "a fraction of --learning_rate"),
    (["--epochs", "10000"], ["--epochs", "10001"], "--epochs is at most 10000"),
    (["--kgram_k", "1024", "--block_size", "2048"], ["--kgram_k", "1025", "--block_size", "2048"],
     "--kgram_k is at most 1024"),
    (["--max_new_tokens", "100000"], ["--max_new_tokens", "100001"], "use at most 100000"),
    (["--top_p", "1.0"], ["--top_p", "1.01"], r"--top_p must be in \(0, 1\]"),
    (["--seed", str(2**32 - 1)], ["--seed", str(2**32)], r"--seed must be between 0 and 2\*\*32 - 1"),
    (["--dist_timeout", "604800"], ["--dist_timeout", "604801"], "--dist_timeout is at most"),
    (["--dist_timeout", "1"], ["--dist_timeout", "0.999"], "--dist_timeout is at least 1 second"),
    (["--log_interval", "1"], ["--log_interval", "0"], "--log_interval must be positive"),
    (["--grad_accum_steps", "1"], ["--grad_accum_steps", "0"], "--grad_accum_steps must be positive"),
    (["--test_fraction", "0"], ["--test_fraction", "-0.1"], r"--test_fraction must be in \[0, 1\)"),
    (["--plateau_patience", "2", "--lr_min", "0.003"], ["--plateau_patience", "2", "--lr_min", "0.0031"],
     "must not exceed --learning_rate"),
    (["--run_name", "baseline.jsonl"], ["--run_name", "baseline.JSON"], "names the run, not its file"),
    (["--block_size", str(2**24)], ["--block_size", str(2**24 + 1)], "16,777,216-token limit"),
    (["--kgram_k", "3", "--block_size", "4"], ["--kgram_k", "3", "--block_size", "3"],
     r"--block_size \(3\) must be larger than --kgram_k \(3\)"),
    (["--dropout", "0.99"], ["--dropout", "1.0"], r"--dropout must be in \[0, 1\)"),
    (["--keep_checkpoints", "1"], ["--keep_checkpoints", "0"], "--keep_checkpoints must be at least 1"),
    (["--plateau_patience", "2", "--plateau_factor", "0.99"],
     ["--plateau_patience", "2", "--plateau_factor", "1.0"], r"--plateau_factor must be in \(0, 1\)"),
    (["--plateau_patience", "2"], ["--plateau_patience", "2", "--test_fraction", "0"],
     "set --test_fraction above 0"),
    (["--logit_softcap", "1"], ["--logit_softcap", "0.99"], "less than one nat"),
    (["--yarn_factor", "1"], ["--yarn_factor", "0.99"], "--yarn_factor must be at least 1"),
    (["--n_experts", "4", "--experts_per_token", "4"], ["--n_experts", "4", "--experts_per_token", "5"],
     r"--experts_per_token must be between 1 and --n_experts \(4\)"),
    (["--resume", "runs/a", "--checkpoint_every", "2"], ["--checkpoint_every", "2"],
     "--checkpoint_every needs --save_dir"),                # --resume's folder takes them too
    (["--monosemantic_enabled"], ["--accounting", "pico", "--monosemantic_enabled"],
     "and --accounting trains none"),
    (["--sweep", "presentation", "--custom_sweep_sizes", "2,5"],  # it runs custom_data's points
     ["--sweep", "budget", "--custom_sweep_sizes", "2,5"], "sets the corpus sizes of the custom_data"),
]


@pytest.mark.parametrize("accepted, refused, match", EDGES, ids=[" ".join(e[1]) for e in EDGES])
def test_each_check_accepts_the_last_good_command_and_refuses_the_next(pico, configure,
                                                                       accepted, refused, match):
    configure("--models", "kgram_mlp_seq,transformer", *accepted)
    with pytest.raises(pico.UserError, match=match):
        configure("--models", "kgram_mlp_seq,transformer", *refused)


def test_a_resumed_run_keeps_a_seed_from_before_the_32_bit_limit(pico, configure):
    """--seed is at most 2**32 - 1, but a run started before that limit with a larger seed is
    resumed with its own: any other would be refused as a changed flag."""
    with pytest.raises(pico.UserError, match=r"--seed must be between 0 and 2\*\*32 - 1"):
        configure("--seed", str(2**32))
    assert configure("--resume", "--save_dir", "ckpt", "--seed", str(2**32)).training.seed == 2**32
    with pytest.raises(pico.UserError, match=r"--seed must be between 0 and 2\*\*64 - 1"):
        configure("--resume", "--save_dir", "ckpt", "--seed", str(2**64))


def test_a_tool_may_train_at_a_learning_rate_whose_decay_would_flip_the_weights(pico, configure):
    """The check of --weight_decay x --learning_rate is the main job's (run_training), not the
    parser's: tools build configs through it to train at learning rates meant to diverge."""
    training = configure("--learning_rate", "1e30").training
    with pytest.raises(pico.UserError, match="give a weight decay below 1e-30"):
        pico.check_weight_decay_leaves_the_weights(training)


def test_a_batch_larger_than_the_training_set_is_noted(run_main, tmp_path):
    """Each step then takes every training example, fewer than --batch_size: said once."""
    status, _, err = run_main(*TINY_RUN, "--models", "lstm_seq", "--epochs", "1",
                              "--batch_size", "100000", "--run_name", "big")
    assert status == 0, err
    sources = json.loads((tmp_path / "artefacts" / "big.json").read_text())["data"]["sources"]
    examples = sum(source["train"] for source in sources.values())
    assert err.splitlines() == [f"pico-llm: note: --batch_size 100,000 is more than the "
                                f"{examples:,} training examples; each step takes {examples:,}"]
    for extra in (["--batch_size", str(examples)], []):      # all of them, and fewer
        status, _, err = run_main(*TINY_RUN, "--models", "lstm_seq", "--epochs", "1", *extra)
        assert status == 0 and err == "", err


def test_an_export_that_would_hold_the_run_log_is_refused_before_the_run_makes_it(
        pico, run_main, tmp_path, capsys, monkeypatch):
    """--artefacts_dir inside --export_hf: said as that, not as an export folder "not empty"
    because the run made the artefacts folder first, and nothing is left behind."""
    status, _, err = run_main("--models", "transformer", *TINY_RUN, "--export_hf",
                              str(tmp_path / "hf"), artefacts=tmp_path / "hf" / "a")
    assert status == 2 and err.count("\n") == 1
    assert "would hold the files this run writes for --artefacts_dir" in err
    assert not (tmp_path / "hf").exists()
    folders = {"--artefacts_dir": tmp_path / "art", "--cache_dir": tmp_path / "cache"}
    for flag in folders:                       # the export is that folder, or holds it
        for given in (tmp_path / "hf", tmp_path / "hf" / "inner"):
            argv = [*TINY_RUN, "--models", "transformer", "--device_id", "cpu", "--export_hf",
                    str(tmp_path / "hf"), *(part for name, folder in folders.items() for part in
                                            (name, str(given if name == flag else folder)))]
            assert pico.main(argv) == 2
            err = capsys.readouterr().err
            assert f"would hold the files this run writes for {flag}" in err, err
            assert not (tmp_path / "hf").exists()
    # a name the run writes (its log, a file named after it, a checkpoint, a cache file): the
    # run had trained, then found the export's name taken
    art, save = tmp_path / "art", tmp_path / "save"
    for export, flag in ((art / "r1.json", "--artefacts_dir"), (art / "r1.tokenizer", "--artefacts_dir"),
                         (save / "transformer" / "step_000009.pt", "--save_dir"),
                         (tmp_path / "cache" / "x.tokens.npy", "--cache_dir")):
        argv = [*TINY_RUN, "--models", "transformer", "--device_id", "cpu", "--run_name", "r1",
                "--artefacts_dir", str(art), "--save_dir", str(save), "--cache_dir",
                str(tmp_path / "cache"), "--export_hf", str(export)]
        assert pico.main(argv) == 2
        assert f"is among the names this run writes for {flag}" in capsys.readouterr().err, export
        assert not art.exists() and not save.exists()
    # a symbolic link, to an empty folder or to nothing: the export is renamed into place
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "nothing"):
        link = tmp_path / "link"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        assert pico.main([*TINY_RUN, "--models", "transformer", "--device_id", "cpu",
                          "--artefacts_dir", str(art), "--export_hf", str(link)]) == 2
        assert f"--export_hf {link} is a symbolic link" in capsys.readouterr().err
        assert not art.exists() and link.is_symlink()
    # the current directory, empty: the export's staging folder had been made inside it, and
    # renaming that over `.` failed (device or resource busy) once training was done
    with monkeypatch.context() as here:
        here.chdir(tmp_path / "empty")
        for name in (".", str(tmp_path / "empty")):
            assert pico.main([*TINY_RUN, "--models", "transformer", "--device_id", "cpu",
                              "--artefacts_dir", str(art), "--export_hf", name]) == 2
            assert f"--export_hf {name} is the current directory" in capsys.readouterr().err
            assert not art.exists() and not any((tmp_path / "empty").iterdir())
    assert pico.main([*TINY_RUN, "--models", "transformer", "--device_id", "cpu", "--run_name",
                      "r1", "--artefacts_dir", str(art), "--export_hf", str(art / "r1_export")]) == 0
    assert (art / "r1_export" / "config.json").exists()      # beside the log, a name of its own


def test_a_prompt_of_utf8_an_ascii_terminal_could_not_read_is_read_as_utf8(configure, tmp_path):
    """Under LC_ALL=C (PYTHONUTF8=0), Python reads each byte past ASCII of an argument as a
    surrogate; a prompt, text and never a path, is read back as the UTF-8 it is."""
    assert configure("--prompt", "h\udcc3\udca9llo \udce2\udc98\udc83").sampling.prompt == "héllo ☃"
    if sys.platform == "darwin":        # where arguments are read as UTF-8 whatever the locale
        return
    environment = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--accounting", "--prompt", "héllo",
                             "--run_name", "rün"], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        "pico-llm: error: --run_name is UTF-8 that the terminal's encoding (ascii) does not "
        "read; set LC_ALL=C.UTF-8, or give a name in ASCII\n"), result.stderr


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    result = run_script("--input_files", str(tmp_path / "nope.txt"), "--device_id", "cpu",
                        "--artefacts_dir", str(tmp_path / "a"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"pico-llm: error: input file not found: {tmp_path / 'nope.txt'}"]
    assert not (tmp_path / "a").exists()


def test_an_empty_artefacts_dir_is_refused_not_the_current_folder(tmp_path):
    """--artefacts_dir "" would write the run log into the folder the run started in."""
    result = run_script("--artefacts_dir", "", *TINY_RUN, "--device_id", "cpu", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pico-llm: error: --artefacts_dir is empty; give a path, or drop the flag"]
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_output_is_closed_early_says_it_stopped(tmp_path):
    """`pico-llm.py | head -1` stops the run at its next line: that is said on stderr and the
    status is a closed pipe's (141), not 0 as if the run had finished."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *TINY_RUN, "--device_id", "cpu",
                                "--artefacts_dir", str(tmp_path / "a"), "--cache_dir",
                                str(tmp_path / "c")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141
    assert err.strip().splitlines() == [
        "pico-llm: stopped: the output was closed (piped into head?) before the run finished; "
        "send it to a file, or through tail"]


def test_a_closed_pipe_ends_a_printing_command_with_0_and_a_run_with_141(pico, monkeypatch,
                                                                        capsys):
    """`--accounting | head` has what it asked for (status 0, nothing said); a training run
    cut off by its reader has not finished, and says so (141, as a shell reports SIGPIPE)."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)     # main() swaps in /dev/null; put back after
    def reader_gone(config):
        raise BrokenPipeError
    monkeypatch.setattr(pico, "run_command", reader_gone)
    assert pico.main(["--accounting"]) == 0
    sys.stdout.close()
    assert capsys.readouterr().err == ""
    assert pico.main(["--epochs", "1", "--device_id", "cpu"]) == 141
    sys.stdout.close()
    assert "pico-llm: stopped: the output was closed" in capsys.readouterr().err


@pytest.mark.parametrize("ending", ["bad input", "interrupted", "note and error"])
def test_each_line_on_standard_error_goes_out_in_one_write(pico, monkeypatch, ending):
    """Under torchrun every rank writes its stop or error line at once. Python run unbuffered
    (PYTHONUNBUFFERED, as in many containers) makes print() two writes, the text and then the
    newline, and two ranks' lines ran together; each line must be one write."""
    import io
    writes = []
    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)
    monkeypatch.setattr(sys, "stderr", Recorder())
    def stops(config):
        if ending == "interrupted":
            raise pico.TrainingInterrupted(2, "interrupted by SIGINT at step 3 of lstm_seq")
        pico.warn("pico-llm: note: a note first")
        raise pico.UserError("a bad value\non two lines")
    if ending != "bad input":
        monkeypatch.setattr(pico, "run_command", stops)
    status = pico.main(["--block_size", "0"] if ending == "bad input" else ["--epochs", "1"])
    assert status == (130 if ending == "interrupted" else 2)
    assert writes, "nothing was said"
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in writes), writes


def test_only_the_names_of_other_writers_files_are_reserved_for_run_logs(pico):
    for stem in ("sweep_ablations", "sweep_architectures_run", "r.attention_transformer",
                 "r.monosemantic_lstm_seq", "architectures_attention_pico"):
        assert pico.reserved_artefact_name(stem), stem
    for stem in ("sweep_lr3e-4", "my_sweep", "attention", "main_job", "r.attention"):
        assert pico.reserved_artefact_name(stem) is None, stem


def test_help_documents_every_flag_the_readme_uses(pico):
    help_text = run_script("--help").stdout
    readme_lines = (REPO / "README.md").read_text().splitlines()
    import re
    flags = {flag for line in readme_lines
             if "pip " not in line and "pytest" not in line and "tools/" not in line
             for flag in re.findall(r"(--[a-z_]+)\b", line)}
    flags -= {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend",
              "--rdzv_endpoint", "--rdzv_id"}  # torchrun's own
    assert len(flags) > 30
    options = pico.build_arg_parser()._option_string_actions   # every flag the parser takes
    for flag in flags:
        assert flag in options, flag
        assert re.search(re.escape(flag) + r"\b", help_text), flag


def test_the_help_says_from_the_preset_for_the_transformer_flags_a_preset_fills_only(pico):
    """A flag without a default: a Transformer flag takes its preset's value, and the help says
    so; any other (--max_steps_per_epoch: no limit) says nothing of a preset."""
    formatter = pico.HelpFormatter("pico-llm.py")
    said = {action.dest: formatter._get_help_string(action).endswith("(default: from the preset)")
            for action in pico.build_arg_parser()._actions
            if action.option_strings and action.default is None and "default" not in (action.help or "")}
    assert said["d_model"] and not said["max_steps_per_epoch"]
    assert {dest for dest, from_preset in said.items() if from_preset} == (
        set(said) & set(pico.TRANSFORMER_OVERRIDE_FLAGS))


def test_a_transformer_flags_stated_default_is_every_presets_value(pico):
    """A Transformer flag left out takes its preset's field: a default its help states must
    hold for every preset, or the help must say it is the preset's (--qk_norm had said false,
    and the speedrun preset turns it on)."""
    import re
    stated = {}
    for action in pico.build_arg_parser()._actions:
        found = re.search(r"\(default: ([^)]*)\)", action.help or "")
        if action.dest in pico.TRANSFORMER_OVERRIDE_FLAGS and found:
            stated[action.dest] = found.group(1)
    assert {"qk_norm", "value_embeddings", "logit_softcap", "attention"} <= set(stated)
    for flag, default in stated.items():
        if default.startswith("the preset's"):
            continue
        value = default.split(",")[0].split(" = ")[0].strip()
        for name, preset in pico.TRANSFORMER_PRESETS.items():
            actual = getattr(pico.TransformerConfig(**preset), flag)
            assert str(actual).lower() in (value, value + ".0"), (flag, name, actual, default)


def test_cuda_request_without_cuda_falls_back_to_cpu(pico, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert pico.resolve_device("cuda:0").type == "cpu"
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_default_device_is_auto_cuda_then_mps_then_cpu(pico, configure, monkeypatch, capsys):
    import torch
    assert configure().device_id == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pico.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pico.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pico.resolve_device("auto") == torch.device("cuda", 0)
    assert capsys.readouterr().err == ""          # a choice, not a fallback: no note


def test_a_run_on_the_default_device_names_it_once_without_a_note(pico, tmp_path, capsys):
    import torch
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    status = pico.main(["--input_files", str(REPO / "3seqs.txt"), "--limit_custom_examples", "20",
                        "--models", "lstm_seq", "--embed_size", "8", "--block_size", "16",
                        "--epochs", "1", "--max_steps_per_epoch", "1", "--max_new_tokens", "2",
                        "--artefacts_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "CUDA is not available" not in captured.err
    assert captured.out.splitlines()[0] == "device: cpu (--device_id auto)"
    assert captured.out.count("device: ") == 1


def test_a_sliding_window_one_short_of_the_block_is_read(configure):
    """A window of block_size - 1 tokens still keeps the last query from the first key."""
    config = configure("--models", "transformer", "--block_size", "32", "--sliding_window", "31")
    assert config.models.transformer.sliding_window == 31


def test_the_run_log_names_the_processor_by_its_model_name(pico, monkeypatch, tmp_path):
    """Linux's /proc/cpuinfo gives it; platform.processor() there gives "x86_64" or nothing.
    Without the key (some ARM kernels), the architecture is what is known."""
    import platform
    import torch
    cpuinfo = tmp_path / "cpuinfo"
    real_open = open
    monkeypatch.setattr(pico, "open", lambda path, *args, **kwargs: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs), raising=False)
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\n"   # x86's order
                       "model name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert pico.environment_info(torch.device("cpu"))["device_name"] == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n")
    assert (pico.environment_info(torch.device("cpu"))["device_name"]
            == (platform.processor() or platform.machine()))
    cpuinfo.unlink()   # not Linux
    assert pico.processor_name() == (platform.processor() or platform.machine())


COURSE_SANITY = ["--tinystories_weight", "0.0", "--input_files", "3seqs.txt", "--tokenizer", "gpt2",
                 "--block_size", "32", "--kgram_k", "2", "--embed_size", "64",
                 "--max_steps_per_epoch", "1", "--device_id", "cpu"]


@pytest.mark.slow
def test_the_course_sanity_command_runs(tmp_path):
    """The README's sanity command, as a user runs it, for 2 of its 12 epochs (a first and a
    last): an epoch is one step of each of the three models and a full test pass over GPT-2's
    vocabulary (85% of the whole command's time), and epochs 3 to 12 run epoch 2's code again."""
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in readme.splitlines() if line.startswith("python ")]
    assert ["python", "pico-llm.py", *COURSE_SANITY] in commands     # the command tested here
    result = run_script(*COURSE_SANITY, "--epochs", "2",
                        "--artefacts_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
                        timeout=600)
    assert result.returncode == 0, result.stderr
    assert "run log written to" in result.stdout
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_a_crash_in_native_code_prints_the_python_stack(tmp_path):
    """main() enables faulthandler, so SIGABRT (as from a C++ std::terminate) shows where
    Python was; a captured in-memory stderr (these tests' run_main) must not break main()."""
    import subprocess
    import sys
    from conftest import SCRIPT, probe_loading
    probe = (probe_loading("pico", SCRIPT, "pico_llm") + "import os, signal\n"
             "pico.main(['--accounting', 'pico'])\n"
             "def crash_here():\n    os.kill(os.getpid(), signal.SIGABRT)\n"
             "crash_here()\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Fatal Python error: Aborted" in result.stderr and "crash_here" in result.stderr


def test_the_readme_quotes_the_committed_main_job():
    """The main job's figures in the README are those of its committed run log."""
    import json
    import re
    readme = (REPO / "README.md").read_text()
    run = json.loads((REPO / "artefacts" / "presentation" / "main_job.json").read_text())
    quoted = re.search(r"reach ([\d.]+) \(k-gram\), ([\d.]+) \(LSTM\) and ([\d.]+) \(Transformer\)",
                       readme)
    assert quoted, "the README no longer quotes the main job's bits per byte"
    measured = [run["models"][name]["final"]["test_bits_per_byte"]
                for name in ("kgram_mlp_seq", "lstm_seq", "transformer")]
    assert [float(q) for q in quoted.groups()] == [round(m, 2) for m in measured]
    assert run["args"]["epochs"] == 12 and "after 12 epochs" in readme


def test_the_table_of_contents_matches_the_section_banners_and_the_lesson_comes_first(pico):
    """Every section and subsection banner of pico-llm.py is named in the docstring's
    contents, in the same order, and Part I's lesson (sections 1 to 5) precedes the rest."""
    import re
    source = (REPO / "pico-llm.py").read_text()
    lines = source.splitlines()
    banners = []
    for index, line in enumerate(lines):
        if line.startswith("# ===") and index + 1 < len(lines):
            heading = re.match(r"# ([1-9A-Z])\. ", lines[index + 1])
            if heading:
                banners.append(heading.group(1))
        subsection = re.match(r"# --- ([0-9A-Z]\.[0-9]) ", line)
        if subsection:
            banners.append(subsection.group(1))
    contents = pico.__doc__.split("Contents")[1]
    listed = re.findall(r"(?m)(?:^ +([1-9A-Z])\. |\b([0-9A-Z]\.[0-9]) )", contents)
    listed = [top or sub for top, sub in listed]
    assert banners == listed
    lesson = banners[:banners.index("6")]
    assert [b for b in lesson if "." not in b] == ["1", "2", "3", "4", "5"]
    assert all(b.split(".")[0] in "12345" for b in lesson)


TORCHRUN_ADDRESS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a number of processes"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a number of processes"),
    ({"WORLD_SIZE": "-1"}, "WORLD_SIZE='-1' is not a number of processes"),
    ({"WORLD_SIZE": "²"}, "WORLD_SIZE='²' is not a number of processes"),
    ({"WORLD_SIZE": "2", "RANK": "²", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS}, "RANK='²' is not a rank"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "without MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "abc", **TORCHRUN_ADDRESS}, "LOCAL_RANK='abc' is not a rank"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS}, "RANK=5 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK='1' with WORLD_SIZE=1: one process is rank 0"),
    # an address of bytes that are not UTF-8 was a traceback as the waiting note was made
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS, "MASTER_ADDR": "\udcff"},
     "MASTER_ADDR='\\udcff' is not a host name"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS, "MASTER_PORT": "http"},
     "MASTER_PORT='http' is not a port number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS, "MASTER_PORT": "70000"},
     "MASTER_PORT='70000' is not a port number"),
], ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None)
def test_torchrun_variables_torchrun_never_sets_are_one_line(run_main, monkeypatch, variables, message):
    """WORLD_SIZE and its companions as torchrun sets them, or a one-line refusal that says
    to start with torchrun, before anything starts (a plain run with WORLD_SIZE=1 is a plain run)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    status, _, err = run_main("--models", "lstm_seq", "--epochs", "1", "--max_steps_per_epoch", "1")
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert "torchrun --nproc_per_node=N" in err


@pytest.mark.parametrize("batch_size, accumulated, message", [
    ("16", "1", "--batch_size 16 is shared among the 32 ranks torchrun started (WORLD_SIZE), fewer "
                "examples than ranks; raise --batch_size to at least 32, or start fewer ranks"),
    ("31", "1", "--batch_size 31 is shared among the 32 ranks torchrun started (WORLD_SIZE), fewer "
                "examples than ranks; raise --batch_size to at least 32, or start fewer ranks"),
    ("64", "4", "--grad_accum_steps (4) must not exceed --batch_size (64 / 32 ranks): each "
                "micro-batch needs an example")])
def test_a_batch_is_refused_when_a_rank_or_micro_batch_would_get_no_example(
        run_main, monkeypatch, batch_size, accumulated, message):
    """Fewer examples than ranks is said as that, not as too many accumulation steps."""
    for name, value in {"WORLD_SIZE": "32", "RANK": "0", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS}.items():
        monkeypatch.setenv(name, value)
    status, _, err = run_main("--batch_size", batch_size, "--grad_accum_steps", accumulated)
    assert status == 2 and err == f"pico-llm: error (rank 0): {message}\n"


@pytest.mark.parametrize("rank", ["0", None])
def test_torchrun_with_one_process_is_a_plain_run(run_main, monkeypatch, rank):
    """torchrun --nproc_per_node=1 sets WORLD_SIZE=1 and RANK=0: trained as a plain run; so is
    WORLD_SIZE=1 set alone (a shell's leftover), whose rank can only be 0."""
    for name, value in {"WORLD_SIZE": "1", "RANK": rank, "LOCAL_RANK": "0", **TORCHRUN_ADDRESS}.items():
        monkeypatch.setenv(name, value) if value is not None else monkeypatch.delenv(name, raising=False)
    status, out, err = run_main("--models", "lstm_seq", "--epochs", "1", "--max_steps_per_epoch", "1")
    assert status == 0 and "ranks" not in out, err
    status, _, err = run_main("--batch_size", "0")       # its error names no rank either
    assert status == 2 and err == "pico-llm: error: --batch_size must be positive, got 0\n"


def test_a_rank_that_cannot_reach_the_others_says_so_in_one_line(tmp_path):
    """A rank started as torchrun would, whose peers never come: after --dist_timeout, one line
    naming the address, not torch.distributed's traceback."""
    import os
    import socket
    with socket.socket() as probe:                  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    result = subprocess.run([sys.executable, str(SCRIPT), "--models", "lstm_seq", "--device_id", "cpu",
                             "--dist_timeout", "3", "--artefacts_dir", str(tmp_path / "art"),
                             "--cache_dir", str(tmp_path / "cache")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot join the torchrun job at 127.0.0.1:{port}" in lines[0]


@pytest.mark.parametrize("rank, said", [
    ("1", "within --dist_timeout 2 s; start every rank with torchrun (each RANK once)"),
    ("0", "(port {port} is in use by another program); start every rank with torchrun and "
          "another --master_port, or unset WORLD_SIZE")])
def test_a_rank_whose_port_another_program_holds_gives_up_in_one_line(tmp_path, rank, said):
    """A listener that never answers (another program on MASTER_PORT, or a second process
    given one RANK) had held rank 1 in torch's connect for ever; rank 0, which would listen
    there itself, had its reason cut off."""
    import os
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, str(SCRIPT), "--models", "lstm_seq",
                                 "--device_id", "cpu", "--dist_timeout", "2",
                                 "--artefacts_dir", str(tmp_path / "art")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said.format(port=port) in lines[0], lines
    assert lines[0].startswith(f"pico-llm: error (rank {rank}): cannot join the torchrun job at "
                               f"127.0.0.1:{port}")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("command", [["--sweep", "budget", "--sweep_scale", "tiny"],
                                     ["--generate", "--checkpoint", "x.pt"], ["--accounting"]])
def test_commands_other_than_training_refuse_torchrun(run_main, monkeypatch, command):
    """Only training splits its work across torchrun's ranks: a sweep, generation or accounting
    under torchrun would run whole in every rank (every rank writing the same sweep file)."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **TORCHRUN_ADDRESS}.items():
        monkeypatch.setenv(name, value)
    status, _, err = run_main(*command)
    assert status == 2 and err.count("\n") == 1, err
    assert "runs in one process; start it with python, not torchrun" in err


PATH_FLAGS = {"input_files": "~/a.txt", "input_dir": "~/texts", "tinystories_path": "~/ts.jsonl",
              "cache_dir": "~/cache", "artefacts_dir": "~/logs", "save_dir": "~/runs",
              "resume": "~/runs", "export_hf": "~/out", "init_from": "~/model",
              "checkpoint": "~/step_000001.pt", "custom_sweep_log": "~/sweep.json"}


def test_a_tilde_starts_every_path_flag_at_home_also_after_an_equals_sign(pico, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = pico.build_arg_parser()    # the flags alone, not their combinations
    args = parser.parse_args([f"--{flag}={path}" for flag, path in PATH_FLAGS.items()])
    for flag, path in PATH_FLAGS.items():
        value = getattr(args, flag)
        assert (value[0] if flag == "input_files" else value) == str(tmp_path / path[2:])


@pytest.mark.parametrize("flag", ["--init_from", "--export_hf", "--save_dir"])
def test_a_tilde_of_an_unknown_user_is_refused(run_main, tmp_path, monkeypatch, flag):
    """Not a folder named ~no_such_user_here made where the command runs."""
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(flag, "~no_such_user_here/model", "--generate")
    assert status == 2 and err.count("\n") == 1
    assert "no user 'no_such_user_here' here" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", sorted(PATH_FLAGS))
def test_a_path_of_only_white_space_is_refused(run_main, tmp_path, monkeypatch, flag):
    """Not a folder named " " made where the command runs (--export_hf ' ' did)."""
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(f"--{flag}", " \t", "--max_steps_per_epoch", "1")
    assert status == 2 and err.count("\n") == 1
    assert f"argument --{flag}: ' \\t' is only white space, not a path" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", sorted(PATH_FLAGS))
def test_a_path_with_a_control_character_is_refused(run_main, tmp_path, monkeypatch, flag):
    """A newline pasted into a path would break every line that names it ("run log written
    to ..."), and make a folder so named."""
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(f"--{flag}", "runs\nx", "--max_steps_per_epoch", "1")
    assert status == 2 and err.count("\n") == 1
    assert f"argument --{flag}: 'runs\\nx' holds a control character" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["runs\n", "\truns", "runs\rx", "runs\x1bx", "runs\x7fx",
                                  "runs\x85x"])
def test_every_control_character_anywhere_in_a_path_is_refused(pico, text):
    """At either end (a paste's trailing newline), and every kind: tab, carriage return,
    escape, delete and the C1 controls, not only the newline."""
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="holds a control character"):
        pico.user_path(text)


@pytest.mark.parametrize("argv", [
    ["--enable_transformer_gptoss", "--experts_per_token", "4"],       # GPT-oss reads them
    ["--transformer_variant", "minGPT", "--enable_transformer_gptoss", "--rope_theta", "1e6"],
    ["--sweep", "ablations", "--rope_theta", "5000"],                  # its RoPE points read it
    ["--sweep", "hyperparams", "--unet_skips", "true"],
    ["--resume", "runs/a", "--save_dir", "runs/a", "--models", "transformer", "--pos_emb", "learned",
     "--rope_theta", "500"],                                          # as an older version stored
])
def test_a_flag_some_transformer_of_the_run_reads_is_not_refused(pico, argv):
    """The unread-flag check refuses a flag no Transformer of a fresh run reads; one read by
    the run's other Transformer, by a sweep's points, or stored in a checkpoint passes."""
    args = pico.parse_args(argv)
    if args.sweep:      # each point passes the checks, whatever it changes under the flag
        config = pico.config_from_flags(pico.plain_flags(args))
        for change in ({"pos_emb": "learned"}, {"attention": "linear"}, {"n_blocks": 1}):
            pico.with_flags(config, **change)


def test_a_sweep_point_is_held_to_the_command_lines_checks(pico, configure):
    """Each point of a sweep changes some flags: the changed flags pass the same checks."""
    with pytest.raises(pico.UserError, match="--batch_size must be positive"):
        pico.with_flags(configure(), batch_size=0)


def test_true_or_false_flags_take_every_spelling_of_both(pico):
    import argparse
    for text in ("1", "true", "yes", "on", "TRUE", "On"):
        assert pico.str_to_bool(text) is True, text
    for text in ("0", "false", "no", "off", "No"):
        assert pico.str_to_bool(text) is False, text
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false"):
        pico.str_to_bool("maybe")


@pytest.mark.parametrize("command", [["--accounting"], ["--epochs", "1"]])
def test_a_closed_standard_output_is_refused_in_one_line(tmp_path, command):
    """Started with `>&-`, Python has no sys.stdout: printing drops the text silently (a
    sample from --generate was lost with status 0), and flushing it failed with a traceback."""
    line = " ".join(shlex.quote(a) for a in [sys.executable, str(SCRIPT), *command,
                                              "--artefacts_dir", str(tmp_path / "art")])
    result = subprocess.run(["bash", "-c", line + " >&-"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("pico-llm: error: standard output is closed, so nothing "
                                     "could be shown; send it to a terminal, a file, or /dev/null")
    assert not (tmp_path / "art").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("command", [["--accounting"],
                                     [*TINY_RUN, "--device_id", "cpu", "--models", "lstm_seq"]])
def test_a_full_standard_output_is_one_line(pico, tmp_path, command):
    """Standard output on a full disk (`> /dev/full`): one line naming it, exit 2, where the
    write's OSError came out as a traceback with status 1."""
    with open("/dev/full", "w") as full:
        places = [] if "--accounting" in command else [
            "--artefacts_dir", str(tmp_path / "art"), "--cache_dir", str(tmp_path / "cache"),
            "--save_dir", str(tmp_path / "save")]
        result = subprocess.run([sys.executable, str(SCRIPT), *command, *places],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("pico-llm: error: cannot write the output (No space left on "
                             "device); free some space, or send the output elsewhere\n")


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EDQUOT", "EFBIG", "EIO"])
def test_a_full_disk_under_a_named_file_is_one_line_naming_it(pico, monkeypatch, capsys, errno_name):
    """A write the device refuses that reaches main() with its file's name (one that no
    cannot_write caught): one line naming the file, exit 2."""
    import errno

    def full(config):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)),
                      "/data/out/report.json")

    monkeypatch.setattr(pico, "run_command", full)
    assert pico.main(["--accounting"]) == 2
    assert capsys.readouterr().err == (
        f"pico-llm: error: cannot write /data/out/report.json "
        f"({os.strerror(getattr(errno, errno_name))}); free some space, or send the output "
        "elsewhere\n")


@pytest.mark.parametrize("command, status", [(["--no_such_flag"], 2), (["--epochs", "-1"], 2),
                                             (["--accounting"], 0)])
def test_a_closed_standard_error_keeps_the_exit_status(tmp_path, command, status):
    """Started with `2>&-`, the one-line error cannot be shown, but bad input still exits 2
    (it crashed with 1 writing the message), and a command that works still prints."""
    line = " ".join(shlex.quote(a) for a in [sys.executable, str(SCRIPT), *command,
                                              "--artefacts_dir", str(tmp_path / "art")])
    result = subprocess.run(["bash", "-c", line + " 2>&-"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == status
    if status == 0:
        assert "parameters" in result.stdout
    else:                 # not on standard output either, where print(file=None) would go
        assert result.stdout == ""
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("argv", [["--generate", "--checkpoint", "{tmp}/no\nsuch.pt"],
                                  ["--input_files", "{tmp}/a\nb.txt", "--epochs", "1"],
                                  ["--input_dir", "{tmp}/no\nsuch", "--epochs", "1"]])
def test_a_path_with_a_newline_in_it_still_gets_one_error_line(pico, tmp_path, capsys, argv):
    """Whatever message names such a path, main() prints it on one line, the newline shown
    as \\n (it had split the error in two)."""
    status = pico.main([a.format(tmp=tmp_path) for a in argv]
                       + ["--artefacts_dir", str(tmp_path / "art"), "--device_id", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pico-llm: error: ") and "\\n" in err


@pytest.mark.parametrize("package", ["numpy", "torch"])
def test_a_missing_package_is_one_line_naming_the_install(package):
    """Run on a machine without the requirements installed: one line and status 2, not the
    import's traceback."""
    probe = (f"import runpy, sys; sys.modules[{package!r}] = None; "
             f"sys.argv = [{str(SCRIPT)!r}, '--help']; runpy.run_path({str(SCRIPT)!r}, "
             "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"pico-llm: error: the package {package} is not installed; pip "
                             "install -r requirements.txt (GPU users: see README.md)\n")


def test_every_sections_configs_defaults_are_the_flags_defaults(pico):
    """Python callers that build a section's config get what the command line gives (the
    course's 12 epochs of 16 examples of 64 tokens, 3 checkpoints kept, ...), but for the
    token cache: a Python caller caches nothing unless it names a folder."""
    import dataclasses
    flags = vars(pico.parse_args([]))
    named = {"k": "kgram_k", "variant": "kgram_variant", "num_inner_layers": "num_inner_mlp_layers",
             "chunk_size": "kgram_chunk_size", "num_layers": "lstm_layers"}
    sections = (pico.DataConfig, pico.TrainingConfig, pico.CheckpointConfig, pico.ExperimentConfig,
                pico.OutputConfig, pico.SpeedConfig, pico.HuggingFaceConfig, pico.SamplingConfig,
                pico.KGramConfig, pico.LSTMConfig)
    compared = 0
    for section in sections:
        for field in dataclasses.fields(section):
            flag = named.get(field.name, field.name) if section in (pico.KGramConfig,
                                                                    pico.LSTMConfig) else field.name
            if flag not in flags or (section, flag) == (pico.DataConfig, "cache_dir"):
                continue
            assert field.default == flags[flag], (section.__name__, field.name)
            compared += 1
    assert compared > 60
    assert flags["cache_dir"] and pico.DataConfig.cache_dir is None
    assert (flags["epochs"], flags["batch_size"], flags["block_size"], flags["keep_checkpoints"]) == (
        12, 16, 64, 3)


# --- checks a mutation of section 8 could remove or shift unnoticed ---------------------------
FINITE_FLAGS = ("learning_rate", "weight_decay", "grad_clip", "temperature", "rope_theta",
                "test_fraction", "tinystories_weight", "min_lr_ratio", "router_aux_loss_coef",
                "yarn_factor", "dist_timeout")


@pytest.mark.parametrize("flag", FINITE_FLAGS)
def test_each_float_flag_refuses_infinity_as_not_finite(pico, configure, flag):
    """inf is refused as not finite for every float flag that must be finite, with a
    Transformer that reads each of them (RoPE, experts): --rope_theta inf, --yarn_factor inf
    and --router_aux_loss_coef inf passed every other check and had reached training."""
    with pytest.raises(pico.UserError, match=f"^--{flag} must be a finite number, got inf$"):
        configure("--models", "transformer", "--n_experts", "4", f"--{flag}", "inf")


POSITIVE_COUNTS = ("epochs", "batch_size", "grad_accum_steps", "block_size", "kgram_k",
                   "embed_size", "lstm_layers", "max_steps_per_epoch", "max_new_tokens",
                   "limit_custom_examples", "tinystories_max_stories", "log_interval")


@pytest.mark.parametrize("flag", POSITIVE_COUNTS)
def test_each_count_flag_refuses_zero(pico, configure, flag):
    """0 of a count is refused by name, not taken for "none" or "no limit": with the mutants,
    --tinystories_max_stories 0 trained with no TinyStories at --tinystories_weight 0.5, and
    --limit_custom_examples 0 was accepted."""
    with pytest.raises(pico.UserError, match=f"^--{flag} must be positive, got 0$"):
        configure("--tinystories_weight", "0.5", f"--{flag}", "0")


@pytest.mark.parametrize("world_size, batch_size, accumulated", [
    ("1", "1", "1"), ("1", "4", "4"), ("32", "32", "1"), ("32", "64", "2")])
def test_a_batch_of_one_example_per_rank_and_micro_batch_is_accepted(
        configure, monkeypatch, world_size, batch_size, accumulated):
    """The last batch each check accepts: as many examples as ranks, and as many micro-batches
    as each rank's examples (one example each). The refusals' side is pinned by
    test_a_batch_is_refused_when_a_rank_or_micro_batch_would_get_no_example."""
    for name, value in {"WORLD_SIZE": world_size, "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    config = configure("--batch_size", batch_size, "--grad_accum_steps", accumulated)
    assert config.training.batch_size == int(batch_size)
    assert config.training.grad_accum_steps == int(accumulated)


LOWER_ENDS = [  # a command each check accepts and the nearest it refuses, at a range's lower end
    (["--beta2", "0"], ["--beta2", "-0.01"], r"--beta2 must be in \[0, 1\)"),
    (["--dropout", "0"], ["--dropout", "-0.01"], r"--dropout must be in \[0, 1\)"),
    (["--plateau_patience", "2", "--plateau_factor", "0.01"],
     ["--plateau_patience", "2", "--plateau_factor", "0"], r"--plateau_factor must be in \(0, 1\)"),
    (["--early_stop_patience", "2", "--early_stop_min_delta", "1e300"],
     ["--early_stop_patience", "2", "--early_stop_min_delta", "inf"],
     "--early_stop_min_delta must be a finite number >= 0, got inf"),
    (["--data_format", "stream", "--random_offsets"], ["--data_format", "lines", "--random_offsets"],
     r"lines mode has none \(add --data_format stream\)"),
]


@pytest.mark.parametrize("accepted, refused, match", LOWER_ENDS, ids=[" ".join(e[1]) for e in LOWER_ENDS])
def test_each_range_refuses_the_value_just_past_its_lower_end(pico, configure, accepted, refused,
                                                              match):
    """As EDGES in test_cli.py, at the other end of each range (or the other spelling of lines
    mode): a negative --beta2 or --dropout, a --plateau_factor of 0 (the learning rate set to
    0 on the first plateau), an infinite --early_stop_min_delta (no epoch ever an improvement),
    and --random_offsets with --data_format lines had all been accepted by the mutants."""
    configure("--models", "kgram_mlp_seq,transformer", *accepted)
    with pytest.raises(pico.UserError, match=match):
        configure("--models", "kgram_mlp_seq,transformer", *refused)


def test_each_renamed_model_flag_reaches_its_own_config_field(configure):
    """The k-gram's and the LSTM's fields whose flags have other names (--kgram_k is k,
    --num_inner_mlp_layers num_inner_layers, --kgram_chunk_size chunk_size, --lstm_layers
    num_layers), each given a value no other flag has: a field read from the wrong flag (the
    two layer counts share their default, 1) trained another model than the one asked for."""
    config = configure("--models", "kgram_mlp_seq,lstm_seq", "--kgram_k", "5", "--block_size", "32",
                       "--kgram_variant", "onehot", "--num_inner_mlp_layers", "3",
                       "--kgram_chunk_size", "7", "--lstm_layers", "2", "--embed_size", "24")
    kgram, lstm = config.models.kgram, config.models.lstm
    assert (kgram.k, kgram.variant, kgram.num_inner_layers, kgram.chunk_size, kgram.embed_size) == (
        5, "onehot", 3, 7, 24)
    assert (lstm.num_layers, lstm.embed_size) == (2, 24)


@pytest.mark.parametrize("argv", [
    ["--models", "transformer", "--attention", "softmax", "--attention_maps"],
    ["--models", "transformer", "--d_model", "30", "--n_heads", "4", "--head_size", "8"],
    ["--models", "transformer", "--attention", "gated_linear", "--linear_attention_gate", "fixed"],
], ids=lambda argv: " ".join(argv[2:]))
def test_a_transformer_command_each_check_must_let_through_is_accepted(configure, argv):
    """The accepted side of three Transformer checks: --attention softmax written out with
    --attention_maps, an explicit --head_size (d_model need not then divide by n_heads), and
    the gate of gated_linear. Mutants that refused the first two left the suite passing."""
    configure(*argv)


@pytest.mark.parametrize("field", ["sliding_window", "nope_interval"])
def test_a_mask_length_is_accepted_up_to_int32s_largest(pico, configure, field):
    """Positions are int32 in the masks: 2**31 - 1 is the last length accepted, 2**31 the
    first refused (as EDGES in test_cli.py, on the config itself, since no training command
    with a window past --block_size is accepted)."""
    config = configure("--models", "transformer").models.transformer
    pico.validate_transformer_config(dataclasses.replace(config, **{field: 2**31 - 1}))
    with pytest.raises(pico.UserError, match=f"--{field} must be at most 2147483647"):
        pico.validate_transformer_config(dataclasses.replace(config, **{field: 2**31}))


def test_accounting_configured_reports_the_transformer_variant_given(run_main):
    """A bare --accounting reports --transformer_variant's preset, with the overrides: the
    same numbers as --accounting naming that preset, under the label "<preset> (configured)".
    Config.transformer_variant taken as pico whatever the flag had left test_accounting.py
    passing."""
    status, configured, err = run_main("--accounting", "--transformer_variant", "minGPT")
    assert status == 0, err
    status, named, err = run_main("--accounting", "minGPT")
    assert status == 0, err
    assert configured.splitlines()[0].startswith("minGPT (configured)"), configured
    assert configured.splitlines()[1:] == named.splitlines()[1:]


def test_a_closed_pipe_ends_a_checkpoints_export_with_0(pico, monkeypatch, capsys, tmp_path):
    """--export_hf from a --checkpoint trains nothing and prints after writing, as --generate
    and --accounting: `... | head` closing the pipe is status 0 and nothing said, not a run cut
    off (141)."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)     # main() swaps in /dev/null; put back after
    def reader_gone(config):
        raise BrokenPipeError
    monkeypatch.setattr(pico, "run_command", reader_gone)
    status = pico.main(["--checkpoint", str(tmp_path / "step_000001.pt"),
                        "--export_hf", str(tmp_path / "hf")])
    sys.stdout.close()
    assert status == 0
    assert capsys.readouterr().err == ""


def test_generate_samples_with_the_seed_given(run_main, tmp_path):
    """--generate draws its tokens from --seed: the same seed repeats the text, another seed
    gives another (at temperature 1, from a barely trained model, 16 tokens never agree). A
    sampler seeded with a constant whatever the flag left the suite passing."""
    save = tmp_path / "ckpt"
    assert run_main(*TINY_RUN, "--models", "lstm_seq", "--save_dir", str(save))[0] == 0
    checkpoint = str(save / "lstm_seq" / "step_000006.pt")
    texts = {}
    for seed in ("1", "2", "1"):
        status, out, err = run_main("--generate", "--checkpoint", checkpoint, "--seed", seed,
                                    "--max_new_tokens", "16", "--quiet")
        assert status == 0, err
        texts.setdefault(seed, set()).add(out)
    assert len(texts["1"]) == 1                 # the same seed: the same text
    assert texts["1"] != texts["2"]


def test_a_symlink_loop_found_by_pathlib_is_one_line_naming_the_path(pico, monkeypatch, capsys):
    """Python before 3.13 reports a path whose links loop, in Path.resolve(), as a RuntimeError
    ("Symlink loop from '...'"), not as OSError ELOOP: main() says it as the ELOOP line, status
    2, not a traceback."""
    def resolves_a_loop(config):
        raise RuntimeError("Symlink loop from '/tmp/a/loop'")
    monkeypatch.setattr(pico, "run_command", resolves_a_loop)
    assert pico.main(["--epochs", "1", "--device_id", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "pico-llm: error: /tmp/a/loop: a symbolic link on this path leads round in a loop; "
        "choose another path\n")
