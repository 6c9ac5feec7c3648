"""Appendix E: Hugging Face interop, checked against transformers itself on tiny random GPT-2
and Llama models built from configs (offline: nothing is downloaded)."""

import ast
import copy
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import SCRIPT  # noqa: E402

PROMPT = [5, 17, 42, 7, 99, 3]


def perturbed(model):
    """Random init leaves norm weights at 1 and biases at 0, where a wrong mapping would hide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def trained(model, steps=3, seed=0):
    """A few AdamW steps on random tokens: every weight, norm and bias moves."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (17, 4), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(tokens[:-1])                                       # (T, B, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """ids (T, B) as pico-llm takes them -> HF logits as (T, B, V); HF takes (B, T)."""
    with torch.no_grad():
        return hf_model(ids.t()).logits.transpose(0, 1)


def pico_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def random_ids(vocab_size, seq_len=12, batch=2):
    return torch.randint(0, vocab_size, (seq_len, batch), generator=torch.Generator().manual_seed(3))


def save_hf(pico, model, directory, tokenizer=None):
    model.save_pretrained(directory)
    if tokenizer is not None:
        pico.tokenizer_to_hf(tokenizer).save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(pico, tmp_path_factory):
    """A 2-block GPT-2 with GPT-2's 50257-token vocabulary and no tokenizer files (shared by
    the tests of this file: a test that changes it works on its own copy)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return save_hf(pico, perturbed(transformers.GPT2LMHeadModel(config)),
                   tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture
def own_gpt2_dir(gpt2_dir, tmp_path):
    return shutil.copytree(gpt2_dir, tmp_path / "gpt2")


def make_llama_dir(pico, directory, tied=False, **overrides):
    """A 2-block Llama with grouped-query attention (4 heads, 2 key/value heads), theta 5e5,
    a 300-token embedding and, as tokenizer.json, pico-llm's byte tokenizer (eos 256)."""
    torch.manual_seed(0)
    settings = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, num_hidden_layers=2, vocab_size=300,
                    max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=tied,
                    eos_token_id=256, bos_token_id=256)
    config = transformers.LlamaConfig(**(settings | overrides))
    model = perturbed(transformers.LlamaForCausalLM(config))
    return save_hf(pico, model, directory, pico.ByteTokenizer())


@pytest.fixture
def llama_dir(pico, tmp_path):
    return make_llama_dir(pico, tmp_path / "llama")


# --- E.1-E.3 Import: pico-llm computes what transformers computes ---------------------------

def check_same_model(pico, pico_model, directory, vocab_size):
    """Same logits (to 1e-4) and the same 20 greedy tokens in both libraries."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = random_ids(vocab_size)
    torch.testing.assert_close(pico_logits(pico_model, ids), hf_logits(hf_model, ids),
                               atol=1e-4, rtol=1e-4)
    greedy = pico.generate_ids(pico_model, PROMPT, 20, pico.SamplingRule(temperature=0.0),
                               eot_id=hf_model.config.eos_token_id)
    expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                                 pad_token_id=hf_model.config.eos_token_id)
    assert greedy == expected[0].tolist()


def test_gpt2_import_gives_hf_logits_greedy_tokens_and_gpt2_tokenizer(pico, gpt2_dir):
    model, tokenizer = pico.import_hf(gpt2_dir)
    assert model.config.norm == "layernorm" and model.config.pos_emb == "learned"
    assert isinstance(tokenizer, pico.GPT2Tokenizer)
    check_same_model(pico, model, gpt2_dir, 50257)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_import_gives_hf_logits_and_greedy_tokens(pico, tmp_path, tied):
    directory = make_llama_dir(pico, tmp_path / "llama", tied)
    model, tokenizer = pico.import_hf(directory)
    config = model.config
    assert (config.n_kv_heads, config.rope_theta, config.norm_eps, config.tie_weights) == (
        2, 5e5, 1e-6, tied)
    assert model.blocks[0].attention_norm.eps == 1e-6
    assert isinstance(tokenizer, pico.HFTokenizer) and tokenizer.eot_id == 256
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"
    check_same_model(pico, model, directory, 300)


def test_llama_with_biases_imports(pico, tmp_path):
    directory = make_llama_dir(pico, tmp_path / "llama", attention_bias=True, mlp_bias=True)
    model, _ = pico.import_hf(directory)
    assert model.config.bias
    check_same_model(pico, model, directory, 300)


def test_imports_may_have_more_blocks_than_the_course_suggests(pico, tmp_path):
    directory = make_llama_dir(pico, tmp_path / "llama", num_hidden_layers=11)
    model, _ = pico.import_hf(directory)
    assert len(model.blocks) == 11


def test_rope_rows_permutation_round_trips(pico):
    rows = torch.arange(4 * 8 * 3).reshape(32, 3).float()
    assert torch.equal(pico.rope_rows_to_hf(pico.rope_rows_to_pico(rows, 4), 4), rows)
    # within a head of 8 dims: pico-llm's pair (0, 1) is HF's dims (0, 4)
    assert pico.rope_rows_to_pico(torch.arange(8), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("tied", [True, False])
def test_pytorch_model_bin_and_old_gpt2_names_load(pico, tmp_path, gpt2_dir, tied):
    """The hub's gpt2 files name tensors without "transformer." and carry causal-mask buffers
    (a float or a bool mask, and masked_bias), which are no weights; an untied fine-tune's
    output layer keeps its own name, lm_head.weight."""
    if not tied:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         tie_word_embeddings=False)
        gpt2_dir = save_hf(pico, perturbed(transformers.GPT2LMHeadModel(config)), tmp_path / "new")
    state = load_file(gpt2_dir / "model.safetensors")
    assert ("lm_head.weight" in state) is not tied
    old = {name.removeprefix("transformer."): tensor for name, tensor in state.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    old["h.1.attn.bias"] = torch.ones(64, 64, dtype=torch.bool).tril().view(1, 1, 64, 64)
    old["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "config.json").write_text((gpt2_dir / "config.json").read_text())
    torch.save(old, directory / "pytorch_model.bin")
    model, _ = pico.import_hf(directory)
    assert model.config.tie_weights is tied
    check_same_model(pico, model, gpt2_dir, 50257)


def test_sharded_safetensors_load(pico, tmp_path, llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in halves.items():
        save_file({name: state[name] for name in shard_names}, llama_dir / shard,
                  metadata={"format": "pt"})
    (llama_dir / "model.safetensors").unlink()
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size},
         "weight_map": {name: shard for shard, ns in halves.items() for name in ns}}))
    model, _ = pico.import_hf(llama_dir)
    check_same_model(pico, model, llama_dir, 300)


def test_shards_that_hold_a_tensor_twice_are_refused(pico, llama_dir):
    """The later shard's copy had replaced the earlier's, silently: another model than the
    index describes (random weights under a real model's names, say)."""
    state = load_file(llama_dir / "model.safetensors")
    save_file(state, llama_dir / "a.safetensors", metadata={"format": "pt"})
    twice = sorted(state)[0]
    save_file({twice: torch.randn_like(state[twice])}, llama_dir / "b.safetensors",
              metadata={"format": "pt"})
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "a.safetensors" for name in state}
         | {twice: "b.safetensors"}}))
    message = f"tensor {re.escape(twice)} is in both a.safetensors and b.safetensors"
    one_line_error(pico, message, pico.import_hf, llama_dir)
    one_line_error(pico, message, pico.read_hf_shapes, llama_dir)   # from the headers, first
    one_line_error(pico, message, pico.read_hf_weights, llama_dir)  # and from the tensors


# --- E.1-E.2 The families people fine-tune: Llama 3.x, Qwen2/2.5, Qwen3, SmolLM3, GPT-oss ---------
# Each built offline by transformers' own class from a small config (shapes chosen so that the
# family's parts are all exercised), weights perturbed, saved with save_pretrained.

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             num_hidden_layers=2, vocab_size=300, max_position_embeddings=64,
             eos_token_id=256, bos_token_id=256, pad_token_id=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    # Llama 3.2's shape: tied, theta 5e5, llama3 RoPE scaling (original context as short as the
    # model's, so that the 8 head pairs span kept, blended and slowed frequencies)
    "llama3.2": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                          "rope_theta": 10000.0})),
    "llama dynamic": ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                           "rope_theta": 10000.0})),
    "llama yarn": ("LlamaConfig", dict(rope_parameters={  # truncate absent: true
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 64})),
    "qwen2.5": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen3: head_dim 32 with 4 heads on a width of 64 (as Qwen3-0.6B: 128 x 16 on 1024)
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2)),
    # GPT-oss's released shape in miniature: head_dim independent of the width, alternating
    # sliding and full layers, YaRN without truncation, biased router and experts, sinks
    "gpt-oss": ("GptOssConfig", dict(head_dim=24, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=5, rope_parameters={
                                         "rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                         "original_max_position_embeddings": 16})),
}
FAMILY_FIELDS = {  # what each must import as
    "llama3.2": dict(rope_scaling="llama3", yarn_factor=8.0, tie_weights=True),
    "llama linear": dict(rope_scaling="linear", yarn_factor=4.0),
    "llama dynamic": dict(yarn_factor=1.0),
    "llama yarn": dict(rope_scaling="yarn_truncated", yarn_factor=4.0),
    "qwen2.5": dict(qkv_bias=True, bias=False, rope_theta=1e6),
    "qwen3": dict(qk_norm=True, head_size=32, head_dim=32),
    "smollm3": dict(nope_interval=2),
    "gpt-oss": dict(n_experts=4, attention_sinks=True, sliding_window=5, head_dim=24,
                    ffn="clamped_swiglu", rope_scaling="yarn", yarn_factor=8.0, bias=True),
}


def make_family_dir(pico, directory, family):
    class_name, settings = FAMILIES[family]
    config = getattr(transformers, class_name)(**(SMALL | settings))
    torch.manual_seed(0)
    model = perturbed(transformers.AutoModelForCausalLM.from_config(config))
    if family == "gpt-oss":  # large enough that the experts' clamps at +-7 are reached
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "experts" in name:
                    parameter.normal_(std=0.6)
                elif "sinks" in name:
                    parameter.normal_(std=1.0)
    return save_hf(pico, model, directory, pico.ByteTokenizer())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_imports_with_hf_logits_and_greedy_tokens_and_exports_back(pico, tmp_path, family):
    """Logits within 1e-4 of transformers' class, the same 20 cached greedy tokens as its
    generate(), and an export that loads in transformers with the same logits and re-imports
    to the same config."""
    directory = make_family_dir(pico, tmp_path / "hf", family)
    model, tokenizer = pico.import_hf(directory)
    for name, value in FAMILY_FIELDS[family].items():
        assert getattr(model.config, name) == value, name
    assert pico.parameter_count(model.config, 300) == pico.count_parameters(model)  # memory check
    check_same_model(pico, model, directory, 300)
    model = trained(model)  # every weight moves before the way back
    pico.export_hf(model, tokenizer, tmp_path / "out")
    exported = json.loads((tmp_path / "out/config.json").read_text())
    assert exported["model_type"] == json.loads((directory / "config.json").read_text())["model_type"]
    check_same_model(pico, model, tmp_path / "out", 300)
    assert pico.config_from_hf(exported) == model.config


def test_smollm3_nope_blocks_ignore_positions(pico, tmp_path):
    """With nope_interval 2, block 1 rotates nothing: pico-llm applies it per block."""
    model, _ = pico.import_hf(make_family_dir(pico, tmp_path / "hf", "smollm3"))
    assert [block.uses_rope for block in model.blocks] == [True, False]


def test_llama3_frequencies_match_transformers(pico):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32,
                                      rope_parameters=dict(LLAMA3_ROPE, factor=32.0,
                                                           original_max_position_embeddings=8192))
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config)
    frequency = pico.llama3_frequencies(64, 500000.0, 32.0, 8192)
    torch.testing.assert_close(frequency, expected, rtol=1e-6, atol=0)
    assert attention_factor == 1.0
    plain = pico.yarn_frequencies(64, 500000.0, 1.0, 8192)[0]
    assert frequency[0] == plain[0] and frequency[-1] == plain[-1] / 32  # kept, slowed


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_truncation_matches_transformers(pico, truncate):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "truncate": truncate,
        "original_max_position_embeddings": 512})
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    frequency, factor = pico.rope_frequencies(64, 10000.0, "yarn_truncated" if truncate else "yarn",
                                              8.0, 512)
    torch.testing.assert_close(frequency, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)
    other, _ = pico.rope_frequencies(64, 10000.0, "yarn" if truncate else "yarn_truncated", 8.0, 512)
    assert not torch.allclose(other, expected)  # the flag matters at this shape


@pytest.mark.parametrize("change", [
    dict(sliding_window=None), dict(sliding_window=0),
    dict(layer_types=["full_attention"] * SMALL["num_hidden_layers"])],
                         ids=["null window", "zero window", "no sliding layer"])
def test_gpt_oss_without_a_window_or_sliding_layers_imports_with_no_window(pico, change):
    """A GPT-oss config.json whose window is null or 0, or none of whose layers slide, is the
    same model with full attention in every block: the windowed config less its window."""
    class_name, settings = FAMILIES["gpt-oss"]
    hf_config = getattr(transformers, class_name)(**(SMALL | settings)).to_dict()
    windowed = pico.config_from_hf(hf_config)
    assert windowed.sliding_window                          # the family's shape slides ...
    config = pico.config_from_hf(hf_config | change)
    assert config == dataclasses.replace(windowed, sliding_window=0)    # ... this one does not
    assert [config.window(block) for block in range(config.n_blocks)] == [None] * config.n_blocks



@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_a_config_json_leaving_out_every_default_imports_the_same_model(pico, family):
    """A hand-written or older config.json lists only what differs from its class's defaults,
    where save_pretrained writes every key: a key left out means what transformers assumes (layer norm epsilons, Qwen3's head_dim, SmolLM3's tying
    and theta, GPT-oss's router loss, YaRN's original context)."""
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=300,
                                         n_positions=64)
    else:
        class_name, settings = FAMILIES[family]
        config = getattr(transformers, class_name)(**(SMALL | settings))
    everything, defaults = config.to_dict(), type(config)().to_dict()
    left_out = {key: value for key, value in everything.items()
                if key not in defaults or value != defaults[key]}
    assert len(left_out) < len(everything)
    assert pico.config_from_hf(left_out | {"model_type": everything["model_type"]}) == \
        pico.config_from_hf(everything)


@pytest.mark.parametrize("family, settings", [
    ("qwen3", {}),                                      # head_dim 128, not width / heads
    ("llama yarn", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                         "rope_theta": 10000.0}))],   # no original context
                         ids=["qwen3 head_dim", "yarn original context"])
def test_a_config_json_leaving_out_a_size_the_family_defines_takes_transformers_value(
        pico, family, settings):
    """Qwen3's head_dim is 128 whatever the width, and YaRN's original context is the model's
    own when rope_parameters leave it out: what transformers' config class fills in."""
    class_name, _ = FAMILIES[family]
    written = SMALL | settings | {"model_type": getattr(transformers, class_name).model_type}
    # a copy: the config class fills the missing keys into the rope_parameters dict it is given
    filled_in = getattr(transformers, class_name)(**copy.deepcopy(written)).to_dict()
    assert "original_max_position_embeddings" not in str(written)
    assert pico.config_from_hf(written) == pico.config_from_hf(filled_in)
    config = pico.config_from_hf(written)
    if family == "qwen3":
        assert config.head_dim == 128 != SMALL["hidden_size"] // SMALL["num_attention_heads"]
    else:
        assert config.yarn_original_context == SMALL["max_position_embeddings"] != 4096


def test_a_gpt_oss_config_without_its_window_key_takes_transformers_default(pico):
    """A key config.json leaves out means what transformers' config class assumes: for
    GPT-oss's sliding_window that is a 128-token window (it had been read as no window, and
    the outputs parted from transformers' past 128 tokens)."""
    class_name, settings = FAMILIES["gpt-oss"]
    hf_config = getattr(transformers, class_name)(**(SMALL | settings)).to_dict()
    left_out = {key: value for key, value in hf_config.items() if key != "sliding_window"}
    assert getattr(transformers, class_name)(**left_out).sliding_window == 128
    assert pico.config_from_hf(left_out).sliding_window == 128


@pytest.mark.parametrize("family, change, match", [
    ("gpt-oss", dict(swiglu_limit=5.0), "swiglu_limit=5.0"),
    ("gpt-oss", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types="),
    ("gpt-oss", dict(attention_bias=False), "attention_bias=False"),
    ("smollm3", dict(no_rope_layers=[0, 1]), r"no_rope_layers=\[0, 1\]"),
    ("smollm3", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True"),
    ("qwen2.5", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("qwen3", dict(layer_types=["sliding_attention"] * 2), "layer_types with sliding_attention"),
])
def test_family_settings_pico_llm_does_not_compute_are_refused(pico, tmp_path, family, change,
                                                               match):
    class_name, settings = FAMILIES[family]
    hf_config = getattr(transformers, class_name)(**(SMALL | settings)).to_dict() | change
    one_line_error(pico, match, pico.config_from_hf, hf_config)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("family, change, match", [
    ("llama yarn", dict(rms_norm_eps="abc"), "rms_norm_eps='abc' is not a number"),
    ("llama yarn", dict(rms_norm_eps=[1]), r"rms_norm_eps=\[1\] is not a number"),
    ("llama yarn", dict(rms_norm_eps=INF), "rms_norm_eps=inf must be a finite number above 0"),
    ("llama yarn", dict(rms_norm_eps=-1.0), "rms_norm_eps=-1.0 must be a finite number above 0"),
    ("llama yarn", dict(rms_norm_eps=NAN), "rms_norm_eps=nan must be"),
    ("llama yarn", dict(rope_parameters="abc"), "rope_parameters='abc' is not an object"),
    ("llama yarn", dict(rope_parameters=None, rope_scaling=[1]), r"rope_scaling=\[1\] is not"),
    ("llama yarn", dict(model_type=["llama"]), r"model_type=\['llama'\] is not supported"),
    ("llama yarn", dict(tie_word_embeddings="false"),
     "tie_word_embeddings='false' is not a boolean"),
    ("llama yarn", dict(mlp_bias="yes"), "mlp_bias='yes' is not a boolean"),
    ("qwen2.5", dict(layer_types=5), "layer_types=5 is not a list"),
    ("gpt-oss", dict(layer_types=3), "layer_types=3 is not a list"),
    ("gpt-oss", dict(sliding_window="5"), "sliding_window='5' is not an integer"),
    ("gpt-oss", dict(sliding_window=5.5), "sliding_window=5.5 is not an integer"),
    ("gpt-oss", dict(sliding_window=1e30), r"sliding_window=1e\+30 is not an integer"),
    ("gpt-oss", dict(sliding_window=-5), "sliding_window=-5 must be an integer at least 0"),
    ("gpt-oss", dict(sliding_window=10**11), f"sliding_window={10**11} must be an integer at "
                                             "least 0 and at most 2147483647"),
    # past MAX_INTEGER, as the command line says it: no digits written out, whatever the bounds
    ("gpt-oss", dict(sliding_window=10**30), "sliding_window is a 31-digit number, beyond any "
                                             "number pico-llm can hold"),
    ("gpt-oss", dict(num_experts_per_tok=8), "num_experts_per_tok=8 must be an integer above 0 "
                                             "and at most 4"),
    ("gpt-oss", dict(router_aux_loss_coef="x"), "router_aux_loss_coef='x' is not a number"),
    ("qwen3", dict(max_position_embeddings=10**12), f"max_position_embeddings={10**12} must be an "
                                                     "integer above 0 and at most 16777216"),
    ("gpt-oss", dict(router_aux_loss_coef=-1), "router_aux_loss_coef=-1 must be a finite number "
                                               "at least 0"),
    # past a float's range: the memory check's arithmetic had failed with OverflowError
    *[("llama yarn", {key: 10**400}, f"{key} is a 401-digit number, beyond any number")
      for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                  "num_attention_heads", "max_position_embeddings")],
    # as many blocks as --n_blocks takes at most: SmolLM3 and GPT-oss make a list of one entry
    # a block before anything else looks at the count (10**13 had run out of memory)
    *[(family, dict(num_hidden_layers=10**13), "num_hidden_layers=10000000000000 must be an "
                                               "integer above 0 and at most 1000")
      for family in ("smollm3", "gpt-oss", "qwen3")],
] + [("llama yarn", dict(rope_parameters=FAMILIES["llama yarn"][1]["rope_parameters"] | bad), match)
     for bad, match in [
         (dict(rope_theta="x"), "rope_parameters.rope_theta='x' is not a number"),
         (dict(rope_theta=True), "rope_parameters.rope_theta=True is not a number"),
         *[(dict(rope_theta=theta), f"rope_parameters.rope_theta={theta} must be a finite number "
                                    "above 0") for theta in (0, -5, NAN, INF)],
         *[(dict(factor=factor), f"rope_parameters.factor={factor} must be a finite number at "
                                 "least 1") for factor in (NAN, INF)],
         (dict(original_max_position_embeddings="abc"),
          "rope_parameters.original_max_position_embeddings='abc' is not an integer"),
         (dict(original_max_position_embeddings=-64),
          "rope_parameters.original_max_position_embeddings=-64 must be an integer above 0"),
         (dict(truncate="false"), "rope_parameters.truncate='false' is not a boolean"),
         (dict(factor=10**400), r"rope_parameters.factor is a 401-digit number, beyond any "
                                r"number pico-llm can hold \(a float's range\)"),
         (dict(rope_theta=10**400), "rope_parameters.rope_theta is a 401-digit number")]])
def test_config_values_of_the_wrong_type_or_out_of_range_are_refused(pico, family, change, match):
    """Each as the command line refuses the same setting, in one line naming key and value."""
    class_name, settings = FAMILIES[family]
    hf_config = getattr(transformers, class_name)(**(SMALL | settings)).to_dict() | change
    one_line_error(pico, match, pico.config_from_hf, hf_config)


def test_gpt2_with_more_blocks_than_n_blocks_takes_is_refused(pico, gpt2_dir):
    hf_config = json.loads((gpt2_dir / "config.json").read_text()) | {"n_layer": 1001}
    one_line_error(pico, "n_layer=1001 must be an integer above 0 and at most 1000",
                   pico.config_from_hf, hf_config)
    assert pico.config_from_hf(hf_config | {"n_layer": 1000}).n_blocks == 1000


def test_gpt2_epsilon_that_is_not_a_number_is_refused(pico, gpt2_dir):
    hf_config = json.loads((gpt2_dir / "config.json").read_text()) | {"layer_norm_epsilon": "x"}
    one_line_error(pico, "layer_norm_epsilon='x' is not a number", pico.config_from_hf, hf_config)


def test_gpt2_width_that_its_heads_do_not_divide_is_refused(pico, gpt2_dir):
    hf_config = json.loads((gpt2_dir / "config.json").read_text())
    hf_config |= {"n_embd": hf_config["n_head"] * 8 + 1}
    one_line_error(pico, f"a width of {hf_config['n_embd']} with {hf_config['n_head']} heads",
                   pico.config_from_hf, hf_config)


def test_gpt2_positions_beyond_what_float32_positions_count_are_refused(pico, gpt2_dir):
    """Learned positions of 10**12 would be a terabyte-sized table: out of memory, not a limit."""
    hf_config = json.loads((gpt2_dir / "config.json").read_text()) | {"n_positions": 2**24 + 1}
    one_line_error(pico, f"n_positions={2**24 + 1} must be an integer above 0 and at most 16777216",
                   pico.config_from_hf, hf_config)


def test_config_json_nested_too_deeply_is_refused(pico, tmp_path):
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    one_line_error(pico, "cannot read .*config.json: maximum recursion depth",
                   pico.load_hf_directory, tmp_path)


def test_released_gpt_oss_config_maps_onto_the_preset_shape(pico):
    """openai/gpt-oss-20b's config.json (its keys and values, quantization left out): 64 heads of
    64 on a width of 2880, alternating windows of 128, YaRN x32 untruncated."""
    released = {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
        "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "rms_norm_eps": 1e-05, "rope_scaling": {
            "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}
    config = pico.config_from_hf(released)
    assert (config.head_dim, config.head_size, config.n_heads, config.n_kv_heads) == (64, 64, 64, 8)
    assert (config.sliding_window, config.window(0), config.window(1)) == (128, 128, None)
    assert (config.rope_scaling, config.yarn_factor, config.yarn_original_context) == ("yarn", 32.0, 4096)
    assert (config.n_experts, config.experts_per_token, config.router_aux_loss_coef) == (32, 4, 0.9)
    assert pico.parameter_count(config, config.vocab_size) == pytest.approx(20.9e9, rel=0.01)



# --- E.5 Export: transformers computes what pico-llm computes ---------------------------------

EXPORTABLE = {
    "gpt2 tied": dict(ffn="gelu", norm="layernorm", pos_emb="learned", bias=True, tie_weights=True),
    "gpt2 untied": dict(ffn="gelu", norm="layernorm", pos_emb="learned", bias=True,
                        tie_weights=False),
    "gpt2 exact gelu": dict(ffn="gelu_exact", norm="layernorm", pos_emb="learned", bias=True,
                            tie_weights=True),
    "llama gqa untied": dict(n_kv_heads=2, tie_weights=False, rope_theta=5e5),
    "llama tied bias": dict(tie_weights=True, bias=True),
}


@pytest.mark.parametrize("settings", EXPORTABLE.values(), ids=EXPORTABLE.keys())
def test_exported_model_loads_in_transformers_with_the_same_logits(pico, tmp_path, settings):
    torch.manual_seed(0)
    config = pico.TransformerConfig(vocab_size=257, block_size=32, d_model=32, n_heads=4,
                                    n_blocks=2, **settings)
    model = trained(pico.TransformerModel(config))
    pico.export_hf(model, pico.ByteTokenizer(), tmp_path / "out")
    check_same_model(pico, model, tmp_path / "out", 257)
    assert pico.config_from_hf(json.loads((tmp_path / "out/config.json").read_text())) == config


SMALL_PRESETS = {"pico": {}, "minGPT": dict(d_model=48, n_blocks=2),
                 "GPT2-small": dict(d_model=48, n_blocks=2, d_ff=192),
                 "GPT-oss": dict(d_model=64, n_blocks=4, d_ff=64, sliding_window=5),
                 "Llama3-lite": dict(d_model=64, n_blocks=2), "speedrun": {}}


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_every_preset_exports(pico, tmp_path, preset):
    """Each preset in miniature (its structure kept): GPT-2, Llama, Qwen3 (speedrun: QK-norm) or
    GPT-oss in transformers. (Value embeddings and U-net skips, which no transformers class
    computes, are refused: test_export_refuses_settings_transformers_has_no_class_for.)"""
    assert set(SMALL_PRESETS) == set(pico.TRANSFORMER_PRESETS)
    torch.manual_seed(0)
    config = pico.TransformerConfig(vocab_size=257, block_size=32, **(
        pico.TRANSFORMER_PRESETS[preset] | SMALL_PRESETS[preset] | dict(dropout=0.0)))
    model = perturbed(pico.TransformerModel(config))
    pico.export_hf(model, pico.ByteTokenizer(), tmp_path / "out")
    check_same_model(pico, model, tmp_path / "out", 257)
    # every file readable as the umask allows, the weights too (safetensors writes them 0600)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~pico.current_umask()}, modes


@pytest.mark.parametrize("preset, change", [("GPT-oss", dict(sliding_window=0)),
                                            ("GPT2-small", dict(norm_eps=1e-2))],
                         ids=["GPT-oss without a window", "GPT-2 with its own epsilon"])
def test_an_export_keeps_what_differs_from_the_preset(pico, tmp_path, preset, change):
    """No window: transformers' GPT-oss refuses a config without one (it builds a sliding mask
    whatever its layers), so it is written as long as the context, and read back as none.
    A layer norm epsilon as the model has it. transformers computes the same logits."""
    torch.manual_seed(0)
    config = pico.TransformerConfig(vocab_size=257, block_size=32, **(
        pico.TRANSFORMER_PRESETS[preset] | SMALL_PRESETS[preset] | dict(dropout=0.0) | change))
    model = perturbed(pico.TransformerModel(config))
    pico.export_hf(model, pico.ByteTokenizer(), tmp_path / "out")
    check_same_model(pico, model, tmp_path / "out", 257)
    assert pico.config_from_hf(pico.read_hf_config(tmp_path / "out")) == config   # and back


REFUSED = {
    "norm_position": dict(norm_position="post"),
    "pos_emb=none": dict(pos_emb="none"),
    "pos_emb=sinusoidal": dict(pos_emb="sinusoidal"),
    "norm=none": dict(norm="none"),
    "ffn=silu": dict(ffn="silu"),
    "norm=rmsnorm": dict(pos_emb="learned", norm="rmsnorm", ffn="gelu", bias=True),
    "n_kv_heads": dict(pos_emb="learned", norm="layernorm", ffn="gelu", bias=True, n_kv_heads=2),
    "bias=False": dict(pos_emb="learned", norm="layernorm", ffn="gelu", bias=False),
    "attention_sinks": dict(attention_sinks=True),          # sinks come with GPT-oss's experts
    "sliding_window": dict(sliding_window=4),
    "attention=linear": dict(attention="linear"),
    "ffn=swiglu": dict(n_experts=4),                         # GPT-oss's experts are clamped
    "bias=True": dict(qk_norm=True, bias=True),              # Qwen3 biases no linear
    "ffn=relu2": dict(ffn="relu2"),
    "ffn=silu (gpt2)": dict(pos_emb="learned", norm="layernorm", ffn="silu", bias=True),
    "value_embeddings": dict(value_embeddings=True),
    "unet_skips": dict(unet_skips=True),
    "logit_softcap": dict(logit_softcap=15.0),
}


@pytest.mark.parametrize("setting", REFUSED)
def test_export_refuses_settings_transformers_has_no_class_for(pico, tmp_path, setting):
    config = pico.TransformerConfig(vocab_size=257, block_size=16, d_model=32, n_heads=4,
                                    n_blocks=1, **REFUSED[setting])
    with pytest.raises(pico.UserError, match=setting.split("=")[0]) as error:
        pico.export_hf(pico.TransformerModel(config), None, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_never_overwrites_a_non_empty_directory(pico, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    model = pico.TransformerModel(pico.TransformerConfig(vocab_size=257, block_size=16, d_model=32))
    with pytest.raises(pico.UserError, match="not empty"):
        pico.export_hf(model, None, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "empty").mkdir()
    os.chmod(tmp_path / "empty", 0o751)
    pico.export_hf(model, None, tmp_path / "empty")  # an empty directory is fine
    assert {p.name for p in (tmp_path / "empty").iterdir()} == {"config.json", "model.safetensors"}
    assert (tmp_path / "empty").stat().st_mode & 0o7777 == 0o751     # and keeps its mode
    pico.export_hf(model, None, tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o7777 == 0o777 & ~pico.current_umask()
    (tmp_path / "locked").mkdir(mode=0o500)
    pico.export_hf(model, None, tmp_path / "locked")
    assert (tmp_path / "locked").stat().st_mode & 0o7777 == 0o700   # its owner may use it


@pytest.mark.parametrize("name, match", [
    ("ff\udcff", "is not valid UTF-8"),          # a byte 0xff in the name, as Python reads it
    ("a" * 300, "longer than the 245 bytes"),
    ("a" * 250, "longer than the 245 bytes"),    # fits, but not with the staging directory's dots
    ("a" * 300 + "/out", "File name too long"),
], ids=["not UTF-8", "300 bytes", "250 bytes", "a folder of 300 bytes"])
def test_export_names_that_cannot_be_written_are_refused_before_writing(pico, tmp_path, name,
                                                                         match):
    one_line_error(pico, match, pico.check_export_directory, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# --- E.4 Tokenizers in both directions ----------------------------------------------------------

TEXT = "Hello world! It's 2024 —  naïve café, 東京.\n\n  spaces   and\ttabs 🙂 <|endoftext|>?"


@pytest.fixture(scope="module")
def tokenizers_to_export(pico):
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    return {"gpt2": pico.GPT2Tokenizer(), "char": pico.ByteTokenizer(),
            "bpe": pico.train_bpe_tokenizer(texts, 300, None)}


@pytest.mark.parametrize("name", ["gpt2", "char", "bpe"])
def test_exported_tokenizer_gives_pico_ids_in_transformers(pico, tmp_path, tokenizers_to_export, name):
    tokenizer = tokenizers_to_export[name]
    directory = tmp_path / name
    directory.mkdir()
    pico.tokenizer_to_hf(tokenizer).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ordinary = TEXT.replace("<|endoftext|>", "")  # pico-llm encodes it as text, HF as one id
    assert hf_tokenizer.encode(ordinary) == tokenizer.encode(ordinary)
    assert hf_tokenizer.decode(tokenizer.encode(ordinary)) == tokenizer.decode(tokenizer.encode(ordinary))
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id


def test_an_exported_bpe_whose_merges_make_the_same_bytes_twice_keeps_the_first_id(pico):
    """(ab, c) and (a, bc) both make b"abc": pico-llm's Tokenizer emits the first id made (258),
    and tokenizer.json can hold b"abc" under one id only, so it must be that one."""
    merges = [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"a", b"bc")]
    vocab = {i: bytes([i]) for i in range(256)} | {256 + i: a + b for i, (a, b) in enumerate(merges)}
    exported = pico.byte_level_bpe({**vocab, 260: b"<|endoftext|>"}, merges, {"<|endoftext|>": 260})
    tokenizer = pico.Tokenizer(vocab, merges)
    for text in ["abc", "abcabc bcabc", "aabcc cab", "xbc abcab"]:
        assert exported.encode(text).ids == tokenizer.encode(text), text
    assert 258 in tokenizer.encode("abc") and 259 not in tokenizer.encode("a abc abcabc")


def test_an_exported_models_tokenizer_knows_its_end_of_text_and_context_in_transformers(pico,
                                                                                       tmp_path):
    """Read back through AutoTokenizer: without eos_token, transformers' generate and pipelines
    never stop at end of text; without model_max_length it assumes a huge context, silently."""
    config = pico.TransformerConfig(vocab_size=257, d_model=16, n_heads=2, n_blocks=1, block_size=32)
    pico.export_hf(pico.TransformerModel(config), pico.ByteTokenizer(), tmp_path / "exported")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert hf_tokenizer.eos_token_id == 256 and hf_tokenizer.model_max_length == 32
    # batched generate pads with the end of text, and a BOS-adding pipeline has one to add
    assert hf_tokenizer.bos_token_id == 256
    assert transformers.AutoConfig.from_pretrained(tmp_path / "exported").pad_token_id == 256


def test_a_prompt_naming_a_special_token_is_covered_by_an_imported_tokenizer(pico, tmp_path):
    """The imported tokenizer reads <|endoftext|> as its one id, and its decode leaves special
    tokens out: the prompt had been noted as not covered ("the model reads ''")."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 256}))
    tokenizer = pico.tokenizer_from_hf(tmp_path, pico.TransformerConfig(vocab_size=257))
    assert tokenizer.encode("<|endoftext|>Once") == [256, *b"Once"]
    assert tokenizer.decode([256, *b"Once"]) == "Once"             # what generation prints
    assert pico.prompt_coverage_note(tokenizer, "<|endoftext|>") is None
    assert pico.prompt_coverage_note(tokenizer, "Once <|endoftext|> upon") is None


def test_a_config_listing_several_end_of_text_ids_ends_documents_with_the_first_and_stops_at_all(
        pico, tmp_path):
    """Llama 3's instruct models list three: the first ends a document, as pico-llm's eot, and
    generation stops at any (a chat model ends its turn with the third). The list travels in
    a checkpoint's tokenizer and into an export's config.json; ids no token has are left out."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [256, 10, 9999]}))
    tokenizer = pico.tokenizer_from_hf(tmp_path, pico.TransformerConfig(vocab_size=257))
    assert tokenizer.eot_id == 256 and tokenizer.stop_ids == {10}
    kept = pico.tokenizer_from_identity(pico.tokenizer_identity("hf", tokenizer))
    assert (kept.eot_id, kept.stop_ids) == (256, {10})
    config = pico.TransformerConfig(vocab_size=257, d_model=16, n_heads=2, n_blocks=1, block_size=32)
    assert pico.config_to_hf(config, 256, tokenizer.stop_ids)["eos_token_id"] == [256, 10]
    assert pico.config_to_hf(config, 256)["eos_token_id"] == 256
    model = pico.TransformerModel(config)
    drawn = iter(b"ab\ncd")
    with pytest.MonkeyPatch.context() as patch:    # the model "samples" a, b, newline (id 10), ...
        patch.setattr(pico, "sample_next_token", lambda *args: torch.tensor([next(drawn)]))
        sample = pico.generate_text(model, tokenizer, "x", 6)
    assert sample.new_text == "ab\n" and sample.token_ids[-3:] == [97, 98, 10]


def test_without_an_eos_token_id_the_end_of_text_token_is_found_by_name_or_refused(pico, tmp_path):
    """A config.json with no eos_token_id: the tokenizer's <|endoftext|>, or else its </s>
    (SentencePiece's), ends a document; with neither, one line names both places."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": None}))
    config = pico.TransformerConfig(vocab_size=257)
    assert pico.tokenizer_from_hf(tmp_path, config).eot_id == 256
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    for name, expected in (("</s>", 256), ("<pad>", None)):
        renamed = json.loads(json.dumps(saved).replace("<|endoftext|>", name))
        (tmp_path / "tokenizer.json").write_text(json.dumps(renamed))
        if expected is not None:
            assert pico.tokenizer_from_hf(tmp_path, config).eot_id == expected
            continue
        one_line_error(pico, r"config.json has no usable eos_token_id \(None\) and .*tokenizer.json"
                             r"'? no <\|endoftext\|> or </s>", pico.tokenizer_from_hf, tmp_path, config)


def test_a_tied_model_whose_file_also_holds_the_output_layer_imports(pico):
    """Some exporters write the tied lm_head.weight as well: the same tensor as the embedding,
    not an unknown weight."""
    config = pico.TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_blocks=1, block_size=16,
                                    tie_weights=True)
    model = pico.TransformerModel(config)
    hf_state = pico.state_dict_to_hf(config, model.state_dict())
    assert "lm_head.weight" not in hf_state
    embedding = next(name for name in hf_state if "embed_tokens" in name or "wte" in name)
    hf_state["lm_head.weight"] = hf_state[embedding].clone()
    state = pico.state_dict_from_hf(config, hf_state)
    assert torch.equal(state["unembedding.weight"], model.token_embedding.weight.detach())
    # an output layer of its own under a config that ties it: which one is meant is unknown
    hf_state["lm_head.weight"] = hf_state[embedding] + 0.5
    one_line_error(pico, r"config.json ties the output layer to the embedding "
                   r"\(tie_word_embeddings\), but the weights hold an lm_head.weight of its own",
                   pico.state_dict_from_hf, config, hf_state)


def test_gpt2_tokenizer_json_is_recognised_as_gpt2(pico, own_gpt2_dir, tokenizers_to_export):
    pico.tokenizer_to_hf(tokenizers_to_export["gpt2"]).save(str(own_gpt2_dir / "tokenizer.json"))
    config, _ = pico.load_hf_directory(own_gpt2_dir)
    assert isinstance(pico.tokenizer_from_hf(own_gpt2_dir, config), pico.GPT2Tokenizer)


def test_gpt2s_tokenizer_json_with_other_end_ids_keeps_them(pico, own_gpt2_dir, tokenizers_to_export):
    """GPT-2's vocabulary with config.json listing more end ids than 50256 (or another one):
    read through tokenizer.json, which keeps them, not as pico-llm's GPT-2 tokenizer."""
    pico.tokenizer_to_hf(tokenizers_to_export["gpt2"]).save(str(own_gpt2_dir / "tokenizer.json"))
    config, _ = pico.load_hf_directory(own_gpt2_dir)
    settings = json.loads((own_gpt2_dir / "config.json").read_text())
    # generation_config.json, as save_pretrained wrote it, still stops generation at 50256
    assert json.loads((own_gpt2_dir / "generation_config.json").read_text())["eos_token_id"] == 50256
    for eos, expected in (([50256, 41663], (50256, {41663})), (13, (13, {50256}))):
        (own_gpt2_dir / "config.json").write_text(json.dumps(settings | {"eos_token_id": eos}))
        tokenizer = pico.tokenizer_from_hf(own_gpt2_dir, config)
        assert isinstance(tokenizer, pico.HFTokenizer)
        assert (tokenizer.eot_id, tokenizer.stop_ids) == expected


def test_generation_config_adds_the_ids_generation_stops_at(pico, tmp_path):
    """Qwen's chat models name one end id in config.json (end of turn) and list it with the
    end of text in generation_config.json, which transformers' generate stops at: pico-llm
    stops at both, and the first still ends documents. A value that is no token id, or a
    generation_config.json that is no file, is refused in one line."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 256}))
    config = pico.TransformerConfig(vocab_size=257)
    generation = tmp_path / "generation_config.json"
    # ids outside the vocabulary (9999, 257, -1) are never drawn, and never exported as end ids
    for listed, stops in (([10, 256, 9999, 257, -1], {10}), (13, {13}), (None, set()), ([], set())):
        generation.write_text(json.dumps({"eos_token_id": listed}))
        tokenizer = pico.tokenizer_from_hf(tmp_path, config)
        assert (tokenizer.eot_id, tokenizer.stop_ids) == (256, stops)
    for listed in ("10", [10, 2.0], True):
        generation.write_text(json.dumps({"eos_token_id": listed}))
        one_line_error(pico, r"generation_config.json's eos_token_id .* is not a token id",
                       pico.tokenizer_from_hf, tmp_path, config)


def test_a_generation_config_that_cannot_be_read_is_left_out_with_a_note(pico, tmp_path, capsys):
    """transformers loads a model whose generation_config.json is no JSON, or missing behind a
    link, and generates with config.json's end ids: so does pico-llm, saying so."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [256, 10]}))
    generation = tmp_path / "generation_config.json"
    for make, said in ((lambda: generation.write_text("{not json"), "cannot read"),
                       (lambda: generation.write_text("[13]"), "is not a JSON object"),
                       (generation.mkdir, "is not a regular file"),
                       (lambda: os.mkfifo(generation), "is not a regular file"),   # never read
                       (lambda: generation.symlink_to(tmp_path / "gone"), "symbolic link to nothing")):
        make()
        tokenizer = pico.tokenizer_from_hf(tmp_path, pico.TransformerConfig(vocab_size=257))
        assert (tokenizer.eot_id, tokenizer.stop_ids) == (256, {10})
        err = capsys.readouterr().err
        assert err.startswith("pico-llm: note: ") and said in err and err.count("\n") == 1
        assert err.endswith("generation stops at config.json's end-of-text ids alone\n")
        generation.rmdir() if generation.is_dir() and not generation.is_symlink() else generation.unlink()


def test_gpt2_without_tokenizer_json_is_refused_where_it_ends_text_elsewhere(pico, own_gpt2_dir):
    """Without tokenizer.json a GPT-2 directory reads as pico-llm's GPT-2 tokenizer, which ends
    and stops at 50256 alone: a config.json or generation_config.json naming other end ids
    is refused rather than left out."""
    config, _ = pico.load_hf_directory(own_gpt2_dir)
    assert isinstance(pico.tokenizer_from_hf(own_gpt2_dir, config), pico.GPT2Tokenizer)
    settings = json.loads((own_gpt2_dir / "config.json").read_text())
    without = {key: value for key, value in settings.items() if key != "eos_token_id"}
    (own_gpt2_dir / "config.json").write_text(json.dumps(without))     # GPT-2's by default
    assert isinstance(pico.tokenizer_from_hf(own_gpt2_dir, config), pico.GPT2Tokenizer)
    for eos, ends in ((13, "[13, 50256]"), ([50256, 13], "[13, 50256]"), (99999, "[50256, 99999]")):
        (own_gpt2_dir / "config.json").write_text(json.dumps(settings | {"eos_token_id": eos}))
        one_line_error(pico, rf"has no tokenizer.json, and its end-of-text ids {re.escape(ends)} "
                             "are not GPT-2's 50256 alone", pico.tokenizer_from_hf, own_gpt2_dir,
                       config)
    (own_gpt2_dir / "config.json").write_text(json.dumps(settings | {"eos_token_id": 50256}))
    (own_gpt2_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 13]}))
    one_line_error(pico, r"are not GPT-2's 50256 alone", pico.tokenizer_from_hf, own_gpt2_dir, config)


@pytest.mark.parametrize("eos", [2.0, "2", True, [[2]], ["2", 3], [256, True], [256, 2.0]])
def test_an_eos_token_id_that_is_no_token_id_is_refused(pico, tmp_path, eos):
    """Not read as absent, which would end documents with whatever id <|endoftext|> has."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": eos}))
    one_line_error(pico, r"config.json's eos_token_id .* is not a token id; give it the "
                   "model's end-of-text id", pico.tokenizer_from_hf, tmp_path, pico.TransformerConfig(vocab_size=257))


def test_two_end_ids_of_one_tokenizer_json_tokenize_to_caches_of_their_own(pico, tmp_path):
    """A base model and its chat model share tokenizer.json but not the id that ends each
    example: the token cache of one is not the other's."""
    pico.tokenizer_to_hf(pico.ByteTokenizer()).save(str(tmp_path / "tokenizer.json"))
    keys = []
    for eos in (256, 10):
        (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": eos}))
        tokenizer = pico.tokenizer_from_hf(tmp_path, pico.TransformerConfig(vocab_size=257))
        examples = pico.tokenize_examples(["ab", "cd"], tokenizer, tmp_path / "cache")
        keys.append(examples.key)
    assert keys[0] != keys[1]


def test_hf_tokenizer_byte_lengths_count_utf8_bytes(pico, llama_dir):
    _, tokenizer = pico.import_hf(llama_dir)
    lengths = tokenizer.token_byte_lengths()
    assert len(lengths) == 300 and lengths[256] == 0 and (lengths[:256] == 1).all()


def test_hf_tokenizer_travels_in_a_checkpoint_identity(pico, llama_dir):
    _, tokenizer = pico.import_hf(llama_dir)
    identity = pico.tokenizer_identity(tokenizer.name, tokenizer)
    again = pico.tokenizer_from_identity(identity)
    assert (again.name, again.vocab_size, again.eot_id) == (tokenizer.name, 300, 256)
    assert again.encode(TEXT) == tokenizer.encode(TEXT)


def with_empty_character_map(directory):
    """`directory`'s tokenizer.json given a precompiled normalizer whose character map holds
    nothing: the tokenizers library panics (an index out of bounds) on any text it takes."""
    saved = json.loads((directory / "tokenizer.json").read_text())
    saved["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAAAAAA"}
    (directory / "tokenizer.json").write_text(json.dumps(saved))
    return saved


def test_a_tokenizer_json_the_library_panics_on_is_refused_in_one_line(pico, llama_dir):
    """A Rust panic reaches Python as pyo3's PanicException, derived from BaseException (so
    `except Exception` let it through as a traceback), after the panic hook has written it to
    standard error (with RUST_BACKTRACE, a backtrace too): the tokenizer is tried as it is read,
    those lines kept back. A checkpoint's stored tokenizer.json is tried the same way."""
    saved = with_empty_character_map(llama_dir)
    result = subprocess.run([sys.executable, str(SCRIPT), "--generate", "--init_from",
                             str(llama_dir), "--prompt", "hi", "--max_new_tokens", "2",
                             "--device_id", "cpu"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RUST_BACKTRACE": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(r"pico-llm: error: cannot use '?.*tokenizer\.json'?: its tokenizer fails "
                        r"on plain text: index out of bounds.*; give the model's own "
                        r"tokenizer\.json\n", result.stderr), result.stderr
    identity = {"spec": "hf", "name": "hf:x", "vocab_size": 300, "eot_id": 256,
                "tokenizer_json": json.dumps(saved)}
    with pytest.raises(ValueError, match="its tokenizer fails on plain text"):
        pico.tokenizer_from_identity(identity)


def test_a_tokenizer_json_saved_with_truncation_and_padding_encodes_whole_texts(pico, llama_dir):
    """A pipeline's settings a tokenizer.json may keep had cut every text to 4 tokens and
    padded it to 12 with id 0, silently, in training data and prompts alike."""
    saved = json.loads((llama_dir / "tokenizer.json").read_text())
    truncation = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    padding = {"strategy": {"Fixed": 12}, "direction": "Right", "pad_to_multiple_of": None,
               "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    saved.update(truncation=truncation, padding=padding)
    (llama_dir / "tokenizer.json").write_text(json.dumps(saved))
    _, tokenizer = pico.import_hf(llama_dir)
    assert tokenizer.encode_batch(["hello world", "hi"]) == [list(b"hello world"), list(b"hi")]
    # token caches this file's cut ids went into are not read again; a checkpoint's copy, as
    # --resume and --generate rebuild it, keys the same caches as the file
    assert tokenizer.fingerprint == f"{tokenizer.name}:256:uncut"
    again = pico.tokenizer_from_identity(pico.tokenizer_identity(tokenizer.name, tokenizer))
    assert again.fingerprint == tokenizer.fingerprint
    saved["truncation"] = saved["padding"] = None
    (llama_dir / "tokenizer.json").write_text(json.dumps(saved))
    _, tokenizer = pico.import_hf(llama_dir)
    assert tokenizer.fingerprint == f"{tokenizer.name}:256"
    for kept, setting in (("truncation", truncation), ("padding", padding)):   # either alone
        (llama_dir / "tokenizer.json").write_text(json.dumps({**saved, kept: setting}))
        _, tokenizer = pico.import_hf(llama_dir)
        assert tokenizer.fingerprint == f"{tokenizer.name}:256:uncut", kept


class Chatty:
    """A tokenizer library that writes a line of its own to the process's standard error as
    it works, and does not fail."""

    def encode(self, text, add_special_tokens=False):
        os.write(2, b"a note of the library's\n")
        return types.SimpleNamespace(ids=[1, 2])

    def decode(self, ids):
        return "ok"


def test_the_tokenizer_probe_gives_back_what_the_library_wrote_without_failing(pico, capfd,
                                                                               monkeypatch):
    """Standard error is held only to keep a panic's lines back; a tokenizer that works
    says what it says, and one with no standard error to hold (closed) is tried as it is."""
    pico.check_tokenizer_runs(Chatty())
    assert capfd.readouterr().err == "a note of the library's\n"

    def closed(fd):
        raise OSError(errno.EBADF, "Bad file descriptor")
    with monkeypatch.context() as patched:       # os's own dup: put back before pytest's needs it
        patched.setattr(pico.os, "dup", closed)
        pico.check_tokenizer_runs(Chatty())


def test_a_panic_while_the_library_reads_a_tokenizer_json_is_refused(pico, llama_dir, monkeypatch):
    """The file read from a model's folder, or a checkpoint's stored copy: a panic there
    (a BaseException) is the file's fault, as a plain Exception is."""
    tokenizers = pytest.importorskip("tokenizers")

    def panics(*args, **kwargs):
        raise PanicException("index out of bounds")
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", panics)
    with pytest.raises(ValueError, match=r"not a tokenizer.json \(index out of bounds\)"):
        pico.HFTokenizer.from_json("{}", 10, 0, "hf:x")
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", panics)
    config = pico.config_from_hf(json.loads((llama_dir / "config.json").read_text()))
    with pytest.raises(pico.UserError, match=r"tokenizer\.json.*index out of bounds"):
        pico.tokenizer_from_hf(llama_dir, config)


class PanicException(BaseException):
    """A Rust panic as pyo3 raises it: of that name, derived from BaseException."""


class PanickingLibrary:
    """A `tokenizers.Tokenizer` stand-in whose every method panics."""

    def __getattr__(self, name):
        def panic(*args, **kwargs):
            raise PanicException("index out of bounds: the len is 0 but the index is 0")
        return panic


@pytest.mark.parametrize("use, words", [
    (lambda pico, tokenizer: tokenizer.encode(TEXT), "cannot encode this text"),
    (lambda pico, tokenizer: tokenizer.decode([1, 2]), "cannot decode its ids"),
    (lambda pico, tokenizer: pico.check_tokenizer_covers(   # one text, "ab", and its end
        tokenizer, ["ab"], np.array([97, 98, 256]), np.array([0, 3])), "cannot decode its ids")],
    ids=["encode", "decode", "the coverage check's decode"])
def test_a_panic_in_the_tokenizer_library_while_it_runs_is_one_line(pico, llama_dir, use, words):
    """A text that makes the library panic, where the text it was tried on did not."""
    _, tokenizer = pico.import_hf(llama_dir)
    tokenizer.tokenizer = PanickingLibrary()
    with pytest.raises(pico.UserError, match=f"tokenizer.json \\(hf:[0-9a-f]+\\) {words} "
                                             r"\(index out of bounds"):
        use(pico, tokenizer)
    assert pico.rust_failure(PanicException()) and pico.rust_failure(Exception("x"))
    # pico-llm's own mistakes (a negative id: OverflowError) are not the file's fault
    for other in (OverflowError(), ValueError(), KeyboardInterrupt(), SystemExit(2)):
        assert not pico.rust_failure(other)



# --- E.4 Tokenizers of the families: encode and decode as transformers' AutoTokenizer -----------

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_TEXTS = [
    TEXT, "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text<|endoftext|>more text", "  leading and trailing spaces  ", "", "\n\n\n", "naïve 東京 🙂",
    "the cat sat on the mat<|im_end|><|im_end|>"]


def tiny_tokenizer(kind):
    """A 300-token BPE trained with the tokenizers library: byte-level as GPT-2, Llama 3, Qwen
    and SmolLM have it, or SentencePiece-style (Metaspace "▁", an <unk>) as Llama 2; with the
    chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = ["the cat sat on the mat", "the dog ran to the log", "What is 2 + 2? It is 4.",
             "naïve café in 東京"] * 30
    if kind == "byte-level":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CHAT_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", *CHAT_SPECIALS])
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tiny_tokenizer(directory, kind):
    """tokenizer.json and tokenizer_config.json as transformers writes them, eos <|im_end|>;
    config.json's and generation_config.json's eos_token_id set to match. Returns
    transformers' AutoTokenizer for it."""
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(kind), eos_token="<|im_end|>", bos_token="<|endoftext|>",
        clean_up_tokenization_spaces=False).save_pretrained(directory)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    for name in ("config.json", "generation_config.json"):
        if (directory / name).exists():
            settings = json.loads((directory / name).read_text())
            settings["eos_token_id"] = hf_tokenizer.eos_token_id
            (directory / name).write_text(json.dumps(settings))
    return hf_tokenizer


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_model_tokenizer_gives_each_tokens_bytes(pico, tmp_path, kind):
    """token_bytes (what bits per byte counts and the clusters label a lone byte with) from a
    tokenizer.json: byte-level BPE's characters are bytes, SentencePiece's "▁" a space."""
    tokenizer = pico.HFTokenizer(tiny_tokenizer(kind), vocab_size=310, eot_id=0, name="hf:test")
    text = "naïve café in the mat"
    spaced = text if kind == "byte-level" else " " + text   # Metaspace marks the first word too
    assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode(text)) == spaced.encode()
    if kind == "byte-level":
        lone = tokenizer.tokenizer.token_to_id(pico.BYTE_CHARS[0xC3])
        assert pico.token_label(tokenizer, lone) == "<0xC3>"
    assert tokenizer.token_bytes(305) == b""                # an id past the tokenizer's


def test_byte_fallback_tokens_count_as_the_byte_they_stand_for(pico):
    """Llama 2, Mistral and SentencePiece-style tokenizer.json files spell a character they have
    no piece for as byte tokens "<0x0A>", "<0xC3>", ...: each is one byte of text, not its six
    characters, or bits per byte for such a model would count those bytes six times over."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    specials = ["<unk>", "<s>", "</s>"]
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "▁a", "▁b"]
    model = models.BPE(vocab={piece: i for i, piece in enumerate(pieces)},
                       merges=[("▁", "a"), ("▁", "b")], unk_token="<unk>", byte_fallback=True)
    fallback = Tokenizer(model)
    fallback.pre_tokenizer = pre_tokenizers.Metaspace()
    fallback.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                          decoders.Fuse()])
    fallback.add_special_tokens(specials)
    tokenizer = pico.HFTokenizer(fallback, vocab_size=len(pieces), eot_id=pieces.index("</s>"),
                                 name="hf:byte-fallback")
    newline = fallback.token_to_id("<0x0A>")
    assert tokenizer.token_bytes(newline) == b"\n"
    lengths = tokenizer.token_byte_lengths()
    assert lengths[newline] == 1
    text = "a\nb é a"                                # "\n" and both bytes of "é" fall back
    ids = tokenizer.encode(text)
    assert newline in ids and fallback.token_to_id("<0xC3>") in ids
    spaced = (" " + text).encode()                   # Metaspace marks the first word too
    assert b"".join(map(tokenizer.token_bytes, ids)) == spaced
    assert sum(lengths[i] for i in ids) == len(spaced)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_model_tokenizer_encodes_and_decodes_as_transformers(pico, tmp_path, kind):
    directory = tmp_path / "hf"
    directory.mkdir()
    transformers.Qwen3Config(**(SMALL | FAMILIES["qwen3"][1])).save_pretrained(directory)
    hf_tokenizer = save_tiny_tokenizer(directory, kind)
    tokenizer = pico.tokenizer_from_hf(directory, pico.config_from_hf(
        json.loads((directory / "config.json").read_text())))
    assert tokenizer.eot_id == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for text in TOKENIZER_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    specials = tokenizer.encode("<|im_start|>x<|im_end|>")
    assert specials[0] == hf_tokenizer.convert_tokens_to_ids("<|im_start|>")  # one id, not text
    assert specials[-1] == tokenizer.eot_id


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_only_characters_without_a_token_count_as_lost(pico, tmp_path, capsys, kind):
    """Chat special tokens in the text are tokens, not lost characters; the Metaspace BPE
    makes what its training text lacked (🙂, p) <unk>, and the note names them."""
    directory = tmp_path / "hf"
    directory.mkdir()
    transformers.Qwen3Config(**(SMALL | FAMILIES["qwen3"][1])).save_pretrained(directory)
    save_tiny_tokenizer(directory, kind)
    capsys.readouterr()
    tokenizer = pico.tokenizer_from_hf(directory, pico.config_from_hf(
        json.loads((directory / "config.json").read_text())))
    pico.tokenize_examples(TOKENIZER_TEXTS, tokenizer, None)     # which checks what it made
    err = capsys.readouterr().err
    if kind == "byte-level":
        assert err == ""
    else:
        assert len(err.splitlines()) == 1 and "'🙂'" in err and "'p'" in err, err
        assert "'t'" not in err and "'<'" not in err, err


def test_a_tokenizer_that_composes_accents_loses_no_characters(pico, tmp_path, capsys):
    """Qwen's tokenizer.json normalizes text to NFC: decomposed accents (e + U+0301, Korean
    jamo) come back composed, the same text, not lost characters."""
    from tokenizers import Tokenizer, normalizers
    directory = tmp_path / "hf"
    directory.mkdir()
    transformers.Qwen3Config(**(SMALL | FAMILIES["qwen3"][1])).save_pretrained(directory)
    save_tiny_tokenizer(directory, "byte-level")
    saved = Tokenizer.from_file(str(directory / "tokenizer.json"))
    saved.normalizer = normalizers.NFC()
    saved.save(str(directory / "tokenizer.json"))
    tokenizer = pico.tokenizer_from_hf(directory, pico.config_from_hf(
        json.loads((directory / "config.json").read_text())))
    texts = [unicodedata.normalize("NFD", text) for text in ("café crème", "한국어 텍스트")] * 4
    assert tokenizer.decode(tokenizer.encode(texts[0])) != texts[0]          # composed back
    capsys.readouterr()
    pico.tokenize_examples(texts, tokenizer, None)
    assert capsys.readouterr().err == ""


# --- Refusals: one line that names the problem --------------------------------------------------

def one_line_error(pico, match, function, *args):
    with pytest.raises(pico.UserError, match=match) as error:
        function(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_directory_without_config_json_is_refused(pico, tmp_path):
    one_line_error(pico, "no config.json", pico.load_hf_directory, tmp_path)


def test_unsupported_architecture_is_refused(pico, tmp_path):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(tmp_path)
    one_line_error(pico, "model_type='bert'", pico.load_hf_directory, tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type='longrope'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                           "original_max_position_embeddings": 16}), "high_freq_factor=8.0"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0, "attention_factor": 2.0},
          rope_parameters=None), "attention_factor=2.0"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}, rope_parameters=None),
     "rope_scaling.factor=0.5 must be a finite number at least 1"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(quantization_config={"quant_method": "mxfp4"}), "quant_method='mxfp4'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=15), "even head size"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_size=None), "no hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers=0 must be an integer above 0"),
    (dict(num_key_value_heads=3), "3 key/value heads"),
])
def test_unsupported_llama_settings_are_refused(pico, llama_dir, change, match):
    hf_config = json.loads((llama_dir / "config.json").read_text()) | change
    one_line_error(pico, match, pico.config_from_hf,
                   {k: v for k, v in hf_config.items() if v is not None})


def test_unsupported_gpt2_activation_is_refused(pico, gpt2_dir):
    hf_config = json.loads((gpt2_dir / "config.json").read_text()) | {"activation_function": "relu"}
    one_line_error(pico, "activation_function='relu'", pico.config_from_hf, hf_config)


def test_tensor_with_the_wrong_shape_is_named(pico, own_gpt2_dir):
    state = load_file(own_gpt2_dir / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    save_file(state, own_gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    one_line_error(pico, r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \(32, 100\); config.json "
                   r"implies \(32, 128\)", pico.load_hf_directory, own_gpt2_dir)


def test_missing_and_unknown_tensors_are_named(pico, llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    one_line_error(pico, "q_norm.weight has no place", pico.load_hf_directory, llama_dir)
    del state["model.layers.0.self_attn.q_norm.weight"], state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    one_line_error(pico, "no tensor model.layers.1.mlp.up_proj.weight", pico.load_hf_directory,
                   llama_dir)


def test_unreadable_weights_are_refused(pico, llama_dir):
    weights = llama_dir / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])   # a download cut short
    message = one_line_error(pico, "cannot read .*model.safetensors: not a whole safetensors "
                             "file, truncated or damaged", pico.load_hf_directory, llama_dir)
    assert "torch.save" not in message
    weights.write_bytes(b"not safetensors")
    one_line_error(pico, "cannot read .*model.safetensors", pico.load_hf_directory, llama_dir)


def test_weights_this_user_may_not_read_are_said_so(pico, llama_dir, monkeypatch):
    """Not "download or export the model again": the file may be whole (as root, chmod cannot
    show this, so open is made to refuse)."""
    def refused(file, *args, **kwargs):
        if str(file).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied")
        return open(file, *args, **kwargs)
    with monkeypatch.context() as patched:
        patched.setattr(pico, "open", refused, raising=False)     # the headers' reader
        one_line_error(pico, r"cannot read .*model.safetensors: Permission denied; check its "
                       r"permissions$", pico.load_hf_directory, llama_dir)
    said = pico.weights_file_failure(PermissionError(13, "Permission denied"),
                                     llama_dir / "model.safetensors")
    assert said == "Permission denied; check its permissions"


def shard_in_two(llama_dir):
    """llama_dir's weights as two shards and an index; returns the index's JSON."""
    state = load_file(llama_dir / "model.safetensors")
    (llama_dir / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for shard, shard_names in (("a.safetensors", names[::2]), ("b.safetensors", names[1::2])):
        save_file({name: state[name] for name in shard_names}, llama_dir / shard)
        weight_map |= {name: shard for name in shard_names}
    return {"metadata": {}, "weight_map": weight_map}


@pytest.mark.parametrize("index, match", [
    (b"{", "cannot read .*index.json: Expecting"),
    (b"\xff\xfe", "cannot read .*index.json: 'utf-8' codec"),
    (b"[]", "index.json is not a JSON object"),
    (b"{}", "index.json has no weight_map"),
    (b'{"weight_map": ["a"]}', "index.json has no weight_map"),
    (b'{"weight_map": {"model.norm.weight": 5}}', "index.json has no weight_map"),
])
def test_malformed_shard_index_is_refused(pico, llama_dir, index, match):
    shard_in_two(llama_dir)
    (llama_dir / "model.safetensors.index.json").write_bytes(index)
    one_line_error(pico, match, pico.load_hf_directory, llama_dir)


@pytest.mark.parametrize("shard, match", [
    ("/etc/passwd", "shard '/etc/passwd', which is not a file name"),
    ("../llama/a.safetensors", "shard '../llama/a.safetensors', which is not a file name"),
    ("..", "shard '..', which is not a file name"),
    ("fifo.safetensors", "shard 'fifo.safetensors', which is missing or not a regular file"),
    ("gone.safetensors", "shard 'gone.safetensors', which is missing or not a regular file"),
])
def test_shards_must_be_regular_files_beside_the_index(pico, llama_dir, shard, match):
    """Nothing outside the model directory is read, and a pipe is not opened (it would block)."""
    index = shard_in_two(llama_dir)
    os.mkfifo(llama_dir / "fifo.safetensors")
    index["weight_map"]["model.norm.weight"] = shard
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(pico, match, pico.load_hf_directory, llama_dir)


def test_one_weights_file_wins_over_a_stale_shard_index_beside_it(pico, llama_dir):
    """transformers loads model.safetensors where there is one, whatever index lies beside
    it (left from an earlier, sharded download): so does --init_from."""
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "gone.safetensors"}}))
    assert pico.hf_weight_files(llama_dir) == [llama_dir / "model.safetensors"]
    model, _ = pico.import_hf(llama_dir)
    check_same_model(pico, model, llama_dir, 300)


def bin_dir(llama_dir, contents):
    """llama_dir with its weights replaced by pytorch_model.bin holding `contents`."""
    (llama_dir / "model.safetensors").unlink()
    torch.save(contents, llama_dir / "pytorch_model.bin")
    return llama_dir


def test_pytorch_model_bin_that_is_not_a_flat_dict_of_tensors_is_refused(pico, llama_dir):
    state = load_file(llama_dir / "model.safetensors")
    bin_dir(llama_dir, {"state_dict": state})
    one_line_error(pico, "bin holds a Python dict under 'state_dict', not a tensor",
                   pico.load_hf_directory, llama_dir)
    torch.save(state | {"model.norm.weight": "abc"}, llama_dir / "pytorch_model.bin")
    one_line_error(pico, "bin holds a Python str under 'model.norm.weight'",
                   pico.load_hf_directory, llama_dir)
    torch.save([1], llama_dir / "pytorch_model.bin")
    one_line_error(pico, "bin holds a Python list, not a dict", pico.load_hf_directory, llama_dir)


def test_pytorch_model_bin_that_is_not_weights_only_is_refused_without_torch_advice(
        pico, llama_dir, recwarn):
    """One line: torch's warning about the pickle protocol stays off stderr, and its advice to
    load with weights_only=False (which would run the file's code) is not repeated."""
    import pickle
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(pico.UserError) as error:
        pico.load_hf_directory(llama_dir)
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)
    assert "pytorch_model.bin: a plain Python pickle (protocol 4)" in str(error.value)
    assert not [w for w in recwarn.list if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_weights_that_are_quantized_or_not_real_numbers_are_refused(pico, llama_dir, dtype):
    """float8 too: a cast would read quantized weights without their scales (and float8_e4m3fn
    has no isfinite, so it had failed with a traceback)."""
    state = load_file(llama_dir / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    save_file(state, llama_dir / "model.safetensors")
    one_line_error(pico, f"tensor model.norm.weight is {str(dtype).removeprefix('torch.')}; "
                   "pico-llm reads float16, bfloat16, float32 and float64 weights",
                   pico.load_hf_directory, llama_dir)


def test_float64_weights_are_read_as_the_same_numbers(pico, llama_dir):
    """Double-precision weights (a save from a float64 experiment) are real numbers too: read
    and cast to float32, they give the model the float32 file gives."""
    expected = pico.import_hf(llama_dir)[0].state_dict()
    state = load_file(llama_dir / "model.safetensors")
    save_file({name: tensor.double() for name, tensor in state.items()},
              llama_dir / "model.safetensors")
    got = pico.import_hf(llama_dir)[0].state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_pickle_of_meta_or_sparse_tensors_is_refused(pico, llama_dir):
    """pytorch_model.bin may hold tensors without values (meta) or sparse ones: one line each,
    not a traceback from the finiteness check."""
    state = load_file(llama_dir / "model.safetensors")
    bin_dir(llama_dir, state | {"model.norm.weight": torch.empty(64, device="meta")})
    one_line_error(pico, r"tensor model.norm.weight is a meta tensor \(a shape, no values\), not "
                   "a dense tensor", pico.load_hf_directory, llama_dir)
    torch.save(state | {"model.norm.weight": state["model.norm.weight"].to_sparse()},
               llama_dir / "pytorch_model.bin")
    one_line_error(pico, "tensor model.norm.weight is torch.sparse_coo, not a dense tensor",
                   pico.load_hf_directory, llama_dir)


def test_a_safetensors_header_that_is_no_object_is_refused_as_damaged(pico, llama_dir):
    raw = (llama_dir / "model.safetensors").read_bytes()
    header = b"[1, 2]"
    (llama_dir / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8:])
    one_line_error(pico, r"model.safetensors'?: not a safetensors file \(its header is no JSON "
                   r"object\); download or export the model again", pico.load_hf_directory, llama_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_non_finite_values_are_refused_naming_the_tensor(pico, llama_dir, value):
    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = value
    save_file(state, llama_dir / "model.safetensors")
    one_line_error(pico, "tensor model.layers.1.mlp.up_proj.weight holds NaN or infinite values",
                   pico.load_hf_directory, llama_dir)


def test_tokenizers_that_do_not_fit_are_refused(pico, tmp_path, llama_dir, gpt2_dir,
                                                tokenizers_to_export):
    (llama_dir / "tokenizer.json").unlink()
    one_line_error(pico, "no tokenizer.json", pico.import_hf, llama_dir)
    # a 300-token BPE for a model that embeds 257 tokens
    small = tmp_path / "small"
    torch.manual_seed(0)
    pico.export_hf(pico.TransformerModel(pico.TransformerConfig(vocab_size=257, block_size=16)),
                   None, small)
    pico.tokenizer_to_hf(tokenizers_to_export["bpe"]).save(str(small / "tokenizer.json"))
    one_line_error(pico, "embeds only 257 tokens", pico.import_hf, small)
    # the byte tokenizer's ids end at 256, one past a model of 256 tokens
    edge = tmp_path / "edge"
    pico.export_hf(pico.TransformerModel(pico.TransformerConfig(vocab_size=256, block_size=16)),
                   None, edge)
    pico.tokenizer_to_hf(tokenizers_to_export["char"]).save(str(edge / "tokenizer.json"))
    one_line_error(pico, "has ids up to 256, but the model embeds only 256 tokens",
                   pico.import_hf, edge)
    # a tokenizer that fits, and an end-of-text id from another vocabulary (GPT-2's)
    pico.tokenizer_to_hf(tokenizers_to_export["char"]).save(str(small / "tokenizer.json"))
    hf_config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(hf_config | {"eos_token_id": 50256}))
    one_line_error(pico, "the end-of-text id 50256 .* is not among the model's 257 token ids",
                   pico.import_hf, small)
    (small / "config.json").write_text(json.dumps(hf_config))
    # a tokenizer.json whose vocabulary is empty
    emptied = json.loads((small / "tokenizer.json").read_text())
    emptied["model"]["vocab"], emptied["model"]["merges"], emptied["added_tokens"] = {}, [], []
    (small / "tokenizer.json").write_text(json.dumps(emptied))
    one_line_error(pico, "has an empty vocabulary", pico.import_hf, small)
    # a GPT-2 with another vocabulary and no tokenizer.json
    hf_config = json.loads((gpt2_dir / "config.json").read_text())
    config = pico.config_from_hf(hf_config | {"vocab_size": 1000})
    one_line_error(pico, "not GPT-2's 50257", pico.tokenizer_from_hf, gpt2_dir, config)
    # GPT-2's vocabulary in a Llama: the size was no reason ("its 50257-token vocabulary is not
    # GPT-2's 50257")
    llama = pico.config_from_hf(json.loads((llama_dir / "config.json").read_text())
                                | {"vocab_size": 50257})
    one_line_error(pico, "has no tokenizer.json, and it is a llama model, not GPT-2; put the "
                   "model's tokenizer.json there", pico.tokenizer_from_hf, llama_dir, llama)


# --- E.6 --init_from: directories and hub ids ---------------------------------------------------

def test_init_from_a_directory_is_that_directory(pico, gpt2_dir):
    assert pico.resolve_init_from(str(gpt2_dir)) == gpt2_dir


def test_a_hugging_face_directory_given_as_a_checkpoint_points_to_init_from(pico, gpt2_dir):
    with pytest.raises(pico.UserError, match=r"is a directory; it looks like a Hugging Face "
                                             r"model: load it with --init_from"):
        pico.read_checkpoint(gpt2_dir, "--checkpoint")


def test_init_from_a_hub_id_offline_fails_fast_naming_the_directory_form(pico, monkeypatch):
    monkeypatch.setattr(pico, "huggingface_hub_reachable", lambda timeout_s=3.0: False)
    start = time.perf_counter()
    one_line_error(pico, r"--local-dir DIR\) and pass --init_from DIR", pico.resolve_init_from,
                   "openai-community/gpt2")
    assert time.perf_counter() - start < 2


def test_init_from_a_hub_id_downloads_safetensors_or_fails_in_one_line(pico, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(pico, "huggingface_hub_reachable", lambda timeout_s=3.0: True)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda spec, allow_patterns: calls.append(allow_patterns) or str(tmp_path))
    assert pico.resolve_init_from("openai-community/gpt2") == tmp_path
    assert "model*.safetensors*" in calls[0]

    def gated(spec, allow_patterns):
        raise OSError("401 Client Error\nAccess to model meta-llama/x is restricted")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    one_line_error(pico, "401 Client Error; download it once", pico.resolve_init_from,
                   "meta-llama/x")


@pytest.mark.parametrize("spec", ["gpt2", "no/such/dir", "./org/name", "/org/name", "~/org-xyz/name",
                                  "org/name/", "../name"])
def test_init_from_a_path_that_does_not_exist_is_a_missing_path_not_a_hub_id(pico, monkeypatch,
                                                                               spec):
    asked = []
    monkeypatch.setattr(pico, "huggingface_hub_reachable", lambda timeout_s=3.0: asked.append(spec))
    one_line_error(pico, "no such directory", pico.resolve_init_from, spec)
    assert asked == []


def test_init_from_a_link_to_nothing_is_named_as_one(pico, tmp_path, monkeypatch):
    """A broken link or a loop where the model was: it had been "no such directory"."""
    monkeypatch.setattr(pico, "huggingface_hub_reachable", lambda timeout_s=3.0: False)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "broken").symlink_to(tmp_path / "moved")
    for link in (tmp_path / "loop", tmp_path / "broken"):
        one_line_error(pico, "is a symbolic link to nothing \\(broken, or a loop\\)",
                       pico.resolve_init_from, str(link))


def test_paths_with_a_newline_are_quoted_so_that_an_error_stays_one_line(pico, tmp_path):
    one_line_error(pico, r"--init_from 'org/na\\nme': no such directory", pico.resolve_init_from,
                   "org/na\nme")
    (tmp_path / "a\nb").mkdir()
    one_line_error(pico, r"'.*a\\nb' has no config.json", pico.load_hf_directory,
                   tmp_path / "a\nb")


def test_init_from_org_name_is_a_hub_id_unless_org_is_a_directory_here(pico, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pico, "huggingface_hub_reachable", lambda timeout_s=3.0: False)
    one_line_error(pico, "the Hugging Face hub is unreachable", pico.resolve_init_from,
                   "Qwen/Qwen3-0.6B")
    (tmp_path / "Qwen").mkdir()
    one_line_error(pico, "Qwen/Qwen3-0.6B: no such directory", pico.resolve_init_from,
                   "Qwen/Qwen3-0.6B")


def test_a_model_too_large_for_memory_is_refused_before_its_weights_are_read(
        refused, pico, monkeypatch, tmp_path, corpus):
    source = make_llama_dir(pico, tmp_path / "llama")
    parameters = pico.count_parameters(pico.import_hf(source)[0])
    reads = []
    monkeypatch.setattr(pico, "read_hf_weights", lambda path: reads.append(path))
    monkeypatch.setattr(pico, "memory_available", lambda device: 2**20)  # 1 MiB
    message = refused("is too large to train here; choose a smaller model", "--init_from",
                      str(source), *fine_tune(corpus))
    assert f"transformer needs about {pico.memory_size(16 * parameters)}" in message
    assert f"({parameters:,} parameters" in message and "than the 1.0 MiB" in message
    assert reads == []
    monkeypatch.setattr(pico, "memory_available", lambda device: 2**18)  # sampling needs 4 bytes
    message = refused("choose a smaller model", "--generate", "--init_from", str(source))
    assert f"needs about {pico.memory_size(4 * parameters)} ({parameters:,} parameters" in message
    assert reads == []


# --- E.6 The command line: fine-tune, resume, generate, export ----------------------------------

@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("".join(f"the cat {i} sat on the mat and the dog {i % 7} ran\n"
                            for i in range(40)))
    return path


def fine_tune(corpus, *extra):
    """Four steps of fine-tuning on 12 short lines: two epochs of two steps."""
    return ["--models", "transformer", "--input_files", str(corpus), "--block_size", "24",
            "--batch_size", "4", "--max_steps_per_epoch", "2", "--epochs", "2",
            "--limit_custom_examples", "12", "--max_new_tokens", "2", "--learning_rate", "1e-3",
            "--quiet", *extra]


def latest_checkpoint(save_dir):
    return sorted((save_dir / "transformer").glob("step_*.pt"))[-1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fine_tuned_model_exports_with_the_logits_pico_computes(pico, run_main, tmp_path, corpus,
                                                                family, gpt2_dir):
    source = gpt2_dir if family == "gpt2" else make_llama_dir(pico, tmp_path / "llama")
    imported, tokenizer = pico.import_hf(source)
    status, out, err = run_main("--init_from", str(source), *fine_tune(corpus),
                                "--save_dir", str(tmp_path / "ckpt"),
                                "--export_hf", str(tmp_path / "out"), "--run_name", "tuned")
    assert status == 0, err
    assert f"Hugging Face model written to {tmp_path / 'out'}" in out
    run = pico.load_runlog(tmp_path / "artefacts" / "tuned.json")
    assert run["data"]["tokenizer"] == tokenizer.name
    assert run["models"]["transformer"]["config"]["n_blocks"] == 2
    tuned, tuned_tokenizer, _ = pico.model_from_checkpoint(latest_checkpoint(tmp_path / "ckpt"),
                                                           "--checkpoint")
    assert tuned_tokenizer.name == tokenizer.name
    ids = random_ids(imported.config.vocab_size)
    assert not torch.allclose(pico_logits(tuned, ids), pico_logits(imported, ids))  # it trained
    check_same_model(pico, tuned, tmp_path / "out", imported.config.vocab_size)
    reimported, reimported_tokenizer = pico.import_hf(tmp_path / "out")
    torch.testing.assert_close(pico_logits(reimported, ids), pico_logits(tuned, ids))
    assert reimported_tokenizer.encode("the cat sat") == tokenizer.encode("the cat sat")


def test_generate_from_an_hf_directory_gives_the_greedy_tokens_of_transformers(
        pico, run_main, gpt2_dir):
    status, out, err = run_main("--generate", "--init_from", str(gpt2_dir), "--prompt", "Hello there",
                                "--temperature", "0", "--max_new_tokens", "6")
    assert status == 0, err
    gpt2 = pico.GPT2Tokenizer()
    prompt = gpt2.encode("Hello there")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=gpt2.eot_id)[0].tolist()
    new = [i for i in expected[len(prompt):] if i != gpt2.eot_id]
    assert out.rstrip("\n") == "Hello there" + gpt2.decode(new)
    # a training command's --block_size, typed: not used, and said (it had been silently)
    status, again, err = run_main("--generate", "--init_from", str(gpt2_dir), "--prompt",
                                  "Hello there", "--temperature", "0", "--max_new_tokens", "6",
                                  "--block_size", "8")
    assert status == 0 and again == out, err
    assert err.endswith(f"positions of --init_from {gpt2_dir}; --block_size 8 is not used\n"), err


def losses(run):
    return [h["train_loss"] for h in run["models"]["transformer"]["history"]]


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen3", marks=pytest.mark.slow),
                                    pytest.param("gpt-oss", marks=pytest.mark.slow)])
def test_init_from_run_resumes_generates_and_exports_without_the_hf_directory(
        pico, run_main, tmp_path, corpus, monkeypatch, family):
    """The checkpoints of an --init_from run carry the model's config and tokenizer.json."""
    source = (make_llama_dir(pico, tmp_path / "llama") if family == "llama"
              else make_family_dir(pico, tmp_path / "llama", family))
    assert run_main("--init_from", str(source), *fine_tune(corpus), "--run_name", "whole")[0] == 0
    flags = ["--init_from", str(source), *fine_tune(corpus, "--save_dir", str(tmp_path / "ckpt"))]
    calls, real_step = [], pico.training_step

    def step_then_ctrl_c(*args):
        calls.append(real_step(*args))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return calls[-1]

    monkeypatch.setattr(pico, "training_step", step_then_ctrl_c)
    assert run_main(*flags, "--run_name", "cut")[0] == 130
    monkeypatch.setattr(pico, "training_step", real_step)
    shutil.rmtree(source)
    status, _, err = run_main(*flags, "--resume", "--run_name", "resumed")
    assert status == 0, err
    artefacts = tmp_path / "artefacts"
    assert losses(pico.load_runlog(artefacts / "resumed.json")) == losses(
        pico.load_runlog(artefacts / "whole.json"))

    checkpoint = latest_checkpoint(tmp_path / "ckpt")
    status, out, err = run_main("--generate", "--checkpoint", str(checkpoint), "--prompt", "the cat",
                                "--temperature", "0", "--max_new_tokens", "5")
    assert status == 0, err
    model, tokenizer, _ = pico.model_from_checkpoint(checkpoint, "--checkpoint")
    greedy = pico.generate_text(model, tokenizer, "the cat", 5, pico.SamplingRule(temperature=0.0))
    assert out.rstrip("\n") == greedy.text

    status, out, err = run_main("--checkpoint", str(checkpoint), "--export_hf", str(tmp_path / "out"))
    assert status == 0 and err == "", err
    check_same_model(pico, model, tmp_path / "out", 300)
    # the training command with --checkpoint added: its flags of training are said to go unread
    status, out, err = run_main("--checkpoint", str(checkpoint), "--export_hf", str(tmp_path / "o2"),
                                "--epochs", "3", "--learning_rate", "0.01")
    assert status == 0 and err.count("pico-llm:") == 1 and err.endswith(   # after transformers'
        "pico-llm: note: --checkpoint with --export_hf trains nothing and reads no text, so "  # bar
        "--epochs, --learning_rate are not read\n"), err
    assert out.startswith("Hugging Face model written to")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tokenizer.encode("the cat") == tokenizer.encode("the cat")


@pytest.mark.slow
def test_fine_tuning_a_qwen3_with_its_own_tokenizer_end_to_end(pico, run_main, tmp_path):
    """--init_from DIR --models transformer --input_dir my_text/ --epochs 1 trains in float32 on
    the CPU, checkpoints, samples from the checkpoint, and exports a directory that transformers
    loads with the checkpoint's logits and tokenizer."""
    source = make_family_dir(pico, tmp_path / "qwen3", "qwen3")
    save_tiny_tokenizer(source, "byte-level")
    text = tmp_path / "my_text"
    text.mkdir()
    for name in ("a", "b"):
        (text / f"{name}.txt").write_text("".join(
            f"<|im_start|>user\nWhat is {i} + {i}?<|im_end|>\n<|im_start|>assistant\n{2 * i}"
            f"<|im_end|>\n" for i in range(30)))
    status, out, err = run_main("--init_from", str(source), "--models", "transformer", "--input_dir",
                                str(text), "--epochs", "1", "--block_size", "32", "--batch_size", "4",
                                "--max_new_tokens", "2", "--save_dir", str(tmp_path / "ckpt"),
                                "--export_hf", str(tmp_path / "out"), "--run_name", "tuned", "--quiet")
    assert status == 0, err
    assert pico.resolve_dtype(None, torch.device("cpu")) == "float32"  # bf16 on GPUs only
    checkpoint = latest_checkpoint(tmp_path / "ckpt")
    model, tokenizer, _ = pico.model_from_checkpoint(checkpoint, "--checkpoint")
    imported, _ = pico.import_hf(source)
    ids = random_ids(300)
    assert not torch.allclose(pico_logits(model, ids), pico_logits(imported, ids))  # it trained
    check_same_model(pico, model, tmp_path / "out", 300)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for sample in TOKENIZER_TEXTS:
        assert hf_tokenizer.encode(sample, add_special_tokens=False) == tokenizer.encode(sample)
    status, out, err = run_main("--generate", "--checkpoint", str(checkpoint), "--prompt",
                                "<|im_start|>user\nWhat is", "--temperature", "0",
                                "--max_new_tokens", "5")
    assert status == 0, err
    greedy = pico.generate_text(model, tokenizer, "<|im_start|>user\nWhat is", 5,
                                pico.SamplingRule(temperature=0.0))
    assert out.rstrip("\n") == greedy.text.rstrip("\n")


def test_a_finished_run_resumed_with_export_hf_exports_the_trained_weights(
        pico, run_main, refused, tmp_path, corpus):
    """Also: a checkpoint of another model is not exported."""
    flags = fine_tune(corpus, "--tokenizer", "char", "--models", "lstm_seq,transformer",
                      "--embed_size", "16", "--d_model", "32", "--n_heads", "2", "--n_blocks", "1",
                      "--save_dir", str(tmp_path / "ckpt"))
    assert run_main(*flags)[0] == 0
    status, out, err = run_main(*flags, "--resume", "--export_hf", str(tmp_path / "out"))
    assert status == 0, err
    model, _, _ = pico.model_from_checkpoint(latest_checkpoint(tmp_path / "ckpt"), "--checkpoint")
    check_same_model(pico, model, tmp_path / "out", 257)
    lstm = sorted((tmp_path / "ckpt" / "lstm_seq").glob("step_*.pt"))[-1]
    refused("holds no Transformer (LSTMSeqModel)", "--checkpoint", str(lstm),
            "--export_hf", str(tmp_path / "lstm"))


# --- E.6 The command line: bad input, one line each, nothing written ----------------------------

def files_under(directory):
    return {path for path in directory.rglob("*")}


@pytest.fixture
def refused(pico, run_main, tmp_path, capsys):
    """Runs main(); checks exit status 2, one error line matching `match`, nothing written."""
    def check(match, *argv):
        capsys.readouterr()  # what the fixtures printed (transformers' progress bars)
        before = files_under(tmp_path)
        status, out, err = run_main(*argv)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert match in lines[0], lines[0]
        assert files_under(tmp_path) == before
        return lines[0]
    return check


def test_init_from_a_directory_without_config_json_is_refused(refused, tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    refused("has no config.json", "--init_from", str(tmp_path / "empty"), *fine_tune(corpus))


def test_init_from_a_file_or_a_model_without_weights_is_refused(refused, tmp_path, corpus,
                                                               llama_dir):
    """A model is a directory (or a hub id), and a directory holds its weights."""
    (tmp_path / "config.json").write_text("{}\n")
    refused("is a file; pass a model directory or a hub id",
            "--init_from", str(tmp_path / "config.json"), *fine_tune(corpus))
    for weights in llama_dir.glob("*.safetensors"):
        weights.unlink()
    refused("has no model.safetensors or pytorch_model.bin",
            "--init_from", str(llama_dir), *fine_tune(corpus))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_a_model_file_that_is_a_broken_link_is_named_as_one(pico, llama_dir, name):
    """The Hugging Face cache's snapshots are links into its blobs: a blob gone is a broken
    link, which is not "no config.json" (nor, for the tokenizer, "no tokenizer.json")."""
    (llama_dir / name).unlink()
    (llama_dir / name).symlink_to(llama_dir / "blob_that_is_gone")
    one_line_error(pico, f"{name} is a symbolic link to nothing \\(broken, or a loop\\); "
                   "download the model again", pico.import_hf, llama_dir)


@pytest.mark.parametrize("gone", ["model.safetensors.index.json", "model-00001-of-00001.safetensors"])
def test_a_shard_index_or_shard_that_is_a_broken_link_is_named_as_one(pico, llama_dir, gone):
    """Sharded weights, as large models ship them: the index or a shard it names gone from the
    cache is a broken link, named as one."""
    (llama_dir / "model.safetensors").rename(llama_dir / "model-00001-of-00001.safetensors")
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}))
    (llama_dir / gone).unlink()
    (llama_dir / gone).symlink_to(llama_dir / "blob_that_is_gone")
    one_line_error(pico, f"{gone} is a symbolic link to nothing", pico.hf_weight_files, llama_dir)


def test_init_from_with_a_config_json_that_is_a_folder_says_so(pico, tmp_path):
    (tmp_path / "model" / "config.json").mkdir(parents=True)
    one_line_error(pico, "config.json is not a regular file", pico.read_hf_config,
                   tmp_path / "model")


def test_a_gpt2_tensor_stored_under_both_names_is_refused(refused, own_gpt2_dir, corpus):
    """Old files name GPT-2's tensors without "transformer.": one stored under both names had
    been taken twice, the later silently replacing the earlier (here a zero embedding)."""
    state = load_file(own_gpt2_dir / "model.safetensors")
    state["wte.weight"] = torch.zeros_like(state["transformer.wte.weight"])
    save_file(state, own_gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    refused("the model's weights hold transformer.wte.weight twice, also as wte.weight; "
            "download or export the model again", "--generate", "--init_from", str(own_gpt2_dir))
    refused("transformer.wte.weight twice", "--init_from", str(own_gpt2_dir), *fine_tune(corpus))


def test_init_from_an_unsupported_architecture_is_refused(refused, tmp_path, corpus):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(tmp_path / "bert")
    refused("model_type='bert' is not supported", "--init_from", str(tmp_path / "bert"),
            *fine_tune(corpus))


def test_init_from_mismatched_shapes_is_refused(refused, own_gpt2_dir, corpus, tmp_path):
    state = load_file(own_gpt2_dir / "model.safetensors")
    state["transformer.wpe.weight"] = torch.zeros(32, 32)
    save_file(state, own_gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    refused("transformer.wpe.weight has shape (32, 32); config.json implies (64, 32)",
            "--init_from", str(own_gpt2_dir), *fine_tune(corpus), "--export_hf",
            str(tmp_path / "out"))


def test_init_from_with_a_tokenizer_that_does_not_fit_is_refused(refused, pico, tmp_path, corpus,
                                                                 gpt2_dir, llama_dir):
    refused("--tokenizer char does not fit", "--init_from", str(gpt2_dir), *fine_tune(corpus),
            "--tokenizer", "char")
    refused("--tokenizer gpt2 does not fit", "--init_from", str(llama_dir), *fine_tune(corpus),
            "--tokenizer", "gpt2")
    refused("--tokenizer gpt2 does not fit", "--generate", "--init_from", str(llama_dir),
            "--tokenizer", "gpt2")
    refused("holds model transformer, which --models lstm_seq does not name", "--generate",
            "--init_from", str(llama_dir), "--models", "lstm_seq")
    (llama_dir / "tokenizer.json").unlink()
    refused("has no tokenizer.json", "--init_from", str(llama_dir), *fine_tune(corpus))
    (llama_dir / "tokenizer.json").mkdir()
    refused("tokenizer.json is not a file", "--init_from", str(llama_dir), *fine_tune(corpus))


@pytest.mark.parametrize("flags, match", [
    (["--d_model", "64"], "--d_model is --init_from's to set"),
    (["--n_blocks", "12"], "--n_blocks is --init_from's to set"),
    (["--tie_weights", "false"], "--tie_weights is --init_from's to set"),
    (["--transformer_variant", "minGPT"], "--transformer_variant is --init_from's to set"),
    (["--models", "lstm_seq,transformer"], "pass --models transformer"),
    (["--enable_transformer_gptoss"], "pass --models transformer"),
    (["--block_size", "100"], "--block_size 100 exceeds the 64 positions"),
    (["--sweep", "budget"], "--sweep builds and reports on its own models"),
    (["--accounting"], "--accounting builds and reports on its own models"),
    (["--generate", "--checkpoint", "x.pt"], "give one"),
])
def test_init_from_flag_combinations_that_contradict_it_are_refused(refused, gpt2_dir, corpus,
                                                                     flags, match):
    refused(match, "--init_from", str(gpt2_dir), *fine_tune(corpus), *flags)


def test_init_from_a_hub_id_offline_is_refused_within_seconds(refused, pico, monkeypatch, corpus):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = refused("the Hugging Face hub is unreachable", "--init_from", "openai-community/gpt2",
                      *fine_tune(corpus))
    assert "--init_from DIR" in message and time.perf_counter() - start < 10


@pytest.mark.parametrize("flags, match", [
    (["--pos_emb", "none"], "pos_emb=none has no transformers class"),
    (["--norm_position", "post"], "norm_position=post has no transformers class"),
    (["--ffn", "silu"], "ffn=silu has no transformers class"),
    (["--pos_emb", "learned"], "norm=rmsnorm has no transformers class"),
    (["--transformer_variant", "minGPT", "--n_kv_heads", "2"], "n_kv_heads=2"),
    (["--models", "lstm_seq"], "--export_hf writes the model named transformer"),
    (["--generate", "--checkpoint", "x.pt"], "--generate writes no model"),
])
def test_export_hf_of_a_model_transformers_cannot_load_is_refused_before_training(
        refused, tmp_path, corpus, flags, match):
    refused(match, *fine_tune(corpus, "--tokenizer", "char"), "--export_hf", str(tmp_path / "out"),
            *flags)


def test_export_hf_into_a_non_empty_directory_is_refused_before_training(refused, tmp_path, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    refused("already exists and is not empty", *fine_tune(corpus, "--tokenizer", "char"), "--export_hf",
            str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_hf_inside_the_model_it_starts_from_is_refused(refused, llama_dir, corpus):
    """The imported model's directory (perhaps the hub's cache) is read, never written into."""
    refused("is inside the --init_from model", "--init_from", str(llama_dir), *fine_tune(corpus),
            "--export_hf", str(llama_dir / "fine-tuned"))
    assert not (llama_dir / "fine-tuned").exists()


def test_export_hf_onto_a_file_is_refused_as_a_file(refused, tmp_path, corpus):
    (tmp_path / "notes.txt").write_text("mine")
    refused("is a file, not a directory", *fine_tune(corpus, "--tokenizer", "char"), "--export_hf",
            str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"



def keep_only_tokens_for(directory, characters):
    """Cut the directory's byte-level tokenizer.json down to `characters` (and <|endoftext|>),
    with no unknown token: `tokenizers` then drops every other character without a word."""
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokenizer["model"]["vocab"] = {token: i for token, i in vocab.items() if token in characters}
    tokenizer["model"]["merges"] = []
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))


def test_fine_tuning_notes_the_characters_the_tokenizer_drops(run_main, capsys, llama_dir, corpus):
    keep_only_tokens_for(llama_dir, "abcdefghijklmnopqrstuvwxyzĠ")       # no digits
    capsys.readouterr()  # what the fixtures printed (transformers' progress bars)
    status, _, err = run_main("--init_from", str(llama_dir), *fine_tune(corpus))
    lines = corpus.read_text().splitlines()[:12]                    # --limit_custom_examples 12
    digits, characters = sum(c.isdigit() for line in lines for c in line), sum(map(len, lines))
    assert status == 0 and len(err.strip().splitlines()) == 1, err
    assert f"no token for {digits} of the text's {characters} characters" in err, err
    assert "'1'" in err and "'t'" not in err, err


def test_fine_tuning_on_text_the_tokenizer_mostly_drops_is_refused(refused, llama_dir, corpus):
    keep_only_tokens_for(llama_dir, "aĠ")
    line = refused("does not cover this text", "--init_from", str(llama_dir), *fine_tune(corpus))
    assert "'t'" in line and "--tokenizer gpt2 or bpe:N" in line, line


HF_PACKAGES = ("transformers", "tokenizers", "safetensors", "safetensors.torch", "huggingface_hub")


def test_pico_llm_imports_no_hugging_face_package_at_load_time():
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    loaded = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    loaded |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in loaded} & set(HF_PACKAGES)


def test_pico_llm_trains_without_the_hugging_face_packages(run_main, monkeypatch, tmp_path, corpus):
    """Without them the rest trains, and --export_hf names the missing package before training."""
    for name in HF_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)  # "import name" now raises ImportError
    run = fine_tune(corpus, "--tokenizer", "char", "--models", "lstm_seq", "--embed_size", "16")
    assert run_main(*run)[0] == 0
    status, _, err = run_main(*run, "--export_hf", str(tmp_path / "out"))
    assert (status, err) == (2, "pico-llm: error: --export_hf needs the safetensors package; "
                                "pip install -r requirements-core.txt\n")
    assert not (tmp_path / "out").exists()


def test_generate_from_a_prompt_the_tokenizer_has_no_tokens_for_is_refused(refused, pico,
                                                                          llama_dir):
    """A tokenizer.json with a two-token vocabulary and no unknown token turns "zzz" into no
    tokens at all: refused in one line, not a sample of nothing."""
    tokenizer = json.loads((llama_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"], tokenizer["model"]["merges"] = {"a": 0, "b": 1}, []
    tokenizer["added_tokens"] = []
    (llama_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    refused("--prompt 'zzz' is no token at all in this model's tokenizer", "--generate",
            "--init_from", str(llama_dir), "--prompt", "zzz", "--max_new_tokens", "2")
    refused("--prompt '   ' is no token at all", "--generate", "--init_from", str(llama_dir),
            "--prompt", "   ", "--max_new_tokens", "2")    # shown as given, not as ''


@pytest.mark.parametrize("kind", ["folder", "loop"])
def test_weights_that_are_no_regular_file_are_named_as_such(pico, own_gpt2_dir, kind):
    """A model.safetensors that is a folder or a looping link is there but unreadable: said
    so, not "has no model.safetensors"."""
    weights = own_gpt2_dir / "model.safetensors"
    weights.unlink()
    if kind == "folder":
        weights.mkdir()
    else:
        weights.symlink_to(weights)
    said = ("model.safetensors is not a regular file" if kind == "folder" else
            r"model.safetensors is a symbolic link to nothing \(broken, or a loop\)")
    with pytest.raises(pico.UserError, match=said):
        pico.hf_weight_files(own_gpt2_dir)


def test_a_tokenizer_json_that_cannot_encode_a_word_is_one_line(pico):
    """A WordLevel tokenizer.json without its unknown token fails on a word it lacks with a
    bare Exception from the Rust library: pico-llm's answer is a UserError naming it."""
    tokenizers = pytest.importorskip("tokenizers")
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "</s>": 2}))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = pico.HFTokenizer(word_level, vocab_size=8, eot_id=2, name="hf:test")
    assert tokenizer.encode("a b a") == [0, 1, 0]
    for encode in (lambda: tokenizer.encode("a cat"), lambda: tokenizer.encode_batch(["a", "cat"])):
        with pytest.raises(pico.UserError, match=r"the model's tokenizer.json \(hf:test\) cannot "
                                                 r"encode this text \(.*Missing \[UNK\]"):
            encode()
